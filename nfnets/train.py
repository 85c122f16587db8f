"""Training and evaluation: a pure, pmapped train step and the loop around it.

    metrics = train_and_evaluate(config, workdir)

Data parallel over every device of every process: each process reads its own
shard of the global batch, shaped `[local_devices, per_device, ...]`; the
gradients are averaged over the one named pmap axis (`AXIS_NAME`) before the
optimizer (AGC included) sees them. The loop resumes from the workdir's
latest checkpoint, saves on SIGTERM/SIGINT and exits cleanly, and since the
data and the random numbers depend only on the step, a resumed run ends with
exactly the parameters of an uninterrupted one.
"""

import collections
import contextlib
import functools
import inspect
import json
import math
import os
import re
import time
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Optional

from etils import epath
import haiku as hk
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import jmp
import ml_collections
import numpy as np
import optax

from nfnets import agc
from nfnets import checkpoint
from nfnets import cli
from nfnets import data
from nfnets import jsonl
from nfnets import models
from nfnets import optim
from nfnets import preemption as preemption_lib
from nfnets import resolve
from nfnets.data import device_augment

# The one name of the data-parallel axis.
AXIS_NAME = 'batch'

_DTYPES = {
    'float32': jnp.float32,
    'bfloat16': jnp.bfloat16,
    'float16': jnp.float16,
}
# Folded into the run's seed for the on-device augmentations, so that their
# random numbers are independent of the model's (init, dropout).
_AUGMENT_TAG = 0x61756775
# Codes of the first non-finite metric, kept in the train state.
_NONFINITE_METRICS = {1: 'train_loss', 2: 'grad_norm'}


class OutOfMemoryError(ValueError):
  """A training step or an evaluation needs more device memory than there is.

  A ValueError: a batch too large for the devices is a config value to
  change, reported in one line as the others are. The message names the
  field, the images per device, and what was saved.
  """


def is_out_of_memory(error: BaseException) -> bool:
  """Whether `error` is XLA's out-of-memory error (RESOURCE_EXHAUSTED)."""
  return isinstance(error, jax.errors.JaxRuntimeError) and (
      'RESOURCE_EXHAUSTED' in str(error)
  )


def _xla_says(error: BaseException) -> str:
  """The first line of XLA's message, for a one-line error of ours."""
  lines = str(error).strip().splitlines()
  return lines[0][:200] if lines else type(error).__name__


class NonFiniteError(RuntimeError):
  """The loss or the gradients became non-finite; the params were not updated.

  Under dynamic loss scaling (float16) gradients that overflow only skip
  their step; they are an error at the smallest scale, 1.

  Attributes:
    step: the first step whose loss or gradients were non-finite, counted
      from 1 as the log and metrics.jsonl count them.
    metric: 'train_loss' or 'grad_norm'.
  """

  def __init__(self, step: int, metric: str, float16: bool = False):
    super().__init__(
        f'Non-finite {metric} at step {step}: training stopped; no '
        'checkpoint holds a non-finite value. Lower optimizer.base_lr or '
        'enable AGC (optimizer.agc.clipping)'
        + (
            ', or train in bfloat16 (train.compute_dtype), whose range is'
            " float32's."
            if float16
            else '.'
        )
    )
    self.step = step
    self.metric = metric


class TrainState(NamedTuple):
  """Everything a step reads and writes; checkpointed whole."""

  step: jax.Array  # int32 scalar: steps taken
  params: Any
  model_state: Any  # Haiku state (BatchNorm statistics), often empty
  opt_state: Any
  ema_params: Any
  rng: jax.Array  # base key; each step folds in its step number
  # First step with a non-finite loss/grad (-1: none) and which metric.
  nonfinite_step: jax.Array
  nonfinite_metric: jax.Array
  # Dynamic loss scaling (float16): {'scale': float32, 'counter': int32,
  # finite steps since the scale last changed}; None without it, which
  # keeps such states and their checkpoints as they were.
  loss_scale: Optional[dict[str, jax.Array]] = None


def create_model(
    config: ml_collections.ConfigDict, num_classes: int
) -> hk.TransformedWithState:
  """The Haiku-transformed model of a resolved config."""
  overrides = dict(config.model.overrides)
  accepted = inspect.signature(models.info(config.model.name).constructor)
  # The recipe's regularization, where the family has it (baselines have no
  # stochastic depth); an explicit override wins.
  for key in ('drop_rate', 'stochdepth_rate'):
    if key in accepted.parameters and key not in overrides:
      overrides[key] = config.model[key]

  # Built once here, unused: a constructor argument the model refuses
  # (depth and widths of different lengths, say) is an error naming the
  # config group now, not a traceback from inside the first trace.
  try:
    hk.transform(
        lambda: models.create(config.model.name, num_classes, **overrides)
    ).init(None)
  except (TypeError, ValueError) as e:
    raise ValueError(f'model.overrides: {e}') from None

  def forward(images, is_training):
    model = models.create(config.model.name, num_classes, **overrides)
    return model(images, is_training=is_training)

  return hk.transform_with_state(forward)


def optimizer_and_schedule(
    config: ml_collections.ConfigDict,
) -> tuple[optax.GradientTransformation, Callable[[jax.Array], jax.Array]]:
  """The config's optimizer chain and its learning-rate schedule (for logs).

  For the global batch `config.train.batch_size` and the step counts of
  `config.steps`, as the runner, `reproduce` and the benchmarks use them.
  """
  kwargs = dict(
      batch_size=config.train.batch_size,
      total_steps=config.steps.total,
      warmup_steps=config.steps.warmup,
  )
  optimizer = optim.create_optimizer(config.optimizer, **kwargs)
  lr_fn = optim.learning_rate_fn_from_config(config.optimizer, **kwargs)
  return optimizer, lr_fn


def step_kwargs(
    config: ml_collections.ConfigDict,
    *,
    forward: hk.TransformedWithState,
    optimizer: optax.GradientTransformation,
    lr_fn: Callable[[jax.Array], jax.Array],
    num_classes: int,
    **overrides,
) -> dict[str, Any]:
  """`train_step`'s keyword arguments for a resolved config.

  The one place that reads them from a config, for the runner, the
  benchmarks and `reproduce`, which pmap the same step.

  Args:
    config: a resolved experiment config.
    forward: `create_model(config, num_classes)`.
    optimizer: the optax chain (`create_optimizer`, or a benchmark's own).
    lr_fn: its learning-rate schedule, for logging.
    num_classes: classifier outputs.
    **overrides: replacements for any of the result's entries (a benchmark's
      `with_metrics=False`, `ema_decay=None`, ...).

  Returns:
    The keyword arguments, to bind with `functools.partial`.

  Raises:
    TypeError: an override that `train_step` does not take.
  """
  agc_cfg = config.optimizer.agc
  kwargs = dict(
      forward=forward,
      optimizer=optimizer,
      lr_fn=lr_fn,
      num_classes=num_classes,
      label_smoothing=config.train.label_smoothing,
      compute_dtype=_DTYPES[config.train.compute_dtype],
      ema_decay=config.optimizer.ema_decay,
      agc_clipping=agc_cfg.clipping,
      agc_eps=agc_cfg.eps,
      agc_exclude=tuple(agc_cfg.exclude),
      with_metrics=True,
      loss_scale_period=(
          config.train.loss_scale_period
          if config.train.loss_scale == 'dynamic'
          else None
      ),
      microbatches=config.train.microbatches,
  )
  unknown = sorted(set(overrides) - set(kwargs))
  if unknown:
    raise TypeError(
        f'step_kwargs: train_step takes no {unknown}; valid: {sorted(kwargs)}.'
    )
  kwargs.update(overrides)
  return kwargs


def initial_loss_scale(config: ml_collections.ConfigDict) -> Optional[float]:
  """The first dynamic loss scale of a resolved config, or None (unscaled)."""
  if config.train.loss_scale == 'dynamic':
    return float(config.train.loss_scale_init)
  return None


def create_train_state(
    rng: jax.Array,
    forward: hk.TransformedWithState,
    optimizer: optax.GradientTransformation,
    image_size: int,
    loss_scale: Optional[float] = None,
) -> TrainState:
  """A new (unreplicated) train state, built by one compiled function.

  Args:
    rng: the run's key.
    forward: the model.
    optimizer: the optax transformation whose state it holds.
    image_size: the side of the images the model is initialized with.
    loss_scale: the first dynamic loss scale (`initial_loss_scale`); None:
      no loss scaling, and no such field in the state.
  """
  if loss_scale is not None and not 1 <= loss_scale <= resolve.MAX_LOSS_SCALE:
    raise ValueError(
        f'loss_scale must be in [1, {resolve.MAX_LOSS_SCALE:.5g}] or None, got'
        f' {loss_scale!r}.'
    )

  @jax.jit
  def init(rng):
    init_rng, rng = jax.random.split(rng)
    images = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    # Training mode: BatchNorm creates its moving averages there.
    params, model_state = forward.init(init_rng, images, is_training=True)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        model_state=model_state,
        opt_state=optimizer.init(params),
        ema_params=jax.tree_util.tree_map(jnp.copy, params),
        rng=rng,
        nonfinite_step=-jnp.ones((), jnp.int32),
        nonfinite_metric=jnp.zeros((), jnp.int32),
        loss_scale=None
        if loss_scale is None
        else dict(
            scale=jnp.asarray(loss_scale, jnp.float32),
            counter=jnp.zeros((), jnp.int32),
        ),
    )

  return init(rng)


# Conv kernels are HWIO in Haiku, in checkpoints and inside `train_step`.
# cuDNN convolves NHWC activations with OHWI filters, so with HWIO kernels in
# the state XLA transposed every kernel before the forward pass, and the
# fused optimizer update transposed the new kernels, momenta and EMAs back,
# writes it cannot make in place, so it copied them once more into the
# donated buffers (an H100 profile of F0: 1.3 ms of transposing fusions and
# 0.9 ms of copies per 41 ms step). On GPUs the runner keeps them OHWI
# between steps instead (`to_device_layout`); inside the step they are
# viewed as HWIO again, a transpose that XLA can make a bitcast there
# (`config.train.kernel_layout`, resolved by `resolve.kernel_layout`).
_HWIO_TO_OHWI = (3, 0, 1, 2)
_OHWI_TO_HWIO = (1, 2, 3, 0)


def _permute_kernels(tree, axes):
  def permute(x):
    if getattr(x, 'ndim', 0) != 4:
      return x
    if isinstance(x, np.ndarray):  # host copies: contiguous for the writers
      return np.ascontiguousarray(x.transpose(axes))
    return x.transpose(axes)

  return jax.tree_util.tree_map(permute, tree)


def kernels_to_ohwi(tree: Any) -> Any:
  """`tree` with every 4-D array (conv kernels, HWIO) permuted to OHWI.

  Also permutes the 4-D arrays that are not kernels (e.g. a `(1, 1, 1, C)`
  gain): harmless, since `kernels_to_hwio` undoes it exactly.

  Args:
    tree: unreplicated parameters (or anything shaped like them), numpy or
      JAX arrays.

  Returns:
    The same tree; numpy leaves come back contiguous.
  """
  return _permute_kernels(tree, _HWIO_TO_OHWI)


def kernels_to_hwio(tree: Any) -> Any:
  """The inverse of `kernels_to_ohwi`."""
  return _permute_kernels(tree, _OHWI_TO_HWIO)


def _checked(kernel_layout):
  if kernel_layout not in resolve.KERNEL_LAYOUTS:  # resolved before a step
    raise ValueError(
        f'kernel_layout must be one of {resolve.KERNEL_LAYOUTS} '
        f'(resolve.kernel_layout resolves "auto"), got {kernel_layout!r}.'
    )
  return kernel_layout


def _map_kernels(state, permute):
  """`permute` applied to the state's params, optimizer state and EMA."""
  return state._replace(
      params=permute(state.params),
      opt_state=permute(state.opt_state),
      ema_params=permute(state.ema_params),
  )


def to_device_layout(state: TrainState, kernel_layout: str) -> TrainState:
  """An unreplicated state as the runner keeps it on the devices.

  Args:
    state: a train state with HWIO kernels, as `create_train_state` and the
      checkpoints have it.
    kernel_layout: 'ohwi': the params, optimizer state and EMA params get
      their 4-D leaves OHWI (step counter, Haiku state and keys unchanged);
      'hwio': `state` itself. Resolved: not 'auto'.

  Returns:
    The state in `kernel_layout`.
  """
  if _checked(kernel_layout) == 'hwio':
    return state
  return _map_kernels(state, kernels_to_ohwi)


def from_device_layout(state: TrainState, kernel_layout: str) -> TrainState:
  """The inverse of `to_device_layout`: Haiku's HWIO kernels again."""
  if _checked(kernel_layout) == 'hwio':
    return state
  return _map_kernels(state, kernels_to_hwio)


def cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    num_classes: int,
    label_smoothing: float,
) -> jax.Array:
  """Per-example softmax cross-entropy with label smoothing, float32."""
  targets = optax.smooth_labels(
      jax.nn.one_hot(labels, num_classes, dtype=jnp.float32), label_smoothing
  )
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    forward: hk.TransformedWithState,
    optimizer: optax.GradientTransformation,
    lr_fn: Callable[[jax.Array], jax.Array],
    num_classes: int,
    label_smoothing: float,
    compute_dtype: Any,
    ema_decay: Optional[float],
    agc_clipping: Optional[float],
    agc_eps: float,
    agc_exclude: Any,
    with_metrics: bool = True,
    loss_scale_period: Optional[int] = None,
    microbatches: int = 1,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on one device's share of the batch; run under pmap.

  Pure: everything it depends on is an argument (hyperparameters are bound
  with functools.partial), so it traces once and replays exactly.

  Args:
    state: this device's replica of the train state.
    batch: `images [B, H, W, 3]`, `labels`, `labels2`, `mix_ratio` `[B]`.
    forward: the transformed model.
    optimizer: the optax chain (AGC, weight decay, SGD, schedule).
    lr_fn: the learning-rate schedule, for logging.
    num_classes: classifier outputs.
    label_smoothing: label smoothing of both labels.
    compute_dtype: dtype of the forward/backward pass.
    ema_decay: maximum EMA decay (None: no EMA, for benchmarks).
    agc_clipping: AGC's lambda (None: no AGC), for the clipped fraction.
    agc_eps: AGC's eps.
    agc_exclude: AGC's excluded paths.
    with_metrics: also compute `param_norm`, `update_norm` and (with AGC)
      `agc_clipped_fraction`: the runner's log steps (`is_log_step`) do.
    loss_scale_period: dynamic loss scaling (the state has `loss_scale`):
      the loss is multiplied by the scale and the gradients divided by it.
      A step whose gradients overflow is skipped (only the step counter
      moves, so the optimizer's own count, which the schedule reads, falls
      behind by one) and halves the scale; this many finite steps in a row
      double it. None: no scaling.
    microbatches: this device's batch is split into this many parts, run
      one after the other, whose gradients (of each part's share of the
      batch's mean loss) are summed before the all-reduce, AGC and the
      update: the same step over the whole batch
      with one part's activation memory (gradient accumulation). Each part
      draws its own dropout and stochastic depth, and a BatchNorm model
      normalises each part alone and updates its averages once per part.

  Returns:
    `(new_state, metrics)`, metrics averaged over the devices.
  """
  if (loss_scale_period is None) != (state.loss_scale is None):
    raise ValueError(
        "train_step: loss_scale_period and the state's loss_scale go"
        f' together; got {loss_scale_period!r} with a state'
        f' {"without" if state.loss_scale is None else "with"} one.'
    )
  scaler = None
  if loss_scale_period is not None:
    scaler = jmp.DynamicLossScale(
        state.loss_scale['scale'],
        state.loss_scale['counter'],
        period=loss_scale_period,
    )
  step = state.step
  # Different dropout / stochastic depth on every device and every step.
  rng = jax.random.fold_in(
      jax.random.fold_in(state.rng, step), jax.lax.axis_index(AXIS_NAME)
  )
  inputs = {k: batch[k] for k in ('images', 'labels', 'labels2', 'mix_ratio')}

  def loss_fn(params, model_state, rng, inputs):
    logits, model_state = forward.apply(
        params,
        model_state,
        rng,
        inputs['images'].astype(compute_dtype),
        is_training=True,
    )
    logits = logits.astype(jnp.float32)
    ratio = inputs['mix_ratio']
    losses = ratio * cross_entropy(
        logits, inputs['labels'], num_classes, label_smoothing
    ) + (1.0 - ratio) * cross_entropy(
        logits, inputs['labels2'], num_classes, label_smoothing
    )
    loss = jnp.mean(losses)
    # A part's share of the batch's mean, before the loss scale: its
    # gradients are the size the whole batch's would be, so that a float16
    # scale overflows no sooner than without parts.
    share = loss / microbatches if microbatches > 1 else loss
    scaled = share if scaler is None else scaler.scale(share)
    correct = jnp.sum(jnp.argmax(logits, -1) == inputs['labels'])
    return scaled, (loss, correct, model_state)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  # Float32 before the sum over parts and the cross-device mean (params are
  # float32 already).
  to_f32 = lambda tree: jax.tree_util.tree_map(
      lambda g: g.astype(jnp.float32), tree
  )
  if microbatches == 1:
    (_, (loss, correct, model_state)), grads = grad_fn(
        state.params, state.model_state, rng, inputs
    )
    grads = to_f32(grads)
  else:
    if batch['labels'].shape[0] % microbatches:
      raise ValueError(
          f'train_step: the per-device batch {batch["labels"].shape[0]} is'
          f' not divisible by microbatches={microbatches}.'
      )
    parts = jax.tree_util.tree_map(
        lambda x: x.reshape((microbatches, -1) + x.shape[1:]), inputs
    )

    def accumulate(carry, part):
      grads_sum, loss_sum, correct_sum, model_state = carry
      index, part_inputs = part
      (_, (loss, correct, model_state)), grads = grad_fn(
          state.params,
          model_state,
          jax.random.fold_in(rng, index),
          part_inputs,
      )
      grads_sum = jax.tree_util.tree_map(jnp.add, grads_sum, to_f32(grads))
      return (
          grads_sum,
          loss_sum + loss,
          correct_sum + correct,
          model_state,
      ), None

    zeros = jax.tree_util.tree_map(
        lambda p: jnp.zeros(p.shape, jnp.float32), state.params
    )
    start = (zeros, jnp.float32(0), jnp.int32(0), state.model_state)
    (grads, loss, correct, model_state), _ = jax.lax.scan(
        accumulate, start, (jnp.arange(microbatches), parts)
    )
    # Equal parts: the sum of their shares is the batch's mean.
    loss = loss / microbatches
  if scaler is not None:
    grads = scaler.unscale(grads)
  grads = jax.lax.pmean(grads, AXIS_NAME)
  loss = jax.lax.pmean(loss, AXIS_NAME)
  # Cross-replica BatchNorm statistics; integer counters are equal anyway.
  model_state = jax.tree_util.tree_map(
      lambda x: jax.lax.pmean(x, AXIS_NAME)
      if jnp.issubdtype(x.dtype, jnp.floating)
      else x,
      model_state,
  )
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  if ema_decay is None:
    ema_params = state.ema_params
  else:
    ema_params = optim.ema_update(state.ema_params, params, step, ema_decay)

  # Unit by unit, as AGC sums them: XLA computes those sums once for both.
  grad_norm = agc.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  failed = ~finite
  loss_scale = None
  if scaler is not None:
    # Overflowing scaled gradients are the scale's doing: skip the update
    # and halve it. Only at scale 1 (nothing scaled) do they stop the run,
    # as a non-finite loss does.
    failed = ~jnp.isfinite(loss) | (
        ~jnp.isfinite(grad_norm) & (scaler.loss_scale <= 1.0)
    )
    adjusted = scaler.adjust(jnp.isfinite(grad_norm))
    loss_scale = dict(scale=adjusted.loss_scale, counter=adjusted.counter)
  first_bad = (state.nonfinite_step < 0) & failed
  new_state = TrainState(
      step=step + 1,
      params=params,
      model_state=model_state,
      opt_state=opt_state,
      ema_params=ema_params,
      rng=state.rng,
      nonfinite_step=jnp.where(first_bad, step, state.nonfinite_step),
      nonfinite_metric=jnp.where(
          first_bad, jnp.where(jnp.isfinite(loss), 2, 1), state.nonfinite_metric
      ),
      loss_scale=loss_scale,
  )
  # A non-finite step leaves every array as it was (but the step counter and
  # the record of the failure), so no non-finite value is ever kept.
  new_state = jax.tree_util.tree_map(
      lambda new, old: jnp.where(finite, new, old),
      new_state,
      state._replace(
          step=step + 1,
          nonfinite_step=new_state.nonfinite_step,
          nonfinite_metric=new_state.nonfinite_metric,
          loss_scale=loss_scale,
      ),
  )

  top1 = correct / batch['labels'].shape[0]
  metrics = dict(
      train_loss=loss,
      train_top1=jax.lax.pmean(top1, AXIS_NAME),
      # The rate this step applied: the schedule's count is behind `step` by
      # the steps a dynamic loss scale skipped.
      lr=lr_fn(optim.schedule_count(state.opt_state, default=step)),
      grad_norm=grad_norm,
  )
  if scaler is not None:
    metrics['loss_scale'] = scaler.loss_scale  # the one this step used
  if with_metrics:
    metrics.update(
        # Of the parameters the step started from: AGC has their unit sums
        # already (XLA shares them), where the new ones' norm would be one
        # more pass over every parameter and a reduction per kernel.
        param_norm=agc.global_norm(state.params),
        # A skipped or failed step applies no update.
        update_norm=jnp.where(finite, agc.global_norm(updates), 0.0),
    )
    if agc_clipping is not None:
      metrics['agc_clipped_fraction'] = agc.clipped_fraction(
          grads, state.params, agc_clipping, agc_eps, agc_exclude
      )
  return new_state, metrics


def device_train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    kernel_layout: str,
    **kwargs,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """`train_step` on a state in the device layout, returned in it.

  What the runner pmaps (`to_device_layout` explains why). The same function
  as `train_step` up to that layout, and up to the order in which XLA sums
  (a reduction over a kernel laid out OHWI may add in another order).

  Args:
    state: this device's replica, as `to_device_layout` returns it.
    batch: as for `train_step`.
    kernel_layout: the state's, as for `to_device_layout`.
    **kwargs: `train_step`'s keyword arguments.

  Returns:
    `(new_state, metrics)`, the state in `kernel_layout`.
  """
  new_state, metrics = train_step(
      from_device_layout(state, kernel_layout), batch, **kwargs
  )
  return to_device_layout(new_state, kernel_layout), metrics


def make_device_step(
    config: ml_collections.ConfigDict,
    *,
    forward: hk.TransformedWithState,
    optimizer: optax.GradientTransformation,
    lr_fn: Callable[[jax.Array], jax.Array],
    num_classes: int,
    kernel_layout: Optional[str] = None,
    **overrides,
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
  """`device_train_step` bound to a resolved config, ready to pmap.

  The one builder of the step that the runner, `reproduce` and the
  benchmarks pmap (each with its own devices and donation), so that they
  time and run the same function.

  Args:
    config: a resolved experiment config.
    forward: `create_model(config, num_classes)`.
    optimizer: the optax chain (`optimizer_and_schedule`, or a benchmark's).
    lr_fn: its learning-rate schedule, for logging.
    num_classes: classifier outputs.
    kernel_layout: the state's ('hwio' or 'ohwi'); defaults to the config's
      resolved `train.kernel_layout`.
    **overrides: as for `step_kwargs`.

  Returns:
    `step(state, batch) -> (new_state, metrics)` for one device's replica.

  Raises:
    ValueError: `kernel_layout` (or the config's) is not resolved.
    TypeError: an override that `train_step` does not take.
  """
  if kernel_layout is None:
    kernel_layout = config.train.kernel_layout
  return functools.partial(
      device_train_step,
      kernel_layout=_checked(kernel_layout),
      **step_kwargs(
          config,
          forward=forward,
          optimizer=optimizer,
          lr_fn=lr_fn,
          num_classes=num_classes,
          **overrides,
      ),
  )


def eval_step(
    params, model_state, batch, *, forward, num_classes, compute_dtype
) -> dict[str, jax.Array]:
  """Sums of correct top-1/top-5, loss and count over real (mask=1) examples."""
  images = batch['images']
  if images.dtype == jnp.uint8:  # augment_on='device': not normalised yet
    images = device_augment.normalize(images)
  logits, _ = forward.apply(
      params,
      model_state,
      None,
      images.astype(compute_dtype),
      is_training=False,
  )
  logits = logits.astype(jnp.float32)
  mask = batch['mask']
  labels = batch['labels']
  top5 = jax.lax.top_k(logits, min(5, num_classes))[1]
  sums = dict(
      top1=jnp.sum(mask * (jnp.argmax(logits, -1) == labels)),
      top5=jnp.sum(mask * jnp.any(top5 == labels[:, None], axis=-1)),
      loss=jnp.sum(mask * cross_entropy(logits, labels, num_classes, 0.0)),
      count=jnp.sum(mask),
  )
  return jax.lax.psum(sums, AXIS_NAME)


def evaluate(p_eval_step, params, model_state, dataset) -> dict[str, float]:
  """One pass over an eval dataset: every example counted exactly once."""
  totals = None
  for batch in dataset:
    sums = p_eval_step(params, model_state, batch)
    sums = jax.tree_util.tree_map(lambda x: np.asarray(x[0], np.float64), sums)
    totals = (
        sums if totals is None else jax.tree_util.tree_map(np.add, totals, sums)
    )
  if totals is None or totals['count'] == 0:
    raise ValueError('The eval split yielded no example.')
  count = totals['count']
  return dict(
      top1=float(totals['top1'] / count),
      top5=float(totals['top5'] / count),
      loss=float(totals['loss'] / count),
      count=int(count),
  )


# One pmapped identity for every host-to-device copy (compiled once per tree
# structure, shared by all callers).
_TO_DEVICES = jax.pmap(lambda x: x, axis_name=AXIS_NAME)


def to_devices(tree):
  """Splits a host tree `[local_devices, ...]` over the local devices.

  Laid out exactly as pmap's outputs are, so a pmapped step takes the result
  without another copy (or another compilation). The copy is dispatched
  asynchronously.
  """
  return _TO_DEVICES(tree)


def replicate(tree):
  """Copies a tree onto every local device, laid out as pmap's outputs are.

  Placing it exactly as the train step returns it means the step compiles
  once, not once for the first call and again for the rest.
  """
  if not jax.tree_util.tree_leaves(tree):
    return tree  # e.g. the empty Haiku state of a model without BatchNorm
  n = jax.local_device_count()
  stacked = jax.tree_util.tree_map(
      lambda x: np.broadcast_to(np.asarray(x), (n,) + np.shape(x)), tree
  )
  return to_devices(stacked)


def prefetch_to_devices(batches: Iterator[Any], size: int) -> Iterator[Any]:
  """Yields `batches` already copied to the local devices, `size` ahead.

  Each host batch `[local_devices, per_device, ...]` is sent to the devices
  (`to_devices`) while earlier steps run, so the step that needs it finds it
  there.

  Args:
    batches: an iterator of host batches (dicts of numpy arrays).
    size: batches kept on the devices ahead of the step (0: no prefetch,
      the host batches are yielded as they are).

  Returns:
    An iterator of the batches, in order.
  """
  if isinstance(size, bool) or not isinstance(size, int) or size < 0:
    raise ValueError(f'data.device_prefetch={size!r} must be an int >= 0.')
  if not size:
    return iter(batches)
  return _prefetch(batches, size)


def _prefetch(batches, size):
  queue = collections.deque()
  for batch in batches:
    queue.append(to_devices(batch))
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def unreplicate(tree):
  """The first local device's copy, as numpy (no compiled gather per leaf)."""
  return jax.tree_util.tree_map(
      lambda x: np.asarray(x.addressable_shards[0].data)[0]
      if isinstance(x, jax.Array)
      else np.asarray(x)[0],
      tree,
  )


class _EpathEventFile:
  """One event file open for writing through epath."""

  def __init__(self, path: str):
    self._stack = contextlib.ExitStack()
    # epath's TensorFlow backend (gs://) yields the file from a context
    # manager; the local one returns the file, which enters as itself.
    self._file = self._stack.enter_context(epath.Path(path).open('wb'))

  def write(self, data: bytes) -> None:
    self._file.write(data)

  def flush(self) -> None:
    self._file.flush()

  def close(self) -> None:
    self._stack.close()


class _EpathEventFiles:
  """tensorboardX's event files written through epath (`tf.io.gfile`).

  tensorboardX writes `gs://` only with google-cloud-storage, which this
  project does not depend on; epath reaches every store TensorFlow does.
  """

  def open(self, path: str) -> _EpathEventFile:
    return _EpathEventFile(path)

  def directory_check(self, path: str) -> None:
    epath.Path(path).mkdir(parents=True, exist_ok=True)


def _summary_writer(logdir: str):
  # Imported here: tensorboardX writes event files without TensorFlow, and
  # only the chief process needs it.
  import tensorboardX  # pylint: disable=g-import-not-at-top
  from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top

  if '://' in logdir:
    record_writer.register_writer_factory(
        logdir.split(':')[0], _EpathEventFiles()
    )
  return tensorboardX.SummaryWriter(logdir)


def _replace_text(path: epath.Path, text: str) -> None:
  """Writes `path` whole or not at all: a kill mid-write keeps the old file."""
  temporary = path.with_name(path.name + '.tmp')
  temporary.write_text(text)
  temporary.replace(path)


def _json_line(record: dict[str, Any]) -> str:
  """`record` as one line of strict JSON, non-finite floats as null.

  JSON has no infinity or NaN. Python would write `Infinity`, which jq,
  JavaScript and other strict readers refuse: such a value (the grad norm of
  a step that a float16 loss scale skipped) is written as null.
  """
  strict = {
      k: None if isinstance(v, float) and not math.isfinite(v) else v
      for k, v in record.items()
  }
  return json.dumps(strict, allow_nan=False) + '\n'


# The keys of an evaluation record ('eval_top1', 'ema_eval_loss', ...).
_EVAL_PREFIXES = ('eval_', 'ema_eval_')


class _Logger:
  """metrics.jsonl, TensorBoard events and a stdout progress line.

  Only process 0 writes files. The workdir may be local or `gs://`: every
  file goes through epath.
  """

  def __init__(
      self,
      workdir: str,
      resume_step: int,
      enabled: bool,
      evaluates_again: bool = False,
  ):
    """Opens the run's logs, keeping its events up to `resume_step`.

    Args:
      workdir: the run's folder.
      resume_step: the step of the restored checkpoint (0: a new run).
      enabled: whether this process writes files (process 0).
      evaluates_again: the run evaluates `resume_step` again (a finished
        run relaunched): that step's evaluation records are dropped too.
    """
    self.enabled = enabled
    self.path = epath.Path(workdir) / 'metrics.jsonl'
    self._tb = None
    self._workdir = workdir
    if enabled and self.path.exists():
      # Events after the restored checkpoint will be logged again: drop them
      # so the file stays one continuous record with no duplicate step.
      records, skipped = jsonl.parse(self.path.read_text())
      if skipped:
        print(
            f'WARNING: dropped {_count(skipped, "line")} of {self.path}'
            f' that {"is" if skipped == 1 else "are"} not JSON (a write cut'
            ' short when the job was killed).',
            flush=True,
        )

      def keep(record):
        step = record.get('step', resume_step + 1)
        if evaluates_again and step == resume_step:
          return not any(k.startswith(_EVAL_PREFIXES) for k in record)
        return step <= resume_step

      kept = [_json_line(r) for r in records if keep(r)]
      _replace_text(self.path, ''.join(kept))

  def write(self, record: dict[str, Any]) -> None:
    if not self.enabled:
      return
    record = {
        k: (
            float(v)
            if isinstance(v, (np.floating, np.integer, float)) and k != 'step'
            else v
        )
        for k, v in record.items()
    }
    with self.path.open('a') as f:
      f.write(_json_line(record))
    self._tensorboard(record)  # TensorBoard takes non-finite floats

  def _tensorboard(self, record):
    if self._tb is None:
      self._tb = _summary_writer(str(epath.Path(self._workdir) / 'tensorboard'))
    for key, value in record.items():
      if key != 'step' and isinstance(value, (int, float)):
        self._tb.add_scalar(key, value, global_step=record['step'])
    self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()

  def print(self, text: str) -> None:
    if self.enabled:
      print(text, flush=True)


def is_log_step(step: int, log_every: int, total: int) -> bool:
  """Whether the runner logs the metrics of the step that makes `step` done.

  Every `log_every`-th step and the last one (`total`); the runner computes
  the logged norms on those steps only.
  """
  return step % log_every == 0 or step == total


def _format_seconds(seconds: float) -> str:
  seconds = int(seconds)
  if seconds >= 3600:
    return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m'
  return f'{seconds // 60}m{seconds % 60:02d}s'


def expand_home(path: str) -> str:
  """`~/runs/x` as `/home/me/runs/x`; URLs (`gs://...`) as given.

  A quoted `--workdir='~/runs/x'` reaches Python unexpanded and would make a
  folder named `~` in the current directory.
  """
  path = os.fspath(path)
  return path if '://' in path else os.path.expanduser(path)


def check_workdir(workdir) -> str:
  """The run's folder, `~` expanded; an empty one is refused.

  An empty `--workdir=` would put the run's checkpoints and logs into the
  current directory (a repository, say) and resume from whatever is there.

  Raises:
    ValueError: `workdir` is empty or blank.
  """
  if workdir is None or not os.fspath(workdir).strip():
    raise ValueError(
        f'The workdir is empty ({workdir!r}); give --workdir a folder path,'
        ' e.g. --workdir=workdir/run1.'
    )
  return expand_home(workdir)


def _count(number: int, noun: str) -> str:
  """'1 step', '2 steps'."""
  return f'{number} {noun}{"" if number == 1 else "s"}'


def _is_positive_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_batch(global_batch: int, what: str) -> None:
  devices = jax.device_count()
  if not _is_positive_int(global_batch):
    raise ValueError(
        f'{what}={global_batch!r} must be a positive int, a multiple of the'
        f' device count {devices}.'
    )
  if global_batch % devices:
    raise ValueError(
        f'{what}={global_batch} is not divisible by the device count '
        f'{devices}; use a multiple of {devices}.'
    )


# The run's class names, a JSON list by label, beside its config.json.
CLASS_NAMES_FILE = 'classes.json'


def read_class_names(workdir: str) -> Optional[list[str]]:
  """The class names a run trained with; None if it has no readable file."""
  try:
    names = json.loads((epath.Path(workdir) / CLASS_NAMES_FILE).read_text())
  except (OSError, ValueError):
    return None
  if isinstance(names, list) and all(isinstance(n, str) for n in names):
    return names
  return None


def _check_class_names(config, workdir, restored_step) -> list[str]:
  """The dataset's class names, refused if they are not the resumed run's.

  A class folder renamed, added or removed since the run started shifts the
  labels of every class after it: resumed, the run would train and evaluate
  on other labels than its checkpoint learnt, with nothing to show for it.
  A new run (nothing restored) takes the names as they are.

  Raises:
    ValueError: the workdir's class names differ from the dataset's.
  """
  names = list(data.class_names(config.data))
  saved = None if restored_step is None else read_class_names(workdir)
  if saved is not None and saved != names:
    first = next(
        (i for i, (a, b) in enumerate(zip(saved, names)) if a != b),
        min(len(saved), len(names)),
    )
    shown = lambda n: repr(n[first]) if first < len(n) else 'none'
    raise ValueError(
        f'data.name={config.data.name}: its classes are not those of the'
        f' run in {workdir} ({CLASS_NAMES_FILE}: {len(saved)} classes,'
        f' label {first} {shown(saved)}; the data now: {len(names)},'
        f' label {first} {shown(names)}). Restore the data as the run had'
        ' it, or start a new workdir.'
    )
  return names


def _check_microbatches(global_batch: int, microbatches) -> None:
  if not _is_positive_int(microbatches):
    raise ValueError(
        f'train.microbatches={microbatches!r} must be an int >= 1 (1: no'
        ' gradient accumulation).'
    )
  per_device = global_batch // jax.device_count()
  if per_device % microbatches:
    raise ValueError(
        f'train.microbatches={microbatches} does not divide the'
        f' {per_device} images per device (train.batch_size={global_batch}'
        f' over {jax.device_count()} devices); use a divisor of'
        f' {per_device}.'
    )


def _save_config(config, workdir):
  # The file a resumed run compares its config with (`_config_changes`).
  _replace_text(
      epath.Path(workdir) / 'config.json', config.to_json_best_effort(indent=2)
  )


def _save_class_names(workdir, class_names, new_run: bool):
  # The names the labels had when it trained (`nfnets.predict` reads them):
  # a resumed run keeps its file (`_check_class_names` holds it to them),
  # or writes it if it started before the file was.
  path = epath.Path(workdir) / CLASS_NAMES_FILE
  if new_run or not path.exists():
    _replace_text(path, json.dumps(class_names, indent=0) + '\n')


def _config_changes(workdir: str, config, limit: int = 3) -> str:
  """How the workdir's config.json differs from `config`, as a sentence."""
  try:
    text = (epath.Path(workdir) / 'config.json').read_text()
    keys, old, new = cli.differing_fields(
        json.loads(text), json.loads(config.to_json_best_effort())
    )
  except (OSError, ValueError):
    return ''
  # The fields that shape the state first, then the rest a user sets;
  # `steps.*` follows from them.
  order = ('model.', 'data.', 'optimizer.', 'train.', 'eval.')
  keys = sorted(
      keys,
      key=lambda k: (
          next((i for i, o in enumerate(order) if k.startswith(o)), len(order)),
          k,
      ),
  )
  if not keys:
    return ''
  changes = ', '.join(
      f'{k} ({old.get(k)!r} there, {new.get(k)!r} here)' for k in keys[:limit]
  )
  more = f' and {len(keys) - limit} more' if len(keys) > limit else ''
  return f' Its config.json differs in {changes}{more}.'


def pmap_device_augment(data_cfg, seed: int):
  """The pmapped augmentation `make_device_augment` calls, or None.

  Args:
    data_cfg: the resolved data config.
    seed: the run's seed.

  Returns:
    `augment(host_batch, step)`, pmapped over the local devices with the
    int32 `step` shared by all of them (`.lower()` gives its HLO), or None
    on the host path.
  """
  if not data.augments_on_device(data_cfg):
    return None
  finish = functools.partial(
      device_augment.augment_batch,
      randaugment_layers=data_cfg.randaugment_layers,
      randaugment_magnitude=data_cfg.randaugment_magnitude,
      mixup_alpha=data_cfg.mixup_alpha,
      cutmix=data_cfg.cutmix,
  )
  base_key = jax.random.fold_in(jax.random.PRNGKey(seed), _AUGMENT_TAG)

  def augment(batch, step):
    key = jax.random.fold_in(
        jax.random.fold_in(base_key, step), jax.lax.axis_index(AXIS_NAME)
    )
    return finish(batch['images'], batch['labels'], key)

  return jax.pmap(augment, axis_name=AXIS_NAME, in_axes=(0, None))


def make_device_augment(data_cfg, seed: int):
  """The on-accelerator half of the train input pipeline, or None.

  With `data.augment_on == 'device'` the tf.data pipeline yields cropped,
  resized and flipped uint8 images; this pmapped function finishes them
  (RandAugment, MixUp/CutMix, normalisation) where they will be used, so the
  CPU only decodes. Its random numbers depend on (seed, step, global device
  index) alone, so a resumed run sees the batches an uninterrupted one would.

  Args:
    data_cfg: the resolved data config.
    seed: the run's seed.

  Returns:
    `augment(host_batch, step) -> device batch` (the dict `train_step`
    takes, sharded over the local devices), or None on the host path.
  """
  pmapped = pmap_device_augment(data_cfg, seed)
  if pmapped is None:
    return None
  return lambda batch, step: pmapped(batch, np.int32(step))


def eval_batch_size(global_batch: int, num_examples: int) -> int:
  """`eval.batch_size`, but no larger than one padded batch of the split.

  A larger batch only pads more: 1,000,000 on a split of 360 padded 999,640
  images on the host and was killed for memory. Every example is still
  evaluated once, as with the batch asked for.

  Args:
    global_batch: the configured eval batch, over all devices.
    num_examples: examples in the eval split.
  """
  devices = jax.device_count()
  return min(global_batch, max(1, -(-num_examples // devices)) * devices)


def make_evaluator(config, forward, num_classes, kernel_layout='hwio'):
  """Returns `evaluate_all({prefix: replicated params}, replicated state)`.

  The params are replicated with their kernels in `kernel_layout` ('ohwi':
  as `kernels_to_ohwi` makes them), as the runner keeps them. The pmapped
  eval step and the eval dataset are built once; each call makes one pass
  over the split per parameter set (raw, EMA) and returns
  `{f'{prefix}_top1': ...}` metrics.
  """
  to_hwio = (
      kernels_to_hwio
      if _checked(kernel_layout) == 'ohwi'
      else lambda params: params
  )
  step = functools.partial(
      eval_step,
      forward=forward,
      num_classes=num_classes,
      compute_dtype=_DTYPES[config.train.compute_dtype],
  )
  p_eval_step = jax.pmap(
      lambda params, model_state, batch: step(
          to_hwio(params), model_state, batch
      ),
      axis_name=AXIS_NAME,
  )
  dataset = None

  def evaluate_all(trees, model_state):
    nonlocal dataset
    if dataset is None:
      # One pipeline for every evaluation: each iteration is a fresh pass.
      dataset = data.create_dataset(
          config.data,
          split='eval',
          global_batch_size=eval_batch_size(
              config.eval.batch_size, data.num_examples(config.data, 'eval')
          ),
          image_size=config.data.eval_image_size,
          seed=config.seed,
      )
    record = {}
    try:
      for prefix, params in trees.items():
        results = evaluate(p_eval_step, params, model_state, dataset)
        record.update({f'{prefix}_{k}': v for k, v in results.items()})
    except jax.errors.JaxRuntimeError as e:
      if not is_out_of_memory(e):
        raise
      per_device = config.eval.batch_size // jax.device_count()
      raise OutOfMemoryError(
          f'Out of device memory in the evaluation ({_xla_says(e)}):'
          f' eval.batch_size={config.eval.batch_size} ({per_device} images'
          f' per device at {config.data.eval_image_size} px) is too large'
          ' for the devices; lower it.'
      ) from None
    return record

  return evaluate_all


def _saved_fields(state: TrainState) -> dict[str, Any]:
  """The state as checkpoints hold it: its fields, but those left None."""
  return {k: v for k, v in state._asdict().items() if v is not None}


def restore_or_create(
    config,
    forward,
    optimizer,
    workdir,
    image_size,
    advice: str,
    step=None,
    fields=None,
):
  """The newest readable checkpoint's state in `workdir`, or a new one.

  Args:
    config: the resolved config.
    forward: the model (`create_model`).
    optimizer: the run's optax transformation.
    workdir: the run's folder.
    image_size: the side of the images that initialize the model.
    advice: the sentence that ends a mismatch error: what the user can do.
    step: restore this step instead (`TrainCheckpointer.restore_latest`).
    fields: restore only these fields of the state (of those it saves); the
      others stay new.

  Returns:
    `(state, restored_step or None, checkpointer)`.

  Raises:
    checkpoint.CheckpointMismatchError: the checkpoint holds another state;
      the message adds how the workdir's config.json differs, and `advice`.
  """
  state = create_train_state(
      jax.random.PRNGKey(config.seed),
      forward,
      optimizer,
      image_size,
      initial_loss_scale(config),
  )
  checkpointer = checkpoint.TrainCheckpointer(
      workdir, config.train.keep_checkpoints
  )
  try:
    target = _saved_fields(state)
    if fields is not None:
      fields = [f for f in fields if f in target]
      target = {f: target[f] for f in fields}
    restored, step = checkpointer.restore_latest(
        jax.tree_util.tree_map(np.asarray, target), step=step, fields=fields
    )
  except checkpoint.CheckpointMismatchError as e:
    checkpointer.close()
    raise checkpoint.CheckpointMismatchError(
        f'{e}{_config_changes(workdir, config)} {advice}'
    ) from None
  if restored is not None:
    state = state._replace(**restored)
  return state, step, checkpointer


def _set_aside_unreadable(checkpointer, restored_step, is_chief) -> list[str]:
  """Moves aside the unreadable checkpoints newer than the one resumed.

  Orbax counts them as saved, so the run would never save those steps again
  (and "Saved step N" would save nothing); `keep_checkpoints` would delete
  readable ones first. With no readable checkpoint at all, the run stops:
  starting afresh would delete them, and its metrics.jsonl, by and by.

  Returns:
    What was moved where, one line per step (the chief's; [] elsewhere).

  Raises:
    ValueError: every checkpoint is unreadable, or one could not be moved.
  """
  if not checkpointer.unreadable:
    return []
  steps = ', '.join(map(str, checkpointer.unreadable))
  if restored_step is None:
    checkpointer.close()
    raise ValueError(
        f'No checkpoint in {checkpointer.directory} can be read (steps'
        f' {steps}), and starting afresh there would delete them; move that'
        ' folder aside to train this run again from step 0, or give another'
        ' --workdir.'
    )
  lines = []
  if is_chief:
    try:
      lines = checkpointer.set_aside(checkpointer.unreadable)
    except ValueError:
      checkpointer.close()
      raise
  if jax.process_count() > 1:
    # The other hosts must not list the renamed steps as saved either (the
    # chief's set_aside reloaded its own).
    multihost_utils.sync_global_devices('nfnets: unreadable steps set aside')
    if not is_chief:
      checkpointer.reload()
  return lines


def prepare(config: ml_collections.ConfigDict):
  """Resolves the config against its dataset; returns (config, num_classes)."""
  data.check_splits_have_examples(config.data)
  num_train = data.num_examples(config.data, 'train')
  config = resolve.resolve(config, num_train)
  return config, data.num_classes(config.data)


def _build(config: ml_collections.ConfigDict):
  """Checks and resolves `config`; builds its model and optimizer.

  Everything the runner checks before it touches a workdir: a value it
  refuses here leaves no folder and no config.json changed.

  Returns:
    `(resolved config, num_classes, forward, optimizer, lr_fn)`.

  Raises:
    ValueError: a bad config value, named in the message.
  """
  _check_batch(config.train.batch_size, 'train.batch_size')
  _check_batch(config.eval.batch_size, 'eval.batch_size')
  _check_microbatches(config.train.batch_size, config.train.microbatches)
  config, num_classes = prepare(config)
  data.check_config(config.data)
  data.check_seed(config.seed)
  forward = create_model(config, num_classes)
  optimizer, lr_fn = optimizer_and_schedule(config)
  return config, num_classes, forward, optimizer, lr_fn


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises what `train_and_evaluate` would raise on `config` before work.

  For callers that run many configs (`nfnets.sweep`): a bad value in the
  last one is found before the first trains.

  Raises:
    ValueError: a bad config value, named in the message; or several
      processes that could not agree on when to stop
      (`preemption.check_processes`).
    FileNotFoundError: the dataset is missing.
  """
  preemption_lib.check_processes()
  _build(config)


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str
) -> dict[str, Any]:
  """Trains `config` in `workdir`, resuming there; returns the final metrics.

  Args:
    config: an experiment config (`configs/`), 'auto' fields unresolved.
    workdir: where checkpoints, metrics.jsonl, TensorBoard events, the
      resolved config and the curves PNG go.

  Returns:
    The final metrics: `step`, `train_loss`, `eval_top1`, `eval_top5`,
    `eval_loss` (and `ema_eval_*`), `wall_time_s`, `preempted`.

  Raises:
    NonFiniteError: the loss or the gradients became non-finite.
    ValueError: a batch size that the device count does not divide, or
      another bad config value (named in the message).
  """
  start_time = time.time()
  # First: on several processes it checks that they can agree on when to
  # stop, and it starts listening.
  preemption = preemption_lib.Watch()
  try:
    return _train_and_evaluate(config, workdir, preemption, start_time)
  finally:
    preemption.close()


def _training_out_of_memory(
    config, step: int, saved_steps, error: BaseException
) -> OutOfMemoryError:
  """The one-line error of a training step that did not fit."""
  batch = config.train.batch_size
  per_device = batch // jax.device_count()
  resume = (
      f'The run resumes from its checkpoint of step {max(saved_steps)}.'
      if saved_steps
      else 'No step was saved yet.'
  )
  return OutOfMemoryError(
      f'Out of device memory in training step {step} ({_xla_says(error)}):'
      f' train.batch_size={batch} ({per_device} images per device at'
      f' {config.data.train_image_size} px, {config.model.name} in'
      f' {config.train.compute_dtype}) is too large for the devices; lower'
      ' it, or raise train.microbatches (now'
      f' {config.train.microbatches}) to take each step in parts. {resume}'
  )


def _train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    preemption: preemption_lib.Watch,
    start_time: float,
) -> dict[str, Any]:
  """`train_and_evaluate`, watched by `preemption` since `start_time`."""
  workdir = check_workdir(workdir)
  config, num_classes, forward, optimizer, lr_fn = _build(config)
  is_chief = jax.process_index() == 0
  try:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  except OSError as e:  # A file of that name, no permission, no such bucket.
    raise ValueError(
        f'The workdir {workdir} cannot be made a folder ({e}); give --workdir'
        ' a folder path you can write to.'
    ) from None

  kernel_layout = config.train.kernel_layout
  state, restored_step, checkpointer = restore_or_create(
      config,
      forward,
      optimizer,
      workdir,
      config.data.train_image_size,
      advice='Resume it with the config it was trained with, or give this'
      ' run another --workdir.',
  )
  # Before anything is moved or written.
  class_names = _check_class_names(config, workdir, restored_step)
  set_aside = _set_aside_unreadable(checkpointer, restored_step, is_chief)
  initialized = ''
  if restored_step is None and config.train.init_checkpoint:
    # A new run only: one that resumes has its own, fine-tuned weights.
    state, initialized = initialize_from(
        config, jax.tree_util.tree_map(np.asarray, state)
    )
  # Read before config.json is replaced: a resumed run whose command line
  # changed (another learning rate, more steps) says so.
  changes = (
      _config_changes(workdir, config) if restored_step is not None else ''
  )
  # Only now: a config that cannot resume the workdir leaves its
  # config.json as it was.
  if is_chief:
    _save_config(config, workdir)
    _save_class_names(workdir, class_names, restored_step is None)
  start_step = int(state.step)
  logger = _Logger(
      workdir,
      start_step,
      is_chief,
      evaluates_again=start_step >= config.steps.total,
  )
  for line in set_aside:
    logger.print(line)
  if initialized:
    logger.print(initialized)
  if restored_step is not None:
    logger.print(
        f'Resumed from the checkpoint of step {restored_step}.'
        + (f'{changes} The run goes on with the new values.' if changes else '')
    )

  # The parameter and update norms and AGC's clipped fraction are read on
  # log steps only; the other steps leave them out (on the CPU they were a
  # sixth of a small NFNet's step). Each is compiled when first called: a
  # run that logs every step compiles one.
  kwargs = dict(forward=forward, optimizer=optimizer, lr_fn=lr_fn)
  step_fns = {
      logs: jax.pmap(
          make_device_step(
              config, num_classes=num_classes, with_metrics=logs, **kwargs
          ),
          axis_name=AXIS_NAME,
          donate_argnums=(0,),
      )
      for logs in (True, False)
  }
  evaluate_all = make_evaluator(config, forward, num_classes, kernel_layout)

  def run_eval(replicated, step):
    trees = {'eval': replicated.params}
    if config.eval.ema:
      trees['ema_eval'] = replicated.ema_params
    try:
      record = {'step': step, **evaluate_all(trees, replicated.model_state)}
    except OutOfMemoryError as e:
      # The training since the last checkpoint is not lost to the eval
      # batch size: the step is saved (the final one already is), and the
      # run resumes from it.
      save(replicated, step, wait=True)
      raise OutOfMemoryError(
          f'{e} Step {step} is saved: the same command with a lower'
          ' eval.batch_size goes on from it.'
      ) from None
    logger.write(record)
    logger.print(
        f'eval  step {step}: top-1 {record["eval_top1"]:.4f}, top-5 '
        f'{record["eval_top5"]:.4f}, loss {record["eval_loss"]:.4f}'
        + (
            f' | EMA top-1 {record["ema_eval_top1"]:.4f}'
            if config.eval.ema
            else ''
        )
        + f' ({record["eval_count"]} images)'
    )
    return record

  def check_finite(replicated):
    bad_step = int(np.asarray(replicated.nonfinite_step)[0])
    if bad_step >= 0:
      metric = _NONFINITE_METRICS[
          int(np.asarray(replicated.nonfinite_metric)[0])
      ]
      # The state counts the steps taken before it; the log counts from 1.
      raise NonFiniteError(
          bad_step + 1, metric, config.train.compute_dtype == 'float16'
      )

  saved_steps = set(checkpointer.all_steps())

  def save(replicated, step, wait=False):
    if step in saved_steps:  # e.g. a preemption right after a periodic save
      return
    saved_steps.add(step)
    check_finite(replicated)
    host = from_device_layout(unreplicate(replicated), kernel_layout)
    host = _saved_fields(host)
    # The step's own guard already kept non-finite values out; this makes it
    # a property of every checkpoint, not of the step function alone.
    for leaf in jax.tree_util.tree_leaves((host['params'], host['ema_params'])):
      if not np.all(np.isfinite(leaf)):
        raise NonFiniteError(step, 'params')
    checkpointer.save(step, host, wait=wait)

  total = config.steps.total
  train_ds = prefetch_to_devices(
      data.create_dataset(
          config.data,
          split='train',
          global_batch_size=config.train.batch_size,
          image_size=config.data.train_image_size,
          seed=config.seed,
          start_step=start_step,
      ),
      config.data.device_prefetch,
  )
  augment_on_device = make_device_augment(config.data, config.seed)
  replicated = replicate(to_device_layout(state, kernel_layout))
  del state
  if start_step >= total:
    # A finished run relaunched, or one given fewer steps than it has done.
    logger.print(
        f"The checkpoint of step {start_step} is at or past this config's"
        f' {_count(total, "step")}: evaluating it, not training.'
    )
  else:
    logger.print(
        f'Training {config.model.name} on {config.data.name} for '
        f'{_count(total, "step")} (batch {config.train.batch_size} on '
        f'{_count(jax.device_count(), "device")}, '
        f'{config.train.compute_dtype}'
        + (
            f' with a dynamic loss scale from {config.train.loss_scale_init:g}'
            if config.train.loss_scale == 'dynamic'
            else ''
        )
        + f', AGC lambda {config.optimizer.agc.clipping}).'
    )
  last_eval = {}
  last_train = {}
  preempted = False
  step = start_step
  window_start, window_step = time.time(), step
  eval_every = config.steps.eval_every
  try:
    with preemption:
      while step < total:
        batch = next(train_ds)
        if augment_on_device is not None:
          batch = augment_on_device(batch, step)
        logs = is_log_step(step + 1, config.train.log_every_steps, total)
        try:
          replicated, metrics = step_fns[logs](replicated, batch)
          if logs:  # where the step's results are first waited for
            jax.block_until_ready(metrics)
        except jax.errors.JaxRuntimeError as e:
          if not is_out_of_memory(e):
            raise
          raise _training_out_of_memory(
              config, step + 1, saved_steps, e
          ) from None
        step += 1
        if logs:
          check_finite(replicated)
          metrics = {k: float(np.asarray(v)[0]) for k, v in metrics.items()}
          now = time.time()
          images_per_sec = (
              (step - window_step)
              * config.train.batch_size
              / max(now - window_start, 1e-9)
          )
          window_start, window_step = now, step
          eta = (total - step) * config.train.batch_size / images_per_sec
          last_train = dict(
              step=step,
              epoch=step / config.steps.per_epoch,
              images_per_sec=images_per_sec,
              **metrics,
          )
          logger.write(last_train)
          logger.print(
              f'train step {step}/{total} | loss {metrics["train_loss"]:.4f}'
              f' | top-1 {metrics["train_top1"]:.3f} | lr {metrics["lr"]:.4g}'
              f' | {images_per_sec:,.0f} img/s | ETA {_format_seconds(eta)}'
          )
        if eval_every and step % eval_every == 0 and step < total:
          last_eval = run_eval(replicated, step)
        if step % config.train.checkpoint_every_steps == 0 and step < total:
          save(replicated, step)
        if preemption.reached():
          save(replicated, step, wait=True)
          preempted = True
          if preemption.noticed_before:
            logger.print(
                'A signal came before this run began: it stops after its'
                " first step (JAX's preemption service answers one signal"
                ' per process, so later runs here stop so too).'
            )
          logger.print(f'Saved step {step}; exiting so the job can resume.')
          if not is_chief:  # whose log says nothing else
            print(
                f'Process {jax.process_index()}: saved step {step} with the'
                ' others; exiting.',
                flush=True,
            )
          break
    if not preempted:
      check_finite(replicated)
      # Saved before the final evaluation (minutes on ImageNet, and outside
      # the preemption handler): a kill during it then loses no training.
      save(replicated, step, wait=True)
      last_eval = run_eval(replicated, step)
  finally:
    checkpointer.close()
    logger.close()

  result = dict(
      step=step, preempted=preempted, wall_time_s=time.time() - start_time
  )
  result.update({k: v for k, v in last_train.items() if k != 'step'})
  result.update({k: v for k, v in last_eval.items() if k != 'step'})
  if is_chief and not preempted:
    _plot_curves(workdir, logger)
  return result


def run_checkpoint(
    path: str, field: str
) -> Optional[tuple[str, Optional[int]]]:
  """`(workdir, step or None)` where `path` is a run's folder; None: a file.

  `field` (e.g. 'eval.checkpoint') is the config field that gave `path`,
  named in the error.

  A run's workdir (or its `checkpoints/` folder) means its newest readable
  checkpoint; `checkpoints/<step>` (or orbax's `<step>/default` in it), that
  step.
  """
  folder = epath.Path(path)
  is_step = folder.name.isdigit() and folder.parent.name == 'checkpoints'
  if not folder.is_dir() and not (is_step and folder.parent.is_dir()):
    return None
  if (folder / 'checkpoints').is_dir():
    return str(folder), None
  if folder.name == 'checkpoints':
    return str(folder.parent), None
  if folder.name == 'default':  # Orbax's item folder inside a step's.
    folder = folder.parent
  if folder.name.isdigit() and folder.parent.name == 'checkpoints':
    return str(folder.parent.parent), int(folder.name)
  raise FileNotFoundError(
      f'{field}={path!r} is a folder but not a run of this project:'
      ' give a workdir, its checkpoints/ folder, one of its'
      ' checkpoints/<step> folders, or a parameter file.'
  )


def merge_initial(
    fresh: Mapping[str, Mapping[str, Any]],
    loaded: Mapping[str, Mapping[str, Any]],
    exclude: Optional[str],
    where: str,
) -> tuple[dict[str, dict[str, np.ndarray]], list[str]]:
  """`fresh` (a Haiku tree) with each array taken from `loaded` instead.

  Args:
    fresh: the new model's params (or state), `{module: {name: array}}`.
    loaded: the same kind of tree from the checkpoint or file.
    exclude: a regular expression; the 'module/name' paths it matches
      (`re.search`) keep `fresh`'s array, and are not needed in `loaded`.
    where: the source, named in errors (`train.init_checkpoint (where)`).

  Returns:
    `(tree, kept)`: the merged tree, in `fresh`'s dtypes, and the sorted
    paths that kept `fresh`'s array.

  Raises:
    ValueError: a path not excluded is missing from either side or has
      another shape there; the message names the first one and the config
      field that would keep it.
  """
  skip = re.compile(exclude).search if exclude else lambda _: False

  def kept_out(tree):
    return {
        m: {n: v for n, v in d.items() if not skip(f'{m}/{n}')}
        for m, d in tree.items()
    }

  try:
    checkpoint.check_params(
        kept_out(loaded),
        {
            m: {n: np.shape(v) for n, v in d.items()}
            for m, d in kept_out(fresh).items()
        },
        where=f'train.init_checkpoint ({where})',
    )
  except ValueError as e:
    raise ValueError(
        f'{e} Keep such an array at its random init with'
        ' --config.train.init_exclude=REGEX (e.g. "linear/" for a classifier'
        ' with another number of classes).'
    ) from None
  merged = {
      m: {
          n: (
              np.asarray(v)
              if skip(f'{m}/{n}')
              else np.asarray(loaded[m][n], np.asarray(v).dtype)
          )
          for n, v in d.items()
      }
      for m, d in fresh.items()
  }
  kept = sorted(
      f'{m}/{n}' for m, d in fresh.items() for n in d if skip(f'{m}/{n}')
  )
  return merged, kept


def initialize_from(
    config: ml_collections.ConfigDict, state: TrainState
) -> tuple[TrainState, str]:
  """`state` with the weights of `config.train.init_checkpoint` (fine-tuning).

  The parameters (and the model state, where the source has one: a run of
  this project) are taken from the source but for `config.train.init_exclude`;
  the EMA starts from the same parameters. The step, optimizer state and
  loss scale stay as `state` has them (new).

  Args:
    config: the resolved config, with `train.init_checkpoint` set.
    state: a new host state (`create_train_state`).

  Returns:
    `(state, message)`: the new state, and a line that says what was loaded.
  """
  # 'F0' ... 'F6': the published weights, downloaded on first use.
  source = checkpoint.published_file(expand_home(config.train.init_checkpoint))
  exclude = config.train.init_exclude
  run = run_checkpoint(source, 'train.init_checkpoint')
  if run is None:
    loaded = {'params': checkpoint.read_params_file(source)}
    where = source
  else:
    checkpointer = checkpoint.TrainCheckpointer(run[0])
    try:
      fields = ['params', 'model_state']
      # Not its optimizer state or EMA: as much again, or twice as much.
      saved, step = checkpointer.restore_latest(
          None, step=run[1], fields=fields
      )
    finally:
      checkpointer.close()
    if saved is None:
      raise FileNotFoundError(
          f'train.init_checkpoint={source!r}: no readable checkpoint in'
          f' {checkpointer.directory}.'
      )
    loaded = {f: saved[f] for f in fields if f in saved}
    where = f'checkpoint {step} in {checkpointer.directory}'
  params, kept = merge_initial(state.params, loaded['params'], exclude, where)
  model_state = state.model_state
  if loaded.get('model_state'):
    model_state, kept_state = merge_initial(
        state.model_state, loaded['model_state'], exclude, where
    )
    kept += kept_state
  state = state._replace(
      params=params,
      model_state=model_state,
      ema_params=None
      if state.ema_params is None
      else jax.tree_util.tree_map(np.copy, params),
  )
  message = f'Initialised from {where}'
  if kept:
    message += f'; kept at random init: {", ".join(kept)}'
  return state, message + '.'


def evaluate_checkpoint(
    config: ml_collections.ConfigDict, workdir: str
) -> dict[str, Any]:
  """Evaluates the workdir's latest checkpoint, or `config.eval.checkpoint`.

  `config.eval.checkpoint` may name a published DeepMind parameter file
  (e.g. `F0_haiku.npz`, or 'F0' to download it: `checkpoint.published_file`),
  loaded with `checkpoint.load_deepmind_params`, or
  another run of this project: its workdir or `checkpoints/` folder (its
  newest readable checkpoint), or one of its `checkpoints/<step>` folders.
  """
  workdir = check_workdir(workdir)
  _check_batch(config.eval.batch_size, 'eval.batch_size')
  config, num_classes = prepare(config)
  forward = create_model(config, num_classes)
  run = None
  if config.eval.checkpoint:
    # 'F0' ... 'F6': the published weights, downloaded on first use.
    source = checkpoint.published_file(expand_home(config.eval.checkpoint))
    run = run_checkpoint(source, 'eval.checkpoint')
    if run is not None:
      workdir = run[0]
  if config.eval.checkpoint and run is None:
    params = checkpoint.load_deepmind_params(
        source,
        config.model.name,
        num_classes,
        **dict(config.model.overrides),
    )
    model_state = {}
    trees = {'eval': params}
  else:
    missing = FileNotFoundError(
        f'No checkpoint in {workdir}/checkpoints to evaluate; train first '
        'or set --config.eval.checkpoint=PATH.'
    )
    # Checked first: evaluating a mistyped workdir must not create it.
    if not (epath.Path(workdir) / 'checkpoints').is_dir():
      raise missing
    optimizer, _ = optimizer_and_schedule(config)
    state, step, checkpointer = restore_or_create(
        config,
        forward,
        optimizer,
        workdir,
        config.data.eval_image_size,
        advice='Evaluate it with the config it was trained with.',
        step=run[1] if run else None,
        # Whatever optimizer, loss scaling or precision it trained with.
        fields=('params', 'model_state')
        + (('ema_params',) if config.eval.ema else ()),
    )
    checkpointer.close()
    if step is None:
      raise missing
    model_state = state.model_state
    trees = {'eval': state.params}
    if config.eval.ema:
      trees['ema_eval'] = state.ema_params
    where = f' in {checkpointer.directory}' if run else ''
    print(f'Evaluating the checkpoint of step {step}{where}.')
  # The params as loaded, HWIO: one pass needs no layout of its own.
  evaluate_all = make_evaluator(config, forward, num_classes)
  result = evaluate_all(
      {prefix: replicate(params) for prefix, params in trees.items()},
      replicate(model_state),
  )
  print(json.dumps(result))
  return result


def _plot_curves(workdir: str, logger: _Logger) -> Optional[str]:
  """Writes `curves.png`: training loss and train/eval top-1 against step."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top

    matplotlib.use('Agg')
    from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  records, _ = jsonl.parse(logger.path.read_text())
  train = [r for r in records if 'train_loss' in r]
  evals = [r for r in records if 'eval_top1' in r]
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
  ax_loss.plot([r['step'] for r in train], [r['train_loss'] for r in train])
  ax_loss.set(xlabel='step', ylabel='training loss', title='Loss')
  ax_acc.plot(
      [r['step'] for r in train],
      [r['train_top1'] for r in train],
      label='train top-1',
  )
  if evals:
    ax_acc.plot(
        [r['step'] for r in evals],
        [r['eval_top1'] for r in evals],
        'o-',
        label='eval top-1',
    )
    if 'ema_eval_top1' in evals[0]:
      ax_acc.plot(
          [r['step'] for r in evals],
          [r['ema_eval_top1'] for r in evals],
          's--',
          label='eval top-1 (EMA)',
      )
  ax_acc.set(xlabel='step', ylabel='accuracy', title='Accuracy', ylim=(0, 1))
  ax_acc.legend()
  fig.tight_layout()
  path = epath.Path(workdir) / 'curves.png'
  with path.open('wb') as f:
    fig.savefig(f, format='png', dpi=100)
  plt.close(fig)
  return str(path)
