"""Compressed GNH operators with a measured error certificate (docs/design.md §4).

Three representations, built from entries (exact or sampled) and, for the
H-matrix's randomized skeletonization, one round of exact GNH products:

* ``"lowrank"`` — :class:`~dgnh.lowrank.LowRank` ``UUᵀ`` by adaptive pivoted
  Cholesky, positive semi-definite;
* ``"hmatrix"`` — :class:`~dgnh.hmatrix.HMatrix` (HSS + near field);
* ``"hybrid"`` — :class:`~dgnh.hybrid.Hybrid`: the low-rank part plus an
  H-matrix of the remainder ``G − UUᵀ`` (entries from
  :class:`~dgnh.hybrid.RemainderSource`);
* ``"auto"`` — builds all three and returns the smallest in memory whose
  estimated error meets ``tol`` (else the most accurate); the candidates are
  recorded in ``report["candidates"]``.

The parameters are one frozen :class:`CompressOptions`. Every result carries
the same report (:data:`REPORT_KEYS`, assembled by :func:`certified_report`),
with ``report["error_estimate"]`` ≈ ``‖G − H‖₂/‖G‖₂`` from block Lanczos
(:func:`~dgnh.spectral.estimate_norm`) on ``G − H`` with exact GNH products
``gn @ V``: Ritz values never exceed the true norm, and a few block steps get
within a small factor of it.
"""

from __future__ import annotations

import dataclasses
import inspect
import time
from typing import Any

import numpy as np

from .hmatrix import METRICS, HMatrix, build_hmatrix
from .hybrid import Hybrid, RemainderSource
from .lowrank import LowRank, pivoted_cholesky
from .operator import Operator
from .spectral import LANCZOS_STEPS, estimate_norm, ritz_values
from .validation import check_choice, check_fraction, check_int, check_number

Array = np.ndarray
METHODS = ("auto", "hmatrix", "lowrank", "hybrid")
INDEFINITE_PROOF = 1e-12  # a Ritz value below −this·‖G‖ proves H indefinite
REPORT_KEYS = (
    "method", "parameters", "seed", "n_params", "timings", "entries_evaluated", "nbytes",
    "dense_nbytes", "memory_fraction", "norm_estimate", "error_estimate", "tol_met",
    "min_eigenvalue_estimate", "indefinite", "details",
)
"""The top-level keys of every report :func:`compress` returns, whatever the form.

Beside them each form adds its ``rank_statistics()`` (``rank`` for a low rank;
``rank_min``, ``rank_mean``, ``rank_max``, ``ranks_per_level`` for an H-matrix;
those plus ``lowrank_rank`` for a hybrid) and ``"auto"`` adds ``candidates``.
``timings`` holds the builder's phases (always ``total``) plus ``build``,
``norm`` and ``certificate``; ``details`` is the builder's own report.
"""


# --------------------------------------------------------------------- options
@dataclasses.dataclass(frozen=True)
class CompressOptions:
    """The validated parameters of :func:`compress` (see there for their meaning).

    Every field is checked, and numbers normalised to ``int``/``float``, on
    construction; a bad value raises ``TypeError``/``ValueError`` naming the
    parameter and its allowed range.

    Examples
    --------
    >>> options = CompressOptions(method="hybrid", tol=1e-4)
    >>> options.as_dict()["tol"], options.max_rank
    (0.0001, 256)
    >>> CompressOptions(leaf_size=1)
    Traceback (most recent call last):
    ...
    ValueError: leaf_size must be an integer >= 2, got 1
    """

    method: str = "auto"
    tol: float = 1e-3
    max_rank: int = 256
    leaf_size: int = 256
    budget: float = 0.0
    neighbors: int = 32
    metric: str = "angle"
    eps: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        checked = {
            "method": check_choice(self.method, "method", METHODS),
            "metric": check_choice(self.metric, "metric", METRICS),
            "tol": check_fraction(self.tol, "tol"),
            "budget": check_number(self.budget, "budget", 0, 1,
                                   hint=" (fraction of leaves in the near field)"),
            "eps": None if self.eps is None else check_number(
                self.eps, "eps", 0, 1, low_open=True, high_open=True,
                hint=" (None means exact entries)"),
            "max_rank": check_int(self.max_rank, "max_rank", minimum=1),
            "leaf_size": check_int(self.leaf_size, "leaf_size", minimum=2),
            "neighbors": check_int(self.neighbors, "neighbors", minimum=1),
            "seed": check_int(self.seed, "seed", minimum=0),
        }
        for name, value in checked.items():
            object.__setattr__(self, name, value)  # frozen: normalise in place once

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The option names, in order (the keys of a job file's ``[compress]`` table)."""
        return tuple(f.name for f in dataclasses.fields(cls))

    def as_dict(self) -> dict[str, Any]:
        """The options as a plain dict (what ``report["parameters"]`` records)."""
        return dataclasses.asdict(self)


def check_parameters(**options: Any) -> dict[str, Any]:
    """``CompressOptions(**options).as_dict()``: the validated options as a dict.

    Kept for :mod:`dgnh.job`, which reads the option names from this function's
    signature (that of :class:`CompressOptions`).
    """
    return CompressOptions(**options).as_dict()


check_parameters.__signature__ = inspect.signature(CompressOptions)  # type: ignore[attr-defined]


# ------------------------------------------------------------------ error certificate
def relative_error(gn, approx: Operator, norm_G: float, seed: int = 0) -> float:
    """Estimated ``‖G − H‖₂/‖G‖₂`` from exact products ``gn @ V`` (:func:`estimate_norm`)."""
    if norm_G <= 0:
        return 0.0
    err = estimate_norm(lambda V: gn @ V - approx @ V, gn.n_params, seed=seed,
                        support=np.asarray(gn.diagonal()) > 0)
    return err / norm_G


def certified_report(gn, op: Operator, method: str, options: CompressOptions, norm_G: float,
                     timings: dict[str, float], entries_evaluated: int) -> dict[str, Any]:
    """The report of one compressed form (:data:`REPORT_KEYS` plus its rank statistics).

    Measures the error certificate (``error_estimate``, ``min_eigenvalue_estimate``,
    ``indefinite``) with exact products of ``gn``; ``timings`` (the build and the
    norm estimate) gains the builder's phases and ``certificate``; the builder's
    own ``op.report`` moves to ``details``.
    """
    t_cert = time.perf_counter()
    err = relative_error(gn, op, norm_G, seed=options.seed)
    lowest = float(ritz_values(op.matvec, gn.n_params, seed=options.seed,
                               steps=2 * LANCZOS_STEPS).min()) / norm_G if norm_G > 0 else 0.0
    t_cert = time.perf_counter() - t_cert
    details = dict(op.report)
    dense_nbytes = 8 * gn.n_params**2
    report = {
        "method": method, "parameters": options.as_dict(), "seed": options.seed,
        "n_params": gn.n_params,
        "timings": {**details.pop("timings"), **timings, "certificate": t_cert},
        "entries_evaluated": entries_evaluated, "nbytes": op.nbytes,
        "dense_nbytes": dense_nbytes, "memory_fraction": op.nbytes / dense_nbytes,
        "norm_estimate": norm_G, "error_estimate": err, "tol_met": err <= options.tol,
        "min_eigenvalue_estimate": lowest, "indefinite": lowest < -INDEFINITE_PROOF,
        "details": details,
    }
    return {**report, **op.rank_statistics()}


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
        ``eps`` in (0, 1) (docs/design.md §3).
    seed : seeds every random choice; the same seed gives the same result.
    progress : progress bars (``None``: only on a terminal).

    Returns
    -------
    HMatrix, LowRank or Hybrid
        With ``report`` (:data:`REPORT_KEYS`): method, all parameters and the
        seed, timings per phase, entries evaluated, memory (``nbytes``,
        ``memory_fraction`` of dense), rank statistics, ``norm_estimate``
        (‖G‖₂), ``error_estimate`` (‖G − H‖₂/‖G‖₂), ``tol_met``,
        ``min_eigenvalue_estimate`` (smallest Ritz value of H over ‖G‖₂, an
        upper bound on λ_min(H)/‖G‖₂) and ``indefinite`` (True when that
        proves a negative eigenvalue: then ``factorize(reg)`` fails for ``reg``
        below about ``−λ_min``); ``"auto"`` adds ``candidates``.

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
    options = CompressOptions(method, tol, max_rank, leaf_size, budget, neighbors, metric,
                              eps, seed)
    for attr in ("n_params", "diagonal", "entries_many", "matvec"):
        if not hasattr(gn, attr):
            raise TypeError(f"gn must be a dgnh.GaussNewton (or provide n_params, diagonal(), "
                            f"entries_many() and exact products), got {type(gn).__name__}")
    t0 = time.perf_counter()
    norm_G = estimate_norm(gn.matvec, gn.n_params, seed=options.seed,
                           support=np.asarray(gn.diagonal()) > 0)
    t_norm = time.perf_counter() - t0
    builders = {"lowrank": _build_lowrank, "hmatrix": _build_hmatrix, "hybrid": _build_hybrid}
    names = ["lowrank", "hmatrix", "hybrid"] if options.method == "auto" else [options.method]
    built: dict[str, Operator] = {}
    for name in names:
        before = _entry_count(gn)
        t_build = time.perf_counter()
        op = builders[name](gn, options, built, norm_G, progress)
        t_build = time.perf_counter() - t_build
        reused = built["lowrank"].report["entries_evaluated"] if (
            name == "hybrid" and "lowrank" in built) else 0  # the hybrid's low-rank part
        op.report = certified_report(gn, op, name, options, norm_G,
                                     {"build": t_build, "norm": t_norm},
                                     _entry_count(gn) - before + reused)
        built[name] = op
    if options.method != "auto":
        return built[options.method]
    candidates = [{"method": m, "nbytes": op.nbytes, "error_estimate": op.report["error_estimate"],
                   "entries_evaluated": op.report["entries_evaluated"],
                   "time": op.report["timings"]["build"]} for m, op in built.items()]
    chosen = built[choose_candidate(candidates, options.tol)]
    chosen.report["candidates"] = candidates
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


def _build_lowrank(gn, options: CompressOptions, built: dict[str, Operator], norm_G: float,
                   progress: bool | None) -> LowRank:
    return pivoted_cholesky(gn, tol=options.tol, max_rank=options.max_rank, eps=options.eps,
                            seed=options.seed, progress=bool(progress))


def _build_hmatrix(gn, options: CompressOptions, built: dict[str, Operator], norm_G: float,
                   progress: bool | None, source=None, tol: float | None = None) -> HMatrix:
    """The H-matrix of ``source`` (default ``gn``) at ``tol`` (default ``options.tol``)."""
    return build_hmatrix(gn if source is None else source,
                         tol=options.tol if tol is None else tol, max_rank=options.max_rank,
                         leaf_size=options.leaf_size, budget=options.budget,
                         neighbors=options.neighbors, metric=options.metric, eps=options.eps,
                         seed=options.seed, progress=progress)


def _build_hybrid(gn, options: CompressOptions, built: dict[str, Operator], norm_G: float,
                  progress: bool | None) -> Hybrid:
    """Low-rank part, then the H-matrix of the remainder at ``tol·‖G‖/‖G − UUᵀ‖``."""
    lowrank = built.get("lowrank") or _build_lowrank(gn, options, built, norm_G, progress)
    remainder = RemainderSource(gn, lowrank.U)
    t0 = time.perf_counter()
    norm_R = estimate_norm(lambda V: gn @ V - lowrank._matmat(V), gn.n_params,
                           seed=options.seed, support=remainder.diagonal() > 0)
    t_norm = time.perf_counter() - t0
    tol_R = min(0.5, options.tol * norm_G / norm_R) if norm_R > 0 else 0.5
    hmatrix = _build_hmatrix(gn, options, built, norm_G, progress, source=remainder, tol=tol_R)
    return Hybrid(lowrank, hmatrix, {
        "timings": {"remainder_norm": t_norm, **hmatrix.report["timings"]},
        "lowrank": lowrank.report, "hmatrix": hmatrix.report,
        "remainder_norm_estimate": norm_R, "remainder_tol": tol_R})
