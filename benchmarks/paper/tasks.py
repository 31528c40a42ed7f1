"""The four tasks of the learning-rate sweep (`benchmarks.paper.sensitivity`).

Each task is a Flax NNX model (or two, for the GAN) on data that ships
offline, reduced to pure functions of parameter pytrees so that one compiled
call can train every learning rate and seed at once under `jax.vmap`:

- `classifier`: a small CNN on scikit-learn's digits; figure: cross-entropy.
- `gan`: an MLP GAN on the digits; figure: the Frechet distance (FID) in the
  feature space of a digits classifier trained here.
- `lm`: a byte-level transformer language model on the Python standard
  library's own source files; figure: perplexity.
- `autoencoder`: an MLP autoencoder on the digits; figure: mean squared error.

Every task reports a training figure and a held-out one (the digits' 20%
test split, or text from files the LM never trained on); lower is better.
"""

from collections.abc import Callable
import dataclasses
import glob
import os
import sysconfig
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks.paper import _common

# --------------------------------------------------------------------------
# The task interface.


@dataclasses.dataclass(frozen=True)
class Task:
  """A model, its data and its figures, as pure functions.

  Attributes:
    name: short name (`classifier`, `gan`, `lm`, `autoencoder`).
    title: a few words for tables and plots.
    metric: the name of the figure of merit (lower is better).
    groups: the parameter groups, each trained by its own optimizer instance,
      updated in this order within a step (the GAN's discriminator, then its
      generator); the params are a dict `{group: nnx.State}`.
    init: `seed -> params`.
    data: arrays the functions below read (passed to jit as arguments).
    steps_per_epoch: optimizer steps in one epoch.
    batches: `(numpy Generator, epochs) -> pytree` of per-step inputs, each
      leaf shaped `[epochs, steps_per_epoch, ...]`.
    loss: `(group, params, data, batch) -> scalar`, the loss `group`'s
      optimizer minimises on one step's `batch`.
    evaluate: `(params, data) -> dict` of the `train` and `test` figures
      (and extras), inside jit after training.
    settings: the sizes, in words, for the results file.
    plateau_signal: `(params, data) -> scalar` measured after every epoch,
      on which the learning rate decays, for a task whose losses do not
      settle (the GAN); `None`: the epoch-mean training loss.
  """

  name: str
  title: str
  metric: str
  groups: tuple[str, ...]
  init: Callable[[int], dict]
  data: dict
  steps_per_epoch: int
  batches: Callable[[np.random.Generator, int], Any]
  loss: Callable[..., jax.Array]
  evaluate: Callable[..., dict]
  settings: str
  plateau_signal: Callable[..., jax.Array] | None = None


def split_params(model: nnx.Module):
  """`(graphdef, params)`; fails if the model holds anything but `nnx.Param`s
  (no batch statistics or RNG state: the tasks are pure functions)."""
  return nnx.split(model, nnx.Param)


def _minibatch_indices(rng, epochs, n, batch_size):
  """`[epochs, n // batch_size, batch_size]` shuffled example indices: one
  permutation of the `n` examples an epoch, its remainder dropped."""
  steps = n // batch_size
  return np.stack([
      rng.permutation(n)[: steps * batch_size].reshape(steps, batch_size)
      for _ in range(epochs)
  ]).astype(np.int32)


def _shuffled_epochs(n: int, batch_size: int) -> dict:
  """A task's `steps_per_epoch` and `batches` for epochs over `n` examples."""
  return dict(steps_per_epoch=n // batch_size,
              batches=lambda rng, epochs: _minibatch_indices(rng, epochs, n,
                                                             batch_size))


# --------------------------------------------------------------------------
# Models.


class CNN(nnx.Module):
  """Two 3x3 convolutions (the second with stride 2) and a linear head."""

  def __init__(self, width: int, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, width, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(width, 2 * width, (3, 3), strides=2, rngs=rngs)
    self.head = nnx.Linear(4 * 4 * 2 * width, 10, rngs=rngs)

  def __call__(self, x):
    x = x.reshape(-1, 8, 8, 1)
    x = nnx.relu(self.conv1(x))
    x = nnx.relu(self.conv2(x))
    return self.head(x.reshape(x.shape[0], -1))


class MLP(nnx.Module):
  """Linear layers of the given sizes with `act` between them."""

  def __init__(self, sizes, rngs: nnx.Rngs, act=nnx.relu):
    self.layers = nnx.List([
        nnx.Linear(a, b, rngs=rngs)
        for a, b in zip(sizes[:-1], sizes[1:], strict=True)
    ])
    self.act = act

  def features(self, x):
    """The activations after the last hidden layer."""
    for layer in self.layers[:-1]:
      x = self.act(layer(x))
    return x

  def __call__(self, x):
    return self.layers[-1](self.features(x))


class Block(nnx.Module):
  """A pre-norm transformer block: causal self-attention, then an MLP."""

  def __init__(self, width: int, heads: int, rngs: nnx.Rngs):
    self.ln1 = nnx.LayerNorm(width, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(num_heads=heads, in_features=width,
                                       decode=False, rngs=rngs)
    self.ln2 = nnx.LayerNorm(width, rngs=rngs)
    self.fc = nnx.Linear(width, 4 * width, rngs=rngs)
    self.out = nnx.Linear(4 * width, width, rngs=rngs)

  def __call__(self, x, mask):
    x = x + self.attn(self.ln1(x), mask=mask)
    return x + self.out(jax.nn.gelu(self.fc(self.ln2(x))))


class TransformerLM(nnx.Module):
  """A byte-level (256-token) transformer language model."""

  def __init__(self, depth: int, width: int, heads: int, seq: int,
               rngs: nnx.Rngs):
    self.embed = nnx.Embed(256, width, rngs=rngs)
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(),
                                                  (seq, width)))
    self.blocks = nnx.List([Block(width, heads, rngs) for _ in range(depth)])
    self.ln = nnx.LayerNorm(width, rngs=rngs)
    self.head = nnx.Linear(width, 256, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens) + self.pos[: tokens.shape[1]]
    mask = nnx.make_causal_mask(tokens)
    for block in self.blocks:
      x = block(x, mask)
    return self.head(self.ln(x))


def cross_entropy(logits, labels):
  """Per-example cross-entropy, accurate where it is far below float32's eps.

  `softplus(logsumexp_{j != y} (z_j - z_y))` equals `logsumexp(z) - z_y`, but
  the usual form rounds to exactly 0 once the margin exceeds about 17, which
  a classifier's training loss soon does; this one stays accurate to about
  a margin of 87 (float32's smallest normal number).
  """
  picked = jnp.take_along_axis(logits, labels[..., None], axis=-1)
  others = jnp.where(jax.nn.one_hot(labels, logits.shape[-1], dtype=bool),
                     -jnp.inf, logits - picked)
  return jax.nn.softplus(jax.nn.logsumexp(others, axis=-1))


# --------------------------------------------------------------------------
# Data.


def digits(scale: str):
  """The digits' fixed 80/20 split (seed 0), pixels scaled to [0, 1] or
  [-1, 1] (`scale='tanh'`)."""
  x_tr, y_tr, x_te, y_te = _common.digits_split()
  if scale == 'tanh':
    x_tr, x_te = 2 * x_tr - 1, 2 * x_te - 1
  return (jnp.asarray(x_tr), jnp.asarray(y_tr), jnp.asarray(x_te),
          jnp.asarray(y_te))


def stdlib_text(n: int) -> np.ndarray:
  """The first `n` bytes of the standard library's `*.py` files, by name."""
  chunks, size = [], 0
  for path in sorted(glob.glob(os.path.join(sysconfig.get_path('stdlib'),
                                            '*.py'))):
    with open(path, 'rb') as f:
      chunks.append(f.read())
    size += len(chunks[-1])
    if size >= n:
      break
  data = b''.join(chunks)[:n]
  if len(data) < n:
    raise RuntimeError(f'the standard library holds only {len(data)} bytes of '
                       f'*.py source; {n} were asked for')
  return np.frombuffer(data, dtype=np.uint8).astype(np.int32)


# --------------------------------------------------------------------------
# The tasks.


def _digits_classifier(make, *, name: str, title: str, arch: str,
                       batch_size: int) -> Task:
  """The model `make(rngs)` as a digits classifier; the figure is the
  cross-entropy."""
  x_tr, y_tr, x_te, y_te = digits('unit')
  graphdef, _ = split_params(make(nnx.Rngs(0)))

  def init(seed):
    return {'model': split_params(make(nnx.Rngs(seed)))[1]}

  def logits(params, x):
    return nnx.merge(graphdef, params['model'])(x)

  def xent(params, x, y):
    return cross_entropy(logits(params, x), y).mean()

  def loss(group, params, data, batch):
    del group
    return xent(params, data['x_tr'][batch], data['y_tr'][batch])

  def evaluate(params, data):
    out = {}
    for split, key in (('tr', 'train'), ('te', 'test')):
      x, y = data[f'x_{split}'], data[f'y_{split}']
      out[key] = xent(params, x, y)
      out[f'{key}_error'] = jnp.mean(jnp.argmax(logits(params, x), -1) != y)
    return out

  n = x_tr.shape[0]
  return Task(
      name=name, title=title, metric='cross-entropy', groups=('model',),
      init=init, data=dict(x_tr=x_tr, y_tr=y_tr, x_te=x_te, y_te=y_te),
      **_shuffled_epochs(n, batch_size), loss=loss, evaluate=evaluate,
      settings=(f'{arch}; {n} training / {x_te.shape[0]} held-out digits, '
                f'pixels in [0, 1], batch {batch_size}'),
  )


def classifier(*, width: int = 16, batch_size: int = 64) -> Task:
  """A small CNN on the digits; the figure is the cross-entropy."""
  return _digits_classifier(
      lambda rngs: CNN(width, rngs), name='classifier',
      title='CNN classifier (digits)', batch_size=batch_size,
      arch=(f'conv 3x3 x{width} -> conv 3x3 stride 2 x{2 * width} -> '
            'linear, ReLU'))


def mlp_classifier(*, width: int = 256, depth: int = 4,
                   batch_size: int = 64) -> Task:
  """The demo's model: a ReLU MLP with zero-initialised biases on the
  digits; the figure is the cross-entropy."""
  sizes = (64, *[width] * (depth - 1), 10)
  return _digits_classifier(
      lambda rngs: MLP(sizes, rngs), name='mlp',
      title="the demo's MLP (digits)", batch_size=batch_size,
      arch=f'MLP {"-".join(map(str, sizes))}, ReLU, zero-initialised biases')


def autoencoder(*, width: int = 128, code: int = 16,
                batch_size: int = 64) -> Task:
  """An MLP autoencoder on the digits; the figure is the squared error."""
  x_tr, _, x_te, _ = digits('unit')
  sizes = (64, width, code, width, 64)
  graphdef, _ = split_params(MLP(sizes, nnx.Rngs(0)))

  def init(seed):
    return {'model': split_params(MLP(sizes, nnx.Rngs(seed)))[1]}

  def mse(params, x):
    recon = jax.nn.sigmoid(nnx.merge(graphdef, params['model'])(x))
    return jnp.mean(jnp.square(recon - x))

  def loss(group, params, data, batch):
    del group
    return mse(params, data['x_tr'][batch])

  def evaluate(params, data):
    return dict(train=mse(params, data['x_tr']),
                test=mse(params, data['x_te']))

  n = x_tr.shape[0]
  return Task(
      name='autoencoder', title='MLP autoencoder (digits)',
      metric='squared error', groups=('model',), init=init,
      data=dict(x_tr=x_tr, x_te=x_te), **_shuffled_epochs(n, batch_size),
      loss=loss, evaluate=evaluate,
      settings=(f'MLP {"-".join(map(str, sizes))}, ReLU, sigmoid output; '
                f'mean squared error on pixels in [0, 1]; {n} training / '
                f'{x_te.shape[0]} held-out digits, batch {batch_size}'),
  )


def lm(*, depth: int = 2, width: int = 64, heads: int = 4,
       seq: int = 64, batch_size: int = 16, steps_per_epoch: int = 50,
       train_bytes: int = 1_000_000, test_bytes: int = 100_000,
       eval_windows: int = 256) -> Task:
  """A byte-level transformer LM on stdlib source; the figure is perplexity.

  Training windows start at random offsets of the first `train_bytes`; the
  held-out text is the next `test_bytes` (other files). Both figures are
  measured on `eval_windows` fixed, non-overlapping windows.
  """
  text = stdlib_text(train_bytes + test_bytes)
  train, test = text[:train_bytes], text[train_bytes:]

  def windows(t):
    n = min(eval_windows, len(t) // (seq + 1))
    return jnp.asarray(t[: n * (seq + 1)].reshape(n, seq + 1))

  def new_model(seed):
    return TransformerLM(depth, width, heads, seq, nnx.Rngs(seed))

  graphdef, _ = split_params(new_model(0))

  def xent(params, tokens):
    logits = nnx.merge(graphdef, params['model'])(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, tokens[:, 1:]).mean()

  def loss(group, params, data, batch):
    del group
    return xent(params, data['text'][batch[:, None] + jnp.arange(seq + 1)])

  def evaluate(params, data):
    return dict(train=jnp.exp(xent(params, data['eval_tr'])),
                test=jnp.exp(xent(params, data['eval_te'])))

  def batches(rng, epochs):
    return rng.integers(0, train_bytes - seq - 1,
                        size=(epochs, steps_per_epoch, batch_size),
                        dtype=np.int32)

  return Task(
      name='lm', title='transformer LM (stdlib source)', metric='perplexity',
      groups=('model',), init=lambda seed: {'model':
                                            split_params(new_model(seed))[1]},
      data=dict(text=jnp.asarray(train), eval_tr=windows(train),
                eval_te=windows(test)),
      steps_per_epoch=steps_per_epoch, batches=batches, loss=loss,
      evaluate=evaluate,
      settings=(f'{depth} pre-norm blocks, width {width}, {heads} heads, '
                f'context {seq} bytes; trained on {train_bytes:,} bytes of '
                f'stdlib *.py source, held out the next {test_bytes:,}; '
                f'batch {batch_size} random windows, {steps_per_epoch} steps '
                f'an "epoch"; perplexity (e^cross-entropy per byte) on '
                f'{eval_windows} fixed windows of each'),
  )


def feature_stats(features):
  """Mean and covariance (`ddof=1`) of `[n, d]` features."""
  mu = features.mean(0)
  centred = features - mu
  return mu, centred.T @ centred / (features.shape[0] - 1)


def frechet_reference(features) -> dict:
  """What `frechet_distance` needs of the reference set: its features' mean,
  the square root of their covariance, and its trace."""
  mu, cov = feature_stats(features)
  w, v = jnp.linalg.eigh(cov)
  return dict(mu=mu, root=(v * jnp.sqrt(jnp.clip(w, 0))) @ v.T,
              trace=jnp.trace(cov))


def frechet_distance(mu, cov, ref: dict) -> jax.Array:
  """`||mu - mu_r||^2 + Tr(cov + cov_r - 2 (cov cov_r)^(1/2))`.

  `Tr (cov cov_r)^(1/2)` is the sum of the square roots of the eigenvalues of
  the symmetric `cov_r^(1/2) cov cov_r^(1/2)`, which has the same ones.
  """
  m = ref['root'] @ cov @ ref['root']
  ev = jnp.linalg.eigvalsh((m + m.T) / 2)
  return (jnp.sum(jnp.square(mu - ref['mu'])) + jnp.trace(cov) + ref['trace']
          - 2 * jnp.sum(jnp.sqrt(jnp.clip(ev, 0))))


def train_feature_classifier(x_tr, y_tr, x_te, y_te, *, width=128, feat=64,
                             epochs=60, batch_size=64, seed=0):
  """The FID's feature network: an MLP digits classifier, trained with Adam.

  Returns `(features_fn, test accuracy)`; the features are the 64 ReLU
  activations before the classifier's head.
  """
  model = MLP((64, width, feat, 10), nnx.Rngs(seed))
  graphdef, params = split_params(model)
  tx = optax.adam(1e-3)

  def loss_fn(p, idx):
    logits = nnx.merge(graphdef, p)(x_tr[idx])
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, y_tr[idx]).mean()

  @jax.jit
  def fit(p, batches):
    def step(carry, idx):
      p, s = carry
      grads = jax.grad(loss_fn)(p, idx)
      updates, s = tx.update(grads, s, p)
      return (optax.apply_updates(p, updates), s), None
    (p, _), _ = jax.lax.scan(step, (p, tx.init(p)), batches)
    return p

  idx = _minibatch_indices(np.random.default_rng(seed), epochs,
                           x_tr.shape[0], batch_size)
  params = fit(params, jnp.asarray(idx.reshape(-1, batch_size)))
  net = nnx.merge(graphdef, params)
  acc = float(jnp.mean(jnp.argmax(net(x_te), -1) == y_te))
  return (lambda x: nnx.merge(graphdef, params).features(x)), acc


def gan(*, latent: int = 32, width: int = 128,
        batch_size: int = 64, n_samples: int = 1000) -> Task:
  """An MLP GAN on the digits; the figure is the FID.

  Non-saturating losses; each step updates the discriminator, then the
  generator against the updated discriminator, each with its own optimizer
  (same kind and learning rate). The FID compares `n_samples` generated
  digits (fixed latent draws) with the training split (training figure) and
  with the held-out split, in the feature space of an MLP classifier trained
  on the training split. A GAN's losses do not settle, so its learning rates
  decay when the training FID, measured after every epoch, plateaus.
  """
  x_tr, y_tr, x_te, y_te = digits('tanh')
  features, feature_acc = train_feature_classifier(x_tr, y_tr, x_te, y_te)
  refs = {'train': frechet_reference(features(x_tr)),
          'test': frechet_reference(features(x_te))}
  real_fid = float(frechet_distance(*feature_stats(features(x_te)),
                                    refs['train']))

  def new(seed):
    rngs = nnx.Rngs(seed)
    return {'g': MLP((latent, width, width, 64), rngs),
            'd': MLP((64, width, width, 1), rngs, act=nnx.leaky_relu)}

  graphdefs = {k: split_params(m)[0] for k, m in new(0).items()}

  def net(params, group):
    return nnx.merge(graphdefs[group], params[group])

  def generate(params, z):
    return jnp.tanh(net(params, 'g')(z))

  def loss(group, params, data, batch):
    d = net(params, 'd')
    if group == 'd':
      real = d(data['x_tr'][batch['idx']])
      fake = d(jax.lax.stop_gradient(generate(params, batch['z'][0])))
      return jnp.mean(jax.nn.softplus(-real) + jax.nn.softplus(fake))
    return jnp.mean(jax.nn.softplus(-d(generate(params, batch['z'][1]))))

  def evaluate(params, data):
    stats = feature_stats(features(generate(params, data['z_eval'])))
    return {split: frechet_distance(*stats, ref)
            for split, ref in data['refs'].items()}

  def batches(rng, epochs):
    idx = _minibatch_indices(rng, epochs, n, batch_size)
    z = rng.standard_normal((*idx.shape[:2], 2, batch_size, latent),
                            dtype=np.float32)
    return {'idx': idx, 'z': z}

  n = x_tr.shape[0]
  z_eval = jax.random.normal(jax.random.key(1234), (n_samples, latent))
  return Task(
      name='gan', title='GAN (digits)', metric='FID', groups=('d', 'g'),
      init=lambda seed: {k: split_params(m)[1] for k, m in new(seed).items()},
      data=dict(x_tr=x_tr, z_eval=z_eval, refs=refs),
      steps_per_epoch=n // batch_size, batches=batches, loss=loss,
      evaluate=evaluate,
      plateau_signal=lambda params, data: evaluate(params, data)['train'],
      settings=(f'MLP generator {latent}-{width}-{width}-64 (ReLU, tanh '
                f'output) and discriminator 64-{width}-{width}-1 (leaky '
                f'ReLU), non-saturating losses, batch {batch_size}; FID of '
                f'{n_samples} samples in the 64 features of an MLP digits '
                f'classifier trained here (held-out accuracy '
                f'{feature_acc:.3f}); the real held-out split scores FID '
                f'{real_fid:.2f} against the real training split; learning '
                f'rates decay when the training FID (measured after every '
                f'epoch) plateaus'),
  )


TASKS = {'classifier': classifier, 'gan': gan, 'lm': lm,
         'autoencoder': autoencoder}
