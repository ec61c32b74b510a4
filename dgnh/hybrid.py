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
from .packing import jsonable

Array = np.ndarray
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
    ...     def entries_many(self, req, eps=None, delta=0.01, seed=0):
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
        # what an entry costs, as the source's (the H-matrix tree; 0: cheap, e.g. dense)
        self.n_jacobian_rows = int(getattr(source, "n_jacobian_rows", 0))
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

    def entries_many(self, requests, eps: float | None = None, delta: float = 0.01,
                     seed: int = 0) -> list[Array]:
        """Blocks of ``G − UUᵀ`` (sampled ones keep the source's ``eps``/``delta`` guarantee on G)."""
        blocks = list(self.source.entries_many(requests, eps=eps, delta=delta, seed=seed))
        for i, (r, c) in enumerate(requests):  # each of G's blocks freed as its remainder
            # is made: never two copies of a round's blocks
            blocks[i] = (np.asarray(blocks[i], dtype=np.float64)
                         - self.U[np.asarray(r, dtype=np.int64)]
                         @ self.U[np.asarray(c, dtype=np.int64)].T)
        return blocks


class Hybrid(Operator):
    """A low-rank part plus an H-matrix of the remainder: ``UUᵀ + H(G − UUᵀ)``.

    ``factorize(reg)`` factorizes the H-matrix part (HSS) and adds ``UUᵀ`` by
    Woodbury (:class:`~dgnh.factorization.LowRankUpdate`).
    """

    kind = "hybrid"  # its name in a result store (dgnh.store.STORED_KINDS)
    parts = ("lowrank", "hmatrix")  # its stored operators: subgroups in a result store

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

    @property
    def is_hss(self) -> bool:
        """True when the H-matrix part has no near field: :meth:`factorize` is then exact."""
        return self.hmatrix.is_hss

    def factorize(self, reg: float) -> Factorization:
        """``(UUᵀ + H_hss + reg·I)⁻¹`` (Woodbury on the HSS factorization), O(N·r²)."""
        return LowRankUpdate(self.hmatrix.factorize(check_reg(reg)), self.lowrank.U)

    # ---------------------------------------------------------------- storage
    def to_arrays(self) -> dict[str, Array]:
        """``lowrank_U`` plus the H-matrix arrays prefixed ``hmatrix/``."""
        return {"lowrank_U": self.lowrank.U,
                **{f"hmatrix/{k}": v for k, v in self.hmatrix.to_arrays().items()}}

    def attrs(self) -> dict[str, Any]:
        """JSON-friendly attributes beside :meth:`to_arrays`: ``report`` and those of each part."""
        return {"report": jsonable(self.report),
                **{name: getattr(self, name).attrs() for name in self.parts}}

    @classmethod
    def from_arrays(cls, arrays: dict[str, Array], attrs: dict[str, Any]) -> "Hybrid":
        """Rebuild a :class:`Hybrid` from :meth:`to_arrays` and :meth:`attrs`.

        Examples
        --------
        >>> import numpy as np, dgnh
        >>> rng = np.random.default_rng(0)
        >>> net = dgnh.MLP([rng.normal(size=(6, 3)), rng.normal(size=(2, 6))],
        ...                [np.zeros(6), np.zeros(2)], ["tanh", "identity"])
        >>> gn = dgnh.GaussNewton(net, rng.normal(size=(8, 3)), rng.normal(size=(8, 2)))
        >>> op = dgnh.compress(gn, method="hybrid", max_rank=8, leaf_size=8, progress=False)
        >>> back = Hybrid.from_arrays(op.to_arrays(), op.attrs())
        >>> v = rng.normal(size=gn.n_params)
        >>> bool(np.array_equal(back @ v, op @ v))
        True
        """
        hmatrix = {k[len("hmatrix/"):]: v for k, v in arrays.items() if k.startswith("hmatrix/")}
        return cls.from_parts({"lowrank": LowRank.from_arrays({"U": arrays["lowrank_U"]},
                                                              attrs["lowrank"]),
                               "hmatrix": HMatrix.from_arrays(hmatrix, attrs["hmatrix"])}, attrs)

    @classmethod
    def from_parts(cls, parts: dict[str, Operator], attrs: dict[str, Any]) -> "Hybrid":
        """A :class:`Hybrid` of its :attr:`parts` (by name) with the report in ``attrs``."""
        return cls(parts["lowrank"], parts["hmatrix"], attrs.get("report"))
