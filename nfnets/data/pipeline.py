"""tf.data assembly shared by the TFDS and image-folder sources.

A source provides this process's examples as `(x, label)` where `x` is either
the encoded image or a path (`read_fn` turns it into the encoded image inside
the parallel map, so file reads overlap with decoding).

Train stream: epochs `e = 0, 1, ...` each list the process's examples in an
order seeded by (seed, e) (`epoch_fn`); the stream is their concatenation,
cut into batches. The batch at step k holds positions
`[k * b, (k + 1) * b)` of that stream (b: examples per step on this process),
so resuming at step k skips to position `k * b` (whole epochs are skipped
without reading them). Each example's augmentation is seeded by
(seed, process, position), each device batch's mixing by
(seed, process, device-batch index), so batch k depends only on (seed, k).
(With `augment_on='device'` the stream stops after crop, resize and flip;
the rest is seeded on the device by (seed, step, device).)

Eval stream: the examples in a fixed order, padded with masked black images
(`mask` 0) to the same number of batches on every process.
"""

from typing import Callable

import tensorflow as tf

from nfnets.data import augment
from nfnets.data import batching
from nfnets.data import randaugment
from nfnets.data import tf_cpu

tf_cpu.hide_accelerators()

# Tags that keep the random streams of different uses independent.
EPOCH_TAG, EXAMPLE_TAG, MIX_TAG = 0, 1, 2
_INT64_MAX = 2**63 - 1


def key(seed: int, process_index: int, tag: int) -> tf.Tensor:
  """The `[2]` int64 root seed of one use of randomness on one process."""
  return augment.fold_in(
      tf.constant([seed, tag], tf.int64), tf.constant(process_index, tf.int64)
  )


def _options() -> tf.data.Options:
  options = tf.data.Options()
  # Batches must be reproducible from (seed, step): keep element order.
  options.deterministic = True
  # Parallelism comes from the parallel maps; one thread per op avoids
  # oversubscribing the cores (the usual advice for input pipelines).
  options.threading.max_intra_op_parallelism = 1
  return options


def _finish(ds: tf.data.Dataset, prefetch: int) -> tf.data.Dataset:
  if prefetch:
    ds = ds.prefetch(prefetch)
  return ds.with_options(_options())


def train_dataset(
    cfg,
    *,
    epoch_fn: Callable[[tf.Tensor], tf.data.Dataset],
    examples_per_epoch: int,
    read_fn: Callable[[tf.Tensor], tf.Tensor],
    layout: batching.HostLayout,
    image_size: int,
    seed: int,
    start_step: int,
) -> tf.data.Dataset:
  """The infinite, deterministic train stream of host batches.

  Args:
    cfg: the data config (augmentation fields and `prefetch`).
    epoch_fn: maps an int64 epoch number to that epoch's `(x, label)` dataset,
      in an order that depends only on (seed, epoch).
    examples_per_epoch: examples `epoch_fn` yields (this process's shard).
    read_fn: `x` -> encoded image bytes.
    layout: the host layout.
    image_size: output side S.
    seed: the run's seed.
    start_step: first step to produce.

  Returns:
    A dataset of dicts: `images` float32 `[D, B, S, S, 3]`, `labels`,
    `labels2` int32 `[D, B]` and `mix_ratio` float32 `[D, B]`; with
    `cfg.augment_on == 'device'`, `images` uint8 `[D, B, S, S, 3]` (cropped,
    resized, flipped) and `labels` only, for `device_augment.augment_batch`.
  """
  if examples_per_epoch < 1:
    raise ValueError(
        f'Process {layout.process_index} of {layout.process_count} has no'
        f' training examples of {cfg.name!r}; use fewer processes or a'
        ' larger split.'
    )
  start = start_step * layout.process_batch_size
  first_epoch, skip = divmod(start, examples_per_epoch)
  ds = tf.data.Dataset.range(first_epoch, _INT64_MAX).flat_map(epoch_fn)
  ds = ds.skip(skip).enumerate(start=start)

  example_key = key(seed, layout.process_index, EXAMPLE_TAG)
  on_device = cfg.augment_on == 'device'
  # On the device path RandAugment runs later, on the accelerator.
  layers = 0 if on_device else cfg.randaugment_layers
  magnitude = cfg.randaugment_magnitude

  def preprocess(position, example):
    x, label = example
    crop_seed, augment_seed = augment.split_seed(
        augment.fold_in(example_key, position), 2
    )
    image = augment.train_image(read_fn(x), crop_seed, image_size)
    if layers:
      image = randaugment.randaugment(
          image, augment_seed, num_layers=layers, magnitude=magnitude
      )
    return position, image, tf.cast(label, tf.int32)

  ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
  # Batched as uint8: a quarter of the bytes to copy; the float work below is
  # vectorised over the device batch.
  ds = ds.batch(layout.device_batch_size, drop_remainder=True)
  if on_device:
    ds = ds.map(lambda _, images, labels: {'images': images, 'labels': labels})
    ds = ds.batch(layout.local_device_count, drop_remainder=True)
    return _finish(ds, cfg.prefetch)

  mix_key = key(seed, layout.process_index, MIX_TAG)

  def mix(positions, images, labels):
    device_batch = positions[0] // layout.device_batch_size
    images, labels, labels2, ratio = augment.mix_batch(
        tf.cast(images, tf.float32),
        labels,
        augment.fold_in(mix_key, device_batch),
        mixup_alpha=cfg.mixup_alpha,
        cutmix=cfg.cutmix,
    )
    return {
        'images': augment.normalize(images),
        'labels': labels,
        'labels2': labels2,
        'mix_ratio': ratio,
    }

  ds = ds.map(mix, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(layout.local_device_count, drop_remainder=True)
  return _finish(ds, cfg.prefetch)


def eval_dataset(
    cfg,
    *,
    examples: tf.data.Dataset,
    read_fn: Callable[[tf.Tensor], tf.Tensor],
    layout: batching.HostLayout,
    image_size: int,
    num_batches: int,
) -> tf.data.Dataset:
  """One pass over `examples`, padded to `num_batches` host batches.

  Args:
    cfg: the data config (`eval_resize`, `prefetch`).
    examples: this process's `(x, label)` in a fixed order.
    read_fn: `x` -> encoded image bytes.
    layout: the host layout.
    image_size: output side S.
    num_batches: host batches to produce (the same on every process).

  Returns:
    A finite dataset of dicts: `images` float32 `[D, B, S, S, 3]` (uint8,
    not normalised, with `cfg.augment_on == 'device'`), `labels` int32 and
    `mask` float32 `[D, B]` (0 marks padding).
  """
  method = cfg.eval_resize

  def preprocess(x, label):
    return {
        'images': augment.eval_image(read_fn(x), image_size, method),
        'labels': tf.cast(label, tf.int32),
        'mask': tf.constant(1.0, tf.float32),
    }

  ds = examples.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
  padding = tf.data.Dataset.from_tensors(
      {
          'images': tf.zeros([image_size, image_size, 3], tf.uint8),
          'labels': tf.constant(0, tf.int32),
          'mask': tf.constant(0.0, tf.float32),
      }
  ).repeat()
  ds = ds.concatenate(padding)
  ds = ds.batch(layout.device_batch_size, drop_remainder=True)

  def normalize(batch):
    return {**batch, 'images': augment.normalize(batch['images'])}

  # On the device path the accelerator normalises (the eval step does, for
  # uint8 images): a quarter of the bytes to copy and no float work here.
  if cfg.augment_on != 'device':
    ds = ds.map(normalize, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(layout.local_device_count, drop_remainder=True)
  ds = ds.take(num_batches)
  return _finish(ds, cfg.prefetch)


def as_batches(ds: tf.data.Dataset, **kwargs) -> batching.Batches:
  """Wraps a dataset of host batches in the numpy `Batches` iterator."""
  return batching.Batches(ds.as_numpy_iterator, source=ds, **kwargs)
