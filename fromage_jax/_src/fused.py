"""Fromage's whole update in one pass over each layer.

`fromage()` computes exactly the update of the chain `scale_by_frobenius_ratio`
-> `optax.scale_by_learning_rate` -> `prefactor_correction` ->
`norm_clip_to_init`, but in a form XLA compiles to one reduction over `W` and
`g` (their squared norms and, with `p_bound`, their inner product) and one
elementwise pass. With `r = ||W|| / ||g||`, `a = eta_t r` and
`c = 1 / sqrt(1 + eta_t**2)`, the chain's new params are `W' = s (W - a g)`
with `s = c` times the clip factor, and the clip needs `||W - a g||`, which
follows from the three sums:
`||W - a g||**2 = ||W||**2 - 2 a <W, g> + a**2 ||g||**2`.
The chain would instead materialise `W'` to take its norm: a second pass over
both arrays and a temporary as large as the layer.

Per layer XLA:CPU then runs three kernels, as many as for `optax.adam`: the
sums, the scalar arithmetic and the update (four or five for large layers,
whose sums are separate, faster reductions). See `layers.layer_sums` and
`_coefficients`.
"""

from typing import Any
from typing import NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
import optax

from fromage_jax._src import layers


class FromageState(NamedTuple):
  """State of :func:`fromage_jax.fromage`."""

  count: jax.Array  # shape=(), dtype=jnp.int32: updates made so far.
  # With p_bound: like params, each leaf its layers' norms at init (float32, or
  # float64 for float64 leaves; size 1 on non-layer axes). Else None.
  init_norms: Any


# Jitted so that it is traced once per shape and dtype, not once per leaf.
@jax.jit
def _coefficients(w_sq, g_sq, w_g, w0_norm, eta_t, shrink, p_bound):
  """`[s - 1, s a]` of each layer: the update is `(s - 1) W - s a g`."""
  a = eta_t * layers.safe_ratio(jnp.sqrt(w_sq), jnp.sqrt(g_sq))
  if w0_norm is not None:
    new_sq = w_sq - 2 * a * w_g + jnp.square(a) * g_sq
    new_norm = shrink * jnp.sqrt(jnp.maximum(new_sq, 0))
    bound = p_bound * w0_norm
    clip = jnp.logical_and(w0_norm > 0, new_norm > bound)
    shrink = shrink * jnp.where(clip, bound / jnp.where(clip, new_norm, 1), 1)
  shrink = jnp.broadcast_to(shrink, a.shape)
  # One array behind a barrier: XLA then computes all of it in one small
  # kernel, instead of splitting it between kernels of its own and the update.
  return lax.optimization_barrier(jnp.stack([shrink - 1, shrink * a]))


def fused_fromage(
    learning_rate: optax.ScalarOrSchedule,
    p_bound,
    layer_axes: layers.LayerAxes,
    axis_name: layers.AxisName,
) -> optax.GradientTransformation:
  """Builds the fused transform; arguments as `fromage_jax.fromage`."""
  name = 'fromage'

  def init_fn(params):
    layers.check_float_leaves(params, name, 'params')
    init_norms = None
    if p_bound is not None:
      axes = layers.resolve_layer_axes(layer_axes, params)
      names = layers.resolve_axis_name(axis_name, params)
      init_norms = jax.tree.map(
          lambda w, ax, an: jnp.sqrt(layers.sq_norms(w, ax, an)),
          params, axes, names,
      )
    return FromageState(count=jnp.zeros([], jnp.int32), init_norms=init_norms)

  def update_fn(updates, state, params=None):
    layers.check_updates_and_params(updates, params, name, same_dtype=True)
    axes = layers.resolve_layer_axes(layer_axes, params)
    names = layers.resolve_axis_name(axis_name, params)
    eta = (
        learning_rate(state.count) if callable(learning_rate)
        else learning_rate
    )
    init_norms = (
        jax.tree.map(lambda _: None, params) if p_bound is None
        else state.init_norms
    )

    # eta_t and 1 / sqrt(1 + eta_t**2) once per norm dtype, not once per leaf.
    scalars = {}

    def eta_and_shrink(real):
      if real not in scalars:
        eta_t = jnp.asarray(eta, real)
        scalars[real] = eta_t, lax.rsqrt(1 + jnp.square(eta_t))
      return scalars[real]

    def step(g, w, w0_norm, ax, an):
      sums = layers.layer_sums(w, g, ax, an, with_inner=w0_norm is not None)
      if w0_norm is not None:
        w0_norm = w0_norm.reshape(sums[0].shape)
      c = _coefficients(
          *sums[:2], sums[2] if w0_norm is not None else None, w0_norm,
          *eta_and_shrink(layers.norm_dtype(w.dtype)), p_bound,
      )
      # Per-layer coefficients, broadcast against the leaf.
      shape = tuple(d if a in ax else 1 for a, d in enumerate(w.shape))
      dtype = layers.compute_dtype(w.dtype)
      return (c[0].reshape(shape) * w.astype(dtype)
              - c[1].reshape(shape) * g.astype(dtype)).astype(w.dtype)

    new_updates = jax.tree.map(
        step, updates, params, init_norms, axes, names,
        is_leaf=lambda x: x is None,
    )
    return new_updates, FromageState(
        count=optax.safe_increment(state.count), init_norms=state.init_norms
    )

  return optax.GradientTransformation(init_fn, update_fn)
