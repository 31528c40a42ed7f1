"""What a layer is, and what its norm is.

Every transform and diagnostic in fromage_jax finds its layers and takes
their norms here, so that `layer_axes` (stacked layers), `axis_name` (layers
sharded inside `shard_map`) and the accumulation dtype have one definition.

A *layer* is one array leaf of a pytree, or, for a leaf that stacks several
layers, one slice of it along its `layer_axes`. Norms are Frobenius norms over
one layer's elements, accumulated in float32 at least.

Norms are plain sums, so that every JAX transformation (`grad`, `jvp`,
`vmap`, `scan`, ...) and the sharding partitioner see through them, and the
partial sums of all layers cross devices together: one `psum` per mesh axis
name inside `shard_map` (:func:`inner_products`), and all-reduces that XLA
combines under `jit` with sharded params. Square roots and divisions that can
meet a zero read a safe value there (:func:`norm`, :func:`divide_where`), so
that their derivatives are finite too.
"""

from collections.abc import Callable
from collections.abc import Hashable
from collections.abc import Sequence
import functools
from typing import Any
from typing import NamedTuple
from typing import TypeAlias

import jax
from jax import lax
import jax.numpy as jnp

from fromage_jax._src import validation

PyTree: TypeAlias = Any
# The axes of one leaf that index its layers.
Axes: TypeAlias = tuple[int, ...]
# `None` (each leaf is one layer), `Axes` for every leaf, a pytree prefix of
# the params holding `Axes` or `None`, or a callable `params -> ` one of those.
LayerAxes: TypeAlias = Axes | None | PyTree | Callable[[PyTree], PyTree]
# A mesh axis name or a tuple of them, or `None` (not sharded inside
# `shard_map`); or a pytree prefix of the params holding those; or a callable.
AxisName: TypeAlias = (
    Hashable | tuple[Hashable, ...] | None | PyTree | Callable[[PyTree], PyTree]
)


# Exact types: a NamedTuple such as optax.MaskedNode is a pytree node, not axes.
def _is_axes(x) -> bool:
  return x is None or (
      type(x) in (tuple, list) and all(map(validation.is_integer, x))
  )


def _is_axis_name(x) -> bool:
  return x is None or isinstance(x, str) or (
      type(x) is tuple and all(isinstance(a, str) for a in x)
  )


def _entries(spec, tree, is_entry, arg: str, name: str) -> list:
  """Each leaf of `tree`'s entry of `spec` (one value, or a pytree prefix)."""
  leaves = jax.tree.leaves(tree)
  # An empty tree has no layers: any spec fits it (SPEC: empty update).
  if not leaves:
    return []
  if callable(spec):
    spec = spec(tree)
  if is_entry(spec):
    return [spec] * len(leaves)
  spec_leaves, spec_def = jax.tree.flatten(spec, is_leaf=is_entry)
  try:
    subtrees = spec_def.flatten_up_to(tree)
  except (ValueError, TypeError) as e:
    raise ValueError(
        f'{validation.called(name)}: {arg} must be a value for every leaf or '
        f'a pytree prefix of the params; its structure {spec_def} does not '
        f'match the params: {e}'
    ) from e
  out = []
  for value, sub in zip(spec_leaves, subtrees, strict=True):
    if not is_entry(value):
      raise TypeError(
          f'{validation.called(name)}: {arg}: {value!r} is not a valid entry.'
      )
    out += [value] * len(jax.tree.leaves(sub))
  return out


class Layers(NamedTuple):
  """The layers of a pytree: its structure, and each leaf's layer axes (sorted,
  non-negative) and mesh axis names, in the order of its leaves."""

  treedef: jax.tree_util.PyTreeDef
  axes: tuple[Axes, ...]
  axis_names: tuple[Any, ...]

  def leaves(self, tree) -> list:
    """The leaves of a tree with the params' structure."""
    return self.treedef.flatten_up_to(tree)

  def unflatten(self, leaves: Sequence) -> PyTree:
    return self.treedef.unflatten(leaves)


def find_layers(
    params: PyTree, layer_axes: LayerAxes = None, axis_name: AxisName = None,
    *, name: str,
) -> Layers:
  """The layers of `params` (see the module) for `layer_axes`, `axis_name`.

  Args:
    params: any pytree of arrays (dicts, tuples, NamedTuples, dataclasses,
      `None` and `optax.MaskedNode` holding no leaf).
    layer_axes: which axes of a leaf index separate layers (see `LayerAxes`).
    axis_name: the mesh axis names each leaf is sharded over inside
      `shard_map` (see `AxisName`).
    name: the public function calling, for its errors.

  Raises:
    ValueError: for a spec that does not fit the params, or an axis out of
      range or repeated, naming the leaf.
    TypeError: for an entry that is not axes or axis names.
  """
  with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
  raw = _entries(layer_axes, params, _is_axes, 'layer_axes', name)
  names = _entries(axis_name, params, _is_axis_name, 'axis_name', name)
  axes = []
  for (path, leaf), spec in zip(with_path, raw, strict=True):
    ndim = jnp.ndim(leaf)
    spec = () if spec is None else tuple(int(a) for a in spec)
    if not all(-ndim <= a < ndim for a in spec):
      raise ValueError(
          f'{validation.called(name)}: layer_axes {spec} is out of range for '
          f'leaf {validation.leaf_name(path)} of shape {jnp.shape(leaf)}.'
      )
    sorted_axes = tuple(sorted(a % ndim for a in spec))
    if len(set(sorted_axes)) != len(sorted_axes):
      raise ValueError(
          f'{validation.called(name)}: layer_axes {spec} repeats an axis for '
          f'leaf {validation.leaf_name(path)}.'
      )
    axes.append(sorted_axes)
  return Layers(treedef, tuple(axes), tuple(names))


def compute_dtype(*dtypes) -> jnp.dtype:
  """The dtype of step arithmetic on leaves of `dtypes`.

  Float32 at least, wider if any leaf is (float64), complex if any leaf is:
  bf16 params with f32 gradients, or the reverse, are computed in float32.
  """
  return jnp.dtype(jnp.promote_types(jnp.result_type(*dtypes), jnp.float32))


def norm_dtype(*dtypes) -> jnp.dtype:
  """The real dtype norms of leaves of `dtypes` accumulate in."""
  return jnp.dtype(jnp.finfo(compute_dtype(*dtypes)).dtype)


def _product(x, y, dtype) -> jax.Array:
  """`Re(x * conj(y))`, elementwise, in `dtype`."""
  x, y = x.astype(compute_dtype(x.dtype)), y.astype(compute_dtype(y.dtype))
  if jnp.iscomplexobj(x) or jnp.iscomplexobj(y):
    prod = jnp.real(x) * jnp.real(y) + jnp.imag(x) * jnp.imag(y)
  else:
    prod = x * y
  return prod.astype(dtype)


def per_leaf(fn: Callable | None = None, **jit_kwargs) -> Callable:
  """`jax.jit(fn)`: a transform's arithmetic on one leaf, traced once per
  leaf shape instead of once per leaf.

  A named optimisation of compile time: deep models repeat a few leaf shapes
  many times. XLA inlines the calls, so the compiled step is the same, and
  JAX's transformations see through `jit`. Measured in
  `benchmarks/results/chain_vs_fused.md` ("the plain core").
  """
  if fn is None:
    return functools.partial(per_leaf, **jit_kwargs)
  return jax.jit(fn, **jit_kwargs)


@per_leaf(static_argnames=('axes', 'dtype'))
def _leaf_sums(pairs, *, axes, dtype):
  reduced = tuple(a for a in range(jnp.ndim(pairs[0][0])) if a not in axes)
  return tuple(jnp.sum(_product(x, y, dtype), axis=reduced, keepdims=True)
               for x, y in pairs)


def inner_products(
    layers: Layers, *pairs: tuple[Sequence, Sequence]
) -> tuple[list[jax.Array], ...]:
  """`Re <x_l, y_l>` of every layer `l`, for each pair of lists of leaves.

  The sums of a leaf accumulate in `norm_dtype` of every array given for it.
  Under `jit` with sharded leaves, the partitioner all-reduces each sum over
  a sharded axis, and XLA combines those all-reduces. Inside `shard_map`,
  the partial sums of all layers sharded over the same mesh axis names cross
  devices in one `psum`, whatever the number of layers.

  Args:
    layers: from :func:`find_layers`.
    *pairs: `(xs, ys)`, each a list of leaves (`layers.leaves(tree)`).

  Returns:
    For each pair, a list of one array per leaf, of the leaf's rank with size
    1 on every axis that is not a layer axis (so it broadcasts against it).
  """
  sums = [[] for _ in pairs]
  for i, axes in enumerate(layers.axes):
    dtype = norm_dtype(*(a.dtype for xs, ys in pairs for a in (xs[i], ys[i])))
    leaf = _leaf_sums(tuple((xs[i], ys[i]) for xs, ys in pairs), axes=axes,
                      dtype=dtype)
    for out, s in zip(sums, leaf, strict=True):
      out.append(s)
  groups: dict[Any, list[int]] = {}
  for i, axis_name in enumerate(layers.axis_names):
    if axis_name is not None:
      groups.setdefault(axis_name, []).append(i)
  for axis_name, idx in groups.items():
    # One array for all these layers, one psum: JAX binds a psum per array.
    parts = [out[i] for out in sums for i in idx]
    dtype = jnp.result_type(*parts)
    total = lax.psum(jnp.concatenate([x.ravel().astype(dtype) for x in parts]),
                     axis_name)
    start = 0
    for out in sums:
      for i in idx:
        size = out[i].size
        out[i] = total[start:start + size].reshape(out[i].shape).astype(
            out[i].dtype)
        start += size
  return tuple(sums)


def sq_norms(layers: Layers, *xs: Sequence) -> tuple[list[jax.Array], ...]:
  """`||x_l||**2` of every layer, for each list of leaves; see
  :func:`inner_products`."""
  return inner_products(layers, *((x, x) for x in xs))


def norm(sq: jax.Array) -> jax.Array:
  """`sqrt(sq)`, with a finite derivative where `sq` is 0 (there, 0)."""
  pos = sq > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1)), 0)


def divide_where(ok: jax.Array, num: jax.Array, den: jax.Array) -> jax.Array:
  """`num / den` where `ok`, else 1; `den` is never read where not `ok`, so a
  zero there gives no NaN, in the value or its derivatives."""
  return jnp.where(ok, num / jnp.where(ok, den, 1), 1)
