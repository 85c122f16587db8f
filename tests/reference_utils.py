"""Loading the numerical reference fixtures of the original architectures."""

import glob
import json
import os
import zlib

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (scale, offset) of the deterministic fixture values, by parameter name.
_VALUE_SPECS = {
    'w': (0.1, 0.0),
    'gain': (0.1, 1.0),
    'bias': (0.1, 0.0),
    'b': (0.1, 0.0),
    'skip_gain': (0.1, 0.5),
}


def reference_dir() -> str:
  return os.environ.get(
      'NFNETS_REFERENCE_DIR',
      os.path.join(REPO_ROOT, '..', 'shared', 'fixtures'),
  )


def fixture_tags() -> list[str]:
  """Tags `<tag>` of every `<tag>_params.json` in the reference folder."""
  paths = sorted(glob.glob(os.path.join(reference_dir(), '*_params.json')))
  return [os.path.basename(p)[: -len('_params.json')] for p in paths]


def zeros_tree(tag: str) -> dict:
  """`<tag>`'s published parameter tree as zeros (names and shapes only)."""
  with open(os.path.join(reference_dir(), f'{tag}_params.json')) as f:
    shapes = json.load(f)['params']
  return {
      module: {
          name: np.zeros(shape, np.float32) for name, shape in params.items()
      }
      for module, params in shapes.items()
  }


def load_fixture(tag: str):
  """Returns (spec dict, params tree of numpy arrays, reference npz)."""
  with open(os.path.join(reference_dir(), f'{tag}_params.json')) as f:
    spec = json.load(f)
  params = {}
  for module, entries in spec['params'].items():
    params[module] = {}
    for name, shape in entries.items():
      scale, offset = _VALUE_SPECS[name]
      rng = np.random.default_rng(zlib.crc32(f'{module}/{name}'.encode()))
      value = rng.standard_normal(tuple(shape)) * scale + offset
      params[module][name] = value.astype(np.float32)
  reference = dict(
      np.load(os.path.join(reference_dir(), f'{tag}_reference.npz'))
  )
  return spec, params, reference
