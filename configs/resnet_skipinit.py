"""SkipInit ResNet: no normalization, a zero-initialized scalar gain at the end of every residual branch (De & Smith, 2020).

    python experiment.py --config=configs/resnet_skipinit.py:50 --workdir=DIR
    python experiment.py --config=configs/resnet_skipinit.py:50,local --workdir=/tmp/x

The NF-ResNet recipe of configs/nf_resnet.py (batch 1024, lr 0.4, 90 or 360
epochs), so the papers' comparisons can be rerun side by side; AGC is off by
default (`--config.optimizer.agc.clipping=auto` turns it on). Expected:
SkipInit trains at small batch but degrades at large batch (De & Smith, 2020; NF-ResNets paper, Figure 3). Runtime: not measured here.
"""

from configs import common


def get_config(arg=None):
  """'<depth>[,90ep|,360ep][,local]', depth in 26/50/101/152/200/288/600."""
  return common.resnet_config('resnet_skipinit', arg, agc_clipping=None)
