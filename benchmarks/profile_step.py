"""Where the train step's device time goes: a per-op profile as JSON lines.

Builds the same pmapped `nfnets.train.device_train_step` as
train_throughput.py, traces a few steps with `jax.profiler` and attributes
the device time to the compiled program's HLO instructions (each kernel's
`hlo_op`), which it maps back to their kind (cuDNN forward / backward-input
/ backward-filter convolution, GEMM, elementwise or reduction fusion, copy,
collective) and to the JAX/Haiku op that made them (`op_name` metadata:
module path and primitive). Prints, over the traced steps:

  * one `summary` line: the untraced step time (timed as in
    train_throughput.py), and per traced step on average the device's busy
    time (the union of its kernel intervals) and the kernel time summed per
    kind;
  * `--top` lines for the costliest HLO instructions, with the bandwidth
    their operands and outputs imply (`gb_per_s`, an upper bound).

In the full modes the step profiled is the one the runner runs between log
steps, without the logged norms (99 steps in 100 by default).

With `--mode=full` on an accelerator the runner's on-device augmentation is
a program of its own that runs before each step; it is traced separately
and gets its own lines (`"program": "augment"`; the train step's are
`"program": "train_step"`).

With `--out_dir` it also keeps the Perfetto trace (`perfetto_trace.json.gz`,
open it at ui.perfetto.dev) and the optimized HLO (`hlo.txt.gz`), and the
augmentation's as `augment_perfetto_trace.json.gz` and `augment_hlo.txt.gz`.

    python benchmarks/profile_step.py                       # F0 on a GPU
    python benchmarks/profile_step.py --model=nf_resnet50 --image_size=224

On a CPU (tiny defaults, for trying it) XLA runs ops on several threads, so
per-kind sums there can exceed the step time.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import shutil
import sys
import tempfile

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import hlo_memory  # pylint: disable=g-import-not-at-top
import train_throughput  # pylint: disable=g-import-not-at-top

from nfnets import train  # pylint: disable=g-import-not-at-top

_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$')
# The first `name(` right of the '=': shapes (tuples too) never match it.
_OPCODE = re.compile(r'(?:^|\s)([a-z][\w\-]*)\(')
_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_KIND = re.compile(r'kind=(k\w+)')
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def _category(text: str) -> str:
  """The kind of one HLO instruction from its text (right of the '=')."""
  target = _TARGET.search(text)
  if target:
    name = target.group(1)
    if 'convBackwardFilter' in name:
      return 'conv_backward_filter'
    if 'convBackwardInput' in name:
      return 'conv_backward_input'
    if 'conv' in name.lower():
      return 'conv_forward'
    if 'cublas' in name.lower() or 'gemm' in name.lower():
      return 'gemm'
    return 'custom_call:' + name
  opcode = _OPCODE.search(text)
  opcode = opcode.group(1) if opcode else 'unknown'
  if opcode == 'fusion':
    if 'gemm' in text:  # e.g. "__triton_nested_gemm_fusion"
      return 'gemm'
    if 'cudnn' in text:
      return 'cudnn_fusion'
    kind = _KIND.search(text)
    return {
        'kLoop': 'elementwise_fusion',
        'kInput': 'reduction_fusion',
        'kOutput': 'output_fusion',
    }.get(kind.group(1) if kind else '', 'fusion')
  if opcode == 'convolution':
    return 'conv'
  if opcode in ('dot',):
    return 'gemm'
  if opcode in ('copy', 'transpose', 'copy-start', 'copy-done'):
    return 'copy_transpose'
  if opcode.startswith(('all-', 'reduce-scatter', 'collective')):
    return 'collective'
  return opcode


def parse_hlo(text: str) -> dict[str, tuple[str, str]]:
  """Maps each instruction name of an HLO module to (category, op_name)."""
  out = {}
  for line in text.splitlines():
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    name, rest = match.groups()
    op_name = _OP_NAME.search(rest)
    out[name] = (_category(rest), op_name.group(1) if op_name else '')
  return out


def instruction_bytes(text: str) -> dict[str, int]:
  """Bytes each entry instruction of an HLO module reads and writes, at most.

  Its output's plus its operands' (an upper bound: a fusion may read only
  part of an operand), for the bandwidth of the top ops: a pass over
  activations far below the device's memory bandwidth is worth a look.
  """
  instructions = hlo_memory.entry_instructions(text)
  shapes = {ins['name']: ins['shape'] for ins in instructions}
  return {
      ins['name']: (
          hlo_memory.shape_bytes(ins['shape'])
          + sum(
              hlo_memory.shape_bytes(shapes.get(o, '')) for o in ins['operands']
          )
      )
      for ins in instructions
  }


def _union_length(intervals) -> float:
  total, end = 0.0, float('-inf')
  for start, stop in sorted(intervals):
    if stop <= end:
      continue
    total += stop - max(start, end)
    end = stop
  return total


def kernel_events(trace: dict) -> list[dict]:
  """The trace's op events, each with an `op` key naming its HLO instruction.

  On a GPU: the kernels on the device's stream timelines (XLA tags each with
  its `hlo_op`); failing that, the per-op line the profiler derives from
  them ('XLA Ops'); failing that, the kernels by their own names. On a CPU:
  the host's op events. Keeps only the HLO module with the most time (the
  train step), so the copies and metric reads around it do not count.
  """
  events = trace['traceEvents'] if isinstance(trace, dict) else trace
  processes, threads = {}, {}
  for e in events:
    if e.get('ph') == 'M' and e.get('name') == 'process_name':
      processes[e['pid']] = e['args']['name']
    elif e.get('ph') == 'M' and e.get('name') == 'thread_name':
      threads[(e['pid'], e['tid'])] = e['args']['name']
  device_pids = {p for p, n in processes.items() if n.startswith('/device:')}
  spans = [e for e in events if e.get('ph') == 'X' and 'dur' in e]
  thread = lambda e: threads.get((e['pid'], e['tid']), '')
  if device_pids:
    on_device = [e for e in spans if e['pid'] in device_pids]
    streams = [e for e in on_device if 'stream' in thread(e).lower()]
    tagged = [
        dict(e, op=e['args']['hlo_op'])
        for e in streams
        if 'hlo_op' in e.get('args', {})
    ]
    derived = [
        dict(e, op=e['name']) for e in on_device if thread(e) == 'XLA Ops'
    ]
    ops = tagged or derived or [dict(e, op=e['name']) for e in streams]
  else:
    ops = [
        dict(e, op=e['args']['hlo_op'])
        for e in spans
        if 'hlo_op' in e.get('args', {})
    ]
  per_module = collections.Counter()
  for e in ops:
    per_module[e.get('args', {}).get('hlo_module', '')] += e['dur']
  if len(per_module) <= 1:
    return ops
  module = per_module.most_common(1)[0][0]
  return [e for e in ops if e.get('args', {}).get('hlo_module', '') == module]


def resolve_op(event: dict, hlo: dict) -> str:
  """The HLO instruction a kernel event belongs to.

  Kernels that XLA launches inside a CUDA graph are tagged with the graph's
  thunk (`command_buffer_N`), not their instruction; their kernel is named
  after the fusion (`loop_add_fusion_3` for `loop_add_fusion.3`), which
  names the instruction instead.
  """
  op = event['op']
  if op in hlo:
    return op
  name = event.get('name', '')
  base, _, index = name.rpartition('_')
  candidates = [f'{base}.{index}'] if index.isdigit() else []
  for candidate in candidates + [name]:
    if candidate in hlo:
      return candidate
  return op


# Kernels shorter than this (microseconds) are counted apart in summaries.
SMALL_KERNEL_US = 5.0


def summarize(events, hlo, steps, top, sizes=None):
  """(summary dict, top list) from kernel events and the parsed HLO.

  `sizes`: `instruction_bytes` of the module, for each top op's `gb_per_s`.
  """
  sizes = sizes or {}
  per_op = collections.defaultdict(lambda: [0.0, 0])
  per_category = collections.Counter()
  for e in events:
    op = resolve_op(e, hlo)
    per_op[op][0] += e['dur']
    per_op[op][1] += 1
    per_category[hlo.get(op, ('unmapped', ''))[0]] += e['dur']
  kernel_us = sum(v[0] for v in per_op.values())
  busy_us = _union_length((e['ts'], e['ts'] + e['dur']) for e in events)
  small = [e['dur'] for e in events if e['dur'] < SMALL_KERNEL_US]
  summary = dict(
      kernel_ms_per_step=round(kernel_us / steps / 1000, 3),
      device_busy_ms_per_step=round(busy_us / steps / 1000, 3),
      kernels_per_step=round(len(events) / steps, 1),
      # Kernels too short to be worth their launch: per-parameter work.
      small_kernels_per_step=round(len(small) / steps, 1),
      small_kernels_ms_per_step=round(sum(small) / steps / 1000, 3),
      categories_ms_per_step={
          k: round(v / steps / 1000, 3) for k, v in per_category.most_common()
      },
  )
  ranked = sorted(per_op.items(), key=lambda kv: -kv[1][0])[:top]
  rows = []
  for rank, (op, (dur, count)) in enumerate(ranked, 1):
    category, op_name = hlo.get(op, ('unmapped', ''))
    rows.append(
        dict(
            rank=rank,
            hlo_op=op,
            category=category,
            ms_per_step=round(dur / steps / 1000, 3),
            share=round(dur / kernel_us, 4) if kernel_us else None,
            calls_per_step=round(count / steps, 2),
            # Each call moves its instruction's bytes (deduplicated kernels
            # run several instructions of the same shapes).
            gb_per_s=(
                round(sizes[op] * count / dur / 1e3, 1)
                if sizes.get(op) and dur
                else None
            ),
            op_name=op_name[-160:],
        )
    )
  return summary, rows


def _trace(run, out_dir=None, name='') -> dict:
  """The parsed Perfetto trace of `run()` (kept in `out_dir` as well)."""
  log_dir = tempfile.mkdtemp(prefix='nfnets_profile_')
  try:
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
      run()
    paths = glob.glob(
        os.path.join(log_dir, '**', 'perfetto_trace.json.gz'), recursive=True
    )
    if not paths:
      raise FileNotFoundError(
          f'jax.profiler wrote no Perfetto trace in {log_dir}'
      )
    with gzip.open(paths[0], 'rt') as f:
      trace = json.load(f)
    if out_dir:
      os.makedirs(out_dir, exist_ok=True)
      shutil.copy(
          paths[0], os.path.join(out_dir, f'{name}perfetto_trace.json.gz')
      )
  finally:
    shutil.rmtree(log_dir, ignore_errors=True)
  return trace


def main(argv=None):
  on_accelerator = jax.devices()[0].platform != 'cpu'
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', default=None)
  parser.add_argument('--batch', type=int, default=None)
  parser.add_argument('--image_size', type=int, default=None)
  parser.add_argument(
      '--dtype', default=None, choices=['bfloat16', 'float32', 'float16']
  )
  parser.add_argument(
      '--mode', default='minimal', choices=train_throughput.MODES
  )
  parser.add_argument('--steps', type=int, default=3, help='traced steps')
  parser.add_argument('--timed_steps', type=int, default=10)
  parser.add_argument('--top', type=int, default=25)
  parser.add_argument(
      '--out_dir', default=None, help='keep the trace and the HLO here'
  )
  args = parser.parse_args(argv)
  if args.steps < 1 or args.timed_steps < 1 or args.top < 0:
    parser.error('--steps and --timed_steps must be >= 1, --top >= 0')
  train_throughput.check_sizes(parser, args, ('batch', 'image_size'))
  default = train_throughput.defaults(on_accelerator)
  model = args.model or default['model']
  train_throughput.models.info(model)  # unknown names fail here
  batch = args.batch or default['batch']
  size = args.image_size or default['image_size']
  dtype = args.dtype or default['dtype']

  step_fn, state, device_batch, config, augment, raw_batch = (
      train_throughput.build_step(model, batch, size, dtype, args.mode)
  )
  compiled = step_fn.lower(state, device_batch).compile()
  # (name, compiled program, its arguments for the i-th call) per program.
  programs = [('train_step', compiled, lambda i: (state, device_batch))]
  if augment is not None:
    # The runner's augmentation (`full` mode) is a program of its own that
    # runs before each step; compiled here too, for its HLO.
    augment_compiled = (
        train.pmap_device_augment(config.data, seed=0)
        .lower(raw_batch, np.int32(0))
        .compile()
    )
    augment = lambda batch, i: augment_compiled(batch, np.int32(i))
    programs.append(
        ('augment', augment_compiled, lambda i: (raw_batch, np.int32(i)))
    )

  def run(state, i):
    inputs = device_batch if augment is None else augment(raw_batch, i)
    return compiled(state, inputs)

  def run_steps(count):
    nonlocal state, metrics
    for i in range(count):
      state, metrics = run(state, i)
    jax.block_until_ready(metrics)

  metrics = None
  run_steps(3)  # warm-up
  step_s = train_throughput.median_step_seconds(run_steps, args.timed_steps)

  base = dict(
      benchmark='profile_step',
      model=model,
      mode=args.mode,
      batch=batch,
      image_size=size,
      dtype=dtype,
      device_kind=jax.devices()[0].device_kind,
  )
  for name, program, arguments in programs:
    # Each program traced on its own: JAX names every pmapped module alike,
    # so their kernels could not be told apart in one trace.
    def run_program(program=program, arguments=arguments, name=name):
      nonlocal state
      outputs = None
      for i in range(args.steps):
        outputs = program(*arguments(i))
        if name == 'train_step':  # The state was donated: use the new one.
          state = outputs[0]
      jax.block_until_ready(outputs)

    prefix = '' if name == 'train_step' else f'{name}_'
    trace = _trace(run_program, args.out_dir, prefix)
    hlo_text = program.as_text()
    if args.out_dir:
      with gzip.open(
          os.path.join(args.out_dir, f'{prefix}hlo.txt.gz'), 'wt'
      ) as f:
        f.write(hlo_text)
    events = kernel_events(trace)
    if not events:
      raise RuntimeError(f'the {name} trace holds no XLA op events')
    summary, rows = summarize(
        events,
        parse_hlo(hlo_text),
        args.steps,
        args.top,
        instruction_bytes(hlo_text),
    )
    line = dict(base, program=name, kind='summary')
    if name == 'train_step':  # A whole step's time, augmentation included.
      line.update(
          step_ms=round(1000 * step_s, 3),
          sync_every=train_throughput.SYNC_EVERY,
      )
    print(
        json.dumps(dict(line, traced_steps=args.steps, **summary)), flush=True
    )
    for row in rows:
      print(json.dumps(dict(base, program=name, kind='top', **row)), flush=True)


if __name__ == '__main__':
  main()
