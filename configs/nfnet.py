"""NFNet-F0 ... F7 and F0+ ... F7+ on ImageNet: the paper's recipe.

    python experiment.py --config=configs/nfnet.py:F0 --workdir=gs://BUCKET/f0
    python experiment.py --config=configs/nfnet.py:F0,local --workdir=/tmp/f0

Recipe (NFNets paper, Table 1 and appendix): batch 4096, 360 epochs (112,602
steps), SGD-Nesterov 0.9, lr 0.1 x batch/256 with a 5-epoch warmup and cosine
decay, label smoothing 0.1, weight decay 2e-5, AGC lambda from the batch size
(0.01 at 4096), EMA 0.99999, stochastic depth 0.25, the variant's dropout,
RandAugment (4 layers, magnitude 5/10/15), MixUp + CutMix, bf16.

Paper's ImageNet top-1 (Table 3): F0 83.6, F1 84.7, F2 85.1, F3 85.7,
F4 85.9, F5 86.0, F6+SAM 86.5. Runtime: not measured here; Table 3's training
step of F0 is 73.3 ms on TPUv3 at 32 images per core, i.e. about 2.3 days
for the 112,602 steps on a v3-128 slice (4096 images per step), an estimate.
`:F0,local` runs the same recipe shrunk to under a minute on a CPU
(embedded digits; most of it compiling).

Sweeps: `ablation` (the rows of Table 2), e.g.
    python -m nfnets.sweep --config=configs/nfnet.py:F0 --sweep=ablation --dry_run
"""

import ml_collections

from configs import common

VARIANTS = tuple(f'F{i}{plus}' for plus in ('', '+') for i in range(8))


def get_config(arg=None) -> ml_collections.ConfigDict:
  """'F0'...'F7' or 'F0+'...'F7+', optionally ',local'."""
  variant, flags = common.parse_arg(arg, VARIANTS, 'F0')
  config = common.get_config()
  config.model.family = 'nfnet'
  config.model.variant = variant
  # Declared so sweeps and the command line can set them (None: the
  # variant's own; width multiplies the stage widths).
  config.model.overrides = ml_collections.ConfigDict(
      dict(
          width=1.0,
          widths=common.unset(tuple),
          depth=common.unset(tuple),
          use_two_convs=True,
      ),
      type_safe=False,
  )
  if 'local' in flags:
    common.shrink(
        config, widths=(32, 64, 128, 128), depth=(1, 1, 1, 1), group_width=16
    )
  return config


def sweep_ablation():
  """Table 2: from an NF-SE-ResNeXt-D-like baseline to NFNet-F0, one change
  at a time (paper's top-1: 80.4, 80.9, 81.3, 82.2, 83.2, 83.6)."""
  baseline = {
      'model.overrides.widths': (256, 512, 1024, 2048),
      'model.overrides.use_two_convs': False,
      'data.mixup_alpha': 0.0,
      'data.cutmix': False,
      'data.randaugment_layers': 0,
  }
  rows = [dict(baseline)]
  for change in (
      {'model.overrides.widths': None},
      {'model.overrides.use_two_convs': True},
      {'data.mixup_alpha': 0.2},
      {'data.randaugment_layers': common.AUTO},
      {'data.cutmix': True},
  ):
    rows.append({**rows[-1], **change})
  return rows
