"""The NFNet optimizer: AGC, masked weight decay, SGD-Nesterov, EMA.

The paper's recipe (NFNets paper, appendix; original release): SGD with
Nesterov momentum 0.9, learning rate 0.1 x batch / 256 with a linear warmup
from 0 and a cosine decay to 0, weight decay 2e-5 on weights only, AGC on the
all-reduced gradient before weight decay and momentum, and an EMA of the
weights with decay min(0.99999, (1 + t) / (10 + t)).

References:
  Brock, De, Smith, Simonyan, `High-Performance Large-Scale Image Recognition
  Without Normalization <https://arxiv.org/abs/2102.06171>`_, ICML 2021.
"""

import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from nfnets import agc

OPTIMIZERS = ("sgd", "adamw", "lamb", "adam")
SCHEDULES = ("cosine", "constant")

# Only these parameters are decayed: conv kernels and linear weights. Gains
# (`gain`), biases (`bias`, `b`), SkipInit gains (`skip_gain`), normalization
# `scale`/`offset` and anything else are left alone, as in the paper.
DECAYED_PARAM_NAMES = ("w",)

# The learning rates of the recipe are given per 256 images.
_REFERENCE_BATCH_SIZE = 256


def _check_number(name, value, *, minimum, strict):
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise ValueError(f"{name} must be a number, got {value!r}.")
  if (strict and not value > minimum) or (not strict and not value >= minimum):
    sign = ">" if strict else ">="
    raise ValueError(f"{name} must be {sign} {minimum}, got {value!r}.")


def create_learning_rate_fn(
    base_lr: float,
    batch_size: int,
    warmup_steps: int,
    total_steps: int,
    schedule: str = "cosine",
) -> optax.Schedule:
  """Linear warmup from 0, then cosine decay to 0 (or constant).

  The peak learning rate is `base_lr * batch_size / 256`, reached at step
  `warmup_steps`. With 'cosine' it decays to 0 at `total_steps` (and stays 0
  after); with 'constant' it stays at the peak.

  Args:
    base_lr: the learning rate per 256 images (0.1 for NFNets), > 0.
    batch_size: the global batch size, > 0.
    warmup_steps: number of warmup steps, >= 0.
    total_steps: number of training steps, > warmup_steps for 'cosine' and
      >= warmup_steps for 'constant'.
    schedule: 'cosine' or 'constant'.

  Returns:
    A schedule: a function of the step (int or scalar array) returning the
    learning rate as a float32 scalar. The runner can call it to log the
    learning rate of the current step.
  """
  _check_number("base_lr", base_lr, minimum=0, strict=True)
  _check_number("batch_size", batch_size, minimum=0, strict=True)
  _check_number("warmup_steps", warmup_steps, minimum=0, strict=False)
  _check_number("total_steps", total_steps, minimum=0, strict=True)
  if schedule not in SCHEDULES:
    raise ValueError(
        f"Unknown learning-rate schedule {schedule!r}; valid: {SCHEDULES}."
    )
  if schedule == "cosine" and not total_steps > warmup_steps:
    raise ValueError(
        f"A cosine schedule needs total_steps > warmup_steps, got "
        f"total_steps={total_steps!r}, warmup_steps={warmup_steps!r}."
    )
  if schedule == "constant" and not total_steps >= warmup_steps:
    raise ValueError(
        f"total_steps must be >= warmup_steps, got total_steps="
        f"{total_steps!r}, warmup_steps={warmup_steps!r}."
    )
  peak_lr = base_lr * batch_size / _REFERENCE_BATCH_SIZE
  decay_steps = total_steps - warmup_steps

  def learning_rate_fn(step):
    step = jnp.asarray(step, jnp.float32)
    # max(., 1) only matters when warmup_steps == 0, where this branch is
    # never selected.
    warmup_lr = peak_lr * step / max(warmup_steps, 1)
    if schedule == "cosine":
      progress = jnp.clip((step - warmup_steps) / decay_steps, 0.0, 1.0)
      after_lr = 0.5 * peak_lr * (1.0 + jnp.cos(math.pi * progress))
    else:
      after_lr = jnp.full_like(step, peak_lr)
    return jnp.where(step < warmup_steps, warmup_lr, after_lr)

  return learning_rate_fn


def weight_decay_mask(params: Any) -> Any:
  """Which parameters are weight-decayed: those named `w`.

  The name is the last key of the parameter's path (see
  `nfnets.agc.path_to_str`), e.g. `w` in `"NFNet/~/stem_conv0/w"`.

  Args:
    params: a pytree of parameters.

  Returns:
    A pytree of Python bools with `params`' structure, True where decayed.
  """

  def is_decayed(path, _):
    # The parameter's name is its path's last key (module paths hold '/').
    return bool(path) and agc.path_to_str(path[-1:]) in DECAYED_PARAM_NAMES

  return jax.tree_util.tree_map_with_path(is_decayed, params)


def _agc_from_config(agc_cfg):
  clipping = agc_cfg.clipping
  if clipping is None:
    return None
  if isinstance(clipping, str):
    raise ValueError(
        f"agc.clipping must be a number or None, got {clipping!r}; resolve "
        "'auto' with nfnets.agc.clipping_for_batch_size(global_batch_size) "
        "before creating the optimizer."
    )
  # Named as the config names them; AGC's own checks do not know the field.
  _check_number("optimizer.agc.clipping", clipping, minimum=0, strict=True)
  _check_number("optimizer.agc.eps", agc_cfg.eps, minimum=0, strict=False)
  return agc.adaptive_grad_clip(
      clipping, eps=agc_cfg.eps, exclude=agc_cfg.exclude
  )


def learning_rate_fn_from_config(
    cfg: ml_collections.ConfigDict,
    *,
    batch_size: int,
    total_steps: int,
    warmup_steps: int,
) -> optax.Schedule:
  """The schedule `create_optimizer` uses, for logging the learning rate.

  Args:
    cfg: the optimizer config (see `create_optimizer`).
    batch_size: the global batch size.
    total_steps: number of training steps.
    warmup_steps: number of warmup steps.

  Returns:
    The learning-rate schedule, a function of the step.
  """
  return create_learning_rate_fn(
      cfg.base_lr, batch_size, warmup_steps, total_steps, cfg.schedule
  )


def schedule_count(opt_state: Any, default: Any = None) -> Any:
  """The step the learning-rate schedule in an optax state is at.

  The schedules of `create_optimizer` read optax's own count, which stays
  put on the steps a dynamic loss scale skips (the whole state does), so
  after a skipped step it is behind the training step; the learning rate a
  step applies is `schedule(schedule_count(opt_state))`, with the state it
  starts from.

  Args:
    opt_state: an optax state, e.g. of an optimizer from `create_optimizer`.
    default: returned when the state holds no schedule (a constant learning
      rate).

  Returns:
    The schedule's int32 count, or `default`.
  """
  is_schedule = lambda x: isinstance(x, optax.ScaleByScheduleState)
  found = [
      x
      for x in jax.tree_util.tree_leaves(opt_state, is_leaf=is_schedule)
      if is_schedule(x)
  ]
  if len(found) > 1:
    raise ValueError(
        f"Expected at most one learning-rate schedule in the optimizer state,"
        f" found {len(found)}."
    )
  return found[0].count if found else default


def create_optimizer(
    cfg: ml_collections.ConfigDict,
    *,
    batch_size: int,
    total_steps: int,
    warmup_steps: int,
) -> optax.GradientTransformation:
  """The optimizer described by `cfg`, AGC first.

  For 'sgd' (the paper's recipe) the chain is: AGC -> weight decay (masked
  by `weight_decay_mask`) -> momentum (Nesterov if `cfg.nesterov`) ->
  learning-rate schedule. For 'adam' the weight decay is added to the
  gradient the same way (L2), for 'adamw' and 'lamb' it is optax's decoupled
  weight decay; all use the same mask and schedule.

  The gradient given to `update` must already be averaged over devices (AGC
  needs the full-batch gradient), and `update` needs `params`.

  Args:
    cfg: a ConfigDict with fields `name` (one of `OPTIMIZERS`), `base_lr`
      (per 256 images), `schedule` (one of `SCHEDULES`), `weight_decay`,
      `momentum` and `nesterov` (read for 'sgd'), `b1` and `b2` (read for the
      Adam family), and `agc` with `clipping` (a number > 0, or None for no
      AGC), `eps` and `exclude` (see `nfnets.agc.adaptive_grad_clip`).
    batch_size: the global batch size, which scales the learning rate.
    total_steps: number of training steps.
    warmup_steps: number of warmup steps.

  Returns:
    An `optax.GradientTransformation`.
  """
  name = cfg.name
  if name not in OPTIMIZERS:
    raise ValueError(f"Unknown optimizer {name!r}; valid: {OPTIMIZERS}.")
  learning_rate_fn = learning_rate_fn_from_config(
      cfg,
      batch_size=batch_size,
      total_steps=total_steps,
      warmup_steps=warmup_steps,
  )
  weight_decay = cfg.weight_decay
  _check_number("weight_decay", weight_decay, minimum=0, strict=False)

  # At 1 or more a momentum or moment estimate never decays: the updates
  # grow unbounded or stop following the gradient.
  for field in ("momentum",) if name == "sgd" else ("b1", "b2"):
    value = cfg[field]
    _check_number(f"optimizer.{field}", value, minimum=0, strict=False)
    if not value < 1:
      raise ValueError(f"optimizer.{field} must be < 1, got {value!r}.")
  if name == "sgd":
    momentum = cfg.momentum
    optimizer = optax.chain(
        optax.add_decayed_weights(weight_decay, mask=weight_decay_mask),
        optax.sgd(learning_rate_fn, momentum=momentum, nesterov=cfg.nesterov),
    )
  elif name == "adam":
    optimizer = optax.chain(
        optax.add_decayed_weights(weight_decay, mask=weight_decay_mask),
        optax.adam(learning_rate_fn, b1=cfg.b1, b2=cfg.b2),
    )
  elif name == "adamw":
    optimizer = optax.adamw(
        learning_rate_fn,
        b1=cfg.b1,
        b2=cfg.b2,
        weight_decay=weight_decay,
        mask=weight_decay_mask,
    )
  else:  # lamb
    optimizer = optax.lamb(
        learning_rate_fn,
        b1=cfg.b1,
        b2=cfg.b2,
        weight_decay=weight_decay,
        mask=weight_decay_mask,
    )

  clip = _agc_from_config(cfg.agc)
  if clip is None:
    return optimizer
  return optax.chain(clip, optimizer)


def ema_decay(
    step: jax.typing.ArrayLike, max_decay: float = 0.99999
) -> jax.Array:
  """The EMA decay at step `t`: `min(max_decay, (1 + t) / (10 + t))`.

  The warm-up term keeps early averages from being dominated by the random
  initialisation.

  Args:
    step: the training step t (int or scalar array), >= 0.
    max_decay: the decay reached late in training (0.99999 in the paper).

  Returns:
    The decay, a float32 scalar.
  """
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(jnp.float32(max_decay), (1.0 + step) / (10.0 + step))


def ema_update(
    ema_params: Any,
    params: Any,
    step: jax.typing.ArrayLike,
    max_decay: float = 0.99999,
) -> Any:
  """One step of the exponential moving average of the parameters.

  `ema <- decay * ema + (1 - decay) * params` with `decay = ema_decay(step)`,
  computed in float32 and returned in `ema_params`' dtypes.

  Args:
    ema_params: the current averages.
    params: the parameters after this step's update, same structure.
    step: the training step.
    max_decay: as in `ema_decay`.

  Returns:
    The new averages, same structure and dtypes as `ema_params`.
  """
  decay = ema_decay(step, max_decay)

  def update_leaf(ema, param):
    ema32 = jnp.asarray(ema).astype(jnp.float32)
    new = decay * ema32 + (1.0 - decay) * jnp.asarray(param, jnp.float32)
    return new.astype(jnp.asarray(ema).dtype)

  return jax.tree_util.tree_map(update_leaf, ema_params, params)
