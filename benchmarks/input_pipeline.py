r"""Training input pipeline throughput on a synthetic ImageNet-like folder.

Writes `--num_images` JPEGs of typical ImageNet sizes (mostly 500x375 and
375x500; content: gradients, random shapes and noise, about ImageNet's bytes
per image) as an image folder, then measures images/s of the training
pipeline at NFNet-F0 settings (192 px; RandAugment 4 layers, magnitude 5;
MixUp 0.2 + CutMix), in total and per CPU core: wall-clock images/s divided
by the cores, and images per CPU-second used by the process (the per-core
rate even when other jobs share the machine). `f0_full` is the default
split pipeline (`augment_on='device'`: the CPU decodes, crops, resizes and
flips; the `device_augment` line times the rest, RandAugment + MixUp/CutMix +
normalisation of one device batch, on JAX's default device);
`f0_full_on_host` runs every augmentation in tf.data. It also measures the
host pipeline with augmentations removed one by one, to show where the time
goes. Prints one JSON line per measurement.

  python benchmarks/input_pipeline.py                    # ~2 minutes, 2 cores
  python benchmarks/input_pipeline.py --num_images=200 --num_batches=3  # quick

Files are read from the page cache after the first epoch: this measures
decoding and augmentation, not the disk.
"""

import argparse
import functools
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time

import numpy as np
from PIL import Image
from PIL import ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

# pylint: disable=g-import-not-at-top,wrong-import-position
from nfnets import data
from nfnets.data import testing

# pylint: enable=g-import-not-at-top,wrong-import-position

# (width, height) and their weights: ImageNet's most common sizes.
_SIZES = (
    (500, 375),
    (375, 500),
    (500, 333),
    (500, 400),
    (333, 500),
    (640, 480),
    (400, 300),
    (500, 500),
)
_SIZE_WEIGHTS = (0.40, 0.15, 0.15, 0.08, 0.06, 0.06, 0.05, 0.05)
_NUM_CLASSES = 10
# NFNet-F0's training augmentation.
_F0 = dict(
    randaugment_layers=4,
    randaugment_magnitude=5,
    mixup_alpha=0.2,
    cutmix=True,
)


def _synthetic_image(rng: np.random.Generator) -> Image.Image:
  width, height = _SIZES[rng.choice(len(_SIZES), p=_SIZE_WEIGHTS)]
  # A random linear colour gradient...
  ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
  direction = rng.normal(size=2)
  ramp = (xs * direction[0] + ys * direction[1]) / max(width, height)
  start, end = rng.uniform(0, 255, (2, 3))
  image = (
      start + (end - start) * ((ramp - ramp.min()) / np.ptp(ramp))[..., None]
  )
  canvas = Image.fromarray(image.astype(np.uint8))
  # ... some random shapes ...
  draw = ImageDraw.Draw(canvas)
  for _ in range(rng.integers(4, 12)):
    x0, x1 = sorted(rng.integers(0, width, 2))
    y0, y1 = sorted(rng.integers(0, height, 2))
    colour = tuple(int(c) for c in rng.integers(0, 256, 3))
    if rng.random() < 0.5:
      draw.ellipse([x0, y0, x1, y1], fill=colour)
    else:
      points = [
          (int(x), int(y))
          for x, y in zip(rng.integers(0, width, 5), rng.integers(0, height, 5))
      ]
      draw.polygon(points, fill=colour)
  # ... and sensor-like noise, which sets the JPEG size near ImageNet's.
  noise = rng.normal(0, 14, (height, width, 3))
  pixels = np.asarray(canvas, np.float32) + noise
  return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_folder(root: str, num_images: int, seed: int = 0) -> dict:
  """Writes `num_images` JPEGs under `root/<class>/`; returns statistics."""
  rng = np.random.default_rng(seed)
  total_bytes = 0
  for i in range(num_images):
    class_dir = os.path.join(root, f'class_{i % _NUM_CLASSES:02d}')
    os.makedirs(class_dir, exist_ok=True)
    path = os.path.join(class_dir, f'{i:06d}.JPEG')
    _synthetic_image(rng).save(path, quality=94)
    total_bytes += os.path.getsize(path)
  return {'num_images': num_images, 'mean_kb': total_bytes / num_images / 1e3}


def _cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or 'unknown'


def _cpu_seconds() -> float:
  """CPU time of this process, all threads (user + system)."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def measure(
    root,
    name,
    *,
    batch_size,
    devices,
    image_size,
    num_batches,
    warmup,
    **overrides,
) -> dict:
  cfg = testing.config(name=f'folder:{root}', **overrides)
  ds = data.create_dataset(
      cfg,
      split='train',
      global_batch_size=batch_size,
      image_size=image_size,
      seed=0,
      process_index=0,
      process_count=1,
      local_device_count=devices,
  )
  for _ in range(warmup):  # Fills the buffers and lets tf.data autotune.
    next(ds)
  start, start_cpu = time.perf_counter(), _cpu_seconds()
  for _ in range(num_batches):
    next(ds)
  seconds = time.perf_counter() - start
  cpu_seconds = _cpu_seconds() - start_cpu
  cores = len(os.sched_getaffinity(0))
  images = num_batches * batch_size
  images_per_s = images / seconds
  return {
      'benchmark': 'input_pipeline',
      'config': name,
      'augment_on': cfg.augment_on,
      'image_size': image_size,
      'randaugment': [cfg.randaugment_layers, cfg.randaugment_magnitude],
      'mixup_alpha': cfg.mixup_alpha,
      'cutmix': cfg.cutmix,
      'global_batch_size': batch_size,
      'images_per_s': round(images_per_s, 1),
      'images_per_s_per_core': round(images_per_s / cores, 1),
      # Per core, independent of other load on the machine: images per
      # second of CPU time that this process used (all its threads).
      'images_per_cpu_s': round(images / cpu_seconds, 1),
      'cpu_utilisation': round(cpu_seconds / seconds / cores, 2),
      'cores': cores,
      'seconds': round(seconds, 2),
  }


def measure_device_augment(
    *, batch_size, image_size, repeats, augmentation
) -> dict:
  """Times `device_augment.augment_batch` on JAX's default device.

  The second half of the `augment_on='device'` pipeline: RandAugment, MixUp /
  CutMix and normalisation of one device's uint8 batch, jitted, median of
  `repeats` calls after compiling. `augmentation`: the data config's
  RandAugment / mixing fields (e.g. `_F0`).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from nfnets.data import device_augment  # pylint: disable=g-import-not-at-top

  fn = jax.jit(functools.partial(device_augment.augment_batch, **augmentation))
  rng = np.random.default_rng(0)
  images = jax.device_put(
      rng.integers(0, 256, (batch_size, image_size, image_size, 3), np.uint8)
  )
  labels = jax.device_put(np.arange(batch_size, dtype=np.int32) % 10)
  key = jax.random.PRNGKey(0)
  jax.block_until_ready(fn(images, labels, key))
  times = []
  for i in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(images, labels, jax.random.fold_in(key, i)))
    times.append(time.perf_counter() - start)
  seconds = float(np.median(times))
  device = jax.devices()[0]
  return {
      'benchmark': 'input_pipeline',
      'config': 'device_augment',
      'backend': device.platform,
      'device': device.device_kind,
      'image_size': image_size,
      'randaugment': [
          augmentation['randaugment_layers'],
          augmentation['randaugment_magnitude'],
      ],
      'mixup_alpha': augmentation['mixup_alpha'],
      'cutmix': augmentation['cutmix'],
      'batch_size': batch_size,
      'ms_per_batch': round(seconds * 1e3, 2),
      'images_per_s': round(batch_size / seconds, 1),
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--num_images', type=int, default=2000)
  parser.add_argument('--batch_size', type=int, default=256)
  parser.add_argument(
      '--devices',
      type=int,
      default=8,
      help='local devices the batch is split over',
  )
  parser.add_argument('--image_size', type=int, default=192)
  parser.add_argument('--num_batches', type=int, default=12)
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument(
      '--folder',
      default=None,
      help='reuse (or create) this folder instead of a ' 'temporary one',
  )
  parser.add_argument(
      '--device_augment_only',
      action='store_true',
      help='only time the device half (JAX; no TensorFlow or files needed),'
      ' e.g. on a GPU machine',
  )
  parser.add_argument(
      '--full_only',
      action='store_true',
      help='only the F0 configuration, not the breakdown',
  )
  args = parser.parse_args(argv)
  for flag in ('num_images', 'batch_size', 'devices', 'image_size'):
    if getattr(args, flag) < 1:
      parser.error(f'--{flag} must be >= 1, got {getattr(args, flag)}')
  if args.num_batches < 1 or args.warmup < 0:
    parser.error('--num_batches must be >= 1 and --warmup >= 0')
  if args.batch_size % args.devices:
    parser.error(
        f'--batch_size={args.batch_size} is not divisible by'
        f' --devices={args.devices}'
    )
  device_augment_line = lambda: measure_device_augment(
      batch_size=args.batch_size // args.devices,
      image_size=args.image_size,
      repeats=args.num_batches,
      augmentation=_F0,
  )
  if args.device_augment_only:
    print(json.dumps(device_augment_line()), flush=True)
    return

  root = args.folder or tempfile.mkdtemp(prefix='nfnets_bench_')
  try:
    start = time.perf_counter()
    if not os.path.isdir(os.path.join(root, 'class_00')):
      stats = write_folder(root, args.num_images)
    else:
      stats = {'num_images': sum(len(f) for _, _, f in os.walk(root))}
    print(
        json.dumps(
            {
                'benchmark': 'input_pipeline',
                'dataset': 'synthetic_jpeg_folder',
                **stats,
                'write_seconds': round(time.perf_counter() - start, 1),
                'cpu': _cpu_model(),
                'cpu_count': os.cpu_count(),
                'affinity_cores': len(os.sched_getaffinity(0)),
                'python': platform.python_version(),
            }
        ),
        flush=True,
    )

    configs = [
        ('f0_full', dict(_F0, augment_on='device')),
        ('f0_full_on_host', _F0),
    ]
    if not args.full_only:
      configs += [
          ('f0_no_mixing', dict(_F0, mixup_alpha=0.0, cutmix=False)),
          (
              'crop_flip_resize_only',
              dict(_F0, randaugment_layers=0, mixup_alpha=0.0, cutmix=False),
          ),
      ]
    for name, overrides in configs:
      result = measure(
          root,
          name,
          batch_size=args.batch_size,
          devices=args.devices,
          image_size=args.image_size,
          num_batches=args.num_batches,
          warmup=args.warmup,
          **overrides,
      )
      print(json.dumps(result), flush=True)
    # The accelerator's share of the 'device' configuration (here the JAX
    # default backend; on a CPU-only machine this is CPU time too).
    print(json.dumps(device_augment_line()), flush=True)
  finally:
    if not args.folder:
      shutil.rmtree(root, ignore_errors=True)


if __name__ == '__main__':
  main()
