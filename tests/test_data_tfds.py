"""TFDS pipelines: ImageNet under `tfds.testing.mock_data`, and a tiny real
TFDS dataset built on the fly (TFRecord files, like a prepared ImageNet)."""

import functools

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from nfnets import data
from nfnets.data import batching
from nfnets.data import device_augment
from nfnets.data import testing

_TINY_TRAIN = 37
_TINY_TEST = 13


class NfnetsTinyTest(tfds.core.GeneratorBasedBuilder):
  """Tiny JPEG dataset whose label is the example's id."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict(
            {
                'image': tfds.features.Image(
                    shape=(None, None, 3), encoding_format='jpeg'
                ),
                'label': tfds.features.ClassLabel(num_classes=64),
            }
        ),
        supervised_keys=('image', 'label'),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {
        'train': self._generate_examples(0, _TINY_TRAIN),
        'test': self._generate_examples(100, _TINY_TEST),
    }

  def _generate_examples(self, offset, num):
    rng = np.random.default_rng(offset)
    for i in range(num):
      # Varied sizes and aspect ratios.
      shape = (20 + 3 * i % 17, 24 + 5 * i % 23, 3)
      yield offset + i, {
          'image': rng.integers(0, 256, shape).astype(np.uint8),
          'label': (offset + i) % 64 if offset else i,
      }


@pytest.fixture(scope='module')
def tiny_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  NfnetsTinyTest(data_dir=data_dir).download_and_prepare()
  return data_dir


def _tiny(
    data_dir,
    split,
    global_batch_size,
    *,
    process_index=0,
    process_count=1,
    local_device_count=1,
    start_step=0,
    seed=0,
    image_size=16,
    **overrides,
):
  fields = dict(
      name='nfnets_tiny_test',
      data_dir=data_dir,
      eval_split='test',
      shuffle_buffer=16,
  )
  cfg = testing.config(**{**fields, **overrides})
  return data.create_dataset(
      cfg,
      split=split,
      global_batch_size=global_batch_size,
      image_size=image_size,
      seed=seed,
      start_step=start_step,
      process_index=process_index,
      process_count=process_count,
      local_device_count=local_device_count,
  )


def _labels(batches, num):
  labels = np.concatenate([b['labels'].reshape(-1) for b in batches])
  return labels[:num].tolist()


def _finish_on_devices(cfg, batch):
  """What the runner does to `augment_on='device'` batches, per device."""
  assert set(batch) == {'images', 'labels'}
  assert batch['images'].dtype == np.uint8
  finish = jax.jit(
      functools.partial(
          device_augment.augment_batch,
          randaugment_layers=cfg.randaugment_layers,
          randaugment_magnitude=cfg.randaugment_magnitude,
          mixup_alpha=cfg.mixup_alpha,
          cutmix=cfg.cutmix,
      )
  )
  outs = [
      finish(images, labels, jax.random.PRNGKey(device))
      for device, (images, labels) in enumerate(
          zip(batch['images'], batch['labels'])
      )
  ]
  return {k: np.stack([np.asarray(out[k]) for out in outs]) for k in outs[0]}


@pytest.mark.parametrize('augment_on', ['host', 'device'])
@pytest.mark.parametrize(
    'train_size, eval_size, magnitude',
    [
        (192, 256, 5),  # NFNet-F0.
        (320, 416, 15),  # NFNet-F3.
    ],
)
def test_imagenet_batches_under_mock_data(
    train_size, eval_size, magnitude, augment_on
):
  cfg = testing.config(
      name='imagenet2012',
      randaugment_magnitude=magnitude,
      shuffle_buffer=8,
      augment_on=augment_on,
  )
  low = (0 - np.array(batching.MEAN_RGB)) / np.array(batching.STDDEV_RGB)
  high = (255 - np.array(batching.MEAN_RGB)) / np.array(batching.STDDEV_RGB)
  with tfds.testing.mock_data(num_examples=10):
    assert data.num_classes(cfg) == 1000
    train = data.create_dataset(
        cfg,
        split='train',
        global_batch_size=8,
        image_size=train_size,
        seed=0,
        process_index=0,
        process_count=1,
        local_device_count=2,
    )
    batch = next(train)
    if augment_on == 'device':
      batch = _finish_on_devices(cfg, batch)
    assert batch['images'].shape == (2, 4, train_size, train_size, 3)
    assert batch['images'].dtype == np.float32
    for key in ('labels', 'labels2'):
      assert batch[key].shape == (2, 4) and batch[key].dtype == np.int32
      assert ((batch[key] >= 0) & (batch[key] < 1000)).all()
    assert batch['mix_ratio'].dtype == np.float32
    assert ((batch['mix_ratio'] >= 0) & (batch['mix_ratio'] <= 1)).all()
    assert (batch['images'] >= low - 1e-5).all()
    assert (batch['images'] <= high + 1e-5).all()
    assert batch['images'].std() > 0.1

    evals = data.create_dataset(
        cfg,
        split='eval',
        global_batch_size=8,
        image_size=eval_size,
        seed=0,
        process_index=0,
        process_count=1,
        local_device_count=2,
    )
    batch = next(evals)
    assert set(batch) == {'images', 'labels', 'mask'}
    assert batch['images'].shape == (2, 4, eval_size, eval_size, 3)
    if augment_on == 'device':  # normalised by the eval step
      assert batch['images'].dtype == np.uint8
      batch['images'] = np.asarray(device_augment.normalize(batch['images']))
    assert batch['images'].dtype == np.float32
    assert batch['labels'].dtype == np.int32
    assert batch['mask'].dtype == np.float32
    np.testing.assert_array_equal(batch['mask'], np.ones((2, 4)))
    assert (batch['images'] >= low - 1e-5).all()
    assert (batch['images'] <= high + 1e-5).all()


def test_imagenet_resume_under_mock_data():
  cfg = testing.config(
      name='imagenet2012', shuffle_buffer=4, randaugment_layers=2
  )
  kwargs = dict(
      split='train',
      global_batch_size=4,
      image_size=32,
      seed=3,
      process_index=0,
      process_count=1,
      local_device_count=2,
  )
  with tfds.testing.mock_data(num_examples=6):
    stream = data.create_dataset(cfg, **kwargs)
    batches = [next(stream) for _ in range(4)]
    resumed = next(data.create_dataset(cfg, start_step=3, **kwargs))
  for key in batches[3]:
    np.testing.assert_array_equal(resumed[key], batches[3][key])
  assert not np.array_equal(batches[2]['images'], batches[3]['images'])


def test_tiny_counts(tiny_dir):
  cfg = testing.config(
      name='nfnets_tiny_test', data_dir=tiny_dir, eval_split='test'
  )
  assert data.num_examples(cfg, 'train') == _TINY_TRAIN
  assert data.num_examples(cfg, 'eval') == _TINY_TEST
  assert data.num_classes(cfg) == 64


def test_tiny_process_shards_are_disjoint_and_cover(tiny_dir):
  # One process's first epoch is its shard: 19 and 18 examples.
  shards = []
  for process_index, size in ((0, 19), (1, 18)):
    stream = _tiny(
        tiny_dir,
        'train',
        8,
        process_index=process_index,
        process_count=2,
        randaugment_layers=0,
        mixup_alpha=0.0,
        cutmix=False,
    )
    shards.append(_labels([next(stream) for _ in range(5)], size))
  assert len(set(shards[0])) == 19 and len(set(shards[1])) == 18
  assert not set(shards[0]) & set(shards[1])
  assert sorted(shards[0] + shards[1]) == list(range(_TINY_TRAIN))


def test_tiny_epochs_are_permutations_that_differ(tiny_dir):
  stream = _tiny(
      tiny_dir, 'train', 37, randaugment_layers=0, mixup_alpha=0.0, cutmix=False
  )
  first, second = next(stream), next(stream)
  epochs = [_labels([first], 37), _labels([second], 37)]
  assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(_TINY_TRAIN))
  assert epochs[0] != epochs[1]


def test_tiny_resume_equals_uninterrupted_stream(tiny_dir):
  # 37 examples, 8 per step: resuming at step 9 skips epoch 0 whole and 35
  # examples of epoch 1; the batch straddles epochs 1 and 2. All
  # augmentations on.
  kwargs = dict(local_device_count=2, seed=5, randaugment_layers=2)
  stream = _tiny(tiny_dir, 'train', 8, **kwargs)
  batches = [next(stream) for _ in range(11)]
  resumed = _tiny(tiny_dir, 'train', 8, start_step=9, **kwargs)
  for step in (9, 10):
    got = next(resumed)
    for key in batches[step]:
      np.testing.assert_array_equal(got[key], batches[step][key])
  assert (batches[9]['mix_ratio'] < 1).any()
  assert not np.array_equal(batches[9]['images'], batches[10]['images'])


@pytest.mark.parametrize('process_count', [1, 2])
def test_tiny_eval_yields_every_example_exactly_once(tiny_dir, process_count):
  labels, num_batches, total = [], set(), 0.0
  for process_index in range(process_count):
    ds = _tiny(
        tiny_dir,
        'eval',
        4 * process_count,
        local_device_count=2,
        process_index=process_index,
        process_count=process_count,
    )
    batches = list(ds)
    num_batches.add(len(batches))
    for batch in batches:
      real = batch['mask'].reshape(-1) == 1
      total += batch['mask'].sum()
      labels += batch['labels'].reshape(-1)[real].tolist()
  assert total == _TINY_TEST
  assert sorted(labels) == sorted((100 + i) % 64 for i in range(_TINY_TEST))
  assert len(num_batches) == 1


def test_unknown_name_suggests_close_matches():
  with pytest.raises(ValueError, match=r'imagenet201.*imagenet2012'):
    data.num_classes(testing.config(name='imagenet201'))


def test_missing_dataset_gives_the_steps_to_prepare_it(tmp_path):
  cfg = testing.config(name='imagenet2012', data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError) as info:
    data.create_dataset(
        cfg,
        split='train',
        global_batch_size=2,
        image_size=32,
        seed=0,
        process_index=0,
        process_count=1,
        local_device_count=1,
    )
  message = str(info.value)
  assert '\n' not in message
  for part in (
      'ILSVRC2012_img_train.tar',
      'ILSVRC2012_img_val.tar',
      f'{tmp_path}/downloads/manual/',
      f'tfds build imagenet2012 --data_dir={tmp_path}',
  ):
    assert part in message


def test_missing_split_names_the_available_ones(tiny_dir):
  with pytest.raises(
      ValueError, match=r"^data\.eval_split='validation'.*\['test', 'train'\]"
  ):
    _tiny(tiny_dir, 'eval', 2, eval_split='validation')
