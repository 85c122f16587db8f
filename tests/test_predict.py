"""Classifying image files with published weights or a run's checkpoint."""

import functools
import json
import os
import pickle
import sys

import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
import pytest

import tiny_config
from nfnets import checkpoint
from nfnets import data
from nfnets import models
from nfnets import predict
from nfnets import resolve
from nfnets import train
from nfnets.data import augment
from nfnets.data import device_augment
from nfnets.data import folder

_CLASSES = ('cat', 'dog', 'emu')
_COLOURS = ((200, 40, 40), (40, 200, 40), (40, 40, 200))


def _write(path, label, i):
  """A 12x10 image of class `label`'s colour, with a little noise."""
  rng = np.random.default_rng(100 * label + i)
  pixels = np.asarray(_COLOURS[label], np.float32) + rng.normal(
      0, 30, (12, 10, 3)
  )
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)
  return path


@functools.lru_cache(maxsize=1)
def _folder_config(root):
  config = tiny_config.get_config(4)
  config.data.name = f'folder:{root}/data'
  config.data.randaugment_layers = 0
  config.train.batch_size = 8
  config.eval.batch_size = 8
  config.eval.ema = True
  return config


def _run(root):
  """A few steps on a 3-class image folder; (workdir, result, eval files)."""
  evals = []
  for label, name in enumerate(_CLASSES):
    for i in range(8):
      _write(os.path.join(root, 'data', 'train', name, f'{i}.png'), label, i)
    for i in range(8, 11):
      evals.append(
          (
              _write(
                  os.path.join(root, 'data', 'val', name, f'{i}.png'), label, i
              ),
              name,
          )
      )
  workdir = os.path.join(root, 'run')
  result = train.train_and_evaluate(_folder_config(root), workdir)
  return workdir, result, tuple(evals)


@pytest.fixture(name='run', scope='module')
def fixture_run(tmp_path_factory):
  return _run(str(tmp_path_factory.mktemp('predict')))


@pytest.mark.parametrize('weights', ['auto', 'ema', 'raw'])
def test_predictions_of_a_run_are_its_evaluations(run, weights):
  workdir, result, evals = run
  classifier = predict.load(workdir, weights=weights)
  weights = 'ema' if weights == 'auto' else weights  # the run's eval.ema
  assert classifier.class_names == _CLASSES and not classifier.note
  assert classifier.image_size == 16
  assert ('EMA' in classifier.source) == (weights == 'ema')
  results = predict.classify(classifier, [p for p, _ in evals], top=2)
  assert [r['image'] for r in results] == [p for p, _ in evals]
  correct = [
      r['top'][0]['name'] == name for r, (_, name) in zip(results, evals)
  ]
  prefix = 'ema_eval' if weights == 'ema' else 'eval'
  assert result[f'{prefix}_count'] == len(evals)
  # The same images, preparation and weights as the run's evaluation: the
  # same top-1 accuracy.
  assert np.mean(correct) == pytest.approx(result[f'{prefix}_top1'])
  # Image by image: the probabilities of the run's own eval pipeline's
  # images (sorted by class, then path), under the same weights.
  config = ml_collections.ConfigDict(
      json.loads(open(os.path.join(workdir, 'config.json')).read())
  )
  batches = data.create_dataset(
      config.data, split='eval', global_batch_size=72, image_size=16, seed=0
  )
  (batch,) = list(batches)
  mask = batch['mask'].reshape(-1) > 0
  images = batch['images'].reshape((-1, 16, 16, 3))[mask]
  if images.dtype == np.uint8:  # normalised by the eval step, on the device
    images = device_augment.normalize(images)
  forward = train.create_model(config, len(_CLASSES))
  logits, _ = forward.apply(
      classifier.params, {}, None, images, is_training=False
  )
  order = sorted(range(len(evals)), key=lambda i: (evals[i][1], evals[i][0]))
  by_label = np.zeros((len(evals), len(_CLASSES)))
  every_class = predict.classify(classifier, [p for p, _ in evals], top=3)
  for row, i in enumerate(order):
    for c in every_class[i]['top']:
      by_label[row, c['label']] = c['probability']
  np.testing.assert_allclose(
      by_label, jax.nn.softmax(logits), rtol=1e-4, atol=1e-6
  )
  for r in results:
    probabilities = [c['probability'] for c in r['top']]
    assert probabilities == sorted(probabilities, reverse=True)
    assert [c['name'] for c in r['top']] == [
        _CLASSES[c['label']] for c in r['top']
    ]


def test_class_names_are_the_runs_own(run):
  workdir, _, _ = run
  root = os.path.dirname(workdir)
  # A class folder renamed since: the labels keep the names they trained
  # with ('cat' would otherwise read 'dog', and 'emu' 'zebra').
  os.rename(f'{root}/data/train/cat', f'{root}/data/train/zebra')
  try:
    assert predict.load(workdir).class_names == _CLASSES
  finally:
    os.rename(f'{root}/data/train/zebra', f'{root}/data/train/cat')
  # Resumed on the renamed folder, the run would train and evaluate on
  # shifted labels: refused, its files as they were.
  files = {
      n: open(os.path.join(workdir, n)).read()
      for n in os.listdir(workdir)
      if n.endswith('.json')
  }
  os.rename(f'{root}/data/train/cat', f'{root}/data/train/zebra')
  folder._class_names.cache_clear()  # pylint: disable=protected-access
  try:
    with pytest.raises(
        ValueError, match=r"label 0 'cat'; the data now: 3, label 0 'dog'"
    ):
      train.train_and_evaluate(_folder_config(root), workdir)
  finally:
    os.rename(f'{root}/data/train/zebra', f'{root}/data/train/cat')
    folder._class_names.cache_clear()  # pylint: disable=protected-access
  assert files == {n: open(os.path.join(workdir, n)).read() for n in files}
  # A run without the file (written since): the dataset's, with a note.
  names = os.path.join(workdir, 'classes.json')
  os.rename(names, names + '.away')
  try:
    classifier = predict.load(workdir)
    assert classifier.class_names == _CLASSES
    assert 'classes.json is missing' in classifier.note
    assert 'as it is now' in classifier.note
    os.rename(f'{root}/data', f'{root}/moved')
    # This process listed the folder while training: forget it, as a new
    # process would not know it.
    folder._class_names.cache_clear()  # pylint: disable=protected-access
    try:
      classifier = predict.load(workdir)
    finally:
      os.rename(f'{root}/moved', f'{root}/data')
    assert classifier.class_names == ('0', '1', '2')
    assert 'labels are given as numbers' in classifier.note
  finally:
    os.rename(names + '.away', names)


def test_weights_default_to_those_the_run_evaluated(run):
  workdir, _, _ = run
  path = os.path.join(workdir, 'config.json')
  before = open(path).read()
  config = json.loads(before)
  config['eval']['ema'] = False
  try:
    with open(path, 'w') as f:
      json.dump(config, f)
    assert 'trained weights' in predict.load(workdir).source
    assert 'EMA weights' in predict.load(workdir, weights='ema').source
  finally:
    with open(path, 'w') as f:
      f.write(before)


def test_the_command_line_prints_a_line_or_json_per_image(run, capsys):
  workdir, _, evals = run
  images = [evals[0][0], evals[-1][0]]
  assert predict.main(['--checkpoint', workdir, '--top=3', *images]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert [l.split(':')[0] for l in lines] == images
  assert all(l.count('%') == 3 for l in lines)
  argv = ['--checkpoint', workdir, '--json', '--top=9', *images]
  assert predict.main(argv) == 0
  records = [json.loads(l) for l in capsys.readouterr().out.splitlines()]
  assert [len(r['top']) for r in records] == [3, 3]  # all the classes
  assert sum(c['probability'] for c in records[0]['top']) == pytest.approx(1)


def _tiny_published(tmp_path, name):
  """nfnet_tiny's initial weights, pickled as DeepMind's files are."""
  forward = hk.transform_with_state(
      lambda x: models.create('nfnet_tiny')(x, is_training=False)
  )
  params, _ = forward.init(jax.random.PRNGKey(0), jnp.zeros([1, 32, 32, 3]))
  path = tmp_path / name
  with open(path, 'wb') as f:
    pickle.dump(jax.tree_util.tree_map(np.asarray, params), f)
  return str(path), forward, params


def test_published_weights_classify_into_imagenet_classes(tmp_path):
  path, forward, params = _tiny_published(tmp_path, 'tiny_haiku.npz')
  image = _write(str(tmp_path / 'a.png'), 0, 0)
  classifier = predict.load(path, model='nfnet_tiny')
  assert classifier.num_classes == 1000
  assert classifier.class_names[0] == 'n01440764'  # TFDS imagenet2012's
  (result,) = predict.classify(classifier, [image], top=5)
  # Against the model applied to the image as the TF input pipeline
  # normalises it.
  prepared = augment.eval_image(
      open(image, 'rb').read(), classifier.image_size, 'resize_crop'
  )
  logits, _ = forward.apply(
      params, {}, None, augment.normalize(prepared[None]).numpy()
  )
  expected = jax.nn.softmax(logits[0])
  best = np.argsort(-np.asarray(expected))[:5]
  assert [c['label'] for c in result['top']] == list(best)
  np.testing.assert_allclose(
      [c['probability'] for c in result['top']],
      np.asarray(expected)[best],
      rtol=1e-4,
  )


def test_a_published_file_name_names_its_model(tmp_path):
  path, _, _ = _tiny_published(tmp_path, 'F0_haiku.npz')
  with pytest.raises(ValueError, match='F0_haiku.npz as nfnet_f0: NFNet/'):
    predict.load(path)
  other, _, _ = _tiny_published(tmp_path, 'weights.npz')
  with pytest.raises(ValueError, match='give --model, e.g. --model=nfnet_f0'):
    predict.load(other)
  with pytest.raises(ValueError, match='--weights=raw applies to a run'):
    predict.load(other, model='nfnet_tiny', weights='raw')


def test_bad_input_is_one_line_naming_it(run, tmp_path):
  workdir, _, evals = run
  text = tmp_path / 'notes.png'
  text.write_text('not an image')
  cases = [
      ([str(tmp_path / 'missing.jpg')], 'missing.jpg: no such image file.'),
      ([str(tmp_path)], 'is a folder, not an image file.'),
      ([str(text)], 'notes.png is not a JPEG, PNG, GIF or BMP image'),
      (['--model=nfnet_f9', evals[0][0]], "Unknown model name 'nfnet_f9'"),
      (['--model=nfnet_f0', evals[0][0]], 'trained nf_resnet26; leave'),
  ]
  for argv, message in cases:
    with pytest.raises(SystemExit) as e:
      predict.main(['--checkpoint', workdir, *argv])
    assert str(e.value.code).startswith('python -m nfnets.predict: error: ')
    assert message in str(e.value.code)
    assert '\n' not in str(e.value.code)
  with pytest.raises(SystemExit) as e:
    predict.main(['--checkpoint', str(tmp_path / 'nothing'), evals[0][0]])
  assert 'nothing: no such file or folder' in str(e.value.code)


def test_unreadable_files_and_ctrl_c_end_in_one_line(run, monkeypatch):
  workdir, _, evals = run
  argv = ['--checkpoint', workdir, evals[0][0]]

  def unreadable(path, *args):
    del args
    raise PermissionError(13, 'Permission denied', path)

  monkeypatch.setattr(predict, 'read_image', unreadable)
  with pytest.raises(SystemExit) as e:
    predict.main(argv)
  assert str(e.value.code).startswith('python -m nfnets.predict: error: ')
  assert 'Permission denied' in str(e.value.code)

  def interrupted(*args):
    raise KeyboardInterrupt

  # os._exit in the real one: it would end the test process.
  monkeypatch.setattr(predict.cli, 'exit_interrupted', sys.exit)
  monkeypatch.setattr(predict, 'read_image', interrupted)
  with pytest.raises(SystemExit) as e:
    predict.main(argv)
  assert e.value.code == 'python -m nfnets.predict: interrupted.'


def test_a_batchnorm_model_is_refused_for_a_file_before_it_is_read(tmp_path):
  # A parameter file holds no BatchNorm statistics. Refused by the model's
  # name, before a (large) file is read: this one is not even a pickle.
  path = tmp_path / 'weights.npz'
  path.write_bytes(b'not read')
  with pytest.raises(ValueError, match='resnet26_bn keeps BatchNorm'):
    predict.load(str(path), model='resnet26_bn')


def test_image_paths_may_start_with_home(run, tmp_path, monkeypatch):
  workdir, _, evals = run
  monkeypatch.setenv('HOME', os.path.dirname(evals[0][0]))
  image = '~/' + os.path.basename(evals[0][0])
  (result,) = predict.classify(predict.load(workdir), [image])
  assert result['image'] == image


def test_a_digits_run_is_refused(tmp_path):
  # As the runner leaves a run's folder (refused before its checkpoint is
  # read).
  (tmp_path / 'digits' / 'checkpoints').mkdir(parents=True)
  config = json.loads(resolve.resolve(tiny_config.get_config(1)).to_json())
  (tmp_path / 'digits' / 'config.json').write_text(json.dumps(config))
  with pytest.raises(ValueError, match='embedded 8x8 digits'):
    predict.load(str(tmp_path / 'digits'))


def test_published_names_resolve_wherever_a_file_is_asked_for(
    tmp_path, monkeypatch
):
  # Cached already (checkpoint.published_file downloads into this folder).
  cached, _, _ = _tiny_published(tmp_path, 'F0_haiku.npz')
  monkeypatch.setenv('NFNETS_JAX_CACHE', str(tmp_path))
  with pytest.raises(ValueError, match=f'{cached} as nfnet_f0: NFNet/'):
    predict.load('F0')
  # --weights does not apply to published weights: refused before any
  # download (F1 is not cached; its URL would refuse the connection).
  monkeypatch.setattr(checkpoint, 'PUBLISHED_URL', 'http://127.0.0.1:9/{name}')
  with pytest.raises(ValueError, match='--weights=raw applies to a run'):
    predict.load('F1', weights='raw')
  config = tiny_config.get_config(1)
  config.eval.checkpoint = 'f0'
  with pytest.raises(ValueError, match=f'{cached} as nf_resnet26: '):
    train.evaluate_checkpoint(config, str(tmp_path / 'run'))
  config = tiny_config.get_config(1)
  config.train.init_checkpoint = 'F0'
  with pytest.raises(ValueError, match=f'train.init_checkpoint \\({cached}\\)'):
    train.train_and_evaluate(config, str(tmp_path / 'tuned'))
