"""The paper's distance between networks, and per-layer step sizes."""

import jax
import jax.numpy as jnp

from fromage_jax._src import layers
from fromage_jax._src import validation


def _relative_norms(diff, base, layer_axes, name):
  """Per leaf of `base`, `||diff_l|| / ||base_l||` and `||base_l|| > 0`, one
  entry per layer. 0/0 is 0 (a layer that did not move); x/0 for x > 0 is
  `inf`."""
  found = layers.find_layers(base, layer_axes, name=name)
  d_sq, b_sq = layers.sq_norms(found, found.leaves(diff), found.leaves(base))
  out = []
  for d, b, ax in zip(d_sq, b_sq, found.axes, strict=True):
    nonzero = b > 0
    ratio = jnp.where(
        nonzero, layers.divide_where(nonzero, layers.norm(d), layers.norm(b)),
        jnp.where(d > 0, jnp.inf, 0))
    keep = tuple(b.shape[a] for a in ax)
    out.append((ratio.reshape(keep), nonzero.reshape(keep)))
  return found, out


def relative_update_norms(updates, params, layer_axes: layers.LayerAxes = None):
  """Each layer's relative step `||dW_l|| / ||W_l||`.

  Fromage keeps this close to `eta` for every layer (the paper's equation 6).
  A layer with `||W_l|| = 0` gives `inf` (or 0 if its update is zero too).

  Args:
    updates: the updates `dW`, as returned by an optimizer's `update`.
    params: the params `W` the updates apply to.
    layer_axes: axes of a leaf that index stacked layers; see
      :func:`scale_by_frobenius_ratio`.

  Returns:
    A pytree like `params`; each leaf is a float32 (float64 for float64
    leaves) array with one entry per layer: a scalar when the leaf is one
    layer, else of the shape of its layer axes.

  Examples:
    >>> import jax.numpy as jnp
    >>> import fromage_jax
    >>> params = {'w': jnp.array([3.0, 4.0])}
    >>> print(fromage_jax.relative_update_norms({'w': jnp.array([0.0, 0.5])},
    ...                                         params)['w'])
    0.1

  References:
    Bernstein et al, `On the distance between two neural networks and the
    stability of learning <https://arxiv.org/abs/2002.03432>`_, 2020 (eq. 6)
  """
  name = 'relative_update_norms'
  validation.check_same_structure(updates, params, name, 'updates and params')
  found, pairs = _relative_norms(updates, params, layer_axes, name)
  return found.unflatten([ratio for ratio, _ in pairs])


def deep_relative_trust(
    params, other_params, layer_axes: layers.LayerAxes = None
) -> jax.Array:
  """The paper's deep relative trust distance between two networks.

  `prod_l (1 + ||W'_l - W_l|| / ||W_l||) - 1` over the layers `l` of `params`
  with `||W_l|| > 0`. It bounds the relative change in each layer's gradient
  that moving from `W` to `W'` can cause (the paper's Definition 1); for `L`
  layers each moved by `eta` relative to their norm, it is `(1 + eta)**L - 1`.

  Args:
    params: the reference network `W` (norms are taken from it).
    other_params: the perturbed network `W'`, same structure and shapes.
    layer_axes: axes of a leaf that index stacked layers; see
      :func:`scale_by_frobenius_ratio`.

  Returns:
    A scalar, float32 (float64 if any leaf is float64).

  Examples:
    >>> import jax.numpy as jnp
    >>> import fromage_jax
    >>> w = {'a': jnp.array([3.0, 4.0]), 'b': jnp.array([1.0, 0.0])}
    >>> w2 = {'a': jnp.array([3.0, 4.5]), 'b': jnp.array([1.1, 0.0])}
    >>> print(f"{fromage_jax.deep_relative_trust(w, w2):.2f}")  # 1.1*1.1 - 1
    0.21

  References:
    Bernstein et al, `On the distance between two neural networks and the
    stability of learning <https://arxiv.org/abs/2002.03432>`_, 2020
    (Definition 1)
  """
  name = 'deep_relative_trust'
  validation.check_same_structure(params, other_params, name,
                                  'params and other_params')

  def minus(a, b):
    dtype = layers.compute_dtype(a.dtype, b.dtype)
    return b.astype(dtype) - a.astype(dtype)

  diff = jax.tree.map(minus, params, other_params)
  _, pairs = _relative_norms(diff, params, layer_axes, name)
  # A sum of logs: stable for many layers and for tiny perturbations.
  log_terms = [jnp.sum(jnp.where(moved, jnp.log1p(jnp.where(moved, r, 0)), 0))
               for r, moved in pairs]
  return jnp.expm1(sum(log_terms, jnp.zeros([], jnp.float32)))


def descent_learning_rate_bound(depth, cos_theta=1.0):
  """Lemma 2's largest relative step that still guarantees descent.

  For a network of `depth` layers obeying deep relative trust, a step with
  `||dW_l|| / ||W_l|| <= eta` at angle `theta_l` to the negative gradient
  decreases the loss if `eta < (1 + cos theta_l)**(1/depth) - 1`.

  Args:
    depth: the number of layers `L` (>= 1); an int or array.
    cos_theta: the cosine of the angle between step and negative gradient
      (1 for Fromage's step); in [-1, 1].

  Returns:
    `(1 + cos_theta)**(1 / depth) - 1`, as a jax array.

  Examples:
    >>> import fromage_jax
    >>> print(f"{fromage_jax.descent_learning_rate_bound(1):.3f}")
    1.000
    >>> print(f"{fromage_jax.descent_learning_rate_bound(50):.4f}")
    0.0140

  References:
    Bernstein et al, `On the distance between two neural networks and the
    stability of learning <https://arxiv.org/abs/2002.03432>`_, 2020 (Lemma 2)
  """
  depth = jnp.asarray(depth)
  if not isinstance(depth, jax.core.Tracer) and jnp.any(depth < 1):
    raise ValueError(f'depth must be >= 1, got {depth}.')
  return jnp.expm1(jnp.log1p(jnp.asarray(cos_theta, jnp.float32)) / depth)
