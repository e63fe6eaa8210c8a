"""Test set-up: 8 simulated CPU devices (SyncBN / data-parallel tests) and
paths to the offline datasets in ../shared/data."""
import contextlib
import importlib.util
import os
import pathlib
import sys

# Must be set before JAX initialises its backends. Appended to XLA_FLAGS so
# that the suite can run under other XLA flags (e.g. XLA_FLAGS=
# --xla_cpu_max_isa=SSE4_2, issue 13) and still see 8 simulated devices.
_xla_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _xla_flags:
  os.environ["XLA_FLAGS"] = (
      _xla_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def train():
  """The top-level train.py as a module, loaded once per process (it defines
  absl flags, which may be defined only once)."""
  if "train" not in sys.modules:
    spec = importlib.util.spec_from_file_location("train", REPO / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["train"] = module
  return sys.modules["train"]


@pytest.fixture(scope="session")
def shared_data_dir() -> pathlib.Path:
  """``../shared/data`` beside the repository; skips (saying why) if absent."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f"offline datasets not found at {SHARED_DATA} (the project's "
                "shared/ folder is not beside this checkout)")
  return SHARED_DATA


@contextlib.contextmanager
def _unoptimized_xla():
  """XLA skips most optimization passes (``jax_disable_most_optimizations``):
  for tests whose time is compiling tiny models (smoke and end-to-end tests,
  ~2.5x less time; what they check -- finiteness, shapes, state plumbing --
  does not depend on it).

  The flag is not part of JAX's compilation cache key, so on exit it is
  restored and every compilation cache cleared: no unoptimized executable
  outlives the block (numerical tests elsewhere see optimized code).
  """
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", previous)
    jax.clear_caches()


@pytest.fixture
def unoptimized_compilation():
  """One test compiled without most XLA optimizations (see above)."""
  with _unoptimized_xla():
    yield


@pytest.fixture(scope="module")
def unoptimized_compilation_module():
  """A whole test module compiled without most XLA optimizations."""
  with _unoptimized_xla():
    yield
