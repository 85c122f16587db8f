"""Replays the buffers of a scheduled, optimized HLO module: where its peak is.

XLA reports how much temporary memory a program plans (`memory_analysis`),
not what is allocated when. This reads the text of an optimized module (the
`hlo.txt.gz` that `profile_step.py --out_dir` keeps, or `compiled.as_text()`),
walks its entry computation in the scheduled order, gives every instruction
that makes a buffer (fusions, library calls, copies) its bytes from the
definition to its last use (through tuples, get-tuple-elements and bitcasts,
which alias), and prints JSON lines: the peak and the instruction it is at,
the buffers live there grouped by scope and shape, and where the weight
gradients (cuDNN's backward-filter convolutions) sit in the schedule.

It is an upper bound of XLA's own assignment, which can also reuse an
operand's buffer for an output in place; the parameters (the arguments) are
left out. On machine E's F0 step it gave 11.69 GB against the 12.4 GB that E
measured with the arguments.

    python benchmarks/hlo_memory.py HLO_FILE [--top=25]
"""

import argparse
import collections
import gzip
import json
import re

_BYTES = {
    'pred': 1,
    's8': 1,
    'u8': 1,
    'bf16': 2,
    'f16': 2,
    's16': 2,
    'u16': 2,
    'f32': 4,
    's32': 4,
    'u32': 4,
    'f64': 8,
    's64': 8,
    'u64': 8,
}
_ARRAY = re.compile(r'\b(' + '|'.join(_BYTES) + r')\[([0-9,]*)\]')
_INSTRUCTION = re.compile(
    r'\s*(ROOT )?%([\w.\-]+) = (.+?) ([a-z][a-z\-]*)\((.*)'
)
# Instructions that make no buffer of their own.
_ALIASES = ('get-tuple-element', 'bitcast', 'tuple')


def shape_bytes(shape: str) -> int:
  """Bytes of every array in an HLO shape (a tuple's are added up)."""
  total = 0
  for dtype, dims in _ARRAY.findall(shape):
    count = 1
    for d in filter(None, dims.split(',')):
      count *= int(d)
    total += count * _BYTES[dtype]
  return total


def entry_instructions(text: str) -> list[dict]:
  """The entry computation's instructions, in their scheduled order."""
  start = text.find('\nENTRY')
  if start < 0:
    raise ValueError('no ENTRY computation: not an HLO module text')
  body = text[start:].split('\n')[1:]
  instructions = []
  for line in body:
    if line.startswith('}'):
      break
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    root, name, shape, opcode, rest = match.groups()
    # Operands come before the first attribute (`), kind=`, `), window=`...).
    operands = re.findall(r'%([\w.\-]+)', rest.split('), ')[0])
    op_name = re.search(r'op_name="([^"]*)"', line)
    target = re.search(r'custom_call_target="([^"]*)"', line)
    instructions.append(
        dict(
            name=name,
            shape=shape,
            opcode=opcode,
            operands=operands,
            root=bool(root),
            op_name=op_name.group(1) if op_name else '',
            target=target.group(1) if target else '',
        )
    )
  return instructions


def replay(instructions: list[dict]) -> dict:
  """Live bytes over the schedule: the peak and what is live there."""
  owners = {}  # instruction -> the buffer-making instructions it aliases
  size, first, last = {}, {}, {}
  for i, ins in enumerate(instructions):
    name = ins['name']
    if ins['opcode'] in _ALIASES and ins['operands']:
      owners[name] = [b for o in ins['operands'] for b in owners.get(o, [o])]
    else:
      owners[name] = [name]
      first[name] = last[name] = i
      if ins['opcode'] != 'parameter':
        size[name] = shape_bytes(ins['shape'])
    for operand in ins['operands']:
      for buffer in owners.get(operand, []):
        last[buffer] = max(last.get(buffer, i), i)
    if ins['root']:  # the outputs live to the end
      for buffer in owners[name]:
        last[buffer] = len(instructions)
  delta = collections.Counter()
  for name, nbytes in size.items():
    delta[first[name]] += nbytes
    delta[last[name] + 1] -= nbytes
  live = peak = at = 0
  for i in range(len(instructions) + 2):
    live += delta[i]
    if live > peak:
      peak, at = live, i
  at = min(at, len(instructions) - 1)
  live_there = [n for n, b in size.items() if b and first[n] <= at <= last[n]]
  return dict(peak_bytes=peak, at=at, live=live_there, size=size)


def _scope(op_name: str) -> str:
  """An op's scope with block numbers folded (`nf_block_7` -> `nf_block_N`)."""
  scope = re.sub(r'^jit\([^)]*\)/', '', op_name)
  return re.sub(r'(block)_\d+', r'\1_N', scope)


def weight_gradient_positions(instructions: list[dict]) -> dict:
  """How long cuDNN's backward-filter convolutions wait for their turn.

  For each, the number of other convolutions scheduled between the latest of
  its operands (the output gradient it reads) and itself: 0 when it runs as
  soon as it can, dozens when the weight gradients are deferred to the end
  of the backward pass (XLA's GPU scheduler does that when memory is to
  spare; tying each to its input gradient cost time on an H100 and saved
  no peak memory: benchmarks/RESULTS.md).
  """
  index = {ins['name']: i for i, ins in enumerate(instructions)}
  convs = [
      i
      for i, ins in enumerate(instructions)
      if ins['target'].startswith('__cudnn$conv')
  ]
  waits = []
  for i, ins in enumerate(instructions):
    if ins['target'] != '__cudnn$convBackwardFilter':
      continue
    ready = max((index.get(o, -1) for o in ins['operands']), default=-1)
    waits.append(sum(ready < j < i for j in convs))
  if not waits:
    return dict(weight_gradient_convs=0)
  waits.sort()
  return dict(
      weight_gradient_convs=len(waits),
      convs_waited_median=waits[len(waits) // 2],
      convs_waited_max=waits[-1],
  )


def analyse(text: str, top: int = 25) -> list[dict]:
  """The JSON records for one module's text."""
  instructions = entry_instructions(text)
  result = replay(instructions)
  by_name = {ins['name']: ins for ins in instructions}
  at = instructions[result['at']]
  records = [
      dict(
          kind='summary',
          instructions=len(instructions),
          peak_bytes=result['peak_bytes'],
          peak_gb=round(result['peak_bytes'] / 1e9, 3),
          peak_at=at['name'],
          peak_at_op=_scope(at['op_name']),
          **weight_gradient_positions(instructions),
      )
  ]
  groups = collections.Counter()
  counts = collections.Counter()
  for name in result['live']:
    ins = by_name[name]
    key = (_scope(ins['op_name']), re.sub(r'\{[^}]*\}', '', ins['shape']))
    groups[key] += result['size'][name]
    counts[key] += 1
  for (scope, shape), nbytes in groups.most_common(top):
    records.append(
        dict(
            kind='live_at_peak',
            gb=round(nbytes / 1e9, 4),
            buffers=counts[(scope, shape)],
            scope=scope,
            shape=shape[:120],
        )
    )
  return records


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('hlo', help='optimized HLO text, plain or .gz')
  parser.add_argument('--top', type=int, default=25)
  args = parser.parse_args(argv)
  opener = gzip.open if args.hlo.endswith('.gz') else open
  with opener(args.hlo, 'rt') as f:
    text = f.read()
  for record in analyse(text, args.top):
    print(json.dumps(record), flush=True)


if __name__ == '__main__':
  main()
