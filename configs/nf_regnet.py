"""NF-RegNet-B0 ... B8 on ImageNet (the release's EfficientNet-like models).

    python experiment.py --config=configs/nf_regnet.py:B0 --workdir=gs://B/b0
    python experiment.py --config=configs/nf_regnet.py:B0,local --workdir=/tmp/b

Recipe: the NFNet recipe (batch 4096, 360 epochs, SGD-Nesterov, lr 0.1 x
batch/256, cosine, EMA, AGC from the batch size) with the variant's train/test
sizes and dropout, SiLU, stochastic depth 0.1, and no RandAugment/MixUp.
Paper's accuracy: the NF-ResNets paper reports NF-RegNets competitive with
EfficientNets of similar FLOPs (its NF-RegNet table); not quoted here.
Runtime: not measured here.
"""

from configs import common

VARIANTS = tuple(f'B{i}' for i in range(9))


def get_config(arg=None):
  """'B0'...'B8', optionally ',local'."""
  variant, flags = common.parse_arg(arg, VARIANTS, 'B0')
  config = common.get_config()
  config.model.family = 'nf_regnet'
  config.model.variant = variant
  config.model.stochdepth_rate = 0.1
  # Declared so that the command line can set them: the family's width
  # multiplier and depth (None: the variant's).
  config.model.overrides.width = 0.75
  config.model.overrides.depth = common.unset(tuple)
  config.data.randaugment_layers = 0
  config.data.randaugment_magnitude = 0
  config.data.mixup_alpha = 0.0
  config.data.cutmix = False
  if 'local' in flags:
    common.shrink(config, width=0.25, depth=(1, 1, 1, 1))
  return config
