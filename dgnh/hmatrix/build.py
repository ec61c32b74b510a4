"""Building an :class:`~dgnh.hmatrix.HMatrix` from an entry source (docs/design.md §4).

:func:`build_hmatrix` orchestrates the steps: the cluster tree
(:mod:`dgnh.hmatrix.tree`), one round of exact products with a Gaussian test
matrix (:func:`gaussian_sketch`), the bottom-up skeletonization
(:func:`skeletonize`: :func:`leaf_sketch`, :func:`parent_sketch`,
:func:`interpolative_decomposition`, one :class:`NodeState` per node) and the
near-field corrections (:func:`near_field_corrections`). Entry requests go
through an :class:`EntryRounds`: one ``entries_many`` call per round, counted,
timed and shown on a progress bar.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import scipy.linalg
from tqdm import tqdm

from .operator import HMatrix
from .tree import ClusterTree, cluster_tree, grow_trees, tree_depth

Array = np.ndarray
OVERSAMPLING = 10  # sketch columns beyond max_rank
PRODUCT_CHUNK = 128  # sketch columns per product call


# ------------------------------------------------------------------ per-node numerics
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


def leaf_sketch(Y_leaf: Array, D: Array, omega_leaf: Array) -> Array:
    """``Ω[out]ᵀ G[out, α]`` of a leaf from ``Y[α] = (GΩ)[α]``: ``(Y[α] − G[α, α] Ω[α])ᵀ``.

    Examples
    --------
    >>> G, omega = np.array([[2.0, 1.0], [1.0, 3.0]]), np.array([[1.0], [1.0]])
    >>> leaf_sketch((G @ omega)[:1], G[:1, :1], omega[:1]).tolist()  # Ω[1]ᵀ G[1, 0]
    [[1.0]]
    """
    return (Y_leaf - D @ omega_leaf).T


def parent_sketch(S1: Array, skel1: Array, S2: Array, skel2: Array, omega1: Array,
                  omega2: Array, B: Array) -> Array:
    """``Ω[out(p)]ᵀ G[out(p), α̃₁ ∪ α̃₂]`` of a parent from its children.

    ``S_i`` are the children's sketches (over their candidates), ``skel_i`` the
    skeleton positions in them, ``omega_i = V_iᵀ Ω[α_i]`` their upward test
    coefficients and ``B = G[α̃₁, α̃₂]``; the sibling's share
    ``Ω[α₂]ᵀ G[α₂, α̃₁] ≈ omega₂ᵀ Bᵀ`` is removed.

    Examples
    --------
    >>> one = np.ones((1, 1))
    >>> parent_sketch(3 * one, [0], 5 * one, [0], one, 2 * one, one).tolist()
    [[1.0, 4.0]]
    """
    return np.hstack([S1[:, skel1] - omega2.T @ B.T, S2[:, skel2] - omega1.T @ B])


# ---------------------------------------------------------------- entry-round record
class EntryRounds:
    """The entry rounds of one build: each is ONE ``entries_many`` call of ``source``.

    Round ``i`` draws its sampler seed from ``(seed, 7, i)``. Counts the rounds
    and requested entries, keeps phase timings (``timings["entries"]`` is the
    time spent inside ``entries_many``) and advances a progress bar of
    ``n_steps`` steps, one per round (``progress=None``: shown on a terminal).

    Examples
    --------
    >>> class Dense:
    ...     def entries_many(self, requests, eps=None, seed=0):
    ...         return [np.eye(3)[np.ix_(r, c)] for r, c in requests]
    >>> rounds = EntryRounds(Dense(), eps=None, seed=0, n_steps=1, progress=False)
    >>> rounds.fetch([(np.arange(2), np.arange(3))], "demo")[0].shape
    (2, 3)
    >>> rounds.close()
    >>> rounds.rounds, rounds.entries
    (1, 6)
    """

    def __init__(self, source: Any, eps: float | None, seed: int, n_steps: int,
                 progress: bool | None):
        self.source, self.eps, self.seed = source, eps, seed
        self.rounds = 0
        self.entries = 0
        self.timings: dict[str, float] = {"entries": 0.0}
        self._bar = tqdm(total=n_steps, desc="H-matrix", unit="level",
                         disable=(not progress) if progress is not None else None)

    def fetch(self, requests: list[tuple[Array, Array]], what: str) -> list[Array]:
        """The blocks ``G[rows, cols]`` of one round; ``what`` is shown on the bar."""
        self.status(what)
        t0 = time.perf_counter()
        round_seed = int(np.random.SeedSequence([self.seed, 7, self.rounds]).generate_state(1)[0])
        blocks = (self.source.entries_many(requests, eps=self.eps, seed=round_seed)
                  if requests else [])
        self.timings["entries"] += time.perf_counter() - t0
        self.rounds += 1
        self.entries += int(sum(len(r) * len(c) for r, c in requests))
        self.step()
        return [np.asarray(b, dtype=np.float64) for b in blocks]

    def status(self, what: str) -> None:
        """Show what is being done."""
        self._bar.set_postfix_str(what)

    def step(self) -> None:
        """Advance the progress bar by one step."""
        self._bar.update(1)

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        """Record the wall time of the ``with`` block as ``timings[phase]``."""
        t0 = time.perf_counter()
        yield
        self.timings[phase] = time.perf_counter() - t0

    def close(self) -> None:
        """Close the progress bar."""
        self._bar.close()


# ------------------------------------------------------------------- the builder
@dataclass
class NodeState:
    """What the bottom-up pass knows of one tree node.

    ``skeleton`` holds tree positions (empty at the root), ``interpolation``
    the matrix ``T`` over the node's candidates, ``coupling`` the block
    ``G[α̃₁, α̃₂]`` of its children (inner nodes), ``sketch`` the rows
    ``Ω[out]ᵀ G[out, candidates]`` (dropped once the parent has its own),
    ``local_skeleton`` the skeleton positions among the candidates and
    ``test_coefficients`` the upward test coefficients ``V_αᵀ Ω[α]``.
    """

    skeleton: Array = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    interpolation: Array | None = None
    coupling: Array | None = None
    sketch: Array | None = None
    local_skeleton: Array | None = None
    test_coefficients: Array | None = None

    def skeletonize(self, sketch: Array, candidates: Array, test: Array, tol: float,
                    max_rank: int) -> None:
        """Skeleton and interpolation from ``sketch`` over ``candidates``.

        ``test`` holds the candidates' test coefficients (a leaf's ``Ω[α]``).
        """
        self.sketch = sketch
        self.local_skeleton, self.interpolation = interpolative_decomposition(sketch, tol, max_rank)
        self.skeleton = candidates[self.local_skeleton]
        self.test_coefficients = self.interpolation @ test


def gaussian_sketch(source: Any, perm: Array, width: int, seed: int) -> tuple[Array, Array]:
    """A Gaussian test matrix ``Ω`` (tree order, ``width`` columns) and ``Y = GΩ``.

    ``Y`` comes from exact products ``source.matvec``, ``PRODUCT_CHUNK``
    columns at a time; ``Ω`` is drawn from ``(seed, 3)``.

    Examples
    --------
    >>> class Dense:
    ...     n_params = 3
    ...     def matvec(self, V): return 2.0 * V
    >>> omega, Y = gaussian_sketch(Dense(), np.array([2, 0]), 4, seed=0)
    >>> omega.shape, bool(np.allclose(Y, 2 * omega))
    ((2, 4), True)
    """
    omega = np.random.default_rng([seed, 3]).standard_normal((len(perm), width))
    Y = np.zeros((len(perm), width))
    for j in range(0, width, PRODUCT_CHUNK):  # bounded memory per product call
        full = np.zeros((int(source.n_params), min(PRODUCT_CHUNK, width - j)))
        full[perm] = omega[:, j:j + full.shape[1]]
        Y[:, j:j + full.shape[1]] = np.asarray(source.matvec(full), dtype=np.float64)[perm]
    return omega, Y


def _fetch_couplings(tree: ClusterTree, states: list[NodeState], nodes: Array,
                     near_pairs: Array, rounds: EntryRounds, what: str) -> list[Array]:
    """One round: the couplings of the children of ``nodes`` (stored in their states),
    then the exact blocks of ``near_pairs`` (returned)."""
    requests = [(tree.perm[states[c1].skeleton], tree.perm[states[c2].skeleton])
                for c1, c2 in tree.node_children[nodes]]
    requests += [(tree.params(a), tree.params(b)) for a, b in near_pairs]
    blocks = rounds.fetch(requests, what)
    for a, block in zip(nodes, blocks):
        states[a].coupling = block
    return blocks[len(nodes):]


def _skeletonize_node(tree: ClusterTree, states: list[NodeState], a: int, omega: Array,
                      Y: Array, tol: float, max_rank: int) -> None:
    """Skeletonize node ``a`` from its sketch (a leaf) or its children's (an inner node)."""
    c1, c2 = tree.node_children[a]
    s, e = tree.node_start[a], tree.node_stop[a]
    if c1 < 0:
        sketch = leaf_sketch(Y[s:e], tree.leaf_blocks[a - tree.leaf_nodes[0]], omega[s:e])
        states[a].skeletonize(sketch, np.arange(s, e), omega[s:e], tol, max_rank)
        return
    left, right = states[c1], states[c2]
    sketch = parent_sketch(left.sketch, left.local_skeleton, right.sketch, right.local_skeleton,
                           left.test_coefficients, right.test_coefficients, states[a].coupling)
    states[a].skeletonize(sketch, np.concatenate([left.skeleton, right.skeleton]),
                          np.vstack([left.test_coefficients, right.test_coefficients]),
                          tol, max_rank)
    left.sketch = right.sketch = None


def skeletonize(tree: ClusterTree, rounds: EntryRounds, omega: Array, Y: Array, tol: float,
                max_rank: int) -> tuple[list[NodeState], list[Array]]:
    """Bottom-up skeletonization with nested bases; one entry round per inner level.

    The round of level ℓ fetches the couplings of the children of its nodes
    (and, at the level above the leaves, the exact near-field blocks). Returns
    the state of every node and the exact blocks ``G[α, β]`` of ``tree.near_pairs``.
    """
    states = [NodeState() for _ in range(tree.n_nodes)]
    near_exact: list[Array] = []
    for level in range(tree.depth, -1, -1):
        nodes = tree.nodes_at(level)
        if level < tree.depth:
            near = tree.near_pairs if level == tree.depth - 1 else tree.near_pairs[:0]
            near_exact += _fetch_couplings(tree, states, nodes, near, rounds,
                                           f"couplings level {level + 1}")
        if level > 0:
            for a in nodes:
                _skeletonize_node(tree, states, a, omega, Y, tol, max_rank)
        if level == tree.depth:
            rounds.step()
    return states, near_exact


def near_field_corrections(hss: HMatrix, near_pairs: Array,
                           exact_blocks: Sequence[Array]) -> list[Array]:
    """The corrections ``G[α, β] − H_hss[α, β]`` of the near leaf pairs ``(α, β)``.

    Examples
    --------
    >>> h = HMatrix(2, [0, 1], [-1, 0, 0], [[1, 2], [-1, -1], [-1, -1]], [0, 0, 1],
    ...             [2, 1, 2], [[], [0], [1]], [None, np.eye(1), np.eye(1)],
    ...             [np.array([[3.0]]), None, None], [np.eye(1), 2 * np.eye(1)],
    ...             np.zeros((0, 2)), [])
    >>> near_field_corrections(h, np.array([[1, 2]]), [np.array([[4.0]])])[0].tolist()
    [[1.0]]
    """
    return [G_ab - hss.hss_block(a, b) for (a, b), G_ab in zip(near_pairs, exact_blocks)]


def build_hmatrix(source, tol: float = 1e-3, max_rank: int = 256, leaf_size: int = 256,
                  budget: float = 0.0, neighbors: int = 32, metric: str = "angle",
                  eps: float | None = None, seed: int = 0, n_trees: int = 4,
                  max_near: int = 32, oversampling: int = OVERSAMPLING,
                  progress: bool | None = None) -> HMatrix:
    """Build an :class:`~dgnh.hmatrix.HMatrix` of the symmetric PSD matrix behind ``source``.

    :func:`dgnh.compress` validates the parameters and is the public entry
    point; see :mod:`dgnh.hmatrix` for the algorithm.

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
    eps : ``None`` for exact entries, else the sampled-entry accuracy (docs/design.md §3).
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
    n_params = int(source.n_params)
    diag = np.asarray(source.diagonal(), dtype=np.float64)
    if diag.shape != (n_params,) or not np.all(np.isfinite(diag)):
        raise ValueError(f"source.diagonal() must be a finite vector of length {n_params}")
    active = np.flatnonzero(diag > 0)
    depth = tree_depth(len(active), leaf_size)
    n_trees = n_trees if budget > 0 else 1  # the other trees only find neighbours
    rounds = EntryRounds(source, eps, seed, 2 * depth + 2, progress)
    with rounds.timed("tree"):
        trees = grow_trees(active, diag[active], depth, n_trees, metric, seed, rounds.fetch)
    with rounds.timed("leaves_and_neighbors"):
        tree = cluster_tree(active, diag[active], trees, rounds.fetch, budget=budget,
                            neighbors=neighbors, max_near=max_near, metric=metric)
    width = min(max_rank, len(active)) + oversampling if depth > 0 else 0
    with rounds.timed("products"):
        if width:
            rounds.status("products")
        omega, Y = gaussian_sketch(source, tree.perm, width, seed)
    with rounds.timed("skeletons"):
        states, near_exact = skeletonize(tree, rounds, omega, Y, tol, max_rank)
        rounds.close()
    hss = HMatrix(n_params, tree.perm, tree.node_parent, tree.node_children, tree.node_start,
                  tree.node_stop, [s.skeleton for s in states],
                  [s.interpolation for s in states], [s.coupling for s in states],
                  tree.leaf_blocks, tree.near_pairs[:0], [])
    with rounds.timed("near_blocks"):
        h = hss.with_near_field(tree.near_pairs,
                                near_field_corrections(hss, tree.near_pairs, near_exact))
    rounds.timings["total"] = time.perf_counter() - t_start
    parameters = {"tol": tol, "max_rank": max_rank, "leaf_size": leaf_size, "budget": budget,
                  "neighbors": neighbors, "metric": metric, "eps": eps, "seed": seed,
                  "n_trees": n_trees, "max_near": max_near, "oversampling": oversampling}
    return h.with_report({
        "method": "hmatrix", "parameters": parameters, "n_params": n_params,
        "n_zero_diagonal": int(n_params - len(active)), "depth": depth,
        "n_leaves": len(tree.leaf_start) - 1 if len(active) else 0,
        "n_near_pairs": len(tree.near_pairs), "entry_rounds": rounds.rounds,
        "entries_requested": rounds.entries, "sketch_columns": width,
        "timings": rounds.timings, **h.rank_statistics(), "nbytes": h.nbytes,
        "dense_nbytes": 8 * n_params * n_params,
    })
