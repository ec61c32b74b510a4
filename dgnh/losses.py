"""Per-sample losses, their output gradients and curvature factors.

For a network output ``f`` (a row of ``F``) and target ``y``:

========================  =================================  ==========================
name                      loss ℓ(f, y)                       curvature Q = ∇²_f ℓ = RᵀR
========================  =================================  ==========================
``mse``                   ½‖f − y‖²                          I
``cross_entropy``         −log softmax(f)_y (integer y)      diag(p) − ppᵀ, p = softmax(f)
``binary_cross_entropy``  −y log s − (1−y) log(1−s)          diag(s(1−s)), s = sigmoid(f)
========================  =================================  ==========================

``f`` holds logits for the two classification losses (the loss applies the
softmax / sigmoid, like ``torch.nn.CrossEntropyLoss`` and
``BCEWithLogitsLoss``). For all three, Q is the exact Hessian of ℓ with respect
to ``f``, so the Hessian of the mean loss is the GNH plus the terms from the
network's own curvature.
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit, log_softmax, softmax

from .validation import check_choice

Array = np.ndarray


class Loss:
    """Base class: ``value``, ``grad``, ``factor`` (R) and ``curvature_matvec`` (Q u)."""

    name: str = ""

    def check_targets(self, Y, n: int, d: int, dtype) -> Array:
        raise NotImplementedError

    def value(self, F: Array, Y: Array) -> Array:
        """Per-sample loss values, shape ``(n,)``."""
        raise NotImplementedError

    def grad(self, F: Array, Y: Array) -> Array:
        """∂ℓ/∂f per sample, shape ``(n, d)``."""
        raise NotImplementedError

    def factor(self, F: Array) -> Array:
        """R with Q = RᵀR per sample, shape ``(n, d, d)``."""
        raise NotImplementedError

    def curvature_matvec(self, F: Array, U: Array) -> Array:
        """Q_i U_i for ``U`` of shape ``(..., n, d)``."""
        raise NotImplementedError


def _float_targets(Y, n: int, d: int, dtype, name: str) -> Array:
    Y = np.asarray(Y)
    if Y.ndim == 1 and d == 1:
        Y = Y[:, None]
    if Y.shape != (n, d):
        raise ValueError(
            f"{name}: targets must have shape (n_samples, n_outputs) = ({n}, {d}), "
            f"got {Y.shape}"
        )
    if not (np.issubdtype(Y.dtype, np.floating) or np.issubdtype(Y.dtype, np.integer)
            or Y.dtype == bool):
        raise TypeError(f"{name}: targets must be numeric, got dtype {Y.dtype}")
    Y = Y.astype(dtype)
    if not np.all(np.isfinite(Y)):
        raise ValueError(f"{name}: targets contain NaN or Inf")
    return Y


class MSE(Loss):
    name = "mse"

    def check_targets(self, Y, n, d, dtype):
        return _float_targets(Y, n, d, dtype, self.name)

    def value(self, F, Y):
        return 0.5 * np.sum((F - Y) ** 2, axis=1)

    def grad(self, F, Y):
        return F - Y

    def factor(self, F):
        n, d = F.shape
        return np.broadcast_to(np.eye(d, dtype=F.dtype), (n, d, d))

    def curvature_matvec(self, F, U):
        return U


class CrossEntropy(Loss):
    name = "cross_entropy"

    def check_targets(self, Y, n, d, dtype):
        Y = np.asarray(Y)
        if Y.ndim == 2 and Y.shape[1] == 1:
            Y = Y[:, 0]
        if Y.shape != (n,):
            raise ValueError(
                f"cross_entropy: targets must be integer class labels of shape ({n},), "
                f"got {Y.shape}"
            )
        if np.issubdtype(Y.dtype, np.floating):
            if not np.all(np.isfinite(Y)) or np.any(Y != np.round(Y)):
                raise TypeError("cross_entropy: class labels must be integers")
        elif not np.issubdtype(Y.dtype, np.integer):
            raise TypeError(f"cross_entropy: class labels must be integers, got {Y.dtype}")
        Y = Y.astype(np.int64)
        if Y.size and (Y.min() < 0 or Y.max() >= d):
            raise ValueError(
                f"cross_entropy: class labels must lie in [0, {d}), "
                f"got values in [{Y.min()}, {Y.max()}]"
            )
        return Y

    def value(self, F, Y):
        return -log_softmax(F, axis=1)[np.arange(len(Y)), Y]

    def grad(self, F, Y):
        G = softmax(F, axis=1)
        G[np.arange(len(Y)), Y] -= 1
        return G

    def factor(self, F):
        p = softmax(F, axis=1)
        sp = np.sqrt(p)
        R = -sp[:, :, None] * p[:, None, :]
        d = F.shape[1]
        R[:, np.arange(d), np.arange(d)] += sp
        return R

    def curvature_matvec(self, F, U):
        p = softmax(F, axis=1)
        return p * U - p * np.sum(p * U, axis=-1, keepdims=True)


class BinaryCrossEntropy(Loss):
    name = "binary_cross_entropy"

    def check_targets(self, Y, n, d, dtype):
        Y = _float_targets(Y, n, d, dtype, self.name)
        if Y.size and (Y.min() < 0 or Y.max() > 1):
            raise ValueError(
                "binary_cross_entropy: targets must lie in [0, 1], "
                f"got values in [{Y.min()}, {Y.max()}]"
            )
        return Y

    def value(self, F, Y):
        return np.sum(np.logaddexp(0, F) - Y * F, axis=1)

    def grad(self, F, Y):
        return expit(F) - Y

    def factor(self, F):
        s = expit(F)
        n, d = F.shape
        R = np.zeros((n, d, d), dtype=F.dtype)
        R[:, np.arange(d), np.arange(d)] = np.sqrt(s * (1 - s))
        return R

    def curvature_matvec(self, F, U):
        s = expit(F)
        return s * (1 - s) * U


LOSSES: dict[str, Loss] = {c.name: c() for c in (MSE, CrossEntropy, BinaryCrossEntropy)}


def get_loss(name: str) -> Loss:
    """Return the loss called ``name``; a clear ``ValueError`` otherwise.

    Examples
    --------
    >>> get_loss("cross_entropy").name
    'cross_entropy'
    """
    return LOSSES[check_choice(name, "loss", sorted(LOSSES))]
