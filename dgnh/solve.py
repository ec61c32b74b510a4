"""Solves with ``G + λI``: preconditioned CG on exact products, and the exact dual route.

* :func:`cg` — preconditioned conjugate gradients on ``op + reg·I`` for one or
  several right-hand sides. The columns are independent CG runs that share
  every product ``op @ V`` (one batched GNH product per iteration instead of
  ``k``), and a column stops being updated once it has converged.
* :func:`solve` — CG on the exact GNH products of a :class:`GaussNewton`.
  A compressed representation (``dgnh.compress``) makes a good preconditioner:
  its factorization at the same ``reg`` is built automatically.
* :func:`dual_factorize` / :func:`dual_solve` — the exact dual (Woodbury) route
  through the ``n·d × n·d`` matrix ``ĴĴᵀ + nλI`` (design.md §2), for moderate
  ``n·d``.

The accuracy of a *direct* solve with a compressed ``H`` of relative error ``e``
degrades like ``e·‖G‖/λ``; for small ``λ`` solve with CG on the exact products and
use the compressed factorization as the preconditioner.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import scipy.linalg

from .factorization import Factorization, IndefiniteError, check_reg
from .gauss_newton import GaussNewton
from .operator import Operator

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


def _check_rtol(rtol) -> float:
    if isinstance(rtol, bool) or not isinstance(rtol, (int, float, np.integer, np.floating)):
        raise TypeError(f"rtol must be a number in (0, 1), got {rtol!r}")
    if not 0 < float(rtol) < 1:
        raise ValueError(f"rtol must lie in the open interval (0, 1), got {rtol}")
    return float(rtol)


def check_rhs(B, n: int) -> Array:
    """Validate a right-hand side ``(n,)`` or ``(n, k)``; returns it as float64."""
    arr = np.asarray(B)
    if arr.dtype == object or not (
        np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    ):
        raise TypeError(f"the right-hand side must be a real numeric array, got dtype {arr.dtype}")
    if arr.ndim not in (1, 2) or arr.shape[0] != n:
        raise ValueError(
            f"the right-hand side must have shape ({n},) or ({n}, k) to match the operator "
            f"(n_params = {n}), got {arr.shape}"
        )
    if not np.all(np.isfinite(arr)):
        raise ValueError("the right-hand side contains NaN or Inf")
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
    rtol = _check_rtol(rtol)
    B = check_rhs(b, N)
    if maxiter is None:
        maxiter = 10 * N
    if isinstance(maxiter, bool) or not isinstance(maxiter, (int, np.integer)) or maxiter < 0:
        raise ValueError(f"maxiter must be a non-negative integer, got {maxiter!r}")
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


# ------------------------------------------------------------------ dual route
class DualFactorization(Factorization):
    """Exact ``(G + reg·I)⁻¹`` through the dual matrix ``K = ĴĴᵀ + n·reg·I``.

    With ``G = ĴᵀĴ/n`` (``Ĵ = RJ``, ``m = n·d`` rows),
    ``(G + λI)⁻¹ = (1/λ)(I − Ĵᵀ K⁻¹ Ĵ)`` (Woodbury) and
    ``log det(G + λI) = N log λ + log det K − m log(nλ)`` (the dual determinant
    identity ``det(λI + ĴᵀĴ/n) = λ^N det(I + ĴĴᵀ/(nλ))``).

    ``ĴĴᵀ = Σ_l (C_l C_lᵀ) ∘ (X_{l-1}X_{l-1}ᵀ + 1_bias)`` is assembled from the stored
    per-shard factors, one row block per shard through the backend (so shards
    may live on a Dask cluster): every shard first returns its compact factors
    (``n_s·Σ_l(d·d_l + d_{l-1} + 1)`` numbers), then shard ``s`` computes its blocks
    against shards ``t ≥ s``. Memory: ``8·m²`` bytes for ``K`` on the driver
    (``m = 17970`` takes 2.6 GB; about 1.5× that while the row blocks arrive); time ``O(m²·Σ_l d_l)`` to assemble plus
    ``m³/3`` for the Cholesky factorization (scipy.linalg). Products ``Ĵv`` and
    ``Ĵᵀy`` run on the shards (forward R-op, backprop), so a solve costs two
    passes over the data plus ``O(m²·k)``.

    The Woodbury subtraction loses about ``eps·‖G‖/λ`` in relative accuracy.
    """

    def __init__(self, gn: GaussNewton, reg: float, max_bytes: int = 4 * 2**30):
        if not isinstance(gn, GaussNewton):
            raise TypeError(f"gn must be a dgnh.GaussNewton, got {type(gn).__name__}")
        self.reg = check_reg(reg)
        self.gn = gn
        self.shape = gn.shape
        n, d = gn.n_samples, gn.model.n_outputs
        m = n * d
        if 8 * m * m > max_bytes:
            raise ValueError(
                f"the dual matrix ĴĴᵀ has n_samples·n_outputs = {m} rows and needs "
                f"{8 * m * m:,} bytes ({8 * m * m / 2**30:.2f} GiB), above max_bytes="
                f"{max_bytes:,}; raise max_bytes or use dgnh.solve (CG) instead"
            )
        backend = gn._backend
        factors = backend.map("dual_factors")
        rows = backend.map("dual_gram", [(factors[s:],) for s in range(backend.n_shards)])
        sizes = [len(f[0][0]) for f in factors]
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        K = np.empty((m, m))
        for s, row in enumerate(rows):
            a, b = offsets[s], offsets[s + 1]
            K[a:b, a:] = row
            K[a:, a:b] = row.T
        K[np.diag_indices(m)] += n * self.reg
        try:
            self.chol = scipy.linalg.cho_factor(K, lower=True, overwrite_a=True,
                                                check_finite=False)
        except np.linalg.LinAlgError as err:  # pragma: no cover - K is SPD for reg > 0
            raise ValueError("the dual matrix ĴĴᵀ + n·reg·I is not numerically positive "
                             "definite; increase reg") from err
        self.offsets = offsets
        self.n_rows = m

    @property
    def nbytes(self) -> int:
        return int(self.chol[0].nbytes)

    def _jacobian(self, V: Array) -> Array:
        """``Ĵ V`` with rows in shard order, shape ``(m, k)``, float64."""
        parts = self.gn._backend.map("jacobian_matvec", (V,))
        return np.vstack(parts).astype(np.float64, copy=False)

    def _jacobian_t(self, Y: Array) -> Array:
        """``Ĵᵀ Y`` for ``Y`` of shape ``(m, k)``."""
        o = self.offsets
        args = [(Y[o[s]:o[s + 1]],) for s in range(len(o) - 1)]
        return np.asarray(self.gn._backend.sum("jacobian_rmatvec", args), dtype=np.float64)

    def _matmat(self, V: Array) -> Array:
        V = np.asarray(V, dtype=np.float64)
        Y = scipy.linalg.cho_solve(self.chol, self._jacobian(V), check_finite=False)
        return (V - self._jacobian_t(Y)) / self.reg

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
        gn, N = self.gn, self.shape[0]
        out = np.empty(N)
        for a in range(0, N, chunk):
            loc = gn.model.locate(np.arange(a, min(a + chunk, N)))
            cols = gn._backend.map("gather", (loc,))  # per shard (k, n_s, d)
            J = np.concatenate([c.reshape(c.shape[0], -1) for c in cols], axis=1).T
            W = scipy.linalg.solve_triangular(self.chol[0], J.astype(np.float64), lower=True,
                                              check_finite=False)
            out[a:a + len(loc[0])] = (1.0 - np.einsum("ij,ij->j", W, W)) / self.reg
        return out


def dual_factorize(gn: GaussNewton, reg: float, max_bytes: int = 4 * 2**30) -> DualFactorization:
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


def dual_solve(gn: GaussNewton, B, reg: float, max_bytes: int = 4 * 2**30) -> Array:
    """``(G + reg·I)⁻¹ B`` exactly, through the ``n·d × n·d`` dual matrix (Woodbury).

    ``B`` is ``(N,)`` or ``(N, k)``. For repeated solves or the log-determinant,
    keep the factorization from :func:`dual_factorize`.
    """
    if not isinstance(gn, GaussNewton):
        raise TypeError(f"gn must be a dgnh.GaussNewton, got {type(gn).__name__}")
    B = check_rhs(B, gn.n_params)
    return dual_factorize(gn, reg, max_bytes=max_bytes).solve(B)
