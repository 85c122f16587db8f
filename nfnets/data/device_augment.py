"""RandAugment, MixUp / CutMix and normalisation on the accelerator, in JAX.

Why: the tf.data pipelines run RandAugment (`nfnets.data.randaugment`), MixUp /
CutMix and normalisation (`nfnets.data.augment`) per image in TensorFlow ops on
the host CPU. With several RandAugment layers per image that is most of the
host's work per step, and too slow for an accelerator fed from a few cores.
This module is the alternative: the host only decodes, crops, resizes and
flips (uint8 images), and `augment_batch` does the rest on each device batch,
inside the jitted / pmapped step.

Semantics: every operation has the same explicit arguments and, pixel for
pixel, the same result as the TensorFlow operation of the same name in
`nfnets.data.randaugment`, but for two rounding effects: Color can differ by a
level (TF's convolution adds its products in another order), and Rotate can
move a pixel whose sampling coordinate is a rounding tie (XLA's and TF's cos
and sin can differ by an ulp). Where XLA would otherwise round differently
from TF (fusing a multiply-add, dividing by a constant through its
reciprocal), the arithmetic is written so that it cannot (`_product`,
`_unfused`, `_divide`).

`randaugment` and `mix_batch` draw from the same distribution as the
TensorFlow versions (operation uniform over `RANDAUGMENT_OPS`, applied with
`APPLY_PROBABILITY` (always), random sign, the same magnitude -> argument
mapping; the recipe of `nfnets.data.mixing`), but with
`jax.random`, so not with the same random draws: outputs are not bitwise the
TensorFlow pipeline's for a given seed. One departure, with probability below
2e-12 per layer and batch: images beyond the capacity of a sub-batch (for
Equalize's histograms, or for stages 2-5 below) are left as they are for
that layer.

Design: the obvious batched RandAugment, `vmap` of a `lax.switch` over the 16
operations, computes all 16 operations for every image. Instead one layer is a
fixed composition of five stages, each parameterised per example so that it is
exactly the identity for the examples whose operation is not in that stage:

  1. a per-example, per-channel 256-entry lookup table (AutoContrast,
     Equalize, Invert, Posterize, Solarize, SolarizeAdd, Contrast,
     Brightness); its statistics (histograms, channel extremes and means) are
     computed on the layer's input, the histograms only for a sub-batch that
     holds the images equalising (but with probability below 1e-12 per
     layer: `_capacity`);
  2. a per-example 3x3 colour matrix (Color);
  3. a blend with PIL's SMOOTH filter (Sharpness, factor 1: identity);
  4. one nearest-neighbour affine warp with a per-example 2x3 matrix (Rotate,
     ShearX, ShearY, TranslateX, TranslateY, identity matrix: identity);
  5. a per-example box filled with grey (Cutout, size 0: identity).

Exactly one operation (or none) is active per image and layer, so the
composition is that operation. Colour and Sharpness read the same input side
by side (one of them is the identity). Stages 2-5 run only on the images
whose operation is one of theirs (half on average; for batches of 256 or
more, a sub-batch of `_capacity` images, which holds them all but with
probability below 1e-12 per layer), from the layer's input, since their
lookup table is the identity. Images stay uint8 between stages, each
stage is a gather, a stencil or elementwise work that XLA fuses, and the
layers run in a `lax.scan`, so that each layer's output is materialised once.
No loop depends on the data (MixUp's Beta draws included: `_log_gamma`), so
an accelerator's host need not wait for the device before it queues the
train step behind the augmentation.
"""

import math
from typing import Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from nfnets.data import batching
from nfnets.data import mixing
from nfnets.data import recipe

MAX_LEVEL = recipe.MAX_LEVEL
FILL_VALUE = recipe.FILL_VALUE
APPLY_PROBABILITY = recipe.APPLY_PROBABILITY
RANDAUGMENT_OPS = recipe.RANDAUGMENT_OPS

_OP_INDEX = {name: i for i, name in enumerate(RANDAUGMENT_OPS)}
# The operations of stages 2-5 (`_pixel_stages`).
_PIXEL_OPS = (
    'Color',
    'Sharpness',
    'Rotate',
    'ShearX',
    'ShearY',
    'TranslateX',
    'TranslateY',
    'Cutout',
)
_PIXEL_OP_INDICES = tuple(_OP_INDEX[name] for name in _PIXEL_OPS)
# ITU-R 601 luma, PIL's RGB -> 'L' conversion.
_LUMA = (0.299, 0.587, 0.114)
_LEVELS = 256
_IDENTITY_MATRIX = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
# ImageNet normalisation as `augment.normalize`: x * (1 / std) - mean / std.
_INVERSE_STD = [1.0 / s for s in batching.STDDEV_RGB]
_NORM_SCALE = np.array(_INVERSE_STD, np.float32)
_NORM_OFFSET = np.array(
    [-m * i for m, i in zip(batching.MEAN_RGB, _INVERSE_STD)], np.float32
)


# ---------------------------------------------------------------------------
# Helpers.


def _to_uint8(x: jax.Array) -> jax.Array:
  """Rounds (half to even, as tf.round) and clips a float array to uint8."""
  return jnp.clip(jnp.round(x), 0.0, 255.0).astype(jnp.uint8)


def _round_half_away(x: jax.Array) -> jax.Array:
  """C++ `std::round`: halves away from zero (exact, unlike floor(x + .5))."""
  whole = jnp.trunc(x)
  return jnp.where(jnp.abs(x - whole) >= 0.5, whole + jnp.sign(x), whole)


def _product(a: jax.Array, n) -> jax.Array:
  """`a * n` rounded once to float32, whether or not XLA fuses it into an FMA.

  TensorFlow's kernels compute `a * n + c` as two rounded operations, but
  XLA (CPU and GPU) may contract it into one fused multiply-add, which
  rounds differently by an ulp and so moves rounding ties (a pixel or a
  level). Splitting `a` into two halves of 12 significant bits makes both
  partial products exact when `n` has at most 12 significant bits (pixel
  values, coordinates), so `_product(a, n) + c` gives the same float32
  whether or not the compiler fuses it.

  Args:
    a: float32 array.
    n: float32 array of integers below 4096 or half-integers below 2048 in
      magnitude.

  Returns:
    float32 `a * n` (broadcast), correctly rounded.
  """
  a = jnp.asarray(a, jnp.float32)
  n = jnp.asarray(n, jnp.float32)
  bits = jax.lax.bitcast_convert_type(a, jnp.uint32)
  high = jax.lax.bitcast_convert_type(
      bits & jnp.uint32(0xFFFFF000), jnp.float32
  )
  low = a - high  # Exact: the 12 low-order significant bits of `a`.
  return high * n + low * n


def _unfused(x: jax.Array) -> jax.Array:
  """`x`, behind a select that keeps a product in it out of FMA contraction.

  For small arrays of products of arbitrary floats (where `_product` does not
  apply) that are then added: the compiler contracts `a * b + c` only when
  the product feeds the addition directly, and it cannot fold this select
  away (it would change NaNs).

  Args:
    x: float array.

  Returns:
    `x` (NaNs replaced by 0).
  """
  return jnp.where(jnp.isnan(x), 0.0, x)


def _divide(numerator: jax.Array, denominator) -> jax.Array:
  """`numerator / denominator`, correctly rounded even for a constant divisor.

  XLA rewrites a division by a constant into a multiplication by its rounded
  reciprocal, an ulp off for about one quotient in ten (TF divides). Adding
  `0 * numerator`, which XLA does not fold for floats, keeps it a division.

  Args:
    numerator: finite float32 array.
    denominator: float32 array or number.

  Returns:
    The float32 quotient.
  """
  return numerator / (denominator + 0.0 * numerator)


def _levels() -> jax.Array:
  return jnp.arange(_LEVELS, dtype=jnp.float32)


def _scalar(value, dtype) -> jax.Array:
  return jnp.asarray(value).astype(dtype)


def _single(stage, image: jax.Array, *args) -> jax.Array:
  """Runs a batched stage on one image with scalar arguments."""
  return stage(image[None], *(jnp.asarray(a)[None] for a in args))[0]


# ---------------------------------------------------------------------------
# Stage 1: per-example, per-channel lookup tables.


def _lut_index(images: jax.Array, slot=None, num_tables: int = 1):
  """int32 index of each pixel's entry in flattened `[B, K, 3, 256]` tables.

  Args:
    images: uint8 `[B, H, W, 3]`.
    slot: int `[B]`: the table (of `num_tables`) each example uses; default 0.
    num_tables: K.

  Returns:
    `((b * K + slot[b]) * 3 + c) * 256 + pixel`, int32 `[B, H, W, 3]`.
  """
  batch = images.shape[0]
  table = jnp.arange(batch, dtype=jnp.int32) * num_tables
  if slot is not None:
    table = table + slot.astype(jnp.int32)
  offsets = (table[:, None] * 3 + jnp.arange(3, dtype=jnp.int32)) * _LEVELS
  return images.astype(jnp.int32) + offsets[:, None, None, :]


def _apply_lut(images: jax.Array, tables, slot=None) -> jax.Array:
  """Maps every pixel through its example's (chosen) lookup table.

  Args:
    images: uint8 `[B, H, W, 3]`.
    tables: a float table `[B, 3, 256]` or a sequence of K of them, each
      broadcastable to that shape (`[B, 1, 256]`, `[1, 1, 256]`), rounded and
      clipped to uint8 here.
    slot: int `[B]`: the table of `tables` that each example uses (default:
      the first).

  Returns:
    The uint8 images.
  """
  if not isinstance(tables, (list, tuple)):
    tables = [tables]
  batch = images.shape[0]
  # Stacked, not selected per example with `where`: XLA fuses the tables'
  # computation into the gather, and there it evaluates only the table an
  # index falls in, where a chain of selects would compute every table for
  # every pixel.
  stacked = jnp.stack(
      [jnp.broadcast_to(t, (batch, 3, _LEVELS)) for t in tables], axis=1
  )
  flat = _to_uint8(stacked).reshape(-1)
  index = _lut_index(images, slot, len(tables))
  return flat.at[index].get(mode='promise_in_bounds')


def _histogram(index: jax.Array, active=None) -> jax.Array:
  """Per-example, per-channel pixel counts: int32 `[B, 3, 256]`.

  Args:
    index: `_lut_index(images)`, `[B, H, W, 3]`.
    active: optional bool `[B]`; other examples get an empty histogram (their
      pixels are dropped from the scatter, which then costs them little).

  Returns:
    The histograms.
  """
  batch = index.shape[0]
  size = batch * 3 * _LEVELS
  if active is not None:
    index = jnp.where(active[:, None, None, None], index, size)
  counts = (
      jnp.zeros([size], jnp.int32).at[index.reshape(-1)].add(1, mode='drop')
  )
  return counts.reshape(batch, 3, _LEVELS)


# Bound on the chance, per layer, that more images than a sub-batch holds
# draw its operations (`_capacity`).
_OVERFLOW_PROBABILITY = 1e-12


def _capacity(batch: int, num_ops: int) -> int:
  """Images per layer a sub-batch for `num_ops` of the operations holds.

  Each image of a layer draws one of the 16 operations and applies it with
  probability `APPLY_PROBABILITY` (1), independently of the others, so the
  number drawing one of `num_ops` given operations is Binomial(batch,
  num_ops / 16). This returns the smallest k
  with P(count > k) <= 1e-12: stages that only those images need run on k
  images, not all of them.

  Args:
    batch: images per device batch (static).
    num_ops: how many of `RANDAUGMENT_OPS` the sub-batch is for.

  Returns:
    The capacity, at most `batch`.
  """
  q = num_ops * APPLY_PROBABILITY / len(RANDAUGMENT_OPS)
  log_pmf = [
      math.lgamma(batch + 1)
      - math.lgamma(j + 1)
      - math.lgamma(batch - j + 1)
      + j * math.log(q)
      + (batch - j) * math.log1p(-q)
      for j in range(batch + 1)
  ]
  tail = 0.0  # P(count > k), for k from batch down.
  for k in range(batch, 0, -1):
    tail += math.exp(log_pmf[k])
    if tail > _OVERFLOW_PROBABILITY:
      return k
  return 0


def _sub_batch(active: jax.Array, capacity: int) -> jax.Array:
  """Indices of the first `capacity` active examples; `len(active)` pads."""
  (chosen,) = jnp.nonzero(active, size=capacity, fill_value=active.shape[0])
  return chosen


def _take(x: jax.Array, chosen: jax.Array) -> jax.Array:
  """`x[chosen]`, zeros where `chosen` is past the end (padding)."""
  return x.at[chosen].get(mode='fill', fill_value=0)


def _equalize_histograms(images: jax.Array, active: jax.Array) -> jax.Array:
  """`_histogram` of the `active` images, counted on a sub-batch.

  The histogram is a scatter with one update per pixel and channel, whose
  cost is in the updates, not in the ones kept: an H100 spent 0.175 ms per
  layer on 256 images at 192 px, ~97% of the updates dropped (then 8 images
  equalised on average; 16 now that every layer applies its operation). So
  the first `_capacity(B, 1)` active images (49 of 256), in batch order, are gathered and counted; the others (probability
  <= 1e-12 per layer that there are any) get an empty histogram, which
  `_equalize_lut` maps to the identity: they stay as they are for that
  layer.

  Args:
    images: uint8 `[B, H, W, 3]`.
    active: bool `[B]`, the images that equalise.

  Returns:
    int32 `[B, 3, 256]`, empty for images not active (or not counted).
  """
  batch = images.shape[0]
  capacity = _capacity(batch, 1)
  if capacity == batch:
    return _histogram(_lut_index(images), active=active)
  chosen = _sub_batch(active, capacity)
  counts = _histogram(_lut_index(_take(images, chosen)), active=chosen < batch)
  empty = jnp.zeros([batch, 3, _LEVELS], jnp.int32)
  return empty.at[chosen].set(counts, mode='drop')


def _equalize_lut(histogram: jax.Array) -> jax.Array:
  """PIL's ImageOps.equalize table for each `[B, 3, 256]` histogram."""
  levels = jnp.arange(_LEVELS, dtype=jnp.int32)
  # PIL: step = (pixels - count of the highest level present) // 255.
  highest = jnp.max(jnp.where(histogram > 0, levels, 0), axis=-1)
  top_count = jnp.take_along_axis(histogram, highest[..., None], axis=-1)
  step = (jnp.sum(histogram, axis=-1, keepdims=True) - top_count) // 255
  exclusive = jnp.cumsum(histogram, axis=-1) - histogram
  lut = (exclusive + step // 2) // jnp.maximum(step, 1)
  # A channel with (almost) one value has nothing to equalise.
  lut = jnp.where(step > 0, lut, levels)
  return lut.astype(jnp.float32)


def _channel_stats(images: jax.Array):
  """Per-example, per-channel `(min, max, sum)` of uint8 `[B, H, W, 3]`.

  One pass, laid out for the reduction: reducing `[B, H * W, 3]` over its
  middle axis leaves 3 columns, and XLA's GPU reduction keeps a warp per 32
  columns, so most of its threads idled (0.19 ms per 256 images at 192 px
  on an H100, ~150 GB/s). Groups of `k` pixels are reduced as `k * 3`
  columns first, then the `k` partial results per channel. Exact: min, max
  and integer sums do not depend on the order.

  Returns:
    `(low, high, total)`: uint8 `[B, 3]` twice and int32 `[B, 3]`.
  """
  batch, height, width, channels = images.shape
  pixels = height * width
  group = next(k for k in (32, 16, 8, 4, 2, 1) if pixels % k == 0)
  x = images.reshape(batch, pixels // group, group * channels)
  partial = (
      jnp.min(x, axis=1),
      jnp.max(x, axis=1),
      jnp.sum(x.astype(jnp.int32), axis=1),
  )
  low, high, total = (p.reshape(batch, group, channels) for p in partial)
  return jnp.min(low, axis=1), jnp.max(high, axis=1), jnp.sum(total, axis=1)


def _auto_contrast_lut(low: jax.Array, high: jax.Array) -> jax.Array:
  """Tables stretching each channel's `[low, high]` to [0, 255]: `[B, 3, 256]`.

  Args:
    low: the channels' minima, `[B, 3]`.
    high: their maxima, `[B, 3]`.
  """
  low = low.astype(jnp.float32)[..., None]
  high = high.astype(jnp.float32)[..., None]
  spread = high > low
  scale = jnp.where(spread, 255.0 / jnp.maximum(high - low, 1.0), 1.0)
  offset = jnp.where(spread, -_product(scale, low), 0.0)
  return _product(scale, _levels()) + offset


def _mean_luma(sums: jax.Array, pixels: int) -> jax.Array:
  """Rounded mean luma of each image (the luma of the channel means): `[B]`.

  Args:
    sums: the channels' int32 sums, `[B, 3]`.
    pixels: pixels per image.
  """
  means = _divide(sums.astype(jnp.float32), float(pixels))
  # TF adds the three rounded products in order.
  weighted = _unfused(means * jnp.array(_LUMA, jnp.float32))
  return jnp.round(weighted[..., 0] + weighted[..., 1] + weighted[..., 2])


def _contrast_lut(mean: jax.Array, factor: jax.Array) -> jax.Array:
  """`mean + factor * (level - mean)`: `[B, 1, 256]`."""
  mean = mean[:, None, None]
  return mean + _product(factor[:, None, None], _levels() - mean)


def _brightness_lut(factor: jax.Array) -> jax.Array:
  return factor[:, None, None] * _levels()


def _solarize_lut(threshold: jax.Array) -> jax.Array:
  levels = _levels()
  return jnp.where(
      levels >= threshold.astype(jnp.float32)[:, None, None],
      255.0 - levels,
      levels,
  )


def _solarize_add_lut(addition: jax.Array, threshold: jax.Array) -> jax.Array:
  levels = _levels()
  added = levels + addition.astype(jnp.float32)[:, None, None]
  return jnp.where(
      levels < threshold.astype(jnp.float32)[:, None, None], added, levels
  )


def _posterize_lut(bits: jax.Array) -> jax.Array:
  shift = (8 - bits.astype(jnp.int32))[:, None, None]
  levels = jnp.arange(_LEVELS, dtype=jnp.int32)
  return ((levels >> shift) << shift).astype(jnp.float32)


def _invert_lut() -> jax.Array:
  return (255.0 - _levels())[None, None]


# ---------------------------------------------------------------------------
# Stages 2-5: colour matrix, sharpness, affine warp, cutout. Each takes uint8
# `[B, H, W, 3]` images and per-example `[B]` (or `[B, 6]`) parameters.


def _color_stage(images: jax.Array, factor: jax.Array) -> jax.Array:
  """Blends each pixel with its luma: `f * I + (1 - f) * L` (f = 1: identity).

  As `augment.channel_affine` in the TF version: output channel j is
  `sum_i x_i * M[i, j]`, with `M = f * eye(3) + (1 - f) * luma[:, None]`.

  Args:
    images: uint8 `[B, H, W, 3]`.
    factor: float `[B]`.

  Returns:
    The uint8 images.
  """
  factor = factor.astype(jnp.float32)[:, None, None]
  luma = jnp.array(_LUMA, jnp.float32)[:, None] * jnp.ones([1, 3])
  matrix = factor * jnp.eye(3) + _unfused((1.0 - factor) * luma)  # [B, 3, 3]
  x = images.astype(jnp.float32)
  m = matrix[:, None, None]  # [B, 1, 1, 3, 3]
  # TF's convolution sums with FMAs in its own order: up to a level apart.
  out = (
      _product(m[..., 0, :], x[..., 0:1])
      + _product(m[..., 1, :], x[..., 1:2])
      + _product(m[..., 2, :], x[..., 2:3])
  )
  return _to_uint8(out)


def _sharpness_stage(images: jax.Array, factor: jax.Array, centre=None):
  """Blends with PIL's SMOOTH filter, border kept (f = 1: identity).

  Args:
    images: uint8 `[B, H, W, 3]`, the images filtered.
    factor: float `[B]`; 0 gives the smoothed image.
    centre: uint8 `[B, H, W, 3]` blended with the smoothed `images` instead
      of `images` themselves (default `images`). With `centre` the colour
      stage's output of the same `images`, this runs Color and Sharpness side
      by side, each reading `images` once (rather than filtering the colour
      stage's output, which XLA would recompute for every neighbour): the
      same result whenever one of the two factors is 1.

  Returns:
    The uint8 images (`centre` where the factor is 1, and on the border).
  """
  centre = images if centre is None else centre
  height, width = images.shape[1:3]
  if height < 3 or width < 3:
    return centre
  x = images.astype(jnp.int32)
  # Kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 as an exact integer sum; no
  # sum / 13 is within 1/26 of a rounding tie, so rounding matches the TF
  # float convolution.
  total = 4 * x[:, 1:-1, 1:-1]
  for dy in range(3):
    for dx in range(3):
      total = total + x[:, dy : height - 2 + dy, dx : width - 2 + dx]
  smooth = jnp.round(total.astype(jnp.float32) / 13.0)
  interior = centre[:, 1:-1, 1:-1].astype(jnp.float32)
  factor = factor.astype(jnp.float32)[:, None, None, None]
  blended = _to_uint8(smooth + _product(factor, interior - smooth))
  return centre.at[:, 1:-1, 1:-1].set(blended)


def _warp(images: jax.Array, matrix: jax.Array) -> jax.Array:
  """Nearest-neighbour affine warp, grey outside: TF's projective transform.

  Output pixel (y, x) is input pixel `(round(b0 x + b1 y + b2), round(a0 x +
  a1 y + a2))` (rounding halves away from zero), or `FILL_VALUE` where that
  lies outside the image: `ImageProjectiveTransformV3` with NEAREST
  interpolation and CONSTANT fill, transform `[a0, a1, a2, b0, b1, b2, 0, 0]`.

  Args:
    images: uint8 `[B, H, W, C]`.
    matrix: float `[B, 6]`: `(a0, a1, a2, b0, b1, b2)`.

  Returns:
    The uint8 images.
  """
  batch, height, width, channels = images.shape
  ys = jnp.arange(height, dtype=jnp.float32)[None, :, None]
  xs = jnp.arange(width, dtype=jnp.float32)[None, None, :]
  a0, a1, a2, b0, b1, b2 = (
      matrix[:, k].astype(jnp.float32)[:, None, None] for k in range(6)
  )
  # As TF: (a0 * x + a1 * y) + a2, each operation rounded to float32.
  src_x = _round_half_away(_product(a0, xs) + _product(a1, ys) + a2)
  src_y = _round_half_away(_product(b0, xs) + _product(b1, ys) + b2)
  inside = (src_y >= 0) & (src_y < height) & (src_x >= 0) & (src_x < width)
  row = jnp.clip(src_y, 0, height - 1).astype(jnp.int32)
  col = jnp.clip(src_x, 0, width - 1).astype(jnp.int32)
  flat = (jnp.arange(batch, dtype=jnp.int32)[:, None, None] * height + row) * (
      width
  ) + col
  pixels = images.reshape(batch * height * width, channels)
  sampled = pixels.at[flat].get(mode='promise_in_bounds')
  return jnp.where(inside[..., None], sampled, jnp.uint8(FILL_VALUE))


def _rotate_matrix(degrees: jax.Array, height: int, width: int) -> jax.Array:
  """`[B, 6]` warp rotating about the centre (counter-clockwise)."""
  angle = degrees.astype(jnp.float32) * jnp.float32(math.pi / 180.0)
  centre_y = jnp.float32((height - 1.0) / 2.0)
  centre_x = jnp.float32((width - 1.0) / 2.0)
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  return jnp.stack(
      [
          cos,
          -sin,
          centre_x - _product(cos, centre_x) + _product(sin, centre_y),
          sin,
          cos,
          centre_y - _product(sin, centre_x) - _product(cos, centre_y),
      ],
      axis=-1,
  )


def _shear_matrix(level: jax.Array, axis: int) -> jax.Array:
  """`[B, 6]`: ShearX (`axis=1`, x' = x + l y) or ShearY (y' = l x + y)."""
  level = level.astype(jnp.float32)
  one, zero = jnp.ones_like(level), jnp.zeros_like(level)
  if axis == 1:
    return jnp.stack([one, level, zero, zero, one, zero], axis=-1)
  return jnp.stack([one, zero, zero, level, one, zero], axis=-1)


def _shift_matrix(pixels: jax.Array, axis: int, size: int) -> jax.Array:
  """`[B, 6]` moving the content by `pixels` (rounded, half to even)."""
  shift = jnp.clip(jnp.round(pixels.astype(jnp.float32)), -size, size)
  one, zero = jnp.ones_like(shift), jnp.zeros_like(shift)
  if axis == 1:
    return jnp.stack([one, zero, -shift, zero, one, zero], axis=-1)
  return jnp.stack([one, zero, zero, zero, one, -shift], axis=-1)


def _cutout_stage(images, size, centre_y, centre_x) -> jax.Array:
  """Fills per-example `size` x `size` squares with grey (size 0: identity)."""
  height, width = images.shape[1:3]
  size = size.astype(jnp.int32)
  y0 = centre_y.astype(jnp.int32) - size // 2
  x0 = centre_x.astype(jnp.int32) - size // 2
  # Clipping the box to the image changes nothing for a mask.
  ys = jnp.arange(height)[None, :, None]
  xs = jnp.arange(width)[None, None, :]
  box = lambda v: v[:, None, None]
  inside = (
      (ys >= box(y0))
      & (ys < box(y0 + size))
      & (xs >= box(x0))
      & (xs < box(x0 + size))
  )
  return jnp.where(inside[..., None], jnp.uint8(FILL_VALUE), images)


# ---------------------------------------------------------------------------
# Operations with explicit arguments, on one uint8 image [H, W, 3]. Arguments
# may be traced (jit, vmap).


def identity(image: jax.Array) -> jax.Array:
  """Returns the image."""
  return jnp.asarray(image)


def invert(image: jax.Array) -> jax.Array:
  """`255 - image`."""
  return 255 - jnp.asarray(image)


def solarize(image: jax.Array, threshold) -> jax.Array:
  """Inverts the pixels `>= threshold` (256: identity, 0: invert)."""
  lut = _solarize_lut(_scalar(threshold, jnp.float32)[None])
  return _apply_lut(jnp.asarray(image)[None], lut)[0]


def solarize_add(image: jax.Array, addition, threshold=128) -> jax.Array:
  """Adds `addition` (clipped to 255) to the pixels below `threshold`."""
  lut = _solarize_add_lut(
      _scalar(addition, jnp.float32)[None],
      _scalar(threshold, jnp.float32)[None],
  )
  return _apply_lut(jnp.asarray(image)[None], lut)[0]


def posterize(image: jax.Array, bits) -> jax.Array:
  """Keeps the `bits` most significant bits of each pixel."""
  lut = _posterize_lut(_scalar(bits, jnp.int32)[None])
  return _apply_lut(jnp.asarray(image)[None], lut)[0]


def color(image: jax.Array, factor) -> jax.Array:
  """Saturation: 0 gives greyscale, 1 the image (PIL ImageEnhance.Color)."""
  return _single(_color_stage, jnp.asarray(image), factor)


def contrast(image: jax.Array, factor) -> jax.Array:
  """0 gives a flat image at the mean luma, 1 the image."""
  images = jnp.asarray(image)[None]
  _, _, sums = _channel_stats(images)
  mean = _mean_luma(sums, images.shape[1] * images.shape[2])
  lut = _contrast_lut(mean, _scalar(factor, jnp.float32)[None])
  return _apply_lut(images, lut)[0]


def brightness(image: jax.Array, factor) -> jax.Array:
  """0 gives black, 1 the image."""
  lut = _brightness_lut(_scalar(factor, jnp.float32)[None])
  return _apply_lut(jnp.asarray(image)[None], lut)[0]


def sharpness(image: jax.Array, factor) -> jax.Array:
  """0 gives PIL's SMOOTH-filtered image (border kept), 1 the image."""
  return _single(_sharpness_stage, jnp.asarray(image), factor)


def auto_contrast(image: jax.Array) -> jax.Array:
  """Stretches each channel to span [0, 255] (flat channels unchanged)."""
  images = jnp.asarray(image)[None]
  low, high, _ = _channel_stats(images)
  return _apply_lut(images, _auto_contrast_lut(low, high))[0]


def equalize(image: jax.Array) -> jax.Array:
  """Histogram equalisation of each channel (PIL's ImageOps.equalize)."""
  images = jnp.asarray(image)[None]
  return _apply_lut(images, _equalize_lut(_histogram(_lut_index(images))))[0]


def rotate(image: jax.Array, degrees) -> jax.Array:
  """Rotates about the image centre by `degrees` (counter-clockwise)."""
  image = jnp.asarray(image)
  matrix = _rotate_matrix(_scalar(degrees, jnp.float32)[None], *image.shape[:2])
  return _warp(image[None], matrix)[0]


def shear_x(image: jax.Array, level) -> jax.Array:
  """Samples input x at `x + level * y`."""
  matrix = _shear_matrix(_scalar(level, jnp.float32)[None], axis=1)
  return _warp(jnp.asarray(image)[None], matrix)[0]


def shear_y(image: jax.Array, level) -> jax.Array:
  """Samples input y at `level * x + y`."""
  matrix = _shear_matrix(_scalar(level, jnp.float32)[None], axis=0)
  return _warp(jnp.asarray(image)[None], matrix)[0]


def translate_x(image: jax.Array, pixels) -> jax.Array:
  """Moves the content `pixels` (rounded) to the right (negative: left)."""
  image = jnp.asarray(image)
  pixels = _scalar(pixels, jnp.float32)[None]
  return _warp(image[None], _shift_matrix(pixels, 1, image.shape[1]))[0]


def translate_y(image: jax.Array, pixels) -> jax.Array:
  """Moves the content `pixels` (rounded) down (negative: up)."""
  image = jnp.asarray(image)
  pixels = _scalar(pixels, jnp.float32)[None]
  return _warp(image[None], _shift_matrix(pixels, 0, image.shape[0]))[0]


def cutout(image: jax.Array, size, centre_y, centre_x) -> jax.Array:
  """Fills a `size` x `size` square centred at (y, x) with grey."""
  return _single(_cutout_stage, jnp.asarray(image), size, centre_y, centre_x)


# ---------------------------------------------------------------------------
# RandAugment: magnitude -> arguments, as `randaugment.py`, and the fused
# layer.


def _level(magnitude: float) -> float:
  return magnitude / MAX_LEVEL


def _scaled_level(scale: float, magnitude: float) -> np.float32:
  """float32 `scale * level`, rounded as in TF's `sign * scale * level`.

  The sign is +-1 and multiplies exactly, so the product of the two static
  numbers is computed here, outside anything XLA could fuse.

  Args:
    scale: the operation's scale at level 1 (0.9, 30, 0.3, 0.45).
    magnitude: the RandAugment magnitude.

  Returns:
    The float32 product.
  """
  return np.float32(np.float32(scale) * np.float32(_level(magnitude)))


def _enhance_factor(sign: jax.Array, magnitude: float) -> jax.Array:
  """`recipe.enhance_factor`, one per image (`sign` gives the shape)."""
  factor = np.float32(recipe.enhance_factor(magnitude))  # as TF's constant
  return jnp.full(sign.shape, factor, jnp.float32)


def _signed(sign: jax.Array, scale: float, magnitude: float) -> jax.Array:
  return sign * _scaled_level(scale, magnitude)


def _translate_pixels(sign, magnitude: float, side: int) -> jax.Array:
  return sign * _scaled_level(0.45, magnitude) * jnp.float32(side)


def _cutout_size(magnitude: float, height: int, width: int) -> int:
  # As TF: float32(0.36 * level) * float32(short side), rounded half to even.
  side = np.float32(0.36 * _level(magnitude)) * np.float32(min(height, width))
  return int(np.round(side))


def _draw(key: jax.Array, batch: int, height: int, width: int):
  """One layer's random choices for `batch` images.

  Args:
    key: PRNG key of the layer.
    batch: number of images.
    height: image height (cutout centres).
    width: image width.

  Returns:
    `(op_index, apply, sign, cutout_centre)`: int32 `[B]` index into
    `RANDAUGMENT_OPS`, bool `[B]` (with probability `APPLY_PROBABILITY`),
    float32 `[B]` +-1, int32 `[B, 2]` (y, x).
  """
  keys = jax.random.split(key, 6)
  op_index = jax.random.randint(keys[0], [batch], 0, len(RANDAUGMENT_OPS))
  apply = jax.random.uniform(keys[2], [batch]) < APPLY_PROBABILITY
  sign = jnp.where(jax.random.uniform(keys[3], [batch]) < 0.5, -1.0, 1.0)
  centre = jnp.stack(
      [
          jax.random.randint(keys[4], [batch], 0, height),
          jax.random.randint(keys[5], [batch], 0, width),
      ],
      axis=-1,
  )
  return op_index.astype(jnp.int32), apply, sign, centre.astype(jnp.int32)


def _layer(images, op_index, apply, sign, cutout_centre, magnitude: float):
  """One RandAugment layer with explicit per-example choices.

  The five stages of the module docstring, each the identity for the examples
  whose operation it does not hold; as each example has one operation (or
  none), the result is that operation alone. `randaugment` draws the choices
  (`_draw`); tests force them.

  Args:
    images: uint8 `[B, H, W, 3]`.
    op_index: int `[B]`, index into `RANDAUGMENT_OPS`.
    apply: bool `[B]`: whether to apply the operation.
    sign: float `[B]`, +-1: the sign of signed operations.
    cutout_centre: int `[B, 2]`: (y, x) centre of Cutout.
    magnitude: python float, the RandAugment magnitude.

  Returns:
    The uint8 images, each with its operation applied (or not).
  """
  _, height, width, _ = images.shape
  op = jnp.where(apply, op_index, -1)
  is_op = lambda name: op == _OP_INDEX[name]
  sign = sign.astype(jnp.float32)
  factor = _enhance_factor(sign, magnitude)

  # 1. Lookup tables, from statistics of the layer's input. Tables that do
  # not depend on the image are constants (`magnitude` is static).
  def constant(value, dtype=jnp.float32):
    return jnp.full([1], value, dtype)

  histogram = _equalize_histograms(images, is_op('Equalize'))
  low, high, sums = _channel_stats(images)
  tables = {
      'AutoContrast': _auto_contrast_lut(low, high),
      'Equalize': _equalize_lut(histogram),
      'Invert': _invert_lut(),
      'Posterize': _posterize_lut(
          constant(recipe.posterize_bits(magnitude), jnp.int32)
      ),
      'Solarize': _solarize_lut(constant(recipe.solarize_threshold(magnitude))),
      'SolarizeAdd': _solarize_add_lut(
          constant(recipe.solarize_addition(magnitude)), constant(128)
      ),
      'Contrast': _contrast_lut(_mean_luma(sums, height * width), factor),
      'Brightness': _brightness_lut(factor),
  }
  slot = jnp.zeros_like(op)  # Slot 0: the identity table.
  for k, name in enumerate(tables, 1):
    slot = jnp.where(is_op(name), k, slot)
  looked_up = _apply_lut(
      images, [_levels()[None, None]] + list(tables.values()), slot
  )

  # 2.-5., each the identity but for its operations' images.
  colour = jnp.where(is_op('Color'), factor, 1.0)
  sharpness = jnp.where(is_op('Sharpness'), factor, 1.0)
  matrix = jnp.broadcast_to(
      jnp.array(_IDENTITY_MATRIX, jnp.float32), (images.shape[0], 6)
  )
  for name, candidate in (
      ('Rotate', _rotate_matrix(_signed(sign, 30.0, magnitude), height, width)),
      ('ShearX', _shear_matrix(_signed(sign, 0.3, magnitude), axis=1)),
      ('ShearY', _shear_matrix(_signed(sign, 0.3, magnitude), axis=0)),
      (
          'TranslateX',
          _shift_matrix(_translate_pixels(sign, magnitude, width), 1, width),
      ),
      (
          'TranslateY',
          _shift_matrix(_translate_pixels(sign, magnitude, height), 0, height),
      ),
  ):
    matrix = jnp.where(is_op(name)[:, None], candidate, matrix)
  size = jnp.where(is_op('Cutout'), _cutout_size(magnitude, height, width), 0)
  arguments = (colour, sharpness, matrix, size, cutout_centre)

  batch = images.shape[0]
  capacity = _capacity(batch, len(_PIXEL_OPS))
  if capacity > 0.75 * batch:
    # Batches below 256 (58 of 64, all of 32): too little left out to pay
    # for the lookup tables' own pass, the gather and the scatter.
    return _pixel_stages(looked_up, *arguments)
  # Only the images whose operation is one of these need stages 2-5 (half
  # on average), and their lookup table is the identity: run the
  # stages on those, from the layer's input, and write them over the
  # looked-up batch. On more than `capacity` of them (probability <= 1e-12
  # per layer) the rest keep their input for this layer.
  chosen = _sub_batch(jnp.isin(op, jnp.array(_PIXEL_OP_INDICES)), capacity)
  out = _pixel_stages(
      _take(images, chosen), *(_take(a, chosen) for a in arguments)
  )
  return looked_up.at[chosen].set(out, mode='drop')


def _pixel_stages(images, colour, sharpness, matrix, size, cutout_centre):
  """Stages 2-5 of a layer, with per-example arguments (see `_layer`)."""
  # 2. Colour and 3. Sharpness, side by side on the same input.
  images = _sharpness_stage(
      images, sharpness, centre=_color_stage(images, colour)
  )
  # 4. One affine warp.
  images = _warp(images, matrix)
  # 5. Cutout.
  return _cutout_stage(images, size, cutout_centre[:, 0], cutout_centre[:, 1])


def randaugment(
    images: jax.Array, key: jax.Array, *, num_layers: int, magnitude: float
) -> jax.Array:
  """Applies `num_layers` random operations of strength `magnitude`.

  Per image and layer, as `nfnets.data.randaugment.randaugment`: an operation
  drawn uniformly from `RANDAUGMENT_OPS` and applied (`APPLY_PROBABILITY`),
  with a random sign.

  Args:
    images: uint8 `[B, H, W, 3]`.
    key: JAX PRNG key.
    num_layers: operations applied in sequence (0: identity); static.
    magnitude: strength on the 0..10(+) scale of `randaugment.py`; static.

  Returns:
    The augmented uint8 images, same shape.
  """
  if magnitude < 0:
    raise ValueError(f'RandAugment magnitude={magnitude} must be >= 0.')
  if num_layers < 0:
    raise ValueError(f'RandAugment num_layers={num_layers} must be >= 0.')
  images = jnp.asarray(images)
  if images.dtype != jnp.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(
        f'images must be uint8 [B, H, W, 3], got {images.dtype}'
        f' {images.shape}.'
    )
  if not num_layers:
    return images
  batch, height, width = images.shape[:3]

  def body(images, layer_key):
    choices = _draw(layer_key, batch, height, width)
    return _layer(images, *choices, magnitude=float(magnitude)), None

  # A loop, not a Python loop: each layer's output is then materialised once.
  # Unrolled, XLA fused a layer's last stage into each of the next layer's
  # statistics and recomputed it for every one (twice as slow on CPU; with
  # optimisation barriers between the layers, 2.6 times). Its trip count is
  # static, which XLA's GPU backend runs without reading a flag back.
  images, _ = jax.lax.scan(body, images, jax.random.split(key, num_layers))
  return images


# ---------------------------------------------------------------------------
# MixUp / CutMix and normalisation.


def _reverse_parts(x: jax.Array, sizes) -> jax.Array:
  """Reverses each consecutive part of `x` (leading axis) of the `sizes`."""
  parts, start = [], 0
  for size in sizes:
    parts.append(jnp.flip(x[start : start + size], axis=0))
    start += size
  parts.append(x[start:])
  return jnp.concatenate(parts, axis=0)


# Marsaglia-Tsang proposals drawn per Gamma variate. Each is accepted with
# probability above 0.95 for the shapes used here (>= 1), so all of them fail
# with probability below 1e-20.
_GAMMA_PROPOSALS = 16


def _log_gamma(key: jax.Array, alpha: float, size: int) -> jax.Array:
  """log of `size` Gamma(alpha, 1) draws, without a loop on the device.

  `jax.random.gamma` rejection-samples in a `while_loop` whose trip count
  depends on the draws, so an accelerator's host has to read a flag back
  from the device every iteration. Here Marsaglia and Tsang's method (2000)
  draws a fixed number of proposals at once and keeps the first accepted;
  shapes below 1 use their boost, `Gamma(a) = Gamma(a + 1) * U**(1 / a)`,
  in log space, so that tiny alphas do not underflow.

  Args:
    key: PRNG key.
    alpha: the shape, > 0 (static).
    size: number of draws.

  Returns:
    float32 `[size]` log-draws (-inf for an underflowed boost, rarely).
  """
  boost = alpha < 1.0
  shape = alpha + 1.0 if boost else alpha
  d = shape - 1.0 / 3.0
  c = 1.0 / math.sqrt(9.0 * d)
  normal_key, accept_key, boost_key = jax.random.split(key, 3)
  x = jax.random.normal(normal_key, (_GAMMA_PROPOSALS, size), jnp.float32)
  u = jax.random.uniform(accept_key, (_GAMMA_PROPOSALS, size), jnp.float32)
  v = (1.0 + c * x) ** 3
  log_v = jnp.log(jnp.where(v > 0, v, 1.0))
  accepted = (v > 0) & (jnp.log(u) < 0.5 * x * x + d - d * v + d * log_v)
  first = jnp.argmax(accepted, axis=0)  # The first accepted (0 if none).
  log_draw = math.log(d) + jnp.take_along_axis(log_v, first[None], axis=0)[0]
  if boost:
    log_draw += jnp.log(jax.random.uniform(boost_key, (size,))) / alpha
  return log_draw


def _symmetric_beta(key: jax.Array, alpha: float, size: int) -> jax.Array:
  """`size` Beta(alpha, alpha) draws as `X / (X + Y)` of Gamma draws."""
  x_key, y_key = jax.random.split(key)
  log_ratio = _log_gamma(x_key, alpha, size) - _log_gamma(y_key, alpha, size)
  # Both boosts underflowing (-inf - -inf): call that an even mix.
  return jnp.where(jnp.isnan(log_ratio), 0.5, jax.nn.sigmoid(log_ratio))


def mix_batch(
    images: jax.Array,
    labels: jax.Array,
    key: jax.Array,
    *,
    mixup_alpha: float,
    cutmix: bool,
) -> Tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """MixUp / CutMix of one device batch (recipe: `nfnets.data.mixing`).

  MixUp on the first `num_mixup` examples, CutMix on the next `num_cutmix`
  (`mixing.split_sizes`); each example is mixed with its mirror within its
  part. Mixing is linear, so it may run before or after normalisation.

  Args:
    images: float32 `[B, H, W, C]`.
    labels: int `[B]`.
    key: JAX PRNG key of this device batch.
    mixup_alpha: Beta(alpha, alpha) parameter of MixUp; 0 turns MixUp off.
    cutmix: whether to CutMix.

  Returns:
    `(images, labels, labels2, mix_ratio)`: mixed float32 images, int32
    labels, the partners' int32 labels and float32 `[B]` weights of `labels`.
    Without mixing, `labels2 == labels` and `mix_ratio == 1`.
  """
  if mixup_alpha < 0:
    raise ValueError(f'mixup_alpha={mixup_alpha} must be >= 0.')
  images = jnp.asarray(images, jnp.float32)
  labels = jnp.asarray(labels).astype(jnp.int32)
  batch, height, width = images.shape[:3]
  num_mixup, num_cutmix = mixing.split_sizes(batch, mixup_alpha, cutmix)
  rest = batch - num_mixup - num_cutmix
  mixup_key, cutmix_key = jax.random.split(key)
  partner = _reverse_parts(images, (num_mixup, num_cutmix))
  labels2 = _reverse_parts(labels, (num_mixup, num_cutmix))
  out_images, ratios = [], []

  if num_mixup:
    lam = _symmetric_beta(mixup_key, mixup_alpha, num_mixup)
    weight = lam[:, None, None, None]
    out_images.append(
        weight * images[:num_mixup] + (1.0 - weight) * partner[:num_mixup]
    )
    ratios.append(lam)

  if num_cutmix:
    part = slice(num_mixup, num_mixup + num_cutmix)
    lam_key, y_key, x_key = jax.random.split(cutmix_key, 3)
    lam = jax.random.uniform(lam_key, [num_cutmix])
    centre_y = jax.random.randint(y_key, [num_cutmix], 0, height)
    centre_x = jax.random.randint(x_key, [num_cutmix], 0, width)
    y0, y1, x0, x1 = mixing.cutmix_boxes(
        height, width, lam, centre_y, centre_x, xp=jnp
    )
    ys = jnp.arange(height)[None, :, None]
    xs = jnp.arange(width)[None, None, :]
    box = lambda v: v[:, None, None]
    in_box = (ys >= box(y0)) & (ys < box(y1)) & (xs >= box(x0)) & (xs < box(x1))
    out_images.append(jnp.where(in_box[..., None], partner[part], images[part]))
    pasted = _divide(
        ((y1 - y0) * (x1 - x0)).astype(jnp.float32), float(height * width)
    )
    ratios.append(1.0 - pasted)

  if rest:
    out_images.append(images[batch - rest :])
    ratios.append(jnp.ones([rest], jnp.float32))

  return (
      jnp.concatenate(out_images, axis=0),
      labels,
      labels2,
      jnp.concatenate(ratios, axis=0),
  )


def normalize(images: jax.Array) -> jax.Array:
  """uint8/float RGB `[..., 3]` -> float32 with ImageNet mean and std."""
  return jnp.asarray(images).astype(jnp.float32) * _NORM_SCALE + _NORM_OFFSET


def augment_batch(
    images: jax.Array,
    labels: jax.Array,
    key: jax.Array,
    *,
    randaugment_layers: int,
    randaugment_magnitude: float,
    mixup_alpha: float,
    cutmix: bool,
) -> Dict[str, jax.Array]:
  """The device half of the train pipeline for one device batch.

  RandAugment (skipped when `randaugment_layers == 0`), conversion to float,
  MixUp / CutMix and normalisation. Pure and jit / pmap compatible; bind the
  (static) configuration with `functools.partial` before jitting.

  Args:
    images: uint8 `[B, S, S, 3]`, decoded, cropped, resized and flipped.
    labels: int `[B]`.
    key: JAX PRNG key of this device batch.
    randaugment_layers: RandAugment operations per image (0: off).
    randaugment_magnitude: RandAugment strength (see `randaugment.py`).
    mixup_alpha: MixUp's Beta(alpha, alpha) parameter (0: off).
    cutmix: whether to CutMix.

  Returns:
    `{'images': float32 [B, S, S, 3], 'labels': int32 [B], 'labels2': int32
    [B], 'mix_ratio': float32 [B]}`, as the tf.data train batches.
  """
  augment_key, mix_key = jax.random.split(key)
  images = jnp.asarray(images)
  if randaugment_layers:
    images = randaugment(
        images,
        augment_key,
        num_layers=randaugment_layers,
        magnitude=randaugment_magnitude,
    )
  images, labels, labels2, ratio = mix_batch(
      images.astype(jnp.float32),
      labels,
      mix_key,
      mixup_alpha=mixup_alpha,
      cutmix=cutmix,
  )
  return {
      'images': normalize(images),
      'labels': labels,
      'labels2': labels2,
      'mix_ratio': ratio,
  }
