"""The example `python -m fromage_jax.examples.checkpointing`, on a short run."""

import tempfile

import pytest

pytest.importorskip('orbax.checkpoint')
pytest.importorskip('sklearn')

from fromage_jax.examples import checkpointing  # noqa: E402


def test_checkpointing_example_resumes_bit_for_bit(tmp_path, capsys):
  ckpt_dir = tmp_path / 'ckpt'
  results = checkpointing.main(['--quick', '--ckpt-dir', str(ckpt_dir)])
  # --quick: 8 epochs, a checkpoint every 3, interrupted after 5.
  assert results['resumed_from'] == 3
  assert results['checkpoints'] == [3, 6]
  assert sorted(p.name for p in ckpt_dir.iterdir()) == ['3', '6']
  assert results['params_equal']
  assert results['opt_state_equal']
  assert 'equal bit for bit' in capsys.readouterr().out
  assert results['train_acc'] > 0.9
  assert results['test_acc'] > 0.85  # chance: 0.1


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
