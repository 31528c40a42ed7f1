"""The Fromage optimizer."""


import optax

from fromage_jax._src import fused
from fromage_jax._src import layers
from fromage_jax._src import transform
from fromage_jax._src import validation


def fromage(
    learning_rate: optax.ScalarOrSchedule = 0.01,
    *,
    p_bound: float | None = None,
    grad_norm_floor: float = 0.0,
    layer_axes: layers.LayerAxes = None,
    axis_name: layers.AxisName = None,
) -> optax.GradientTransformationExtraArgs:
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

  A relative step never shrinks by itself: near a minimum every layer still
  moves by `eta_t` of its norm, so with a constant `eta` the loss climbs back
  after a while. Decay `eta` (an optax schedule, or
  :func:`fromage_on_plateau`), as the paper does; or set `grad_norm_floor`,
  which shrinks a layer's step once its gradient norm is below the floor.

  It is the chain `optax.named_chain` of :func:`scale_by_frobenius_ratio`,
  :func:`optax.scale_by_learning_rate`, :func:`prefactor_correction` and,
  when `p_bound` is given, :func:`norm_clip_to_init`, each under its own
  name. With `p_bound`, the chain's update is computed in one elementwise
  pass after the norms instead of two (the same update, to float rounding,
  and the same state; measured faster on the CPU, see `_src/fused.py`). For
  the paper's "divide eta by 10 on plateau", use :func:`fromage_on_plateau`.

  Its first transform rescales whatever direction comes in to each layer's
  norm, so `optax.chain(direction, fromage(eta))` moves every layer by
  `eta` of its norm along another optimizer's direction (Adam's
  `optax.scale_by_adam()`, momentum's `optax.trace(0.9)`, Muon's). Such
  directions are not orthogonal to `W`, so the prefactor no longer holds the
  norms: chain :func:`norm_project_to_init` after it to hold them exactly.

  Gradients may have another floating dtype than their params (bf16 params
  with f32 gradients, or the reverse): norms and arithmetic run in float32 at
  least (float64 if either is), and the update has the params' dtype.
  Complex params are supported, with `|z|**2` norms.

  Args:
    learning_rate: `eta`, a non-negative float or an optax schedule of the
      update count.
    p_bound: if given, bound each layer's norm by `p_bound` times its initial
      norm (finite, > 0).
    grad_norm_floor: a lower bound on each layer's gradient norm in the
      ratio `||W|| / ||g||` (finite, >= 0; 0 is none); see
      :func:`scale_by_frobenius_ratio`.
    layer_axes: axes of a leaf that index stacked layers (e.g. `(0,)` for an
      `nnx.scan` stack); see :func:`scale_by_frobenius_ratio`.
    axis_name: inside `jax.shard_map`, the mesh axis name(s) across which
      leaves are sharded; see :func:`scale_by_frobenius_ratio`.

  Returns:
    The corresponding :class:`optax.GradientTransformationExtraArgs`, whose
    state is the chain's: a dict from the transforms' names to their states
    (`state['prefactor_correction'].count`, the updates made so far, and
    with `p_bound` `state['norm_clip_to_init'].init_norms`, one norm per
    layer). Its `update` requires `params` and ignores extra keyword
    arguments (`value=`, ...).

  Raises:
    TypeError: if `learning_rate` is `None` or not a number or schedule, or
      `p_bound` is not a number.
    ValueError: if `learning_rate` is negative or not finite, or `p_bound` is
      not finite and > 0.

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
  name = 'fromage'
  with validation.entry_point(name):
    # The prefactor first: it refuses a learning rate that cannot work before
    # optax's scale_by_learning_rate sees it.
    prefactor = transform.prefactor_correction(learning_rate)
    parts = [
        ('scale_by_frobenius_ratio', transform.scale_by_frobenius_ratio(
            grad_norm_floor=grad_norm_floor, layer_axes=layer_axes,
            axis_name=axis_name)),
        ('scale_by_learning_rate',
         optax.scale_by_learning_rate(learning_rate)),
        ('prefactor_correction', prefactor),
    ]
    if p_bound is not None:
      parts.append(('norm_clip_to_init', transform.norm_clip_to_init(
          p_bound, layer_axes=layer_axes, axis_name=axis_name)))
  if p_bound is None:
    return validation.named(optax.named_chain(*parts), name)
  # The same chain; its update computed in one pass (see `fused`).
  return validation.named(
      fused.fuse_clip(parts, learning_rate, p_bound, grad_norm_floor,
                      layer_axes, axis_name),
      name)
