"""Factorizations of ``A + λI`` for compressed (and exact) GNH operators.

A :class:`Factorization` is itself an :class:`~dgnh.operator.Operator` that
applies ``(A + λI)⁻¹``, so it can be handed to CG as a preconditioner.
Subclasses implement ``_matmat`` (the solve), ``logdet`` and
``inverse_diagonal``.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

from .operator import Operator
from .validation import check_int, check_number

Array = np.ndarray
ROW_CHUNK = 65_536  # rows of W formed at a time by LowRankUpdate.inverse_diagonal
SOLVE_COLUMNS = 16  # columns of Z = base⁻¹U solved at a time by LowRankUpdate


class IndefiniteError(ValueError):
    """The approximation plus ``reg·I`` is not positive definite."""


def check_reg(reg) -> float:
    """Validate a regularization ``λ > 0`` (finite); returns it as a ``float``.

    Examples
    --------
    >>> check_reg(1)
    1.0
    >>> check_reg(0.0)
    Traceback (most recent call last):
    ...
    ValueError: reg must be a finite number > 0, got 0.0: the GNH is singular whenever ...
    """
    try:
        return check_number(reg, "reg", low=0, low_open=True)
    except ValueError:  # one message for NaN, Inf and reg <= 0, saying why λ > 0 is needed
        raise ValueError(
            f"reg must be a finite number > 0, got {reg}: the GNH is singular whenever "
            "n_params > n_samples · n_outputs, so every solve needs a regularization"
        ) from None


class Factorization(Operator):
    """``(A + reg·I)⁻¹`` of a symmetric positive semi-definite approximation ``A``."""

    reg: float

    def solve(self, B) -> Array:
        """``(A + reg·I)⁻¹ B`` for a vector ``(N,)`` or a matrix ``(N, k)``."""
        return self.matvec(B)

    def logdet(self) -> float:
        """``log det(A + reg·I)``."""
        raise NotImplementedError

    def inverse_diagonal(self) -> Array:
        """The diagonal of ``(A + reg·I)⁻¹``."""
        raise NotImplementedError

    def factorized_matmat(self, V: Array) -> Array:
        """``(A + reg·I) V``: the operator this object inverts (for refinement)."""
        raise NotImplementedError


class ScaledIdentity(Factorization):
    """The trivial factorization ``(0 + reg·I)⁻¹ = I/reg`` of size ``n``.

    The base on which :class:`LowRankUpdate` builds the factorization of a
    global low-rank approximation ``UUᵀ + reg·I``.

    Examples
    --------
    >>> ScaledIdentity(3, 2.0).solve(np.ones(3)).tolist()
    [0.5, 0.5, 0.5]
    """

    def __init__(self, n: int, reg: float):
        n = check_int(n, "n", minimum=1)
        self.reg = check_reg(reg)
        self.shape = (n, n)

    def _matmat(self, V: Array) -> Array:
        return V / self.reg

    def factorized_matmat(self, V: Array) -> Array:
        return self.reg * V

    def logdet(self) -> float:
        return self.shape[0] * float(np.log(self.reg))

    def inverse_diagonal(self) -> Array:
        return np.full(self.shape[0], 1.0 / self.reg)

    @property
    def nbytes(self) -> int:
        return 0


def _solve_columns(base: Factorization, U: Array) -> Array:
    """``base.solve(U)`` into one ``N × r`` array, ``SOLVE_COLUMNS`` columns at a time (a
    base's solve may hold several ``N × k`` temporaries: an HSS solve holds five)."""
    Z = np.empty(U.shape)
    for j in range(0, U.shape[1], SOLVE_COLUMNS):
        Z[:, j:j + SOLVE_COLUMNS] = base.solve(U[:, j:j + SOLVE_COLUMNS])
    return Z


class LowRankUpdate(Factorization):
    """Factorization of ``A + UUᵀ + reg·I`` on top of a factorization of ``A + reg·I``.

    Sherman–Morrison–Woodbury with ``Z = (A + reg·I)⁻¹ U``, the ``r × r``
    capacitance matrix ``K = I + UᵀZ = L Lᵀ`` (Cholesky) and ``W = Z L⁻ᵀ``:

    * ``solve``: ``x = base.solve(b) − W (Wᵀ b)`` (one base solve and two GEMMs);
    * ``logdet``: ``base.logdet() + log det K`` (matrix determinant lemma);
    * ``inverse_diagonal``: ``base.inverse_diagonal() − Σ_j W[:, j]²``.

    Set-up costs base solves with ``r`` right-hand sides (``SOLVE_COLUMNS`` at a time)
    plus O(N·r²); it
    stores ``W`` and ``U`` (N × r each) — on a :class:`ScaledIdentity` base
    only ``U``: there ``Z = U/reg`` and ``W = U·(L⁻ᵀ/reg)`` is applied through
    its ``r × r`` factor. The Woodbury subtraction alone leaves a
    residual of about ``eps·‖UUᵀ‖/reg`` (1e-10 at ``reg = 1e-6‖UUᵀ‖``), with the
    error in the dominant directions; ``solve`` therefore adds one step of
    iterative refinement against ``A + UUᵀ + reg·I`` (one more base solve and
    product), which brings the residual down to the level of a dense Cholesky
    solve.

    Parameters
    ----------
    base : Factorization
        Of ``A + reg·I``, with ``A`` positive semi-definite; its ``reg`` is used.
    U : array ``(N, r)``

    Raises
    ------
    IndefiniteError
        If ``K`` is not numerically positive definite (``base`` not of a PSD matrix).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> U = rng.normal(size=(6, 2))
    >>> f = LowRankUpdate(ScaledIdentity(6, 0.5), U)
    >>> b = rng.normal(size=6)
    >>> bool(np.allclose((U @ U.T + 0.5 * np.eye(6)) @ f.solve(b), b))
    True
    """

    def __init__(self, base: Factorization, U):
        if not isinstance(base, Factorization):
            raise TypeError(f"base must be a dgnh Factorization, got {type(base).__name__}")
        U = np.asarray(U, dtype=np.float64)
        if U.ndim != 2 or U.shape[0] != base.shape[0]:
            raise ValueError(
                f"U must have shape ({base.shape[0]}, r) to match the base factorization, "
                f"got {U.shape}"
            )
        if not np.all(np.isfinite(U)):
            raise ValueError("U contains NaN or Inf")
        self.base = base
        self.reg = base.reg
        self.shape = base.shape
        r = U.shape[1]
        # on a ScaledIdentity base Z = U/reg is never formed
        Z = None if isinstance(base, ScaledIdentity) or not r else _solve_columns(base, U)
        K = np.eye(r) + (U.T @ U / base.reg if Z is None else U.T @ Z)
        try:
            chol = scipy.linalg.cholesky((K + K.T) / 2, lower=True)
        except np.linalg.LinAlgError as err:
            raise IndefiniteError(
                "the Woodbury capacitance matrix I + Uᵀ(A + reg·I)⁻¹U is not positive "
                "definite: the base factorization is not of a positive definite matrix"
            ) from err
        self.U = U
        self.logdet_capacitance = 2.0 * float(np.sum(np.log(np.diag(chol))))
        if Z is None:  # W = U·C with C = L⁻ᵀ/reg: no N × r array besides U
            self._left = U
            self._coef = scipy.linalg.solve_triangular(chol, np.eye(r), lower=True).T / base.reg
        else:
            # W = Z L⁻ᵀ computed in Z's memory (Zᵀ is column-major): one N × r array, not two
            self._left = scipy.linalg.solve_triangular(chol, Z.T, lower=True, overwrite_b=True).T
            self._coef = None

    @property
    def rank(self) -> int:
        return self.U.shape[1]

    @property
    def nbytes(self) -> int:
        W = self._left.nbytes if self._coef is None else self._coef.nbytes
        return int(W + self.U.nbytes + getattr(self.base, "nbytes", 0))

    def _W_times(self, X: Array) -> Array:
        return self._left @ (X if self._coef is None else self._coef @ X)

    def _Wt_times(self, V: Array) -> Array:
        X = self._left.T @ V
        return X if self._coef is None else self._coef.T @ X

    def _woodbury(self, V: Array) -> Array:
        return self.base.solve(V) - self._W_times(self._Wt_times(V))

    def _matmat(self, V: Array) -> Array:
        X = self._woodbury(V)
        return X + self._woodbury(V - self.factorized_matmat(X))

    def factorized_matmat(self, V: Array) -> Array:
        return self.base.factorized_matmat(V) + self.U @ (self.U.T @ V)

    def logdet(self) -> float:
        return self.base.logdet() + self.logdet_capacitance

    def inverse_diagonal(self) -> Array:
        out = np.array(self.base.inverse_diagonal(), dtype=np.float64)
        for a in range(0, self.shape[0], ROW_CHUNK):  # − Σ_j W[i, j]², a block of rows at a time
            W = self._left[a:a + ROW_CHUNK]
            if self._coef is not None:
                W = W @ self._coef
            out[a:a + ROW_CHUNK] -= np.einsum("ij,ij->i", W, W)
        return out
