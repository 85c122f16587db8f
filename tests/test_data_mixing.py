"""MixUp / CutMix properties, for the numpy and the TensorFlow implementation.

Each example is a constant image with its own value, so a MixUp output is a
constant blend and a CutMix output shows exactly which pixels were pasted.
"""

import numpy as np
import pytest
import tensorflow as tf

from nfnets.data import augment
from nfnets.data import mixing

_SIZE = 16


def _constant_batch(batch):
  values = np.arange(1, batch + 1, dtype=np.float32) * 10.0
  images = np.broadcast_to(
      values[:, None, None, None], (batch, _SIZE, _SIZE, 3)
  ).copy()
  labels = np.arange(batch, dtype=np.int32) + 100
  return values, images, labels


def _mix(backend, images, labels, seed, **kwargs):
  if backend == 'numpy':
    return mixing.mix_batch(
        images, labels, np.random.default_rng(seed), **kwargs
    )
  out = augment.mix_batch(
      tf.constant(images),
      tf.constant(labels),
      tf.constant([seed, 7], tf.int64),
      **kwargs,
  )
  return tuple(x.numpy() for x in out)


@pytest.mark.parametrize('backend', ['numpy', 'tf'])
@pytest.mark.parametrize('seed', [0, 1, 2])
def test_half_mixup_half_cutmix_with_exact_ratios(backend, seed):
  batch = 8
  values, images, labels = _constant_batch(batch)
  out, labels1, labels2, ratio = _mix(
      backend, images, labels, seed, mixup_alpha=0.2, cutmix=True
  )
  assert out.shape == images.shape and out.dtype == np.float32
  assert labels1.dtype == labels2.dtype == np.int32
  assert ratio.shape == (batch,) and ratio.dtype == np.float32
  np.testing.assert_array_equal(labels1, labels)
  # Partners: mirror images within each half.
  partner = np.array([3, 2, 1, 0, 7, 6, 5, 4])
  np.testing.assert_array_equal(labels2, labels[partner])
  assert ((ratio >= 0) & (ratio <= 1)).all()
  # The soft target's weights sum to one for every example.
  soft = (
      ratio[:, None] * np.eye(200)[labels1]
      + (1 - ratio[:, None]) * np.eye(200)[labels2]
  )
  np.testing.assert_allclose(soft.sum(-1), 1.0, rtol=1e-6)

  for i in range(batch):
    own, other = values[i], values[partner[i]]
    if i < batch // 2:  # MixUp: a constant blend weighted by the ratio.
      expected = ratio[i] * own + (1 - ratio[i]) * other
      np.testing.assert_allclose(out[i], expected, rtol=1e-5)
    else:  # CutMix: each pixel is own or pasted; ratio = unpasted fraction.
      is_own = out[i, ..., 0] == own
      is_pasted = out[i, ..., 0] == other
      assert (is_own | is_pasted).all()
      assert is_own.mean() == pytest.approx(ratio[i], abs=1e-6)
      rows, cols = np.nonzero(is_pasted)
      if rows.size:  # The pasted region is one axis-aligned box.
        box = np.zeros_like(is_pasted)
        box[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] = True
        np.testing.assert_array_equal(box, is_pasted)


@pytest.mark.parametrize('backend', ['numpy', 'tf'])
def test_cutmix_ratios_vary_and_cover_the_unit_interval(backend):
  _, images, labels = _constant_batch(64)
  ratios = np.concatenate(
      [
          _mix(backend, images, labels, seed, mixup_alpha=0.0, cutmix=True)[3]
          for seed in range(4)
      ]
  )
  # Box of fraction 1 - lam, lam ~ U(0, 1), with a uniformly random centre:
  # clipping at the borders keeps most boxes well below their nominal size.
  assert ratios.min() < 0.4 and ratios.max() > 0.95
  assert 0.5 < ratios.mean() < 0.9


@pytest.mark.parametrize('backend', ['numpy', 'tf'])
def test_mixup_only_and_no_mixing(backend):
  values, images, labels = _constant_batch(6)
  out, _, labels2, ratio = _mix(
      backend, images, labels, 0, mixup_alpha=0.2, cutmix=False
  )
  np.testing.assert_array_equal(labels2, labels[::-1])
  np.testing.assert_allclose(
      out[:, 0, 0, 0], ratio * values + (1 - ratio) * values[::-1], rtol=1e-5
  )
  # Beta(0.2, 0.2) puts most of its mass near 0 and 1.
  ratios = np.concatenate(
      [
          _mix(
              backend,
              *_constant_batch(64)[1:],
              seed,
              mixup_alpha=0.2,
              cutmix=False,
          )[3]
          for seed in range(4)
      ]
  )
  assert np.mean((ratios < 0.1) | (ratios > 0.9)) > 0.5

  out, _, labels2, ratio = _mix(
      backend, images, labels, 0, mixup_alpha=0.0, cutmix=False
  )
  np.testing.assert_array_equal(out, images)
  np.testing.assert_array_equal(labels2, labels)
  np.testing.assert_array_equal(ratio, np.ones(6))


def test_tf_mixing_is_a_function_of_the_seed():
  _, images, labels = _constant_batch(8)
  a = _mix('tf', images, labels, 3, mixup_alpha=0.2, cutmix=True)
  b = _mix('tf', images, labels, 3, mixup_alpha=0.2, cutmix=True)
  c = _mix('tf', images, labels, 4, mixup_alpha=0.2, cutmix=True)
  np.testing.assert_array_equal(a[3], b[3])
  assert not np.array_equal(a[3], c[3])
