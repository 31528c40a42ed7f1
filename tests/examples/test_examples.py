"""The examples (`fromage_jax.examples`) run in their quick forms and learn.

Digits has 10 balanced classes: chance is about 0.1 accuracy.
"""

import os
import re
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from fromage_jax.examples import checkpointing
from fromage_jax.examples import linen_mlp_digits
from fromage_jax.examples import nnx_cnn_digits
from fromage_jax.examples import nnx_scan_stacked
from tests.helpers import ROOT

CHANCE = 0.1


@pytest.mark.parametrize('example', [
    nnx_cnn_digits, linen_mlp_digits, nnx_scan_stacked,
], ids=lambda m: m.__name__.rsplit('.', 1)[-1])
def test_flax_examples_learn(example):
  result = example.main(['--quick'])
  assert result['train_acc'] > 6 * CHANCE, result
  assert result['test_acc'] > 6 * CHANCE, result
  if example is nnx_scan_stacked:
    steps = result['block_steps']
    # With stacked_layer_axes every block moves by eta = 0.01 ...
    np.testing.assert_allclose(steps['stacked'], 0.01, atol=1e-4)
    # ... without, the blocks' steps spread around it.
    assert np.ptp(steps['one layer']) > 1e-3, steps


def test_checkpointing_example_resumes_bit_for_bit(tmp_path):
  ckpt_dir = tmp_path / 'ckpt'
  results = checkpointing.main(['--quick', '--ckpt-dir', str(ckpt_dir)])
  # --quick: 8 epochs, a checkpoint every 3, interrupted after 5.
  assert results['resumed_from'] == 3
  assert results['checkpoints'] == [3, 6]
  assert sorted(p.name for p in ckpt_dir.iterdir()) == ['3', '6']
  assert results['params_equal']
  assert results['opt_state_equal']
  assert results['train_acc'] > 0.9
  assert results['test_acc'] > 0.85


def test_checkpointing_example_refuses_a_used_directory(tmp_path):
  (tmp_path / 'old').mkdir()
  with pytest.raises(SystemExit):
    checkpointing.main(['--quick', '--ckpt-dir', str(tmp_path)])


def test_checkpointing_example_without_a_directory_leaves_nothing_behind(
    tmp_path, monkeypatch
):
  monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path))
  results = checkpointing.main(['--quick'])
  assert results['ckpt_dir'].startswith(str(tmp_path))
  assert results['checkpoints'] == [3, 6]
  assert list(tmp_path.iterdir()) == []


def test_data_parallel_example_learns_on_4_devices_it_forces_itself():
  # Run as a module, the example forces its CPU devices before JAX starts.
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  proc = subprocess.run(
      [sys.executable, '-m', 'fromage_jax.examples.data_parallel', '--quick'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
      check=False,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  devices, = map(int, re.findall(r'^(\d+) devices', proc.stdout, re.M))
  accuracy = float(re.findall(r'test accuracy (\d\.\d+)', proc.stdout)[-1])
  assert devices == 4
  assert accuracy > 0.9
