"""Exporting a run's weights as a parameter file of the published layout."""

import os
import pickle
import pickletools

import numpy as np
import pytest

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


@pytest.mark.parametrize('weights', ['raw', 'ema'])
def test_the_exported_weights_evaluate_as_the_run_did(run, tmp_path, weights):
  workdir, config, result = run
  path = str(tmp_path / f'{weights}.npz')
  export.export(workdir, path, weights=weights)
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


def test_a_failed_write_keeps_the_old_file_and_leaves_no_partial_one(
    run, tmp_path, monkeypatch
):
  workdir, _, _ = run
  path = tmp_path / 'kept.npz'
  path.write_bytes(b'earlier work')

  def full_disk(*args, **kwargs):
    del args, kwargs
    raise OSError(28, 'No space left on device')

  monkeypatch.setattr(export._Pickler, 'dump', full_disk)
  with pytest.raises(OSError, match='No space'):
    export.export(workdir, str(path), overwrite=True)
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
  ]
  for argv, message in bad:
    with pytest.raises(SystemExit) as e:
      export.main(argv)
    text = str(e.value.code)
    assert text.startswith('python -m nfnets.export: error: '), text
    assert message in text and '\n' not in text, text
