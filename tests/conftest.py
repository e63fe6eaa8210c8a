"""Test set-up: 8 simulated CPU devices (SyncBN / data-parallel tests) and
paths to the offline datasets in ../shared/data."""
import contextlib
import importlib.util
import os
import pathlib
import shutil
import sys
import tempfile

# Must be set before JAX initialises its backends. Appended to XLA_FLAGS so
# that the suite can run under other XLA flags (e.g. XLA_FLAGS=
# --xla_cpu_max_isa=SSE4_2, issue 13) and still see 8 simulated devices.
_xla_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _xla_flags:
  os.environ["XLA_FLAGS"] = (
      _xla_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# XLA:CPU's legacy (LLVM IR) fusion emitters instead of its newer MLIR fusion
# emitters, for compile time: more than half of the suite's time is XLA
# compiling many small programs, and with the legacy emitters the slowest
# compiling tests take 37% less time (tests/test_readme.py,
# test_santurkar_vgg_and_lp_smoke, the training case of VGG with CBN (now
# VGG with BN) and the lp norm's second-order check_grads: 77 s -> 48 s
# together, run alone without a cache). Both are XLA:CPU code generators
# for the same HLO, and the suite checks bn_jax's results against
# independent references with tolerances that do not depend on the code
# generator (the suite passes under either:
# benchmarks/RESULTS.md, "Test suite time"). Left alone when XLA_FLAGS
# already chooses, and BN_JAX_TEST_XLA_DEFAULTS=1 runs the suite with XLA's
# defaults (what a user's program gets).
if ("xla_cpu_use_fusion_emitters" not in os.environ["XLA_FLAGS"]
    and os.environ.get("BN_JAX_TEST_XLA_DEFAULTS", "0") in ("", "0")):
  os.environ["XLA_FLAGS"] += " --xla_cpu_use_fusion_emitters=false"

# One persistent XLA compilation cache for this run of the suite, shared by
# its processes: the xdist workers inherit the directory the first process
# (the controller, or the only process) creates here, and so do the train.py
# subprocesses (tests/test_train_cli.py passes it as --compilation_cache).
# Many tests compile the same programs (the same model, step or check in
# another test or worker, a killed run and its restart), and each worker
# compiles the same small op-by-op programs. It lives only as long
# as the run (removed in pytest_unconfigure), so no test ever loads an
# executable compiled by another version of the code, and a user's own
# JAX_COMPILATION_CACHE_DIR is left alone. The key of every entry holds the
# program, the compile options and the XLA flags, so a test compiled without
# XLA's optimizations (see _unoptimized_xla) never receives an optimized
# executable or the reverse (checked: the same function compiled with and
# without jax_disable_most_optimizations makes two entries). An entry cut
# short (a killed train.py, two workers writing one key) is read as a miss
# with a warning and compiled again.
_CACHE_ENV = "BN_JAX_TEST_COMPILATION_CACHE"
_created_cache = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  if _CACHE_ENV not in os.environ:
    _created_cache = tempfile.mkdtemp(prefix="bn_jax_test_xla_cache_")
    os.environ[_CACHE_ENV] = _created_cache
  os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ[_CACHE_ENV]
  # Every program, however small or fast to compile: most of the suite's
  # compilations are small programs.
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import jax  # noqa: E402
import pytest  # noqa: E402


# The slowest tests (8-35 s each on 2 cores), run first: pytest-xdist hands
# the remaining tests to whichever worker runs short of them, so short tests
# at the end fill both workers to the finish instead of one worker running a
# 30 s test alone. (Order only: a renamed test just loses its place.)
_SLOWEST_FIRST = (
    "test_train_cli.py::test_killed_and_restarted_run_equals_an_uninterrupted",
    "test_experiments_bn_santurkar.py::test_santurkar_vgg_and_lp_smoke",
    "test_experiments_cbn_rethinking.py::test_cbn_sweep_smoke",
    "test_experiments_bn_santurkar.py::test_santurkar_noise_smoke",
    "test_multistep.py::test_resume_is_bit_identical",
    "test_readme.py::test_readme_python_examples_run",
    "test_train_cli.py::test_resume_is_bit_identical_with_augmentation",
    "test_training.py::test_every_model_and_norm_trains_a_few_steps[vgg",
    "test_training.py::test_every_model_and_norm_trains_a_few_steps[resnet",
    "test_batch_norm.py::test_check_grads_train_eval_ghost_mask",
    "test_noisy_lp_frozen.py::test_noisy_check_grads_second_order",
    "test_noisy_lp_frozen.py::test_lp_norm_check_grads_second_order",
    "test_experiments_bn_santurkar.py::test_santurkar_dln_smoke",
    "test_device_pipeline.py::test_resume_is_bit_exact",
)


def pytest_collection_modifyitems(config, items):
  """Moves `_SLOWEST_FIRST` to the front (stable: the same order in every
  xdist worker, as xdist requires)."""
  del config

  def rank(item):
    nodeid = item.nodeid.split("tests/", 1)[-1]
    for i, prefix in enumerate(_SLOWEST_FIRST):
      if nodeid.startswith(prefix):
        return i
    return len(_SLOWEST_FIRST)
  items.sort(key=rank)


def pytest_unconfigure(config):
  """The process that created the run's compilation cache removes it."""
  del config
  if _created_cache:
    shutil.rmtree(_created_cache, ignore_errors=True)

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

  Not for numerical tests: with it, XLA:CPU (jax 0.10.2) computed a wrong
  VJP for ``jax.jit(lp_norm)`` with p=inf -- the forward program's output
  mask of jnp.max's argmax positions lost its 1 in one column while the
  count beside it said 1 -- so check_grads failed there (eager and
  optimized-jit results agree with finite differences). Gradient checks
  stay optimized.

  The flag is not part of the key of JAX's in-memory caches (it is of the
  persistent cache's, see above), so on exit it is
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
