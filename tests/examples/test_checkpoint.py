"""Checkpoints with orbax: a resumed run equals the uninterrupted one bit for bit.

Each test trains a small MLP for `TOTAL` steps without interruption, and again
saving params and optimizer state with orbax along the way; it then restores
the checkpoint of step `SAVE_AT` against an abstract target from
`jax.eval_shape` with a freshly built optimizer and jitted step (as a new
process would), finishes training, and compares every leaf of params and state
with `np.testing.assert_array_equal`. So that these checks can fail, each test
also shows that a wrong resume (the checkpoint of another step, or a fresh
optimizer state) ends elsewhere.
"""

import functools

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import fromage_jax

TOTAL = 12  # training steps
SAVE_AT = 6  # the step whose checkpoint is resumed
CHANGE_LR_AT = 3  # inject_hyperparams: the step before which eta changes
BATCH, D_IN, HIDDEN, CLASSES = 32, 8, 16, 3


@functools.cache
def _data():
  """`TOTAL` batches labelled by a random linear teacher (numpy: no compiles)."""
  rng = np.random.default_rng(42)
  x = rng.standard_normal((TOTAL, BATCH, D_IN), dtype=np.float32)
  y = np.argmax(x @ rng.standard_normal((D_IN, CLASSES)), -1).astype(np.int32)
  return x, y


def _init_params(seed=0):
  rng = np.random.default_rng(seed)

  def dense(d_in, d_out):
    w = rng.standard_normal((d_in, d_out), dtype=np.float32) / np.sqrt(d_in)
    return {'w': jnp.asarray(w), 'b': jnp.zeros(d_out)}

  return {'hidden': dense(D_IN, HIDDEN), 'out': dense(HIDDEN, CLASSES)}


def _loss(params, x, y):
  h = jax.nn.relu(x @ params['hidden']['w'] + params['hidden']['b'])
  logits = h @ params['out']['w'] + params['out']['b']
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _make_step(tx):
  """A jitted training step; the loss goes to optimizers that take it."""
  tx = optax.with_extra_args_support(tx)

  @jax.jit
  def step(params, state, x, y):
    loss, grads = jax.value_and_grad(_loss)(params, x, y)
    updates, state = tx.update(grads, state, params, value=loss)
    return optax.apply_updates(params, updates), state

  return step


def _change_lr(t, state):
  """The inject_hyperparams case: eta changes mid-run, before any save."""
  if t == CHANGE_LR_AT:
    state.hyperparams['learning_rate'] = 0.01
  return state


CASES = {
    'constant': dict(make_tx=lambda: fromage_jax.fromage(0.01)),
    'schedule_p_bound': dict(
        make_tx=lambda: fromage_jax.fromage(
            optax.exponential_decay(0.1, transition_steps=2, decay_rate=0.7),
            p_bound=1.0,
        ),
    ),
    'inject_hyperparams': dict(
        make_tx=lambda: optax.inject_hyperparams(fromage_jax.fromage)(
            learning_rate=0.1
        ),
        hook=_change_lr,
    ),
    # A 50% improvement every 2 steps is asked for: the scale drops early.
    'on_plateau': dict(
        make_tx=lambda: fromage_jax.fromage_on_plateau(
            0.1, factor=0.5, patience=2, rtol=0.5
        ),
    ),
}


def _train(step, params, state, start, stop, hook=None, save=None):
  """Steps `start` to `stop`; `save(t, tree)` gets the tree after `t` steps."""
  x, y = _data()
  for t in range(start, stop):
    if hook is not None:
      state = hook(t, state)
    params, state = step(params, state, x[t], y[t])
    if save is not None:
      save(t + 1, {'params': params, 'opt_state': state})
  return params, state


def _leaves(tree):
  return jax.tree_util.tree_leaves_with_path(tree)


def _assert_trees_equal(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for (path, a), (_, e) in zip(_leaves(actual), _leaves(expected), strict=True):
    np.testing.assert_array_equal(
        a, e, strict=True, err_msg=jax.tree_util.keystr(path)
    )


def _trees_differ(a, b):
  return any(
      not np.array_equal(x, y)
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )


def _manager(directory):
  options = ocp.CheckpointManagerOptions(
      max_to_keep=3, enable_async_checkpointing=False
  )
  return ocp.CheckpointManager(directory, options=options)


@pytest.mark.parametrize('case', list(CASES))
def test_resumed_run_equals_uninterrupted_run(case, tmp_path):
  make_tx, hook = CASES[case]['make_tx'], CASES[case].get('hook')

  # The uninterrupted run, saving after steps SAVE_AT - 1 and SAVE_AT.
  tx = make_tx()
  params0 = _init_params()
  saved = {}
  with _manager(tmp_path / 'ckpt') as mngr:

    def save(t, tree):
      if t in (SAVE_AT - 1, SAVE_AT):
        assert mngr.save(t, args=ocp.args.StandardSave(tree))
        saved[t] = tree

    params, state = _train(
        _make_step(tx), params0, tx.init(params0), 0, TOTAL, hook, save
    )

  # A new process: new optimizer, new step, an abstract target.
  tx = make_tx()
  step = _make_step(tx)
  target = jax.eval_shape(
      lambda: (p := _init_params(), {'params': p, 'opt_state': tx.init(p)})[1]
  )
  assert all(
      isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(target)
  )
  with _manager(tmp_path / 'ckpt') as mngr:
    assert mngr.latest_step() == SAVE_AT
    restored = mngr.restore(SAVE_AT, args=ocp.args.StandardRestore(target))
    previous = mngr.restore(SAVE_AT - 1, args=ocp.args.StandardRestore(target))
  assert type(restored['opt_state']) is type(state)
  _assert_trees_equal(restored, saved[SAVE_AT])
  resumed_params, resumed_state = _train(
      step, restored['params'], restored['opt_state'], SAVE_AT, TOTAL, hook
  )
  _assert_trees_equal(resumed_params, params)
  _assert_trees_equal(resumed_state, state)

  # Resuming from the checkpoint of another step ends elsewhere.
  wrong_params, _ = _train(
      step, previous['params'], previous['opt_state'], SAVE_AT, TOTAL, hook
  )
  assert _trees_differ(wrong_params, params)

  opt_state = restored['opt_state']
  if case == 'constant':
    return
  # For all other cases the state matters: a fresh one ends elsewhere.
  fresh_params, _ = _train(
      step, restored['params'], tx.init(restored['params']), SAVE_AT, TOTAL,
      hook,
  )
  assert _trees_differ(fresh_params, params)
  if case == 'schedule_p_bound':
    assert int(opt_state['prefactor_correction'].count) == SAVE_AT
    # The norms at init, not those of the restored params.
    norms = lambda s: s['norm_clip_to_init'].init_norms  # noqa: E731
    _assert_trees_equal(norms(opt_state), norms(tx.init(params0)))
    assert _trees_differ(norms(opt_state), norms(tx.init(restored['params'])))
  elif case == 'inject_hyperparams':
    lr = opt_state.hyperparams['learning_rate']
    np.testing.assert_array_equal(lr, np.float32(0.01), strict=True)
    assert float(state.hyperparams['learning_rate']) == np.float32(0.01)
  elif case == 'on_plateau':
    scale = opt_state.plateau.scale
    assert scale.dtype == jnp.float32
    assert float(scale) < 1.0, 'the scale should have dropped before the save'
    assert float(resumed_state.plateau.scale) <= float(scale)
    # The dropped scale is what the resumed run uses: resetting the plateau
    # state alone (scale 1) ends elsewhere.
    reset = opt_state._replace(plateau=tx.init(params0).plateau)
    reset_params, _ = _train(step, restored['params'], reset, SAVE_AT, TOTAL)
    assert _trees_differ(reset_params, params)


def test_nnx_optimizer_resumes_bit_for_bit(tmp_path):

  class MLP(nnx.Module):

    def __init__(self, rngs):
      self.hidden = nnx.Linear(D_IN, HIDDEN, rngs=rngs)
      self.out = nnx.Linear(HIDDEN, CLASSES, rngs=rngs)

    def __call__(self, x):
      return self.out(jax.nn.relu(self.hidden(x)))

  # One tx for all: `nnx.jit` keys its cache on the optimizer's tx, and the
  # optax tests above already resume with a freshly built tx and step.
  tx = fromage_jax.fromage(optax.cosine_decay_schedule(0.1, TOTAL), p_bound=1.0)

  def build(seed):
    model = MLP(nnx.Rngs(seed))
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, x, y):
    def loss_fn(model):
      logits = model(x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    grads = nnx.grad(loss_fn)(model)
    optimizer.update(model, grads)

  def train(model, optimizer, start, stop):
    x, y = _data()
    for t in range(start, stop):
      train_step(model, optimizer, x[t], y[t])

  def states(model, optimizer):
    _, model_state = nnx.split(model)
    return {'model': model_state, 'optimizer': nnx.state(optimizer)}

  checkpointer = ocp.StandardCheckpointer()
  model, optimizer = build(0)
  train(model, optimizer, 0, SAVE_AT)
  checkpointer.save(tmp_path / 'nnx', states(model, optimizer))
  checkpointer.wait_until_finished()
  train(model, optimizer, SAVE_AT, TOTAL)
  expected = states(model, optimizer)

  # A freshly built model and optimizer (another seed), then restored.
  abstract = states(*nnx.eval_shape(lambda: build(0)))
  restored = checkpointer.restore(tmp_path / 'nnx', abstract)
  new_model, new_optimizer = build(1)
  nnx.update(new_model, restored['model'])
  nnx.update(new_optimizer, restored['optimizer'])
  assert int(new_optimizer.step[...]) == SAVE_AT
  train(new_model, new_optimizer, SAVE_AT, TOTAL)
  _assert_trees_equal(states(new_model, new_optimizer), expected)

  # Restoring the model alone (count 0, other init norms) ends elsewhere.
  other_model, other_optimizer = build(1)
  nnx.update(other_model, restored['model'])
  train(other_model, other_optimizer, SAVE_AT, TOTAL)
  assert _trees_differ(nnx.state(other_model), expected['model'])
