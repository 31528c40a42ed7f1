"""The step's collectives: combined, never gathers, constant in the layers
of a stacked model.

A GPT-2-like tree is compiled, never run, from abstract inputs carrying
`NamedSharding`s on 8 devices (FSDP over one mesh axis, or data and tensor
parallelism on a 2 x 4 mesh), its blocks separate or stacked; the compiled
HLO is searched for collectives. Each leaf's squared norms are sums the
partitioner all-reduces, and XLA combines those all-reduces: XLA:CPU up to
256 operands into one, so a flat tree takes one more all-reduce per 128
leaves (two sums each), and a stacked tree the same number at any depth.
Under `shard_map` with `axis_name`, where the package makes the collective
itself, the squared norms of every layer cross devices in one `psum`.
"""

import functools
import re

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

import fromage_jax as fj
from tests import helpers

WIDTH = 256


def gpt2_like(blocks: int, stacked: bool, width: int = WIDTH):
  """Shapes and tensor-parallel specs: embeddings, `blocks` blocks of 12
  leaves (separate, or stacked on a leading axis under 'blocks'), ln_f."""
  d = width
  block = {
      'ln_1': {'scale': ((d,), P()), 'bias': ((d,), P())},
      'attn': {'qkv': ((d, 3 * d), P(None, 'model')),
               'qkv_bias': ((3 * d,), P('model')),
               'proj': ((d, d), P('model', None)), 'proj_bias': ((d,), P())},
      'ln_2': {'scale': ((d,), P()), 'bias': ((d,), P())},
      'mlp': {'fc': ((d, 4 * d), P(None, 'model')),
              'fc_bias': ((4 * d,), P('model')),
              'proj': ((4 * d, d), P('model', None)), 'proj_bias': ((d,), P())},
  }
  tree = {'wte': ((4 * d, d), P('model', None)), 'wpe': ((d, d), P()),
          'ln_f': {'scale': ((d,), P()), 'bias': ((d,), P())}}
  if stacked:
    tree['blocks'] = jax.tree.map(
        lambda leaf: ((blocks, *leaf[0]), P(None, *leaf[1])), block,
        is_leaf=lambda x: isinstance(x, tuple) and isinstance(x[1], P))
  else:
    tree |= {f'h{i}': block for i in range(blocks)}
  return tree


def _is_leaf(x):
  return isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], P)


def fsdp_spec(shape, layer_axes=0):
  """Shards the largest non-layer axis that 8 divides over 'data'."""
  axes = [a for a in range(layer_axes, len(shape)) if shape[a] % 8 == 0]
  if not axes:
    return P()
  best = max(axes, key=lambda a: shape[a])
  return P(*['data' if a == best else None for a in range(len(shape))])


MESHES = {
    'fsdp': ((8,), ('data',)),
    'tensor_parallel': ((2, 4), ('data', 'model')),
}


def abstract_inputs(mesh_name, blocks, stacked):
  shape, names = MESHES[mesh_name]
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(shape), names)
  tree = gpt2_like(blocks, stacked)

  def struct(leaf):
    shape, spec = leaf
    if mesh_name == 'fsdp':
      spec = fsdp_spec(shape, int(stacked and len(shape) > 1 and shape[0]
                                  == blocks))
    return jax.ShapeDtypeStruct(shape, jnp.float32,
                                sharding=NamedSharding(mesh, spec))

  return jax.tree.map(struct, tree, is_leaf=_is_leaf)


COLLECTIVE = re.compile(
    r'\s(all-gather|all-reduce|reduce-scatter|collective-permute|all-to-all)'
    r'(?:-start)?\(')


def compiled_step(tx, params):
  """The jitted step (`update` + `apply_updates`), compiled, not run, with
  the state where `init` puts it (scalars replicated on the mesh) and the
  new params and state pinned where they came from, as a training loop pins
  them: moving anything would cost a collective."""
  mesh = jax.tree.leaves(params)[0].sharding.mesh
  state_shardings = jax.jit(tx.init).lower(params).compile().output_shardings
  state = jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(
          s.shape, s.dtype, sharding=sh if isinstance(sh, NamedSharding)
          else NamedSharding(mesh, P())),
      jax.eval_shape(tx.init, params), state_shardings)

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  where = jax.tree.map(lambda x: x.sharding, (params, state))
  return jax.jit(step, out_shardings=where).lower(params, state,
                                                  params).compile()


def collectives(compiled) -> dict[str, int]:
  counts = {}
  for kind in COLLECTIVE.findall(compiled.as_text()):
    counts[kind] = counts.get(kind, 0) + 1
  return counts


def build(p_bound, stacked):
  axes = fj.stacked_layer_axes('blocks') if stacked else None
  return fj.fromage(0.01, p_bound=p_bound, layer_axes=axes)


COMBINED = 256  # operands per all-reduce, XLA:CPU's AllReduceCombiner


@functools.cache
def xla_combines_all_reduces() -> bool:
  """Whether this XLA combines independent all-reduces on the CPU (jaxlib
  0.5's does not: each sum is an all-reduce of its own)."""
  mesh = Mesh(np.array(jax.devices()[:8]), ('data',))
  arg = jax.ShapeDtypeStruct((8, 8), jnp.float32,
                             sharding=NamedSharding(mesh, P('data')))
  compiled = jax.jit(lambda a, b: (a.sum(), b.sum())).lower(arg, arg).compile()
  return collectives(compiled).get('all-reduce') == 1


# jaxlib 0.5's XLA:CPU neither combines all-reduces nor, on a tensor-parallel
# mesh, keeps every replicated param's update off an all-gather: the counts
# below are the newer partitioner's.
needs_combining = pytest.mark.skipif(
    not xla_combines_all_reduces(),
    reason="this XLA:CPU does not combine all-reduces (as jaxlib 0.5.3's)")


@needs_combining
@pytest.mark.parametrize('p_bound', [None, 2.0], ids=['plain', 'p_bound'])
@pytest.mark.parametrize('stacked', [False, True], ids=['flat', 'stacked'])
@pytest.mark.parametrize('mesh_name', list(MESHES))
def test_collectives_are_combined_and_gather_nothing(mesh_name, stacked,
                                                      p_bound):
  counts = {}
  for blocks in (6, 12, 24):
    params = abstract_inputs(mesh_name, blocks, stacked)
    compiled = compiled_step(build(p_bound, stacked), params)
    counts[blocks] = collectives(compiled)
    assert set(counts[blocks]) <= {'all-reduce'}, counts
    # The sums of a step (two per leaf, three with p_bound) in as few
    # all-reduces as the combiner allows.
    sums = (3 if p_bound else 2) * len(jax.tree.leaves(params))
    assert counts[blocks]['all-reduce'] <= -(-sums // COMBINED), counts
  if stacked:
    assert counts[6] == counts[12] == counts[24], counts


@needs_combining
@pytest.mark.parametrize('mesh_name', list(MESHES))
def test_projected_chain_gathers_nothing_at_any_depth(mesh_name):
  """Fromage then `norm_project_to_init` on stacked blocks: all-reduces
  only, as many at any depth."""
  axes = fj.stacked_layer_axes('blocks')
  tx = optax.chain(fj.fromage(0.01, layer_axes=axes),
                   fj.norm_project_to_init(layer_axes=axes))
  counts = []
  for blocks in (6, 12):
    params = abstract_inputs(mesh_name, blocks, stacked=True)
    compiled = compiled_step(tx, params)
    counts.append(collectives(compiled))
    assert set(counts[-1]) <= {'all-reduce'}, counts
  assert counts[0] == counts[1], counts


def _psums(jaxpr) -> int:
  """`psum`s in a jaxpr, its sub-jaxprs (of `jit`, `scan`, ...) included."""
  count = 0
  for eqn in jaxpr.eqns:
    count += eqn.primitive.name.startswith('psum')
    for value in eqn.params.values():
      for sub in value if isinstance(value, (list, tuple)) else [value]:
        sub = getattr(sub, 'jaxpr', sub)
        if hasattr(sub, 'eqns'):
          count += _psums(sub)
  return count


@pytest.mark.parametrize('name', list(helpers.OPTIMIZERS))
def test_shard_map_sums_every_layer_in_a_fixed_number_of_psums(name):
  mesh = Mesh(np.array(jax.devices()[:8]), ('data',))
  counts = []
  for blocks in (6, 12):
    tree = gpt2_like(blocks, stacked=False, width=64)
    params = jax.tree.map(lambda leaf: jnp.ones(leaf[0]), tree,
                          is_leaf=_is_leaf)
    specs = jax.tree.map(lambda p: fsdp_spec(p.shape), params)
    names = jax.tree.map(lambda s: 'data' if s != P() else None, specs,
                         is_leaf=lambda x: isinstance(x, P))
    tx = helpers.OPTIMIZERS[name].build(axis_name=names)

    def step(params, grads, tx=tx):
      state = tx.init(params)
      return helpers.update(tx, grads, state, params)[0]

    f = helpers.shard_map(step, mesh=mesh, in_specs=(specs, specs),
                          out_specs=specs)
    counts.append(_psums(jax.make_jaxpr(f)(params, params).jaxpr))
  # init (the clip's norms) and update: at most one psum each per transform.
  assert counts[0] == counts[1] <= 3, counts
