"""TFDS image classification datasets (ImageNet and any other by name).

Each process reads `tfds.even_splits(split, process_count)[process_index]`:
contiguous, disjoint slices that cover the split (sizes differ by at most
one). Images are read still encoded (`tfds.decode.SkipDecoding`), so the
training crop is decoded straight from the JPEG bytes.

Train order: the process's records are read in their stored order (TFDS
shuffles examples when it builds a dataset) and, for epoch e, passed through a
`shuffle_buffer`-sized shuffle seeded by (seed, e). That order is reproducible
but not random-access: resuming at step k skips the records before it within
the current epoch by reading them (without decoding), which for ImageNet costs
up to one epoch of reads in the worst case.

A dataset that is registered but not prepared raises `FileNotFoundError` with
the steps to prepare it; an unknown name raises `ValueError` with close
matches.
"""

import difflib

import tensorflow as tf
import tensorflow_datasets as tfds

from nfnets.data import augment
from nfnets.data import batching
from nfnets.data import pipeline
from nfnets.data import tf_cpu

tf_cpu.hide_accelerators()


def _tfds_split(cfg, split: str) -> str:
  """The TFDS split string configured for `'train'` or `'eval'`."""
  return cfg.train_split if split == 'train' else cfg.eval_split


def _split_error(cfg, ds_builder, split: str) -> ValueError:
  field = 'train_split' if split == 'train' else 'eval_split'
  return ValueError(
      f'data.{field}={_tfds_split(cfg, split)!r} is not a split of'
      f' {ds_builder.name!r}: available splits'
      f' {sorted(ds_builder.info.splits)}.'
  )


def builder(cfg) -> tfds.core.DatasetBuilder:
  """The TFDS builder named by `cfg.name` (unknown names: close matches)."""
  # Not cached: builders are cheap, and a cache would outlive
  # `tfds.testing.mock_data` contexts.
  name = cfg.name
  try:
    return tfds.builder(name, data_dir=cfg.data_dir)
  except tfds.core.DatasetNotFoundError:
    base = name.split(':')[0].split('/')[0]
    matches = difflib.get_close_matches(
        base, tfds.list_builders(with_community_datasets=False), n=5
    )
    hint = f'did you mean {", ".join(matches)}? ' if matches else ''
    raise ValueError(
        f'Unknown dataset data.name={name!r}: {hint}Use a TFDS name'
        " (tfds.list_builders()), 'digits' for the embedded dataset, or"
        " 'folder:/path/to/root' for an image folder."
    ) from None


def _prepare_steps(ds_builder) -> str:
  """One line telling how to prepare a dataset that is not there yet."""
  name = ds_builder.name
  root = ds_builder.data_dir_root
  build = f'`tfds build {name} --data_dir={root}`'
  if name.startswith('imagenet2012'):
    return (
        f'TFDS dataset {name!r} is not prepared in {root}: download'
        ' ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar manually'
        ' (https://image-net.org) into'
        f' {root}/downloads/manual/ and run {build}.'
    )
  if ds_builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
    return (
        f'TFDS dataset {name!r} is not prepared in {root}: put the files its'
        ' manual download instructions name (printed by the command below)'
        f' into {root}/downloads/manual/ and run {build}.'
    )
  return (
      f'TFDS dataset {name!r} is not prepared in {root}: run {build} on a'
      ' machine with internet access (or copy a prepared copy into'
      f' {root}); set data.data_dir to use another directory.'
  )


def _keys(ds_builder):
  """(image feature, label feature) names."""
  keys = ds_builder.info.supervised_keys
  if keys and len(keys) == 2 and all(isinstance(k, str) for k in keys):
    return keys
  features = ds_builder.info.features
  if 'image' in features and 'label' in features:
    return 'image', 'label'
  raise ValueError(
      f'TFDS dataset {ds_builder.name!r} has no (image, label) features'
      f' (features: {list(features)}); it is not an image classification'
      ' dataset.'
  )


def _read(cfg, ds_builder, split, part=None) -> tf.data.Dataset:
  """Encoded images and labels, in stored order.

  Args:
    cfg: the data config.
    ds_builder: the TFDS builder.
    split: `'train'` or `'eval'`.
    part: the part of the configured split to read (a `tfds.even_splits`
      element); default: all of it.

  Returns:
    A dataset of (encoded image, label).
  """
  image_key, label_key = _keys(ds_builder)
  try:
    ds = ds_builder.as_dataset(
        split=_tfds_split(cfg, split) if part is None else part,
        shuffle_files=False,
        decoders={image_key: tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(try_autocache=False),
    )
  except AssertionError:
    # TFDS asserts that the prepared files exist.
    raise FileNotFoundError(_prepare_steps(ds_builder)) from None
  except (ValueError, KeyError) as e:
    if ds_builder.info.splits and 'split' in str(e).lower():
      raise _split_error(cfg, ds_builder, split) from None
    raise
  return ds.map(
      lambda example: (example[image_key], example[label_key]),
      num_parallel_calls=tf.data.AUTOTUNE,
  )


def _size(cfg, ds_builder, split, part=None) -> int:
  """Examples in the configured split, or in `part` of it."""
  if ds_builder.is_prepared():
    try:
      return ds_builder.info.splits[
          _tfds_split(cfg, split) if part is None else part
      ].num_examples
    except (ValueError, KeyError):
      raise _split_error(cfg, ds_builder, split) from None
  # Not prepared: reading raises the "how to prepare" error, except under
  # `tfds.testing.mock_data`, whose reader reports its own size.
  cardinality = int(_read(cfg, ds_builder, split, part).cardinality())
  if cardinality < 0:
    raise ValueError(
        f'Cannot count the examples of {cfg.name!r} split'
        f' {_tfds_split(cfg, split)!r}.'
    )
  return cardinality


def num_examples(cfg, split: str) -> int:
  return _size(cfg, builder(cfg), split)


def num_classes(cfg) -> int:
  ds_builder = builder(cfg)
  return ds_builder.info.features[_keys(ds_builder)[1]].num_classes


def class_names(cfg) -> tuple[str, ...]:
  ds_builder = builder(cfg)
  return tuple(ds_builder.info.features[_keys(ds_builder)[1]].names)


def create_dataset(
    cfg, *, split, layout, image_size, seed, start_step
) -> batching.Batches:
  """The TFDS pipeline; see `nfnets.data.create_dataset`."""
  ds_builder = builder(cfg)
  # Contiguous, disjoint parts covering the split (as
  # `tfds.split_for_jax_process`, with explicit process counts).
  part = tfds.even_splits(_tfds_split(cfg, split), n=layout.process_count)[
      layout.process_index
  ]
  total = _size(cfg, ds_builder, split)
  local_examples = _size(cfg, ds_builder, split, part)
  records = _read(cfg, ds_builder, split, part)

  if split == 'train':
    epoch_key = pipeline.key(seed, layout.process_index, pipeline.EPOCH_TAG)

    def epoch_fn(epoch):
      shuffle_seed = tf.random.stateless_uniform(
          [],
          augment.fold_in(epoch_key, epoch),
          minval=None,
          maxval=None,
          dtype=tf.int64,
      )
      return records.shuffle(
          cfg.shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=False
      )

    ds = pipeline.train_dataset(
        cfg,
        epoch_fn=epoch_fn,
        examples_per_epoch=local_examples,
        read_fn=lambda x: x,
        layout=layout,
        image_size=image_size,
        seed=seed,
        start_step=start_step,
    )
    return pipeline.as_batches(
        ds,
        split=split,
        num_examples=total,
        layout=layout,
        start_step=start_step,
    )

  num_batches = batching.eval_num_batches(total, layout)
  ds = pipeline.eval_dataset(
      cfg,
      examples=records,
      read_fn=lambda x: x,
      layout=layout,
      image_size=image_size,
      num_batches=num_batches,
  )
  return pipeline.as_batches(
      ds,
      split=split,
      num_examples=total,
      layout=layout,
      num_batches=num_batches,
  )
