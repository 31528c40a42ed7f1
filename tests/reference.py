"""A float64 NumPy oracle for Fromage, written from SPEC.md alone.

Pytrees are nested dicts (or any pytree; jax.tree_util only walks the
structure, every number is computed here in NumPy, in float64 / complex128).

A *layer* is a leaf, or one slice of a leaf along its `layer_axes`. Norms are
Frobenius norms over a layer's elements, with `|z|**2` for complex entries.

The update (SPEC, "The update"), per layer, step t:
  r  = ||W|| / ||g||   if both norms > 0, else 1
  W' = (W - eta_t * r * g) / sqrt(1 + eta_t**2)
  if p_bound and ||W0|| > 0 and ||W'|| > p_bound * ||W0||:
    W' = W' * p_bound * ||W0|| / ||W'||
"""

import jax
import numpy as np


def _as64(x):
  x = np.asarray(x)
  return x.astype(np.complex128 if np.iscomplexobj(x) else np.float64)


def _map(f, *trees):
  return jax.tree_util.tree_map(f, *trees)


def _broadcast(spec, tree):
  """`layer_axes` (None, a tuple, a dict prefix or a callable) for each leaf."""
  if callable(spec):
    spec = spec(tree)
  if spec is None or isinstance(spec, (tuple, list)):
    return _map(lambda _: tuple(spec or ()), tree)
  return {k: _broadcast(spec[k], tree[k]) for k in tree}


def _leaves_with_axes(tree, layer_axes):
  axes = jax.tree_util.tree_leaves(
      _broadcast(layer_axes, tree), is_leaf=lambda x: isinstance(x, tuple)
  )
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  return leaves, axes, treedef


def norms(x, axes=()):
  """Per-layer Frobenius norms of one leaf, kept broadcastable against it."""
  x = _as64(x)
  axes = tuple(a % x.ndim for a in axes)
  reduce = tuple(a for a in range(x.ndim) if a not in axes)
  return np.sqrt(np.sum(np.abs(x) ** 2, axis=reduce, keepdims=True))


def layer_norms(params, layer_axes=None):
  """A pytree like `params` of per-layer norms (what init would store)."""
  leaves, axes, treedef = _leaves_with_axes(params, layer_axes)
  return treedef.unflatten([norms(w, ax) for w, ax in zip(leaves, axes, strict=True)])


def _per_layer(f, layer_axes, *trees):
  leaves, axes, treedef = _leaves_with_axes(trees[0], layer_axes)
  others = [treedef.flatten_up_to(t) for t in trees[1:]]
  out = [f(ax, *args) for ax, *args in zip(axes, leaves, *others, strict=True)]
  return treedef.unflatten(out)


def frobenius_ratio_direction(params, grads, layer_axes=None):
  """Step 1: `r * g` with `r = ||W|| / ||g||` (1 if either norm is 0)."""

  def leaf(ax, w, g):
    nw, ng = norms(w, ax), norms(g, ax)
    ok = (nw > 0) & (ng > 0)
    r = np.where(ok, nw / np.where(ok, ng, 1.0), 1.0)
    return r * _as64(g)

  return _per_layer(leaf, layer_axes, params, grads)


def prefactor(params, updates, eta):
  """Step 3: `(W + u) / sqrt(1 + eta**2)`, the new params."""
  return _map(
      lambda w, u: (_as64(w) + _as64(u)) / np.sqrt(1.0 + eta**2),
      params, updates,
  )


def clip_to_init(new_params, init_norms, p_bound, layer_axes=None):
  """Step 4. Returns (clipped params, number of layers that were clipped)."""
  count = [0]

  def leaf(ax, w, n0):
    w = _as64(w)
    n, bound = norms(w, ax), p_bound * np.asarray(n0, np.float64)
    clip = (bound > 0) & (n > bound)
    count[0] += int(np.sum(clip))
    return np.where(clip, w * bound / np.where(clip, n, 1.0), w)

  out = _per_layer(leaf, layer_axes, new_params, init_norms)
  return out, count[0]


def fromage_step(
    params, grads, eta, *, p_bound=None, init_norms=None, layer_axes=None,
    return_num_clipped=False,
):
  """One Fromage step in float64; returns the new params (not the update).

  Args:
    params: the current params W.
    grads: the gradients g (same structure).
    eta: eta_t, the learning rate of this step (a float).
    p_bound: if given, clip each layer to `p_bound * ||W0||`.
    init_norms: `layer_norms(W0, layer_axes)`, needed with `p_bound`.
    layer_axes: None, a tuple for every leaf, a dict prefix, or a callable.
    return_num_clipped: also return how many layers were clipped.
  """
  eta = float(eta)
  direction = frobenius_ratio_direction(params, grads, layer_axes)
  step = _map(lambda d: -eta * d, direction)
  new = prefactor(params, step, eta)
  clipped = 0
  if p_bound is not None:
    new, clipped = clip_to_init(new, init_norms, p_bound, layer_axes)
  return (new, clipped) if return_num_clipped else new


def relative_update_norms(updates, params, layer_axes=None):
  """Per-layer `||dW|| / ||W||`, shaped like the layer axes (scalar if none)."""

  def leaf(ax, w, u):
    ax = tuple(sorted(a % np.ndim(w) for a in ax))
    nw, nu = norms(w, ax), norms(u, ax)
    keep = tuple(np.shape(w)[a] for a in ax)
    with np.errstate(divide='ignore', invalid='ignore'):
      return (nu / nw).reshape(keep)

  return _per_layer(leaf, layer_axes, params, updates)


def deep_relative_trust(params, other_params, layer_axes=None):
  """`prod_l (1 + ||W'_l - W_l|| / ||W_l||) - 1` over layers with ||W_l|| > 0."""
  diff = _map(lambda a, b: _as64(b) - _as64(a), params, other_params)
  ratios = jax.tree_util.tree_leaves(
      relative_update_norms(diff, params, layer_axes)
  )
  nw = jax.tree_util.tree_leaves(
      _per_layer(lambda ax, w: norms(w, ax).ravel(), layer_axes, params)
  )
  total = 1.0
  for ratio, n in zip(ratios, nw, strict=True):
    for q in np.ravel(ratio)[np.ravel(n) > 0]:
      total *= 1.0 + q
  return total - 1.0


def descent_learning_rate_bound(depth, cos_theta=1.0):
  """Lemma 2: `(1 + cos_theta)**(1/depth) - 1`."""
  return (1.0 + np.asarray(cos_theta, np.float64)) ** (
      1.0 / np.asarray(depth, np.float64)
  ) - 1.0


def fromage_layer(w, g, eta, *, w0=None, p_bound=None):
  """`fromage_step` for a single layer `w` (initial params `w0`): returns W'."""
  init_norms = None if p_bound is None else layer_norms({'l': w0})
  return fromage_step({'l': w}, {'l': g}, eta, p_bound=p_bound,
                      init_norms=init_norms)['l']
