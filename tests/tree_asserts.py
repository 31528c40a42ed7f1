"""Tree comparisons shared by the test files."""

import chex
import jax
import numpy as np
import optax


def assert_close(actual, expected, rtol=2e-5, atol=2e-6):
  """Same structure, and every leaf close in float64."""
  chex.assert_trees_all_equal_structs(
      jax.tree.map(np.asarray, actual), jax.tree.map(np.asarray, expected)
  )
  jax.tree.map(
      lambda a, e: np.testing.assert_allclose(
          np.asarray(a, np.float64), np.asarray(e, np.float64),
          rtol=rtol, atol=atol,
      ),
      actual, expected,
  )


def tree_dist(a, b) -> float:
  """Global L2 distance between two trees."""
  return float(optax.tree.norm(jax.tree.map(lambda x, y: x - y, a, b)))
