"""Input pipelines: embedded digits, TFDS datasets (ImageNet) and image folders.

Usage (the training runner)::

  from nfnets import data
  ds = data.create_dataset(cfg.data, split='train', global_batch_size=4096,
                           image_size=192, seed=0, start_step=step)
  batch = next(ds)  # dict of numpy arrays shaped [local_devices, batch, ...]

`cfg` is an `ml_collections.ConfigDict` (or any object with these attributes;
the config file holds every default, nothing here supplies one):

  name: `'digits'` (embedded, default), a TFDS image classification name such
    as `'imagenet2012'` or `'cifar10'` (optionally `'name:version'` or
    `'name/config'`), or `'folder:/path/to/root'` for an image folder (see
    `nfnets.data.folder` for its layout and split rule).
  data_dir: TFDS data directory (None: TFDS's default); may be `gs://...`.
  train_split, eval_split: TFDS split strings, e.g. `'train'`, `'validation'`,
    `'train[:10%]'` (image folders: sub-folder names, see `folder`; digits:
    unused, its split is fixed).
  randaugment_layers: RandAugment operations per image (0: off).
  randaugment_magnitude: RandAugment strength on the usual scale where 10 is
    the standard maximum of each operation (rotate 30 degrees, shear 0.3, ...)
    and larger values extrapolate; NFNets use 5 (F0), 10 (F1, F2) and 15
    (F3+). See `nfnets.data.randaugment`.
  mixup_alpha: MixUp's Beta(alpha, alpha) parameter (0.2; 0: off).
  cutmix: whether to CutMix (half of each device batch when MixUp is on).
  augment_on: `'host'`: RandAugment, MixUp/CutMix and normalisation run in
    tf.data on the CPU; `'device'`: the CPU only decodes, crops, resizes and
    flips, and `nfnets.data.device_augment.augment_batch` does the rest on
    the accelerator (see `augments_on_device`). The digits ignore it.
  eval_resize: `'resize_crop'` (resize to (S+32)^2, centre crop S) or
    `'crop_resize'` (aspect-preserving centre crop of S/(S+32) of the short
    side, resized to S).
  strict: image folders: fail on the first undecodable file instead of
    skipping undecodable files with one warning.
  shuffle_buffer: TFDS train shuffle buffer (examples). Digits and image
    folders permute each epoch exactly and do not use it.
  prefetch: host batches tf.data prepares ahead (0: none, -1: autotune);
    the digits pipeline (numpy, sub-millisecond batches) does not use it.

Train batches: `images` float32 `[D, B, S, S, 3]` (normalised: ImageNet
mean/std, or the digits' own statistics), `labels` int32 `[D, B]`, `labels2`
int32 `[D, B]` and `mix_ratio` float32 `[D, B]`, the weight of `labels` in
`ratio * CE(labels) + (1 - ratio) * CE(labels2)` (without mixing,
`labels2 == labels` and `mix_ratio == 1`). The stream is infinite and its
batch at step k depends only on (seed, k): `start_step=k` resumes exactly.
Each process reads a disjoint shard of the split; the shards cover it.

With `augment_on='device'` (TFDS and image folders), train batches hold
only `images` uint8 `[D, B, S, S, 3]` (cropped, resized, flipped) and
`labels`; `nfnets.data.device_augment.augment_batch`, run on each device's
share with a key from (seed, step, device), turns them into the dict above;
eval `images` are then uint8 too (the eval step normalises them).

Eval batches: `images`, `labels` and `mask` float32 `[D, B]` (1: real example,
0: padding). One pass yields every example of the split exactly once over all
processes, padding the last batches; all processes yield the same number of
batches (`ds.num_batches`).

Importing this package is cheap: TensorFlow (and TFDS) are imported only when
a TFDS or image-folder pipeline is first built, with TensorFlow kept off the
accelerators.
"""

import numbers

from nfnets.data import batching
from nfnets.data import digits

Batches = batching.Batches
HostLayout = batching.HostLayout
MEAN_RGB = batching.MEAN_RGB
STDDEV_RGB = batching.STDDEV_RGB
FOLDER_PREFIX = batching.FOLDER_PREFIX
EVAL_RESIZE_METHODS = ('resize_crop', 'crop_resize')
AUGMENT_ON = ('host', 'device')


def _kind(cfg) -> str:
  name = cfg.name
  if not isinstance(name, str) or not name:
    raise ValueError(f'data.name={name!r} must be a non-empty dataset name.')
  if name == 'digits':
    digits.check_splits(cfg)
    return 'digits'
  if name.startswith(FOLDER_PREFIX):
    return 'folder'
  return 'tfds'


def _check_split(split: str) -> None:
  if split not in batching.SPLITS:
    raise ValueError(f"split={split!r} must be 'train' or 'eval'.")


def _check_int(name: str, value, low: int, high=None) -> int:
  if (
      isinstance(value, bool)
      or not isinstance(value, numbers.Integral)
      or value < low
      or (high is not None and value >= high)
  ):
    bounds = f'in [{low}, {high})' if high is not None else f'>= {low}'
    raise ValueError(f'{name}={value!r} must be an int {bounds}.')
  return int(value)


def check_seed(seed) -> int:
  """The experiment's `seed`, checked: an int in [0, 2**32).

  JAX's keys (the model's initialisation, the on-device augmentation) take
  its low 32 bits: seeds s and s + 2**32 would draw alike.
  """
  return _check_int('seed', seed, 0, 2**32)


def check_config(cfg) -> None:
  """Checks the data config's pipeline fields (`augment_on` resolved).

  `create_dataset` calls it; the runner calls it first, before it writes
  anything into the workdir.

  Raises:
    ValueError: a field's value, named with what it must be.
  """
  if cfg.eval_resize not in EVAL_RESIZE_METHODS:
    raise ValueError(
        f'data.eval_resize={cfg.eval_resize!r} must be one of'
        f' {EVAL_RESIZE_METHODS}.'
    )
  if (
      isinstance(cfg.mixup_alpha, bool)
      or not isinstance(cfg.mixup_alpha, numbers.Real)
      or not cfg.mixup_alpha >= 0
  ):
    raise ValueError(f'data.mixup_alpha={cfg.mixup_alpha} must be >= 0.')
  _check_int('data.shuffle_buffer', cfg.shuffle_buffer, 1)
  prefetch = cfg.prefetch
  if (
      isinstance(prefetch, bool)
      or not isinstance(prefetch, int)
      or prefetch < -1
  ):
    raise ValueError(
        f'data.prefetch={prefetch!r} must be an int >= 0, or -1 (autotune).'
    )
  if 'device_prefetch' in cfg:  # The runner's; tests build configs without.
    _check_int('data.device_prefetch', cfg.device_prefetch, 0)
  augments_on_device(cfg)  # Validates cfg.augment_on.


def check_splits_have_examples(cfg) -> None:
  """Checks that both splits hold examples: before training, not after it.

  Raises:
    ValueError: a split is empty (for an image folder, of decodable images).
  """
  for split in batching.SPLITS:
    if num_examples(cfg, split) >= 1:
      continue
    why = ''
    if _kind(cfg) == 'folder':
      from nfnets.data import folder  # pylint: disable=g-import-not-at-top

      why = ' (decodable .jpg, .jpeg or .png files)'
      if split == 'eval':
        why += (
            '; in a folder with no train/ and val/ folders, each class gives'
            f' one in {folder.EVAL_EVERY} of its images to eval, so a class'
            ' needs that many or more'
        )
    raise ValueError(
        f'data.name={cfg.name!r} has no {split} examples{why}; add some, or'
        ' name another dataset.'
    )


def augments_on_device(cfg) -> bool:
  """Whether train batches still need `device_augment.augment_batch`."""
  if cfg.augment_on not in AUGMENT_ON:
    raise ValueError(
        f'data.augment_on={cfg.augment_on!r} must be one of {AUGMENT_ON}'
        " ('auto' is resolved by nfnets.resolve.resolve)."
    )
  return cfg.augment_on == 'device' and _kind(cfg) != 'digits'


def num_examples(cfg, split: str) -> int:
  """Examples in the whole `'train'` or `'eval'` split (all processes)."""
  _check_split(split)
  kind = _kind(cfg)
  if kind == 'digits':
    return digits.num_examples(split)
  if kind == 'folder':
    from nfnets.data import folder  # pylint: disable=g-import-not-at-top

    return folder.num_examples(cfg, split)
  from nfnets.data import tfds_source  # pylint: disable=g-import-not-at-top

  return tfds_source.num_examples(cfg, split)


def num_classes(cfg) -> int:
  """Number of classes of the configured dataset."""
  kind = _kind(cfg)
  if kind == 'digits':
    return digits.NUM_CLASSES
  if kind == 'folder':
    from nfnets.data import folder  # pylint: disable=g-import-not-at-top

    return folder.num_classes(cfg)
  from nfnets.data import tfds_source  # pylint: disable=g-import-not-at-top

  return tfds_source.num_classes(cfg)


def class_names(cfg) -> tuple[str, ...]:
  """The configured dataset's class names, by label.

  The digits' are '0' to '9', an image folder's its class folders' names
  and a TFDS dataset's its label feature's (ImageNet's: WordNet ids such
  as 'n01440764', known without the data).
  """
  kind = _kind(cfg)
  if kind == 'digits':
    return tuple(str(label) for label in range(digits.NUM_CLASSES))
  if kind == 'folder':
    from nfnets.data import folder  # pylint: disable=g-import-not-at-top

    return folder.class_names(cfg)
  from nfnets.data import tfds_source  # pylint: disable=g-import-not-at-top

  return tfds_source.class_names(cfg)


def create_dataset(
    cfg,
    *,
    split: str,
    global_batch_size: int,
    image_size: int,
    seed: int,
    start_step: int = 0,
    process_index=None,
    process_count=None,
    local_device_count=None,
) -> batching.Batches:
  """Builds this process's input pipeline for one split.

  Args:
    cfg: the data config (fields in the module docstring).
    split: `'train'` (infinite, augmented, deterministic per step) or `'eval'`
      (one padded pass over the split).
    global_batch_size: examples per step over all processes and devices.
    image_size: side S of the square images produced.
    seed: non-negative seed of the epoch orders and augmentations.
    start_step: train only: the first step to yield (resuming at step k gives
      exactly the batch the uninterrupted stream gives at step k).
    process_index: this process; default `jax.process_index()`.
    process_count: number of processes; default `jax.process_count()`.
    local_device_count: this process's devices; default
      `jax.local_device_count()`.

  Returns:
    A `Batches` iterator of dicts of numpy arrays shaped
    `[local_device_count, global_batch_size // devices, ...]`.

  Raises:
    ValueError: on a bad split, batch/device count, image size, seed, config
      value, or an unknown dataset name (with close matches).
    FileNotFoundError: when a TFDS dataset is not prepared (the message gives
      the steps) or an image folder is missing.
  """
  _check_split(split)
  layout = batching.host_layout(
      global_batch_size, process_index, process_count, local_device_count
  )
  image_size = _check_int('image_size', image_size, 1)
  seed = _check_int('seed', seed, 0, 2**63)  # the host pipeline's range
  start_step = _check_int('start_step', start_step, 0)
  check_config(cfg)
  if split == 'eval':
    start_step = 0

  kind = _kind(cfg)
  kwargs = dict(
      split=split,
      layout=layout,
      image_size=image_size,
      seed=seed,
      start_step=start_step,
  )
  if kind == 'digits':
    return digits.create_dataset(cfg, **kwargs)
  if kind == 'folder':
    from nfnets.data import folder  # pylint: disable=g-import-not-at-top

    return folder.create_dataset(cfg, **kwargs)
  from nfnets.data import tfds_source  # pylint: disable=g-import-not-at-top

  return tfds_source.create_dataset(cfg, **kwargs)
