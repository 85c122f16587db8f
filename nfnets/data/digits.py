"""The embedded default dataset: scikit-learn's handwritten digits, in numpy.

`sklearn.datasets.load_digits` ships 1,797 real 8x8 greyscale digits (values
0..16, 10 classes) inside scikit-learn, so the demo and the tests need no
download. Choices (fixed, so runs are comparable):

* Split: stratified, `sklearn.model_selection.train_test_split(test_size=360,
  stratify=labels, random_state=0)`: 1,437 train / 360 eval examples. The
  config's `train_split` must be `'train'` and its `eval_split` one of
  `EVAL_SPLITS`: a TFDS slice such as `'train[:50%]'` is refused
  (`check_splits`), not ignored.
* Images: intensities scaled to [0, 1], upsampled from 8x8 to
  `image_size` x `image_size` (32 by default) with bilinear interpolation
  (half-pixel centres, as `tf.image.resize`), replicated to 3 channels, then
  standardised with the digits' own statistics (mean and standard deviation of
  the training pixels), not ImageNet's: the ImageNet statistics describe
  colour photographs, and would leave these inputs far from zero mean / unit
  variance.
* Train augmentation: random translation by up to `image_size // 16` pixels
  (2 at 32 px) in each direction, filling with background (0); no flips
  (digits are not mirror-symmetric). MixUp / CutMix as configured
  (`nfnets.data.mixing`). RandAugment (made for photographs) and
  `eval_resize` (the images are already square and whole) do not apply.

Everything is numpy and held in memory (about 15 MB at 32 px): a batch costs
well under a millisecond, which keeps `make demo` within its CPU budget.
Nothing here imports TensorFlow.
"""

import functools
from typing import Dict, Iterator, Tuple

import numpy as np

from nfnets.data import batching
from nfnets.data import mixing

NUM_CLASSES = 10
NUM_TRAIN = 1437
NUM_EVAL = 360
_SPLIT_SEED = 0
# The names a config may give the 360 held-out digits.
EVAL_SPLITS = ('validation', 'test', 'eval')
# Translation range at 32 px; scales with the image size.
_MAX_SHIFT_FRACTION = 1 / 16
# Tags that keep the random streams of different uses independent.
_EPOCH_TAG, _SHIFT_TAG, _MIX_TAG = 0, 1, 2


@functools.lru_cache(maxsize=1)
def _load() -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
  """Loads and splits the digits once per process: 8x8 floats in [0, 1]."""
  # Imported here: scikit-learn takes about a second to import, and only the
  # digits dataset needs it.
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  from sklearn import model_selection  # pylint: disable=g-import-not-at-top

  digits = datasets.load_digits()
  images = (digits.images / 16.0).astype(np.float32)
  labels = digits.target.astype(np.int32)
  train_x, eval_x, train_y, eval_y = model_selection.train_test_split(
      images,
      labels,
      test_size=NUM_EVAL,
      stratify=labels,
      random_state=_SPLIT_SEED,
  )
  return {'train': (train_x, train_y), 'eval': (eval_x, eval_y)}


def _resize_matrix(in_size: int, out_size: int) -> np.ndarray:
  """Bilinear interpolation weights `[out_size, in_size]` (half-pixel)."""
  src = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
  src = np.clip(src, 0, in_size - 1)
  low = np.floor(src).astype(np.int64)
  high = np.minimum(low + 1, in_size - 1)
  frac = (src - low).astype(np.float32)
  weights = np.zeros([out_size, in_size], np.float32)
  rows = np.arange(out_size)
  np.add.at(weights, (rows, low), 1.0 - frac)
  np.add.at(weights, (rows, high), frac)
  return weights


@functools.lru_cache(maxsize=8)
def _split_arrays(split: str, image_size: int):
  """Upsampled greyscale images `[N, S, S]` in [0, 1] and labels `[N]`."""
  images, labels = _load()[split]
  resize = _resize_matrix(images.shape[1], image_size)
  upsampled = np.einsum('yi,nij,xj->nyx', resize, images, resize)
  return np.ascontiguousarray(upsampled, np.float32), labels


@functools.lru_cache(maxsize=1)
def normalization() -> Tuple[float, float]:
  """(mean, std) of the training pixels in [0, 1], at the native 8x8."""
  train_images = _load()['train'][0]
  return float(train_images.mean()), float(train_images.std())


def check_splits(cfg) -> None:
  """Refuses split strings that would select other digits than the fixed ones.

  Args:
    cfg: the data config; its `train_split` and `eval_split` are checked.

  Raises:
    ValueError: naming the field, when it asks for a subset or another split.
  """
  for field, valid in (
      ('train_split', ('train',)),
      ('eval_split', EVAL_SPLITS),
  ):
    value = getattr(cfg, field, valid[0])
    if value not in valid:
      raise ValueError(
          f'data.{field}={value!r} does not apply to digits, whose split is'
          f' fixed ({NUM_TRAIN:,} train / {NUM_EVAL} eval images); use'
          f' {valid[0]!r}, or a TFDS dataset or image folder to choose splits.'
      )


def num_examples(split: str) -> int:
  return {'train': NUM_TRAIN, 'eval': NUM_EVAL}[split]


def _to_host_batch(images: np.ndarray, layout: batching.HostLayout):
  """Greyscale `[n, S, S]` -> normalised RGB `[devices, batch, S, S, 3]`."""
  mean, std = normalization()
  images = (images - mean) / std
  images = np.repeat(images[..., None], 3, axis=-1)
  return images.reshape(
      (layout.local_device_count, layout.device_batch_size) + images.shape[1:]
  )


def _translate(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Shifts each image by a random offset, filling with background (0)."""
  num, size = images.shape[:2]
  max_shift = int(size * _MAX_SHIFT_FRACTION)
  if not max_shift:
    return images
  padded = np.pad(images, ((0, 0), (max_shift,) * 2, (max_shift,) * 2))
  offset_y, offset_x = rng.integers(0, 2 * max_shift + 1, size=(2, num))
  rows = offset_y[:, None] + np.arange(size)
  cols = offset_x[:, None] + np.arange(size)
  return padded[
      np.arange(num)[:, None, None], rows[:, :, None], cols[:, None, :]
  ]


def _train_iterator(cfg, layout, image_size, seed, start_step) -> Iterator:
  """Infinite train batches; batch k depends only on (seed, k).

  Every process draws the same GLOBAL batch of step k (epoch orders over the
  whole split, shifts and mixing seeded without the process index) and keeps
  its own contiguous slice of it. So a run on P processes x D devices sees
  exactly the batches of a run on one process with P x D devices, and the
  processes' slices are disjoint and together cover each epoch.
  """
  images, labels = _split_arrays('train', image_size)
  num = len(labels)
  global_batch = layout.global_batch_size
  per_process = layout.process_batch_size
  first = layout.process_index * per_process
  devices = layout.local_device_count

  @functools.lru_cache(maxsize=2)
  def epoch_order(epoch):
    return np.random.default_rng([seed, _EPOCH_TAG, epoch]).permutation(num)

  step = start_step
  while True:
    # Positions of this step's examples in the endless sequence of epochs.
    positions = np.arange(step * global_batch, (step + 1) * global_batch)
    epochs, offsets = np.divmod(positions, num)
    index = np.empty(global_batch, np.int64)
    for epoch in np.unique(epochs):
      in_epoch = epochs == epoch
      index[in_epoch] = epoch_order(int(epoch))[offsets[in_epoch]]
    # Shifts are drawn for the whole global batch, then sliced, so that they
    # do not depend on how the batch is split over processes.
    shift_rng = np.random.default_rng([seed, _SHIFT_TAG, step])
    shifted = _translate(images[index], shift_rng)[first : first + per_process]
    batch_images = _to_host_batch(shifted, layout)
    batch_labels = labels[index][first : first + per_process].reshape(
        batch_images.shape[:2]
    )
    mixed = []
    for d in range(devices):
      # Seeded by the device's place in the global batch, not by process.
      global_device = layout.process_index * devices + d
      mix_rng = np.random.default_rng([seed, _MIX_TAG, step, global_device])
      mixed.append(
          mixing.mix_batch(
              batch_images[d],
              batch_labels[d],
              mix_rng,
              mixup_alpha=cfg.mixup_alpha,
              cutmix=cfg.cutmix,
          )
      )
    yield {
        'images': np.stack([m[0] for m in mixed]),
        'labels': np.stack([m[1] for m in mixed]),
        'labels2': np.stack([m[2] for m in mixed]),
        'mix_ratio': np.stack([m[3] for m in mixed]),
    }
    step += 1


def _eval_iterator(layout, image_size, num_batches) -> Iterator:
  """One pass over this process's eval shard, padded to `num_batches`."""
  images, labels = _split_arrays('eval', image_size)
  shard = batching.shard_indices(
      len(labels), layout.process_index, layout.process_count
  )
  per_process = layout.process_batch_size
  for step in range(num_batches):
    index = shard[step * per_process : (step + 1) * per_process]
    num_real = len(index)
    batch_images = np.zeros((per_process, image_size, image_size), np.float32)
    batch_images[:num_real] = images[index]
    batch_labels = np.zeros([per_process], np.int32)
    batch_labels[:num_real] = labels[index]
    mask = np.zeros([per_process], np.float32)
    mask[:num_real] = 1.0
    host_images = _to_host_batch(batch_images, layout)
    yield {
        'images': host_images,
        'labels': batch_labels.reshape(host_images.shape[:2]),
        'mask': mask.reshape(host_images.shape[:2]),
    }


def create_dataset(
    cfg, *, split, layout, image_size, seed, start_step
) -> batching.Batches:
  """The digits pipeline; see `nfnets.data.create_dataset`."""
  if split == 'train':
    return batching.Batches(
        lambda: _train_iterator(cfg, layout, image_size, seed, start_step),
        split=split,
        num_examples=NUM_TRAIN,
        layout=layout,
        start_step=start_step,
    )
  num_batches = batching.eval_num_batches(NUM_EVAL, layout)
  return batching.Batches(
      lambda: _eval_iterator(layout, image_size, num_batches),
      split=split,
      num_examples=NUM_EVAL,
      layout=layout,
      num_batches=num_batches,
  )
