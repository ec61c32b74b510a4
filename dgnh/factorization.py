"""Factorizations of ``A + λI`` for compressed (and exact) GNH operators.

A :class:`Factorization` is itself an :class:`~dgnh.operator.Operator` that
applies ``(A + λI)⁻¹``, so it can be handed to CG as a preconditioner.
Subclasses implement ``_matmat`` (the solve), ``logdet`` and
``inverse_diagonal``.
"""

from __future__ import annotations

import numpy as np

from .operator import Operator

Array = np.ndarray


class IndefiniteError(ValueError):
    """The approximation plus ``reg·I`` is not positive definite."""


def check_reg(reg) -> float:
    """Validate a regularization ``λ > 0`` (finite)."""
    if isinstance(reg, bool) or not isinstance(reg, (int, float, np.integer, np.floating)):
        raise TypeError(f"reg must be a positive number, got {reg!r}")
    if not np.isfinite(reg) or reg <= 0:
        raise ValueError(
            f"reg must be a finite number > 0, got {reg}: the GNH is singular whenever "
            "n_params > n_samples · n_outputs, so every solve needs a regularization"
        )
    return float(reg)


class Factorization(Operator):
    """``(A + reg·I)⁻¹`` of a symmetric positive semi-definite approximation ``A``."""

    reg: float

    def solve(self, B) -> Array:
        """``(A + reg·I)⁻¹ B`` for a vector ``(N,)`` or a matrix ``(N, k)``."""
        return self.matvec(B)

    def logdet(self) -> float:
        """``log det(A + reg·I)``."""
        raise NotImplementedError

    def inverse_diagonal(self) -> Array:
        """The diagonal of ``(A + reg·I)⁻¹``."""
        raise NotImplementedError
