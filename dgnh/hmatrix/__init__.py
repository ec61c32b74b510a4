"""Geometry-oblivious hierarchical approximation of the GNH (design.md §4).

:func:`build_hmatrix` turns an *entry source* — anything with ``n_params``,
``diagonal()``, ``entries_many(requests, eps=, seed=)`` and exact products
``matvec(V)``, such as a :class:`~dgnh.gauss_newton.GaussNewton` — into an
:class:`HMatrix`:

1. Parameters with a zero diagonal (dead ReLU units, constant inputs) have zero
   rows and columns; they are kept out of the tree and stay exactly zero.
2. A balanced cluster tree is built from entries only: each node is split at
   the median of ``d(·, p) − d(·, q)`` for the farthest pair ``p, q`` among a
   few sampled columns, with the Gram-angle distance ``1 − G_ab²/(G_aa G_bb)``
   (a zero entry is *far*) or the Gram distance ``G_aa + G_bb − 2G_ab``.
3. With a near field (``budget > 0``), ``neighbors`` approximate nearest
   neighbours of every parameter come from ``n_trees`` such randomized trees
   (exhaustive search inside their leaves); the leaf pairs with the most
   neighbour votes (at most ``budget·(n_leaves − 1)`` and ``max_near`` per
   leaf) are stored as exact near-field corrections. ``budget = 0`` is HSS.
4. Bottom-up skeletonization by interpolative decomposition (pivoted QR, the
   *relative* tolerance ``tol``, the cap ``max_rank``) with nested bases: the
   candidates of a node are its indices (leaf) or its children's skeletons.
   The rows the decomposition sees are a randomized sketch
   ``Ω[out]ᵀ G[out, α]`` of the node's whole off-diagonal block row
   (Martinsson, SIAM J. Matrix Anal. Appl. 32(4), 2011), obtained from ONE
   round of exact products ``Y = GΩ`` with ``max_rank + oversampling`` Gaussian
   columns: a leaf's is ``Y[α] − G[α, α] Ω[α]``, a parent's comes from its
   children's minus their sibling coupling. This replaces GOFMM's sampled rows
   (neighbours, then importance samples): those missed the rows of split
   output units of a BCE autoencoder (error 16× ``tol`` at ``tol = 1e-2``),
   while a Gaussian sketch sees every row and needs fewer entries.
5. Sibling nodes are coupled through the entries ``G[α̃₁, α̃₂]``; the
   diagonal leaf blocks are exact entries.

Entry requests are level-synchronous: every round (one tree level) is ONE
``entries_many`` call, which a :class:`~dgnh.gauss_newton.GaussNewton` turns
into one task per shard. The per-node numerics (:func:`split_node`,
:func:`leaf_neighbors`, :func:`leaf_sketch`, :func:`parent_sketch`,
:func:`interpolative_decomposition`) are pure functions on numpy arrays.

:meth:`HMatrix.factorize` gives ``(H + λI)⁻¹`` for the HSS part in O(N·r²) by
recursive Sherman–Morrison–Woodbury (the recursive-skeletonization form):
solve, log-determinant and the diagonal of the inverse, and it detects an
indefinite ``H + λI`` (:class:`~dgnh.factorization.IndefiniteError`).
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Sequence

import numpy as np
import scipy.linalg
from tqdm import tqdm

from ..factorization import Factorization, IndefiniteError, check_reg
from ..operator import Operator
from ..packing import jsonable, pack_blocks, unpack_blocks

Array = np.ndarray
METRICS = ("angle", "gram")
FORMAT = "dgnh.hmatrix"
FORMAT_VERSION = 1
PIVOT_SAMPLES = 16  # sampled columns per node from which the split pivots are chosen
OVERSAMPLING = 10  # sketch columns beyond max_rank
PRODUCT_CHUNK = 128  # sketch columns per product call


# ------------------------------------------------------------------ per-node numerics
def entry_distances(block: Array, diag_rows: Array, diag_cols: Array, metric: str) -> Array:
    """Distances between parameters from the entries ``block = G[rows, cols]``.

    ``"angle"``: ``1 − G_ab²/(G_aa G_bb)`` in [0, 1] (a zero entry gives 1, far);
    ``"gram"``: ``G_aa + G_bb − 2 G_ab`` (the squared distance of the Jacobian
    columns). The diagonals must be positive.

    Examples
    --------
    >>> G = np.array([[1.0, 0.0], [0.0, 4.0]])
    >>> entry_distances(G, np.diag(G), np.diag(G), "angle").tolist()
    [[0.0, 1.0], [1.0, 0.0]]
    """
    if metric == "angle":
        return 1.0 - np.clip(block * block / np.outer(diag_rows, diag_cols), 0.0, 1.0)
    return np.maximum(diag_rows[:, None] + diag_cols[None, :] - 2.0 * block, 0.0)


def split_node(block: Array, diag: Array, samples: Array, metric: str) -> Array:
    """Median split of a node from the entries ``block = G[S, S[samples]]``.

    The pivots ``p, q`` are the farthest pair among the sampled columns; the
    ``⌊|S|/2⌋`` indices with the smallest ``d(·, p) − d(·, q)`` go left.
    Returns the boolean mask of the left half.

    Examples
    --------
    >>> G = np.diag([1.0, 1.0, 1.0, 1.0]) + np.kron(np.eye(2), np.ones((2, 2)))
    >>> split_node(G, np.diag(G), np.arange(4), "angle").tolist()
    [True, True, False, False]
    """
    dist = entry_distances(block, diag, diag[samples], metric)
    among = dist[samples]
    p, q = np.unravel_index(np.argmax(among), among.shape)
    order = np.argsort(dist[:, p] - dist[:, q], kind="stable")
    left = np.zeros(len(diag), dtype=bool)
    left[order[: len(diag) // 2]] = True
    return left


def leaf_neighbors(block: Array, diag: Array, k: int, metric: str) -> tuple[Array, Array]:
    """The ``k`` nearest neighbours inside one leaf from its block ``G[L, L]``.

    Returns local positions ``(|L|, k)`` (``-1`` where the leaf has fewer
    than ``k + 1`` members) and their distances (``inf`` there).
    """
    dist = entry_distances(block, diag, diag, metric)
    np.fill_diagonal(dist, np.inf)
    order = np.argsort(dist, axis=1, kind="stable")[:, : min(k, len(diag) - 1)]
    ids = np.full((len(diag), k), -1, dtype=np.int64)
    dists = np.full((len(diag), k), np.inf)
    ids[:, : order.shape[1]] = order
    dists[:, : order.shape[1]] = np.take_along_axis(dist, order, axis=1)
    return ids, dists


def merge_neighbors(ids: Array, dists: Array, k: int) -> Array:
    """Per row, the ``k`` distinct ids of smallest distance (``-1`` padded).

    ``ids`` and ``dists`` are ``(n, c)`` candidate lists (``-1``/``inf`` = none).
    """
    order = np.argsort(ids, axis=1, kind="stable")
    ids = np.take_along_axis(ids, order, axis=1)
    dists = np.take_along_axis(dists, order, axis=1).copy()
    dup = np.zeros(ids.shape, dtype=bool)
    dup[:, 1:] = ids[:, 1:] == ids[:, :-1]
    dists[dup | (ids < 0)] = np.inf
    best = np.argsort(dists, axis=1, kind="stable")[:, :k]
    out = np.take_along_axis(ids, best, axis=1)
    out[~np.isfinite(np.take_along_axis(dists, best, axis=1))] = -1
    return out


def interpolative_decomposition(block: Array, tol: float, max_rank: int) -> tuple[Array, Array]:
    """Column interpolative decomposition ``block ≈ block[:, skel] @ T`` by pivoted QR.

    The rank is the number of leading pivots ``|R_kk| > tol·|R_00|`` (relative
    tolerance), at most ``max_rank``. ``T[:, skel]`` is the identity.

    Returns
    -------
    skel : int array ``(k,)``, positions of the skeleton columns (pivot order).
    T : array ``(k, n_cols)``, the interpolation matrix.

    Examples
    --------
    >>> A = np.outer([1.0, 2.0, 3.0], [1.0, -1.0, 2.0])
    >>> skel, T = interpolative_decomposition(A, 1e-12, 5)
    >>> skel.tolist(), bool(np.allclose(A[:, skel] @ T, A))
    ([2], True)
    """
    m, n = block.shape
    if m == 0 or n == 0:
        return np.zeros(0, dtype=np.int64), np.zeros((0, n))
    R, piv = scipy.linalg.qr(block, mode="r", pivoting=True, check_finite=False)
    diag = np.abs(np.diag(R))
    small = diag <= tol * diag[0]
    k = int(np.argmax(small)) if small.any() else len(diag)
    k = min(k, max_rank)
    T = np.zeros((k, n))
    T[:, piv[:k]] = np.eye(k)
    if k < n:
        T[:, piv[k:]] = scipy.linalg.solve_triangular(R[:k, :k], R[:k, k:], check_finite=False)
    return piv[:k].astype(np.int64), T


# ------------------------------------------------------------------------ the builder
def leaf_sketch(Y_leaf: Array, D: Array, omega_leaf: Array) -> Array:
    """``Ω[out]ᵀ G[out, α]`` of a leaf from ``Y[α] = (GΩ)[α]``: ``(Y[α] − G[α, α] Ω[α])ᵀ``."""
    return (Y_leaf - D @ omega_leaf).T


def parent_sketch(S1: Array, skel1: Array, S2: Array, skel2: Array, omega1: Array,
                  omega2: Array, B: Array) -> Array:
    """``Ω[out(p)]ᵀ G[out(p), α̃₁ ∪ α̃₂]`` of a parent from its children.

    ``S_i`` are the children's sketches (over their candidates), ``skel_i`` the
    skeleton positions in them, ``omega_i = V_iᵀ Ω[α_i]`` their upward test
    coefficients and ``B = G[α̃₁, α̃₂]``; the sibling's share
    ``Ω[α₂]ᵀ G[α₂, α̃₁] ≈ omega₂ᵀ Bᵀ`` is removed.
    """
    return np.hstack([S1[:, skel1] - omega2.T @ B.T, S2[:, skel2] - omega1.T @ B])


def build_hmatrix(source, tol: float = 1e-3, max_rank: int = 256, leaf_size: int = 256,
                  budget: float = 0.0, neighbors: int = 32, metric: str = "angle",
                  eps: float | None = None, seed: int = 0, n_trees: int = 4,
                  max_near: int = 32, oversampling: int = OVERSAMPLING,
                  progress: bool | None = None) -> "HMatrix":
    """Build an :class:`HMatrix` of the symmetric PSD matrix behind ``source``.

    :func:`dgnh.compress` validates the parameters and is the public entry
    point; see the module docstring for the algorithm.

    Parameters
    ----------
    source : entry source with exact products: ``n_params``, ``diagonal()``,
        ``entries_many(requests, eps=, seed=)`` and ``matvec(V)``.
    tol : relative tolerance of every interpolative decomposition.
    max_rank : cap on every skeleton size.
    leaf_size : largest leaf (the tree is balanced, leaves hold ≤ ``leaf_size``).
    budget : near-field budget in [0, 1] (fraction of the other leaves), 0 = HSS.
    neighbors : nearest neighbours per parameter (for the near-field votes).
    metric : ``"angle"`` or ``"gram"``.
    eps : ``None`` for exact entries, else the sampled-entry accuracy (design.md §3).
    seed : seeds every random choice (and the entry sampler).
    n_trees : randomized trees for the neighbour search (the first is the cluster tree).
    max_near : absolute cap on the near leaves of one leaf.
    oversampling : sketch columns beyond ``max_rank``.
    progress : show a progress bar per tree level (``None``: only on a terminal).

    Examples
    --------
    >>> import numpy as np, dgnh
    >>> rng = np.random.default_rng(0)
    >>> net = dgnh.MLP([rng.normal(size=(8, 4)), rng.normal(size=(3, 8))],
    ...                [np.zeros(8), np.zeros(3)], ["tanh", "identity"])
    >>> gn = dgnh.GaussNewton(net, rng.normal(size=(40, 4)), rng.normal(size=(40, 3)))
    >>> H = build_hmatrix(gn, tol=1e-12, max_rank=64, leaf_size=16, progress=False)
    >>> bool(np.allclose(H.to_dense(), gn.dense()))
    True
    """
    t_start = time.perf_counter()
    timings = {"entries": 0.0}
    N = int(source.n_params)
    diag = np.asarray(source.diagonal(), dtype=np.float64)
    if diag.shape != (N,) or not np.all(np.isfinite(diag)):
        raise ValueError(f"source.diagonal() must be a finite vector of length {N}")
    active = np.flatnonzero(diag > 0)
    n_act = len(active)
    depth = int(np.ceil(np.log2(n_act / leaf_size))) if n_act > leaf_size else 0
    n_trees = n_trees if budget > 0 else 1  # the other trees only find neighbours
    counter = {"rounds": 0, "entries": 0}
    bar = tqdm(total=2 * depth + 2, desc="H-matrix", unit="level",
               disable=(not progress) if progress is not None else None)

    def fetch(requests: list, what: str) -> list[Array]:
        """One batched entry round (one ``entries_many`` call)."""
        bar.set_postfix_str(what)
        t0 = time.perf_counter()
        round_seed = int(np.random.SeedSequence([seed, 7, counter["rounds"]]).generate_state(1)[0])
        blocks = source.entries_many(requests, eps=eps, seed=round_seed) if requests else []
        timings["entries"] += time.perf_counter() - t0
        counter["rounds"] += 1
        counter["entries"] += int(sum(len(r) * len(c) for r, c in requests))
        bar.update(1)
        return [np.asarray(b, dtype=np.float64) for b in blocks]

    # --- cluster tree (and randomized trees for neighbours), one round per level
    t0 = time.perf_counter()
    d_act = diag[active]
    trees = [[np.arange(n_act)] for _ in range(n_trees)]  # trees[t]: nodes of the current level
    for level in range(depth):
        requests, meta = [], []
        for t, nodes in enumerate(trees):
            rng = np.random.default_rng([seed, 1, t, level])
            for S in nodes:
                samples = np.sort(rng.choice(len(S), min(len(S), PIVOT_SAMPLES), replace=False))
                requests.append((active[S], active[S[samples]]))
                meta.append((t, S, samples))
        split = [[] for _ in trees]
        for (t, S, samples), block in zip(meta, fetch(requests, f"tree level {level + 1}")):
            left = split_node(block, d_act[S], samples, metric)
            split[t] += [S[left], S[~left]]
        trees = split
    timings["tree"] = time.perf_counter() - t0

    # --- leaves: the cluster tree's diagonal blocks (+ other trees' leaves for neighbours)
    t0 = time.perf_counter()
    n_leaves = 2**depth
    leaf_blocks_all = fetch([(active[L], active[L]) for nodes in trees for L in nodes]
                            if n_act else [], "leaves")
    leaf_blocks = [(B + B.T) / 2 for B in leaf_blocks_all[:n_leaves]] or [np.zeros((0, 0))]
    perm_pos = np.concatenate(trees[0]).astype(np.int64)
    perm = active[perm_pos]
    leaf_start = np.concatenate([[0], np.cumsum([len(L) for L in trees[0]])]).astype(np.int64)
    near_pairs: list[tuple[int, int]] = []
    if budget > 0 and depth > 0:
        tree_order = np.empty(n_act, dtype=np.int64)
        tree_order[perm_pos] = np.arange(n_act)
        cand_ids, cand_dist = [], []
        for t, nodes in enumerate(trees):
            ids = np.full((n_act, neighbors), -1, dtype=np.int64)
            dst = np.full((n_act, neighbors), np.inf)
            for j, L in enumerate(nodes):
                local, dst[L] = leaf_neighbors(leaf_blocks_all[t * n_leaves + j], d_act[L],
                                               neighbors, metric)
                ids[L] = np.where(local >= 0, L[np.maximum(local, 0)], -1)
            cand_ids.append(ids)
            cand_dist.append(dst)
        nbr = merge_neighbors(np.hstack(cand_ids), np.hstack(cand_dist), neighbors)
        nbr = np.where(nbr >= 0, tree_order[np.maximum(nbr, 0)], -1)[perm_pos]  # tree order
        per_leaf = min(max_near, int(np.ceil(budget * (n_leaves - 1))))
        near_pairs = _near_pairs(nbr, leaf_start, per_leaf)
    timings["leaves_and_neighbors"] = time.perf_counter() - t0

    # --- tree arrays (level order, balanced)
    n_nodes = 2 ** (depth + 1) - 1
    node_level = np.floor(np.log2(np.arange(1, n_nodes + 1))).astype(np.int64)
    first_leaf = (np.arange(n_nodes) - (2**node_level - 1)) * 2 ** (depth - node_level)
    node_start = leaf_start[first_leaf]
    node_stop = leaf_start[first_leaf + 2 ** (depth - node_level)]
    node_children = np.full((n_nodes, 2), -1, dtype=np.int64)
    inner = np.flatnonzero(node_level < depth)
    node_children[inner, 0] = 2 * inner + 1
    node_children[inner, 1] = 2 * inner + 2
    node_parent = np.concatenate([[-1], (np.arange(1, n_nodes) - 1) // 2]).astype(np.int64)
    leaf_node = np.flatnonzero(node_level == depth)
    near_pairs = [(int(leaf_node[a]), int(leaf_node[b])) for a, b in near_pairs]

    # --- randomized sketch of every off-diagonal block row from ONE product round
    t0 = time.perf_counter()
    width = min(max_rank, n_act) + oversampling if depth > 0 else 0
    omega = np.random.default_rng([seed, 3]).standard_normal((n_act, width))
    Y = np.zeros((n_act, width))
    if width:
        bar.set_postfix_str("products")
        for j in range(0, width, PRODUCT_CHUNK):  # bounded memory per product call
            full = np.zeros((N, min(PRODUCT_CHUNK, width - j)))
            full[perm] = omega[:, j:j + full.shape[1]]
            Y[:, j:j + full.shape[1]] = np.asarray(source.matvec(full), dtype=np.float64)[perm]
    timings["products"] = time.perf_counter() - t0

    # --- skeletonization bottom-up; the round of level ℓ fetches the couplings of its children
    t0 = time.perf_counter()
    skel = [np.zeros(0, dtype=np.int64) for _ in range(n_nodes)]
    interp: list[Array | None] = [None] * n_nodes
    coupling: list[Array | None] = [None] * n_nodes
    sketch: list[Array | None] = [None] * n_nodes  # over the node's candidates
    local_skel: list[Array | None] = [None] * n_nodes
    omega_hat: list[Array | None] = [None] * n_nodes  # V_αᵀ Ω[α]
    near_exact: list[Array] = []
    for level in range(depth, -1, -1):
        nodes = np.flatnonzero(node_level == level)
        if level < depth:
            requests = [(perm[skel[node_children[a, 0]]], perm[skel[node_children[a, 1]]])
                        for a in nodes]
            if level == depth - 1:
                requests += [(perm[node_start[a]:node_stop[a]], perm[node_start[b]:node_stop[b]])
                             for a, b in near_pairs]
            blocks = fetch(requests, f"couplings level {level + 1}")
            for a, block in zip(nodes, blocks):
                coupling[a] = block
            if level == depth - 1:
                near_exact = blocks[len(nodes):]
        if level == 0:
            break
        for a in nodes:
            c1, c2 = node_children[a]
            s, e = node_start[a], node_stop[a]
            if c1 < 0:
                sketch[a] = leaf_sketch(Y[s:e], leaf_blocks[a - leaf_node[0]], omega[s:e])
                cands = np.arange(s, e)
                below = omega[s:e]
            else:
                sketch[a] = parent_sketch(sketch[c1], local_skel[c1], sketch[c2], local_skel[c2],
                                          omega_hat[c1], omega_hat[c2], coupling[a])
                cands = np.concatenate([skel[c1], skel[c2]])
                below = np.vstack([omega_hat[c1], omega_hat[c2]])
                sketch[c1] = sketch[c2] = None
            local_skel[a], interp[a] = interpolative_decomposition(sketch[a], tol, max_rank)
            skel[a] = cands[local_skel[a]]
            omega_hat[a] = interp[a] @ below
        if level == depth:
            bar.update(1)
    if depth == 0:
        bar.update(bar.total - bar.n)
    bar.close()
    timings["skeletons"] = time.perf_counter() - t0

    h = HMatrix(N, perm, node_parent, node_children, node_start, node_stop, skel, interp,
                coupling, leaf_blocks, np.zeros((0, 2), dtype=np.int64), [])
    # near field: exact corrections G[α, β] − H_hss[α, β]
    t0 = time.perf_counter()
    pairs = np.array(near_pairs, dtype=np.int64).reshape(-1, 2)
    h._near_pairs = pairs
    h._near_blocks = [G_ab - h._hss_block(a, b) for (a, b), G_ab in zip(pairs, near_exact)]
    timings["near_blocks"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - t_start
    h.report = {
        "method": "hmatrix",
        "parameters": {"tol": tol, "max_rank": max_rank, "leaf_size": leaf_size,
                       "budget": budget, "neighbors": neighbors, "metric": metric,
                       "eps": eps, "seed": seed, "n_trees": n_trees, "max_near": max_near,
                       "oversampling": oversampling},
        "n_params": N, "n_zero_diagonal": int(N - n_act), "depth": depth,
        "n_leaves": n_leaves if n_act else 0, "n_near_pairs": len(pairs),
        "entry_rounds": counter["rounds"], "entries_requested": counter["entries"],
        "sketch_columns": width, "timings": timings, **h.rank_statistics(),
        "nbytes": h.nbytes, "dense_nbytes": 8 * N * N,
    }
    return h


def _near_pairs(nbr: Array, leaf_start: Array, per_leaf: int) -> list[tuple[int, int]]:
    """Leaf pairs ``a < b`` with the most neighbour votes, at most ``per_leaf`` per leaf."""
    n_leaves = len(leaf_start) - 1
    if per_leaf <= 0 or n_leaves < 2:
        return []
    leaf_of = np.repeat(np.arange(n_leaves), np.diff(leaf_start))
    src = np.repeat(leaf_of, nbr.shape[1])
    dst = nbr.ravel()
    keep = dst >= 0
    src, dst = src[keep], leaf_of[dst[keep]]
    keep = src != dst
    votes = np.zeros((n_leaves, n_leaves), dtype=np.int64)
    np.add.at(votes, (np.minimum(src, dst)[keep], np.maximum(src, dst)[keep]), 1)
    a, b = np.nonzero(votes)
    order = np.lexsort((b, a, -votes[a, b]))
    count = np.zeros(n_leaves, dtype=np.int64)
    pairs = []
    for i, j in zip(a[order], b[order]):
        if count[i] < per_leaf and count[j] < per_leaf:
            pairs.append((int(i), int(j)))
            count[i] += 1
            count[j] += 1
    return sorted(pairs)


# ---------------------------------------------------------------------- the operator
class HMatrix(Operator):
    """A hierarchical (HSS + near-field) approximation of a symmetric PSD matrix.

    Build it with :func:`dgnh.compress` (``method="hmatrix"``) or
    :func:`build_hmatrix`. The structure is flat numpy arrays (see
    :meth:`to_arrays`): a balanced binary tree in level order over the
    parameters with a nonzero diagonal, permuted by ``perm`` into tree order;
    per node a skeleton (parameter indices) and an interpolation matrix ``T``
    (leaf: over its indices; inner node: over its children's skeletons); per
    inner node the coupling ``G[α̃₁, α̃₂]`` of its children; per leaf the exact
    diagonal block; and near-field corrections for selected leaf pairs.

    ``H @ V`` costs O(N·r): upward pass ``x̂_α = T_α x_α``, couplings, downward
    pass ``y_α += T_αᵀ ŷ_α``, plus the diagonal and near-field blocks.

    Examples
    --------
    >>> import numpy as np, dgnh
    >>> rng = np.random.default_rng(0)
    >>> net = dgnh.MLP([rng.normal(size=(8, 4)), rng.normal(size=(3, 8))],
    ...                [np.zeros(8), np.zeros(3)], ["tanh", "identity"])
    >>> gn = dgnh.GaussNewton(net, rng.normal(size=(40, 4)), rng.normal(size=(40, 3)))
    >>> H = dgnh.compress(gn, method="hmatrix", tol=1e-10, leaf_size=16, progress=False)
    >>> v = rng.normal(size=gn.n_params)
    >>> bool(np.allclose(H @ v, gn @ v))
    True
    """

    def __init__(self, n_params: int, perm: Array, node_parent: Array, node_children: Array,
                 node_start: Array, node_stop: Array, skeletons: Sequence[Array],
                 interpolations: Sequence[Array | None], couplings: Sequence[Array | None],
                 leaf_blocks: Sequence[Array], near_pairs: Array, near_blocks: Sequence[Array],
                 report: dict[str, Any] | None = None):
        self.shape = (int(n_params), int(n_params))
        self.perm = np.asarray(perm, dtype=np.int64)
        self.node_parent = np.asarray(node_parent, dtype=np.int64)
        self.node_children = np.asarray(node_children, dtype=np.int64).reshape(-1, 2)
        self.node_start = np.asarray(node_start, dtype=np.int64)
        self.node_stop = np.asarray(node_stop, dtype=np.int64)
        self.skeletons = [np.asarray(s, dtype=np.int64) for s in skeletons]
        self.interpolations = list(interpolations)
        self.couplings = list(couplings)
        self.leaves = np.flatnonzero(self.node_children[:, 0] < 0)
        self.leaf_blocks = {int(a): np.asarray(B) for a, B in zip(self.leaves, leaf_blocks)}
        self._near_pairs = np.asarray(near_pairs, dtype=np.int64).reshape(-1, 2)
        self._near_blocks = list(near_blocks)
        self.report: dict[str, Any] = dict(report or {})

    def __repr__(self) -> str:
        return (f"HMatrix(n_params={self.shape[0]}, n_nodes={self.n_nodes}, "
                f"max_rank={self.rank_statistics()['rank_max']}, n_near={len(self._near_pairs)})")

    # --------------------------------------------------------------- structure
    @property
    def n_nodes(self) -> int:
        return len(self.node_parent)

    @property
    def near_pairs(self) -> Array:
        """Leaf node pairs ``(n_near, 2)`` with exact near-field corrections."""
        return self._near_pairs

    @property
    def is_hss(self) -> bool:
        """True when there is no near field beyond the diagonal leaf blocks."""
        return len(self._near_pairs) == 0

    @property
    def ranks(self) -> Array:
        """Skeleton size of every node (the root's is 0)."""
        return np.array([len(s) for s in self.skeletons], dtype=np.int64)

    def rank_statistics(self) -> dict[str, Any]:
        """Minimum, mean and maximum skeleton size, overall and per tree level."""
        ranks = self.ranks[1:]
        level = np.floor(np.log2(np.arange(2, self.n_nodes + 1))).astype(int)
        per_level = {int(l): [int(ranks[level == l].min()), float(ranks[level == l].mean()),
                              int(ranks[level == l].max())] for l in np.unique(level)}
        return {"rank_min": int(ranks.min()) if ranks.size else 0,
                "rank_mean": float(ranks.mean()) if ranks.size else 0.0,
                "rank_max": int(ranks.max()) if ranks.size else 0,
                "ranks_per_level": per_level}

    @property
    def nbytes(self) -> int:
        """Bytes of every stored array (tree, skeletons, bases, blocks)."""
        return int(sum(a.nbytes for a in self.to_arrays().values()))

    def without_near_field(self) -> "HMatrix":
        """The HSS part alone (what :meth:`factorize` factorizes)."""
        return HMatrix(self.shape[0], self.perm, self.node_parent, self.node_children,
                       self.node_start, self.node_stop, self.skeletons, self.interpolations,
                       self.couplings, [self.leaf_blocks[int(a)] for a in self.leaves],
                       np.zeros((0, 2), dtype=np.int64), [], self.report)

    # ---------------------------------------------------------------- products
    def _upward(self, X: Array) -> list[Array]:
        """Skeleton coefficients ``x̂_α`` of every non-root node (X in tree order)."""
        xh: list[Array] = [None] * self.n_nodes
        for a in range(self.n_nodes - 1, 0, -1):
            c1, c2 = self.node_children[a]
            inp = (X[self.node_start[a]:self.node_stop[a]] if c1 < 0
                   else np.vstack([xh[c1], xh[c2]]))
            xh[a] = self.interpolations[a] @ inp
        return xh

    def _matmat(self, V: Array) -> Array:
        V = np.asarray(V, dtype=np.float64)
        X = V[self.perm]
        Y = np.zeros_like(X)
        xh = self._upward(X)
        yh = [np.zeros_like(x) if x is not None else None for x in xh]
        for a in range(self.n_nodes):
            c1, c2 = self.node_children[a]
            if c1 >= 0:
                yh[c1] += self.couplings[a] @ xh[c2]
                yh[c2] += self.couplings[a].T @ xh[c1]
        for a in range(1, self.n_nodes):
            c1, c2 = self.node_children[a]
            z = self.interpolations[a].T @ yh[a]
            if c1 >= 0:
                k1 = len(yh[c1])
                yh[c1] += z[:k1]
                yh[c2] += z[k1:]
            else:
                Y[self.node_start[a]:self.node_stop[a]] += z
        for a, B in self.leaf_blocks.items():
            s, e = self.node_start[a], self.node_stop[a]
            Y[s:e] += B @ X[s:e]
        for (a, b), C in zip(self._near_pairs, self._near_blocks):
            ra = slice(self.node_start[a], self.node_stop[a])
            rb = slice(self.node_start[b], self.node_stop[b])
            Y[ra] += C @ X[rb]
            Y[rb] += C.T @ X[ra]
        out = np.zeros_like(V)
        out[self.perm] = Y
        return out

    def _basis_to(self, leaf: int, ancestor: int) -> Array:
        """The map from a leaf's values to the skeleton coefficients of ``ancestor``."""
        E = self.interpolations[leaf]
        child, a = leaf, self.node_parent[leaf]
        while child != ancestor:
            c1, c2 = self.node_children[a]
            k1 = len(self.skeletons[c1])
            T = self.interpolations[a]
            E = (T[:, :k1] if child == c1 else T[:, k1:]) @ E
            child, a = a, self.node_parent[a]
        return E

    def _hss_block(self, a: int, b: int) -> Array:
        """The block ``H_hss[leaf a, leaf b]`` for two different leaves."""
        ancestors_a = []
        x = a
        while x >= 0:
            ancestors_a.append(x)
            x = self.node_parent[x]
        y = b
        while y not in ancestors_a:
            y = self.node_parent[y]
        common = y  # lowest common ancestor
        c1, c2 = self.node_children[common]
        side_a = c1 if c1 in ancestors_a else c2
        side_b = c2 if side_a == c1 else c1
        B = self.couplings[common] if side_a == c1 else self.couplings[common].T
        return self._basis_to(a, side_a).T @ B @ self._basis_to(b, side_b)

    # ----------------------------------------------------------- factorization
    def factorize(self, reg: float) -> "HSSFactorization":
        """Factorization of ``H_hss + reg·I`` (recursive Sherman–Morrison–Woodbury), O(N·r²).

        With a near field (``budget > 0``) this factorizes the HSS part only,
        not ``H`` itself: use it as a preconditioner for CG on ``H`` (or on the
        exact GNH products); a ``UserWarning`` says so and the result has
        ``exact = False``.

        Raises
        ------
        IndefiniteError
            When ``H_hss + reg·I`` is not positive definite.
        """
        if not self.is_hss:
            warnings.warn("this H-matrix has a near field: factorize() factorizes its HSS part "
                          "only; use the result as a preconditioner (e.g. for dgnh.cg)",
                          UserWarning, stacklevel=2)
        return HSSFactorization(self, reg)

    # ---------------------------------------------------------------- storage
    def to_arrays(self) -> dict[str, Array]:
        """Flat arrays for storage: tree arrays, packed ragged blocks with offset/shape tables.

        Keys: ``perm``, ``node_parent``, ``node_children``, ``node_start``,
        ``node_stop``; ``skeleton_offsets``/``skeleton_params`` (parameter
        indices); ``{interp, coupling, leaf, near}_{offsets, shapes, values}``
        with ``coupling_nodes``, ``leaf_nodes`` and ``near_pairs``. See
        :meth:`from_arrays`.
        """
        out = {"perm": self.perm, "node_parent": self.node_parent,
               "node_children": self.node_children, "node_start": self.node_start,
               "node_stop": self.node_stop}
        sizes = np.array([len(s) for s in self.skeletons], dtype=np.int64)
        out["skeleton_offsets"] = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        out["skeleton_params"] = (self.perm[np.concatenate(self.skeletons)] if sizes.sum()
                                  else np.zeros(0, dtype=np.int64))
        empty = np.zeros((0, 0))
        interp = [empty if T is None else T for T in self.interpolations]
        inner = np.flatnonzero(self.node_children[:, 0] >= 0)
        for name, blocks in (("interp", interp),
                             ("coupling", [self.couplings[a] for a in inner]),
                             ("leaf", [self.leaf_blocks[int(a)] for a in self.leaves]),
                             ("near", self._near_blocks)):
            out.update(zip((f"{name}_offsets", f"{name}_shapes", f"{name}_values"), pack_blocks(blocks)))
        out["coupling_nodes"] = inner.astype(np.int64)
        out["leaf_nodes"] = self.leaves.astype(np.int64)
        out["near_pairs"] = self._near_pairs
        return out

    def attrs(self) -> dict[str, Any]:
        """JSON-friendly attributes to store beside :meth:`to_arrays`."""
        return {"format": FORMAT, "version": FORMAT_VERSION, "n_params": self.shape[0],
                "report": jsonable(self.report)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, Array], attrs: dict[str, Any]) -> "HMatrix":
        """Rebuild an :class:`HMatrix` from :meth:`to_arrays` and :meth:`attrs`."""
        if attrs.get("format") != FORMAT or attrs.get("version") != FORMAT_VERSION:
            raise ValueError(f"not a {FORMAT} version {FORMAT_VERSION} record: "
                             f"format={attrs.get('format')!r}, version={attrs.get('version')!r}")
        missing = [k for k in ("perm", "node_parent", "node_children", "node_start", "node_stop",
                               "skeleton_offsets", "skeleton_params", "coupling_nodes",
                               "leaf_nodes", "near_pairs")
                   + tuple(f"{n}_{p}" for n in ("interp", "coupling", "leaf", "near")
                           for p in ("offsets", "shapes", "values")) if k not in arrays]
        if missing:
            raise ValueError(f"H-matrix arrays are missing {missing}")
        a = {k: np.asarray(v) for k, v in arrays.items()}
        N = int(attrs["n_params"])
        perm = a["perm"]
        if (not np.issubdtype(perm.dtype, np.integer) or len(np.unique(perm)) != len(perm)
                or (perm.size and (perm.min() < 0 or perm.max() >= N))):
            raise ValueError(f"H-matrix perm is not a set of distinct parameter indices in "
                             f"[0, {N}) (damaged store?)")
        off = a["skeleton_offsets"]
        if (off.size == 0 or off[0] != 0 or np.any(np.diff(off) < 0)
                or off[-1] != len(a["skeleton_params"])):
            raise ValueError("H-matrix skeleton_offsets do not match skeleton_params "
                             "(damaged store?)")
        position = np.full(N, -1, dtype=np.int64)
        position[a["perm"]] = np.arange(len(a["perm"]))
        skeletons = [position[a["skeleton_params"][off[i]:off[i + 1]]] for i in range(len(off) - 1)]
        interp = unpack_blocks(a["interp_offsets"], a["interp_shapes"], a["interp_values"],
                               "H-matrix interp blocks")
        interp[0] = None
        couplings: list[Array | None] = [None] * len(a["node_parent"])
        blocks = unpack_blocks(a["coupling_offsets"], a["coupling_shapes"], a["coupling_values"],
                               "H-matrix coupling blocks")
        for node, B in zip(a["coupling_nodes"], blocks):
            couplings[int(node)] = B
        leaf_blocks = unpack_blocks(a["leaf_offsets"], a["leaf_shapes"], a["leaf_values"],
                               "H-matrix leaf blocks")
        near = unpack_blocks(a["near_offsets"], a["near_shapes"], a["near_values"],
                               "H-matrix near blocks")
        return cls(N, a["perm"], a["node_parent"], a["node_children"], a["node_start"],
                   a["node_stop"], skeletons, interp, couplings, leaf_blocks, a["near_pairs"],
                   near, attrs.get("report"))


# ---------------------------------------------------------------------- factorization
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
    """

    def __init__(self, hmatrix: HMatrix, reg: float):
        if not isinstance(hmatrix, HMatrix):
            raise TypeError(f"hmatrix must be a dgnh.HMatrix, got {type(hmatrix).__name__}")
        self.reg = check_reg(reg)
        self.hmatrix = h = hmatrix
        self.shape = h.shape
        self.exact = h.is_hss
        self._hss = h if h.is_hss else h.without_near_field()  # what is factorized
        n = h.n_nodes
        self._order: list[Array] = [None] * n  # local unknowns, skeleton first
        self._E: list[Array] = [None] * n  # T = [I, E] in that order
        self._L: list[Array] = [None] * n  # Cholesky of M_rr (of D̂ at the root)
        self._K: list[Array] = [None] * n  # L⁻¹ M_rs
        schur: list[Array] = [None] * n
        self._logdet = (self.shape[0] - len(h.perm)) * np.log(self.reg)
        for a in range(n - 1, -1, -1):
            c1, c2 = h.node_children[a]
            if c1 < 0:
                D = h.leaf_blocks[a] + self.reg * np.eye(len(h.leaf_blocks[a]))
                cands = np.arange(h.node_start[a], h.node_stop[a])
            else:
                B = h.couplings[a]
                D = np.block([[schur[c1], B], [B.T, schur[c2]]])
                cands = np.concatenate([h.skeletons[c1], h.skeletons[c2]])
                schur[c1] = schur[c2] = None
            if a == 0:
                self._L[a] = _cholesky(D, a, "the root block")
                self._logdet += 2.0 * np.sum(np.log(np.diag(self._L[a])))
                continue
            local = np.searchsorted(cands, h.skeletons[a], sorter=np.argsort(cands))
            local = np.argsort(cands)[local]
            order = np.concatenate([local, np.setdiff1d(np.arange(len(cands)), local)])
            k = len(local)
            E = h.interpolations[a][:, order[k:]]
            Dp = D[np.ix_(order, order)]
            R = np.vstack([-E, np.eye(len(order) - k)])  # Z⁻¹ restricted to the redundant part
            DR = Dp @ R
            M_rr = R.T @ DR
            L = _cholesky((M_rr + M_rr.T) / 2, a, "the redundant block")
            K = (scipy.linalg.solve_triangular(L, DR[:k].T, lower=True, check_finite=False)
                 if L.size else np.zeros((0, k)))
            S = Dp[:k, :k] - K.T @ K
            schur[a] = (S + S.T) / 2
            self._logdet += 2.0 * np.sum(np.log(np.diag(L)))
            self._order[a], self._E[a], self._L[a], self._K[a] = order, E, L, K

    @property
    def nbytes(self) -> int:
        return int(sum(x.nbytes for x in self._L + self._E[1:] + self._K[1:] + self._order[1:]))

    def _tri(self, a: int, B: Array, trans: bool = False) -> Array:
        L = self._L[a]
        if L.size == 0:
            return np.zeros((0,) + B.shape[1:])
        return scipy.linalg.solve_triangular(L, B, lower=True, trans="T" if trans else "N",
                                             check_finite=False)

    def _matmat(self, B: Array) -> Array:
        h = self.hmatrix
        B = np.asarray(B, dtype=np.float64)
        out = B / self.reg
        Bt = B[h.perm]
        n = h.n_nodes
        u: list[Array] = [None] * n
        reduced: list[Array] = [None] * n
        for a in range(n - 1, 0, -1):  # upward: eliminate the redundant unknowns
            c1, c2 = h.node_children[a]
            rhs = (Bt[h.node_start[a]:h.node_stop[a]] if c1 < 0
                   else np.vstack([reduced[c1], reduced[c2]]))
            k = len(h.skeletons[a])
            bp = rhs[self._order[a]]
            u[a] = self._tri(a, bp[k:] - self._E[a].T @ bp[:k])
            reduced[a] = bp[:k] - self._K[a].T @ u[a]
        c1, c2 = h.node_children[0]
        rhs = Bt if c1 < 0 else np.vstack([reduced[c1], reduced[c2]])
        x: list[Array] = [None] * n
        x[0] = _cho_solve(self._L[0], rhs)
        Xt = np.empty_like(Bt)
        if c1 < 0:
            Xt[:] = x[0]
        for a in range(1, n):  # downward: back-substitute, undo Z
            p = h.node_parent[a]
            k1 = len(h.skeletons[h.node_children[p, 0]])
            xs = x[p][:k1] if a == h.node_children[p, 0] else x[p][k1:]
            xr = self._tri(a, u[a] - self._K[a] @ xs, trans=True)
            local = np.empty((len(self._order[a]),) + Bt.shape[1:])
            local[self._order[a]] = np.vstack([xs - self._E[a] @ xr, xr])
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
        """The diagonal of ``(H_hss + reg·I)⁻¹`` by top-down selected inversion."""
        h = self.hmatrix
        out = np.full(self.shape[0], 1.0 / self.reg)
        L0 = self._L[0]
        L0inv = self._tri(0, np.eye(len(L0)))
        inv: list[Array] = [None] * h.n_nodes
        inv[0] = L0inv.T @ L0inv  # the root block of X⁻¹ (over its candidates)
        diag_t = np.empty(len(h.perm))
        if h.node_children[0, 0] < 0:
            diag_t[:] = np.diag(inv[0])
        for a in range(1, h.n_nodes):
            p = h.node_parent[a]
            k1 = len(h.skeletons[h.node_children[p, 0]])
            part = slice(0, k1) if a == h.node_children[p, 0] else slice(k1, len(inv[p]))
            Zs = inv[p][part, part]
            k = len(Zs)
            F = self._tri(a, self._K[a], trans=True)  # M_rr⁻¹ M_rs
            Linv = self._tri(a, np.eye(len(self._L[a])))
            At = np.block([[Zs, -Zs @ F.T], [-F @ Zs, Linv.T @ Linv + F @ Zs @ F.T]])
            P = np.eye(len(At))
            P[:k, k:] = -self._E[a]
            local = np.empty_like(At)
            local[np.ix_(self._order[a], self._order[a])] = P @ At @ P.T
            if h.node_children[a, 0] < 0:
                diag_t[h.node_start[a]:h.node_stop[a]] = np.diag(local)
            else:
                inv[a] = local
            inv[p] = None if a == h.node_children[p, 1] else inv[p]
        out[h.perm] = diag_t
        return out
