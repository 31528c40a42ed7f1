"""The main job, `python -m fromage_jax.demo`, on a short run."""

import os
import subprocess
import sys

from fromage_jax import demo


def test_demo_short_run_trains_and_writes_outputs(tmp_path):
  results = demo.main(['--epochs', '4', '--out', str(tmp_path)])
  assert set(results) == set(demo.optimizers(steps_per_epoch=22))
  for name, r in results.items():
    assert len(r['curve']) == 4
    assert r['curve'][-1] < r['curve'][0], name
    assert r['train_acc'] > 0.9, name
  # Zero-initialised biases learn with fromage_jax, stay ~frozen with optax's.
  assert results['fromage_jax.fromage(0.01)']['bias_norm'] > 1e-3
  assert results['optax.fromage(0.01)']['bias_norm'] < 1e-5
  assert os.path.getsize(tmp_path / 'demo_loss.png') > 10_000
  table = (tmp_path / 'demo_results.md').read_text()
  for name in results:
    assert f'`{name}`' in table


def test_demo_runs_as_a_module(tmp_path):
  proc = subprocess.run(
      [sys.executable, '-m', 'fromage_jax.demo', '--epochs', '1', '--out',
       str(tmp_path)],
      capture_output=True, text=True, timeout=300, check=False,
  )
  assert proc.returncode == 0, proc.stderr
  assert '| `optax.sgd(0.1)` |' in proc.stdout
