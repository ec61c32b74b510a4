"""Factorization of the HSS part of an H-matrix plus ``reg·I`` (docs/design.md §4, step 7).

:class:`HSSFactorization` gives ``(H_hss + reg·I)⁻¹`` in O(N·r²) by recursive
Sherman–Morrison–Woodbury (the recursive-skeletonization form): solve,
log-determinant and the diagonal of the inverse, and it detects an indefinite
``H_hss + reg·I`` (:class:`~dgnh.factorization.IndefiniteError`). It reads the
tree through :class:`HierarchicalMatrix`, the members of
:class:`~dgnh.hmatrix.HMatrix` it needs (so that ``HMatrix.factorize`` can
import this module).
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import numpy as np
import scipy.linalg

from ..batching import on_cores
from ..factorization import Factorization, IndefiniteError, check_reg

Array = np.ndarray


@runtime_checkable
class HierarchicalMatrix(Protocol):
    """The members of :class:`~dgnh.hmatrix.HMatrix` that :class:`HSSFactorization` reads."""

    shape: tuple[int, int]
    perm: Array
    node_parent: Array
    node_children: Array
    node_start: Array
    node_stop: Array
    skeletons: Sequence[Array]
    interpolations: Sequence[Array | None]
    couplings: Sequence[Array | None]
    leaf_blocks: dict[int, Array]

    @property
    def n_nodes(self) -> int:
        """Number of tree nodes."""

    @property
    def is_hss(self) -> bool:
        """True without a near field."""

    def without_near_field(self) -> "HierarchicalMatrix":
        """The HSS part alone."""

    def __matmul__(self, V: Array) -> Array:
        """The product with a vector or a block of vectors."""


def _cholesky(M: Array, node: int, what: str) -> Array:
    """Lower Cholesky factor; :class:`IndefiniteError` naming the tree node on failure."""
    if M.size == 0:
        return np.zeros(M.shape)
    try:
        return scipy.linalg.cholesky(M, lower=True, check_finite=False)
    except np.linalg.LinAlgError as err:
        raise IndefiniteError(
            f"H + reg·I is not positive definite ({what} of tree node {node} has no Cholesky "
            "factor): the approximation has eigenvalues below −reg. Increase reg, tighten tol "
            "or raise max_rank, use method='lowrank' (positive semi-definite), or solve by CG "
            "on the exact GNH products"
        ) from err


def _lower_solve(L: Array, B: Array) -> Array:
    """``L⁻¹B`` for a lower-triangular ``L`` (empty when ``L`` is)."""
    if L.size == 0:
        return np.zeros((0,) + B.shape[1:])
    return scipy.linalg.solve_triangular(L, B, lower=True, check_finite=False)


def _cho_solve(L: Array, B: Array) -> Array:
    if L.size == 0:
        return np.zeros(B.shape)
    return scipy.linalg.cho_solve((L, True), B, check_finite=False)


class HSSFactorization(Factorization):
    """``(H_hss + reg·I)⁻¹`` by recursive skeletonization (a ULV-type Cholesky), O(N·r²).

    At one tree level ``A = D̂ + U H₁ Uᵀ`` with ``D̂`` the block diagonal of the
    nodes' diagonal blocks (a leaf's ``G[α, α] + reg·I``; an inner node's
    ``[[Σ₁, B], [Bᵀ, Σ₂]]`` from its children's Schur complements ``Σ`` and
    their coupling ``B``) and ``U`` the block diagonal of the ``T_αᵀ``. Since
    ``T_α`` is the identity on the skeleton, ``T_α = [I, E_α]·Z_α`` with the unit
    triangular ``Z_α = [[I, E_α], [0, I]]`` (skeleton first). In the coordinates
    ``Z x`` the redundant (non-skeleton) unknowns couple only inside their node,
    through ``M = Z⁻ᵀ D̂ Z⁻¹``; eliminating them by Cholesky of ``M_rr`` leaves
    the Schur complement ``Σ_α = M_ss − M_sr M_rr⁻¹ M_rs`` on the skeleton
    (which equals ``(T_α D̂_α⁻¹ T_αᵀ)⁻¹``, the Sherman–Morrison–Woodbury form,
    without forming any inverse), and ``X = H₁ + Σ`` is the same problem one
    level up; the root is factorized densely.

    ``A`` is congruent to the block diagonal of the ``M_rr`` and the root block,
    so ``H_hss + reg·I`` is positive definite exactly when every Cholesky
    factorization succeeds; a failure raises
    :class:`~dgnh.factorization.IndefiniteError`. ``log det A`` is the sum of
    their log-determinants (``det Z = 1``); the diagonal of the inverse comes
    top-down from the diagonal blocks of ``X⁻¹`` (selected inversion).
    Zero-diagonal parameters (outside the tree) contribute ``reg·I``.

    ``exact`` is False when the H-matrix has a near field (then this is a
    preconditioner for it, not its inverse).

    Examples
    --------
    >>> import dgnh
    >>> h = dgnh.HMatrix(2, [0, 1], [-1, 0, 0], [[1, 2], [-1, -1], [-1, -1]], [0, 0, 1],
    ...                  [2, 1, 2], [[], [0], [1]], [None, np.eye(1), np.eye(1)],
    ...                  [np.array([[1.0]]), None, None], [np.eye(1), 2 * np.eye(1)],
    ...                  np.zeros((0, 2)), [])
    >>> f = HSSFactorization(h, 1.0)  # of [[2, 1], [1, 3]]
    >>> x = f.solve(np.array([3.0, 4.0]))
    >>> bool(np.allclose(x, 1.0)), bool(np.isclose(f.logdet(), np.log(5)))
    (True, True)
    """

    def __init__(self, hmatrix: HierarchicalMatrix, reg: float):
        if not isinstance(hmatrix, HierarchicalMatrix):
            raise TypeError(f"hmatrix must be a dgnh.HMatrix, got {type(hmatrix).__name__}")
        self.reg = check_reg(reg)
        self.hmatrix = h = hmatrix
        self.shape = h.shape
        self.exact = h.is_hss
        self._hss = h if h.is_hss else h.without_near_field()  # what is factorized
        n = h.n_nodes
        self._skel: list[Array] = [None] * n  # local positions of the skeleton
        self._W: list[Array] = [None] * n  # L⁻¹ [−Eᵀ, I] in local order: u = W·rhs
        self._K: list[Array] = [None] * n  # L⁻¹ M_rs
        self._root: Array = np.zeros((0, 0))  # Cholesky factor of the root block
        self._schur: list[Array] = [None] * n
        logdets = np.zeros(n)
        depth = np.zeros(n, dtype=np.int64)  # parents come before their children
        for a in range(1, n):
            depth[a] = depth[h.node_parent[a]] + 1
        for level in range(int(depth.max(initial=0)), -1, -1):  # a level's nodes: independent
            nodes = np.flatnonzero(depth == level)
            logdets[nodes] = on_cores(self._eliminate, nodes)
        self._logdet = (self.shape[0] - len(h.perm)) * np.log(self.reg) + float(logdets.sum())
        del self._schur

    def _eliminate(self, a: int) -> float:
        """Eliminate the redundant unknowns of node ``a`` (its children done); its log-det share."""
        h = self.hmatrix
        c1, c2 = h.node_children[a]
        if c1 < 0:
            D = h.leaf_blocks[a] + self.reg * np.eye(len(h.leaf_blocks[a]))
            cands = np.arange(h.node_start[a], h.node_stop[a])
        else:
            B = h.couplings[a]
            D = np.block([[self._schur[c1], B], [B.T, self._schur[c2]]])
            cands = np.concatenate([h.skeletons[c1], h.skeletons[c2]])
            self._schur[c1] = self._schur[c2] = None
        if a == 0:
            self._root = _cholesky(D, a, "the root block")
            return 2.0 * float(np.sum(np.log(np.diag(self._root))))
        local = np.searchsorted(cands, h.skeletons[a], sorter=np.argsort(cands))
        local = np.argsort(cands)[local]
        order = np.concatenate([local, np.setdiff1d(np.arange(len(cands)), local)])
        k = len(local)
        E = h.interpolations[a][:, order[k:]]
        Dp = D[np.ix_(order, order)]
        DR = Dp[:, k:] - Dp[:, :k] @ E  # D̂ Z⁻¹ on the redundant part, Z⁻¹ = [−E; I]
        M_rr = DR[k:] - E.T @ DR[:k]
        L = _cholesky((M_rr + M_rr.T) / 2, a, "the redundant block")
        W = np.empty((len(L), len(cands)))
        W[:, order] = _lower_solve(L, np.hstack([-E.T, np.eye(len(L))]))
        K = _lower_solve(L, DR[:k].T)
        S = Dp[:k, :k] - K.T @ K
        self._schur[a] = (S + S.T) / 2
        self._skel[a], self._W[a], self._K[a] = local, W, K
        return 2.0 * float(np.sum(np.log(np.diag(L))))

    @property
    def nbytes(self) -> int:
        return int(self._root.nbytes + sum(x.nbytes for x in self._W[1:] + self._K[1:]
                                           + self._skel[1:]))

    def _matmat(self, B: Array) -> Array:
        """Upward ``u = W·rhs`` and ``reduced = rhs[skeleton] − Kᵀu`` per node (the
        redundant unknowns eliminated), the root solved, then downward
        ``x = Wᵀ(u − K·x_s)`` plus ``x_s`` on the skeleton: two GEMMs per node and pass."""
        h = self.hmatrix
        B = np.asarray(B, dtype=np.float64)
        out = B / self.reg
        Bt = B[h.perm]
        n = h.n_nodes
        u: list[Array] = [None] * n
        reduced: list[Array] = [None] * n
        for a in range(n - 1, -1, -1):  # upward: eliminate the redundant unknowns
            c1, c2 = h.node_children[a]
            rhs = (Bt[h.node_start[a]:h.node_stop[a]] if c1 < 0
                   else np.vstack([reduced[c1], reduced[c2]]))
            if c1 >= 0:
                reduced[c1] = reduced[c2] = None
            if a == 0:
                break
            u[a] = self._W[a] @ rhs
            reduced[a] = rhs[self._skel[a]] - self._K[a].T @ u[a]
        x: list[Array] = [None] * n
        x[0] = _cho_solve(self._root, rhs)  # the root's
        Xt = np.empty_like(Bt)
        if h.node_children[0, 0] < 0:
            Xt[:] = x[0]
        for a in range(1, n):  # downward: back-substitute
            p = h.node_parent[a]
            k1 = len(h.skeletons[h.node_children[p, 0]])
            xs = x[p][:k1] if a == h.node_children[p, 0] else x[p][k1:]
            local = self._W[a].T @ (u[a] - self._K[a] @ xs)
            local[self._skel[a]] += xs
            u[a] = None
            if a == h.node_children[p, 1]:
                x[p] = None
            if h.node_children[a, 0] < 0:
                Xt[h.node_start[a]:h.node_stop[a]] = local
            else:
                x[a] = local
        out[h.perm] = Xt
        return out

    def factorized_matmat(self, V: Array) -> Array:
        """``(H_hss + reg·I) V``: the operator this factorization inverts."""
        return self._hss @ V + self.reg * V

    def logdet(self) -> float:
        """``log det(H_hss + reg·I)``."""
        return float(self._logdet)

    def inverse_diagonal(self) -> Array:
        """The diagonal of ``(H_hss + reg·I)⁻¹`` by top-down selected inversion: a node's
        block of the inverse over its candidates is ``WᵀW + RᵀZR`` with
        ``R = I[skeleton] − KᵀW`` and ``Z`` its skeleton's block of the parent's."""
        h = self.hmatrix
        out = np.full(self.shape[0], 1.0 / self.reg)
        L0inv = _lower_solve(self._root, np.eye(len(self._root)))
        inv: list[Array] = [None] * h.n_nodes
        inv[0] = L0inv.T @ L0inv  # the root block of X⁻¹ (over its candidates)
        diag_t = np.empty(len(h.perm))
        if h.node_children[0, 0] < 0:
            diag_t[:] = np.diag(inv[0])
        for a in range(1, h.n_nodes):
            p = h.node_parent[a]
            k1 = len(h.skeletons[h.node_children[p, 0]])
            part = slice(0, k1) if a == h.node_children[p, 0] else slice(k1, len(inv[p]))
            Z = inv[p][part, part]
            W = self._W[a]
            R = -self._K[a].T @ W
            R[np.arange(len(R)), self._skel[a]] += 1.0
            ZR = Z @ R
            if h.node_children[a, 0] < 0:
                diag_t[h.node_start[a]:h.node_stop[a]] = (np.einsum("ij,ij->j", W, W)
                                                          + np.einsum("ij,ij->j", R, ZR))
            else:
                inv[a] = W.T @ W + R.T @ ZR
            inv[p] = None if a == h.node_children[p, 1] else inv[p]
        out[h.perm] = diag_t
        return out
