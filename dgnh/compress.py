"""Compressed GNH operators with a measured error certificate (docs/design.md §4).

Four representations, built from exact GNH products and entries (exact or sampled):

* ``"lowrank"`` — :class:`~dgnh.lowrank.LowRank` ``UUᵀ``, positive
  semi-definite: by default the adaptive randomized Nyström approximation on a
  block Krylov space (:func:`~dgnh.nystrom.nystrom`, products, within a small
  factor of the optimal truncated eigendecomposition of the same rank); with
  ``lowrank_method="pivoted_cholesky"`` the adaptive pivoted Cholesky
  (:func:`~dgnh.lowrank.pivoted_cholesky`, entries, also sampled ones);
* ``"hmatrix"`` — :class:`~dgnh.hmatrix.HMatrix` (HSS + near field);
* ``"hybrid"`` — :class:`~dgnh.hybrid.Hybrid`: the low-rank part plus an
  H-matrix of the remainder ``G − UUᵀ`` (entries from
  :class:`~dgnh.hybrid.RemainderSource`);
* ``"dense"`` — :class:`~dgnh.dense.Dense`: ``G`` itself from exact entries
  (``8·N²`` bytes, at most ``DENSE_MAX_BYTES``), factorized exactly by Cholesky;
* ``"auto"`` — the smallest form in memory whose estimated error meets ``tol``
  (:func:`choose_candidate`; else the most accurate). It builds the low rank,
  then the H-matrix and the hybrid unless a lower bound on their memory
  (:func:`memory_floor`) shows they cannot beat a form already meeting ``tol``;
  the dense form, exact, is a candidate whenever it fits ``DENSE_MAX_BYTES``
  and is built only if chosen. ``report["candidates"]`` records every form,
  built or skipped.

A result whose certified error misses ``tol``, or where ``max_rank`` cut a
rank (``report["max_rank_binds"]``, ``report["n_capped_nodes"]``), comes with a
``UserWarning`` giving the error, ``tol`` and what to change.

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
import warnings
from typing import Any

import numpy as np

from .config import return_freed_memory
from .dense import DENSE_MAX_BYTES, Dense
from .hmatrix import METRICS, HMatrix, build_hmatrix
from .hmatrix.tree import tree_depth
from .hybrid import Hybrid, RemainderSource
from .lowrank import LowRank, pivoted_cholesky
from .nystrom import nystrom
from .operator import Operator
from .phases import phase
from .spectral import LANCZOS_STEPS, estimate_norm, ritz_values
from .validation import check_choice, check_fraction, check_int, check_number

Array = np.ndarray
METHODS = ("auto", "hmatrix", "lowrank", "hybrid", "dense")
LOWRANK_METHODS = ("nystrom", "pivoted_cholesky")
INDEFINITE_PROOF = 1e-12  # a Ritz value below −this·‖G‖ proves H indefinite
REPORT_KEYS = (
    "method", "parameters", "seed", "n_params", "timings", "entries_evaluated", "nbytes",
    "dense_nbytes", "memory_fraction", "norm_estimate", "error_estimate", "tol_met",
    "min_eigenvalue_estimate", "indefinite", "max_rank_binds", "n_capped_nodes", "details",
)
"""The top-level keys of every report :func:`compress` returns, whatever the form.

Beside them each form adds its ``rank_statistics()`` (``rank`` for a low rank;
``rank_min``, ``rank_mean``, ``rank_max``, ``ranks_per_level`` for an H-matrix;
those plus ``lowrank_rank`` for a hybrid; none for the dense form) and ``"auto"``
adds ``candidates``. ``max_rank_binds`` is True when ``max_rank`` cut a rank (the
low rank stopped at ``max_rank`` short of ``tol``, or ``n_capped_nodes > 0``
H-matrix nodes, of the hybrid's H-matrix part for a hybrid, whose low-rank part
is capped by design).
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
    lowrank_method: str = "nystrom"
    power_iterations: int = 1

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
            "lowrank_method": check_choice(self.lowrank_method, "lowrank_method",
                                           LOWRANK_METHODS),
            "power_iterations": check_int(self.power_iterations, "power_iterations", minimum=0),
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
    own = op.report
    if (own.get("method") == "nystrom" and own.get("error_estimate") is not None
            and own.get("seed") == options.seed and own.get("norm_estimate") == norm_G):
        err = own["error_estimate"]  # the adaptive Nyström's last step: this very estimate
    else:
        err = relative_error(gn, op, norm_G, seed=options.seed)
    lowest = (op.min_eigenvalue() if isinstance(op, LowRank)  # exact, no products
              else float(ritz_values(op.matvec, gn.n_params, seed=options.seed,
                                     steps=2 * LANCZOS_STEPS).min()))
    lowest = lowest / norm_G if norm_G > 0 else 0.0
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
        **cap_statistics(op.kind, details), "details": details,
    }
    return {**report, **op.rank_statistics()}


def cap_statistics(kind: str, details: dict[str, Any]) -> dict[str, Any]:
    """``{"max_rank_binds", "n_capped_nodes"}`` from a builder's report ``details``.

    Examples
    --------
    >>> cap_statistics("lowrank", {"stop": "max_rank"})
    {'max_rank_binds': True, 'n_capped_nodes': 0}
    >>> cap_statistics("hybrid", {"hmatrix": {"n_capped_nodes": 3}})
    {'max_rank_binds': True, 'n_capped_nodes': 3}
    """
    if kind == "hybrid":  # its low-rank part stops at max_rank by design
        details = details.get("hmatrix", {})
    n_capped = int(details.get("n_capped_nodes", 0))
    return {"max_rank_binds": n_capped > 0 or details.get("stop") == "max_rank",
            "n_capped_nodes": n_capped}


# ------------------------------------------------------------------------ compress
def compress(gn, method: str = "auto", tol: float = 1e-3, max_rank: int = 256,
             leaf_size: int = 256, budget: float = 0.0, neighbors: int = 32,
             metric: str = "angle", eps: float | None = None, seed: int = 0,
             lowrank_method: str = "nystrom", power_iterations: int = 1, *,
             progress: bool | None = None) -> Operator:
    """Compress the GNH ``gn`` and certify the error with exact products.

    Parameters
    ----------
    gn : GaussNewton
        Or any operator with ``n_params``, ``diagonal()``, ``entries_many`` and
        exact products ``gn @ V``.
    method : ``"auto"``, ``"hmatrix"``, ``"lowrank"``, ``"hybrid"`` or ``"dense"``
        (see module doc).
    tol : relative tolerance in (0, 1) on ``‖G − H‖₂/‖G‖₂``: the adaptive low
        rank stops when its certificate meets it; the H-matrix aims at it; ``"auto"``
        returns the smallest form meeting it.
    max_rank : cap on every skeleton and on the low-rank rank (>= 1).
    leaf_size : largest leaf of the cluster tree (>= 2).
    budget : near-field budget in [0, 1]; 0 gives HSS.
    neighbors : approximate nearest neighbours per parameter (>= 1).
    metric : ``"angle"`` (``1 − G_ab²/(G_aa G_bb)``) or ``"gram"``.
    eps : ``None`` for exact entries, else sampled entries with per-entry accuracy
        ``eps`` in (0, 1) (docs/design.md §3; the H-matrix and pivoted Cholesky;
        the Nyström low rank uses products and the dense form exact entries).
    seed : seeds every random choice; the same seed gives the same result.
    lowrank_method : ``"nystrom"`` (products) or ``"pivoted_cholesky"`` (entries).
    power_iterations : of the Nyström low rank (>= 0; its Krylov depth minus one).
    progress : progress bars (``None``: only on a terminal).

    Returns
    -------
    HMatrix, LowRank, Hybrid or Dense
        With ``report`` (:data:`REPORT_KEYS`): method, all parameters and the
        seed, timings per phase, entries evaluated, memory (``nbytes``,
        ``memory_fraction`` of dense), rank statistics, ``norm_estimate``
        (‖G‖₂), ``error_estimate`` (‖G − H‖₂/‖G‖₂), ``tol_met``,
        ``min_eigenvalue_estimate`` (smallest Ritz value of H over ‖G‖₂, an
        upper bound on λ_min(H)/‖G‖₂), ``indefinite`` (True when that
        proves a negative eigenvalue: then ``factorize(reg)`` fails for ``reg``
        below about ``−λ_min``), ``max_rank_binds`` and ``n_capped_nodes``;
        ``"auto"`` adds ``candidates``.

    Warns
    -----
    UserWarning
        When the certified error misses ``tol`` or ``max_rank`` binds.

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
    >>> dgnh.compress(gn, tol=1e-4, progress=False).report["method"]
    'lowrank'
    """
    options = CompressOptions(method, tol, max_rank, leaf_size, budget, neighbors, metric,
                              eps, seed, lowrank_method, power_iterations)
    for attr in ("n_params", "diagonal", "entries_many", "matvec"):
        if not hasattr(gn, attr):
            raise TypeError(f"gn must be a dgnh.GaussNewton (or provide n_params, diagonal(), "
                            f"entries_many() and exact products), got {type(gn).__name__}")
    t0 = time.perf_counter()
    # the Nyström low rank estimates ‖G‖₂ from its own products (its largest eigenvalue)
    with phase("norm"):
        norm_G = None if (options.method == "lowrank" and options.lowrank_method == "nystrom") \
            else estimate_norm(gn.matvec, gn.n_params, seed=options.seed,
                               support=np.asarray(gn.diagonal()) > 0)
    context = (gn, options, norm_G, time.perf_counter() - t0, progress)
    op = (_auto(*context) if options.method == "auto"
          else _build_certified(options.method, {}, *context))
    _warn_if_missed(op.report, options)
    return_freed_memory()  # the build's freed arrays (fragmented heap) leave the resident set
    return op


def choose_candidate(candidates: list[dict[str, Any]], tol: float) -> str:
    """The ``"auto"`` rule: the smallest ``nbytes`` among candidates whose
    ``error_estimate`` meets ``tol``; if none does, the smallest ``error_estimate``.
    Candidates without an ``error_estimate`` (skipped) are left out.

    Examples
    --------
    >>> choose_candidate([{"method": "a", "nbytes": 10, "error_estimate": 0.1},
    ...                   {"method": "b", "nbytes": 20, "error_estimate": 0.01},
    ...                   {"method": "c", "nbytes": None, "error_estimate": None}], 0.05)
    'b'
    """
    usable = [c for c in candidates if c.get("error_estimate") is not None]
    meeting = [c for c in usable if c["error_estimate"] <= tol]
    best = (min(meeting, key=lambda c: c["nbytes"]) if meeting
            else min(usable, key=lambda c: c["error_estimate"]))
    return best["method"]


def memory_floor(method: str, gn, options: CompressOptions,
                 built: dict[str, Operator]) -> float:
    """A lower bound on the bytes of the form ``method`` before building it.

    ``8·N`` for a low rank (rank >= 1), ``8·N²`` for the dense form, the exact
    diagonal leaf blocks for an H-matrix (``8·n²/2^depth`` for ``n`` parameters
    with a positive diagonal in the balanced tree of ``leaf_size``), and for a
    hybrid its low-rank part (``built["lowrank"]``, else rank 1) plus the leaf
    blocks of the remainder's tree.

    Examples
    --------
    >>> class Source:
    ...     n_params = 100
    ...     def diagonal(self): return np.r_[np.ones(64), np.zeros(36)]
    >>> memory_floor("hmatrix", Source(), CompressOptions(leaf_size=16), {})
    8192.0
    """
    N = int(gn.n_params)
    if method in ("lowrank", "dense"):
        return 8.0 * N * (1 if method == "lowrank" else N)
    diagonal = np.asarray(gn.diagonal())
    base = 0
    if method == "hybrid":
        lowrank = built.get("lowrank")
        diagonal, base = ((RemainderSource(gn, lowrank.U).diagonal(), lowrank.nbytes)
                          if lowrank is not None else (diagonal, 8 * N))
    n = int(np.count_nonzero(diagonal > 0))
    return base + 8.0 * n * n / 2 ** tree_depth(n, options.leaf_size)


def _auto(gn, options: CompressOptions, norm_G: float, t_norm: float,
          progress: bool | None) -> Operator:
    """``method="auto"``: build the forms that can win, return the :func:`choose_candidate`."""
    context = (gn, options, norm_G, t_norm, progress)
    dense_nbytes = 8 * gn.n_params**2
    dense_fits = dense_nbytes <= DENSE_MAX_BYTES
    best = ("dense", dense_nbytes) if dense_fits else (None, np.inf)  # smallest meeting tol
    built: dict[str, Operator] = {}
    candidates = []
    for name in ("lowrank", "hmatrix", "hybrid"):
        floor = memory_floor(name, gn, options, built)
        if floor >= best[1]:
            candidates.append({"method": name, "built": False, "nbytes": None,
                               "error_estimate": None, "memory_floor": floor,
                               "skipped": f"needs at least {floor:.0f} bytes, {best[0]} meets "
                                          f"tol in {best[1]:.0f}"})
            continue
        op = built[name] = _build_certified(name, built, *context)
        candidates.append(_candidate(op))
        if op.report["tol_met"] and op.nbytes < best[1]:
            best = (name, op.nbytes)
    if dense_fits:  # exact: its error is rounding; built only if chosen
        candidates.append({"method": "dense", "built": False, "nbytes": dense_nbytes,
                           "error_estimate": 0.0, "memory_floor": dense_nbytes})
    chosen = choose_candidate(candidates, options.tol)
    if chosen == "dense":
        built["dense"] = _build_certified("dense", built, *context)
        candidates[-1] = _candidate(built["dense"])
    op = built[chosen]
    op.report["candidates"] = candidates
    return op


def _candidate(op: Operator) -> dict[str, Any]:
    """The entry of a built form in ``report["candidates"]``."""
    rep = op.report
    return {"method": rep["method"], "built": True, "nbytes": op.nbytes,
            "error_estimate": rep["error_estimate"], "tol_met": rep["tol_met"],
            "max_rank_binds": rep["max_rank_binds"],
            "entries_evaluated": rep["entries_evaluated"], "time": rep["timings"]["build"]}


def _build_certified(name: str, built: dict[str, Operator], gn, options: CompressOptions,
                     norm_G: float | None, t_norm: float, progress: bool | None) -> Operator:
    """Build the form ``name`` and attach its :func:`certified_report`."""
    builders = {"lowrank": _build_lowrank, "hmatrix": _build_hmatrix,
                "hybrid": _build_hybrid, "dense": _build_dense}
    before = _entry_count(gn)
    t_build = time.perf_counter()
    with phase(name):
        op = builders[name](gn, options, built, norm_G, progress)
    t_build = time.perf_counter() - t_build
    if norm_G is None:  # the builder's own estimate (the Nyström low rank's λ̂₁ ≤ ‖G‖₂)
        norm_G = op.report["norm_estimate"]
    reused = built["lowrank"].report["entries_evaluated"] if (
        name == "hybrid" and "lowrank" in built) else 0  # the hybrid's low-rank part
    with phase(f"{name} certificate"):
        op.report = certified_report(gn, op, name, options, norm_G,
                                     {"build": t_build, "norm": t_norm},
                                     _entry_count(gn) - before + reused)
    return op


ADVICE = {
    "lowrank": "raise max_rank or power_iterations, or use method='auto'",
    "hmatrix": "raise max_rank, lower leaf_size, or use method='auto'",
    "hybrid": "raise max_rank or use method='auto'",
    "dense": "tol is below the rounding of the dense matrix",
}


def _warn_if_missed(report: dict[str, Any], options: CompressOptions) -> None:
    """The ``UserWarning`` of a result whose error misses ``tol`` or where ``max_rank`` binds."""
    if not report["max_rank_binds"] and report["tol_met"]:
        return
    what = f"compress(method={options.method!r})" + (
        f" chose {report['method']!r}" if options.method == "auto" else "")
    outcome = (f"certified error ‖G − H‖₂/‖G‖₂ ≈ {report['error_estimate']:.2e} "
               f"{'meets' if report['tol_met'] else 'misses'} tol={options.tol:g}")
    if report["max_rank_binds"]:
        where = f"n_capped_nodes={report['n_capped_nodes']}" + (
            " H-matrix nodes cut" if report["n_capped_nodes"]
            else f"; the low rank stopped at rank {report.get('rank')}")
        message = (f"{what}: max_rank={options.max_rank} binds ({where}); {outcome}; raise "
                   "max_rank for a more accurate result")
    else:
        message = f"{what}: {outcome}; {ADVICE[report['method']]}"
    warnings.warn(message, UserWarning, stacklevel=3)


def _entry_count(gn) -> int:
    stats = getattr(gn, "stats", {})
    return int(stats.get("entries_exact", 0) + stats.get("entries_sampled", 0))


def _build_lowrank(gn, options: CompressOptions, built: dict[str, Operator], norm_G: float | None,
                   progress: bool | None) -> LowRank:
    if options.lowrank_method == "pivoted_cholesky":
        return pivoted_cholesky(gn, tol=options.tol, max_rank=options.max_rank,
                                eps=options.eps, seed=options.seed, progress=bool(progress))
    return nystrom(gn, tol=options.tol, max_rank=options.max_rank, seed=options.seed,
                   power_iterations=options.power_iterations, norm_estimate=norm_G,
                   progress=bool(progress))


def _build_dense(gn, options: CompressOptions, built: dict[str, Operator], norm_G: float,
                 progress: bool | None) -> Dense:
    return Dense.from_source(gn)


def _build_hmatrix(gn, options: CompressOptions, built: dict[str, Operator], norm_G: float,
                   progress: bool | None, source=None, tol: float | None = None) -> HMatrix:
    """The H-matrix of ``source`` (default ``gn``) at ``tol`` (default ``options.tol``)."""
    return build_hmatrix(gn if source is None else source,
                         tol=options.tol if tol is None else tol, max_rank=options.max_rank,
                         leaf_size=options.leaf_size, budget=options.budget,
                         neighbors=options.neighbors, metric=options.metric, eps=options.eps,
                         seed=options.seed, progress=progress, norm_estimate=None if source else norm_G)


def _build_hybrid(gn, options: CompressOptions, built: dict[str, Operator], norm_G: float,
                  progress: bool | None) -> Hybrid:
    """Low-rank part, then the H-matrix of the remainder at ``tol·‖G‖/‖G − UUᵀ‖``."""
    with phase("lowrank"):
        lowrank = built.get("lowrank") or _build_lowrank(gn, options, built, norm_G, progress)
    remainder = RemainderSource(gn, lowrank.U)
    t0 = time.perf_counter()
    with phase("remainder norm"):
        norm_R = estimate_norm(lambda V: gn @ V - lowrank._matmat(V), gn.n_params,
                               seed=options.seed, support=remainder.diagonal() > 0)
    t_norm = time.perf_counter() - t0
    tol_R = min(0.5, options.tol * norm_G / norm_R) if norm_R > 0 else 0.5
    with phase("hmatrix"):
        hmatrix = _build_hmatrix(gn, options, built, norm_G, progress, source=remainder,
                                 tol=tol_R)
    return Hybrid(lowrank, hmatrix, {
        "timings": {"remainder_norm": t_norm, **hmatrix.report["timings"]},
        "lowrank": lowrank.report, "hmatrix": hmatrix.report,
        "remainder_norm_estimate": norm_R, "remainder_tol": tol_R})
