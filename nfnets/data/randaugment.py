"""RandAugment (Cubuk et al. 2020) in TensorFlow ops on uint8 RGB images.

`randaugment(image, seed, num_layers=N, magnitude=M)` applies N operations in
sequence, each drawn uniformly from `RANDAUGMENT_OPS`, as the
AutoAugment/RandAugment code the NFNets release used. That code also draws a
probability in [0.2, 0.8] per operation but never uses it, so every layer
applies its operation (`APPLY_PROBABILITY`). The 16 operations are those of
that code: AutoContrast, Equalize, Invert, Rotate, Posterize, Solarize,
Color, Contrast, Brightness, Sharpness, ShearX, ShearY, TranslateX,
TranslateY, Cutout and SolarizeAdd (`Identity` is available by name too).

Magnitudes map to arguments as in that code (M = 10 is the usual maximum;
NFNets use 5, 10 and 15). With `level = M / 10`:

  Rotate       +-30 * level degrees            ShearX/Y   +-0.3 * level
  TranslateX/Y +-0.45 * level of the side      Cutout     square of side
  Posterize    keep int(4 * level) bits                     0.36 * level of
  Solarize     invert pixels >= int(256 * level)            the short side
  SolarizeAdd  add int(110 * level) to pixels < 128
  Color, Contrast, Brightness, Sharpness: enhance factor 0.1 + 1.8 * level

The sign (+-) is drawn per application. The release gives translations and
Cutout in pixels (100 and 2 x 40 at level 1, for 224-pixel images); here they
are fractions of the side that give the same at 224 pixels, and scale with
the image. So at M = 5 (F0) the enhance operations are the identity and
Posterize keeps 2 bits; at M = 15 (F3-F7) Solarize is the identity, the
enhance factor is 2.8 and Posterize keeps 6 bits. (An earlier version used
the 'increasing' scale of later RandAugment code, 1 +- 0.9 * level, which at
M = 15 turned one image in ten into a single flat colour.) AutoContrast,
Equalize and Invert have no magnitude. Geometric operations use
nearest-neighbour sampling and fill with grey (128), as PIL and the
reference code do.
"""

import functools
import math
from typing import Callable, Dict, Sequence

import tensorflow as tf

from nfnets.data import augment
from nfnets.data import recipe
from nfnets.data import tf_cpu

tf_cpu.hide_accelerators()

MAX_LEVEL = recipe.MAX_LEVEL
FILL_VALUE = recipe.FILL_VALUE
APPLY_PROBABILITY = recipe.APPLY_PROBABILITY
RANDAUGMENT_OPS = recipe.RANDAUGMENT_OPS
enhance_factor = recipe.enhance_factor
posterize_bits = recipe.posterize_bits
solarize_threshold = recipe.solarize_threshold
solarize_addition = recipe.solarize_addition


# ---------------------------------------------------------------------------
# Operations with explicit arguments. Images are uint8 [H, W, 3].
#
# Speed matters (every training image goes through several of these), and on
# CPU some TensorFlow idioms are several times slower than others: masks
# (tf.where over the image) and arithmetic broadcast along the channel axis.
# So per-pixel maps are 256-entry lookup tables, per-pixel channel mixes are
# 1x1 convolutions (`augment.channel_affine`), and boxes are pasted with
# slices.

# ITU-R 601 luma, PIL's RGB -> 'L' conversion.
_LUMA = (0.299, 0.587, 0.114)
_LEVELS = 256


def _channel_index(image: tf.Tensor) -> tf.Tensor:
  """int32 `pixel + 256 * channel`: indexes a flattened `[3, 256]` table."""
  # The offsets are tiled to the full shape because adding a broadcast [3]
  # vector is slow.
  pixels = tf.size(image) // 3
  offsets = tf.tile(tf.range(0, 3 * _LEVELS, _LEVELS), [pixels])
  return tf.cast(image, tf.int32) + tf.reshape(offsets, tf.shape(image))


def _apply_lut(image: tf.Tensor, lut: tf.Tensor, index=None) -> tf.Tensor:
  """Maps every pixel through `lut`: `[256]`, or `[3, 256]` per channel.

  Args:
    image: uint8 `[H, W, 3]`.
    lut: float table, rounded and clipped to uint8 here.
    index: `_channel_index(image)` if already computed (per-channel tables).

  Returns:
    The uint8 image.
  """
  if lut.shape.rank == 2:
    index = _channel_index(image) if index is None else index
    lut = tf.reshape(lut, [-1])
  else:
    index = tf.cast(image, tf.int32)
  return tf.gather(augment.to_uint8(tf.cast(lut, tf.float32)), index)


def _levels() -> tf.Tensor:
  return tf.range(_LEVELS, dtype=tf.float32)


def _luma_matrix(factor) -> tf.Tensor:
  """3x3 matrix blending each pixel with its luma: `f * I + (1 - f) * L`."""
  luma = tf.constant(_LUMA, tf.float32)
  to_grey = tf.tile(luma[:, None], [1, 3])  # Every output channel = luma.
  return factor * tf.eye(3) + (1.0 - factor) * to_grey


def identity(image: tf.Tensor) -> tf.Tensor:
  return image


def invert(image: tf.Tensor) -> tf.Tensor:
  return 255 - image


def solarize(image: tf.Tensor, threshold) -> tf.Tensor:
  """Inverts the pixels `>= threshold` (256: identity, 0: invert)."""
  levels = _levels()
  return _apply_lut(
      image,
      tf.where(
          levels >= tf.cast(threshold, tf.float32), 255.0 - levels, levels
      ),
  )


def solarize_add(image: tf.Tensor, addition, threshold: int = 128):
  """Adds `addition` (clipped to 255) to the pixels below `threshold`."""
  levels = _levels()
  added = levels + tf.cast(addition, tf.float32)
  return _apply_lut(image, tf.where(levels < threshold, added, levels))


def posterize(image: tf.Tensor, bits) -> tf.Tensor:
  """Keeps the `bits` most significant bits of each pixel."""
  shift = tf.cast(8 - bits, tf.uint8)
  return tf.bitwise.left_shift(tf.bitwise.right_shift(image, shift), shift)


def color(image: tf.Tensor, factor) -> tf.Tensor:
  """Saturation: 0 gives greyscale, 1 the image (PIL ImageEnhance.Color)."""
  return augment.to_uint8(
      augment.channel_affine(
          tf.cast(image, tf.float32), _luma_matrix(factor), tf.zeros([3])
      )
  )


def contrast(image: tf.Tensor, factor) -> tf.Tensor:
  """0 gives a flat image at the mean luma, 1 the image."""
  # Luma is linear: its mean is the luma of the channel means.
  channel_means = tf.reduce_mean(tf.cast(image, tf.float32), axis=[0, 1])
  mean = tf.round(tf.reduce_sum(channel_means * tf.constant(_LUMA)))
  return _apply_lut(image, mean + factor * (_levels() - mean))


def brightness(image: tf.Tensor, factor) -> tf.Tensor:
  """0 gives black, 1 the image."""
  return _apply_lut(image, factor * _levels())


def sharpness(image: tf.Tensor, factor) -> tf.Tensor:
  """0 gives PIL's SMOOTH-filtered image (border kept), 1 the image."""
  kernel = (
      tf.constant([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
  )
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  pixels = tf.cast(image, tf.float32)
  smooth = tf.round(
      tf.nn.depthwise_conv2d(pixels[None], kernel, [1, 1, 1, 1], 'VALID')[0]
  )
  interior = pixels[1:-1, 1:-1]
  blended = augment.to_uint8(smooth + factor * (interior - smooth))
  # PIL leaves the one-pixel border unfiltered, so it stays as it was.
  shape = tf.shape(image)
  return augment.paste_box(image, blended, 1, shape[0] - 1, 1, shape[1] - 1)


def auto_contrast(image: tf.Tensor) -> tf.Tensor:
  """Stretches each channel to span [0, 255] (flat channels unchanged)."""
  pixels = tf.cast(image, tf.float32)
  low = tf.reduce_min(pixels, axis=[0, 1])[:, None]
  high = tf.reduce_max(pixels, axis=[0, 1])[:, None]
  spread = high > low
  scale = tf.where(spread, 255.0 / tf.maximum(high - low, 1.0), 1.0)
  offset = tf.where(spread, -low * scale, 0.0)
  return _apply_lut(image, _levels()[None] * scale + offset)


def equalize(image: tf.Tensor) -> tf.Tensor:
  """Histogram equalisation of each channel (PIL's ImageOps.equalize)."""
  index = _channel_index(image)
  histogram = tf.reshape(
      tf.math.bincount(
          tf.reshape(index, [-1]),
          minlength=3 * _LEVELS,
          maxlength=3 * _LEVELS,
      ),
      [3, _LEVELS],
  )
  # PIL: step = (pixels - count of the highest level present) // 255.
  highest = (
      _LEVELS
      - 1
      - tf.argmax(
          tf.reverse(tf.cast(histogram > 0, tf.int32), [1]),
          axis=1,
          output_type=tf.int32,
      )
  )
  top_count = tf.gather(histogram, highest, batch_dims=1)
  step = (tf.reduce_sum(histogram, axis=1) - top_count) // 255
  step = step[:, None]
  lut = (tf.cumsum(histogram, axis=1, exclusive=True) + step // 2) // (
      tf.maximum(step, 1)
  )
  # A channel with (almost) one value has nothing to equalise.
  lut = tf.where(step > 0, lut, tf.range(_LEVELS)[None])
  return _apply_lut(image, tf.cast(lut, tf.float32), index)


def _transform(image: tf.Tensor, matrix: Sequence) -> tf.Tensor:
  """Samples `image` at `matrix @ (x, y, 1)` per output pixel (nearest)."""
  transform = tf.cast(tf.stack(list(matrix) + [0.0, 0.0]), tf.float32)
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None],
      transforms=transform[None],
      output_shape=tf.shape(image)[:2],
      fill_value=float(FILL_VALUE),
      interpolation='NEAREST',
      fill_mode='CONSTANT',
  )[0]
  return tf.ensure_shape(out, image.shape)


def rotate(image: tf.Tensor, degrees) -> tf.Tensor:
  """Rotates about the image centre by `degrees` (counter-clockwise)."""
  angle = tf.cast(degrees, tf.float32) * (math.pi / 180.0)
  height = tf.cast(tf.shape(image)[0], tf.float32)
  width = tf.cast(tf.shape(image)[1], tf.float32)
  centre_y, centre_x = (height - 1.0) / 2.0, (width - 1.0) / 2.0
  cos, sin = tf.cos(angle), tf.sin(angle)
  return _transform(
      image,
      [
          cos,
          -sin,
          centre_x - cos * centre_x + sin * centre_y,
          sin,
          cos,
          centre_y - sin * centre_x - cos * centre_y,
      ],
  )


def shear_x(image: tf.Tensor, level) -> tf.Tensor:
  return _transform(image, [1.0, level, 0.0, 0.0, 1.0, 0.0])


def shear_y(image: tf.Tensor, level) -> tf.Tensor:
  return _transform(image, [1.0, 0.0, 0.0, level, 1.0, 0.0])


def _shift(image: tf.Tensor, pixels, axis: int) -> tf.Tensor:
  """Moves the content by `pixels` (rounded) along `axis`, filling grey."""
  size = tf.shape(image)[axis]
  shift = tf.clip_by_value(
      tf.cast(tf.round(tf.cast(pixels, tf.float32)), tf.int32), -size, size
  )
  before, after = tf.maximum(shift, 0), tf.maximum(-shift, 0)
  begin = tf.one_hot(axis, 3, on_value=after, off_value=0)
  extent = tf.one_hot(axis, 3, on_value=size - before - after, off_value=-1)
  kept = tf.slice(image, begin, extent)
  padding = [[0, 0], [0, 0], [0, 0]]
  padding[axis] = [before, after]
  return tf.pad(kept, padding, constant_values=FILL_VALUE)


def translate_x(image: tf.Tensor, pixels) -> tf.Tensor:
  """Moves the content `pixels` to the right (negative: left)."""
  return _shift(image, pixels, axis=1)


def translate_y(image: tf.Tensor, pixels) -> tf.Tensor:
  """Moves the content `pixels` down (negative: up)."""
  return _shift(image, pixels, axis=0)


def cutout(image: tf.Tensor, size, centre_y, centre_x) -> tf.Tensor:
  """Fills a `size` x `size` square centred at (y, x) with grey."""
  shape = tf.shape(image)
  y0 = tf.clip_by_value(centre_y - size // 2, 0, shape[0])
  x0 = tf.clip_by_value(centre_x - size // 2, 0, shape[1])
  y1 = tf.clip_by_value(centre_y - size // 2 + size, 0, shape[0])
  x1 = tf.clip_by_value(centre_x - size // 2 + size, 0, shape[1])
  grey = tf.fill([y1 - y0, x1 - x0, 3], tf.constant(FILL_VALUE, tf.uint8))
  return augment.paste_box(image, grey, y0, y1, x0, x1)


# ---------------------------------------------------------------------------
# Magnitude -> arguments. Each entry takes (image, magnitude, seed).


def _sign(seed: tf.Tensor) -> tf.Tensor:
  return tf.where(tf.random.stateless_uniform([], seed) < 0.5, -1.0, 1.0)


def _level(magnitude: float) -> float:
  return magnitude / MAX_LEVEL


def _enhance(op: Callable, image, magnitude, seed):
  del seed
  return op(image, tf.constant(enhance_factor(magnitude), tf.float32))


def _signed(op: Callable, scale: float, image, magnitude, seed):
  return op(image, _sign(seed) * scale * _level(magnitude))


def _translate(op: Callable, axis: int, image, magnitude, seed):
  side = tf.cast(tf.shape(image)[axis], tf.float32)
  return op(image, _sign(seed) * 0.45 * _level(magnitude) * side)


def _posterize(image, magnitude, seed):
  del seed
  bits = posterize_bits(magnitude)
  if not bits:  # A shift by 8 is undefined for uint8; no bit kept is 0.
    return tf.zeros_like(image)
  return posterize(image, bits)


def _solarize(image, magnitude, seed):
  del seed
  return solarize(image, solarize_threshold(magnitude))


def _solarize_add(image, magnitude, seed):
  del seed
  return solarize_add(image, solarize_addition(magnitude))


def _cutout(image, magnitude, seed):
  shape = tf.shape(image)
  short_side = tf.cast(tf.minimum(shape[0], shape[1]), tf.float32)
  size = tf.cast(tf.round(0.36 * _level(magnitude) * short_side), tf.int32)
  seed_y, seed_x = augment.split_seed(seed, 2)
  centre_y = tf.random.stateless_uniform(
      [], seed_y, 0, shape[0], dtype=tf.int32
  )
  centre_x = tf.random.stateless_uniform(
      [], seed_x, 0, shape[1], dtype=tf.int32
  )
  return cutout(image, size, centre_y, centre_x)


def _no_magnitude(op: Callable, image, magnitude, seed):
  del magnitude, seed
  return op(image)


OPS: Dict[str, Callable] = {
    'Identity': functools.partial(_no_magnitude, identity),
    'AutoContrast': functools.partial(_no_magnitude, auto_contrast),
    'Equalize': functools.partial(_no_magnitude, equalize),
    'Invert': functools.partial(_no_magnitude, invert),
    'Rotate': functools.partial(_signed, rotate, 30.0),
    'Posterize': _posterize,
    'Solarize': _solarize,
    'Color': functools.partial(_enhance, color),
    'Contrast': functools.partial(_enhance, contrast),
    'Brightness': functools.partial(_enhance, brightness),
    'Sharpness': functools.partial(_enhance, sharpness),
    'ShearX': functools.partial(_signed, shear_x, 0.3),
    'ShearY': functools.partial(_signed, shear_y, 0.3),
    'TranslateX': functools.partial(_translate, translate_x, 1),
    'TranslateY': functools.partial(_translate, translate_y, 0),
    'Cutout': _cutout,
    'SolarizeAdd': _solarize_add,
}


def apply_op(
    name: str, image: tf.Tensor, magnitude: float, seed: tf.Tensor
) -> tf.Tensor:
  """Applies the operation `name` at `magnitude` (random sign from `seed`).

  Args:
    name: a key of `OPS`.
    image: uint8 `[H, W, 3]`.
    magnitude: RandAugment magnitude (see the module docstring).
    seed: `[2]` int seed of the operation's random choices.

  Returns:
    The uint8 image, same shape.
  """
  if name not in OPS:
    raise ValueError(f'Unknown RandAugment operation {name!r}; known: {OPS}.')
  out = OPS[name](image, float(magnitude), seed)
  return tf.ensure_shape(out, image.shape)


def randaugment(
    image: tf.Tensor,
    seed: tf.Tensor,
    *,
    num_layers: int,
    magnitude: float,
    ops: Sequence[str] = RANDAUGMENT_OPS,
) -> tf.Tensor:
  """Applies `num_layers` random operations of strength `magnitude`.

  Args:
    image: uint8 `[H, W, 3]` (static shape).
    seed: `[2]` int64 seed; the result is a function of (image, seed).
    num_layers: operations applied in sequence (0: identity).
    magnitude: strength on the 0..10(+) scale of the module docstring.
    ops: names of the operations to choose from.

  Returns:
    The augmented uint8 image, same shape.
  """
  if magnitude < 0:
    raise ValueError(f'RandAugment magnitude={magnitude} must be >= 0.')
  for layer in range(num_layers):
    image = _layer(
        image, augment.fold_in(seed, layer), float(magnitude), tuple(ops)
    )
  return image


@tf.function(autograph=False)
def _layer(image, seed, magnitude, ops):
  """One RandAugment layer.

  A `tf.function` so that its graph (every operation, as a switch) is traced
  once per image shape and configuration and shared by all layers and
  pipelines: inlining it per layer made building a pipeline take seconds.

  Args:
    image: uint8 `[H, W, 3]`.
    seed: `[2]` int64 seed of this layer.
    magnitude: python float.
    ops: python tuple of operation names.

  Returns:
    The uint8 image, same shape.
  """
  choice_seed, apply_seed, _, op_seed = augment.split_seed(seed, 4)
  op_index = tf.random.stateless_uniform(
      [], choice_seed, 0, len(ops), dtype=tf.int32
  )
  apply = tf.random.stateless_uniform([], apply_seed) < APPLY_PROBABILITY
  branches = [
      functools.partial(apply_op, name, image, magnitude, op_seed)
      for name in ops
  ]
  out = tf.cond(
      apply, lambda: tf.switch_case(op_index, branches), lambda: image
  )
  return tf.ensure_shape(out, image.shape)
