"""`stacked_layer_axes`: `layer_axes` by name, for models whose blocks are
stacked (`nnx.scan`, `nn.scan`); on Flax's own trees in
`tests/examples/test_flax.py`."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fromage_jax as fj
from tests import helpers

ETA = 0.01
# ||W' - W|| / ||W|| = eta + O(eta**2) (the SPEC's "neglecting second-order
# terms"); float32 rounding adds ~1e-7.
SECOND_ORDER_TOL = ETA**2 + 1e-6
SCALES = (1e-2, 1e-1, 1.0, 10.0)  # very different norms for 4 blocks


def _tree():
  rng = np.random.default_rng(7)
  return {
      'embed': {'w': helpers.draw(rng, (3, 4))},
      'blocks': {
          'w': helpers.draw(rng, (4, 4, 4))
          * np.array(SCALES, np.float32)[:, None, None],
          'b': helpers.draw(rng, (4, 4)),
      },
      'head': {'w': helpers.draw(rng, (4, 2))},
  }


def test_helper_on_plain_dicts():
  axes = fj.stacked_layer_axes('blocks')(_tree())
  assert axes == {'embed': {'w': None},
                  'blocks': {'w': (0,), 'b': (0,)},
                  'head': {'w': None}}


def test_helper_equals_hand_written_prefix_and_separate_leaves():
  params = _tree()
  grads = jax.tree.map(lambda p: jnp.cos(p) + 0.3, params)

  def step(layer_axes, p, g):
    tx = fj.fromage(ETA, p_bound=3.0, layer_axes=layer_axes)
    return jax.jit(tx.update)(g, tx.init(p), p)[0]

  by_name = step(fj.stacked_layer_axes('blocks'), params, grads)
  prefix = step({'embed': None, 'blocks': (0,), 'head': None}, params, grads)
  helpers.assert_trees_close(by_name, prefix, rtol=0, atol=0)

  # The SPEC: with (0,), a [L, ...] leaf gives the updates of L separate leaves.
  split = {f'{k}{i}': v[i] for k, v in params['blocks'].items()
           for i in range(4)}
  gsplit = {f'{k}{i}': v[i] for k, v in grads['blocks'].items()
            for i in range(4)}
  separate = step(None, split, gsplit)
  for k in ('w', 'b'):
    for i in range(4):
      np.testing.assert_allclose(by_name['blocks'][k][i],
                                 separate[f'{k}{i}'], rtol=1e-6, atol=1e-8)


def test_helper_matches_whole_path_steps_at_any_depth():
  params = {'enc': {'blocks': {'lin': {'w': jnp.ones((2, 3))}}},
            'blocks_out': {'w': jnp.ones((2, 3))},
            'layers': [jnp.ones((2, 3)), jnp.ones((2,))]}
  axes = fj.stacked_layer_axes('blocks', 'layers', axis=-1)(params)
  assert axes == {'enc': {'blocks': {'lin': {'w': (-1,)}}},
                  'blocks_out': {'w': None},  # not a substring match
                  'layers': [(-1,), (-1,)]}
  nested = fj.stacked_layer_axes('blocks', axis=(0, 1))(params)
  assert nested['enc']['blocks']['lin']['w'] == (0, 1)
  rel = fj.relative_update_norms(
      params, params, layer_axes=fj.stacked_layer_axes(
          'blocks', axis=(0, 1))
  )
  assert rel['enc']['blocks']['lin']['w'].shape == (2, 3)


def test_helper_unmatched_name_is_a_clear_error():
  tx = fj.fromage(
      ETA, layer_axes=fj.stacked_layer_axes('blocks', 'layer')
  )
  params = _tree()
  with pytest.raises(ValueError, match=r"\['layer'\].*\['blocks'\]\['w'\]"):
    tx.update(params, tx.init(params), params)
  # 'block' is not 'blocks': whole path steps only.
  with pytest.raises(ValueError, match='block'):
    fj.stacked_layer_axes('block')(params)
  # strict=False: unmatched names are ignored, matched ones still apply.
  axes = fj.stacked_layer_axes('blocks', 'layer', strict=False)
  assert axes(params)['blocks']['w'] == (0,)
  assert fj.stacked_layer_axes('x', strict=False)(params) == {
      'embed': {'w': None}, 'blocks': {'w': None, 'b': None},
      'head': {'w': None}}
  # An empty tree has nothing to stack: no error, empty update.
  tx = fj.fromage(layer_axes=fj.stacked_layer_axes('a'))
  assert tx.update({}, tx.init({}), {})[0] == {}


@pytest.mark.parametrize('args, kwargs', [
    ((), {}),
    ((3,), {}),
    (('blocks',), {'axis': 'x'}),
    (('blocks',), {'axis': True}),
    (('blocks',), {'axis': ()}),
])
def test_helper_bad_arguments(args, kwargs):
  with pytest.raises(TypeError):
    fj.stacked_layer_axes(*args, **kwargs)


def test_helper_scalar_leaf_in_a_stack_names_the_leaf():
  params = {'blocks': {'w': jnp.ones((2, 3)), 'gain': jnp.ones(())}}
  tx = fj.fromage(layer_axes=fj.stacked_layer_axes('blocks'))
  with pytest.raises(ValueError, match="gain"):
    tx.update(params, tx.init(params), params)


def test_helper_inside_optax_masked():
  # Inside optax.masked: masked-out leaves are MaskedNodes, passed through.
  axes = fj.stacked_layer_axes('blocks')
  params = _tree()
  mask = {'embed': {'w': False}, 'blocks': {'w': True, 'b': True},
          'head': {'w': True}}
  tx = optax.masked(fj.fromage(ETA, layer_axes=axes), mask)
  updates, _ = jax.jit(tx.update)(params, tx.init(params), params)
  np.testing.assert_array_equal(updates['embed']['w'], params['embed']['w'])
  steps = jax.jit(fj.relative_update_norms, static_argnames='layer_axes')(
      updates, params, layer_axes=axes)
  np.testing.assert_allclose(steps['blocks']['w'], ETA, atol=SECOND_ORDER_TOL)
