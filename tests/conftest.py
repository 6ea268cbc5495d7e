"""Shared test fixtures.

x64 is on for the whole suite so comparisons with scipy can use tight tolerances; float32
paths are tested explicitly where they matter.
"""

from __future__ import annotations

import os
from pathlib import Path

# Keep XLA to the CPU share of this process and quiet: the suite runs on 2 cores.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import dask  # noqa: E402
import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "spectra"


@pytest.fixture(scope="session")
def shared_spectra() -> Path:
    """The real spectra folder ``../shared/data/spectra``; skips when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real spectra not found: {SHARED_DATA} (place ../shared/data/spectra beside the project)")
    return SHARED_DATA


@pytest.fixture
def synchronous():
    """Dask's synchronous scheduler for one test (modules that want it for every test use
    ``pytestmark = pytest.mark.usefixtures("synchronous")``)."""
    with dask.config.set(scheduler="synchronous"):
        yield
