"""MixUp and CutMix on one device's batch, in numpy (the digits pipeline).

The tf.data pipelines use `nfnets.data.augment.mix_batch`, the same recipe in
TensorFlow ops, and the on-device path `nfnets.data.device_augment.mix_batch`
(JAX, sharing `split_sizes` and `cutmix_boxes`); `tests/test_data_mixing.py`
and `tests/test_device_augment.py` check them against the same properties.

Recipe (NFNets paper, appendix): MixUp on the first half of each device batch
and CutMix on the second half. Each example is mixed with its mirror within
its half (example `i` of `n` with example `n - 1 - i`). Ratios are drawn per
example: MixUp's from Beta(alpha, alpha); CutMix's box covers a fraction
`1 - lam` of the image with lam ~ Uniform(0, 1) = Beta(1, 1), as in the CutMix
paper, and is clipped at the borders. The returned `mix_ratio` is the weight
of `labels` (the example's own label): for MixUp it is lam, for CutMix the
fraction of the original image that remains after the paste. The loss is
`ratio * CE(labels) + (1 - ratio) * CE(labels2)`.
"""

from typing import Tuple

import numpy as np


def split_sizes(batch_size: int, mixup_alpha: float, cutmix: bool):
  """Returns (examples mixed by MixUp, examples mixed by CutMix)."""
  if mixup_alpha > 0 and cutmix:
    num_mixup = batch_size // 2
  elif mixup_alpha > 0:
    num_mixup = batch_size
  else:
    num_mixup = 0
  return num_mixup, (batch_size - num_mixup) if cutmix else 0


def cutmix_boxes(
    height: int,
    width: int,
    lam,
    centre_y,
    centre_x,
    xp=np,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Boxes `[y0, y1) x [x0, x1)` covering about `1 - lam` of the image.

  Args:
    height: image height.
    width: image width.
    lam: `[N]` CutMix ratios.
    centre_y: `[N]` integer box centres.
    centre_x: `[N]` integer box centres.
    xp: the array module, `numpy` or `jax.numpy` (the device pipeline).

  Returns:
    `(y0, y1, x0, x1)`, integer `[N]` each, clipped to the image.
  """
  side = xp.sqrt(1.0 - lam)
  half_h = xp.round(side * height).astype(xp.int32) // 2
  half_w = xp.round(side * width).astype(xp.int32) // 2
  y0 = xp.clip(centre_y - half_h, 0, height)
  y1 = xp.clip(centre_y + half_h, 0, height)
  x0 = xp.clip(centre_x - half_w, 0, width)
  x1 = xp.clip(centre_x + half_w, 0, width)
  return y0, y1, x0, x1


def mix_batch(
    images: np.ndarray,
    labels: np.ndarray,
    rng: np.random.Generator,
    *,
    mixup_alpha: float,
    cutmix: bool,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Mixes one device batch.

  Args:
    images: float `[B, H, W, C]`.
    labels: int `[B]`.
    rng: source of the mixing randomness.
    mixup_alpha: Beta(alpha, alpha) parameter of MixUp; 0 turns MixUp off.
    cutmix: whether to CutMix (the second half of the batch, or all of it when
      MixUp is off).

  Returns:
    `(images, labels, labels2, mix_ratio)`: mixed float32 images, int32
    labels, the partners' int32 labels, and float32 `[B]` weights of `labels`.
    Without mixing, `labels2 == labels` and `mix_ratio == 1`.
  """
  batch, height, width = images.shape[:3]
  num_mixup, num_cutmix = split_sizes(batch, mixup_alpha, cutmix)
  images = images.astype(np.float32, copy=True)
  labels = labels.astype(np.int32)
  labels2 = labels.copy()
  ratio = np.ones([batch], np.float32)

  if num_mixup:
    part = slice(0, num_mixup)
    lam = rng.beta(mixup_alpha, mixup_alpha, size=num_mixup).astype(np.float32)
    own = images[part]
    partner = own[::-1]
    images[part] = (
        lam[:, None, None, None] * own
        + (1.0 - lam[:, None, None, None]) * partner
    )
    labels2[part] = labels[part][::-1]
    ratio[part] = lam

  if num_cutmix:
    part = slice(num_mixup, num_mixup + num_cutmix)
    lam = rng.uniform(size=num_cutmix)
    centre_y = rng.integers(0, height, size=num_cutmix)
    centre_x = rng.integers(0, width, size=num_cutmix)
    y0, y1, x0, x1 = cutmix_boxes(height, width, lam, centre_y, centre_x)
    ys = np.arange(height)[None, :, None]
    xs = np.arange(width)[None, None, :]
    in_box = (
        (ys >= y0[:, None, None])
        & (ys < y1[:, None, None])
        & (xs >= x0[:, None, None])
        & (xs < x1[:, None, None])
    )
    own = images[part]
    images[part] = np.where(in_box[..., None], own[::-1], own)
    labels2[part] = labels[part][::-1]
    pasted = (y1 - y0) * (x1 - x0) / float(height * width)
    ratio[part] = (1.0 - pasted).astype(np.float32)

  return images, labels, labels2, ratio
