"""Normalizer-Free RegNets (NF-RegNet B0-B8).

The EfficientNet-like NF-RegNets of the NF-ResNets paper's appendix and the
DeepMind release: inverted bottlenecks with grouped 3x3 convs (group size 8),
Squeeze-Excite on the expanded width, every stage strided. Module paths,
parameter names and shapes are those of the release.
"""

from collections.abc import Sequence
from typing import Any, Optional, Union

import haiku as hk
import jax
import jax.numpy as jnp

from nfnets import layers

VARIANTS: dict[str, dict[str, Any]] = {
    'B0': dict(
        width=(48, 104, 208, 440),
        depth=(1, 3, 6, 6),
        train_imsize=192,
        test_imsize=224,
        drop_rate=0.2,
    ),
    'B1': dict(
        width=(48, 104, 208, 440),
        depth=(2, 4, 7, 7),
        train_imsize=224,
        test_imsize=256,
        drop_rate=0.2,
    ),
    'B2': dict(
        width=(56, 112, 232, 488),
        depth=(2, 4, 8, 8),
        train_imsize=240,
        test_imsize=272,
        drop_rate=0.3,
    ),
    'B3': dict(
        width=(56, 128, 248, 528),
        depth=(2, 5, 9, 9),
        train_imsize=288,
        test_imsize=320,
        drop_rate=0.3,
    ),
    'B4': dict(
        width=(64, 144, 288, 616),
        depth=(2, 6, 11, 11),
        train_imsize=320,
        test_imsize=384,
        drop_rate=0.4,
    ),
    'B5': dict(
        width=(80, 168, 336, 704),
        depth=(3, 7, 14, 14),
        train_imsize=384,
        test_imsize=456,
        drop_rate=0.4,
    ),
    'B6': dict(
        width=(88, 184, 376, 792),
        depth=(3, 8, 16, 16),
        train_imsize=448,
        test_imsize=528,
        drop_rate=0.5,
    ),
    'B7': dict(
        width=(96, 208, 416, 880),
        depth=(4, 10, 19, 19),
        train_imsize=512,
        test_imsize=600,
        drop_rate=0.5,
    ),
    'B8': dict(
        width=(104, 232, 456, 968),
        depth=(4, 11, 22, 22),
        train_imsize=600,
        test_imsize=672,
        drop_rate=0.5,
    ),
}


def variant_spec(variant: str) -> dict[str, Any]:
  """The table row of `variant` (e.g. 'B0')."""
  return layers.lookup_variant(VARIANTS, variant, 'NF-RegNet')


class NFRegNet(hk.Module):
  """Normalizer-Free RegNet."""

  def __init__(
      self,
      num_classes: int = 1000,
      variant: str = 'B0',
      width: float = 0.75,
      expansion: float = 2.25,
      group_size: int = 8,
      se_ratio: float = 0.5,
      alpha: float = 0.2,
      stochdepth_rate: float = 0.1,
      drop_rate: Optional[float] = None,
      # The release defaulted to 'swish', a name its table did not have.
      activation: str = 'silu',
      fc_init: Optional[hk.initializers.Initializer] = None,
      skipinit: Union[str, float] = 'zeros',
      depth: Optional[Sequence[int]] = None,
      name: str = 'NF_RegNet',
  ):
    """Constructs an NF-RegNet.

    Args:
      num_classes: classifier outputs.
      variant: 'B0'...'B8'.
      width: multiplier of the stage widths.
      expansion: inverted-bottleneck expansion (1 for the very first block).
      group_size: channels per group of the 3x3 convs.
      se_ratio: Squeeze-Excite hidden width fraction of the expanded width.
      alpha: residual branch scale.
      stochdepth_rate: stochastic depth rate of the last block.
      drop_rate: dropout before the classifier; the variant's by default.
      activation: name of the gamma-scaled nonlinearity.
      fc_init: classifier weight init; zeros by default, as in the release.
      skipinit: SkipInit gain init: 'zeros', 'inv_sqrt', 'ones' or a number.
      depth: overrides the variant's blocks per stage.
      name: top-level module name; 'NF_RegNet' matches the release.
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
    depth_pattern = layers.stage_depths(
        depth, spec['depth'], len(spec['width'])
    )
    self.activation = layers.nonlinearity(activation)

    ch = int(spec['width'][0] * width)
    self.initial_conv = layers.WSConv2D(ch, 3, stride=2, name='initial_conv')
    self.blocks = []
    num_blocks = sum(depth_pattern)
    for plan in layers.nf_block_plan(depth_pattern, alpha):
      out_ch = int(spec['width'][plan.stage] * width)
      self.blocks.append(
          NFRegBlock(
              ch,
              out_ch,
              # The first block does not expand, following EfficientNet.
              expansion=1 if plan.index == 0 else expansion,
              se_ratio=se_ratio,
              group_size=group_size,
              stride=2 if plan.block_index == 0 else 1,
              beta=plan.beta,
              alpha=alpha,
              activation=self.activation,
              stochdepth_rate=stochdepth_rate * plan.depth_fraction,
              skipinit=skipinit,
              num_blocks=num_blocks,
          )
      )
      ch = out_ch
    # Head width as in EfficientNets: 1280 for a 440-wide last stage.
    self.final_conv = layers.WSConv2D(
        int(1280 * ch // 440), 1, name='final_conv'
    )
    self.fc = layers.Linear(num_classes, w_init=fc_init or jnp.zeros)

  def __call__(
      self, x: jax.Array, *, is_training: bool, return_metrics: bool = False
  ):
    """Computes logits for images `x` of shape `[N, H, W, C]`.

    See `nfnets.nfnet.NFNet.__call__` for the metrics returned.
    """
    layers.check_nhwc(x, 'NF_RegNet')
    out = self.initial_conv(x)
    metrics = layers.signal_metrics(out, 0) if return_metrics else None
    out = layers.apply_blocks(
        self.blocks, out, is_training=is_training, metrics=metrics
    )
    pool = jnp.mean(self.activation(self.final_conv(out)), axis=(1, 2))
    return layers.classify(
        pool, self.fc, self.drop_rate, is_training=is_training, metrics=metrics
    )


class NFRegBlock(hk.Module):
  """NF-RegNet inverted bottleneck: 1x1 expand, grouped 3x3, SE, 1x1."""

  def __init__(
      self,
      in_ch: int,
      out_ch: int,
      expansion: float = 2.25,
      se_ratio: float = 0.5,
      kernel_size: int = 3,
      group_size: int = 8,
      stride: int = 1,
      beta: float = 1.0,
      alpha: float = 0.2,
      activation: layers.Activation = jax.nn.silu,
      stochdepth_rate: float = 0.0,
      skipinit: Union[str, float] = 'zeros',
      num_blocks: int = 1,
      name: str = 'nf_block',
  ):
    """Constructs the block.

    Args:
      in_ch: input channels.
      out_ch: output channels.
      expansion: expanded width as a multiple of `in_ch`, rounded down to a
        multiple of `group_size`.
      se_ratio: Squeeze-Excite hidden width fraction of the expanded width.
      kernel_size: size of the grouped conv.
      group_size: channels per group.
      stride: stride of the grouped conv (and of the shortcut pool).
      beta: input scale, 1 / the expected std of the input.
      alpha: residual branch scale.
      activation: gamma-scaled nonlinearity.
      stochdepth_rate: this block's stochastic depth rate.
      skipinit: SkipInit gain init, see `layers.skip_gain`.
      num_blocks: blocks in the network (for 'inv_sqrt' SkipInit).
      name: module name; 'nf_block' (numbered by Haiku) as in the release.
    """
    super().__init__(name=name)
    self.in_ch, self.out_ch = in_ch, out_ch
    self.activation = activation
    self.beta, self.alpha = beta, alpha
    self.stride = stride
    self.skipinit, self.num_blocks = skipinit, num_blocks
    width = int(in_ch * expansion)
    self.groups = max(1, width // group_size)
    self.width = group_size * self.groups
    self.conv0 = layers.WSConv2D(self.width, 1, name='conv0')
    self.conv1 = layers.WSConv2D(
        self.width,
        kernel_size,
        stride=stride,
        feature_group_count=self.groups,
        name='conv1',
    )
    self.conv2 = layers.WSConv2D(out_ch, 1, name='conv2')
    self.use_projection = stride > 1 or in_ch != out_ch
    if self.use_projection:
      self.conv_shortcut = layers.WSConv2D(out_ch, 1, name='conv_shortcut')
    self.se = layers.SqueezeExcite(self.width, self.width, se_ratio)
    self.stoch_depth = None
    if 0.0 < stochdepth_rate < 1.0:
      self.stoch_depth = layers.StochDepth(stochdepth_rate)

  def __call__(
      self, x: jax.Array, *, is_training: bool, with_stats: bool = False
  ):
    """Returns `(output, residual branch variance)`."""
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
    out = 2 * self.se(out) * out
    scale = layers.skip_gain_param(self.skipinit, self.num_blocks) * self.alpha
    return layers.scaled_conv_branch(
        self.conv2,
        self.activation(out),
        scale,
        shortcut,
        stoch_depth=self.stoch_depth,
        is_training=is_training,
        with_stats=with_stats,
    )
