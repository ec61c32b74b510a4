"""The H-matrix operator: products, structure and the storage arrays (docs/design.md §4).

:class:`HMatrix` holds a balanced binary cluster tree in level order, nested
skeleton bases, sibling couplings, exact diagonal leaf blocks and exact
near-field corrections; ``H @ V`` costs O(N·r). :func:`~dgnh.hmatrix.build_hmatrix`
builds one, :meth:`HMatrix.factorize` factorizes its HSS part.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np

from ..operator import Operator
from ..packing import jsonable, pack_blocks, packed_nbytes, unpack_blocks
from .factorization import HSSFactorization

Array = np.ndarray
FORMAT = "dgnh.hmatrix"
FORMAT_VERSION = 1


class HMatrix(Operator):
    """A hierarchical (HSS + near-field) approximation of a symmetric PSD matrix.

    Build it with :func:`dgnh.compress` (``method="hmatrix"``) or
    :func:`~dgnh.hmatrix.build_hmatrix`. The structure is flat numpy arrays (see
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

    kind = "hmatrix"  # its name in the result store's registry (dgnh.store.STORED_KINDS)

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
    def near_blocks(self) -> list[Array]:
        """The near-field corrections, one per row of :attr:`near_pairs`."""
        return self._near_blocks

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
        """Bytes of every stored array (tree, skeletons, bases, blocks), counted without
        packing the blocks (:meth:`to_arrays` would copy them all)."""
        tables, groups = self._tables()
        return int(sum(a.nbytes for a in tables.values())
                   + sum(packed_nbytes(blocks) for blocks in groups.values()))

    def without_near_field(self) -> "HMatrix":
        """The HSS part alone (what :meth:`factorize` factorizes)."""
        return self.with_near_field(np.zeros((0, 2), dtype=np.int64), [])

    def with_near_field(self, near_pairs: Array, near_blocks: Sequence[Array]) -> "HMatrix":
        """The same HSS part (and report) with another near field.

        ``near_blocks[i]`` is added to the block ``[a, b]`` (and its transpose
        to ``[b, a]``) for the leaf nodes ``a, b = near_pairs[i]``.

        Examples
        --------
        >>> h = HMatrix(2, [0, 1], [-1, 0, 0], [[1, 2], [-1, -1], [-1, -1]], [0, 0, 1],
        ...             [2, 1, 2], [[], [0], [1]], [None, np.eye(1), np.eye(1)],
        ...             [np.array([[3.0]]), None, None], [np.eye(1), 2 * np.eye(1)],
        ...             np.zeros((0, 2)), [])
        >>> h.with_near_field(np.array([[1, 2]]), [np.array([[1.0]])]).to_dense().tolist()
        [[1.0, 4.0], [4.0, 2.0]]
        """
        return self._replace(near_pairs, near_blocks, self.report)

    def with_shift(self, sigma: float, overwrite: bool = False) -> "HMatrix":
        """``H + σ·I`` on the tree's parameters (``σ`` added to the leaf blocks).

        The parameters outside the tree (zero diagonal) stay exactly zero.
        ``overwrite``: add ``σ`` to the leaf blocks in place (no copy; ``self``, which
        shares them, then holds the shifted blocks too: for a builder that owns them).

        Examples
        --------
        >>> h = HMatrix(2, [0, 1], [-1, 0, 0], [[1, 2], [-1, -1], [-1, -1]], [0, 0, 1],
        ...             [2, 1, 2], [[], [0], [1]], [None, np.eye(1), np.eye(1)],
        ...             [np.array([[3.0]]), None, None], [np.eye(1), 2 * np.eye(1)],
        ...             np.zeros((0, 2)), [])
        >>> h.with_shift(0.5).to_dense().tolist()
        [[1.5, 3.0], [3.0, 2.5]]
        """
        leaves = [self.leaf_blocks[int(a)] if overwrite else self.leaf_blocks[int(a)].copy()
                  for a in self.leaves]
        for block in leaves:
            block[np.diag_indices_from(block)] += sigma
        return self._replace(self._near_pairs, self._near_blocks, self.report, leaves)

    def with_report(self, report: dict[str, Any]) -> "HMatrix":
        """The same H-matrix with another :attr:`report` (the construction record)."""
        return self._replace(self._near_pairs, self._near_blocks, report)

    def _replace(self, near_pairs: Array, near_blocks: Sequence[Array],
                 report: dict[str, Any] | None,
                 leaf_blocks: Sequence[Array] | None = None) -> "HMatrix":
        if leaf_blocks is None:
            leaf_blocks = [self.leaf_blocks[int(a)] for a in self.leaves]
        return HMatrix(self.shape[0], self.perm, self.node_parent, self.node_children,
                       self.node_start, self.node_stop, self.skeletons, self.interpolations,
                       self.couplings, leaf_blocks, near_pairs, near_blocks, report)

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

    def hss_block(self, a: int, b: int) -> Array:
        """The block ``H_hss[leaf a, leaf b]`` of the HSS part for two different leaf nodes.

        Examples
        --------
        >>> h = HMatrix(2, [0, 1], [-1, 0, 0], [[1, 2], [-1, -1], [-1, -1]], [0, 0, 1],
        ...             [2, 1, 2], [[], [0], [1]], [None, np.eye(1), np.eye(1)],
        ...             [np.array([[3.0]]), None, None], [np.eye(1), 2 * np.eye(1)],
        ...             np.zeros((0, 2)), [])
        >>> h.hss_block(1, 2).tolist(), h.to_dense().tolist()
        ([[3.0]], [[1.0, 3.0], [3.0, 2.0]])
        """
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
        out, groups = self._tables()
        for name, blocks in groups.items():
            keys = (f"{name}_offsets", f"{name}_shapes", f"{name}_values")
            out.update(zip(keys, pack_blocks(blocks)))
        return out

    def _tables(self) -> tuple[dict[str, Array], dict[str, list[Array]]]:
        """What :meth:`to_arrays` stores: the tree and index arrays, and the ragged block
        groups it packs (``interp``, ``coupling``, ``leaf``, ``near``)."""
        out = {"perm": self.perm, "node_parent": self.node_parent,
               "node_children": self.node_children, "node_start": self.node_start,
               "node_stop": self.node_stop}
        sizes = np.array([len(s) for s in self.skeletons], dtype=np.int64)
        out["skeleton_offsets"] = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        out["skeleton_params"] = (self.perm[np.concatenate(self.skeletons)] if sizes.sum()
                                  else np.zeros(0, dtype=np.int64))
        empty = np.zeros((0, 0))
        inner = np.flatnonzero(self.node_children[:, 0] >= 0)
        out["coupling_nodes"] = inner.astype(np.int64)
        out["leaf_nodes"] = self.leaves.astype(np.int64)
        out["near_pairs"] = self._near_pairs
        groups = {"interp": [empty if T is None else T for T in self.interpolations],
                  "coupling": [self.couplings[a] for a in inner],
                  "leaf": [self.leaf_blocks[int(a)] for a in self.leaves],
                  "near": list(self._near_blocks)}
        return out, groups

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

