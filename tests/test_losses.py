"""Losses: gradient and curvature factor against finite differences of the value."""

from __future__ import annotations

import numpy as np
import pytest

from dgnh.losses import LOSSES, get_loss
from cases import random_targets


@pytest.mark.parametrize("name", list(LOSSES))
def test_gradient_and_curvature_against_finite_differences(name):
    loss = get_loss(name)
    rng = np.random.default_rng(0)
    n, d, h = 5, 4, 1e-5
    F = rng.normal(size=(n, d)) * 2
    Y = loss.check_targets(random_targets(name, n, d), n, d, np.float64)
    G = loss.grad(F, Y)
    R = loss.factor(F)
    U = rng.normal(size=(3, n, d))
    QU = loss.curvature_matvec(F, U)
    for i in range(n):
        g_fd, H_fd = np.zeros(d), np.zeros((d, d))
        for o in range(d):
            e = np.zeros((n, d))
            e[i, o] = h
            g_fd[o] = (loss.value(F + e, Y)[i] - loss.value(F - e, Y)[i]) / (2 * h)
            H_fd[:, o] = (loss.grad(F + e, Y)[i] - loss.grad(F - e, Y)[i]) / (2 * h)
        np.testing.assert_allclose(G[i], g_fd, atol=1e-8)
        np.testing.assert_allclose(R[i].T @ R[i], H_fd, atol=1e-8)
        np.testing.assert_allclose(QU[:, i], U[:, i] @ H_fd.T, atol=1e-8)


def test_cross_entropy_is_stable_for_large_logits():
    loss = get_loss("cross_entropy")
    F = np.array([[1000.0, 0.0, -1000.0]])
    assert np.isfinite(loss.value(F, np.array([2]))).all()
    assert np.isfinite(loss.factor(F)).all()
