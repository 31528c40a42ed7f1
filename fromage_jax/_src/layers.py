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
import numbers
from typing import Any

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
  # An empty tree has no layers: any spec fits it (SPEC: empty update).
  if not jax.tree.leaves(tree):
    return tree
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


def compute_dtype(*dtypes) -> jnp.dtype:
  """The dtype of step arithmetic on leaves of `dtypes`.

  Float32 at least, wider if any leaf is (float64), complex if any leaf is:
  bf16 params with f32 gradients, or the reverse, are computed in float32.
  """
  return jnp.dtype(jnp.promote_types(jnp.result_type(*dtypes), jnp.float32))


def norm_dtype(*dtypes) -> jnp.dtype:
  """The real dtype norms of leaves of `dtypes` accumulate in."""
  return jnp.dtype(jnp.finfo(compute_dtype(*dtypes)).dtype)


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


# A named optimisation for many small layers (`benchmarks/results/
# step_time.md`, "2,000 small leaves"): below this many elements per layer,
# the sums one step needs are one variadic reduction, which XLA:CPU emits as
# one kernel where plain sums this small become a kernel each. On the 2-core
# CPU (one loaded run each, 2,000 small leaves) the step with plain sums took
# 1.35x the 0.1.0 fused step and 85 s to compile; with this, 1.08x and 31 s.
# From this size up, XLA:CPU's plain sums are vectorised library kernels, much
# faster than a variadic reduction, so each sum is its own kernel.
_VARIADIC_BELOW = 4096


def layer_sums(w, g, axes: tuple[int, ...], axis_name=None, *,
               with_inner: bool = False) -> tuple[jax.Array, ...]:
  """`sq_norms(w)`, `sq_norms(g)` and, with `with_inner`, `inner(w, g)`.

  The same sums, of the same shapes, in `norm_dtype(w.dtype, g.dtype)`,
  computed together (see `_VARIADIC_BELOW`).
  """
  dtype = norm_dtype(w.dtype, g.dtype)
  prods = (_real_product(w, w), _real_product(g, g))
  if with_inner:
    prods += (_real_product(w, g),)
  prods = tuple(p.astype(dtype) for p in prods)
  reduce = _reduced_axes(w, axes)
  if math.prod(jnp.shape(w)[a] for a in reduce) < _VARIADIC_BELOW:
    zero = jnp.zeros((), dtype)
    keep = tuple(1 if a in reduce else d for a, d in enumerate(jnp.shape(w)))
    sums = tuple(
        x.reshape(keep) for x in lax.reduce(
            prods, (zero,) * len(prods),
            lambda x, y: tuple(map(lax.add, x, y)), reduce))
  else:
    sums = tuple(jnp.sum(p, axis=reduce, keepdims=True) for p in prods)
  if axis_name is not None:
    sums = lax.psum(sums, axis_name)
  return sums


def sq_norms(x, axes: tuple[int, ...], axis_name=None) -> jax.Array:
  """Squared Frobenius norm of each layer of `x`; see `inner`."""
  return inner(x, x, axes, axis_name)


def divide_where(ok: jax.Array, num: jax.Array, den: jax.Array) -> jax.Array:
  """`num / den` where `ok`, else 1; `den` is never read where not `ok`, so
  a zero there gives no NaN (the SPEC's zero-norm rule, the clip's bound)."""
  return jnp.where(ok, num / jnp.where(ok, den, 1), 1)


def per_leaf(fn):
  """`fn(*arrays, axes=..., axis_name=...)` of one leaf, traced once per shape.

  A named optimisation of compile time (`benchmarks/results/
  chain_vs_fused.md`, "tracing once per shape"): a transform's arithmetic on
  one leaf is traced once per shape, dtype and layer axes (`axes`,
  `axis_name` are static), not once per leaf, as deep models repeat a few
  shapes many times. On the 2-core CPU, 2,000 small leaves of 34 shapes,
  tracing and lowering `fromage()`'s step took 1.6 s instead of 4.7 s, and
  its whole compile 16 s instead of 23 s. XLA inlines the calls.
  """
  return jax.jit(fn, static_argnames=('axes', 'axis_name'))


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


def _paths(tree) -> list[str]:
  return [leaf_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _listed(names) -> str:
  names = list(names)
  return ', '.join(names[:5]) + (f' and {len(names) - 5} more'
                                 if len(names) > 5 else '')


def check_updates_and_params(updates, params, transform: str) -> None:
  """Trace-time checks on the inputs of a transform's `update`.

  Structure and shapes must match (a `ValueError` naming the leaves that
  differ); every leaf must be floating-point or complex (a `TypeError`), and
  a complex update needs a complex param. Floating dtypes may differ (mixed
  precision): the transforms compute in `compute_dtype` of both.
  """
  check_params(params, transform)
  what = f'fromage_jax.{transform}: updates and params'
  if jax.tree.structure(updates) != jax.tree.structure(params):
    u_paths, p_paths = _paths(updates), _paths(params)
    only_p = [p for p in p_paths if p not in set(u_paths)]
    only_u = [p for p in u_paths if p not in set(p_paths)]
    detail = '; '.join(
        [f'params have {_listed(only_p)} that updates lack'] * bool(only_p)
        + [f'updates have {_listed(only_u)} that params lack'] * bool(only_u)
    ) or (f'same leaves, different containers: updates are '
          f'{jax.tree.structure(updates)}, params {jax.tree.structure(params)}')
    raise ValueError(f'{what} differ in structure: {detail}.')
  check_float_leaves(params, transform, 'params')
  check_float_leaves(updates, transform, 'updates')
  u_leaves = jax.tree_util.tree_flatten_with_path(updates)[0]
  for (path, u), w in zip(u_leaves, jax.tree.leaves(params), strict=True):
    if jnp.shape(u) != jnp.shape(w):
      raise ValueError(
          f'{what} differ in shape at leaf {leaf_name(path)}: update '
          f'{jnp.shape(u)}, param {jnp.shape(w)}.'
      )
    if jnp.iscomplexobj(u) and not jnp.iscomplexobj(w):
      raise TypeError(
          f'{what}: leaf {leaf_name(path)} has a complex update '
          f'({jnp.result_type(u)}) for a real param ({jnp.result_type(w)}).'
      )


def check_hyperparameter(
    value, name: str, *, positive: bool = False, allow_callable: bool = False,
    allow_none: bool = False,
) -> None:
  """Refuses, when an optimizer is built, a value that cannot work.

  `TypeError` for `None` (unless `allow_none`), a bool, a non-number, or a
  callable where a schedule is not allowed; `ValueError` for a concrete value
  that is not a scalar, not finite, negative, or (with `positive`) zero.
  Traced values (as `optax.inject_hyperparams` passes inside `update`) and
  schedules are not checked.
  """
  if value is None:
    if allow_none:
      return
    raise TypeError(f'{name} must be a number, got None.')
  if isinstance(value, jax.core.Tracer):
    return
  if callable(value):
    if allow_callable:
      return
    raise TypeError(f'{name} must be a number, got {value!r}.')
  if isinstance(value, (bool, np.bool_)) or not isinstance(
      value, (numbers.Real, np.ndarray, np.generic, jax.Array)
  ):
    raise TypeError(f'{name} must be a number, got {value!r}.')
  arr = np.asarray(value)
  if not (jnp.issubdtype(arr.dtype, jnp.integer)
          or jnp.issubdtype(arr.dtype, jnp.floating)):
    raise TypeError(f'{name} must be a real number, got {value!r}.')
  if arr.ndim:
    raise ValueError(f'{name} must be a scalar, got shape {arr.shape}.')
  x = float(arr)
  if not math.isfinite(x) or (x <= 0 if positive else x < 0):
    need = 'positive' if positive else 'non-negative'
    raise ValueError(f'{name} must be a finite, {need} number; got {value!r}.')
