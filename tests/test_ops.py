"""nfnets.ops: the forward pass of lax, with a hand-written gradient."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets import ops


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
