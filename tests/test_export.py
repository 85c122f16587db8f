"""Exporting a run's weights as a parameter file of the published layout."""

import json
import os
import pickle
import pickletools
import signal
import time

import numpy as np
import pytest

import states
import tiny_config
from nfnets import checkpoint
from nfnets import export
from nfnets import predict
from nfnets import train


@pytest.fixture(name='run', scope='module')
def fixture_run(tmp_path_factory):
  """An 8-step tiny run with EMA weights; (workdir, config, final result)."""
  workdir = str(tmp_path_factory.mktemp('export') / 'run')
  config = tiny_config.get_config(8)  # checkpoints at steps 4 and 8
  config.eval.ema = True
  return workdir, config, train.train_and_evaluate(config, workdir)


def _equal_trees(a, b):
  assert sorted(a) == sorted(b)
  for module in a:
    assert sorted(a[module]) == sorted(b[module]), module
    for name in a[module]:
      np.testing.assert_array_equal(
          a[module][name], b[module][name], err_msg=f'{module}/{name}'
      )


def test_the_pickle_holds_the_runs_weights_as_the_published_files_do(
    run, tmp_path
):
  workdir, config, _ = run
  path = str(tmp_path / 'run_haiku.npz')
  done = export.export(workdir, path)
  assert done['weights'] == 'ema' and done['step'] == 8  # the run's eval.ema
  # The names it calls are those of the published files, which numpy 1
  # (the original release's) and numpy 2 both read.
  with open(path, 'rb') as f:
    strings = {
        arg for op, arg, _ in pickletools.genops(f) if isinstance(arg, str)
    }
  modules = {s for s in strings if s.startswith('numpy')}
  assert modules == {'numpy', 'numpy.core.multiarray'}, modules
  # What the original release's loader does with F0_haiku.npz.
  with open(path, 'rb') as f:
    tree = pickle.load(f)
  assert type(tree) is dict  # pylint: disable=unidiomatic-typecheck
  for names in tree.values():
    assert type(names) is dict  # pylint: disable=unidiomatic-typecheck
    for value in names.values():
      assert type(value) is np.ndarray and value.dtype == np.float32
  _equal_trees(tree, predict.read_run_weights(workdir, weights='ema').params)
  # And what this project's loader of published files makes of it.
  assert done['model'] == 'nf_resnet26'  # the demo's, as the run's log says
  loaded = checkpoint.load_deepmind_params(
      path, 'nf_resnet26', 10, **dict(config.model.overrides)
  )
  _equal_trees(loaded, tree)
  assert done['num_params'] == sum(
      v.size for names in tree.values() for v in names.values()
  )
  # Raw float32 bytes, as the published files (F0's: 286 MB for 71.5M
  # parameters): a few hundred bytes of names and headers per array.
  arrays = sum(len(names) for names in tree.values())
  assert os.path.getsize(path) < 4 * done['num_params'] + 300 * arrays
  umask = os.umask(0)
  os.umask(umask)
  assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask


def test_npz_of_one_step_reads_without_unpickling(run, tmp_path):
  workdir, _, _ = run
  path = str(tmp_path / 'step4.npz')
  step_folder = os.path.join(workdir, 'checkpoints', '4')
  done = export.export(step_folder, path, weights='raw', fmt='npz')
  assert done['step'] == 4 and done['weights'] == 'raw'
  tree = {}
  with np.load(path, allow_pickle=False) as archive:
    for key in archive.files:
      module, _, name = key.rpartition('/')
      tree.setdefault(module, {})[name] = archive[key]
  step_4 = predict.read_run_weights(workdir, 4, 'raw').params
  _equal_trees(tree, step_4)
  # Step 4's weights, not the newest checkpoint's.
  step_8 = predict.read_run_weights(workdir, 8, 'raw').params
  assert any(
      not np.array_equal(step_4[m][n], step_8[m][n])
      for m in step_4
      for n in step_4[m]
  )


@pytest.mark.parametrize('weights, fmt', [('raw', 'pickle'), ('ema', 'npz')])
def test_the_exported_weights_evaluate_as_the_run_did(
    run, tmp_path, weights, fmt
):
  workdir, config, result = run
  path = str(tmp_path / f'{weights}.npz')
  export.export(workdir, path, weights=weights, fmt=fmt)
  config = config.copy_and_resolve_references()
  config.eval.checkpoint = path
  config.eval.ema = False  # a file holds one set of weights
  evaluated = train.evaluate_checkpoint(config, str(tmp_path / 'eval'))
  prefix = 'ema_eval' if weights == 'ema' else 'eval'
  assert evaluated['eval_count'] == result[f'{prefix}_count'] == 360
  assert evaluated['eval_top1'] == result[f'{prefix}_top1']
  assert evaluated['eval_loss'] == pytest.approx(
      result[f'{prefix}_loss'], rel=1e-5
  )


def test_an_existing_file_is_kept_unless_overwrite(run, tmp_path):
  workdir, _, _ = run
  path = tmp_path / 'kept.npz'
  path.write_bytes(b'earlier work')
  with pytest.raises(FileExistsError, match='--overwrite'):
    export.export(workdir, str(path))
  assert path.read_bytes() == b'earlier work'
  export.export(workdir, str(path), overwrite=True)
  assert checkpoint.read_params_file(str(path))


@pytest.mark.parametrize('fmt', export.FORMATS)
@pytest.mark.parametrize('error', [OSError, KeyboardInterrupt])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_partial_one(
    run, tmp_path, monkeypatch, fmt, error
):
  workdir, _, _ = run
  path = tmp_path / 'kept.npz'
  path.write_bytes(b'earlier work')

  def fail(*args, **kwargs):  # once the temporary file exists
    del args, kwargs
    raise error(28, 'No space left on device')

  if fmt == 'pickle':
    monkeypatch.setattr(export._Pickler, 'dump', fail)
  else:
    monkeypatch.setattr(export.np, 'savez', fail)
  with pytest.raises(error):
    export.export(workdir, str(path), fmt=fmt, overwrite=True)
  assert path.read_bytes() == b'earlier work'
  assert os.listdir(tmp_path) == ['kept.npz']


def test_batchnorm_statistics_are_refused(tmp_path):
  # The published layout holds parameters only: a BN network's statistics
  # would be lost, and its file would evaluate as another network.
  run = predict.RunWeights(
      model='resnet26_bn',
      overrides={},
      params={'head': {'w': np.zeros((2, 2), np.float32)}},
      model_state={'bn': {'mean_ema': np.zeros(2, np.float32)}},
      num_classes=2,
      step=1,
      ema=False,
      where='checkpoint 1 in somewhere',
  )
  with pytest.raises(ValueError, match='resnet26_bn keeps BatchNorm'):
    export.write(run, str(tmp_path / 'bn.npz'))
  assert not os.listdir(tmp_path)


def test_the_command_line_says_what_it_wrote_and_errs_in_one_line(
    run, tmp_path, capsys
):
  workdir, _, _ = run
  path = str(tmp_path / 'cli.npz')
  assert export.main([f'--checkpoint={workdir}', f'--output={path}']) == 0
  out = capsys.readouterr().out
  assert out.startswith(f'Wrote {path}: nf_resnet26, EMA weights of')
  assert 'model.overrides=' in out  # the tiny run's, needed to read it
  bad = [
      ([f'--checkpoint={tmp_path / "nothing"}', f'--output={path}2'], 'no run'),
      ([f'--checkpoint={workdir}', f'--output={path}'], 'exists and is kept'),
      ([f'--checkpoint={workdir}', f'--output={tmp_path}'], 'is a folder'),
      (
          [f'--checkpoint={workdir}', f'--output={tmp_path}/no/x.npz'],
          'create it first',
      ),
      ([f'--checkpoint={workdir}', '--output=gs://b/x.npz'], 'local file'),
      ([f'--checkpoint={workdir}', '--output= '], '--output is empty'),
      (['--checkpoint=', f'--output={path}2'], '--checkpoint is empty'),
      (
          [f'--checkpoint={workdir}', f'--output={tmp_path}/{"x" * 300}'],
          'cannot write it (File name too long)',
      ),
  ]
  for argv, message in bad:
    with pytest.raises(SystemExit) as e:
      export.main(argv)
    text = str(e.value.code)
    assert text.startswith('python -m nfnets.export: error: '), text
    assert message in text and '\n' not in text, text


def test_every_form_of_a_run_path_names_its_checkpoints(
    run, tmp_path, monkeypatch
):
  workdir, _, _ = run
  monkeypatch.setenv('HOME', os.path.dirname(workdir))
  for source, step in [
      (os.path.join(workdir, 'checkpoints'), 8),
      (os.path.join(workdir, 'checkpoints', '4', 'default'), 4),
      (os.path.join('~', os.path.basename(workdir)), 8),
  ]:
    path = str(tmp_path / f'{step}.npz')
    assert export.export(source, path, overwrite=True)['step'] == step, source


def test_fine_tuning_starts_from_the_exported_weights(run, tmp_path):
  workdir, config, _ = run
  path = str(tmp_path / 'raw.npz')
  export.export(workdir, path, weights='raw')
  tuned = config.copy_and_resolve_references()
  tuned.train.init_checkpoint = path
  tuned, new = states.new_state(tuned)
  state, message = train.initialize_from(tuned, new)
  assert message == f'Initialised from {path}.'
  _equal_trees(state.params, predict.read_run_weights(workdir, 8, 'raw').params)


def test_a_batchnorm_run_is_refused_before_its_checkpoint_is_read(tmp_path):
  # Its config.json names a BatchNorm network; its checkpoints are never
  # opened (there are none), so a large run is refused at once.
  run_dir = tmp_path / 'bn_run'
  (run_dir / 'checkpoints').mkdir(parents=True)
  (run_dir / 'config.json').write_text(
      json.dumps({'model': {'name': 'resnet26_bn'}, 'data': {}})
  )
  with pytest.raises(ValueError, match='resnet26_bn keeps BatchNorm'):
    export.export(str(run_dir), str(tmp_path / 'bn.npz'))
  assert sorted(os.listdir(tmp_path)) == ['bn_run']


def test_the_runs_own_files_are_never_written_over(run, tmp_path):
  workdir, _, _ = run
  config_json = os.path.join(workdir, 'config.json')
  before = open(config_json, 'rb').read()
  for output in (config_json, os.path.join(workdir, 'checkpoints', 'w.npz')):
    with pytest.raises(ValueError, match='would write over the run'):
      export.export(workdir, output, overwrite=True)
  assert open(config_json, 'rb').read() == before
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['4', '8']
  # A new file beside them is fine.
  export.export(workdir, os.path.join(workdir, 'exported.npz'))
  os.remove(os.path.join(workdir, 'exported.npz'))


def test_a_link_to_nowhere_is_a_name_in_use(run, tmp_path):
  workdir, _, _ = run
  link = tmp_path / 'link.npz'
  os.symlink(tmp_path / 'nowhere', link)
  with pytest.raises(FileExistsError, match='--overwrite'):
    export.export(workdir, str(link))
  assert os.readlink(link) == str(tmp_path / 'nowhere')


def test_sigterm_while_writing_keeps_the_old_file(
    run, tmp_path, monkeypatch, capsys
):
  workdir, _, _ = run
  path = tmp_path / 'kept.npz'
  path.write_bytes(b'earlier work')

  def terminated(*args, **kwargs):
    del args, kwargs
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(10)  # the handler stops it at once

  monkeypatch.setattr(export._Pickler, 'dump', terminated)
  before = signal.getsignal(signal.SIGTERM)
  argv = [f'--checkpoint={workdir}', f'--output={path}', '--overwrite']
  assert export.main(argv) == 128 + signal.SIGTERM
  assert 'terminated; nothing was written' in capsys.readouterr().err
  assert path.read_bytes() == b'earlier work'
  assert os.listdir(tmp_path) == ['kept.npz']
  assert signal.getsignal(signal.SIGTERM) is before
