"""What the test modules share: the optimizer table, the trees it is tested
on, closeness checks, and the few JAX APIs that moved between releases."""

from collections.abc import Callable
import dataclasses
import json
import os
import pathlib
import subprocess
import sys
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

import fromage_jax as fj
from fromage_jax import testing

ROOT = pathlib.Path(__file__).resolve().parents[1]  # the repository

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
  differentiable hyperparameter (a learning rate, `p_bound` or `scale`;
  `None` if it has none), and `layout` its `layer_axes` and `axis_name`
  where it takes them (`per_layer`). `descends` says whether it is an
  optimizer on its own (its steps lower a loss), not one step of one.
  """

  make: Callable[..., optax.GradientTransformation]
  entry_point: str
  hyper: float | None = 0.05
  per_layer: bool = True
  descends: bool = False

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
    'fromage': Optimizer(fj.fromage, 'fromage', descends=True),
    'fromage_p_bound': Optimizer(
        lambda lr, **layout: fj.fromage(lr, p_bound=P_BOUND, **layout),
        'fromage', descends=True),
    'fromage_on_plateau': Optimizer(
        lambda lr, **layout: fj.fromage_on_plateau(lr, patience=1, **layout),
        'fromage_on_plateau', descends=True),
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
    'chain_of_transforms': Optimizer(
        _chain, 'scale_by_frobenius_ratio', descends=True),
}
DESCENDING = tuple(n for n, opt in OPTIMIZERS.items() if opt.descends)


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


def normal(seed, shape, dtype=jnp.float32):
  """Standard normal draws (NumPy's: eager jax.random would compile a kernel
  for every new shape)."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape),
                     dtype)


def mixed_case(dtype=jnp.float32) -> Case:
  """Separate layers, small (< 4,096 elements) and large, one of them a
  zero-initialised bias and one without gradient, beside stacks of layers on
  axis 0 (as `nnx.scan` makes them) with one zero-initialised slice and one
  slice without gradient: every kind of layer in one tree."""
  params = {
      'small': normal(0, (8, 6), dtype),
      'large': normal(1, (72, 64), dtype) / 8,  # 4,608 elements
      'bias': jnp.zeros((6,), dtype),
      'frozen': normal(2, (4, 4), dtype),
      'stack': {'small': normal(3, (3, 8, 6), dtype),
                'large': normal(5, (2, 72, 64), dtype) / 8,
                'bias': normal(4, (3, 6), dtype).at[1].set(0)},
  }
  zeros = jax.tree.map(jnp.zeros_like, params)
  zero_init = jax.tree.map(lambda x: x, zeros)
  zero_init['bias'] = jnp.ones((6,), dtype)
  zero_init['stack']['bias'] = zeros['stack']['bias'].at[1].set(1)
  zero_grad = jax.tree.map(lambda x: x, zeros)
  zero_grad['frozen'] = jnp.ones((4, 4), dtype)
  zero_grad['stack']['small'] = zeros['stack']['small'].at[2].set(1)
  return Case(params=params, layer_axes=fj.stacked_layer_axes('stack'),
              zero_init=zero_init, zero_grad=zero_grad)


# One tree holds every kind of layer, so that each test runs once per
# optimizer.
CASES = {'mixed': mixed_case}


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


def assert_trees_close_to_scale(got, want, rtol, what=''):
  """Each leaf within `rtol` times the leaf's largest |entry|: for updates,
  whose float32 roundings are of O(|W|) values, not of each entry."""
  chex.assert_trees_all_equal_structs(got, want)
  for (path, w), g in zip(jax.tree_util.tree_flatten_with_path(want)[0],
                          jax.tree.leaves(got), strict=True):
    w, g = np.asarray(w), np.asarray(g)
    assert g.shape == w.shape, (what, jax.tree_util.keystr(path))
    scale = max(float(np.max(np.abs(w), initial=0.0)), 1e-30)
    err = float(np.max(np.abs(g - w), initial=0.0))
    assert err <= rtol * scale, (
        f'{what} {jax.tree_util.keystr(path)}: err {err:.3g} > {rtol} * '
        f'{scale:.3g}')


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


# ------------------------------------------------ optax's toy problems ---
# As optax's own alias tests solve them (optax/_src/alias_test.py).


def parabola():
  initial = jnp.array([-1.0, 10.0, 1.0])
  final = jnp.array([1.0, -1.0, 1.0])
  return initial, final, lambda p: jnp.sum(jnp.square(p - final))


def rosenbrock():
  a, b = 1.0, 100.0
  initial = jnp.array([0.0, 0.0])
  final = jnp.array([a, a**2])
  return initial, final, lambda p: (a - p[0]) ** 2 + b * (p[1] - p[0] ** 2) ** 2


def optimize(opt, target, n, with_value=False, dtype=jnp.float32) -> float:
  """`n` steps of `opt` on `target`; the largest error left, in float32."""
  initial, final, objective = target()
  initial = initial.astype(dtype)

  def body(carry, _):
    p, s = carry
    v, g = jax.value_and_grad(objective)(p)
    kw = {'value': v} if with_value else {}
    u, s = opt.update(g, s, p, **kw)
    return (optax.apply_updates(p, u), s), None

  run = jax.jit(lambda p, s: jax.lax.scan(body, (p, s), None, length=n)[0])
  p, _ = run(initial, opt.init(initial))
  return float(jnp.max(jnp.abs(p.astype(jnp.float32) - final)))


# ------------------------------------- against the float64 oracle ---
# `fromage_jax.testing` computes the SPEC's update in NumPy float64.


def reference_params(rng, dtype=np.float32):
  """A small tree with the SPEC's edge cases, as NumPy arrays.

  'dense/b' is zero-initialised; 'frozen' always gets a zero gradient
  (`reference_grads`); 'stack' is a [L, d_in, d_out] stack of 3 layers
  (`STACK_PREFIX`) whose slice 1 starts at 0.
  """
  stack = draw(rng, (3, 4, 2), dtype)
  stack[1] = 0
  return {
      'dense': {'w': draw(rng, (4, 3), dtype), 'b': np.zeros(3, dtype)},
      'frozen': draw(rng, (5,), dtype),
      'stack': stack,
  }


STACK_PREFIX = {'dense': None, 'frozen': None, 'stack': (0,)}


def draw(rng, shape, dtype=np.float32):
  """A NumPy standard normal array of `dtype`, complex ones too."""
  if np.issubdtype(dtype, np.complexfloating):
    return (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(dtype)
  return rng.normal(size=shape).astype(dtype)


def reference_grads(rng, params, pull=0.0):
  """Random gradients; zero on 'frozen' and on slice 2 of 'stack'.

  `pull` adds `-pull * params`, so that the steps grow the norms (for
  `p_bound`).
  """
  def g(w):
    return (draw(rng, w.shape, w.dtype) - pull * np.asarray(w)).astype(
        w.dtype)

  grads = jax.tree.map(g, params)
  grads['frozen'] = np.zeros_like(params['frozen'])
  grads['stack'][2] = 0
  return grads


# float32: each step's arithmetic is a handful of roundings of O(|W|) values
# (eps 6e-8), so one step from identical inputs agrees to ~1e-6 of the
# layer's scale; 1e-5 leaves room and still sees any error of order eta**2.
STEP_RTOL = 1e-5
# After 50 steps the float32 and float64 trajectories drift apart by the
# accumulated per-step roundings (50 * ~1e-6), not more: Fromage's step only
# depends on directions and norms, it does not amplify errors.
TRAJ_RTOL = 2e-4


def run_against_reference(
    opt, params0, eta_fn, *, seed=0, steps=50, p_bound=None,
    layer_axes=None, pull=0.0, step_rtol=STEP_RTOL, traj_rtol=TRAJ_RTOL,
):
  """Runs `opt` (jitted) and `fromage_jax.testing` on the same gradients.

  Checks every step from the same params (`step_rtol`), and the two
  independent trajectories at the end (`traj_rtol`). Gradients are drawn
  from the jax trajectory's params (for `pull`) and fed to both.

  Returns:
    The number of layer-steps the reference clipped.
  """
  rng = np.random.default_rng(seed)
  opt_state = opt.init(jax.tree.map(jnp.asarray, params0))
  init_norms = testing.layer_norms(params0, layer_axes)

  @jax.jit
  def step(params, state, grads):
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, updates

  params = jax.tree.map(jnp.asarray, params0)
  ref_params = params0
  clipped = 0
  for t in range(steps):
    as_np = jax.tree.map(np.asarray, params)
    grads = reference_grads(rng, as_np, pull)
    eta = eta_fn(t)
    new_params, opt_state, updates = step(params, opt_state, grads)
    chex.assert_trees_all_equal_shapes_and_dtypes(updates, params)
    want, n = testing.fromage_step(
        as_np, grads, eta, p_bound=p_bound, init_norms=init_norms,
        layer_axes=layer_axes, return_num_clipped=True,
    )
    clipped += n
    assert_trees_close_to_scale(new_params, want, step_rtol, f'step {t}')
    ref_params = testing.fromage_step(
        ref_params, grads, eta, p_bound=p_bound, init_norms=init_norms,
        layer_axes=layer_axes,
    )
    params = new_params
  assert_trees_close_to_scale(params, ref_params, traj_rtol,
                              f'after {steps} steps')
  return clipped


def to_numpy(tree):
  return jax.tree.map(np.asarray, tree)


def linear_eta(t, init=0.2, end=0.01, steps=40):
  """optax.linear_schedule(init, end, steps), written out independently."""
  return init + (end - init) * min(t, steps) / steps


# --------------------------------------------- a classifier to train ---


def init_mlp(key, sizes):
  """He-initialised kernels; small random biases (so none has norm 0)."""
  params = []
  for k, d_in, d_out in zip(jax.random.split(key, len(sizes) - 1), sizes[:-1],
                            sizes[1:], strict=True):
    kw, kb = jax.random.split(k)
    params.append({
        'w': jax.random.normal(kw, (d_in, d_out)) * np.sqrt(2.0 / d_in),
        'b': 0.1 * jax.random.normal(kb, (d_out,)),
    })
  return params


def mlp_loss(params, x, y):
  """Cross-entropy of a ReLU MLP (`init_mlp`'s params) on labels `y`."""
  for layer in params[:-1]:
    x = jax.nn.relu(x @ layer['w'] + layer['b'])
  logits = x @ params[-1]['w'] + params[-1]['b']
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


# ------------------------------------------------------ scripts and runs ---


def jax_env(cache: pathlib.Path | None = None) -> dict:
  """The environment for a subprocess that imports this checkout; with
  `cache`, a persistent XLA compilation cache there."""
  env = dict(os.environ)
  if cache is not None:
    env['JAX_COMPILATION_CACHE_DIR'] = str(cache)
    env['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  env['PYTHONPATH'] = os.pathsep.join(
      [str(ROOT)] + [p for p in [env.get('PYTHONPATH')] if p])
  return env


def run_quick(name: str, out: pathlib.Path, cache: pathlib.Path) -> dict:
  """Runs `benchmarks.paper.<name> --quick` into `out` with XLA cache
  `cache`; checks that it wrote a figure; returns its JSON."""
  argv = ['--quick', '--out', str(out), '--json', str(out / f'{name}.json')]
  # Imported, not `-m`: functions defined in `__main__` would get other XLA
  # cache keys than the same functions imported by another script.
  code = f'from benchmarks.paper import {name}; {name}.main({argv!r})'
  proc = subprocess.run(
      [sys.executable, '-c', code], cwd=ROOT, env=jax_env(cache),
      capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (out / f'{name}.png').stat().st_size > 10_000
  return json.loads((out / f'{name}.json').read_text())
