"""Command-line parsing shared by `experiment.py` and `nfnets.sweep`.

Both take the same multi-process flags (`define_process_flags`,
`initialize_processes`).

absl reports a mistyped override (`--config.train.batchsize=8`) with the
traceback of the config library that found it, and a config file that fails
to load with the traceback of the file. `parse_flags` turns every mistake in
the command line into one line that names the flag and the fix.
"""

import difflib
import os
import sys
from typing import Any, Iterator, Mapping, NoReturn, Optional, Sequence

from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

_OVERRIDE_PREFIXES = ('--config.', '--noconfig.')


def quiet_library_logs() -> None:
  """Shows absl warnings and errors only, unless `-v`/`--verbosity` is given.

  Orbax logs every file operation at INFO: hundreds of lines that bury a
  run's progress. `-v 0` brings them back.
  """
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)


def define_process_flags() -> None:
  """Defines --coordinator_address, --num_processes and --process_id."""
  flags.DEFINE_string(
      'coordinator_address',
      None,
      'host:port of process 0 for a multi-process run, with --num_processes'
      ' and --process_id; or auto: JAX finds the cluster (Cloud TPU pods,'
      ' SLURM, Open MPI), as launch_tpu.sh asks.',
  )
  flags.DEFINE_integer(
      'num_processes', None, 'Processes in a multi-process run.'
  )
  flags.DEFINE_integer(
      'process_id', None, 'This process, in [0, num_processes).'
  )
  flags.register_multi_flags_validator(
      ['coordinator_address', 'num_processes', 'process_id'],
      _check_processes,
  )


def _check_processes(values: Mapping[str, Any]) -> bool:
  """All three flags or none, and a process id in range.

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
  if len(given) == 3 and not (
      0 <= values['process_id'] < values['num_processes']
  ):
    raise flags.ValidationError(
        f'--process_id={values["process_id"]} must be in [0, '
        f'--num_processes={values["num_processes"]}).'
    )
  return True


def initialize_processes() -> None:
  """Joins the other processes of the run (jax.distributed), if the flags ask.

  Call it before anything asks JAX for its devices. Besides the collectives,
  jax.distributed starts JAX's preemption service, which the training loop
  needs on several processes: it makes every process stop at the same step
  when any of them is signalled. Its first question is asked here, so that
  a signal from now on is not lost (`nfnets.preemption`).

  Raises:
    ValueError: `auto` found no cluster, or JAX refused the flags.
  """
  address = flags.FLAGS.coordinator_address
  if not address:
    return
  import jax  # pylint: disable=g-import-not-at-top

  try:
    jax.distributed.initialize(
        coordinator_address=None if address == 'auto' else address,
        num_processes=flags.FLAGS.num_processes,
        process_id=flags.FLAGS.process_id,
    )
  except ValueError as e:
    where = (
        'found no cluster (Cloud TPU, SLURM, Open MPI)'
        if address == 'auto'
        else 'was refused'
    )
    raise ValueError(
        f'--coordinator_address={address} {where}: {e} Give host:port of'
        ' process 0 with --num_processes and --process_id.'
    ) from None
  from nfnets import preemption  # pylint: disable=g-import-not-at-top

  preemption.start_listening()


def exit_interrupted(message: str) -> NoReturn:
  """Ctrl-C outside a training loop: `message` on stderr, exit status 130.

  os._exit, not sys.exit: after a Ctrl-C inside XLA's compiler the
  interpreter's teardown segfaults (status 139, after the message). What
  the runner writes is whole or absent by then (config.json by rename,
  checkpoints by orbax's, the logs closed on the way out), so nothing is
  lost by skipping it.
  """
  print(message, file=sys.stderr)
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(130)


def _overrides(argv: Sequence[str]) -> list[tuple[str, str]]:
  """`(argument, 'a.b')` of each `--config.a.b=v` override in `argv`."""
  found = []
  for arg in argv:
    for prefix in _OVERRIDE_PREFIXES:
      if arg.startswith(prefix):
        found.append((arg, arg[len(prefix) :].split('=', 1)[0]))
  return found


def _base_config(argv: Sequence[str]) -> Optional[ml_collections.ConfigDict]:
  """The `--config=` file's config without the overrides, or None."""
  config_args = [a for a in argv[1:] if a.startswith('--config=')]
  if not config_args:
    return None
  values = flags.FlagValues()
  args = [argv[0], config_args[-1]]
  config_flags.DEFINE_config_file(
      'config', None, 'base config', flag_values=values, sys_argv=args
  )
  try:
    values(args)
  except flags.Error:
    return None
  return values.config


def field_error(config: ml_collections.ConfigDict, key: str) -> Optional[str]:
  """Why the dotted `key` names no field of `config`; None when it does.

  Args:
    config: the config.
    key: e.g. `'train.batch_size'`.

  Returns:
    e.g. `train has no field 'batchsize' (fields: batch_size, ...); did you
    mean 'batch_size'?`, or `train.batch_size is 128, not a ConfigDict, so
    it has no field 'x'`.
  """
  parts = key.split('.')
  node = config
  for depth, part in enumerate(parts):
    where = '.'.join(parts[:depth]) or 'the config'
    if not isinstance(node, ml_collections.ConfigDict):
      return (
          f'{where} is {node!r}, not a ConfigDict, so it has no field {part!r}'
      )
    if part not in node:
      fields = sorted(node.keys())
      close = difflib.get_close_matches(part, fields, n=1)
      guess = f'; did you mean {close[0]!r}?' if close else ''
      return (
          f'{where} has no field {part!r} (fields: {", ".join(fields)}){guess}'
      )
    node = node[part]
  return None


def _unknown_override(argv: Sequence[str]) -> Optional[str]:
  """The first override in `argv` that names no config field, described.

  None when every override names a field, or the config does not load.
  """
  config = _base_config(argv)
  if config is None:
    return None
  for arg, key in _overrides(argv):
    problem = field_error(config, key)
    if problem is not None:
      return f'{arg}: {problem}'
  return None


def _value_hint(argv: Sequence[str], message: str) -> str:
  """What an override that failed to parse must look like, or ''.

  Args:
    argv: the command line.
    message: absl's message, which names the flag (`flag --config.a.b=v:`).

  Returns:
    e.g. `; optimizer.agc.clipping holds float values here (0.04)`, with a
    word on None for a number field given 'none'.
  """
  config = _base_config(argv)
  if config is None:
    return ''
  for arg, key in _overrides(argv):
    if f'flag {arg}:' not in message or field_error(config, key) is not None:
      continue
    value = config
    for part in key.split('.'):
      value = value[part]
    if value is None:
      return ''
    hint = f'; {key} holds {type(value).__name__} values here ({value!r})'
    given = arg.split('=', 1)[-1]
    if given.lower() == 'none' and isinstance(value, (int, float)):
      hint += ', and the command line cannot make a number field None'
      if key.endswith('agc.clipping'):
        hint += ' (0 turns AGC off)'
    return hint
  return ''


def _lines(text: str) -> list[str]:
  return [line.strip() for line in text.splitlines() if line.strip()]


def _condensed(error: flags.Error) -> str:
  """absl's message on one line; a config file's traceback by its last line."""
  lines = _lines(str(error))
  if len(lines) <= 1:
    return ' '.join(lines)
  return f'{lines[0].removesuffix(":")}: {lines[-1]}'


def parse_flags(
    argv: Sequence[str],
    flag_values: flags.FlagValues = flags.FLAGS,
    prefix: str = '',
) -> list[str]:
  """absl `flags_parser` for `app.run`: mistakes end the program in one line.

  Args:
    argv: the command line, program name first.
    flag_values: the flags to parse into.
    prefix: put before 'error:' (e.g. the program's name).

  Returns:
    The arguments that are not flags, program name first.
  """
  try:
    remaining = flag_values(list(argv))
  except flags.Error as e:
    hint = _value_hint(argv, str(e))
    sys.exit(
        f'{prefix}error: {_condensed(e)}{hint} (--helpshort lists the flags)'
    )
  except (AttributeError, KeyError):
    # ml_collections' lookup of an override's path; anything else re-raises.
    message = _unknown_override(argv)
    if message is None:
      raise
    sys.exit(f'{prefix}error: {message}')
  # config_flags defers a config file that fails to load (a wrong path) to
  # the first use of the config: report it now, with the flag.
  if 'config' in flag_values and flag_values['config'].present:
    try:
      flag_values.config.keys()
    except OSError as e:
      given = [a for a in argv if a.startswith('--config=')]
      flag = given[-1] if given else '--config'
      sys.exit(f'{prefix}error: {flag}: {_lines(str(e))[-1]}')
  return remaining


# Config fields added since runs were first saved, with the value that a run
# saved without one trained under (each the field's default in
# configs/common.py): `differing_fields` reads an older run's config.json as
# if it held them, so that resuming it, or a sweep that finished it, does not
# count them as changed.
ADDED_FIELDS = {'train.microbatches': 1}


def flat_items(
    tree: Mapping[str, Any], prefix: str = ''
) -> Iterator[tuple[str, Any]]:
  """`('a.b', value)` for every leaf of a nested dict (a config's JSON)."""
  for key, value in tree.items():
    if isinstance(value, Mapping):
      yield from flat_items(value, f'{prefix}{key}.')
    else:
      yield f'{prefix}{key}', value


def differing_fields(
    old: Mapping[str, Any], new: Mapping[str, Any], missing: Any = None
) -> tuple[list[str], dict[str, Any], dict[str, Any]]:
  """The dotted fields whose values differ between two nested config dicts.

  Args:
    old: a config as a nested dict (e.g. a workdir's config.json).
    new: another. On either side a field added to the project since
      (`ADDED_FIELDS`) and missing counts as the value it stands for.
    missing: the value of a field one side lacks, for the comparison.

  Returns:
    `(keys, old_flat, new_flat)`: the differing keys, sorted, and both
    sides flattened for their values.
  """
  old_flat = {**ADDED_FIELDS, **dict(flat_items(old))}
  new_flat = {**ADDED_FIELDS, **dict(flat_items(new))}
  keys = sorted(
      k
      for k in old_flat.keys() | new_flat.keys()
      if old_flat.get(k, missing) != new_flat.get(k, missing)
  )
  return keys, old_flat, new_flat
