"""Shared fixtures; the plain helpers and case tables they use are in ``cases.py``."""

from __future__ import annotations

import os

# One BLAS thread per process in tests: the suite starts Dask workers, notebook kernels and
# CLI subprocesses beside the test process, and multithreaded OpenBLAS spin-waits badly when
# they share 2 cores. Subprocesses inherit the setting.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from cases import DIGITS_CASES  # noqa: E402


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@pytest.fixture(scope="session")
def problems():
    """The trained digits GNHs of ``cases.DIGITS_CASES``, built on first use and kept for
    the session: name -> (gn, dense G, ‖G‖₂)."""
    cache = {}

    def get(name):
        if name not in cache:
            gn = DIGITS_CASES[name]()
            G = gn.dense()
            cache[name] = (gn, G, float(np.linalg.norm(G, 2)))
        return cache[name]
    return get

