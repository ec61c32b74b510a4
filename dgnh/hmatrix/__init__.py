"""Geometry-oblivious hierarchical approximation of the GNH (docs/design.md §4).

:func:`build_hmatrix` turns an *entry source* — ``n_params``, ``diagonal()``,
``entries_many(requests, eps=, seed=)`` and exact products ``matvec(V)``, such
as a :class:`~dgnh.gauss_newton.GaussNewton` — into an :class:`HMatrix`:

1. Parameters with a zero diagonal have zero rows and columns; they stay out
   of the tree and exactly zero.
2. A balanced cluster tree from entries only (:mod:`~dgnh.hmatrix.tree`): each
   node is split at the median of ``d(·, p) − d(·, q)`` for the farthest pair
   ``p, q`` among a few sampled columns, with the Gram-angle distance
   ``1 − G_ab²/(G_aa G_bb)`` (a zero entry is *far*) or the Gram distance
   ``G_aa + G_bb − 2G_ab``.
3. With a near field (``budget > 0``), neighbours from ``n_trees`` randomized
   trees vote for the leaf pairs stored as exact near-field corrections
   (at most ``budget·(n_leaves − 1)`` and ``max_near`` per leaf); ``budget = 0`` is HSS.
4. Bottom-up skeletonization (:mod:`~dgnh.hmatrix.build`) by interpolative
   decomposition (pivoted QR, *relative* ``tol``, cap ``max_rank``) with nested
   bases. The rows it sees are a randomized sketch ``Ω[out]ᵀ G[out, α]`` of the
   node's off-diagonal block row (Martinsson, SIAM J. Matrix Anal. Appl. 32(4),
   2011) from ONE round of products ``Y = GΩ``. Unlike GOFMM's sampled rows,
   which missed the rows of split output units of a BCE autoencoder, a Gaussian
   sketch sees every row and needs fewer entries.
5. Siblings are coupled through the entries ``G[α̃₁, α̃₂]``; the diagonal leaf
   blocks are exact entries.

Entry requests are level-synchronous: every round (one tree level) is ONE
``entries_many`` call, which a :class:`~dgnh.gauss_newton.GaussNewton` turns
into one task per shard. :meth:`HMatrix.factorize` gives ``(H_hss + λI)⁻¹`` in
O(N·r²) (:mod:`~dgnh.hmatrix.factorization`).

Modules, bottom to top: :mod:`~dgnh.hmatrix.tree`,
:mod:`~dgnh.hmatrix.factorization`, :mod:`~dgnh.hmatrix.operator`
(:class:`HMatrix` and its storage format), :mod:`~dgnh.hmatrix.build`.
"""

from __future__ import annotations

from .build import build_hmatrix, interpolative_decomposition, leaf_sketch, parent_sketch
from .factorization import HSSFactorization
from .operator import FORMAT, FORMAT_VERSION, HMatrix
from .tree import (METRICS, entry_distances, leaf_neighbors, merge_neighbors, select_near_pairs,
                   split_node)

__all__ = [
    "FORMAT", "FORMAT_VERSION", "METRICS", "HMatrix", "HSSFactorization", "build_hmatrix",
    "entry_distances", "interpolative_decomposition", "leaf_neighbors", "leaf_sketch",
    "merge_neighbors", "parent_sketch", "select_near_pairs", "split_node",
]
