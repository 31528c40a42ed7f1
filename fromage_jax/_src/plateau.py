"""The paper's protocol: divide Fromage's learning rate by 10 on a plateau."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax import contrib

from fromage_jax._src import alias
from fromage_jax._src import layers
from fromage_jax._src import transform
from fromage_jax._src import validation


class FromageOnPlateauState(NamedTuple):
  """State of :func:`fromage_on_plateau`."""

  plateau: contrib.ReduceLROnPlateauState  # .scale: the current decay factor.
  # fromage inside optax.inject_hyperparams: .count (int32, updates made so
  # far), .hyperparams['learning_rate'] (float32, the last step's eta_t).
  fromage: optax.InjectHyperparamsState

  @property
  def count(self) -> jax.Array:
    """Updates made so far (int32, shape ())."""
    return self.fromage.count


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
    grad_norm_floor: float = 0.0,
    layer_axes: layers.LayerAxes = None,
    axis_name: layers.AxisName = None,
) -> optax.GradientTransformationExtraArgs:
  """Fromage whose learning rate is multiplied by `factor` on a loss plateau.

  The plateau logic is :func:`optax.contrib.reduce_on_plateau`'s (same
  arguments), and :func:`fromage` runs inside
  :func:`optax.inject_hyperparams`: each step, the plateau's scale `s`
  multiplies `eta` itself, which is injected as fromage's learning rate, so
  that step and prefactor both use `eta_t = s * learning_rate(count)`:
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
    grad_norm_floor: as in :func:`fromage`.
    layer_axes: as in :func:`fromage`.
    axis_name: as in :func:`fromage`.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs`; pass the loss as
    `update(grads, state, params, value=loss)`. Its state is a
    :class:`FromageOnPlateauState`; `state.fromage.hyperparams
    ['learning_rate']` is the `eta_t` of the last step.

  Raises:
    TypeError: for a hyperparameter of the wrong type (`None`, a string,
      ...), a non-integer `patience`, `cooldown` or `accumulation_size`.
    ValueError: for a hyperparameter out of its range: `factor` not in
      (0, 1), `min_scale` not in [0, 1], negative or non-finite tolerances,
      `accumulation_size` below 1; see :func:`fromage` for the others.

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
  name = 'fromage_on_plateau'
  validation.check_hyperparameter(
      learning_rate, 'learning_rate', name, allow_callable=True
  )
  validation.check_hyperparameter(
      p_bound, 'p_bound', name, positive=True, allow_none=True
  )
  validation.check_hyperparameter(grad_norm_floor, 'grad_norm_floor', name)
  for value, arg in ((factor, 'factor'), (rtol, 'rtol'), (atol, 'atol'),
                     (min_scale, 'min_scale')):
    validation.check_hyperparameter(value, arg, name)
  for value, arg, ok, what in (
      (factor, 'factor', lambda x: 0 < x < 1, '(0, 1)'),
      (min_scale, 'min_scale', lambda x: x <= 1, '[0, 1]')):
    if not isinstance(value, jax.core.Tracer) and not ok(value):
      raise ValueError(f'{validation.called(name)}: {arg} must be in {what}, '
                       f'got {value!r}.')
  validation.check_int(patience, 'patience', name, 0)
  validation.check_int(cooldown, 'cooldown', name, 0)
  validation.check_int(accumulation_size, 'accumulation_size', name, 1)
  plateau = contrib.reduce_on_plateau(
      factor=factor,
      patience=patience,
      rtol=rtol,
      atol=atol,
      cooldown=cooldown,
      accumulation_size=accumulation_size,
      min_scale=min_scale,
  )
  # The learning rate is injected by hand each step (a float here, so that
  # inject_hyperparams keeps whatever the step sets); the schedule, if any,
  # is evaluated at inject_hyperparams' own count.
  fromage = optax.inject_hyperparams(
      alias.fromage,
      static_args=('p_bound', 'grad_norm_floor', 'layer_axes', 'axis_name'),
      hyperparam_dtype=jnp.float32,  # whatever the params' dtype
  )(learning_rate=0.0, p_bound=p_bound, grad_norm_floor=grad_norm_floor,
    layer_axes=layer_axes, axis_name=axis_name)

  def eta_at(count):
    return jnp.asarray(transform.eta_at(learning_rate, count), jnp.float32)

  def init_fn(params):
    state = fromage.init(params)
    state.hyperparams['learning_rate'] = eta_at(state.count)
    return FromageOnPlateauState(
        # A float32 scalar, not the params: the scale must not be bf16.
        plateau=plateau.init(jnp.zeros([], jnp.float32)),
        fromage=state,
    )

  def update_fn(updates, state, params=None, *, value, **extra_args):
    _, plateau_state = plateau.update((), state.plateau, value=value)
    fromage_state = state.fromage._replace(hyperparams={
        **state.fromage.hyperparams,
        'learning_rate': plateau_state.scale * eta_at(state.fromage.count),
    })
    updates, fromage_state = fromage.update(
        updates, fromage_state, params, value=value, **extra_args
    )
    return updates, FromageOnPlateauState(
        plateau=plateau_state, fromage=fromage_state
    )

  return validation.named(
      optax.GradientTransformationExtraArgs(init_fn, update_fn), name)
