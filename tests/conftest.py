"""Test set-up: 8 fake CPU devices and fast compiles, set before JAX starts."""

import os
import sys
import tempfile

import pytest

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


# Linux refuses new memory mappings past vm.max_map_count (65,530 by
# default); the compiled programs are dropped well before.
_MAPPINGS_LIMIT = 30_000


def _memory_mappings():
  """This process's memory mappings; 0 where /proc cannot say."""
  try:
    with open("/proc/self/maps", "rb") as f:
      return f.read().count(b"\n")
  except OSError:
    return 0


@pytest.fixture(autouse=True)
def release_compiled_programs():
  """Drops JAX's compiled programs after a test once they hold too much.

  Each program's CPU code keeps memory mappings (a tiny run's: ~2,000-6,000)
  for as long as JAX's caches keep the program. One test process runs
  dozens of them: test_train.py's tests reached 64,000 mappings in one
  worker, and the next compile crashed it at Linux's limit (a segfault in
  JAX's cache read). Dropped only past 30,000 mappings, the programs that
  the next tests share mostly stay compiled; those dropped come back from
  the on-disk compilation cache.
  """
  yield
  jax = sys.modules.get("jax")
  if jax is not None and _memory_mappings() > _MAPPINGS_LIMIT:
    jax.clear_caches()
