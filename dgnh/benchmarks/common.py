"""Shared pieces of the benchmarks: timing, GEMM reference rate, table printing."""

from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np

from ..model import MLP


def best_time(fn: Callable[[], object], repeat: int = 3) -> float:
    """Best wall time of ``repeat`` calls (after one warm-up call)."""
    fn()
    best = np.inf
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def gemm_rate(k: int, m: int, inner: int, dtype=np.float64, seed: int = 0) -> float:
    """This machine's numpy GEMM rate (GFLOP/s) for ``(k, inner) @ (inner, m)``."""
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(k, inner)).astype(dtype)
    B = rng.normal(size=(m, inner)).astype(dtype)
    return 2.0 * k * m * inner / best_time(lambda: A @ B.T) / 1e9


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print a plain-text table with aligned columns."""
    cells = [list(map(str, header))] + [[_fmt(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    for j, r in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


def random_tanh_mlp(rng: np.random.Generator, sizes: Sequence[int]) -> MLP:
    """A random tanh MLP (identity output) with 1/√fan-in weights."""
    Ws = [rng.normal(scale=1 / np.sqrt(a), size=(b, a)) for a, b in zip(sizes[:-1], sizes[1:])]
    bs = [rng.normal(scale=0.1, size=b) for b in sizes[1:]]
    return MLP(Ws, bs, ["tanh"] * (len(sizes) - 2) + ["identity"])


def synthetic_classifier(rng: np.random.Generator, n_samples: int, hidden: int,
                         n_classes: int = 10, n_inputs: int = 64):
    """``(sizes, net, X, y)``: a random 2-hidden-layer tanh net on Gaussian data with labels."""
    sizes = [n_inputs, hidden, hidden, n_classes]
    net = random_tanh_mlp(rng, sizes)
    return (sizes, net, rng.normal(size=(n_samples, n_inputs)),
            rng.integers(0, n_classes, size=n_samples))
