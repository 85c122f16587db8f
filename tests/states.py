"""New training states for the tests, as a fresh run makes them."""

import jax
import numpy as np

from nfnets import train


def new_state(config, seed=1):
  """`(resolved config, new host state)` of `config`'s model and optimizer.

  The model is initialised at 16 px, the tiny runs' image size.
  """
  config, num_classes = train.prepare(config)
  forward = train.create_model(config, num_classes)
  optimizer, _ = train.optimizer_and_schedule(config)
  state = train.create_train_state(
      jax.random.PRNGKey(seed), forward, optimizer, 16
  )
  return config, jax.tree_util.tree_map(np.asarray, state)
