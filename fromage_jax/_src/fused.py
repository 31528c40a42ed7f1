"""Fromage with `p_bound`, its update in one pass: a named optimisation.

`fromage(learning_rate, p_bound=b)` is the chain `scale_by_frobenius_ratio`
-> `optax.scale_by_learning_rate` -> `prefactor_correction` ->
`norm_clip_to_init(b)` (an `optax.named_chain`), and keeps that chain's
`init`, state and state transition; only the arithmetic of its update is
fused here. With `a = eta_t ||W|| / ||g||` and `s = 1 / sqrt(1 + eta_t**2)`
times the clip's factor, the chain's new params are `W' = s (W - a g)`, so
the update is `(s - 1) W - s a g`. The chain's clip takes the norm of the
unclipped `W'`, which XLA materialises and reads back; here
`||W - a g||**2 = ||W||**2 - 2 a Re<W, g> + a**2 ||g||**2` comes from a third
sum over `W` and `g`, then one elementwise pass writes the update.

Why it is kept: in the same process on the CPU, the chain's step with
`p_bound` is measured slower than this one on realistic trees (GPT-2-like,
ResNet-50-like); the figures are in `benchmarks/results/chain_vs_fused.md`.
Without `p_bound` the same fusion compiled to exactly the chain's kernels and
ran in its time, so `fromage()` is then the chain.
"""


import jax.numpy as jnp
import optax

from fromage_jax._src import layers
from fromage_jax._src import transform
from fromage_jax._src import validation

_CLIP = 'norm_clip_to_init'


def _coefficients(w_sq, g_sq, w_g, w0_norm, eta, p_bound, floor):
  """`(s - 1, s a)` of each layer: its update is `(s - 1) W - s a g`."""
  eta_t = jnp.asarray(eta, w_sq.dtype)
  a = eta_t * transform.frobenius_ratio(w_sq, g_sq, floor)
  new_sq = jnp.maximum(w_sq - 2 * a * w_g + jnp.square(a) * g_sq, 0)
  root = jnp.sqrt(1 + jnp.square(eta_t))  # the prefactor is 1 / root
  f = transform.clip_factor(layers.norm(new_sq) / root, w0_norm, p_bound)
  s = f / root
  # s - 1 = f (1 / root - 1) + (f - 1), without the cancellation of 1 / root
  # against 1 when eta_t is small.
  s_minus_1 = f * (-jnp.square(eta_t) / (root * (1 + root))) + (f - 1)
  return s_minus_1, s * a


@layers.per_leaf
def _update(w, g, w_sq, g_sq, w_g, init_norm, eta, p_bound, floor):
  dtype = layers.compute_dtype(w.dtype, g.dtype)
  c_w, c_g = _coefficients(w_sq, g_sq, w_g, init_norm, eta, p_bound, floor)
  return (c_w * w.astype(dtype) - c_g * g.astype(dtype)).astype(w.dtype)


def fuse_clip(
    parts: list[tuple[str, optax.GradientTransformationExtraArgs]],
    learning_rate: optax.ScalarOrSchedule,
    p_bound: float,
    grad_norm_floor: float,
    layer_axes: layers.LayerAxes,
    axis_name: layers.AxisName,
) -> optax.GradientTransformationExtraArgs:
  """`optax.named_chain(*parts)`, as `alias.fromage` builds it, fused."""
  name = 'fromage'

  def update_fn(updates, state, params=None, **extra_args):
    validation.check_updates_and_params(updates, params, name)
    found = layers.find_layers(params, layer_axes, axis_name, name=name)
    ws, gs = found.leaves(params), found.leaves(updates)
    eta = transform.eta_at(learning_rate, state['prefactor_correction'].count)
    sums = layers.inner_products(found, (ws, ws), (gs, gs), (ws, gs))
    new_updates = found.unflatten([
        _update(*args, eta, p_bound, grad_norm_floor) for args in
        zip(ws, gs, *sums, found.leaves(state[_CLIP].init_norms), strict=True)
    ])
    # The chain's own state transition: its counts advance as they would
    # have (run on an empty tree), and norm_clip_to_init's state is constant.
    counted = [(n, t) for n, t in parts if n != _CLIP]
    _, new_state = optax.named_chain(*counted).update(
        (), {n: state[n] for n, _ in counted}, (), **extra_args
    )
    merged = state.copy()  # the chain's own container (an OrderedDict)
    merged.update(new_state)
    return new_updates, merged

  return optax.GradientTransformationExtraArgs(
      optax.named_chain(*parts).init, update_fn
  )
