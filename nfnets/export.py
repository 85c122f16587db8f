"""Writes a run's weights as a parameter file in the published layout.

    python -m nfnets.export --checkpoint=workdir/f0 --output=f0_run.npz
    python -m nfnets.export --checkpoint=workdir/f0/checkpoints/4000 \\
        --weights=raw --format=npz --output=f0_4000.npz

The published NFNet files (`F0_haiku.npz` ... `F6_haiku.npz`) are pickles
of a `{module_path: {param_name: float32 ndarray}}` dict. `--format=pickle`
(the default) writes a run's weights the same way, with the module paths of
its model: the original release's loader (a plain `pickle.load`, numpy 1 or
2) reads it, and so do this project's `train.init_checkpoint` and
`eval.checkpoint` under a config of the same model and overrides, and
`nfnets.predict --checkpoint=FILE --model=NAME`. `--format=npz` writes a
NumPy archive with 'module_path/param_name' keys instead, which `np.load`
reads without unpickling anything; this project's readers take it too. The
file holds weights only: not the image size, crop or class names of the
run (`nfnets.predict` uses the model's test size and ImageNet's names for a
file), nor BatchNorm statistics, so a BatchNorm network is refused.

`--checkpoint` is a run's workdir (its newest readable checkpoint), its
`checkpoints/` folder or one `checkpoints/<step>` folder. `--weights` picks
the EMA or the trained weights ('auto': those the run evaluated, as
`nfnets.predict` does).

The file is written beside `--output` under a hidden temporary name
(`.export-*.partial`) and renamed into place once whole: an interrupted
export (Ctrl-C, SIGTERM, an error) leaves no partial file; only SIGKILL can
leave the temporary one. An existing file is kept unless `--overwrite`, and
the run's own files and checkpoints are never written over.
"""

import argparse
import os
import pickle
import secrets
import signal
import sys
from typing import Any, Optional, Sequence

import jax
import numpy as np

from nfnets import cli
from nfnets import predict
from nfnets import train

_PROG = 'python -m nfnets.export'
FORMATS = ('pickle', 'npz')
# Protocol 4 stores each array as numpy's `_reconstruct` and its raw bytes,
# as the published files do. 2 would store the bytes as text (1.5 times
# as large); 5 names another numpy function, which the original release's
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


def _within(path: str, folder: str) -> bool:
  """Whether `path` is `folder` or inside it, links resolved."""
  path, folder = os.path.realpath(path), os.path.realpath(folder)
  return os.path.commonpath([path, folder]) == folder


def _check_output(
    output: str, overwrite: bool, run_dir: Optional[str] = None
) -> str:
  """`output`, `~` expanded, once it may be written; one-line errors.

  Args:
    output: the file to write.
    overwrite: whether an existing file may be replaced.
    run_dir: the exported run's workdir, whose files are never replaced.
  """
  if not output.strip():
    raise ValueError('--output is empty: give the file to write.')
  if '://' in output:
    raise ValueError(
        f'--output={output}: write to a local file (the parameter-file'
        ' readers open local files), then copy it where it should go.'
    )
  path = train.expand_home(output)
  if os.path.isdir(path):
    raise ValueError(f'--output={output} is a folder; give a file name.')
  parent = os.path.dirname(os.path.abspath(path))
  if os.path.exists(parent) and not os.path.isdir(parent):
    raise ValueError(f'--output={output}: {parent} is a file, not a folder.')
  if not os.path.isdir(parent):
    raise FileNotFoundError(
        f'--output={output}: no folder {parent}; create it first.'
    )
  if run_dir is not None and (
      _within(path, os.path.join(run_dir, 'checkpoints'))
      or (os.path.lexists(path) and _within(path, run_dir))
  ):
    raise ValueError(
        f'--output={output} would write over the run it exports (its'
        ' checkpoints or files); give a path outside them.'
    )
  # lexists: a link to nowhere is a name in use too.
  if os.path.lexists(path) and not overwrite:
    raise FileExistsError(_exists(output))
  return path


def _exists(output: str) -> str:
  return (
      f'--output={output} exists and is kept; give --overwrite to replace it,'
      ' or another name.'
  )


def _place(partial: str, path: str, output: str, overwrite: bool) -> None:
  """Moves the whole file `partial` to `path`."""
  if overwrite:
    os.replace(partial, path)
    return
  try:
    # A link fails if a file appeared at `path` since it was checked, where
    # a rename would replace it.
    os.link(partial, path)
  except FileExistsError:
    raise FileExistsError(_exists(output)) from None
  except OSError:
    # A file system without hard links: the earlier check stands.
    if os.path.lexists(path):
      raise FileExistsError(_exists(output)) from None
    os.replace(partial, path)
    return
  os.remove(partial)


def write(
    run: predict.RunWeights,
    output: str,
    fmt: str = 'pickle',
    overwrite: bool = False,
    run_dir: Optional[str] = None,
) -> int:
  """Writes `run`'s params to `output`; returns the file's size in bytes.

  Args:
    run: from `predict.read_run_weights`.
    output: the file to write (local; `~` expanded).
    fmt: 'pickle' (the published files' layout) or 'npz'.
    overwrite: replace an existing file (else it is an error).
    run_dir: the run's workdir, whose files and checkpoints are never
      written over.

  Raises:
    ValueError: an unknown format, a folder, a remote path or one of the
      run's files as `output`, or a model with BatchNorm statistics.
    FileExistsError: `output` exists and `overwrite` is False.
    FileNotFoundError: `output`'s folder does not exist.
    OSError: the file cannot be written (the message names `--output`).
  """
  if fmt not in FORMATS:
    raise ValueError(f'--format={fmt!r} must be one of {FORMATS}.')
  if jax.tree_util.tree_leaves(run.model_state):
    raise ValueError(_batchnorm(run.model))
  path = _check_output(output, overwrite, run_dir)
  tree = param_tree(run.params)
  # Written under a temporary name in the same folder, then renamed: a
  # reader never sees half a file, and a failed write keeps the old one.
  folder = os.path.dirname(path)
  partial = os.path.join(folder, f'.export-{secrets.token_hex(4)}.partial')
  try:
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
      _place(partial, path, output, overwrite)
    finally:
      if os.path.lexists(partial):
        os.remove(partial)
  except FileExistsError:
    raise
  except OSError as e:
    raise OSError(
        f'--output={output}: cannot write it ({e.strerror or e}).'
    ) from None
  return os.path.getsize(path)


def _batchnorm(model: str) -> str:
  return (
      f'{model} keeps BatchNorm statistics, which a parameter file does not'
      ' hold; give the run itself where a checkpoint is asked for'
      ' (eval.checkpoint, train.init_checkpoint, nfnets.predict).'
  )


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
    `dataset` (the run's `data.name`), `step`, `weights` ('ema' or 'raw'),
    `num_params`, `bytes` and `source`.

  Raises:
    FileNotFoundError: no run at `checkpoint_path`, no readable checkpoint
      in it, or no folder for `output`.
    FileExistsError: `output` exists and `overwrite` is False.
    ValueError: bad arguments, or weights this layout cannot hold.
    OSError: the checkpoint cannot be read or the file written (the message
      names the flag).
  """
  if weights not in predict.WEIGHTS:
    raise ValueError(f'--weights={weights!r} must be one of {predict.WEIGHTS}.')
  if fmt not in FORMATS:
    raise ValueError(f'--format={fmt!r} must be one of {FORMATS}.')
  if not checkpoint_path.strip():
    raise ValueError("--checkpoint is empty: give the run's workdir.")
  not_a_run = FileNotFoundError(
      f'--checkpoint={checkpoint_path}: no run there (give a workdir, its'
      ' checkpoints/ folder or one checkpoints/<step> folder).'
  )
  try:
    found = train.run_checkpoint(
        train.expand_home(checkpoint_path), '--checkpoint'
    )
  except FileNotFoundError:
    found = None  # a folder, but not a run's
  if found is None:
    raise not_a_run
  workdir, step = found
  # Checked before the checkpoint is read: F6's takes a while.
  _check_output(output, overwrite, workdir)
  config = predict.read_run_config(workdir)
  name = config['model']['name']
  overrides = dict(config['model'].get('overrides') or {})
  if jax.tree_util.tree_leaves(predict.initial_state(name, 2, **overrides)):
    raise ValueError(f'--checkpoint={checkpoint_path}: {_batchnorm(name)}')
  try:
    run = predict.read_run_weights(workdir, step, weights, config)
  except (FileNotFoundError, ValueError):
    raise
  except OSError as e:
    raise OSError(
        f'--checkpoint={checkpoint_path}: cannot read it ({e}).'
    ) from None
  size = write(run, output, fmt, overwrite, workdir)
  return dict(
      output=train.expand_home(output),
      model=run.model,
      overrides=run.overrides,
      num_classes=run.num_classes,
      dataset=str((config.get('data') or {}).get('name', '')),
      step=run.step,
      weights='ema' if run.ema else 'raw',
      num_params=sum(
          int(np.size(v)) for v in jax.tree_util.tree_leaves(run.params)
      ),
      bytes=size,
      source=run.where,
  )


def build_parser() -> argparse.ArgumentParser:
  """The command line's flags."""
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


class _Terminated(Exception):
  """SIGTERM, raised where the program is, so that `write` cleans up."""


def _terminate(signum, frame):
  del signum, frame
  raise _Terminated()


def _how_to_read(done: dict[str, Any]) -> str:
  """What reads the file, and with what."""
  model = done['model']
  if done['overrides']:
    return (
        f'Read it as train.init_checkpoint or eval.checkpoint under a config'
        f' of {model} with model.overrides={done["overrides"]}.'
    )
  line = (
      'Read it as train.init_checkpoint or eval.checkpoint under a config'
      f' of {model}'
  )
  if done['dataset'] == 'digits':  # arrays, not image files
    return line + '.'
  return (
      f'{line}, or with nfnets.predict --checkpoint={done["output"]}'
      f" --model={model} (at {model}'s test size, with ImageNet's class"
      ' names: the file holds weights only).'
  )


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Exports the weights; prints what was written and how to read it."""
  args = build_parser().parse_args(argv)
  previous = signal.signal(signal.SIGTERM, _terminate)
  try:
    done = export(
        args.checkpoint, args.output, args.weights, args.format, args.overwrite
    )
  except KeyboardInterrupt:
    cli.exit_interrupted(f'{_PROG}: interrupted; nothing was written.')
  except _Terminated:
    print(f'{_PROG}: terminated; nothing was written.', file=sys.stderr)
    return 128 + signal.SIGTERM
  except (ValueError, OSError) as e:
    sys.exit(f'{_PROG}: error: {e}')
  finally:
    signal.signal(signal.SIGTERM, previous)
  which = 'EMA' if done['weights'] == 'ema' else 'trained'
  print(
      f'Wrote {done["output"]}: {done["model"]}, {which} weights of'
      f' {done["source"]}; {done["num_params"] / 1e6:.2f}M parameters,'
      f' {done["num_classes"]} classes, {done["bytes"] / 2**20:.1f} MiB.'
  )
  print(_how_to_read(done))
  return 0


if __name__ == '__main__':
  sys.exit(main())
