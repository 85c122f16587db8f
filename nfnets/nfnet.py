"""NFNets: Normalizer-Free Networks F0-F7 and their wider "+" variants.

Brock, De, Smith, Simonyan (2021), "High-Performance Large-Scale Image
Recognition Without Normalization", Table 1. Module paths, parameter names and
shapes are those of the DeepMind release, so its published checkpoints load.
"""

from collections.abc import Sequence
from typing import Any, Optional, Union

import haiku as hk
import jax
import jax.numpy as jnp

from nfnets import layers

_WIDTHS = (256, 512, 1536, 1536)
_PLUS_WIDTHS = (384, 768, 2048, 2048)

# Table 1 of the NFNets paper (F7 from the release). RandAugment: layers and
# magnitude; sizes in pixels.
_BASE_VARIANTS = {
    'F0': dict(
        depth=(1, 2, 6, 3),
        drop_rate=0.2,
        train_imsize=192,
        test_imsize=256,
        ra_layers=4,
        ra_magnitude=5,
    ),
    'F1': dict(
        depth=(2, 4, 12, 6),
        drop_rate=0.3,
        train_imsize=224,
        test_imsize=320,
        ra_layers=4,
        ra_magnitude=10,
    ),
    'F2': dict(
        depth=(3, 6, 18, 9),
        drop_rate=0.4,
        train_imsize=256,
        test_imsize=352,
        ra_layers=4,
        ra_magnitude=10,
    ),
    'F3': dict(
        depth=(4, 8, 24, 12),
        drop_rate=0.4,
        train_imsize=320,
        test_imsize=416,
        ra_layers=4,
        ra_magnitude=15,
    ),
    'F4': dict(
        depth=(5, 10, 30, 15),
        drop_rate=0.5,
        train_imsize=384,
        test_imsize=512,
        ra_layers=4,
        ra_magnitude=15,
    ),
    'F5': dict(
        depth=(6, 12, 36, 18),
        drop_rate=0.5,
        train_imsize=416,
        test_imsize=544,
        ra_layers=4,
        ra_magnitude=15,
    ),
    'F6': dict(
        depth=(7, 14, 42, 21),
        drop_rate=0.5,
        train_imsize=448,
        test_imsize=576,
        ra_layers=4,
        ra_magnitude=15,
    ),
    'F7': dict(
        depth=(8, 16, 48, 24),
        drop_rate=0.5,
        train_imsize=480,
        test_imsize=608,
        ra_layers=4,
        ra_magnitude=15,
    ),
}

VARIANTS: dict[str, dict[str, Any]] = {}
for _name, _spec in _BASE_VARIANTS.items():
  VARIANTS[_name] = dict(_spec, width=_WIDTHS)
  # "+" variants only widen; the release crashed looking up their RandAugment
  # level, here they share their base variant's recipe explicitly.
  VARIANTS[_name + '+'] = dict(_spec, width=_PLUS_WIDTHS)
# Test-only: the same architecture, small enough for CPU tests and demos.
VARIANTS['tiny'] = dict(
    depth=(1, 1, 1, 1),
    drop_rate=0.0,
    train_imsize=32,
    test_imsize=32,
    ra_layers=0,
    ra_magnitude=0,
    width=(32, 64, 128, 128),
)


def variant_spec(variant: str) -> dict[str, Any]:
  """The table row of `variant` (e.g. 'F0', 'F3+')."""
  return layers.lookup_variant(VARIANTS, variant, 'NFNet')


class NFNet(hk.Module):
  """Normalizer-Free Network (NFNet-F*)."""

  def __init__(
      self,
      num_classes: int = 1000,
      variant: str = 'F0',
      width: float = 1.0,
      se_ratio: float = 0.5,
      alpha: float = 0.2,
      stochdepth_rate: float = 0.25,
      drop_rate: Optional[float] = None,
      activation: str = 'gelu',
      fc_init: Optional[hk.initializers.Initializer] = None,
      final_conv_mult: Optional[float] = 2,
      final_conv_ch: Optional[int] = None,
      use_two_convs: bool = True,
      group_width: int = 128,
      bottleneck_ratio: float = 0.5,
      skipinit: Union[str, float] = 'zeros',
      depth: Optional[Sequence[int]] = None,
      widths: Optional[Sequence[int]] = None,
      name: str = 'NFNet',
  ):
    """Constructs an NFNet.

    Args:
      num_classes: classifier outputs.
      variant: 'F0'...'F7', 'F0+'...'F7+', or 'tiny' (tests).
      width: multiplier of every stage width.
      se_ratio: Squeeze-Excite hidden width as a fraction of the block output.
      alpha: residual branch scale (the NF strategy's alpha).
      stochdepth_rate: stochastic depth rate of the last block; it grows
        linearly with the block index from 0.
      drop_rate: dropout before the classifier; the variant's by default.
      activation: name of the gamma-scaled nonlinearity.
      fc_init: classifier weight init; N(0, 0.01) by default.
      final_conv_mult: head conv width as a multiple of the last stage width.
      final_conv_ch: explicit head conv width when `final_conv_mult` is None.
      use_two_convs: the second grouped 3x3 conv of the NFNet block.
      group_width: channels per group of the grouped convs.
      bottleneck_ratio: bottleneck width as a fraction of the block output.
      skipinit: SkipInit gain init: 'zeros', 'inv_sqrt', 'ones' or a number.
      depth: overrides the variant's blocks per stage.
      widths: overrides the variant's stage widths.
      name: top-level module name; 'NFNet' matches published checkpoints.
    """
    super().__init__(name=name)
    spec = variant_spec(variant)
    self.num_classes = num_classes
    self.variant = variant
    self.train_imsize = spec['train_imsize']
    self.test_imsize = spec['test_imsize']
    self.drop_rate = spec['drop_rate'] if drop_rate is None else drop_rate
    layers.check_head_args(num_classes, self.drop_rate)
    layers.check_rate(stochdepth_rate, 'stochdepth_rate')
    width_pattern = tuple(spec['width'] if widths is None else widths)
    if not width_pattern or not all(map(layers.is_count, width_pattern)):
      raise ValueError(
          'widths must be a non-empty sequence of channel counts >= 1, one'
          f' per stage, got {widths!r}.'
      )
    depth_pattern = layers.stage_depths(
        depth, spec['depth'], len(width_pattern)
    )
    if len(depth_pattern) != len(width_pattern):
      raise ValueError(
          f'depth {depth_pattern} and widths {width_pattern} '
          'must have one entry per stage.'
      )
    self.activation = layers.nonlinearity(activation)

    ch = width_pattern[0] // 2
    self.stem = [
        layers.WSConv2D(16, 3, stride=2, name='stem_conv0'),
        layers.WSConv2D(32, 3, stride=1, name='stem_conv1'),
        layers.WSConv2D(64, 3, stride=1, name='stem_conv2'),
        layers.WSConv2D(ch, 3, stride=2, name='stem_conv3'),
    ]

    self.blocks = []
    num_blocks = sum(depth_pattern)
    strides = (1, 2, 2, 2) + (2,) * max(0, len(depth_pattern) - 4)
    for plan in layers.nf_block_plan(depth_pattern, alpha):
      out_ch = int(width_pattern[plan.stage] * width)
      self.blocks.append(
          NFBlock(
              ch,
              out_ch,
              bottleneck_ratio=bottleneck_ratio,
              se_ratio=se_ratio,
              group_width=group_width,
              stride=strides[plan.stage] if plan.block_index == 0 else 1,
              # Scales each block's input to unit variance at init.
              beta=plan.beta,
              alpha=alpha,
              activation=self.activation,
              stochdepth_rate=stochdepth_rate * plan.depth_fraction,
              use_two_convs=use_two_convs,
              skipinit=skipinit,
              num_blocks=num_blocks,
          )
      )
      ch = out_ch

    if final_conv_mult is None:
      if final_conv_ch is None:
        raise ValueError('Give one of final_conv_mult or final_conv_ch.')
      ch = final_conv_ch
    else:
      ch = int(final_conv_mult * ch)
    self.final_conv = layers.WSConv2D(ch, 1, name='final_conv')
    self.fc = layers.Linear(
        num_classes, w_init=fc_init or hk.initializers.RandomNormal(stddev=0.01)
    )

  def __call__(
      self, x: jax.Array, *, is_training: bool, return_metrics: bool = False
  ):
    """Computes logits for images `x` of shape `[N, H, W, C]`.

    Args:
      x: NHWC images; their dtype is the compute dtype.
      is_training: enables stochastic depth and dropout (needs an rng).
      return_metrics: also return the signal propagation statistics.

    Returns:
      `logits [N, num_classes]`, or `(logits, metrics)` when `return_metrics`:
      `avg_sq_mean_i`/`avg_var_i` after the stem (i=0) and block i (i>=1),
      `res_avg_var_i` of block i's residual branch (i>=0), and `pool`.
    """
    layers.check_nhwc(x, 'NFNet')
    out = x
    for i, conv in enumerate(self.stem):
      out = conv(out)
      if i < len(self.stem) - 1:
        out = self.activation(out)
    metrics = layers.signal_metrics(out, 0) if return_metrics else None
    out = layers.apply_blocks(
        self.blocks, out, is_training=is_training, metrics=metrics
    )
    pool = jnp.mean(self.activation(self.final_conv(out)), axis=(1, 2))
    return layers.classify(
        pool, self.fc, self.drop_rate, is_training=is_training, metrics=metrics
    )


class NFBlock(hk.Module):
  """NFNet bottleneck block: 1x1, grouped 3x3 (x2), 1x1, Squeeze-Excite."""

  def __init__(
      self,
      in_ch: int,
      out_ch: int,
      bottleneck_ratio: float = 0.5,
      se_ratio: float = 0.5,
      kernel_shape: int = 3,
      group_width: int = 128,
      stride: int = 1,
      beta: float = 1.0,
      alpha: float = 0.2,
      activation: layers.Activation = jax.nn.gelu,
      use_two_convs: bool = True,
      stochdepth_rate: float = 0.0,
      skipinit: Union[str, float] = 'zeros',
      num_blocks: int = 1,
      name: Optional[str] = None,
  ):
    """Constructs the block.

    Args:
      in_ch: input channels.
      out_ch: output channels.
      bottleneck_ratio: bottleneck width as a fraction of `out_ch`, rounded
        down to a multiple of `group_width`.
      se_ratio: Squeeze-Excite hidden width as a fraction of `out_ch`.
      kernel_shape: size of the grouped convs.
      group_width: channels per group.
      stride: stride of the first grouped conv (and of the shortcut pool).
      beta: input scale, 1 / the expected std of the input.
      alpha: residual branch scale.
      activation: gamma-scaled nonlinearity.
      use_two_convs: add the second grouped conv.
      stochdepth_rate: this block's stochastic depth rate.
      skipinit: SkipInit gain init, see `layers.skip_gain`.
      num_blocks: blocks in the network (for 'inv_sqrt' SkipInit).
      name: module name.
    """
    super().__init__(name=name)
    self.in_ch, self.out_ch = in_ch, out_ch
    self.activation = activation
    self.beta, self.alpha = beta, alpha
    self.stride = stride
    self.skipinit, self.num_blocks = skipinit, num_blocks
    width = int(out_ch * bottleneck_ratio)
    self.groups = max(1, width // group_width)
    self.width = group_width * self.groups
    self.conv0 = layers.WSConv2D(self.width, 1, name='conv0')
    self.conv1 = layers.WSConv2D(
        self.width,
        kernel_shape,
        stride=stride,
        feature_group_count=self.groups,
        name='conv1',
    )
    self.conv1b = None
    if use_two_convs:
      self.conv1b = layers.WSConv2D(
          self.width,
          kernel_shape,
          feature_group_count=self.groups,
          name='conv1b',
      )
    self.conv2 = layers.WSConv2D(out_ch, 1, name='conv2')
    self.use_projection = stride > 1 or in_ch != out_ch
    if self.use_projection:
      self.conv_shortcut = layers.WSConv2D(out_ch, 1, name='conv_shortcut')
    self.se = layers.SqueezeExcite(out_ch, out_ch, se_ratio)
    self.stoch_depth = None
    if 0.0 < stochdepth_rate < 1.0:
      self.stoch_depth = layers.StochDepth(stochdepth_rate)

  def __call__(
      self, x: jax.Array, *, is_training: bool, with_stats: bool = False
  ):
    """Returns `(output, residual branch variance)`."""
    del with_stats  # The gated branch's variance is free where unused.
    out = self.activation(x) * self.beta
    # Transitions average-pool, then project, on the shortcut.
    shortcut = layers.nf_shortcut(
        x,
        out,
        stride=self.stride,
        conv_shortcut=self.conv_shortcut if self.use_projection else None,
    )
    out = self.conv0(out)
    out = self.conv1(self.activation(out))
    if self.conv1b is not None:
      out = self.conv1b(self.activation(out))
    out = self.conv2(self.activation(out))
    # x2 so that the gate, ~0.5 at init, preserves the signal's scale.
    scale = layers.skip_gain_param(self.skipinit, self.num_blocks) * self.alpha
    return layers.scaled_gate_branch(
        out,
        self.se(out) * 2,
        scale,
        shortcut,
        stoch_depth=self.stoch_depth,
        is_training=is_training,
    )
