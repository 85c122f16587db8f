"""Training throughput of the runner's own train step, on all local devices.

Times `nfnets.train.device_train_step` (the function `experiment.py` runs,
not a copy: `train_step` on a state whose conv kernels are kept as
`config.train.kernel_layout` says, OHWI on GPUs) pmapped over every local
device, on synthetic batches already on the devices, and prints one JSON
line per measurement: step time (steps run back to back as in the runner,
the median over windows of `SYNC_EVERY` steps) after warm-up, images/s,
compile time, peak device memory (and XLA's planned temporary memory, which
the CPU reports too) and model FLOPs utilization (3 x forward FLOPs per
image / the device's peak).

Modes:
  minimal    forward/backward + AGC + SGD-Nesterov: the work peers'
             benchmarks time.
  full_step  the runner's train step as configured: the config's optimizer
             chain (AGC, masked weight decay, schedule), EMA, label
             smoothing and MixUp/CutMix labels, on a batch that is ready;
             with the logged norms on one step in
             `config.train.log_every_steps`, as the runner (both steps
             are timed: `quiet_step_ms`, `log_step_ms`; `step_ms` is their
             average in that proportion).
  full       everything experiment.py does per step on an accelerator:
             `full_step` plus the on-device augmentation that runs before
             each step by default (RandAugment at the variant's
             layers/magnitude, MixUp/CutMix, normalisation;
             `device_augment` in the record).

With torch and timm importable (and a CUDA device), the same run also times
timm's `dm_nfnet_f0` (channels_last, bf16 autocast, SGD with timm's AGC) and
prints our ratio to it. `--thesis` also runs nf_resnet50 against resnet50_bn.
On an accelerator each measurement runs in a process of its own
(`--isolate`), so that peak memory is that measurement's and JAX's memory
reservation leaves timm the whole device.

    python benchmarks/train_throughput.py                  # device defaults
    python benchmarks/train_throughput.py --model=nfnet_f1 --batch=128
    python benchmarks/train_throughput.py --thesis         # NF vs BN ResNet-50
    # With XLA flags (every record names them as `xla_flags`):
    XLA_FLAGS=--xla_gpu_enable_fast_min_max=true \
      python benchmarks/train_throughput.py

Defaults: on an accelerator nfnet_f0, 192 px, global batch 256, bf16, all
three modes; on a CPU nfnet_tiny, 32 px, batch 8, float32 (well under 2
minutes).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nfnets import agc  # pylint: disable=g-import-not-at-top
from nfnets import models  # pylint: disable=g-import-not-at-top
from nfnets import resolve  # pylint: disable=g-import-not-at-top
from nfnets import train  # pylint: disable=g-import-not-at-top

# Dense bf16 peak FLOP/s per device (vendor figures), for MFU.
PEAK_FLOPS = {
    'H100': 989e12,
    'H200': 989e12,
    'A100': 312e12,
    'L4': 121e12,
    'TPU v4': 275e12,
    'TPU v5 lite': 197e12,
    'TPU v5e': 197e12,
    'TPU v5p': 459e12,
    'TPU v3': 123e12,
}


# Steps run back to back, as in experiment.py (which waits for the devices
# only when it logs), and the clock is read every SYNC_EVERY steps: the
# step time is the median over those windows of their mean. Waiting after
# every step would add the host's dispatch latency to each one (~2 ms for
# F0 on an H100, where the device is busy 43.7 ms per step).
SYNC_EVERY = 5

MODES = ('minimal', 'full_step', 'full')


def median_step_seconds(run_steps, steps: int) -> float:
  """Median seconds per step, over windows of SYNC_EVERY steps.

  Args:
    run_steps: `run_steps(n)` runs n steps back to back, then waits for the
      device to finish them.
    steps: steps to time in all (the last window may be shorter).
  """
  full, rest = divmod(steps, SYNC_EVERY)
  times = []
  for window in [SYNC_EVERY] * full + ([rest] if rest else []):
    start = time.perf_counter()
    run_steps(window)
    times.append((time.perf_counter() - start) / window)
  return statistics.median(times)


def defaults(on_accelerator: bool) -> dict:
  """The model, global batch, image size and dtype timed by default."""
  if on_accelerator:
    return dict(model='nfnet_f0', batch=256, image_size=192, dtype='bfloat16')
  return dict(model='nfnet_tiny', batch=8, image_size=32, dtype='float32')


def peak_flops(device) -> float | None:
  kind = device.device_kind
  for name, flops in PEAK_FLOPS.items():
    if name.lower() in kind.lower():
      return flops
  return None


def _config(model, batch, image_size, dtype):
  """An experiment config around the model, as the runner would resolve it."""
  from configs import common  # pylint: disable=g-import-not-at-top
  from nfnets import resolve  # pylint: disable=g-import-not-at-top

  config = common.get_config()
  info = models.info(model)
  config.model.family, config.model.variant = info.family, info.variant
  if info.family != 'nfnet':
    config.model.stochdepth_rate = 0.1
  config.train.batch_size = batch
  config.train.compute_dtype = dtype
  config.data.train_image_size = image_size
  config = resolve.resolve(config)
  config.unlock()
  config.steps = ml_collections.ConfigDict(
      dict(per_epoch=1000, total=100_000, warmup=1000, eval_every=0)
  )
  config.lock()
  return config


def make_step(
    config,
    mode,
    *,
    num_classes=1000,
    donate=True,
    kernel_layout='hwio',
    with_metrics=False,
):
  """(pmapped step, forward, optimizer) of `mode` for a `_config` config.

  In the full modes `with_metrics=True` gives the step of the runner's log
  steps (`train.is_log_step`), which also computes the logged norms, and
  False the step of the others; `minimal` has no logged norms.
  """
  if mode not in MODES:
    raise ValueError(f'Unknown mode {mode!r}; valid: {MODES}.')
  if mode == 'minimal' and with_metrics:
    raise ValueError("The 'minimal' step logs no norms (with_metrics).")
  forward = train.create_model(config, num_classes)
  agc_cfg = config.optimizer.agc
  if mode == 'minimal':
    optimizer = optax.chain(
        agc.adaptive_grad_clip(
            agc_cfg.clipping, agc_cfg.eps, tuple(agc_cfg.exclude)
        ),
        optax.sgd(0.1, momentum=0.9, nesterov=True),
    )
    lr_fn = lambda step: jnp.float32(0.1)
    overrides = dict(label_smoothing=0.0, ema_decay=None, with_metrics=False)
  else:
    optimizer, lr_fn = train.optimizer_and_schedule(config)
    overrides = dict(with_metrics=with_metrics)
  step_fn = jax.pmap(
      train.make_device_step(
          config,
          forward=forward,
          optimizer=optimizer,
          lr_fn=lr_fn,
          num_classes=num_classes,
          kernel_layout=kernel_layout,
          **overrides,
      ),
      axis_name=train.AXIS_NAME,
      donate_argnums=(0,) if donate else (),
  )
  return step_fn, forward, optimizer


def build_step(
    model,
    batch,
    image_size,
    dtype,
    mode,
    num_classes=1000,
    donate=True,
    kernel_layout='auto',
    with_metrics=False,
):
  """(pmapped step, replicated state, device batch, config) for one setup.

  `donate=False` gives the step fresh output buffers instead of the state's,
  which the runner does not do: an experiment, since XLA copies the outputs
  it cannot write in place into the donated buffers. `kernel_layout` is
  `config.train.kernel_layout`'s: 'auto' as the runner, or 'hwio' / 'ohwi'
  to compare them (`train.to_device_layout`). `with_metrics` as for
  `make_step`: by default the step the runner runs between log steps.
  """
  kernel_layout = resolve.kernel_layout(kernel_layout)
  config = _config(model, batch, image_size, dtype)
  step_fn, forward, optimizer = make_step(
      config,
      mode,
      num_classes=num_classes,
      donate=donate,
      kernel_layout=kernel_layout,
      with_metrics=with_metrics,
  )
  state = train.create_train_state(
      jax.random.PRNGKey(0),
      forward,
      optimizer,
      image_size,
      train.initial_loss_scale(config),
  )
  replicated = train.replicate(train.to_device_layout(state, kernel_layout))
  devices = jax.local_device_count()
  if batch % devices:
    raise ValueError(
        f'--batch={batch} is not divisible by the {devices} ' 'local devices.'
    )
  per_device = batch // devices
  rng = np.random.default_rng(0)
  host = {
      'images': rng.standard_normal(
          (devices, per_device, image_size, image_size, 3), np.float32
      ),
      'labels': rng.integers(0, num_classes, (devices, per_device), np.int32),
      'labels2': rng.integers(0, num_classes, (devices, per_device), np.int32),
      'mix_ratio': (
          rng.uniform(0.5, 1.0, (devices, per_device)).astype(np.float32)
      ),
  }
  # On the devices once: the benchmark times compute, not host transfers.
  device_batch = train.to_devices(host)
  # `full` also runs what the runner runs on the devices before each step
  # by default: RandAugment, MixUp/CutMix and normalisation of the uint8
  # crops (config.data.augment_on='device').
  augment = None
  if mode == 'full':
    augment = train.make_device_augment(config.data, seed=0)
  raw_batch = train.to_devices(
      {
          'images': rng.integers(
              0, 256, (devices, per_device, image_size, image_size, 3), np.uint8
          ),
          'labels': host['labels'],
      }
  )
  return step_fn, replicated, device_batch, config, augment, raw_batch


def _gib(num_bytes) -> float:
  return round(num_bytes / 2**30, 4)


def _peak_memory_gib():
  stats = [d.memory_stats() or {} for d in jax.local_devices()]
  peaks = [s.get('peak_bytes_in_use') for s in stats]
  if not all(peaks):
    return None
  return max(peaks) / 2**30


def time_ours(
    model,
    batch,
    image_size,
    dtype,
    mode,
    steps,
    warmup,
    donate=True,
    kernel_layout='auto',
):
  """Measures one (model, mode) setup; returns the JSON record.

  In the full modes the runner computes the logged norms on one step in
  `config.train.log_every_steps` (`train.is_log_step`): both steps are
  timed, and `step_ms` (hence images/s) is their average in that proportion.
  """
  step_fn, state, device_batch, config, augment, raw_batch = build_step(
      model,
      batch,
      image_size,
      dtype,
      mode,
      donate=donate,
      kernel_layout=kernel_layout,
  )
  start = time.perf_counter()
  step_fn = step_fn.lower(state, device_batch).compile()
  log_step_fn = None
  if mode != 'minimal':
    log_step_fn = (
        make_step(
            config,
            mode,
            donate=donate,
            kernel_layout=resolve.kernel_layout(kernel_layout),
            with_metrics=True,
        )[0]
        .lower(state, device_batch)
        .compile()
    )
  if augment is not None:
    jax.block_until_ready(augment(raw_batch, 0))
  compile_s = time.perf_counter() - start
  try:
    memory = step_fn.memory_analysis()
  except (NotImplementedError, AttributeError):  # Not every backend has it.
    memory = None

  def run(state, i, fn=step_fn):
    batch = device_batch if augment is None else augment(raw_batch, i)
    return fn(state, batch)

  state, metrics = run(state, 0)
  jax.block_until_ready(metrics)
  for i in range(warmup):
    state, metrics = run(state, i)
  jax.block_until_ready(metrics)

  def run_steps(count, fn=step_fn):
    nonlocal state, metrics
    for i in range(count):
      state, metrics = run(state, i, fn)
    jax.block_until_ready(metrics)

  median = median_step_seconds(run_steps, steps)
  log_every = log_step_s = None
  if log_step_fn is not None:
    state, metrics = run(state, 0, log_step_fn)  # warm-up
    jax.block_until_ready(metrics)
    log_step_s = median_step_seconds(
        lambda count: run_steps(count, log_step_fn), SYNC_EVERY
    )
    log_every = config.train.log_every_steps
    quiet_s = median
    median = ((log_every - 1) * quiet_s + log_step_s) / log_every
  images_per_s = batch / median
  flops = 2 * models.count_flops(model, image_size)  # multiply-adds x 2
  peak = peak_flops(jax.devices()[0])
  mfu = 3 * flops * images_per_s / (peak * jax.device_count()) if peak else None
  return dict(
      benchmark='train_throughput',
      impl='nfnets-jax',
      mode=mode,
      model=model,
      donate=donate,
      kernel_layout=resolve.kernel_layout(kernel_layout),
      batch=batch,
      image_size=image_size,
      dtype=dtype,
      steps=steps,
      sync_every=SYNC_EVERY,
      step_ms=round(1000 * median, 3),
      images_per_s=round(images_per_s, 1),
      # Full modes: the step between log steps, the log step (which also
      # computes the logged norms) and how often the runner takes it.
      quiet_step_ms=None if log_step_s is None else round(1000 * quiet_s, 3),
      log_step_ms=None if log_step_s is None else round(1000 * log_step_s, 3),
      log_every_steps=log_every,
      compile_s=round(compile_s, 2),
      peak_memory_gib=_peak_memory_gib(),
      device_augment=(
          [config.data.randaugment_layers, config.data.randaugment_magnitude]
          if augment is not None
          else None
      ),
      # XLA's buffer assignment for one device (any backend, CPU included):
      # temporaries (activations kept for backward, workspaces) and the
      # arguments (state, batch). Backends plan differently, so compare it
      # only between models on the same backend.
      xla_temp_gib=_gib(memory.temp_size_in_bytes) if memory else None,
      xla_args_gib=_gib(memory.argument_size_in_bytes) if memory else None,
      mfu=None if mfu is None else round(mfu, 4),
      devices=jax.local_device_count(),
      device_kind=jax.devices()[0].device_kind,
      jax_version=jax.__version__,
      # The XLA flags this process compiled with (children inherit them):
      # `XLA_FLAGS=... train_throughput.py` is how a flag is measured.
      xla_flags=os.environ.get('XLA_FLAGS', '').strip() or None,
  )


def time_timm(batch, image_size, steps, warmup):
  """timm's dm_nfnet_f0 train step on one CUDA device, or None if absent."""
  try:
    import timm  # pylint: disable=g-import-not-at-top
    from timm.utils import agc as timm_agc  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  if not torch.cuda.is_available():
    return None
  model = (
      timm.create_model('dm_nfnet_f0')
      .cuda()
      .to(memory_format=torch.channels_last)
  )
  optimizer = torch.optim.SGD(
      model.parameters(), lr=0.1, momentum=0.9, nesterov=True
  )
  images = torch.randn(batch, 3, image_size, image_size, device='cuda').to(
      memory_format=torch.channels_last
  )
  labels = torch.randint(0, 1000, (batch,), device='cuda')
  loss_fn = torch.nn.CrossEntropyLoss()

  def step():
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast('cuda', dtype=torch.bfloat16):
      loss = loss_fn(model(images), labels)
    loss.backward()
    timm_agc.adaptive_clip_grad(model.parameters(), clip_factor=0.01)
    optimizer.step()

  for _ in range(warmup + 1):
    step()
  torch.cuda.synchronize()
  torch.cuda.reset_peak_memory_stats()

  def run_steps(count):
    for _ in range(count):
      step()
    torch.cuda.synchronize()

  median = median_step_seconds(run_steps, steps)
  return dict(
      benchmark='train_throughput',
      impl='timm',
      mode='minimal',
      model='dm_nfnet_f0',
      batch=batch,
      image_size=image_size,
      dtype='bfloat16',
      steps=steps,
      sync_every=SYNC_EVERY,
      step_ms=round(1000 * median, 3),
      images_per_s=round(batch / median, 1),
      peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30,
      device_kind=torch.cuda.get_device_name(),
      timm_version=timm.__version__,
      torch_version=torch.__version__,
  )


def _measure(job: dict) -> dict | None:
  """Runs one measurement described by `job` (see `main`)."""
  if job['impl'] == 'timm':
    return time_timm(
        job['batch'], job['image_size'], job['steps'], job['warmup']
    )
  return time_ours(
      job['model'],
      job['batch'],
      job['image_size'],
      job['dtype'],
      job['mode'],
      job['steps'],
      job['warmup'],
      job.get('donate', True),
      job.get('kernel_layout', 'auto'),
  )


def _measure_isolated(job: dict) -> dict | None:
  """`_measure` in a fresh process: its own peak memory, the whole device.

  Device memory statistics keep a process-lifetime peak and JAX reserves
  most of the device's memory when it starts, so measurements that share a
  process (ours one after another, or timm's beside JAX) would report and
  leave each other's memory. A failed child gives a record with `error`.
  """
  proc = subprocess.run(
      [sys.executable, os.path.abspath(__file__), '--job', json.dumps(job)],
      capture_output=True,
      text=True,
      check=False,
  )
  lines = [l for l in proc.stdout.splitlines() if l.startswith(('{', 'null'))]
  if proc.returncode == 0 and lines:
    return json.loads(lines[-1])
  tail = (proc.stderr.strip().splitlines() or ['no output'])[-1]
  sys.stderr.write(proc.stderr[-4000:])
  return dict(
      benchmark='train_throughput',
      impl=job['impl'],
      model=job.get('model'),
      mode=job.get('mode'),
      error=f'exit {proc.returncode}: {tail[-300:]}',
  )


def _ratio(a, b):
  """a's images/s over b's, or None where either measurement failed."""
  if not a or not b or 'images_per_s' not in a or 'images_per_s' not in b:
    return None
  return round(a['images_per_s'] / b['images_per_s'], 4)


def check_sizes(parser, args, flags):
  """`parser.error` unless each of `args`' `flags` is None or >= 1.

  Left out (None), a size takes the backend's default; given, it is used as
  is, so 0 must not quietly mean the default.
  """
  for flag in flags:
    value = getattr(args, flag)
    if value is not None and value < 1:
      parser.error(f'--{flag} must be >= 1 (leave it out for the default)')


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', default=None)
  parser.add_argument(
      '--batch',
      type=int,
      default=None,
      help='global batch over all local devices',
  )
  parser.add_argument('--image_size', type=int, default=None)
  parser.add_argument(
      '--dtype', default=None, choices=['bfloat16', 'float32', 'float16']
  )
  parser.add_argument('--modes', default=','.join(MODES))
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument(
      '--thesis',
      action='store_true',
      help='also time nf_resnet50 vs resnet50_bn (224 px)',
  )
  parser.add_argument('--thesis_batch', type=int, default=None)
  parser.add_argument('--thesis_image_size', type=int, default=None)
  parser.add_argument('--no_timm', action='store_true')
  parser.add_argument(
      '--no_donate',
      action='store_true',
      help="our steps don't donate the state (an experiment; see build_step)",
  )
  parser.add_argument(
      '--kernel_layout',
      default='auto',
      choices=['auto', *resolve.KERNEL_LAYOUTS],
      help='conv kernels between our steps (config.train.kernel_layout)',
  )
  parser.add_argument(
      '--isolate',
      default='auto',
      choices=['auto', 'yes', 'no'],
      help=(
          'each measurement in its own process (auto: on accelerators, '
          'where peak memory is per process)'
      ),
  )
  parser.add_argument('--job', default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.job:  # A child of _measure_isolated: one measurement, one line.
    print(json.dumps(_measure(json.loads(args.job))), flush=True)
    return
  if args.steps < 1 or args.warmup < 0:
    parser.error('--steps must be >= 1 and --warmup >= 0')
  check_sizes(
      parser, args, ('batch', 'image_size', 'thesis_batch', 'thesis_image_size')
  )
  modes = [m for m in args.modes.split(',') if m]
  if not modes:
    parser.error(f'--modes={args.modes!r} names no mode: use some of {MODES}')
  for mode in modes:
    if mode not in MODES:
      parser.error(f'unknown mode {mode!r}: use some of {MODES}')
  if args.model is not None:
    try:
      models.info(args.model)
    except ValueError as e:
      parser.error(f'--model: {e}')

  # Where children measure, this process only looks at the devices, so it
  # must not reserve their memory first. The variable matters only while
  # the backend starts; the children get the environment as it was.
  no_prealloc = (
      args.isolate != 'no' and 'XLA_PYTHON_CLIENT_PREALLOCATE' not in os.environ
  )
  if no_prealloc:
    os.environ['XLA_PYTHON_CLIENT_PREALLOCATE'] = 'false'
  try:
    on_accelerator = jax.devices()[0].platform != 'cpu'
  finally:
    if no_prealloc:
      del os.environ['XLA_PYTHON_CLIENT_PREALLOCATE']
  isolate = args.isolate == 'yes' or (args.isolate == 'auto' and on_accelerator)
  default = defaults(on_accelerator)
  model = args.model or default['model']
  models.info(model)  # unknown names fail here, listing the valid ones
  batch = args.batch or default['batch']
  size = args.image_size or default['image_size']
  dtype = args.dtype or default['dtype']
  common = dict(steps=args.steps, warmup=args.warmup)

  def measure(job):
    job = dict(job, **common)
    if job['impl'] == 'nfnets-jax':
      if args.no_donate:
        job['donate'] = False
      job['kernel_layout'] = args.kernel_layout
    record = _measure_isolated(job) if isolate else _measure(job)
    if record is not None:
      print(json.dumps(record), flush=True)
    return record

  def compare(name, ratio, **extra):
    line = dict(benchmark='train_throughput', comparison=name, ratio=ratio)
    print(json.dumps(dict(line, **extra)), flush=True)

  def ours(model, mode, batch, image_size):
    return measure(
        dict(
            impl='nfnets-jax',
            model=model,
            mode=mode,
            batch=batch,
            image_size=image_size,
            dtype=dtype,
        )
    )

  records = {}
  for mode in [m for m in args.modes.split(',') if m]:
    records[mode] = ours(model, mode, batch, size)
  for mode in ('full_step', 'full'):
    if 'minimal' in records and mode in records:
      compare(
          f'{mode}_vs_minimal',
          _ratio(records[mode], records['minimal']),
          model=model,
      )
  if not args.no_timm and model == 'nfnet_f0' and on_accelerator:
    theirs = measure(dict(impl='timm', batch=batch, image_size=size))
    if theirs is not None and 'minimal' in records:
      compare('ours_vs_timm', _ratio(records['minimal'], theirs), model=model)
  if args.thesis:
    thesis_batch = args.thesis_batch or (256 if on_accelerator else 8)
    thesis_size = args.thesis_image_size or (224 if on_accelerator else 32)
    nf, bn = [
        ours(name, 'minimal', thesis_batch, thesis_size)
        for name in ('nf_resnet50', 'resnet50_bn')
    ]
    compare(
        'nf_resnet50_vs_resnet50_bn',
        _ratio(nf, bn),
        nf_peak_memory_gib=(nf or {}).get('peak_memory_gib'),
        bn_peak_memory_gib=(bn or {}).get('peak_memory_gib'),
        nf_xla_temp_gib=(nf or {}).get('xla_temp_gib'),
        bn_xla_temp_gib=(bn or {}).get('xla_temp_gib'),
    )


if __name__ == '__main__':
  main()
