"""Pre-activation ResNet with BatchNorm: the baseline NF networks replace.

    python experiment.py --config=configs/resnet_bn.py:50 --workdir=DIR
    python experiment.py --config=configs/resnet_bn.py:50,local --workdir=/tmp/x

The NF-ResNet recipe of configs/nf_resnet.py (batch 1024, lr 0.4, 90 or 360
epochs), so the papers' comparisons can be rerun side by side; AGC is off by
default (`--config.optimizer.agc.clipping=auto` turns it on). Expected:
ResNet-50 with BN: 76-78% top-1 at 90 epochs (the usual figure; 78.6% in Table 3 with the NFNet-style recipe). Runtime: not measured here.
"""

from configs import common


def get_config(arg=None):
  """'<depth>[,90ep|,360ep][,local]', depth in 26/50/101/152/200/288/600."""
  return common.resnet_config('resnet_bn', arg, agc_clipping=None)
