"""The model zoo: registry, counts against the papers, signal propagation."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets import models

# Table 3 of the NFNets paper: params (M) and FLOPs (B) at test resolution.
TABLE3 = {
    'nfnet_f0': (71.5, 12.38),
    'nfnet_f1': (132.6, 35.54),
    'nfnet_f2': (193.8, 62.59),
    'nfnet_f3': (254.9, 114.76),
    'nfnet_f4': (316.1, 215.24),
    'nfnet_f5': (377.2, 289.76),
    'nfnet_f6': (438.4, 377.28),
}


@pytest.mark.parametrize('name', sorted(TABLE3))
def test_params_and_flops_reproduce_table3(name):
  params_m, flops_b = TABLE3[name]
  assert round(models.count_params(name) / 1e6, 1) == params_m
  assert round(models.count_flops(name) / 1e9, 2) == flops_b


def test_resnet50_flops_match_the_usual_count():
  # ~4.1B multiply-adds at 224 px (Table 3's ResNet-50 comparator: 4.10B).
  assert models.count_flops('resnet50_bn', 224) / 1e9 == pytest.approx(
      4.10, abs=0.02
  )
  assert models.count_flops('nf_resnet50', 224) == models.count_flops(
      'resnet50_bn', 224
  )


def test_registry_holds_every_family():
  names = models.names()
  for name in [
      'nfnet_f0',
      'nfnet_f7',
      'nfnet_f3_plus',
      'nfnet_f7_plus',
      'nf_resnet26',
      'nf_resnet50',
      'nf_resnet600',
      'nf_regnet_b0',
      'nf_regnet_b8',
      'resnet50_bn',
      'resnet50_skipinit',
      'resnet50_fixup',
      'resnet50_unnormalized',
  ]:
    assert name in names


def test_unknown_model_name_lists_valid_names():
  with pytest.raises(ValueError, match='nfnet_f0') as e:
    models.create('nfnet_f9')
  assert 'Valid names' in str(e.value)


def test_unknown_override_is_an_error():
  with pytest.raises(ValueError, match='widht'):
    models.create('nf_resnet50', widht=2)


@pytest.mark.parametrize('name', ['nfnet_tiny', 'nf_resnet26', 'nf_regnet_b0'])
@pytest.mark.parametrize('rate', [-0.1, 1.0, 1.5])
def test_stochdepth_rate_outside_0_1_is_an_error(name, rate):
  # A rate of 1 or more used to switch stochastic depth off without a word.
  f = hk.transform_with_state(
      lambda x: models.create(name, stochdepth_rate=rate)(x, is_training=True)
  )
  with pytest.raises(ValueError, match=r'stochdepth_rate must be in \[0, 1\)'):
    f.init(jax.random.PRNGKey(0), jnp.ones((1, 16, 16, 3)))


_EVERY_FAMILY = [
    'nfnet_tiny',
    'nf_resnet26',
    'nf_regnet_b0',
    'resnet26_bn',
    'resnet26_fixup',
]


@pytest.mark.parametrize('name', _EVERY_FAMILY)
@pytest.mark.parametrize(
    'depth,message',
    [
        # An empty depth used to mean the variant's own; a zero-block stage
        # and a fifth stage (dropped by a zip) built another network.
        ((), 'non-empty sequence of block counts'),
        ((1, 0, 1, 1), 'block counts >= 1'),
        ((1, 1, 1, 1, 1), 'has 5 stages; .* at most 4'),
    ],
)
def test_depth_without_a_block_in_every_model_stage_is_an_error(
    name, depth, message
):
  f = hk.transform(lambda: models.create(name, depth=depth))
  with pytest.raises(ValueError, match=message):
    f.init(None)


@pytest.mark.parametrize('name', _EVERY_FAMILY)
def test_shorter_depth_builds_fewer_stages(name):
  # NFNets take the stage widths beside the depth; the others have fixed ones.
  widths = {'widths': (32, 64)} if name.startswith('nfnet') else {}

  def num_blocks():
    return len(models.create(name, depth=(1, 2), **widths).blocks)

  assert hk.transform(num_blocks).apply({}, None) == 3


@pytest.mark.parametrize('name', ['nfnet_tiny', 'nf_resnet26', 'resnet26_bn'])
def test_non_nhwc_input_is_an_error(name):
  f = hk.transform_with_state(
      lambda x: models.create(name)(x, is_training=False)
  )
  with pytest.raises(ValueError, match='NHWC'):
    f.init(jax.random.PRNGKey(0), jnp.ones((3, 32, 32)))


@pytest.mark.parametrize(
    'name,kw',
    [
        ('nfnet_tiny', {}),
        ('nf_resnet26', dict(width=0.5)),
        ('nf_regnet_b0', dict(width=0.25)),
        ('resnet26_bn', dict(width=0.5)),
        ('resnet26_fixup', dict(width=0.5)),
        ('resnet26_skipinit', dict(width=0.5)),
    ],
)
def test_every_family_trains_forward_in_bfloat16(name, kw):
  f = hk.transform_with_state(
      lambda x, t: models.create(name, num_classes=7, **kw)(x, is_training=t)
  )
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  params, state = jax.jit(f.init, static_argnums=2)(
      jax.random.PRNGKey(1), x, True
  )
  logits, _ = jax.jit(f.apply, static_argnums=4)(
      params, state, jax.random.PRNGKey(2), x.astype(jnp.bfloat16), True
  )
  assert logits.shape == (2, 7)
  assert logits.dtype == jnp.bfloat16
  assert bool(jnp.all(jnp.isfinite(logits.astype(jnp.float32))))


def _block_variances(name, **kw):
  """Residual stream variance after the stem (0) and after each block."""
  f = hk.transform_with_state(
      lambda x: models.create(name, **kw)(
          x, is_training=True, return_metrics=True
      )
  )
  x = jax.random.normal(jax.random.PRNGKey(1), (8, 128, 128, 3))
  params, state = f.init(jax.random.PRNGKey(0), x)
  (_, metrics), _ = jax.jit(f.apply)(params, state, jax.random.PRNGKey(2), x)
  n = len([k for k in metrics if k.startswith('res_avg_var_')])
  return np.array([float(metrics[f'avg_var_{i}']) for i in range(n + 1)])


def test_nf_resnet_variance_follows_the_analytic_nf_strategy():
  alpha = 0.2
  depth = (3, 4, 6, 3)
  var = _block_variances(
      'nf_resnet50',
      width=1,
      skipinit='ones',
      alpha=alpha,
      stochdepth_rate=0.0,
      drop_rate=0.0,
  )
  block = 1
  for stage_depth in depth:
    for k in range(stage_depth):
      # The transition block resets the variance to 1, plus its own growth.
      expected = 1.0 + (k + 1) * alpha**2
      assert var[block] == pytest.approx(expected, rel=0.2), (block, var)
      block += 1


def test_unnormalized_resnet_variance_doubles_every_block():
  var = _block_variances('resnet50_unnormalized', width=1)
  # Over the first six blocks: the geometric mean growth per block, and no
  # single block far below it (each estimate is noisy at batch 8).
  growth = (var[6] / var[0]) ** (1 / 6)
  assert growth >= 1.8, var
  ratios = var[1:7] / var[0:6]
  assert np.all(ratios >= 1.5), ratios


def test_batchnorm_resnet_variance_grows_linearly():
  var = _block_variances('resnet50_bn', width=1)
  # Within the third stage (6 blocks): constant increments, not a product.
  stage = var[8:14]
  steps = np.diff(stage)
  assert np.all(steps > 0.4) and np.all(steps < 1.2), stage
  assert steps.max() / steps.min() < 1.5, stage


@pytest.mark.parametrize('stride,in_ch', [(1, 32), (2, 16)])
def test_nf_resnet_block_with_relu_folded_into_its_convs_is_the_same_function(
    stride, in_ch, monkeypatch
):
  # The relu blocks move gamma * beta and gamma into their convs' kernels
  # (layers.conv_act); unfolded, they compute gamma * relu after each conv.
  from nfnets import layers, nf_resnet  # pylint: disable=g-import-not-at-top

  def block(x, is_training):
    return nf_resnet.NFResBlock(
        in_ch,
        32,
        stride=stride,
        beta=0.7,
        activation=layers.nonlinearity('relu'),
        skipinit=0.5,
        name='b',
    )(x, is_training=is_training)[0]

  t = hk.transform(block)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, in_ch))
  params = t.init(jax.random.PRNGKey(1), x, True)
  params = jax.tree_util.tree_map(lambda p: p + 0.05, params)  # biases too
  loss = lambda p, x: jnp.sum(t.apply(p, None, x, False) ** 2)
  folded = t.apply(params, None, x, False), jax.grad(loss, (0, 1))(params, x)
  monkeypatch.setattr(layers, 'folds_into_conv', lambda activation: False)
  plain = t.apply(params, None, x, False), jax.grad(loss, (0, 1))(params, x)
  np.testing.assert_allclose(folded[0], plain[0], rtol=1e-5, atol=1e-5)
  for a, b in zip(*(jax.tree_util.tree_leaves(f[1]) for f in (folded, plain))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max())


@pytest.mark.parametrize('widths', [(), (32, 0, 64, 64), (32.5, 64, 128, 128)])
def test_nfnet_widths_need_a_channel_count_per_stage(widths):
  # An empty tuple used to mean the variant's own widths ('widths or spec').
  f = hk.transform(lambda: models.create('nfnet_tiny', widths=widths))
  with pytest.raises(ValueError, match='widths must be a non-empty sequence'):
    f.init(None)
