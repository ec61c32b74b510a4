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


@pytest.fixture(autouse=True)
def sigint_handler_unchanged():
    """No test may leave the process's SIGINT disposition changed (an ignored SIGINT is
    inherited by every later subprocess: a ``dgnh run`` started by a later test would
    not stop on Ctrl-C)."""
    import signal

    before = signal.getsignal(signal.SIGINT)
    yield
    after = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, before)
    assert after is before, f"the test left SIGINT's handler as {after!r} (was {before!r})"
