"""Test set-up: 8 simulated CPU devices (SyncBN / data-parallel tests) and
paths to the offline datasets in ../shared/data."""
import os
import pathlib

# Must be set before JAX initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data_dir() -> pathlib.Path:
  """``../shared/data`` beside the repository; skips (saying why) if absent."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f"offline datasets not found at {SHARED_DATA} (the project's "
                "shared/ folder is not beside this checkout)")
  return SHARED_DATA
