"""The parameter trees the step-time benchmarks time: shapes only.

`TREES` maps each tree's name to a function of `scale` (which shrinks it, for
tests) returning its shapes; `materialise` makes params and gradients for
them on the device.
"""

import jax
import jax.numpy as jnp
import numpy as np

import fromage_jax


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
