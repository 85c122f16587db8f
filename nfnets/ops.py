"""Max pooling and strided grouped convolution with cheaper gradients.

Both compute exactly what `jax.lax` computes in the forward pass; only the
backward pass is written out, because XLA's own is slow on GPUs for them:

* `max_pool`: the gradient of `lax.reduce_window(max)` is a
  `select_and_scatter`, which re-reads the pooled input, searches every
  window again and scatters with atomics (1.5 ms of a 43 ms ResNet-50 step on
  an H100, for one pooling layer). Here the forward pass also records which
  tap of each window won (one byte per output), so the backward pass is a
  single fused pass that reads that byte and the output gradient, and the
  pooled input is no longer kept for it.
* `conv2d`: for grouped convolutions with a stride, XLA runs the input
  gradient as a stride-1 convolution over the output gradient dilated with
  zeros: `stride**2` times the arithmetic of the real thing, plus a pass to
  write the dilated copy. Here it is split into the `stride**2` phases of the
  input (the pixels at offsets `(p, q)` modulo the stride), each a small
  stride-1 convolution with the kernel taps of that phase, interleaved back.

Gradients equal autodiff's up to the order of floating-point additions.
"""

import functools
import itertools
from collections.abc import Sequence
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np

_DIMENSIONS = ('NHWC', 'HWIO', 'NHWC')
Padding = Union[str, Sequence[tuple[int, int]]]


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
    padding: Padding,
) -> tuple[tuple[int, int], ...]:
  """`((low, high), ...)` per spatial dimension, as XLA pads 'SAME'/'VALID'."""
  if isinstance(padding, str):
    if padding not in ('SAME', 'VALID'):
      raise ValueError(f"padding must be 'SAME' or 'VALID', got {padding!r}.")
    return tuple(
        tuple(p)
        for p in jax.lax.padtype_to_pads(spatial, window, strides, padding)
    )
  return tuple((int(lo), int(hi)) for lo, hi in padding)


def _output_size(padded: int, window: int, stride: int) -> int:
  return (padded - window) // stride + 1


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
  _, ho, wo, _ = g.shape
  dtype, g = g.dtype, g.astype(jnp.float32)
  dxp = None
  for tap, (a, b) in enumerate(
      itertools.product(range(window[0]), range(window[1]))
  ):
    # Each output's gradient goes back to the tap that won its window: put
    # it at that tap's input positions (a + stride * i, b + stride * j).
    routed = jnp.where(index == tap, g, 0.0)
    term = jax.lax.pad(
        routed,
        jnp.float32(0),
        (
            (0, 0, 0),
            (a, padded[0] - a - strides[0] * (ho - 1) - 1, strides[0] - 1),
            (b, padded[1] - b - strides[1] * (wo - 1) - 1, strides[1] - 1),
            (0, 0, 0),
        ),
    )
    dxp = term if dxp is None else dxp + term
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
  if padding not in ('SAME', 'VALID'):
    raise ValueError(f"padding must be 'SAME' or 'VALID', got {padding!r}.")
  x = jnp.asarray(x)
  if x.ndim != 4 or not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(
        f'max_pool expects a float [N, H, W, C] array, got {x.dtype} {x.shape}.'
    )
  pads = explicit_padding(x.shape[1:3], window, strides, padding)
  return _max_pool(x, window, strides, pads)


# ---------------------------------------------------------------------------
# Strided grouped convolution.


def _conv(x, w, strides, pads, groups):
  return jax.lax.conv_general_dilated(
      x,
      w,
      window_strides=strides,
      padding=pads,
      dimension_numbers=_DIMENSIONS,
      feature_group_count=groups,
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _phased_conv(x, w, strides, pads, groups):
  return _conv(x, w, strides, pads, groups)


def _phased_conv_fwd(x, w, strides, pads, groups):
  return _conv(x, w, strides, pads, groups), (x, w)


def _input_gradient(g, w, x_shape, strides, pads, groups):
  """d(conv)/dx by phases: one stride-1 conv per input offset mod stride."""
  (sh, sw), (kh, kw) = strides, w.shape[:2]
  _, ho, wo, _ = g.shape
  padded = (
      x_shape[1] + pads[0][0] + pads[0][1],
      x_shape[2] + pads[1][0] + pads[1][1],
  )
  # Phase p of a padded axis is its entries s * m + p, m < rows (a multiple
  # of s in all, so the phases interleave by a reshape).
  rows = (-(-padded[0] // sh), -(-padded[1] // sw))
  phase_rows = []
  for p in range(sh):
    phase_cols = []
    for q in range(sw):
      taps = w[p::sh, q::sw]  # Taps k = p + s * j meet input s * (o + j) + p.
      if taps.shape[0] == 0 or taps.shape[1] == 0:
        phase_cols.append(jnp.zeros((g.shape[0], *rows, x_shape[3]), g.dtype))
        continue
      # Stride 1 and VALID over exactly the phase entries the windows read.
      size = (ho + taps.shape[0] - 1, wo + taps.shape[1] - 1)
      phase = jax.ShapeDtypeStruct((g.shape[0], *size, x_shape[3]), g.dtype)
      conv = functools.partial(
          _conv, w=taps, strides=(1, 1), pads=((0, 0), (0, 0)), groups=groups
      )
      (dphase,) = jax.linear_transpose(conv, phase)(g)
      phase_cols.append(
          jnp.pad(
              dphase,
              ((0, 0), (0, rows[0] - size[0]), (0, rows[1] - size[1]), (0, 0)),
          )
      )
    # [N, R, C', s_w, C] -> columns interleaved: [N, R, C' * s_w, C].
    cols = jnp.stack(phase_cols, axis=3)
    phase_rows.append(cols.reshape(g.shape[0], rows[0], rows[1] * sw, -1))
  dxp = jnp.stack(phase_rows, axis=2).reshape(
      g.shape[0], rows[0] * sh, rows[1] * sw, -1
  )
  return dxp[
      :,
      pads[0][0] : pads[0][0] + x_shape[1],
      pads[1][0] : pads[1][0] + x_shape[2],
  ]


def _phased_conv_bwd(strides, pads, groups, residuals, g):
  x, w = residuals
  weight = jax.ShapeDtypeStruct(w.shape, w.dtype)
  (dw,) = jax.linear_transpose(
      lambda w_: _conv(x, w_, strides, pads, groups), weight
  )(g)
  dx = _input_gradient(g, w, x.shape, strides, pads, groups)
  return dx.astype(x.dtype), dw


_phased_conv.defvjp(_phased_conv_fwd, _phased_conv_bwd)


def conv2d(
    x: jax.Array,
    w: jax.Array,
    strides: Union[int, Sequence[int]] = 1,
    padding: Padding = 'SAME',
    feature_group_count: int = 1,
) -> jax.Array:
  """`lax.conv_general_dilated` in NHWC/HWIO, with a phased input gradient.

  Strided grouped convolutions get the phase-split input gradient of the
  module docstring; every other convolution is `lax.conv_general_dilated`
  itself (XLA's own gradients are already direct for them).

  Args:
    x: `[N, H, W, C]`.
    w: `[kh, kw, C / groups, O]`.
    strides: `(sh, sw)` or an int.
    padding: 'SAME', 'VALID' or `((low, high), (low, high))`.
    feature_group_count: the number of groups.

  Returns:
    `[N, H', W', O]`.
  """
  strides = pair(strides, 'strides')
  pads = explicit_padding(x.shape[1:3], w.shape[:2], strides, padding)
  if strides == (1, 1) or feature_group_count == 1:
    return _conv(x, w, strides, pads, feature_group_count)
  if any(low != high for low, high in pads):
    # cuDNN pads symmetrically only, so XLA pads `x` itself for this conv
    # ('SAME' with a stride and an even input). Padding it here makes that
    # one copy the residual, shared by the forward conv and the weight
    # gradient, rather than one pad in each direction.
    x = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    pads = ((0, 0), (0, 0))
  return _phased_conv(x, w, strides, pads, feature_group_count)
