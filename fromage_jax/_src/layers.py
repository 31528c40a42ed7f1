"""What a layer is, and what its norm is.

Every transform and diagnostic in fromage_jax takes its norms from here, so
that `layer_axes` (stacked layers), `axis_name` (sharded layers inside
`shard_map`), the accumulation dtype and the checks on input trees have one
definition.

A *layer* is one array leaf of a pytree, or, for a leaf that stacks several
layers, one slice of it along its `layer_axes`. Norms are Frobenius norms over
one layer's elements, accumulated in float32 at least.
"""

import math
from typing import Any

import chex
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

# None | tuple of ints | a pytree prefix of those | a callable params -> those.
LayerAxes = Any
# None | a mesh axis name | a tuple of names | a pytree prefix | a callable.
AxisName = Any


# Exact types: a NamedTuple such as optax.MaskedNode is a pytree node, not axes.
def _is_axes(x) -> bool:
  return x is None or (
      type(x) in (tuple, list)
      and all(isinstance(a, (int, np.integer)) for a in x)
  )


def _is_axis_name(x) -> bool:
  return x is None or isinstance(x, str) or (
      type(x) is tuple and all(isinstance(a, str) for a in x)
  )


def _broadcast_prefix(spec, tree, is_spec_leaf, what: str):
  """Gives every leaf of `tree` its entry of `spec` (a value or a prefix)."""
  if callable(spec):
    spec = spec(tree)
  if is_spec_leaf(spec):
    return jax.tree.map(lambda _: spec, tree)
  spec_leaves, spec_def = jax.tree.flatten(spec, is_leaf=is_spec_leaf)
  try:
    subtrees = spec_def.flatten_up_to(tree)
  except (ValueError, TypeError) as e:
    raise ValueError(
        f'{what} must be a value for every leaf or a pytree prefix of the '
        f'params; its structure {spec_def} does not match the params: {e}'
    ) from e
  for value in spec_leaves:
    if not is_spec_leaf(value):
      raise TypeError(f'{what}: {value!r} is not a valid entry.')
  filled = [
      jax.tree.map(lambda _, v=v: v, sub)
      for v, sub in zip(spec_leaves, subtrees, strict=True)
  ]
  return spec_def.unflatten(filled)


def leaf_name(path) -> str:
  return jax.tree_util.keystr(path) or '<root>'


def resolve_layer_axes(layer_axes: LayerAxes, params) -> Any:
  """Returns a pytree like `params` holding each leaf's layer axes.

  Args:
    layer_axes: `None` (each leaf is one layer), a tuple of axes for every leaf,
      a pytree prefix of such tuples (with `None` for "one layer"), or a
      callable `params -> ` one of those.
    params: the pytree whose leaves are being described.

  Returns:
    A pytree with the structure of `params` whose leaves are sorted tuples of
    non-negative ints: the axes that index layers within that leaf.
  """
  raw = _broadcast_prefix(layer_axes, params, _is_axes, 'layer_axes')

  def normalise(path, leaf, axes):
    ndim = jnp.ndim(leaf)
    axes = () if axes is None else tuple(int(a) for a in axes)
    for a in axes:
      if not -ndim <= a < ndim:
        raise ValueError(
            f'layer_axes {axes} is out of range for leaf '
            f'{leaf_name(path)} of shape {jnp.shape(leaf)}.'
        )
    out = tuple(sorted(a % ndim for a in axes))
    if len(set(out)) != len(out):
      raise ValueError(
          f'layer_axes {axes} repeats an axis for leaf {leaf_name(path)}.'
      )
    return out

  # `params` leads: each of its leaves receives its whole entry of `raw`.
  return jax.tree_util.tree_map_with_path(normalise, params, raw)


def resolve_axis_name(axis_name: AxisName, params) -> Any:
  """Returns a pytree like `params` holding each leaf's mesh axis names."""
  return _broadcast_prefix(axis_name, params, _is_axis_name, 'axis_name')


def norm_dtype(dtype) -> jnp.dtype:
  """The dtype norms and step arithmetic use for a leaf of `dtype`."""
  if jnp.dtype(dtype) in (jnp.float64, jnp.complex128):
    return jnp.dtype(jnp.float64)
  return jnp.dtype(jnp.float32)


def compute_dtype(dtype) -> jnp.dtype:
  """The dtype step arithmetic uses: float32 at least, complex stays complex."""
  if jnp.issubdtype(dtype, jnp.complexfloating):
    return jnp.promote_types(dtype, jnp.complex64)
  return norm_dtype(dtype)


def _real_product(x, y) -> jax.Array:
  """Elementwise `Re(x * conj(y))` in the compute dtype."""
  xc = x.astype(compute_dtype(x.dtype))
  yc = y.astype(compute_dtype(y.dtype))
  if jnp.iscomplexobj(xc) or jnp.iscomplexobj(yc):
    return xc.real * yc.real + xc.imag * yc.imag
  return xc * yc


def _reduced_axes(x, axes: tuple[int, ...]) -> tuple[int, ...]:
  return tuple(a for a in range(jnp.ndim(x)) if a not in axes)


def inner(x, y, axes: tuple[int, ...], axis_name=None) -> jax.Array:
  """Real inner product `Re <x, y>` of each layer of two same-shaped leaves.

  Args:
    x: one leaf.
    y: a leaf of the same shape.
    axes: their layer axes (from `resolve_layer_axes`).
    axis_name: mesh axis name(s) across which the leaves are sharded inside
      `shard_map`; partial sums are added across them.

  Returns:
    An array in `norm_dtype(x.dtype)`, of `x`'s rank, with size 1 on every
    axis that is not a layer axis (so it broadcasts against `x`).
  """
  out = jnp.sum(_real_product(x, y), axis=_reduced_axes(x, axes),
                keepdims=True)
  if axis_name is not None:
    out = lax.psum(out, axis_name)
  return out


# Layers with fewer elements get one variadic reduction for all their sums:
# XLA:CPU emits it as one kernel, where a plain sum this small becomes three.
# From this size up, XLA:CPU's plain sums are vectorised library kernels, much
# faster than a variadic reduction, so each sum is its own kernel.
_VARIADIC_BELOW = 4096


def layer_sums(w, g, axes: tuple[int, ...], axis_name=None, *,
               with_inner: bool = False) -> tuple[jax.Array, ...]:
  """`||w||**2`, `||g||**2` and, with `with_inner`, `Re <w, g>` per layer.

  The same sums as `sq_norms` and `inner`, computed together (see
  `_VARIADIC_BELOW`) and returned with the layer axes only (scalars when the
  leaf is one layer), in `norm_dtype(w.dtype)`.
  """
  prods = (_real_product(w, w), _real_product(g, g))
  if with_inner:
    prods += (_real_product(w, g),)
  reduce = _reduced_axes(w, axes)
  if math.prod(jnp.shape(w)[a] for a in reduce) < _VARIADIC_BELOW:
    zero = jnp.zeros((), prods[0].dtype)
    sums = tuple(lax.reduce(prods, (zero,) * len(prods),
                            lambda x, y: tuple(map(lax.add, x, y)), reduce))
  else:
    sums = tuple(jnp.sum(p, axis=reduce) for p in prods)
  if axis_name is not None:
    sums = lax.psum(sums, axis_name)
  return sums


def sq_norms(x, axes: tuple[int, ...], axis_name=None) -> jax.Array:
  """Squared Frobenius norm of each layer of `x`; see `inner`."""
  return inner(x, x, axes, axis_name)


def safe_ratio(num: jax.Array, den: jax.Array) -> jax.Array:
  """`num / den` where both are > 0, else 1 (the SPEC's zero-norm rule)."""
  ok = jnp.logical_and(num > 0, den > 0)
  return jnp.where(ok, num / jnp.where(ok, den, 1), 1)


def check_params(params, transform: str) -> None:
  if params is None:
    raise ValueError(
        f'fromage_jax.{transform} requires params: Fromage scales each step by '
        'the norm of the parameters, so call `update(updates, state, params)`.'
    )


def check_float_leaves(tree, transform: str, what: str) -> None:
  """Rejects integer and bool leaves, naming the leaf."""
  def check(path, leaf):
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.inexact):
      raise TypeError(
          f'fromage_jax.{transform}: {what} leaf {leaf_name(path)} has dtype '
          f'{dtype}; Fromage needs floating-point (or complex) leaves. Exclude '
          'it with optax.masked or optax.partition.'
      )
  jax.tree_util.tree_map_with_path(check, tree)


def check_updates_and_params(
    updates, params, transform: str, *, same_dtype: bool
) -> None:
  """Trace-time checks on the inputs of a transform's `update`.

  Args:
    updates: the incoming updates.
    params: the current params (must not be None).
    transform: the transform's name, for error messages.
    same_dtype: whether dtypes must match too. The first transform of a chain
      sees raw gradients and requires it; later ones may receive updates that
      an earlier transform (e.g. a traced learning rate) promoted to a wider
      float, and they cast back to the params' dtype.
  """
  check_params(params, transform)
  msg = f'fromage_jax.{transform}: updates and params must match'
  chex.assert_trees_all_equal_structs(updates, params, custom_message=msg)
  if same_dtype:
    chex.assert_trees_all_equal_shapes_and_dtypes(
        updates, params, custom_message=msg
    )
  else:
    chex.assert_trees_all_equal_shapes(updates, params, custom_message=msg)
  check_float_leaves(params, transform, 'params')
  check_float_leaves(updates, transform, 'updates')


def check_hyperparameter(
    value, name: str, *, positive: bool = False, allow_callable: bool = False
) -> None:
  """`ValueError` for a concrete negative (or non-positive) or non-finite value.

  Traced values (as `optax.inject_hyperparams` passes inside `update`) and
  schedules are not checked.
  """
  if value is None or isinstance(value, jax.core.Tracer):
    return
  if callable(value):
    if allow_callable:
      return
    raise TypeError(f'{name} must be a number, got {value!r}.')
  arr = np.asarray(value)
  if not jnp.issubdtype(arr.dtype, jnp.number):
    raise TypeError(f'{name} must be a number, got {value!r}.')
  arr = arr.astype(np.float64)
  bad = (not np.all(np.isfinite(arr))) or (
      np.any(arr <= 0) if positive else np.any(arr < 0)
  )
  if bad:
    need = 'positive' if positive else 'non-negative'
    raise ValueError(f'{name} must be a finite, {need} number; got {value!r}.')
