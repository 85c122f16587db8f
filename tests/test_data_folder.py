"""Image-folder pipelines: layout, corrupt files, shards, eval and resume.

Every image is a solid colour whose blue channel is 12 x its id; crops,
resizes and flips keep a solid image solid, so each output image names its
source (the spacing absorbs JPEG's colour drift).
"""

import os
import warnings

import numpy as np
from PIL import Image
import pytest

from nfnets import data
from nfnets.data import batching
from nfnets.data import folder
from nfnets.data import testing

_ID_STEP = 12
_PLAIN = dict(randaugment_layers=0, mixup_alpha=0.0, cutmix=False)


def _write_images(directory, ids, fmt='png'):
  os.makedirs(directory, exist_ok=True)
  for i in ids:
    size = (12 + i % 7, 10 + i % 5)  # Varied sizes.
    array = np.full(size + (3,), 128, np.uint8)
    array[..., 2] = (_ID_STEP * i) % 256
    Image.fromarray(array).save(os.path.join(directory, f'{i:03d}.{fmt}'))


def _make_folder(root, *, corrupt=False):
  """train: 3 classes x 7 (ids 0..20); val: 2 classes x 5 (ids 0..9)."""
  for label, name in enumerate(('cat', 'dog', 'emu')):
    _write_images(
        os.path.join(root, 'train', name),
        range(7 * label, 7 * label + 7),
        fmt='jpeg' if label else 'png',
    )
  for label, name in enumerate(('cat', 'dog')):
    _write_images(
        os.path.join(root, 'val', name), range(5 * label, 5 * label + 5)
    )
  with open(os.path.join(root, 'train', 'cat', 'notes.txt'), 'w') as f:
    f.write('not an image, not listed')
  if corrupt:
    # A truncated JPEG: the head of a real one, no end-of-image marker.
    with open(os.path.join(root, 'train', 'dog', '007.jpeg'), 'rb') as f:
      head = f.read(60)
    with open(os.path.join(root, 'train', 'dog', 'broken.jpg'), 'wb') as f:
      f.write(head)
  return root


def _ids(batch):
  """The id (blue channel) of every image of a batch; checks solidity."""
  images = batch['images'].reshape((-1,) + batch['images'].shape[2:])
  pixels = images * np.array(batching.STDDEV_RGB) + np.array(batching.MEAN_RGB)
  ids = []
  for image in pixels:
    # JPEG colours drift by a few levels; PNGs are exact.
    assert np.ptp(image[..., 2]) < _ID_STEP / 2
    ids.append(int(round(float(np.median(image[..., 2])) / _ID_STEP)))
  return ids


def _folder(
    root,
    split,
    global_batch_size,
    *,
    process_index=0,
    process_count=1,
    local_device_count=1,
    start_step=0,
    **overrides,
):
  cfg = testing.config(name=f'folder:{root}', **overrides)
  return data.create_dataset(
      cfg,
      split=split,
      global_batch_size=global_batch_size,
      image_size=8,
      seed=0,
      start_step=start_step,
      process_index=process_index,
      process_count=process_count,
      local_device_count=local_device_count,
  )


def test_layout_counts_and_classes(tmp_path):
  root = _make_folder(str(tmp_path))
  cfg = testing.config(name=f'folder:{root}')
  assert data.num_classes(cfg) == 3
  assert data.num_examples(cfg, 'train') == 21
  assert data.num_examples(cfg, 'eval') == 10
  index = folder.index(cfg)
  assert index.classes == ('cat', 'dog', 'emu')
  np.testing.assert_array_equal(np.bincount(index.eval_labels), [5, 5])


def test_corrupt_file_is_skipped_with_one_warning(tmp_path):
  root = _make_folder(str(tmp_path), corrupt=True)
  with pytest.warns(UserWarning) as record:
    ds = _folder(root, 'train', 4, **_PLAIN)
    batch = next(ds)
    data.num_examples(testing.config(name=f'folder:{root}'), 'train')
  messages = [str(w.message) for w in record if 'undecodable' in str(w.message)]
  assert len(messages) == 1
  assert 'Skipping 1 undecodable' in messages[0]
  assert 'broken.jpg' in messages[0]
  assert ds.num_examples == 21
  assert batch['images'].shape == (1, 4, 8, 8, 3)
  assert np.isfinite(batch['images']).all()


def test_corrupt_file_fails_when_strict(tmp_path):
  root = _make_folder(str(tmp_path), corrupt=True)
  with pytest.raises(ValueError, match=r'broken\.jpg.*data\.strict'):
    _folder(root, 'train', 4, strict=True)


def test_structural_check(tmp_path):
  root = _make_folder(str(tmp_path), corrupt=True)
  assert folder.is_decodable(os.path.join(root, 'train', 'dog', '007.jpeg'))
  assert folder.is_decodable(os.path.join(root, 'train', 'cat', '000.png'))
  assert not folder.is_decodable(
      os.path.join(root, 'train', 'dog', 'broken.jpg')
  )
  empty = os.path.join(root, 'empty.png')
  open(empty, 'wb').close()
  assert not folder.is_decodable(empty)
  assert not folder.is_decodable(os.path.join(root, 'missing.png'))


@pytest.mark.parametrize('fmt', ['jpeg', 'png'])
def test_data_after_the_image_is_kept_and_a_cut_image_is_not(tmp_path, fmt):
  # Phones append data after the end marker (motion photos): those images
  # decode whole and used to be dropped as undecodable.
  rng = np.random.default_rng(0)
  path = tmp_path / f'photo.{fmt}'
  Image.fromarray(rng.integers(0, 256, (64, 80, 3), np.uint8)).save(path)
  whole = path.read_bytes()
  trailer = tmp_path / f'trailer.{fmt}'
  trailer.write_bytes(whole + bytes(4096))
  assert folder.is_decodable(str(trailer))
  cut = tmp_path / f'cut.{fmt}'
  cut.write_bytes(whole[: len(whole) // 2])
  assert not folder.is_decodable(str(cut))


def test_two_process_shards_are_disjoint_and_cover(tmp_path):
  root = _make_folder(str(tmp_path))
  shards = []
  for process_index, size in ((0, 11), (1, 10)):
    stream = _folder(
        root, 'train', 2, process_index=process_index, process_count=2, **_PLAIN
    )
    ids = []
    while len(ids) < size:
      ids += _ids(next(stream))
    shards.append(ids[:size])
  assert not set(shards[0]) & set(shards[1])
  assert sorted(shards[0] + shards[1]) == list(range(21))
  # The shards are strided over the class-sorted files: both see all classes.
  assert {i // 7 for i in shards[0]} == {i // 7 for i in shards[1]} == {0, 1, 2}


@pytest.mark.parametrize('process_count', [1, 2])
def test_eval_yields_every_example_exactly_once(tmp_path, process_count):
  root = _make_folder(str(tmp_path))
  ids, total, num_batches = [], 0.0, set()
  for process_index in range(process_count):
    ds = _folder(
        root,
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
      ids += [i for i, r in zip(_ids(batch), real) if r]
  assert total == 10
  assert sorted(ids) == list(range(10))
  assert len(num_batches) == 1


def test_resume_equals_uninterrupted_stream(tmp_path):
  root = _make_folder(str(tmp_path))
  kwargs = dict(local_device_count=2, randaugment_layers=1)
  stream = _folder(root, 'train', 8, **kwargs)
  batches = [next(stream) for _ in range(6)]
  resumed = next(_folder(root, 'train', 8, start_step=5, **kwargs))
  for key in batches[5]:
    np.testing.assert_array_equal(resumed[key], batches[5][key])
  assert not np.array_equal(batches[4]['images'], batches[5]['images'])


def test_device_path_yields_unaugmented_uint8_crops_and_resumes(tmp_path):
  root = _make_folder(str(tmp_path))
  # F0-like augmentation, but left to the accelerator: the host only crops,
  # resizes and flips, so every image is still one solid colour (its id)
  # and carries its own label.
  kwargs = dict(local_device_count=2, augment_on='device')
  stream = _folder(root, 'train', 8, **kwargs)
  batches = [next(stream) for _ in range(4)]
  for batch in batches:
    assert set(batch) == {'images', 'labels'}
    assert batch['images'].shape == (2, 4, 8, 8, 3)
    assert batch['images'].dtype == np.uint8
    assert batch['labels'].dtype == np.int32
    blue = batch['images'][..., 2].reshape(8, -1).astype(np.float32)
    assert (np.ptp(blue, axis=1) < _ID_STEP / 2).all()
    ids = np.round(np.median(blue, axis=1) / _ID_STEP).astype(int)
    np.testing.assert_array_equal(ids // 7, batch['labels'].reshape(-1))
  resumed = next(_folder(root, 'train', 8, start_step=3, **kwargs))
  for key in batches[3]:
    np.testing.assert_array_equal(resumed[key], batches[3][key])
  with pytest.raises(ValueError, match=r'data\.augment_on'):
    _folder(root, 'train', 8, augment_on='gpu')


def test_root_without_split_folders_is_split_90_10(tmp_path):
  root = str(tmp_path)
  _write_images(os.path.join(root, 'a'), range(0, 20))
  _write_images(os.path.join(root, 'b'), range(20, 45))
  cfg = testing.config(name=f'folder:{root}')
  index = folder.index(cfg)
  assert index.classes == ('a', 'b')
  assert len(index.eval_paths) == 2 + 2
  assert len(index.train_paths) == 18 + 23
  assert not set(index.eval_paths) & set(index.train_paths)
  # Deterministic: the same files go to eval when listed again.
  folder._index.cache_clear()  # pylint: disable=protected-access
  assert list(folder.index(cfg).eval_paths) == list(index.eval_paths)


def test_missing_folder_and_missing_eval_folder(tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    data.num_examples(
        testing.config(name=f'folder:{tmp_path}/nowhere'), 'train'
    )
  _write_images(os.path.join(str(tmp_path), 'train', 'a'), range(3))
  with pytest.raises(FileNotFoundError, match='no eval folder'):
    data.num_examples(testing.config(name=f'folder:{tmp_path}'), 'eval')


def test_no_warning_without_corrupt_files(tmp_path):
  root = _make_folder(str(tmp_path))
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    data.num_examples(testing.config(name=f'folder:{root}'), 'train')


def test_one_class_or_an_empty_class_folder_is_an_error(tmp_path):
  # Either used to train: a 1-way classifier, or a label with no images.
  one = tmp_path / 'one'
  _write_images(str(one / 'only'), range(12))
  with pytest.raises(ValueError, match=r"one class sub-folder \('only'\)"):
    data.num_examples(testing.config(name=f'folder:{one}'), 'train')
  empty = tmp_path / 'empty'
  _write_images(str(empty / 'a'), range(12))
  _write_images(str(empty / 'b'), range(12, 24))
  (empty / 'c').mkdir()
  (empty / 'c' / 'notes.txt').write_text('not an image')
  with pytest.raises(ValueError, match=r"Class folder '.*empty/c' holds no"):
    data.num_examples(testing.config(name=f'folder:{empty}'), 'train')


def test_an_empty_split_is_refused_before_training(tmp_path):
  # Both used to surface late: an empty eval split after all of training,
  # no decodable train image as 'num_train_examples must be a positive int'.
  import tiny_config  # pylint: disable=g-import-not-at-top
  from nfnets import train  # pylint: disable=g-import-not-at-top

  small = tmp_path / 'small'  # 5 per class: 5 // 10 = 0 go to eval
  _write_images(str(small / 'a'), range(5))
  _write_images(str(small / 'b'), range(5, 10))
  config = tiny_config.get_config(2)
  config.data.name = f'folder:{small}'
  with pytest.raises(
      ValueError, match=r'has no eval examples .*one in 10 of its images'
  ):
    train.prepare(config)

  broken = tmp_path / 'broken'
  _write_images(str(broken / 'val' / 'a'), range(2))
  for name in ('a', 'b'):
    (broken / 'train' / name).mkdir(parents=True)
    (broken / 'train' / name / 'x.jpg').write_bytes(b'not a jpeg')
  config.data.name = f'folder:{broken}'
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')  # the skipped files' warning
    with pytest.raises(
        ValueError,
        match=r"folder:.*broken' has no train examples \(decodable",
    ):
      train.prepare(config)
