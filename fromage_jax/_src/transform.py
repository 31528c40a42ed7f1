"""The three gradient transformations that make up Fromage."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fromage_jax._src import layers


def eta_at(learning_rate: optax.ScalarOrSchedule, count: jax.Array):
  """`eta_t`: the learning rate, or the schedule at `count`."""
  return learning_rate(count) if callable(learning_rate) else learning_rate


def frobenius_ratio(w_sq: jax.Array, g_sq: jax.Array) -> jax.Array:
  """`||W|| / ||g||` from the squared norms; 1 where either is zero."""
  ok = jnp.logical_and(w_sq > 0, g_sq > 0)
  return layers.divide_where(ok, jnp.sqrt(w_sq), jnp.sqrt(g_sq))


def clip_factor(new_norm, init_norm, p_bound) -> jax.Array:
  """What brings a norm `new_norm` back to `p_bound * init_norm`: 1 within
  the bound, or where `init_norm` is 0 (never clipped)."""
  bound = p_bound * init_norm
  clip = jnp.logical_and(init_norm > 0, new_norm > bound)
  return layers.divide_where(clip, bound, new_norm)


@layers.per_leaf
def _scale(g, w, *, axes, axis_name):
  ratio = frobenius_ratio(*layers.layer_sums(w, g, axes, axis_name))
  out = g.astype(layers.compute_dtype(g.dtype, w.dtype)) * ratio
  return out.astype(jnp.promote_types(g.dtype, w.dtype))


@layers.per_leaf
def _clip(u, w, init_norm, p_bound, *, axes, axis_name):
  dtype = layers.compute_dtype(w.dtype, u.dtype)
  wc = w.astype(dtype)
  new = wc + u.astype(dtype)
  new_norm = jnp.sqrt(layers.sq_norms(new, axes, axis_name))
  return (new * clip_factor(new_norm, init_norm, p_bound) - wc).astype(w.dtype)


def scale_by_frobenius_ratio(
    *,
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

  Args:
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

  def init_fn(params):
    layers.check_float_leaves(params, name, 'params')
    return optax.EmptyState()

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args  # accepted and ignored, as optax's transforms do
    layers.check_updates_and_params(updates, params, name)
    axes = layers.resolve_layer_axes(layer_axes, params)
    names = layers.resolve_axis_name(axis_name, params)

    return jax.tree.map(
        lambda g, w, ax, an: _scale(g, w, axes=ax, axis_name=an),
        updates, params, axes, names), state

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
  layers.check_hyperparameter(
      learning_rate, 'learning_rate', allow_callable=True
  )
  name = 'prefactor_correction'

  def init_fn(params):
    layers.check_float_leaves(params, name, 'params')
    return PrefactorCorrectionState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args  # accepted and ignored, as optax's transforms do
    layers.check_updates_and_params(updates, params, name)
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
  layers.check_hyperparameter(p_bound, 'p_bound', positive=True)
  name = 'norm_clip_to_init'

  def init_fn(params):
    layers.check_float_leaves(params, name, 'params')
    axes = layers.resolve_layer_axes(layer_axes, params)
    names = layers.resolve_axis_name(axis_name, params)
    return NormClipToInitState(
        init_norms=jax.tree.map(
            lambda w, ax, an: jnp.sqrt(layers.sq_norms(w, ax, an)),
            params, axes, names,
        )
    )

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args  # accepted and ignored, as optax's transforms do
    layers.check_updates_and_params(updates, params, name)
    axes = layers.resolve_layer_axes(layer_axes, params)
    names = layers.resolve_axis_name(axis_name, params)

    return jax.tree.map(
        lambda u, w, w0, ax, an: _clip(u, w, w0, p_bound, axes=ax,
                                       axis_name=an),
        updates, params, state.init_norms, axes, names), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
