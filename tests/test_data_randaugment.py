"""RandAugment operations and the per-image train/eval transforms."""

import io

import numpy as np
from PIL import Image
from PIL import ImageEnhance
from PIL import ImageOps
import pytest
import tensorflow as tf

from nfnets.data import augment
from nfnets.data import randaugment

_RNG = np.random.default_rng(0)
# Mostly mid-range pixels, with a few extreme rows, on a non-square image.
_IMAGE = _RNG.integers(30, 220, size=(12, 10, 3)).astype(np.uint8)
_IMAGE[:3] = _RNG.integers(0, 256, size=(3, 10, 3))
_SEED = tf.constant([1, 2], tf.int64)
_MAGNITUDE_OPS = sorted(
    set(randaugment.OPS) - {'AutoContrast', 'Equalize', 'Invert'}
)


def _op(name, magnitude, image=_IMAGE, seed=_SEED):
  return randaugment.apply_op(name, tf.constant(image), magnitude, seed).numpy()


def test_op_list_is_the_reference_sixteen():
  assert len(randaugment.RANDAUGMENT_OPS) == 16
  assert set(randaugment.RANDAUGMENT_OPS) <= set(randaugment.OPS)


@pytest.mark.parametrize('name', sorted(randaugment.OPS))
@pytest.mark.parametrize('magnitude', [5, 15])
def test_every_op_keeps_shape_and_dtype(name, magnitude):
  out = _op(name, magnitude)
  assert out.shape == _IMAGE.shape and out.dtype == np.uint8


# The magnitude at which each operation is the identity, in the release's
# mapping: the geometric ones and SolarizeAdd at 0, the enhance operations at
# 5 (factor 1), Solarize from 10 on (threshold 256), Posterize at 20 (8 bits).
_IDENTITY_AT = {
    'Identity': 0,
    'Rotate': 0,
    'ShearX': 0,
    'ShearY': 0,
    'TranslateX': 0,
    'TranslateY': 0,
    'Cutout': 0,
    'SolarizeAdd': 0,
    'Color': 5,
    'Contrast': 5,
    'Brightness': 5,
    'Sharpness': 5,
    'Solarize': 10,
    'Posterize': 20,
}


def test_every_magnitude_op_has_an_identity_magnitude():
  assert sorted(_IDENTITY_AT) == _MAGNITUDE_OPS


@pytest.mark.parametrize('name', _MAGNITUDE_OPS)
def test_ops_are_the_identity_where_the_release_mapping_says(name):
  for seed in ([1, 2], [3, 4]):  # Both signs of the signed operations.
    np.testing.assert_array_equal(
        _op(name, _IDENTITY_AT[name], seed=tf.constant(seed, tf.int64)),
        _IMAGE,
    )


@pytest.mark.parametrize('name', sorted(set(_MAGNITUDE_OPS) - {'Identity'}))
def test_ops_change_the_image_at_the_nfnet_magnitudes(name):
  # NFNets use 5, 10 and 15; each operation acts at one of them at least.
  changed = [
      not np.array_equal(
          _op(name, magnitude, seed=tf.constant([s, 0], tf.int64)), _IMAGE
      )
      for magnitude in (5, 10, 15)
      for s in range(4)
  ]
  assert any(changed)


def test_the_release_magnitude_mapping():
  # autoaugment.py of the NFNets release: enhance 0.1 + 1.8 * level, with no
  # random sign; Posterize int(4 * level) bits; Solarize int(256 * level);
  # SolarizeAdd int(110 * level).
  assert [randaugment.enhance_factor(m) for m in (0, 5, 10, 15)] == (
      pytest.approx([0.1, 1.0, 1.9, 2.8])
  )
  assert [randaugment.posterize_bits(m) for m in (0, 5, 10, 15, 25)] == [
      0,
      2,
      4,
      6,
      8,
  ]
  assert [randaugment.solarize_threshold(m) for m in (0, 5, 10, 15)] == [
      0,
      128,
      256,
      256,
  ]
  assert [randaugment.solarize_addition(m) for m in (0, 5, 10, 15)] == [
      0,
      55,
      110,
      165,
  ]
  np.testing.assert_array_equal(_op('Posterize', 0), np.zeros_like(_IMAGE))


@pytest.mark.parametrize('name', ['Brightness', 'Contrast'])
def test_enhance_at_magnitude_15_never_flattens_an_image(name):
  # The 'increasing' scale (1 +- 0.9 * level, floored at 0) made every other
  # draw at M = 15 a black (Brightness) or a single grey (Contrast) image.
  for s in range(8):
    out = _op(name, 15, seed=tf.constant([s, 0], tf.int64))
    assert np.ptp(out) > 0, (name, s)


def test_known_results():
  image = tf.constant(_IMAGE)
  np.testing.assert_array_equal(
      randaugment.solarize(image, 128).numpy(),
      np.where(_IMAGE >= 128, 255 - _IMAGE, _IMAGE),
  )
  np.testing.assert_array_equal(
      randaugment.posterize(image, 3).numpy(), _IMAGE & 0b11100000
  )
  np.testing.assert_array_equal(randaugment.invert(image).numpy(), 255 - _IMAGE)
  np.testing.assert_array_equal(
      randaugment.solarize_add(image, 50).numpy(),
      np.where(_IMAGE < 128, np.minimum(_IMAGE.astype(int) + 50, 255), _IMAGE),
  )
  # Content moves right by 3; uncovered pixels are grey.
  shifted = randaugment.translate_x(image, 3.0).numpy()
  np.testing.assert_array_equal(shifted[:, 3:], _IMAGE[:, :-3])
  assert (shifted[:, :3] == 128).all()
  square = _RNG.integers(0, 256, size=(9, 9, 3)).astype(np.uint8)
  np.testing.assert_array_equal(
      randaugment.rotate(tf.constant(square), 90.0).numpy(), np.rot90(square, 1)
  )
  out = randaugment.cutout(image, 4, 5, 5).numpy()
  assert (out[3:7, 3:7] == 128).all()
  np.testing.assert_array_equal(out[:3], _IMAGE[:3])
  # The release's magnitude mapping (module docstring).
  np.testing.assert_array_equal(
      _op('Solarize', 5), np.where(_IMAGE >= 128, 255 - _IMAGE, _IMAGE)
  )
  np.testing.assert_array_equal(_op('Posterize', 10), _IMAGE & 0b11110000)
  np.testing.assert_array_equal(_op('Posterize', 5), _IMAGE & 0b11000000)


def test_flip_mirrors_half_the_time():
  image = tf.constant(_IMAGE)
  outcomes = set()
  for seed in range(16):
    out = augment.random_flip(image, tf.constant([seed, 0], tf.int64)).numpy()
    if np.array_equal(out, _IMAGE[:, ::-1]):
      outcomes.add('mirrored')
    else:
      np.testing.assert_array_equal(out, _IMAGE)
      outcomes.add('kept')
  assert outcomes == {'mirrored', 'kept'}


@pytest.mark.parametrize(
    'ours, reference',
    [
        (randaugment.equalize, ImageOps.equalize),
        (randaugment.auto_contrast, ImageOps.autocontrast),
        (
            lambda x: randaugment.color(x, 0.3),
            lambda x: ImageEnhance.Color(x).enhance(0.3),
        ),
        (
            lambda x: randaugment.contrast(x, 1.6),
            lambda x: ImageEnhance.Contrast(x).enhance(1.6),
        ),
        (
            lambda x: randaugment.brightness(x, 0.6),
            lambda x: ImageEnhance.Brightness(x).enhance(0.6),
        ),
        (
            lambda x: randaugment.sharpness(x, 0.2),
            lambda x: ImageEnhance.Sharpness(x).enhance(0.2),
        ),
        (
            lambda x: randaugment.rotate(x, 20.0),
            lambda x: x.rotate(
                20, resample=Image.NEAREST, fillcolor=(128,) * 3
            ),
        ),
    ],
)
def test_ops_match_pil_up_to_rounding(ours, reference):
  # PIL truncates where these ops round: allow one grey level.
  got = ours(tf.constant(_IMAGE)).numpy().astype(int)
  want = np.asarray(reference(Image.fromarray(_IMAGE))).astype(int)
  assert np.abs(got - want).max() <= 1


def test_randaugment_is_deterministic_and_varied():
  image = tf.constant(_RNG.integers(0, 256, (16, 16, 3)).astype(np.uint8))

  def run(seed, **kwargs):
    kwargs = {'num_layers': 4, 'magnitude': 10, **kwargs}
    return randaugment.randaugment(
        image, tf.constant([seed, 0], tf.int64), **kwargs
    ).numpy()

  assert run(0).shape == (16, 16, 3) and run(0).dtype == np.uint8
  np.testing.assert_array_equal(run(0), run(0))
  outputs = {run(seed).tobytes() for seed in range(8)}
  assert len(outputs) > 4
  np.testing.assert_array_equal(run(0, num_layers=0), image.numpy())
  np.testing.assert_array_equal(
      run(0, magnitude=0, ops=('Rotate', 'ShearX', 'SolarizeAdd', 'Cutout')),
      image.numpy(),
  )
  # Every layer applies the operation it draws (the release never skips
  # one): a single op that always changes the image changes it every time.
  for seed in range(8):
    out = run(seed, num_layers=1, ops=('Invert',))
    np.testing.assert_array_equal(out, 255 - image.numpy())


def _encode(array, fmt):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format=fmt)
  return tf.constant(buffer.getvalue())


@pytest.mark.parametrize('fmt', ['JPEG', 'PNG'])
def test_train_image_crops_resizes_and_is_seeded(fmt):
  array = _RNG.integers(0, 256, (50, 70, 3)).astype(np.uint8)
  image_bytes = _encode(array, fmt)
  outs = [
      augment.train_image(
          image_bytes, tf.constant([s, 0], tf.int64), 24
      ).numpy()
      for s in (0, 0, 1)
  ]
  assert outs[0].shape == (24, 24, 3) and outs[0].dtype == np.uint8
  np.testing.assert_array_equal(outs[0], outs[1])
  assert not np.array_equal(outs[0], outs[2])


def test_random_window_stays_inside_and_falls_back_to_centre():
  shape = tf.constant([40, 60, 3])
  for seed in range(20):
    y, x, h, w = augment.random_window(
        shape, tf.constant([seed, 0], tf.int64), 32
    ).numpy()
    assert 0 <= y and y + h <= 40 and 0 <= x and x + w <= 60
    assert 0.08 * 2400 * 0.9 <= h * w
  # A 1-pixel-tall image admits no crop of aspect 3/4..4/3 but the whole
  # image's full width; the sampler gives up and the centre square is used.
  y, x, h, w = augment.random_window(
      tf.constant([1, 200, 3]), tf.constant([0, 0], tf.int64), 32
  ).numpy()
  assert (h, w) == (1, 1) and x == 100


def test_eval_crops():
  # Red outer bands, blue middle: 'crop_resize' keeps the centre square and
  # so only blue; 'resize_crop' squashes the whole width and keeps red.
  array = np.zeros((100, 200, 3), np.uint8)
  array[:, :, 0] = 255
  array[:, 50:150] = (0, 0, 255)
  image_bytes = _encode(array, 'PNG')
  centre = augment.eval_image(image_bytes, 64, 'crop_resize').numpy()
  assert centre.shape == (64, 64, 3) and centre.dtype == np.uint8
  assert (centre == (0, 0, 255)).all()
  squashed = augment.eval_image(image_bytes, 64, 'resize_crop').numpy()
  assert squashed.shape == (64, 64, 3)
  assert (squashed[:, 0] == (255, 0, 0)).all()
  assert (squashed[:, 32] == (0, 0, 255)).all()
  with pytest.raises(ValueError, match='eval_resize'):
    augment.eval_image(image_bytes, 64, 'squash')


@pytest.mark.parametrize('ratio', [2, 4, 8])
def test_large_jpeg_crops_decode_scaled_and_match_full_size(ratio):
  # A smooth image, so that decoding at 1/r scale and resizing gives nearly
  # the same pixels as decoding at full size and resizing.
  size = 16
  side = ratio * size + 5
  ys, xs = np.mgrid[0:side, 0 : side + 9].astype(np.float32)
  array = np.stack(
      [xs / xs.max() * 255, ys / ys.max() * 255, 128 + 0 * xs], axis=-1
  ).astype(np.uint8)
  image_bytes = _encode(array, 'JPEG')
  window = lambda shape: tf.constant([2, 3, side - 2, side - 2])
  scaled = augment.decode_window(image_bytes, window, min_size=size)
  # The decoder scaled by the largest ratio that keeps the side >= size...
  assert scaled.shape[0] == (side - 2) // ratio >= size
  # ... and decoded the window rounded down to whole scaled pixels (off by
  # less than one output pixel): the same region as this full-size crop.
  aligned = [2 // ratio, 3 // ratio, (side - 2) // ratio, (side - 2) // ratio]
  full = augment.decode_window(
      image_bytes, lambda shape: tf.constant(aligned) * ratio
  )
  resize = lambda im: tf.image.resize(im, [size, size], method='bicubic')
  difference = np.abs(resize(full).numpy() - resize(scaled).numpy())
  assert difference.mean() < 2.0, difference.mean()
  # A crop too small to halve is decoded at full size.
  small = augment.decode_window(image_bytes, window, min_size=side)
  assert small.shape[0] == side - 2
