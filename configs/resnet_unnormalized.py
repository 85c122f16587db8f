"""The same pre-activation ResNet with BatchNorm simply removed: its signal explodes with depth (2^d), the failure NF networks fix.

    python experiment.py --config=configs/resnet_unnormalized.py:50 --workdir=DIR
    python experiment.py --config=configs/resnet_unnormalized.py:50,local --workdir=/tmp/x

The NF-ResNet recipe of configs/nf_resnet.py (batch 1024, lr 0.4, 90 or 360
epochs), so the papers' comparisons can be rerun side by side; AGC is off by
default (`--config.optimizer.agc.clipping=auto` turns it on). Expected:
Not trainable at standard learning rates without help; the point of the comparison. Runtime: not measured here.
"""

from configs import common


def get_config(arg=None):
  """'<depth>[,90ep|,360ep][,local]', depth in 26/50/101/152/200/288/600."""
  return common.resnet_config('resnet_unnormalized', arg, agc_clipping=None)
