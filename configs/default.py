"""The embedded default: a small NF-ResNet with AGC on handwritten digits.

Runs anywhere, in minutes on a laptop CPU, on real data that ships inside
scikit-learn (1,797 8x8 digits, upsampled to 32x32 RGB; 1,437 train / 360
test). This is what `make demo` trains:

    python experiment.py --config=configs/default.py --workdir=workdir/demo

Expected: test top-1 >= 97% (about 98-99%) in under 3 minutes on a 2-core
CPU (see the README for the measured figure).
"""

import ml_collections

from configs import common


def get_config(arg=None) -> ml_collections.ConfigDict:
  """The demo config; it takes no argument (`configs/default.py:X` is refused)."""
  if arg:
    # Other config files take one ('nfnet.py:F0'); here it would be ignored.
    raise ValueError(
        f'configs/default.py takes no argument, got {arg!r}; drop the'
        ' ":..." or pick a config file that takes one (e.g.'
        ' configs/nfnet.py:F0,local).'
    )
  config = common.get_config()
  # NF-ResNet-26 at a quarter of the standard width: 4 stages, 8 blocks,
  # stem 16 and stage widths 64/128/256/512 channels.
  config.model.family = 'nf_resnet'
  config.model.variant = 'ResNet26'
  # SkipInit gains start at 1/sqrt(8 blocks), not 0: AGC bounds a zero
  # gain's update to lambda * eps per step, which ImageNet's 100k steps
  # outgrow but a demo of a few hundred steps would not (it stalls at ~45%).
  # width is a float so that the command line takes fractions (0.5);
  # depth None: the variant's blocks per stage.
  config.model.overrides = ml_collections.ConfigDict(
      dict(width=1.0, skipinit='inv_sqrt', depth=common.unset(tuple))
  )
  config.model.drop_rate = 0.0
  config.model.stochdepth_rate = 0.0

  config.train.batch_size = 64
  config.train.num_epochs = 10.0
  config.train.label_smoothing = 0.0
  # bfloat16 is slow on CPUs; the accelerator recipes keep it.
  config.train.compute_dtype = 'float32'
  config.train.log_every_steps = 50
  config.train.checkpoint_every_steps = 200
  config.train.eval_every_epochs = 5.0

  config.eval.batch_size = 128
  config.eval.ema = True

  config.optimizer.base_lr = 0.4  # per 256 images: 0.1 at batch 64
  config.optimizer.warmup_epochs = 1.0
  config.optimizer.weight_decay = 5e-5
  config.optimizer.ema_decay = 0.999
  config.optimizer.agc.clipping = 0.04

  config.data.name = 'digits'
  config.data.train_image_size = 32
  config.data.eval_image_size = 32
  config.data.mixup_alpha = 0.0
  config.data.cutmix = False
  return config
