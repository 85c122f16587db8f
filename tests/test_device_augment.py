"""The JAX (device) augmentations against the TensorFlow ones they replace.

Operations are compared with `nfnets.data.randaugment` pixel for pixel on small
images; `randaugment` and `mix_batch` (their random draws differ from the
TensorFlow versions') are checked for the same recipe and distribution.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from nfnets.data import augment as tf_aug
from nfnets.data import batching
from nfnets.data import device_augment
from nfnets.data import mixing
from nfnets.data import randaugment as tf_ra

_RNG = np.random.default_rng(0)
_SHAPE = (17, 23, 3)  # Small and not square (rotation centre, aspect).
# A grey ramp from 0 to 255, row after row.
_RAMP = np.arange(17 * 23).reshape(17, 23) * 255 // (17 * 23 - 1)
_IMAGES = {
    'random': _RNG.integers(0, 256, _SHAPE).astype(np.uint8),
    # No channel spans [0, 255], so AutoContrast changes it too.
    'mid': _RNG.integers(40, 181, _SHAPE).astype(np.uint8),
    'ramp': np.repeat(_RAMP[..., None], 3, axis=-1).astype(np.uint8),
    'flat': np.full(_SHAPE, 77, np.uint8),
}
_BATCH = np.stack(list(_IMAGES.values()))

# RandAugment operation name -> per-operation function name.
_FUNCTIONS = {
    'AutoContrast': 'auto_contrast',
    'Equalize': 'equalize',
    'Invert': 'invert',
    'Rotate': 'rotate',
    'Posterize': 'posterize',
    'Solarize': 'solarize',
    'Color': 'color',
    'Contrast': 'contrast',
    'Brightness': 'brightness',
    'Sharpness': 'sharpness',
    'ShearX': 'shear_x',
    'ShearY': 'shear_y',
    'TranslateX': 'translate_x',
    'TranslateY': 'translate_y',
    'Cutout': 'cutout',
    'SolarizeAdd': 'solarize_add',
}
# Arguments each operation is compared with (tuples: several arguments).
_ARGUMENTS = {
    'identity': [()],
    'invert': [()],
    'auto_contrast': [()],
    'equalize': [()],
    'solarize': [0, 1, 128, 200, 256],
    'solarize_add': [(0,), (30,), (110,), (200,), (50, 64), (255, 256)],
    'posterize': [1, 3, 4, 6, 8],
    'brightness': [0.0, 0.55, 1.0, 1.45, 1.9],
    'translate_x': [0.0, 2.5, -2.5, 3.5, -7.2, 10.4, 30.0, -30.0],
    'translate_y': [0.0, 2.5, -2.5, 3.5, -7.2, 10.4, 30.0, -30.0],
    'cutout': [(0, 5, 5), (4, 5, 5), (7, 0, 0), (6, 16, 22), (30, 8, 11)],
    'shear_x': [0.0, 0.15, -0.15, 0.3, -0.45, 0.5],
    'shear_y': [0.0, 0.15, -0.15, 0.3, -0.45, 0.5],
    'color': [0.0, 0.3, 1.0, 1.45, 1.9],
    'contrast': [0.0, 0.55, 1.0, 1.45, 1.9],
    'sharpness': [0.0, 0.2, 1.0, 1.45, 1.9],
    'rotate': [0.0, 15.0, -17.3, 30.0, -45.0, 90.0, -135.0],
}
_EXACT = (
    'identity',
    'invert',
    'auto_contrast',
    'equalize',
    'solarize',
    'solarize_add',
    'posterize',
    'brightness',
    'translate_x',
    'translate_y',
    'cutout',
    'shear_x',
    'shear_y',
)
_WITHIN_A_LEVEL = ('color', 'contrast', 'sharpness')


@functools.cache
def _jitted(name):
  return jax.jit(getattr(device_augment, name))


@functools.cache
def _jitted_layer(magnitude):
  return jax.jit(functools.partial(device_augment._layer, magnitude=magnitude))


def _args(argument):
  return argument if isinstance(argument, tuple) else (argument,)


def _tf_op(name, image, *args):
  fn = tf_ra.identity if name == 'identity' else getattr(tf_ra, name)
  return fn(tf.constant(image), *args).numpy()


def _jax_op(name, image, *args):
  return np.asarray(_jitted(name)(image, *args))


def _differences(a, b):
  """(max abs difference, fraction of pixels with any channel different)."""
  diff = np.abs(a.astype(int) - b.astype(int))
  return diff.max(), (diff.max(axis=-1) > 0).mean()


def test_every_randaugment_op_has_a_jax_and_a_tensorflow_version():
  assert set(_FUNCTIONS) == set(device_augment.RANDAUGMENT_OPS)
  assert set(device_augment.RANDAUGMENT_OPS) <= set(tf_ra.OPS)


@pytest.mark.parametrize('name', _EXACT)
def test_op_equals_tensorflow_exactly(name):
  for argument in _ARGUMENTS[name]:
    for key, image in _IMAGES.items():
      got = _jax_op(name, image, *_args(argument))
      want = _tf_op(name, image, *_args(argument))
      assert got.dtype == np.uint8 and got.shape == image.shape
      np.testing.assert_array_equal(got, want, err_msg=f'{argument} {key}')


@pytest.mark.parametrize('name', _WITHIN_A_LEVEL)
def test_op_equals_tensorflow_within_a_level(name):
  # Color: TF's 1x1 convolution adds its products with FMAs in its own order.
  for argument in _ARGUMENTS[name]:
    for key, image in _IMAGES.items():
      largest, fraction = _differences(
          _jax_op(name, image, argument), _tf_op(name, image, argument)
      )
      assert largest <= 1 and fraction <= 0.01, (argument, key)


def test_rotate_equals_tensorflow_but_for_rare_rounding_ties():
  # cos and sin of XLA and TF can differ by an ulp, which moves a sampling
  # coordinate that is (almost) a tie; in practice the results are equal.
  exact = 0
  for argument in _ARGUMENTS['rotate']:
    for image in _IMAGES.values():
      got = _jax_op('rotate', image, argument)
      _, fraction = _differences(got, _tf_op('rotate', image, argument))
      assert fraction <= 0.01, argument
      exact += fraction == 0
  assert exact >= 0.9 * len(_ARGUMENTS['rotate']) * len(_IMAGES)
  # Rotating a square by 90 degrees turns it exactly.
  square = _IMAGES['random'][:17, :17]
  np.testing.assert_array_equal(
      _jax_op('rotate', square, 90.0), np.rot90(square, 1)
  )


def test_identity_arguments_give_the_image_exactly():
  identities = [
      ('color', 1.0),
      ('contrast', 1.0),
      ('brightness', 1.0),
      ('sharpness', 1.0),
      ('rotate', 0.0),
      ('shear_x', 0.0),
      ('shear_y', 0.0),
      ('translate_x', 0.0),
      ('translate_y', 0.0),
      ('posterize', 8),
      ('solarize', 256),
      ('solarize_add', 0),
      ('cutout', (0, 8, 11)),
      ('identity', ()),
  ]
  for name, argument in identities:
    for image in _IMAGES.values():
      np.testing.assert_array_equal(
          _jax_op(name, image, *_args(argument)), image, err_msg=name
      )


def test_ops_are_jit_and_vmap_compatible_with_traced_arguments():
  factors = jnp.array([0.0, 0.5, 1.3, 1.9], jnp.float32)
  for name, args in [
      ('brightness', (factors,)),
      ('contrast', (factors,)),
      ('sharpness', (factors,)),
      ('rotate', (factors * 20,)),
      ('posterize', (jnp.array([1, 3, 5, 8]),)),
      (
          'cutout',
          (
              jnp.array([0, 3, 5, 9]),
              jnp.array([0, 4, 8, 16]),
              jnp.array([22, 4, 8, 0]),
          ),
      ),
  ]:
    batched = jax.jit(jax.vmap(getattr(device_augment, name)))(_BATCH, *args)
    for i, image in enumerate(_BATCH):
      np.testing.assert_array_equal(
          batched[i], _jax_op(name, image, *(a[i] for a in args)), err_msg=name
      )


def _reference_argument(name, magnitude, sign, centre, height, width):
  """The op's arguments for (magnitude, sign), as `randaugment.py` maps them."""
  f32 = np.float32
  level = magnitude / 10.0
  scaled = lambda scale: f32(f32(sign) * f32(scale)) * f32(level)
  if name in ('Color', 'Contrast', 'Brightness', 'Sharpness'):
    return (f32(0.1 + 1.8 * level),)  # the release's: no sign
  if name == 'Rotate':
    return (scaled(30.0),)
  if name in ('ShearX', 'ShearY'):
    return (scaled(0.3),)
  if name == 'TranslateX':
    return (scaled(0.45) * f32(width),)
  if name == 'TranslateY':
    return (scaled(0.45) * f32(height),)
  if name == 'Posterize':
    return (min(max(int(4 * level), 0), 8),)
  if name == 'Solarize':
    return (min(max(int(256 * level), 0), 256),)
  if name == 'SolarizeAdd':
    return (min(max(int(110 * level), 0), 255),)
  if name == 'Cutout':
    size = int(np.round(f32(0.36 * level) * f32(min(height, width))))
    return (size, int(centre[0]), int(centre[1]))
  return ()


@pytest.mark.parametrize('shape', [(3, 8, 8, 3), (2, 6, 6, 3), (2, 17, 23, 3)])
def test_channel_stats_equal_direct_reductions(shape):
  images = jnp.asarray(_RNG.integers(0, 256, shape), jnp.uint8)
  low, high, total = device_augment._channel_stats(images)  # pylint: disable=protected-access
  np.testing.assert_array_equal(low, jnp.min(images, axis=(1, 2)))
  np.testing.assert_array_equal(high, jnp.max(images, axis=(1, 2)))
  np.testing.assert_array_equal(
      total, jnp.sum(images.astype(jnp.int32), axis=(1, 2))
  )
  assert low.dtype == high.dtype == jnp.uint8 and total.dtype == jnp.int32


@pytest.mark.parametrize('magnitude', [9.0, 15.0])
def test_fused_layer_equals_the_single_op(magnitude):
  batch = len(_BATCH)
  sign = np.array([1.0, -1.0, -1.0, 1.0], np.float32)
  centre = np.array([[0, 0], [8, 11], [16, 3], [5, 22]], np.int32)
  layer = _jitted_layer(magnitude)
  for index, name in enumerate(device_augment.RANDAUGMENT_OPS):
    op_index = np.full([batch], index, np.int32)
    got = np.asarray(
        layer(_BATCH, op_index, np.ones([batch], bool), sign, centre)
    )
    for i, image in enumerate(_BATCH):
      args = _reference_argument(name, magnitude, sign[i], centre[i], 17, 23)
      want = _jax_op(_FUNCTIONS[name], image, *args)
      np.testing.assert_array_equal(got[i], want, err_msg=f'{name} {i}')
    # Not applied: the identity.
    kept = layer(_BATCH, op_index, np.zeros([batch], bool), sign, centre)
    np.testing.assert_array_equal(kept, _BATCH)


@pytest.mark.parametrize('batch', [1, 4, 16, 256, 1000])
@pytest.mark.parametrize('num_ops', [1, 8])
def test_capacity_is_the_smallest_with_a_tail_below_1e12(batch, num_ops):
  stats = pytest.importorskip('scipy.stats')
  capacity = device_augment._capacity(batch, num_ops)  # pylint: disable=protected-access
  # Images drawing one of `num_ops` operations in a layer (each applies the
  # one it draws): Binomial(batch, num_ops / 16).
  tail = lambda k: stats.binom.sf(k, batch, num_ops / 16)  # P(count > k)
  assert 0 < capacity <= batch
  assert tail(capacity) <= 1e-12
  assert tail(capacity - 1) > 1e-12


def test_equalize_counts_histograms_of_at_most_capacity_images():
  batch = 64
  capacity = device_augment._capacity(batch, 1)  # pylint: disable=protected-access
  assert capacity == 23
  images = jnp.asarray(_RNG.integers(0, 256, (batch, 5, 7, 3)), jnp.uint8)
  full = jax.jit(
      lambda x, a: device_augment._histogram(  # pylint: disable=protected-access
          device_augment._lut_index(x), active=a  # pylint: disable=protected-access
      )
  )
  counted = jax.jit(device_augment._equalize_histograms)  # pylint: disable=protected-access
  # Up to the capacity, the same histograms as counting every image.
  for active in (_RNG.random(batch) < 0.2, np.arange(batch) % 4 == 1):
    assert active.sum() <= capacity
    np.testing.assert_array_equal(counted(images, active), full(images, active))
  # Beyond it, the first `capacity` active images (batch order) are counted
  # and the others get empty histograms: in the layer, they stay unchanged.
  active = np.ones([batch], bool)
  got = counted(images, active)
  np.testing.assert_array_equal(got[:capacity], full(images, active)[:capacity])
  np.testing.assert_array_equal(got[capacity:], 0)
  equalize = np.full([batch], device_augment.RANDAUGMENT_OPS.index('Equalize'))
  out = _jitted_layer(5.0)(
      images,
      equalize,
      active,
      np.ones([batch], np.float32),
      np.zeros([batch, 2], np.int32),
  )
  for i in (0, capacity - 1):
    np.testing.assert_array_equal(out[i], device_augment.equalize(images[i]))
  np.testing.assert_array_equal(out[capacity:], images[capacity:])


def _layer_choices(batch, rng):
  return (
      rng.integers(0, len(device_augment.RANDAUGMENT_OPS), batch),
      rng.random(batch) < 0.5,
      np.where(rng.random(batch) < 0.5, -1.0, 1.0).astype(np.float32),
      np.stack([rng.integers(0, 9, batch), rng.integers(0, 11, batch)], -1),
  )


def test_pixel_stages_run_on_a_sub_batch_as_on_the_whole_batch(monkeypatch):
  batch, rng = 256, np.random.default_rng(5)
  capacity = device_augment._capacity(batch, 8)  # pylint: disable=protected-access
  assert capacity == 183
  images = jnp.asarray(rng.integers(0, 256, (batch, 9, 11, 3)), jnp.uint8)
  op_index, apply, sign, centre = _layer_choices(batch, rng)
  pixel_ops = [
      device_augment.RANDAUGMENT_OPS.index(name)
      for name in device_augment._PIXEL_OPS  # pylint: disable=protected-access
  ]
  rotate = np.full([batch], device_augment.RANDAUGMENT_OPS.index('Rotate'))
  cases = [(op_index, apply), (rotate, np.ones([batch], bool))]
  assert 0 < (np.isin(op_index, pixel_ops) & apply).sum() <= capacity
  sub_batch = [_jitted_layer(7.0)(images, o, a, sign, centre) for o, a in cases]
  # The reference: every stage on the whole batch.
  monkeypatch.setattr(device_augment, '_capacity', lambda batch, _: batch)
  layer = jax.jit(functools.partial(device_augment._layer, magnitude=7.0))
  whole = [layer(images, o, a, sign, centre) for o, a in cases]
  np.testing.assert_array_equal(sub_batch[0], whole[0])
  # All 256 rotate: the first 183 are rotated, the others (a layer with more
  # than the capacity: probability below 1e-12) keep their input.
  np.testing.assert_array_equal(sub_batch[1][:capacity], whole[1][:capacity])
  np.testing.assert_array_equal(sub_batch[1][capacity:], images[capacity:])
  assert np.any(sub_batch[1][:capacity] != images[:capacity])


def _tf_choices(seed, height, width):
  """The sign and cutout centre `randaugment.py` draws from an op seed."""
  seed = tf.constant(seed, tf.int64)
  sign = float(tf_ra._sign(seed).numpy())
  seed_y, seed_x = tf_aug.split_seed(seed, 2)
  centre = [
      tf.random.stateless_uniform([], s, 0, n, dtype=tf.int32).numpy()
      for s, n in ((seed_y, height), (seed_x, width))
  ]
  return sign, centre


@pytest.mark.parametrize('magnitude', [5.0, 10.0, 15.0])
def test_fused_layer_equals_tensorflow_apply_op(magnitude):
  batch = len(_BATCH)
  # Op seeds that give TF's signs -1, +1, -1, +1 (images get both signs).
  seeds, choices = [], []
  for i in range(100):
    sign, centre = _tf_choices([i, 7], 17, 23)
    if len(seeds) < batch and sign == (-1.0, 1.0)[len(seeds) % 2]:
      seeds.append([i, 7])
      choices.append((sign, centre))
  sign = np.array([c[0] for c in choices], np.float32)
  np.testing.assert_array_equal(sign, [-1, 1, -1, 1])
  centre = np.array([c[1] for c in choices], np.int32)
  layer = _jitted_layer(magnitude)
  for index, name in enumerate(device_augment.RANDAUGMENT_OPS):
    got = np.asarray(
        layer(
            _BATCH,
            np.full([batch], index, np.int32),
            np.ones([batch], bool),
            sign,
            centre,
        )
    )
    for i, image in enumerate(_BATCH):
      want = tf_ra.apply_op(
          name, tf.constant(image), magnitude, tf.constant(seeds[i], tf.int64)
      ).numpy()
      largest, fraction = _differences(got[i], want)
      if _FUNCTIONS[name] in _EXACT:
        assert largest == 0, (name, i)
      elif _FUNCTIONS[name] in _WITHIN_A_LEVEL:
        assert largest <= 1 and fraction <= 0.01, (name, i)
      else:
        assert fraction <= 0.01, (name, i)


def test_a_layer_at_magnitude_zero_changes_only_what_the_release_does():
  # In the release's mapping, M = 0 leaves the geometric operations,
  # SolarizeAdd and Cutout the identity; the others still act (enhance
  # factor 0.1, Posterize to 0 bits, Solarize every pixel).
  batch = 64
  images = np.resize(_BATCH, (batch,) + _SHAPE)
  op_index, apply, sign, centre = device_augment._draw(
      jax.random.key(3), batch, 17, 23
  )
  out = np.asarray(_jitted_layer(0.0)(images, op_index, apply, sign, centre))
  identity = [
      device_augment.RANDAUGMENT_OPS.index(name)
      for name in (
          'Rotate',
          'ShearX',
          'ShearY',
          'TranslateX',
          'TranslateY',
          'Cutout',
          'SolarizeAdd',
      )
  ]
  kept = np.isin(np.asarray(op_index), identity)
  assert kept.sum() > batch // 4
  np.testing.assert_array_equal(out[kept], images[kept])
  posterized = np.asarray(op_index) == device_augment.RANDAUGMENT_OPS.index(
      'Posterize'
  )
  assert posterized.any() and not out[posterized].any()


def test_randaugment_applies_every_layer_and_draws_every_op():
  # The release draws a probability per operation but never uses it: every
  # layer applies the operation it draws.
  batch = 512
  images = np.stack(
      [_RNG.integers(40, 181, _SHAPE).astype(np.uint8) for _ in range(batch)]
  )
  key = jax.random.key(11)
  out = jax.jit(
      functools.partial(device_augment.randaugment, num_layers=1, magnitude=10)
  )(images, key)
  assert out.shape == images.shape and out.dtype == jnp.uint8
  changed = np.any(np.asarray(out) != images, axis=(1, 2, 3))
  op_index, apply, sign, centre = device_augment._draw(
      jax.random.split(key, 1)[0], batch, 17, 23
  )
  assert np.asarray(apply).all()
  # At magnitude 10 every operation but Solarize (threshold 256) changes
  # every one of these images: exactly the others changed.
  solarize = device_augment.RANDAUGMENT_OPS.index('Solarize')
  np.testing.assert_array_equal(changed, np.asarray(op_index) != solarize)
  counts = np.bincount(np.asarray(op_index), minlength=16)
  assert len(counts) == 16 and counts.min() > 0
  assert set(np.asarray(sign).tolist()) == {-1.0, 1.0}
  centre = np.asarray(centre)
  assert centre.min() >= 0 and (centre.max(axis=0) < (17, 23)).all()
  # Several layers: still uint8, and more images change.
  out3 = device_augment.randaugment(images, key, num_layers=3, magnitude=5)
  changed3 = np.any(np.asarray(out3) != images, axis=(1, 2, 3))
  assert changed3.mean() > changed.mean()


def test_randaugment_rejects_negative_magnitude_and_layers():
  with pytest.raises(ValueError, match='magnitude'):
    device_augment.randaugment(
        _BATCH, jax.random.key(0), num_layers=1, magnitude=-1
    )
  with pytest.raises(ValueError, match='num_layers'):
    device_augment.randaugment(
        _BATCH, jax.random.key(0), num_layers=-1, magnitude=5
    )
  np.testing.assert_array_equal(
      device_augment.randaugment(
          _BATCH, jax.random.key(0), num_layers=0, magnitude=5
      ),
      _BATCH,
  )


def _constant_batch(batch, size=16):
  values = np.arange(1, batch + 1, dtype=np.float32) * 10.0
  images = np.broadcast_to(
      values[:, None, None, None], (batch, size, size + 3, 3)
  ).copy()
  return values, images, np.arange(batch, dtype=np.int32) + 100


def _partners(batch, mixup_alpha, cutmix):
  num_mixup, num_cutmix = mixing.split_sizes(batch, mixup_alpha, cutmix)
  partner = np.arange(batch)
  partner[:num_mixup] = partner[:num_mixup][::-1]
  part = slice(num_mixup, num_mixup + num_cutmix)
  partner[part] = partner[part][::-1]
  return num_mixup, num_cutmix, partner


@pytest.mark.parametrize(
    'batch, mixup_alpha, cutmix',
    [(8, 0.2, True), (7, 1.0, True), (6, 0.2, False), (6, 0.0, True)],
)
def test_mix_batch_mixes_mirror_partners_with_exact_ratios(
    batch, mixup_alpha, cutmix
):
  values, images, labels = _constant_batch(batch)
  num_mixup, num_cutmix, partner = _partners(batch, mixup_alpha, cutmix)
  mix = jax.jit(
      functools.partial(
          device_augment.mix_batch, mixup_alpha=mixup_alpha, cutmix=cutmix
      )
  )
  for seed in range(3):
    out, labels1, labels2, ratio = (
        np.asarray(x) for x in mix(images, labels, jax.random.key(seed))
    )
    assert out.shape == images.shape and out.dtype == np.float32
    assert labels1.dtype == labels2.dtype == np.int32
    assert ratio.shape == (batch,) and ratio.dtype == np.float32
    np.testing.assert_array_equal(labels1, labels)
    np.testing.assert_array_equal(labels2, labels[partner])
    assert ((ratio >= 0) & (ratio <= 1)).all()
    for i in range(batch):
      own, other = values[i], values[partner[i]]
      if i < num_mixup:
        # A uniform blend with weight `ratio` of the own image.
        np.testing.assert_allclose(
            out[i], ratio[i] * own + (1 - ratio[i]) * other, rtol=1e-5
        )
      elif i < num_mixup + num_cutmix and partner[i] != i:
        # Every pixel is the own or the partner's; the ratio is exactly the
        # fraction left of the own image.
        pasted = out[i, ..., 0] == other
        assert np.all(pasted | (out[i, ..., 0] == own))
        assert np.all(out[i] == out[i, ..., :1])
        h, w = pasted.shape
        want = np.float32(1.0) - np.float32(pasted.sum()) / np.float32(h * w)
        assert ratio[i] == want
        # The pasted region is a box.
        rows, cols = np.nonzero(pasted)
        if rows.size:
          assert pasted[rows.min() : rows.max() + 1].all(axis=0).sum() == (
              cols.max() - cols.min() + 1
          )
      else:
        np.testing.assert_array_equal(out[i], images[i])
        assert ratio[i] == 1.0


def test_mix_batch_without_mixing_is_the_identity():
  _, images, labels = _constant_batch(6)
  out, labels1, labels2, ratio = device_augment.mix_batch(
      images, labels, jax.random.key(0), mixup_alpha=0.0, cutmix=False
  )
  np.testing.assert_array_equal(out, images)
  np.testing.assert_array_equal(labels1, labels)
  np.testing.assert_array_equal(labels2, labels)
  np.testing.assert_array_equal(ratio, np.ones(6, np.float32))


def test_mix_batch_ratios_have_the_numpy_recipe_distribution():
  batch = 1024
  _, images, labels = _constant_batch(batch, size=8)
  got = np.asarray(
      device_augment.mix_batch(
          images, labels, jax.random.key(1), mixup_alpha=0.2, cutmix=True
      )[3]
  )
  want = mixing.mix_batch(
      images, labels, np.random.default_rng(1), mixup_alpha=0.2, cutmix=True
  )[3]
  for part in (slice(0, batch // 2), slice(batch // 2, batch)):
    # MixUp: Beta(0.2, 0.2), mean 0.5 and std 0.42; CutMix: box fraction.
    assert abs(got[part].mean() - want[part].mean()) < 0.06
    assert abs(got[part].std() - want[part].std()) < 0.05


@pytest.mark.parametrize('alpha', [0.2, 1.0, 2.0])
def test_mixup_draws_have_the_beta_distribution(alpha):
  stats = pytest.importorskip('scipy.stats')
  size = 20_000
  x_key, y_key = jax.random.split(jax.random.key(int(alpha * 10)))
  # log(X / Y) of the two Gamma draws: the lower half of the symmetric Beta
  # from it in float64 (float32 rounds Beta(0.2, 0.2)'s mass near 1 to 1).
  log_ratio = np.asarray(
      device_augment._log_gamma(x_key, alpha, size)  # pylint: disable=protected-access
      - device_augment._log_gamma(y_key, alpha, size),  # pylint: disable=protected-access
      np.float64,
  )
  lower = 1.0 / (1.0 + np.exp(np.abs(log_ratio)))
  beta = stats.beta(alpha, alpha)
  assert stats.kstest(lower, lambda t: 2.0 * beta.cdf(t)).pvalue > 1e-3
  assert abs((log_ratio > 0).mean() - 0.5) < 0.02
  draws = np.asarray(
      device_augment._symmetric_beta(x_key, alpha, size)  # pylint: disable=protected-access
  )
  assert ((draws >= 0) & (draws <= 1)).all()
  assert abs(draws.std() - beta.std()) < 0.01


def test_augment_batch_loops_only_a_fixed_number_of_times():
  fn = functools.partial(device_augment.augment_batch, **_CONFIG)
  jaxpr = jax.make_jaxpr(fn)(
      jnp.zeros((4, 16, 16, 3), jnp.uint8),
      jnp.zeros((4,), jnp.int32),
      jax.random.key(0),
  )
  # A while loop whose trip count depends on the data (as jax.random.beta's
  # rejection sampling) makes an accelerator's host wait for the device.
  loops = [e.primitive.name for e in jaxpr.jaxpr.eqns]
  assert 'while' not in str(jaxpr)
  assert loops.count('scan') == 1  # The RandAugment layers.


def test_normalize_uses_imagenet_statistics():
  images = _BATCH[:2]
  got = np.asarray(device_augment.normalize(images))
  want = (images - np.array(batching.MEAN_RGB)) / np.array(batching.STDDEV_RGB)
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
      got, tf_aug.normalize(tf.constant(images)).numpy(), rtol=1e-5, atol=1e-5
  )


_CONFIG = dict(
    randaugment_layers=2, randaugment_magnitude=10, mixup_alpha=0.2, cutmix=True
)


def test_augment_batch_shapes_dtypes_finite_and_deterministic_under_jit():
  batch = 8
  images = _RNG.integers(0, 256, (batch, 16, 16, 3)).astype(np.uint8)
  labels = np.arange(batch, dtype=np.int32)
  fn = jax.jit(functools.partial(device_augment.augment_batch, **_CONFIG))
  out = fn(images, labels, jax.random.key(0))
  assert set(out) == {'images', 'labels', 'labels2', 'mix_ratio'}
  assert out['images'].shape == (batch, 16, 16, 3)
  assert out['images'].dtype == jnp.float32
  assert out['labels'].dtype == out['labels2'].dtype == jnp.int32
  assert out['mix_ratio'].shape == (batch,)
  assert out['mix_ratio'].dtype == jnp.float32
  assert np.isfinite(np.asarray(out['images'])).all()
  again = fn(images, labels, jax.random.key(0))
  other = fn(images, labels, jax.random.key(1))
  for name in out:
    np.testing.assert_array_equal(out[name], again[name])
  assert not np.array_equal(out['images'], other['images'])
  # Without augmentation or mixing it is just the normalisation.
  plain = device_augment.augment_batch(
      images,
      labels,
      jax.random.key(0),
      randaugment_layers=0,
      randaugment_magnitude=10,
      mixup_alpha=0.0,
      cutmix=False,
  )
  np.testing.assert_array_equal(
      plain['images'], device_augment.normalize(images)
  )
  np.testing.assert_array_equal(plain['labels2'], labels)


def test_augment_batch_runs_under_pmap_over_two_devices():
  devices = jax.devices()[:2]
  assert len(devices) == 2
  images = _RNG.integers(0, 256, (2, 4, 16, 16, 3)).astype(np.uint8)
  labels = np.arange(8, dtype=np.int32).reshape(2, 4)
  keys = jax.random.split(jax.random.key(0), 2)

  def step(images, labels, key):
    out = device_augment.augment_batch(images, labels, key, **_CONFIG)
    out['mean_ratio'] = jax.lax.pmean(out['mix_ratio'].mean(), 'batch')
    return out

  out = jax.pmap(step, axis_name='batch', devices=devices)(images, labels, keys)
  assert out['images'].shape == (2, 4, 16, 16, 3)
  assert np.isfinite(np.asarray(out['images'])).all()
  assert not np.array_equal(out['images'][0], out['images'][1])
