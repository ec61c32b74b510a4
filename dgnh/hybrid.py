"""The hybrid compressed form ``UUᵀ + H(G − UUᵀ)`` and the entry source of the remainder.

:class:`RemainderSource` wraps an entry source and subtracts a low-rank part
from every entry, diagonal and product, so an H-matrix can be built of the
remainder; :class:`Hybrid` is the resulting operator.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .factorization import Factorization, LowRankUpdate, check_reg
from .hmatrix import HMatrix
from .lowrank import LowRank
from .operator import Operator

Array = np.ndarray
REMAINDER_ZERO = 1e-12  # remainder diagonal below this fraction of G_aa counts as zero


REMAINDER_ZERO = 1e-12  # remainder diagonal below this fraction of G_aa counts as zero



class RemainderSource:
    """Entry source for ``G − UUᵀ`` (the remainder of a low-rank part).

    Wraps an entry source (``n_params``, ``diagonal()``, ``entries_many``) and
    subtracts ``U_I U_Jᵀ`` from every block. A remainder diagonal at or below
    ``1e-12·G_aa`` (rounding, e.g. at the pivots) is taken as exactly zero, so
    those parameters stay out of the remainder's tree.

    Examples
    --------
    >>> class Dense:
    ...     def __init__(self, G): self.G, self.n_params = G, len(G)
    ...     def diagonal(self): return np.diag(self.G).copy()
    ...     def entries_many(self, req, eps=None, seed=0):
    ...         return [self.G[np.ix_(r, c)] for r, c in req]
    >>> U = np.array([[1.0], [2.0]])
    >>> R = RemainderSource(Dense(U @ U.T + np.eye(2)), U)
    >>> R.entries_many([([0, 1], [0, 1])])[0].tolist(), R.diagonal().tolist()
    ([[1.0, 0.0], [0.0, 1.0]], [1.0, 1.0])
    """

    def __init__(self, source, U: Array):
        self.source = source
        self.U = np.asarray(U, dtype=np.float64)
        self.n_params = int(source.n_params)
        if self.U.ndim != 2 or self.U.shape[0] != self.n_params:
            raise ValueError(f"U must have shape ({self.n_params}, r), got {self.U.shape}")

    @property
    def stats(self) -> dict:
        return getattr(self.source, "stats", {})

    def diagonal(self) -> Array:
        full = np.asarray(self.source.diagonal(), dtype=np.float64)
        rem = full - np.einsum("ij,ij->i", self.U, self.U)
        rem[rem <= REMAINDER_ZERO * full] = 0.0
        return rem

    def matvec(self, V: Array) -> Array:
        """``(G − UUᵀ) V`` with exact products of the wrapped source."""
        return np.asarray(self.source.matvec(V), dtype=np.float64) - self.U @ (self.U.T @ V)

    def entries_many(self, requests, eps: float | None = None, seed: int = 0) -> list[Array]:
        blocks = self.source.entries_many(requests, eps=eps, seed=seed)
        return [np.asarray(B, dtype=np.float64) - self.U[np.asarray(r, dtype=np.int64)]
                @ self.U[np.asarray(c, dtype=np.int64)].T for B, (r, c) in zip(blocks, requests)]



class Hybrid(Operator):
    """A low-rank part plus an H-matrix of the remainder: ``UUᵀ + H(G − UUᵀ)``.

    ``factorize(reg)`` factorizes the H-matrix part (HSS) and adds ``UUᵀ`` by
    Woodbury (:class:`~dgnh.factorization.LowRankUpdate`).
    """

    def __init__(self, lowrank: LowRank, hmatrix: HMatrix, report: dict[str, Any] | None = None):
        if lowrank.shape != hmatrix.shape:
            raise ValueError(f"shapes differ: low-rank {lowrank.shape}, H-matrix {hmatrix.shape}")
        self.lowrank, self.hmatrix = lowrank, hmatrix
        self.shape = lowrank.shape
        self.report: dict[str, Any] = dict(report or {})

    def __repr__(self) -> str:
        return f"Hybrid(rank={self.lowrank.rank}, hmatrix={self.hmatrix!r})"

    @property
    def nbytes(self) -> int:
        return self.lowrank.nbytes + self.hmatrix.nbytes

    def rank_statistics(self) -> dict[str, Any]:
        return {"lowrank_rank": self.lowrank.rank, **self.hmatrix.rank_statistics()}

    def _matmat(self, V: Array) -> Array:
        return self.lowrank._matmat(V) + self.hmatrix._matmat(V)

    def factorize(self, reg: float) -> Factorization:
        """``(UUᵀ + H_hss + reg·I)⁻¹`` (Woodbury on the HSS factorization), O(N·r²)."""
        return LowRankUpdate(self.hmatrix.factorize(check_reg(reg)), self.lowrank.U)

    def to_arrays(self) -> dict[str, Array]:
        """``lowrank_U`` plus the H-matrix arrays prefixed ``hmatrix/``."""
        return {"lowrank_U": self.lowrank.U,
                **{f"hmatrix/{k}": v for k, v in self.hmatrix.to_arrays().items()}}
