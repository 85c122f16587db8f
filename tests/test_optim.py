"""Tests for nfnets.optim: schedule, optimizer chain, masks, pmap, EMA."""

import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from nfnets import agc
from nfnets import optim
import reference_utils


def make_config(**overrides):
  """An optimizer config as the experiment configs spell it."""
  agc_overrides = overrides.pop("agc", {})
  cfg = ml_collections.ConfigDict(
      {
          "name": "sgd",
          "base_lr": 0.1,
          "schedule": "cosine",
          "momentum": 0.9,
          "nesterov": True,
          "weight_decay": 2e-5,
          "b1": 0.9,
          "b2": 0.999,
          "agc": {
              "clipping": 0.01,
              "eps": 1e-3,
              "exclude": agc.DEFAULT_EXCLUDE,
          },
      }
  )
  cfg.update(overrides)
  # `clipping` may change type (float -> None / str), so rebuild the field.
  agc_cfg = cfg.agc.to_dict()
  agc_cfg.update(agc_overrides)
  cfg.agc = ml_collections.ConfigDict(agc_cfg)
  return cfg


def numpy_agc(grad, param, clipping, eps):
  """Vectorised NumPy AGC, units on the last axis (rank <= 1: whole)."""
  grad = np.asarray(grad, np.float64)
  param = np.asarray(param, np.float64)
  axes = None if grad.ndim <= 1 else tuple(range(grad.ndim - 1))
  g_norm = np.sqrt(np.sum(grad**2, axis=axes, keepdims=True))
  max_norm = clipping * np.maximum(
      np.sqrt(np.sum(param**2, axis=axes, keepdims=True)), eps
  )
  return np.where(
      g_norm > max_norm, grad * max_norm / np.maximum(g_norm, 1e-6), grad
  )


def small_tree(seed):
  rng = np.random.default_rng(seed)
  params = {
      "net/~/conv": {
          "w": rng.normal(size=(3, 3, 2, 4)),
          "gain": 1.0 + 0.1 * rng.normal(size=(4,)),
          "bias": np.zeros((4,)),
      },
      "net/~/block": {"skip_gain": np.zeros(())},
      "net/~/linear": {"w": rng.normal(size=(4, 3)), "b": np.zeros((3,))},
  }
  grads = jax.tree.map(lambda p: rng.normal(size=p.shape) * 3.0, params)
  cast = lambda t: jax.tree.map(lambda x: np.asarray(x, np.float32), t)
  return cast(grads), cast(params)


# ---------------------------------------------------------------------------
# Learning-rate schedule.
# ---------------------------------------------------------------------------


def test_schedule_warmup_then_cosine_to_zero():
  batch, warmup, total = 4096, 50, 1000
  lr = optim.create_learning_rate_fn(0.1, batch, warmup, total)
  peak = 0.1 * batch / 256
  assert float(lr(0)) == 0.0
  np.testing.assert_allclose(lr(warmup), peak, rtol=1e-6)
  np.testing.assert_allclose(lr(warmup // 2), peak / 2, rtol=1e-6)
  np.testing.assert_allclose(lr((warmup + total) // 2), peak / 2, rtol=1e-5)
  np.testing.assert_allclose(lr(total), 0.0, atol=1e-7)
  np.testing.assert_allclose(lr(total + 10), 0.0, atol=1e-7)
  values = np.asarray(jax.vmap(lr)(jnp.arange(total + 1)))
  assert np.all(np.diff(values[: warmup + 1]) > 0)
  assert np.all(np.diff(values[warmup:]) <= 1e-7)


def test_schedule_constant_and_no_warmup():
  lr = optim.create_learning_rate_fn(0.2, 128, 10, 100, schedule="constant")
  np.testing.assert_allclose(lr(10), 0.1, rtol=1e-6)
  np.testing.assert_allclose(lr(100), 0.1, rtol=1e-6)
  lr = optim.create_learning_rate_fn(0.1, 256, 0, 100)
  np.testing.assert_allclose(lr(0), 0.1, rtol=1e-6)


@pytest.mark.parametrize(
    "args, bad",
    [
        ((0.0, 256, 10, 100), "base_lr must be > 0, got 0.0"),
        ((0.1, 0, 10, 100), "batch_size must be > 0, got 0"),
        ((0.1, 256, -1, 100), "warmup_steps must be >= 0, got -1"),
        ((0.1, 256, 100, 100), "total_steps=100, warmup_steps=100"),
        ((0.1, 256, 10, 0), "total_steps must be > 0, got 0"),
    ],
)
def test_schedule_rejects_bad_values(args, bad):
  with pytest.raises(ValueError, match=bad):
    optim.create_learning_rate_fn(*args)


def test_schedule_rejects_unknown_name():
  with pytest.raises(ValueError, match="'linear'.*cosine.*constant"):
    optim.create_learning_rate_fn(0.1, 256, 10, 100, schedule="linear")


# ---------------------------------------------------------------------------
# Masks on nfnet_f0's parameter tree (built from the fixture, no model).
# ---------------------------------------------------------------------------


def paths_where(mask, value):
  flat = jax.tree_util.tree_flatten_with_path(mask)[0]
  return sorted(agc.path_to_str(p) for p, m in flat if m == value)


def test_weight_decay_mask_on_nfnet_f0():
  params = reference_utils.zeros_tree("nfnet_f0")
  mask = optim.weight_decay_mask(params)
  expected_not_decayed = sorted(
      f"{module}/{name}"
      for module, leaves in params.items()
      for name in leaves
      if name in ("gain", "bias", "b", "skip_gain")
  )
  assert paths_where(mask, False) == expected_not_decayed
  expected_decayed = sorted(
      f"{module}/{name}"
      for module, leaves in params.items()
      for name in leaves
      if name == "w"
  )
  assert paths_where(mask, True) == expected_decayed
  # 1 + 2 + 6 + 3 SkipInit gains; the classifier bias is not decayed.
  assert sum(p.endswith("/skip_gain") for p in expected_not_decayed) == 12
  assert "NFNet/~/linear/b" in expected_not_decayed
  assert "NFNet/~/linear/w" in expected_decayed


def test_weight_decay_mask_skips_norm_and_unknown_params():
  params = {
      "net/~/batch_norm": {"scale": 1.0, "offset": 0.0},
      "net/~/conv": {"w": 1.0, "weight": 1.0},
  }
  assert paths_where(optim.weight_decay_mask(params), True) == ["net/~/conv/w"]


def test_agc_mask_on_nfnet_f0_from_config():
  params = reference_utils.zeros_tree("nfnet_f0")
  cfg = make_config()
  mask = agc.clipping_mask(params, cfg.agc.exclude)
  assert paths_where(mask, False) == ["NFNet/~/linear/w"]
  assert "NFNet/~/nf_block/~/squeeze_excite/~/linear/w" in paths_where(
      mask, True
  )


# ---------------------------------------------------------------------------
# The optimizer chain.
# ---------------------------------------------------------------------------


def test_sgd_chain_is_agc_then_decay_then_nesterov():
  grads, params = small_tree(0)
  clipping, wd, batch = 0.05, 0.1, 512
  cfg = make_config(
      weight_decay=wd, schedule="constant", agc={"clipping": clipping}
  )
  opt = optim.create_optimizer(
      cfg, batch_size=batch, total_steps=10, warmup_steps=0
  )
  state = opt.init(params)
  updates, state = jax.jit(opt.update)(grads, state, params)
  lr = 0.1 * batch / 256

  def expected_leaf(path, g, p):
    path = agc.path_to_str(path)
    if path != "net/~/linear/w":
      g = numpy_agc(g, p, clipping, 1e-3)
    if path.endswith("/w"):
      g = g + wd * np.asarray(p, np.float64)
    # Nesterov, first step: momentum buffer = g, update = g + 0.9 * g.
    return -lr * 1.9 * g

  expected = jax.tree_util.tree_map_with_path(expected_leaf, grads, params)
  for (path, got), want in zip(
      jax.tree_util.tree_flatten_with_path(updates)[0],
      jax.tree.leaves(expected),
  ):
    np.testing.assert_allclose(
        got, want, rtol=1e-5, err_msg=agc.path_to_str(path)
    )
  # Clipping after weight decay would give something else.
  w, g = params["net/~/conv"]["w"], grads["net/~/conv"]["w"]
  assert not np.allclose(
      updates["net/~/conv"]["w"],
      -lr * 1.9 * numpy_agc(g + wd * w, w, clipping, 1e-3),
      rtol=1e-3,
  )


def test_no_agc_when_clipping_is_none():
  grads, params = small_tree(1)
  cfg = make_config(
      agc={"clipping": None}, weight_decay=0.0, schedule="constant"
  )
  opt = optim.create_optimizer(
      cfg, batch_size=256, total_steps=10, warmup_steps=0
  )
  updates, _ = opt.update(grads, opt.init(params), params)
  expected = jax.tree.map(lambda g: -0.1 * 1.9 * g, grads)
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
      updates,
      expected,
  )


def test_string_clipping_is_rejected():
  cfg = make_config(agc={"clipping": "auto"})
  with pytest.raises(ValueError, match="'auto'"):
    optim.create_optimizer(cfg, batch_size=256, total_steps=10, warmup_steps=1)


@pytest.mark.parametrize("momentum", [-0.1, 1.0, 2.0])
def test_momentum_outside_0_1_is_rejected(momentum):
  with pytest.raises(ValueError, match="momentum must be"):
    optim.create_optimizer(
        make_config(momentum=momentum),
        batch_size=256,
        total_steps=10,
        warmup_steps=1,
    )


@pytest.mark.parametrize("name", ["adam", "adamw", "lamb"])
@pytest.mark.parametrize(
    "field, value",
    [("b1", 1.0), ("b2", 1.5), ("b1", -0.1), ("b2", float("nan"))],
)
def test_adam_moment_decays_outside_0_1_are_rejected(name, field, value):
  with pytest.raises(ValueError, match=rf"^optimizer\.{field} must be"):
    optim.create_optimizer(
        make_config(name=name, **{field: value}),
        batch_size=256,
        total_steps=10,
        warmup_steps=1,
    )


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("eps", -1e-3, r"optimizer\.agc\.eps must be >= 0, got -0\.001"),
        ("eps", "1e-3", r"optimizer\.agc\.eps must be a number"),
        ("clipping", 0.0, r"optimizer\.agc\.clipping must be > 0, got 0\.0"),
        ("clipping", -0.01, r"optimizer\.agc\.clipping must be > 0"),
    ],
)
def test_bad_agc_values_name_their_config_field(field, value, message):
  with pytest.raises(ValueError, match=rf"^{message}"):
    optim.create_optimizer(
        make_config(agc={field: value}),
        batch_size=256,
        total_steps=10,
        warmup_steps=1,
    )


def test_sgd_does_not_read_the_adam_fields():
  optim.create_optimizer(
      make_config(name="sgd", b1=1.0, b2=2.0),
      batch_size=256,
      total_steps=10,
      warmup_steps=1,
  )


def test_bad_optimizer_name_lists_valid_names():
  with pytest.raises(ValueError, match="'rmsprop'.*sgd.*adamw.*lamb.*adam"):
    optim.create_optimizer(
        make_config(name="rmsprop"),
        batch_size=256,
        total_steps=10,
        warmup_steps=1,
    )


@pytest.mark.parametrize("name", ["adamw", "lamb", "adam", "sgd"])
def test_optimizers_run_and_decay_only_weights(name):
  _, params = small_tree(2)
  zero_grads = jax.tree.map(np.zeros_like, params)
  cfg = make_config(name=name, weight_decay=0.1, schedule="constant")
  opt = optim.create_optimizer(
      cfg, batch_size=256, total_steps=10, warmup_steps=0
  )
  updates, _ = jax.jit(opt.update)(zero_grads, opt.init(params), params)
  for path, u in jax.tree_util.tree_flatten_with_path(updates)[0]:
    path = agc.path_to_str(path)
    u = np.asarray(u)
    assert np.all(np.isfinite(u)), path
    if path.endswith("/w"):
      assert np.all(u != 0.0), path  # Decay pulls weights towards zero.
    else:
      np.testing.assert_array_equal(u, 0.0, err_msg=path)
  # Real gradients move every parameter.
  grads, _ = small_tree(3)
  updates, _ = jax.jit(opt.update)(grads, opt.init(params), params)
  assert all(np.all(np.asarray(u) != 0) for u in jax.tree.leaves(updates))


@pytest.mark.parametrize("name", ["adamw", "lamb", "adam", "sgd"])
def test_schedule_count_is_the_count_the_schedule_reads(name):
  _, params = small_tree(2)
  grads, _ = small_tree(3)
  cfg = make_config(name=name)
  opt = optim.create_optimizer(
      cfg, batch_size=256, total_steps=10, warmup_steps=2
  )
  state = opt.init(params)
  assert int(optim.schedule_count(state)) == 0
  for _ in range(3):
    _, state = jax.jit(opt.update)(grads, state, params)
  assert int(optim.schedule_count(state)) == 3


def test_schedule_count_default_and_two_schedules():
  _, params = small_tree(2)
  constant = optax.sgd(0.1).init(params)
  assert optim.schedule_count(constant, default=7) == 7
  schedule = optax.sgd(optax.constant_schedule(0.1))
  two = optax.chain(schedule, schedule).init(params)
  with pytest.raises(ValueError, match="found 2"):
    optim.schedule_count(two)


# ---------------------------------------------------------------------------
# pmap: the all-reduced update equals the single-device update.
# ---------------------------------------------------------------------------


class TinyNet(hk.Module):
  """Conv -> ReLU -> mean pool -> Linear; paths like a real network's."""

  def __init__(self, name=None):
    super().__init__(name=name)
    # Made in __init__, like NFNet's, so the paths read `tiny_net/~/linear`.
    self.conv = hk.Conv2D(4, 3)
    self.linear = hk.Linear(3)

  def __call__(self, x):
    x = jax.nn.relu(self.conv(x))
    return self.linear(jnp.mean(x, axis=(1, 2)))


def test_pmap_update_equals_single_device_update():
  n = jax.device_count()
  batch = 16 if 16 % n == 0 else 2 * n
  model = hk.without_apply_rng(hk.transform(lambda x: TinyNet()(x)))
  rng = np.random.default_rng(0)
  images = rng.normal(size=(batch, 6, 6, 2)).astype(np.float32)
  labels = rng.integers(0, 3, size=(batch,))
  params = model.init(jax.random.PRNGKey(0), images)
  assert "tiny_net/~/linear" in params  # The default exclusion applies.

  cfg = make_config(agc={"clipping": 0.1}, weight_decay=1e-2)
  opt = optim.create_optimizer(
      cfg, batch_size=batch, total_steps=20, warmup_steps=0
  )

  def loss_fn(p, x, y):
    logits = model.apply(p, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def step(p, s, x, y, axis_name=None):
    grads = jax.grad(loss_fn)(p, x, y)
    if axis_name is not None:
      grads = jax.lax.pmean(grads, axis_name)
    fraction = agc.clipped_fraction(grads, p, cfg.agc.clipping)
    updates, s = opt.update(grads, s, p)
    return optax.apply_updates(p, updates), s, fraction

  single = jax.jit(step)
  multi = jax.pmap(lambda *a: step(*a, axis_name="batch"), axis_name="batch")

  p1, s1 = params, opt.init(params)
  replicate = lambda t: jax.tree.map(lambda x: np.stack([x] * n), t)
  pn, sn = replicate(params), replicate(opt.init(params))
  shard = lambda a: a.reshape((n, batch // n) + a.shape[1:])
  for _ in range(2):
    p1, s1, f1 = single(p1, s1, images, labels)
    pn, sn, fn = multi(pn, sn, shard(images), shard(labels))
    assert 0.0 < float(f1) < 1.0  # AGC is active, on some units only.
    np.testing.assert_allclose(fn, np.full((n,), f1), rtol=1e-6)

  for (path, a), b in zip(
      jax.tree_util.tree_flatten_with_path(p1)[0], jax.tree.leaves(pn)
  ):
    for device in range(n):
      np.testing.assert_allclose(
          b[device], a, rtol=1e-5, atol=1e-7, err_msg=agc.path_to_str(path)
      )
  # Training moved the parameters.
  assert not np.allclose(
      p1["tiny_net/~/conv2_d"]["w"], params["tiny_net/~/conv2_d"]["w"]
  )


# ---------------------------------------------------------------------------
# EMA.
# ---------------------------------------------------------------------------


def test_ema_decay_formula():
  for t in [0, 1, 10, 90, 1000]:
    np.testing.assert_allclose(
        optim.ema_decay(t), min(0.99999, (1 + t) / (10 + t)), rtol=1e-6
    )
  np.testing.assert_allclose(optim.ema_decay(10**9), 0.99999, rtol=1e-7)
  np.testing.assert_allclose(optim.ema_decay(5, max_decay=0.3), 0.3)
  np.testing.assert_allclose(
      jax.jit(optim.ema_decay)(jnp.int32(90)), 0.91, rtol=1e-6
  )


def test_ema_update():
  ema = {"a": np.full((3,), 2.0, np.float32), "b": np.zeros((), np.float32)}
  params = {
      "a": np.full((3,), 4.0, np.float32),
      "b": np.asarray(1.0, jnp.bfloat16),
  }
  new = jax.jit(optim.ema_update)(ema, params, 90)
  # decay = 91 / 100.
  np.testing.assert_allclose(new["a"], 0.91 * 2.0 + 0.09 * 4.0, rtol=1e-6)
  np.testing.assert_allclose(new["b"], 0.09, rtol=1e-6)
  assert new["a"].dtype == jnp.float32 and new["b"].dtype == jnp.float32
