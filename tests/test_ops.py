"""nfnets.ops: the functions of lax, computed another way."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets import ops


def _reference_pool(x, window, strides, padding):
  window, strides = ops.pair(window, 'window'), ops.pair(strides, 'strides')
  return jax.lax.reduce_window(
      x, -jnp.inf, jax.lax.max, (1, *window, 1), (1, *strides, 1), padding
  )


@pytest.mark.parametrize(
    'size,window,strides,padding',
    list(itertools.product([7, 8], [3], [1, 2], ['SAME', 'VALID']))
    # Stride above the window (phases without taps), and phases with
    # different numbers of taps.
    + [(9, 2, 3, 'SAME'), (8, 2, 2, 'VALID'), (12, 5, 3, 'SAME')]
    + [(9, (3, 2), (2, 1), 'SAME'), (10, (2, 4), (1, 3), 'VALID')],
)
def test_max_pool_matches_reduce_window_and_its_gradient_with_ties(
    size, window, strides, padding
):
  rng = np.random.default_rng(
      size * 100 + int(np.sum(window)) * 10 + int(np.sum(strides))
  )
  # Few distinct values: most windows hold tied maxima, where the gradient
  # must go to the same element as XLA's select_and_scatter picks.
  x = jnp.asarray(rng.integers(0, 4, (2, size, size + 1, 3)), jnp.float32)
  pool = lambda x: ops.max_pool(x, window, strides, padding)
  reference = lambda x: _reference_pool(x, window, strides, padding)
  out, vjp = jax.vjp(pool, x)
  expected, reference_vjp = jax.vjp(reference, x)
  np.testing.assert_array_equal(out, expected)
  g = jnp.asarray(rng.standard_normal(out.shape), jnp.float32)
  np.testing.assert_allclose(vjp(g)[0], reference_vjp(g)[0], atol=1e-6)


def test_max_pool_gradient_has_no_select_and_scatter_and_keeps_dtype():
  x = jnp.ones((2, 8, 8, 4), jnp.bfloat16)
  grad = jax.grad(lambda x: jnp.sum(ops.max_pool(x).astype(jnp.float32)))
  assert 'select_and_scatter' not in jax.jit(grad).lower(x).as_text()
  reference = jax.grad(
      lambda x: jnp.sum(_reference_pool(x, 3, 2, 'SAME').astype(jnp.float32))
  )
  assert 'select_and_scatter' in jax.jit(reference).lower(x).as_text()
  assert grad(x).dtype == jnp.bfloat16


def test_max_pool_rejects_bad_input():
  with pytest.raises(ValueError, match='float'):
    ops.max_pool(jnp.ones((2, 8, 8, 3), jnp.int32))
  with pytest.raises(ValueError, match='padding'):
    ops.max_pool(jnp.ones((2, 8, 8, 3)), padding='same')
  with pytest.raises(ValueError, match='256 taps'):
    ops.max_pool(jnp.ones((2, 40, 40, 3)), window=17)
  with pytest.raises(ValueError, match='strides'):
    ops.max_pool(jnp.ones((2, 8, 8, 3)), strides=0)


def _reference_conv(x, w, strides, padding, groups=1):
  return jax.lax.conv_general_dilated(
      x,
      w,
      (strides, strides),
      padding,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      feature_group_count=groups,
      precision='highest',
  )


@pytest.mark.parametrize(
    'size,kernel,padding,channels',
    # Even and odd sizes, odd and even kernels; 7x7 is NF-ResNet's stem,
    # 3x3 NFNet's and NF-RegNet's.
    list(itertools.product([6, 7], [1, 2, 3, 7], ['SAME', 'VALID'], [3]))
    + [(16, 3, 'SAME', 1), (9, 4, 'VALID', 2)],
)
def test_space_to_depth_conv_matches_strided_conv_and_its_gradients(
    size, kernel, padding, channels
):
  rng = np.random.default_rng(size * 100 + kernel * 10 + channels)
  x = jnp.asarray(rng.standard_normal((2, size, size + 3, channels)))
  w = jnp.asarray(rng.standard_normal((kernel, kernel, channels, 5)))
  x, w = x.astype(jnp.float32), w.astype(jnp.float32)
  conv = lambda x, w: ops.conv2d(x, w, 2, padding)
  reference = lambda x, w: _reference_conv(x, w, 2, padding)
  out, vjp = jax.vjp(conv, x, w)
  expected, reference_vjp = jax.vjp(reference, x, w)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  g = jnp.asarray(rng.standard_normal(out.shape), jnp.float32)
  for got, want in zip(vjp(g), reference_vjp(g)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def _conv_windows(fn, *args):
  """(window strides, input channels) of every convolution `fn` traces."""
  jaxpr = jax.make_jaxpr(fn)(*args)
  return [
      (eqn.params['window_strides'], eqn.invars[0].aval.shape[-1])
      for eqn in jaxpr.eqns
      if eqn.primitive.name == 'conv_general_dilated'
  ]


def test_conv2d_uses_space_to_depth_only_for_strided_few_channel_convs():
  rgb = jnp.ones((2, 16, 16, 3))
  # 2x2 blocks of RGB: 12 channels, with zeros up to 16 (cuDNN's multiple
  # of 8, which it would otherwise pad to in a pass of its own).
  assert _conv_windows(
      lambda x, w: ops.conv2d(x, w, 2), rgb, jnp.ones((3, 3, 3, 8))
  ) == [((1, 1), 16)]
  two = jnp.ones((2, 16, 16, 2))  # 8 channels already: no padding
  assert _conv_windows(
      lambda x, w: ops.conv2d(x, w, 2), two, jnp.ones((3, 3, 2, 8))
  ) == [((1, 1), 8)]
  # Enough channels already, stride 1, or groups: left to XLA as written.
  wide = jnp.ones((2, 16, 16, 8))
  assert _conv_windows(
      lambda x, w: ops.conv2d(x, w, 2), wide, jnp.ones((3, 3, 8, 8))
  ) == [((2, 2), 8)]
  assert _conv_windows(
      lambda x, w: ops.conv2d(x, w, 1), rgb, jnp.ones((3, 3, 3, 8))
  ) == [((1, 1), 3)]
  grouped = jnp.ones((2, 16, 16, 4))
  assert _conv_windows(
      lambda x, w: ops.conv2d(x, w, 2, feature_group_count=2),
      grouped,
      jnp.ones((3, 3, 2, 8)),
  ) == [((2, 2), 4)]
  np.testing.assert_allclose(
      ops.conv2d(grouped, jnp.ones((3, 3, 2, 8)), 2, feature_group_count=2),
      _reference_conv(grouped, jnp.ones((3, 3, 2, 8)), 2, 'SAME', 2),
  )


def test_conv2d_rejects_bad_input():
  with pytest.raises(ValueError, match='HWIO'):
    ops.conv2d(jnp.ones((16, 16, 3)), jnp.ones((3, 3, 3, 8)))
  with pytest.raises(ValueError, match='padding'):
    ops.conv2d(jnp.ones((2, 16, 16, 3)), jnp.ones((3, 3, 3, 8)), 2, 'same')
  with pytest.raises(ValueError, match='strides'):
    ops.conv2d(jnp.ones((2, 16, 16, 3)), jnp.ones((3, 3, 3, 8)), (2, 0))
