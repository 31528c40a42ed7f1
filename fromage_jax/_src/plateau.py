"""The paper's protocol: divide Fromage's learning rate by 10 on a plateau."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax import contrib

from fromage_jax._src import alias
from fromage_jax._src import layers


class FromageOnPlateauState(NamedTuple):
  """State of :func:`fromage_on_plateau`."""

  count: jax.Array  # shape=(), dtype=jnp.int32: updates made so far.
  plateau: contrib.ReduceLROnPlateauState  # .scale: the current decay factor.
  fromage: optax.OptState  # the state of the wrapped `fromage` chain.


def fromage_on_plateau(
    learning_rate: optax.ScalarOrSchedule = 0.01,
    *,
    factor: float = 0.1,
    patience: int = 10,
    rtol: float = 1e-4,
    atol: float = 0.0,
    cooldown: int = 0,
    accumulation_size: int = 1,
    min_scale: float = 0.0,
    p_bound: float | None = None,
    layer_axes: layers.LayerAxes = None,
    axis_name: layers.AxisName = None,
) -> optax.GradientTransformationExtraArgs:
  """Fromage whose learning rate is multiplied by `factor` on a loss plateau.

  The plateau logic is :func:`optax.contrib.reduce_on_plateau`'s (same
  arguments); the resulting scale `s` multiplies `eta` itself, so that step and
  prefactor both use `eta_t = s * learning_rate(count)`:
  `W' = (W - eta_t ||W||/||g|| g) / sqrt(1 + eta_t**2)`.

  Chaining `reduce_on_plateau` after :func:`fromage` is *not* the same: it
  scales the whole update `W' - W`, whose shrink part
  `W (1/sqrt(1 + eta**2) - 1)` then becomes `s W (1/sqrt(1 + eta**2) - 1)`
  instead of `W (1/sqrt(1 + (s eta)**2) - 1)`; for scale-invariant layers the
  norm then decays every step instead of staying constant.

  Args:
    learning_rate: the initial `eta`, a float or an optax schedule.
    factor: multiplies the scale when the loss plateaus (paper: 0.1).
    patience: steps without improvement before the scale is reduced.
    rtol: relative tolerance for an improvement.
    atol: absolute tolerance for an improvement.
    cooldown: steps to wait after a reduction before counting again.
    accumulation_size: number of loss values averaged before each check.
    min_scale: the scale never falls below this.
    p_bound: as in :func:`fromage`.
    layer_axes: as in :func:`fromage`.
    axis_name: as in :func:`fromage`.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs`; pass the loss as
    `update(grads, state, params, value=loss)`.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import fromage_jax
    >>> tx = fromage_jax.fromage_on_plateau(0.1, patience=2)
    >>> params = jnp.array([1.0, 1.0])
    >>> state = tx.init(params)
    >>> for _ in range(4):  # a constant loss never improves
    ...   updates, state = tx.update(params, state, params, value=1.0)
    >>> print(state.plateau.scale)
    0.1

  References:
    Bernstein et al, `On the distance between two neural networks and the
    stability of learning <https://arxiv.org/abs/2002.03432>`_, 2020
    (section 6: "eta was decayed by 10 when the loss plateaued")
  """
  layers.check_hyperparameter(
      learning_rate, 'learning_rate', allow_callable=True
  )
  layers.check_hyperparameter(p_bound, 'p_bound', positive=True)
  plateau = contrib.reduce_on_plateau(
      factor=factor,
      patience=patience,
      rtol=rtol,
      atol=atol,
      cooldown=cooldown,
      accumulation_size=accumulation_size,
      min_scale=min_scale,
  )

  def inner(eta):
    return alias.fromage(
        eta, p_bound=p_bound, layer_axes=layer_axes, axis_name=axis_name
    )

  def init_fn(params):
    return FromageOnPlateauState(
        count=jnp.zeros([], jnp.int32),
        # A float32 scalar, not the params: the scale must not be bf16.
        plateau=plateau.init(jnp.zeros([], jnp.float32)),
        fromage=inner(0.0).init(params),
    )

  def update_fn(updates, state, params=None, *, value, **extra_args):
    del extra_args
    _, plateau_state = plateau.update((), state.plateau, value=value)
    eta = learning_rate(state.count) if callable(learning_rate) else (
        learning_rate
    )
    eta = plateau_state.scale * jnp.asarray(eta, jnp.float32)
    updates, fromage_state = inner(eta).update(updates, state.fromage, params)
    return updates, FromageOnPlateauState(
        count=optax.safe_increment(state.count),
        plateau=plateau_state,
        fromage=fromage_state,
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
