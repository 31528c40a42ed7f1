"""The Fromage optimizer."""


import optax

from fromage_jax._src import fused
from fromage_jax._src import layers


def fromage(
    learning_rate: optax.ScalarOrSchedule = 0.01,
    *,
    p_bound: float | None = None,
    layer_axes: layers.LayerAxes = None,
    axis_name: layers.AxisName = None,
) -> optax.GradientTransformation:
  r"""Frobenius matched gradient descent (Fromage).

  Every layer `W` with gradient `g` becomes

  .. math::
    W' = \frac{W - \eta_t \frac{\|W\|}{\|g\|} g}{\sqrt{1 + \eta_t^2}},

  so each layer moves by about `eta_t` relative to its own norm, whatever its
  size or depth; `eta = 0.01` serves most networks. Layers with `||W|| = 0`
  (zero-initialised biases) take a plain step `-eta_t g / sqrt(1 + eta_t**2)`
  and so learn, unlike :func:`optax.fromage` whose default `min_norm=1e-6`
  leaves them frozen. With `p_bound`, each layer's norm is kept within
  `p_bound` times its norm at `init`.

  The update is that of `optax.chain(scale_by_frobenius_ratio(),
  optax.scale_by_learning_rate(learning_rate),
  prefactor_correction(learning_rate), norm_clip_to_init(p_bound))` (the last
  only when `p_bound` is given), computed in one fused pass per layer: one
  reduction over `W` and `g`, one elementwise update, no temporaries; the
  chain agrees to float rounding. For the paper's "divide eta by 10 on
  plateau", use :func:`fromage_on_plateau`.

  Args:
    learning_rate: `eta`, a non-negative float or an optax schedule of the
      update count.
    p_bound: if given, bound each layer's norm by `p_bound` times its initial
      norm (finite, > 0).
    layer_axes: axes of a leaf that index stacked layers (e.g. `(0,)` for an
      `nnx.scan` stack); see :func:`scale_by_frobenius_ratio`.
    axis_name: inside `jax.shard_map`, the mesh axis name(s) across which
      leaves are sharded; see :func:`scale_by_frobenius_ratio`.

  Returns:
    The corresponding :class:`optax.GradientTransformation`, whose state is a
    :class:`FromageState` (an update count, and one norm per layer with
    `p_bound`). Its `update` requires `params`.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import fromage_jax
    >>> def f(x): return jnp.sum(x ** 2)
    >>> solver = fromage_jax.fromage(learning_rate=0.1)
    >>> params = jnp.array([1., 2., 3.])
    >>> opt_state = solver.init(params)
    >>> for _ in range(3):
    ...   grad = jax.grad(f)(params)
    ...   updates, opt_state = solver.update(grad, opt_state, params)
    ...   params = optax.apply_updates(params, updates)
    ...   print(f'{f(params):.4f}')
    11.2277
    9.0044
    7.2214

  References:
    Bernstein et al, `On the distance between two neural networks and the
    stability of learning <https://arxiv.org/abs/2002.03432>`_, 2020
  """
  layers.check_hyperparameter(
      learning_rate, 'learning_rate', allow_callable=True
  )
  layers.check_hyperparameter(p_bound, 'p_bound', positive=True)
  return fused.fused_fromage(learning_rate, p_bound, layer_axes, axis_name)
