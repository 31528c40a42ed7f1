"""`deep_relative_trust`, `relative_update_norms` and
`descent_learning_rate_bound`, against `fromage_jax.testing` (float64 NumPy)
on every kind of pytree, with the layers the transforms see."""

import dataclasses
from typing import NamedTuple

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fromage_jax as fj
from fromage_jax import testing
from tests import helpers


class Pair(NamedTuple):
  kernel: jax.Array
  bias: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Layer:
  kernel: jax.Array
  bias: jax.Array


def _trees():
  """The same five layers in each container a JAX user meets."""
  k = jax.random.split(jax.random.key(0), 3)
  a, b = jax.random.normal(k[0], (4, 3)), jax.random.normal(k[1], (3,))
  c = jax.random.normal(k[2], (3, 2))
  mlp = eqx.nn.MLP(4, 2, 3, 1, key=k[0])
  return {
      'tuple': (a, b, c),
      'namedtuple': Pair(a, b),
      'dataclass': Layer(a, b),
      'list_of_dicts': [{'w': a, 'b': b}, {'w': c, 'b': jnp.zeros(2)}],
      'none_leaves': {'w': a, 'frozen': None, 'b': b},
      'masked_node': {'w': a, 'masked': optax.MaskedNode(), 'b': b},
      'equinox_mlp': eqx.filter(mlp, eqx.is_array),
      'equinox_sequential': eqx.filter(
          eqx.nn.Sequential([eqx.nn.Linear(4, 3, key=k[1]),
                             eqx.nn.Lambda(jax.nn.relu),
                             eqx.nn.Linear(3, 2, key=k[2])]), eqx.is_array),
  }


TREES = _trees()


def _perturbed(tree, scale=0.1, seed=1):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten([
      x + scale * jax.random.normal(key, x.shape)
      for x, key in zip(leaves, keys, strict=True)])


@pytest.mark.parametrize('kind', list(TREES))
def test_diagnostics_match_the_float64_reference_on_any_pytree(kind):
  params = TREES[kind]
  other = _perturbed(params)
  diff = jax.tree.map(lambda a, b: b - a, params, other)
  got = fj.relative_update_norms(diff, params)
  want = testing.relative_update_norms(diff, params)
  chex.assert_trees_all_close(got, jax.tree.map(np.float32, want), rtol=1e-5)
  np.testing.assert_allclose(
      fj.deep_relative_trust(params, other),
      testing.deep_relative_trust(params, other), rtol=1e-5)


@pytest.mark.parametrize('kind', list(TREES))
def test_diagnostics_find_the_layers_fromage_steps(kind):
  """Fromage moves every layer by about eta of its norm; the diagnostics
  see one entry per layer of the transforms, and `(1 + eta)**L - 1`."""
  params = TREES[kind]
  eta = 0.01
  tx = fj.fromage(eta)
  grads = _perturbed(jax.tree.map(jnp.zeros_like, params), 1.0, seed=2)
  updates, _ = tx.update(grads, tx.init(params), params)
  rel = fj.relative_update_norms(updates, params)
  chex.assert_trees_all_equal_structs(rel, jax.tree.map(jnp.float32, params))
  layers = [r for r, w in zip(jax.tree.leaves(rel), jax.tree.leaves(params),
                              strict=True) if jnp.any(w != 0)]
  # eta to first order: the prefactor adds up to eta**2 (rtol eta).
  np.testing.assert_allclose(layers, eta, rtol=eta)
  moved = optax.apply_updates(params, updates)
  np.testing.assert_allclose(fj.deep_relative_trust(params, moved),
                             (1 + eta) ** len(layers) - 1, rtol=eta)


def test_stacked_layers_are_the_transforms_layers():
  params = {'blocks': jax.random.normal(jax.random.key(0), (4, 3, 3)),
            'head': jax.random.normal(jax.random.key(1), (3, 2))}
  axes = fj.stacked_layer_axes('blocks')
  tx = fj.fromage(0.01, layer_axes=axes)
  grads = jax.tree.map(lambda x: jnp.arange(x.size, dtype=x.dtype).reshape(
      x.shape) * jnp.linspace(1, 100, x.shape[0]).reshape(
          (-1,) + (1,) * (x.ndim - 1)), params)
  updates, _ = tx.update(grads, tx.init(params), params)
  rel = fj.relative_update_norms(updates, params, layer_axes=axes)
  assert rel['blocks'].shape == (4,)
  np.testing.assert_allclose(rel['blocks'], 0.01, rtol=0.01)
  chex.assert_trees_all_close(
      rel, jax.tree.map(np.float32, testing.relative_update_norms(
          updates, params, layer_axes=axes)), rtol=1e-5)


def test_zero_layers_follow_one_convention_in_both_places():
  """||W|| = 0: relative step 0 where the layer did not move (0/0), inf
  where it did; deep relative trust leaves the layer out."""
  params = {'still': jnp.zeros(3), 'moved': jnp.zeros(3), 'w': jnp.ones(4)}
  updates = {'still': jnp.zeros(3), 'moved': jnp.ones(3),
             'w': jnp.full(4, 0.1)}
  want = {'still': 0.0, 'moved': np.inf, 'w': 0.1}
  for impl in (fj, testing):
    got = impl.relative_update_norms(updates, params)
    for key, value in want.items():
      np.testing.assert_allclose(float(got[key]), value, rtol=1e-6)
    moved = jax.tree.map(lambda a, b: a + b, params, updates)
    np.testing.assert_allclose(float(impl.deep_relative_trust(params, moved)),
                               0.1, rtol=1e-5)


def test_deep_relative_trust_of_an_empty_tree_is_zero():
  assert float(fj.deep_relative_trust({}, {})) == 0.0
  assert float(testing.deep_relative_trust({}, {})) == 0.0


def test_diagnostics_refuse_trees_that_differ_naming_the_function():
  with pytest.raises(ValueError, match='fromage_jax.deep_relative_trust'):
    fj.deep_relative_trust({'a': jnp.ones(2)}, {'a': jnp.ones(3)})
  with pytest.raises(ValueError, match='fromage_jax.relative_update_norms'):
    fj.relative_update_norms({'a': jnp.ones(2)}, {'b': jnp.ones(2)})


def test_deep_relative_trust_has_finite_gradients_at_zero_layers():
  params = {'w': jnp.ones(3), 'b': jnp.zeros(2)}
  grad = jax.grad(lambda p: fj.deep_relative_trust(params, p))(
      {'w': jnp.full(3, 1.1), 'b': jnp.zeros(2)})
  chex.assert_tree_all_finite(grad)


@pytest.mark.parametrize('layer_axes', [None, helpers.STACK_PREFIX])
def test_deep_relative_trust_matches_reference(layer_axes):
  rng = np.random.default_rng(22)
  params = helpers.reference_params(rng)
  other = jax.tree.map(lambda w: w + 0.1 * helpers.draw(rng, w.shape), params)
  got = fj.deep_relative_trust(params, other, layer_axes=layer_axes)
  want = testing.deep_relative_trust(params, other, layer_axes)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)


def test_deep_relative_trust_closed_form():
  # Every layer with ||W|| > 0 moved by exactly eta relative to its norm:
  # (1 + eta)**L - 1; zero layers are left out.
  rng = np.random.default_rng(23)
  params = helpers.reference_params(rng)  # 'dense/b' and 'stack'[1] are zero
  eta = 0.03
  other = jax.tree.map(lambda w: w * (1 + eta), params)
  # Per leaf: dense/w, frozen, stack(one layer) -> 3 layers; dense/b excluded.
  np.testing.assert_allclose(
      float(fj.deep_relative_trust(params, other)),
      (1 + eta) ** 3 - 1, rtol=1e-5,
  )
  # Stacked: dense/w, frozen, stack slices 0 and 2 -> 4 layers.
  np.testing.assert_allclose(
      float(fj.deep_relative_trust(params, other, helpers.STACK_PREFIX)),
      (1 + eta) ** 4 - 1, rtol=1e-5,
  )


@pytest.mark.parametrize('layer_axes', [None, helpers.STACK_PREFIX])
def test_relative_update_norms_matches_reference(layer_axes):
  rng = np.random.default_rng(24)
  params = helpers.reference_params(rng)
  params['dense']['b'] = helpers.draw(rng, (3,))
  params['stack'][1] = helpers.draw(rng, (4, 2))
  updates = jax.tree.map(lambda w: 0.1 * helpers.draw(rng, w.shape), params)
  got = fj.relative_update_norms(updates, params, layer_axes=layer_axes)
  want = testing.relative_update_norms(updates, params, layer_axes)
  helpers.assert_trees_close_to_scale(got, want, 1e-5)
  expected_shape = (3,) if layer_axes else ()
  assert np.shape(got['stack']) == expected_shape


def test_descent_learning_rate_bound_matches_formula():
  depths = np.array([1, 2, 5, 16, 50, 1000])
  for cos in (1.0, 0.5, 0.0, -0.5):
    got = np.asarray(fj.descent_learning_rate_bound(depths, cos))
    np.testing.assert_allclose(
        got, testing.descent_learning_rate_bound(depths, cos), rtol=1e-5, atol=1e-7
    )
  # Known values: one layer, aligned step: eta < 1; cos = 0: no descent room.
  np.testing.assert_allclose(
      float(fj.descent_learning_rate_bound(1)), 1.0, rtol=1e-6
  )
  assert float(fj.descent_learning_rate_bound(7, 0.0)) == 0.0
