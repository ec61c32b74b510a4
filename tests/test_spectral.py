"""Eigenpairs and stochastic Lanczos quadrature against dense float64 eigendecompositions."""

from __future__ import annotations

import numpy as np
import pytest

from cases import small_digits_gnh
from dgnh.lowrank import LowRank, pivoted_cholesky
from dgnh.spectral import SpectralDensity, eigsh, spectral_density


@pytest.fixture(scope="module")
def digits():
    gn = small_digits_gnh()  # N = 610
    G = gn.dense()
    yield gn, G, np.linalg.eigvalsh(G)
    gn.close()


@pytest.fixture(scope="module")
def operators(digits):
    """(operator, its dense matrix): the exact GNH, a low-rank compression, and an inverse."""
    gn, G, _ = digits
    lr = pivoted_cholesky(gn, tol=1e-3)
    f = lr.factorize(1e-2 * np.abs(G).max())
    return {"exact": (gn, G), "lowrank": (lr, lr.to_dense()),
            "inverse": (f, np.linalg.inv(lr.to_dense() + f.reg * np.eye(gn.n_params)))}


# the smallest eigenvalues of a singular GNH are a zero cluster: "SA" on the inverse only
EIG_CASES = [(name, which, 10) for name in ("exact", "lowrank", "inverse")
             for which in ("LA", "LM")] + [("inverse", "SA", 3)]


@pytest.mark.parametrize("name, which, k", EIG_CASES)
def test_eigsh_against_eigvalsh(operators, name, which, k):
    op, A = operators[name]
    ref = np.linalg.eigvalsh(A)
    want = ref[:k] if which == "SA" else ref[::-1][:k]
    vals, vecs = eigsh(op, k, which=which, seed=1)
    scale = np.abs(ref).max()
    np.testing.assert_allclose(vals, want, rtol=1e-8, atol=1e-12 * scale)
    np.testing.assert_allclose(vecs.T @ vecs, np.eye(k), atol=1e-8)
    assert np.linalg.norm(A @ vecs - vecs * vals) <= 1e-7 * scale


def test_top10_of_exact_gnh_relative_1e8(digits):
    gn, _, ref = digits
    vals, _ = eigsh(gn, 10)
    top = ref[::-1][:10]
    assert np.all(np.abs(vals - top) <= 1e-8 * top)
    again, _ = eigsh(gn, 10)
    np.testing.assert_array_equal(again, vals)


@pytest.mark.parametrize("k, which, error", [
    (610, "LA", ValueError), (0, "LA", ValueError), (2.0, "LA", TypeError),
    (3, "largest", ValueError), (3, "BE", ValueError),
])
def test_eigsh_rejects_bad_input(digits, k, which, error):
    with pytest.raises(error):
        eigsh(digits[0], k, which=which)


def test_eigsh_rejects_non_operator():
    with pytest.raises(TypeError, match="Operator"):
        eigsh(np.eye(4), 2)


# ------------------------------------------------------------------------- SLQ
def probes(N, n_vectors, seed):
    """The documented probes: Rademacher from ``default_rng(seed)``, unit norm."""
    return np.random.default_rng(seed).choice([-1.0, 1.0], size=(N, n_vectors)) / np.sqrt(N)


@pytest.mark.parametrize("name", ["exact", "lowrank"])
@pytest.mark.parametrize("n_steps", [3, 8])
def test_slq_rules_are_gauss_quadratures(operators, name, n_steps):
    """Per probe, Σ_j τ_j θ_j^p = vᵀA^p v exactly for p <= 2·n_steps − 1."""
    op, A = operators[name]
    N = A.shape[0]
    sd = spectral_density(op, n_vectors=5, n_steps=n_steps, seed=3)
    assert isinstance(sd, SpectralDensity) and sd.nodes.shape == (5, n_steps)
    np.testing.assert_allclose(sd.weights.sum(axis=1), 1.0, rtol=1e-12)
    V = probes(N, 5, 3)
    norm = np.abs(np.linalg.eigvalsh(A)).max()
    W = V.copy()
    for p in range(2 * n_steps):
        quad = np.sum(sd.weights * (sd.nodes / norm) ** p, axis=1)
        exact = np.einsum("ij,ij->j", V, W) / norm**p
        np.testing.assert_allclose(quad, exact, rtol=1e-8, atol=1e-10)
        W = A @ W
    assert sd.moment(1) == pytest.approx(np.mean(np.einsum("ij,ij->j", V, A @ V)), rel=1e-10)


def test_slq_closes_on_few_distinct_eigenvalues():
    """An operator with eigenvalues {0, 1, 4}: the Krylov space closes after 3 steps."""
    rng = np.random.default_rng(0)
    Q, _ = np.linalg.qr(rng.normal(size=(50, 2)))
    op = LowRank(Q * [2.0, 1.0])
    sd = spectral_density(op, n_vectors=4, n_steps=10, seed=1)
    used = sd.weights > 1e-14
    assert used.sum(axis=1).max() <= 3
    np.testing.assert_allclose(np.sort(np.unique(np.round(sd.nodes[used], 8))), [0.0, 1.0, 4.0],
                               atol=1e-8)
    V = probes(50, 4, 1)
    weight_at_4 = np.sum(np.where(np.abs(sd.nodes - 4) < 1e-6, sd.weights, 0), axis=1)
    np.testing.assert_allclose(weight_at_4, (Q[:, 0] @ V) ** 2, rtol=1e-8)


def test_smoothed_density_integrates_to_one(operators):
    op, A = operators["exact"]
    sd = spectral_density(op, n_vectors=4, n_steps=20, seed=0)
    top = np.linalg.eigvalsh(A)[-1]
    width = 0.01 * top
    x = np.linspace(-10 * width, top + 10 * width, 4001)
    assert np.trapezoid(sd.evaluate(x, width), x) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="width"):
        sd.evaluate(x, 0.0)


@pytest.mark.parametrize("kwargs, error", [
    ({"n_vectors": 0}, ValueError), ({"n_steps": 0}, ValueError),
    ({"n_steps": 10_000}, ValueError), ({"n_vectors": 1.5}, TypeError),
])
def test_spectral_density_rejects_bad_input(digits, kwargs, error):
    with pytest.raises(error):
        spectral_density(digits[0], **kwargs)
