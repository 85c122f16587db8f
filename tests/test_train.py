"""The runner: data parallelism, resume, preemption, guards, evaluation."""

import contextlib
import copy
import functools
import glob
import inspect
import json
import os
import pickle
import re
import signal
import subprocess
import textwrap
import sys
import time

from etils import epath
import jax
import numpy as np
import pytest

from configs import common
from nfnets import checkpoint
from nfnets import cli
from nfnets import optim
from nfnets import resolve
from nfnets import train
import processes
import states
import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(workdir, steps, *extra, devices=8, env=None):
  cmd = [
      sys.executable,
      os.path.join(REPO, 'experiment.py'),
      f'--config={os.path.join(REPO, "tests", "tiny_config.py")}:{steps}',
      f'--workdir={workdir}',
      *extra,
  ]
  run_env = dict(os.environ)
  run_env['XLA_FLAGS'] = processes.xla_flags(devices)
  run_env['JAX_PLATFORMS'] = 'cpu'
  run_env.update(env or {})
  return cmd, run_env


def _run(workdir, steps, *extra, **kw):
  cmd, env = _cli(workdir, steps, *extra, **kw)
  return subprocess.run(
      cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600
  )


def _metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]


def _saved_steps(workdir):
  """Steps of finished checkpoints (orbax writes into '<step>.*-tmp' first)."""
  names = os.listdir(os.path.join(workdir, 'checkpoints'))
  return sorted(int(n) for n in names if n.isdigit())


def _final_params(workdir):
  """The params of the newest checkpoint, as a flat {path: array} dict."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  steps = _saved_steps(workdir)
  path = os.path.join(workdir, 'checkpoints', str(steps[-1]), 'default')
  tree = ocp.StandardCheckpointer().restore(path)
  return steps[-1], {
      f'{m}/{p}': np.asarray(v)
      for m, d in tree['params'].items()
      for p, v in d.items()
  }


def _wait_for_step(workdir, step, proc, timeout=300):
  path = os.path.join(workdir, 'metrics.jsonl')
  deadline = time.time() + timeout
  while time.time() < deadline:
    assert proc.poll() is None, proc.communicate()
    if os.path.exists(path):
      with open(path) as f:
        lines = [json.loads(x) for x in f if x.strip()]
      if lines and lines[-1]['step'] >= step:
        return
    time.sleep(0.02)
  raise TimeoutError(f'step {step} not reached')


def _start(workdir, steps):
  """Launches a training run in the background."""
  cmd, env = _cli(workdir, steps)
  return processes.start([cmd], env=env, cwd=REPO)[0]


def _relaunch_and_match(workdir, uninterrupted, resumed_from):
  """Relaunches the 40-step run; it must resume and end bitwise equal."""
  result = _run(workdir, 40)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'Resumed from the checkpoint of {resumed_from}' in result.stdout
  steps = [r['step'] for r in _metrics(workdir) if 'train_loss' in r]
  assert steps == list(range(1, 41))  # continuous, no duplicates
  step_a, params_a = _final_params(uninterrupted)
  step_b, params_b = _final_params(workdir)
  assert step_a == step_b == 40
  assert params_a.keys() == params_b.keys()
  for key in params_a:
    np.testing.assert_array_equal(params_a[key], params_b[key], err_msg=key)


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('uninterrupted'))
  result = _run(workdir, 40)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def test_batch_not_divisible_by_devices_is_a_one_line_error(tmp_path):
  assert jax.device_count() == 8
  config = tiny_config.get_config()
  config.train.batch_size = 60
  with pytest.raises(ValueError) as e:
    train.train_and_evaluate(config, str(tmp_path))
  message = str(e.value)
  assert '\n' not in message
  assert 'train.batch_size=60' in message and 'device count 8' in message


def test_cli_reports_bad_batch_in_one_line(tmp_path):
  result = _run(str(tmp_path), 4, '--config.train.batch_size=60')
  assert result.returncode != 0
  lines = [l for l in result.stderr.splitlines() if l.startswith('error:')]
  assert (
      len(lines) == 1 and '60' in lines[0] and '8' in lines[0]
  ), result.stderr[-2000:]


def test_the_final_checkpoint_is_saved_before_the_final_evaluation(
    tmp_path, monkeypatch
):
  # The final evaluation runs outside the preemption handler and takes
  # minutes on ImageNet: a kill there must not cost the last steps.
  config = tiny_config.get_config(4)
  config.train.eval_every_epochs = 0  # evaluate only at the end

  def killed(*args, **kwargs):
    raise KeyboardInterrupt

  monkeypatch.setattr(train, 'evaluate', killed)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(config, str(tmp_path))
  assert checkpoint.TrainCheckpointer(str(tmp_path)).all_steps()[-1] == 4


def test_resuming_with_changed_values_says_which(tmp_path, capsys):
  train.train_and_evaluate(tiny_config.get_config(4), str(tmp_path))
  capsys.readouterr()
  again = tiny_config.get_config(6)
  again.optimizer.base_lr = 0.2
  train.train_and_evaluate(again, str(tmp_path))
  (line,) = [l for l in capsys.readouterr().out.splitlines() if 'Resumed' in l]
  assert 'step 4. Its config.json differs in optimizer.base_lr' in line
  assert 'train.max_steps (4 there, 6 here)' in line
  assert line.endswith('The run goes on with the new values.')
  # The same values again: a plain resume line, and nothing to train.
  train.train_and_evaluate(again, str(tmp_path))
  out = capsys.readouterr().out
  (line,) = [l for l in out.splitlines() if 'Resumed' in l]
  assert line == 'Resumed from the checkpoint of step 6.'
  assert "step 6 is at or past this config's 6 steps: evaluating" in out
  assert 'Training' not in out
  # Evaluated again, step 6's evaluation is in metrics.jsonl once: the new
  # one. The first run's final evaluation, of step 4, stays.
  records = [(r['step'], 'eval_top1' in r) for r in _metrics(tmp_path)]
  train_steps = [(s, False) for s in range(1, 7)]
  assert records == train_steps[:4] + [(4, True)] + train_steps[4:] + [
      (6, True)
  ]


def test_a_workdir_under_a_quoted_tilde_goes_home(tmp_path, monkeypatch):
  # --workdir='~/run' reaches Python as typed; it used to make ./~/run.
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  monkeypatch.chdir(tmp_path)
  train.train_and_evaluate(tiny_config.get_config(1), '~/run')
  assert (tmp_path / 'home' / 'run' / 'config.json').exists()
  assert not (tmp_path / '~').exists()
  assert train.expand_home('gs://bucket/~x') == 'gs://bucket/~x'


def test_multiprocess_flags_come_together_or_not_at_all(tmp_path):
  # --num_processes alone used to be ignored: a silent one-process run.
  result = _run(str(tmp_path), 2, '--num_processes=2')
  assert result.returncode != 0
  (line,) = [l for l in result.stderr.splitlines() if 'error:' in l]
  assert 'go together; only --num_processes given' in line
  assert not os.listdir(tmp_path)


def test_global_batch_64_trains_and_evaluates_every_example_once(tmp_path):
  config = tiny_config.get_config(5)
  # GPUs' layout on the CPU here ('auto' is HWIO on CPUs, as in the other
  # tests): the checkpoints must be HWIO all the same.
  config.train.kernel_layout = 'ohwi'
  result = train.train_and_evaluate(config, str(tmp_path))
  assert result['step'] == 5
  # 360 test images, eval batch 64: the padded last batch is masked out.
  assert result['eval_count'] == 360
  assert 0.0 <= result['eval_top1'] <= 1.0
  records = _metrics(str(tmp_path))
  assert [r['step'] for r in records if 'train_loss' in r] == [1, 2, 3, 4, 5]
  assert os.path.exists(os.path.join(str(tmp_path), 'curves.png'))
  assert glob.glob(os.path.join(str(tmp_path), 'tensorboard', '*'))

  # --mode=eval on the workdir's checkpoint gives the run's own numbers ...
  evaluated = train.evaluate_checkpoint(
      tiny_config.get_config(5), str(tmp_path)
  )
  assert evaluated['eval_count'] == 360
  assert evaluated['eval_top1'] == pytest.approx(result['eval_top1'])
  # ... with a batch far beyond the split (was killed padding it on the
  # host), capped at one batch of 360 over the 8 devices.
  huge = tiny_config.get_config(5)
  huge.eval.batch_size = 8 * 10**8
  assert train.eval_batch_size(huge.eval.batch_size, 360) == 360
  assert train.eval_batch_size(64, 360) == 64
  assert train.eval_batch_size(8, 3) == 8  # never below one per device
  assert train.evaluate_checkpoint(huge, str(tmp_path)) == pytest.approx(
      evaluated
  )
  # ... and so does the same params saved as a DeepMind-format pickle.
  _, flat = _final_params(str(tmp_path))
  tree = {}
  for key, value in flat.items():
    module, name = key.rsplit('/', 1)
    tree.setdefault(module, {})[name] = value
  path = os.path.join(str(tmp_path), 'params_haiku.npz')
  with open(path, 'wb') as f:
    pickle.dump(tree, f)
  config = tiny_config.get_config(5)
  config.eval.checkpoint = path
  published = train.evaluate_checkpoint(config, str(tmp_path))
  assert published['eval_top1'] == pytest.approx(result['eval_top1'])
  # ... and so does this run named from another workdir: its folder, its
  # checkpoints/ folder, the step's folder or orbax's item folder in it.
  other = str(tmp_path / 'other')
  run = os.path.join(str(tmp_path), 'checkpoints')
  for source in (str(tmp_path), run, f'{run}/5', f'{run}/5/default'):
    config.eval.checkpoint = source
    named = train.evaluate_checkpoint(config, other)
    assert named == evaluated, source
  assert not os.path.exists(other)
  config.eval.ema = False  # as in training: no EMA evaluated
  assert train.evaluate_checkpoint(config, other) == {
      k: v for k, v in evaluated.items() if not k.startswith('ema_')
  }
  config.eval.ema = True
  config.eval.checkpoint = f'{run}/4'  # an older step, as saved
  assert train.evaluate_checkpoint(config, other) != evaluated
  config.eval.checkpoint = f'{run}/3'
  with pytest.raises(FileNotFoundError, match=r'checkpoint 3 .*\[4, 5\]'):
    train.evaluate_checkpoint(config, other)
  config.eval.checkpoint = os.path.join(str(tmp_path), 'tensorboard')
  with pytest.raises(
      FileNotFoundError, match='eval.checkpoint=.* not a run of this project'
  ):
    train.evaluate_checkpoint(config, other)

  # Fine-tuning from this run, or from the DeepMind-format file: a new state
  # with its weights (and its EMA from them), the rest new.
  for source in (str(tmp_path), path):
    tuned = tiny_config.get_config(2)
    tuned.train.init_checkpoint = source
    tuned, new = states.new_state(tuned)
    state, message = train.initialize_from(tuned, new)
    assert message.startswith('Initialised from'), message
    for tree in (state.params, state.ema_params):
      got = {f'{m}/{n}': v for m, d in tree.items() for n, v in d.items()}
      assert got.keys() == flat.keys()
      for key, value in flat.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)
    assert _max_difference(state.opt_state, new.opt_state) == 0
    assert int(state.step) == 0
  workdir = str(tmp_path / 'tuned')
  assert train.train_and_evaluate(tuned, workdir)['step'] == 2
  tuned.train.init_checkpoint = os.path.join(str(tmp_path), 'tensorboard')
  with pytest.raises(
      FileNotFoundError, match='train.init_checkpoint=.* not a run of this'
  ):
    train.initialize_from(tuned, new)
  # Resumed, a run keeps its own weights: init_checkpoint is not read.
  tuned.train.init_checkpoint = str(tmp_path / 'missing')
  assert train.train_and_evaluate(tuned, workdir)['step'] == 2


def test_merge_initial_keeps_excluded_and_names_what_does_not_fit():
  fresh = {
      'net/~/conv': {'w': np.zeros((3, 3), np.float32)},
      'net/~/linear': {'w': np.zeros((3, 4), np.float32)},
  }
  loaded = {
      'net/~/conv': {'w': np.ones((3, 3), np.float64)},
      'net/~/linear': {'w': np.ones((3, 10), np.float32)},
  }
  with pytest.raises(
      ValueError,
      match=r'\(src\): net/~/linear/w has shape \(3, 10\), the model expects'
      r' \(3, 4\)\. .*init_exclude',
  ):
    train.merge_initial(fresh, loaded, None, 'src')
  merged, kept = train.merge_initial(fresh, loaded, 'linear/', 'src')
  assert kept == ['net/~/linear/w']
  np.testing.assert_array_equal(merged['net/~/conv']['w'], 1.0)
  assert merged['net/~/conv']['w'].dtype == np.float32
  np.testing.assert_array_equal(merged['net/~/linear']['w'], 0.0)
  with pytest.raises(ValueError, match=r'missing parameter net/~/conv/w'):
    train.merge_initial(
        fresh, {'net/~/linear': loaded['net/~/linear']}, 'linear/', 'src'
    )
  extra = dict(loaded, **{'net/~/head': {'b': np.ones(2)}})
  with pytest.raises(ValueError, match='unexpected parameter net/~/head/b'):
    train.merge_initial(fresh, extra, 'linear/', 'src')


def test_init_exclude_needs_a_source_and_a_regular_expression():
  config = tiny_config.get_config(2)
  config.train.init_exclude = 'linear/'
  with pytest.raises(ValueError, match='init_checkpoint .* is not'):
    train.prepare(config)
  config.train.init_checkpoint = 'F0_haiku.npz'
  config.train.init_exclude = '('
  with pytest.raises(ValueError, match='not a regular expression'):
    train.prepare(config)


def test_sigterm_then_relaunch_equals_uninterrupted_bitwise(
    uninterrupted, tmp_path
):
  workdir = str(tmp_path)
  proc = _start(workdir, 40)
  _wait_for_step(workdir, 15, proc)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  assert 'Preempted at step' in out
  stopped = max(r['step'] for r in _metrics(workdir))
  assert stopped < 40

  _relaunch_and_match(workdir, uninterrupted, f'step {stopped}')


def test_sigkill_then_relaunch_resumes_from_last_checkpoint(
    uninterrupted, tmp_path
):
  workdir = str(tmp_path)
  proc = _start(workdir, 40)
  _wait_for_step(workdir, 10, proc)
  proc.kill()
  proc.communicate()
  assert _saved_steps(workdir), 'no checkpoint was written before the kill'
  _relaunch_and_match(workdir, uninterrupted, 'step')


def test_truncated_latest_checkpoint_falls_back_to_previous(tmp_path):
  workdir = str(tmp_path)
  train.train_and_evaluate(tiny_config.get_config(8), workdir)
  latest = os.path.join(workdir, 'checkpoints', '8')
  files = [
      p
      for p in glob.glob(os.path.join(latest, '**', '*'), recursive=True)
      if os.path.isfile(p)
  ]
  largest = max(files, key=os.path.getsize)
  with open(largest, 'r+b') as f:
    f.truncate(os.path.getsize(largest) // 3)
  cut_size = os.path.getsize(largest)
  # The same kill cut metrics.jsonl's last line short.
  with open(os.path.join(workdir, 'metrics.jsonl'), 'a') as f:
    f.write('{"step": 9, "train_lo')
  result = _run(workdir, 12, devices=1)
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'checkpoint 8' in result.stdout and 'unreadable' in result.stdout
  assert 'Resumed from the checkpoint of step 4' in result.stdout
  assert 'dropped 1 line of' in result.stdout
  steps = [r['step'] for r in _metrics(workdir) if 'train_loss' in r]
  assert steps == list(range(1, 13))  # every line JSON, no step twice
  # One warning, not a traceback per array from the failed restore's reads.
  assert 'Traceback' not in result.stderr, result.stderr[-2000:]
  # Step 8 was set aside, not counted as saved: the run wrote it again.
  aside = os.path.join(workdir, 'checkpoints', '8.unreadable')
  assert f'Moved the unreadable checkpoint 8 aside, to {aside}' in (
      result.stdout
  )
  # Its files are kept there as they were.
  assert os.path.getsize(largest.replace(latest, aside)) == cut_size
  assert _saved_steps(workdir) == [4, 8, 12]
  checkpointer = checkpoint.TrainCheckpointer(workdir, keep=5)
  restored, step = checkpointer.restore_latest(None, step=8)
  checkpointer.close()
  assert step == 8 and restored['step'] == 8


def test_a_workdir_with_no_readable_checkpoint_is_left_as_it_is(tmp_path):
  workdir = str(tmp_path)
  train.train_and_evaluate(tiny_config.get_config(8), workdir)
  for path in glob.glob(
      os.path.join(workdir, 'checkpoints', '*', '**', '_METADATA'),
      recursive=True,
  ):
    with open(path, 'r+b') as f:
      f.truncate(5)
  before = {
      p: open(p, 'rb').read()
      for p in glob.glob(os.path.join(workdir, '**', '*'), recursive=True)
      if os.path.isfile(p)
  }
  result = _run(workdir, 12, devices=1)
  assert result.returncode != 0
  assert result.stderr.strip().splitlines()[-1] == (
      f'error: No checkpoint in {workdir}/checkpoints can be read (steps 8,'
      ' 4), and starting afresh there would delete them; move that folder'
      ' aside to train this run again from step 0, or give another'
      ' --workdir.'
  )
  after = {
      p: open(p, 'rb').read()
      for p in glob.glob(os.path.join(workdir, '**', '*'), recursive=True)
      if os.path.isfile(p)
  }
  assert after == before  # metrics, config and checkpoints untouched


def test_logger_keeps_the_restored_steps_and_drops_a_cut_line(tmp_path, capsys):
  path = tmp_path / 'metrics.jsonl'
  lines = [json.dumps({'step': s, 'train_loss': 1.0 / s}) for s in (1, 2, 3)]
  path.write_text('\n'.join(lines) + '\n{"step": 4, "tra')
  train._Logger(str(tmp_path), resume_step=2, enabled=True)
  assert path.read_text() == '\n'.join(lines[:2]) + '\n'
  assert 'dropped 1 line of' in capsys.readouterr().out


def _fake_gcs(store):
  """Mocks epath so that gs://... reads and writes land under `store`."""

  def local(path):
    path = os.fspath(path)
    if path.startswith('gs://'):
      return os.path.join(store, path[len('gs://') :])
    return path

  def one(fn, path, *args, **kwargs):
    return fn(local(path), *args, **kwargs)

  def two(fn, path, destination, *args, **kwargs):
    return fn(local(path), local(destination), *args, **kwargs)

  @contextlib.contextmanager
  def open_in_context(fn, path, mode):
    with fn(path, mode) as f:
      yield f

  def open_(fn, path, mode):
    # As epath's TensorFlow backend, which serves gs:// for real: the file
    # comes out of a context manager, not as the call's value.
    if os.fspath(path).startswith('gs://'):
      return open_in_context(fn, local(path), mode)
    return fn(path, mode)

  names = ('exists', 'glob', 'isdir', 'listdir', 'makedirs', 'mkdir')
  names += ('remove', 'rmtree', 'stat', 'walk')
  mocks = {name: one for name in names}
  mocks.update(open=open_, copy=two, rename=two, replace=two)
  return epath.testing.mock_epath(**mocks), local


def test_a_gs_workdir_gets_every_file_through_epath(tmp_path, monkeypatch):
  # A file written with open() would land in a local folder named 'gs:'.
  monkeypatch.chdir(tmp_path)
  mock, local = _fake_gcs(str(tmp_path / 'store'))
  # With TensorFlow installed, epath sends gs:// to tf.io.gfile whatever
  # mock_epath says; without it, to the mocked backend.
  monkeypatch.setattr(epath.gpath, '_is_tf_installed', lambda: False)

  class Checkpointer(checkpoint.TrainCheckpointer):
    # Orbax writes array data with TensorStore, which epath cannot redirect.
    def __init__(self, workdir, keep=3):
      super().__init__(local(workdir), keep)

  monkeypatch.setattr(checkpoint, 'TrainCheckpointer', Checkpointer)
  workdir = 'gs://bucket/run'
  with mock:
    train.train_and_evaluate(tiny_config.get_config(4), workdir)
    result = train.train_and_evaluate(tiny_config.get_config(6), workdir)
  assert result['step'] == 6
  assert not (tmp_path / 'gs:').exists()
  run = tmp_path / 'store' / 'bucket' / 'run'
  steps = [
      json.loads(line)['step']
      for line in (run / 'metrics.jsonl').read_text().splitlines()
  ]
  # Steps 1-4, the eval at 4, then (resumed) 5-6 and the eval at 6.
  assert steps == [1, 2, 3, 4, 4, 5, 6, 6]
  assert json.loads((run / 'config.json').read_text())['steps']['total'] == 6
  assert (run / 'curves.png').read_bytes().startswith(b'\x89PNG')
  assert len(list((run / 'tensorboard').glob('events.out.tfevents.*'))) == 2
  assert checkpoint.TrainCheckpointer(str(run)).all_steps() == [4, 6]


def test_a_workdir_that_is_a_file_is_an_error_naming_it(tmp_path):
  path = tmp_path / 'notes.txt'
  path.write_text('keep me')
  with pytest.raises(ValueError, match=r'notes\.txt cannot be made a folder'):
    train.train_and_evaluate(tiny_config.get_config(2), str(path))
  assert path.read_text() == 'keep me'


def test_resuming_with_another_model_is_an_error_that_keeps_the_run(tmp_path):
  workdir = str(tmp_path)
  train.train_and_evaluate(tiny_config.get_config(8), workdir)
  checkpoints = checkpoint.TrainCheckpointer(workdir).all_steps()
  files = ('config.json', 'metrics.jsonl')
  before = {n: (tmp_path / n).read_bytes() for n in files}
  wider = tiny_config.get_config(12)
  wider.model.overrides.width = 0.5
  with pytest.raises(
      checkpoint.CheckpointMismatchError,
      match=r'Checkpoint 8 .* shape .*config\.json differs in model\.overrides',
  ):
    train.train_and_evaluate(wider, workdir)
  with pytest.raises(
      checkpoint.CheckpointMismatchError,
      match=r'model or class count\. .*differs in model\.overrides.*Evaluate'
      r' it with the config',
  ):
    train.evaluate_checkpoint(wider, workdir)
  adam = tiny_config.get_config(12)
  adam.optimizer.name = 'adam'
  with pytest.raises(
      checkpoint.CheckpointMismatchError,
      match=r'arrays are saved, this config has .*optimizer\.name',
  ):
    train.train_and_evaluate(adam, workdir)
  assert checkpoint.TrainCheckpointer(workdir).all_steps() == checkpoints
  assert {n: (tmp_path / n).read_bytes() for n in files} == before
  # The run itself still resumes.
  result = train.train_and_evaluate(tiny_config.get_config(12), workdir)
  assert result['step'] == 12


def test_evaluating_a_workdir_without_checkpoints_creates_nothing(tmp_path):
  workdir = tmp_path / 'mistyped'
  with pytest.raises(FileNotFoundError, match='No checkpoint in .*mistyped'):
    train.evaluate_checkpoint(tiny_config.get_config(2), str(workdir))
  assert not workdir.exists()


def test_absurd_learning_rate_stops_naming_the_step(tmp_path):
  workdir = str(tmp_path)
  result = _run(
      workdir,
      30,
      '--config.optimizer.base_lr=1e8',
      '--config.optimizer.agc.clipping=0',
      '--config.train.checkpoint_every_steps=1',
  )
  assert result.returncode != 0
  error = [l for l in result.stderr.splitlines() if l.startswith('error:')]
  assert len(error) == 1 and 'at step' in error[0], result.stderr[-2000:]
  # The step the log would have shown next (it logs every step here).
  logged = [r['step'] for r in _metrics(workdir) if 'train_loss' in r]
  assert f'at step {logged[-1] + 1}:' in error[0], (logged, error)
  checkpointer = checkpoint.TrainCheckpointer(workdir)
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  for step in checkpointer.all_steps():
    tree = ocp.StandardCheckpointer().restore(
        os.path.join(workdir, 'checkpoints', str(step), 'default')
    )
    for leaf in jax.tree_util.tree_leaves(tree):
      leaf = np.asarray(leaf)
      if np.issubdtype(leaf.dtype, np.floating):
        assert np.all(np.isfinite(leaf)), step
  checkpointer.close()


def _start_processes(workdir, steps, count=2):
  """Launches one run as `count` processes of 8 / `count` devices each."""
  commands, env = [], None
  for flags in processes.process_flags(count):
    command, env = _cli(workdir, steps, *flags, devices=8 // count)
    commands.append(command)
  return processes.start(commands, env=env, cwd=REPO)


def test_two_processes_train_like_one_with_all_devices(tmp_path):
  single = str(tmp_path / 'single')
  result = _run(single, 5)
  assert result.returncode == 0, result.stderr[-3000:]
  multi = str(tmp_path / 'multi')
  processes.finish(_start_processes(multi, 5))
  _, params_1 = _final_params(single)
  step, params_2 = _final_params(multi)
  assert step == 5
  for key in params_1:
    np.testing.assert_allclose(
        params_1[key], params_2[key], rtol=1e-5, atol=1e-6, err_msg=key
    )


def _signal_one_process(workdir, signum, rank):
  """Signals process `rank` of a 2-process run at step 15; (stopped, outs)."""
  procs = _start_processes(workdir, 40)
  _wait_for_step(workdir, 15, procs[0])
  procs[rank].send_signal(signum)
  # Before the fix the processes stopped at their own steps and waited for
  # each other forever (one in the checkpoint's barrier, one in the step's
  # all-reduce): the timeout fails the test.
  outs = processes.finish(procs, timeout=180)
  (stopped,) = re.findall(r'Preempted at step (\d+)', outs[0][0])
  stopped = int(stopped)
  assert 15 <= stopped < 40
  assert f'Process 1: saved step {stopped} with the others' in outs[1][0]
  assert _saved_steps(workdir)[-1] == stopped
  return stopped, outs


def test_sigterm_to_one_process_stops_all_at_one_step_then_resumes(tmp_path):
  workdir = str(tmp_path)
  stopped, _ = _signal_one_process(workdir, signal.SIGTERM, rank=1)
  (out, _), _ = processes.finish(_start_processes(workdir, 40))
  assert f'Resumed from the checkpoint of step {stopped}' in out
  records = _metrics(workdir)
  steps = [r['step'] for r in records if 'train_loss' in r]
  assert steps == list(range(1, 41))  # continuous, no duplicates
  assert records[-1]['step'] == 40 and records[-1]['eval_count'] == 360


def _wait_for_path(path, procs, timeout=300):
  deadline = time.time() + timeout
  while not os.path.exists(path):
    for proc in procs:
      assert proc.poll() is None, proc.communicate()
    assert time.time() < deadline, f'{path} did not appear'
    time.sleep(0.02)


def test_ctrl_c_while_starting_stops_every_process_after_step_one(tmp_path):
  # The workdir is made after the run starts listening, before it compiles.
  workdir = str(tmp_path / 'run')
  procs = _start_processes(workdir, 40)
  _wait_for_path(workdir, procs)
  procs[0].send_signal(signal.SIGINT)
  (out, _), (out_1, _) = processes.finish(procs, timeout=180)
  assert 'Received signal 2: passing it on to every process.' in out
  assert 'Preempted at step 1:' in out
  assert 'Process 1: saved step 1 with the others' in out_1
  assert _saved_steps(workdir) == [1]


def test_ctrl_c_while_the_trainer_loads_stops_every_process(tmp_path):
  # Between jax.distributed's start and the trainer's first question: the
  # import of the trainer (TensorFlow, Haiku) takes seconds.
  driver = tmp_path / 'driver.py'
  driver.write_text(textwrap.dedent(f"""\
      import importlib.abc, os, runpy, signal, sys, time

      class Interrupt(importlib.abc.MetaPathFinder):

        def find_spec(self, name, path, target=None):
          if name == 'nfnets.train':
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
          return None

      if '--process_id=1' in sys.argv:
        sys.meta_path.insert(0, Interrupt())
      sys.path.insert(0, {REPO!r})
      sys.argv = ['experiment.py', *sys.argv[1:]]
      experiment = {os.path.join(REPO, 'experiment.py')!r}
      runpy.run_path(experiment, run_name='__main__')
  """))
  workdir = str(tmp_path / 'run')
  commands, env = [], None
  for flags in processes.process_flags(2):
    command, env = _cli(workdir, 40, *flags, devices=4)
    commands.append([sys.executable, str(driver), *command[2:]])
  procs = processes.start(commands, env=env, cwd=REPO)
  (out, _), (out_1, _) = processes.finish(procs, timeout=200)
  assert 'Received signal 2: passing it on to every process.' in out_1
  assert 'Preempted at step 1:' in out
  assert _saved_steps(workdir) == [1]


def test_sigterm_while_starting_stops_a_one_process_distributed_run(
    tmp_path,
):
  # jax.distributed's handler holds SIGTERM from the start, even for one
  # process (launch_tpu.sh on a one-host TPU VM): the run must stop.
  workdir = str(tmp_path / 'run')
  procs = _start_processes(workdir, 40, count=1)
  _wait_for_path(workdir, procs)
  procs[0].send_signal(signal.SIGTERM)
  ((out, _),) = processes.finish(procs, timeout=180)
  assert 'Preempted at step 1:' in out
  assert _saved_steps(workdir) == [1]


@pytest.mark.parametrize(
    'signum, returncode',
    [(signal.SIGTERM, -signal.SIGTERM), (signal.SIGINT, 130)],
)
def test_a_signal_ends_an_evaluation_under_jax_distributed(
    uninterrupted, signum, returncode
):
  # Nothing to save there: it ends, as without jax.distributed.
  (flags,) = processes.process_flags(1)
  cmd, env = _cli(uninterrupted, 40, '--mode=eval', *flags)
  env['PYTHONUNBUFFERED'] = '1'
  (proc,) = processes.start([cmd], env=env, cwd=REPO)
  try:
    for line in proc.stdout:
      if line.startswith('Evaluating the checkpoint of step 40'):
        proc.send_signal(signum)
        break
    rest = proc.communicate(timeout=120)[0]
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.communicate()
  assert proc.returncode == returncode, rest
  assert 'eval_top1' not in rest


def _run_distributed_script(tmp_path, body):
  """Runs `body` in a fresh Python after jax.distributed starts (1 process)."""
  (flags,) = processes.process_flags(1)
  code = textwrap.dedent(f"""\
      import os, signal, sys, time
      sys.path.insert(0, {os.path.join(REPO, 'tests')!r})
      from absl import flags
      from nfnets import cli
      cli.define_process_flags()
      flags.FLAGS(['x', *{flags!r}])
      cli.initialize_processes()
  """) + textwrap.dedent(body)
  return processes.python(code, REPO)


def test_a_signal_before_the_trainer_loads_stops_this_and_later_runs(
    tmp_path,
):
  # The service hears from the moment jax.distributed starts; it answers one
  # notice per process, so a second run here stops too, and says why.
  result = _run_distributed_script(
      tmp_path,
      f"""\
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(1)
      from nfnets import train
      import tiny_config
      for name in 'ab':
        workdir = os.path.join({str(tmp_path)!r}, name)
        result = train.train_and_evaluate(tiny_config.get_config(10), workdir)
        print('result', name, result['step'], result['preempted'], flush=True)
      """,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  assert 'result a 1 True' in out and 'result b 1 True' in out, out
  assert out.count('A signal came before this run began') == 2


def test_ctrl_c_in_the_final_evaluation_interrupts_under_jax_distributed(
    tmp_path,
):
  # After the loop nothing asks the service: Ctrl-C must interrupt again.
  result = _run_distributed_script(
      tmp_path,
      f"""\
      from nfnets import train
      import tiny_config
      original = train.evaluate

      def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)
        return original(*args, **kwargs)

      train.evaluate = interrupted
      workdir = os.path.join({str(tmp_path)!r}, 'run')
      try:
        train.train_and_evaluate(tiny_config.get_config(2), workdir)
      except KeyboardInterrupt:
        print('interrupted', flush=True)
      """,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'interrupted' in result.stdout.splitlines()
  assert 'passing it on' not in result.stdout


def test_coordinator_auto_outside_a_cluster_is_a_one_line_error(tmp_path):
  cmd, env = _cli(str(tmp_path / 'run'), 2, '--coordinator_address=auto')
  # No cluster for JAX to find, whatever machine runs the tests.
  cluster = ('SLURM_', 'OMPI_', 'KUBERNETES_', 'TPU_', 'MEGASCALE_')
  env = {k: v for k, v in env.items() if not k.startswith(cluster)}
  result = subprocess.run(
      cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300
  )
  assert result.returncode == 1
  (line,) = [l for l in result.stderr.splitlines() if l.startswith('error:')]
  assert '--coordinator_address=auto found no cluster' in line
  assert not (tmp_path / 'run').exists()


def test_coordinator_auto_takes_both_process_flags_or_neither(tmp_path):
  result = _run(
      str(tmp_path), 2, '--coordinator_address=auto', '--num_processes=2'
  )
  assert result.returncode != 0
  assert 'go together' in result.stderr and 'process_id' in result.stderr


def test_several_processes_without_jax_distributed_are_refused(monkeypatch):
  # Nothing could make them stop at one step on a preemption.
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  with pytest.raises(ValueError, match='--coordinator_address=auto') as e:
    train.train_and_evaluate(tiny_config.get_config(2), '/nonexistent/run')
  assert 'jax.distributed is not initialized' in str(e.value)
  assert '\n' not in str(e.value)


def _uint8_batch(seed, devices=8, per_device=4, size=16):
  rng = np.random.default_rng(seed)
  return {
      'images': rng.integers(
          0, 256, (devices, per_device, size, size, 3), np.uint8
      ),
      'labels': rng.integers(0, 10, (devices, per_device), np.int32),
  }


def test_device_augment_depends_only_on_seed_step_and_device():
  from nfnets.data import testing  # pylint: disable=g-import-not-at-top

  cfg = testing.config(name='folder:/unused', augment_on='device')
  assert train.make_device_augment(testing.config(), 0) is None  # digits
  assert (
      train.make_device_augment(
          testing.config(name='folder:/unused', augment_on='host'), 0
      )
      is None
  )
  augment = train.make_device_augment(cfg, seed=0)
  batch = _uint8_batch(0)
  # Every device holds the same images: only the device's key tells them
  # apart.
  batch['images'][:] = batch['images'][:1]
  batch['labels'][:] = batch['labels'][:1]
  out = jax.tree_util.tree_map(np.asarray, augment(batch, 3))
  assert set(out) == {'images', 'labels', 'labels2', 'mix_ratio'}
  assert out['images'].shape == (8, 4, 16, 16, 3)
  assert out['images'].dtype == np.float32
  assert np.isfinite(out['images']).all()
  assert out['mix_ratio'].shape == (8, 4)
  again = jax.tree_util.tree_map(np.asarray, augment(batch, 3))
  for key in out:
    np.testing.assert_array_equal(out[key], again[key])
  later = np.asarray(augment(batch, 4)['images'])
  assert not np.array_equal(later, out['images'])
  assert not np.array_equal(out['images'][0], out['images'][1])
  other_seed = train.make_device_augment(cfg, seed=1)
  assert not np.array_equal(
      np.asarray(other_seed(batch, 3)['images']), out['images']
  )


def test_image_folder_trains_with_augmentations_on_the_device(tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  for split, count in (('train', 12), ('val', 4)):
    for label in range(3):
      directory = tmp_path / 'images' / split / f'class_{label}'
      directory.mkdir(parents=True)
      for i in range(count):
        size = tuple(rng.integers(18, 40, 2))
        pixels = rng.integers(0, 256, size + (3,), np.uint8)
        pixels[..., label] = 255  # the class is the saturated channel
        Image.fromarray(pixels).save(directory / f'{i}.jpg')
  config = tiny_config.get_config(3)
  config.data.name = f'folder:{tmp_path / "images"}'
  config.data.eval_split = 'val'
  config.data.augment_on = 'device'
  config.data.randaugment_layers = 2
  config.data.randaugment_magnitude = 10
  config.data.mixup_alpha = 0.2
  config.data.cutmix = True
  config.train.batch_size = 16
  config.eval.batch_size = 16
  workdir = str(tmp_path / 'workdir')
  result = train.train_and_evaluate(config, workdir)
  assert result['step'] == 3
  assert np.isfinite(result['train_loss'])
  assert result['eval_count'] == 12
  # Eval images came as uint8 and were normalised by the eval step: the
  # same numbers as normalising them in tf.data.
  config.data.augment_on = 'host'
  on_host = train.evaluate_checkpoint(config, workdir)
  assert on_host['eval_count'] == 12
  assert on_host['eval_top1'] == result['eval_top1']
  assert on_host['eval_loss'] == pytest.approx(result['eval_loss'], rel=1e-5)


def test_prefetch_to_devices_keeps_order_and_reads_only_size_ahead():
  pulled = []

  def host_batches():
    for i in range(5):
      pulled.append(i)
      yield {'x': np.full((8, 2), i, np.float32)}

  batches = train.prefetch_to_devices(host_batches(), 2)
  first = next(batches)
  assert pulled == [0, 1, 2]  # the step's batch and two ahead
  assert isinstance(first['x'], jax.Array)
  assert len(first['x'].addressable_shards) == 8  # one row per device
  rest = list(batches)
  for i, batch in enumerate([first] + rest):
    np.testing.assert_array_equal(np.asarray(batch['x']), np.full((8, 2), i))
  # 0 turns it off; a negative or non-int size is a one-line error.
  host = {'x': np.zeros((8, 2))}
  assert next(train.prefetch_to_devices(iter([host]), 0)) is host
  for bad in (-1, 1.5, True):
    with pytest.raises(ValueError, match='device_prefetch'):
      train.prefetch_to_devices(iter([]), bad)


def _step_setup(config):
  """(step kwargs, host state, num_classes) for a config, as the runner's."""
  config, num_classes = train.prepare(config)
  forward = train.create_model(config, num_classes)
  optimizer, lr_fn = train.optimizer_and_schedule(config)
  kwargs = train.step_kwargs(
      config,
      forward=forward,
      optimizer=optimizer,
      lr_fn=lr_fn,
      num_classes=num_classes,
  )
  state = train.create_train_state(
      jax.random.PRNGKey(0),
      forward,
      optimizer,
      config.data.train_image_size,
      train.initial_loss_scale(config),
  )
  return kwargs, jax.tree_util.tree_map(np.asarray, state), num_classes


def test_step_kwargs_read_the_config_and_reject_unknown_overrides():
  config = tiny_config.get_config(3)
  config.optimizer.ema_decay = 0.5
  config.train.label_smoothing = 0.2
  kwargs, _, _ = _step_setup(config)
  assert set(kwargs) == set(inspect.signature(train.train_step).parameters) - {
      'state',
      'batch',
  }
  assert kwargs['ema_decay'] == 0.5 and kwargs['label_smoothing'] == 0.2
  assert kwargs['with_metrics']
  config, _ = train.prepare(tiny_config.get_config(3))
  common = dict(forward=None, optimizer=None, lr_fn=None, num_classes=10)
  off = train.step_kwargs(config, **common, ema_decay=None, with_metrics=False)
  assert off['ema_decay'] is None and not off['with_metrics']
  with pytest.raises(TypeError, match='ema_decy'):
    train.step_kwargs(config, **common, ema_decy=None)


def test_model_overrides_the_model_refuses_are_one_line_errors():
  config, num_classes = train.prepare(tiny_config.get_config(3))
  config.unlock()
  config.model.overrides.depth = (1, 1, 1, 1, 1)  # NF-ResNets have four
  with pytest.raises(ValueError, match=r'^model\.overrides: depth .* 5 stages'):
    train.create_model(config, num_classes)


def test_make_device_step_binds_the_config_and_its_kernel_layout():
  config, _ = train.prepare(tiny_config.get_config(3))
  common = dict(forward=None, optimizer=None, lr_fn=None, num_classes=10)
  step = train.make_device_step(config, **common, with_metrics=False)
  assert step.func is train.device_train_step
  assert step.keywords == dict(
      train.step_kwargs(config, **common, with_metrics=False),
      kernel_layout=config.train.kernel_layout,
  )
  ohwi = train.make_device_step(config, **common, kernel_layout='ohwi')
  assert ohwi.keywords['kernel_layout'] == 'ohwi'
  # 'auto' is for configs; a step needs the layout it was resolved to.
  with pytest.raises(ValueError, match='kernel_layout'):
    train.make_device_step(config, **common, kernel_layout='auto')
  with pytest.raises(TypeError, match='ema_decy'):
    train.make_device_step(config, **common, ema_decy=None)


def _steps_with_loss_scale(n, init, period=2000, images=0.5, dtype=None):
  """`n` pmapped steps of the tiny config; (states after each, metrics)."""
  config = tiny_config.get_config(3)
  config.train.loss_scale = 'dynamic' if init else 'none'
  config.train.loss_scale_init = float(init or 1)
  config.train.loss_scale_period = period
  config.optimizer.warmup_epochs = 0  # so that the first step moves
  if dtype:
    config.train.compute_dtype = dtype
  kwargs, state, _ = _step_setup(config)
  devices = jax.local_device_count()
  batch = {
      'images': np.full((devices, 2, 16, 16, 3), images, np.float32),
      'labels': np.zeros((devices, 2), np.int32),
      'labels2': np.zeros((devices, 2), np.int32),
      'mix_ratio': np.ones((devices, 2), np.float32),
  }
  step = jax.pmap(
      functools.partial(train.train_step, **kwargs), axis_name=train.AXIS_NAME
  )
  replicated, states, metrics = train.replicate(state), [state], []
  for _ in range(n):
    replicated, m = step(replicated, batch)
    states.append(train.unreplicate(replicated))
    metrics.append({k: float(np.asarray(v)[0]) for k, v in m.items()})
  return states, metrics


def _max_difference(a, b):
  return max(
      float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
      for x, y in zip(
          jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
      )
  )


def test_loss_scale_is_dynamic_for_float16_only():
  for dtype, want in (
      ('float16', 'dynamic'),
      ('bfloat16', 'none'),
      ('float32', 'none'),
  ):
    config = tiny_config.get_config(3)
    config.train.compute_dtype = dtype
    config, _ = train.prepare(config)
    assert config.train.loss_scale == want, dtype
    assert train.initial_loss_scale(config) == (
        2.0**15 if want == 'dynamic' else None
    )
  config = tiny_config.get_config(3)
  config.train.loss_scale = 'static'
  with pytest.raises(ValueError, match='train.loss_scale must be one of'):
    train.prepare(config)


def test_loss_scaled_step_updates_as_the_unscaled_one():
  (_, plain), _ = _steps_with_loss_scale(1, None)
  (start, scaled), metrics = _steps_with_loss_scale(1, 2.0**10)
  # A power of two scales and unscales exactly, but for float32 rounding
  # inside the backward pass.
  assert _max_difference(plain.params, scaled.params) < 1e-6
  assert _max_difference(start.params, scaled.params) > 1e-4  # it moved
  assert metrics[0]['loss_scale'] == 2.0**10
  assert float(scaled.loss_scale['scale']) == 2.0**10
  assert int(scaled.loss_scale['counter']) == 1
  assert plain.loss_scale is None


def test_overflowing_scaled_gradients_skip_the_step_and_halve_the_scale():
  # 3e38 times a loss of ~1.6 overflows float32: every gradient is inf/NaN.
  states, metrics = _steps_with_loss_scale(2, 3e38, dtype='float16')
  start, skipped, _ = states
  assert int(skipped.step) == 1
  assert int(skipped.nonfinite_step) == -1  # not a failure
  assert _max_difference(start.params, skipped.params) == 0
  assert _max_difference(start.opt_state, skipped.opt_state) == 0
  assert _max_difference(start.ema_params, skipped.ema_params) == 0
  assert metrics[0]['loss_scale'] == np.float32(3e38)
  assert np.isfinite(metrics[0]['train_loss'])
  assert float(skipped.loss_scale['scale']) == np.float32(1.5e38)
  assert int(skipped.loss_scale['counter']) == 0


def test_skipped_steps_log_the_rate_applied_and_no_update():
  # Both steps overflow and are skipped: optax's count stays at 0, so both
  # apply (and log) the schedule's first learning rate, and no update.
  states, metrics = _steps_with_loss_scale(2, 3e38, dtype='float16')
  for m in metrics:
    assert not np.isfinite(m['grad_norm'])
    assert m['update_norm'] == 0.0
    assert m['lr'] == metrics[0]['lr'] > 0
  assert int(optim.schedule_count(states[-1].opt_state)) == 0
  # Steps that apply their update move the count, and the rate with it.
  states, metrics = _steps_with_loss_scale(2, None)
  assert int(optim.schedule_count(states[-1].opt_state)) == 2
  assert 0 < metrics[1]['lr'] < metrics[0]['lr']  # cosine over 3 steps
  assert all(m['update_norm'] > 0 for m in metrics)


def test_loss_scale_doubles_after_a_period_of_finite_steps():
  states, metrics = _steps_with_loss_scale(3, 2.0**10, period=2)
  scales = [float(s.loss_scale['scale']) for s in states]
  counters = [int(s.loss_scale['counter']) for s in states]
  assert scales == [2.0**10, 2.0**10, 2.0**11, 2.0**11]
  assert counters == [0, 1, 0, 1]
  assert [m['loss_scale'] for m in metrics] == [2.0**10, 2.0**10, 2.0**11]


def test_non_finite_loss_under_loss_scaling_is_still_a_failure():
  states, _ = _steps_with_loss_scale(1, 2.0**10, images=np.nan)
  start, failed = states
  assert int(failed.nonfinite_step) == 0
  assert train._NONFINITE_METRICS[int(failed.nonfinite_metric)] == 'train_loss'
  assert _max_difference(start.params, failed.params) == 0


def test_float16_run_logs_checkpoints_and_resumes_its_loss_scale(tmp_path):
  workdir = str(tmp_path)
  flags = ('--config.train.compute_dtype=float16',)
  first = _run(workdir, 4, *flags, devices=2)
  assert first.returncode == 0, first.stderr[-3000:]
  assert 'float16 with a dynamic loss scale from 32768' in first.stdout
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  def saved_scale(step):
    tree = ocp.StandardCheckpointer().restore(
        os.path.join(workdir, 'checkpoints', str(step), 'default')
    )
    return float(tree['loss_scale']['scale'])

  def logged_scales():
    return {r['step']: r['loss_scale'] for r in _metrics(workdir) if 'lr' in r}

  scales = logged_scales()
  assert scales[1] == 2.0**15
  # Each step keeps or halves the scale (2,000 finite steps would double it).
  for step in (2, 3, 4):
    assert scales[step] in (scales[step - 1], scales[step - 1] / 2), scales
  assert saved_scale(4) in (scales[4], scales[4] / 2)
  resumed = _run(workdir, 6, *flags, devices=2)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'Resumed from the checkpoint of step 4' in resumed.stdout
  # The resumed run starts from the saved scale, not from loss_scale_init.
  assert logged_scales()[5] == saved_scale(4)
  # Evaluation reads the parameters only: in float32 and with another
  # optimizer, neither of which could resume this run.
  config = tiny_config.get_config(6)
  config.optimizer.name = 'adam'
  with pytest.raises(checkpoint.CheckpointMismatchError, match='arrays'):
    train.train_and_evaluate(config, workdir)
  config.eval.ema = True  # the tiny config's is off
  evaluated = train.evaluate_checkpoint(config, workdir)
  assert evaluated['eval_count'] == evaluated['ema_eval_count'] == 360


def test_train_step_refuses_a_loss_scale_without_its_state():
  config = tiny_config.get_config(3)
  kwargs, state, _ = _step_setup(config)
  with pytest.raises(ValueError, match='loss_scale_period'):
    jax.eval_shape(
        functools.partial(
            train.train_step, **{**kwargs, 'loss_scale_period': 5}
        ),
        state,
        {},
    )


def test_device_layout_keeps_kernels_ohwi_and_round_trips():
  _, state, _ = _step_setup(tiny_config.get_config(3))
  device = train.to_device_layout(state, 'ohwi')
  kernels = 0
  for field in ('params', 'opt_state', 'ema_params'):
    pairs = zip(
        jax.tree_util.tree_leaves(getattr(state, field)),
        jax.tree_util.tree_leaves(getattr(device, field)),
    )
    for before, after in pairs:
      if before.ndim == 4:
        kernels += 1
        h, w, i, o = before.shape
        assert after.shape == (o, h, w, i)
        assert after.flags['C_CONTIGUOUS']
        np.testing.assert_array_equal(after, before.transpose(3, 0, 1, 2))
      else:
        assert after is before
  assert kernels >= 3 * 5  # every conv's kernel, momentum and EMA
  back = train.from_device_layout(device, 'ohwi')
  equal = jax.tree_util.tree_map(np.array_equal, back, state)
  assert all(jax.tree_util.tree_leaves(equal))
  assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(
      state
  )
  assert train.to_device_layout(state, 'hwio') is state
  with pytest.raises(ValueError, match='auto'):
    train.to_device_layout(state, 'auto')  # resolved first, never in a step
  assert resolve.kernel_layout('auto', 'gpu') == 'ohwi'
  assert resolve.kernel_layout('auto', 'cpu') == 'hwio'


@pytest.fixture(scope='module')
def two_steps():
  """Two pmapped steps of `train_step` and of `device_train_step` ('ohwi').

  For each: `(state before the second step, state after it, its metrics)`,
  on the host and HWIO. Shared: each costs a compile.
  """
  kwargs, state, num_classes = _step_setup(tiny_config.get_config(3))
  n = jax.local_device_count()
  rng = np.random.default_rng(0)
  batch = train.to_devices(
      {
          'images': rng.standard_normal((n, 2, 16, 16, 3), np.float32),
          'labels': rng.integers(0, num_classes, (n, 2), np.int32),
          'labels2': rng.integers(0, num_classes, (n, 2), np.int32),
          'mix_ratio': rng.uniform(0.5, 1.0, (n, 2)).astype(np.float32),
      }
  )
  results = {}
  for name, fn, layout, with_metrics in (
      ('hwio', train.train_step, 'hwio', True),
      (
          'ohwi',
          functools.partial(train.device_train_step, kernel_layout='ohwi'),
          'ohwi',
          True,
      ),
      ('quiet', train.train_step, 'hwio', False),  # a step that is not logged
  ):
    p_step = jax.pmap(
        functools.partial(fn, **{**kwargs, 'with_metrics': with_metrics}),
        axis_name=train.AXIS_NAME,
    )
    replicated = train.replicate(train.to_device_layout(state, layout))
    for _ in range(2):
      before = replicated
      replicated, metrics = p_step(replicated, batch)
    results[name] = tuple(
        train.from_device_layout(train.unreplicate(r), layout)
        for r in (before, replicated)
    ) + (train.unreplicate(metrics),)
  return results


def test_device_train_step_is_train_step_in_the_device_layout(two_steps):
  (_, a, metrics_a), (_, b, metrics_b) = two_steps['hwio'], two_steps['ohwi']
  assert int(a.step) == int(b.step) == 2
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
  for key in metrics_a:
    np.testing.assert_allclose(metrics_a[key], metrics_b[key], rtol=1e-6)


def test_a_step_without_the_logged_norms_updates_the_state_alike(two_steps):
  (_, logged, metrics), (_, quiet, quiet_metrics) = (
      two_steps['hwio'],
      two_steps['quiet'],
  )
  pairs = zip(
      jax.tree_util.tree_leaves(logged), jax.tree_util.tree_leaves(quiet)
  )
  for x, y in pairs:
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
  assert set(metrics) - set(quiet_metrics) == {
      'param_norm',
      'update_norm',
      'agc_clipped_fraction',
  }
  for key in quiet_metrics:
    np.testing.assert_allclose(metrics[key], quiet_metrics[key], rtol=1e-6)


def _norm(tree):
  leaves = jax.tree_util.tree_leaves(tree)
  return np.sqrt(sum(np.sum(np.square(np.float64(x))) for x in leaves))


def test_logged_param_norm_is_of_the_params_the_step_started_from(two_steps):
  before, after, metrics = two_steps['hwio']
  assert int(before.step) == 1  # the second step: its start moved already
  want = _norm(before.params)
  np.testing.assert_allclose(metrics['param_norm'], want, rtol=1e-6)
  # The step moves the norm by more than the tolerance: the test can fail.
  assert abs(_norm(after.params) - want) > 1e-5 * want
  assert float(metrics['update_norm']) > 0


def test_logger_writes_strict_json_with_non_finite_values_as_null(tmp_path):
  def refuse(constant):
    raise ValueError(f'not JSON: {constant}')

  path = tmp_path / 'metrics.jsonl'
  # A line an older version wrote, kept on resume, is rewritten strictly.
  path.write_text('{"step": 1, "grad_norm": Infinity}\n')
  logger = train._Logger(str(tmp_path), resume_step=1, enabled=True)
  logger.write(
      dict(step=2, train_loss=np.float32(0.5), grad_norm=np.float32(np.inf))
  )
  logger.write(dict(step=3, train_loss=0.25, grad_norm=float('nan')))
  logger.close()
  lines = path.read_text().splitlines()
  records = [json.loads(l, parse_constant=refuse) for l in lines]
  assert records == [
      {'step': 1, 'grad_norm': None},
      {'step': 2, 'train_loss': 0.5, 'grad_norm': None},
      {'step': 3, 'train_loss': 0.25, 'grad_norm': None},
  ]


def test_runner_computes_the_logged_norms_on_log_steps_only(
    tmp_path, monkeypatch
):
  built = train.make_device_step
  seen = {True: set(), False: set()}

  def spying_builder(*args, with_metrics, **kwargs):
    step_fn = built(*args, with_metrics=with_metrics, **kwargs)

    def spied(state, batch):
      jax.debug.callback(
          lambda s: seen[with_metrics].add(int(s)), state.step, ordered=False
      )
      return step_fn(state, batch)

    return spied

  monkeypatch.setattr(train, 'make_device_step', spying_builder)
  config = tiny_config.get_config(5)
  config.train.log_every_steps = 2
  train.train_and_evaluate(config, str(tmp_path))
  # Steps 2, 4 and the last (5) are logged: 0-based 1, 3 and 4.
  assert seen == {True: {1, 3, 4}, False: {0, 2}}
  records = [r for r in _metrics(str(tmp_path)) if 'train_loss' in r]
  assert [r['step'] for r in records] == [2, 4, 5]
  for record in records:
    assert {'param_norm', 'update_norm', 'agc_clipped_fraction'} <= set(record)


def test_is_log_step():
  assert [s for s in range(1, 8) if train.is_log_step(s, 3, 7)] == [3, 6, 7]
  assert all(train.is_log_step(s, 1, 4) for s in range(1, 5))


@pytest.mark.parametrize(
    'field, value, message',
    [
        ('data.mixup_alpha', -1.0, 'data.mixup_alpha=-1.0 must be >= 0'),
        ('data.device_prefetch', -1, 'data.device_prefetch=-1 must be an int'),
        ('data.shuffle_buffer', 0, 'data.shuffle_buffer=0 must be an int'),
        ('data.augment_on', 'gpu', "data.augment_on='gpu' must be one of"),
        ('seed', -1, 'seed=-1 must be an int'),
        # JAX's keys keep 32 bits: 2**32 would draw as seed 0.
        ('seed', 2**32, 'seed=4294967296 must be an int in [0, 4294967296)'),
    ],
)
def test_a_refused_data_value_leaves_the_workdir_config_json(
    tmp_path, field, value, message
):
  # The runner replaces config.json once it knows the config can run; these
  # values used to be refused only by the input pipeline, after it.
  train._save_config(resolve.resolve(tiny_config.get_config(2)), tmp_path)
  before = (tmp_path / 'config.json').read_text()
  config = tiny_config.get_config(2)
  config.optimizer.base_lr = 0.7
  config.update_from_flattened_dict({field: value})
  with pytest.raises(ValueError, match=re.escape(message)):
    train.train_and_evaluate(config, str(tmp_path))
  assert (tmp_path / 'config.json').read_text() == before


@pytest.mark.parametrize('workdir', ['', '  '])
def test_an_empty_workdir_is_refused_writing_nothing(
    workdir, tmp_path, monkeypatch
):
  # '--workdir=' used to train into the current directory.
  monkeypatch.chdir(tmp_path)
  config = tiny_config.get_config(2)
  with pytest.raises(ValueError, match='The workdir is empty'):
    train.train_and_evaluate(config, workdir)
  with pytest.raises(ValueError, match='give --workdir a folder path'):
    train.evaluate_checkpoint(config, workdir)
  assert not os.listdir(tmp_path)


class _Exploit:

  def __reduce__(self):
    return (os.system, ('echo pwned',))


def test_a_bad_parameter_file_is_one_line(tmp_path):
  # A pickle that would run code, and a cut .npz: the user's files, so one
  # line each, not a traceback.
  evil = tmp_path / 'evil.pkl'
  evil.write_bytes(pickle.dumps({'NFNet/~/linear': {'w': _Exploit()}}))
  cut = tmp_path / 'cut.npz'
  np.savez(cut, **{'NFNet/~/linear/w': np.zeros((64, 64), np.float32)})
  cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
  for path, message in (
      (evil, 'refusing to load posix.system'),
      (cut, 'is not a readable .npz parameter file (corrupt or truncated?)'),
  ):
    result = _run(
        str(tmp_path / 'run'),
        2,
        '--mode=eval',
        f'--config.eval.checkpoint={path}',
        devices=1,
    )
    assert result.returncode == 1
    assert 'Traceback' not in result.stderr, result.stderr[-2000:]
    (line,) = [l for l in result.stderr.splitlines() if l.startswith('error')]
    assert message in line and str(path) in line, line
    assert 'pwned' not in result.stdout


def test_ctrl_c_outside_the_training_loop_is_one_line(tmp_path):
  # While the runner starts (imports, restores, compiles) a Ctrl-C used to
  # end in a traceback of whatever it interrupted.
  code = textwrap.dedent(f"""\
      import os, runpy, signal, sys, time
      from nfnets import train

      def starting(config, workdir):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(10)

      train.train_and_evaluate = starting
      sys.argv = ['experiment.py', '--config={REPO}/tests/tiny_config.py:2',
                  '--workdir={tmp_path}']
      runpy.run_path('{REPO}/experiment.py', run_name='__main__')
  """)
  result = processes.python(code, REPO, timeout=120)
  assert result.returncode == 130, result.stderr[-2000:]
  assert 'Traceback' not in result.stderr, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1] == (
      'Interrupted (Ctrl-C) outside the training loop; run the same command'
      ' to resume from the last checkpoint.'
  )


def test_ctrl_c_inside_xla_compilation_exits_130_not_a_crash(tmp_path):
  # The interpreter's teardown after it segfaulted (status 139).
  code = textwrap.dedent(f"""\
      import os, runpy, signal, sys, threading, time
      import jax, jax.numpy as jnp
      from nfnets import train

      def compiling(config, workdir):
        def f(x):
          for i in range(300):
            x = jnp.tanh(x @ x + i)
          return x
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
        jax.jit(f).lower(jnp.ones((64, 64))).compile()
        time.sleep(10)

      train.train_and_evaluate = compiling
      sys.argv = ['experiment.py', '--config={REPO}/tests/tiny_config.py:2',
                  '--workdir={tmp_path}']
      runpy.run_path('{REPO}/experiment.py', run_name='__main__')
  """)
  # No compilation cache: the compilation must take its time.
  result = processes.python(
      code, REPO, timeout=120, JAX_COMPILATION_CACHE_DIR=''
  )
  assert result.returncode == 130, result.stderr[-2000:]
  assert 'Fatal Python error' not in result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith('Interrupted')


@pytest.mark.parametrize(
    'field, value',
    [('optimizer.momentum', 2.0), ('optimizer.agc.eps', -1.0)],
)
def test_a_refused_optimizer_value_makes_no_workdir(tmp_path, field, value):
  config = tiny_config.get_config(2)
  config.update_from_flattened_dict({field: value})
  with pytest.raises(ValueError, match=re.escape(field)):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()


def test_a_write_cut_short_leaves_the_old_config_json(tmp_path, monkeypatch):
  config = resolve.resolve(tiny_config.get_config(2))
  train._save_config(config, str(tmp_path))
  before = (tmp_path / 'config.json').read_text()
  written = epath.Path.write_text

  def cut_short(self, text, *args, **kwargs):
    written(self, text[: len(text) // 2], *args, **kwargs)
    raise OSError('No space left on device')

  monkeypatch.setattr(epath.Path, 'write_text', cut_short)
  config.unlock()
  config.optimizer.base_lr = 0.2
  with pytest.raises(OSError, match='No space'):
    train._save_config(config, str(tmp_path))
  assert (tmp_path / 'config.json').read_text() == before


def _two_steps_of(config, per_device=4):
  """The state and metrics after two pmapped `train_step`s of `config`."""
  kwargs, state, num_classes = _step_setup(config)
  n = jax.local_device_count()
  rng = np.random.default_rng(0)
  batch = {
      'images': rng.standard_normal((n, per_device, 16, 16, 3), np.float32),
      'labels': rng.integers(0, num_classes, (n, per_device), np.int32),
      'labels2': rng.integers(0, num_classes, (n, per_device), np.int32),
      'mix_ratio': rng.uniform(0.5, 1.0, (n, per_device)).astype(np.float32),
  }
  step = jax.pmap(
      functools.partial(train.train_step, **kwargs), axis_name=train.AXIS_NAME
  )
  replicated = train.replicate(state)
  for _ in range(2):
    replicated, metrics = step(replicated, batch)
  return train.unreplicate(replicated), train.unreplicate(metrics)


def test_microbatches_take_the_same_step_over_the_whole_batch():
  results = {}
  for parts in (1, 2, 4):
    config = tiny_config.get_config(3)
    # No random draws, which each part makes for itself.
    config.model.drop_rate = 0.0
    config.model.stochdepth_rate = 0.0
    config.optimizer.warmup_epochs = 0  # so that both steps move
    config.train.batch_size = 4 * jax.device_count()
    config.train.microbatches = parts
    results[parts] = _two_steps_of(config)
  whole, whole_metrics = results[1]
  start = _step_setup(tiny_config.get_config(3))[1]
  moved = _max_difference(whole.params, start.params)
  assert moved > 1e-4
  for parts in (2, 4):
    state, metrics = results[parts]
    assert int(state.step) == 2
    # Sums in another order: float32 rounding apart, a thousandth of the
    # distance the two steps moved the weights.
    assert _max_difference(state.params, whole.params) < 1e-3 * moved
    assert _max_difference(state.opt_state, whole.opt_state) < 1e-5
    assert metrics['train_top1'] == whole_metrics['train_top1']
    for key in ('train_loss', 'grad_norm', 'param_norm', 'update_norm'):
      np.testing.assert_allclose(metrics[key], whole_metrics[key], rtol=1e-5)


def test_microbatches_keep_a_float16_loss_scale_as_the_whole_batch_does():
  # Each part's loss is its share of the batch's mean: its float16
  # gradients overflow at the same scale as the whole batch's, so no part
  # count skips a step that one batch takes (2**15 skipped with 2 and 4).
  scales, params = {}, {}
  for parts in (1, 2, 4):
    config = tiny_config.get_config(3)
    config.model.drop_rate = 0.0
    config.model.stochdepth_rate = 0.0
    config.optimizer.warmup_epochs = 0
    config.train.compute_dtype = 'float16'
    config.train.loss_scale_init = 2.0**15
    config.train.batch_size = 4 * jax.device_count()
    config.train.microbatches = parts
    state, _ = _two_steps_of(config)
    scales[parts] = float(state.loss_scale['scale'])
    params[parts] = state.params
  assert scales == {1: 2.0**15, 2: 2.0**15, 4: 2.0**15}
  for parts in (2, 4):
    assert _max_difference(params[parts], params[1]) < 2e-3


def test_microbatches_that_do_not_divide_the_device_batch_are_refused():
  for parts, message in (
      (3, r'microbatches=3 does not divide the 2 images per device'),
      (0, r'microbatches=0 must be an int >= 1'),
      (True, r'microbatches=True must be an int >= 1'),
  ):
    config = tiny_config.get_config(3)
    config.train.batch_size = 2 * jax.device_count()
    config.train.microbatches = parts
    with pytest.raises(ValueError, match=message):
      train.check_config(config)


def test_fields_added_since_a_run_was_saved_count_as_their_old_value():
  config = resolve.resolve(tiny_config.get_config(3))
  new = json.loads(config.to_json_best_effort())
  old = copy.deepcopy(new)
  for key, value in cli.ADDED_FIELDS.items():
    section, name = key.split('.')
    # Each is the default in configs/common.py: a run saved before it
    # existed trained as that value does.
    assert common.get_config()[section][name] == value
    del old[section][name]
  assert cli.differing_fields(old, new)[0] == []
  new['train']['microbatches'] = 2
  assert cli.differing_fields(old, new)[0] == ['train.microbatches']


# Out of device memory.

_OOM = 'RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.00TiB.'


def test_a_training_step_out_of_memory_names_the_batch_size(
    tmp_path, monkeypatch
):
  config = tiny_config.get_config(8)  # checkpoints at steps 4 and 8
  workdir = str(tmp_path)
  # XLA's error from the 6th call of a training step, as a GPU gives it when
  # a step's buffers do not fit.
  real_make, real_pmap = train.make_device_step, jax.pmap
  calls = 0

  def make_device_step(*args, **kwargs):
    fn = real_make(*args, **kwargs)
    fn.is_train_step = True
    return fn

  def pmap(fn, **kwargs):
    compiled = real_pmap(fn, **kwargs)
    if not getattr(fn, 'is_train_step', False):
      return compiled

    def step(*args):
      nonlocal calls
      calls += 1
      if calls == 6:
        raise jax.errors.JaxRuntimeError(_OOM)
      return compiled(*args)

    return step

  monkeypatch.setattr(train, 'make_device_step', make_device_step)
  monkeypatch.setattr(jax, 'pmap', pmap)
  with pytest.raises(train.OutOfMemoryError) as e:
    train.train_and_evaluate(config, workdir)
  message = str(e.value)
  assert '\n' not in message
  assert message.startswith(
      f'Out of device memory in training step 6 ({_OOM}): '
      'train.batch_size=64 (8 images per device at 16 px, nf_resnet26 in'
      ' float32) is too large for the devices; lower it, or raise'
      ' train.microbatches (now 1)'
  ), message
  assert message.endswith('resumes from its checkpoint of step 4.'), message
  assert _saved_steps(workdir) == [4]
  monkeypatch.undo()
  result = train.train_and_evaluate(config, workdir)
  assert result['step'] == 8 and _saved_steps(workdir) == [4, 8]


def test_an_evaluation_out_of_memory_saves_the_step_and_names_the_batch_size(
    tmp_path, monkeypatch
):
  config = tiny_config.get_config(8)
  config.train.checkpoint_every_steps = 100  # only what the error saves
  resolved, _ = train.prepare(config.copy_and_resolve_references())
  config.train.eval_every_epochs = 3 / resolved.steps.per_epoch  # step 3
  workdir = str(tmp_path)

  def out_of_memory(*args, **kwargs):
    del args, kwargs
    raise jax.errors.JaxRuntimeError(_OOM)

  monkeypatch.setattr(train, 'evaluate', out_of_memory)
  with pytest.raises(train.OutOfMemoryError) as e:
    train.train_and_evaluate(config, workdir)
  assert str(e.value) == (
      f'Out of device memory in the evaluation ({_OOM}): eval.batch_size=64'
      ' (8 images per device at 16 px) is too large for the devices; lower'
      ' it. Step 3 is saved: the same command with a lower eval.batch_size'
      ' goes on from it.'
  )
  assert _saved_steps(workdir) == [3]
  # Evaluating a checkpoint (--mode=eval) says the same, less the saving.
  with pytest.raises(train.OutOfMemoryError, match=r'is too large .* it\.$'):
    train.evaluate_checkpoint(config, workdir)
  monkeypatch.undo()
  config.eval.batch_size = 32
  result = train.train_and_evaluate(config, workdir)
  assert result['step'] == 8 and result['eval_count'] == 360
  assert [r['step'] for r in _metrics(workdir) if 'train_loss' in r] == list(
      range(1, 9)
  )
