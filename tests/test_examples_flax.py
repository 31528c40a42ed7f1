"""The Flax examples run (`main(['--quick'])`, a few seconds each) and learn.

Digits has 10 balanced classes: chance is about 0.1 accuracy.
"""

import numpy as np
import pytest

from fromage_jax.examples import linen_mlp_digits
from fromage_jax.examples import nnx_cnn_digits
from fromage_jax.examples import nnx_scan_stacked

CHANCE = 0.1


@pytest.mark.parametrize('example', [
    nnx_cnn_digits, linen_mlp_digits, nnx_scan_stacked,
], ids=lambda m: m.__name__.rsplit('.', 1)[-1])
def test_quick_run_learns(example, capsys):
  result = example.main(['--quick'])
  out = capsys.readouterr().out
  assert 'test accuracy' in out
  assert result['train_acc'] > 6 * CHANCE, result
  assert result['test_acc'] > 6 * CHANCE, result
  if example is nnx_scan_stacked:
    steps = result['block_steps']
    # With stacked_layer_axes every block moves by eta = 0.01 ...
    np.testing.assert_allclose(steps['stacked'], 0.01, atol=1e-4)
    # ... without, the blocks' steps spread around it.
    assert np.ptp(steps['one layer']) > 1e-3, steps
