"""fromage_jax with Flax: nnx.Optimizer, Linen TrainState, stacked layers.

`nnx.Optimizer.update` hands optax `nnx.State`s of raw arrays (`nnx.as_pure`),
Linen's `TrainState.apply_gradients` hands it dicts; both pass params, so
Fromage works unchanged. For blocks stacked into `[L, ...]` leaves
(`nnx.vmap` + `nnx.scan`, Linen's `nn.scan`), `stacked_layer_axes` makes each
block its own layer: each then moves by eta relative to its own norm.
"""

from flax import linen as nn
from flax import nnx
from flax.training import train_state
import jax
import jax.numpy as jnp
import numpy as np
import optax

import fromage_jax
from tests import helpers

ETA = 0.01
# ||W' - W|| / ||W|| = eta + O(eta**2) (the SPEC's "neglecting second-order
# terms"); float32 rounding adds ~1e-7.
SECOND_ORDER_TOL = ETA**2 + 1e-6
SCALES = (1e-2, 1e-1, 1.0, 10.0)  # very different norms for 4 blocks
BLOCKS = fromage_jax.stacked_layer_axes('blocks')


class MLP(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.l1 = nnx.Linear(5, 8, rngs=rngs)
    self.l2 = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.l2(jax.nn.relu(self.l1(x)))


def _mse(model, x, y):
  return jnp.mean((model(x) - y) ** 2)


# Test data from numpy: each eager jax.random call at a new shape compiles.
def _normal(rng, shape):
  return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def _data(n=16, d_in=5, d_out=3, seed=0):
  rng = np.random.default_rng(seed)
  return _normal(rng, (n, d_in)), _normal(rng, (n, d_out))


# Jitted: run eagerly, each of its small ops would compile on its own.
_relative_update_norms = jax.jit(
    fromage_jax.relative_update_norms, static_argnames='layer_axes'
)


@jax.jit
def _diff(new, old):
  return jax.tree.map(jnp.subtract, new, old)


# --------------------------------------------------------------- nnx.Optimizer


def test_nnx_optimizer_step_equals_plain_optax_update():
  model = MLP(nnx.Rngs(0))
  x, y = _data()
  tx = fromage_jax.fromage(ETA, p_bound=2.0)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  params = nnx.as_pure(nnx.state(model, nnx.Param))
  grads = nnx.jit(nnx.grad(_mse))(model, x, y)
  plain_grads = nnx.as_pure(nnx.state(grads, nnx.Param))
  # The same step on plain dicts of the same arrays.
  params_d = jax.tree.map(np.asarray, nnx.to_pure_dict(params))
  grads_d = jax.tree.map(np.asarray, nnx.to_pure_dict(plain_grads))
  expected_updates, _ = jax.jit(tx.update)(grads_d, tx.init(params_d),
                                           params_d)
  expected = optax.apply_updates(params_d, expected_updates)

  updates = nnx.jit(lambda m, o, g: o.update(m, g))(model, optimizer, grads)

  helpers.assert_trees_close(nnx.to_pure_dict(updates), expected_updates)
  helpers.assert_trees_close(
      nnx.to_pure_dict(nnx.state(model, nnx.Param)), expected
  )
  # The zero-initialised biases moved (they would not with optax.fromage).
  assert np.all(np.abs(np.asarray(model.l1.bias[...])) > 0)
  assert int(optimizer.step[...]) == 1
  assert int(nnx.as_pure(optimizer.opt_state)['prefactor_correction'].count) == 1


def test_nnx_optimizer_trains_under_nnx_jit():
  model = MLP(nnx.Rngs(1))
  x, y = _data(seed=1)
  optimizer = nnx.Optimizer(model, fromage_jax.fromage(0.05), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(_mse)(model, x, y)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(40)]
  assert losses[-1] < 0.7 * losses[0], losses


# ------------------------------------------------------------ Linen TrainState


class LinenMLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(nn.relu(nn.Dense(8)(x)))


def test_linen_train_state_apply_gradients_equals_optax():
  x, y = _data(seed=2)
  module = LinenMLP()
  params = jax.jit(module.init)(jax.random.key(2), x)['params']
  tx = fromage_jax.fromage(ETA)
  state = train_state.TrainState.create(
      apply_fn=module.apply, params=params, tx=tx
  )

  def loss_fn(p):
    return jnp.mean((module.apply({'params': p}, x) - y) ** 2)

  @jax.jit
  def step(state):
    return state.apply_gradients(grads=jax.grad(loss_fn)(state.params))

  grads = jax.jit(jax.grad(loss_fn))(params)
  new_state = step(state)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  helpers.assert_trees_close(new_state.params, optax.apply_updates(params, updates))
  assert int(new_state.step) == 1

  rel = _relative_update_norms(_diff(new_state.params, params), params
  )
  np.testing.assert_allclose(rel['Dense_0']['kernel'], ETA,
                             atol=SECOND_ORDER_TOL)
  assert np.isinf(rel['Dense_0']['bias'])  # zero-initialised, yet it moved

  for _ in range(30):
    new_state = step(new_state)
  assert loss_fn(new_state.params) < 0.8 * loss_fn(params)


# -------------------------------------------------------------- stacked layers


class Block(nnx.Module):

  def __init__(self, width: int, rngs: nnx.Rngs):
    self.lin = nnx.Linear(width, width, rngs=rngs)

  def __call__(self, x):
    return x + jnp.tanh(self.lin(x))


class Stacked(nnx.Module):
  """Blocks created with nnx.vmap over Block's init, applied with nnx.scan."""

  def __init__(self, rngs: nnx.Rngs, width=6, num_blocks=4):
    self.embed = nnx.Linear(4, width, rngs=rngs)

    @nnx.split_rngs(splits=num_blocks)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def create(rngs):
      return Block(width, rngs)

    self.blocks = create(rngs)
    self.head = nnx.Linear(width, 2, rngs=rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def forward(x, block):
      return block(x)

    return self.head(forward(self.embed(x), self.blocks))


def _stacked_model():
  """4 blocks whose params have norms 1e-2 .. 10 times apart; no zero leaf."""
  # Every param is replaced below: skip the (slow to compile) vmapped init.
  model = nnx.eval_shape(lambda: Stacked(nnx.Rngs(3)))
  scales = np.asarray(SCALES, np.float32)
  rng = np.random.default_rng(4)

  def rescale(path, v):
    noise = _normal(rng, v.shape)
    if 'blocks' in jax.tree_util.keystr(path):
      return noise * scales.reshape((-1,) + (1,) * (v.ndim - 1))
    return noise * 0.5

  state = nnx.as_pure(nnx.state(model, nnx.Param))
  nnx.update(model, jax.tree_util.tree_map_with_path(rescale, state))
  return model


def _one_stacked_step(layer_axes):
  model = _stacked_model()
  x, y = _data(n=8, d_in=4, d_out=2, seed=5)
  tx = fromage_jax.fromage(ETA, layer_axes=layer_axes)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  params = nnx.as_pure(nnx.state(model, nnx.Param))

  @nnx.jit
  def step(model, optimizer):
    return optimizer.update(model, nnx.grad(_mse)(model, x, y))

  updates = step(model, optimizer)
  new_params = nnx.as_pure(nnx.state(model, nnx.Param))
  return params, updates, new_params


def _block_steps(updates, params):
  rel = _relative_update_norms(updates, params, layer_axes=BLOCKS)
  return rel['blocks']['lin'], rel


def test_stacked_nnx_each_block_moves_by_eta_relative_to_its_own_norm():
  params, updates, new_params = _one_stacked_step(
      fromage_jax.stacked_layer_axes('blocks')
  )
  assert params['blocks']['lin']['kernel'].shape == (len(SCALES), 6, 6)
  block_steps, rel = _block_steps(updates, params)
  for name in ('kernel', 'bias'):
    steps = np.asarray(block_steps[name])
    assert steps.shape == (len(SCALES),)
    np.testing.assert_allclose(steps, ETA, atol=SECOND_ORDER_TOL)
  for layer in ('embed', 'head'):  # unstacked leaves: one layer each
    for name in ('kernel', 'bias'):
      assert np.shape(rel[layer][name]) == ()
      np.testing.assert_allclose(rel[layer][name], ETA, atol=SECOND_ORDER_TOL)
  # The model really moved by those updates.
  moved = _diff(new_params, params)
  # W' - W loses ~eps * ||W|| to cancellation (||W|| ~ 10 for the last block).
  helpers.assert_trees_close(nnx.to_pure_dict(moved), nnx.to_pure_dict(updates),
                      rtol=1e-4, atol=2e-5)


def test_stacked_nnx_without_layer_axes_blocks_do_not_move_by_eta():
  params, updates, _ = _one_stacked_step(None)
  block_steps, _ = _block_steps(updates, params)
  for name in ('kernel', 'bias'):
    steps = np.asarray(block_steps[name])
    # The stack's norm is dominated by the largest block: small blocks take
    # steps many times eta, the largest a little less than eta.
    assert steps[0] > 10 * ETA, steps
    assert np.max(np.abs(steps / ETA - 1)) > 0.5, steps


def test_stacked_nnx_with_p_bound_keeps_one_init_norm_per_block():
  model = _stacked_model()
  tx = fromage_jax.fromage(
      ETA, p_bound=1.5, layer_axes=fromage_jax.stacked_layer_axes('blocks')
  )
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  init_norms = nnx.as_pure(optimizer.opt_state)['norm_clip_to_init'].init_norms
  kernel = np.asarray(init_norms['blocks']['lin']['kernel']).ravel()
  w = np.asarray(model.blocks.lin.kernel[...])
  np.testing.assert_allclose(
      kernel, np.linalg.norm(w.reshape(len(SCALES), -1), axis=1), rtol=1e-5
  )
  assert np.shape(init_norms['head']['kernel']) == (1, 1)


class LinenBlock(nn.Module):

  @nn.compact
  def __call__(self, x, _):
    return x + jnp.tanh(nn.Dense(x.shape[-1])(x)), None


class LinenStacked(nn.Module):

  @nn.compact
  def __call__(self, x):
    stack = nn.scan(
        LinenBlock, variable_axes={'params': 0}, split_rngs={'params': True},
        length=3,
    )
    x, _ = stack(name='layers')(nn.Dense(5)(x), None)
    return nn.Dense(2)(x)


def test_stacked_linen_nn_scan_with_train_state():
  x, y = _data(n=8, d_in=4, d_out=2, seed=6)
  module = LinenStacked()
  scale = np.asarray([0.01, 1.0, 100.0], np.float32)

  # Random params of the right shapes (no zero biases); the stacked blocks'
  # norms 1e-2 .. 1e2 apart.
  shapes = jax.eval_shape(module.init, jax.random.key(6), x)['params']
  rng = np.random.default_rng(6)
  params = jax.tree.map(lambda p: _normal(rng, p.shape), shapes)
  params['layers'] = jax.tree.map(
      lambda p: p * scale.reshape((-1,) + (1,) * (p.ndim - 1)),
      params['layers'],
  )
  axes = fromage_jax.stacked_layer_axes('layers')
  state = train_state.TrainState.create(
      apply_fn=module.apply, params=params,
      tx=fromage_jax.fromage(ETA, layer_axes=axes),
  )

  @jax.jit
  def step(state):
    grads = jax.grad(
        lambda p: jnp.mean((module.apply({'params': p}, x) - y) ** 2)
    )(state.params)
    return state.apply_gradients(grads=grads)

  new = step(state)
  rel = _relative_update_norms(
      _diff(new.params, params), params, layer_axes=axes
  )
  kernel_steps = np.asarray(rel['layers']['Dense_0']['kernel'])
  assert kernel_steps.shape == (3,)
  # Through the subtraction W' - W, float32 cancellation adds ~1e-5.
  np.testing.assert_allclose(kernel_steps, ETA, atol=SECOND_ORDER_TOL + 2e-5)


def test_stacked_layer_axes_on_a_tree_of_nnx_variables():
  model = _stacked_model()
  axes = fromage_jax.stacked_layer_axes('blocks')
  # A tree of nnx.Variable (not as_pure): the diagnostics accept it too.
  state = nnx.state(model, nnx.Param)
  rel = _relative_update_norms(state, state, layer_axes=axes)
  kernel = np.asarray(nnx.as_pure(rel)['blocks']['lin']['kernel'])
  assert kernel.shape == (len(SCALES),)
  np.testing.assert_allclose(kernel, 1.0, rtol=1e-6)
