"""Exact solves with ``G + reg·I`` on a :class:`~dgnh.gauss_newton.GaussNewton`.

* :func:`solve` — preconditioned CG on the exact GNH products;
* :class:`DualFactorization` — the exact inverse through the ``n·d × n·d``
  dual matrix ``ĴĴᵀ + n·reg·I`` (Woodbury), assembled from the per-shard
  factors through the GaussNewton's public Jacobian products
  (:meth:`~dgnh.gauss_newton.GaussNewton.dual_gram`,
  :meth:`~dgnh.gauss_newton.GaussNewton.jacobian_matvec`, ...).
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg

from .factorization import Factorization, check_reg
from .gauss_newton import GaussNewton
from .solve import CGResult, cg, check_rhs

Array = np.ndarray


def solve(gn: GaussNewton, B, reg: float, rtol: float = 1e-8, preconditioner=None,
          maxiter: int | None = None) -> CGResult:
    """Solve ``(G + reg·I) X = B`` to ``rtol`` by CG on the exact GNH products of ``gn``.

    Parameters as in :func:`cg`; a compressed operator as ``preconditioner``
    (e.g. ``dgnh.compress(gn)``) is factorized at ``reg``. Warns
    (``RuntimeWarning``) when CG stops at ``maxiter`` before reaching ``rtol``.

    Examples
    --------
    >>> import numpy as np, dgnh
    >>> rng = np.random.default_rng(0)
    >>> net = dgnh.MLP([rng.normal(size=(5, 3)), rng.normal(size=(2, 5))],
    ...                [np.zeros(5), np.zeros(2)], ["tanh", "identity"])
    >>> gn = dgnh.GaussNewton(net, rng.normal(size=(40, 3)), rng.normal(size=(40, 2)))
    >>> res = solve(gn, np.ones(gn.n_params), reg=1e-3, preconditioner="diagonal")
    >>> res.converged, res.residual < 1e-7
    (True, True)
    """
    if not isinstance(gn, GaussNewton):
        raise TypeError(f"gn must be a dgnh.GaussNewton, got {type(gn).__name__}; "
                        "use dgnh.cg for other operators")
    result = cg(gn, B, reg, preconditioner=preconditioner, rtol=rtol, maxiter=maxiter)
    if not result.converged:
        warnings.warn(f"CG stopped after {result.n_iter} iterations at relative residual "
                      f"{np.max(result.residual_history[-1]):.2e} > rtol={rtol}; raise maxiter "
                      "or use a better preconditioner", RuntimeWarning, stacklevel=2)
    return result


class DualFactorization(Factorization):
    """Exact ``(G + reg·I)⁻¹`` through the dual matrix ``K = ĴĴᵀ + n·reg·I``.

    With ``G = ĴᵀĴ/n`` (``Ĵ = RJ``, ``m = n·d`` rows),
    ``(G + λI)⁻¹ = (1/λ)(I − Ĵᵀ K⁻¹ Ĵ)`` (Woodbury) and
    ``log det(G + λI) = N log λ + log det K − m log(nλ)`` (the dual determinant
    identity ``det(λI + ĴᵀĴ/n) = λ^N det(I + ĴĴᵀ/(nλ))``).

    ``ĴĴᵀ = Σ_l (C_l C_lᵀ) ∘ (X_{l-1}X_{l-1}ᵀ + 1_bias)`` is assembled from the stored
    per-shard factors by :meth:`GaussNewton.dual_gram
    <dgnh.gauss_newton.GaussNewton.dual_gram>`, one row block per shard (so shards
    may live on a Dask cluster). Memory: ``8·m²`` bytes for ``K`` on the driver
    (``m = 17970`` takes 2.6 GB) plus the shards' compact factors and the row
    blocks in flight, refused up front with these figures above ``max_bytes``
    (default: the memory budget of :mod:`dgnh.config` or of ``gn``); time
    ``O(m²·Σ_l d_l)`` to assemble plus ``m³/3``
    for the Cholesky factorization (scipy.linalg). Products ``Ĵv`` and ``Ĵᵀy``
    run on the shards (:meth:`~dgnh.gauss_newton.GaussNewton.jacobian_matvec`,
    :meth:`~dgnh.gauss_newton.GaussNewton.jacobian_rmatvec`: one GEMM per layer
    through the stored factors), so a solve costs two passes over the data plus
    ``O(m²·k)``.

    The Woodbury subtraction loses about ``eps·‖G‖/λ`` in relative accuracy.
    """

    def __init__(self, gn: GaussNewton, reg: float, max_bytes=None):
        if not isinstance(gn, GaussNewton):
            raise TypeError(f"gn must be a dgnh.GaussNewton, got {type(gn).__name__}")
        self.reg = check_reg(reg)
        self.gn = gn
        self.shape = gn.shape
        K = gn.dual_gram(max_bytes=max_bytes)
        K[np.diag_indices_from(K)] += gn.n_samples * self.reg
        try:
            self.chol = scipy.linalg.cho_factor(K, lower=True, overwrite_a=True,
                                                check_finite=False)
        except np.linalg.LinAlgError as err:  # pragma: no cover - K is SPD for reg > 0
            raise ValueError("the dual matrix ĴĴᵀ + n·reg·I is not numerically positive "
                             "definite; increase reg") from err
        self.n_rows = gn.n_jacobian_rows

    @property
    def nbytes(self) -> int:
        return int(self.chol[0].nbytes)

    def _matmat(self, V: Array) -> Array:
        V = np.asarray(V, dtype=np.float64)
        JV = self.gn.jacobian_matvec(V).astype(np.float64, copy=False)
        Y = scipy.linalg.cho_solve(self.chol, JV, check_finite=False)
        return (V - self.gn.jacobian_rmatvec(Y).astype(np.float64, copy=False)) / self.reg

    def factorized_matmat(self, V: Array) -> Array:
        """``(G + reg·I) V`` with exact GNH products."""
        return self.gn @ V + self.reg * V

    def logdet(self) -> float:
        n = self.gn.n_samples
        logdet_K = 2.0 * float(np.sum(np.log(np.diag(self.chol[0]))))
        return (self.shape[0] * np.log(self.reg) + logdet_K
                - self.n_rows * np.log(n * self.reg))

    def inverse_diagonal(self, chunk: int = 256) -> Array:
        """``diag((G + λI)⁻¹) = (1/λ)(1 − ‖L⁻¹Ĵ[:, a]‖²)``, O(m²·N) in column chunks."""
        N = self.shape[0]
        out = np.empty(N)
        for a in range(0, N, chunk):
            params = np.arange(a, min(a + chunk, N))
            J = self.gn.jacobian_columns(params).astype(np.float64)
            W = scipy.linalg.solve_triangular(self.chol[0], J, lower=True, check_finite=False)
            out[params] = (1.0 - np.einsum("ij,ij->j", W, W)) / self.reg
        return out


def dual_factorize(gn: GaussNewton, reg: float, max_bytes=None) -> DualFactorization:
    """The exact factorization of ``G + reg·I`` by the dual route (see :class:`DualFactorization`).

    Examples
    --------
    >>> import numpy as np, dgnh
    >>> rng = np.random.default_rng(0)
    >>> net = dgnh.MLP([rng.normal(size=(5, 3)), rng.normal(size=(2, 5))],
    ...                [np.zeros(5), np.zeros(2)], ["tanh", "identity"])
    >>> gn = dgnh.GaussNewton(net, rng.normal(size=(4, 3)), rng.normal(size=(4, 2)))
    >>> f = dual_factorize(gn, reg=0.1)
    >>> A = gn.dense() + 0.1 * np.eye(gn.n_params)
    >>> bool(np.isclose(f.logdet(), np.linalg.slogdet(A)[1]))
    True
    """
    return DualFactorization(gn, reg, max_bytes=max_bytes)


def dual_solve(gn: GaussNewton, B, reg: float, max_bytes=None) -> Array:
    """``(G + reg·I)⁻¹ B`` exactly, through the ``n·d × n·d`` dual matrix (Woodbury).

    ``B`` is ``(N,)`` or ``(N, k)``. For repeated solves or the log-determinant,
    keep the factorization from :func:`dual_factorize`.
    """
    if not isinstance(gn, GaussNewton):
        raise TypeError(f"gn must be a dgnh.GaussNewton, got {type(gn).__name__}")
    B = check_rhs(B, gn.n_params)
    return dual_factorize(gn, reg, max_bytes=max_bytes).solve(B)
