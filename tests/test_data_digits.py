"""Tests of the embedded digits pipeline and the shared batch layout.

None of these import TensorFlow (checked by `test_import_is_light`).
"""

import collections
import os
import subprocess
import sys

import numpy as np
import pytest

from nfnets import data
from nfnets.data import testing


def _digits(
    split,
    global_batch_size,
    *,
    image_size=32,
    seed=0,
    start_step=0,
    process_index=0,
    process_count=1,
    local_device_count=2,
    **overrides,
):
  return data.create_dataset(
      testing.config(name='digits', **overrides),
      split=split,
      global_batch_size=global_batch_size,
      image_size=image_size,
      seed=seed,
      start_step=start_step,
      process_index=process_index,
      process_count=process_count,
      local_device_count=local_device_count,
  )


def _image_keys(images):
  """Hashable identity of each image (exact bytes)."""
  return [img.tobytes() for img in images.reshape((-1,) + images.shape[2:])]


def test_train_batch_layout_and_ranges():
  batch = next(_digits('train', 16))
  assert set(batch) == {'images', 'labels', 'labels2', 'mix_ratio'}
  assert batch['images'].shape == (2, 8, 32, 32, 3)
  assert batch['images'].dtype == np.float32
  for key in ('labels', 'labels2'):
    assert batch[key].shape == (2, 8) and batch[key].dtype == np.int32
    assert (
        (batch[key] >= 0) & (batch[key] < data.num_classes(testing.config()))
    ).all()
  assert batch['mix_ratio'].shape == (2, 8)
  assert batch['mix_ratio'].dtype == np.float32
  assert ((batch['mix_ratio'] >= 0) & (batch['mix_ratio'] <= 1)).all()
  assert np.isfinite(batch['images']).all()
  # Greyscale replicated to RGB, standardised with the digits' statistics.
  np.testing.assert_array_equal(
      batch['images'][..., 0], batch['images'][..., 2]
  )
  assert abs(batch['images'].mean()) < 0.5
  assert 0.5 < batch['images'].std() < 1.5


def test_no_mixing_returns_own_labels_and_unit_ratio():
  batch = next(_digits('train', 8, mixup_alpha=0.0, cutmix=False))
  np.testing.assert_array_equal(batch['labels2'], batch['labels'])
  np.testing.assert_array_equal(batch['mix_ratio'], np.ones((2, 4)))


def test_image_size_other_than_32_resizes():
  assert next(_digits('train', 4, image_size=48))['images'].shape == (
      2,
      2,
      48,
      48,
      3,
  )
  assert next(_digits('eval', 4, image_size=20))['images'].shape == (
      2,
      2,
      20,
      20,
      3,
  )


def test_num_examples_and_classes():
  cfg = testing.config(name='digits')
  assert data.num_examples(cfg, 'train') == 1437
  assert data.num_examples(cfg, 'eval') == 360
  assert data.num_classes(cfg) == 10
  with pytest.raises(ValueError, match='split'):
    data.num_examples(cfg, 'validation')


def test_resume_equals_uninterrupted_stream():
  # 1,437 examples at 256 per step: steps 5 and 6 straddle the epoch boundary.
  stream = _digits('train', 256)
  batches = [next(stream) for _ in range(7)]
  resumed = _digits('train', 256, start_step=5)
  for step in (5, 6):
    got = next(resumed)
    for key in batches[step]:
      np.testing.assert_array_equal(got[key], batches[step][key])
  # ... and the stream is not constant: the steps differ, and so do seeds.
  assert not np.array_equal(batches[5]['images'], batches[6]['images'])
  other_seed = next(_digits('train', 256, seed=1, start_step=5))
  assert not np.array_equal(other_seed['images'], batches[5]['images'])


def test_process_slices_are_disjoint_and_make_the_global_batch():
  # Two processes x 1 device see exactly one process x 2 devices' batches,
  # augmentation and mixing included: multi-host runs equal one host's.
  for step in (0, 7, 44):
    whole = next(
        _digits(
            'train',
            32,
            start_step=step,
            process_index=0,
            process_count=1,
            local_device_count=2,
        )
    )
    parts = [
        next(
            _digits(
                'train',
                32,
                start_step=step,
                process_index=p,
                process_count=2,
                local_device_count=1,
            )
        )
        for p in (0, 1)
    ]
    for key in whole:
      np.testing.assert_array_equal(
          np.concatenate([part[key] for part in parts]), whole[key]
      )
    keys0 = _image_keys(parts[0]['images'])
    keys1 = _image_keys(parts[1]['images'])
    assert not set(keys0) & set(keys1)


def test_one_epoch_of_the_global_stream_covers_the_split():
  # At 8 px the translation range is 0, and mixing is off: images are exact.
  stream = _digits(
      'train',
      479,
      image_size=8,
      process_index=0,
      process_count=1,
      local_device_count=1,
      mixup_alpha=0.0,
      cutmix=False,
  )
  keys = []
  for _ in range(3):  # 3 x 479 = 1437, the whole split
    keys += _image_keys(next(stream)['images'])
  assert len(keys) == len(set(keys)) == 1437


@pytest.mark.parametrize('process_count', [1, 2])
def test_eval_yields_every_example_exactly_once(process_count):
  # 360 examples; 64 per step does not divide it.
  reference = collections.Counter(
      _image_keys(
          np.concatenate(
              [b['images'] for b in _digits('eval', 360, local_device_count=1)]
          )
      )
  )
  seen = collections.Counter()
  labels_seen = collections.Counter()
  num_batches = set()
  total_mask = 0.0
  for process_index in range(process_count):
    ds = _digits(
        'eval', 64, process_index=process_index, process_count=process_count
    )
    batches = list(ds)
    num_batches.add(len(batches))
    assert len(batches) == ds.num_batches
    for batch in batches:
      assert batch['mask'].shape == (2, 32 // process_count)
      real = batch['mask'].reshape(-1) == 1
      total_mask += batch['mask'].sum()
      images = batch['images'].reshape((-1, 32, 32, 3))[real]
      seen.update(img.tobytes() for img in images)
      labels_seen.update(batch['labels'].reshape(-1)[real].tolist())
  assert total_mask == 360
  assert seen == reference
  assert len(num_batches) == 1  # Every process runs the same eval steps.
  assert sorted(labels_seen) == list(range(10))


def test_eval_can_be_iterated_again():
  ds = _digits('eval', 128)
  first = [b['labels'] for b in ds]
  second = [b['labels'] for b in ds]
  assert len(first) == len(second) == 3
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a, b)


def test_batch_not_divisible_by_devices_raises():
  with pytest.raises(ValueError, match=r'global_batch_size=12 .* 8'):
    _digits('train', 12, local_device_count=8)
  with pytest.raises(ValueError, match=r'global_batch_size=6 .* 4'):
    _digits('train', 6, process_count=2, local_device_count=2)


def test_bad_config_values_raise():
  with pytest.raises(ValueError, match=r'data\.eval_resize'):
    _digits('eval', 8, eval_resize='squash')
  with pytest.raises(ValueError, match='split'):
    _digits('test', 8)
  with pytest.raises(ValueError, match=r'data\.shuffle_buffer=0'):
    _digits('train', 8, shuffle_buffer=0)
  with pytest.raises(ValueError, match=r'data\.prefetch=-2 .*autotune'):
    _digits('train', 8, prefetch=-2)


def test_split_strings_that_select_other_digits_raise():
  # The split is fixed: a slice would otherwise be ignored without a word.
  with pytest.raises(ValueError, match=r"^data\.train_split='train\[:50%\]'"):
    _digits('train', 8, train_split='train[:50%]')
  with pytest.raises(
      ValueError, match=r"^data\.eval_split='validation\[:10\]'"
  ):
    data.num_examples(
        testing.config(name='digits', eval_split='validation[:10]'), 'eval'
    )
  for name in ('validation', 'test', 'eval'):
    config = testing.config(name='digits', eval_split=name)
    assert data.num_examples(config, 'eval') == 360


def test_device_count_defaults_to_jax():
  import jax  # pylint: disable=g-import-not-at-top

  devices = jax.local_device_count()
  ds = data.create_dataset(
      testing.config(),
      split='train',
      global_batch_size=2 * devices,
      image_size=16,
      seed=0,
  )
  assert next(ds)['images'].shape[:2] == (devices, 2)


def test_import_is_light():
  code = (
      'import sys, nfnets.data; '
      'print("tensorflow" in sys.modules, "sklearn" in sys.modules)'
  )
  out = subprocess.run(
      [sys.executable, '-c', code],
      capture_output=True,
      text=True,
      check=True,
      cwd=os.path.dirname(os.path.dirname(__file__)),
  ).stdout
  assert out.split() == ['False', 'False']
