"""Tests for nfnets.agc: Adaptive Gradient Clipping."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nfnets import agc
import reference_utils


def flat_paths(tree, mask):
  """Sorted path strings where `mask` is True."""
  flat = jax.tree_util.tree_flatten_with_path(mask)[0]
  return sorted(agc.path_to_str(path) for path, keep in flat if keep)


# ---------------------------------------------------------------------------
# An independent NumPy reference: explicit loops over units, float64.
# ---------------------------------------------------------------------------


def numpy_clip_leaf(grad, param, clipping, eps):
  grad = np.asarray(grad, np.float64)
  param = np.asarray(param, np.float64)
  if grad.ndim <= 1:
    units = [(Ellipsis,)]
  else:
    units = [(Ellipsis, i) for i in range(grad.shape[-1])]
  out = grad.copy()
  for index in units:
    g_norm = np.sqrt(np.sum(grad[index] ** 2))
    max_norm = clipping * max(np.sqrt(np.sum(param[index] ** 2)), eps)
    if g_norm > max_norm:
      out[index] = grad[index] * (max_norm / max(g_norm, 1e-6))
  return out


def random_tree(seed):
  """Grads and params of ranks 0, 1, 2, 4 and 5, some zero, mixed scales."""
  rng = np.random.default_rng(seed)
  shapes = {
      "net/~/scalar": {"skip_gain": ()},
      "net/~/vector": {"gain": (7,)},
      "net/~/zero_bias": {"bias": (5,)},
      "net/~/linear": {"w": (6, 4), "b": (4,)},
      "net/~/conv": {"w": (3, 3, 4, 6)},
      "net/~/conv3d": {"w": (2, 3, 3, 2, 5)},
      "net/~/zero_grad": {"w": (3, 3, 2, 3)},
  }
  params, grads = {}, {}
  for module, leaves in shapes.items():
    params[module], grads[module] = {}, {}
    for name, shape in leaves.items():
      params[module][name] = rng.normal(size=shape).astype(np.float32)
      # Per-unit scales spanning 1e-3..1e1 so that some units are clipped and
      # some are not.
      unit_scale = 10.0 ** rng.uniform(-3, 1, size=shape[-1:] or ())
      grads[module][name] = (rng.normal(size=shape) * unit_scale).astype(
          np.float32
      )
  params["net/~/zero_bias"]["bias"][:] = 0.0
  grads["net/~/zero_grad"]["w"][:] = 0.0
  return grads, params


def test_matches_numpy_reference_on_ranks_0_to_5():
  grads, params = random_tree(0)
  clipping, eps = 0.05, 1e-3
  transform = agc.adaptive_grad_clip(clipping, eps)
  state = transform.init(params)
  assert isinstance(state, optax.EmptyState)
  out, _ = jax.jit(transform.update)(grads, state, params)

  num_clipped, num_kept = 0, 0
  for module in grads:
    for name in grads[module]:
      grad, param = grads[module][name], params[module][name]
      if f"{module}/{name}" == "net/~/linear/w":
        expected = grad  # The default excludes the classifier weight.
      else:
        expected = numpy_clip_leaf(grad, param, clipping, eps)
      np.testing.assert_allclose(
          out[module][name],
          expected,
          rtol=1e-6,
          atol=0,
          err_msg=f"{module}/{name}",
      )
      changed = np.any(np.asarray(out[module][name]) != grad)
      num_clipped += changed
      num_kept += not changed
  # The tree exercises both branches.
  assert num_clipped >= 3 and num_kept >= 2
  # Zero grads stay zero; a zero parameter still gets a non-zero gradient.
  np.testing.assert_array_equal(out["net/~/zero_grad"]["w"], 0.0)
  assert np.all(np.asarray(out["net/~/zero_bias"]["bias"]) != 0.0)
  # The excluded classifier weight would otherwise have been clipped.
  assert not np.allclose(
      numpy_clip_leaf(
          grads["net/~/linear"]["w"], params["net/~/linear"]["w"], clipping, eps
      ),
      grads["net/~/linear"]["w"],
  )


def test_transform_equals_unitwise_clip_leaf_by_leaf_bit_for_bit():
  grads, params = random_tree(3)
  grads["net/~/conv"]["w"] = grads["net/~/conv"]["w"].astype(jnp.bfloat16)
  transform = agc.adaptive_grad_clip(0.05, 1e-3, exclude=None)
  out, _ = jax.jit(transform.update)(grads, optax.EmptyState(), params)
  for module in grads:
    for name in grads[module]:
      want = jax.jit(agc.unitwise_clip)(
          grads[module][name], params[module][name], 0.05, 1e-3
      )
      got = out[module][name]
      assert got.dtype == want.dtype
      np.testing.assert_array_equal(got, want, err_msg=f"{module}/{name}")


def test_all_leaves_are_clipped_in_one_computation():
  # One comparison, one threshold and one factor for the whole tree,
  # whatever its number of leaves: per-leaf launches are what cost on a GPU.
  grads, params = random_tree(4)
  transform = agc.adaptive_grad_clip(0.05)
  jaxpr = jax.make_jaxpr(transform.update)(grads, optax.EmptyState(), params)
  primitives = [eqn.primitive.name for eqn in jaxpr.eqns]
  assert len(jax.tree_util.tree_leaves(grads)) == 8
  assert primitives.count("gt") == 1
  assert primitives.count("div") == 1


def test_vector_leaves_are_reduced_in_groups_of_one_size():
  # Gains, biases and scalars (most of an NF network's leaves) are one unit
  # each: their sums of squares are one row reduction per size, not one
  # launch per leaf. Kernels keep theirs (one unit per output channel).
  rng = np.random.default_rng(7)
  sizes = {"a": (6,), "b": (6,), "c": (6,), "d": (), "e": (), "f": (5,)}
  grads = {
      m: {"b": rng.normal(size=s).astype(np.float32)} for m, s in sizes.items()
  }
  grads["k"] = {"w": rng.normal(size=(3, 3, 2, 6)).astype(np.float32)}
  params = jax.tree_util.tree_map(lambda x: x * 2.0 + 0.5, grads)
  transform = agc.adaptive_grad_clip(0.05, exclude=None)
  jaxpr = jax.make_jaxpr(transform.update)(grads, optax.EmptyState(), params)
  sums = [e for e in jaxpr.eqns if e.primitive.name == "reduce_sum"]
  # Per tree (gradients, parameters): the kernel's, then one per size of
  # vector (6 and scalars stacked, 5 alone).
  assert len(sums) == 2 * 4
  assert sorted(e.invars[0].aval.shape for e in sums)[:2] == [(2, 1)] * 2
  norm = jax.make_jaxpr(agc.global_norm)(grads)
  assert sum(e.primitive.name == "reduce_sum" for e in norm.eqns) == 4 + 1
  # And the same results as leaf by leaf.
  out, _ = jax.jit(transform.update)(grads, optax.EmptyState(), params)
  clip = jax.jit(agc.unitwise_clip)
  for m in grads:
    for name in grads[m]:
      np.testing.assert_array_equal(
          out[m][name], clip(grads[m][name], params[m][name], 0.05)
      )
  np.testing.assert_allclose(
      agc.global_norm(grads),
      optax.global_norm(grads),
      rtol=1e-6,
  )


def test_update_rejects_mismatched_shapes_naming_the_parameter():
  grads, params = random_tree(5)
  grads["net/~/conv"]["w"] = grads["net/~/conv"]["w"][..., :3]
  transform = agc.adaptive_grad_clip(0.05)
  with pytest.raises(ValueError, match="net/~/conv/w"):
    transform.update(grads, optax.EmptyState(), params)


def test_global_norm_matches_optax():
  grads, _ = random_tree(6)
  grads["net/~/conv"]["w"] = grads["net/~/conv"]["w"].astype(jnp.bfloat16)
  want = optax.global_norm(
      jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), grads)
  )
  got = jax.jit(agc.global_norm)(grads)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert agc.global_norm({}) == 0.0


def test_matches_optax_where_layouts_agree():
  rng = np.random.default_rng(1)
  # Ranks 1 (more than one element), 2, 4 and 5: the layouts optax shares.
  shapes = {
      "v": (9,),
      "linear": (8, 5),
      "conv": (3, 3, 4, 6),
      "conv3d": (2, 2, 3, 3, 4),
  }
  params = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
  grads = {
      k: (
          (rng.normal(size=s) * 10.0 ** rng.uniform(-3, 1, size=s[-1])).astype(
              np.float32
          )
      )
      for k, s in shapes.items()
  }
  ours, _ = agc.adaptive_grad_clip(0.02, exclude=()).update(
      grads, optax.EmptyState(), params
  )
  theirs, _ = optax.adaptive_grad_clip(0.02).update(
      grads, optax.EmptyState(), params
  )
  for k in shapes:
    np.testing.assert_allclose(ours[k], theirs[k], rtol=1e-6, err_msg=k)
    assert np.any(np.asarray(ours[k]) != grads[k]), k  # Something clipped.


def test_rank3_units_on_last_axis_unlike_optax():
  # Documented difference: optax treats rank 3 as multi-head [in, heads, dim].
  x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
  norms = agc.unitwise_norm(x)
  assert norms.shape == (1, 1, 4)
  np.testing.assert_allclose(
      norms[0, 0], np.sqrt((x.reshape(6, 4) ** 2).sum(0)), rtol=1e-6
  )
  theirs = optax.transforms.unitwise_norm(x)
  assert theirs.shape == x.shape
  assert not np.allclose(np.broadcast_to(norms, x.shape), theirs)


@pytest.mark.parametrize(
    "shape, norm_shape",
    [
        ((), ()),
        ((5,), (1,)),
        ((4, 3), (1, 3)),
        ((1, 3), (1, 3)),
        ((2, 2, 3, 5), (1, 1, 1, 5)),
        ((1, 2, 2, 2, 3, 4), (1, 1, 1, 1, 1, 4)),
    ],
)
def test_unitwise_norm_shapes_and_values(shape, norm_shape):
  x = np.random.default_rng(2).normal(size=shape).astype(np.float32)
  norms = agc.unitwise_norm(x)
  assert norms.shape == norm_shape
  assert norms.dtype == jnp.float32
  if len(shape) <= 1:
    expected = np.sqrt(np.sum(x**2))
  else:
    expected = np.sqrt(np.sum(x.reshape(-1, shape[-1]) ** 2, axis=0))
  np.testing.assert_allclose(np.ravel(norms), np.ravel(expected), rtol=1e-6)


def test_clipped_units_sit_on_threshold_and_clipping_is_idempotent():
  grads, params = random_tree(3)
  clipping, eps = 0.03, 1e-3
  transform = agc.adaptive_grad_clip(clipping, eps, exclude=())
  once, _ = transform.update(grads, optax.EmptyState(), params)
  twice, _ = transform.update(once, optax.EmptyState(), params)
  num_clipped_units = 0
  for module in grads:
    for name in grads[module]:
      grad, param = grads[module][name], params[module][name]
      g_norm = np.asarray(agc.unitwise_norm(grad))
      max_norm = clipping * np.maximum(
          np.asarray(agc.unitwise_norm(param)), eps
      )
      new_norm = np.asarray(agc.unitwise_norm(once[module][name]))
      clipped = g_norm > max_norm
      num_clipped_units += int(clipped.sum())
      np.testing.assert_allclose(
          new_norm[clipped], max_norm[clipped], rtol=1e-5
      )
      kept = np.broadcast_to(~clipped, grad.shape)
      np.testing.assert_array_equal(
          np.asarray(once[module][name])[kept], grad[kept]
      )
      np.testing.assert_allclose(
          twice[module][name], once[module][name], rtol=1e-6, atol=0
      )
  assert num_clipped_units >= 5


def test_low_precision_grads_keep_dtype_and_use_float32_norms():
  rng = np.random.default_rng(4)
  param = rng.normal(size=(3, 3, 8, 16)).astype(np.float32)
  grad = (rng.normal(size=param.shape) * 100).astype(jnp.bfloat16)
  out = agc.unitwise_clip(grad, param, 0.01)
  assert out.dtype == jnp.bfloat16
  expected = numpy_clip_leaf(np.asarray(grad, np.float32), param, 0.01, 1e-3)
  # bf16 keeps 8 bits of mantissa: the result is the reference rounded once.
  np.testing.assert_allclose(np.asarray(out, np.float32), expected, rtol=1e-2)
  # float16 squares overflow above ~256 (max 65504); float32 norms do not.
  big = jnp.full((4, 2), 1000.0, jnp.float16)
  out = agc.unitwise_clip(big, np.ones((4, 2), np.float32), 0.01)
  assert out.dtype == jnp.float16
  np.testing.assert_allclose(
      np.asarray(agc.unitwise_norm(out)), 0.01 * 2.0, rtol=1e-3
  )


def test_update_without_params_raises():
  transform = agc.adaptive_grad_clip(0.01)
  grads = {"a": jnp.ones(3)}
  with pytest.raises(ValueError, match="needs the parameters"):
    transform.update(grads, transform.init(grads))


@pytest.mark.parametrize("clipping", [0.0, -0.01, "auto"])
def test_bad_clipping_raises(clipping):
  with pytest.raises(ValueError, match=re.escape(repr(clipping))):
    agc.adaptive_grad_clip(clipping)


def test_bad_exclude_pattern_raises():
  with pytest.raises(ValueError, match=re.escape("'linear/(w'")):
    agc.adaptive_grad_clip(0.01, exclude=("linear/(w",))


def test_default_mask_on_nfnet_f0_excludes_only_classifier_weight():
  params = reference_utils.zeros_tree("nfnet_f0")
  mask = agc.clipping_mask(params)
  not_clipped = flat_paths(params, jax.tree.map(lambda m: not m, mask))
  assert not_clipped == ["NFNet/~/linear/w"]
  clipped = flat_paths(params, mask)
  assert "NFNet/~/linear/b" in clipped
  se_weights = [
      p for p in clipped if re.search(r"squeeze_excite/~/linear(_1)?/w$", p)
  ]
  assert len(se_weights) == 2 * 12  # Two SE linears in each of 12 blocks.
  assert len(clipped) + 1 == len(jax.tree.leaves(params))


def test_exclusion_is_by_path_not_by_order():
  params = {
      "b_net/~/linear": {"w": np.ones((2, 2), np.float32)},
      "a_net/~/conv": {"w": np.ones((1, 1, 2, 2), np.float32)},
  }
  grads = jax.tree.map(lambda p: 100.0 * p, params)
  out, _ = agc.adaptive_grad_clip(0.01).update(
      grads, optax.EmptyState(), params
  )
  np.testing.assert_array_equal(out["b_net/~/linear"]["w"], 100.0)
  assert np.all(np.asarray(out["a_net/~/conv"]["w"]) < 1.0)
  # A callable and generic (list / nested) pytrees work too.
  tree = [{"x": np.ones(3, np.float32)}, np.ones((2, 2), np.float32)]
  out, _ = agc.adaptive_grad_clip(0.01, exclude=lambda p: p == "1").update(
      jax.tree.map(lambda p: 100.0 * p, tree), optax.EmptyState(), tree
  )
  np.testing.assert_array_equal(out[1], 100.0)
  np.testing.assert_allclose(
      np.linalg.norm(out[0]["x"]), 0.01 * np.sqrt(3.0), rtol=1e-6
  )


def test_clipped_fraction_counts_units_of_included_params():
  params = {
      # 4 units for the kernel, 1 for the (zero) bias.
      "net/~/conv": {
          "w": np.ones((1, 1, 1, 4), np.float32),
          "bias": np.zeros((4,), np.float32),
      },
      "net/~/linear": {"w": np.ones((2, 3), np.float32)},  # Excluded.
  }
  grads = {
      # Units 0 and 1 above 0.1 * 1, units 2 and 3 below.
      "net/~/conv": {
          "w": np.array([1.0, 0.5, 0.05, 0.0], np.float32).reshape(1, 1, 1, 4),
          # Above 0.1 * eps.
          "bias": np.full((4,), 1e-3, np.float32),
      },
      "net/~/linear": {"w": np.full((2, 3), 100.0, np.float32)},
  }
  fraction = jax.jit(lambda g, p: agc.clipped_fraction(g, p, 0.1))(
      grads, params
  )
  assert fraction.dtype == jnp.float32
  np.testing.assert_allclose(fraction, 3.0 / 5.0, rtol=1e-6)
  # Including the linear (3 more units, all clipped).
  np.testing.assert_allclose(
      agc.clipped_fraction(grads, params, 0.1, exclude=None),
      6.0 / 8.0,
      rtol=1e-6,
  )
  # Nothing included.
  assert agc.clipped_fraction(grads, params, 0.1, exclude=".") == 0.0


def test_clipping_for_batch_size_table():
  assert agc.clipping_for_batch_size(4096) == 0.01
  assert agc.clipping_for_batch_size(1024) == 0.01
  assert agc.clipping_for_batch_size(2048) == 0.01
  assert agc.clipping_for_batch_size(8192) == 0.01  # Above: largest entry.
  assert agc.clipping_for_batch_size(256) == 0.04
  assert agc.clipping_for_batch_size(512) == 0.02
  # In between: the next larger batch's entry.
  assert agc.clipping_for_batch_size(257) == 0.02
  assert agc.clipping_for_batch_size(600) == 0.01
  assert agc.clipping_for_batch_size(8) == 0.04
  table = {100: 0.16, 400: 0.08}
  assert agc.clipping_for_batch_size(101, table) == 0.08
  assert agc.clipping_for_batch_size(100, table) == 0.16
  assert agc.clipping_for_batch_size(1000, table) == 0.08
  # Smaller batches never get a smaller lambda.
  batches = [1, 64, 256, 300, 512, 1000, 1024, 4096, 10_000]
  values = [agc.clipping_for_batch_size(b) for b in batches]
  assert values == sorted(values, reverse=True)


@pytest.mark.parametrize("batch_size", [0, -256])
def test_clipping_for_batch_size_rejects_bad_batch(batch_size):
  with pytest.raises(ValueError, match=str(batch_size)):
    agc.clipping_for_batch_size(batch_size)


def test_clipping_for_batch_size_rejects_bad_table():
  with pytest.raises(ValueError, match="-0.5"):
    agc.clipping_for_batch_size(256, {256: 0.04, 512: -0.5})
  with pytest.raises(ValueError, match="0.0"):
    agc.clipping_for_batch_size(256, {256: 0.0})
