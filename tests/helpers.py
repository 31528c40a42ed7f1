"""What the test modules share: the optimizer table, the trees it is tested
on, closeness checks, and the few JAX APIs that moved between releases."""

from collections.abc import Callable
import dataclasses
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

import fromage_jax as fj

# -------------------------------------------------- JAX across releases ---


def enable_x64(on: bool = True):
  """`jax.enable_x64` (jax >= 0.6.1), or its experimental form before it."""
  if hasattr(jax, 'enable_x64'):
    return jax.enable_x64(on)
  from jax import experimental  # noqa: PLC0415
  return experimental.enable_x64(on)


def shard_map(f, *, mesh, in_specs, out_specs):
  """`jax.shard_map` (jax >= 0.7), or `jax.experimental.shard_map` before."""
  if hasattr(jax, 'shard_map'):
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs)
  from jax.experimental.shard_map import shard_map as old  # noqa: PLC0415
  return old(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs)


# ---------------------------------------------------- the optimizer table ---


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """One public optimizer or transform, as the table tests it.

  `make(hyper, **layout)` builds it (`entry_point`, the public function
  its errors name, is what it calls): `hyper` is the value of its one
  differentiable hyperparameter (a learning rate, or `p_bound` for the clip
  alone; `None` if it has none), and `layout` its `layer_axes` and
  `axis_name` where it takes them (`per_layer`).
  """

  make: Callable[..., optax.GradientTransformation]
  entry_point: str  # the public function its errors name
  hyper: float | None = 0.05
  per_layer: bool = True

  def build(self, layer_axes=None, hyper=None, axis_name=None):
    hyper = self.hyper if hyper is None else hyper
    if not self.per_layer:
      return self.make(hyper)
    return self.make(hyper, layer_axes=layer_axes, axis_name=axis_name)


P_BOUND = 0.9  # below 1: the clip acts from the first step


def _chain(learning_rate, **layout):
  return optax.chain(
      fj.scale_by_frobenius_ratio(**layout),
      optax.scale_by_learning_rate(learning_rate),
      fj.prefactor_correction(learning_rate),
      fj.norm_clip_to_init(P_BOUND, **layout),
  )


OPTIMIZERS = {
    'fromage': Optimizer(fj.fromage, 'fromage'),
    'fromage_p_bound': Optimizer(
        lambda lr, **layout: fj.fromage(lr, p_bound=P_BOUND, **layout),
        'fromage'),
    'fromage_on_plateau': Optimizer(
        lambda lr, **layout: fj.fromage_on_plateau(lr, patience=1, **layout),
        'fromage_on_plateau'),
    'scale_by_frobenius_ratio': Optimizer(
        lambda _, **layout: fj.scale_by_frobenius_ratio(**layout),
        'scale_by_frobenius_ratio', hyper=None),
    'prefactor_correction': Optimizer(
        fj.prefactor_correction, 'prefactor_correction', per_layer=False),
    'norm_clip_to_init': Optimizer(
        fj.norm_clip_to_init, 'norm_clip_to_init', hyper=P_BOUND),
    'norm_project_to_init': Optimizer(
        fj.norm_project_to_init, 'norm_project_to_init', hyper=1.1),
    # The chain's first transform is the first to see its input.
    'chain_of_transforms': Optimizer(_chain, 'scale_by_frobenius_ratio'),
}


def update(tx, grads, state, params):
  """`tx.update`, with the loss value that `fromage_on_plateau` needs."""
  return tx.update(grads, state, params, value=jnp.ones([], jnp.float32))


# -------------------------------------------------------------- the trees ---


@dataclasses.dataclass(frozen=True)
class Case:
  """A tree of params with every kind of layer the transforms treat apart.

  Small (< 4,096 elements) and large layers, a zero-initialised layer, and a
  layer whose loss gradient is zero; `layer_axes` stacks layers or not.
  `zero_init` and `zero_grad` are 0/1 trees like params marking those layers'
  elements: the update is discontinuous there (the zero-norm rule), so
  finite differences perturb only the other elements.
  """

  params: Any
  layer_axes: Any
  zero_init: Any
  zero_grad: Any

  def grads(self, params):
    """A loss gradient: nonzero everywhere but on `zero_grad`'s layers."""
    return jax.grad(loss, argnums=0)(params, self.zero_grad)


def loss(params, zero_grad):
  def leaf(w, mask, c):
    w = w * (1 - mask)
    return jnp.sum((w - c) ** 2) + 0.3 * jnp.sum(jnp.sin(2 * w))
  leaves = jax.tree.leaves(params)
  return sum(leaf(w, m, 0.1 * i - 0.2) for i, (w, m) in enumerate(
      zip(leaves, jax.tree.leaves(zero_grad), strict=True)))


def _normal(seed, shape, dtype):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape),
                     dtype)


def flat_case(dtype=jnp.float32) -> Case:
  params = {
      'small': _normal(0, (8, 6), dtype),
      'large': _normal(1, (72, 64), dtype) / 8,  # 4,608 elements
      'bias': jnp.zeros((6,), dtype),
      'frozen': _normal(2, (4, 4), dtype),
  }
  zeros = jax.tree.map(jnp.zeros_like, params)
  return Case(
      params=params, layer_axes=None,
      zero_init={**zeros, 'bias': jnp.ones((6,), dtype)},
      zero_grad={**zeros, 'frozen': jnp.ones((4, 4), dtype)},
  )


def stacked_case(dtype=jnp.float32) -> Case:
  """Stacks of layers on axis 0 (as `nnx.scan` makes them), one of them
  zero-initialised and one without gradient, beside an unstacked head."""
  small = _normal(3, (3, 8, 6), dtype)
  bias = _normal(4, (3, 6), dtype).at[1].set(0)
  params = {
      'stack': {'small': small, 'large': _normal(5, (2, 72, 64), dtype) / 8,
                'bias': bias},
      'head': _normal(6, (6, 4), dtype),
  }
  zeros = jax.tree.map(jnp.zeros_like, params)
  zero_init = jax.tree.map(lambda x: x, zeros)
  zero_init['stack']['bias'] = zeros['stack']['bias'].at[1].set(1)
  zero_grad = jax.tree.map(lambda x: x, zeros)
  zero_grad['stack']['small'] = zeros['stack']['small'].at[2].set(1)
  return Case(params=params, layer_axes=fj.stacked_layer_axes('stack'),
              zero_init=zero_init, zero_grad=zero_grad)


CASES = {'flat': flat_case, 'stacked': stacked_case}


def random_like(tree, seed: int):
  """Standard normal draws shaped like `tree`'s leaves (NumPy's, so that
  inside a traced function they are constants, not a PRNG to compile)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), tree)


def objective(tree, seed: int = 7):
  """A fixed random linear functional of a tree: a scalar to differentiate."""
  weights = random_like(tree, seed)
  return sum(jnp.sum(w * x) for w, x in zip(
      jax.tree.leaves(weights), jax.tree.leaves(tree), strict=True))


# ---------------------------------------------------------- closeness ---


def assert_trees_close(actual, expected, rtol=2e-5, atol=2e-6):
  """Same structure, shapes and dtypes; every leaf close in float64."""
  chex.assert_trees_all_equal_structs(actual, expected)
  jax.tree.map(
      lambda a, e: np.testing.assert_allclose(
          np.asarray(a, np.float64), np.asarray(e, np.float64),
          rtol=rtol, atol=atol),
      actual, expected)


def tree_dist(a, b) -> float:
  """Global L2 distance between two trees."""
  return float(optax.tree.norm(jax.tree.map(lambda x, y: x - y, a, b)))


def check_against_central_differences(f, x, directions, rtol=1e-6,
                                      jit=True):
  """`jax.grad(f)(x)` (under `jit`, or not) against float64 central
  differences of `f` along each direction (a tree like `x`, scaled to unit
  norm); returns the grad."""
  grad = (jax.jit(jax.grad(f)) if jit else jax.grad(f))(x)
  chex.assert_tree_all_finite(grad)
  h = 1e-6 * max(1.0, float(optax.tree.norm(x)))
  f = jax.jit(f)
  for k, d in enumerate(directions):
    d = optax.tree.scale(1 / float(optax.tree.norm(d)), d)
    numeric = float(f(optax.tree.add_scale(x, h, d))
                    - f(optax.tree.add_scale(x, -h, d))) / (2 * h)
    analytic = float(optax.tree.vdot(grad, d))
    tol = rtol * max(1.0, abs(numeric)) + 1e-9
    assert abs(numeric - analytic) <= tol, (k, numeric, analytic)
  return grad
