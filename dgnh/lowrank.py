"""Global low-rank approximations ``G ≈ UUᵀ`` that stay positive semi-definite.

Two constructions (docs/design.md §4):

* :func:`pivoted_cholesky` — adaptive (partial) pivoted Cholesky from entries:
  the diagonal plus ``r`` columns, ``O(N·r²)`` arithmetic. Pivots are chosen
  greedily in blocks: each round fetches the columns of the ``block_size``
  largest residual diagonal entries in *one* ``entries_many`` batch, then
  eliminates them one by one in order of their current residual diagonal,
  skipping candidates that earlier pivots of the round made redundant.
* :func:`~dgnh.nystrom.nystrom` — randomized Nyström from exact products, in
  :mod:`dgnh.nystrom` (block Krylov, stable shifted form; what ``dgnh.compress``
  uses for ``method="lowrank"``).

Both give ``UUᵀ`` with ``G − UUᵀ`` positive semi-definite for exact input, so
``UUᵀ`` is never indefinite. Parameters whose diagonal ``G_aa`` is 0 (dead ReLU
units, constant inputs) have zero rows in ``U`` exactly, and nothing is ever
divided by a zero diagonal.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import scipy.linalg
from tqdm import tqdm

from .factorization import LowRankUpdate, ScaledIdentity, check_reg
from .operator import Operator, check_dense_size
from .validation import check_fraction, check_int, check_real_array

Array = np.ndarray
RELAXATION = 0.1  # a pivot's residual diagonal is at least this fraction of the largest
SAFETY = 0.5  # the residual norm estimate is a lower bound, typically within 2× of the truth


class LowRank(Operator):
    """The positive semi-definite operator ``UUᵀ`` with ``U`` of shape ``(N, r)``.

    Parameters
    ----------
    U : array ``(N, r)``
    report : dict, optional
        How ``U`` was made (parameters, timings, error estimates); copied.

    Examples
    --------
    >>> import numpy as np
    >>> lr = LowRank(np.arange(6.0).reshape(3, 2))
    >>> lr.rank, (lr @ np.ones(3)).tolist()
    (2, [9.0, 39.0, 69.0])
    """

    kind = "lowrank"  # its name in a result store (dgnh.store.STORED_KINDS)
    is_hss = True  # no near field: factorize() is exact

    def __init__(self, U, report: dict[str, Any] | None = None):
        U = check_real_array(U, "U", ndim=2)
        if not np.issubdtype(U.dtype, np.floating):
            raise TypeError(f"U must be a real floating-point array, got dtype {U.dtype}")
        if U.shape[0] == 0:
            raise ValueError(f"U must have shape (N, r) with N >= 1, got {U.shape}")
        self.U = U.astype(np.float64, copy=False)
        self.shape = (U.shape[0], U.shape[0])
        self.report = dict(report or {})
        self.report.setdefault("rank", self.rank)
        self.report.setdefault("nbytes", self.nbytes)

    def __repr__(self) -> str:
        return f"LowRank(n_params={self.shape[0]}, rank={self.rank})"

    @property
    def rank(self) -> int:
        """The number of columns of ``U``."""
        return self.U.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes held by ``U``."""
        return int(self.U.nbytes)

    def rank_statistics(self) -> dict[str, Any]:
        """``{"rank": r}``: the rank entry of a compressed form's report (``dgnh.compress``)."""
        return {"rank": self.rank}

    def _matmat(self, V: Array) -> Array:
        return self.U @ (self.U.T @ V)

    def diagonal(self) -> Array:
        """The diagonal of ``UUᵀ``."""
        return np.einsum("ij,ij->i", self.U, self.U)

    def min_eigenvalue(self) -> float:
        """The smallest eigenvalue of ``UUᵀ``, exactly: 0 when ``r < N`` (``UUᵀ`` is
        positive semi-definite by construction), else from the ``N × N`` ``UUᵀ`` itself.

        Examples
        --------
        >>> LowRank(np.ones((3, 1))).min_eigenvalue(), LowRank(2 * np.eye(2)).min_eigenvalue()
        (0.0, 4.0)
        """
        if self.rank < self.shape[0]:
            return 0.0
        return float(np.linalg.eigvalsh(self.U @ self.U.T)[0])

    def to_dense(self, max_bytes: int = 2**30) -> Array:
        """The dense ``UUᵀ`` for small N (refuses above ``max_bytes``)."""
        check_dense_size(self.shape[0], 8, max_bytes)
        return self.U @ self.U.T

    def factorize(self, reg: float) -> LowRankUpdate:
        """Factorization of ``UUᵀ + reg·I`` by Woodbury, O(N·r²).

        Examples
        --------
        >>> import numpy as np
        >>> lr = LowRank(np.ones((4, 1)))
        >>> bool(np.isclose(lr.factorize(1.0).logdet(), np.log(5.0)))
        True
        """
        return LowRankUpdate(ScaledIdentity(self.shape[0], check_reg(reg)), self.U)

    # ---------------------------------------------------------------- storage
    def to_arrays(self) -> dict[str, Array]:
        """The arrays to store: ``U``. See :meth:`from_arrays`."""
        return {"U": self.U}

    def attrs(self) -> dict[str, Any]:
        """JSON-friendly attributes to store beside :meth:`to_arrays`: ``n_params``, ``report``."""
        from .packing import jsonable

        return {"n_params": self.shape[0], "report": jsonable(self.report)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, Array], attrs: dict[str, Any]) -> "LowRank":
        """Rebuild a :class:`LowRank` from :meth:`to_arrays` and :meth:`attrs`.

        Examples
        --------
        >>> import numpy as np
        >>> lr = LowRank(np.ones((3, 1)))
        >>> LowRank.from_arrays(lr.to_arrays(), lr.attrs()).rank
        1
        >>> LowRank.from_arrays(lr.to_arrays(), {"n_params": 4})
        Traceback (most recent call last):
        ...
        ValueError: U has shape (3, 1), n_params is 4
        """
        U = np.asarray(arrays["U"])
        if U.shape[:1] != (attrs.get("n_params"),):
            raise ValueError(f"U has shape {U.shape}, n_params is {attrs.get('n_params')}")
        return cls(U, attrs.get("report"))


# ------------------------------------------------------- pivoted Cholesky
def pivoted_cholesky(source, tol: float = 1e-3, max_rank: int = 256, block_size: int = 16,
                     eps: float | None = None, delta: float = 0.01, seed: int = 0,
                     progress: bool = False) -> LowRank:
    """Adaptive pivoted Cholesky ``G ≈ UUᵀ`` from entries (the diagonal plus r columns).

    Stopping rule, relative to ``‖G‖₂`` (bounded from below by ``λ_max(UUᵀ)``,
    since ``UUᵀ ⪯ G``). With exact entries the residual ``E = G − UUᵀ`` is
    positive semi-definite (a Schur complement), and two tests run before each
    pivot batch:

    * certified: ``‖E‖₂ ≤ tr(E) ≤ tol · λ_max(UUᵀ)`` (``stop == "trace"``);
    * estimated: the residual columns ``E[:, C]`` of the next batch ``C`` (the
      largest residual diagonal entries) give ``σ_max(E[:, C])² / λ_max(E[C, C])``,
      a lower bound on ``‖E‖₂`` that was within a factor 2 of it on digits GNHs;
      the loop stops when it is ``≤ tol/2 · λ_max(UUᵀ)`` (``stop == "estimate"``).

    The trace alone is 10–80× pessimistic on GNHs (long flat tails), which
    would inflate the rank by a similar factor; hence the estimate. Measure the
    true error by power iteration on ``G − UUᵀ`` when it matters. The loop also
    stops at ``max_rank`` (``report["converged"]`` is then False) or when the
    residual diagonal is zero to rounding (``stop == "exact"``, exact low rank).

    Parameters
    ----------
    source : GaussNewton or any object with ``n_params``, ``diagonal()`` and
        ``entries_many(requests, eps=, delta=, seed=)``.
    tol : relative tolerance in (0, 1).
    max_rank : cap on the rank.
    block_size : pivot candidates (columns) fetched per ``entries_many`` batch.
    eps, delta, seed : with ``eps``, the columns are sampled entries
        (docs/design.md §3). ``UUᵀ`` is still PSD, but the stopping rule is no
        longer certified.
    progress : show a progress bar (rank so far).

    Returns
    -------
    LowRank
        With ``report``: method, parameters, rank, pivots, ``stop``, ``converged``,
        the residual trace, ``norm_estimate`` (of ‖G‖₂), the relative
        ``trace_bound`` and ``error_estimate``, entries evaluated, ``timings``
        (``entries``: fetching columns, ``total``).

    Examples
    --------
    >>> import numpy as np, dgnh
    >>> rng = np.random.default_rng(0)
    >>> net = dgnh.MLP([rng.normal(size=(6, 3)), rng.normal(size=(2, 6))],
    ...                [np.zeros(6), np.zeros(2)], ["tanh", "identity"])
    >>> gn = dgnh.GaussNewton(net, rng.normal(size=(4, 3)), rng.normal(size=(4, 2)))
    >>> lr = pivoted_cholesky(gn, tol=1e-8)
    >>> lr.rank <= 8, bool(np.allclose(lr.to_dense(), gn.dense()))
    (True, True)
    """
    tol = check_fraction(tol, "tol")
    max_rank = check_int(max_rank, "max_rank", minimum=1)
    block_size = check_int(block_size, "block_size", minimum=1)
    t_start = time.perf_counter()
    N = int(source.n_params)
    d = np.asarray(source.diagonal(), dtype=np.float64).copy()
    if d.shape != (N,) or not np.all(np.isfinite(d)) or d.min() < 0:
        raise ValueError("source.diagonal() must be a finite non-negative vector of length "
                         f"n_params={N}")
    live = np.flatnonzero(d > 0)  # zero-diagonal parameters have zero rows: left out
    d_live = d[live]
    floor = (np.finfo(np.float64).eps * N * d_live.max()) if live.size else 0.0
    rank_cap = min(max_rank, live.size)
    L = np.zeros((live.size, rank_cap), order="F")  # U on the live rows
    pivots: list[int] = []
    gram = np.zeros((rank_cap, rank_cap))  # UᵀU, to bound λ_max(UUᵀ) from below
    norm_est, power_vec = float(d_live.max()) if live.size else 0.0, None
    n_batches = entries = 0
    t_entries = 0.0
    stop = "exact" if not live.size else "max_rank"
    error_estimate = 0.0 if not live.size else float(d_live.max())
    bar = tqdm(total=rank_cap, desc="pivoted Cholesky", unit="pivot", disable=not progress)
    while len(pivots) < rank_cap:
        if float(d_live.sum()) <= tol * norm_est:
            stop = "trace"
            break
        if d_live.max() <= floor:
            stop = "exact"
            break
        k0 = len(pivots)
        cand = np.argsort(-d_live, kind="stable")[:min(block_size, rank_cap - k0)]
        cand = cand[d_live[cand] > floor]
        t0 = time.perf_counter()
        cols = source.entries_many([(live, live[cand])], eps=eps, delta=delta,
                                   seed=seed + n_batches)[0]
        t_entries += time.perf_counter() - t0
        n_batches += 1
        entries += cols.size
        # residual columns E[:, cand] = G[:, cand] − U U[cand]ᵀ
        R = np.asarray(cols, dtype=np.float64) - L[:, :k0] @ L[cand, :k0].T
        error_estimate = _residual_norm_estimate(R, cand)
        if error_estimate <= SAFETY * tol * norm_est:
            stop = "estimate"
            break
        for _ in range(len(cand)):
            j = int(np.argmax(d_live[cand]))
            piv = float(d_live[cand[j]])
            # relaxed greedy: skip candidates that earlier pivots made small
            if piv <= floor or piv < RELAXATION * d_live.max():
                break
            col = R[:, j] / np.sqrt(piv)
            col[cand[j]] = np.sqrt(piv)
            L[:, len(pivots)] = col
            pivots.append(int(live[cand[j]]))
            R -= np.outer(col, col[cand])
            d_live -= col * col
            d_live[cand[j]] = 0.0
            np.maximum(d_live, 0.0, out=d_live)
            if d_live.sum() <= tol * norm_est:
                break
        k1 = len(pivots)  # > k0: the first candidate holds the largest residual diagonal
        gram[:k1, k0:k1] = L[:, :k1].T @ L[:, k0:k1]
        gram[k0:k1, :k0] = gram[:k0, k0:k1].T
        norm_est, power_vec = _largest_eigenvalue_bound(gram[:k1, :k1], power_vec, norm_est)
        bar.update(k1 - k0)
    else:
        if float(d_live.sum()) <= tol * norm_est:
            stop = "trace"
    bar.close()
    r = len(pivots)
    U = np.zeros((N, r))
    U[live] = L[:, :r]
    residual_trace = float(d_live.sum())
    report = {
        "method": "pivoted_cholesky",
        "tol": tol, "max_rank": max_rank, "block_size": block_size,
        "eps": eps, "delta": delta if eps is not None else None, "seed": seed,
        "rank": r, "pivots": pivots, "n_zero_diagonal": int(N - live.size),
        "residual_trace": residual_trace, "norm_estimate": norm_est,
        "trace_bound": residual_trace / norm_est if norm_est > 0 else 0.0,
        "error_estimate": error_estimate / norm_est if norm_est > 0 else 0.0,
        "stop": stop, "converged": stop in ("trace", "estimate", "exact"),
        "n_batches": n_batches, "entries_evaluated": int(entries + N),
        "timings": {"entries": t_entries, "total": time.perf_counter() - t_start},
    }
    return LowRank(U, report)


def _residual_norm_estimate(R: Array, cand: Array) -> float:
    """``σ_max(E[:, C])² / λ_max(E[C, C])``: a lower bound on ``‖E‖₂`` for PSD ``E``.

    ``C`` holds the largest residual diagonal entries, so the bound is usually
    within a factor 2 of ``‖E‖₂`` (measured on digits GNHs: 0.5–0.9).
    """
    top = float(scipy.linalg.eigvalsh(R[cand])[-1])
    if top <= 0:
        return 0.0
    return float(scipy.linalg.eigvalsh(R.T @ R)[-1] / top)


def _largest_eigenvalue_bound(gram: Array, v: Array | None, current: float,
                              n_iter: int = 8) -> tuple[float, Array]:
    """A Rayleigh-quotient lower bound on ``λ_max(gram)`` by warm-started power iteration."""
    k = gram.shape[0]
    x = np.ones(k) if v is None else np.concatenate([v, np.zeros(k - len(v))])
    x[np.argmax(np.diag(gram))] += 1.0
    for _ in range(n_iter):
        x = gram @ x
        x /= np.linalg.norm(x)
    return max(current, float(x @ gram @ x)), x


# ----------------------------------------------------------------- Nyström


