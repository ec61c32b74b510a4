"""Building an :class:`~dgnh.hmatrix.HMatrix` from an entry source (docs/design.md §4).

:func:`build_hmatrix` orchestrates the steps: the cluster tree
(:mod:`dgnh.hmatrix.tree`), rounds of exact products with a power-iterated
test matrix (:class:`~dgnh.hmatrix.sketch.Sketch`), the bottom-up
skeletonization (:func:`skeletonize`: :func:`leaf_sketch`,
:func:`parent_sketch`, :func:`interpolative_decomposition` with an absolute
threshold, one :class:`NodeState` per node, a wider sketch where a node's rank
fills it), the near-field corrections (:func:`near_field_corrections`) and the
diagonal compensation that makes the result positive semi-definite
(:func:`psd_shift`). Entry requests go through an :class:`EntryRounds`: one
``entries_many`` call per round, counted, timed and shown on a progress bar.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import scipy.linalg
from tqdm import tqdm

from ..batching import on_cores
from ..config import discard_rows, return_freed_memory
from ..phases import phase as named_phase
from ..validation import check_int, check_number
from .operator import HMatrix
from .psd import psd_shift
from .sketch import Sketch, oversampling_for
from .tree import (ClusterTree, cluster_tree, gram_geometry, grow_trees, tree_depth,
                   tree_geometry_for, tree_rounds)

Array = np.ndarray
INITIAL_RANK = 256  # first sketch rank (below max_rank the sketch grows where needed)
MAX_GROWTHS = 4  # widening rounds of the sketch
LEAF_CHUNKS = 16  # row blocks of the leaf level, each freeing its sketch rows when done
LEVEL_SAFETY = 5.0  # τ = tol·‖G‖/(LEVEL_SAFETY·√depth): the global tolerance per level


# ------------------------------------------------------------------ per-node numerics
def _pivoted_qr(block: Array) -> tuple[Array, Array]:
    """``R`` and the column pivots of a pivoted QR (empty for an empty block)."""
    if block.size == 0:
        return np.zeros((0, block.shape[1])), np.arange(block.shape[1])
    return scipy.linalg.qr(block, mode="r", pivoting=True, check_finite=False)


def _rank(R: Array, tol: float, threshold: float) -> int:
    """Leading pivots with ``|R_kk| > max(tol·|R_00|, threshold)``."""
    diag = np.abs(np.diag(R))
    if diag.size == 0:
        return 0
    small = diag <= max(tol * diag[0], threshold)
    return int(np.argmax(small)) if small.any() else len(diag)


def _interpolation(R: Array, piv: Array, k: int) -> tuple[Array, Array]:
    """Skeleton (the first ``k`` pivots) and ``T`` with ``block ≈ block[:, skel] @ T``."""
    n = len(piv)
    T = np.zeros((k, n))
    T[:, piv[:k]] = np.eye(k)
    if 0 < k < n:
        T[:, piv[k:]] = scipy.linalg.solve_triangular(R[:k, :k], R[:k, k:], check_finite=False)
    return piv[:k].astype(np.int64), T


def interpolative_decomposition(block: Array, tol: float, max_rank: int,
                                threshold: float = 0.0) -> tuple[Array, Array]:
    """Column interpolative decomposition ``block ≈ block[:, skel] @ T`` by pivoted QR.

    The rank is the number of leading pivots with ``|R_kk| > max(tol·|R_00|,
    threshold)`` (a relative and an absolute tolerance), at most ``max_rank``.
    ``T[:, skel]`` is the identity.

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
    >>> interpolative_decomposition(A, 0.0, 5, threshold=10.0)[0].tolist()  # |R_00| < 10
    []
    """
    R, piv = _pivoted_qr(block)
    return _interpolation(R, piv, min(_rank(R, tol, threshold), max_rank))


def leaf_sketch(Y_leaf: Array, D: Array, omega_leaf: Array, overwrite: bool = False) -> Array:
    """``Ω[out]ᵀ G[out, α]`` of a leaf from ``Y[α] = (GΩ)[α]``: ``(Y[α] − G[α,α]Ω[α])ᵀ``
    (``overwrite``: computed in ``Y_leaf``, a transposed view of it is returned).

    Examples
    --------
    >>> G, omega = np.array([[2.0, 1.0], [1.0, 3.0]]), np.array([[1.0], [1.0]])
    >>> leaf_sketch((G @ omega)[:1], G[:1, :1], omega[:1]).tolist()  # Ω[1]ᵀ G[1, 0]
    [[1.0]]
    """
    if overwrite:
        Y_leaf -= D @ omega_leaf
        return Y_leaf.T
    return (Y_leaf - D @ omega_leaf).T


def parent_sketch(S1: Array, S2: Array, omega1: Array, omega2: Array, B: Array) -> Array:
    """``Ω[out(p)]ᵀ G[out(p), α̃₁ ∪ α̃₂]`` of a parent from its children.

    ``S_i`` are the children's sketches over their skeletons ``α̃_i``,
    ``omega_i = V_iᵀ Ω[α_i]`` their upward test coefficients and
    ``B = G[α̃₁, α̃₂]``; the sibling's share ``Ω[α₂]ᵀ G[α₂, α̃₁] ≈ omega₂ᵀ Bᵀ``
    is removed.

    Examples
    --------
    >>> one = np.ones((1, 1))
    >>> parent_sketch(3 * one, 5 * one, one, 2 * one, one).tolist()
    [[1.0, 4.0]]
    """
    return np.hstack([S1 - omega2.T @ B.T, S2 - omega1.T @ B])


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
        with named_phase(what):
            blocks = (self.source.entries_many(requests, eps=self.eps, seed=round_seed)
                      if requests else [])
        self.timings["entries"] += time.perf_counter() - t0
        return_freed_memory()  # the round's temporaries (the levels' arrays stay)
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
        """Add the wall time of the ``with`` block to ``timings[phase]`` (and mark it as
        that :func:`~dgnh.phases.phase`)."""
        t0 = time.perf_counter()
        with named_phase(phase):
            yield
        self.timings[phase] = self.timings.get(phase, 0.0) + time.perf_counter() - t0

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
    ``Ω[out]ᵀ G[out, candidates]`` (once the node is skeletonized, only its
    skeleton's columns: what the parent reads), ``inputs`` the candidates' test
    coefficients (dropped once the node is skeletonized), ``test_coefficients``
    the upward test coefficients ``V_αᵀ Ω[α] = T·inputs`` (sketch and test
    coefficients dropped as soon as the parent's rows are formed from them: a
    level's rows and its children's are never all alive), ``local_skeleton`` the
    skeleton positions among the candidates and ``wanted`` the rank the threshold
    asked for (before ``max_rank``).
    """

    skeleton: Array = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    interpolation: Array | None = None
    coupling: Array | None = None
    sketch: Array | None = None
    inputs: Array | None = None
    local_skeleton: Array | None = None
    test_coefficients: Array | None = None
    wanted: int = 0

    def skeletonize(self, candidates: Array, threshold: float, max_rank: int,
                    gaussian: Array) -> None:
        """Skeleton and interpolation from :attr:`sketch` over ``candidates``.

        The rows of the Gaussian columns (``gaussian``, a mask) set the rank
        (:attr:`wanted`: pivots above ``threshold``), capped at ``max_rank``;
        with power-iterated rows the skeleton comes from all rows, the Gaussian
        ones scaled to unit typical norm.
        """
        R, piv = _pivoted_qr(self.sketch[gaussian])
        self.wanted = _rank(R, 0.0, threshold)
        if not gaussian.all():
            rows = np.vstack([self.sketch[gaussian] / np.sqrt(gaussian.sum()),
                              self.sketch[~gaussian]])
            R, piv = _pivoted_qr(rows)
        self.local_skeleton, self.interpolation = _interpolation(R, piv,
                                                                 min(self.wanted, max_rank))
        self.skeleton = candidates[self.local_skeleton]
        self.test_coefficients = self.interpolation @ self.inputs


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


def _node_rows(tree: ClusterTree, states: list[NodeState], a: int, omega: Array, Y: Array,
               below: dict[int, tuple[Array, Array]],
               overwrite: bool = False) -> tuple[Array, Array]:
    """Sketch rows of node ``a`` over its candidates and the candidates' test coefficients.

    A leaf uses ``omega, Y`` (tree order; ``overwrite``: its rows of ``Y`` become
    its sketch rows); an inner node its children's rows and upward test
    coefficients ``below[c]`` through their skeletons and coupling.
    """
    c1, c2 = tree.node_children[a]
    if c1 < 0:
        s, e = tree.node_start[a], tree.node_stop[a]
        return leaf_sketch(Y[s:e], tree.leaf_blocks[a - tree.leaf_nodes[0]], omega[s:e],
                           overwrite), omega[s:e]
    (S1, w1), (S2, w2) = below[c1], below[c2]
    return parent_sketch(S1, S2, w1, w2, states[a].coupling), np.vstack([w1, w2])


def _rows_for_columns(tree: ClusterTree, states: list[NodeState], level: int, omega: Array,
                      Y: Array) -> dict[int, tuple[Array, Array]]:
    """Rows and test coefficients of the nodes of ``level`` for new test columns ``omega, Y``,
    passed up through the fixed skeletons of the levels below."""
    below: dict[int, tuple[Array, Array]] = {}
    for lev in range(tree.depth, level - 1, -1):
        current = {int(a): _node_rows(tree, states, a, omega, Y, below) for a in tree.nodes_at(lev)}
        if lev == level:
            return current
        below = {a: (rows[:, states[a].local_skeleton], states[a].interpolation @ inputs)
                 for a, (rows, inputs) in current.items()}
    return {}


def _candidates(tree: ClusterTree, states: list[NodeState], a: int) -> Array:
    c1, c2 = tree.node_children[a]
    if c1 < 0:
        return np.arange(tree.node_start[a], tree.node_stop[a])
    return np.concatenate([states[c1].skeleton, states[c2].skeleton])


@dataclass
class SketchPlan:
    """Ranks of the sketch: the target ``rank`` (``width = rank + oversampling``) grows
    up to ``max_rank``; ``threshold`` is the absolute ID tolerance τ."""

    rank: int
    max_rank: int
    oversampling: int | None
    threshold: float

    def columns(self, rank: int) -> int:
        return rank + (oversampling_for(rank) if self.oversampling is None else self.oversampling)

    def can_grow(self, sketch: Sketch) -> bool:
        """True while a level may still widen the sketch."""
        return self.rank < self.max_rank and sketch.growths <= MAX_GROWTHS

    def saturated(self, state: NodeState, n_candidates: int, width: int, n_active: int) -> bool:
        """True when a node's ID fills the sketch and a wider one could change it."""
        return (self.rank <= state.wanted < n_candidates and self.rank < self.max_rank
                and width < n_active)


def _ids(tree: ClusterTree, states: list[NodeState], nodes: Array, sketch: Sketch,
         plan: SketchPlan) -> None:
    """The IDs of ``nodes`` from their sketch rows, on all cores."""
    on_cores(lambda a: states[a].skeletonize(_candidates(tree, states, a),
                                              plan.threshold * sketch.scale, plan.max_rank,
                                              sketch.gaussian), nodes)


def _keep_skeleton_rows(states: list[NodeState], nodes: Array) -> None:
    """Once the IDs of ``nodes`` are final: their inputs go (at the leaves, the last views
    of Ω go first), the parent reads the rows of the skeleton (a copy: the leaves' views
    of the sketch's Y go) and the test coefficients."""
    for a in nodes:
        states[a].inputs = None
    for a in nodes:
        states[a].sketch = states[a].sketch[:, states[a].local_skeleton]


def _skeletonize_leaves(tree: ClusterTree, states: list[NodeState], nodes: Array,
                        sketch: Sketch, plan: SketchPlan) -> None:
    """The leaf level when the sketch can no longer grow (its last reader): the leaves take
    the sketch's N × width rows over (Y in place), ``LEAF_CHUNKS`` row blocks at a time,
    and each block's pages of Ω and Y go back to the OS once its leaves are done — the
    sketch shrinks as the leaves' interpolations, test coefficients and skeleton rows grow
    (at N ≈ 1M: 2.8 GB against 2.1 GB; both at once was the build's peak)."""
    omega, Y = sketch.omega, sketch.Y
    sketch.release()
    for chunk in np.array_split(nodes, min(LEAF_CHUNKS, len(nodes))):
        for a in chunk:
            states[a].sketch, states[a].inputs = _node_rows(tree, states, a, omega, Y, {},
                                                            overwrite=True)
        _ids(tree, states, chunk, sketch, plan)
        _keep_skeleton_rows(states, chunk)
        start, stop = tree.node_start[chunk].min(), tree.node_stop[chunk].max()
        discard_rows(omega, start, stop)
        discard_rows(Y, start, stop)


def _skeletonize_level(tree: ClusterTree, states: list[NodeState], nodes: Array,
                       sketch: Sketch, plan: SketchPlan) -> None:
    """IDs of the nodes of one level; the sketch grows (up to ``MAX_GROWTHS`` times in a
    build) while a node's rank fills it."""
    if tree.node_children[nodes[0], 0] < 0 and not plan.can_grow(sketch):
        _skeletonize_leaves(tree, states, nodes, sketch, plan)
        return
    below = {int(c): (states[c].sketch, states[c].test_coefficients)
             for a in nodes for c in tree.node_children[a] if c >= 0}
    omega, Y = sketch.omega, sketch.Y
    for a in nodes:
        states[a].sketch, states[a].inputs = _node_rows(tree, states, a, omega, Y, below)
        for c in tree.node_children[a][tree.node_children[a] >= 0]:  # now in a's (copies)
            below.pop(int(c))
            states[c].sketch = states[c].test_coefficients = None
    del omega, Y
    while True:
        _ids(tree, states, nodes, sketch, plan)
        if sketch.growths > MAX_GROWTHS or not any(
                plan.saturated(states[a], len(states[a].inputs), sketch.gaussian_width,
                               len(tree.perm)) for a in nodes):
            break
        plan.rank = min(2 * plan.rank, plan.max_rank)
        new = sketch.grow(plan.columns(plan.rank) - sketch.gaussian_width)
        if new.start == new.stop:
            break
        rows = _rows_for_columns(tree, states, tree.node_level[nodes[0]], sketch.omega[:, new],
                                 sketch.Y[:, new])
        for a in nodes:
            states[a].sketch = np.vstack([states[a].sketch, rows[int(a)][0]])
            states[a].inputs = np.hstack([states[a].inputs, rows[int(a)][1]])
    _keep_skeleton_rows(states, nodes)


def skeletonize(tree: ClusterTree, rounds: EntryRounds, sketch: Sketch,
                plan: SketchPlan) -> tuple[list[NodeState], list[Array]]:
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
            with named_phase(f"IDs level {level}"):
                _skeletonize_level(tree, states, nodes, sketch, plan)
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


def _grow_first(sketch: Sketch, plan: SketchPlan, rounds: EntryRounds, depth: int) -> None:
    """The sketch's first round of products (none for a single leaf)."""
    with rounds.timed("products"):
        if depth > 0:
            rounds.status("products")
            sketch.grow(plan.columns(plan.rank))
            return_freed_memory()  # the products' temporaries


def _grow_trees(sketch: Sketch, geometry: str, active: Array, diag: Array, depth: int,
                n_trees: int, metric: str, seed: int, rounds: EntryRounds) -> list[list[Array]]:
    """The trees' leaves (:func:`~dgnh.hmatrix.tree.grow_trees`) from the sketch's
    embedding or from entries. A function of its own: the Gram ``fetch`` holds the
    sketch's full ``Y``, which the leaf level later takes over and frees."""
    if geometry == "sketch":
        diag_z, fetch_z = gram_geometry(sketch.Y, sketch.embedding_basis(), rounds.status,
                                        rounds.step)
        return grow_trees(np.arange(len(active)), diag_z, depth, n_trees, metric, seed,
                          fetch_z)
    return grow_trees(active, diag[active], depth, n_trees, metric, seed, rounds.fetch)


def build_hmatrix(source, tol: float = 1e-3, max_rank: int = 256, leaf_size: int = 256,
                  budget: float = 0.0, neighbors: int = 32, metric: str = "angle",
                  eps: float | None = None, seed: int = 0, n_trees: int = 4,
                  max_near: int = 32, oversampling: int | None = None,
                  power_iterations: int = 1, norm_estimate: float | None = None,
                  tree_geometry: str = "auto", progress: bool | None = None) -> HMatrix:
    """Build a positive semi-definite :class:`~dgnh.hmatrix.HMatrix` of the symmetric PSD
    matrix behind ``source``, aiming at ``‖G − H‖₂ ≤ tol·‖G‖₂``.

    :func:`dgnh.compress` validates the shared parameters and is the public
    entry point; see :mod:`dgnh.hmatrix` for the algorithm.

    Parameters
    ----------
    source : entry source with exact products: ``n_params``, ``diagonal()``,
        ``entries_many(requests, eps=, seed=)`` and ``matvec(V)``.
    tol : target relative error: every interpolative decomposition keeps the
        pivots above ``τ = tol·‖G‖₂/(LEVEL_SAFETY·√depth)`` (absolute).
    max_rank : cap on every skeleton size (``report["n_capped_nodes"]`` counts
        the nodes it cut).
    leaf_size : largest leaf (the tree is balanced, leaves hold ≤ ``leaf_size``).
    budget : near-field budget in [0, 1] (fraction of the other leaves), 0 = HSS.
    neighbors : nearest neighbours per parameter (for the near-field votes).
    metric : ``"angle"`` or ``"gram"``.
    eps : ``None`` for exact entries, else the sampled-entry accuracy (docs/design.md §3).
    seed : seeds every random choice (and the entry sampler).
    n_trees : randomized trees for the neighbour search (the first is the cluster tree).
    max_near : absolute cap on the near leaves of one leaf.
    oversampling : sketch columns beyond the target rank (``None``: ``max(10, rank/2)``).
    power_iterations : ``q``: with ``q ≥ 1`` the skeletons come from Gaussian and
        power-iterated sketch rows ``orth(G^q Ω₀)`` (:mod:`~dgnh.hmatrix.sketch`), the
        ranks from the Gaussian ones; ``q + 1`` product rounds per sketch width (>= 0).
    norm_estimate : ``‖G‖₂`` if known (e.g. from Lanczos); ``None``: a lower bound from
        the sketch (:meth:`~dgnh.hmatrix.sketch.Sketch.norm_estimate`).
    tree_geometry : the cluster tree's distances from ``"entries"`` of ``G`` or from the
        ``"sketch"``'s Nyström embedding; ``"auto"``: entries while they are cheap
        (:func:`~dgnh.hmatrix.tree.tree_geometry_for`).
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
    oversampling = None if oversampling is None else check_int(oversampling, "oversampling", 0)
    power_iterations = check_int(power_iterations, "power_iterations", 0)
    if norm_estimate is not None:
        norm_estimate = check_number(norm_estimate, "norm_estimate", low=0)
    n_params = int(source.n_params)
    diag = np.asarray(source.diagonal(), dtype=np.float64)
    if diag.shape != (n_params,) or not np.all(np.isfinite(diag)):
        raise ValueError(f"source.diagonal() must be a finite vector of length {n_params}")
    active = np.flatnonzero(diag > 0)
    depth = tree_depth(len(active), leaf_size)
    n_trees = n_trees if budget > 0 else 1  # the other trees only find neighbours
    rounds = EntryRounds(source, eps, seed, tree_rounds(depth) + depth + 2, progress)
    geometry = tree_geometry_for(source, len(active), depth, tree_geometry)
    plan = SketchPlan(min(max_rank, INITIAL_RANK, len(active)), max_rank, oversampling, 0.0)
    # the tree's geometry from the sketch: the products first (parameter order), rows
    # reordered to the tree after it; from entries: the tree first, the sketch in its order
    sketch = Sketch(source, active, power_iterations, seed)
    if geometry == "sketch":
        _grow_first(sketch, plan, rounds, depth)
    with rounds.timed("tree"):
        trees = _grow_trees(sketch, geometry, active, diag, depth, n_trees, metric, seed,
                            rounds)
    with rounds.timed("leaves_and_neighbors"):
        tree = cluster_tree(active, diag[active], trees, rounds.fetch, budget=budget,
                            neighbors=neighbors, max_near=max_near, metric=metric)
        sketch.reorder(tree.perm)
    if geometry == "entries":
        _grow_first(sketch, plan, rounds, depth)
    norm = norm_estimate if norm_estimate is not None else (
        sketch.norm_estimate() if depth > 0 else float(np.linalg.norm(tree.leaf_blocks[0], 2)))
    plan.threshold = tol * norm / (LEVEL_SAFETY * np.sqrt(max(depth, 1)))
    with rounds.timed("skeletons"):
        states, near_exact = skeletonize(tree, rounds, sketch, plan)
        rounds.close()
    hss = HMatrix(n_params, tree.perm, tree.node_parent, tree.node_children, tree.node_start,
                  tree.node_stop, [s.skeleton for s in states],
                  [s.interpolation for s in states], [s.coupling for s in states],
                  tree.leaf_blocks, tree.near_pairs[:0], [])
    with rounds.timed("psd_shift"):
        guess = max(tol * norm, sketch.error_guess(hss.matvec))
        sketch.release(0)  # its last columns: not needed by the factorizations
        return_freed_memory()  # and the product's temporaries: the factorizations run on
        # worker threads, whose heaps do not reuse the main thread's free memory
        shift, n_factorizations = psd_shift(hss, norm, guess, seed)
        hss = hss.with_shift(shift, overwrite=True)  # the leaf blocks are the build's own
    with rounds.timed("near_blocks"):
        h = hss.with_near_field(tree.near_pairs,
                                near_field_corrections(hss, tree.near_pairs, near_exact))
    rounds.timings["total"] = time.perf_counter() - t_start
    parameters = {"tol": tol, "max_rank": max_rank, "leaf_size": leaf_size, "budget": budget,
                  "neighbors": neighbors, "metric": metric, "eps": eps, "seed": seed,
                  "n_trees": n_trees, "max_near": max_near, "oversampling": oversampling,
                  "power_iterations": power_iterations, "tree_geometry": tree_geometry}
    return h.with_report({
        "method": "hmatrix", "parameters": parameters, "n_params": n_params,
        "n_zero_diagonal": int(n_params - len(active)), "depth": depth,
        "n_leaves": len(tree.leaf_start) - 1 if len(active) else 0,
        "n_near_pairs": len(tree.near_pairs), "entry_rounds": rounds.rounds,
        "entries_requested": rounds.entries, "sketch_columns": sketch.width,
        "gaussian_columns": sketch.gaussian_width,
        "power_iterations": power_iterations, "product_rounds": sketch.product_rounds,
        "product_columns": sketch.product_columns, "sketch_growths": max(sketch.growths - 1, 0),
        "norm_estimate": norm, "threshold": plan.threshold, "tree_geometry": geometry,
        "n_capped_nodes": int(sum(s.wanted > max_rank for s in states)),
        "psd_shift": shift, "psd_factorizations": n_factorizations,
        "timings": rounds.timings, **h.rank_statistics(), "nbytes": h.nbytes,
        "dense_nbytes": 8 * n_params * n_params,
    })
