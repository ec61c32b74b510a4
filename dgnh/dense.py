"""The dense compressed form: the whole GNH from exact entries, for small N.

:class:`Dense` holds ``G`` itself (``8·N²`` bytes), symmetric and positive
semi-definite up to rounding; its factorization :class:`DenseCholesky` is the
Cholesky factorization of ``G + reg·I``, exact for every ``reg > 0``.
``dgnh.compress`` offers it as ``method="dense"`` and lets ``"auto"`` pick it
when nothing smaller meets ``tol``.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import scipy.linalg

from .factorization import Factorization, IndefiniteError, check_reg
from .operator import Operator, check_dense_size
from .packing import jsonable
from .validation import check_real_array

Array = np.ndarray
DENSE_MAX_BYTES = 2**30  # the largest dense form dgnh.compress builds (N <= 11 585)


class Dense(Operator):
    """The symmetric positive semi-definite matrix ``G`` held densely.

    Parameters
    ----------
    G : array ``(N, N)``, symmetric (it is symmetrized: ``(G + Gᵀ)/2``).
    report : dict, optional
        How ``G`` was made (timings, ...); copied.

    Examples
    --------
    >>> import numpy as np
    >>> op = Dense(np.array([[2.0, 1.0], [1.0, 2.0]]))
    >>> (op @ np.ones(2)).tolist(), op.nbytes
    ([3.0, 3.0], 32)
    """

    kind = "dense"  # its name in a result store (dgnh.store.STORED_KINDS)
    is_hss = True  # no near field: factorize() is exact

    def __init__(self, G, report: dict[str, Any] | None = None):
        G = check_real_array(G, "G", ndim=2)
        if G.shape[0] != G.shape[1] or G.shape[0] == 0:
            raise ValueError(f"G must be a square matrix of shape (N, N) with N >= 1, "
                             f"got {G.shape}")
        G = G.astype(np.float64, copy=False)
        self.G = (G + G.T) / 2
        self.shape = self.G.shape
        self.report = dict(report or {})
        self.report.setdefault("nbytes", self.nbytes)

    @classmethod
    def from_source(cls, source, max_bytes: int = DENSE_MAX_BYTES) -> "Dense":
        """All exact entries ``G[:, :]`` of an entry source in one ``entries_many`` round.

        Refuses above ``max_bytes`` (one line giving the bytes needed).

        Examples
        --------
        >>> import numpy as np, dgnh
        >>> rng = np.random.default_rng(0)
        >>> net = dgnh.MLP([rng.normal(size=(4, 3)), rng.normal(size=(2, 4))],
        ...                [np.zeros(4), np.zeros(2)], ["tanh", "identity"])
        >>> gn = dgnh.GaussNewton(net, rng.normal(size=(5, 3)), rng.normal(size=(5, 2)))
        >>> bool(np.allclose(Dense.from_source(gn).G, gn.dense()))
        True
        """
        n = int(source.n_params)
        check_dense_size(n, 8, max_bytes)
        t0 = time.perf_counter()
        idx = np.arange(n)
        G = np.asarray(source.entries_many([(idx, idx)])[0], dtype=np.float64)
        seconds = time.perf_counter() - t0
        return cls(G, {"method": "dense", "timings": {"entries": seconds, "total": seconds}})

    def __repr__(self) -> str:
        return f"Dense(n_params={self.shape[0]})"

    @property
    def nbytes(self) -> int:
        """Bytes held by ``G``."""
        return int(self.G.nbytes)

    def rank_statistics(self) -> dict[str, Any]:
        """No rank entries: the dense form is the matrix itself."""
        return {}

    def _matmat(self, V: Array) -> Array:
        return self.G @ V

    def diagonal(self) -> Array:
        """The diagonal of ``G``."""
        return np.diag(self.G).copy()

    def to_dense(self, max_bytes: int = 2**30) -> Array:
        """A copy of ``G`` (refuses above ``max_bytes``)."""
        check_dense_size(self.shape[0], 8, max_bytes)
        return self.G.copy()

    def factorize(self, reg: float) -> "DenseCholesky":
        """The Cholesky factorization of ``G + reg·I``, O(N³/3).

        Examples
        --------
        >>> import numpy as np
        >>> f = Dense(np.eye(3)).factorize(1.0)
        >>> np.round(f.solve(np.ones(3)), 12).tolist(), round(f.logdet(), 12)
        ([0.5, 0.5, 0.5], 2.07944154168)
        """
        return DenseCholesky(self.G, check_reg(reg))

    # ---------------------------------------------------------------- storage
    def to_arrays(self) -> dict[str, Array]:
        """The arrays to store: ``G``. See :meth:`from_arrays`."""
        return {"G": self.G}

    def attrs(self) -> dict[str, Any]:
        """JSON-friendly attributes to store beside :meth:`to_arrays`: ``n_params``, ``report``."""
        return {"n_params": self.shape[0], "report": jsonable(self.report)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, Array], attrs: dict[str, Any]) -> "Dense":
        """Rebuild a :class:`Dense` from :meth:`to_arrays` and :meth:`attrs`.

        Examples
        --------
        >>> import numpy as np
        >>> op = Dense(np.eye(2))
        >>> Dense.from_arrays(op.to_arrays(), op.attrs()).shape
        (2, 2)
        >>> Dense.from_arrays(op.to_arrays(), {"n_params": 3})
        Traceback (most recent call last):
        ...
        ValueError: G has shape (2, 2), n_params is 3
        """
        G = np.asarray(arrays["G"])
        n = attrs.get("n_params")
        if G.shape != (n, n):
            raise ValueError(f"G has shape {G.shape}, n_params is {n}")
        return cls(G, attrs.get("report"))


class DenseCholesky(Factorization):
    """``(G + reg·I)⁻¹`` by a dense Cholesky factorization ``LLᵀ``.

    ``solve`` by two triangular solves, ``logdet = 2 Σ log L_ii``, the inverse
    diagonal from the rows of ``L⁻¹`` (O(N³/3), computed on first use).

    Raises
    ------
    IndefiniteError
        If ``G + reg·I`` is not numerically positive definite.

    Examples
    --------
    >>> import numpy as np
    >>> f = DenseCholesky(np.diag([1.0, 3.0]), 1.0)
    >>> np.round(f.inverse_diagonal(), 12).tolist()
    [0.5, 0.25]
    """

    def __init__(self, G, reg: float):
        self.G = np.asarray(G, dtype=np.float64)
        self.reg = check_reg(reg)
        self.shape = self.G.shape
        try:
            self.L = scipy.linalg.cholesky(self.G + self.reg * np.eye(self.shape[0]),
                                           lower=True)
        except np.linalg.LinAlgError as err:
            raise IndefiniteError(
                f"G + reg·I is not positive definite at reg = {self.reg:.3g}: G has an "
                "eigenvalue below −reg (not a positive semi-definite matrix)") from err
        self._inverse_diagonal: Array | None = None

    @property
    def nbytes(self) -> int:
        return int(self.L.nbytes)

    def _matmat(self, V: Array) -> Array:
        return scipy.linalg.cho_solve((self.L, True), V)

    def factorized_matmat(self, V: Array) -> Array:
        return self.G @ V + self.reg * V

    def logdet(self) -> float:
        return 2.0 * float(np.sum(np.log(np.diag(self.L))))

    def inverse_diagonal(self) -> Array:
        if self._inverse_diagonal is None:
            Linv = scipy.linalg.solve_triangular(self.L, np.eye(self.shape[0]), lower=True)
            self._inverse_diagonal = np.einsum("ij,ij->j", Linv, Linv)
        return self._inverse_diagonal.copy()
