"""`layer_axes` for models whose layers are stacked by name.

`nnx.vmap` over a block's constructor (applied with `nnx.scan`), Linen's
`nn.scan` and vmapped inits store L blocks as one leaf of shape `[L, ...]`
under the attribute or module name that holds the stack (`blocks`, `layers`,
...). Fromage must treat each slice along the stacking axis as its own layer;
:func:`stacked_layer_axes` says so in one line, by name, and works on whatever
tree the optimizer is given: plain dicts, Linen's params, `nnx.State` (as
`nnx.Optimizer` hands to optax), or a tree of `nnx.Variable`.

What a layer is and what its norm is stays in `layers`: this module only
chooses each leaf's axes, and `layers.find_layers` checks them.
"""

from collections.abc import Callable
from typing import Any

import jax

from fromage_jax._src import validation


def _key_name(key) -> Any:
  """The name one step of a key path stands for."""
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return getattr(key, attr)
  return str(key)


def _normalise_axis(axis) -> tuple[int, ...]:
  if validation.is_integer(axis):
    return (int(axis),)
  if (isinstance(axis, (tuple, list)) and axis
      and all(map(validation.is_integer, axis))):
    return tuple(int(a) for a in axis)
  raise TypeError(
      f'fromage_jax.stacked_layer_axes: axis must be an int or a non-empty '
      f'tuple of ints, got {axis!r}.'
  )


def stacked_layer_axes(
    *names: str, axis: int | tuple[int, ...] = 0, strict: bool = True
) -> Callable[[Any], Any]:
  """`layer_axes` for a model with stacked layers, chosen by name.

  Returns a callable `params -> ` pytree of axes, for the `layer_axes` argument
  of :func:`fromage`, :func:`relative_update_norms` and the other transforms
  and diagnostics: a leaf is a stack of layers along `axis` if any step of its
  key path (a dict key, an attribute or module name) equals one of `names`;
  every other leaf is one layer. Names match whole path steps, at any depth:
  `'blocks'` matches `params['blocks']['lin']['kernel']` and
  `params['encoder']['blocks']['b']`, but not `params['blocks_out']`.

  This is the one line to add for stacks built with `nnx.vmap` over a block's
  constructor and applied with `nnx.scan`, or with Linen's `nn.scan`: pass the
  attribute (NNX) or module name (Linen) that holds the stack. It works on
  plain dicts, Linen params, the `nnx.State` of arrays that `nnx.Optimizer`
  hands to optax, and trees of `nnx.Variable`. `nnx.PARTITION_NAME` metadata
  is not used: NNX records it only for variables that carry sharding
  annotations, and `nnx.Optimizer` strips metadata before calling optax.

  Args:
    *names: the names of the subtrees that hold stacked layers (at least one).
    axis: the axis (or axes, for nested stacks) of those leaves that indexes
      layers; negative values count from the end.
    strict: if True, a name that matches no leaf of the params raises a
      `ValueError` (a misspelt name would otherwise silently treat the whole
      stack as one layer); an empty tree is let through. Set False to share
      one optimizer between trees that lack some of the names (or inside
      `optax.masked` when the mask removes a whole stack).

  Returns:
    A callable taking params (any pytree) to a pytree of the same structure
    whose leaves are `axis` as a tuple (stacked leaves) or `None`. A matched
    leaf with fewer dimensions than `axis` needs raises a `ValueError` naming
    the leaf when the optimizer resolves it.

  Raises:
    TypeError: if no name is given, a name is not a string, or `axis` is not
      an int or tuple of ints.

  Examples:
    >>> import jax.numpy as jnp
    >>> import fromage_jax
    >>> params = {'blocks': {'w': jnp.ones((4, 3, 3)), 'b': jnp.ones((4, 3))},
    ...           'head': {'w': jnp.ones((3, 2))}}
    >>> axes = fromage_jax.stacked_layer_axes('blocks')
    >>> axes(params)
    {'blocks': {'b': (0,), 'w': (0,)}, 'head': {'w': None}}
    >>> tx = fromage_jax.fromage(0.01, layer_axes=axes)
    >>> grads = {'blocks': {'w': jnp.ones((4, 3, 3)), 'b': jnp.ones((4, 3))},
    ...          'head': {'w': jnp.ones((3, 2))}}
    >>> updates, _ = tx.update(grads, tx.init(params), params)
    >>> rel = fromage_jax.relative_update_norms(updates, params,
    ...                                         layer_axes=axes)
    >>> print(rel['blocks']['w'].round(4))  # each block moves by ~eta
    [0.01 0.01 0.01 0.01]
  """
  if not names:
    raise TypeError(
        'fromage_jax.stacked_layer_axes needs at least one name, e.g. '
        "stacked_layer_axes('blocks')."
    )
  for name in names:
    if not isinstance(name, str):
      raise TypeError(
          f'fromage_jax.stacked_layer_axes: names must be strings, got {name!r}.'
      )
  axes = _normalise_axis(axis)
  wanted = frozenset(names)

  def layer_axes(params):
    matched = set()

    def choose(path, _):
      hits = wanted.intersection(
          n for n in map(_key_name, path) if isinstance(n, str)
      )
      matched.update(hits)
      return axes if hits else None

    out = jax.tree_util.tree_map_with_path(choose, params)
    missing = sorted(wanted - matched)
    # An empty tree has nothing to stack (and Fromage gives it no update).
    if strict and missing and jax.tree.leaves(params):
      paths = [validation.leaf_name(p) for p, _ in
               jax.tree_util.tree_flatten_with_path(params)[0]]
      shown = ', '.join(paths[:8]) + (', ...' if len(paths) > 8 else '')
      raise ValueError(
          f'fromage_jax.stacked_layer_axes: no leaf of the params has {missing} in its '
          f'key path (leaves: {shown or "none"}). Check the name of the '
          'attribute or module that holds the stacked layers, or pass '
          'strict=False.'
      )
    return out

  return layer_axes
