"""`python -m nfnets.reproduce`: its files agree with the papers and theory.

Each subcommand runs in-process at a reduced size into a temporary results
directory, and the assertions read back the files it wrote.
"""

import csv
import importlib.util
import math
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest

from nfnets import reproduce
from nfnets import signal_prop

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_HAS_RUNNER = importlib.util.find_spec('nfnets.train') is not None
_NO_RUNNER = 'nfnets.train (the training runner) is not in this tree'

# Table 3 of the NFNets paper, quoted independently of nfnets.reproduce so
# that a typo there cannot make the comparison pass: params (M), FLOPs (B).
_PAPER = {
    'nfnet_f0': (71.5, 12.38),
    'nfnet_f1': (132.6, 35.54),
    'nfnet_f2': (193.8, 62.59),
    'nfnet_f3': (254.9, 114.76),
    'nfnet_f4': (316.1, 215.24),
    'nfnet_f5': (377.2, 289.76),
    'nfnet_f6': (438.4, 377.28),
}


def _run(capsys, command, results_dir):
  """Runs the CLI in-process; returns the paths it printed on stdout."""
  argv = shlex.split(command) + [f'--results_dir={results_dir}']
  assert reproduce.main(argv) == 0
  printed = capsys.readouterr().out.split()
  for path in printed:
    assert os.path.isfile(path) and os.path.getsize(path) > 0, path
  return printed


def _names(paths):
  return sorted(os.path.basename(p) for p in paths)


def _read_csv(path):
  with open(path, newline='') as f:
    return list(csv.DictReader(f))


def test_table3_matches_the_paper_exactly_for_f0_to_f6(tmp_path, capsys):
  paths = _run(capsys, f'table3 --models={",".join(_PAPER)}', tmp_path)
  assert paths == [str(tmp_path / 'table3.md'), str(tmp_path / 'table3.csv')]
  rows = {r['name']: r for r in _read_csv(tmp_path / 'table3.csv')}
  assert sorted(rows) == sorted(_PAPER)
  for name, (params_m, flops_b) in _PAPER.items():
    row = rows[name]
    # The CSV holds the unrounded counts; the paper's rounding must agree.
    assert round(float(row['params_m']), 1) == params_m, row
    assert round(float(row['flops_b']), 2) == flops_b, row
    assert row['matches_paper'] == 'exact', row
  text = (tmp_path / 'table3.md').read_text()
  assert 'matching the paper exactly' in text and '7 of 7' in text
  # The Markdown rows show ours and the paper's side by side.
  f3 = next(line for line in text.splitlines() if '`nfnet_f3`' in line)
  cells = [c.strip() for c in f3.split('|')]
  assert cells.count('254.9') == 2 and cells.count('114.76') == 2, f3
  # The paper's rows with no model here are quoted under the table.
  assert 'EffNet-B7' in text and '1753.3 ms' in text and '111.7 ms' in text


def _spp_series(rows, model, column):
  values = [(int(r['block']), r[column]) for r in rows if r['model'] == model]
  assert values, f'no rows for {model}'
  return np.array([float(v) if v else np.nan for _, v in sorted(values)])


def test_spp_nf_resnet_stays_bounded_while_unnormalized_explodes(
    tmp_path, capsys
):
  command = (
      'spp --variant=resnet26 --versions=nf,unnormalized --image_size=128 '
      '--batch_size=4'
  )
  paths = _run(capsys, command, tmp_path)
  assert _names(paths) == ['spp.csv', 'spp.md', 'spp.png']
  with open(tmp_path / 'spp.png', 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  rows = _read_csv(tmp_path / 'spp.csv')
  assert list(rows[0]) == [
      'model',
      'block',
      'avg_sq_mean',
      'avg_var',
      'res_avg_var',
  ]
  # ResNet-26: 8 blocks; row 0 is the stem's output (no residual branch).
  nf_var = _spp_series(rows, 'nf_resnet26', 'avg_var')
  assert len(nf_var) == 9
  assert np.isnan(_spp_series(rows, 'nf_resnet26', 'res_avg_var')[0])
  blocks = nf_var[1:]
  assert np.all((blocks > 0.5) & (blocks < 2.0)), blocks
  expected = signal_prop.nf_expected_variance((2, 2, 2, 2))
  np.testing.assert_allclose(blocks, expected, rtol=0.3)
  # Scaled WS keeps channel means near zero: no mean shift builds up.
  assert np.all(_spp_series(rows, 'nf_resnet26', 'avg_sq_mean')[1:] < 0.2)

  un_var = _spp_series(rows, 'resnet26_unnormalized', 'avg_var')
  # Roughly doubling per block: over 8 blocks far more than 2^4.
  assert un_var[-1] / un_var[0] > 2.0**4, un_var
  assert un_var[-1] > 10 * blocks.max(), un_var


def test_variance_nf_bounded_unnormalized_doubles(tmp_path, capsys):
  depth = 16
  command = f'variance --depths={depth} --schemes=nf,unnormalized --channels=64'
  paths = _run(capsys, command, tmp_path)
  assert _names(paths) == ['variance.csv', 'variance.md', 'variance_blocks.csv']
  rows = _read_csv(tmp_path / 'variance_blocks.csv')

  def series(scheme, method, column='log2_avg_var'):
    return np.array(
        [
            float(r[column])
            for r in rows
            if r['scheme'] == scheme and r['method'] == method
        ]
    )

  nf = 2.0 ** series('nf', 'float32')
  assert len(nf) == depth + 1
  assert np.all((nf > 0.5) & (nf < 2.0)), nf
  analytic = 2.0 ** series('nf', 'float32', 'analytic_log2_avg_var')
  np.testing.assert_allclose(nf, analytic, rtol=0.1)

  log_space = series('unnormalized', 'log space')
  direct = series('unnormalized', 'float32')
  # Where float32 holds the numbers, renormalizing changes nothing.
  np.testing.assert_allclose(log_space, direct, atol=1e-3)
  # Explodes: at least 2^(d/2) after d blocks, and growing every 4 blocks.
  assert log_space[-1] > depth / 2, log_space
  assert np.all(np.diff(log_space[::4]) > 0), log_space

  summary = _read_csv(tmp_path / 'variance.csv')
  assert {(r['scheme'], r['method']) for r in summary} == {
      ('nf', 'float32'),
      ('unnormalized', 'log space'),
      ('unnormalized', 'float32'),
  }
  text = (tmp_path / 'variance.md').read_text()
  assert '| Scheme |' in text and 'log space' in text


def test_log_space_stack_survives_float32_overflow():
  # 2^300 overflows float32; the log-space measurement keeps going.
  kwargs = dict(channels=64, spatial=4, batch_size=4)
  stats = signal_prop.stack_signal_stats(
      'unnormalized', 300, log_space=True, **kwargs
  )
  log2_var = stats['log2_avg_var']
  assert np.all(np.isfinite(log2_var))
  assert log2_var[-1] > 150, log2_var[-1]  # > 2^150, far past float32
  direct = signal_prop.stack_signal_stats('unnormalized', 300, **kwargs)
  assert not np.all(np.isfinite(direct['log2_avg_var']))


def test_analytic_laws_at_depth():
  law = signal_prop.analytic_log2_second_moment
  assert law('batchnorm', 100, 100) == pytest.approx(math.log2(101))
  assert law('unnormalized', 1000, 1000) == 1000
  assert law('skipinit_zeros', 1000, 1000) == 0
  e = 2 ** law('skipinit_inv_sqrt', 1000, 1000)
  assert e == pytest.approx(math.e, rel=1e-3)
  assert 2 ** law('nf', 1000, 1000) == pytest.approx(41.0)
  assert signal_prop.analytic_log2_variance('unnormalized', 10, 5) is None
  with pytest.raises(ValueError, match='scheme'):
    law('layernorm', 10, 5)


def test_cli_prints_the_paths_it_wrote(tmp_path):
  command = (
      f'{sys.executable} -m nfnets.reproduce variance --depths=4 --schemes=nf'
      f' --channels=16 --spatial=4 --batch_size=2 --results_dir={tmp_path}'
  )
  out = subprocess.run(
      shlex.split(command),
      cwd=_REPO,
      capture_output=True,
      text=True,
      timeout=300,
      check=True,
  )
  assert out.stdout.split() == [
      str(tmp_path / 'variance.md'),
      str(tmp_path / 'variance.csv'),
      str(tmp_path / 'variance_blocks.csv'),
  ]


def test_unknown_subcommand_lists_the_valid_ones():
  out = subprocess.run(
      [sys.executable, '-m', 'nfnets.reproduce', 'table4'],
      cwd=_REPO,
      capture_output=True,
      text=True,
      timeout=120,
  )
  assert out.returncode == 2
  assert 'table4' in out.stderr
  for name in reproduce.SUBCOMMANDS:
    assert name in out.stderr, out.stderr


def test_bad_flag_values_are_errors(capsys):
  with pytest.raises(SystemExit):
    reproduce.main(['table3', '--models=nfnet_f9'])
  assert 'nfnet_f9' in capsys.readouterr().err
  with pytest.raises(SystemExit):
    reproduce.main(['variance', '--schemes=layernorm'])
  assert 'layernorm' in capsys.readouterr().err
  with pytest.raises(SystemExit):
    reproduce.main(['spp', '--variant=resnet51'])
  assert 'resnet600' in capsys.readouterr().err
  for value, shown in (('64,0', "'0'"), ('64,x', "'x'"), (',', "','")):
    with pytest.raises(SystemExit):
      reproduce.main(['agc', f'--batch_sizes={value}'])
    assert f'>= 1, got {shown}' in capsys.readouterr().err
  # A repeated value would reuse its twin's run folder and crash after all
  # the training; NaN and infinity are no lambda.
  for argv, message in (
      (['agc', '--batch_sizes=64,64'], "64 is given twice in '64,64'"),
      (['agc', '--clippings=none,off'], "none is given twice in 'none,off'"),
      (['agc', '--clippings=0.04,0.040'], '0.04 is given twice'),
      (['depth', '--networks=nf,nf'], "nf is given twice in 'nf,nf'"),
      (['depth', '--blocks=4,4'], "4 is given twice in '4,4'"),
      (['table3', '--models=nfnet_f0,nfnet_f0'], 'nfnet_f0 is given twice'),
      (['agc', '--clippings=0.04,nan'], "got 'nan'"),
      (['agc', '--clippings=inf'], "got 'inf'"),
      (['spp', '--width=0'], "--width: expected a number > 0, got '0'"),
      (['depth', '--width=nan'], "expected a number > 0, got 'nan'"),
      (['depth', '--clipping=0.04,0.08'], "expected one lambda or 'none'"),
  ):
    with pytest.raises(SystemExit):
      reproduce.main(argv)
    assert message in capsys.readouterr().err, argv


@pytest.mark.skipif(not _HAS_RUNNER, reason=_NO_RUNNER)
def test_agc_smoke(tmp_path, capsys):
  # One step of the tiniest grid: the table, CSV and plot are written.
  command = (
      'agc --batch_sizes=64 --clippings=0.04 --epochs=0.05 --depth=1,1,1,1 '
      '--width=0.125 --image_size=8 --seed=3 --num_seeds=2'
  )
  paths = _run(capsys, command, tmp_path)
  assert _names(paths) == ['agc.csv', 'agc.md', 'agc.png']
  rows = _read_csv(tmp_path / 'agc.csv')
  assert [r['seed'] for r in rows] == ['3', '4']  # one row per run
  for row in rows:
    assert row['batch_size'] == '64' and float(row['clipping']) == 0.04
    assert row['status'] == 'ok', row
    assert 0.0 <= float(row['eval_top1']) <= 1.0
  mean = sum(float(r['eval_top1']) for r in rows) / 2
  text = (tmp_path / 'agc.md').read_text()
  assert 'seeds 3-4; each cell is the mean final test top-1 of its best 2' in (
      text
  )
  assert f'| 64 | 0.025 | 1 | {100 * mean:.1f} | lambda 0.04 |' in text


@pytest.mark.skipif(
    not _HAS_RUNNER or not os.path.exists('/proc/self/maps'),
    reason='needs the runner and Linux',
)
def test_runs_in_one_process_do_not_accumulate_memory_mappings(tmp_path):
  # Every run's compiled CPU code holds ~2,700 mappings while JAX's caches
  # keep it: 'reproduce agc' with 5 seeds crashed at Linux's 65,530.
  def mappings():
    with open('/proc/self/maps') as f:
      return sum(1 for _ in f)

  counts = []
  for seed in range(3):
    config = reproduce._digits_config(
        model_name='nf_resnet26',
        overrides=dict(width=0.125, depth=(1, 1, 1, 1)),
        batch_size=64,
        epochs=0.05,
        base_lr=0.1,
        clipping=0.04,
        image_size=8,
        log_every=1,
        seed=seed,
    )
    reproduce._train_run(config, str(tmp_path / str(seed)))
    counts.append(mappings())
  assert counts[2] - counts[0] < 300, counts


def _agc_run(seed, top1, status='ok'):
  return dict(
      seed=seed,
      eval_top1=top1,
      status=status,
      diverged=status != 'ok',
  )


def test_agc_cells_average_the_best_seeds_leaving_out_diverged_ones():
  runs = [
      _agc_run(0, 0.70),
      _agc_run(1, None, 'non-finite train_loss at step 4'),
      _agc_run(2, 0.90),
      _agc_run(3, 0.60),
      _agc_run(4, 0.80),
  ]
  cell = reproduce._agc_cell(runs, 4)  # the paper's best 4 of 5
  assert cell['top1'] == pytest.approx(0.75)
  assert cell['seeds'] == [2, 4, 0, 3]
  assert cell['text'] == '75.0 (1 of 5 diverged)'
  # All five asked for: the diverged seed leaves the cell without a value.
  cell = reproduce._agc_cell(runs, 5)
  assert (cell['top1'], cell['text']) == (None, '— (1 of 5 diverged)')
  # A run that finished above twice chance's loss diverged too, and is left
  # out although it has an accuracy.
  runs[2] = _agc_run(2, 0.95, 'diverged (loss > 2 ln 10)')
  assert reproduce._agc_cell(runs, 3)['seeds'] == [4, 0, 3]
  # One seed: the run's own value and status, as before seeds existed.
  assert reproduce._agc_cell([runs[2]], 1)['text'] == (
      '95.0 (diverged (loss > 2 ln 10))'
  )
  assert reproduce._agc_cell([runs[1]], 1)['text'] == (
      '— (non-finite train_loss at step 4)'
  )


def test_agc_defaults_to_the_papers_best_4_of_5_seeds():
  args = reproduce.build_parser().parse_args(['agc', '--seed=2'])
  assert reproduce._check_seeds(args) == ([2, 3, 4, 5, 6], 4)
  args = reproduce.build_parser().parse_args(['agc', '--num_seeds=2'])
  assert reproduce._check_seeds(args) == ([0, 1], 2)  # all of fewer
  args = reproduce.build_parser().parse_args(['agc', '--average_best=0'])
  assert reproduce._check_seeds(args) == ([0, 1, 2, 3, 4], 5)


def test_agc_average_best_beyond_the_seeds_is_refused_before_any_run(
    tmp_path, monkeypatch
):
  from nfnets import train  # pylint: disable=g-import-not-at-top

  monkeypatch.setattr(train, 'train_and_evaluate', None)  # must not be called
  with pytest.raises(SystemExit) as e:
    reproduce.main(
        [
            'agc',
            '--num_seeds=3',
            '--average_best=4',
            f'--results_dir={tmp_path}',
        ]
    )
  assert str(e.value.code) == (
      'python -m nfnets.reproduce agc: error: --average_best=4 is more than'
      ' --num_seeds=3; give at most 3.'
  )


@pytest.mark.skipif(not _HAS_RUNNER, reason=_NO_RUNNER)
def test_depth_smoke(tmp_path, capsys):
  command = (
      'depth --blocks=4 --networks=nf --epochs=0.1 --width=0.125 '
      '--image_size=8'
  )
  paths = _run(capsys, command, tmp_path)
  assert _names(paths) == ['depth.csv', 'depth.md', 'depth.png']
  rows = _read_csv(tmp_path / 'depth.csv')
  # Logged every step: 0.1 epoch of 1,437 digits at batch 64 is 2 steps.
  assert [r['step'] for r in rows] == ['1', '2']
  assert all(math.isfinite(float(r['train_loss'])) for r in rows)


@pytest.mark.skipif(not _HAS_RUNNER, reason=_NO_RUNNER)
def test_an_interrupted_run_stops_the_subcommand_writing_nothing(
    tmp_path, capsys, monkeypatch
):
  # The runner saves and returns on SIGTERM/Ctrl-C; the table must not go
  # on to the next run with this one half done (it used to: KeyError).
  from nfnets import train  # pylint: disable=g-import-not-at-top

  calls = []

  def preempted(config, workdir):
    calls.append(workdir)
    return {'step': 3, 'preempted': True}

  monkeypatch.setattr(train, 'train_and_evaluate', preempted)
  results = tmp_path / 'results'
  with pytest.raises(SystemExit) as e:
    reproduce.main(
        shlex.split(
            'agc --batch_sizes=64,256 --clippings=0.04 '
            f'--results_dir={results}'
        )
    )
  assert 'interrupted at step 3; no results written' in str(e.value.code)
  assert len(calls) == 1 and not list(results.iterdir())


def test_an_unwritable_results_dir_fails_before_any_work(tmp_path, capsys):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a folder')
  with pytest.raises(SystemExit) as e:
    reproduce.main(['table3', f'--results_dir={blocker}'])
  assert str(e.value.code).startswith(
      'python -m nfnets.reproduce table3: error: --results_dir: cannot write'
  )
  assert blocker.read_text() == 'not a folder'
  assert 'table3' not in capsys.readouterr().err  # no work was logged


def test_a_url_or_a_folder_that_takes_no_file_fails_before_any_work(capsys):
  # 'gs://b/x' was written to a local folder 'gs:'; /proc passed the
  # os.access check (as root everything does) and failed after the work.
  for results_dir, message in (
      ('gs://bucket/x', 'is a URL; give a local folder'),
      ('/proc', 'cannot write to /proc'),
  ):
    if results_dir == '/proc' and not os.path.isdir('/proc'):
      continue
    with pytest.raises(SystemExit) as e:
      reproduce.main(['variance', f'--results_dir={results_dir}'])
    assert message in str(e.value.code)
    assert 'variance:' not in capsys.readouterr().err  # no work was logged
  assert not os.path.exists('gs:')


@pytest.mark.skipif(not _HAS_RUNNER, reason=_NO_RUNNER)
def test_a_value_the_runner_refuses_is_one_line(tmp_path):
  result = subprocess.run(
      [
          sys.executable,
          '-m',
          'nfnets.reproduce',
          'agc',
          '--batch_sizes=12',  # 8 devices (conftest.py)
          f'--results_dir={tmp_path}',
      ],
      cwd=_REPO,
      capture_output=True,
      text=True,
      timeout=300,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
  )
  assert result.returncode != 0
  assert 'Traceback' not in result.stderr, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1] == (
      'python -m nfnets.reproduce agc: error: train.batch_size=12 is not'
      ' divisible by the device count 8; use a multiple of 8.'
  )


@pytest.mark.parametrize(
    'argv, message',
    [
        (['agc', '--epochs=0'], "--epochs: expected a number > 0, got '0'"),
        (['depth', '--epochs=nan'], 'expected a number > 0'),
        (['agc', '--base_lr=-0.1'], '--base_lr: expected a number > 0'),
        (['depth', '--base_lr=inf'], 'expected a number > 0'),
        (
            ['agc', '--seed=-1'],
            '--seed: expected an integer in [0, 4294967296)',
        ),
        (['depth', '--seed=4294967296'], 'in [0, 4294967296)'),
        (['spp', '--seed=-3'], 'in [0, 4294967296)'),
        (['variance', '--seed=x'], 'in [0, 4294967296)'),
        (['agc', '--model=nfnet_f9'], "Unknown model name 'nfnet_f9'"),
    ],
)
def test_flags_the_runner_would_refuse_are_refused_by_flag_name(
    argv, message, capsys
):
  # Before, these reached the runner at the first run, which named its
  # config field (train.num_epochs, seed), not the flag.
  with pytest.raises(SystemExit):
    reproduce.build_parser().parse_args(argv)
  assert message in capsys.readouterr().err


def test_agc_seeds_past_the_last_32_bit_seed_are_refused():
  args = reproduce.build_parser().parse_args(
      ['agc', f'--seed={2**32 - 5}', '--num_seeds=5']
  )
  assert reproduce._check_seeds(args)[0][-1] == 2**32 - 1
  args = reproduce.build_parser().parse_args(
      ['agc', f'--seed={2**32 - 4}', '--num_seeds=5']
  )
  with pytest.raises(ValueError, match=r'give --seed <= 4294967291\.'):
    reproduce._check_seeds(args)


@pytest.mark.parametrize(
    'argv',
    [
        ['latency', '--batch_size=0'],  # was the default batch, silently
        ['latency', '--steps=0'],
        ['latency', '--warmup=-1'],
        ['spp', '--batch_size=0'],
        ['variance', '--channels=-4'],
        ['depth', '--image_size=0'],
    ],
)
def test_sizes_and_counts_below_their_floor_are_argparse_errors(argv, capsys):
  with pytest.raises(SystemExit):
    reproduce.build_parser().parse_args(argv)
  assert 'expected an integer >=' in capsys.readouterr().err
