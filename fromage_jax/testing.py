"""A float64 NumPy reference of Fromage, for testing code that uses it.

Written from the behaviour contract alone, not from this package's
implementation (it imports nothing from `fromage_jax`), so that the two can be
checked against each other. `jax.tree_util` only walks the pytrees; every
number is computed here in NumPy, in float64 (complex128 for complex leaves).

A *layer* is a leaf, or one slice of a leaf along its `layer_axes`. Norms are
Frobenius norms over a layer's elements, with `|z|**2` for complex entries.

The update, per layer, at step t with learning rate `eta_t`::

  r  = ||W|| / max(||g||, floor)   if both norms > 0, else 1
  W' = (W - eta_t * r * g) / sqrt(1 + eta_t**2)
  if p_bound and ||W0|| > 0 and ||W'|| > p_bound * ||W0||:
    W' = W' * p_bound * ||W0|| / ||W'||

`layer_axes` is `None` (every leaf is one layer), a tuple of axes for every
leaf, a pytree prefix of the params holding those (or `None`), or a callable
`params -> such a tree`. Any pytree works: dicts, tuples, NamedTuples,
dataclasses, with `None` or `optax.MaskedNode` holding no layer.

Example:
  >>> import jax.numpy as jnp
  >>> import numpy as np
  >>> import optax
  >>> import fromage_jax
  >>> from fromage_jax import testing
  >>> params = {'w': jnp.array([[3.0, 4.0]]), 'b': jnp.zeros(2)}
  >>> grads = {'w': jnp.array([[1.0, 0.0]]), 'b': jnp.array([0.5, 0.5])}
  >>> tx = fromage_jax.fromage(0.1)
  >>> updates, _ = tx.update(grads, tx.init(params), params)
  >>> got = optax.apply_updates(params, updates)
  >>> want = testing.fromage_step(params, grads, 0.1)
  >>> all(np.allclose(got[k], want[k], rtol=1e-6) for k in params)
  True
"""

import jax
import numpy as np

__all__ = (
    'clip_to_init',
    'deep_relative_trust',
    'descent_learning_rate_bound',
    'fromage_layer',
    'fromage_step',
    'frobenius_ratio_direction',
    'layer_norms',
    'prefactor',
    'project_to_init',
    'relative_update_norms',
)


def _as64(x):
  x = np.asarray(x)
  return x.astype(np.complex128 if np.iscomplexobj(x) else np.float64)


def _map(f, *trees):
  return jax.tree_util.tree_map(f, *trees)


def _is_axes(x):
  """`None` or a tuple/list of ints: one leaf's layer axes, not a subtree."""
  return x is None or (type(x) in (tuple, list) and all(
      isinstance(a, (int, np.integer)) and not isinstance(a, bool) for a in x))


def _leaves_with_axes(tree, layer_axes):
  """The leaves of `tree`, each leaf's layer axes, and the tree's structure.

  `layer_axes` is axes for every leaf, a pytree prefix of `tree` holding
  axes (or `None`), or a callable `tree -> ` one of those.
  """
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  if callable(layer_axes):
    layer_axes = layer_axes(tree)
  if _is_axes(layer_axes):
    return leaves, [tuple(layer_axes or ())] * len(leaves), treedef
  specs, spec_def = jax.tree_util.tree_flatten(layer_axes, is_leaf=_is_axes)
  axes = [tuple(spec or ()) for spec, sub in
          zip(specs, spec_def.flatten_up_to(tree), strict=True)
          for _ in jax.tree_util.tree_leaves(sub)]
  return leaves, axes, treedef


def _norms(x, axes=()):
  """Per-layer Frobenius norms of one leaf, kept broadcastable against it."""
  x = _as64(x)
  axes = tuple(a % x.ndim for a in axes)
  reduce = tuple(a for a in range(x.ndim) if a not in axes)
  return np.sqrt(np.sum(np.abs(x) ** 2, axis=reduce, keepdims=True))


def _per_layer(f, layer_axes, *trees):
  leaves, axes, treedef = _leaves_with_axes(trees[0], layer_axes)
  others = [treedef.flatten_up_to(t) for t in trees[1:]]
  out = [f(ax, *args) for ax, *args in zip(axes, leaves, *others, strict=True)]
  return treedef.unflatten(out)


def layer_norms(params, layer_axes=None):
  """Per-layer Frobenius norms: what the optimizer's `init` keeps of `W0`.

  Args:
    params: a pytree of arrays.
    layer_axes: which axes of each leaf index its layers (see the module).

  Returns:
    A pytree like `params` of float64 norms, each keeping its leaf's rank
    (size 1 on the axes a layer spans), so it broadcasts against the leaf.

  Example:
    >>> import numpy as np
    >>> from fromage_jax import testing
    >>> stacked = np.array([[3.0, 4.0], [0.0, 2.0]])
    >>> testing.layer_norms({'w': stacked})['w']
    array([[5.38516481]])
    >>> testing.layer_norms({'w': stacked}, layer_axes=(0,))['w']
    array([[5.],
           [2.]])
  """
  leaves, axes, treedef = _leaves_with_axes(params, layer_axes)
  return treedef.unflatten(
      [_norms(w, ax) for w, ax in zip(leaves, axes, strict=True)]
  )


def frobenius_ratio_direction(params, grads, layer_axes=None,
                              grad_norm_floor=0.0):
  """Step 1 of the update: the direction `r * g`.

  Args:
    params: the current params `W`.
    grads: the gradients `g`, a pytree like `params`.
    layer_axes: which axes of each leaf index its layers (see the module).
    grad_norm_floor: the floor on `||g||` in the ratio (0: none).

  Returns:
    A pytree like `grads` of `r * g` with `r = ||W|| / max(||g||, floor)`
    per layer, or `r = 1` where either norm is 0.

  Example:
    >>> import numpy as np
    >>> from fromage_jax import testing
    >>> params = {'w': np.array([3.0, 4.0]), 'b': np.zeros(2)}
    >>> grads = {'w': np.array([0.0, 0.5]), 'b': np.array([0.5, 0.5])}
    >>> direction = testing.frobenius_ratio_direction(params, grads)
    >>> direction['w'], direction['b']  # r = 10; r = 1 for the zero bias
    (array([0., 5.]), array([0.5, 0.5]))
  """

  def leaf(ax, w, g):
    nw, ng = _norms(w, ax), _norms(g, ax)
    ok = (nw > 0) & (ng > 0)
    r = np.where(ok, nw / np.where(ok, np.maximum(ng, grad_norm_floor), 1.0),
                 1.0)
    return r * _as64(g)

  return _per_layer(leaf, layer_axes, params, grads)


def prefactor(params, updates, eta):
  """Step 3 of the update: the new params `(W + u) / sqrt(1 + eta**2)`.

  Args:
    params: the current params `W`.
    updates: the scaled step `u = -eta * r * g`, a pytree like `params`.
    eta: the learning rate of this step, a float.

  Returns:
    The new params `W'`, before any clipping, in float64.

  Example:
    >>> import numpy as np
    >>> from fromage_jax import testing
    >>> new = testing.prefactor({'w': np.array([1.0])}, {'w': np.array([0.0])},
    ...                         eta=1.0)
    >>> np.round(new['w'], 6)  # 1 / sqrt(2)
    array([0.707107])
  """
  return _map(
      lambda w, u: (_as64(w) + _as64(u)) / np.sqrt(1.0 + eta**2),
      params, updates,
  )


def clip_to_init(new_params, init_norms, p_bound, layer_axes=None):
  """Step 4 of the update: each layer's norm at most `p_bound * ||W0||`.

  Layers with `||W0|| = 0` are never clipped.

  Args:
    new_params: the params `W'` after step 3.
    init_norms: `layer_norms(W0, layer_axes)` of the initial params `W0`.
    p_bound: the bound, a positive float.
    layer_axes: which axes of each leaf index its layers (see the module).

  Returns:
    `(clipped params, number of layers that were clipped)`.

  Example:
    >>> import numpy as np
    >>> from fromage_jax import testing
    >>> w0 = {'w': np.array([1.0, 0.0])}
    >>> clipped, n = testing.clip_to_init(
    ...     {'w': np.array([3.0, 4.0])}, testing.layer_norms(w0), p_bound=2.0)
    >>> clipped['w'], n
    (array([1.2, 1.6]), 1)
  """
  count = [0]

  def leaf(ax, w, n0):
    w = _as64(w)
    n, bound = _norms(w, ax), p_bound * np.asarray(n0, np.float64)
    clip = (bound > 0) & (n > bound)
    count[0] += int(np.sum(clip))
    return np.where(clip, w * bound / np.where(clip, n, 1.0), w)

  out = _per_layer(leaf, layer_axes, new_params, init_norms)
  return out, count[0]


def project_to_init(new_params, init_norms, scale=1.0, layer_axes=None):
  """`norm_project_to_init`: each layer's norm exactly `scale * ||W0||`.

  Layers with `||W0|| = 0`, and layers whose new params are all zero, are
  left as they are.

  Args:
    new_params: the params `W'` that the incoming update leads to.
    init_norms: `layer_norms(W0, layer_axes)` of the initial params `W0`.
    scale: the norm to hold, relative to the initial norm.
    layer_axes: which axes of each leaf index its layers (see the module).

  Returns:
    The projected params, in float64.

  Example:
    >>> import numpy as np
    >>> from fromage_jax import testing
    >>> w0 = {'w': np.array([3.0, 4.0]), 'b': np.zeros(2)}
    >>> out = testing.project_to_init({'w': np.array([6.0, 0.0]),
    ...                                'b': np.array([1.0, 1.0])},
    ...                               testing.layer_norms(w0))
    >>> out['w'], out['b']  # ||w|| back to 5; b (zero at init) left free
    (array([5., 0.]), array([1., 1.]))
  """

  def leaf(ax, w, n0):
    w = _as64(w)
    n, target = _norms(w, ax), scale * np.asarray(n0, np.float64)
    ok = (target > 0) & (n > 0)
    return np.where(ok, w * target / np.where(ok, n, 1.0), w)

  return _per_layer(leaf, layer_axes, new_params, init_norms)


def fromage_step(
    params, grads, eta, *, p_bound=None, init_norms=None, layer_axes=None,
    grad_norm_floor=0.0, return_num_clipped=False,
):
  """One Fromage step in float64; returns the new params (not the update).

  Args:
    params: the current params `W`.
    grads: the gradients `g`, a pytree like `params`.
    eta: `eta_t`, the learning rate of this step (a float).
    p_bound: if given, clip each layer to `p_bound * ||W0||`.
    init_norms: `layer_norms(W0, layer_axes)`, needed with `p_bound`.
    layer_axes: which axes of each leaf index its layers (see the module).
    grad_norm_floor: the floor on `||g||` in the ratio (0: none).
    return_num_clipped: also return how many layers were clipped.

  Returns:
    The new params `W'` in float64 (complex128 for complex leaves), or
    `(W', number of layers clipped)` with `return_num_clipped=True`.

  Example:
    >>> import numpy as np
    >>> from fromage_jax import testing
    >>> params = {'w': np.array([3.0, 4.0])}
    >>> new = testing.fromage_step(params, {'w': np.array([1.0, 0.0])}, 0.1)
    >>> np.round(new['w'], 4)  # (W - 0.1 * 5 * g) / sqrt(1.01)
    array([2.4876, 3.9801])
    >>> step = np.linalg.norm(new['w'] - params['w']) / 5.0
    >>> print(f'{step:.2f}')  # about eta, relative to ||W||
    0.10
  """
  eta = float(eta)
  direction = frobenius_ratio_direction(params, grads, layer_axes,
                                        grad_norm_floor)
  step = _map(lambda d: -eta * d, direction)
  new = prefactor(params, step, eta)
  clipped = 0
  if p_bound is not None:
    new, clipped = clip_to_init(new, init_norms, p_bound, layer_axes)
  return (new, clipped) if return_num_clipped else new


def fromage_layer(w, g, eta, *, w0=None, p_bound=None):
  """`fromage_step` for a single layer.

  Args:
    w: the layer's params `W`, an array.
    g: its gradient.
    eta: the learning rate of this step, a float.
    w0: the layer's initial params, needed with `p_bound`.
    p_bound: if given, clip the layer to `p_bound * ||w0||`.

  Returns:
    The layer's new params `W'`, in float64.

  Example:
    >>> import numpy as np
    >>> from fromage_jax import testing
    >>> new = testing.fromage_layer(np.zeros(2), np.array([3.0, 4.0]), 1.0)
    >>> np.round(new, 4)  # ||W|| = 0: a plain step, -eta * g / sqrt(2)
    array([-2.1213, -2.8284])
  """
  init_norms = None if p_bound is None else layer_norms({'l': w0})
  return fromage_step({'l': w}, {'l': g}, eta, p_bound=p_bound,
                      init_norms=init_norms)['l']


def relative_update_norms(updates, params, layer_axes=None):
  """Per-layer `||dW|| / ||W||`.

  Args:
    updates: the change `dW`, a pytree like `params`.
    params: the params `W`.
    layer_axes: which axes of each leaf index its layers (see the module).

  Returns:
    A pytree like `params` of arrays shaped like each leaf's layer axes (a
    scalar for a leaf that is one layer). Where `||W|| = 0`: 0 if the layer
    did not move (0/0), `inf` if it did.

  Example:
    >>> import numpy as np
    >>> from fromage_jax import testing
    >>> params = {'w': np.array([[3.0, 4.0], [0.0, 2.0]])}
    >>> updates = {'w': np.array([[0.3, 0.4], [0.0, 1.0]])}
    >>> testing.relative_update_norms(updates, params, layer_axes=(0,))['w']
    array([0.1, 0.5])
  """

  def leaf(ax, w, u):
    ax = tuple(sorted(a % np.ndim(w) for a in ax))
    nw, nu = _norms(w, ax), _norms(u, ax)
    keep = tuple(np.shape(w)[a] for a in ax)
    moved = np.where(nu > 0, np.inf, 0.0)
    with np.errstate(divide='ignore', invalid='ignore'):
      return np.where(nw > 0, nu / nw, moved).reshape(keep)

  return _per_layer(leaf, layer_axes, params, updates)


def deep_relative_trust(params, other_params, layer_axes=None):
  """The paper's distance between two networks.

  Args:
    params: the params `W`.
    other_params: the params `W'`, a pytree like `params`.
    layer_axes: which axes of each leaf index its layers (see the module).

  Returns:
    `prod_l (1 + ||W'_l - W_l|| / ||W_l||) - 1` over the layers with
    `||W_l|| > 0`, a float.

  Example:
    >>> import numpy as np
    >>> from fromage_jax import testing
    >>> params = {'a': np.array([1.0]), 'b': np.array([2.0])}
    >>> other = {'a': np.array([1.1]), 'b': np.array([2.2])}
    >>> print(f'{testing.deep_relative_trust(params, other):.4f}')  # 1.1**2-1
    0.2100
  """
  diff = _map(lambda a, b: _as64(b) - _as64(a), params, other_params)
  ratios = jax.tree_util.tree_leaves(
      relative_update_norms(diff, params, layer_axes)
  )
  nw = jax.tree_util.tree_leaves(
      _per_layer(lambda ax, w: _norms(w, ax).ravel(), layer_axes, params)
  )
  total = 1.0
  for ratio, n in zip(ratios, nw, strict=True):
    for q in np.ravel(ratio)[np.ravel(n) > 0]:
      total *= 1.0 + q
  return total - 1.0


def descent_learning_rate_bound(depth, cos_theta=1.0):
  """Lemma 2 of the paper: `(1 + cos_theta)**(1/depth) - 1`.

  Args:
    depth: the number of layers (a number or an array).
    cos_theta: the cosine of the angle between the gradient and the full
      update (a number or an array broadcasting against `depth`).

  Returns:
    The bound on the relative step size, in float64.

  Example:
    >>> import numpy as np
    >>> from fromage_jax import testing
    >>> np.round(testing.descent_learning_rate_bound(np.array([1, 2, 10])), 4)
    array([1.    , 0.4142, 0.0718])
  """
  return (1.0 + np.asarray(cos_theta, np.float64)) ** (
      1.0 / np.asarray(depth, np.float64)
  ) - 1.0
