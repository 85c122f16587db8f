"""Writes a run's weights as a parameter file in the published layout.

    python -m nfnets.export --checkpoint=workdir/f0 --output=f0_run.npz
    python -m nfnets.export --checkpoint=workdir/f0/checkpoints/4000 \\
        --weights=raw --format=npz --output=f0_4000.npz

The published NFNet files (`F0_haiku.npz` ... `F6_haiku.npz`) are pickles
of a `{module_path: {param_name: float32 ndarray}}` dict. `--format=pickle`
(the default) writes a run's weights the same way, with the module paths of
its model, so that whatever reads the published files reads it: the
original release's loader (a plain `pickle.load`), this project's
`nfnets.predict --checkpoint=FILE --model=NAME`, `train.init_checkpoint`
and `eval.checkpoint`. `--format=npz` writes a NumPy archive with
'module_path/param_name' keys instead, which `np.load` reads without
unpickling anything; this project's readers take it too.

`--checkpoint` is a run's workdir (its newest readable checkpoint), its
`checkpoints/` folder or one `checkpoints/<step>` folder. `--weights` picks
the EMA or the trained weights ('auto': those the run evaluated, as
`nfnets.predict` does). The file holds parameters only: a model with
BatchNorm statistics is refused, as the layout has no place for them.

The file is written beside `--output` and renamed into place once whole,
so an interrupted export leaves no partial file, and an existing file is
kept unless `--overwrite`.
"""

import argparse
import os
import pickle
import secrets
import sys
from typing import Any, Optional, Sequence

import jax
import numpy as np

from nfnets import predict
from nfnets import train

_PROG = 'python -m nfnets.export'
FORMATS = ('pickle', 'npz')
# Protocol 4 stores each array as numpy's `_reconstruct` and its raw bytes,
# as the published files do. 2 would store the bytes as text (a third
# larger); 5 names another numpy function, which the original release's
# readers' numpy and this project's restricted unpickler may not admit.
_PICKLE_PROTOCOL = 4
# The function a pickled array is rebuilt by.
_RECONSTRUCT = np.zeros(1).__reduce_ex__(_PICKLE_PROTOCOL)[0]


class _Pickler(pickle._Pickler):  # pylint: disable=protected-access
  """Names numpy's `_reconstruct` as numpy 1 does, whatever numpy writes.

  numpy 2 names it `numpy._core.multiarray._reconstruct`, a module numpy 1
  before 1.26.1 does not have: the original release's environments could
  not read the file. The published files name it
  `numpy.core.multiarray._reconstruct`, which numpy 2 reads as well. The
  pure-Python pickler is the one whose choice of name can be overridden.
  """

  def save_global(self, obj, name=None):
    if obj is not _RECONSTRUCT:
      super().save_global(obj, name)
      return
    self.save('numpy.core.multiarray')
    self.save('_reconstruct')
    self.write(pickle.STACK_GLOBAL)
    self.memoize(obj)


def param_tree(params: Any) -> dict[str, dict[str, np.ndarray]]:
  """Haiku params as plain `{module: {name: float32 ndarray}}` dicts."""
  return {
      str(module): {
          str(name): np.asarray(jax.device_get(value), np.float32)
          for name, value in names.items()
      }
      for module, names in params.items()
  }


def _check_output(output: str, overwrite: bool) -> str:
  """`output`, `~` expanded, once it can be written; one-line errors."""
  if not output:
    raise ValueError('--output is empty: give the file to write.')
  if '://' in output:
    raise ValueError(
        f'--output={output}: write to a local file (the parameter-file'
        ' readers open local files), then copy it where it should go.'
    )
  path = train.expand_home(output)
  if os.path.isdir(path):
    raise ValueError(f'--output={output} is a folder; give a file name.')
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(
        f'--output={output} exists and is kept; give --overwrite to'
        ' replace it, or another name.'
    )
  parent = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(parent):
    raise FileNotFoundError(
        f'--output={output}: no folder {parent}; create it first.'
    )
  return path


def write(
    run: predict.RunWeights,
    output: str,
    fmt: str = 'pickle',
    overwrite: bool = False,
) -> int:
  """Writes `run`'s params to `output`; returns the file's size in bytes.

  Args:
    run: from `predict.read_run_weights`.
    output: the file to write (local; `~` expanded).
    fmt: 'pickle' (the published files' layout) or 'npz'.
    overwrite: replace an existing file (else it is an error).

  Raises:
    ValueError: an unknown format, a folder or remote path as `output`, or
      a model with BatchNorm statistics.
    FileExistsError: `output` exists and `overwrite` is False.
    FileNotFoundError: `output`'s folder does not exist.
  """
  if fmt not in FORMATS:
    raise ValueError(f'--format={fmt!r} must be one of {FORMATS}.')
  if jax.tree_util.tree_leaves(run.model_state):
    raise ValueError(
        f'{run.model} keeps BatchNorm statistics, which a parameter file'
        ' does not hold; use the run itself (--checkpoint=WORKDIR where a'
        ' checkpoint is asked for).'
    )
  path = _check_output(output, overwrite)
  tree = param_tree(run.params)
  # Written under a temporary name in the same folder, then renamed: a
  # reader never sees half a file, and a failed write keeps the old one.
  folder, base = os.path.split(path)
  partial = os.path.join(folder, f'.{base}.{secrets.token_hex(4)}.partial')
  # 0o666 less the umask, as any file this user writes.
  fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
  try:
    with os.fdopen(fd, 'wb') as f:
      if fmt == 'pickle':
        _Pickler(f, protocol=_PICKLE_PROTOCOL).dump(tree)
      else:
        np.savez(
            f,
            **{
                f'{module}/{name}': value
                for module, names in tree.items()
                for name, value in names.items()
            },
        )
    os.replace(partial, path)
  except BaseException:
    if os.path.exists(partial):
      os.remove(partial)
    raise
  return os.path.getsize(path)


def export(
    checkpoint_path: str,
    output: str,
    weights: str = 'auto',
    fmt: str = 'pickle',
    overwrite: bool = False,
) -> dict[str, Any]:
  """Writes the weights of a run's checkpoint as a parameter file.

  Args:
    checkpoint_path: a run's workdir, `checkpoints/` or `checkpoints/<step>`.
    output: the file to write.
    weights: 'auto' (those the run evaluated), 'ema' or 'raw'.
    fmt: 'pickle' (the published files' layout) or 'npz'.
    overwrite: replace an existing `output`.

  Returns:
    What was written: `output`, `model`, `overrides`, `num_classes`,
    `step`, `weights` ('ema' or 'raw'), `num_params`, `bytes`, `source`.

  Raises:
    FileNotFoundError: no run at `checkpoint_path`, or no readable
      checkpoint in it.
    FileExistsError: `output` exists and `overwrite` is False.
    ValueError: bad arguments, or weights this layout cannot hold.
  """
  if weights not in predict.WEIGHTS:
    raise ValueError(f'--weights={weights!r} must be one of {predict.WEIGHTS}.')
  if fmt not in FORMATS:
    raise ValueError(f'--format={fmt!r} must be one of {FORMATS}.')
  # Checked before the checkpoint is read: F6's takes a while.
  _check_output(output, overwrite)
  source = train.expand_home(checkpoint_path)
  found = train._run_checkpoint(source, '--checkpoint')  # pylint: disable=protected-access
  if found is None:
    raise FileNotFoundError(
        f'--checkpoint={checkpoint_path}: no run there (give a workdir, its'
        ' checkpoints/ folder or one checkpoints/<step> folder).'
    )
  run = predict.read_run_weights(found[0], found[1], weights)
  size = write(run, output, fmt, overwrite)
  return dict(
      output=train.expand_home(output),
      model=run.model,
      overrides=run.overrides,
      num_classes=run.num_classes,
      step=run.step,
      weights='ema' if run.ema else 'raw',
      num_params=sum(
          int(np.size(v)) for v in jax.tree_util.tree_leaves(run.params)
      ),
      bytes=size,
      source=run.where,
  )


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog=_PROG, description=__doc__.split('\n\n')[0]
  )
  parser.add_argument(
      '--checkpoint',
      required=True,
      help="a run's workdir, checkpoints/ or checkpoints/<step> folder",
  )
  parser.add_argument('--output', required=True, help='the file to write')
  parser.add_argument(
      '--weights',
      choices=predict.WEIGHTS,
      default='auto',
      help=(
          'auto (the EMA weights if the run evaluated them, else the'
          ' trained ones), ema or raw'
      ),
  )
  parser.add_argument(
      '--format',
      choices=FORMATS,
      default='pickle',
      help="pickle: the published files' layout; npz: a NumPy archive",
  )
  parser.add_argument(
      '--overwrite', action='store_true', help='replace an existing file'
  )
  return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Exports the weights; prints what was written and how to read it."""
  args = build_parser().parse_args(argv)
  try:
    done = export(
        args.checkpoint, args.output, args.weights, args.format, args.overwrite
    )
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    sys.exit(f'{_PROG}: error: {e}')
  which = 'EMA' if done['weights'] == 'ema' else 'trained'
  print(
      f'Wrote {done["output"]}: {done["model"]}, {which} weights of'
      f' {done["source"]}; {done["num_params"] / 1e6:.2f}M parameters,'
      f' {done["num_classes"]} classes, {done["bytes"] / 2**20:.1f} MiB.'
  )
  if done['overrides']:
    print(
        f'The run set model.overrides={done["overrides"]}: read the file as'
        ' train.init_checkpoint or eval.checkpoint under a config with the'
        ' same overrides.'
    )
  else:
    print(
        f'Read it with --checkpoint={done["output"]} --model={done["model"]}'
        ' (nfnets.predict), or as train.init_checkpoint or eval.checkpoint.'
    )
  return 0


if __name__ == '__main__':
  sys.exit(main())
