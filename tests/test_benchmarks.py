"""Smoke tests that keep the benchmarks alive (speed goals live in them)."""

import json
import os
import sys

sys.path.insert(
    0,
    os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        'benchmarks',
    ),
)

import train_throughput  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_train_throughput_prints_json_lines(capsys):
  # One mode keeps this quick; the full step is the runner's, tested there.
  train_throughput.main(
      ['--steps=2', '--warmup=0', '--batch=8', '--modes=minimal']
  )
  lines = [
      json.loads(l)
      for l in capsys.readouterr().out.splitlines()
      if l.startswith('{')
  ]
  modes = {l['mode']: l for l in lines if 'mode' in l}
  assert set(modes) == {'minimal'}
  for record in modes.values():
    assert record['images_per_s'] > 0 and record['step_ms'] > 0
    assert record['devices'] == 8
    # XLA's planned memory is reported on every backend, the CPU included.
    assert record['xla_temp_gib'] > 0 and record['xla_args_gib'] > 0
