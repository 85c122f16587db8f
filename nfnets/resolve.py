"""Resolving a config's derived ('auto') values when a run starts.

Config files store only choices; whatever follows from the model variant or
the global batch size (AGC's lambda, image sizes, RandAugment, dropout) and
every duration in steps is computed here, once, from the final config. So
`--config.model.variant=F3 --config.train.batch_size=1024` is consistent.
"""

import math
import re
from typing import Optional

import jax
import ml_collections

from nfnets import agc
from nfnets import layers
from nfnets import models
from nfnets import nfnet
from nfnets import optim

AUTO = 'auto'
COMPUTE_DTYPES = ('float32', 'bfloat16', 'float16')
# The largest float32: a loss scale beyond it would be inf.
MAX_LOSS_SCALE = float(jax.numpy.finfo(jax.numpy.float32).max)
# `train.loss_scale`'s values (resolved: 'dynamic' or 'none').
LOSS_SCALES = ('auto', 'dynamic', 'none')
# How the runner keeps conv kernels on the devices (`nfnets.train`).
KERNEL_LAYOUTS = ('hwio', 'ohwi')


def model_name(config: ml_collections.ConfigDict) -> str:
  """Registry name of `config.model.family` / `config.model.variant`."""
  family = config.model.family
  try:
    return models.name_for(family, config.model.variant)
  except ValueError as e:
    # The registry's message lists the valid names; the user needs the field.
    field = 'model.variant' if family in models.families() else 'model.family'
    raise ValueError(f'{field}: {e}') from None


def _number(value, field, cast):
  """`value`, or a command-line string of it (an 'auto' field's override)."""
  if isinstance(value, str):
    try:
      return cast(value)
    except ValueError:
      raise ValueError(
          f"{field} must be 'auto' or a number, got " f'{value!r}.'
      ) from None
  return value


def _positive_int(value, field):
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f'{field} must be a positive int, got {value!r}.')
  return value


def _check_ranges(config: ml_collections.ConfigDict) -> None:
  """The numeric fields no derivation touches, each checked by its name."""

  def require(field, ok, bounds):
    value = config
    for key in field.split('.'):
      value = value[key]
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (number and math.isfinite(value) and ok(value)):
      raise ValueError(f'{field} must be {bounds}, got {value!r}.')

  require('train.num_epochs', lambda v: v > 0, 'a number > 0')
  require('train.label_smoothing', lambda v: 0 <= v < 1, 'in [0, 1)')
  require(
      'train.eval_every_epochs', lambda v: v >= 0, '>= 0 (0: only at the end)'
  )
  require('optimizer.warmup_epochs', lambda v: v >= 0, '>= 0')
  require('optimizer.ema_decay', lambda v: 0 <= v <= 1, 'in [0, 1]')
  require('model.stochdepth_rate', lambda v: 0 <= v < 1, 'in [0, 1)')
  require('optimizer.base_lr', lambda v: v > 0, 'a number > 0')
  require('optimizer.weight_decay', lambda v: v >= 0, '>= 0')
  # jmp's dynamic scale never goes below 1 (no scaling). Above float32's
  # range it would be inf, which halving keeps inf: every step skipped.
  require(
      'train.loss_scale_init',
      lambda v: 1 <= v <= MAX_LOSS_SCALE,
      f"in [1, {MAX_LOSS_SCALE:.5g}] (float32's range)",
  )
  width = config.model.overrides.get('width')
  if width is not None:
    require('model.overrides.width', lambda v: v > 0, 'a number > 0')
  for field in (
      'train.log_every_steps',
      'train.checkpoint_every_steps',
      'train.keep_checkpoints',
      'train.loss_scale_period',
  ):
    section, key = field.split('.')
    _positive_int(config[section][key], field)


def _check_init(config: ml_collections.ConfigDict) -> None:
  """train.init_exclude: a regular expression, and only with a source."""
  exclude = config.train.init_exclude
  if exclude is None:
    return
  if not config.train.init_checkpoint:
    raise ValueError(
        f'train.init_exclude={exclude!r} is set, but train.init_checkpoint'
        ' (the weights it leaves out of) is not.'
    )
  try:
    re.compile(exclude)
  except re.error as e:
    raise ValueError(
        f'train.init_exclude={exclude!r} is not a regular expression: {e}.'
    ) from None


def kernel_layout(value: str, backend: Optional[str] = None) -> str:
  """`train.kernel_layout` resolved: 'hwio' or 'ohwi'.

  Args:
    value: 'auto', 'hwio' or 'ohwi'. 'auto' is 'ohwi' on GPUs, where cuDNN
      takes OHWI filters and HWIO kernels cost a transpose and a copy each
      per step (`nfnets.train.to_device_layout`), else 'hwio' (CPUs
      convolve HWIO kernels; TPUs are not measured).
    backend: JAX's backend (default: `jax.default_backend()`).

  Returns:
    'hwio' or 'ohwi'.

  Raises:
    ValueError: an unknown value, naming the field.
  """
  if value == AUTO:
    backend = backend or jax.default_backend()
    return 'ohwi' if backend in ('gpu', 'cuda') else 'hwio'
  if value not in KERNEL_LAYOUTS:
    raise ValueError(
        f"train.kernel_layout must be 'auto' or one of {KERNEL_LAYOUTS}, "
        f'got {value!r}.'
    )
  return value


def resolve(
    config: ml_collections.ConfigDict, num_train_examples: Optional[int] = None
) -> ml_collections.ConfigDict:
  """Returns a copy of `config` with every 'auto' field made concrete.

  Args:
    config: an experiment config (see `configs/common.py`).
    num_train_examples: size of the training split; when given, the
      durations in epochs are converted to steps in `config.steps`
      (`per_epoch`, `total`, `warmup`, `eval_every`).

  Returns:
    The resolved, locked copy. `config.model.name` holds the registry name.
  """
  # Not type safe: resolving turns the string 'auto' into numbers.
  config = ml_collections.ConfigDict(config.to_dict(), type_safe=False)
  name = model_name(config)
  info = models.info(name)
  _positive_int(config.train.batch_size, 'train.batch_size')
  _positive_int(config.eval.batch_size, 'eval.batch_size')
  if config.train.compute_dtype not in COMPUTE_DTYPES:
    raise ValueError(
        f'train.compute_dtype must be one of {COMPUTE_DTYPES}, '
        f'got {config.train.compute_dtype!r}.'
    )
  config.train.kernel_layout = kernel_layout(config.train.kernel_layout)
  if config.train.loss_scale not in LOSS_SCALES:
    raise ValueError(
        f'train.loss_scale must be one of {LOSS_SCALES}, '
        f'got {config.train.loss_scale!r}.'
    )
  if config.train.loss_scale == AUTO:
    float16 = config.train.compute_dtype == 'float16'
    config.train.loss_scale = 'dynamic' if float16 else 'none'
  for field, valid in (
      ('name', optim.OPTIMIZERS),
      ('schedule', optim.SCHEDULES),
  ):
    if config.optimizer[field] not in valid:
      raise ValueError(
          f'optimizer.{field} must be one of {valid}, '
          f'got {config.optimizer[field]!r}.'
      )
  config.model.name = name
  _check_ranges(config)
  _check_init(config)

  derived = {
      ('model', 'drop_rate'): (info.drop_rate, float),
      ('data', 'train_image_size'): (info.train_imsize, int),
      ('data', 'eval_image_size'): (info.test_imsize, int),
  }
  if info.family == 'nfnet':
    spec = nfnet.variant_spec(info.variant)
    ra_layers, ra_magnitude = spec['ra_layers'], spec['ra_magnitude']
  else:
    # The NF-ResNet / RegNet / baseline recipes use no RandAugment.
    ra_layers, ra_magnitude = 0, 0
  derived[('data', 'randaugment_layers')] = (ra_layers, int)
  derived[('data', 'randaugment_magnitude')] = (ra_magnitude, int)
  for (section, key), (value, cast) in derived.items():
    current = config[section][key]
    config[section][key] = (
        value if current == AUTO else _number(current, f'{section}.{key}', cast)
    )
  if config.data.augment_on == AUTO:
    # On a CPU backend JAX's version is slower than tf.data's; on GPUs and
    # TPUs it frees the host CPU (benchmarks/RESULTS.md).
    config.data.augment_on = (
        'host' if jax.default_backend() == 'cpu' else 'device'
    )
  layers.check_rate(config.model.drop_rate, 'model.drop_rate')
  _positive_int(config.data.train_image_size, 'data.train_image_size')
  _positive_int(config.data.eval_image_size, 'data.eval_image_size')
  for key in ('randaugment_layers', 'randaugment_magnitude'):
    if config.data[key] < 0:
      raise ValueError(f'data.{key} must be >= 0, got {config.data[key]!r}.')
  clipping = config.optimizer.agc.clipping
  if clipping in ('None', 'none', 0, '0'):
    # 0 too: a command line cannot turn a number field into None.
    clipping = config.optimizer.agc.clipping = None
  if clipping == AUTO:
    config.optimizer.agc.clipping = agc.clipping_for_batch_size(
        config.train.batch_size
    )
  elif clipping is not None:
    clipping = _number(clipping, 'optimizer.agc.clipping', float)
    config.optimizer.agc.clipping = clipping
  if clipping is not None and clipping != AUTO and clipping <= 0:
    raise ValueError(
        "optimizer.agc.clipping must be 'auto', a number > 0 or "
        f'None (no AGC), got {clipping!r}.'
    )

  if num_train_examples is not None:
    config.steps = steps_from_epochs(config, num_train_examples)
  config.lock()
  return config


def steps_from_epochs(
    config: ml_collections.ConfigDict, num_train_examples: int
) -> ml_collections.ConfigDict:
  """Converts the config's durations in epochs to steps, in one place."""
  _positive_int(num_train_examples, 'num_train_examples')
  per_epoch = num_train_examples / config.train.batch_size
  # Whole steps only: 360 epochs of ImageNet at 4096 are 112,602 steps.
  total = max(1, int(config.train.num_epochs * per_epoch))
  if config.train.max_steps is not None:
    total = min(total, _positive_int(config.train.max_steps, 'train.max_steps'))
  warmup = min(round(config.optimizer.warmup_epochs * per_epoch), total - 1)
  if config.train.eval_every_epochs:
    eval_every = max(1, round(config.train.eval_every_epochs * per_epoch))
  else:
    eval_every = 0
  return ml_collections.ConfigDict(
      dict(
          per_epoch=per_epoch,
          total=total,
          warmup=max(0, warmup),
          eval_every=eval_every,
      )
  )
