"""Geometry-oblivious hierarchical approximation of the GNH (docs/design.md §4).

:func:`build_hmatrix` turns an *entry source* — ``n_params``, ``diagonal()``,
``entries_many(requests, eps=, seed=)`` and exact products ``matvec(V)``, such
as a :class:`~dgnh.gauss_newton.GaussNewton` — into an :class:`HMatrix`:

1. Parameters with a zero diagonal have zero rows and columns; they stay out
   of the tree and exactly zero.
2. A balanced cluster tree (:mod:`~dgnh.hmatrix.tree`): each node is split at
   the median of ``d(·, p) − d(·, q)`` for the farthest pair ``p, q`` among a
   few sampled columns, with the Gram-angle distance ``1 − G_ab²/(G_aa G_bb)``
   (a zero entry is *far*) or the Gram distance ``G_aa + G_bb − 2G_ab``, where
   ``G_ab`` is an entry or, for large problems (``tree_geometry``), the sketch's
   Nyström approximation ``z_a·z_b`` (step 4's products come first;
   :meth:`~dgnh.hmatrix.sketch.Sketch.embedding_basis`), which needs no entries. One
   round of entries splits two levels (a round costs about one pass over the
   Jacobian).
3. With a near field (``budget > 0``), neighbours from ``n_trees`` randomized
   trees vote for the leaf pairs stored as exact near-field corrections
   (at most ``budget·(n_leaves − 1)`` and ``max_near`` per leaf); ``budget = 0`` is HSS.
4. Bottom-up skeletonization (:mod:`~dgnh.hmatrix.build`) by interpolative
   decomposition (pivoted QR) with nested bases. The rows it sees are a
   randomized sketch ``Ω[out]ᵀ G[out, α]`` of the node's off-diagonal block
   row (Martinsson, SIAM J. Matrix Anal. Appl. 32(4), 2011) from batched exact
   products ``Y = GΩ`` (:mod:`~dgnh.hmatrix.sketch`; Gaussian ``Ω`` by
   default, optional power iterations). Unlike GOFMM's sampled rows, which
   missed the rows of split output units of a BCE autoencoder, a Gaussian
   sketch sees every row and needs fewer entries.
5. A global tolerance: every ID keeps the pivots above the absolute threshold
   ``τ = tol·‖G‖₂/(LEVEL_SAFETY·√depth)`` (the target split over the levels;
   ``‖G‖₂`` from the caller or a lower bound from the sketch), measured in the
   sketch's scale. Where a node's rank fills the sketch (rank ≥ width −
   oversampling) and ``max_rank`` allows more, the sketch widens by another
   round of products and the level is skeletonized again; ``max_rank`` caps
   every skeleton and the report counts the nodes it cut (``n_capped_nodes``).
6. Siblings are coupled through the entries ``G[α̃₁, α̃₂]``; the diagonal leaf
   blocks are exact entries.
7. Positive semi-definite by diagonal compensation: the smallest ``σ ≥ 0``
   (bisection, 5%) for which the HSS Cholesky of ``H + σI`` succeeds at
   ``reg = 1e-12‖G‖`` is added to the leaf blocks (``report["psd_shift"]``).
   ``σ ≤ −λ_min ≤ ‖G − H‖₂``, so the error at most doubles; measured, σ is
   0.1–0.5 of the error. (A Nyström interpolation ``T = G[α̃, α̃]⁻¹G[α̃, α]``
   would be PSD by itself but was 3–900× less accurate on the same skeletons.)

Entry requests are level-synchronous: every round (two tree levels, the
leaves, one coupling level) is ONE ``entries_many`` call, which a
:class:`~dgnh.gauss_newton.GaussNewton` turns into one task per shard;
widening the sketch needs products, no entries.
:meth:`HMatrix.factorize` gives ``(H_hss + λI)⁻¹`` in O(N·r²)
(:mod:`~dgnh.hmatrix.factorization`).

Modules, bottom to top: :mod:`~dgnh.hmatrix.tree`,
:mod:`~dgnh.hmatrix.factorization`, :mod:`~dgnh.hmatrix.operator`
(:class:`HMatrix` and its storage format), :mod:`~dgnh.hmatrix.psd` (the PSD
compensation), :mod:`~dgnh.hmatrix.sketch`, :mod:`~dgnh.hmatrix.build`.
"""

from __future__ import annotations

from .build import build_hmatrix, interpolative_decomposition, leaf_sketch, parent_sketch
from .factorization import HSSFactorization
from .operator import FORMAT, FORMAT_VERSION, HMatrix
from .psd import psd_shift
from .tree import (METRICS, entry_distances, leaf_neighbors, merge_neighbors, select_near_pairs,
                   split_levels, split_node)

__all__ = [
    "FORMAT", "FORMAT_VERSION", "METRICS", "HMatrix", "HSSFactorization", "build_hmatrix",
    "entry_distances", "interpolative_decomposition", "leaf_neighbors", "leaf_sketch",
    "merge_neighbors", "parent_sketch", "psd_shift", "select_near_pairs", "split_levels",
    "split_node",
]
