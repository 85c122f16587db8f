"""NF-ResNet-50/101/152/200 on ImageNet (NF-ResNets paper; NFNets paper's AGC).

    python experiment.py --config=configs/nf_resnet.py:50 --workdir=gs://B/r50
    python experiment.py --config=configs/nf_resnet.py:200,360ep --workdir=...
    python experiment.py --config=configs/nf_resnet.py:50,local --workdir=/tmp/r

Recipe: batch 1024, SGD-Nesterov 0.9, lr 0.4 (0.1 x batch/256) with warmup
and cosine decay, 90 epochs (or 360 with ',360ep'), label smoothing 0.1,
weight decay 5e-5, dropout 0.25, stochastic depth 0.1, AGC lambda from the
batch size, EMA. Paper's accuracy: NF-ResNets match batch-normalized ResNets
of the same depth (NF-ResNets paper, Table 2; ResNet-50 with BN is 78.6% in
the NFNets paper's Table 3). Runtime: not measured here; NF-ResNet-50 is
~4.1B multiply-adds per image, like ResNet-50.

Sweeps: `agc_batch`, the NFNets paper's figure: batch 256...4096 x lambda
0.01...0.16, plus no AGC:
    python -m nfnets.sweep --config=configs/nf_resnet.py:50 --sweep=agc_batch --dry_run
`agc_batch_seeds` is the same grid with the paper's protocol, 5 seeds per
setting and the best 4 averaged (150 runs):
    python -m nfnets.sweep --config=configs/nf_resnet.py:50 \
        --sweep=agc_batch_seeds --average_best=4
"""

from configs import common


def get_config(arg=None):
  """'<depth>[,90ep|,360ep][,local]', depth in 26/50/101/152/200/288/600."""
  return common.resnet_config('nf_resnet', arg)


def sweep_agc_batch():
  """Batch size x AGC lambda (None: no AGC), lr scaled 0.1 x batch / 256."""
  return [
      {'train.batch_size': batch, 'optimizer.agc.clipping': clipping}
      for batch in (256, 512, 1024, 2048, 4096)
      for clipping in (0.01, 0.02, 0.04, 0.08, 0.16, None)
  ]


def sweep_agc_batch_seeds():
  """`sweep_agc_batch` with seeds 0-4 per setting (average the best 4)."""
  return [
      dict(overrides, seed=seed)
      for overrides in sweep_agc_batch()
      for seed in range(5)
  ]


def sweep_agc_on_off():
  """Two runs at the config's batch size: AGC from the batch size, and none.

  With ',local' this is a seconds-long check that a sweep works end to end.
  """
  return [
      {'optimizer.agc.clipping': common.AUTO},
      {'optimizer.agc.clipping': None},
  ]
