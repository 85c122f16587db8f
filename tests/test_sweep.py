"""Tests for nfnets.sweep: loading, overrides, naming, running, summaries."""

import csv
import json
import os
import pathlib
import runpy
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from nfnets import sweep
import processes

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent

_CONFIG = textwrap.dedent("""\
    import ml_collections


    def get_config(arg=None):
      config = ml_collections.ConfigDict()
      config.model = arg or 'nf_resnet26'
      config.train = ml_collections.ConfigDict()
      config.train.batch_size = 128
      config.train.epochs = 2
      config.train.steps = config.train.get_ref('epochs') * 10
      config.optimizer = ml_collections.ConfigDict()
      config.optimizer.lr = 0.1
      config.optimizer.agc = ml_collections.ConfigDict()
      config.optimizer.agc.clipping = 0.01
      return config


    def sweep_tiny():
      return [{'train.batch_size': b, 'optimizer.agc.clipping': c}
              for b in (64, 256) for c in (0.01, None)]


    def sweep_lr():
      return [{'optimizer.lr': lr} for lr in (0.1, 0.4)]


    def sweep_broken():
      return {'optimizer.lr': 0.1}


    def not_a_sweep():
      return []
""")
TINY_NAMES = [
    'batch_size=64,clipping=0.01',
    'batch_size=64,clipping=None',
    'batch_size=256,clipping=0.01',
    'batch_size=256,clipping=None',
]


@pytest.fixture(name='config_path')
def fixture_config_path(tmp_path):
  path = tmp_path / 'tiny_config.py'
  path.write_text(_CONFIG)
  return str(path)


@pytest.fixture(name='base_config')
def fixture_base_config(config_path):
  config = runpy.run_path(config_path)['get_config']()
  config.lock()  # As config_flags hands it over.
  return config


def _sweep_cli(*args):
  return subprocess.run(
      [sys.executable, '-m', 'nfnets.sweep', *args],
      cwd=REPO_ROOT,
      capture_output=True,
      text=True,
      timeout=60,
      check=False,
  )


# Command line.


def test_dry_run_lists_the_whole_grid(config_path, tmp_path):
  root = tmp_path / 'sweeps'
  result = _sweep_cli(
      f'--config={config_path}:nf_resnet50',
      '--sweep=tiny',
      '--dry_run',
      f'--workdir_root={root}',
      '--config.train.epochs=3',
  )
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert len(lines) == 5
  for line, name in zip(lines, TINY_NAMES):
    assert line.startswith(f'{name}  {root / "tiny" / name}  {{')
  assert "'optimizer.agc.clipping': None" in lines[1]
  assert lines[-1] == "4 runs in sweep 'tiny' (0 done)."
  assert not root.exists()  # A dry run writes nothing.


def test_dry_run_imports_neither_jax_nor_the_trainer(config_path, tmp_path):
  code = textwrap.dedent(f"""\
      import runpy, sys
      sys.argv = ['sweep', '--config={config_path}', '--sweep=lr',
                  '--dry_run', '--workdir_root={tmp_path}']
      try:
        runpy.run_module('nfnets.sweep', run_name='__main__')
      except SystemExit as e:
        assert not e.code, e.code
      print(sorted(m for m in ('jax', 'nfnets.train') if m in sys.modules))
  """)
  result = processes.python(code, REPO_ROOT, timeout=60)
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines()[-1] == '[]'
  assert '2 runs' in result.stdout


def test_cli_unknown_sweep_lists_available_ones(config_path, tmp_path):
  result = _sweep_cli(
      f'--config={config_path}',
      '--sweep=nope',
      '--dry_run',
      f'--workdir_root={tmp_path}',
  )
  assert result.returncode != 0
  assert "has no sweep 'nope'" in result.stderr
  assert 'Available sweeps: broken, lr, tiny.' in result.stderr


def test_cli_unknown_override_key_fails_with_one_line(tmp_path):
  path = tmp_path / 'typo_config.py'
  path.write_text(_CONFIG + textwrap.dedent("""\


      def sweep_typo():
        return [{'train.batch_sise': 64}]
  """))
  result = _sweep_cli(
      f'--config={path}',
      '--sweep=typo',
      '--dry_run',
      f'--workdir_root={tmp_path}',
  )
  assert result.returncode != 0
  assert "'train.batch_sise' does not exist" in result.stderr
  assert 'Traceback' not in result.stderr


def test_cli_unwritable_workdir_root_fails_with_one_line(config_path, tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a folder')
  result = _sweep_cli(
      f'--config={config_path}', '--sweep=tiny', f'--workdir_root={blocker}'
  )
  assert result.returncode != 0
  assert 'Traceback' not in result.stderr, result.stderr[-2000:]
  assert (
      result.stderr.strip()
      .splitlines()[-1]
      .startswith('nfnets.sweep: error: --workdir_root: cannot create')
  )
  assert blocker.read_text() == 'not a folder'


# load_sweep.


def test_load_sweep(config_path):
  grid = sweep.load_sweep(config_path + ':some_arg', 'tiny')
  assert grid == [
      {'train.batch_size': 64, 'optimizer.agc.clipping': 0.01},
      {'train.batch_size': 64, 'optimizer.agc.clipping': None},
      {'train.batch_size': 256, 'optimizer.agc.clipping': 0.01},
      {'train.batch_size': 256, 'optimizer.agc.clipping': None},
  ]
  assert sweep.load_sweep(config_path, 'sweep_lr') == [
      {'optimizer.lr': 0.1},
      {'optimizer.lr': 0.4},
  ]
  assert sweep.sweep_names(config_path) == ['broken', 'lr', 'tiny']


def test_load_sweep_errors(config_path, tmp_path):
  with pytest.raises(
      ValueError, match=r"no sweep 'not_a_sweep'.*: broken, " r'lr, tiny\.'
  ):
    sweep.load_sweep(config_path, 'not_a_sweep')
  with pytest.raises(
      ValueError, match=r'sweep_broken\(\) must return a ' r'non-empty list'
  ):
    sweep.load_sweep(config_path, 'broken')
  with pytest.raises(FileNotFoundError, match='missing.py'):
    sweep.load_sweep(str(tmp_path / 'missing.py'), 'tiny')


# apply_overrides.


def test_apply_overrides_sets_nested_values_on_a_copy(base_config):
  config = sweep.apply_overrides(
      base_config,
      {
          'train.batch_size': 64,
          'optimizer.agc.clipping': None,
          'train.epochs': 5,
          'model': 'nf_resnet50',
      },
  )
  assert config.train.batch_size == 64
  assert config.optimizer.agc.clipping is None
  assert config.model == 'nf_resnet50'
  # Derived lazily from epochs, so it follows the override.
  assert config.train.steps == 50
  assert config.is_locked
  # The base config is untouched.
  assert base_config.train.batch_size == 128
  assert base_config.optimizer.agc.clipping == 0.01
  assert base_config.train.steps == 20


@pytest.mark.parametrize(
    'key, message',
    [
        (
            'train.batch_sise',
            "'train.batch_sise' does not exist: train has no "
            "field 'batch_sise' (fields: batch_size, epochs, steps)",
        ),
        (
            'trian.batch_size',
            "'trian.batch_size' does not exist: the config has "
            "no field 'trian'",
        ),
        ('train.batch_size.x', 'train.batch_size is 128, not a ConfigDict'),
        ('optimizer.agc.clipping.x', 'optimizer.agc.clipping is 0.01'),
    ],
)
def test_apply_overrides_rejects_unknown_keys(base_config, key, message):
  with pytest.raises(ValueError) as error:
    sweep.apply_overrides(base_config, {key: 1})
  assert message in str(error.value)
  assert '\n' not in str(error.value)


def test_apply_overrides_names_the_key_on_a_type_error(base_config):
  with pytest.raises(TypeError, match=r'Override train\.batch_size=1\.5'):
    sweep.apply_overrides(base_config, {'train.batch_size': 1.5})


# run_name.


def test_run_name_is_stable_short_and_safe():
  overrides = {'train.batch_size': 256, 'optimizer.agc.clipping': 0.04}
  assert sweep.run_name(overrides) == 'batch_size=256,clipping=0.04'
  # The sweep's key order wins over each dict's own order.
  keys = ['train.batch_size', 'optimizer.agc.clipping']
  assert sweep.run_name(dict(reversed(list(overrides.items()))), keys) == (
      'batch_size=256,clipping=0.04'
  )
  assert sweep.run_name({}) == 'base'
  assert sweep.run_name({'optimizer.agc.clipping': None}) == 'clipping=None'
  assert sweep.run_name({'train.lr': 1e-5}) == 'lr=1e-05'
  # Leaf names shared by two keys keep enough components to tell them apart.
  assert sweep.run_name({'train.lr': 0.1, 'optimizer.lr': 0.2}) == (
      'train.lr=0.1,optimizer.lr=0.2'
  )
  unsafe = sweep.run_name({'data.path': '/a b/c,d=e', 'model.depths': (1, 2)})
  assert unsafe == 'path=_a_b_c_d_e,depths=1_2'


def test_run_name_bounds_long_names():
  a = sweep.run_name({'model.name': 'x' * 300 + 'a'})
  b = sweep.run_name({'model.name': 'x' * 300 + 'b'})
  assert len(a) <= 200 and len(b) <= 200
  assert a != b


def test_plan_runs_rejects_repeated_runs(base_config, tmp_path):
  with pytest.raises(ValueError, match=r"Runs 0 and 2 .* 'lr=0.1'"):
    sweep.plan_runs(
        base_config,
        [{'optimizer.lr': 0.1}, {'optimizer.lr': 0.2}, {'optimizer.lr': 0.1}],
        tmp_path,
    )


# run_sweep.


class FakeTrainer:
  """Stands in for train_and_evaluate: logs metrics, fails where told."""

  def __init__(self, fail_on=()):
    self.fail_on = set(fail_on)
    self.calls = []

  def __call__(self, config, workdir):
    key = (config.train.batch_size, config.optimizer.agc.clipping)
    self.calls.append((key, workdir))
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'metrics.jsonl'), 'a') as f:
      f.write(json.dumps({'step': 5, 'train_loss': 2.5}) + '\n')
    if key in self.fail_on:
      raise RuntimeError(f'loss diverged at batch {key[0]}\nsecond line')
    f_top1 = 0.5 + config.train.batch_size / 1000
    with open(os.path.join(workdir, 'metrics.jsonl'), 'a') as f:
      f.write(
          json.dumps({'step': 10, 'train_loss': 1.5, 'eval_top1': f_top1})
          + '\n'
      )
    # Like a real trainer: numpy scalars and an extra metric.
    return {
        'eval_top1': np.float32(f_top1),
        'train_loss': 1.5,
        'diverged': False,
        'l2_params': np.float64(3.0),
    }


def _read_csv(path):
  with open(path, newline='') as f:
    return list(csv.DictReader(f))


def test_run_sweep_runs_skips_records_failures_and_summarizes(
    config_path, base_config, tmp_path
):
  grid = sweep.load_sweep(config_path, 'tiny')
  sweep_dir = tmp_path / 'sweeps' / 'tiny'
  trainer = FakeTrainer(fail_on={(256, None)})

  markdown = sweep.run_sweep(base_config, grid, sweep_dir, train_fn=trainer)

  # Every run trained once, with its own config and workdir.
  assert [key for key, _ in trainer.calls] == [
      (64, 0.01),
      (64, None),
      (256, 0.01),
      (256, None),
  ]
  assert [workdir for _, workdir in trainer.calls] == [
      str(sweep_dir / name) for name in TINY_NAMES
  ]
  for name in TINY_NAMES[:3]:
    done = json.loads((sweep_dir / name / 'DONE').read_text())
    assert done['diverged'] is False and done['l2_params'] == 3.0
  failed_dir = sweep_dir / TINY_NAMES[3]
  assert not (failed_dir / 'DONE').exists()
  assert (failed_dir / 'FAILED').read_text() == (
      'RuntimeError: loss diverged at batch 256\n'
  )

  rows = _read_csv(sweep_dir / 'summary.csv')
  assert list(rows[0]) == [
      'run',
      'train.batch_size',
      'optimizer.agc.clipping',
      'status',
      'eval_top1',
      'train_loss',
      'diverged',
      'step',
      'l2_params',
      'error',
  ]
  assert [r['run'] for r in rows] == TINY_NAMES
  assert [r['train.batch_size'] for r in rows] == ['64', '64', '256', '256']
  assert [r['optimizer.agc.clipping'] for r in rows] == [
      '0.01',
      'None',
      '0.01',
      'None',
  ]
  assert [r['status'] for r in rows] == ['done', 'done', 'done', 'failed']
  assert [r['diverged'] for r in rows] == ['False'] * 3 + ['']
  assert float(rows[2]['eval_top1']) == pytest.approx(0.756)
  # The failed run still shows how far it got, from its metrics.jsonl.
  assert (rows[3]['step'], rows[3]['train_loss'], rows[3]['eval_top1']) == (
      '5',
      '2.5',
      '',
  )
  assert rows[3]['error'] == 'RuntimeError: loss diverged at batch 256'
  assert [r['error'] for r in rows[:3]] == [''] * 3

  assert (sweep_dir / 'summary.md').read_text() == markdown
  md_lines = markdown.splitlines()
  assert md_lines[0] == (
      '| run | train.batch_size | optimizer.agc.clipping | status | '
      'eval_top1 | train_loss | diverged | step | error |'
  )
  assert len(md_lines) == 2 + 4
  assert md_lines[4] == (
      '| batch_size=256,clipping=0.01 | 256 | 0.01 | done | 0.756 | 1.5 | '
      'False | 10 |  |'
  )
  assert md_lines[5].endswith(
      '| failed |  | 2.5 |  | 5 | RuntimeError: loss diverged at batch 256 |'
  )

  # Second call: finished runs are skipped, the failed one is tried again.
  retry = FakeTrainer()
  markdown = sweep.run_sweep(base_config, grid, sweep_dir, train_fn=retry)
  assert [key for key, _ in retry.calls] == [(256, None)]
  assert not (failed_dir / 'FAILED').exists()
  assert [r['status'] for r in _read_csv(sweep_dir / 'summary.csv')] == (
      ['done'] * 4
  )
  assert 'error' not in markdown.splitlines()[0]

  # Third call: nothing left to do.
  idle = FakeTrainer()
  sweep.run_sweep(base_config, grid, sweep_dir, train_fn=idle)
  assert idle.calls == []


def test_a_finished_run_of_another_base_config_is_not_taken_as_done(
    config_path, tmp_path
):
  # Run folders are named by the overrides only: a second invocation with
  # another --config.x=y (or :arg) used to skip the runs and summarise the
  # first invocation's results as its own.
  grid = sweep.load_sweep(config_path, 'tiny')
  first = runpy.run_path(config_path)['get_config']()
  first.lock()
  sweep.run_sweep(first, grid, tmp_path, train_fn=FakeTrainer())
  same = runpy.run_path(config_path)['get_config']()
  idle = FakeTrainer()
  sweep.run_sweep(same, grid, tmp_path, train_fn=idle)
  assert idle.calls == []  # the same config: done, skipped
  other = runpy.run_path(config_path)['get_config']('nf_resnet50')
  other.optimizer.lr = 0.5
  trainer = FakeTrainer()
  with pytest.raises(ValueError) as e:
    sweep.run_sweep(other, grid, tmp_path, train_fn=trainer)
  assert trainer.calls == []
  assert str(e.value) == (
      f'Run {TINY_NAMES[0]} in {tmp_path} finished with another config'
      " (model: 'nf_resnet26' there, 'nf_resnet50' here; optimizer.lr: 0.1"
      ' there, 0.5 here): give this sweep another --workdir_root, or delete'
      ' that folder to train the run again.'
  )


def test_run_sweep_checks_every_run_before_training(base_config, tmp_path):
  trainer = FakeTrainer()
  grid = [{'train.batch_size': 64}, {'train.batch_sise': 64}]
  with pytest.raises(ValueError, match='batch_sise'):
    sweep.run_sweep(base_config, grid, tmp_path, train_fn=trainer)
  assert trainer.calls == []


def test_every_run_is_checked_as_the_trainer_would_before_the_first(
    tmp_path,
):
  # A value of the wrong type in the last run used to surface only when its
  # turn came, as a TypeError in its FAILED file.
  from nfnets import train  # pylint: disable=g-import-not-at-top

  base = runpy.run_path(str(REPO_ROOT / 'configs' / 'nf_resnet.py'))[
      'get_config'
  ]('50,local')
  base.lock()
  grid = [{'train.batch_size': 32}, {'train.batch_size': 'x'}]
  trainer = FakeTrainer()
  with pytest.raises(ValueError) as e:
    sweep.run_sweep(
        base, grid, tmp_path, train_fn=trainer, check_fn=train.check_config
    )
  assert trainer.calls == []
  assert str(e.value).startswith(
      "Run batch_size=x: train.batch_size='x' must be a positive int"
  )
  # The default trainer brings its check.
  assert sweep._default_check_fn() is train.check_config


def test_run_sweep_accepts_a_trainer_that_returns_nothing(
    base_config, tmp_path
):
  def train_fn(config, workdir):
    del config  # Unused.
    os.makedirs(workdir)
    with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
      f.write('{"step": 3, "eval_top1": 0.25}\n{"step": 4, "train_l')

  markdown = sweep.run_sweep(
      base_config, [{'optimizer.lr': 0.3}], tmp_path, train_fn=train_fn
  )
  assert json.loads((tmp_path / 'lr=0.3' / 'DONE').read_text()) == {}
  (row,) = _read_csv(tmp_path / 'summary.csv')
  assert (row['status'], row['eval_top1'], row['step']) == ('done', '0.25', '3')
  assert '| lr=0.3 | 0.3 | done | 0.25 | 3 |' in markdown


def test_seeds_are_averaged_best_first_per_setting(config_path, tmp_path):
  # The NFNets paper's AGC protocol: 5 seeds per setting, the best 4
  # averaged, so that one failed or diverged seed is the one left out.
  config = runpy.run_path(config_path)['get_config']()
  config.seed = 0
  config.lock()
  top1 = {
      0.1: [0.70, 0.72, 0.60, 0.71, 0.73],
      0.4: [0.50, 0.55, None, 0.52, 0.51],  # seed 2 fails
  }
  grid = [{'optimizer.lr': lr, 'seed': s} for lr in top1 for s in range(5)]

  def train_fn(config, workdir):
    value = top1[config.optimizer.lr][config.seed]
    if value is None:
      raise FloatingPointError('non-finite train_loss at step 3')
    return {'eval_top1': value}

  markdown = sweep.run_sweep(
      config, grid, tmp_path, train_fn=train_fn, average_best=4
  )
  rows = _read_csv(tmp_path / 'summary_seeds.csv')
  assert [
      (
          r['optimizer.lr'],
          r['seeds'],
          r['done'],
          r['failed'],
          r['averaged'],
          r['seeds_averaged'],
      )
      for r in rows
  ] == [
      ('0.1', '5', '5', '0', '4', '4 1 3 0'),
      ('0.4', '5', '4', '1', '4', '1 3 4 0'),
  ]
  assert float(rows[0]['eval_top1_mean']) == pytest.approx(0.715)
  assert float(rows[0]['eval_top1_min']) == pytest.approx(0.70)
  assert float(rows[1]['eval_top1_mean']) == pytest.approx(0.52)
  assert 'mean eval_top1 over its 4 best seeds' in markdown
  assert '| 0.1 | 5 | 5 | 0 | 4 | 0.715 | 0.7 | 0.73 | 4 1 3 0 |  |' in (
      markdown
  )
  # The per-run table is still there, one row per seed.
  assert len(_read_csv(tmp_path / 'summary.csv')) == 10

  # All five: the setting with a failed seed has no mean, and says why.
  runs = sweep.plan_runs(config, grid, tmp_path)
  sweep.write_summary(runs, tmp_path, average_best=0)
  rows = _read_csv(tmp_path / 'summary_seeds.csv')
  assert float(rows[0]['eval_top1_mean']) == pytest.approx(0.692)
  assert (rows[1]['eval_top1_mean'], rows[1]['seeds_averaged']) == ('', '')
  assert rows[1]['note'] == '5 seeds to average, 4 done with eval_top1'


def test_average_best_is_checked_against_the_seeds(config_path, tmp_path):
  config = runpy.run_path(config_path)['get_config']()
  config.seed = 0
  config.lock()
  runs = sweep.plan_runs(
      config, [{'optimizer.lr': 0.1, 'seed': s} for s in range(3)], tmp_path
  )
  sweep.check_average_best(runs, 3)
  with pytest.raises(ValueError, match='only 3 seeds; give at most 3'):
    sweep.check_average_best(runs, 4)
  with pytest.raises(ValueError, match='--average_best=-1'):
    sweep.check_average_best(runs, -1)
  unseeded = sweep.plan_runs(config, [{'optimizer.lr': 0.1}], tmp_path)
  sweep.check_average_best(unseeded, 0)
  with pytest.raises(ValueError, match="no 'seed' key"):
    sweep.check_average_best(unseeded, 2)
  # On the command line: one line, before anything runs.
  result = _sweep_cli(
      f'--config={config_path}',
      '--sweep=lr',
      '--average_best=4',
      f'--workdir_root={tmp_path / "cli"}',
  )
  assert result.returncode != 0
  assert result.stderr.strip().splitlines() == [
      "nfnets.sweep: error: --average_best=4: the sweep has no 'seed' key to"
      ' average over; add one (see configs/nf_resnet.py,'
      ' sweep_agc_batch_seeds).'
  ]
  assert not (tmp_path / 'cli').exists()


def test_each_run_leaves_no_compiled_program_behind(base_config, tmp_path):
  # Kept programs hold memory mappings of their code; a long sweep in one
  # process ran out of them. JAX's caches are cleared after every run,
  # failed or not.
  import jax  # pylint: disable=g-import-not-at-top

  program = jax.jit(lambda x: x + 1)
  sizes = []

  def train_fn(config, workdir):
    del workdir  # Unused.
    sizes.append(program._cache_size())
    program(config.optimizer.lr)
    if config.optimizer.lr > 0.2:
      raise RuntimeError('diverged')
    return {'eval_top1': 0.5}

  grid = [{'optimizer.lr': lr} for lr in (0.1, 0.3, 0.2)]
  sweep.run_sweep(base_config, grid, tmp_path, train_fn=train_fn)
  assert sizes == [0, 0, 0]
  assert program._cache_size() == 0


def test_summary_of_a_sweep_not_run_yet(base_config, tmp_path):
  runs = sweep.plan_runs(
      base_config, [{'optimizer.lr': 0.1}, {'optimizer.lr': 0.2}], tmp_path
  )
  markdown = sweep.write_summary(runs, tmp_path)
  assert markdown.splitlines() == [
      '| run | optimizer.lr | status |',
      '|---|---|---|',
      '| lr=0.1 | 0.1 | not run |',
      '| lr=0.2 | 0.2 | not run |',
  ]
  assert [r['status'] for r in _read_csv(tmp_path / 'summary.csv')] == [
      'not run',
      'not run',
  ]


def test_a_started_run_is_summarised_as_interrupted(base_config, tmp_path):
  runs = sweep.plan_runs(
      base_config, [{'optimizer.lr': 0.1}, {'optimizer.lr': 0.2}], tmp_path
  )
  runs[0].workdir.mkdir()
  (runs[0].workdir / 'metrics.jsonl').write_text(
      '{"step": 2, "train_loss": 2.3}\n'
  )
  sweep.write_summary(runs, tmp_path)
  rows = _read_csv(tmp_path / 'summary.csv')
  assert [(r['status'], r['step']) for r in rows] == [
      ('interrupted', '2'),
      ('not run', ''),
  ]


def test_an_empty_workdir_root_is_refused(config_path, tmp_path):
  result = _sweep_cli(  # a dry run: should the check fail, nothing is written
      f'--config={config_path}', '--sweep=lr', '--workdir_root=', '--dry_run'
  )
  assert result.returncode != 0
  assert result.stderr.strip().splitlines() == [
      'nfnets.sweep: error: --workdir_root is empty; give a folder path, e.g.'
      ' --workdir_root=workdirs/sweeps.'
  ]


def test_a_preempted_run_stops_the_sweep_unfinished(base_config, tmp_path):
  # The trainer returns (not raises) on SIGTERM/Ctrl-C; that run must not
  # be marked done, and the signal stops the runs after it too.
  calls = []

  def preempted_once(config, workdir):
    calls.append(workdir)
    os.makedirs(workdir, exist_ok=True)
    return {'step': 18, 'preempted': len(calls) == 1}

  grid = [{'optimizer.lr': 0.1}, {'optimizer.lr': 0.3}]
  with pytest.raises(sweep.Preempted, match='lr=0.1 at step 18.*resume'):
    sweep.run_sweep(base_config, grid, tmp_path, train_fn=preempted_once)
  assert calls == [str(tmp_path / 'lr=0.1')]
  assert not (tmp_path / 'lr=0.1' / 'DONE').exists()
  sweep.run_sweep(base_config, grid, tmp_path, train_fn=preempted_once)
  assert calls[1:] == [str(tmp_path / 'lr=0.1'), str(tmp_path / 'lr=0.3')]
  assert (tmp_path / 'lr=0.1' / 'DONE').exists()


def test_runs_finished_before_a_field_was_added_are_still_done(
    config_path, tmp_path
):
  grid = sweep.load_sweep(config_path, 'tiny')
  before = runpy.run_path(config_path)['get_config']()  # no microbatches
  before.lock()
  sweep.run_sweep(before, grid, tmp_path, train_fn=FakeTrainer())
  for parts, done in ((1, True), (2, False)):
    after = runpy.run_path(config_path)['get_config']()
    after.train.microbatches = parts  # a field added since (cli.ADDED_FIELDS)
    after.lock()
    idle = FakeTrainer()
    if done:  # what the runs trained under: the same config
      sweep.run_sweep(after, grid, tmp_path, train_fn=idle)
    else:
      with pytest.raises(ValueError, match='train.microbatches: 1 there, 2'):
        sweep.run_sweep(after, grid, tmp_path, train_fn=idle)
    assert idle.calls == []


# Several processes.


def _start_sweep(tmp_path, steps):
  """Starts a 2-run sweep of `steps` steps each, as two processes."""
  config = tmp_path / 'two.py'
  config.write_text(textwrap.dedent(f"""\
      import sys
      sys.path.insert(0, {str(REPO_ROOT / 'tests')!r})
      from tiny_config import get_config


      def sweep_two():
        return [{{'optimizer.base_lr': lr}} for lr in (0.1, 0.2)]
  """))
  env = dict(
      os.environ,
      XLA_FLAGS=processes.xla_flags(4),
      JAX_PLATFORMS='cpu',
  )
  return processes.start(
      [
          [
              sys.executable,
              '-m',
              'nfnets.sweep',
              f'--config={config}:{steps}',
              '--sweep=two',
              f'--workdir_root={tmp_path / "sweeps"}',
              *flags,
          ]
          for flags in processes.process_flags(2)
      ],
      cwd=REPO_ROOT,
      env=env,
  )


def test_two_processes_run_a_sweep_as_one(tmp_path):
  outs = processes.finish(_start_sweep(tmp_path, 2))
  root = tmp_path / 'sweeps' / 'two'
  # One run over all 8 devices, not two runs of 4.
  for name in ('base_lr=0.1', 'base_lr=0.2'):
    first = json.loads(
        (root / name / 'metrics.jsonl').read_text().splitlines()[0]
    )
    assert first['step'] == 1
    assert (root / name / sweep.DONE_FILE).exists()
  assert 'on 8 devices' in outs[0][0]
  assert 'base_lr=0.2' in (root / sweep.SUMMARY_MD).read_text()


def test_a_sigterm_between_runs_stops_a_two_process_sweep(tmp_path):
  # Here JAX's service answers at the next run's first question: kept, it
  # stops that run after one step; dropped, no signal stopped the sweep.
  procs = _start_sweep(tmp_path, 8)
  root = tmp_path / 'sweeps' / 'two'
  final = root / 'base_lr=0.1' / 'checkpoints' / '8'  # saved, then evaluated
  deadline = time.time() + 300
  while not final.exists():
    assert all(p.poll() is None for p in procs), procs[0].communicate()
    assert time.time() < deadline
    time.sleep(0.02)
  procs[1].send_signal(signal.SIGTERM)
  (out, _), _ = processes.finish(procs, timeout=300)
  assert 'Preempted during base_lr=0.2' in out
  assert not (root / 'base_lr=0.2' / sweep.DONE_FILE).exists()


def test_several_processes_without_jax_distributed_are_refused_first(
    tmp_path, monkeypatch
):
  import jax  # pylint: disable=g-import-not-at-top
  import tiny_config  # pylint: disable=g-import-not-at-top

  # As on a pod started without it: no run may train, or fail for it.
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  config = tiny_config.get_config(2)
  config.lock()
  with pytest.raises(ValueError, match='jax.distributed is not initialized'):
    sweep.run_sweep(config, [{'optimizer.base_lr': 0.1}], tmp_path / 's')
  assert not list(tmp_path.rglob(sweep.FAILED_FILE))


def test_coordinator_auto_outside_a_cluster_stops_the_sweep(
    config_path, tmp_path
):
  cluster = ('SLURM_', 'OMPI_', 'KUBERNETES_', 'TPU_', 'MEGASCALE_')
  result = subprocess.run(
      [
          sys.executable,
          '-m',
          'nfnets.sweep',
          f'--config={config_path}',
          '--sweep=lr',
          f'--workdir_root={tmp_path}',
          '--coordinator_address=auto',
      ],
      cwd=REPO_ROOT,
      env={k: v for k, v in os.environ.items() if not k.startswith(cluster)},
      capture_output=True,
      text=True,
      timeout=120,
      check=False,
  )
  assert result.returncode == 1
  assert (
      result.stderr.strip()
      .splitlines()[-1]
      .startswith(
          'nfnets.sweep: error: --coordinator_address=auto found no cluster'
      )
  )


def test_ctrl_c_outside_a_training_loop_is_one_line(config_path, tmp_path):
  code = textwrap.dedent(f"""\
      import functools, os, signal, sys, time
      from absl import app
      from nfnets import cli, sweep

      def starting(config, workdir):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(10)

      sweep._default_train_fn = lambda: starting
      sweep._default_check_fn = lambda: None
      sys.argv = ['sweep', '--config={config_path}', '--sweep=lr',
                  '--workdir_root={tmp_path}']
      sweep._define_flags()
      app.run(sweep.main, flags_parser=functools.partial(
          cli.parse_flags, prefix='nfnets.sweep: '))
  """)
  result = processes.python(code, REPO_ROOT, timeout=120)
  assert result.returncode == 130, result.stderr[-2000:]
  assert 'Traceback' not in result.stderr, result.stderr[-2000:]
  assert (
      result.stderr.strip()
      .splitlines()[-1]
      .startswith('nfnets.sweep: interrupted (Ctrl-C) outside a training loop')
  )
