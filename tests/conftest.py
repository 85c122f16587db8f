"""Test set-up: 8 fake CPU devices and fast compiles, set before JAX starts."""

import os
import sys
import tempfile

# Tests import the repository's packages (nfnets, configs) from its root, and
# the helpers beside this file.
_TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_TESTS))
sys.path.insert(0, _TESTS)

import processes  # pylint: disable=g-import-not-at-top,wrong-import-position

# Must run before the first `import jax`: XLA reads the flags once, at start-up.
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), processes.xla_flags(8)]
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Compiled programs are cached on disk and shared by the test processes (and
# the runs they launch): the runner's tests compile the same step many times.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(tempfile.gettempdir(), "nfnets_jax_test_cache"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
