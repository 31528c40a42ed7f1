"""Checkpoint, interrupt and resume Fromage training with orbax.

Trains an MLP on scikit-learn's digits with
`fromage_jax.fromage_on_plateau(0.01)` (the paper's protocol: eta / 10 when
the epoch's loss plateaus), saving params and optimizer state with an orbax
`CheckpointManager` every `--save-every` epochs. The run is interrupted after
`--interrupt-at` epochs (the epochs since the last checkpoint are lost), then
resumed, as a new process would: the latest checkpoint is restored against an
abstract target from `jax.eval_shape` and training finishes. Finally the
resumed run is compared, leaf by leaf, with an uninterrupted one: on CPU they
are equal bit for bit.

    python -m fromage_jax.examples.checkpointing [--quick] [--ckpt-dir DIR]
"""

import logging
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

import fromage_jax
from fromage_jax.examples._common import accuracy
from fromage_jax.examples._common import argument_parser
from fromage_jax.examples._common import init_mlp
from fromage_jax.examples._common import load_digits
from fromage_jax.examples._common import make_epoch
from fromage_jax.examples._common import require


class Trainer:
  """Everything a (re)started process rebuilds from the command line."""

  def __init__(self, args):
    x_tr, y_tr, self.x_te, self.y_te = load_digits(args.seed)
    self.x_tr, self.y_tr = jnp.asarray(x_tr), jnp.asarray(y_tr)
    self.sizes = [x_tr.shape[1]] + [args.hidden] * (args.depth - 1) + [10]
    self.key = jax.random.key(args.seed)
    self.tx = fromage_jax.fromage_on_plateau(
        0.01, patience=3, accumulation_size=x_tr.shape[0] // args.batch_size
    )
    self.epoch = make_epoch(self.tx, self.x_tr, self.y_tr, args.batch_size)

  def init(self):
    """The initial training state: params and optimizer state."""
    params = init_mlp(self.key, self.sizes)
    return {'params': params, 'opt_state': self.tx.init(params)}

  def perm(self, epoch: int):
    """The data order of an epoch depends on the epoch only."""
    key = jax.random.fold_in(jax.random.key(1), epoch)
    return jax.random.permutation(key, self.x_tr.shape[0])

  def train(self, state, start: int, stop: int, bar, mngr=None):
    """Epochs `start` to `stop`; saves to `mngr` (its interval decides)."""
    params, opt_state = state['params'], state['opt_state']
    for epoch in range(start, stop):
      params, opt_state, losses = self.epoch(
          params, opt_state, self.perm(epoch)
      )
      state = {'params': params, 'opt_state': opt_state}
      saved = mngr is not None and mngr.save(
          epoch + 1, args=_ocp().args.StandardSave(state)
      )
      bar.set_postfix_str(
          f'loss {float(losses.mean()):.4f}'
          + (f', saved epoch {epoch + 1}' if saved else ''),
          refresh=False,
      )
      bar.update()
    return state


def _ocp():
  return require('orbax.checkpoint')


def manager(ckpt_dir: str, save_every: int):
  ocp = _ocp()
  options = ocp.CheckpointManagerOptions(
      max_to_keep=2,
      # Exactly every `save_every` epochs (the default also saves the first).
      save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(
          save_every
      ),
  )
  return ocp.CheckpointManager(ckpt_dir, options=options)


def leaves_equal(a, b) -> bool:
  """Same structure, and every leaf equal in shape, dtype and bits."""
  if jax.tree.structure(a) != jax.tree.structure(b):
    return False
  return all(
      x.dtype == y.dtype and np.array_equal(x, y)
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )


def main(argv=None) -> dict:
  parser = argument_parser('fromage_jax.examples.checkpointing', __doc__)
  parser.add_argument('--epochs', type=int, default=30)
  parser.add_argument('--save-every', type=int, default=5)
  parser.add_argument(
      '--interrupt-at', type=int, default=None,
      help='epochs done before the interruption (default: about 2/3 of '
      '--epochs, just off the save interval)',
  )
  parser.add_argument('--batch-size', type=int, default=64)
  parser.add_argument('--hidden', type=int, default=256)
  parser.add_argument('--depth', type=int, default=3, help='number of layers')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument(
      '--ckpt-dir', default=None,
      help='an empty or new directory (default: a temporary one, removed '
      'at the end)',
  )
  parser.add_argument(
      '--quick', action='store_true',
      help='a short run (8 epochs, width 64) for tests',
  )
  args = parser.parse_args(argv)
  if args.quick:
    args.epochs, args.save_every, args.hidden = 8, 3, 64
  if args.interrupt_at is None:
    args.interrupt_at = max(1, 2 * args.epochs // 3)
    if args.interrupt_at % args.save_every == 0:
      args.interrupt_at += 1  # so that some work is lost and redone
  if not 0 < args.interrupt_at < args.epochs:
    parser.error('--interrupt-at must lie between 0 and --epochs')
  if args.ckpt_dir is None:
    # The checkpoints then last as long as the run, and leave nothing behind.
    with tempfile.TemporaryDirectory(prefix='fromage_ckpt_') as ckpt_dir:
      return run(args, ckpt_dir)
  ckpt_dir = os.path.abspath(args.ckpt_dir)
  if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
    parser.error(f'--ckpt-dir {ckpt_dir} is not empty')
  return run(args, ckpt_dir)


def run(args, ckpt_dir: str) -> dict:
  """Interrupted, resumed and uninterrupted training, saving in `ckpt_dir`."""
  tqdm = require('tqdm.auto').tqdm
  # orbax logs every save and restore at INFO level through absl.
  logging.getLogger('absl').setLevel(logging.WARNING)

  last_save = args.interrupt_at // args.save_every * args.save_every
  # Epochs: interrupted run, resumed run, uninterrupted run.
  total = args.interrupt_at + (args.epochs - last_save) + args.epochs
  bar = tqdm(total=total, desc='training', unit='epoch')

  # 1. The run that gets interrupted: saves every --save-every epochs, then
  # stops after --interrupt-at epochs, losing the epochs since its last save.
  trainer = Trainer(args)
  with manager(ckpt_dir, args.save_every) as mngr:
    bar.set_description('interrupted run')
    trainer.train(trainer.init(), 0, args.interrupt_at, bar, mngr)
  del trainer

  # 2. A new process resumes from the latest checkpoint, restored against an
  # abstract target: the structure, shapes and dtypes of a fresh state, which
  # jax.eval_shape computes without allocating or initialising anything.
  trainer = Trainer(args)
  with manager(ckpt_dir, args.save_every) as mngr:
    resumed_from = mngr.latest_step()
    if resumed_from is None:  # interrupted before the first save
      resumed_from, state = 0, trainer.init()
    else:
      target = jax.eval_shape(trainer.init)
      state = mngr.restore(
          resumed_from, args=_ocp().args.StandardRestore(target)
      )
    bar.set_description(f'resumed from epoch {resumed_from}')
    resumed = trainer.train(state, resumed_from, args.epochs, bar, mngr)
    mngr.wait_until_finished()
    checkpoints = list(mngr.all_steps())

  # 3. The reference: the same training, uninterrupted.
  bar.set_description('uninterrupted run')
  reference = trainer.train(trainer.init(), 0, args.epochs, bar)
  bar.close()

  params = resumed['params']
  results = dict(
      ckpt_dir=ckpt_dir,
      checkpoints=checkpoints,
      resumed_from=resumed_from,
      params_equal=leaves_equal(params, reference['params']),
      opt_state_equal=leaves_equal(
          resumed['opt_state'], reference['opt_state']
      ),
      plateau_scale=float(resumed['opt_state'].plateau.scale),
      train_acc=accuracy(params, trainer.x_tr, trainer.y_tr),
      test_acc=accuracy(params, trainer.x_te, trainer.y_te),
  )
  verdict = (
      'equal bit for bit' if results['params_equal']
      and results['opt_state_equal'] else 'DIFFERENT'
  )
  print(
      f'\ninterrupted after epoch {args.interrupt_at}, resumed from the '
      f'checkpoint of epoch {resumed_from} in {ckpt_dir} (checkpoints kept: '
      f'{checkpoints})\n'
      f'final params and optimizer state, resumed vs uninterrupted: {verdict}\n'
      f'plateau scale {results["plateau_scale"]:g}, train accuracy '
      f'{results["train_acc"]:.4f}, test accuracy {results["test_acc"]:.4f}'
  )
  return results


if __name__ == '__main__':
  main()
