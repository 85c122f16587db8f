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
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address',
    None,
    'host:port of process 0 for a multi-process run, with --num_processes '
    'and --process_id; or auto: JAX finds the cluster (Cloud TPU pods, '
    'SLURM, Open MPI, Kubernetes), as launch_tpu.sh asks.',
)
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', None, 'Processes in a multi-process run.'
)
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', None, 'This process, in [0, num_processes).'
)
flags.mark_flags_as_required(['config', 'workdir'])


@flags.multi_flags_validator(
    ['coordinator_address', 'num_processes', 'process_id']
)
def _check_processes(values) -> bool:
  """Multi-process flags: all three or none, and a process id in range.

  With --coordinator_address=auto the cluster gives the other two; given,
  they override it (both together).
  """
  given = [name for name, value in values.items() if value is not None]
  needed = 1 if values['coordinator_address'] == 'auto' else 3
  if (given and len(given) < needed) or len(given) == 2:
    raise flags.ValidationError(
        '--coordinator_address, --num_processes and --process_id go '
        f'together; only {", ".join("--" + n for n in sorted(given))} given.'
    )
  if (
      len(given) == 3
      and not 0 <= values['process_id'] < values['num_processes']
  ):
    raise flags.ValidationError(
        f'--process_id={values["process_id"]} must be in [0, '
        f'--num_processes={values["num_processes"]}).'
    )
  return True


def _initialize_processes(jax) -> None:
  """Joins the other processes of the run (jax.distributed), if asked.

  Besides the collectives, this starts JAX's preemption service, which the
  training loop needs on several processes: it makes every process stop at
  the same step when any of them is signalled.

  Raises:
    ValueError: `auto` found no cluster, or JAX refused the flags.
  """
  address = _COORDINATOR.value
  if not address:
    return
  try:
    jax.distributed.initialize(
        coordinator_address=None if address == 'auto' else address,
        num_processes=_NUM_PROCESSES.value,
        process_id=_PROCESS_ID.value,
    )
  except ValueError as e:
    where = (
        'found no cluster (Cloud TPU, SLURM, Open MPI, Kubernetes)'
        if address == 'auto'
        else 'was refused'
    )
    raise ValueError(
        f'--coordinator_address={address} {where}: {e} Give host:port of'
        ' process 0 with --num_processes and --process_id.'
    ) from None


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
  import jax  # pylint: disable=g-import-not-at-top

  try:
    # Before anything asks JAX for its devices.
    _initialize_processes(jax)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  from nfnets import train  # pylint: disable=g-import-not-at-top

  try:
    if _MODE.value == 'eval':
      train.evaluate_checkpoint(_CONFIG.value, _WORKDIR.value)
    else:
      result = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
      if jax.process_index() == 0:
        _print_summary(result, _WORKDIR.value)
  except (ValueError, FileNotFoundError, train.NonFiniteError) as e:
    # One clear line, no traceback: these are the user's to fix.
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  except KeyboardInterrupt:
    # Ctrl-C in the training loop saves and returns (a preemption); here it
    # came before or after it: while starting, compiling or evaluating.
    # Everything is written whole or not at all (config.json by rename,
    # checkpoints by orbax's), so the same command resumes.
    print(
        'Interrupted (Ctrl-C) outside the training loop; run the same'
        ' command to resume from the last checkpoint.',
        file=sys.stderr,
    )
    sys.exit(130)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
