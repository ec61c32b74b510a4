"""Global low-rank approximations ``G ≈ UUᵀ`` that stay positive semi-definite.

Two constructions (docs/design.md §4):

* :func:`pivoted_cholesky` — adaptive (partial) pivoted Cholesky from entries:
  the diagonal plus ``r`` columns, ``O(N·r²)`` arithmetic. Pivots are chosen
  greedily in blocks: each round fetches the columns of the ``block_size``
  largest residual diagonal entries in *one* ``entries_many`` batch, then
  eliminates them one by one in order of their current residual diagonal,
  skipping candidates that earlier pivots of the round made redundant.
* :func:`nystrom` — randomized Nyström from exact products ``op @ V`` (the
  numerically stable, shifted version of Tropp, Yurtsever, Udell and Cevher,
  2017) on a block Krylov space ``span{Ω, GΩ, …, G^q Ω}`` (:class:`KrylovNystrom`),
  truncated to the wanted rank by an eigendecomposition of the small core; of a
  fixed rank, or adaptive: the space grows until the block-Lanczos certificate
  of ``‖G − UUᵀ‖₂`` meets ``tol`` or the rank reaches ``max_rank``. With one
  power iteration (two products per start vector) it came within 1.3× of the
  optimal rank-r error (the truncated eigendecomposition, λ_{r+1}) on digits and
  random GNHs, where pivoted Cholesky and the one-product Nyström were 1.5–8×
  off; it is what ``dgnh.compress`` uses for ``method="lowrank"``.

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
from .spectral import BREAKDOWN, estimate_norm
from .validation import check_fraction, check_int, check_number, check_real_array

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
FIRST_BLOCK = 64  # start vectors of the first round of the adaptive Nyström (plus oversample)
TRIM, KEEP = 0.9, 0.5  # the adaptive rank keeps the eigenvalues above TRIM·tol·‖G‖, or if
# that misses tol, above KEEP·tol·‖G‖


class KrylovNystrom:
    """The Nyström approximation of a PSD ``G`` on a growing block Krylov space.

    Works on the ``live`` rows (positive diagonal; the rows and columns of the
    others are zero in a PSD ``G``). :meth:`extend` adds the block Krylov space
    ``span{S, G̃S, …, G̃^q S}`` of new start vectors ``S`` with ``G̃ = PGP`` (``P``
    projects out the space so far), keeping the orthonormal basis ``K`` and its
    exact image ``Y = GK`` (one product with ``S``'s width per block).
    :meth:`eigenvalues` and :meth:`truncated` give the stable shifted Nyström approximation
    ``Y_ν (KᵀY_ν)⁻¹ Y_νᵀ − νI`` of ``G`` on ``span K`` (Tropp, Yurtsever, Udell
    and Cevher 2017, Algorithm 3), eigendecomposed and truncated to a rank.

    Since ``span K`` holds the space of ``q`` power iterations, the result is at
    least as accurate as Nyström with ``q`` power iterations for the same
    products; ``G − UUᵀ`` stays positive semi-definite for every ``K`` and rank
    (the Nyström approximation and its truncation lie below ``G``).

    Memory: ``K`` and ``Y`` are allocated once for ``capacity`` columns and
    filled in place (``2·N·capacity`` floats); nothing else of size ``N × capacity``
    is formed (``Y_ν = Y + νK`` enters only through small Gram matrices, and
    :meth:`truncated` works in row chunks).

    Examples
    --------
    >>> G = np.diag([4.0, 2.0, 1.0, 0.0])
    >>> space = KrylovNystrom(lambda V: G @ V, np.diag(G) > 0, capacity=3)
    >>> space.extend(np.ones((4, 1)), depth=3)
    >>> lam, U = space.eigenvalues(), space.truncated(2)
    >>> np.round(lam, 12).tolist(), np.round(U @ U.T, 12).diagonal().tolist()
    ([4.0, 2.0, 1.0], [4.0, 2.0, 0.0, 0.0])
    """

    ROW_CHUNK = 1 << 16  # rows per GEMM of :meth:`truncated`

    def __init__(self, apply, live: Array, capacity: int):
        self.apply = apply  # (N, k) -> (N, k): exact products G @ V
        self.live = np.asarray(live, dtype=bool)
        n = int(self.live.sum())
        capacity = min(int(capacity), n)
        self._K = np.zeros((n, capacity))
        self._Y = np.zeros((n, capacity))
        self._dim = 0
        self.n_products = 0
        self.seconds = 0.0  # spent in products
        self._factor: tuple[Array, Array, float] | None = None

    @property
    def K(self) -> Array:
        """The orthonormal basis (live rows), a view."""
        return self._K[:, :self._dim]

    @property
    def Y(self) -> Array:
        """Its exact image ``GK`` (live rows), a view."""
        return self._Y[:, :self._dim]

    @property
    def dimension(self) -> int:
        return self._dim

    @property
    def full(self) -> bool:
        """True once the space spans every live row (the approximation is then exact)."""
        return self._dim >= self._K.shape[0]

    def _image(self, V: Array) -> Array:
        """``G V`` on the live rows (``V`` given on the live rows)."""
        full = np.zeros((len(self.live), V.shape[1]))
        full[self.live] = V
        t0 = time.perf_counter()
        out = np.asarray(self.apply(full), dtype=np.float64)[self.live]
        self.seconds += time.perf_counter() - t0
        self.n_products += V.shape[1]
        return out

    def _orthogonal(self, S: Array) -> Array:
        """``S`` projected twice off the basis so far."""
        for _ in range(2):
            S = S - self.K @ (self.K.T @ S)
        return S

    def extend(self, start: Array, depth: int) -> None:
        """Add the Krylov space of depth ``depth`` from ``start`` (``(N, b)``, live rows used).

        Each step orthogonalizes the block against the whole basis (twice, then
        once more after its QR: a rank-deficient block still adds orthonormal
        directions), stores it and its exact image; the space closes early when
        the residual falls below ``BREAKDOWN`` times the largest image norm.
        """
        room = self._K.shape[1] - self._dim  # each Krylov step adds S's width
        S = np.asarray(start, dtype=np.float64)[self.live]
        S = S[:, :min(S.shape[1], max(room // depth, min(room, 1)))]
        scale = 0.0
        for _ in range(depth):
            b = min(S.shape[1], self._K.shape[1] - self._dim)
            S = self._orthogonal(S[:, :b])
            if b == 0 or np.linalg.norm(S) <= BREAKDOWN * scale:
                return
            Q = np.linalg.qr(self._orthogonal(np.linalg.qr(S)[0]))[0]
            d = self._dim
            self._K[:, d:d + b] = Q
            self._Y[:, d:d + b] = S = self._image(Q)
            self._dim += b
            scale = max(scale, float(np.linalg.norm(S)))

    def eigenvalues(self) -> Array:
        """Eigenvalue estimates of the Nyström approximation on the space, descending.

        They lie below those of ``G`` (``λ̂_i ≤ λ_i``); :meth:`truncated` gives the factor.
        """
        k = self._dim
        self._factor = None
        if k == 0:
            return np.zeros(0)
        K, Y = self.K, self.Y
        shift = np.sqrt(k) * np.finfo(np.float64).eps * np.linalg.norm(Y)
        KY, KK = K.T @ Y, K.T @ K
        M = KY + shift * KK  # Kᵀ Y_ν with Y_ν = Y + νK
        w, V = scipy.linalg.eigh((M + M.T) / 2)
        keep = w > max(w.max(), 0.0) * k * np.finfo(np.float64).eps
        if not keep.any():
            return np.zeros(0)
        S = V[:, keep] / np.sqrt(w[keep])  # Y_ν S Sᵀ Y_νᵀ = Y_ν M⁺ Y_νᵀ
        YY = Y.T @ Y + shift * (KY + KY.T) + shift**2 * KK  # Y_νᵀ Y_ν
        gram = S.T @ YY @ S
        s2, W = scipy.linalg.eigh((gram + gram.T) / 2)
        s2, W = np.maximum(s2[::-1], 0.0), W[:, ::-1]
        lam = np.maximum(s2 - shift, 0.0)
        scale = np.sqrt(np.divide(lam, s2, out=np.zeros_like(lam), where=s2 > 0))
        self._factor = (S @ W * scale, scale, shift)
        return lam

    def truncated(self, rank: int) -> Array:
        """``U`` ``(N, ≤ rank)`` with orthogonal columns: the approximation of the last
        :meth:`eigenvalues` call truncated to its ``rank`` largest eigenvalues (fewer
        where the rest are zero)."""
        if self._factor is None:
            return np.zeros((len(self.live), 0))
        A, scale, shift = self._factor
        r = int(min(rank, np.count_nonzero(scale > 0)))
        A = A[:, :r]
        U = np.zeros((len(self.live), r))
        rows = np.flatnonzero(self.live)
        for i in range(0, len(rows), self.ROW_CHUNK):  # U = Y_ν A, no N × k temporary
            part = slice(i, i + self.ROW_CHUNK)
            U[rows[part]] = self._Y[part, :self._dim] @ A + shift * (self._K[part, :self._dim] @ A)
        return U


def nystrom(op, rank: int | None = None, oversample: int = 10, seed: int = 0, *,
            power_iterations: int = 1, tol: float | None = None, max_rank: int = 256,
            norm_estimate: float | None = None, progress: bool = False) -> LowRank:
    """Randomized Nyström approximation ``G ≈ UUᵀ`` from exact products, of a given
    ``rank`` or adaptive to a tolerance ``tol``.

    The Nyström approximation is taken on the block Krylov space
    ``span{Ω, GΩ, …, G^q Ω}`` of a Gaussian ``Ω`` (``q = power_iterations``;
    :class:`KrylovNystrom`), then truncated to the wanted rank by an
    eigendecomposition of the small core: for ``rank + oversample`` columns in
    ``Ω`` it costs ``q + 1`` products with that many vectors plus
    ``O(N·((q + 1)(rank + oversample))²)``. ``UUᵀ`` and ``G − UUᵀ`` are positive
    semi-definite; parameters with a zero diagonal get zero rows.

    * ``rank`` given: ``Ω`` has ``rank + oversample`` columns (``stop == "rank"``).
    * ``tol`` given: rounds of ``FIRST_BLOCK + oversample`` new start vectors,
      then as many as all before (at most ``max_rank + oversample`` in all),
      each adding its Krylov space. After each round the rank is the number of
      eigenvalue estimates above ``0.9·tol·‖G‖`` or, if that misses ``tol``, above
      ``tol·‖G‖/2`` (at most ``max_rank``), and the
      loop stops when the block-Lanczos estimate of ``‖G − UUᵀ‖₂``
      (:func:`~dgnh.spectral.estimate_norm`, the certificate of
      :func:`dgnh.compress`, same ``seed``) is ``≤ tol·‖G‖₂`` (``stop ==
      "estimate"``), when the rank reaches ``max_rank`` without it (``"max_rank"``:
      the cap binds), when the start vectors are used up (``"budget"``) or when the
      space spans every live row (``"exact"``).

    Parameters
    ----------
    op : a dgnh Operator (e.g. GaussNewton) of a PSD matrix; a ``diagonal()``
        method, if present, marks the zero rows.
    rank : rank of the result (``rank + oversample <= N``); give ``rank`` or ``tol``.
    oversample : extra start vectors (>= 0).
    seed : random seed (the test matrices and the error estimate).
    power_iterations : ``q >= 0``; 0 is the plain one-product Nyström.
    tol : relative tolerance in (0, 1) on ``‖G − UUᵀ‖₂/‖G‖₂``.
    max_rank : cap on the adaptive rank (>= 1).
    norm_estimate : ``‖G‖₂`` if known (``dgnh.compress`` passes its Lanczos
        estimate); otherwise the largest eigenvalue estimate, a lower bound.
    progress : show a progress bar (products so far).

    Returns
    -------
    LowRank
        ``report``: method, parameters, ``rank``, ``eigenvalues`` (the kept
        estimates), ``tail_eigenvalue`` (the first discarded one, a lower bound on
        the optimal error ``λ_{r+1}``), ``krylov_dimension``, ``n_products``,
        ``rounds``, ``stop``, ``converged``, ``norm_estimate``,
        ``error_estimate`` (relative; adaptive only) and ``timings``
        (``products``, ``total``).

    Examples
    --------
    >>> import numpy as np
    >>> A = LowRank(np.random.default_rng(0).normal(size=(30, 3)))
    >>> lr = nystrom(A, rank=3)
    >>> bool(np.allclose(lr.to_dense(), A.to_dense()))
    True
    >>> nystrom(A, tol=1e-6).rank
    3
    """
    if not isinstance(op, Operator):
        raise TypeError(f"op must be a dgnh Operator, got {type(op).__name__}")
    N = op.shape[0]
    oversample = check_int(oversample, "oversample", minimum=0)
    power_iterations = check_int(power_iterations, "power_iterations", minimum=0)
    max_rank = check_int(max_rank, "max_rank", minimum=1)
    if (rank is None) == (tol is None):
        raise ValueError("give either rank (a fixed rank) or tol (an adaptive rank), not "
                         f"{'both' if rank is not None else 'neither'}")
    if rank is not None:
        rank = check_int(rank, "rank", minimum=1)
        if rank + oversample > N:
            raise ValueError(f"rank + oversample = {rank + oversample} exceeds the operator "
                             f"size N = {N}")
    else:
        tol = check_fraction(tol, "tol")
    if norm_estimate is not None:
        norm_estimate = check_number(norm_estimate, "norm_estimate", low=0)
    t_start = time.perf_counter()
    diagonal = getattr(op, "diagonal", None)
    live = np.ones(N, bool) if diagonal is None else np.asarray(diagonal()) > 0
    depth = power_iterations + 1
    capacity = (rank if rank is not None else max_rank) + oversample
    space = KrylovNystrom(op.matvec, live, capacity * depth)
    rng = np.random.default_rng(seed)
    bar = tqdm(desc="Nyström", unit="product", disable=not progress)
    if rank is not None:
        space.extend(rng.standard_normal((N, rank + oversample)), depth)
        lam = space.eigenvalues()
        U = space.truncated(rank)
        stop, rounds, error = "rank", 1, None
        bar.update(space.n_products)
    else:
        lam, U, stop, rounds, error = _adaptive(op, space, rng, tol, max_rank, oversample,
                                                depth, norm_estimate, seed, bar)
    bar.close()
    r = U.shape[1]
    norm = norm_estimate if norm_estimate is not None else float(lam[0]) if len(lam) else 0.0
    report = {
        "method": "nystrom", "rank": r, "tol": tol, "max_rank": max_rank if tol else None,
        "oversample": oversample, "power_iterations": power_iterations, "seed": seed,
        "eigenvalues": lam[:r].tolist(),
        "tail_eigenvalue": float(lam[r]) if len(lam) > r else 0.0,
        "krylov_dimension": space.dimension, "n_products": space.n_products,
        "rounds": rounds, "stop": stop, "converged": stop in ("rank", "estimate", "exact"),
        "n_zero_diagonal": int(N - live.sum()), "norm_estimate": norm,
        "error_estimate": error,
        "timings": {"products": space.seconds, "total": time.perf_counter() - t_start},
    }
    return LowRank(U, report)


def _adaptive(op, space: KrylovNystrom, rng, tol: float, max_rank: int, oversample: int,
              depth: int, norm: float | None, seed: int, bar) -> tuple:
    """The adaptive rounds of :func:`nystrom`: ``(λ, U, stop, rounds, relative error estimate)``."""
    N = op.shape[0]
    budget = max_rank + oversample  # start vectors in all
    block, used, rounds = min(FIRST_BLOCK, max_rank) + oversample, 0, 0
    while True:
        space.extend(rng.standard_normal((N, block)), depth)
        used, rounds = used + block, rounds + 1
        bar.update(space.n_products - bar.n)
        lam = space.eigenvalues()
        scale = norm if norm is not None else float(lam[0]) if len(lam) else 0.0
        exact = space.full or scale == 0  # then the approximation is exact: tol is met
        ranks = [min(int(np.count_nonzero(lam > keep * tol * scale)), max_rank)
                 for keep in (TRIM, KEEP)]
        last = exact or used >= budget
        for r in sorted(set(ranks)):  # the smaller rank first, if start vectors cover it
            if not (last or r <= used - oversample):
                break
            U = space.truncated(r)
            error = _relative_error(op, U, scale, seed, space.live)
            if error <= tol:
                return lam, U, "exact" if exact else "estimate", rounds, error
        if last:
            stop = "max_rank" if r == max_rank else "exact" if exact else "budget"
            return lam, U, stop, rounds, error
        block = min(used, budget - used)


def _relative_error(op, U: Array, norm: float, seed: int, live: Array) -> float:
    """Block-Lanczos estimate of ``‖G − UUᵀ‖₂/norm`` (the certificate of ``dgnh.compress``)."""
    if norm <= 0:
        return 0.0
    return estimate_norm(lambda V: op.matvec(V) - U @ (U.T @ V), op.shape[0], seed=seed,
                         support=live) / norm
