"""The baselines the normalizer-free thesis argues against.

All are bottleneck ResNets with the standard widths (stem 64, stages
256/512/1024/2048 at `width=4`):

- `ResNet(norm='batchnorm')`: pre-activation ResNet (v2) with BatchNorm.
- `ResNet(norm=None)`: the same network with BatchNorm simply removed
  ("unnormalized"): its residual stream's variance doubles every block.
- `ResNet(norm=None, skipinit=True)`: SkipInit, a learnable scalar (init 0) at
  the end of every residual branch (De & Smith, 2020).
- `FixupResNet`: post-activation ResNet with Fixup initialization and scalar
  biases/multipliers (Zhang, Dauphin, Ma, 2019).

Convolutions use He (fan-in, scale 2) initialization, the standard for relu
networks, so the unnormalized network shows its textbook signal propagation.
"""

from collections.abc import Sequence
from typing import Optional, Union

import haiku as hk
import jax
import jax.numpy as jnp

from nfnets import layers
from nfnets import ops

VARIANTS = {
    'ResNet26': dict(depth=(2, 2, 2, 2)),
    'ResNet50': dict(depth=(3, 4, 6, 3)),
    'ResNet101': dict(depth=(3, 4, 23, 3)),
    'ResNet152': dict(depth=(3, 8, 36, 3)),
    'ResNet200': dict(depth=(3, 24, 36, 3)),
    'ResNet288': dict(depth=(24, 24, 24, 24)),
    'ResNet600': dict(depth=(50, 50, 50, 50)),
}

_HE_INIT = hk.initializers.VarianceScaling(2.0, 'fan_in', 'normal')


def variant_spec(variant: str):
  """The table row of `variant` (e.g. 'ResNet50')."""
  return layers.lookup_variant(VARIANTS, variant, 'ResNet')


def _conv(ch, k, stride=1, name=None, w_init=_HE_INIT):
  # A plain, bias-free conv whose float32 kernel follows the input's dtype.
  return layers.WSConv2D(
      ch,
      k,
      stride=stride,
      standardize=False,
      with_bias=False,
      w_init=w_init,
      name=name,
  )


class _BatchNorm(hk.BatchNorm):
  """BatchNorm computed in float32 whatever the compute dtype.

  Batch statistics of bfloat16 activations are too coarse, and Haiku's
  BatchNorm would otherwise promote its output to float32.
  """

  def __call__(self, x, is_training):
    out = super().__call__(x.astype(jnp.float32), is_training=is_training)
    return out.astype(x.dtype)


def _batchnorm(name):
  return _BatchNorm(
      create_scale=True, create_offset=True, decay_rate=0.9, eps=1e-5, name=name
  )


class ResNet(hk.Module):
  """Pre-activation bottleneck ResNet, with BatchNorm, SkipInit or neither."""

  def __init__(
      self,
      num_classes: int = 1000,
      variant: str = 'ResNet50',
      width: float = 4,
      norm: Optional[str] = 'batchnorm',
      skipinit: Union[bool, str, float] = False,
      drop_rate: float = 0.0,
      depth: Optional[Sequence[int]] = None,
      fc_init: Optional[hk.initializers.Initializer] = None,
      name: str = 'ResNet',
  ):
    """Constructs the network.

    Args:
      num_classes: classifier outputs.
      variant: 'ResNet26', 'ResNet50', ..., 'ResNet600'.
      width: multiplier of the base widths (4 gives the standard ResNet).
      norm: 'batchnorm' or None (no normalization at all).
      skipinit: False, or the SkipInit gain init ('zeros', 'inv_sqrt', 'ones',
        a number; True means 'zeros').
      drop_rate: dropout before the classifier.
      depth: overrides the variant's blocks per stage.
      fc_init: classifier weight init; zeros by default.
      name: top-level module name.
    """
    super().__init__(name=name)
    spec = variant_spec(variant)
    if norm not in ('batchnorm', None):
      raise ValueError(f"norm must be 'batchnorm' or None, got {norm!r}.")
    layers.check_head_args(num_classes, drop_rate)
    self.norm = norm
    self.drop_rate = drop_rate
    skipinit = 'zeros' if skipinit is True else skipinit
    depth_pattern = layers.stage_depths(depth, spec['depth'], 4)
    num_blocks = sum(depth_pattern)
    self.initial_conv = _conv(int(16 * width), 7, stride=2, name='initial_conv')
    self.blocks = []
    for multiplier, stage_depth, stride in zip(
        (64, 128, 256, 512), depth_pattern, (1, 2, 2, 2)
    ):
      for block_index in range(stage_depth):
        self.blocks.append(
            ResBlockV2(
                int(multiplier * width),
                stride=stride if block_index == 0 else 1,
                use_projection=block_index == 0,
                norm=norm,
                skipinit=skipinit,
                num_blocks=num_blocks,
            )
        )
    self.final_bn = _batchnorm('final_bn') if norm else None
    self.fc = layers.Linear(num_classes, w_init=fc_init or jnp.zeros)

  def __call__(
      self, x: jax.Array, *, is_training: bool, return_metrics: bool = False
  ):
    """Computes logits for images `x` of shape `[N, H, W, C]`.

    BatchNorm uses batch statistics when `is_training` and its moving
    averages otherwise (they live in Haiku state: use `transform_with_state`).
    """
    layers.check_nhwc(x, 'ResNet')
    out = self.initial_conv(x)
    out = ops.max_pool(out, window=3, strides=2, padding='SAME')
    metrics = layers.signal_metrics(out, 0) if return_metrics else None
    out = layers.apply_blocks(
        self.blocks, out, is_training=is_training, metrics=metrics
    )
    if self.final_bn is not None:
      out = self.final_bn(out, is_training=is_training)
    pool = jnp.mean(jax.nn.relu(out), axis=(1, 2))
    return layers.classify(
        pool, self.fc, self.drop_rate, is_training=is_training, metrics=metrics
    )


class ResBlockV2(hk.Module):
  """Pre-activation bottleneck block: (BN) relu 1x1, (BN) relu 3x3, 1x1."""

  def __init__(
      self,
      out_ch: int,
      stride: int = 1,
      use_projection: bool = False,
      norm: Optional[str] = 'batchnorm',
      skipinit: Union[bool, str, float] = False,
      num_blocks: int = 1,
      name: Optional[str] = None,
  ):
    """Constructs the block (see `ResNet` for the arguments)."""
    super().__init__(name=name)
    self.stride = stride
    self.use_projection = use_projection
    self.skipinit, self.num_blocks = skipinit, num_blocks
    width = out_ch // 4
    bn = _batchnorm if norm else (lambda name: None)
    self.bn0, self.bn1, self.bn2 = bn('bn0'), bn('bn1'), bn('bn2')
    self.conv0 = _conv(width, 1, name='conv0')
    self.conv1 = _conv(width, 3, stride=stride, name='conv1')
    self.conv2 = _conv(out_ch, 1, name='conv2')
    if use_projection:
      self.conv_shortcut = _conv(out_ch, 1, stride=stride, name='conv_shortcut')

  def _norm_act(self, bn, x, is_training):
    if bn is not None:
      x = bn(x, is_training=is_training)
    # Its output feeds a conv, which keeps it for its own gradient anyway; so
    # the relu's gradient reads that rather than keeping a mask of its input.
    # Without BatchNorm, conv and relu also run as one cuDNN call on GPUs.
    return layers.relu_keeping_output(x)

  def __call__(
      self, x: jax.Array, *, is_training: bool, with_stats: bool = False
  ):
    """Returns `(output, residual branch variance)`."""
    del with_stats  # The variance costs nothing where it is unused.
    out = self._norm_act(self.bn0, x, is_training)
    shortcut = self.conv_shortcut(out) if self.use_projection else x
    out = self.conv0(out)
    out = self.conv1(self._norm_act(self.bn1, out, is_training))
    out = self.conv2(self._norm_act(self.bn2, out, is_training))
    res_var = layers.residual_variance(out)
    if self.skipinit is not False:
      out = layers.skip_gain(out, self.skipinit, self.num_blocks)
    return out + shortcut, res_var


class FixupResNet(hk.Module):
  """Post-activation bottleneck ResNet with Fixup initialization."""

  def __init__(
      self,
      num_classes: int = 1000,
      variant: str = 'ResNet50',
      width: float = 4,
      drop_rate: float = 0.0,
      depth: Optional[Sequence[int]] = None,
      name: str = 'FixUp_ResNet',
  ):
    """Constructs the network.

    Args:
      num_classes: classifier outputs.
      variant: 'ResNet26', 'ResNet50', ..., 'ResNet600'.
      width: multiplier of the base widths (4 gives the standard ResNet).
      drop_rate: dropout before the classifier.
      depth: overrides the variant's blocks per stage.
      name: top-level module name.
    """
    super().__init__(name=name)
    spec = variant_spec(variant)
    layers.check_head_args(num_classes, drop_rate)
    self.drop_rate = drop_rate
    depth_pattern = layers.stage_depths(depth, spec['depth'], 4)
    num_blocks = sum(depth_pattern)
    ch = int(16 * width)
    self.initial_conv = _conv(ch, 7, stride=2, name='initial_conv')
    self.blocks = []
    for multiplier, stage_depth, stride in zip(
        (64, 128, 256, 512), depth_pattern, (1, 2, 2, 2)
    ):
      for block_index in range(stage_depth):
        out_ch = int(multiplier * width)
        self.blocks.append(
            FixupBlock(
                ch, out_ch, num_blocks, stride=stride if block_index == 0 else 1
            )
        )
        ch = out_ch
    # Fixup initializes the classifier to zero.
    self.fc = layers.Linear(num_classes, w_init=jnp.zeros)

  def __call__(
      self, x: jax.Array, *, is_training: bool, return_metrics: bool = False
  ):
    """Computes logits for images `x` of shape `[N, H, W, C]`."""
    layers.check_nhwc(x, 'FixUp_ResNet')
    out = self.initial_conv(x)
    bias1 = hk.get_parameter('bias1', (), jnp.float32, init=jnp.zeros)
    out = jax.nn.relu(out + bias1.astype(out.dtype))
    out = ops.max_pool(out, window=3, strides=2, padding='SAME')
    metrics = layers.signal_metrics(out, 0) if return_metrics else None
    out = layers.apply_blocks(
        self.blocks, out, is_training=is_training, metrics=metrics
    )
    bias2 = hk.get_parameter('bias2', (), jnp.float32, init=jnp.zeros)
    # Fixup's scalar bias before the classifier.
    pool = jnp.mean(out, axis=(1, 2)) + bias2.astype(out.dtype)
    return layers.classify(
        pool, self.fc, self.drop_rate, is_training=is_training, metrics=metrics
    )


class FixupBlock(hk.Module):
  """Post-activation Fixup bottleneck block."""

  def __init__(
      self,
      in_ch: int,
      out_ch: int,
      num_blocks: int,
      stride: int = 1,
      name: Optional[str] = None,
  ):
    """Constructs the block.

    Args:
      in_ch: input channels.
      out_ch: output channels.
      num_blocks: residual blocks in the network (L in Fixup's rescaling
        L^(-1/(2m-2)), m = 3 layers per branch, so L^(-1/4)).
      stride: stride of the 3x3 and shortcut convs.
      name: module name.
    """
    super().__init__(name=name)
    self.stride = stride
    width = out_ch // 4
    scale = num_blocks**-0.25
    self.conv0 = _conv(
        width,
        1,
        name='conv0',
        w_init=hk.initializers.RandomNormal((2.0 / in_ch) ** 0.5 * scale),
    )
    self.conv1 = _conv(
        width,
        3,
        stride=stride,
        name='conv1',
        w_init=hk.initializers.RandomNormal((2.0 / (width * 9)) ** 0.5 * scale),
    )
    # The last conv of each branch starts at zero: the block is the identity.
    self.conv2 = _conv(out_ch, 1, name='conv2', w_init=jnp.zeros)
    self.use_projection = stride > 1 or in_ch != out_ch
    if self.use_projection:
      self.conv_shortcut = _conv(
          out_ch,
          1,
          stride=stride,
          name='conv_shortcut',
          w_init=hk.initializers.RandomNormal((2.0 / in_ch) ** 0.5),
      )

  def __call__(
      self, x: jax.Array, *, is_training: bool, with_stats: bool = False
  ):
    """Returns `(output, residual branch variance)`."""
    del with_stats  # The variance costs nothing where it is unused.
    del is_training

    def scalar(name, init=jnp.zeros):
      return hk.get_parameter(name, (), jnp.float32, init=init).astype(x.dtype)

    out = x + scalar('bias1a')
    shortcut = self.conv_shortcut(out) if self.use_projection else out
    out = jax.nn.relu(self.conv0(out) + scalar('bias1b'))
    out = self.conv1(out + scalar('bias2a'))
    out = jax.nn.relu(out + scalar('bias2b'))
    out = self.conv2(out + scalar('bias3a'))
    out = out * scalar('scale', jnp.ones) + scalar('bias3b')
    res_var = layers.residual_variance(out)
    return jax.nn.relu(out + shortcut), res_var
