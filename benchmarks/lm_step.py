"""A real training step: forward, backward and update of a Flax NNX language
model (`benchmarks.paper.tasks.TransformerLM`), Fromage against Adam."""

import time

import jax
import jax.numpy as jnp
import optax

import fromage_jax


def bench_lm(rounds: int, depth: int = 6, width: int = 256, seq: int = 64,
             batch: int = 8, progress=None, loop: int = 0,
             warmup: int = 2) -> dict:
  """Times a jitted, donated train step of the LM per optimizer, the
  optimizers in turn within each round, after `warmup` untimed rounds.

  `loop` as in `benchmarks.timing.compile_step`: that many steps in one call.
  Returns the `model`'s size and, per optimizer, its per-round `times`
  (seconds a step) and the loss of every round's call, warm-up included.
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
  for r in range(warmup + rounds):
    for run in runs.values():
      start = time.perf_counter()
      run['params'], run['state'], loss = run['step'](run['params'],
                                                      run['state'], tokens)
      run['losses'].append(float(loss))
      if r >= warmup:
        run['times'].append((time.perf_counter() - start) / max(loop, 1))
    if progress:
      progress.update()
  return dict(
      model=dict(depth=depth, width=width, seq=seq, batch=batch,
                 params=sum(x.size for x in jax.tree.leaves(params)),
                 leaves=len(jax.tree.leaves(params))),
      optimizers={name: dict(times=run['times'], losses=run['losses'])
                  for name, run in runs.items()})
