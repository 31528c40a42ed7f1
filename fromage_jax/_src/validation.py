"""Checks on what users pass in, and the name their errors carry.

Every error names the leaf at fault and the public function the user called:
`fromage_jax.fromage` when the transforms run inside :func:`fromage`, not the
transform that noticed. The public entry points enter :func:`entry_point`; a
check names the outermost one it runs under, or its own transform.

A hyperparameter that cannot work is refused when the optimizer is built
(`TypeError` for a wrong type, `ValueError` for a wrong value); an input tree
that cannot work is refused when `init` or `update` is traced.
"""

from collections.abc import Iterator
import contextlib
import contextvars
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np
import optax

_ENTRY_POINT = contextvars.ContextVar('fromage_jax_entry_point', default=None)


@contextlib.contextmanager
def entry_point(name: str) -> Iterator[None]:
  """Errors raised inside name `fromage_jax.<name>`, unless an outer entry
  point (the function the user called) is already active."""
  token = _ENTRY_POINT.set(_ENTRY_POINT.get() or name)
  try:
    yield
  finally:
    _ENTRY_POINT.reset(token)


def called(name: str) -> str:
  """`fromage_jax.<the entry point the user called>`, else `<name>`."""
  return f'fromage_jax.{_ENTRY_POINT.get() or name}'


def leaf_name(path) -> str:
  return jax.tree_util.keystr(path) or '<root>'


def is_integer(x) -> bool:
  """The one rule for integer-like values: Python or NumPy ints, not bools."""
  return isinstance(x, (int, np.integer)) and not isinstance(x, (bool,
                                                                 np.bool_))


def _paths(tree) -> list[str]:
  return [leaf_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _listed(names) -> str:
  names = list(names)
  more = f' and {len(names) - 5} more' if len(names) > 5 else ''
  return ', '.join(names[:5]) + more


def check_params_given(params, name: str) -> None:
  if params is None:
    raise ValueError(
        f'{called(name)} requires params: Fromage scales each step by the '
        'norm of the parameters, so call `update(updates, state, params)`.'
    )


def check_float_leaves(tree, name: str, what: str) -> None:
  """Refuses integer and bool leaves, naming the leaf."""
  def check(path, leaf):
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.inexact):
      raise TypeError(
          f'{called(name)}: {what} leaf {leaf_name(path)} has dtype {dtype}; '
          'Fromage needs floating-point (or complex) leaves. Exclude it with '
          'optax.masked or optax.partition.'
      )
  jax.tree_util.tree_map_with_path(check, tree)


def check_updates_and_params(updates, params, name: str) -> None:
  """What `update` needs of its inputs, checked when it is traced.

  Structure and shapes must match (a `ValueError` naming the leaves that
  differ); every leaf must be floating-point or complex (a `TypeError`), and
  a complex update needs a complex param. Floating dtypes may differ (mixed
  precision).
  """
  check_params_given(params, name)
  what = f'{called(name)}: updates and params'
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
  check_float_leaves(params, name, 'params')
  check_float_leaves(updates, name, 'updates')
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


def check_same_structure(tree, other, name: str, what: str) -> None:
  """Two trees a diagnostic compares must have the same leaves and shapes."""
  if jax.tree.structure(tree) != jax.tree.structure(other):
    raise ValueError(
        f'{called(name)}: {what} differ in structure: '
        f'{jax.tree.structure(tree)} against {jax.tree.structure(other)}.'
    )
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(tree)[0],
                          jax.tree.leaves(other), strict=True):
    if jnp.shape(a) != jnp.shape(b):
      raise ValueError(
          f'{called(name)}: {what} differ in shape at leaf {leaf_name(path)}: '
          f'{jnp.shape(a)} against {jnp.shape(b)}.'
      )


def check_hyperparameter(
    value, arg: str, name: str, *, positive: bool = False,
    allow_callable: bool = False, allow_none: bool = False,
) -> None:
  """Refuses, when an optimizer is built, a value that cannot work.

  `TypeError` for `None` (unless `allow_none`), a bool, a non-number, or a
  callable where a schedule is not allowed; `ValueError` for a concrete value
  that is not a scalar, not finite, negative, or (with `positive`) zero.
  Traced values (as `optax.inject_hyperparams` passes, or a learning rate
  being differentiated) and schedules are not checked.
  """
  where = f'{called(name)}: {arg}'
  if value is None:
    if allow_none:
      return
    raise TypeError(f'{where} must be a number, got None.')
  if isinstance(value, jax.core.Tracer):
    return
  if callable(value):
    if allow_callable:
      return
    raise TypeError(f'{where} must be a number, got {value!r}.')
  if isinstance(value, (bool, np.bool_)) or not isinstance(
      value, (numbers.Real, np.ndarray, np.generic, jax.Array)
  ):
    raise TypeError(f'{where} must be a number, got {value!r}.')
  arr = np.asarray(value)
  if not (jnp.issubdtype(arr.dtype, jnp.integer)
          or jnp.issubdtype(arr.dtype, jnp.floating)):
    raise TypeError(f'{where} must be a real number, got {value!r}.')
  if arr.ndim:
    raise ValueError(f'{where} must be a scalar, got shape {arr.shape}.')
  x = float(arr)
  if not math.isfinite(x) or (x <= 0 if positive else x < 0):
    need = 'positive' if positive else 'non-negative'
    raise ValueError(f'{where} must be a finite, {need} number; got '
                     f'{value!r}.')


def check_int(value, arg: str, name: str, low: int) -> None:
  """An integer setting (a patience, a count) of at least `low`."""
  if isinstance(value, jax.core.Tracer):  # from inject_hyperparams
    return
  if not is_integer(value):
    raise TypeError(f'{called(name)}: {arg} must be an int, got {value!r}.')
  if value < low:
    raise ValueError(f'{called(name)}: {arg} must be >= {low}, got '
                     f'{value!r}.')


def named(
    tx: optax.GradientTransformationExtraArgs, name: str
) -> optax.GradientTransformationExtraArgs:
  """`tx`, whose `init` and `update` name `fromage_jax.<name>` in errors."""
  def init_fn(params):
    with entry_point(name):
      return tx.init(params)

  def update_fn(updates, state, params=None, **extra_args):
    with entry_point(name):
      return tx.update(updates, state, params, **extra_args)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
