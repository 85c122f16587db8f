"""Helpers for tests and benchmarks of the input pipelines.

Not used by training: the experiment configs hold the real defaults.
"""

import ml_collections


def config(**overrides) -> ml_collections.ConfigDict:
  """A complete data config (F0-like augmentation) with `overrides` applied.

  Args:
    **overrides: field values replacing the ones below.

  Returns:
    A `ConfigDict` with every field `nfnets.data.create_dataset` reads.
  """
  cfg = ml_collections.ConfigDict(
      {
          'name': 'digits',
          'data_dir': None,
          'train_split': 'train',
          'eval_split': 'validation',
          'randaugment_layers': 4,
          'randaugment_magnitude': 5,
          'mixup_alpha': 0.2,
          'cutmix': True,
          'augment_on': 'host',
          'eval_resize': 'resize_crop',
          'strict': False,
          'shuffle_buffer': 1000,
          'prefetch': 2,
      }
  )
  for field, value in overrides.items():
    if field not in cfg:
      raise KeyError(f'{field!r} is not a data config field: {list(cfg)}.')
    cfg[field] = value
  return cfg
