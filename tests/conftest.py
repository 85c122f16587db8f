"""Test set-up: 8 fake CPU devices, set before JAX is imported anywhere."""

import os
import sys

# Must run before the first `import jax`: XLA reads the flag once, at start-up.
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""),
     "--xla_force_host_platform_device_count=8"]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Tests import the repository's packages (nfnets, configs) from its root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
