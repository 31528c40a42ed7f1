"""Optimizer step time, compile time and memory: fromage_jax against optax.

A jitted, buffer-donated step (`update` + `optax.apply_updates`) of each
optimizer on four parameter trees, all in one process, the runs interleaved
round by round in a shuffled order, a few steps of each in a row. Times are
medians over the timed rounds; ratios are medians of the ratios within each
round, with their quartiles.

    python -m benchmarks.step_time [--rounds 15] [--scale 1.0] [--out PATH]
        [--trees NAME ...] [--steps-per-round 3] [--compile-repeats 3]
        [--no-lm]

`--scale` shrinks the trees (a test runs `--scale 0.001 --rounds 2`).
"""

import argparse
import math
import os
import platform
import random
import re
import statistics
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fromage_jax

# --------------------------------------------------------------------------
# Parameter trees (shapes only; values are made on the device).


def gpt2_small_shapes(scale: float = 1.0) -> dict:
  """GPT-2 small: 124M params in 148 leaves (embeddings, 12 blocks, ln_f)."""
  d = max(8, int(768 * scale**0.5) // 8 * 8)
  vocab = max(64, int(50257 * scale**0.5))
  shapes = {'wte': (vocab, d), 'wpe': (max(16, int(1024 * scale**0.5)), d),
            'ln_f': {'scale': (d,), 'bias': (d,)}}
  for i in range(12):
    shapes[f'h{i}'] = {
        'ln_1': {'scale': (d,), 'bias': (d,)},
        'attn': {'c_attn': {'kernel': (d, 3 * d), 'bias': (3 * d,)},
                 'c_proj': {'kernel': (d, d), 'bias': (d,)}},
        'ln_2': {'scale': (d,), 'bias': (d,)},
        'mlp': {'c_fc': {'kernel': (d, 4 * d), 'bias': (4 * d,)},
                'c_proj': {'kernel': (4 * d, d), 'bias': (d,)}},
    }
  return shapes


def gpt2_scanned_shapes(scale: float = 1.0) -> dict:
  """GPT-2 small with its 12 blocks stacked on a leading axis, as `nnx.scan`
  or `nn.scan` makes them: 16 leaves, 148 layers."""
  shapes = gpt2_small_shapes(scale)
  blocks = [shapes.pop(f'h{i}') for i in range(12)]
  shapes['blocks'] = jax.tree.map(lambda s: (len(blocks), *s), blocks[0],
                                  is_leaf=lambda x: isinstance(x, tuple))
  return shapes


def resnet50_shapes(scale: float = 1.0) -> dict:
  """ResNet-50 as in Keras: 25.6M params in 214 leaves.

  Every convolution has a kernel and a bias and is followed by batch norm
  (scale and bias); many leaves are small.
  """
  mult = scale**0.5

  def width(c):
    return max(4, int(c * mult))

  def conv_bn(k, c_in, c_out):
    return {'conv': {'kernel': (k, k, c_in, c_out), 'bias': (c_out,)},
            'bn': {'scale': (c_out,), 'bias': (c_out,)}}

  shapes = {'stem': conv_bn(7, 3, width(64))}
  c_in = width(64)
  for stage, (blocks, w) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512),
                                          strict=True)):
    w = width(w)
    for b in range(blocks):
      block = {'a': conv_bn(1, c_in, w), 'b': conv_bn(3, w, w),
               'c': conv_bn(1, w, 4 * w)}
      if b == 0:
        block['shortcut'] = conv_bn(1, c_in, 4 * w)
      shapes[f'stage{stage}_block{b}'] = block
      c_in = 4 * w
  shapes['fc'] = {'kernel': (c_in, 1000), 'bias': (1000,)}
  return shapes


def many_small_shapes(scale: float = 1.0, n: int = 2000) -> dict:
  """`n` small leaves: matrices and vectors of 16 to 4,096 elements.

  Their sides are powers of two from 4 to 64, so the leaves share at most 34
  shapes (all of them at `n=2000`), as the layers of a deep model share
  theirs.
  """
  rng = np.random.default_rng(0)
  n = max(20, int(n * scale**0.5))
  shapes = {}
  for i in range(n):
    rows, cols = (int(x) for x in rng.choice([4, 8, 16, 32, 64], size=2))
    shapes[f'leaf{i:04d}'] = (rows * cols,) if i % 3 == 0 else (rows, cols)
  return shapes


TREES = {
    'GPT-2 small': gpt2_small_shapes,
    'GPT-2 small, scanned blocks': gpt2_scanned_shapes,
    'ResNet-50': resnet50_shapes,
    '2,000 small leaves': many_small_shapes,
}

# `layer_axes` for fromage_jax on trees whose leaves stack layers.
LAYER_AXES = {
    'GPT-2 small, scanned blocks': fromage_jax.stacked_layer_axes('blocks'),
}

# Shown under a tree's heading in the results.
NOTES = {
    'GPT-2 small, scanned blocks': (
        'The same parameters, with the twelve blocks stacked on a leading '
        'axis. fromage_jax is given `layer_axes=(0,)` for them, so its norms '
        'and its update are still those of each block; `optax.fromage` and '
        '`optax.lars` have no such option and treat each stacked leaf as one '
        'layer (a different update, timed for reference).'
    ),
    '2,000 small leaves': (
        'Their 34 shapes repeat, as a deep model\'s layers do. With 2,000 '
        'distinct shapes instead, XLA took over 2.5 minutes to compile one '
        'optimizer\'s step on this CPU, and a process compiling five such '
        'steps aborted in LLVM ("Unable to allocate section memory") after 14 '
        'minutes, its compiled kernels having used up the memory mappings the '
        'OS allows (`vm.max_map_count` 65,530): XLA:CPU compiles a kernel '
        'once per distinct shape.'
    ),
}


def materialise(shapes, seed: int):
  """Random params (scaled like an init) and gradients for a tree of shapes."""
  # NumPy draws: jax.random would compile a kernel for every distinct shape.
  rng = np.random.default_rng(seed)
  is_shape = lambda x: isinstance(x, tuple)  # noqa: E731

  def draw(scale):
    return jax.tree.map(
        lambda s: jnp.asarray(scale * rng.standard_normal(s, np.float32)),
        shapes, is_leaf=is_shape,
    )

  return draw(0.02), draw(1e-3)


# --------------------------------------------------------------------------
# Optimizers.


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
  """Times every optimizer on one tree, interleaved; returns rows by name.

  `loop` as in `compile_step` (the time is divided by it, and compile time,
  kernels and peak memory are those of the loop); `extra` adds optimizers to
  `optimizers()`; compile time is the fastest of `compile_repeats` compiles;
  `layer_axes` goes to fromage_jax's optimizers; each round makes
  `steps_per_round` steps of each optimizer in a row and keeps the median of
  all but the first. Without `loop`, `norms_pass` is timed in the same rounds
  (under `_tree`).
  Each row keeps its per-round `times`, so that ratios can be taken round by
  round (see `paired_ratio`).
  """
  params0, grads = materialise(shapes, seed=0)
  norms_times = []
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
  if not loop:
    calls['norms pass'] = (norms, norms_times)
  # On a CPU a step ran up to a quarter slower right after another
  # optimizer's, so with a fixed order the ratios depended on who came first.
  # Each round runs every step `steps_per_round` times in a row, in an order
  # shuffled per round, and keeps the median of all but the first.
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
  n_layers = count_layers(params0, layer_axes)
  return {
      name: dict(
          step_s=statistics.median(run['times']),
          times=run['times'],
          compile_s=run['compile_s'],
          state_bytes=run['state_bytes'],
          state_bytes_per_layer=run['state_bytes'] / n_layers,
          peak_bytes=run['peak_bytes'],
          kernels=run['kernels'],
      )
      for name, run in runs.items()
  } | {'_tree': dict(
      params=sum(x.size for x in jax.tree.leaves(params0)),
      leaves=len(jax.tree.leaves(params0)), layers=n_layers,
      param_bytes=tree_bytes(params0),
      norms_times=norms_times)}


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


def _ratio_text(times, other_times) -> str:
  median, q1, q3 = paired_ratio(times, other_times)
  return f'{median:.2f} ({q1:.2f}–{q3:.2f})'


# --------------------------------------------------------------------------
# A real training step: forward, backward and update of a Flax NNX language
# model, Fromage against Adam.


def bench_lm(rounds: int, depth: int = 6, width: int = 256, seq: int = 64,
             batch: int = 8, progress=None, loop: int = 0) -> dict:
  """Median time of a jitted, donated train step of the LM, per optimizer.

  `loop` as in `compile_step`: that many steps in one call.
  """
  from flax import nnx

  from benchmarks.paper import tasks

  model = tasks.TransformerLM(depth, width, max(1, width // 64), seq,
                              nnx.Rngs(0))
  graphdef, params = tasks.split_params(model)
  tokens = jnp.asarray(tasks.stdlib_text(batch * (seq + 1))).reshape(
      batch, seq + 1)

  def loss_fn(params, tokens):
    logits = nnx.merge(graphdef, params)(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, tokens[:, 1:]).mean()

  runs = {}
  for name, tx in {'optax.adam': optax.adam(1e-3),
                   'fromage_jax.fromage': fromage_jax.fromage(0.01)}.items():

    def step(params, state, tokens, tx=tx):
      loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state, loss

    if loop:
      def step(params, state, tokens, one=step):
        return jax.lax.fori_loop(
            0, loop, lambda _, c: one(*c[:2], tokens),
            (params, state, jnp.zeros((), jnp.float32)))

    p = jax.tree.map(jnp.copy, params)
    runs[name] = dict(step=jax.jit(step, donate_argnums=(0, 1)), params=p,
                      state=tx.init(p), times=[], losses=[])
  for r in range(2 + rounds):
    for run in runs.values():
      start = time.perf_counter()
      run['params'], run['state'], loss = run['step'](run['params'],
                                                      run['state'], tokens)
      run['losses'].append(float(loss))
      if r >= 2:
        run['times'].append((time.perf_counter() - start) / max(loop, 1))
    if progress:
      progress.update()
  n_params = sum(x.size for x in jax.tree.leaves(params))
  return {name: dict(step_s=statistics.median(run['times']),
                     first_loss=run['losses'][0], last_loss=run['losses'][-1])
          for name, run in runs.items()} | {
              '_model': dict(depth=depth, width=width, seq=seq, batch=batch,
                             params=n_params,
                             leaves=len(jax.tree.leaves(params)))}


def machine() -> str:
  dev = jax.devices()[0]
  if dev.platform == 'cpu':
    cpu = platform.processor() or platform.machine()
    try:
      out = subprocess.run(['lscpu'], capture_output=True, text=True,
                           check=False).stdout
      cpu = next((ln.split(':', 1)[1].strip() for ln in out.splitlines()
                  if ln.startswith('Model name')), cpu)
    except OSError:
      pass
    return f'CPU: {cpu}, {os.cpu_count()} cores'
  return f'{dev.platform.upper()}: {dev.device_kind}'


def markdown(results: dict, rounds: int, wall_s: float, loop: int = 0,
             kernels: bool = False, compile_repeats: int = 1,
             steps_per_round: int = 1) -> str:
  """The results as Markdown; `kernels` adds a column of kernel counts."""
  per_round = (f'rounds of {loop} steps in one call (a `fori_loop`; per-step '
               'time, compile time and kernels are the loop\'s)' if loop
               else 'rounds')
  lines = [
      '# Optimizer step time: fromage_jax against optax',
      '',
      f'Machine: {machine()}; jax {jax.__version__}, optax {optax.__version__}.'
      f' Median of {rounds} interleaved {per_round} after 2 warm-up ones; a '
      'step is `update` + `optax.apply_updates`, jitted with donated params '
      'and state. '
      + (f'Each round makes {steps_per_round} steps of every optimizer in a '
         'row, in an order shuffled per round, and keeps the median of all '
         'but the first (a step right after another optimizer\'s can run '
         'slower). ' if steps_per_round > 1 else
         'Each round times every optimizer, in an order shuffled per round. ')
      + 'A ratio ("x SGD") is the median of the ratios within the rounds, '
      'with their interquartile range in brackets: the rounds of this '
      'machine drift by more than the gaps measured. '
      + (f'Compile time is the fastest of {compile_repeats} compiles. '
         if compile_repeats > 1 else '')
      + 'Peak memory is XLA\'s buffer assignment for one step (arguments + '
      f'outputs - aliased + temporaries). Whole run: {wall_s:.0f} s.',
  ]
  for tree, rows in results.items():
    info = rows['_tree']
    sgd, ofr = rows['optax.sgd'], rows['optax.fromage']
    adam = rows['optax.adam']
    lines += [
        '',
        f'## {tree}: {info["params"] / 1e6:.1f}M params, {info["leaves"]:,} '
        'leaves' + (f' ({info["layers"]} layers)'
                    if info['layers'] != info['leaves'] else ''),
        '',
        *([NOTES[tree], ''] if tree in NOTES else []),
        '| optimizer | step (ms) | x SGD | x optax.fromage | x optax.adam '
        '| compile (s) | compile x Adam | state (bytes) '
        '| state / layer (bytes) | peak (MB) | peak x SGD |'
        + (' kernels |' if kernels else ''),
        '| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: '
        '| ---: |' + (' ---: |' if kernels else ''),
    ]
    for name, r in rows.items():
      if name.startswith('_'):
        continue
      lines.append(
          f'| `{name}` | {r["step_s"] * 1e3:.2f} '
          f'| {_ratio_text(r["times"], sgd["times"])} '
          f'| {paired_ratio(r["times"], ofr["times"])[0]:.2f} '
          f'| {paired_ratio(r["times"], adam["times"])[0]:.2f} '
          f'| {r["compile_s"]:.2f} | {r["compile_s"] / adam["compile_s"]:.2f} '
          f'| {r["state_bytes"]:,} | {r["state_bytes_per_layer"]:.1f} '
          f'| {r["peak_bytes"] / 1e6:.1f} '
          f'| {r["peak_bytes"] / sgd["peak_bytes"]:.3f} |'
          + (f' {r["kernels"]} |' if kernels else '')
      )
    fro = rows['fromage_jax.fromage']['times']
    with_bound = rows['fromage_jax.fromage(p_bound)']['times']
    lines += ['', (
        '`fromage_jax.fromage` with `p_bound` takes '
        f'{_ratio_text(with_bound, fro)}x its time without.')]
    if info['norms_times']:
      norms_ms = statistics.median(info['norms_times']) * 1e3
      floor = [a + b for a, b in zip(sgd['times'], info['norms_times'],
                                     strict=True)]
      lines[-1] += (
          ' A pass of plain `jnp.sum`s that only reads every `W` and `g` for '
          f'their squared norms takes {norms_ms:.2f} ms here, '
          'so SGD\'s step plus that pass, '
          f'{_ratio_text(floor, sgd["times"])}x SGD, is what reading them '
          'twice costs with XLA\'s plain reductions. `fromage_jax.fromage` '
          f'takes {_ratio_text(fro, floor)}x that, and with `p_bound` (a '
          f'third sum, `<W, g>`) {_ratio_text(with_bound, floor)}x.')
  return '\n'.join(lines) + '\n'


def markdown_lm(lm: dict) -> str:
  m = lm['_model']
  adam = lm['optax.adam']['step_s']
  lines = [
      '',
      f'## Real training step: Flax NNX transformer LM ({m["depth"]} layers, '
      f'width {m["width"]}, {m["params"] / 1e6:.1f}M params, {m["leaves"]} '
      f'leaves; batch {m["batch"]} x {m["seq"]} bytes of stdlib source)',
      '',
      'Forward, backward and update, jitted and donated; median over the timed '
      'rounds.',
      '',
      '| optimizer | step (ms) | x Adam | loss: first -> last timed step |',
      '| --- | ---: | ---: | --- |',
  ]
  for name, r in lm.items():
    if not name.startswith('_'):
      lines.append(f'| `{name}` | {r["step_s"] * 1e3:.1f} '
                   f'| {r["step_s"] / adam:.3f} '
                   f'| {r["first_loss"]:.3f} -> {r["last_loss"]:.3f} |')
  return '\n'.join(lines) + '\n'


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--rounds', type=int, default=15)
  parser.add_argument('--scale', type=float, default=1.0)
  parser.add_argument('--steps-per-round', type=int, default=3,
                      help='steps of each optimizer in a row per round; all '
                      'but the first are timed')
  parser.add_argument('--compile-repeats', type=int, default=3,
                      help='compile each step this many times; the fastest '
                      'is reported')
  parser.add_argument('--trees', nargs='*', default=list(TREES))
  parser.add_argument('--no-lm', action='store_true',
                      help='skip the transformer LM step')
  parser.add_argument('--out', default=None,
                      help='write the Markdown table here')
  args = parser.parse_args(argv)
  from tqdm.auto import tqdm  # an "examples" extra

  start = time.perf_counter()
  n_opt = len(optimizers())
  results = {}
  n_bars = len(args.trees) * (n_opt + args.rounds + 2) + (
      0 if args.no_lm else args.rounds + 2)
  with tqdm(total=n_bars,
            desc='step_time') as bar:
    for tree in args.trees:
      bar.set_postfix_str(tree)
      results[tree] = bench_tree(TREES[tree](args.scale), args.rounds,
                                 progress=bar,
                                 compile_repeats=args.compile_repeats,
                                 layer_axes=LAYER_AXES.get(tree),
                                 steps_per_round=args.steps_per_round)
    if not args.no_lm:
      bar.set_postfix_str('transformer LM')
      lm = bench_lm(args.rounds, progress=bar)
  md = markdown(results, args.rounds, time.perf_counter() - start,
                compile_repeats=args.compile_repeats,
                steps_per_round=args.steps_per_round)
  if not args.no_lm:
    md += markdown_lm(lm)
  print(md)
  if args.out:
    os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
    with open(args.out, 'w') as f:
      f.write(md)
  return results


if __name__ == '__main__':
  main()
