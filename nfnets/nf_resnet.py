"""Normalizer-Free pre-activation ResNets (NF-ResNets).

Brock, De, Smith (2021), "Characterizing signal propagation to close the
performance gap in unnormalized ResNets". Each block computes
`h + alpha * f(h / beta)`, with `beta` the analytic std of `h` at init and
Scaled Weight-Standardized convolutions. Module paths, parameter names and
shapes are those of the DeepMind release.
"""

from collections.abc import Sequence
from typing import Any, Optional, Union

import haiku as hk
import jax
import jax.numpy as jnp

from nfnets import layers
from nfnets import ops

# The release defines no dropout for NF-ResNets and crashes without one;
# 0.25 before the classifier is the regularization its ImageNet runs used.
VARIANTS: dict[str, dict[str, Any]] = {
    'ResNet26': dict(depth=(2, 2, 2, 2), drop_rate=0.25),
    'ResNet50': dict(depth=(3, 4, 6, 3), drop_rate=0.25),
    'ResNet101': dict(depth=(3, 4, 23, 3), drop_rate=0.25),
    'ResNet152': dict(depth=(3, 8, 36, 3), drop_rate=0.25),
    'ResNet200': dict(depth=(3, 24, 36, 3), drop_rate=0.25),
    'ResNet288': dict(depth=(24, 24, 24, 24), drop_rate=0.25),
    'ResNet600': dict(depth=(50, 50, 50, 50), drop_rate=0.25),
}


def variant_spec(variant: str) -> dict[str, Any]:
  """The table row of `variant` (e.g. 'ResNet50')."""
  return layers.lookup_variant(VARIANTS, variant, 'NF-ResNet')


class NFResNet(hk.Module):
  """Normalizer-Free pre-activation bottleneck ResNet."""

  def __init__(
      self,
      num_classes: int = 1000,
      variant: str = 'ResNet50',
      width: float = 4,
      alpha: float = 0.2,
      stochdepth_rate: float = 0.1,
      drop_rate: Optional[float] = None,
      activation: str = 'relu',
      fc_init: Optional[hk.initializers.Initializer] = None,
      skipinit: Union[str, float] = 'zeros',
      use_se: bool = False,
      se_ratio: float = 0.25,
      standardize: bool = True,
      depth: Optional[Sequence[int]] = None,
      name: str = 'NF_ResNet',
  ):
    """Constructs an NF-ResNet.

    Args:
      num_classes: classifier outputs.
      variant: 'ResNet26', 'ResNet50', ..., 'ResNet600'.
      width: multiplier of the base widths (16 stem, 64/128/256/512 stages;
        4 gives the standard ResNet widths 64 / 256...2048).
      alpha: residual branch scale.
      stochdepth_rate: stochastic depth rate of the last block, linear in the
        block index from 0.
      drop_rate: dropout before the classifier; the variant's by default.
      activation: name of the gamma-scaled nonlinearity.
      fc_init: classifier weight init; N(0, 0.01) by default.
      skipinit: SkipInit gain init: 'zeros', 'inv_sqrt', 'ones' or a number.
      use_se: add Squeeze-Excite to every block (NF-SE-ResNet).
      se_ratio: Squeeze-Excite hidden width fraction.
      standardize: False replaces Scaled WS by plain convs (same parameters),
        to show what WS does to signal propagation.
      depth: overrides the variant's blocks per stage.
      name: top-level module name; 'NF_ResNet' matches the release.
    """
    super().__init__(name=name)
    spec = variant_spec(variant)
    self.num_classes = num_classes
    self.variant = variant
    self.drop_rate = spec['drop_rate'] if drop_rate is None else drop_rate
    layers.check_head_args(num_classes, self.drop_rate)
    layers.check_rate(stochdepth_rate, 'stochdepth_rate')
    depth_pattern = layers.stage_depths(depth, spec['depth'], 4)
    width_pattern = [int(c * width) for c in (64, 128, 256, 512)]
    self.activation = layers.nonlinearity(activation)

    def conv(*args, **kwargs):
      return layers.WSConv2D(*args, standardize=standardize, **kwargs)

    ch = int(16 * width)
    self.initial_conv = conv(ch, 7, stride=2, name='initial_conv')
    self.blocks = []
    num_blocks = sum(depth_pattern)
    for plan in layers.nf_block_plan(depth_pattern, alpha):
      block_width = width_pattern[plan.stage]
      self.blocks.append(
          NFResBlock(
              ch,
              block_width,
              stride=(1, 2, 2, 2)[plan.stage] if plan.block_index == 0 else 1,
              beta=plan.beta,
              alpha=alpha,
              activation=self.activation,
              conv=conv,
              stochdepth_rate=stochdepth_rate * plan.depth_fraction,
              skipinit=skipinit,
              num_blocks=num_blocks,
              use_se=use_se,
              se_ratio=se_ratio,
          )
      )
      ch = block_width
    self.fc = layers.Linear(
        num_classes, w_init=fc_init or hk.initializers.RandomNormal(stddev=0.01)
    )

  def __call__(
      self, x: jax.Array, *, is_training: bool, return_metrics: bool = False
  ):
    """Computes logits for images `x` of shape `[N, H, W, C]`.

    See `nfnets.nfnet.NFNet.__call__` for the metrics returned.
    """
    layers.check_nhwc(x, 'NF_ResNet')
    # The bias stays before the pooling. Adding it after (the same values)
    # came with +0.43 GiB of peak memory for NF-ResNet-50 at batch 256 on an
    # H100 and no speed-up: about one more stem-sized activation (0.38 GiB
    # in bfloat16) held at the peak (benchmarks/RESULTS.md, machine F).
    out = self.initial_conv(x)
    out = ops.max_pool(out, window=3, strides=2, padding='SAME')
    metrics = layers.signal_metrics(out, 0) if return_metrics else None
    out = layers.apply_blocks(
        self.blocks, out, is_training=is_training, metrics=metrics
    )
    pool = jnp.mean(self.activation(out), axis=(1, 2))
    return layers.classify(
        pool, self.fc, self.drop_rate, is_training=is_training, metrics=metrics
    )


class NFResBlock(hk.Module):
  """Normalizer-Free pre-activation bottleneck block."""

  def __init__(
      self,
      in_ch: int,
      out_ch: int,
      bottleneck_ratio: float = 0.25,
      kernel_size: int = 3,
      stride: int = 1,
      beta: float = 1.0,
      alpha: float = 0.2,
      activation: layers.Activation = jax.nn.relu,
      conv=layers.WSConv2D,
      stochdepth_rate: float = 0.0,
      skipinit: Union[str, float] = 'zeros',
      num_blocks: int = 1,
      use_se: bool = False,
      se_ratio: float = 0.25,
      name: Optional[str] = None,
  ):
    """Constructs the block.

    Args:
      in_ch: input channels.
      out_ch: output channels.
      bottleneck_ratio: bottleneck width as a fraction of `out_ch`.
      kernel_size: size of the middle conv.
      stride: stride of the middle conv and of the shortcut conv.
      beta: input scale, 1 / the expected std of the input.
      alpha: residual branch scale.
      activation: gamma-scaled nonlinearity.
      conv: conv module constructor (WSConv2D signature).
      stochdepth_rate: this block's stochastic depth rate.
      skipinit: SkipInit gain init, see `layers.skip_gain`.
      num_blocks: blocks in the network (for 'inv_sqrt' SkipInit).
      use_se: add Squeeze-Excite.
      se_ratio: its hidden width fraction.
      name: module name.
    """
    super().__init__(name=name)
    self.in_ch, self.out_ch = in_ch, out_ch
    self.activation = activation
    self.beta, self.alpha = beta, alpha
    self.stride = stride
    self.skipinit, self.num_blocks = skipinit, num_blocks
    self.width = int(out_ch * bottleneck_ratio)
    self.conv0 = conv(self.width, 1, name='conv0')
    self.conv1 = conv(self.width, kernel_size, stride=stride, name='conv1')
    self.conv2 = conv(out_ch, 1, name='conv2')
    self.use_projection = stride > 1 or in_ch != out_ch
    if self.use_projection:
      self.conv_shortcut = conv(out_ch, 1, stride=stride, name='conv_shortcut')
    self.se = layers.SqueezeExcite(out_ch, out_ch, se_ratio) if use_se else None
    self.stoch_depth = None
    if 0.0 < stochdepth_rate < 1.0:
      self.stoch_depth = layers.StochDepth(stochdepth_rate)

  def __call__(
      self, x: jax.Array, *, is_training: bool, with_stats: bool = False
  ):
    """Returns `(output, residual branch variance)`."""
    if layers.folds_into_conv(self.activation):
      # gamma * beta * relu(x) with the factor moved into the convs' kernels:
      # the relu's output is then what the convs keep for their gradients,
      # and all its gradient needs (no mask of x on the side).
      out = layers.relu_keeping_output(x)
      in_scale = self.activation.gamma * self.beta
    else:
      out, in_scale = self.activation(x) * self.beta, None
    shortcut = x
    if self.use_projection:
      shortcut = self.conv_shortcut(out, input_scale=in_scale)
    # Conv, bias and relu in one cuDNN call each on GPUs (see conv_act).
    out = layers.conv_act(self.conv0, out, self.activation, in_scale)
    out = layers.conv_act(self.conv1, out, self.activation)
    scale = layers.skip_gain_param(self.skipinit, self.num_blocks) * self.alpha
    if self.se is None:
      return layers.scaled_conv_branch(
          self.conv2,
          out,
          scale,
          shortcut,
          stoch_depth=self.stoch_depth,
          is_training=is_training,
          with_stats=with_stats,
      )
    out = self.conv2(out)
    return layers.scaled_gate_branch(
        out,
        2 * self.se(out),
        scale,
        shortcut,
        stoch_depth=self.stoch_depth,
        is_training=is_training,
    )
