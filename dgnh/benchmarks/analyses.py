"""``dgnh bench analyses``: Laplace evidence, influence and OBS saliencies at large N.

For each network size N (a random 64-h-h-10 tanh classifier on Gaussian data with
``--samples`` points, default 100): the optimised Laplace log evidence (route and
certified error bound), the influence of every training point on ``--queries``
query points (default 1: 100 scores) and the OBS saliencies of all N parameters,
each with its time and peak traced memory (``tracemalloc``). ``auto`` routes take
the exact side that fits the memory budget (here the ``n·d`` dual).
``--sizes 1e4,1e5,1e6`` gives the issue's three rows (1e6 needs a quiet machine
with some 20 GB). laplace-torch's ``hessian_structure="full"`` needs the
dense N × N GGN, 8·N² bytes in float64: printed beside, it cannot run past a few
1e4. Times are indicative (one run, a shared machine).
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np

from ..analyses import influence, obs_saliencies, optimize_prior_precision
from ..analyses.posterior import LAPLACE_ROUTES
from ..gauss_newton import GaussNewton
from .common import print_table, synthetic_classifier


def hidden_for(n_params: float) -> int:
    """The width ``h`` of a 64-h-h-10 MLP with about ``n_params`` parameters.

    Examples
    --------
    >>> hidden_for(1e5)
    280
    """
    # N = 64h + h + h² + h + 10h + 10 = h² + 76h + 10
    return max(1, int(round((-76 + np.sqrt(76**2 - 4 * (10 - n_params))) / 2)))


def measured(fn):
    """``(result, seconds, peak bytes)`` of one call of ``fn``."""
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        result = fn()
    finally:
        seconds = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return result, seconds, peak


def run_size(size: float, args: argparse.Namespace) -> list[list]:
    """The table rows of one network size."""
    rng = np.random.default_rng(args.seed)
    _, net, X, y = synthetic_classifier(rng, args.samples, hidden_for(size))
    N, mib = net.n_params, 2**20
    gn = GaussNewton(net, X, y, loss="cross_entropy", client="in-process")
    full = f"{8 * N**2 / 2**30:,.0f} GiB" if 8 * N**2 >= 2**30 else f"{8 * N**2 / mib:.0f} MiB"
    with gn:
        lap, t, peak = measured(lambda: optimize_prior_precision(gn, route=args.route))
        rows = [[N, "log evidence", t, peak / mib, lap.route,
                 f"{lap.log_marginal_likelihood:.6g} ± {lap.error_bound:.2g}", full]]
        lam = lap.prior_precision / gn.n_samples
        Xq, yq = rng.normal(size=(args.queries, X.shape[1])), rng.integers(0, 10, args.queries)
        inf, t, peak = measured(lambda: influence(gn, Xq, yq, lam))
        rows.append([N, f"influence ({inf.scores.size} scores)", t, peak / mib, inf.route,
                     f"error ≤ {inf.error_bound.max():.2g}", full])
        sal, t, peak = measured(lambda: obs_saliencies(gn, lam))
        rows.append([N, f"OBS saliencies ({N})", t, peak / mib, sal.route,
                     f"error ≤ {sal.error_bound:.2g}", full])
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="dgnh bench analyses", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1e4,1e5",
                    help="comma-separated network sizes N (default 1e4,1e5; the issue's: "
                         "1e4,1e5,1e6)")
    ap.add_argument("--samples", type=int, default=100, help="training points (default 100)")
    ap.add_argument("--queries", type=int, default=1, help="influence query points")
    ap.add_argument("--route", default="auto", choices=LAPLACE_ROUTES, help="Laplace route")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        sizes = [float(s) for s in args.sizes.split(",")]
    except ValueError:
        ap.error("--sizes takes comma-separated numbers")
    if not all(np.isfinite(s) and s >= 1e3 for s in sizes):
        ap.error("--sizes must be network sizes of at least 1e3")
    rows = [row for size in sizes for row in run_size(size, args)]
    print_table(f"analyses of a 64-h-h-10 tanh classifier, n = {args.samples} "
                "(laplace-torch full: the dense GGN it needs)",
                ["N", "analysis", "seconds", "peak MiB", "route", "certified", "laplace full"],
                rows)
    return 0
