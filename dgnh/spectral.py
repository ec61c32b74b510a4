"""Spectra of GNH operators: block Lanczos, top eigenpairs, the spectral density, norms.

* :func:`lanczos` — Lanczos with full reorthogonalization from a block of
  start vectors, building either one block Krylov space or, with
  ``independent=True``, one Krylov space per column; the columns share every
  product ``A @ V`` either way. It is the routine behind the two below.
* :func:`ritz_values` / :func:`estimate_norm` — Ritz values of a block Krylov
  space and the norm estimate of ``dgnh.compress``'s error certificate
  (docs/design.md §4).
* :func:`spectral_density` — stochastic Lanczos quadrature (SLQ; Golub and
  Meurant; Ubaru, Chen and Saad 2017): for each Rademacher probe ``v``, ``m``
  Lanczos steps give a Gauss quadrature rule (nodes θ_j = Ritz values,
  weights τ_j = squared first components of the Ritz vectors) with
  ``Σ_j τ_j θ_j^p = vᵀA^p v / vᵀv`` exactly for ``p ≤ 2m − 1``. Averaging over
  probes estimates the spectral measure ``(1/N) Σ_i δ(x − λ_i)``. Every probe
  keeps its own Krylov space (the rule is per probe); the probes share products.
* :func:`eigsh` — extreme eigenpairs by implicitly restarted Lanczos
  (:func:`scipy.sparse.linalg.eigsh`) on ``op.as_linear_operator()``, so only
  products are needed (exact GNH products for a :class:`GaussNewton`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import scipy.linalg
import scipy.sparse.linalg

from .operator import Operator
from .validation import check_choice, check_int, check_number

Array = np.ndarray
WHICH = ("LA", "LM", "SA")
LANCZOS_BLOCK = 4  # block size of the error certificate
LANCZOS_STEPS = 10  # block Krylov steps of the error certificate
BREAKDOWN = 1e-12  # a residual below this fraction of ‖A Q‖ closes a Krylov space


def _check_operator(op) -> None:
    if not isinstance(op, Operator):
        raise TypeError(f"op must be a dgnh Operator (e.g. GaussNewton), got {type(op).__name__}")


# ------------------------------------------------------------------ block Lanczos
@dataclass
class KrylovSpaces:
    """The Rayleigh quotients ``KᵀAK`` of the Krylov spaces :func:`lanczos` built.

    Only the quotients are kept (the basis and its image, ``N`` floats per
    vector each, are not), accumulated as the basis grows: column block ``j``
    holds ``K_{≤j}ᵀ A q_j``; the rest follows from the symmetry of ``A``.

    Attributes
    ----------
    rayleigh : ``(m·b, m·b)`` for one block space (block ``(i, j)``, ``i ≤ j``,
        is ``Q_iᵀ A Q_j``), or ``(b, m, m)`` with independent columns (entry
        ``[p, i, j]``, ``i ≤ j``, is ``q_{i,p}ᵀ A q_{j,p}``); zero below the
        (block) diagonal.
    steps : ``(b,)``; with independent columns, the blocks ``0..steps[p] − 1``
        span column ``p``'s Krylov space (fewer than ``m`` where it closed early);
        for one block space every entry is ``m``.
    """

    rayleigh: Array
    steps: Array

    def projection(self, column: int | None = None) -> Array:
        """The Rayleigh quotient ``KᵀAK`` (symmetric) of the whole block space, or of
        the Krylov space of one ``column`` (independent columns)."""
        if column is None:
            b = len(self.steps)
            upper = self.rayleigh.copy()
            for i in range(0, len(upper), b):  # halve the diagonal blocks: D → (D + Dᵀ)/2
                upper[i:i + b, i:i + b] *= 0.5
        else:
            m = int(self.steps[column])
            upper = self.rayleigh[column, :m, :m].copy()
            upper[np.diag_indices(m)] *= 0.5
        return upper + upper.T


def _coefficients(basis: Array, W: Array, independent: bool) -> Array:
    """``basis``ᵀ ``W``: ``(k, b)`` per column if ``independent``, else ``(k, b, b)``
    (one ``Q_iᵀ W`` per block)."""
    if independent:
        return np.einsum("knv,nv->kv", basis, W)
    return np.stack([block.T @ W for block in basis])


def _combine(basis: Array, coefficients: Array, independent: bool) -> Array:
    """``basis`` times ``coefficients`` (as returned by :func:`_coefficients`)."""
    if independent:
        return np.einsum("knv,kv->nv", basis, coefficients)
    out = np.zeros((basis.shape[1], coefficients.shape[2]))
    for block, C in zip(basis, coefficients):  # GEMMs per block (einsum here is ~8× slower)
        out += block @ C
    return out


def _project(basis: Array, W: Array, independent: bool) -> Array:
    """The component of ``W`` in the span of ``basis`` (per column if ``independent``)."""
    return _combine(basis, _coefficients(basis, W, independent), independent)


def _norms(W: Array, independent: bool) -> Array:
    """Column norms, or the Frobenius norm of the whole block for every column."""
    if independent:
        return np.linalg.norm(W, axis=0)
    return np.full(W.shape[1], np.linalg.norm(W))


def _normalize(W: Array, independent: bool) -> Array:
    """Unit columns (zero columns stay zero), or an orthonormal basis of the block (QR)."""
    if independent:
        norms = np.linalg.norm(W, axis=0)
        return W / np.where(norms > 0, norms, 1.0)
    return np.linalg.qr(W)[0]


def lanczos(apply: Callable[[Array], Array], start: Array, steps: int,
            independent: bool = False) -> KrylovSpaces:
    """Lanczos with full reorthogonalization from the start block ``start`` ``(N, b)``.

    ``apply(V)`` returns ``A @ V`` for a symmetric ``A`` and ``V`` of shape
    ``(N, b)``; there are at most ``steps`` calls. With ``independent=False``
    the basis spans the block Krylov space
    ``span{S, AS, …, A^{m−1}S}`` (QR of ``start`` first); with
    ``independent=True`` it is ``b`` Lanczos runs, column ``p`` spanning
    ``span{s_p, A s_p, …}`` (``start`` normalized per column). Each new block
    is orthogonalized twice against the basis so far, normalized, and once more
    against the basis (QR of a rank-deficient block). A space closes when its
    residual falls below ``1e-12`` times the largest ``‖A Q‖`` seen or when it
    fills the whole space; Lanczos stops when every space has closed.

    Examples
    --------
    >>> A = np.diag([4.0, 1.0, 1.0, 2.0])
    >>> krylov = lanczos(lambda V: A @ V, np.ones((4, 1)), steps=4, independent=True)
    >>> krylov.steps.tolist(), np.round(np.linalg.eigvalsh(krylov.projection(0)), 12).tolist()
    ([3], [1.0, 2.0, 4.0])
    """
    start = np.asarray(start, dtype=np.float64)
    n, width = start.shape
    gained = 1 if independent else width  # dimension each step adds to a space
    basis = np.zeros((steps, n, width))
    rayleigh = np.zeros((width, steps, steps) if independent else (steps * width,) * 2)
    count = np.full(width, steps)
    extending = np.ones(width, dtype=bool)
    scale = np.zeros(width)  # the largest ‖A Q‖ so far, per space
    Q = _normalize(start, independent)
    for j in range(steps):
        basis[j] = Q
        R = np.asarray(apply(Q), dtype=np.float64)
        scale = np.maximum(scale, _norms(R, independent))
        C = _coefficients(basis[:j + 1], R, independent)  # the Rayleigh quotients' column j
        if independent:
            rayleigh[:, :j + 1, j] = C.T
        else:
            rayleigh[:(j + 1) * width, j * width:(j + 1) * width] = C.reshape(-1, width)
        R -= _combine(basis[:j + 1], C, independent)
        R -= _project(basis[:j + 1], R, independent)  # reorthogonalized twice
        closed = extending & ((_norms(R, independent) <= BREAKDOWN * scale)
                              | ((j + 1) * gained >= n))
        count[closed] = j + 1
        extending &= ~closed
        if not extending.any():
            break
        R[:, ~extending] = 0.0
        Q = _normalize(R, independent)
        Q = _normalize(Q - _project(basis[:j + 1], Q, independent), independent)
    m = int(count.max())
    return KrylovSpaces(rayleigh[:, :m, :m] if independent else rayleigh[:m * width, :m * width],
                        count)


def ritz_values(apply: Callable[[Array], Array], n: int, seed: int = 0,
                block_size: int = LANCZOS_BLOCK, steps: int = LANCZOS_STEPS,
                support: Array | None = None) -> Array:
    """Ritz values of a symmetric ``A`` on a block Krylov space (:func:`lanczos`).

    ``apply(V)`` returns ``A @ V`` for ``V`` of shape ``(n, k)``. The start block
    is Gaussian from ``default_rng([seed, 11])`` (zero outside the boolean
    ``support``, if given). Ritz values lie in ``[λ_min(A), λ_max(A)]`` and the
    extreme ones converge first. Costs ``steps`` products with ``block_size``
    vectors.

    Examples
    --------
    >>> A = np.diag([3.0, -5.0, 1.0, 0.5])
    >>> np.round(ritz_values(lambda V: A @ V, 4), 12).tolist()
    [-5.0, 0.5, 1.0, 3.0]
    """
    start = np.random.default_rng([seed, 11]).standard_normal((n, min(block_size, n)))
    if support is not None:
        start[~support] = 0.0
    return np.linalg.eigvalsh(lanczos(apply, start, steps).projection())


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


# --------------------------------------------------------------------- eigsh
def eigsh(op: Operator, k: int, which: str = "LA", tol: float = 0.0,
          seed: int = 0) -> tuple[Array, Array]:
    """The ``k`` extreme eigenpairs of a symmetric operator by Lanczos (scipy ARPACK).

    Parameters
    ----------
    op : GaussNewton, a compressed operator, or any dgnh Operator.
    k : number of eigenpairs, ``1 <= k < N``.
    which : ``"LA"`` (largest algebraic, the default), ``"LM"`` (largest
        magnitude) or ``"SA"`` (smallest algebraic; slow for a singular GNH).
    tol : relative accuracy of the eigenvalues in [0, 1) (0 means machine precision).
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
    k = check_int(k, "k")
    if not 1 <= k < N:  # the bound depends on the operator, not on k alone
        raise ValueError(f"k must be in [1, {N - 1}] (below the operator size N = {N}), "
                         f"got {k}")
    which = check_choice(which, "which", WHICH)
    tol = check_number(tol, "tol", 0, 1, high_open=True)
    v0 = np.random.default_rng(seed).standard_normal(N)
    vals, vecs = scipy.sparse.linalg.eigsh(op.as_linear_operator(), k=k, which=which,
                                           tol=tol, v0=v0)
    order = np.argsort(vals) if which == "SA" else np.argsort(-vals)
    return vals[order], vecs[:, order]


# ------------------------------------------------------------------------- SLQ
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
        width = check_number(width, "width", low=0, low_open=True)
        x = np.asarray(x, dtype=np.float64)
        z = (x[..., None] - self.nodes.ravel()) / width
        kernel = np.exp(-0.5 * z * z) / (width * np.sqrt(2 * np.pi))
        return kernel @ self.weights.ravel() / self.nodes.shape[0]


def spectral_density(op: Operator, n_vectors: int = 16, n_steps: int = 40,
                     seed: int = 0) -> SpectralDensity:
    """Stochastic Lanczos quadrature for the spectral density of a symmetric operator.

    Runs ``n_steps`` Lanczos steps (:func:`lanczos`, independent columns) from
    each of ``n_vectors`` Rademacher probes ``±1/√N`` drawn by
    ``numpy.random.default_rng(seed)``; ``n_vectors·n_steps`` products in
    ``n_steps`` batched calls.

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
    n_vectors = check_int(n_vectors, "n_vectors", minimum=1)
    n_steps = check_int(n_steps, "n_steps", minimum=1, maximum=N)
    probes = np.random.default_rng(seed).choice([-1.0, 1.0], size=(N, n_vectors)) / np.sqrt(N)
    krylov = lanczos(op.matvec, probes, n_steps, independent=True)
    nodes = np.zeros((n_vectors, n_steps))
    weights = np.zeros((n_vectors, n_steps))
    for p, m in enumerate(krylov.steps):
        theta, S = scipy.linalg.eigh(krylov.projection(p))
        nodes[p, :m] = theta
        weights[p, :m] = S[0] ** 2
    return SpectralDensity(nodes, weights, N)
