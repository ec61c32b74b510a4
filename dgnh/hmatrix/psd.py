"""The diagonal compensation that makes an HSS matrix positive semi-definite (design.md §4).

:func:`psd_shift` finds the smallest ``σ`` with ``H_hss + σI`` positive
semi-definite by exact HSS Cholesky factorizations (they succeed exactly when
the shifted matrix is positive definite), bracketing ``σ`` with lower bounds
from a Ritz value of the inverse.
"""

from __future__ import annotations

import numpy as np

from ..config import return_freed_memory
from ..factorization import IndefiniteError
from ..spectral import ritz_values
from .factorization import HSSFactorization
from .operator import HMatrix

Array = np.ndarray
PSD_REG = 1e-12  # PSD: H + (σ + PSD_REG·‖G‖)·I must have a Cholesky factorization
PSD_PRECISION = 0.1  # relative precision of the search for σ


def psd_shift(h: HMatrix, norm: float, guess: float, seed: int = 0) -> tuple[float, int]:
    """The smallest ``σ ≥ 0`` (to ``PSD_PRECISION``) with ``H_hss + σI`` positive semi-definite.

    The test is the HSS Cholesky (:class:`~dgnh.hmatrix.HSSFactorization`,
    exact for ``H_hss``) at ``reg = PSD_REG·norm``: it succeeds exactly when
    ``σ > σ* = −λ_min(H_hss) − reg``. From ``σ = guess`` (e.g. an estimate of
    ``‖G − H‖₂ ≥ σ*``) the bracket grows 4× until the factorization ``F``
    succeeds. Every factorization ``F`` that succeeds gives, through a Ritz
    value ``θ ≤ 1/(λ_min + σ + reg)`` of ``F`` (block Krylov on the inverse,
    O(N·r) per product), the lower bound ``σ − 1/θ ≤ σ*``, tried next with
    ``PSD_PRECISION`` to spare (``σ = 0`` when the bound is ≤ 0); a failure
    raises the lower end and the next trial is the geometric midpoint.
    Typically 2–4 factorizations. Returns ``σ`` and the number of factorizations.

    Examples
    --------
    >>> h = HMatrix(2, [0, 1], [-1, 0, 0], [[1, 2], [-1, -1], [-1, -1]], [0, 0, 1],
    ...             [2, 1, 2], [[], [0], [1]], [None, np.eye(1), np.eye(1)],
    ...             [np.array([[2.0]]), None, None], [np.eye(1), np.eye(1)],
    ...             np.zeros((0, 2)), [])
    >>> sigma, _ = psd_shift(h, 3.0, 0.1)  # λ_min([[1, 2], [2, 1]]) = −1
    >>> bool(abs(sigma - 1.0) <= 0.11)
    True
    """
    hss = h.without_near_field()
    reg = PSD_REG * norm
    count = 0

    def factorization(sigma: float) -> HSSFactorization | None:
        # of H_hss + (σ + reg)·I (on the tree's parameters the same as the shifted
        # H-matrix's; outside it, positive either way), without copying the leaf blocks
        nonlocal count
        count += 1
        try:
            return HSSFactorization(hss, sigma + reg)
        except IndefiniteError:
            return None

    if norm <= 0 or len(hss.perm) == 0:
        return 0.0, 0
    support = np.zeros(hss.shape[0], dtype=bool)
    support[hss.perm] = True
    low, high = 0.0, max(guess, reg)
    inverse = factorization(high)
    while inverse is None:
        low, high = high, 4.0 * high
        inverse = factorization(high)
    while high - low > PSD_PRECISION * high:
        if inverse is not None:  # a new upper end: the lower bound from its inverse
            # a Ritz value θ ≤ λ_max of the inverse on the tree's parameters (outside
            # them it is 1/(σ + reg): not H's)
            theta = float(ritz_values(lambda V: inverse.matvec(V) * support[:, None],
                                      len(support), seed, steps=8, support=support).max())
            low = max(low, high - 1.0 / theta) if theta > 0 else low
            if high - low <= PSD_PRECISION * high:
                break
            trial = low * (1.0 + PSD_PRECISION)
        else:  # geometric bisection
            trial = float(np.sqrt(max(low, PSD_PRECISION * high) * high))
        inverse = None  # one factorization alive at a time
        return_freed_memory()
        inverse = factorization(trial)
        low, high = (trial, high) if inverse is None else (low, trial)
    return high, count
