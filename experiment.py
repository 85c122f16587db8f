"""Train or evaluate an experiment config.

    python experiment.py --config=configs/nfnet.py:F0 --workdir=DIR \
        [--config.train.batch_size=4096 ...] [--mode=train|eval|train_eval]

Only parses flags and calls `nfnets.train`; everything else is a function
that tests and notebooks can call too.
"""

import json
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from nfnets import cli

_CONFIG = config_flags.DEFINE_config_file(
    'config',
    None,
    'Experiment config file, e.g. configs/nfnet.py:F0.',
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Where checkpoints and logs go; a run resumes from it.'
)
_MODE = flags.DEFINE_enum(
    'mode',
    'train',
    ['train', 'eval', 'train_eval'],
    'train (evaluating periodically and at the end; train_eval is the same), '
    "or eval: the workdir's latest checkpoint or --config.eval.checkpoint.",
)
cli.define_process_flags()
flags.adopt_module_key_flags(cli)  # listed by --helpshort too
flags.mark_flags_as_required(['config', 'workdir'])


_INTERRUPTED = (
    'Interrupted (Ctrl-C) outside the training loop; run the same command to'
    ' resume from the last checkpoint.'
)


def _print_summary(result, workdir):
  """The last lines of a run: what it reached, how long it took, where."""
  print(
      'Final: '
      + json.dumps(
          {k: v for k, v in result.items() if isinstance(v, (int, float))}
      )
  )
  if result.get('preempted'):
    print(
        f'Preempted at step {result["step"]}: run the same command to '
        'resume.'
    )
    return
  minutes, seconds = divmod(int(result['wall_time_s']), 60)
  line = (
      f'Done in {minutes}m{seconds:02d}s: step {result["step"]}, test '
      f'top-1 {100 * result["eval_top1"]:.2f}%'
  )
  if 'ema_eval_top1' in result:
    line += f' (EMA {100 * result["ema_eval_top1"]:.2f}%)'
  print(line + f' on {result["eval_count"]} images.')
  print(
      f'Workdir: {workdir} (metrics.jsonl, tensorboard/, checkpoints/, '
      'curves.png, config.json, classes.json)'
  )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
  cli.quiet_library_logs()
  try:
    _run()
  except KeyboardInterrupt:
    # Ctrl-C in the training loop saves and returns (a preemption); here it
    # came before or after it: while importing, starting, compiling or
    # evaluating. Everything is written whole or not at all (config.json by
    # rename, checkpoints by orbax's), so the same command resumes.
    cli.exit_interrupted(_INTERRUPTED)


def _run():
  """Starts the processes, then trains or evaluates; bad input: one line."""
  import jax  # pylint: disable=g-import-not-at-top

  try:
    # Before anything asks JAX for its devices.
    cli.initialize_processes()
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  from nfnets import preemption  # pylint: disable=g-import-not-at-top
  from nfnets import train  # pylint: disable=g-import-not-at-top

  try:
    if _MODE.value == 'eval':
      # Nothing to save: SIGTERM and Ctrl-C end it at once, as they did
      # before jax.distributed took them for a training loop.
      preemption.release_signals()
      train.evaluate_checkpoint(_CONFIG.value, _WORKDIR.value)
    else:
      result = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
      if jax.process_index() == 0:
        _print_summary(result, _WORKDIR.value)
  except (ValueError, FileNotFoundError, train.NonFiniteError) as e:
    # One clear line, no traceback: these are the user's to fix.
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
