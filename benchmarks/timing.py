"""The step-time harness: which optimizers, how a step is compiled and timed.

A step is `update` + `optax.apply_updates`, jitted with donated params and
state. `bench_tree` times every optimizer on one tree, interleaved round by
round in a shuffled order; `paired_ratio` compares two of them round by
round.
"""

import math
import random
import re
import statistics
import time

import jax
import jax.numpy as jnp
import optax

from benchmarks import trees
import fromage_jax

CHAIN = 'chain of the public transforms'


def public_chain(learning_rate: float, p_bound: float | None = None,
                 layer_axes=None) -> optax.GradientTransformation:
  """Fromage built by hand from its public transforms: what `fromage()` is
  without `p_bound`, and what its fused update computes with it."""
  clip = () if p_bound is None else (
      fromage_jax.norm_clip_to_init(p_bound, layer_axes=layer_axes),)
  return optax.chain(
      fromage_jax.scale_by_frobenius_ratio(layer_axes=layer_axes),
      optax.scale_by_learning_rate(learning_rate),
      fromage_jax.prefactor_correction(learning_rate), *clip)


def optimizers(extra: dict | None = None, layer_axes=None) -> dict:
  """The optimizers timed on every tree, then `extra` ones."""
  return {
      'optax.sgd': optax.sgd(0.01),
      'optax.adam': optax.adam(1e-3),
      'optax.lars': optax.lars(0.01),
      'optax.fromage': optax.fromage(0.01),
      'fromage_jax.fromage': fromage_jax.fromage(0.01, layer_axes=layer_axes),
      'fromage_jax.fromage(p_bound)': fromage_jax.fromage(
          0.01, p_bound=2.0, layer_axes=layer_axes),
      f'{CHAIN} (p_bound)': public_chain(0.01, 2.0, layer_axes),
  } | (extra or {})


def count_layers(params, layer_axes=None) -> int:
  """Layers in `params` as fromage_jax sees them (one norm per layer)."""
  norms = jax.eval_shape(
      lambda p: fromage_jax.relative_update_norms(p, p, layer_axes=layer_axes),
      params)
  return sum(math.prod(x.shape) for x in jax.tree.leaves(norms))


def tree_bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def compile_step(tx, params, state, grads, loop: int = 0):
  """The jitted, donated step; returns (compiled, seconds to compile).

  With `loop`, one call makes `loop` steps in a `fori_loop`, so that a timing
  sees the device's work without the host's dispatch of every step. Each step
  scales the gradients by its own factor near 1, which fuses into their reads,
  so that XLA cannot hoist their norms out of the loop.
  """

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  def steps(params, state, grads):
    def body(i, carry):
      scale = 1 + 1e-7 * i.astype(jnp.float32)
      return step(*carry, jax.tree.map(lambda g: g * scale, grads))
    return jax.lax.fori_loop(0, loop, body, (params, state))

  start = time.perf_counter()
  compiled = jax.jit(steps if loop else step, donate_argnums=(0, 1)).lower(
      params, state, grads).compile()
  return compiled, time.perf_counter() - start


def peak_bytes(compiled) -> int:
  """Peak device memory of one step, from XLA's buffer assignment."""
  m = compiled.memory_analysis()
  if getattr(m, 'peak_memory_in_bytes', 0):
    return int(m.peak_memory_in_bytes)
  return int(m.argument_size_in_bytes + m.output_size_in_bytes
             - m.alias_size_in_bytes + m.temp_size_in_bytes)


def kernel_count(compiled) -> int:
  """Kernels XLA launches for one step: its fusions and library calls."""
  return len(re.findall(r' (?:fusion|custom-call)\(', compiled.as_text()))


@jax.jit
def norms_pass(params, grads):
  """Every leaf's `||W||**2` and `||g||**2`: the pass Fromage adds to SGD's."""
  return jax.tree.map(lambda w, g: (jnp.sum(w * w), jnp.sum(g * g)), params,
                      grads)


def bench_tree(shapes, rounds: int, warmup: int = 2, progress=None,
               loop: int = 0, extra: dict | None = None,
               compile_repeats: int = 1, layer_axes=None,
               steps_per_round: int = 1) -> dict:
  """Times every optimizer on one tree, interleaved.

  `loop` as in `compile_step` (the time is divided by it, and compile time,
  kernels and peak memory are those of the loop); `extra` adds optimizers to
  `optimizers()`; compile time is the fastest of `compile_repeats` compiles;
  `layer_axes` goes to fromage_jax's optimizers; each round makes
  `steps_per_round` steps of each optimizer in a row and keeps the median of
  all but the first. Without `loop`, `norms_pass` is timed in the same rounds.

  Returns the tree's size (`params`, `leaves`, `layers`, `param_bytes`), the
  norms pass's per-round `norms_times`, and per optimizer its per-round
  `times` (seconds a step), `compile_s`, `state_bytes`, `peak_bytes` and
  `kernels`.
  """
  params0, grads = trees.materialise(shapes, seed=0)
  if not loop:  # compiled and warmed up outside the timed rounds
    jax.block_until_ready(norms_pass(params0, grads))
  runs = {}
  for name, tx in optimizers(extra, layer_axes).items():
    state = tx.init(params0)
    compiled, compile_s = compile_step(tx, params0, state, grads, loop)
    for _ in range(compile_repeats - 1):
      compile_s = min(compile_s, compile_step(tx, params0, state, grads,
                                              loop)[1])
    runs[name] = dict(
        step=compiled, params=jax.tree.map(jnp.copy, params0), state=state,
        times=[], compile_s=compile_s, state_bytes=tree_bytes(state),
        peak_bytes=peak_bytes(compiled), kernels=kernel_count(compiled),
    )
    if progress:
      progress.update()

  def norms():
    jax.block_until_ready(norms_pass(params0, grads))

  def stepper(run):
    def one():
      run['params'], run['state'] = run['step'](run['params'], run['state'],
                                                grads)
      jax.block_until_ready(run['params'])
    return one

  calls = {name: (stepper(run), run['times']) for name, run in runs.items()}
  norms_times = []
  if not loop:
    calls['norms pass'] = (norms, norms_times)
  # On a CPU a step ran up to a quarter slower right after another
  # optimizer's, so with a fixed order the ratios depended on who came first.
  order = list(calls)
  for r in range(warmup + rounds):
    random.Random(r).shuffle(order)
    for name in order:
      call, times = calls[name]
      block = []
      for _ in range(steps_per_round):
        start = time.perf_counter()
        call()
        block.append((time.perf_counter() - start) / max(loop, 1))
      if r >= warmup:
        times.append(statistics.median(block[1:] or block))
    if progress:
      progress.update()
  keep = ('times', 'compile_s', 'state_bytes', 'peak_bytes', 'kernels')
  return dict(
      params=sum(x.size for x in jax.tree.leaves(params0)),
      leaves=len(jax.tree.leaves(params0)),
      layers=count_layers(params0, layer_axes),
      param_bytes=tree_bytes(params0), norms_times=norms_times,
      optimizers={name: {k: run[k] for k in keep}
                  for name, run in runs.items()})


def paired_ratio(times, other_times) -> tuple[float, float, float]:
  """Median and quartiles of `times[i] / other_times[i]` over the rounds.

  Each round runs every optimizer back to back, so the ratio within a round
  cancels most of a noisy machine's drift between rounds.
  """
  ratios = [a / b for a, b in zip(times, other_times, strict=True)]
  if len(ratios) < 2:
    return ratios[0], ratios[0], ratios[0]
  q1, median, q3 = statistics.quantiles(ratios, n=4, method='inclusive')
  return median, q1, q3
