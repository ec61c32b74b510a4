"""``dgnh.compress``: compressed GNH operators with a measured error certificate (design.md §4).

Three representations, built from entries (exact or sampled) and, for the
H-matrix's randomized skeletonization, one round of exact GNH products:

* ``"lowrank"`` — :class:`~dgnh.lowrank.LowRank` ``UUᵀ`` by adaptive pivoted
  Cholesky, positive semi-definite;
* ``"hmatrix"`` — :class:`~dgnh.hmatrix.HMatrix` (HSS + near field);
* ``"hybrid"`` — :class:`Hybrid`: the low-rank part plus an H-matrix of the
  remainder ``G − UUᵀ`` (entries from :class:`RemainderSource`);
* ``"auto"`` — builds all three and returns the smallest in memory whose
  estimated error meets ``tol`` (else the most accurate); the candidates are
  recorded in ``report["candidates"]``.

Every result carries ``report["error_estimate"]`` ≈ ``‖G − H‖₂/‖G‖₂``, from
block Lanczos (:func:`estimate_norm`) on ``G − H`` with exact GNH products
``gn @ V``: Ritz values never exceed the true norm, and a few block steps get
within a small factor of it.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from .hmatrix import METRICS, HMatrix, build_hmatrix
from .hybrid import Hybrid, RemainderSource
from .lowrank import LowRank, pivoted_cholesky
from .operator import Operator
from .spectral import LANCZOS_STEPS, estimate_norm, ritz_values

Array = np.ndarray
METHODS = ("auto", "hmatrix", "lowrank", "hybrid")
INDEFINITE_PROOF = 1e-12  # a Ritz value below −this·‖G‖ proves H indefinite
# --------------------------------------------------------------------- validation
def _check_number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not np.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)


def check_parameters(method="auto", tol=1e-3, max_rank=256, leaf_size=256, budget=0.0,
                     neighbors=32, metric="angle", eps=None, seed=0) -> dict[str, Any]:
    """Validate the parameters of :func:`compress`; returns them normalised.

    Raises ``ValueError``/``TypeError`` naming the parameter and the allowed range.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}: choose one of {', '.join(METRICS)}")
    tol = _check_number(tol, "tol")
    if not 0 < tol < 1:
        raise ValueError(f"tol must lie in the open interval (0, 1), got {tol}")
    budget = _check_number(budget, "budget")
    if not 0 <= budget <= 1:
        raise ValueError(f"budget must lie in [0, 1] (fraction of leaves in the near field), "
                         f"got {budget}")
    if eps is not None:
        eps = _check_number(eps, "eps")
        if not 0 < eps < 1:
            raise ValueError(f"eps must lie in the open interval (0, 1) or be None (exact "
                             f"entries), got {eps}")
    return {"method": method, "tol": tol, "max_rank": _check_int(max_rank, "max_rank", 1),
            "leaf_size": _check_int(leaf_size, "leaf_size", 2), "budget": budget,
            "neighbors": _check_int(neighbors, "neighbors", 1), "metric": metric, "eps": eps,
            "seed": _check_int(seed, "seed", 0)}


# ------------------------------------------------------------------ error certificate
def relative_error(gn, approx: Operator, norm_G: float, seed: int = 0) -> float:
    """Estimated ``‖G − H‖₂/‖G‖₂`` from exact products ``gn @ V`` (:func:`estimate_norm`)."""
    if norm_G <= 0:
        return 0.0
    err = estimate_norm(lambda V: gn @ V - approx @ V, gn.n_params, seed=seed,
                        support=np.asarray(gn.diagonal()) > 0)
    return err / norm_G


# ------------------------------------------------------------------------ compress
def compress(gn, method: str = "auto", tol: float = 1e-3, max_rank: int = 256,
             leaf_size: int = 256, budget: float = 0.0, neighbors: int = 32,
             metric: str = "angle", eps: float | None = None, seed: int = 0, *,
             progress: bool | None = None) -> Operator:
    """Compress the GNH ``gn`` and certify the error with exact products.

    Parameters
    ----------
    gn : GaussNewton
        Or any operator with ``n_params``, ``diagonal()``, ``entries_many`` and
        exact products ``gn @ V`` (used only for the error certificate).
    method : ``"auto"``, ``"hmatrix"``, ``"lowrank"`` or ``"hybrid"`` (see module doc).
    tol : relative tolerance in (0, 1): of each interpolative decomposition
        (H-matrix) and of the pivoted-Cholesky stopping rule (low rank).
    max_rank : cap on every skeleton and on the low-rank rank (>= 1).
    leaf_size : largest leaf of the cluster tree (>= 2).
    budget : near-field budget in [0, 1]; 0 gives HSS.
    neighbors : approximate nearest neighbours per parameter (>= 1).
    metric : ``"angle"`` (``1 − G_ab²/(G_aa G_bb)``) or ``"gram"``.
    eps : ``None`` for exact entries, else sampled entries with per-entry accuracy
        ``eps`` in (0, 1) (design.md §3).
    seed : seeds every random choice; the same seed gives the same result.
    progress : progress bars (``None``: only on a terminal).

    Returns
    -------
    HMatrix, LowRank or Hybrid
        With ``report``: method, all parameters and the seed, timings per phase,
        entries evaluated, memory (``nbytes``, ``memory_fraction`` of dense),
        rank statistics, ``norm_estimate`` (‖G‖₂), ``error_estimate``
        (‖G − H‖₂/‖G‖₂), ``tol_met``, ``min_eigenvalue_estimate`` (smallest
        Ritz value of H over ‖G‖₂, an upper bound on λ_min(H)/‖G‖₂) and
        ``indefinite`` (True when that proves a negative eigenvalue: then
        ``factorize(reg)`` fails for ``reg`` below about ``−λ_min``);
        ``"auto"`` adds ``candidates``.

    Examples
    --------
    >>> import numpy as np, dgnh
    >>> rng = np.random.default_rng(0)
    >>> net = dgnh.MLP([rng.normal(size=(16, 4)), rng.normal(size=(3, 16))],
    ...                [np.zeros(16), np.zeros(3)], ["tanh", "identity"])
    >>> gn = dgnh.GaussNewton(net, rng.normal(size=(200, 4)), rng.normal(size=(200, 3)))
    >>> H = dgnh.compress(gn, method="hmatrix", tol=1e-6, leaf_size=32, progress=False)
    >>> H.report["error_estimate"] < 1e-5
    True
    """
    params = check_parameters(method, tol, max_rank, leaf_size, budget, neighbors, metric,
                              eps, seed)
    for attr in ("n_params", "diagonal", "entries_many", "matvec"):
        if not hasattr(gn, attr):
            raise TypeError(f"gn must be a dgnh.GaussNewton (or provide n_params, diagonal(), "
                            f"entries_many() and exact products), got {type(gn).__name__}")
    t0 = time.perf_counter()
    norm_G = estimate_norm(gn.matvec, gn.n_params, seed=seed,
                           support=np.asarray(gn.diagonal()) > 0)
    t_norm = time.perf_counter() - t0
    builders = {"lowrank": _build_lowrank, "hmatrix": _build_hmatrix, "hybrid": _build_hybrid}
    names = ["lowrank", "hmatrix", "hybrid"] if method == "auto" else [method]
    built: dict[str, Operator] = {}
    for name in names:
        before = _entry_count(gn)
        t_build = time.perf_counter()
        op = builders[name](gn, params, built, norm_G, progress)
        t_build = time.perf_counter() - t_build
        t_cert = time.perf_counter()
        err = relative_error(gn, op, norm_G, seed=seed)
        lowest = float(ritz_values(op.matvec, gn.n_params, seed=seed,
                                   steps=2 * LANCZOS_STEPS).min()) / norm_G if norm_G > 0 else 0.0
        t_cert = time.perf_counter() - t_cert
        inner = dict(op.report)
        op.report = {
            "method": name, "parameters": params, "seed": params["seed"],
            "n_params": gn.n_params,
            "timings": {**inner.pop("timings", {}), "build": t_build, "norm": t_norm,
                        "certificate": t_cert},
            "entries_evaluated": _entry_count(gn) - before + (  # a reused low-rank part
                built["lowrank"].report["entries_evaluated"] if "lowrank" in built
                and name == "hybrid" else 0),
            "nbytes": op.nbytes, "dense_nbytes": 8 * gn.n_params**2,
            "memory_fraction": op.nbytes / (8 * gn.n_params**2),
            "norm_estimate": norm_G, "error_estimate": err, "tol_met": err <= params["tol"],
            "min_eigenvalue_estimate": lowest, "indefinite": lowest < -INDEFINITE_PROOF,
            **(op.rank_statistics() if hasattr(op, "rank_statistics") else {"rank": op.rank}),
            "details": inner,
        }
        built[name] = op
    if method != "auto":
        return built[method]
    candidates = [{"method": m, "nbytes": op.nbytes, "error_estimate": op.report["error_estimate"],
                   "entries_evaluated": op.report["entries_evaluated"],
                   "time": op.report["timings"]["build"]} for m, op in built.items()]
    chosen = built[choose_candidate(candidates, params["tol"])]
    chosen.report["candidates"] = candidates
    chosen.report["parameters"] = {**params, "method": "auto"}
    return chosen


def choose_candidate(candidates: list[dict[str, Any]], tol: float) -> str:
    """The ``"auto"`` rule: the smallest ``nbytes`` among candidates whose
    ``error_estimate`` meets ``tol``; if none does, the smallest ``error_estimate``.

    Examples
    --------
    >>> choose_candidate([{"method": "a", "nbytes": 10, "error_estimate": 0.1},
    ...                   {"method": "b", "nbytes": 20, "error_estimate": 0.01}], 0.05)
    'b'
    """
    meeting = [c for c in candidates if c["error_estimate"] <= tol]
    best = (min(meeting, key=lambda c: c["nbytes"]) if meeting
            else min(candidates, key=lambda c: c["error_estimate"]))
    return best["method"]


def _entry_count(gn) -> int:
    stats = getattr(gn, "stats", {})
    return int(stats.get("entries_exact", 0) + stats.get("entries_sampled", 0))


def _build_lowrank(gn, p, built, norm_G, progress) -> LowRank:
    return pivoted_cholesky(gn, tol=p["tol"], max_rank=p["max_rank"], eps=p["eps"],
                            seed=p["seed"], progress=bool(progress))


def _build_hmatrix(gn, p, built, norm_G, progress, source=None, tol=None) -> HMatrix:
    return build_hmatrix(gn if source is None else source, tol=p["tol"] if tol is None else tol,
                         max_rank=p["max_rank"], leaf_size=p["leaf_size"], budget=p["budget"],
                         neighbors=p["neighbors"], metric=p["metric"], eps=p["eps"],
                         seed=p["seed"], progress=progress)


def _build_hybrid(gn, p, built, norm_G, progress) -> Hybrid:
    """Low-rank part, then the H-matrix of the remainder at ``tol·‖G‖/‖G − UUᵀ‖``."""
    lowrank = built.get("lowrank") or _build_lowrank(gn, p, built, norm_G, progress)
    remainder = RemainderSource(gn, lowrank.U)
    t0 = time.perf_counter()
    norm_R = estimate_norm(lambda V: gn @ V - lowrank._matmat(V), gn.n_params, seed=p["seed"],
                           support=remainder.diagonal() > 0)
    t_norm = time.perf_counter() - t0
    tol_R = min(0.5, p["tol"] * norm_G / norm_R) if norm_R > 0 else 0.5
    hmatrix = _build_hmatrix(gn, p, built, norm_G, progress, source=remainder, tol=tol_R)
    return Hybrid(lowrank, hmatrix, {
        "timings": {"remainder_norm": t_norm, **hmatrix.report["timings"]},
        "lowrank": lowrank.report, "hmatrix": hmatrix.report,
        "remainder_norm_estimate": norm_R, "remainder_tol": tol_R})
