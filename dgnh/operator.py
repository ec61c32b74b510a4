"""One base class for every symmetric operator of dgnh (GNH, Hessian, compressions).

Subclasses implement :meth:`Operator._matmat` for an ``(N, k)`` block of
vectors; the base class gives ``@``, ``matvec``, ``.T``, ``to_dense`` and the
export to :class:`scipy.sparse.linalg.LinearOperator`, and validates inputs.
"""

from __future__ import annotations

import numpy as np
from scipy.sparse.linalg import LinearOperator

from .validation import check_real_array

Array = np.ndarray


class Operator:
    """A symmetric linear operator of shape ``(N, N)``.

    Examples
    --------
    >>> import numpy as np
    >>> class Diagonal(Operator):
    ...     def __init__(self, d):
    ...         self.d = np.asarray(d, float)
    ...         self.shape = (len(d), len(d))
    ...     def _matmat(self, V):
    ...         return self.d[:, None] * V
    >>> (Diagonal([1.0, 2.0]) @ np.ones(2)).tolist()
    [1.0, 2.0]
    """

    shape: tuple[int, int]
    dtype = np.dtype(np.float64)

    def _matmat(self, V: Array) -> Array:  # pragma: no cover - abstract
        raise NotImplementedError

    def matvec(self, V) -> Array:
        """``self @ V`` for a vector ``(N,)`` or a matrix of vectors ``(N, k)``."""
        V = check_real_array(V, "V")
        if V.ndim not in (1, 2) or V.shape[0] != self.shape[1]:
            raise ValueError(
                f"operator of shape {self.shape} cannot multiply an array of shape {V.shape}: "
                f"expected ({self.shape[1]},) or ({self.shape[1]}, k)"
            )
        if V.ndim == 1:
            return self._matmat(V[:, None])[:, 0]
        if V.shape[1] == 0:
            return np.zeros((self.shape[0], 0), dtype=self.dtype)
        return self._matmat(V)

    def __matmul__(self, V) -> Array:
        return self.matvec(V)

    @property
    def T(self) -> "Operator":
        """The transpose (these operators are symmetric)."""
        return self

    def as_linear_operator(self) -> LinearOperator:
        """Export as :class:`scipy.sparse.linalg.LinearOperator`."""
        return LinearOperator(
            self.shape,
            matvec=lambda v: self._matmat(np.asarray(v).reshape(-1, 1))[:, 0],
            rmatvec=lambda v: self._matmat(np.asarray(v).reshape(-1, 1))[:, 0],
            matmat=self._matmat,
            dtype=self.dtype,
        )

    def to_dense(self, max_bytes: int = 2**30) -> Array:
        """The dense matrix, for small N (refuses above ``max_bytes``)."""
        check_dense_size(self.shape[0], np.dtype(self.dtype).itemsize, max_bytes)
        return self._matmat(np.eye(self.shape[1], dtype=self.dtype))


def check_dense_size(N: int, itemsize: int, max_bytes: int) -> None:
    """Raise a ``ValueError`` giving the bytes an ``N × N`` matrix would need."""
    need = N * N * itemsize
    if need > max_bytes:
        raise ValueError(
            f"the dense {N} x {N} matrix needs {need:,} bytes ({need / 2**30:.2f} GiB), "
            f"above the limit max_bytes={max_bytes:,}; raise max_bytes or use "
            f"entries()/compress() instead"
        )
