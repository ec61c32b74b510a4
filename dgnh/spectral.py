"""Spectra of GNH operators: top eigenpairs and the spectral density.

* :func:`eigsh` — extreme eigenpairs by implicitly restarted Lanczos
  (:func:`scipy.sparse.linalg.eigsh`) on ``op.as_linear_operator()``, so only
  products are needed (exact GNH products for a :class:`GaussNewton`).
* :func:`spectral_density` — stochastic Lanczos quadrature (SLQ; Golub and
  Meurant; Ubaru, Chen and Saad 2017): for each Rademacher probe ``v``, ``m``
  Lanczos steps give a Gauss quadrature rule (nodes θ_j = Ritz values,
  weights τ_j = squared first components of the Ritz vectors) with
  ``Σ_j τ_j θ_j^p = vᵀA^p v / vᵀv`` exactly for ``p ≤ 2m − 1``. Averaging over
  probes estimates the spectral measure ``(1/N) Σ_i δ(x − λ_i)``. The probes
  run as one block, sharing each product ``op @ V``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import scipy.linalg
import scipy.sparse.linalg

from .operator import Operator

Array = np.ndarray
WHICH = ("LA", "LM", "SA")
LANCZOS_BLOCK = 4  # block size of the error certificate
LANCZOS_STEPS = 10  # block Krylov steps of the error certificate


def _check_operator(op) -> None:
    if not isinstance(op, Operator):
        raise TypeError(f"op must be a dgnh Operator (e.g. GaussNewton), got {type(op).__name__}")


def _check_int(value, name: str, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        rng = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {rng}, got {value}")
    return int(value)


def eigsh(op: Operator, k: int, which: str = "LA", tol: float = 0.0,
          seed: int = 0) -> tuple[Array, Array]:
    """The ``k`` extreme eigenpairs of a symmetric operator by Lanczos (scipy ARPACK).

    Parameters
    ----------
    op : GaussNewton, a compressed operator, or any dgnh Operator.
    k : number of eigenpairs, ``1 <= k < N``.
    which : ``"LA"`` (largest algebraic, the default), ``"LM"`` (largest
        magnitude) or ``"SA"`` (smallest algebraic; slow for a singular GNH).
    tol : relative accuracy of the eigenvalues (0 means machine precision).
    seed : seeds the Lanczos start vector, so results are reproducible.

    Returns
    -------
    eigenvalues : ``(k,)``, sorted descending for ``"LA"``/``"LM"``, ascending for ``"SA"``.
    eigenvectors : ``(N, k)``, orthonormal columns in the same order.

    Examples
    --------
    >>> import numpy as np
    >>> from dgnh.lowrank import LowRank
    >>> op = LowRank(np.diag([3.0, 2.0, 1.0, 0.0, 0.0]) @ np.eye(5, 3))
    >>> vals, vecs = eigsh(op, 2)
    >>> np.round(vals, 12).tolist()
    [9.0, 4.0]
    """
    _check_operator(op)
    N = op.shape[0]
    if N < 2:
        raise ValueError(f"eigsh needs an operator of size N >= 2, got N = {N}")
    k = _check_int(k, "k", 1, N - 1)
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float, np.integer, np.floating)) \
            or not 0 <= tol < 1:
        raise ValueError(f"tol must be a number in [0, 1), got {tol!r}")
    v0 = np.random.default_rng(seed).standard_normal(N)
    vals, vecs = scipy.sparse.linalg.eigsh(op.as_linear_operator(), k=k, which=which,
                                           tol=tol, v0=v0)
    order = np.argsort(vals) if which == "SA" else np.argsort(-vals)
    return vals[order], vecs[:, order]


@dataclass
class SpectralDensity:
    """Gauss quadrature rules of stochastic Lanczos quadrature, one per probe.

    Attributes
    ----------
    nodes, weights : ``(n_vectors, n_steps)``; the rule of probe ``p`` is
        ``Σ_j weights[p, j] δ(x − nodes[p, j])`` with weights summing to 1 (a
        probe whose Krylov space closed early has zero weights in its last columns).
    n_params : N, so that ``N · density`` counts eigenvalues.
    """

    nodes: Array
    weights: Array
    n_params: int

    def moment(self, p: int) -> float:
        """The SLQ estimate of ``tr(A^p)/N`` (exact per probe for ``p <= 2·n_steps − 1``)."""
        return float(np.mean(np.sum(self.weights * self.nodes**p, axis=1)))

    def evaluate(self, x, width: float) -> Array:
        """The density smoothed by a Gaussian of standard deviation ``width`` at points ``x``.

        It integrates to 1; multiply by ``n_params`` for eigenvalues per unit.
        """
        if not np.isfinite(width) or width <= 0:
            raise ValueError(f"width must be a positive number, got {width}")
        x = np.asarray(x, dtype=np.float64)
        z = (x[..., None] - self.nodes.ravel()) / width
        kernel = np.exp(-0.5 * z * z) / (width * np.sqrt(2 * np.pi))
        return kernel @ self.weights.ravel() / self.nodes.shape[0]


def spectral_density(op: Operator, n_vectors: int = 16, n_steps: int = 40,
                     seed: int = 0) -> SpectralDensity:
    """Stochastic Lanczos quadrature for the spectral density of a symmetric operator.

    Runs ``n_steps`` Lanczos steps (full reorthogonalization) from each of
    ``n_vectors`` Rademacher probes drawn by ``numpy.random.default_rng(seed)``;
    ``n_vectors·n_steps`` products in ``n_steps`` batched calls.

    Examples
    --------
    >>> import numpy as np
    >>> from dgnh.lowrank import LowRank
    >>> op = LowRank(np.random.default_rng(0).normal(size=(40, 4)))
    >>> sd = spectral_density(op, n_vectors=4, n_steps=6)
    >>> bool(np.isclose(sd.moment(0), 1.0))
    True
    """
    _check_operator(op)
    N = op.shape[0]
    n_vectors = _check_int(n_vectors, "n_vectors", 1)
    n_steps = _check_int(n_steps, "n_steps", 1, N)
    rng = np.random.default_rng(seed)
    V = rng.choice([-1.0, 1.0], size=(N, n_vectors)) / np.sqrt(N)
    basis = np.zeros((n_steps, N, n_vectors))
    alpha = np.zeros((n_vectors, n_steps))
    beta = np.zeros((n_vectors, n_steps))
    steps = np.full(n_vectors, n_steps)  # Krylov dimension per probe (smaller if it closed)
    scale = np.zeros(n_vectors)  # running estimate of ‖A‖ per probe
    for j in range(n_steps):
        basis[j] = V
        W = np.asarray(op @ V, dtype=np.float64)
        alpha[:, j] = np.einsum("ij,ij->j", V, W)
        # full reorthogonalization against the basis so far (twice is enough)
        for _ in range(2):
            W -= np.einsum("jnv,jv->nv", basis[:j + 1],
                           np.einsum("jnv,nv->jv", basis[:j + 1], W))
        b = np.linalg.norm(W, axis=0)
        scale = np.maximum(scale, np.abs(alpha[:, j]) + b)
        closed = (b <= 1e-12 * scale) & (steps == n_steps)
        steps[closed] = j + 1
        beta[:, j] = np.where(steps > j + 1, b, 0.0)
        V = np.where(steps > j + 1, W / np.where(b > 0, b, 1.0), 0.0)
        if j + 1 < n_steps and not np.any(steps > j + 1):
            break
    nodes = np.zeros((n_vectors, n_steps))
    weights = np.zeros((n_vectors, n_steps))
    for p in range(n_vectors):
        m = steps[p]
        theta, S = scipy.linalg.eigh_tridiagonal(alpha[p, :m], beta[p, :m - 1])
        nodes[p, :m] = theta
        weights[p, :m] = S[0] ** 2
    return SpectralDensity(nodes, weights, N)




def ritz_values(apply: Callable[[Array], Array], n: int, seed: int = 0,
                block_size: int = LANCZOS_BLOCK, steps: int = LANCZOS_STEPS,
                support: Array | None = None) -> Array:
    """Ritz values of a symmetric ``A`` on a block Krylov space (block Lanczos).

    ``apply(V)`` returns ``A @ V`` for ``V`` of shape ``(n, k)``. The start block
    is Gaussian (zero outside the boolean ``support``, if given); the basis is
    fully reorthogonalized. Ritz values lie in ``[λ_min(A), λ_max(A)]`` and the
    extreme ones converge first. Costs ``steps`` products with ``block_size``
    vectors.
    """
    rng = np.random.default_rng([seed, 11])
    V = rng.standard_normal((n, block_size))
    if support is not None:
        V[~support] = 0.0
    Q = np.linalg.qr(V)[0]
    basis, images = [], []
    for _ in range(steps):
        AQ = np.asarray(apply(Q), dtype=np.float64)
        basis.append(Q)
        images.append(AQ)
        K = np.hstack(basis)
        R = AQ - K @ (K.T @ AQ)
        R -= K @ (K.T @ R)
        if np.linalg.norm(R) <= 1e-12 * max(np.linalg.norm(AQ), 1e-300) or K.shape[1] >= n:
            break
        Q = np.linalg.qr(R)[0]
        Q -= K @ (K.T @ Q)
        Q = np.linalg.qr(Q)[0]
    K, AK = np.hstack(basis), np.hstack(images)
    T = K.T @ AK
    return np.linalg.eigvalsh((T + T.T) / 2)



def estimate_norm(apply: Callable[[Array], Array], n: int, seed: int = 0,
                  block_size: int = LANCZOS_BLOCK, steps: int = LANCZOS_STEPS,
                  support: Array | None = None) -> float:
    """Estimate ``‖A‖₂`` of a symmetric ``A``: the largest ``|θ|`` of :func:`ritz_values`.

    Never exceeds ``‖A‖₂``; a few block steps get within a small factor of it.

    Examples
    --------
    >>> A = np.diag([3.0, -5.0, 1.0, 0.5])
    >>> round(estimate_norm(lambda V: A @ V, 4), 12)
    5.0
    """
    return float(np.max(np.abs(ritz_values(apply, n, seed, block_size, steps, support))))
