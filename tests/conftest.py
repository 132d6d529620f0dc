"""Shared test helpers."""

import os
from pathlib import Path

import pytest

# Tests must not grab every core of a shared CI machine for intra-op threads.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")

REAL_TARBALL = Path(__file__).resolve().parents[1].parent / "shared/data/omniglot/omniglot.tar.gz"


@pytest.fixture
def real_tarball() -> Path:
  """The real Omniglot archive in ``../shared`` (always there in CI); skips the test where it is not."""
  if not REAL_TARBALL.is_file():
    pytest.skip(f"real Omniglot archive not found at {REAL_TARBALL}")
  return REAL_TARBALL
