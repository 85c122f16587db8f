"""nfnets.ops: the forward passes of lax, with hand-written gradients."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets import ops

_DIMENSIONS = ('NHWC', 'HWIO', 'NHWC')


def _reference_pool(x, window, strides, padding):
  return jax.lax.reduce_window(
      x,
      -jnp.inf,
      jax.lax.max,
      (1, window, window, 1),
      (1, strides, strides, 1),
      padding,
  )


@pytest.mark.parametrize(
    'size,window,strides,padding',
    list(itertools.product([7, 8], [3], [1, 2], ['SAME', 'VALID']))
    + [(9, 2, 3, 'SAME'), (8, 2, 2, 'VALID')],
)
def test_max_pool_matches_reduce_window_and_its_gradient_with_ties(
    size, window, strides, padding
):
  rng = np.random.default_rng(size * 100 + window * 10 + strides)
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


def _reference_conv(x, w, strides, padding, groups):
  return jax.lax.conv_general_dilated(
      x,
      w,
      (strides, strides),
      padding,
      dimension_numbers=_DIMENSIONS,
      feature_group_count=groups,
  )


@pytest.mark.parametrize(
    'size,kernel,strides,padding,groups',
    list(itertools.product([7, 8], [1, 3], [2], ['SAME', 'VALID'], [2]))
    + [(8, 4, 3, 'SAME', 2), (7, 3, 3, 'VALID', 2)]
    + [(12, 3, 2, 'SAME', 4), (9, 5, 2, ((2, 1), (0, 3)), 8)],
)
def test_conv2d_phased_gradients_match_autodiff(
    size, kernel, strides, padding, groups
):
  rng = np.random.default_rng(size * 100 + kernel * 10 + strides)
  x = jnp.asarray(rng.standard_normal((2, size, size + 1, 8)), jnp.float32)
  w = jnp.asarray(
      rng.standard_normal((kernel, kernel, 8 // groups, 8)), jnp.float32
  )
  conv = lambda x, w: ops.conv2d(x, w, strides, padding, groups)
  reference = lambda x, w: _reference_conv(x, w, strides, padding, groups)
  out, vjp = jax.vjp(conv, x, w)
  expected, reference_vjp = jax.vjp(reference, x, w)
  np.testing.assert_array_equal(out, expected)
  g = jnp.asarray(rng.standard_normal(out.shape), jnp.float32)
  for got, want in zip(vjp(g), reference_vjp(g)):
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)


def test_conv2d_input_gradient_runs_no_zero_dilated_convolution():
  x = jnp.ones((2, 8, 8, 4), jnp.bfloat16)
  w = jnp.ones((3, 3, 2, 4), jnp.bfloat16)
  text = lambda conv: (
      jax.jit(jax.grad(lambda x: jnp.sum(conv(x).astype(jnp.float32))))
      .lower(x)
      .as_text()
  )
  ours = text(lambda x: ops.conv2d(x, w, 2, 'SAME', 2))
  theirs = text(lambda x: _reference_conv(x, w, 2, 'SAME', 2))
  assert 'lhs_dilate = [2, 2]' in theirs
  assert 'lhs_dilate = [2, 2]' not in ours
  assert ours.count('stablehlo.convolution') >= 4  # one per phase


def test_conv2d_without_stride_or_groups_is_lax_conv():
  x = jnp.ones((2, 8, 8, 4))
  for strides, groups, w_shape in ((1, 2, (3, 3, 2, 4)), (2, 1, (3, 3, 4, 4))):
    w = jnp.ones(w_shape)
    jaxpr = str(
        jax.make_jaxpr(lambda x: ops.conv2d(x, w, strides, 'SAME', groups))(x)
    )
    assert 'custom_vjp' not in jaxpr and 'conv_general_dilated' in jaxpr
