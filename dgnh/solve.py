"""Preconditioned conjugate gradients on ``op + reg·I`` for any dgnh operator.

* :func:`cg` — preconditioned conjugate gradients on ``op + reg·I`` for one or
  several right-hand sides. The columns are independent CG runs that share
  every product ``op @ V`` (one batched GNH product per iteration instead of
  ``k``), and a column stops being updated once it has converged.
* A compressed representation (``dgnh.compress``) makes a good preconditioner:
  its factorization at the same ``reg`` is built automatically.
  :mod:`dgnh.exact_solve` applies this to a :class:`~dgnh.gauss_newton.GaussNewton`
  and adds the exact dual route.

The accuracy of a *direct* solve with a compressed ``H`` of relative error ``e``
degrades like ``e·‖G‖/λ``; for small ``λ`` solve with CG on the exact products and
use the compressed factorization as the preconditioner.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .factorization import Factorization, IndefiniteError, check_reg
from .operator import Operator
from .validation import check_fraction, check_int, check_real_array

Array = np.ndarray


@dataclass
class CGResult:
    """Outcome of :func:`cg`.

    Attributes
    ----------
    x : the solution, shaped like the right-hand side.
    n_iter : iterations run (the largest over the columns).
    residual_history : relative residuals ``‖b − (A + λI)x_j‖/‖b‖`` of the CG
        recurrence, shape ``(n_iter + 1,)`` for a vector, ``(n_iter + 1, k)``
        for ``k`` right-hand sides (a converged column keeps its last value).
    converged : whether every column reached ``rtol``.
    residual : the true relative residual(s) at the end, from one more product.
    """

    x: Array
    n_iter: int
    residual_history: Array
    converged: bool
    residual: Array | float


def check_rhs(B, n: int) -> Array:
    """Validate a right-hand side ``(n,)`` or ``(n, k)``; returns it as float64.

    Examples
    --------
    >>> check_rhs([1, 2], 2)
    array([1., 2.])
    >>> check_rhs(np.ones((3, 1)), 2)
    Traceback (most recent call last):
    ...
    ValueError: the right-hand side must have shape (2,) or (2, k) to match the operator ...
    """
    arr = check_real_array(B, "the right-hand side")
    if arr.ndim not in (1, 2) or arr.shape[0] != n:
        raise ValueError(
            f"the right-hand side must have shape ({n},) or ({n}, k) to match the operator "
            f"(n_params = {n}), got {arr.shape}"
        )
    return arr.astype(np.float64)


def _preconditioner(op, preconditioner, reg: float):
    """The map ``R ↦ M⁻¹R`` on ``(N, k)`` blocks for the supported preconditioners."""
    N = op.shape[0]
    if preconditioner is None:
        return None
    if isinstance(preconditioner, str):
        if preconditioner != "diagonal":
            raise ValueError(f"unknown preconditioner {preconditioner!r}: use None, "
                             "'diagonal', a Factorization or a compressed operator")
        if not hasattr(op, "diagonal"):
            raise TypeError(f"the 'diagonal' preconditioner needs op.diagonal(); "
                            f"{type(op).__name__} has none")
        inv = 1.0 / (np.asarray(op.diagonal(), dtype=np.float64) + reg)
        return lambda R: inv[:, None] * R
    if not isinstance(preconditioner, Factorization) and hasattr(preconditioner, "factorize"):
        preconditioner = preconditioner.factorize(reg)
    if not isinstance(preconditioner, Operator):
        raise TypeError("preconditioner must be None, 'diagonal', a Factorization or a "
                        f"compressed operator, got {type(preconditioner).__name__}")
    if preconditioner.shape != (N, N):
        raise ValueError(f"preconditioner of shape {preconditioner.shape} does not match the "
                         f"operator of shape {op.shape}")
    return lambda R: np.asarray(preconditioner._matmat(R), dtype=np.float64)


def cg(op: Operator, b, reg: float, preconditioner=None, rtol: float = 1e-8,
       maxiter: int | None = None) -> CGResult:
    """Preconditioned conjugate gradients on ``(op + reg·I) x = b``.

    Parameters
    ----------
    op : GaussNewton (exact products) or any dgnh Operator of a PSD matrix.
    b : right-hand side ``(N,)`` or ``(N, k)`` (independent columns, batched products).
    reg : λ > 0.
    preconditioner : None; ``"diagonal"`` (Jacobi with ``op.diagonal() + reg``);
        a :class:`~dgnh.factorization.Factorization` applying ``M⁻¹ ≈ (op + reg·I)⁻¹``
        (any reg); or a compressed operator with ``factorize(reg)``, factorized at ``reg``.
    rtol : stop when ``‖r‖ ≤ rtol·‖b‖`` for every column.
    maxiter : iteration cap (default ``10·N``).

    Returns
    -------
    CGResult

    Raises
    ------
    IndefiniteError
        If CG meets a direction of non-positive curvature (``op`` not PSD).

    Examples
    --------
    >>> import numpy as np
    >>> from dgnh.lowrank import LowRank
    >>> A = LowRank(np.random.default_rng(0).normal(size=(50, 5)))
    >>> res = cg(A, np.ones(50), reg=0.1)
    >>> res.converged, res.n_iter <= 6
    (True, True)
    """
    if not isinstance(op, Operator):
        raise TypeError(f"op must be a dgnh Operator (e.g. GaussNewton), got {type(op).__name__}")
    N = op.shape[0]
    reg = check_reg(reg)
    rtol = check_fraction(rtol, "rtol")
    B = check_rhs(b, N)
    maxiter = 10 * N if maxiter is None else check_int(maxiter, "maxiter", minimum=0)
    apply_M = _preconditioner(op, preconditioner, reg)
    vector = B.ndim == 1
    B2 = B[:, None] if vector else B

    def apply_A(V):
        return np.asarray(op._matmat(V), dtype=np.float64) + reg * V

    bnorm = np.linalg.norm(B2, axis=0)
    bnorm_safe = np.where(bnorm > 0, bnorm, 1.0)
    X = np.zeros_like(B2)
    R = B2.copy()
    Z = R if apply_M is None else apply_M(R)
    P = Z.copy()
    rz = np.einsum("ij,ij->j", R, Z)
    history = [np.linalg.norm(R, axis=0) / bnorm_safe]
    active = history[0] > rtol
    n_iter = 0
    while active.any() and n_iter < maxiter:
        a = np.flatnonzero(active)
        AP = apply_A(P[:, a])
        pAp = np.einsum("ij,ij->j", P[:, a], AP)
        if np.any(pAp <= 0):
            raise IndefiniteError(
                f"op + reg·I is not positive definite: CG met the curvature pᵀ(A + λI)p = "
                f"{pAp.min():.3e} <= 0 at iteration {n_iter + 1}; CG needs a positive "
                "semi-definite op (e.g. the GNH, not the Hessian) or a larger reg")
        alpha = rz[a] / pAp
        X[:, a] += alpha * P[:, a]
        R[:, a] -= alpha * AP
        Za = R[:, a] if apply_M is None else apply_M(R[:, a])
        rz_new = np.einsum("ij,ij->j", R[:, a], Za)
        P[:, a] = Za + (rz_new / rz[a]) * P[:, a]
        rz[a] = rz_new
        n_iter += 1
        res = history[-1].copy()
        res[a] = np.linalg.norm(R[:, a], axis=0) / bnorm_safe[a]
        history.append(res)
        active = res > rtol
    true_res = np.linalg.norm(B2 - apply_A(X), axis=0) / bnorm_safe
    hist = np.array(history)
    return CGResult(
        x=X[:, 0] if vector else X,
        n_iter=n_iter,
        residual_history=hist[:, 0] if vector else hist,
        converged=bool(not active.any()),
        residual=float(true_res[0]) if vector else true_res,
    )
