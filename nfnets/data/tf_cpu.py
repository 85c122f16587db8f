"""Keeps TensorFlow, used only for input pipelines, off the accelerators.

JAX owns the accelerators. A TensorFlow build with GPU support would otherwise
reserve most of each GPU's memory the first time it runs an op. Every module
of this package that imports TensorFlow calls `hide_accelerators()` right
after the import, before any op runs.
"""

import tensorflow as tf

_done = False


def hide_accelerators() -> None:
  """Makes GPUs invisible to TensorFlow (idempotent)."""
  global _done
  if _done:
    return
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:
    # The runtime was already initialised by someone else (e.g. a notebook
    # that ran a TF op first); the devices can no longer be changed.
    pass
  _done = True


hide_accelerators()
