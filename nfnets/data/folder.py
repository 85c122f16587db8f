"""Image folders: `cfg.name = 'folder:/path/to/root'` (local or `gs://`).

Layout: one sub-folder per class holding JPEG or PNG files (extensions
`.jpg`, `.jpeg`, `.png`, any case; other files, and names starting with a
dot, are ignored), two classes at least, none of them empty. Class ids are
the sorted class-folder names' positions. Splits:

* If `root/<cfg.train_split>` (or `root/train`) is a folder, it is the train
  split and the eval split is the first folder of `root/<cfg.eval_split>`,
  `root/val`, `root/validation`, `root/test`; the classes are the train
  folder's sub-folders, and every eval class must be one of them.
* Otherwise `root`'s sub-folders are the classes and each class is split
  90/10: its files are ordered by the CRC32 of their names (stable across
  machines and listing orders) and the first `n // 10` go to eval.

Undecodable files: before training, every listed file is checked for an
image signature (JPEG, PNG, GIF, BMP) and, for JPEG and PNG, the end marker
in its last KiB (which catches empty, truncated and non-image files; a file
that is damaged inside yet structurally whole is decoded as best libjpeg
can). A JPEG or PNG without the marker there is decoded whole, and kept if
that works: phones append data after the image. The check reads 1 KiB and 16 bytes per file on 32 threads, and runs once
per process and root. Failing files are left out of both splits before
sharding, so the stream stays deterministic; one warning gives their count and
the first path. With `cfg.strict=True` the first failing file raises
`ValueError` naming it.

Each process reads every `process_count`-th file of the sorted split (class
balanced, disjoint, covering); each epoch is an exact permutation of the
process's files seeded by (seed, epoch), so resuming is free.
"""

import concurrent.futures
import dataclasses
import functools
import os
import warnings
import zlib
from typing import List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from nfnets.data import augment
from nfnets.data import batching
from nfnets.data import pipeline
from nfnets.data import tf_cpu

tf_cpu.hide_accelerators()

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')
TRAIN_FOLDER_NAMES = ('train',)
EVAL_FOLDER_NAMES = ('val', 'validation', 'test')
# One file in EVAL_EVERY goes to eval when a root has no split folders.
EVAL_EVERY = 10
_TAIL_BYTES = 1024
_SCAN_THREADS = 32


@dataclasses.dataclass(frozen=True)
class FolderIndex:
  """The checked files of an image folder, sorted by (label, path)."""

  classes: Tuple[str, ...]
  train_paths: np.ndarray
  train_labels: np.ndarray
  eval_paths: np.ndarray
  eval_labels: np.ndarray
  num_undecodable: int

  def split(self, split: str) -> Tuple[np.ndarray, np.ndarray]:
    if split == 'train':
      return self.train_paths, self.train_labels
    return self.eval_paths, self.eval_labels


def root_of(cfg) -> str:
  root = cfg.name[len(batching.FOLDER_PREFIX) :]
  if not root:
    raise ValueError(
        f"data.name={cfg.name!r} names no folder; use 'folder:/path/to/root'."
    )
  return root.rstrip('/') or '/'


def _is_dir(path: str) -> bool:
  return tf.io.gfile.isdir(path)


def _visible(name: str) -> bool:
  # Hidden entries (.ipynb_checkpoints, macOS '._x.jpg' forks) are not data.
  return not name.startswith('.')


def _subfolders(directory: str) -> List[str]:
  return sorted(
      name.rstrip('/')
      for name in tf.io.gfile.listdir(directory)
      if _visible(name) and _is_dir(os.path.join(directory, name))
  )


def _split_folders(
    root: str, train_split: str, eval_split: str
) -> Tuple[Optional[str], Optional[str]]:
  """(train folder, eval folder), or (None, None) for the 90/10 rule."""
  if not _is_dir(root):
    raise FileNotFoundError(
        f'Image folder {root!r} (data.name) does not exist or is not a'
        ' folder.'
    )
  for name in (train_split,) + TRAIN_FOLDER_NAMES:
    train_dir = os.path.join(root, name)
    if name and _is_dir(train_dir):
      break
  else:
    return None, None
  for name in (eval_split,) + EVAL_FOLDER_NAMES:
    eval_dir = os.path.join(root, name)
    if name and _is_dir(eval_dir):
      return train_dir, eval_dir
  raise FileNotFoundError(
      f'Image folder {root!r} has a train folder {train_dir!r} but no eval'
      f' folder; add one of {(eval_split,) + EVAL_FOLDER_NAMES}, or remove'
      ' the split folders to split each class 90/10.'
  )


def _image_files(directory: str) -> List[str]:
  return sorted(
      os.path.join(directory, name)
      for name in tf.io.gfile.listdir(directory)
      if _visible(name) and name.lower().endswith(IMAGE_EXTENSIONS)
  )


def _read_head_and_tail(path: str) -> Tuple[bytes, bytes]:
  if '://' in path:
    opener = functools.partial(tf.io.gfile.GFile, path, 'rb')
  else:
    opener = functools.partial(open, path, 'rb')
  with opener() as f:
    head = f.read(16)
    f.seek(0, os.SEEK_END)
    size = f.tell()
    f.seek(max(size - _TAIL_BYTES, 0))
    tail = f.read()
  return head, tail


def is_decodable(path: str) -> bool:
  """Whether a file looks like a whole JPEG/PNG/GIF/BMP image (see module)."""
  try:
    head, tail = _read_head_and_tail(path)
  except (OSError, tf.errors.OpError):
    return False
  if head.startswith(b'\xff\xd8\xff'):  # JPEG start-of-image.
    # End-of-image marker; phones append data after it (motion photos).
    return b'\xff\xd9' in tail or _decodes(path)
  if head.startswith(b'\x89PNG\r\n\x1a\n'):
    return b'IEND' in tail or _decodes(path)
  return head.startswith((b'GIF87a', b'GIF89a', b'BM'))


def _decodes(path: str) -> bool:
  """Whether TensorFlow decodes the whole file: for those the tail fails.

  A JPEG or PNG whose end marker is not in its last KiB is truncated, or
  carries data after the image (a motion photo's video, a vendor trailer);
  decoding tells them apart. Such files are few, so the cost is too.
  """
  try:
    tf.io.decode_image(
        tf.io.read_file(path), channels=3, expand_animations=False
    )
  except (tf.errors.OpError, ValueError):
    return False
  return True


def _check_files(paths: Sequence[str]) -> List[bool]:
  if not paths:
    return []
  with concurrent.futures.ThreadPoolExecutor(_SCAN_THREADS) as pool:
    return list(pool.map(is_decodable, paths, chunksize=64))


def _crc_order(path: str) -> Tuple[int, str]:
  name = os.path.basename(path)
  return zlib.crc32(name.encode('utf-8')), name


@functools.lru_cache(maxsize=8)
def _index(
    root: str, train_split: str, eval_split: str, strict: bool
) -> FolderIndex:
  """Lists, checks and splits the folder (once per process and root)."""
  train_dir, eval_dir = _split_folders(root, train_split, eval_split)
  classes = tuple(_subfolders(train_dir or root))
  if not classes:
    raise FileNotFoundError(
        f'Image folder {train_dir or root!r} has no class sub-folders; expected'
        ' one sub-folder of images per class.'
    )
  if len(classes) < 2:
    raise ValueError(
        f'Image folder {train_dir or root!r} has one class sub-folder'
        f' ({classes[0]!r}); a classifier needs two or more, one per class.'
    )
  label_of = {name: label for label, name in enumerate(classes)}

  # (path, label, split) for every listed file.
  listed = []
  for name in classes:
    class_dir = os.path.join(train_dir or root, name)
    paths = _image_files(class_dir)
    if not paths:
      # Its label would exist with nothing to learn it from.
      raise ValueError(
          f'Class folder {class_dir!r} holds no .jpg, .jpeg or .png file;'
          ' add its images or remove the folder.'
      )
    split = 'train' if train_dir else None
    listed.extend((path, label_of[name], split) for path in paths)
  if train_dir:
    for name in _subfolders(eval_dir):
      if name not in label_of:
        raise ValueError(
            f'Eval class folder {os.path.join(eval_dir, name)!r} is not a'
            f' class of the train folder {train_dir!r}.'
        )
      for path in _image_files(os.path.join(eval_dir, name)):
        listed.append((path, label_of[name], 'eval'))

  ok = _check_files([path for path, _, _ in listed])
  bad = sorted(path for (path, _, _), good in zip(listed, ok) if not good)
  if bad and strict:
    raise ValueError(
        f'Undecodable image file {bad[0]!r} (data.strict=True): remove or'
        ' replace it, or set data.strict=False to skip such files with a'
        ' warning.'
    )
  if bad:
    warnings.warn(
        f'Skipping {len(bad)} undecodable image file(s) under {root!r}'
        f' (first: {bad[0]!r}); set data.strict=True to fail instead.',
        stacklevel=2,
    )
  kept = [entry for entry, good in zip(listed, ok) if good]

  if not train_dir:
    by_class = {}
    for path, label, _ in kept:
      by_class.setdefault(label, []).append(path)
    kept = []
    for label, paths in sorted(by_class.items()):
      paths.sort(key=_crc_order)
      num_eval = len(paths) // EVAL_EVERY
      kept.extend((p, label, 'eval') for p in paths[:num_eval])
      kept.extend((p, label, 'train') for p in paths[num_eval:])

  def arrays(split):
    entries = sorted((label, path) for path, label, s in kept if s == split)
    paths = np.array([path for _, path in entries], dtype=object)
    labels = np.array([label for label, _ in entries], dtype=np.int32)
    return paths, labels

  train_paths, train_labels = arrays('train')
  eval_paths, eval_labels = arrays('eval')
  return FolderIndex(
      classes=classes,
      train_paths=train_paths,
      train_labels=train_labels,
      eval_paths=eval_paths,
      eval_labels=eval_labels,
      num_undecodable=len(bad),
  )


def index(cfg) -> FolderIndex:
  """The checked, split file list of the folder named by `cfg.name`."""
  return _index(root_of(cfg), cfg.train_split, cfg.eval_split, cfg.strict)


def num_examples(cfg, split: str) -> int:
  return len(index(cfg).split(split)[1])


@functools.lru_cache(maxsize=8)
def _class_names(root: str, train_split: str, eval_split: str):
  train_dir, _ = _split_folders(root, train_split, eval_split)
  return tuple(_subfolders(train_dir or root))


def class_names(cfg) -> Tuple[str, ...]:
  # Lists the class folders only, as `index` does: no file is checked.
  return _class_names(root_of(cfg), cfg.train_split, cfg.eval_split)


def num_classes(cfg) -> int:
  return len(class_names(cfg))


def create_dataset(
    cfg, *, split, layout, image_size, seed, start_step
) -> batching.Batches:
  """The image-folder pipeline; see `nfnets.data.create_dataset`."""
  folder_index = index(cfg)
  all_paths, all_labels = folder_index.split(split)
  if not len(all_paths):
    raise FileNotFoundError(
        f'Image folder {root_of(cfg)!r} has no decodable {split} images.'
    )
  shard = batching.shard_indices(
      len(all_paths), layout.process_index, layout.process_count
  )
  paths = tf.constant(all_paths[shard].astype(str))
  labels = tf.constant(all_labels[shard])

  if split == 'train':
    epoch_key = pipeline.key(seed, layout.process_index, pipeline.EPOCH_TAG)
    num_local = len(shard)

    def epoch_fn(epoch):
      order = tf.random.experimental.stateless_shuffle(
          tf.range(num_local, dtype=tf.int64), augment.fold_in(epoch_key, epoch)
      )
      return tf.data.Dataset.from_tensor_slices(order).map(
          lambda i: (tf.gather(paths, i), tf.gather(labels, i))
      )

    ds = pipeline.train_dataset(
        cfg,
        epoch_fn=epoch_fn,
        examples_per_epoch=num_local,
        read_fn=tf.io.read_file,
        layout=layout,
        image_size=image_size,
        seed=seed,
        start_step=start_step,
    )
    return pipeline.as_batches(
        ds,
        split=split,
        num_examples=len(all_paths),
        layout=layout,
        start_step=start_step,
    )

  num_batches = batching.eval_num_batches(len(all_paths), layout)
  ds = pipeline.eval_dataset(
      cfg,
      examples=tf.data.Dataset.from_tensor_slices((paths, labels)),
      read_fn=tf.io.read_file,
      layout=layout,
      image_size=image_size,
      num_batches=num_batches,
  )
  return pipeline.as_batches(
      ds,
      split=split,
      num_examples=len(all_paths),
      layout=layout,
      num_batches=num_batches,
  )
