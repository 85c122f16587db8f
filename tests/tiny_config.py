"""A seconds-long variant of the demo config, for the runner's tests.

python experiment.py --config=tests/tiny_config.py:STEPS --workdir=DIR
"""

import ml_collections

from configs import default


def get_config(arg=None) -> ml_collections.ConfigDict:
  """The demo recipe on a tiny NF-ResNet at 16 px; `arg`: number of steps."""
  config = default.get_config()
  config.model.overrides = ml_collections.ConfigDict(
      dict(width=0.25, depth=(1, 1, 1, 1), skipinit='inv_sqrt')
  )
  config.train.max_steps = int(arg) if arg else 12
  config.train.log_every_steps = 1
  config.train.checkpoint_every_steps = 4
  config.train.keep_checkpoints = 5
  config.train.eval_every_epochs = 0
  config.eval.batch_size = 64  # 360 test images: the last batch is padded
  config.eval.ema = False
  config.data.train_image_size = 16
  config.data.eval_image_size = 16
  return config
