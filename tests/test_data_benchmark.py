"""Keeps `benchmarks/input_pipeline.py` alive: a tiny run prints its JSON."""

import json
import os
import sys

import numpy as np
from PIL import Image
import pytest

sys.path.insert(
    0,
    os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        'benchmarks',
    ),
)

import input_pipeline  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_synthetic_images_look_like_imagenet(tmp_path):
  stats = input_pipeline.write_folder(str(tmp_path), 6)
  assert stats['num_images'] == 6
  path = os.path.join(str(tmp_path), 'class_00', '000000.JPEG')
  image = np.asarray(Image.open(path))
  assert image.shape[2] == 3 and max(image.shape[:2]) >= 333
  assert image.std() > 20  # Varied content, not a flat colour.


def test_benchmark_prints_json_lines(tmp_path, capsys):
  input_pipeline.main(
      [
          '--num_images=24',
          '--batch_size=8',
          '--devices=2',
          '--image_size=32',
          '--num_batches=2',
          '--warmup=1',
          '--full_only',
          f'--folder={tmp_path}',
      ]
  )
  lines = [
      json.loads(line)
      for line in capsys.readouterr().out.splitlines()
      if line.startswith('{')
  ]
  assert lines[0]['dataset'] == 'synthetic_jpeg_folder'
  assert lines[0]['num_images'] == 24
  (result,) = [line for line in lines if line.get('config') == 'f0_full']
  assert result['randaugment'] == [4, 5]
  assert result['images_per_s'] > 0 and result['images_per_cpu_s'] > 0
  assert result['augment_on'] == 'device'
  (host,) = [line for line in lines if line.get('config') == 'f0_full_on_host']
  assert host['augment_on'] == 'host' and host['images_per_s'] > 0
  (on_device,) = [l for l in lines if l.get('config') == 'device_augment']
  assert on_device['batch_size'] == 4 and on_device['ms_per_batch'] > 0


def test_device_augment_only_needs_no_folder(tmp_path, capsys, monkeypatch):
  # What a GPU machine without TensorFlow runs: no files are written.
  monkeypatch.chdir(tmp_path)
  input_pipeline.main(
      [
          '--device_augment_only',
          '--batch_size=8',
          '--devices=2',
          '--image_size=32',
          '--num_batches=2',
      ]
  )
  (line,) = [
      json.loads(l)
      for l in capsys.readouterr().out.splitlines()
      if l.startswith('{')
  ]
  assert line['config'] == 'device_augment' and line['batch_size'] == 4
  assert line['randaugment'] == [4, 5] and line['ms_per_batch'] > 0
  assert not os.listdir(tmp_path)


@pytest.mark.parametrize(
    'flag',
    ['--devices=0', '--batch_size=-1', '--num_images=0', '--num_batches=0'],
)
def test_input_pipeline_rejects_counts_below_one(flag, capsys):
  # --devices=0 was a ZeroDivisionError traceback.
  with pytest.raises(SystemExit):
    input_pipeline.main([flag])
  assert flag.split('=')[0] in capsys.readouterr().err
