"""The randomized sketch of an H-matrix build: test matrix ``Ω`` and ``Y = GΩ`` (docs/design.md §4).

:class:`Sketch` holds a test matrix ``Ω`` (tree order) and the exact products
``Y = GΩ``. Its columns come in rounds (:meth:`Sketch.grow`), every product ONE
batched ``source.matvec`` call per ``PRODUCT_CHUNK`` columns. With
``power_iterations = 0`` the columns are Gaussian and the sketch rows
``Ω[out]ᵀ G[out, α]`` of :mod:`dgnh.hmatrix.build` see every vector at
``√width`` times its norm on average (:attr:`Sketch.scale`); with ``q ≥ 1``
they come from ``q`` steps of subspace iteration ``Ω ← orth(GΩ)`` (QR after
every product, orthogonal to the earlier columns; Halko, Martinsson and Tropp,
SIAM Rev. 53(2), 2011, §4.5) and the scale is 1 on the dominant eigenvectors.
Measured on trained and random GNHs (tests/test_hmatrix.py, docs/design.md
§4), the global power iteration concentrates ``Ω`` on the dominant
eigenvectors of ``G`` and lets the skeletons miss the smaller ones, which the
off-diagonal blocks still hold: at the same thresholds ``q = 1`` is less
accurate and more indefinite than ``q = 0``, which is the default.
"""

from __future__ import annotations

from typing import Any

import numpy as np

Array = np.ndarray
PRODUCT_CHUNK = 128  # columns per product call (bounded memory)
OVERSAMPLING_FRACTION = 0.25  # default oversampling: this fraction of the target rank, >= 10


def oversampling_for(rank: int) -> int:
    """Default oversampling of a sketch of target rank ``rank``: ``max(10, ⌈rank/4⌉)``.

    Examples
    --------
    >>> oversampling_for(16), oversampling_for(256)
    (10, 64)
    """
    return max(10, int(np.ceil(OVERSAMPLING_FRACTION * rank)))


class Sketch:
    """Orthonormal test columns ``Ω`` (tree order) and ``Y = GΩ`` from exact products.

    ``source.matvec(V)`` gives ``G @ V`` in parameter order; ``perm`` maps tree
    order to parameters (the rows outside ``perm`` are zero). Round ``i`` of
    :meth:`grow` draws its Gaussian start from ``(seed, 3, i)``.

    Examples
    --------
    >>> class Dense:
    ...     n_params = 3
    ...     def matvec(self, V): return np.diag([3.0, 2.0, 1.0]) @ V
    >>> s = Sketch(Dense(), np.array([2, 0]), power_iterations=1, seed=0)
    >>> s.grow(2)
    slice(0, 2, None)
    >>> bool(np.allclose(s.omega.T @ s.omega, np.eye(2))), s.width, s.product_rounds
    (True, 2, 2)
    >>> bool(np.allclose(s.Y, np.diag([1.0, 3.0]) @ s.omega))
    True
    """

    def __init__(self, source: Any, perm: Array, power_iterations: int, seed: int):
        self.source, self.perm = source, np.asarray(perm, dtype=np.int64)
        self.power_iterations, self.seed = int(power_iterations), seed
        self.omega = np.zeros((len(self.perm), 0))
        self.Y = np.zeros((len(self.perm), 0))
        self.product_rounds = 0  # batched products G @ V (each with many columns)
        self.product_columns = 0  # columns multiplied in total
        self.growths = 0

    @property
    def width(self) -> int:
        """Number of test columns."""
        return self.omega.shape[1]

    def products(self, V: Array) -> Array:
        """``(G @ V)`` in tree order for ``V`` in tree order: one round, chunked by columns."""
        out = np.zeros(V.shape)
        for j in range(0, V.shape[1], PRODUCT_CHUNK):
            full = np.zeros((int(self.source.n_params), min(PRODUCT_CHUNK, V.shape[1] - j)))
            full[self.perm] = V[:, j:j + full.shape[1]]
            out[:, j:j + full.shape[1]] = np.asarray(self.source.matvec(full),
                                                     dtype=np.float64)[self.perm]
        self.product_rounds += 1
        self.product_columns += V.shape[1]
        return out

    @property
    def scale(self) -> float:
        """Typical ``‖Ωᵀx‖/‖x‖``: ``√width`` for Gaussian columns, 1 for orthonormal ones."""
        return float(np.sqrt(self.width)) if self.power_iterations == 0 else 1.0

    def _orthonormalize(self, W: Array) -> Array:
        """``W`` made orthonormal and orthogonal to the current ``Ω`` (twice Gram–Schmidt, QR)."""
        for _ in range(2):
            W = W - self.omega @ (self.omega.T @ W)
        return np.linalg.qr(W)[0]

    def grow(self, columns: int) -> slice:
        """Add ``columns`` test columns (one round of ``power_iterations + 1`` products).

        Returns the slice of the new columns of :attr:`omega` and :attr:`Y`.
        """
        columns = min(int(columns), len(self.perm) - self.width)
        start = self.width
        if columns <= 0:
            return slice(start, start)
        W = np.random.default_rng([self.seed, 3, self.growths]).standard_normal(
            (len(self.perm), columns))
        if self.power_iterations:
            W = self._orthonormalize(W)
        for _ in range(self.power_iterations):
            W = self._orthonormalize(self.products(W))
        self.omega = np.hstack([self.omega, W])
        self.Y = np.hstack([self.Y, self.products(W)])
        self.growths += 1
        return slice(start, self.width)

    def norm_estimate(self) -> float:
        """A lower bound on ``‖G‖₂`` (G PSD): ``max ‖Gz‖²/zᵀGz`` over ``z ∈ range(Ω)``.

        Examples
        --------
        >>> class Dense:
        ...     n_params = 3
        ...     def matvec(self, V): return np.diag([3.0, 2.0, 0.0]) @ V
        >>> s = Sketch(Dense(), np.arange(3), power_iterations=0, seed=0)
        >>> _ = s.grow(2)
        >>> bool(2.0 < s.norm_estimate() <= 3.0)
        True
        """
        if not self.Y.size:
            return 0.0
        lam, V = np.linalg.eigh((self.omega.T @ self.Y + self.Y.T @ self.omega) / 2)
        keep = lam > 1e-12 * max(lam[-1], 0.0)
        if not keep.any():
            return 0.0
        C = self.Y @ (V[:, keep] / np.sqrt(lam[keep]))  # GΩ B^{-1/2}, B = ΩᵀGΩ
        return float(np.linalg.norm(C, 2) ** 2)
