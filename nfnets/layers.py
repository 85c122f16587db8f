"""Building blocks of normalizer-free networks.

Scaled Weight-Standardized convolutions, gamma-scaled activations, Squeeze-
Excite, stochastic depth and SkipInit gains, as in Brock, De, Smith (2021)
"Characterizing signal propagation to close the performance gap in
unnormalized ResNets" and Brock, De, Smith, Simonyan (2021) "High-Performance
Large-Scale Image Recognition Without Normalization".

Precision: every parameter is created (and kept) in float32. Modules cast their
parameters to the dtype of their input, so feeding bfloat16 images runs the
whole forward and backward pass in bfloat16 while the optimizer sees float32
parameters and gradients. Weight standardization itself is computed in float32
before that cast.
"""

from collections.abc import Callable, Sequence
import functools
import math
import numbers
from typing import NamedTuple, Optional, Union

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from nfnets import ops

Activation = Callable[[jax.Array], jax.Array]

# The plain nonlinearities. Their gamma makes Var(gamma * g(z)) = 1 for
# z ~ N(0, 1), which is what keeps the NF residual stream's variance analytic.
_ACTIVATIONS: dict[str, Activation] = {
    'identity': lambda x: x,
    'celu': jax.nn.celu,
    'elu': jax.nn.elu,
    # tanh approximation: jax.nn.gelu's default, and what the release used.
    'gelu': jax.nn.gelu,
    'glu': jax.nn.glu,
    'leaky_relu': jax.nn.leaky_relu,
    'log_sigmoid': jax.nn.log_sigmoid,
    'log_softmax': jax.nn.log_softmax,
    'relu': jax.nn.relu,
    'relu6': jax.nn.relu6,
    'selu': jax.nn.selu,
    'sigmoid': jax.nn.sigmoid,
    'silu': jax.nn.silu,
    'soft_sign': jax.nn.soft_sign,
    'softplus': jax.nn.softplus,
    'tanh': jnp.tanh,
}

# Activations whose gradient needs only a 0/1 mask of the input, which is
# smaller than the input: recomputing them would keep more, not less.
_MASK_GRADIENT = frozenset({'identity', 'relu', 'relu6', 'leaky_relu'})

# The published gammas (estimated numerically by the original authors). They
# are kept verbatim so that published checkpoints reproduce bit for bit;
# `compute_gamma` recomputes them for any elementwise activation.
GAMMAS: dict[str, float] = {
    'identity': 1.0,
    'celu': 1.270926833152771,
    'elu': 1.2716004848480225,
    'gelu': 1.7015043497085571,
    'glu': 1.8484294414520264,
    'leaky_relu': 1.70590341091156,
    'log_sigmoid': 1.9193484783172607,
    'log_softmax': 1.0002083778381348,
    'relu': 1.7139588594436646,
    'relu6': 1.7131484746932983,
    'selu': 1.0008515119552612,
    'sigmoid': 4.803835391998291,
    'silu': 1.7881293296813965,
    'soft_sign': 2.338853120803833,
    'softplus': 1.9203323125839233,
    'tanh': 1.5939117670059204,
}

# Common aliases; the original NF-RegNet default 'swish' did not exist there.
_ALIASES = {'swish': 'silu'}


def activation_names() -> list[str]:
  """The names `nonlinearity` accepts."""
  return sorted(list(_ACTIVATIONS) + list(_ALIASES))


def _canonical(name: str) -> str:
  name = _ALIASES.get(name, name)
  if name not in _ACTIVATIONS:
    raise ValueError(
        f'Unknown activation {name!r}; valid names: {activation_names()}.'
    )
  return name


def nonlinearity(name: str, gamma: Optional[float] = None) -> Activation:
  """Returns the gamma-scaled activation `x -> gamma * g(x)`.

  Args:
    name: one of `activation_names()`.
    gamma: overrides the published gamma of `name` (e.g. with one from
      `compute_gamma`).

  Returns:
    The scaled activation, elementwise and dtype-preserving.
  """
  name = _canonical(name)
  fn = _ACTIVATIONS[name]
  gamma = GAMMAS[name] if gamma is None else float(gamma)
  if gamma == 1.0:
    scaled = fn
  else:

    def scaled(x):
      # A Python float keeps bfloat16 inputs in bfloat16.
      return fn(x) * gamma

  if name not in _MASK_GRADIENT:
    # Recomputed in the backward pass from its input (which the backward
    # pass keeps anyway): GELU's gradient would otherwise keep its tanh as
    # well, a second activation-sized tensor per call, written in the
    # forward pass and read back in the backward one. The recomputation is
    # elementwise and fuses into the backward kernels.
    scaled = jax.checkpoint(scaled)
  return _ScaledActivation(name, gamma, scaled)


class _ScaledActivation:
  """`x -> gamma * g(x)`, knowing its `name` and `gamma` (see `conv_act`)."""

  def __init__(self, name: str, gamma: float, fn: Activation):
    self.name, self.gamma, self._fn = name, gamma, fn

  def __call__(self, x: jax.Array) -> jax.Array:
    return self._fn(x)

  def __repr__(self):
    return f'nonlinearity({self.name!r}, gamma={self.gamma})'


@jax.custom_vjp
def relu_keeping_output(x: jax.Array) -> jax.Array:
  """`jax.nn.relu` whose backward pass reads its output, not its input.

  The gradient mask `y > 0` equals `x > 0`, so the pre-activation has no
  other use than this relu. When it comes straight from a convolution (and
  its bias), XLA's GPU compiler can then run conv, bias and relu as one cuDNN
  call, which writes only the activation: one full pass over it less in the
  forward pass, and one activation-sized tensor less kept for the backward
  pass. (`jax.nn.relu` keeps a mask of its input, a second use of the
  pre-activation that rules the fusion out.) Reverse mode only.
  """
  return jnp.maximum(x, jnp.zeros((), x.dtype))


def _relu_keeping_output_fwd(x):
  y = relu_keeping_output(x)
  return y, y


def _relu_keeping_output_bwd(y, g):
  return (jnp.where(y > 0, g, jnp.zeros_like(g)),)


relu_keeping_output.defvjp(_relu_keeping_output_fwd, _relu_keeping_output_bwd)


def conv_act(
    conv: Callable[..., jax.Array],
    x: jax.Array,
    activation: Activation,
    input_scale: Optional[float] = None,
) -> jax.Array:
  """`activation(conv(x))`, as one cuDNN call where the activation allows.

  For the gamma-scaled relu, `gamma * relu(z) = relu(gamma * z)` (gamma > 0),
  and `gamma` folds into the conv's kernel and bias (`WSConv2D`'s `scale`):
  what is left is conv, bias and a plain relu, which XLA fuses on GPUs (see
  `relu_keeping_output`). The same function up to rounding; any other
  activation is applied as it is.

  Args:
    conv: a `WSConv2D` (anything taking `(x, scale=..., input_scale=...)`).
    x: its input.
    activation: from `nonlinearity`, or any elementwise function.
    input_scale: passed to the conv: a constant factor of its input.

  Returns:
    The activation of the conv's output.
  """
  if folds_into_conv(activation):
    out = conv(x, scale=activation.gamma, input_scale=input_scale)
    return relu_keeping_output(out)
  return activation(conv(x, input_scale=input_scale))


def folds_into_conv(activation: Activation) -> bool:
  """Whether `activation` is `gamma * relu` with `gamma > 0` (see `conv_act`)."""
  return getattr(activation, 'name', None) == 'relu' and activation.gamma > 0


def compute_gamma(
    fn: Union[str, Activation], num_points: int = 100_001
) -> float:
  """Computes gamma = 1 / std(g(z)), z ~ N(0, 1), by numerical integration.

  The mean and variance of g(z) are integrals against the normal density,
  evaluated with the trapezoid rule on [-12, 12] (the mass outside is below
  1e-32). Unlike sampling, the estimate is deterministic, and unlike
  Gauss-Hermite quadrature it stays accurate for kinked functions like relu.

  Args:
    fn: an elementwise activation, or the name of one of ours.
    num_points: grid points; the error falls with their square.

  Returns:
    gamma as a float.
  """
  if isinstance(fn, str):
    name = _canonical(fn)
    if name in ('glu', 'log_softmax'):
      raise ValueError(
          f'{name!r} is not elementwise; its gamma is only '
          'defined for the layout the release used.'
      )
    fn = _ACTIVATIONS[name]
  if num_points < 3:
    raise ValueError(f'num_points must be >= 3, got {num_points}.')
  z = np.linspace(-12.0, 12.0, num_points)
  density = np.exp(-0.5 * z**2) / math.sqrt(2 * math.pi)
  # float32 evaluation is ~1e-7 relative; the integrals are in float64.
  g = np.asarray(fn(jnp.asarray(z, dtype=jnp.float32)), dtype=np.float64)
  mean = np.trapezoid(density * g, z)
  var = np.trapezoid(density * (g - mean) ** 2, z)
  if not var > 0:
    raise ValueError('The activation is constant on N(0, 1); gamma undefined.')
  return float(1.0 / math.sqrt(var))


def _standardize_fwd(w, gain, scale, eps):
  axes = tuple(range(w.ndim - 1))
  fan_in = np.prod(w.shape[:-1])
  # Mean and variance from one pass of sums (two sibling reductions, one
  # kernel) instead of the two dependent passes of `jnp.var`. The sum of
  # squares is written as AGC's unit norms write it (`agc._unit_squares`),
  # so XLA computes it once for both. Its relative error is about float32's
  # epsilon times 1 + mean^2 / var; the channel means stay small, since the
  # gradient of a standardized kernel has zero mean over each channel's
  # fan-in (`_standardize_bwd`), so SGD's steps never move them.
  mean = jnp.sum(w, axis=axes, keepdims=True) / fan_in
  squares = jnp.sum(jnp.square(w), axis=axes, keepdims=True)
  var = jnp.maximum(squares / fan_in - jnp.square(mean), 0.0)
  floored = var * fan_in <= eps
  rstd = jax.lax.rsqrt(jnp.maximum(var * fan_in, eps))
  # Fused: (w - mean) * factor, with the rsqrt, gain and scale folded into
  # one per-channel factor.
  factor = rstd * gain * scale
  # Only `w` (the parameter, live anyway) and per-channel vectors are kept:
  # not the standardized kernel, which `scale`'s gradient would otherwise
  # need, a float32 copy of every scaled kernel alive from the forward pass
  # to the backward pass (~20 MB in NF-ResNet-50).
  return w * factor - mean * factor, (w, mean, rstd, floored, gain, scale)


def _standardize_bwd(eps, residuals, g):
  """The gradient in one reduction per output channel and one pass.

  With `c = w - mean`, `r = rsqrt(fan_in * var)` and `w_hat = s * gain * r *
  c`: `d gain = s * r * sum(g * c)`, `d s = sum(gain * r * sum(g * c))` and
  `dw = s * gain * r * (g - mean(g) - r**2 * c * sum(g * c))` (sums over a
  channel's fan-in), whose last term is absent where `eps` floors `fan_in *
  var` (r is then a constant). Autodiff of the forward pass gives the same
  function in about twice the kernels, and keeps `w_hat` for `d s`.
  """
  del eps
  w, mean, rstd, floored, gain, scale = residuals
  axes = tuple(range(w.ndim - 1))
  fan_in = np.prod(w.shape[:-1])
  centered = w - mean
  g_sum = jnp.sum(g, axis=axes, keepdims=True)
  gc_sum = jnp.sum(g * centered, axis=axes, keepdims=True)
  variance_term = jnp.where(floored, 0.0, rstd * rstd * gc_sum)
  dw = (gain * rstd * scale) * (g - g_sum / fan_in - centered * variance_term)
  unscaled = rstd * gc_sum  # d gain / s, per channel
  return (
      dw,
      (scale * unscaled).reshape(gain.shape),
      jnp.sum(gain * unscaled).reshape(scale.shape),
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _standardize(w, gain, scale, eps):
  return _standardize_fwd(w, gain, scale, eps)[0]


_standardize.defvjp(_standardize_fwd, _standardize_bwd)


def standardize_weight(
    w: jax.Array,
    gain: jax.Array,
    eps: float = 1e-4,
    scale: Optional[jax.Array] = None,
) -> jax.Array:
  """Scaled Weight Standardization of an HWIO (or ...IO) kernel.

  `w_hat = scale * gain * (w - mean) / sqrt(max(fan_in * var, eps))`, with
  the (biased) mean and variance over every axis but the last (output
  channels). `fan_in` is the product of those axes, so for grouped
  convolutions it is already per group (HWIO holds I / groups input
  channels).

  The gradient is written out (`_standardize_bwd`): two sums per output
  channel and one elementwise pass, where autodiff's has twice the kernels,
  each a launch on a parameter-sized tensor, for every conv of the network.

  Args:
    w: kernel, output channels last.
    gain: per-output-channel gain, shape `[O]`.
    eps: floor of `fan_in * var`, which keeps zero kernels finite.
    scale: an optional scalar factor of the result (default 1), such as a
      residual branch's `alpha * skip_gain` (`WSConv2D`'s `scale`). Applied
      here, its gradient comes from the per-channel sums of the backward pass
      and no copy of `w_hat` is kept for it.

  Returns:
    The standardized kernel, float32.
  """
  w = jnp.asarray(w).astype(jnp.float32)
  gain = jnp.asarray(gain).astype(jnp.float32)
  if gain.shape != w.shape[-1:]:
    raise ValueError(
        f'gain has shape {gain.shape}; the kernel {w.shape} needs '
        f'{w.shape[-1:]}.'
    )
  scale = jnp.asarray(1.0 if scale is None else scale).astype(jnp.float32)
  if scale.shape:
    raise ValueError(f'scale must be a scalar, got shape {scale.shape}.')
  return _standardize(w, gain, scale, float(eps))


def check_nhwc(x: jax.Array, where: str) -> None:
  """Raises a ValueError unless `x` is a rank-4 NHWC batch."""
  if getattr(x, 'ndim', None) != 4:
    raise ValueError(
        f'{where} expects NHWC images of rank 4, but input has shape '
        f'{getattr(x, "shape", None)}.'
    )


class WSConv2D(hk.Module):
  """2D convolution with Scaled Weight Standardization, gain and bias."""

  def __init__(
      self,
      output_channels: int,
      kernel_shape: Union[int, Sequence[int]],
      stride: Union[int, Sequence[int]] = 1,
      padding: str = 'SAME',
      feature_group_count: int = 1,
      standardize: bool = True,
      with_bias: bool = True,
      eps: float = 1e-4,
      w_init: Optional[hk.initializers.Initializer] = None,
      name: Optional[str] = None,
  ):
    """Constructs the convolution.

    Args:
      output_channels: number of output channels `O`.
      kernel_shape: `(kh, kw)` or an int.
      stride: `(sh, sw)` or an int.
      padding: 'SAME' or 'VALID'.
      feature_group_count: number of groups; must divide input and output
        channels.
      standardize: False gives a plain conv with the same parameters (used to
        show what Scaled WS buys, e.g. in signal propagation plots).
      with_bias: add the bias `bias`; the release always does.
      eps: floor of `fan_in * var` in the standardization.
      w_init: kernel initializer; fan-in scaled normal by default (Scaled WS
        is largely insensitive to it).
      name: module name; matters for checkpoints.
    """
    super().__init__(name=name)
    if output_channels < 1:
      raise ValueError(f'output_channels must be >= 1, got {output_channels}.')
    if padding not in ('SAME', 'VALID'):
      raise ValueError(f"padding must be 'SAME' or 'VALID', got {padding!r}.")
    if feature_group_count < 1 or output_channels % feature_group_count:
      raise ValueError(
          f'feature_group_count={feature_group_count} must divide '
          f'output_channels={output_channels}.'
      )
    self.output_channels = output_channels
    self.kernel_shape = ops.pair(kernel_shape, 'kernel_shape')
    self.stride = ops.pair(stride, 'stride')
    self.padding = padding
    self.feature_group_count = feature_group_count
    self.standardize = standardize
    self.with_bias = with_bias
    self.eps = eps
    self.w_init = w_init or hk.initializers.VarianceScaling(
        1.0, 'fan_in', 'normal'
    )

  def kernel(
      self, in_channels: int, scale: Optional[jax.Array] = None
  ) -> jax.Array:
    """The effective (standardized) kernel, float32, HWIO, times `scale`."""
    w_shape = self.kernel_shape + (
        in_channels // self.feature_group_count,
        self.output_channels,
    )
    w = hk.get_parameter('w', w_shape, jnp.float32, init=self.w_init)
    if not self.standardize:
      return w if scale is None else w * scale
    gain = hk.get_parameter(
        'gain', (self.output_channels,), jnp.float32, init=jnp.ones
    )
    return standardize_weight(w, gain, self.eps, scale=scale)

  def __call__(
      self,
      x: jax.Array,
      scale: Optional[jax.Array] = None,
      input_scale: Optional[float] = None,
  ) -> jax.Array:
    """Applies the conv to `x` of shape `[N, H, W, C]`; returns `[N, H', W', O]`.

    Args:
      x: the input.
      scale: an optional float32 scalar that multiplies the output. It is
        applied to the kernel and bias instead (the same function, up to
        rounding), so a scalar gain after the conv costs no pass over the
        activation, and its gradient comes from weight-sized tensors (with
        standardization, from the per-channel sums of its backward pass)
        rather than from a saved copy of the output.
      input_scale: an optional constant that multiplies the input, applied
        to the kernel alone, for the same reasons.
    """
    check_nhwc(x, self.module_name)
    in_channels = x.shape[-1]
    if in_channels % self.feature_group_count:
      raise ValueError(
          f'{self.module_name}: input channels {in_channels} are not divisible '
          f'by feature_group_count={self.feature_group_count}.'
      )
    w = self.kernel(in_channels, scale)
    if input_scale is not None:
      w = w * input_scale
    w = w.astype(x.dtype)
    # The stems' stride-2 convs of RGB images run as space-to-depth convs.
    out = ops.conv2d(x, w, self.stride, self.padding, self.feature_group_count)
    if not self.with_bias:
      return out
    bias = hk.get_parameter(
        'bias', (self.output_channels,), jnp.float32, init=jnp.zeros
    )
    if scale is not None:
      bias = bias * scale
    return out + bias.astype(x.dtype)


class Linear(hk.Module):
  """Dense layer whose float32 parameters follow the input's dtype.

  Parameter names (`w` [in, out], `b` [out]) and the default module name
  (`linear`, `linear_1`, ...) are those of `hk.Linear`, so checkpoints of
  either load into the other.
  """

  def __init__(
      self,
      output_size: int,
      with_bias: bool = True,
      w_init: Optional[hk.initializers.Initializer] = None,
      b_init: Optional[hk.initializers.Initializer] = None,
      name: Optional[str] = None,
  ):
    """Constructs the layer.

    Args:
      output_size: number of outputs.
      with_bias: whether to add a bias `b`.
      w_init: weight initializer; truncated normal with stddev
        1/sqrt(fan_in) by default, as in `hk.Linear`.
      b_init: bias initializer; zeros by default.
      name: module name.
    """
    super().__init__(name=name)
    if output_size < 1:
      raise ValueError(f'output_size must be >= 1, got {output_size}.')
    self.output_size = output_size
    self.with_bias = with_bias
    self.w_init = w_init
    self.b_init = b_init or jnp.zeros

  def __call__(self, x: jax.Array) -> jax.Array:
    """Maps `[..., in]` to `[..., output_size]`."""
    fan_in = x.shape[-1]
    w_init = self.w_init or hk.initializers.TruncatedNormal(
        1.0 / math.sqrt(fan_in)
    )
    w = hk.get_parameter(
        'w', (fan_in, self.output_size), jnp.float32, init=w_init
    )
    out = jnp.dot(x, w.astype(x.dtype))
    if self.with_bias:
      b = hk.get_parameter(
          'b', (self.output_size,), jnp.float32, init=self.b_init
      )
      out = out + b.astype(x.dtype)
    return out


class SqueezeExcite(hk.Module):
  """Squeeze-and-Excite: a per-channel sigmoid gate from pooled features."""

  def __init__(
      self,
      in_ch: int,
      out_ch: int,
      se_ratio: Optional[float] = 0.5,
      hidden_ch: Optional[int] = None,
      activation: Activation = jax.nn.relu,
      name: Optional[str] = None,
  ):
    """Constructs the module.

    Args:
      in_ch: input channels.
      out_ch: number of gates (channels of the tensor being gated).
      se_ratio: hidden width is `max(1, int(in_ch * se_ratio))`.
      hidden_ch: explicit hidden width, used when `se_ratio` is None.
      activation: hidden activation; the release uses a plain (unscaled) relu.
      name: module name.
    """
    super().__init__(name=name)
    if se_ratio is None:
      if hidden_ch is None:
        raise ValueError('SqueezeExcite needs se_ratio or hidden_ch.')
      self.hidden_ch = int(hidden_ch)
    else:
      if se_ratio <= 0:
        raise ValueError(f'se_ratio must be > 0, got {se_ratio}.')
      self.hidden_ch = max(1, int(in_ch * se_ratio))
    self.in_ch, self.out_ch = in_ch, out_ch
    self.activation = activation
    self.fc0 = Linear(self.hidden_ch)
    self.fc1 = Linear(out_ch)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Returns gates of shape `[N, 1, 1, out_ch]` for `x` of shape `[N, H, W, C]`."""
    h = jnp.mean(x, axis=(1, 2))
    h = self.fc1(self.activation(self.fc0(h)))
    return jax.nn.sigmoid(h)[:, None, None, :]


class StochDepth(hk.Module):
  """Stochastic depth: drops whole residual branches per example.

  No rescaling by the keep probability (as in the release), and the identity
  at evaluation.
  """

  def __init__(self, drop_rate: float, name: Optional[str] = None):
    """Constructs the module.

    Args:
      drop_rate: probability of dropping an example's branch, in [0, 1).
      name: module name.
    """
    super().__init__(name=name)
    check_rate(drop_rate, 'drop_rate')
    self.drop_rate = drop_rate

  def keep_mask(
      self, batch_size: int, ndim: int = 4, *, is_training: bool
  ) -> Optional[jax.Array]:
    """Float32 `[batch_size, 1, ...]` of 0/1 per example, or None (keep all).

    For blocks that fold the mask into a per-example scale instead of
    multiplying the full activation by it.
    """
    if not is_training or self.drop_rate == 0.0:
      return None
    keep = jax.random.bernoulli(
        hk.next_rng_key(),
        1.0 - self.drop_rate,
        (batch_size,) + (1,) * (ndim - 1),
    )
    return keep.astype(jnp.float32)

  def __call__(self, x: jax.Array, *, is_training: bool) -> jax.Array:
    """Applies per-example dropping to the batch `x` (leading axis)."""
    keep = self.keep_mask(x.shape[0], x.ndim, is_training=is_training)
    return x if keep is None else x * keep.astype(x.dtype)


SKIPINIT_INITS = ('zeros', 'inv_sqrt', 'ones')


def skip_gain(
    x: jax.Array, init: Union[str, float] = 'zeros', num_blocks: int = 1
) -> jax.Array:
  """Multiplies `x` by the enclosing module's SkipInit gain `skip_gain`.

  Args:
    x: the residual branch's output.
    init: 'zeros' (SkipInit, the release's default), 'inv_sqrt'
      (1/sqrt(num_blocks)), 'ones', or a number.
    num_blocks: residual blocks in the network, for 'inv_sqrt'.

  Returns:
    `x * skip_gain`, in x's dtype.
  """
  return x * skip_gain_param(init, num_blocks).astype(x.dtype)


def skip_gain_param(
    init: Union[str, float] = 'zeros', num_blocks: int = 1
) -> jax.Array:
  """The enclosing module's SkipInit gain `skip_gain`, a float32 scalar.

  Args:
    init: as in `skip_gain`.
    num_blocks: as in `skip_gain`.

  Returns:
    The parameter (created on first use with the init's value).
  """
  if isinstance(init, str):
    if init not in SKIPINIT_INITS:
      raise ValueError(
          f'skipinit init must be one of {SKIPINIT_INITS} or a number, got '
          f'{init!r}.'
      )
    value = {
        'zeros': 0.0,
        'ones': 1.0,
        'inv_sqrt': 1.0 / math.sqrt(max(num_blocks, 1)),
    }[init]
  else:
    value = float(init)
  return hk.get_parameter(
      'skip_gain', (), jnp.float32, init=hk.initializers.Constant(value)
  )


def _keep(
    stoch_depth: Optional[StochDepth], batch_size: int, is_training: bool
) -> Optional[jax.Array]:
  if stoch_depth is None:
    return None
  return stoch_depth.keep_mask(batch_size, is_training=is_training)


# The branch helpers below fold a block's scalar factors (`alpha *
# skip_gain`, and the stochastic-depth keep mask) into something small, the
# last conv's kernel or the Squeeze-Excite gate, instead of multiplying the
# activation-sized branch output by each. That saves passes over the output
# in both directions and, above all, the copy of the output the backward
# pass would otherwise keep for the gain's gradient. The function is the
# same up to rounding, and the random numbers are drawn in the same order.


def scaled_conv_branch(
    conv: 'WSConv2D',
    x: jax.Array,
    scale: jax.Array,
    shortcut: jax.Array,
    *,
    stoch_depth: Optional[StochDepth],
    is_training: bool,
    with_stats: bool = False,
) -> tuple[jax.Array, Optional[jax.Array]]:
  """`shortcut + keep * scale * conv(x)`, the scale folded into the conv.

  Args:
    conv: the branch's last conv.
    x: its input.
    scale: the branch's float32 scalar scale, `alpha * skip_gain`.
    shortcut: the block's shortcut.
    stoch_depth: the block's StochDepth module, or None.
    is_training: whether stochastic depth drops branches.
    with_stats: also return the variance of the unscaled `conv(x)` (for
      signal propagation plots). The scale then multiplies the output
      instead, which gives the same function.

  Returns:
    `(output, residual branch variance or None)`.
  """
  if with_stats:
    out = conv(x)
    res_var = residual_variance(out)
    out = out * scale.astype(out.dtype)
  else:
    out, res_var = conv(x, scale=scale), None
  keep = _keep(stoch_depth, out.shape[0], is_training)
  if keep is not None:
    out = out * keep.astype(out.dtype)
  return out + shortcut, res_var


def scaled_gate_branch(
    x: jax.Array,
    gate: jax.Array,
    scale: jax.Array,
    shortcut: jax.Array,
    *,
    stoch_depth: Optional[StochDepth],
    is_training: bool,
) -> tuple[jax.Array, jax.Array]:
  """`shortcut + keep * scale * gate * x`, the scalars folded into the gate.

  Args:
    x: the branch output `[N, H, W, C]`.
    gate: its Squeeze-Excite gate `[N, 1, 1, C]` (already doubled).
    scale: the branch's float32 scalar scale, `alpha * skip_gain`.
    shortcut: the block's shortcut.
    stoch_depth: the block's StochDepth module, or None.
    is_training: whether stochastic depth drops branches.

  Returns:
    `(output, residual branch variance)`, the variance of `gate * x` (the
    compiler drops it where it is not used).
  """
  res_var = residual_variance(gate * x)
  gate = gate.astype(jnp.float32) * scale
  keep = _keep(stoch_depth, x.shape[0], is_training)
  if keep is not None:
    gate = gate * keep
  return x * gate.astype(x.dtype) + shortcut, res_var


def signal_metrics(x: jax.Array, index: int) -> dict[str, jax.Array]:
  """Signal propagation statistics of an NHWC activation.

  Args:
    x: activation `[N, H, W, C]`.
    index: suffix of the metric names (0 for the stem, i for block i).

  Returns:
    `avg_sq_mean_<index>`: the channels' squared means, averaged;
    `avg_var_<index>`: the channels' variances, averaged. Both in float32.
  """
  x = x.astype(jnp.float32)
  return {
      f'avg_sq_mean_{index}': jnp.mean(jnp.mean(x, axis=(0, 1, 2)) ** 2),
      f'avg_var_{index}': jnp.mean(jnp.var(x, axis=(0, 1, 2))),
  }


def residual_variance(x: jax.Array) -> jax.Array:
  """Average channel variance of a residual branch's output, float32."""
  return jnp.mean(jnp.var(x.astype(jnp.float32), axis=(0, 1, 2)))


def lookup_variant(table: dict, variant: str, family: str) -> dict:
  """`table[variant]`, or a ValueError listing the family's variants."""
  if variant not in table:
    raise ValueError(
        f'Unknown {family} variant {variant!r}; valid: {sorted(table)}.'
    )
  return table[variant]


def check_rate(value: float, name: str) -> None:
  """Raises ValueError naming `name` unless `value` is in [0, 1)."""
  if not 0.0 <= value < 1.0:
    raise ValueError(f'{name} must be in [0, 1), got {value}.')


def is_count(value) -> bool:
  """Whether `value` is an integer >= 1 (numpy's too; not a bool)."""
  return (
      isinstance(value, numbers.Integral)
      and not isinstance(value, bool)
      and value >= 1
  )


def stage_depths(
    depth: Optional[Sequence[int]],
    default: Sequence[int],
    max_stages: int,
) -> tuple[int, ...]:
  """The blocks per stage: `depth`, or the variant's `default` when None.

  Args:
    depth: the `depth` override, or None.
    default: the variant's blocks per stage.
    max_stages: how many stages the model has widths for.

  Returns:
    The blocks per stage as a tuple of ints.

  Raises:
    ValueError: `depth` is empty, holds a count below 1 (a stage without
      blocks would silently merge its stride into the next one) or has
      more stages than the model has widths.
  """
  pattern = tuple(default if depth is None else depth)
  if not pattern or not all(is_count(d) for d in pattern):
    raise ValueError(
        'depth must be a non-empty sequence of block counts >= 1, one per'
        f' stage, got {depth!r}.'
    )
  if len(pattern) > max_stages:
    raise ValueError(
        f'depth {pattern} has {len(pattern)} stages; this model has widths'
        f' for at most {max_stages}.'
    )
  return tuple(int(d) for d in pattern)


def check_head_args(num_classes: int, drop_rate: float) -> None:
  """Validates the classifier arguments every model takes."""
  if num_classes < 1:
    raise ValueError(f'num_classes must be >= 1, got {num_classes}.')
  check_rate(drop_rate, 'drop_rate')


def apply_blocks(
    blocks, x: jax.Array, *, is_training: bool, metrics: Optional[dict]
) -> jax.Array:
  """Runs residual blocks in order, recording their signal statistics.

  Args:
    blocks: modules taking `(x, *, is_training, with_stats)` and returning
      `(output, residual branch variance)` (None allowed without stats).
    x: the stem's output.
    is_training: passed to every block.
    metrics: a dict to fill (`avg_sq_mean_i`, `avg_var_i` after block i >= 1,
      `res_avg_var_i` of block i >= 0), or None to record nothing.

  Returns:
    The last block's output.
  """
  for i, block in enumerate(blocks):
    x, res_var = block(
        x, is_training=is_training, with_stats=metrics is not None
    )
    if metrics is not None:
      metrics.update(signal_metrics(x, i + 1))
      metrics[f'res_avg_var_{i}'] = res_var
  return x


def classify(
    pool: jax.Array,
    fc: hk.Module,
    drop_rate: float,
    *,
    is_training: bool,
    metrics: Optional[dict],
):
  """Dropout (training only) and the classifier on pooled features.

  Returns:
    `logits`, or `(logits, metrics)` with `metrics['pool']` (before dropout)
    when `metrics` is a dict.
  """
  logits_in = pool
  if drop_rate > 0.0 and is_training:
    logits_in = hk.dropout(hk.next_rng_key(), drop_rate, pool)
  logits = fc(logits_in)
  if metrics is None:
    return logits
  metrics['pool'] = pool
  return logits, metrics


_POOL_2X2 = dict(window_shape=(1, 2, 2, 1), strides=(1, 2, 2, 1))


@jax.custom_vjp
def _avg_pool_2x2_even(x: jax.Array) -> jax.Array:
  return hk.avg_pool(x, padding='SAME', **_POOL_2X2)


def _avg_pool_2x2_even_fwd(x):
  return _avg_pool_2x2_even(x), None


def _avg_pool_2x2_even_bwd(_, g):
  # Each input pixel is in one window: its gradient is its window's, / 4,
  # as autodiff computes it (a power of two: exact). Autodiff's form is a
  # reduce-window over a zero-dilated, padded gradient, which XLA's GPU
  # backend ran as a pass of its own at ~1.2 TB/s (0.59 ms of F0's step on
  # machine E for its three transitions); a broadcast fuses into whatever
  # reads the gradient next.
  n, h, w, c = g.shape
  g = g / jnp.asarray(4, g.dtype)
  up = jnp.broadcast_to(g[:, :, None, :, None, :], (n, h, 2, w, 2, c))
  return (up.reshape(n, 2 * h, 2 * w, c),)


_avg_pool_2x2_even.defvjp(_avg_pool_2x2_even_fwd, _avg_pool_2x2_even_bwd)


def avg_pool_2x2(x: jax.Array) -> jax.Array:
  """`hk.avg_pool` over 2x2 windows, stride 2, 'SAME', of NHWC `x`.

  The same function; for even heights and widths (every NFNet and NF-RegNet
  transition at their resolutions) its gradient is written out as an
  upsampling (see `_avg_pool_2x2_even_bwd`). Odd sizes, whose edge windows
  average fewer pixels, take Haiku's.
  """
  check_nhwc(x, 'avg_pool_2x2')
  if x.shape[1] % 2 or x.shape[2] % 2:
    return hk.avg_pool(x, padding='SAME', **_POOL_2X2)
  return _avg_pool_2x2_even(x)


def nf_shortcut(
    x: jax.Array,
    out: jax.Array,
    *,
    stride: int,
    conv_shortcut: Optional[hk.Module],
) -> jax.Array:
  """The shortcut of NFNet / NF-RegNet blocks.

  Args:
    x: the block's input (the identity shortcut).
    out: the scaled pre-activation `activation(x) * beta`.
    stride: the block's stride; a transition average-pools 2x2 first.
    conv_shortcut: the 1x1 projection, or None when shapes already match.

  Returns:
    The shortcut branch.
  """
  if stride > 1:
    out = avg_pool_2x2(out)
  elif conv_shortcut is None:
    return x
  return conv_shortcut(out) if conv_shortcut is not None else out


class BlockPlan(NamedTuple):
  """Where a residual block sits, and what the NF strategy gives it."""

  stage: int  # stage index
  block_index: int  # index within the stage (0: the transition block)
  index: int  # index over the whole network
  beta: float  # 1 / expected std of the block's input at init
  depth_fraction: float  # index / num_blocks: scales stochastic depth


def nf_block_plan(depth_pattern: Sequence[int], alpha: float) -> list:
  """The blocks of an NF network in order, with their analytic `beta`.

  The residual stream's expected variance grows by alpha^2 per block and
  resets to 1 + alpha^2 after each transition (first block of a stage), so
  block i is fed `h / beta_i` with `beta_i = sqrt(Var(h_i))` at init.

  Args:
    depth_pattern: blocks per stage.
    alpha: the residual branch scale.

  Returns:
    A list of `BlockPlan`, one per block.
  """
  plan = []
  expected_std = 1.0
  num_blocks = sum(depth_pattern)
  for stage, stage_depth in enumerate(depth_pattern):
    for block_index in range(stage_depth):
      index = len(plan)
      plan.append(
          BlockPlan(
              stage, block_index, index, 1.0 / expected_std, index / num_blocks
          )
      )
      if block_index == 0:
        expected_std = 1.0
      expected_std = (expected_std**2 + alpha**2) ** 0.5
  return plan
