"""The gradient transformations that make up Fromage, and the exact norm
projection that relative steps over other directions need."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fromage_jax._src import layers
from fromage_jax._src import validation


def eta_at(learning_rate: optax.ScalarOrSchedule, count: jax.Array):
  """`eta_t`: the learning rate, or the schedule at `count`."""
  return learning_rate(count) if callable(learning_rate) else learning_rate


def frobenius_ratio(w_sq: jax.Array, g_sq: jax.Array,
                    floor=0.0) -> jax.Array:
  """`||W|| / max(||g||, floor)` from the squared norms; 1 where either norm
  is zero."""
  ok = jnp.logical_and(w_sq > 0, g_sq > 0)
  return layers.divide_where(ok, layers.norm(w_sq),
                             jnp.maximum(layers.norm(g_sq), floor))


def clip_factor(new_norm, init_norm, p_bound) -> jax.Array:
  """What brings a norm `new_norm` back to `p_bound * init_norm`: 1 within
  the bound, or where `init_norm` is 0 (never clipped)."""
  bound = p_bound * init_norm
  clip = jnp.logical_and(init_norm > 0, new_norm > bound)
  return layers.divide_where(clip, bound, new_norm)


@layers.per_leaf
def _scale(g, w, w_sq, g_sq, floor):
  out = g.astype(layers.compute_dtype(g.dtype, w.dtype)) * frobenius_ratio(
      w_sq, g_sq, floor)
  return out.astype(jnp.promote_types(g.dtype, w.dtype))


def project_factor(new_norm, init_norm, scale) -> jax.Array:
  """What brings a norm `new_norm` to exactly `scale * init_norm`: 1 where
  `init_norm` is 0 (a free layer) or `new_norm` is 0 (no direction to
  rescale)."""
  ok = jnp.logical_and(init_norm > 0, new_norm > 0)
  return layers.divide_where(ok, scale * init_norm, new_norm)


@layers.per_leaf(static_argnames=('project',))
def _rescale(u, w, new_sq, init_norm, bound, *, project):
  """The update that takes `w` to `w + u` rescaled by the clip's factor, or
  the projection's."""
  dtype = layers.compute_dtype(w.dtype, u.dtype)
  wc = w.astype(dtype)
  new = wc + u.astype(dtype)
  factor = (project_factor if project else clip_factor)(
      layers.norm(new_sq), init_norm, bound)
  return (new * factor - wc).astype(w.dtype)


def _rescale_to_init(name, bound, project, layer_axes, axis_name, state):
  """`norm_clip_to_init` or `norm_project_to_init`: `state(init_norms)`
  holds each layer's norm at `init`; `update` rescales `W + u`."""

  def init_fn(params):
    validation.check_float_leaves(params, name, 'params')
    found = layers.find_layers(params, layer_axes, axis_name, name=name)
    (w_sq,) = layers.sq_norms(found, found.leaves(params))
    return state(init_norms=found.unflatten([layers.norm(sq) for sq in w_sq]))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args  # accepted and ignored, as optax's transforms do
    validation.check_updates_and_params(updates, params, name)
    found = layers.find_layers(params, layer_axes, axis_name, name=name)
    ws, us = found.leaves(params), found.leaves(updates)
    (new_sq,) = layers.sq_norms(found, [
        w.astype(layers.compute_dtype(w.dtype, u.dtype)) + u
        for w, u in zip(ws, us, strict=True)])
    return found.unflatten([
        _rescale(u, w, sq, w0, bound, project=project) for u, w, sq, w0 in
        zip(us, ws, new_sq, found.leaves(state.init_norms), strict=True)
    ]), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def scale_by_frobenius_ratio(
    *,
    grad_norm_floor: float = 0.0,
    layer_axes: layers.LayerAxes = None,
    axis_name: layers.AxisName = None,
) -> optax.GradientTransformationExtraArgs:
  """Scales each layer's update by the ratio of the parameter and update norms.

  For every layer, `g -> (||W|| / ||g||) * g`, where the norms are Frobenius
  norms over the layer. When either norm is zero the update is passed on
  unscaled (ratio 1): a zero-initialised bias then takes a plain gradient step
  instead of freezing, and a zero gradient stays zero. Norms are computed in
  float32 at least (float64 if a leaf is float64). Gradients may have another
  floating dtype than their params (mixed precision); the result has the
  wider of the two, so that later transforms still see float32 values.

  With `grad_norm_floor > 0` the ratio is `||W|| / max(||g||, floor)`: once a
  layer's gradient norm falls below the floor, its step shrinks with the
  gradient instead of staying `||W||` long. The zero-norm rule is unchanged,
  so zero-initialised layers still learn (unlike :func:`optax.fromage`, whose
  `min_norm` floors `||W||` too).

  Args:
    grad_norm_floor: a lower bound on each layer's gradient norm in the
      ratio (finite, >= 0; 0, the default, is no floor).
    layer_axes: which axes of a leaf index separate layers: `None` (every leaf
      is one layer), a tuple of axes for every leaf (e.g. `(0,)` for a stack of
      `[L, d_in, d_out]` kernels), a pytree prefix of such tuples, or a
      callable `params -> ` one of those.
    axis_name: inside `jax.shard_map`, the mesh axis name (or tuple of names,
      or a pytree prefix / callable giving them per leaf) across which a leaf
      is sharded; squared norms are summed across them so every shard uses its
      layer's global norm.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs` with an empty state;
    extra keyword arguments to `update` (`value=`, ...) are ignored.

  Examples:
    >>> import jax.numpy as jnp
    >>> import fromage_jax
    >>> tx = fromage_jax.scale_by_frobenius_ratio()
    >>> params = {'w': jnp.array([3.0, 4.0]), 'b': jnp.zeros(2)}
    >>> grads = {'w': jnp.array([0.0, 0.5]), 'b': jnp.array([1.0, 1.0])}
    >>> updates, _ = tx.update(grads, tx.init(params), params)
    >>> print(updates['w'], updates['b'])
    [0. 5.] [1. 1.]

  References:
    Bernstein et al, `On the distance between two neural networks and the
    stability of learning <https://arxiv.org/abs/2002.03432>`_, 2020 (eq. 5)
  """
  name = 'scale_by_frobenius_ratio'
  validation.check_hyperparameter(grad_norm_floor, 'grad_norm_floor', name)

  def init_fn(params):
    validation.check_float_leaves(params, name, 'params')
    return optax.EmptyState()

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args  # accepted and ignored, as optax's transforms do
    validation.check_updates_and_params(updates, params, name)
    found = layers.find_layers(params, layer_axes, axis_name, name=name)
    ws, gs = found.leaves(params), found.leaves(updates)
    w_sq, g_sq = layers.sq_norms(found, ws, gs)
    return found.unflatten([
        _scale(*args, grad_norm_floor)
        for args in zip(gs, ws, w_sq, g_sq, strict=True)
    ]), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class PrefactorCorrectionState(NamedTuple):
  """State of :func:`prefactor_correction`."""

  count: jax.Array  # shape=(), dtype=jnp.int32: updates made so far.


def prefactor_correction(
    learning_rate: optax.ScalarOrSchedule,
) -> optax.GradientTransformationExtraArgs:
  """Divides the new parameters by `sqrt(1 + eta_t**2)`.

  Given an update `u` (in Fromage, `-eta_t * ||W|| / ||g|| * g`), returns
  `(W + u) / sqrt(1 + eta_t**2) - W`, so that `optax.apply_updates` gives
  `W' = (W + u) / sqrt(1 + eta_t**2)`. For a gradient orthogonal to `W` (a
  scale-invariant layer), `||W + u||**2 = (1 + eta_t**2) ||W||**2`, and the
  prefactor keeps the norm constant instead of letting it compound.

  `eta_t` is `learning_rate`, or `learning_rate(count)` for a schedule, where
  `count` is the number of updates made so far: the same `eta_t` that
  `optax.scale_by_learning_rate(learning_rate)` uses at that step. Arithmetic is
  in float32 at least; the update is returned in the params' dtype.

  Args:
    learning_rate: the learning rate, a non-negative float or an optax schedule.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import fromage_jax
    >>> tx = fromage_jax.prefactor_correction(0.75)  # sqrt(1 + 0.75**2) = 1.25
    >>> params = jnp.array([1.0, 2.0])
    >>> updates, _ = tx.update(jnp.array([4.0, 3.0]), tx.init(params), params)
    >>> print(optax.apply_updates(params, updates))
    [4. 4.]

  References:
    Bernstein et al, `On the distance between two neural networks and the
    stability of learning <https://arxiv.org/abs/2002.03432>`_, 2020
    (Algorithm 1)
  """
  name = 'prefactor_correction'
  validation.check_hyperparameter(
      learning_rate, 'learning_rate', name, allow_callable=True
  )

  def init_fn(params):
    validation.check_float_leaves(params, name, 'params')
    return PrefactorCorrectionState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args  # accepted and ignored, as optax's transforms do
    validation.check_updates_and_params(updates, params, name)
    eta = eta_at(learning_rate, state.count)

    def correct(u, w):
      dtype = layers.compute_dtype(w.dtype, u.dtype)
      shrink = jax.lax.rsqrt(
          1 + jnp.square(jnp.asarray(eta, layers.norm_dtype(dtype)))
      )
      wc = w.astype(dtype)
      return ((wc + u.astype(dtype)) * shrink - wc).astype(w.dtype)

    new_updates = jax.tree.map(correct, updates, params)
    return new_updates, PrefactorCorrectionState(
        count=optax.safe_increment(state.count)
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class NormClipToInitState(NamedTuple):
  """State of :func:`norm_clip_to_init`."""

  # Like params: each leaf holds its layers' norms at init, float32 (float64
  # for float64 leaves), one per layer, size 1 on every non-layer axis.
  init_norms: optax.Params


def norm_clip_to_init(
    p_bound: float,
    *,
    layer_axes: layers.LayerAxes = None,
    axis_name: layers.AxisName = None,
) -> optax.GradientTransformationExtraArgs:
  """Keeps each layer's norm within `p_bound` times its norm at `init`.

  With `W' = W + u` the parameters the incoming update leads to, a layer whose
  `||W'||` exceeds `p_bound * ||W0||` (`W0`: the params given to `init`) is
  scaled back onto that bound. Layers with `||W0|| = 0` (zero-initialised
  biases) are never clipped. This is the constraint the paper applies in its
  CIFAR-10 and transformer experiments to stop Fromage overfitting.

  Args:
    p_bound: the bound relative to the initial norm; finite and > 0.
    layer_axes: which axes of a leaf index separate layers; see
      :func:`scale_by_frobenius_ratio`.
    axis_name: mesh axis name(s) across which leaves are sharded inside
      `jax.shard_map`; see :func:`scale_by_frobenius_ratio`.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs` whose state holds one
    norm per layer.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import fromage_jax
    >>> tx = fromage_jax.norm_clip_to_init(2.0)
    >>> params = jnp.array([3.0, 4.0])  # norm 5: the bound is 10
    >>> state = tx.init(params)
    >>> updates, state = tx.update(jnp.array([9.0, 8.0]), state, params)
    >>> new_params = optax.apply_updates(params, updates)  # [12, 12], clipped
    >>> print(f"{jnp.linalg.norm(new_params):.4f}", new_params[0] == new_params[1])
    10.0000 True

  References:
    Bernstein et al, `On the distance between two neural networks and the
    stability of learning <https://arxiv.org/abs/2002.03432>`_, 2020
    (section 6, "constraining the neural architecture")
  """
  name = 'norm_clip_to_init'
  validation.check_hyperparameter(p_bound, 'p_bound', name, positive=True)
  return _rescale_to_init(name, p_bound, False, layer_axes, axis_name,
                          NormClipToInitState)


class NormProjectToInitState(NamedTuple):
  """State of :func:`norm_project_to_init`."""

  # Like params: each leaf holds its layers' norms at init, float32 (float64
  # for float64 leaves), one per layer, size 1 on every non-layer axis.
  init_norms: optax.Params


def norm_project_to_init(
    scale: float = 1.0,
    *,
    layer_axes: layers.LayerAxes = None,
    axis_name: layers.AxisName = None,
) -> optax.GradientTransformationExtraArgs:
  """Keeps each layer's norm at exactly `scale` times its norm at `init`.

  With `W' = W + u` the parameters the incoming update leads to, every layer
  is rescaled onto `||W'|| = scale * ||W0||` (`W0`: the params given to
  `init`). Layers with `||W0|| = 0` (zero-initialised biases) are left free,
  as :func:`norm_clip_to_init` leaves them, and so is a layer whose `W'` is
  0 (it has no direction to rescale).

  Fromage's prefactor keeps a layer's norm only when the step is orthogonal
  to `W`, which raw gradients of scale-invariant layers are and Adam's,
  momentum's or Muon's directions are not: after
  `optax.chain(direction, fromage(eta))`, a layer's norm changes by about
  `-eta * cos(W, direction)` of itself each step, and the changes compound.
  Put this transform last to hold every norm fixed (the "hyperball"
  methods).

  Args:
    scale: the norm to hold, relative to the initial norm; finite and > 0.
    layer_axes: which axes of a leaf index separate layers; see
      :func:`scale_by_frobenius_ratio`.
    axis_name: mesh axis name(s) across which leaves are sharded inside
      `jax.shard_map`; see :func:`scale_by_frobenius_ratio`.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs` whose state holds one
    norm per layer.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import fromage_jax
    >>> tx = optax.chain(optax.scale_by_adam(), fromage_jax.fromage(0.1),
    ...                  fromage_jax.norm_project_to_init())
    >>> params = jnp.array([3.0, 4.0])  # norm 5
    >>> state = tx.init(params)
    >>> updates, state = tx.update(jnp.array([1.0, 0.0]), state, params)
    >>> print(f"{jnp.linalg.norm(optax.apply_updates(params, updates)):.4f}")
    5.0000

  References:
    Bernstein et al, `On the distance between two neural networks and the
    stability of learning <https://arxiv.org/abs/2002.03432>`_, 2020
    (section 6, "constraining the neural architecture")
  """
  name = 'norm_project_to_init'
  validation.check_hyperparameter(scale, 'scale', name, positive=True)
  return _rescale_to_init(name, scale, True, layer_axes, axis_name,
                          NormProjectToInitState)
