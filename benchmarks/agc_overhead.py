"""Time overhead of Adaptive Gradient Clipping in a real train step.

Runs the same model's full train step (forward, backward, optimizer update)
with and without AGC in one process, alternating the two so that drift in
the machine's speed hits both alike, and prints ONE JSON line with the median
step times and their ratio (with / without).

    python benchmarks/agc_overhead.py                 # defaults for the device
    python benchmarks/agc_overhead.py --model=nfnet_f1 --batch=64 --steps=50

Defaults: on an accelerator, nfnet_f0 at 192 px, batch 128, bfloat16; on CPU,
nfnet_tiny (the NFNet architecture at widths 32-128, one block per stage) at
32 px, batch 8, float32 (about 40 s on two CPU cores).
Both steps use the paper's SGD chain (`nfnets.optim.create_optimizer`); they
differ only in `agc.clipping` (0.01 vs None).
"""

import argparse
import json
import os
import statistics
import sys
import time

import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

# Run as a script from the repository root: make `nfnets` importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nfnets import agc  # pylint: disable=g-import-not-at-top
from nfnets import models  # pylint: disable=g-import-not-at-top
from nfnets import optim  # pylint: disable=g-import-not-at-top

_ACCELERATOR_DEFAULTS = dict(
    model="nfnet_f0", batch=128, image_size=192, dtype="bfloat16"
)
_CPU_DEFAULTS = dict(
    model="nfnet_tiny", batch=8, image_size=32, dtype="float32"
)
_DTYPES = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
}
_NUM_CLASSES = 1000
_CLIPPING = 0.01


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", help="registry name (nfnets.models.names())")
  parser.add_argument("--batch", type=int, help="batch size")
  parser.add_argument("--image_size", type=int, help="square input side")
  parser.add_argument(
      "--dtype",
      choices=sorted(_DTYPES),
      help="activation dtype (params stay float32)",
  )
  parser.add_argument(
      "--steps",
      type=int,
      default=20,
      help="timed steps per variant (>= 1; median reported)",
  )
  parser.add_argument(
      "--warmup",
      type=int,
      default=2,
      help="untimed steps per variant after compilation",
  )
  args = parser.parse_args(argv)
  defaults = (
      _CPU_DEFAULTS if jax.default_backend() == "cpu" else _ACCELERATOR_DEFAULTS
  )
  for key, value in defaults.items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  for key in ("batch", "image_size", "steps"):
    if getattr(args, key) < 1:
      parser.error(f"--{key} must be >= 1, got {getattr(args, key)}")
  return args


def optimizer_config(clipping):
  return ml_collections.ConfigDict(
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
              "clipping": clipping,
              "eps": 1e-3,
              "exclude": agc.DEFAULT_EXCLUDE,
          },
      }
  )


def make_train_step(forward, optimizer, dtype):
  """A jitted step: loss, grads, optimizer update (state donated)."""

  def loss_fn(params, state, rng, images, labels):
    logits, state = forward.apply(
        params, state, rng, images.astype(dtype), is_training=True
    )
    logits = logits.astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return loss.mean(), state

  def train_step(params, state, opt_state, rng, images, labels):
    (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, state, rng, images, labels
    )
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), state, opt_state, loss

  return jax.jit(train_step, donate_argnums=(0, 1, 2))


def main(argv=None):
  args = parse_args(argv)
  dtype = _DTYPES[args.dtype]

  def forward_fn(x, is_training):
    model = models.create(args.model, num_classes=_NUM_CLASSES)
    return model(x, is_training=is_training)

  forward = hk.transform_with_state(forward_fn)
  rng = np.random.default_rng(0)
  images = jnp.asarray(
      rng.normal(size=(args.batch, args.image_size, args.image_size, 3)),
      jnp.float32,
  )
  labels = jnp.asarray(rng.integers(0, _NUM_CLASSES, size=(args.batch,)))
  params, state = forward.init(jax.random.PRNGKey(0), images, is_training=True)
  num_params = int(sum(p.size for p in jax.tree.leaves(params)))

  total_steps = args.warmup + args.steps + 10
  variants = {}
  for key, clipping in (("with_agc", _CLIPPING), ("without_agc", None)):
    optimizer = optim.create_optimizer(
        optimizer_config(clipping),
        batch_size=args.batch,
        total_steps=total_steps,
        warmup_steps=1,
    )
    # Each variant owns its buffers: the steps donate them.
    copy = lambda t: jax.tree.map(jnp.copy, t)
    variants[key] = dict(
        step=make_train_step(forward, optimizer, dtype),
        carry=(copy(params), copy(state), optimizer.init(params)),
        times=[],
    )

  def run(variant, i):
    rng_i = jax.random.fold_in(jax.random.PRNGKey(1), i)
    start = time.perf_counter()
    *carry, loss = variant["step"](*variant["carry"], rng_i, images, labels)
    jax.block_until_ready((carry, loss))
    variant["carry"] = tuple(carry)
    return time.perf_counter() - start, float(loss)

  for variant in variants.values():
    for i in range(1 + args.warmup):  # The first call compiles.
      _, loss = run(variant, i)
      if not np.isfinite(loss):
        raise FloatingPointError(f"Non-finite loss {loss} during warm-up.")

  order = list(variants.values())
  for i in range(args.steps):
    # Alternate which variant goes first, so neither always follows the other.
    for variant in (order if i % 2 == 0 else order[::-1]):
      seconds, _ = run(variant, args.warmup + 1 + i)
      variant["times"].append(seconds)

  with_ms = 1e3 * statistics.median(variants["with_agc"]["times"])
  without_ms = 1e3 * statistics.median(variants["without_agc"]["times"])
  device = jax.devices()[0]
  print(
      json.dumps(
          {
              "benchmark": "agc_overhead",
              "model": args.model,
              "num_params": num_params,
              "batch": args.batch,
              "image_size": args.image_size,
              "dtype": args.dtype,
              "steps": args.steps,
              "clipping": _CLIPPING,
              "with_agc_ms": round(with_ms, 3),
              "without_agc_ms": round(without_ms, 3),
              "ratio": round(with_ms / without_ms, 4),
              "device_kind": device.device_kind,
              "platform": device.platform,
              "jax_version": jax.__version__,
          }
      )
  )


if __name__ == "__main__":
  main()
