"""Every default of the project, once.

Experiment files start from `get_config()` here and change what differs.
Fields set to 'auto' are derived when a run starts (`nfnets.resolve`), from
the model variant and the global batch size, so that overriding either on the
command line (`--config.model.variant=F3`, `--config.train.batch_size=1024`)
gives a consistent configuration: nothing derived is stored here.
"""

import ml_collections
from ml_collections import config_dict

AUTO = 'auto'


def _section() -> ml_collections.ConfigDict:
  # Not type safe: an 'auto' field takes a number in an experiment file, and
  # a command-line number for it arrives as a string (parsed when resolved).
  return ml_collections.ConfigDict(type_safe=False)


def unset(field_type: type) -> config_dict.FieldReference:
  """A field whose default is None that the command line can still set.

  The command line parses a value by the type of the field's default, and
  None has none (`--config.train.max_steps=8` would fail); a placeholder
  carries the type.

  Args:
    field_type: the type a command-line value is parsed as.

  Returns:
    The placeholder, whose value is None.
  """
  return config_dict.placeholder(field_type)


def get_config() -> ml_collections.ConfigDict:
  """The paper's NFNet-F0 ImageNet recipe: the base every config edits."""
  config = _section()
  config.seed = 0

  config.model = _section()
  # Registry family and variant: ('nfnet', 'F0'), ('nf_resnet', 'ResNet50'),
  # ('nf_regnet', 'B0'), ('resnet_bn', 'ResNet50'), ...
  config.model.family = 'nfnet'
  config.model.variant = 'F0'
  # Constructor overrides (nfnets.models.create): width, alpha, activation...
  config.model.overrides = _section()
  # Dropout before the classifier: 'auto' = the variant's (Table 1).
  config.model.drop_rate = AUTO
  # NFNets: 0.25 at the last block, growing linearly with depth.
  config.model.stochdepth_rate = 0.25

  config.train = _section()
  config.train.batch_size = 4096  # global, over every device of every host
  # Durations in epochs are floats, so the command line takes fractions.
  config.train.num_epochs = 360.0
  # Stops earlier than num_epochs when set (for smoke runs); None: no cap.
  config.train.max_steps = unset(int)
  config.train.label_smoothing = 0.1
  # Gradient accumulation: each device's share of a step's batch runs in
  # this many parts, one after the other, and their gradients are averaged
  # before AGC and the update. The same optimizer step over the whole
  # global batch (batch_size, and AGC's lambda for it) with one part's
  # activation memory: batch 4096 on fewer devices. BatchNorm baselines
  # normalise each part alone.
  # (A field added since runs were first saved: see nfnets.cli.ADDED_FIELDS.)
  config.train.microbatches = 1
  # Forward/backward dtype; params, optimizer state and grads stay float32.
  config.train.compute_dtype = 'bfloat16'
  # float16's 5-bit exponent flushes small gradients to zero, so its loss is
  # multiplied by a scale before the backward pass and the gradients divided
  # by it after. 'dynamic': start at loss_scale_init; a step whose
  # gradients overflow is skipped and halves the scale, and every
  # loss_scale_period finite steps double it. 'none', or 'auto': 'dynamic'
  # for float16, 'none' otherwise (bfloat16 has float32's exponent).
  config.train.loss_scale = 'auto'
  config.train.loss_scale_init = 2.0**15
  config.train.loss_scale_period = 2000
  # How conv kernels (and their momenta and EMAs) are kept on the devices
  # between steps: 'hwio' (Haiku's), 'ohwi' (cuDNN's filter layout, which
  # spares a GPU step the transposes and copies of every kernel), or 'auto':
  # 'ohwi' on GPUs, else 'hwio'. Checkpoints are HWIO either way.
  config.train.kernel_layout = 'auto'
  # Fine-tuning: a new run (its workdir has no checkpoint yet) starts from
  # these weights instead of a random init: a published DeepMind file (e.g.
  # F0_haiku.npz) or another run's workdir or checkpoints/<step> folder. The
  # EMA starts from them too; the step and optimizer state start afresh.
  config.train.init_checkpoint = unset(str)
  # Parameters (and model state) whose 'module/name' path this regular
  # expression matches (re.search) keep their random init, e.g. 'linear/'
  # for a classifier with another number of classes.
  config.train.init_exclude = unset(str)
  config.train.log_every_steps = 100
  config.train.checkpoint_every_steps = 1000
  config.train.keep_checkpoints = 3
  # Evaluate every this many epochs (and at the end); 0: only at the end.
  config.train.eval_every_epochs = 10.0

  config.eval = _section()
  config.eval.batch_size = 1000  # global; the last batch is padded and masked
  config.eval.ema = True  # also evaluate the EMA of the parameters
  # --mode=eval: a published DeepMind file (e.g. F0_haiku.npz), another
  # run's workdir or one of its checkpoints/<step> folders; None: the
  # workdir's latest checkpoint.
  config.eval.checkpoint = unset(str)

  config.optimizer = _section()
  config.optimizer.name = 'sgd'
  config.optimizer.base_lr = 0.1  # per 256 images: lr = 0.1 * batch / 256
  config.optimizer.schedule = 'cosine'
  config.optimizer.warmup_epochs = 5.0
  config.optimizer.momentum = 0.9
  config.optimizer.nesterov = True
  config.optimizer.weight_decay = 2e-5
  config.optimizer.b1 = 0.9  # adam-family only
  config.optimizer.b2 = 0.999  # adam-family only
  config.optimizer.ema_decay = 0.99999
  config.optimizer.agc = _section()
  # 'auto': from the global batch size (nfnets.agc.clipping_for_batch_size);
  # a number overrides it; None turns AGC off (on the command line: 0, or
  # 'none' where the field is not a number).
  config.optimizer.agc.clipping = AUTO
  config.optimizer.agc.eps = 1e-3
  config.optimizer.agc.exclude = (r'^[^/]+/~/linear/w$',)

  config.data = _section()
  config.data.name = 'imagenet2012'
  config.data.data_dir = unset(str)
  config.data.train_split = 'train'
  config.data.eval_split = 'validation'
  # 'auto': the variant's train / test resolution (Table 1).
  config.data.train_image_size = AUTO
  config.data.eval_image_size = AUTO
  # 'auto': the variant's RandAugment layers / magnitude (Table 1).
  config.data.randaugment_layers = AUTO
  config.data.randaugment_magnitude = AUTO
  config.data.mixup_alpha = 0.2
  config.data.cutmix = True
  # Where RandAugment, MixUp/CutMix and normalisation run: 'device' (the
  # accelerator, in JAX, after the CPU has decoded, cropped, resized and
  # flipped; the CPU then keeps up with a GPU, see benchmarks/RESULTS.md)
  # or 'host' (all in tf.data on the CPU); 'auto': 'device' on GPUs and
  # TPUs, 'host' on a CPU backend. The embedded digits ignore it.
  config.data.augment_on = AUTO
  config.data.eval_resize = 'resize_crop'
  config.data.strict = False
  config.data.shuffle_buffer = 16_384
  config.data.prefetch = -1
  # Train batches copied to the accelerators ahead of the step (0: none).
  config.data.device_prefetch = 2
  return config


def parse_arg(arg, choices, default):
  """Splits a config arg like 'F3,local' into (choice, flags set).

  Args:
    arg: the text after ':' in --config=file.py:ARG, or None.
    choices: the valid first tokens (variants, depths).
    default: the choice when `arg` gives none.

  Returns:
    `(choice, {other tokens})`.
  """
  tokens = [t.strip() for t in (arg or '').split(',') if t.strip()]
  choice = default
  if tokens and tokens[0] in choices:
    choice = tokens.pop(0)
  unknown = [t for t in tokens if t not in KNOWN_FLAGS]
  if unknown:
    raise ValueError(
        f'Unknown config arg {unknown} in {arg!r}: the first '
        f'token is one of {list(choices)}, then any of '
        f'{sorted(KNOWN_FLAGS)}.'
    )
  return choice, set(tokens)


# 'local' shrinks a recipe to under a minute on a CPU; '90ep'/'360ep' pick the
# NF-ResNet schedule length.
KNOWN_FLAGS = frozenset({'local', '90ep', '360ep'})


def shrink(
    config: ml_collections.ConfigDict, **model_overrides
) -> ml_collections.ConfigDict:
  """The same recipe, tiny: embedded data, 32 px, a few steps on any CPU.

  Everything that defines the recipe (optimizer, schedule shape, AGC rule,
  regularization, augmentations the data supports) is kept; sizes shrink.

  Args:
    config: a full experiment config.
    **model_overrides: constructor overrides that make the model tiny.

  Returns:
    The same config, edited in place.
  """
  config.model.overrides.update(model_overrides)
  config.data.name = 'digits'
  config.data.train_image_size = 32
  config.data.eval_image_size = 32
  config.train.batch_size = 32
  config.train.max_steps = 6
  config.train.compute_dtype = 'float32'  # bfloat16 is slow on CPUs
  config.train.log_every_steps = 2
  config.train.checkpoint_every_steps = 6
  config.train.eval_every_epochs = 0.0
  config.eval.batch_size = 120
  return config


# The NF-ResNet / baseline ResNet ImageNet recipe (NF-ResNets paper).
RESNET_DEPTHS = ('26', '50', '101', '152', '200', '288', '600')


def resnet_config(
    family: str, arg=None, agc_clipping=AUTO
) -> ml_collections.ConfigDict:
  """The ResNet-family recipe: batch 1024, lr 0.4, 90 or 360 epochs.

  Args:
    family: registry family ('nf_resnet', 'resnet_bn', 'resnet_skipinit',
      'resnet_fixup', 'resnet_unnormalized').
    arg: '<depth>[,90ep|,360ep][,local]', e.g. '50' or '200,360ep,local'.
    agc_clipping: AGC's lambda for this family by default.

  Returns:
    The config.
  """
  depth, flags = parse_arg(arg, RESNET_DEPTHS, '50')
  config = get_config()
  config.model.family = family
  config.model.variant = f'ResNet{depth}'
  # Declared so that the command line can set them: the families' own
  # width (4: stage widths 256-2048) and depth (None: the variant's).
  config.model.overrides = _section()
  config.model.overrides.width = 4.0
  config.model.overrides.depth = unset(tuple)
  config.model.drop_rate = AUTO if family == 'nf_resnet' else 0.0
  config.model.stochdepth_rate = 0.1
  config.train.batch_size = 1024
  config.train.num_epochs = 360.0 if '360ep' in flags else 90.0
  config.train.eval_every_epochs = 5.0
  config.optimizer.base_lr = 0.1  # 0.4 at batch 1024
  config.optimizer.weight_decay = 5e-5
  # No AGC (None) stays settable: --config.optimizer.agc.clipping=auto.
  config.optimizer.agc.clipping = (
      unset(str) if agc_clipping is None else agc_clipping
  )
  config.data.train_image_size = 224
  config.data.eval_image_size = 224
  config.data.mixup_alpha = 0.0
  config.data.cutmix = False
  config.data.randaugment_layers = 0
  config.data.randaugment_magnitude = 0
  if 'local' in flags:
    shrink(config, width=0.25, depth=(1, 1, 1, 1))
  return config
