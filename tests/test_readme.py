"""The README's Python snippets run and do what they say."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / 'README.md'


def snippets():
  return re.findall(r'```python\n(.*?)```', README.read_text(), re.S)


def test_readme_has_the_two_setup_commands_that_ci_runs():
  text = README.read_text()
  ci = (README.parent / '.ci' / 'run').read_text()
  test_cmd = 'python3 -m pip install -e ".[test]" && python3 -m pytest'
  assert test_cmd in text and test_cmd in ci
  assert ('python3 -m pip install -e ".[examples]" && '
          'python3 -m fromage_jax.demo') in text


def test_plain_optax_quickstart_trains_including_the_zero_bias():
  ns = {}
  exec(snippets()[0], ns)  # noqa: S102
  # The snippet ran 500 steps: compare with the loss at the initial params.
  k1, k2, _ = jax.random.split(jax.random.key(0), 3)
  init = {'w1': jax.random.normal(k1, (8, 32)) / jnp.sqrt(8),
          'b1': jnp.zeros(32),
          'w2': jax.random.normal(k2, (32, 1)) / jnp.sqrt(32)}
  before = float(ns['loss_fn'](init, ns['x'], ns['y']))
  after = float(ns['loss'])
  assert after < 0.5 * before
  assert float(jnp.linalg.norm(ns['params']['b1'])) > 1e-3


def test_nnx_quickstart_trains():
  ns = {}
  exec(snippets()[1], ns)  # noqa: S102
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((128, 64)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, 128))
  losses = [float(ns['train_step'](ns['model'], ns['optimizer'], x, y))
            for _ in range(30)]
  assert losses[-1] < 0.8 * losses[0]
