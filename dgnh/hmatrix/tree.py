"""The cluster tree of an H-matrix, built from a Gram matrix's entries (docs/design.md §4).

Steps 1–3 of the construction: distances between parameters from the entries
of the matrix (:func:`entry_distances`), level-synchronous median splits of a
balanced binary tree (:func:`grow_trees`, :func:`split_node`), approximate
nearest neighbours from a few randomized trees (:func:`leaf_neighbors`,
:func:`merge_neighbors`) and the near leaf pairs they vote for
(:func:`select_near_pairs`). :func:`cluster_tree` gathers the result in a
:class:`ClusterTree`.

The entries come through a ``fetch(requests, what)`` callable: one call is one
entry round, ``requests`` a list of ``(rows, cols)`` index pairs and the answer
the list of blocks ``G[rows, cols]``; ``what`` names the round for a progress
display. For large problems the H-matrix build grows its trees on the
sketch's Nyström approximation of ``G`` instead (no entries); the leaves'
blocks are always exact entries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from ..validation import check_choice

Array = np.ndarray
Fetch = Callable[[list[tuple[Array, Array]], str], list[Array]]
METRICS = ("angle", "gram")
PIVOT_SAMPLES = 16  # sampled columns per node and round, for the split pivots
LEVELS_PER_ROUND = 2  # tree levels split from one round of sampled columns
TREE_GEOMETRIES = ("auto", "entries", "sketch")
# "auto": the tree from entries while its rounds gather at most this many Jacobian elements
# (tree rounds × parameters × Jacobian rows; ≈ 17 s on the 2-core machine), else from the sketch
TREE_ENTRY_ELEMENTS = 1e10


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


def _farthest_pair(dist: Array, samples: Array, cols: Array) -> tuple[int, int]:
    """The farthest pair among the sampled columns ``cols`` of ``dist`` (rows ``samples[cols]``)."""
    among = dist[np.ix_(samples[cols], cols)]
    i, j = np.unravel_index(np.argmax(among), among.shape)
    return int(cols[i]), int(cols[j])


def _halve(dist: Array, members: Array, p: int, q: int) -> tuple[Array, Array]:
    """``members`` split at the median of ``d(·, p) − d(·, q)`` (the smaller half left),
    each half in the order of ``members``."""
    order = np.argsort(dist[members, p] - dist[members, q], kind="stable")
    left = np.zeros(len(members), dtype=bool)
    left[order[: len(members) // 2]] = True
    return members[left], members[~left]


def split_levels(block: Array, diag: Array, samples: Array, metric: str,
                 levels: int) -> list[Array]:
    """``levels`` successive median splits of a node from ONE block ``G[S, S[samples]]``.

    Every part is halved along its farthest pair among the sampled columns that
    lie inside it (among all of them when fewer than two do). Returns the
    ``2**levels`` parts (positions into ``S``), left to right.

    Examples
    --------
    >>> G = np.diag([1.0, 1.0, 1.0, 1.0]) + np.kron(np.eye(2), np.ones((2, 2)))
    >>> [P.tolist() for P in split_levels(G, np.diag(G), np.arange(4), "angle", 2)]
    [[0], [1], [2], [3]]
    """
    dist = entry_distances(block, diag, diag[samples], metric)
    parts = [np.arange(len(diag))]
    for _ in range(levels):
        halves = []
        for P in parts:
            cols = np.flatnonzero(np.isin(samples, P))
            p, q = _farthest_pair(dist, samples, cols if len(cols) >= 2
                                  else np.arange(len(samples)))
            halves += _halve(dist, P, p, q)
        parts = halves
    return parts


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
    left = np.zeros(len(diag), dtype=bool)
    left[split_levels(block, diag, samples, metric, 1)[0]] = True
    return left


def leaf_neighbors(block: Array, diag: Array, k: int, metric: str) -> tuple[Array, Array]:
    """The ``k`` nearest neighbours inside one leaf from its block ``G[L, L]``.

    Returns local positions ``(|L|, k)`` (``-1`` where the leaf has fewer
    than ``k + 1`` members) and their distances (``inf`` there).

    Examples
    --------
    >>> G = np.array([[1.0, 0.9, 0.0], [0.9, 1.0, 0.1], [0.0, 0.1, 1.0]])
    >>> ids, dists = leaf_neighbors(G, np.diag(G), 1, "angle")
    >>> ids.ravel().tolist()
    [1, 0, 1]
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

    Examples
    --------
    >>> merge_neighbors(np.array([[4, 2, 4, -1]]), np.array([[0.1, 0.5, 0.3, np.inf]]), 3).tolist()
    [[4, 2, -1]]
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


def select_near_pairs(nbr: Array, leaf_start: Array, per_leaf: int) -> list[tuple[int, int]]:
    """Leaf pairs ``a < b`` with the most neighbour votes, at most ``per_leaf`` per leaf.

    ``nbr`` holds the neighbours ``(n, k)`` of every index (``-1`` = none) and
    ``leaf_start`` the bounds of the leaves; a neighbour in another leaf is one
    vote for that pair of leaves. Ties go to the smaller leaf numbers.

    Examples
    --------
    >>> nbr = np.array([[2], [2], [0], [4], [1], [3]])
    >>> select_near_pairs(nbr, np.array([0, 2, 4, 6]), 1)
    [(0, 1)]
    """
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


# ------------------------------------------------------------------------- the tree
@dataclass(frozen=True, eq=False)
class ClusterTree:
    """A balanced binary cluster tree in level order: node 0 is the root, the
    children of node ``a`` are ``2a + 1`` and ``2a + 2``.

    Attributes
    ----------
    perm : parameter indices in tree order (the parameters with a positive diagonal).
    leaf_start : bounds ``(n_leaves + 1,)`` of the leaves in tree order.
    node_parent, node_children, node_start, node_stop, node_level : per node its
        parent (``-1`` at the root), children ``(n_nodes, 2)`` (``-1`` at a leaf),
        range ``[start, stop)`` in tree order and depth.
    leaf_blocks : the exact symmetric diagonal blocks ``G[α, α]`` of the leaves, left to right.
    near_pairs : leaf node pairs ``(n_near, 2)`` with ``a < b`` for the near field.

    Examples
    --------
    >>> t = ClusterTree.balanced(np.arange(4), np.array([0, 2, 4]), [np.eye(2)] * 2, [(0, 1)])
    >>> t.depth, t.leaf_nodes.tolist(), t.near_pairs.tolist(), t.params(1).tolist()
    (1, [1, 2], [[1, 2]], [0, 1])
    """

    perm: Array
    leaf_start: Array
    node_parent: Array
    node_children: Array
    node_start: Array
    node_stop: Array
    node_level: Array
    leaf_blocks: list[Array]
    near_pairs: Array

    @classmethod
    def balanced(cls, perm: Array, leaf_start: Array, leaf_blocks: list[Array],
                 leaf_pairs: Sequence[tuple[int, int]]) -> "ClusterTree":
        """The tree whose ``2**depth`` leaves are bounded by ``leaf_start``.

        ``leaf_pairs`` are near pairs numbered by leaf (0 the leftmost leaf).
        """
        depth = (len(leaf_start) - 1).bit_length() - 1
        n_nodes = 2 ** (depth + 1) - 1
        node_level = np.floor(np.log2(np.arange(1, n_nodes + 1))).astype(np.int64)
        first_leaf = (np.arange(n_nodes) - (2**node_level - 1)) * 2 ** (depth - node_level)
        node_children = np.full((n_nodes, 2), -1, dtype=np.int64)
        inner = np.flatnonzero(node_level < depth)
        node_children[inner, 0] = 2 * inner + 1
        node_children[inner, 1] = 2 * inner + 2
        node_parent = np.concatenate([[-1], (np.arange(1, n_nodes) - 1) // 2]).astype(np.int64)
        leaf_node = np.flatnonzero(node_level == depth)
        near_pairs = leaf_node[np.asarray(leaf_pairs, dtype=np.int64).reshape(-1, 2)]
        return cls(perm, leaf_start, node_parent, node_children, leaf_start[first_leaf],
                   leaf_start[first_leaf + 2 ** (depth - node_level)], node_level,
                   leaf_blocks, near_pairs)

    @property
    def depth(self) -> int:
        """Levels below the root (0: the root is the only leaf)."""
        return int(self.node_level[-1])

    @property
    def n_nodes(self) -> int:
        return len(self.node_parent)

    @property
    def leaf_nodes(self) -> Array:
        """The leaf node numbers, left to right."""
        return self.nodes_at(self.depth)

    def nodes_at(self, level: int) -> Array:
        """The node numbers of one tree level, left to right."""
        return np.flatnonzero(self.node_level == level)

    def params(self, node: int) -> Array:
        """The parameter indices of a node."""
        return self.perm[self.node_start[node]:self.node_stop[node]]


# --------------------------------------------------------------- entry-round builders
def tree_depth(n_active: int, leaf_size: int) -> int:
    """Levels of the balanced tree with leaves of at most ``leaf_size`` indices.

    Examples
    --------
    >>> tree_depth(100, 16), tree_depth(16, 16)
    (3, 0)
    """
    return int(np.ceil(np.log2(n_active / leaf_size))) if n_active > leaf_size else 0


def tree_rounds(depth: int) -> int:
    """Entry rounds of :func:`grow_trees` for a tree of ``depth`` levels.

    Examples
    --------
    >>> tree_rounds(7), tree_rounds(0)
    (4, 0)
    """
    return -(-depth // LEVELS_PER_ROUND)


def tree_geometry_for(source, n_active: int, depth: int, choice: str = "auto") -> str:
    """Where the cluster tree's distances come from: ``"entries"`` (exact, GOFMM's) or
    ``"sketch"`` (the H-matrix sketch's Nyström embedding, :func:`gram_geometry`).

    ``"auto"`` takes the entries while the tree's rounds would gather at most
    ``TREE_ENTRY_ELEMENTS`` Jacobian elements (``tree_rounds(depth)`` passes over
    ``n_active`` columns of ``source.n_jacobian_rows`` rows; a source without
    Jacobian rows, such as a dense matrix, has cheap entries).

    Examples
    --------
    >>> class Source:  # n·d = 17 970 Jacobian rows
    ...     n_jacobian_rows = 17_970
    >>> tree_geometry_for(Source(), 26_122, 7), tree_geometry_for(Source(), 10**6, 12)
    ('entries', 'sketch')
    >>> tree_geometry_for(object(), 10**6, 12), tree_geometry_for(Source(), 10**6, 12, "entries")
    ('entries', 'entries')
    """
    if check_choice(choice, "tree_geometry", TREE_GEOMETRIES) != "auto":
        return choice
    rows = int(getattr(source, "n_jacobian_rows", 0))
    return "entries" if tree_rounds(depth) * n_active * rows <= TREE_ENTRY_ELEMENTS else "sketch"


GRAM_ROW_CHUNK = 1 << 15  # rows of Y per product of gram_geometry (bounded temporaries)


def gram_geometry(Y: Array, W: Array, status: Callable[[str], None],
                  step: Callable[[], None]) -> tuple[Array, Fetch]:
    """The diagonal and a ``fetch`` of the Gram matrix ``ZZᵀ`` of the positions
    ``Z = Y W`` (rows of ``Z``), never forming ``Z``: ``|z_a|²`` (at least the smallest
    positive float, so no angle is 0/0) and ``Z[r] Z[c]ᵀ = Y[r] (W Z[c]ᵀ)``, ``Y``'s rows
    taken ``GRAM_ROW_CHUNK`` at a time; ``status(what)`` and ``step()`` report each round.

    Examples
    --------
    >>> Y, W = np.array([[1.0, 0.0], [1.0, 1.0]]), np.eye(2)
    >>> diag, fetch = gram_geometry(Y, W, print, lambda: None)
    >>> diag.tolist(), fetch([(np.array([0, 1]), np.array([1]))], "tree level 1")[0].tolist()
    tree level 1
    ([1.0, 2.0], [[1.0], [2.0]])
    """
    chunks = [slice(i, i + GRAM_ROW_CHUNK) for i in range(0, len(Y), GRAM_ROW_CHUNK)]
    diag = np.concatenate([np.einsum("ij,ij->i", Z, Z) for Z in (Y[c] @ W for c in chunks)]
                          or [np.zeros(0)])
    diag = np.maximum(diag, np.finfo(np.float64).tiny)

    def gram_rows(rows: Array, cols: Array) -> Array:
        P = W @ (Y[cols] @ W).T  # W Z[cols]ᵀ: width × |cols|
        return np.vstack([Y[rows[i:i + GRAM_ROW_CHUNK]] @ P
                          for i in range(0, len(rows), GRAM_ROW_CHUNK)] or [P[:0]])

    def fetch(requests: list[tuple[Array, Array]], what: str) -> list[Array]:
        status(what)
        blocks = [gram_rows(r, c) for r, c in requests]
        step()
        return blocks

    return diag, fetch


def grow_trees(active: Array, diag: Array, depth: int, n_trees: int, metric: str, seed: int,
               fetch: Fetch) -> list[list[Array]]:
    """The leaves of ``n_trees`` randomized balanced trees, ``LEVELS_PER_ROUND`` levels per
    entry round.

    ``active`` are the parameters in the trees and ``diag`` their (positive)
    diagonal. Every node of every tree gets ``PIVOT_SAMPLES`` random columns,
    from which :func:`split_levels` splits it and its descendants down the
    next ``LEVELS_PER_ROUND`` levels (one round fetches the columns of every
    node for all trees: the cost of a round is about one pass over the
    Jacobian, whatever the number of columns). The first tree is the cluster
    tree, the others only serve the neighbour search. Returns per tree its
    ``2**depth`` leaves as positions into ``active``, left to right.

    Examples
    --------
    >>> G = np.diag([1.0, 1.0, 1.0, 1.0]) + np.kron(np.eye(2), np.ones((2, 2)))
    >>> fetch = lambda requests, what: [G[np.ix_(r, c)] for r, c in requests]
    >>> [L.tolist() for L in grow_trees(np.arange(4), np.diag(G), 1, 1, "angle", 0, fetch)[0]]
    [[0, 1], [2, 3]]
    """
    trees = [[np.arange(len(active))] for _ in range(n_trees)]  # trees[t]: its current level
    for level in range(0, depth, LEVELS_PER_ROUND):
        levels = min(LEVELS_PER_ROUND, depth - level)
        requests, meta = [], []
        for t, nodes in enumerate(trees):
            rng = np.random.default_rng([seed, 1, t, level])
            for S in nodes:
                samples = np.sort(rng.choice(len(S), min(len(S), PIVOT_SAMPLES), replace=False))
                requests.append((active[S], active[S[samples]]))
                meta.append((t, S, samples))
        split: list[list[Array]] = [[] for _ in trees]
        for (t, S, samples), block in zip(meta, fetch(requests, f"tree level {level + levels}")):
            split[t] += [S[P] for P in split_levels(block, diag[S], samples, metric, levels)]
        trees = split
    return trees


def tree_neighbors(trees: list[list[Array]], blocks: Sequence[Array], diag: Array,
                   perm_pos: Array, k: int, metric: str) -> Array:
    """The ``k`` approximate nearest neighbours of every index, both in tree order.

    Exhaustive search inside the leaves of every tree (``blocks`` are their
    diagonal blocks, tree after tree), merged over the trees; ``perm_pos`` is
    the tree order (the first tree's leaves concatenated). ``-1`` pads.
    """
    n_act, n_leaves = len(perm_pos), len(trees[0])
    tree_order = np.empty(n_act, dtype=np.int64)
    tree_order[perm_pos] = np.arange(n_act)
    cand_ids, cand_dist = [], []
    for t, leaves in enumerate(trees):
        ids = np.full((n_act, k), -1, dtype=np.int64)
        dst = np.full((n_act, k), np.inf)
        for j, L in enumerate(leaves):
            local, dst[L] = leaf_neighbors(blocks[t * n_leaves + j], diag[L], k, metric)
            ids[L] = np.where(local >= 0, L[np.maximum(local, 0)], -1)
        cand_ids.append(ids)
        cand_dist.append(dst)
    nbr = merge_neighbors(np.hstack(cand_ids), np.hstack(cand_dist), k)
    return np.where(nbr >= 0, tree_order[np.maximum(nbr, 0)], -1)[perm_pos]


def cluster_tree(active: Array, diag: Array, trees: list[list[Array]], fetch: Fetch, *,
                 budget: float, neighbors: int, max_near: int, metric: str) -> ClusterTree:
    """The :class:`ClusterTree` of the first of ``trees`` (from :func:`grow_trees`).

    One entry round fetches the diagonal blocks of the leaves of every tree.
    With ``budget > 0`` the near pairs are the leaf pairs with the most votes
    of the ``neighbors`` nearest neighbours, at most
    ``min(max_near, ⌈budget·(n_leaves − 1)⌉)`` per leaf.

    Examples
    --------
    >>> G = np.diag([1.0, 1.0, 1.0, 1.0]) + np.kron(np.eye(2), np.ones((2, 2)))
    >>> fetch = lambda requests, what: [G[np.ix_(r, c)] for r, c in requests]
    >>> t = cluster_tree(np.arange(4), np.diag(G), [[np.array([0, 1]), np.array([2, 3])]],
    ...                  fetch, budget=0.0, neighbors=1, max_near=1, metric="angle")
    >>> t.perm.tolist(), t.node_start.tolist(), t.leaf_blocks[1].tolist()
    ([0, 1, 2, 3], [0, 0, 2], [[2.0, 1.0], [1.0, 2.0]])
    """
    n_leaves = len(trees[0])
    blocks = fetch([(active[L], active[L]) for leaves in trees for L in leaves]
                   if len(active) else [], "leaves")
    for B in blocks[:n_leaves]:  # symmetrized in place (no second copy of the leaf blocks)
        B += B.T
        B *= 0.5
    leaf_blocks = blocks[:n_leaves] or [np.zeros((0, 0))]
    perm_pos = np.concatenate(trees[0]).astype(np.int64)
    leaf_start = np.concatenate([[0], np.cumsum([len(L) for L in trees[0]])]).astype(np.int64)
    leaf_pairs: list[tuple[int, int]] = []
    if budget > 0 and n_leaves > 1:
        nbr = tree_neighbors(trees, blocks, diag, perm_pos, neighbors, metric)
        per_leaf = min(max_near, int(np.ceil(budget * (n_leaves - 1))))
        leaf_pairs = select_near_pairs(nbr, leaf_start, per_leaf)
    return ClusterTree.balanced(active[perm_pos], leaf_start, leaf_blocks, leaf_pairs)
