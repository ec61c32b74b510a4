"""The randomized sketch of an H-matrix build: test matrix ``Ω``, ``Y = GΩ`` (design.md §4).

:class:`Sketch` holds a test matrix ``Ω`` (tree order) and the exact products
``Y = GΩ``; the sketch formulas of :mod:`dgnh.hmatrix.build` hold for any
``Ω``. Its columns come in rounds (:meth:`Sketch.grow`), each product ONE
batched ``source.matvec`` call per ``PRODUCT_CHUNK`` columns. A round adds

* Gaussian columns ``Ω₀`` (one product ``GΩ₀``): the sketch rows
  ``Ω₀[out]ᵀ G[out, α]`` see every vector at ``√width`` times its norm on
  average (:attr:`Sketch.scale`), so they set the ranks against the absolute
  threshold; and, with ``q = power_iterations ≥ 1``,
* as many power-iterated columns ``Ω_q = orth(G^q Ω₀)`` (QR after every
  product, orthogonal to the earlier ones; Halko, Martinsson and Tropp, SIAM
  Rev. 53(2), 2011, §4.5), reusing ``GΩ₀``: ``q`` more products. They weigh
  the dominant eigenvectors of ``G`` and choose the skeletons (not the ranks).

Measured on held-out trained and random GNHs (tests/test_hmatrix.py; the
report of issue 11), with ranks from the Gaussian rows and skeletons from both
(``q = 1``, the default) the error stays within 0.9× the target where
``max_rank`` does not bind (1.6× with Gaussian rows alone), and where it binds
it is 2.5× smaller at the same memory (trained digits classifier, N = 26 122,
leaf and max_rank 256, tol 1e-5: 1.0e-3 instead of 2.8e-3). Ranks set by the
power-iterated rows alone followed ``tol`` less reliably (up to 3.4× on an
autoencoder): they underweight the smaller eigenvectors that the off-diagonal
blocks still hold.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

Array = np.ndarray
PRODUCT_CHUNK = 256  # columns per product call (bounded memory)
ERROR_GUESS_COLUMNS = 32  # Gaussian columns behind the rough ‖G − H‖₂ of error_guess
OVERSAMPLING_FRACTION = 0.5  # default oversampling: this fraction of the target rank, >= 10


def oversampling_for(rank: int) -> int:
    """Default oversampling of a sketch of target rank ``rank``: ``max(10, ⌈rank/2⌉)``.

    Measured on held-out GNHs (flat spectra), ``rank/4`` left errors up to 3× the
    target where a node's rank came close to the sketch's; ``rank/2`` kept them
    within 1.6× at little extra memory.

    Examples
    --------
    >>> oversampling_for(16), oversampling_for(256)
    (10, 128)
    """
    return max(10, int(np.ceil(OVERSAMPLING_FRACTION * rank)))


class Sketch:
    """Test columns ``Ω`` (tree order; Gaussian and power-iterated) and ``Y = GΩ``.

    ``source.matvec(V)`` gives ``G @ V`` in parameter order; ``perm`` maps tree
    order to parameters (the rows outside ``perm`` are zero). Round ``i`` of
    :meth:`grow` draws its Gaussian columns from ``(seed, 3, i)``;
    :attr:`gaussian` marks them.

    Examples
    --------
    >>> class Dense:
    ...     n_params = 3
    ...     def matvec(self, V): return np.diag([3.0, 2.0, 1.0]) @ V
    >>> s = Sketch(Dense(), np.array([2, 0]), power_iterations=1, seed=0)
    >>> s.grow(1)
    slice(0, 2, None)
    >>> s.gaussian.tolist(), s.width, s.product_rounds
    ([True, False], 2, 2)
    >>> bool(np.allclose(s.Y, np.diag([1.0, 3.0]) @ s.omega))
    True
    """

    def __init__(self, source: Any, perm: Array, power_iterations: int, seed: int):
        self.source = source
        self._set_perm(perm)
        self.power_iterations, self.seed = int(power_iterations), seed
        self.omega = np.zeros((len(self.perm), 0))
        self.Y = np.zeros((len(self.perm), 0))
        self.gaussian = np.zeros(0, dtype=bool)
        self.product_rounds = 0  # batched products G @ V (each with many columns)
        self.product_columns = 0  # columns multiplied in total
        self.growths = 0

    def _set_perm(self, perm: Array) -> None:
        self.perm = np.asarray(perm, dtype=np.int64)
        # every parameter, in order: products need no scatter and no gather
        self._identity = bool(np.array_equal(self.perm, np.arange(int(self.source.n_params))))

    @property
    def width(self) -> int:
        """Number of test columns drawn (Gaussian and power-iterated)."""
        return len(self.gaussian)

    @property
    def gaussian_width(self) -> int:
        """Number of Gaussian test columns."""
        return int(self.gaussian.sum())

    @property
    def scale(self) -> float:
        """Typical ``‖Ω₀ᵀx‖/‖x‖`` of the Gaussian columns: ``√gaussian_width``."""
        return float(np.sqrt(self.gaussian_width))

    def products(self, V: Array) -> Array:
        """``(G @ V)`` in tree order for ``V`` in tree order: one round, chunked by columns."""
        self.product_rounds += 1
        self.product_columns += V.shape[1]
        if V.shape[1] <= PRODUCT_CHUNK and self._identity:
            return np.asarray(self.source.matvec(V), dtype=np.float64)
        out = np.zeros(V.shape)
        for j in range(0, V.shape[1], PRODUCT_CHUNK):
            full = np.zeros((int(self.source.n_params), min(PRODUCT_CHUNK, V.shape[1] - j)))
            full[self.perm] = V[:, j:j + full.shape[1]]
            out[:, j:j + full.shape[1]] = np.asarray(self.source.matvec(full),
                                                     dtype=np.float64)[self.perm]
        return out

    def _orthonormalize(self, W: Array, start: int) -> Array:
        """``W`` orthonormal and orthogonal to the power-iterated columns before ``start``."""
        earlier = self.omega[:, np.flatnonzero(~self.gaussian[:start])]
        for _ in range(2 if earlier.size else 0):
            W = W - earlier @ (earlier.T @ W)
        return np.linalg.qr(W)[0]

    def grow(self, columns: int) -> slice:
        """Add ``columns`` Gaussian columns (and as many power-iterated ones when ``q ≥ 1``).

        One round of ``power_iterations + 1`` products. Returns the slice of the
        new columns of :attr:`omega` and :attr:`Y`.
        """
        columns = min(int(columns), len(self.perm) - self.gaussian_width)
        start = self.width
        if columns <= 0:
            return slice(start, start)
        if self.omega.shape[1] < start:
            raise RuntimeError("the sketch's columns were released; it cannot grow")
        # the arrays grown first (column-major: a column block is contiguous and its pages
        # are touched only when it is filled), then filled from contiguous blocks: at most
        # 4 N × columns arrays resident beside a product's working memory
        width = start + columns * (2 if self.power_iterations else 1)
        omega = np.empty((len(self.perm), width), order="F")
        Y = np.empty((len(self.perm), width), order="F")
        omega[:, :start], Y[:, :start] = self.omega, self.Y
        self.omega, self.Y = omega, Y
        del omega, Y
        new = np.random.default_rng([self.seed, 3, self.growths]).standard_normal(
            (len(self.perm), columns))
        products = self.products(new)
        self.omega[:, start:start + columns] = new
        del new
        if self.power_iterations:
            new = self._orthonormalize(products, start)
            self.Y[:, start:start + columns] = products
            del products
            for _ in range(self.power_iterations - 1):
                new = self._orthonormalize(self.products(new), start)
            products = self.products(new)
            self.omega[:, start + columns:] = new
            del new
        self.Y[:, width - columns:] = products
        del products
        self.gaussian = np.concatenate([self.gaussian, np.ones(columns, dtype=bool),
                                        np.zeros(width - start - columns, dtype=bool)])
        self.growths += 1
        return slice(start, self.width)

    def release(self, keep: int = ERROR_GUESS_COLUMNS) -> None:
        """Drop all columns but the first ``keep`` Gaussian ones (what
        :meth:`error_guess` reads, as copies) once nothing else needs them: the leaf
        level is the only reader of the full sketch. The sketch cannot grow afterwards.

        Examples
        --------
        >>> class Dense:
        ...     n_params = 3
        ...     def matvec(self, V): return np.diag([3.0, 2.0, 1.0]) @ V
        >>> s = Sketch(Dense(), np.arange(3), power_iterations=1, seed=0)
        >>> _ = s.grow(1)
        >>> s.release(5)  # the one leading Gaussian column stays
        >>> s.omega.shape, s.width
        ((3, 1), 2)
        """
        lead = int(np.argmin(self.gaussian)) if not self.gaussian.all() else self.width
        keep = min(int(keep), lead)
        self.omega = self.omega[:, :keep].copy()
        self.Y = self.Y[:, :keep].copy()

    def error_guess(self, matvec: Callable[[Array], Array],
                    columns: int = ERROR_GUESS_COLUMNS) -> float:
        """A rough ``‖G − H‖₂`` from the first ``columns`` Gaussian columns:
        ``‖(G − H)Ω₀‖₂/√columns`` (``matvec`` applies ``H`` in parameter order).

        Examples
        --------
        >>> class Dense:
        ...     n_params = 2
        ...     def matvec(self, V): return np.diag([3.0, 2.0]) @ V
        >>> s = Sketch(Dense(), np.arange(2), power_iterations=0, seed=0)
        >>> _ = s.grow(2)
        >>> s.error_guess(Dense().matvec)
        0.0
        """
        cols = np.flatnonzero(self.gaussian[:self.omega.shape[1]])[:columns]
        if cols.size == 0:
            return 0.0
        full = np.zeros((int(self.source.n_params), len(cols)))
        full[self.perm] = self.omega[:, cols]
        residual = self.Y[:, cols] - np.asarray(matvec(full), dtype=np.float64)[self.perm]
        return float(np.linalg.norm(residual, 2) / np.sqrt(len(cols)))

    def _nystrom_basis(self) -> Array:
        """``W`` with ``(YW)(YW)ᵀ = Y B⁺ Yᵀ``, the Nyström approximation of ``G`` from the
        sketch (``B = ΩᵀGΩ``; directions with ``λ(B) ≤ 1e-12·λ_max(B)`` dropped)."""
        lam, V = np.linalg.eigh((self.omega.T @ self.Y + self.Y.T @ self.omega) / 2)
        keep = lam > 1e-12 * max(lam[-1], 0.0)
        return V[:, keep] / np.sqrt(lam[keep])

    def norm_estimate(self) -> float:
        """A lower bound on ``‖G‖₂`` (G PSD): ``max ‖Gz‖²/zᵀGz`` over ``z`` in ``range(Ω)``.

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
        W = self._nystrom_basis()  # ‖GΩW‖₂² with W = B^{-1/2}
        return float(np.linalg.eigvalsh(W.T @ (self.Y.T @ self.Y) @ W)[-1]) if W.size else 0.0

    def embedding_basis(self) -> Array:
        """``W`` with rows ``z_a`` of ``Z = Y W`` (order of :attr:`perm`) and
        ``z_a·z_b = (Y B⁺ Yᵀ)_ab ≈ G_ab``: the parameters as vectors whose Gram matrix is
        the sketch's Nyström approximation of ``G`` (the cluster tree's geometry, no
        entries needed; :func:`~dgnh.hmatrix.tree.gram_geometry` takes ``Y`` and ``W``
        and never forms the ``N × width`` matrix ``Z``).

        Examples
        --------
        >>> class Dense:
        ...     n_params = 3
        ...     def matvec(self, V): return np.array([[2.0, 1, 0], [1, 2, 0], [0, 0, 1]]) @ V
        >>> s = Sketch(Dense(), np.arange(3), power_iterations=0, seed=0)
        >>> _ = s.grow(3)
        >>> Z = s.Y @ s.embedding_basis()
        >>> bool(np.allclose(Z @ Z.T, [[2, 1, 0], [1, 2, 0], [0, 0, 1]]))
        True
        """
        if not self.Y.size:
            return np.zeros((self.Y.shape[1], 0))
        return self._nystrom_basis()

    def reorder(self, perm: Array) -> None:
        """Rows in the order of ``perm`` (a reordering of :attr:`perm`, e.g. the tree's).

        Examples
        --------
        >>> class Diagonal:  # G = diag(1, 2, 3); the sketch on parameters 0 and 2
        ...     n_params = 3
        ...     def matvec(self, V): return np.arange(1.0, 4.0)[:, None] * V
        >>> s = Sketch(Diagonal(), np.array([0, 2]), power_iterations=0, seed=0)
        >>> _ = s.grow(1)
        >>> s.reorder(np.array([2, 0]))
        >>> s.perm.tolist(), bool(np.allclose(s.Y, [[3.0], [1.0]] * s.omega))
        ([2, 0], True)
        """
        where = np.full(int(self.source.n_params), -1, dtype=np.int64)
        where[self.perm] = np.arange(len(self.perm))
        rows = where[np.asarray(perm, dtype=np.int64)]
        if len(rows) != len(self.perm) or (rows < 0).any() or len(np.unique(rows)) != len(rows):
            raise ValueError("reorder needs a reordering of the sketch's rows")
        self._set_perm(perm)
        for array in (self.omega, self.Y):  # in place, a column at a time
            for j in range(array.shape[1]):
                array[:, j] = array[rows, j]
