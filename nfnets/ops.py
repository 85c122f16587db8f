"""Ops whose plain XLA form is slow: max pooling, low-channel strided convs.

`max_pool` computes exactly what `lax.reduce_window(max)` computes in the
forward pass; only its backward pass is written out, because XLA's own is
slow on GPUs: the gradient of `reduce_window(max)` is a `select_and_scatter`,
which re-reads the pooled input, searches every window again and scatters
with atomics (1.5 ms of a 43 ms BN-ResNet-50 step on an H100, for one
pooling layer). Here the forward pass also records which tap of each window
won (one byte per output), so the backward pass is a single fused pass that
reads that byte and the output gradient, and the pooled input is no longer
kept for it (0.7 GiB less peak memory for NF-ResNet-50 at batch 256). That
pass is split by stride phase, so that each input element adds only the taps
that can reach it.

A phase-split input gradient for strided grouped convolutions (XLA runs
theirs over a zero-dilated output gradient) was tried here too: on an H100
it changed F0's step time by 0.1%, within noise, so it was removed.

`conv2d` runs stride-2 convolutions of inputs with few channels (the stems,
on RGB images) as stride-1 convolutions of a space-to-depth rearrangement:
the same products, with 4x the input channels and a quarter of the
positions. A 3-channel input leaves most of a GPU's tensor-core lanes (or a
TPU's) idle: NFNet-F0's first conv took 0.79 ms forward and filter
gradient on an H100 for ~2% of the step's FLOPs.
"""

import functools
import itertools
from collections.abc import Sequence
from typing import Union

import jax
import jax.numpy as jnp


def pair(value: Union[int, Sequence[int]], what: str) -> tuple[int, int]:
  """`(value, value)` for an int, else the pair; both positive (`what` errs)."""
  if isinstance(value, int):
    value = (value, value)
  value = tuple(int(v) for v in value)
  if len(value) != 2 or min(value) < 1:
    raise ValueError(f'{what} must be a positive int or a pair, got {value}.')
  return value


def explicit_padding(
    spatial: Sequence[int],
    window: Sequence[int],
    strides: Sequence[int],
    padding: str,
) -> tuple[tuple[int, int], ...]:
  """`((low, high), ...)` per spatial dimension, as XLA pads 'SAME'/'VALID'."""
  if padding not in ('SAME', 'VALID'):
    raise ValueError(f"padding must be 'SAME' or 'VALID', got {padding!r}.")
  return tuple(
      tuple(p)
      for p in jax.lax.padtype_to_pads(spatial, window, strides, padding)
  )


def _output_size(padded: int, window: int, stride: int) -> int:
  return (padded - window) // stride + 1


# ---------------------------------------------------------------------------
# Convolution.

# Stride-2 convolutions of inputs with fewer channels than this go through
# space-to-depth. Eight bfloat16 channels fill one 16-byte tensor-core load.
SPACE_TO_DEPTH_MAX_CHANNELS = 8

_DIMENSION_NUMBERS = ('NHWC', 'HWIO', 'NHWC')


def _space_to_depth_conv(x, w, pads):
  """A stride-2 conv as a stride-1 conv over 2x2 blocks of positions.

  Output `i` of the stride-2 conv reads padded positions `2i + t` for taps
  `t < k`. Writing `t = 2j + p`, that is phase `p` of block `i + j`: a
  stride-1 conv of `ceil(k / 2)` taps over blocks whose channels are
  (row phase, column phase, input channel), with the kernel's taps moved to
  the same places (and zeros for `t >= k`), and zero channels up to a
  multiple of `SPACE_TO_DEPTH_MAX_CHANNELS`.
  """
  n, _, _, c = x.shape
  kh, kw, _, o = w.shape
  taps, widths = [], []
  for size, k, (lo, hi) in zip(x.shape[1:3], (kh, kw), pads):
    out = _output_size(size + lo + hi, k, 2)
    blocks = out + (k + 1) // 2 - 1
    # Pads to whole blocks; a negative high side crops a position no output
    # reads (odd sizes with 'VALID').
    widths.append((lo, 2 * blocks - size - lo, 0))
    taps.append(blocks)
  x = jax.lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), *widths, (0, 0, 0)))
  x = x.reshape(n, taps[0], 2, taps[1], 2, c)
  x = x.transpose(0, 1, 3, 2, 4, 5).reshape(n, taps[0], taps[1], 4 * c)
  w = jnp.pad(w, ((0, kh % 2), (0, kw % 2), (0, 0), (0, 0)))
  kh2, kw2 = w.shape[0] // 2, w.shape[1] // 2
  w = w.reshape(kh2, 2, kw2, 2, c, o).transpose(0, 2, 1, 3, 4, 5)
  w = w.reshape(kh2, kw2, 4 * c, o)
  # Zero channels up to a multiple of 8 (RGB: 12 -> 16), which cuDNN would
  # otherwise add itself, in a pass of its own over a zeroed copy of the
  # input, forward and for the filter gradient (~0.26 ms of F0's step on
  # machine E); here the padding is written with the rearrangement.
  extra = -(4 * c) % SPACE_TO_DEPTH_MAX_CHANNELS
  if extra:
    x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, extra)))
    w = jnp.pad(w, ((0, 0), (0, 0), (0, extra), (0, 0)))
  return jax.lax.conv_general_dilated(
      x, w, (1, 1), 'VALID', dimension_numbers=_DIMENSION_NUMBERS
  )


def conv2d(
    x: jax.Array,
    w: jax.Array,
    strides: Union[int, Sequence[int]] = 1,
    padding: str = 'SAME',
    feature_group_count: int = 1,
) -> jax.Array:
  """`lax.conv_general_dilated` of NHWC `x` with an HWIO kernel `w`.

  The same function (up to the order of the sums); stride-2, ungrouped
  convolutions of inputs with fewer than `SPACE_TO_DEPTH_MAX_CHANNELS`
  channels run as stride-1 convolutions of a space-to-depth rearrangement
  of `x` and `w`, which keeps the parameters HWIO.

  Args:
    x: `[N, H, W, C]`.
    w: `[kh, kw, C / feature_group_count, O]`, `x`'s dtype.
    strides: `(sh, sw)` or an int.
    padding: 'SAME' or 'VALID', as XLA pads them.
    feature_group_count: number of groups.

  Returns:
    `[N, H', W', O]`.
  """
  strides = pair(strides, 'strides')
  if x.ndim != 4 or w.ndim != 4:
    raise ValueError(
        f'conv2d expects [N, H, W, C] and HWIO arrays, got {x.shape} and '
        f'{w.shape}.'
    )
  pads = explicit_padding(x.shape[1:3], w.shape[:2], strides, padding)
  if (
      strides == (2, 2)
      and feature_group_count == 1
      and x.shape[-1] < SPACE_TO_DEPTH_MAX_CHANNELS
  ):
    return _space_to_depth_conv(x, w, pads)
  return jax.lax.conv_general_dilated(
      x,
      w,
      window_strides=strides,
      padding=pads,
      dimension_numbers=_DIMENSION_NUMBERS,
      feature_group_count=feature_group_count,
  )


# ---------------------------------------------------------------------------
# Max pooling.


def _pool_taps(xp, window, strides, out_shape):
  """The strided views of padded `xp` seen by each window tap, in order."""
  n, ho, wo, c = out_shape
  for a, b in itertools.product(range(window[0]), range(window[1])):
    yield jax.lax.slice(
        xp,
        (0, a, b, 0),
        (n, a + strides[0] * (ho - 1) + 1, b + strides[1] * (wo - 1) + 1, c),
        (1, strides[0], strides[1], 1),
    )


def _pool_padded(x, window, strides, pads):
  """`x` padded with -inf, and the pooled output's shape."""
  low = jnp.array(-jnp.inf, x.dtype)
  xp = jax.lax.pad(
      x, low, ((0, 0, 0), *[(lo, hi, 0) for lo, hi in pads], (0, 0, 0))
  )
  out_shape = (
      x.shape[0],
      _output_size(xp.shape[1], window[0], strides[0]),
      _output_size(xp.shape[2], window[1], strides[1]),
      x.shape[3],
  )
  return xp, out_shape


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, window, strides, pads):
  return jax.lax.reduce_window(
      x,
      jnp.array(-jnp.inf, x.dtype),
      jax.lax.max,
      (1, *window, 1),
      (1, *strides, 1),
      ((0, 0), *pads, (0, 0)),
  )


def _max_pool_fwd(x, window, strides, pads):
  xp, out_shape = _pool_padded(x, window, strides, pads)
  best, index = None, None
  for tap, candidate in enumerate(_pool_taps(xp, window, strides, out_shape)):
    if best is None:
      best, index = candidate, jnp.zeros(out_shape, jnp.uint8)
    else:
      # Strictly greater: the first maximum in window order wins, which is
      # the element XLA's select_and_scatter (select = `>=`) picks.
      wins = candidate > best
      best = jnp.where(wins, candidate, best)
      index = jnp.where(wins, jnp.uint8(tap), index)
  # The input's spatial size, as a shape (the residuals must be arrays).
  size = jnp.zeros((0, *x.shape[1:3]), jnp.uint8)
  return best, (index, size)


def _max_pool_bwd(window, strides, pads, residuals, g):
  index, size = residuals
  height, width = size.shape[1:]
  padded = (
      height + pads[0][0] + pads[0][1],
      width + pads[1][0] + pads[1][1],
  )
  n, ho, wo, c = g.shape
  dtype, g = g.dtype, g.astype(jnp.float32)
  # Split by phase: padded input row i = stride * q + r gets gradient only
  # from taps a = r + stride * t (window row q - t), so each phase r sums
  # those taps' routed gradients shifted by t, and the phases interleave
  # into the input's rows. Written as one sum over all taps of gradients
  # dilated by the stride, every input element tested all k * k taps (on an
  # H100, NF-ResNet-50's largest kernel was that gradient with the stem's
  # bias gradient, 1.30 ms a step, ~0.4 TB/s by its bytes); here it adds
  # only its own: 9 terms over each 2 x 2 block for a 3 x 3, stride-2 pool.
  # Each phase spans ceil(padded / stride) positions; the rest is cut off.
  span = [-(-p // s) for p, s in zip(padded, strides)]
  rows = []
  for rh in range(strides[0]):
    row = []
    for rw in range(strides[1]):
      phase = jnp.zeros((n, span[0], span[1], c), jnp.float32)
      # Taps in window order, the order of the plain sum, so that each
      # element's nonzero terms add up in the same order.
      for a in range(rh, window[0], strides[0]):
        for b in range(rw, window[1], strides[1]):
          routed = jnp.where(index == a * window[1] + b, g, 0.0)
          shift = (a // strides[0], b // strides[1])
          phase = phase + jax.lax.pad(
              routed,
              jnp.float32(0),
              (
                  (0, 0, 0),
                  (shift[0], span[0] - shift[0] - ho, 0),
                  (shift[1], span[1] - shift[1] - wo, 0),
                  (0, 0, 0),
              ),
          )
      row.append(phase)
    rows.append(jnp.stack(row, axis=3))  # [N, span0, span1, stride1, C]
  dxp = jnp.stack(rows, axis=2).reshape(
      n, span[0] * strides[0], span[1] * strides[1], c
  )
  dx = dxp[:, pads[0][0] : pads[0][0] + height, pads[1][0] : pads[1][0] + width]
  return (dx.astype(dtype),)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool(
    x: jax.Array,
    window: Union[int, Sequence[int]] = 3,
    strides: Union[int, Sequence[int]] = 2,
    padding: str = 'SAME',
) -> jax.Array:
  """Max pooling of NHWC `x`, as `hk.max_pool` / `lax.reduce_window(max)`.

  The same forward pass; the backward pass routes each output's gradient to
  the first maximum of its window (as XLA does) from a one-byte record of
  which tap won, made in the forward pass, instead of searching the windows
  of the kept input again.

  Args:
    x: floating-point `[N, H, W, C]`.
    window: `(kh, kw)` or an int, at most 256 taps.
    strides: `(sh, sw)` or an int.
    padding: 'SAME' or 'VALID' (padded positions never win).

  Returns:
    The pooled `[N, H', W', C]`.
  """
  window = pair(window, 'window')
  strides = pair(strides, 'strides')
  if window[0] * window[1] > 256:
    raise ValueError(f'max_pool window {window} has more than 256 taps.')
  x = jnp.asarray(x)
  if x.ndim != 4 or not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(
        f'max_pool expects a float [N, H, W, C] array, got {x.dtype} {x.shape}.'
    )
  pads = explicit_padding(x.shape[1:3], window, strides, padding)
  return _max_pool(x, window, strides, pads)
