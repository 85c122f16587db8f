r"""Runs or prints a config's hyperparameter sweep, and gathers its results.

A config file defines its sweeps next to `get_config`, as functions named
`sweep_<name>()` that return one dict of overrides per run, with dotted keys:

  def sweep_agc_batch():
    return [{'train.batch_size': b, 'optimizer.agc.clipping': c}
            for b in (256, 1024, 4096) for c in (0.01, 0.04, None)]

Usage (from the repository root):

  python -m nfnets.sweep --config=configs/nf_resnet.py --sweep=agc_batch \
      --dry_run
  python -m nfnets.sweep --config=configs/nf_resnet.py:50 --sweep=agc_batch \
      --config.train.num_epochs=10 --workdir_root=workdirs/sweeps

`--config.key=value` flags change the base config; each run's overrides are
applied on top. Runs go one after another in this process, each into
`<workdir_root>/<sweep>/<run name>`, where the run name spells out the
overrides (`batch_size=256,clipping=0.04`). A finished run leaves a `DONE` file
(its final metrics as JSON) and is skipped when the command runs again, so an
interrupted sweep continues where it stopped (the trainer itself resumes the
interrupted run from its checkpoint). A run the trainer reports as preempted
(SIGTERM or Ctrl-C) is not done: the sweep stops there, and the same command
resumes it. A run that raises leaves a `FAILED` file
with the error, the sweep goes on, and the next invocation tries that run
again. At the end `summary.csv` and `summary.md` in `<workdir_root>/<sweep>`
hold one row per run; `--summary_only` rewrites them from the workdirs alone.
A sweep with a `seed` key also gets a table over seeds (summary.md and
summary_seeds.csv): each setting's mean eval_top1 over its `--average_best`
best seeds, or all of them.
"""

from collections.abc import Callable, Mapping, Sequence
import copy
import csv
import dataclasses
import functools
import hashlib
import importlib.util
import io
import json
import math
import os
import re
import sys
from typing import Any

from absl import app
from absl import flags
from absl import logging
from etils import epath
import ml_collections
from ml_collections import config_flags

from nfnets import cli
from nfnets import jsonl

DONE_FILE = 'DONE'
FAILED_FILE = 'FAILED'
# The config a finished run was planned with (base config and overrides):
# a later invocation with another base config must not take it as done.
RUN_CONFIG_FILE = 'sweep_config.json'
METRICS_FILE = 'metrics.jsonl'
SUMMARY_CSV = 'summary.csv'
SUMMARY_MD = 'summary.md'
SEEDS_CSV = 'summary_seeds.csv'
# The override key that repeats a setting with other random draws: runs that
# differ only in it are summarised together (`write_summary`).
SEED_KEY = 'seed'
# What `average_best` ranks seeds by: higher is better.
RANK_METRIC = 'eval_top1'
# Metrics that lead the summary tables, in this order, where runs report them.
DEFAULT_METRICS = ('eval_top1', 'train_loss', 'diverged', 'step')
# Run names longer than this are cut and given a hash suffix: most filesystems
# refuse names over 255 bytes.
_MAX_NAME_LENGTH = 200
_SWEEP_PREFIX = 'sweep_'

TrainFn = Callable[[ml_collections.ConfigDict, str], Mapping[str, Any] | None]


class Preempted(Exception):
  """A run stopped on SIGTERM/SIGINT; the sweep stops with it, to resume."""

  def __init__(self, run_name: str, step: Any):
    super().__init__(
        f'Preempted during {run_name} at step {step}: run the same command'
        ' to resume it.'
    )
    self.run_name = run_name
    self.step = step


@dataclasses.dataclass(frozen=True)
class Run:
  """One run of a sweep: its name, overrides, full config and workdir."""

  name: str
  overrides: Mapping[str, Any]
  config: ml_collections.ConfigDict
  workdir: epath.Path


def _config_file(config_path: str) -> str:
  """`configs/x.py:arg` -> `configs/x.py`, as config_flags splits it."""
  return config_path.split(':', 1)[0]


def _load_module(path: str):
  """Imports a Python file by path, as config_flags does for config files."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'Config file {path!r} does not exist.')
  stem = re.sub(r'\W', '_', os.path.splitext(os.path.basename(path))[0])
  module_name = f'_nfnets_sweep_config_{stem}'
  spec = importlib.util.spec_from_file_location(module_name, path)
  module = importlib.util.module_from_spec(spec)
  # Registered before running it: dataclasses and pickling in the config file
  # look their module up in sys.modules.
  sys.modules[module_name] = module
  spec.loader.exec_module(module)
  return module


def sweep_names(config_path: str) -> list[str]:
  """Names of the sweeps a config file defines (`sweep_<name>` functions)."""
  module = _load_module(_config_file(config_path))
  return sorted(
      attr.removeprefix(_SWEEP_PREFIX)
      for attr in dir(module)
      if attr.startswith(_SWEEP_PREFIX) and callable(getattr(module, attr))
  )


def load_sweep(config_path: str, name: str) -> list[dict[str, Any]]:
  """Returns the runs of sweep `name` defined in a config file.

  Args:
    config_path: the config file, optionally with its `:arg` suffix (ignored
      here: sweep functions take no arguments).
    name: the sweep's name: `agc_batch` (or `sweep_agc_batch`) calls the file's
      `sweep_agc_batch()`.

  Returns:
    One dict per run, mapping dotted config keys to the values to set.

  Raises:
    ValueError: the file defines no such sweep (the message lists those it
      does), or the sweep function returns something other than a non-empty
      list of dicts with string keys.
  """
  path = _config_file(config_path)
  module = _load_module(path)
  attr = name if name.startswith(_SWEEP_PREFIX) else _SWEEP_PREFIX + name
  sweep_fn = getattr(module, attr, None)
  if not callable(sweep_fn):
    available = ', '.join(sweep_names(path)) or (
        f'none; define {_SWEEP_PREFIX}<name>() in the file'
    )
    raise ValueError(
        f'{path} has no sweep {name!r} (no function {attr}()). '
        f'Available sweeps: {available}.'
    )
  grid = sweep_fn()
  if not isinstance(grid, Sequence) or isinstance(grid, str) or not grid:
    raise ValueError(
        f'{path}:{attr}() must return a non-empty list of override dicts, '
        f'got {grid!r}.'
    )
  for i, overrides in enumerate(grid):
    if not isinstance(overrides, Mapping) or not all(
        isinstance(key, str) and key for key in overrides
    ):
      raise ValueError(
          f'{path}:{attr}()[{i}] must be a dict with dotted string keys '
          f"like {{'train.batch_size': 256}}, got {overrides!r}."
      )
  return [dict(overrides) for overrides in grid]


def apply_overrides(
    config: ml_collections.ConfigDict, overrides: Mapping[str, Any]
) -> ml_collections.ConfigDict:
  """Returns a deep copy of `config` with dotted-key overrides set.

  The copy keeps the config's field references, so values derived lazily from
  an overridden field follow it. A locked config still accepts new values for
  its existing fields, and every key must name an existing field (a sweep that
  added fields would run something the config never describes), so nothing
  needs unlocking.

  Args:
    config: the base config; not modified.
    overrides: e.g. `{'train.batch_size': 256, 'optimizer.agc.clipping':
      None}`. Values may be None.

  Returns:
    The new config.

  Raises:
    ValueError: a key names no field of the config.
    TypeError: a value cannot replace the field's type (ConfigDict is
      type-safe, e.g. a float for an int field); the message names the key.
  """
  config = copy.deepcopy(config)
  for key, value in overrides.items():
    problem = cli.field_error(config, key)
    if problem is not None:
      raise ValueError(
          f'Override key {key!r} does not exist: {problem}. Fix the sweep or'
          ' add the field to the config.'
      )
    *parents, leaf = key.split('.')
    node = config
    for part in parents:
      node = node[part]
    try:
      node[leaf] = value
    except TypeError as e:
      raise TypeError(f'Override {key}={value!r}: {e}') from e
  return config


def _format_value(value: Any) -> str:
  """A short, stable text for an override value (None -> 'None')."""
  if isinstance(value, float):
    return repr(value)  # Shortest round-trip form: 0.04, 1e-05, nan.
  if isinstance(value, (list, tuple)):
    return '_'.join(_format_value(v) for v in value)
  return str(value)


def _safe(text: str) -> str:
  """Replaces what is unsafe in a file name (and our `=` `,`) with `_`."""
  return re.sub(r'[^A-Za-z0-9._+-]', '_', text)


def _short_keys(keys: Sequence[str]) -> dict[str, str]:
  """Maps each dotted key to its shortest trailing part unique among `keys`.

  `train.batch_size` becomes `batch_size`, unless another key also ends in
  `batch_size`, in which case both keep as many components as tell them apart.

  Args:
    keys: dotted keys.

  Returns:
    A dict from each key to its short form.
  """
  split = {key: key.split('.') for key in keys}

  def is_unique(key, n):
    suffix = split[key][-n:]
    return all(parts[-n:] != suffix for k, parts in split.items() if k != key)

  short = {}
  for key, parts in split.items():
    n = next((n for n in range(1, len(parts)) if is_unique(key, n)), len(parts))
    short[key] = '.'.join(parts[-n:])
  return short


def _sweep_keys(grid: Sequence[Mapping[str, Any]]) -> list[str]:
  """Every key of a sweep, in order of first appearance."""
  return list(dict.fromkeys(key for overrides in grid for key in overrides))


def run_name(
    overrides: Mapping[str, Any], keys: Sequence[str] | None = None
) -> str:
  """A stable, filesystem-safe name for a run, e.g. `batch_size=256,clip=0.04`.

  Args:
    overrides: the run's dotted-key overrides.
    keys: all keys of the sweep, in the order they appear in names. Keys are
      shortened to their last component where that is unique among `keys`.
      Defaults to the keys of `overrides`; pass the sweep's keys so that every
      run of the sweep orders and shortens its keys the same way.

  Returns:
    `key=value` pairs joined by commas, characters other than letters, digits
    and `._+-` replaced by `_`; `base` for no overrides. Names longer than
    200 characters are cut and end in a hash of the full name.
  """
  keys = list(overrides) if keys is None else list(keys)
  missing = [key for key in overrides if key not in keys]
  if missing:
    raise ValueError(f'Override keys {missing} are not in keys={keys}.')
  short = _short_keys(keys)
  name = (
      ','.join(
          f'{_safe(short[key])}={_safe(_format_value(overrides[key]))}'
          for key in keys
          if key in overrides
      )
      or 'base'
  )
  if len(name) > _MAX_NAME_LENGTH:
    digest = hashlib.sha1(name.encode()).hexdigest()[:12]
    name = f'{name[:_MAX_NAME_LENGTH - 13]}~{digest}'
  return name


def plan_runs(
    base_config: ml_collections.ConfigDict,
    grid: Sequence[Mapping[str, Any]],
    sweep_dir: str | os.PathLike[str],
) -> list[Run]:
  """Builds every run's config, name and workdir, checking them all first.

  Args:
    base_config: the config the overrides apply to.
    grid: the sweep, one overrides dict per run.
    sweep_dir: the directory holding one workdir per run.

  Returns:
    The runs, in sweep order.

  Raises:
    ValueError: an override is invalid (see `apply_overrides`) or two runs
      have the same name (the sweep repeats a run).
  """
  keys = _sweep_keys(grid)
  sweep_dir = epath.Path(sweep_dir)
  runs, seen = [], {}
  for i, overrides in enumerate(grid):
    name = run_name(overrides, keys)
    if name in seen:
      raise ValueError(
          f'Runs {seen[name]} and {i} of the sweep are both named {name!r}; '
          'remove the repeated run from the sweep.'
      )
    seen[name] = i
    runs.append(
        Run(
            name=name,
            overrides=dict(overrides),
            config=apply_overrides(base_config, overrides),
            workdir=sweep_dir / name,
        )
    )
  return runs


def _jsonable(value: Any) -> Any:
  """Converts metric values (numpy/JAX scalars and arrays) for json.dumps."""
  if hasattr(value, 'tolist'):
    return value.tolist()
  return str(value)


def _one_line(error: BaseException) -> str:
  """`ValueError: first line of the message`, at most 300 characters."""
  lines = str(error).strip().splitlines()
  text = type(error).__name__ + (f': {lines[0]}' if lines else '')
  return text[:300]


def _is_chief() -> bool:
  """Whether this process writes the sweep's files (JAX process 0).

  Asked only after a run (or at the very end): JAX picks its backend on the
  first question, which must come after jax.distributed starts.
  """
  import jax  # pylint: disable=g-import-not-at-top

  return jax.process_index() == 0


def _config_text(config: ml_collections.ConfigDict) -> str:
  return config.to_json_best_effort(sort_keys=True, indent=1) + '\n'


def check_done_runs(runs: Sequence[Run], limit: int = 3) -> None:
  """Refuses finished runs planned with another config than now.

  A run counts as done by its folder, which its overrides name; the base
  config (`--config=...:arg`, `--config.x=y`) is not in the name. Runs
  finished before this check existed (no `sweep_config.json`) pass.

  Raises:
    ValueError: a finished run's config differs; the message names the run
      and up to `limit` differing fields.
  """
  for run in runs:
    saved = run.workdir / RUN_CONFIG_FILE
    if not (run.workdir / DONE_FILE).exists() or not saved.exists():
      continue
    text = saved.read_text()
    if text == _config_text(run.config):
      continue
    try:
      saved_tree = json.loads(text)
    except ValueError:
      saved_tree = {}
    keys, there, here = cli.differing_fields(
        saved_tree, json.loads(_config_text(run.config)), missing='unset'
    )
    if saved_tree and not keys:
      # The same values written otherwise, or saved before a field was
      # added (`cli.ADDED_FIELDS`): the run is this config's.
      continue
    changed = [
        f'{key}: {there.get(key, "unset")!r} there, {here.get(key, "unset")!r}'
        ' here'
        for key in keys
    ]
    more = len(changed) - limit
    raise ValueError(
        f'Run {run.name} in {run.workdir.parent} finished with another config'
        f' ({"; ".join(changed[:limit]) or "unreadable"}'
        + (f'; {more} more' if more > 0 else '')
        + '): give this sweep another --workdir_root, or delete that folder'
        ' to train the run again.'
    )


def _release_compiled_programs() -> None:
  """Drops JAX's compiled programs between runs (if JAX was imported).

  Each run compiles its own, and JAX's caches keep them with the ~2,700
  memory mappings of each run's CPU code: 20-odd runs in one process reach
  Linux's limit of 65,530 and crash.
  """
  jax = sys.modules.get('jax')
  if jax is not None:
    jax.clear_caches()


def _default_check_fn() -> Callable[[ml_collections.ConfigDict], None]:
  from nfnets import train  # pylint: disable=g-import-not-at-top

  return train.check_config


def _default_train_fn() -> TrainFn:
  # Imported here so that --dry_run and --summary_only need no trainer.
  from nfnets import train  # pylint: disable=g-import-not-at-top

  return train.train_and_evaluate


def run_sweep(
    base_config: ml_collections.ConfigDict,
    grid: Sequence[Mapping[str, Any]],
    sweep_dir: str | os.PathLike[str],
    *,
    train_fn: TrainFn | None = None,
    metrics: Sequence[str] = DEFAULT_METRICS,
    average_best: int = 0,
    check_fn: Callable[[ml_collections.ConfigDict], None] | None = None,
) -> str:
  """Trains every unfinished run of a sweep, then writes the summary.

  Every run's overrides are checked before the first run starts, so a typo in
  the last run does not surface hours in.

  Args:
    base_config: the config the overrides apply to.
    grid: the sweep, one overrides dict per run.
    sweep_dir: the directory holding one workdir per run and the summary.
    train_fn: `train_fn(config, workdir) -> final metrics dict`; defaults to
      `nfnets.train.train_and_evaluate`.
    metrics: metric columns of summary.md (see `write_summary`).
    average_best: seeds to average per setting (see `write_summary`).
    check_fn: `check_fn(config)` raises on a config the trainer would
      refuse; called for every unfinished run before the first trains.
      Defaults to `nfnets.train.check_config` with the default trainer,
      and to no check with another.

  Returns:
    The summary as Markdown.

  Raises:
    ValueError: an override or `average_best` is invalid, or a finished run
      was planned with another config (`check_done_runs`); before any run.
    Preempted: `train_fn` returned `preempted: True` (a SIGTERM or Ctrl-C);
      that run is left unfinished and no later run starts.
  """
  runs = plan_runs(base_config, grid, sweep_dir)
  check_average_best(runs, average_best)
  check_done_runs(runs)
  if train_fn is None:
    train_fn = _default_train_fn()
    check_fn = check_fn or _default_check_fn()
  for run in runs:
    if check_fn is None or (run.workdir / DONE_FILE).exists():
      continue
    try:
      check_fn(run.config)
    except (TypeError, ValueError, FileNotFoundError) as e:
      # Now, not when this run's turn comes, hours into the sweep.
      raise ValueError(f'Run {run.name}: {e}') from None
  for i, run in enumerate(runs, start=1):
    progress = f'[{i}/{len(runs)}] {run.name}'
    if (run.workdir / DONE_FILE).exists():
      print(f'{progress}: already done, skipping.', flush=True)
      continue
    print(f'{progress}: training in {run.workdir}', flush=True)
    try:
      try:
        final_metrics = train_fn(run.config, os.fspath(run.workdir))
      finally:
        _release_compiled_programs()
    except Exception as e:  # pylint: disable=broad-except
      # One failed run (divergence guard, OOM, bad combination) must not cost
      # the rest of the sweep; the traceback goes to the log.
      logging.exception('%s: failed.', progress)
      if _is_chief():
        run.workdir.mkdir(parents=True, exist_ok=True)
        (run.workdir / FAILED_FILE).write_text(_one_line(e) + '\n')
      continue
    if isinstance(final_metrics, Mapping) and final_metrics.get('preempted'):
      # Not done: the next invocation resumes it from its checkpoint. The
      # signal was for this process, so no later run starts either.
      raise Preempted(run.name, final_metrics.get('step'))
    print(f'{progress}: done.', flush=True)
    if _is_chief():
      run.workdir.mkdir(parents=True, exist_ok=True)
      if not isinstance(final_metrics, Mapping):
        final_metrics = {}  # The trainer's metrics.jsonl still has them.
      (run.workdir / RUN_CONFIG_FILE).write_text(_config_text(run.config))
      (run.workdir / DONE_FILE).write_text(
          json.dumps(dict(final_metrics), default=_jsonable) + '\n'
      )
      (run.workdir / FAILED_FILE).unlink(missing_ok=True)
  if not _is_chief():
    return ''
  return write_summary(runs, sweep_dir, metrics, average_best)


def _read_json(path: epath.Path) -> Any:
  try:
    return json.loads(path.read_text())
  except ValueError:
    return None


def _final_metrics(workdir: epath.Path) -> dict[str, Any]:
  """A run's last scalar metrics: metrics.jsonl's, then DONE's on top."""
  final = {}
  metrics_file = workdir / METRICS_FILE
  if metrics_file.exists():
    for event in jsonl.parse(metrics_file.read_text())[0]:
      final.update(event)
  done = workdir / DONE_FILE
  if done.exists():
    returned = _read_json(done)
    if isinstance(returned, dict):
      final.update(returned)
  return {
      key: value
      for key, value in final.items()
      if value is None or isinstance(value, (bool, int, float, str))
  }


def _run_row(run: Run) -> dict[str, Any]:
  """Status, error and final metrics of one run, read from its workdir."""
  error = ''
  if (run.workdir / DONE_FILE).exists():
    status = 'done'
  elif (run.workdir / FAILED_FILE).exists():
    status = 'failed'
    error = (run.workdir / FAILED_FILE).read_text().strip()
  elif (run.workdir / METRICS_FILE).exists():
    status = 'interrupted'  # started, neither finished nor failed: resumes
  else:
    status = 'not run'
  return {
      'status': status,
      'error': error,
      'metrics': _final_metrics(run.workdir),
  }


def _markdown_cell(value: Any) -> str:
  if isinstance(value, float) and math.isfinite(value):
    text = f'{value:.4g}'
  else:
    text = str(value)
  return text.replace('|', r'\|')


def check_average_best(runs: Sequence[Run], average_best: int) -> None:
  """Checks `average_best` against the sweep's seeds (see `write_summary`).

  Raises:
    ValueError: it is negative, the sweep has no `seed` key, or a setting
      has fewer seeds than it.
  """
  if average_best < 0:
    raise ValueError(
        f'--average_best={average_best}: give the number of best seeds to'
        ' average (0: all of them).'
    )
  if not average_best:
    return
  groups = _seed_groups(runs)
  if not groups:
    raise ValueError(
        f'--average_best={average_best}: the sweep has no {SEED_KEY!r} key'
        ' to average over; add one (see configs/nf_resnet.py,'
        ' sweep_agc_batch_seeds).'
    )
  fewest = min(len(group) for group in groups.values())
  if average_best > fewest:
    raise ValueError(
        f'--average_best={average_best}: a setting of this sweep has only'
        f' {fewest} seed{"s" if fewest > 1 else ""}; give at most {fewest}.'
    )


def _seed_groups(runs: Sequence[Run]) -> dict[tuple[Any, ...], list[Run]]:
  """Runs by their overrides but the seed, in sweep order; {} if no seeds."""
  if not any(SEED_KEY in run.overrides for run in runs):
    return {}
  groups = {}
  for run in runs:
    setting = tuple(
        (key, _format_value(value))
        for key, value in run.overrides.items()
        if key != SEED_KEY
    )
    groups.setdefault(setting, []).append(run)
  return groups


def _rank_value(row: Mapping[str, Any]) -> float | None:
  """A done run's finite `RANK_METRIC`, else None (it cannot be ranked)."""
  value = row['metrics'].get(RANK_METRIC)
  if row['status'] != 'done' or isinstance(value, bool):
    return None
  if not isinstance(value, (int, float)) or not math.isfinite(value):
    return None
  return float(value)


def best_seeds(scored: Sequence[tuple[float, Any]], count: int) -> list:
  """The `count` highest `(score, item)` pairs, highest first; [] if fewer.

  The NFNets paper's AGC protocol averages the best 4 of 5 seeds: a seed
  that failed (no score, so not in `scored`) is one of those left out, and
  a setting with fewer scored seeds than `count` has no average.
  """
  ranked = sorted(scored, key=lambda pair: -pair[0])
  return ranked[:count] if len(ranked) >= count else []


def _seed_summary(
    runs: Sequence[Run],
    rows: Sequence[Mapping[str, Any]],
    keys: Sequence[str],
    average_best: int,
) -> tuple[list[str], list[list[Any]]]:
  """(header, rows) of the table over seeds: one row per setting.

  A setting's value is the mean `RANK_METRIC` of its `average_best` best
  seeds (all of them for 0), the NFNets paper's protocol for its AGC sweep
  (5 seeds, best 4 averaged): a seed that failed or diverged is then one of
  those left out, and the mean is empty while fewer seeds than that are done.
  """
  row_of = {run.name: row for run, row in zip(runs, rows)}
  other_keys = [key for key in keys if key != SEED_KEY]
  header = [
      *other_keys,
      'seeds',
      'done',
      'failed',
      'averaged',
      f'{RANK_METRIC}_mean',
      f'{RANK_METRIC}_min',
      f'{RANK_METRIC}_max',
      'seeds_averaged',
      'note',
  ]
  table = []
  for setting, group in _seed_groups(runs).items():
    values = dict(setting)
    values_of = [(_rank_value(row_of[run.name]), run) for run in group]
    scored = [(v, run) for v, run in values_of if v is not None]
    statuses = [row_of[run.name]['status'] for run in group]
    wanted = average_best or len(group)
    best = best_seeds(scored, wanted)
    note = ''
    if not best:
      note = (
          f'{wanted} seeds to average, {len(scored)} done with'
          f' {RANK_METRIC}'
      )
    mean = sum(v for v, _ in best) / len(best) if best else ''
    table.append(
        [
            *(values.get(key, '') for key in other_keys),
            len(group),
            statuses.count('done'),
            statuses.count('failed'),
            wanted,
            mean,
            min((v for v, _ in best), default=''),
            max((v for v, _ in best), default=''),
            ' '.join(_format_value(run.overrides[SEED_KEY]) for _, run in best),
            note,
        ]
    )
  return header, table


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]):
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for row in rows:
    lines.append('| ' + ' | '.join(_markdown_cell(c) for c in row) + ' |')
  return '\n'.join(lines) + '\n'


def write_summary(
    runs: Sequence[Run],
    sweep_dir: str | os.PathLike[str],
    metrics: Sequence[str] = DEFAULT_METRICS,
    average_best: int = 0,
) -> str:
  """Writes summary.csv and summary.md for a sweep from its runs' workdirs.

  One row per run: its name, one column per override key (empty where a run
  does not set the key), its status (`done`, `failed`, `interrupted`:
  started and neither finished nor failed, or `not run`), its final metrics
  (the last value of each metric in its metrics.jsonl, replaced by the
  metrics in DONE where the run finished) and the error of a failed run.
  summary.md shows the `metrics` that some run reports; summary.csv has every
  scalar metric, `metrics` first.

  A sweep with a `seed` key also gets a table over seeds, in summary.md
  after the runs and in summary_seeds.csv: one row per setting (the runs
  whose overrides differ only in the seed), with the mean `eval_top1` of
  its `average_best` best seeds (see `_seed_summary`).

  Args:
    runs: the sweep's runs, from `plan_runs`.
    sweep_dir: where the files go.
    metrics: the metric columns of summary.md.
    average_best: how many of each setting's seeds to average, best first
      by `eval_top1`; 0: all of them (see `check_average_best`).

  Returns:
    The Markdown table (the content of summary.md).
  """
  check_average_best(runs, average_best)
  keys = _sweep_keys([run.overrides for run in runs])
  rows = [_run_row(run) for run in runs]
  reported = {key for row in rows for key in row['metrics']}
  md_metrics = [key for key in metrics if key in reported]
  csv_metrics = md_metrics + sorted(reported - set(md_metrics))
  any_error = any(row['error'] for row in rows)

  def cells(run, row, metric_keys):
    overrides = [
        _format_value(run.overrides[key]) if key in run.overrides else ''
        for key in keys
    ]
    values = [row['metrics'].get(key, '') for key in metric_keys]
    return [run.name, *overrides, row['status'], *values]

  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator='\n')
  writer.writerow(['run', *keys, 'status', *csv_metrics, 'error'])
  for run, row in zip(runs, rows):
    writer.writerow(cells(run, row, csv_metrics) + [row['error']])

  header = ['run', *keys, 'status', *md_metrics] + (
      ['error'] if any_error else []
  )
  markdown = _markdown_table(
      header,
      [
          cells(run, row, md_metrics) + ([row['error']] if any_error else [])
          for run, row in zip(runs, rows)
      ],
  )

  sweep_dir = epath.Path(sweep_dir)
  sweep_dir.mkdir(parents=True, exist_ok=True)
  (sweep_dir / SUMMARY_CSV).write_text(buffer.getvalue())
  if _seed_groups(runs):
    seed_header, seed_rows = _seed_summary(runs, rows, keys, average_best)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator='\n')
    writer.writerows([seed_header, *seed_rows])
    (sweep_dir / SEEDS_CSV).write_text(buffer.getvalue())
    what = (
        f'its {average_best} best seeds by {RANK_METRIC}'
        if average_best
        else 'all its seeds'
    )
    markdown += (
        f"\nOver seeds: each setting's mean {RANK_METRIC} over {what}.\n\n"
        + _markdown_table(seed_header, seed_rows)
    )
  (sweep_dir / SUMMARY_MD).write_text(markdown)
  return markdown


def _define_flags():
  """Defines the command-line flags (only when run as a program).

  Kept out of import time so that importing this module next to
  experiment.py, which defines --config too, does not clash.
  """
  config_flags.DEFINE_config_file(
      'config', None, 'Base config: configs/<name>.py[:arg].', lock_config=True
  )
  flags.DEFINE_string(
      'sweep', None, 'Sweep to run: the config file defines sweep_<name>().'
  )
  flags.DEFINE_bool(
      'dry_run', False, 'Print the runs (name, workdir, overrides) and exit.'
  )
  flags.DEFINE_bool(
      'summary_only',
      False,
      "Only rewrite summary.csv/md from the runs' workdirs, then print it.",
  )
  flags.DEFINE_string(
      'workdir_root',
      'workdirs/sweeps',
      'Runs go to <workdir_root>/<sweep>/<run name>.',
  )
  flags.DEFINE_list(
      'metrics',
      list(DEFAULT_METRICS),
      'Metric columns of summary.md, where runs report them.',
  )
  flags.DEFINE_integer(
      'average_best',
      0,
      'For a sweep with a seed key: average the eval_top1 of this many best'
      ' seeds of each setting (the NFNets AGC protocol: 4 of 5); 0: all.',
  )
  # A sweep on a pod trains each run over every host, as experiment.py does.
  cli.define_process_flags()
  flags.adopt_module_key_flags(cli)  # listed by --helpshort too
  flags.mark_flags_as_required(['config', 'sweep'])


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}')
  cli.quiet_library_logs()
  flag_values = flags.FLAGS
  sweep = flag_values.sweep.removeprefix(_SWEEP_PREFIX)
  if not flag_values.workdir_root.strip():
    # Else the runs would go into the current directory (a repository).
    sys.exit(
        'nfnets.sweep: error: --workdir_root is empty; give a folder path,'
        ' e.g. --workdir_root=workdirs/sweeps.'
    )
  # As the trainer does for a workdir: a quoted '~' is the home folder.
  sweep_dir = epath.Path(os.path.expanduser(flag_values.workdir_root)) / sweep
  try:
    grid = load_sweep(flag_values['config'].config_filename, sweep)
    runs = plan_runs(flag_values.config, grid, sweep_dir)
    check_average_best(runs, flag_values.average_best)
    check_done_runs(runs)
  except (OSError, TypeError, ValueError) as e:
    # Mistakes in the command line or the sweep: one line, no traceback.
    sys.exit(f'nfnets.sweep: error: {e}')
  if not flag_values.dry_run:
    try:
      sweep_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
      # Else every run fails on it, and then the FAILED file too.
      sys.exit(
          f'nfnets.sweep: error: --workdir_root: cannot create {sweep_dir}'
          f' ({e}); give a folder path you can write to.'
      )

  if flag_values.dry_run:
    done = 0
    for run in runs:
      finished = (run.workdir / DONE_FILE).exists()
      done += finished
      print(
          f'{run.name}  {run.workdir}  {run.overrides!r}'
          + ('  [done]' if finished else '')
      )
    print(f'{len(runs)} runs in sweep {sweep!r} ({done} done).')
  elif flag_values.summary_only:
    print(
        write_summary(
            runs,
            sweep_dir,
            flag_values.metrics,
            flag_values.average_best,
        ),
        end='',
    )
  else:
    try:
      # Before anything asks JAX for its devices.
      cli.initialize_processes()
    except ValueError as e:
      sys.exit(f'nfnets.sweep: error: {e}')
    try:
      markdown = run_sweep(
          flag_values.config,
          grid,
          sweep_dir,
          metrics=flag_values.metrics,
          average_best=flag_values.average_best,
      )
    except Preempted as e:
      print(e)  # Exit 0, as experiment.py does: the job did what it should.
      return
    except KeyboardInterrupt:
      # Outside a run's training loop (which saves and stops the sweep).
      cli.exit_interrupted(
          'nfnets.sweep: interrupted (Ctrl-C) outside a training loop; run'
          ' the same command to resume the unfinished run.'
      )
    except ValueError as e:
      # run_sweep's checks, which refuse a sweep before its first run.
      sys.exit(f'nfnets.sweep: error: {e}')
    if markdown:
      print(markdown, end='')
      written = [SUMMARY_CSV, SUMMARY_MD] + (
          [SEEDS_CSV] if _seed_groups(runs) else []
      )
      print(f'Wrote {", ".join(str(sweep_dir / w) for w in written)}.')


if __name__ == '__main__':
  _define_flags()
  app.run(
      main,
      flags_parser=functools.partial(cli.parse_flags, prefix='nfnets.sweep: '),
  )
