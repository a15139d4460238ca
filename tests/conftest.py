"""Test setup: eight fake CPU devices, so sharded code is exercised on one machine.

The flag must be set before JAX initialises its backend, hence at import time.
"""
import os

os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"])

import pathlib  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

# Many tests compile the same programs (a resumed run recompiles what the
# straight run compiled). A session-wide persistent cache lets the repeats load
# the executable instead; it starts empty, so nothing leaks between sessions.
# The pytest-xdist workers start after this module ran in the controller and
# inherit its environment, so they all share the controller's cache; so do the
# command lines that tests run as subprocesses, through JAX's own variables.
_CACHE_VARIABLE = "FER_JAX_TEST_XLA_CACHE"
os.environ.setdefault(_CACHE_VARIABLE, tempfile.mkdtemp(prefix="fer_jax_xla_cache_"))
os.environ.update(JAX_COMPILATION_CACHE_DIR=os.environ[_CACHE_VARIABLE],
                  JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
# In this process JAX may have been imported (by a plugin) before the variables were set.
jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_VARIABLE])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def pytest_sessionfinish(session, exitstatus):
  if not hasattr(session.config, "workerinput"):  # the controller, or a run without workers
    shutil.rmtree(os.environ[_CACHE_VARIABLE], ignore_errors=True)

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
  """The real datasets beside the checkout (../shared/data); skips when absent."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f"real data not found at {SHARED_DATA}")
  return SHARED_DATA
