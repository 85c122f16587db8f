"""Per-image decoding, crops, flips and resizes, and batch mixing, in tf ops.

Train images: the Inception-style crop (a random box of 8%-100% of the area
and aspect ratio 3/4-4/3, 10 attempts, else a centre crop) is decoded directly
from the JPEG bytes with `tf.image.decode_and_crop_jpeg`, so the rest of the
image is never decoded; then a bicubic resize to S x S and a random
horizontal flip. Non-JPEG files (PNG, GIF, BMP, e.g. CIFAR in TFDS or a PNG
named `.JPEG`) are fully decoded, then cropped the same way.

Eval images: `'resize_crop'` resizes to (S+32) x (S+32), ignoring the aspect
ratio, and takes the centre S x S (the NFNets recipe); `'crop_resize'` takes
the centre square of side S/(S+32) of the short side (aspect preserving) and
resizes it to S x S.

Per-image results stay uint8 (RandAugment works on uint8, and batching a
quarter of the bytes is cheaper); conversion to float, MixUp / CutMix and
normalisation run once per device batch. Several idioms here (1x1
convolutions for per-channel arithmetic, `tf.reverse`, slicing instead of
masks) are there because the obvious ones are several times slower on CPU.

All randomness is stateless (`tf.random.stateless_*` with explicit `[2]`
int64 seeds), so an image's augmentation is a function of its seed alone.
"""

from typing import Tuple

import tensorflow as tf

from nfnets.data import batching
from nfnets.data import mixing
from nfnets.data import tf_cpu

tf_cpu.hide_accelerators()

# Inception crop parameters (Szegedy et al. 2015, as in the NFNets release).
AREA_RANGE = (0.08, 1.0)
ASPECT_RATIO_RANGE = (3 / 4, 4 / 3)
MAX_ATTEMPTS = 10
# Eval crops leave this margin: S/(S + 32) of the image is kept.
CROP_PADDING = 32


def split_seed(seed: tf.Tensor, num: int):
  """`num` independent `[2]` seeds from one."""
  return tf.unstack(tf.random.experimental.stateless_split(seed, num))


def fold_in(seed: tf.Tensor, data) -> tf.Tensor:
  """A new `[2]` seed for `(seed, data)`; `data` an int64 scalar."""
  return tf.random.experimental.stateless_fold_in(seed, tf.cast(data, tf.int64))


def centre_window(shape: tf.Tensor, image_size: int) -> tf.Tensor:
  """`[y, x, h, w]` of the centred square of side S/(S+32) * short side."""
  height, width = shape[0], shape[1]
  fraction = image_size / (image_size + CROP_PADDING)
  side = tf.cast(
      tf.round(fraction * tf.cast(tf.minimum(height, width), tf.float32)),
      tf.int32,
  )
  side = tf.maximum(side, 1)
  offset_y = (height - side + 1) // 2
  offset_x = (width - side + 1) // 2
  return tf.stack([offset_y, offset_x, side, side])


def random_window(
    shape: tf.Tensor, seed: tf.Tensor, image_size: int
) -> tf.Tensor:
  """`[y, x, h, w]` of an Inception-style random crop of an image `shape`."""
  whole_image = tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4])
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape,
      bounding_boxes=whole_image,
      seed=seed,
      min_object_covered=0.1,
      aspect_ratio_range=ASPECT_RATIO_RANGE,
      area_range=AREA_RANGE,
      max_attempts=MAX_ATTEMPTS,
      use_image_if_no_bounding_boxes=True,
  )
  window = tf.stack([begin[0], begin[1], size[0], size[1]])
  # The sampler returns the whole image when all attempts fail; use the eval
  # crop then, as the Inception recipe does, rather than a squashed image.
  failed = tf.logical_and(
      tf.equal(size[0], shape[0]), tf.equal(size[1], shape[1])
  )
  return tf.where(failed, centre_window(shape, image_size), window)


# JPEG decoders can scale by these factors during the inverse DCT.
DCT_SCALE_RATIOS = (8, 4, 2)


def decode_window(
    image_bytes: tf.Tensor,
    window_fn,
    dct_method: str = '',
    min_size=None,
) -> tf.Tensor:
  """Decodes the crop `window_fn(shape)` of an encoded image: uint8 RGB.

  Args:
    image_bytes: a JPEG, PNG, GIF or BMP file's bytes.
    window_fn: maps the `[H, W, C]` shape to the `[y, x, h, w]` crop window.
    dct_method: JPEG IDCT: `''` (libjpeg's accurate default) or
      `'INTEGER_FAST'` (about 20-30% faster decoding, pixel errors of a level
      or two: used for training, where the crop, resize and augmentations
      dwarf them).
    min_size: if set, a JPEG crop whose short side is at least `r * min_size`
      is decoded at 1/r scale (r = 8, 4 or 2, the largest that fits) by the
      JPEG decoder's scaled IDCT, which is several times cheaper than decoding
      at full size and resizing the r-times larger result; the short side
      stays >= `min_size`, so the later resize still only shrinks. The window
      is then located to within r original pixels.

  Returns:
    The crop, uint8 `[h, w, 3]` (`[h // r, w // r, 3]` when scaled).
  """

  def jpeg():
    shape = tf.image.extract_jpeg_shape(image_bytes)
    window = window_fn(shape)

    def scaled(ratio):
      return lambda: tf.image.decode_and_crop_jpeg(
          image_bytes,
          window // ratio,
          channels=3,
          dct_method=dct_method,
          ratio=ratio,
      )

    if min_size is None:
      return scaled(1)()
    short_side = tf.minimum(window[2], window[3])
    ratio_index = tf.reduce_sum(
        tf.cast(
            short_side >= tf.constant(DCT_SCALE_RATIOS) * min_size, tf.int32
        )
    )
    # Index 0: no ratio fits (full size); index i: DCT_SCALE_RATIOS[-i].
    branches = [scaled(1)] + [scaled(r) for r in reversed(DCT_SCALE_RATIOS)]
    return tf.switch_case(ratio_index, branches)

  def other():
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    window = window_fn(tf.shape(image))
    return tf.slice(image, [window[0], window[1], 0], [window[2], window[3], 3])

  return tf.cond(tf.io.is_jpeg(image_bytes), jpeg, other)


def decode(image_bytes: tf.Tensor) -> tf.Tensor:
  """Decodes a whole JPEG/PNG/GIF/BMP image to uint8 RGB `[H, W, 3]`."""
  image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def to_uint8(image: tf.Tensor) -> tf.Tensor:
  """Rounds and clips a float image (e.g. bicubic overshoot) to uint8."""
  return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def random_flip(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """Mirrors left-right with probability 1/2."""
  return tf.image.stateless_random_flip_left_right(image, seed)


def train_image(
    image_bytes: tf.Tensor, seed: tf.Tensor, image_size: int
) -> tf.Tensor:
  """Random crop, bicubic resize to `image_size` and flip: uint8 `[S, S, 3]`."""
  crop_seed, flip_seed = split_seed(seed, 2)
  image = decode_window(
      image_bytes,
      lambda shape: random_window(shape, crop_seed, image_size),
      dct_method='INTEGER_FAST',
      min_size=image_size,
  )
  image = tf.image.resize(image, [image_size, image_size], method='bicubic')
  image = random_flip(image, flip_seed)
  image = to_uint8(image)
  image.set_shape([image_size, image_size, 3])
  return image


def eval_image(
    image_bytes: tf.Tensor, image_size: int, method: str
) -> tf.Tensor:
  """Deterministic eval crop (see module docstring): uint8 `[S, S, 3]`."""
  if method == 'resize_crop':
    resized = image_size + CROP_PADDING
    image = tf.image.resize(
        decode(image_bytes), [resized, resized], method='bicubic'
    )
    offset = CROP_PADDING // 2
    image = image[offset : offset + image_size, offset : offset + image_size]
  elif method == 'crop_resize':
    image = decode_window(
        image_bytes, lambda shape: centre_window(shape, image_size)
    )
    image = tf.image.resize(image, [image_size, image_size], method='bicubic')
  else:
    raise ValueError(
        f"eval_resize={method!r} must be 'resize_crop' or 'crop_resize'."
    )
  image = to_uint8(image)
  image.set_shape([image_size, image_size, 3])
  return image


def channel_affine(images: tf.Tensor, scale, offset) -> tf.Tensor:
  """`images @ scale + offset` over the channel axis, for float32 images.

  `scale` is a `[C, C]` matrix (channels in, channels out) and `offset` a
  `[C]` vector. Written as a 1x1 convolution because that runs several times
  faster on CPU than broadcasting a `[C]` vector over `[..., H, W, C]`.

  Args:
    images: float32 `[..., H, W, C]`.
    scale: `[C, C]` matrix.
    offset: `[C]` vector.

  Returns:
    float32 images, same shape.
  """
  shape = tf.shape(images)
  flat = tf.reshape(images, tf.concat([[-1], shape[-3:]], 0))
  kernel = tf.cast(scale, tf.float32)[None, None]
  out = tf.nn.conv2d(flat, kernel, strides=1, padding='VALID')
  out = tf.nn.bias_add(out, tf.cast(offset, tf.float32))
  return tf.reshape(out, shape)


def normalize(images: tf.Tensor) -> tf.Tensor:
  """uint8/float RGB `[..., H, W, 3]` -> float32 with ImageNet mean and std."""
  inverse_std = [1.0 / s for s in batching.STDDEV_RGB]
  return channel_affine(
      tf.cast(images, tf.float32),
      tf.linalg.diag(tf.constant(inverse_std)),
      [-m * i for m, i in zip(batching.MEAN_RGB, inverse_std)],
  )


def paste_box(image, patch, y0, y1, x0, x1) -> tf.Tensor:
  """`image` `[H, W, C]` with `[y0:y1, x0:x1]` replaced by `patch`.

  Built from slices and concatenations (copies), which is several times
  faster than selecting with a mask over the whole image.

  Args:
    image: `[H, W, C]`.
    patch: `[y1 - y0, x1 - x0, C]`, same dtype.
    y0: first row of the box.
    y1: end row (exclusive).
    x0: first column.
    x1: end column (exclusive).

  Returns:
    The image with the box replaced, same shape.
  """
  middle = tf.concat([image[y0:y1, :x0], patch, image[y0:y1, x1:]], axis=1)
  return tf.concat([image[:y0], middle, image[y1:]], axis=0)


def _beta(shape, seed: tf.Tensor, alpha: float) -> tf.Tensor:
  """Beta(alpha, alpha) samples as a ratio of two Gamma(alpha) samples."""
  seed_a, seed_b = split_seed(seed, 2)
  a = tf.random.stateless_gamma(shape, seed_a, alpha=alpha)
  b = tf.random.stateless_gamma(shape, seed_b, alpha=alpha)
  total = a + b
  # Both draws can underflow to 0 for small alpha; call that an even mix.
  return tf.where(total > 0, a / tf.maximum(total, 1e-30), 0.5)


def mix_batch(
    images: tf.Tensor,
    labels: tf.Tensor,
    seed: tf.Tensor,
    *,
    mixup_alpha: float,
    cutmix: bool,
) -> Tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
  """MixUp / CutMix of one device batch (recipe: `nfnets.data.mixing`).

  Mixing is linear, so it may run before or after normalisation.

  Args:
    images: float32 `[B, H, W, C]` with static shape.
    labels: int `[B]`.
    seed: `[2]` seed of this device batch.
    mixup_alpha: Beta(alpha, alpha) parameter of MixUp; 0 turns MixUp off.
    cutmix: whether to CutMix.

  Returns:
    `(images, labels, labels2, mix_ratio)`, as `nfnets.data.mixing.mix_batch`.
  """
  batch, height, width = images.shape[:3]
  num_mixup, num_cutmix = mixing.split_sizes(batch, mixup_alpha, cutmix)
  labels = tf.cast(labels, tf.int32)
  mixup_seed, cutmix_seed = split_seed(seed, 2)
  out_images, labels2, ratios = [], [], []

  if num_mixup:
    own = images[:num_mixup]
    # tf.reverse, not own[::-1]: a negative-stride slice is ~8x slower.
    partner = tf.reverse(own, [0])
    lam = _beta([num_mixup], mixup_seed, mixup_alpha)
    weight = lam[:, None, None, None]
    out_images.append(weight * own + (1.0 - weight) * partner)
    labels2.append(tf.reverse(labels[:num_mixup], [0]))
    ratios.append(lam)

  if num_cutmix:
    own = images[num_mixup : num_mixup + num_cutmix]
    partner = tf.reverse(own, [0])
    lam_seed, y_seed, x_seed = split_seed(cutmix_seed, 3)
    lam = tf.random.stateless_uniform([num_cutmix], lam_seed)
    centre_y = tf.random.stateless_uniform(
        [num_cutmix], y_seed, 0, height, dtype=tf.int32
    )
    centre_x = tf.random.stateless_uniform(
        [num_cutmix], x_seed, 0, width, dtype=tf.int32
    )
    side = tf.sqrt(1.0 - lam)
    half_h = tf.cast(tf.round(side * height), tf.int32) // 2
    half_w = tf.cast(tf.round(side * width), tf.int32) // 2
    y0 = tf.clip_by_value(centre_y - half_h, 0, height)
    y1 = tf.clip_by_value(centre_y + half_h, 0, height)
    x0 = tf.clip_by_value(centre_x - half_w, 0, width)
    x1 = tf.clip_by_value(centre_x + half_w, 0, width)
    out_images.append(
        tf.stack(
            [
                paste_box(
                    own[i],
                    partner[i, y0[i] : y1[i], x0[i] : x1[i]],
                    y0[i],
                    y1[i],
                    x0[i],
                    x1[i],
                )
                for i in range(num_cutmix)
            ]
        )
    )
    labels2.append(tf.reverse(labels[num_mixup : num_mixup + num_cutmix], [0]))
    pasted = tf.cast((y1 - y0) * (x1 - x0), tf.float32) / (height * width)
    ratios.append(1.0 - pasted)

  rest = batch - num_mixup - num_cutmix
  if rest:
    out_images.append(images[batch - rest :])
    labels2.append(labels[batch - rest :])
    ratios.append(tf.ones([rest], tf.float32))

  return (
      tf.concat(out_images, axis=0),
      labels,
      tf.concat(labels2, axis=0),
      tf.concat(ratios, axis=0),
  )
