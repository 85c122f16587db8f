"""Signal propagation at initialization: statistics, analytic laws, plots.

Two instruments, both fed N(0, 1) inputs and run in training mode (BatchNorm
uses batch statistics, exactly as at the first training step):

* `model_signal_stats` runs a registry model with `return_metrics=True` and
  returns, per residual block, the average channel squared mean, the average
  channel variance of the residual stream and the variance of the residual
  branch (the Signal Propagation Plots of Brock, De, Smith 2021, Figures 1-2).
* `ResidualStack` / `stack_signal_stats`: one stage of identical
  pre-activation bottleneck blocks, built from the project's layers, for
  depths the real networks cannot reach on a CPU (1000 blocks). It implements
  each downscaling scheme the papers compare (BatchNorm, none, SkipInit at 0
  or 1/sqrt(depth), the NF strategy) and can measure in log space, where the
  unnormalized stack's 2^depth variance does not overflow float32.

`analytic_log2_second_moment` / `analytic_log2_variance` give what theory
expects of the stack, and `plot_spp` draws the per-block statistics.
"""

import dataclasses
import math
from typing import Optional, Sequence

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from nfnets import layers
from nfnets import models

# The downscaling schemes of the minimal stack (see `ResidualStack`).
SCHEMES = (
    'batchnorm',
    'unnormalized',
    'skipinit_zeros',
    'skipinit_inv_sqrt',
    'nf',
)

# He (fan-in, scale 2) init: what the baselines in `nfnets.baselines` use for
# their plain convs, so that a relu branch preserves the second moment.
_HE_INIT = hk.initializers.VarianceScaling(2.0, 'fan_in', 'normal')
# hk.BatchNorm's default epsilon in our baselines.
_BN_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class SignalStats:
  """Per-block statistics of a residual stream at initialization.

  Index 0 of `avg_sq_mean` / `avg_var` is the stream entering the first
  block (after the stem for real networks); index i >= 1 is the output of
  block i. `res_avg_var[i - 1]` is block i's residual branch (before any
  SkipInit gain or alpha), so it has one entry fewer.

  Attributes:
    avg_sq_mean: channels' squared means, averaged over channels, `[n + 1]`.
    avg_var: channels' variances, averaged over channels, `[n + 1]`.
    res_avg_var: residual branches' average channel variance, `[n]`.
  """

  avg_sq_mean: np.ndarray
  avg_var: np.ndarray
  res_avg_var: np.ndarray

  @property
  def num_blocks(self) -> int:
    return len(self.res_avg_var)


def model_signal_stats(
    name: str,
    *,
    batch_size: int = 8,
    image_size: int = 128,
    seed: int = 0,
    **overrides,
) -> SignalStats:
  """Signal propagation statistics of registry model `name` at init.

  Args:
    name: a `nfnets.models.names()` entry whose model supports
      `return_metrics` (every family does).
    batch_size: images of N(0, 1) pixels.
    image_size: their side in pixels.
    seed: seeds the inputs and the initialization.
    **overrides: constructor overrides, as for `models.create`.

  Returns:
    The model's `SignalStats` (float64 numpy; non-finite values are kept).
  """
  if batch_size < 2:
    raise ValueError(f'batch_size must be >= 2 for variances: {batch_size}.')
  forward = hk.transform_with_state(
      lambda x: models.create(name, **overrides)(
          x, is_training=True, return_metrics=True
      )
  )
  keys = jax.random.split(jax.random.PRNGKey(seed), 3)
  x = jax.random.normal(keys[0], (batch_size, image_size, image_size, 3))
  # Deliberately not jitted. For a network of hundreds of blocks, XLA on a
  # 2-core CPU takes minutes to compile the init (its hundreds of random
  # draws) and the forward pass; eagerly, each primitive is compiled once per
  # shape and then reused by every block of the same stage and by every later
  # model of the same widths, which is several times faster overall.
  # Initialized in training mode: BatchNorm creates its moving averages there.
  params, state = forward.init(keys[1], x)
  (_, metrics), _ = forward.apply(params, state, keys[2], x)
  metrics = jax.device_get(metrics)
  num_blocks = len([k for k in metrics if k.startswith('res_avg_var_')])

  def series(prefix, n):
    return np.array(
        [float(metrics[f'{prefix}{i}']) for i in range(n)], dtype=np.float64
    )

  return SignalStats(
      avg_sq_mean=series('avg_sq_mean_', num_blocks + 1),
      avg_var=series('avg_var_', num_blocks + 1),
      res_avg_var=series('res_avg_var_', num_blocks),
  )


def nf_expected_variance(
    depth: Sequence[int], alpha: float = 0.2
) -> np.ndarray:
  """The NF strategy's expected stream variance after each block.

  Each stage's first (transition) block resets the stream to the shortcut
  conv's unit variance, and each block adds alpha^2: after the k-th block of a
  stage (k from 1) the variance is `1 + k * alpha^2`.

  Args:
    depth: blocks per stage.
    alpha: the residual branch scale.

  Returns:
    `[sum(depth)]` expected variances, block 1 first.
  """
  return np.concatenate(
      [1.0 + np.arange(1, d + 1) * alpha**2 for d in depth]
  ).astype(np.float64)


def _batch_standardize(x: jax.Array) -> jax.Array:
  # What hk.BatchNorm computes in training mode at init (scale 1, offset 0):
  # per-channel standardization with the batch's statistics.
  mean = jnp.mean(x, axis=(0, 1, 2), keepdims=True)
  var = jnp.var(x, axis=(0, 1, 2), keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + _BN_EPS)


def _channel_stats(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(average channel squared mean, average channel variance), float32."""
  x = x.astype(jnp.float32)
  return (
      jnp.mean(jnp.mean(x, axis=(0, 1, 2)) ** 2),
      jnp.mean(jnp.var(x, axis=(0, 1, 2))),
  )


class _StackBlock(hk.Module):
  """One pre-activation bottleneck block of `ResidualStack`."""

  def __init__(
      self,
      scheme: str,
      channels: int,
      bottleneck: int,
      num_blocks: int,
      alpha: float,
      name: Optional[str] = None,
  ):
    super().__init__(name=name)
    self.scheme = scheme
    self.num_blocks = num_blocks
    self.alpha = alpha
    nf = scheme == 'nf'
    # NF: gamma-scaled relu and Scaled WS convs (default init, zero bias), as
    # in `nf_resnet.NFResBlock`. Others: plain relu and bias-free He-init
    # convs, as in `baselines.ResBlockV2`.
    self.activation = layers.nonlinearity('relu', None if nf else 1.0)

    def conv(ch, k, name):
      # VALID: the 3x3 conv's input is padded periodically in __call__.
      if nf:
        return layers.WSConv2D(ch, k, padding='VALID', name=name)
      return layers.WSConv2D(
          ch,
          k,
          padding='VALID',
          standardize=False,
          with_bias=False,
          w_init=_HE_INIT,
          name=name,
      )

    self.conv0 = conv(bottleneck, 1, 'conv0')
    self.conv1 = conv(bottleneck, 3, 'conv1')
    self.conv2 = conv(channels, 1, 'conv2')

  def _norm_act(self, x):
    if self.scheme == 'batchnorm':
      x = _batch_standardize(x)
    return self.activation(x)

  def __call__(
      self, x: jax.Array, beta: jax.Array
  ) -> tuple[jax.Array, jax.Array]:
    """Returns `(x + branch(x), branch variance)` for `x` `[N, H, W, C]`."""
    out = self._norm_act(x)
    if self.scheme == 'nf':
      out = out * beta
    out = self.conv0(out)
    # Periodic padding: on maps this small, zero padding would drop ~16% of
    # the 3x3 conv's second moment at the borders (8x8 maps), a size effect
    # that would bend every law below.
    out = jnp.pad(
        self._norm_act(out), ((0, 0), (1, 1), (1, 1), (0, 0)), mode='wrap'
    )
    out = self.conv1(out)
    out = self.conv2(self._norm_act(out))
    res_var = layers.residual_variance(out)
    if self.scheme.startswith('skipinit_'):
      init = self.scheme[len('skipinit_') :]
      out = layers.skip_gain(out, init, self.num_blocks)
    if self.scheme == 'nf':
      out = out * self.alpha
    return x + out, res_var


class ResidualStack(hk.Module):
  """One stage of identical pre-activation residual blocks (no transitions).

  Block `i` computes `h + s * f(n(h))`: the pre-activation bottleneck of the
  project's ResNets (1x1 -> 3x3 -> 1x1, relu before each conv, width
  `channels * bottleneck_ratio`), with, per scheme:

  - 'batchnorm': BatchNorm before each relu (batch statistics, as at init in
    training mode), He-init convs, s = 1.
  - 'unnormalized': no normalization, He-init convs, s = 1.
  - 'skipinit_zeros' / 'skipinit_inv_sqrt': as unnormalized, s = a learnable
    SkipInit gain (`layers.skip_gain`) at 0 or 1/sqrt(num_blocks).
  - 'nf': the NF strategy: `n(h) = h * beta_i` with `beta_i = 1 /
    sqrt(1 + i alpha^2)` the analytic std, gamma-scaled relu, Scaled WS
    convs, s = alpha.

  The blocks' parameters are stacked and the stack runs as one `lax.scan`
  (`hk.layer_stack`), so its compile time does not grow with depth.

  With `log_space`, the stream is divided after every block by its RMS, and
  the log2 of that factor is accumulated. At init every scheme is positively
  homogeneous in the stream (zero biases, relu, linear convs; BatchNorm is
  scale-invariant up to its epsilon), so this changes no statistic but keeps
  2^1000 variances inside float32: they are reported as log2.
  """

  def __init__(
      self,
      scheme: str,
      num_blocks: int,
      alpha: float = 0.2,
      bottleneck_ratio: float = 0.25,
      log_space: bool = False,
      name: Optional[str] = None,
  ):
    """Constructs the stack.

    Args:
      scheme: one of `SCHEMES`.
      num_blocks: residual blocks, >= 1.
      alpha: residual branch scale of the 'nf' scheme.
      bottleneck_ratio: bottleneck width over the stream's width.
      log_space: renormalize the stream after each block and track its
        scale in log2 (see the class docstring).
      name: module name.
    """
    super().__init__(name=name)
    if scheme not in SCHEMES:
      raise ValueError(f'Unknown scheme {scheme!r}; valid: {SCHEMES}.')
    if num_blocks < 1:
      raise ValueError(f'num_blocks must be >= 1, got {num_blocks}.')
    self.scheme = scheme
    self.num_blocks = num_blocks
    self.alpha = alpha
    self.bottleneck_ratio = bottleneck_ratio
    self.log_space = log_space

  def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
    """Runs the stack on `x` `[N, H, W, C]`.

    Returns:
      log2 of the statistics: `log2_avg_sq_mean` and `log2_avg_var`
      `[num_blocks + 1]` (index 0: the input), `log2_res_avg_var`
      `[num_blocks]`.
    """
    layers.check_nhwc(x, 'ResidualStack')
    channels = x.shape[-1]
    bottleneck = max(1, int(channels * self.bottleneck_ratio))
    expected_var = 1.0 + np.arange(self.num_blocks) * self.alpha**2
    betas = jnp.asarray(1.0 / np.sqrt(expected_var), jnp.float32)

    def block_fn(carry, beta):
      h, log2_scale = carry
      block = _StackBlock(
          self.scheme,
          channels,
          bottleneck,
          self.num_blocks,
          self.alpha,
          name='block',
      )
      h, res_var = block(h, beta)
      sq_mean, var = _channel_stats(h)
      stats = (
          jnp.log2(sq_mean) + log2_scale,
          jnp.log2(var) + log2_scale,
          jnp.log2(res_var) + log2_scale,
      )
      if self.log_space:
        # Any positive factor would do (homogeneity); the RMS keeps h ~ 1.
        rms = jnp.sqrt(jnp.mean(jnp.square(h)))
        h = h / rms
        log2_scale = log2_scale + 2.0 * jnp.log2(rms)
      return (h, log2_scale), stats

    stack = hk.layer_stack(
        self.num_blocks, with_per_layer_inputs=True, name='blocks'
    )(block_fn)
    sq_mean0, var0 = _channel_stats(x)
    _, (sq_means, variances, res_vars) = stack(
        (x.astype(jnp.float32), jnp.float32(0.0)), betas
    )
    return dict(
        log2_avg_sq_mean=jnp.concatenate([jnp.log2(sq_mean0)[None], sq_means]),
        log2_avg_var=jnp.concatenate([jnp.log2(var0)[None], variances]),
        log2_res_avg_var=res_vars,
    )


def stack_signal_stats(
    scheme: str,
    num_blocks: int,
    *,
    channels: int = 256,
    spatial: int = 8,
    batch_size: int = 8,
    seed: int = 0,
    alpha: float = 0.2,
    log_space: bool = False,
) -> dict[str, np.ndarray]:
  """Runs a `ResidualStack` at init on N(0, 1) inputs.

  Args:
    scheme: one of `SCHEMES`.
    num_blocks: depth of the stack.
    channels: width of the residual stream.
    spatial: height and width of the feature maps.
    batch_size: examples.
    seed: seeds the inputs and the initialization.
    alpha: the NF scheme's alpha.
    log_space: see `ResidualStack`.

  Returns:
    The stack's log2 statistics as float64 numpy arrays (see
    `ResidualStack.__call__`).
  """
  forward = hk.transform(
      lambda x: ResidualStack(
          scheme, num_blocks, alpha=alpha, log_space=log_space
      )(x)
  )
  keys = jax.random.split(jax.random.PRNGKey(seed), 3)
  x = jax.random.normal(keys[0], (batch_size, spatial, spatial, channels))
  # A scan: small to compile, so jitting pays off here.
  params = jax.jit(forward.init)(keys[1], x)
  out = jax.jit(forward.apply)(params, keys[2], x)
  return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}


def analytic_log2_second_moment(
    scheme: str, num_blocks: int, k: int, alpha: float = 0.2
) -> float:
  """log2 of the expected average channel second moment after block k.

  For the `ResidualStack` of `scheme` with depth `num_blocks`, on unit-
  variance inputs, in expectation over the random weights. Each law follows
  from what a branch adds at init; the cross term between the stream and the
  branch vanishes in expectation (the last conv's weights are zero-mean):

  - 'batchnorm': BatchNorm feeds every relu unit-variance inputs, and a He-
    init conv after a relu preserves the second moment: each branch adds 1,
    `1 + k` (the paper's "linear growth").
  - 'unnormalized': the branch reproduces the stream's second moment (He
    init, relu of a symmetric input), so the stream doubles: `2^k`.
  - 'skipinit_zeros': the branch is multiplied by 0: `1`.
  - 'skipinit_inv_sqrt': the branch adds `1/num_blocks` of the stream:
    `(1 + 1/num_blocks)^k`, which tends to e at `k = num_blocks`.
  - 'nf': the input is scaled to unit variance by beta, gamma-scaled relus
    and Scaled WS convs keep it there, alpha scales the branch: `1 + k
    alpha^2`.

  Args:
    scheme: one of `SCHEMES`.
    num_blocks: depth of the stack.
    k: blocks applied so far, 0 <= k <= num_blocks.
    alpha: the NF scheme's alpha.

  Returns:
    The log2 of the expectation (finite for any depth).
  """
  _check_block(scheme, num_blocks, k)
  if scheme == 'batchnorm':
    return math.log2(1.0 + k)
  if scheme == 'unnormalized':
    return float(k)
  if scheme == 'skipinit_zeros':
    return 0.0
  if scheme == 'skipinit_inv_sqrt':
    return k * math.log2(1.0 + 1.0 / num_blocks)
  return math.log2(1.0 + k * alpha**2)


def analytic_log2_variance(
    scheme: str, num_blocks: int, k: int, alpha: float = 0.2
) -> Optional[float]:
  """log2 of the expected average channel variance after block k, or None.

  The second moment (`analytic_log2_second_moment`) splits into channel
  variance and channel squared means. Where that split has a closed form:

  - 'batchnorm': the branch's last conv sees relu(z), z ~ N(0, 1), whose mean
    1/sqrt(2 pi) gives every output channel a random mean worth `1/pi` of
    the branch's unit second moment; the variance share is `1 - 1/pi`:
    `1 + k (1 - 1/pi)`.
  - 'skipinit_zeros': `1`.
  - 'nf': Scaled WS makes each output channel's weights zero-mean, which
    cancels the relu's mean: the stream stays (nearly) zero-mean, variance =
    second moment, `1 + k alpha^2`.

  Without normalization the channel means compound with the stream and
  their share has no closed form: None for 'unnormalized' and
  'skipinit_inv_sqrt'.

  Args:
    scheme: one of `SCHEMES`.
    num_blocks: depth of the stack.
    k: blocks applied so far, 0 <= k <= num_blocks.
    alpha: the NF scheme's alpha.

  Returns:
    The log2 of the expectation, or None.
  """
  _check_block(scheme, num_blocks, k)
  if scheme == 'batchnorm':
    return math.log2(1.0 + k * (1.0 - 1.0 / math.pi))
  if scheme in ('skipinit_zeros', 'nf'):
    return analytic_log2_second_moment(scheme, num_blocks, k, alpha)
  return None


def _check_block(scheme: str, num_blocks: int, k: int) -> None:
  if scheme not in SCHEMES:
    raise ValueError(f'Unknown scheme {scheme!r}; valid: {SCHEMES}.')
  if not 0 <= k <= num_blocks:
    raise ValueError(f'k={k} must be in [0, num_blocks={num_blocks}].')


def plot_spp(
    curves: Sequence[tuple[str, SignalStats]],
    path: str,
    *,
    title: str,
    nf_expected: Optional[np.ndarray] = None,
    y_max: float = 1e6,
) -> None:
  """Draws the three Signal Propagation Plots side by side into `path`.

  Args:
    curves: `(label, stats)` per network, all with the same number of blocks.
    path: output image file (PNG).
    title: figure title.
    nf_expected: optional `[n]` analytic NF variance per block, drawn dashed
      on the variance panel.
    y_max: top of the (log) y axes, so that an exploding network does not
      flatten the others; where a curve leaves the chart, the panel says
      from which block (and from which block it stops being finite).
  """
  # Imported here: matplotlib is only needed to draw, and Agg needs no display.
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, axes = plt.subplots(1, 3, figsize=(16, 5.4), layout='constrained')
  panels = [
      (
          'avg_sq_mean',
          'Average channel squared mean',
          0,
          'Residual block (0 = stem output)',
      ),
      (
          'avg_var',
          'Average channel variance',
          0,
          'Residual block (0 = stem output)',
      ),
      (
          'res_avg_var',
          'Residual branch: average channel variance',
          1,
          'Residual block',
      ),
  ]
  notes = [[] for _ in panels]
  for label, stats in curves:
    for ax, note, (field, _, first_block, _) in zip(axes, notes, panels):
      values = getattr(stats, field)
      blocks = np.arange(first_block, first_block + len(values))
      finite = np.isfinite(values) & (values > 0)
      ax.plot(blocks[finite], values[finite], label=label, linewidth=1.4)
      above = np.isfinite(values) & (values > y_max)
      text = []
      if above.any():
        text.append(
            f'> {y_max:.0e} from block ' f'{int(blocks[np.argmax(above)])}'
        )
      if not np.isfinite(values).all():
        text.append(
            'non-finite from block '
            f'{int(blocks[np.argmax(~np.isfinite(values))])}'
        )
      if text:
        # The label up to its parenthesis keeps the note inside the panel.
        note.append(f'{label.split(" (")[0]}: ' + ', '.join(text))
  if nf_expected is not None:
    axes[1].plot(
        np.arange(1, len(nf_expected) + 1),
        nf_expected,
        'k--',
        linewidth=1.0,
        label='NF analytic: 1 + k alpha^2',
    )
  for ax, note, (_, ylabel, _, xlabel) in zip(axes, notes, panels):
    ax.set_yscale('log')
    bottom, top = ax.get_ylim()
    ax.set_ylim(bottom, min(top, y_max))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(ylabel)
    ax.grid(True, which='major', alpha=0.3)
    if note:
      ax.text(
          0.98,
          0.02,
          'Off the chart:\n' + '\n'.join(note),
          transform=ax.transAxes,
          ha='right',
          va='bottom',
          fontsize=7,
          bbox=dict(facecolor='white', alpha=0.8, edgecolor='none'),
      )
  # One legend for the figure, below the panels, where no curve runs.
  fig.legend(
      *axes[1].get_legend_handles_labels(),
      loc='outside lower center',
      ncol=len(curves) + 1,
      fontsize=9,
  )
  fig.suptitle(title)
  fig.savefig(path, dpi=110)
  plt.close(fig)
