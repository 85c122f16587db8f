"""Properties of the normalizer-free building blocks."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets import layers


@pytest.mark.parametrize('name', ['relu', 'gelu', 'silu', 'tanh', 'elu'])
def test_computed_gamma_matches_published_table(name):
  gamma = layers.compute_gamma(name)
  assert gamma == pytest.approx(layers.GAMMAS[name], rel=5e-3)


def test_computed_relu_gamma_matches_analytic_value():
  analytic = np.sqrt(2.0 / (1.0 - 1.0 / np.pi))
  assert layers.compute_gamma('relu') == pytest.approx(analytic, rel=1e-4)


def test_gamma_scaled_activation_has_unit_variance():
  z = jax.random.normal(jax.random.PRNGKey(0), (1_000_000,))
  for name in ('relu', 'gelu', 'silu'):
    assert float(jnp.var(layers.nonlinearity(name)(z))) == pytest.approx(
        1.0, abs=0.01
    )


def test_unknown_activation_lists_valid_names():
  with pytest.raises(ValueError, match='gelu'):
    layers.nonlinearity('swishy')
  # The release's NF-RegNet default name resolves instead of crashing.
  assert layers.nonlinearity('swish') is not None


def _ws_kernel_and_output(groups, cin=8, cout=12):
  def f(x):
    conv = layers.WSConv2D(cout, 3, feature_group_count=groups, name='c')
    return conv(x), conv.kernel(x.shape[-1])

  t = hk.transform(f)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 9, cin))
  params = t.init(jax.random.PRNGKey(1), x)
  # Non-trivial gain, bias and kernel mean, so the test can fail.
  params['c']['gain'] = jnp.linspace(0.5, 2.0, cout)
  params['c']['bias'] = jnp.linspace(-1.0, 1.0, cout)
  params['c']['w'] = params['c']['w'] + 0.3
  out, w_hat = t.apply(params, None, x)
  return x, params['c'], out, w_hat


@pytest.mark.parametrize('groups', [1, 4])
def test_ws_kernel_has_zero_mean_and_gain_scaled_variance(groups):
  _, p, _, w_hat = _ws_kernel_and_output(groups)
  fan_in = np.prod(w_hat.shape[:-1])
  mean = np.mean(w_hat, axis=(0, 1, 2))
  var = np.var(w_hat, axis=(0, 1, 2))
  np.testing.assert_allclose(mean, 0.0, atol=1e-6)
  np.testing.assert_allclose(
      var, np.asarray(p['gain']) ** 2 / fan_in, rtol=1e-4
  )


@pytest.mark.parametrize('groups', [1, 4])
def test_ws_output_equals_lax_conv_with_standardized_kernel(groups):
  x, p, out, w_hat = _ws_kernel_and_output(groups)
  want = (
      jax.lax.conv_general_dilated(
          x,
          w_hat,
          (1, 1),
          'SAME',
          dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
          feature_group_count=groups,
      )
      + p['bias']
  )
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def _autodiff_standardize(w, gain, scale=1.0, eps=1e-4):
  # The forward formula, differentiated by JAX.
  axes = tuple(range(w.ndim - 1))
  fan_in = np.prod(w.shape[:-1])
  mean = jnp.mean(w, axis=axes, keepdims=True)
  var = jnp.var(w, axis=axes, keepdims=True)
  return (
      (w - mean) * jax.lax.rsqrt(jnp.maximum(var * fan_in, eps)) * gain
  ) * scale


@pytest.mark.parametrize('scaled', [False, True])
@pytest.mark.parametrize('shape', [(3, 3, 16, 6), (1, 1, 32, 6), (20, 6)])
def test_ws_written_out_gradient_matches_autodiff(shape, scaled):
  rng = np.random.default_rng(len(shape) * 10 + shape[-2])
  w = rng.standard_normal(shape) * 0.1 + 0.05
  w[..., 0] = 0.0  # eps floors this channel's variance: no variance term
  w[..., 1] *= 1e-3  # and nearly floors this one
  w = jnp.asarray(w, jnp.float32)
  gain = jnp.asarray(rng.uniform(0.5, 2.0, shape[-1:]), jnp.float32)
  g = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  if scaled:
    args = (w, gain, jnp.float32(-0.3))
    ours = lambda w, gain, s: layers.standardize_weight(w, gain, scale=s)
  else:
    args = (w, gain)
    ours = layers.standardize_weight
  out, vjp = jax.vjp(ours, *args)
  want, want_vjp = jax.vjp(_autodiff_standardize, *args)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
  for got, expected in zip(vjp(g), want_vjp(g), strict=True):
    scale = float(jnp.max(jnp.abs(expected)))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6 * scale)


@pytest.mark.parametrize('offset', [0.0, 1.0, 10.0])
def test_ws_one_pass_statistics_match_two_pass_float64(offset):
  # The mean and variance come from one pass of sums; kernels whose channel
  # means are `offset` standard deviations from zero keep float32 accuracy.
  rng = np.random.default_rng(int(offset))
  w = rng.standard_normal((3, 3, 64, 8)) * 0.05 + offset * 0.05
  gain = rng.uniform(0.5, 2.0, 8)
  fan_in = 3 * 3 * 64
  centred = w - w.mean(axis=(0, 1, 2))
  want = centred / np.sqrt(fan_in * w.var(axis=(0, 1, 2))) * gain
  got = layers.standardize_weight(
      jnp.asarray(w, jnp.float32), jnp.asarray(gain, jnp.float32)
  )
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


def test_ws_gradient_has_zero_mean_over_each_channels_fan_in():
  # Why the channel means stay near zero under SGD, which the one-pass
  # variance relies on.
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.standard_normal((3, 3, 16, 6)) + 0.5, jnp.float32)
  gain = jnp.asarray(rng.uniform(0.5, 2.0, 6), jnp.float32)
  g = jnp.asarray(rng.standard_normal(w.shape), jnp.float32)
  _, vjp = jax.vjp(lambda w: layers.standardize_weight(w, gain), w)
  (dw,) = vjp(g)
  means = np.abs(np.mean(dw, axis=(0, 1, 2)))
  spread = np.std(dw, axis=(0, 1, 2))
  assert np.all(means < 1e-5 * spread), means / spread


def test_ws_scale_keeps_no_copy_of_the_standardized_kernel():
  w = jax.random.normal(jax.random.PRNGKey(0), (3, 3, 8, 16))
  gain = jnp.linspace(0.5, 2.0, 16)

  def kept(fn):
    _, vjp_fn = jax.vjp(fn, w, gain, jnp.float32(0.7))
    return [
        leaf
        for leaf in jax.tree_util.tree_leaves(vjp_fn)
        if getattr(leaf, 'shape', None) == w.shape
    ]

  # Multiplied by hand, the scale's gradient needs `w_hat` kept for the
  # backward pass next to `w`; folded in, per-channel sums give it.
  by_hand = kept(lambda w, g, s: layers.standardize_weight(w, g) * s)
  folded = kept(lambda w, g, s: layers.standardize_weight(w, g, scale=s))
  assert len(by_hand) == 2
  assert len(folded) == 1
  np.testing.assert_array_equal(folded[0], w)  # the parameter itself


def test_ws_rejects_gain_of_the_wrong_shape():
  with pytest.raises(ValueError, match='gain'):
    layers.standardize_weight(jnp.ones((3, 3, 4, 8)), jnp.ones((4,)))


def test_ws_rejects_a_scale_that_is_not_a_scalar():
  with pytest.raises(ValueError, match='scale must be a scalar'):
    layers.standardize_weight(
        jnp.ones((3, 3, 4, 8)), jnp.ones((8,)), scale=jnp.ones((8,))
    )


def test_ws_follows_input_dtype_with_float32_params():
  t = hk.transform(lambda x: layers.WSConv2D(4, 3)(x))
  x = jnp.ones((1, 5, 5, 3), jnp.float32)
  params = t.init(jax.random.PRNGKey(0), x)
  out = t.apply(params, None, x.astype(jnp.bfloat16))
  assert out.dtype == jnp.bfloat16
  assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(params))


def test_ws_rejects_non_nhwc_input():
  t = hk.transform(lambda x: layers.WSConv2D(4, 3)(x))
  with pytest.raises(ValueError, match='rank 4'):
    t.init(jax.random.PRNGKey(0), jnp.ones((5, 5, 3)))


def test_stochdepth_drops_whole_examples_without_rescaling():
  t = hk.transform(lambda x, tr: layers.StochDepth(0.5)(x, is_training=tr))
  x = jnp.ones((256, 2, 2, 3))
  out = t.apply({}, jax.random.PRNGKey(0), x, True)
  per_example = np.asarray(out).reshape(256, -1)
  # Each example is either kept as is (no 1/keep rescaling) or zeroed.
  assert set(np.unique(per_example)) <= {0.0, 1.0}
  assert np.all(per_example.min(1) == per_example.max(1))
  assert 0.3 < per_example[:, 0].mean() < 0.7
  np.testing.assert_array_equal(t.apply({}, None, x, False), x)


@pytest.mark.parametrize(
    'init,want', [('zeros', 0.0), ('ones', 1.0), ('inv_sqrt', 0.25), (0.3, 0.3)]
)
def test_skipinit_gain_inits(init, want):
  t = hk.transform(lambda x: layers.skip_gain(x, init, num_blocks=16))
  params = t.init(jax.random.PRNGKey(0), jnp.ones(()))
  assert float(params['~']['skip_gain']) == pytest.approx(want)


def test_relu_keeping_output_is_relu_with_relus_gradient_from_its_output():
  x = jnp.asarray([-2.0, -0.0, 0.0, 0.5, 3.0], jnp.bfloat16)
  y, vjp_fn = jax.vjp(layers.relu_keeping_output, x)
  want, want_vjp = jax.vjp(jax.nn.relu, x)
  np.testing.assert_array_equal(y, want)
  g = jnp.asarray([1.0, 2.0, 3.0, 4.0, 5.0], jnp.bfloat16)
  np.testing.assert_array_equal(vjp_fn(g)[0], want_vjp(g)[0])
  # What the backward pass keeps is the output itself, nothing of the input.
  (kept,) = [l for l in jax.tree_util.tree_leaves(vjp_fn) if l.shape == x.shape]
  np.testing.assert_array_equal(kept, y)


@pytest.mark.parametrize('name', ['relu', 'gelu', 'identity'])
def test_conv_act_is_the_activation_of_the_conv(name):
  act = layers.nonlinearity(name)

  def f(x, fold):
    conv = layers.WSConv2D(8, 3, name='c')
    return layers.conv_act(conv, x, act) if fold else act(conv(x))

  t = hk.transform(f)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 9, 4))
  params = t.init(jax.random.PRNGKey(1), x, True)
  params['c']['bias'] = jnp.linspace(-0.5, 0.5, 8)  # so the test can fail
  np.testing.assert_allclose(
      t.apply(params, None, x, True),
      t.apply(params, None, x, False),
      rtol=1e-5,
      atol=1e-5,
  )
  loss = lambda p, x, fold: jnp.sum(t.apply(p, None, x, fold) ** 2)
  got = jax.grad(loss, (0, 1))(params, x, True)
  want = jax.grad(loss, (0, 1))(params, x, False)
  for g, w in zip(
      jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)
  ):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * np.abs(w).max())


def test_conv_act_folds_gamma_so_relu_follows_the_conv_directly():
  # relu(conv(x, gamma * w) + gamma * b): no multiply after the relu, and the
  # relu's input (conv plus bias) has no other use, as cuDNN fusion needs.
  act = layers.nonlinearity('relu')
  t = hk.transform(
      lambda x: layers.conv_act(layers.WSConv2D(8, 1, name='c'), x, act)
  )
  x = jnp.ones((2, 5, 5, 4))
  params = t.init(jax.random.PRNGKey(0), x)
  jaxpr = jax.make_jaxpr(lambda x: t.apply(params, None, x))(x).jaxpr
  call = jaxpr.eqns[-1]  # the output: the relu
  assert call.outvars == jaxpr.outvars
  relu = call.params['call_jaxpr'].jaxpr.eqns
  assert [e.primitive.name for e in relu] == ['max']
  (producer,) = [e for e in jaxpr.eqns if call.invars[0] in e.outvars]
  assert producer.primitive.name == 'add'  # the bias
  assert repr(act) == f"nonlinearity('relu', gamma={layers.GAMMAS['relu']})"


@pytest.mark.parametrize('name', ['gelu', 'silu', 'elu', 'softplus', 'tanh'])
def test_smooth_activation_backward_keeps_only_its_input(name):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 8))
  f = layers.nonlinearity(name)
  _, vjp_fn = jax.vjp(f, x)
  kept = [
      leaf
      for leaf in jax.tree_util.tree_leaves(vjp_fn)
      if getattr(leaf, 'shape', None) == x.shape
  ]
  # Recomputed in the backward pass: only the input is kept, not also the
  # intermediates (GELU's tanh, ...), and the gradient is unchanged.
  assert len(kept) == 1
  plain = lambda x: layers._ACTIVATIONS[name](x) * layers.GAMMAS[name]
  np.testing.assert_allclose(
      vjp_fn(jnp.ones_like(x))[0],
      jax.grad(lambda x: plain(x).sum())(x),
      rtol=1e-6,
  )


def _branch(fold, *, gate, is_training):
  """A residual branch through the folded helpers or multiplied by hand."""

  def fn(x, shortcut):
    conv = layers.WSConv2D(6, 3, name='conv2')
    scale = layers.skip_gain_param(0.7) * 0.2
    sd = layers.StochDepth(0.5)
    if gate:
      out = conv(x)
      g = 2 * layers.SqueezeExcite(6, 6)(out)
      if fold:
        return layers.scaled_gate_branch(
            out, g, scale, shortcut, stoch_depth=sd, is_training=is_training
        )[0]
      out = sd(g * out, is_training=is_training)
    else:
      if fold:
        return layers.scaled_conv_branch(
            conv, x, scale, shortcut, stoch_depth=sd, is_training=is_training
        )[0]
      out = sd(conv(x), is_training=is_training)
    return out * scale + shortcut

  return hk.transform(fn)


@pytest.mark.parametrize('gate', [False, True])
@pytest.mark.parametrize('is_training', [False, True])
def test_folded_branch_scale_is_the_same_function(gate, is_training):
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 5, 5, 4))
  shortcut = jax.random.normal(jax.random.PRNGKey(1), (8, 5, 5, 6))
  folded = _branch(True, gate=gate, is_training=is_training)
  by_hand = _branch(False, gate=gate, is_training=is_training)
  params = by_hand.init(jax.random.PRNGKey(2), x, shortcut)
  assert jax.tree_util.tree_structure(
      folded.init(jax.random.PRNGKey(2), x, shortcut)
  ) == jax.tree_util.tree_structure(params)
  rng = jax.random.PRNGKey(3)

  def loss(t, p):
    return jnp.sum(jnp.sin(t.apply(p, rng, x, shortcut)))

  np.testing.assert_allclose(
      folded.apply(params, rng, x, shortcut),
      by_hand.apply(params, rng, x, shortcut),
      rtol=1e-5,
      atol=1e-6,
  )
  got, want = jax.grad(loss, 1)(folded, params), jax.grad(loss, 1)(
      by_hand, params
  )
  for path, g in jax.tree_util.tree_leaves_with_path(want):
    np.testing.assert_allclose(
        got[path[0].key][path[1].key], g, rtol=1e-4, atol=1e-6
    )


@pytest.mark.parametrize('gate', [False, True])
def test_folded_branch_keeps_no_scaled_copy_of_its_output(gate):
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 5, 5, 6))
  params = _branch(False, gate=gate, is_training=True).init(
      jax.random.PRNGKey(2), x, x
  )

  def kept(fold):
    t = _branch(fold, gate=gate, is_training=True)
    apply = lambda p: t.apply(p, jax.random.PRNGKey(3), x, x)
    _, vjp_fn = jax.vjp(apply, params)
    return [
        leaf
        for leaf in jax.tree_util.tree_leaves(vjp_fn)
        if getattr(leaf, 'shape', None) == x.shape
    ]

  # By hand the gain's gradient needs the (masked, gated) output kept for
  # the backward pass; folded, it comes from weight- or gate-sized tensors.
  assert len(kept(True)) < len(kept(False))


def test_scaled_conv_branch_stats_are_of_the_unscaled_conv():
  def fn(x):
    conv = layers.WSConv2D(6, 1, name='conv2')
    scale = layers.skip_gain_param('zeros')
    out, res_var = layers.scaled_conv_branch(
        conv, x, scale, x, stoch_depth=None, is_training=False, with_stats=True
    )
    return out, res_var, layers.residual_variance(conv(x))

  t = hk.transform(fn)
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 3, 3, 6))
  out, res_var, want = t.apply(t.init(jax.random.PRNGKey(1), x), None, x)
  # SkipInit: the branch adds nothing, yet its statistics are measured.
  np.testing.assert_allclose(out, x)
  assert float(res_var) == pytest.approx(float(want)) and float(want) > 0


def test_squeeze_excite_gates_are_per_channel_in_unit_interval():
  t = hk.transform(lambda x: layers.SqueezeExcite(6, 6, 0.5)(x))
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 4, 6))
  params = t.init(jax.random.PRNGKey(1), x)
  gates = t.apply(params, None, x)
  assert gates.shape == (3, 1, 1, 6)
  assert float(gates.min()) > 0 and float(gates.max()) < 1
  assert params['squeeze_excite/~/linear']['w'].shape == (6, 3)


def test_nf_block_plan_resets_the_expected_variance_at_transitions():
  plan = layers.nf_block_plan((2, 3), alpha=0.2)
  assert [(p.stage, p.block_index, p.index) for p in plan] == [
      (0, 0, 0),
      (0, 1, 1),
      (1, 0, 2),
      (1, 1, 3),
      (1, 2, 4),
  ]
  # A transition block sees the previous stage's variance; after it the
  # stream restarts at 1 + alpha^2.
  expected_var = [1.0, 1.04, 1.08, 1.04, 1.08]
  np.testing.assert_allclose([1 / p.beta**2 for p in plan], expected_var)
  np.testing.assert_allclose(
      [p.depth_fraction for p in plan], [0, 0.2, 0.4, 0.6, 0.8]
  )


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('size', [(8, 6), (7, 6)])
def test_avg_pool_2x2_is_haikus_with_its_gradient(dtype, size):
  rng = np.random.default_rng(size[0])
  x = jnp.asarray(rng.standard_normal((2, *size, 5)), dtype)
  g = jnp.asarray(rng.standard_normal((2, 4, 3, 5)), dtype)

  def haiku_pool(x):
    return hk.avg_pool(x, (1, 2, 2, 1), (1, 2, 2, 1), 'SAME')

  out, vjp = jax.vjp(layers.avg_pool_2x2, x)
  want, want_vjp = jax.vjp(haiku_pool, x)
  np.testing.assert_array_equal(
      np.asarray(out, np.float32), np.asarray(want, np.float32)
  )
  np.testing.assert_array_equal(
      np.asarray(vjp(g)[0], np.float32), np.asarray(want_vjp(g)[0], np.float32)
  )
  # Even sizes: the gradient is an upsampling, no reduce-window of a
  # dilated gradient (which XLA's GPU backend runs as a slow pass).
  grad = jax.jit(jax.grad(lambda x, g: jnp.sum(layers.avg_pool_2x2(x) * g)))
  hlo = grad.lower(x, g).compile().as_text()
  assert ('reduce-window' in hlo) == (size[0] % 2 == 1)
