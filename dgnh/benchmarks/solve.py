"""``dgnh bench solve``: solves with ``G + λI`` on trained digits GNHs, all routes in one run.

For digits classifiers of growing width (trained by scikit-learn on the first
``--n-samples`` digits, tanh, softmax cross-entropy; N from about 5k to 26k) and ``λ = 1e-3‖G‖`` and ``1e-6‖G‖``, the
right-hand side ``b = ∇L`` (a Gauss–Newton step) is solved by:

* ``dense``: Cholesky of the dense ``G + λI`` (only for ``N <= --dense-max``);
* ``dual``: the exact dual route through ``ĴĴᵀ + nλI`` (:func:`dgnh.exact_solve.dual_factorize`);
* ``<method> direct``: the factorization of the compressed ``H + λI`` (``dgnh.compress``);
* ``cg none`` / ``cg diagonal`` / ``cg <method>``: CG on the exact GNH products to a
  ``1e-8`` relative residual, without preconditioner, with Jacobi, and with the
  compressed factorization as preconditioner.

Columns: memory of the factorization or preconditioner (MiB), set-up and solve
times (s) and their sum relative to the dual route, CG iterations, the true relative residual
``‖b − (G + λI)x‖/‖b‖`` (exact products), the forward error against the dense
solution (or the dual one where the dense matrix is not formed), and the
relative log-determinant error against the same reference.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import scipy.linalg

from ..compress import compress
from ..exact_solve import dual_factorize
from ..solve import cg
from ..spectral import eigsh
from .common import print_table
from .compress import digits_gnh


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def _dense_route(G: np.ndarray, lam: float, b: np.ndarray) -> tuple:
    """Cholesky of the dense ``G + λI``: (setup s, solve s, "-", x, logdet, bytes)."""
    def factor():
        return scipy.linalg.cho_factor(G + lam * np.eye(len(G)), lower=True, overwrite_a=True)
    chol, t_setup = _timed(factor)
    x, t_solve = _timed(lambda: scipy.linalg.cho_solve(chol, b))
    return (t_setup, t_solve, "-", x, 2 * float(np.sum(np.log(np.diag(chol[0])))),
            chol[0].nbytes)


def _factorization_route(make, b: np.ndarray) -> tuple:
    """The factorization ``make()`` and its row (setup s, solve s, "-", x, logdet, bytes)."""
    f, t_setup = _timed(make)
    x, t_solve = _timed(lambda: f.solve(b))
    return f, (t_setup, t_solve, "-", x, f.logdet(), f.nbytes)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="dgnh bench solve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", nargs="+", default=["64", "64x64", "96x96", "128x128"],
                    help="hidden layer widths per network, e.g. 128x128")
    ap.add_argument("--n-samples", type=int, default=500,
                    help="data rows of the GNH (n·d = 10·n is the dual size)")
    ap.add_argument("--lambdas", type=float, nargs="+", default=[1e-3, 1e-6],
                    help="λ relative to ‖G‖₂")
    ap.add_argument("--method", default="lowrank", help="dgnh.compress method")
    ap.add_argument("--tol", type=float, default=1e-3, help="compression tolerance")
    ap.add_argument("--max-rank", type=int, default=256)
    ap.add_argument("--dense-max", type=int, default=5000, help="largest N solved densely")
    ap.add_argument("--maxiter", type=int, default=3000, help="CG iteration cap")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    rows = []
    for spec in args.hidden:
        hidden = tuple(int(h) for h in spec.split("x"))
        gn = digits_gnh("classifier", hidden, args.n_samples, max_iter=100, seed=args.seed)
        N = gn.n_params
        b = gn.gradient()
        (vals, _), t_norm = _timed(lambda: eigsh(gn, 1, seed=args.seed))
        norm = float(vals[0])
        H, t_compress = _timed(lambda: compress(gn, method=args.method, tol=args.tol,
                                                max_rank=args.max_rank, seed=args.seed,
                                                progress=False))
        G, t_dense = _timed(gn.dense) if N <= args.dense_max else (None, 0.0)
        print(f"network 64-{spec.replace('x', '-')}-10: N = {N}, n·d = "
              f"{gn.n_samples * gn.model.n_outputs}, ‖G‖ = {norm:.3e} ({t_norm:.1f} s by "
              f"Lanczos), {args.method}: rank {H.report.get('rank', '-')}, estimated error "
              f"{H.report['error_estimate']:.1e}, {H.nbytes / 2**20:.1f} MiB in {t_compress:.1f} s"
              + (f", dense G formed in {t_dense:.1f} s" if G is not None else ""))
        for rel in args.lambdas:
            lam = rel * norm
            found = {}  # route -> (setup s, solve s, iterations, x, logdet, bytes)
            if G is not None:
                found["dense"] = _dense_route(G, lam, b)
            _, found["dual"] = _factorization_route(lambda: dual_factorize(gn, lam), b)
            F, found[f"{args.method} direct"] = _factorization_route(lambda: H.factorize(lam), b)
            t_setup = found[f"{args.method} direct"][0]
            for name, pre, nbytes in (("none", None, 0), ("diagonal", "diagonal", 8 * N),
                                      (args.method, F, F.nbytes)):
                res, t_solve = _timed(lambda: cg(gn, b, lam, preconditioner=pre, rtol=1e-8,
                                                 maxiter=args.maxiter))
                its = res.n_iter if res.converged else f">{res.n_iter}"
                found[f"cg {name}"] = (t_setup if pre is F else 0.0, t_solve, its, res.x, None,
                                       nbytes)
            ref_x, ref_logdet = found["dense" if "dense" in found else "dual"][3:5]
            t_dual = sum(found["dual"][:2])
            X = np.stack([v[3] for v in found.values()], axis=1)
            resid = np.linalg.norm(b[:, None] - gn @ X - lam * X, axis=0) / np.linalg.norm(b)
            for (route, (t_setup, t_solve, its, x, logdet, nbytes)), r in zip(found.items(),
                                                                              resid):
                fwd = np.linalg.norm(x - ref_x) / np.linalg.norm(ref_x)
                ld = "-" if logdet is None else abs(logdet - ref_logdet) / abs(ref_logdet)
                rows.append([N, f"{rel:.0e}", route, nbytes / 2**20, t_setup, t_solve,
                             (t_setup + t_solve) / t_dual, its, float(r), float(fwd), ld])
        gn.close()
    print_table(
        "Solving (G + λI) x = ∇L on trained digits GNHs (same run; errors against the "
        "dense solve, or the dual one where N > dense-max)",
        ["N", "λ/‖G‖", "route", "MiB", "setup s", "solve s", "t/dual", "CG its", "residual",
         "fwd err", "logdet err"], rows)
    return 0
