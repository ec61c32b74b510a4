"""Global low-rank GNH approximations and Woodbury factorizations against dense float64 references."""

from __future__ import annotations

import numpy as np
import pytest

import dgnh
from cases import relu_mlp_with_dead_unit, small_digits_gnh
from dgnh.compress import cap_statistics
from dgnh.factorization import Factorization, IndefiniteError, LowRankUpdate, ScaledIdentity
from dgnh.lowrank import LowRank, pivoted_cholesky
from dgnh.nystrom import nystrom
from dgnh.exact_solve import dual_factorize


def dead_relu_gnh():
    """A ReLU network with a dead hidden unit and a constant-zero input: zero diagonal entries."""
    net = relu_mlp_with_dead_unit(8)
    rng = np.random.default_rng(4)
    X = rng.normal(size=(30, 5))
    X[:, 1] = 0.0  # weights reading input 1 have zero gradient
    return dgnh.GaussNewton(net, X, rng.normal(size=(30, 3)), loss="mse", client="in-process")


PROBLEMS = {
    "digits": small_digits_gnh,  # N = 610 > n·d = 400
    "dead-relu": dead_relu_gnh,  # N = 83
}


@pytest.fixture(scope="module", params=list(PROBLEMS))
def problem(request):
    gn = PROBLEMS[request.param]()
    G = gn.dense()
    eigenvalues = np.linalg.eigvalsh(G)[::-1]
    yield gn, G, float(eigenvalues[0]), eigenvalues
    gn.close()


class CountingSource:
    """A real GaussNewton seen through its entry interface, counting ``entries_many`` calls."""

    def __init__(self, gn):
        self.gn, self.n_params, self.calls = gn, gn.n_params, 0

    def diagonal(self):
        return self.gn.diagonal()

    def entries_many(self, requests, **kwargs):
        self.calls += 1
        return self.gn.entries_many(requests, **kwargs)


def check_lowrank(lr, G, norm) -> float:
    """UUᵀ and G − UUᵀ PSD, zero-diagonal rows exactly zero; returns ‖G − UUᵀ‖₂/‖G‖₂."""
    H = lr.to_dense()
    assert np.linalg.eigvalsh(H).min() >= -1e-12 * norm
    residual = np.linalg.eigvalsh(G - H)
    assert residual.min() >= -1e-10 * norm
    assert np.all(lr.U[np.diag(G) == 0] == 0)
    assert np.all(np.isfinite(lr.U))
    return float(np.abs(residual).max() / norm)


# ------------------------------------------------------------------ LowRank
def test_lowrank_operator_against_dense():
    rng = np.random.default_rng(0)
    U = rng.normal(size=(40, 5))
    lr = LowRank(U, {"method": "test"})
    V = rng.normal(size=(40, 3))
    np.testing.assert_allclose(lr @ V, U @ (U.T @ V), rtol=1e-13)
    np.testing.assert_allclose(lr.to_dense(), U @ U.T, rtol=1e-13)
    np.testing.assert_allclose(lr.diagonal(), np.diag(U @ U.T), rtol=1e-13)
    assert (lr.rank, lr.nbytes, lr.report["method"], lr.report["rank"]) == (5, U.nbytes, "test", 5)


@pytest.mark.parametrize("shape", [(40, 5), (6, 6), (5, 8), (1, 1)])
def test_lowrank_min_eigenvalue_is_exact(shape):
    U = np.random.default_rng(3).normal(size=shape)
    expected = np.linalg.eigvalsh(U @ U.T)[0]
    assert abs(LowRank(U).min_eigenvalue() - expected) <= 1e-12 * np.linalg.norm(U) ** 2


@pytest.mark.parametrize("spectrum", ["clustered", "rank-deficient", "graded"])
def test_krylov_basis_stays_orthonormal_and_below_g(spectrum):
    """Krylov blocks that are ill-conditioned (clustered or graded eigenvalues) or that
    break down (rank 7 < the space): the basis stays orthonormal, the Nyström
    eigenvalues interlace below G's and the truncation leaves G − UUᵀ PSD."""
    from dgnh.nystrom import KrylovNystrom

    rng = np.random.default_rng(5)
    n = 300
    values = {"clustered": 1 + 1e-9 * rng.random(n), "graded": np.logspace(0, -14, n),
              "rank-deficient": np.r_[np.ones(7), np.zeros(n - 7)]}[spectrum]
    Q = np.linalg.qr(rng.normal(size=(n, n)))[0]
    G = (Q * values) @ Q.T
    space = KrylovNystrom(lambda V: G @ V, np.ones(n, bool), capacity=60, max_bytes=0)
    for width in (12, 12, 6):
        space.extend(rng.normal(size=(n, width)), depth=3)
    K = space._K.to_array()
    np.testing.assert_allclose(K.T @ K, np.eye(K.shape[1]), atol=1e-9)
    lam = space.eigenvalues()
    exact = np.sort(values)[::-1]
    assert np.all(lam <= exact[:len(lam)] + 1e-9)
    U = space.truncated(len(lam))
    assert np.linalg.eigvalsh(G - U @ U.T).min() >= -1e-9
    space.close()


@pytest.mark.parametrize("dead_rows, width", [(0, 10), (0, 40), (5, 10)])
def test_krylov_start_overwritten_in_place_gives_the_same_space(dead_rows, width):
    """``overwrite_start=True`` (every row live: the start's memory is used; else a copy)
    against the copying default, room for fewer columns than the start has (width 40)."""
    from dgnh.nystrom import KrylovNystrom

    rng = np.random.default_rng(6)
    A = rng.normal(size=(120, 30))
    A[:dead_rows] = 0.0
    G = A @ A.T
    start = rng.normal(size=(120, width))
    results = []
    for overwrite in (False, True):
        space = KrylovNystrom(lambda V: G @ V, np.diag(G) > 0, capacity=40)
        space.extend(start.copy(), depth=2, overwrite_start=overwrite)
        results.append((space.eigenvalues(), space.truncated(12)))
        space.close()
    (lam, U), (lam_own, U_own) = results
    np.testing.assert_allclose(lam_own, lam, rtol=1e-12, atol=1e-12 * lam[0])
    np.testing.assert_allclose(U_own @ U_own.T, U @ U.T, atol=1e-10 * lam[0])
    assert np.linalg.eigvalsh(G - U_own @ U_own.T).min() >= -1e-9 * lam[0]


@pytest.mark.parametrize("U, error", [
    (np.ones(4), ValueError), (np.ones((0, 2)), ValueError), (np.array([[1.0, np.nan]]), ValueError),
    (np.ones((3, 2), dtype=int), TypeError),
])
def test_lowrank_rejects_bad_factor(U, error):
    with pytest.raises(error):
        LowRank(U)


# ------------------------------------------------------- pivoted Cholesky
@pytest.mark.parametrize("tol", [1e-2, 1e-4])
def test_pivoted_cholesky_error_and_psd(problem, tol):
    gn, G, norm, _ = problem
    source = CountingSource(gn)
    lr = pivoted_cholesky(source, tol=tol, max_rank=1000, block_size=8)
    rep = lr.report
    assert rep["converged"] and rep["stop"] in ("estimate", "trace", "exact")
    err = check_lowrank(lr, G, norm)
    assert err <= 10 * tol
    assert err <= rep["trace_bound"] * (1 + 1e-8) + 1e-14
    assert source.calls == rep["n_batches"]  # one entries_many batch per pivot batch
    assert len(set(rep["pivots"])) == lr.rank
    assert all(G[p, p] > 0 for p in rep["pivots"])


def test_pivoted_cholesky_exact_low_rank_reproduces_g(problem):
    gn, G, norm, _ = problem
    lr = pivoted_cholesky(gn, tol=1e-15 * 10, max_rank=gn.n_params)
    assert lr.rank <= gn.n_samples * gn.model.n_outputs
    assert check_lowrank(lr, G, norm) <= 1e-10


def test_pivoted_cholesky_rank_cap(problem):
    gn, G, norm, _ = problem
    lr = pivoted_cholesky(gn, tol=1e-8, max_rank=10, block_size=4)
    assert lr.rank == 10 and not lr.report["converged"] and lr.report["stop"] == "max_rank"
    assert check_lowrank(lr, G, norm) <= lr.report["trace_bound"] * (1 + 1e-8)


def test_pivoted_cholesky_sampled_entries_stay_psd(problem):
    gn, G, norm, _ = problem
    lr = pivoted_cholesky(gn, tol=1e-2, max_rank=200, eps=0.1, seed=5)
    assert lr.rank >= 1 and lr.report["eps"] == 0.1
    H = lr.to_dense()
    assert np.linalg.eigvalsh(H).min() >= -1e-12 * norm
    assert np.all(lr.U[np.diag(G) == 0] == 0)
    assert np.abs(np.linalg.eigvalsh(G - H)).max() < 0.5 * norm


@pytest.mark.parametrize("kwargs, error", [
    ({"tol": 0.0}, ValueError), ({"tol": 1.0}, ValueError), ({"tol": "a"}, TypeError),
    ({"max_rank": 0}, ValueError), ({"block_size": 0}, ValueError), ({"max_rank": 2.5}, TypeError),
])
def test_pivoted_cholesky_rejects_bad_parameters(problem, kwargs, error):
    with pytest.raises(error):
        pivoted_cholesky(problem[0], **kwargs)


# ----------------------------------------------------------------- Nyström
@pytest.mark.parametrize("rank", [5, 30])
def test_nystrom_near_optimal_and_psd(problem, rank):
    gn, G, norm, _ = problem
    lam = np.linalg.eigvalsh(G)[::-1] / norm
    lr = nystrom(gn, rank, oversample=10, seed=1)
    assert lr.rank == rank
    err = check_lowrank(lr, G, norm)
    assert lam[rank] * (1 - 1e-8) <= err <= 10 * lam[rank] + 1e-12  # Eckart–Young and near it
    again = nystrom(gn, rank, oversample=10, seed=1)
    np.testing.assert_array_equal(again.U, lr.U)


def test_nystrom_recovers_exact_low_rank():
    rng = np.random.default_rng(2)
    U = rng.normal(size=(60, 4)) * [10.0, 1.0, 1e-2, 1e-4]
    exact = LowRank(U)
    lr = nystrom(exact, rank=4, oversample=3)
    assert np.abs(lr.to_dense() - exact.to_dense()).max() <= 1e-10 * np.abs(U @ U.T).max()


@pytest.mark.parametrize("rank, oversample, error", [
    (0, 5, ValueError), (90, 0, ValueError), (3, -1, ValueError), (2.0, 5, TypeError),
])
def test_nystrom_rejects_bad_parameters(rank, oversample, error):
    with pytest.raises(error):
        nystrom(LowRank(np.ones((80, 2))), rank, oversample=oversample)


# --------------------------------------------------- Woodbury factorizations
@pytest.mark.parametrize("rel_reg", [1e-3, 1e-6])
def test_lowrank_factorization_against_dense(problem, rel_reg):
    gn, G, norm, _ = problem
    tol = 1e-4
    lr = pivoted_cholesky(gn, tol=tol, max_rank=1000)
    reg = rel_reg * norm
    N = gn.n_params
    A = lr.to_dense() + reg * np.eye(N)
    f = lr.factorize(reg)
    B = np.random.default_rng(0).normal(size=(N, 3))
    X = f.solve(B)
    # against the approximation itself: exact up to Woodbury rounding (eps·‖G‖/λ)
    assert np.linalg.norm(A @ X - B) / np.linalg.norm(B) <= 1e-14 / rel_reg
    # against G: consistent with the compression error
    resid_G = np.linalg.norm(G @ X + reg * X - B) / np.linalg.norm(B)
    assert resid_G <= 10 * tol / rel_reg
    np.testing.assert_allclose(f.solve(B[:, 0]), X[:, 0], atol=1e-12 * np.abs(X).max())
    assert abs(f.logdet() - np.linalg.slogdet(A)[1]) <= 1e-10 * abs(np.linalg.slogdet(A)[1])
    inv_diag = np.diag(np.linalg.inv(A))
    np.testing.assert_allclose(f.inverse_diagonal(), inv_diag, rtol=1e-12 / rel_reg)


def test_exact_lowrank_direct_solve_residual(problem):
    gn, G, norm, _ = problem
    lr = pivoted_cholesky(gn, tol=1e-14, max_rank=gn.n_params)
    reg = 1e-3 * norm
    b = np.random.default_rng(1).normal(size=gn.n_params)
    x = lr.factorize(reg).solve(b)
    assert np.linalg.norm(G @ x + reg * x - b) / np.linalg.norm(b) <= 1e-10


@pytest.mark.parametrize("rank", [4, 40])  # 40: base solves in chunks of 16, 16 and 8 columns
def test_lowrank_update_on_dual_base(problem, rank):
    """Woodbury on top of a non-trivial base: (G + VVᵀ + λI) from the exact dual factorization."""
    gn, G, norm, _ = problem
    reg = 1e-2 * norm
    V = np.random.default_rng(3).normal(size=(gn.n_params, rank)) * np.sqrt(norm)
    f = LowRankUpdate(dual_factorize(gn, reg), V)
    A = G + V @ V.T + reg * np.eye(gn.n_params)
    B = np.random.default_rng(4).normal(size=(gn.n_params, 2))
    np.testing.assert_allclose(A @ f.solve(B), B, atol=1e-10 * np.abs(B).max())
    assert abs(f.logdet() - np.linalg.slogdet(A)[1]) <= 1e-9 * abs(np.linalg.slogdet(A)[1])
    np.testing.assert_allclose(f.inverse_diagonal(), np.diag(np.linalg.inv(A)), rtol=1e-9)
    assert f.rank == rank and f.reg == reg


def test_scaled_identity():
    f = ScaledIdentity(4, 0.5)
    np.testing.assert_array_equal(f.solve(np.ones(4)), np.full(4, 2.0))
    assert f.logdet() == pytest.approx(4 * np.log(0.5))
    np.testing.assert_array_equal(f.inverse_diagonal(), np.full(4, 2.0))


class DenseInverse(Factorization):
    """A dense factorization of an arbitrary symmetric matrix (may be indefinite)."""

    def __init__(self, A, reg):
        self.A, self.reg, self.shape = A, reg, A.shape

    def _matmat(self, V):
        return np.linalg.solve(self.A, V)


def test_lowrank_update_detects_indefinite_base():
    base = DenseInverse(np.diag([1.0, -1.0, 2.0]), reg=1.0)
    with pytest.raises(IndefiniteError, match="not positive definite"):
        LowRankUpdate(base, np.array([[0.0], [3.0], [0.0]]))


@pytest.mark.parametrize("args, error", [
    ((ScaledIdentity(3, 1.0), np.ones((4, 1))), ValueError),
    ((ScaledIdentity(3, 1.0), np.full((3, 1), np.inf)), ValueError),
    ((np.eye(3), np.ones((3, 1))), TypeError),
])
def test_lowrank_update_rejects_bad_input(args, error):
    with pytest.raises(error):
        LowRankUpdate(*args)


@pytest.mark.parametrize("reg, error", [(0.0, ValueError), (-1.0, ValueError),
                                        (np.nan, ValueError), ("1", TypeError)])
def test_factorize_rejects_bad_reg(reg, error):
    with pytest.raises(error):
        LowRank(np.ones((3, 1))).factorize(reg)


@pytest.mark.parametrize("method", ["lowrank", "hybrid", "hmatrix"])
@pytest.mark.parametrize("relative_reg", [1e-6, 1e-8])
def test_exact_representation_solves_to_dense_cholesky_accuracy(method, relative_reg):
    """Woodbury plus one refinement step: the residual of an exact representation at small
    reg is at the level of a dense Cholesky solve (<= 1e-10 at reg = 1e-6‖G‖)."""
    gn = small_digits_gnh()
    G = gn.dense()
    N = gn.n_params
    H = dgnh.compress(gn, method=method, tol=1e-12, max_rank=N, leaf_size=64, progress=False)
    reg = relative_reg * np.linalg.norm(G, 2)
    A = H.to_dense() + reg * np.eye(N)
    B = np.random.default_rng(0).normal(size=(N, 3))
    res = np.linalg.norm(A @ H.factorize(reg).solve(B) - B) / np.linalg.norm(B)
    dense_res = np.linalg.norm(A @ np.linalg.solve(A, B) - B) / np.linalg.norm(B)
    assert res <= max(10 * dense_res, 1e-10 if relative_reg >= 1e-6 else 0)


# ------------------------------------- randomized Nyström on held-out networks (issue 11)
from cases import HELD_OUT_CASES  # noqa: E402


@pytest.fixture(scope="module")
def held_out():
    """name -> (gn, dense G, eigenvalues descending) of ``cases.HELD_OUT_CASES``, cached."""
    cache = {}

    def get(name):
        if name not in cache:
            gn = HELD_OUT_CASES[name]()
            G = gn.dense()
            cache[name] = (gn, G, np.linalg.eigvalsh(G)[::-1])
        return cache[name]
    yield get
    for gn, _, _ in cache.values():
        gn.close()


@pytest.mark.parametrize("name, rank, power_iterations", [
    ("untrained_classifier", 40, 1), ("untrained_classifier", 160, 1), ("relu_regression", 160, 1),
    ("relu_regression", 40, 2), ("trained_autoencoder", 40, 1), ("trained_autoencoder", 160, 2)])
def test_nystrom_within_twice_optimal_at_equal_rank(held_out, name, rank, power_iterations):
    """Eckart–Young: no rank-r approximation beats λ_{r+1}; Nyström on the Krylov space
    comes within 2× of it (pivoted Cholesky and one-product Nyström were 3–8× off)."""
    gn, G, lam = held_out(name)
    lr = nystrom(gn, rank, seed=3, power_iterations=power_iterations)
    assert lr.rank == rank and lr.report["stop"] == "rank"
    assert lr.report["n_products"] == (power_iterations + 1) * (rank + 10)
    err = check_lowrank(lr, G, lam[0])
    assert lam[rank] / lam[0] * (1 - 1e-8) <= err <= 2 * lam[rank] / lam[0]


@pytest.mark.parametrize("name, tol", [
    ("untrained_classifier", 1e-2), ("untrained_classifier", 1e-3),
    ("trained_autoencoder", 1e-3), ("trained_autoencoder", 1e-4), ("relu_regression", 1e-2)])
def test_nystrom_adaptive_meets_tol_at_near_optimal_rank(held_out, name, tol):
    gn, G, lam = held_out(name)
    norm = lam[0]
    lr = nystrom(gn, tol=tol, max_rank=gn.n_params, seed=2, norm_estimate=norm)
    rep = lr.report
    assert rep["converged"] and rep["stop"] in ("estimate", "exact")
    err = check_lowrank(lr, G, norm)
    assert err <= 1.1 * tol
    assert rep["error_estimate"] == pytest.approx(err, rel=0.1, abs=1e-12)
    optimal_rank = int(np.count_nonzero(lam > tol * norm))  # smallest rank meeting tol
    assert lr.rank <= 1.1 * optimal_rank + 2
    assert not cap_statistics("lowrank", rep)["max_rank_binds"]


@pytest.mark.parametrize("name", ["untrained_classifier", "relu_regression"])
def test_nystrom_adaptive_cap_binds(held_out, name):
    gn, G, lam = held_out(name)
    lr = nystrom(gn, tol=1e-6, max_rank=30, seed=1)
    rep = lr.report
    assert (lr.rank, rep["stop"], rep["converged"]) == (30, "max_rank", False)
    assert cap_statistics("lowrank", rep) == {"max_rank_binds": True, "n_capped_nodes": 0}
    err = check_lowrank(lr, G, lam[0])
    assert err <= 2 * lam[30] / lam[0]
    assert rep["error_estimate"] > 1e-6


@pytest.mark.parametrize("tol", [1e-2, 1e-6])
def test_nystrom_adaptive_zero_rows_and_exact_low_rank(problem, tol):
    """Zero-diagonal rows stay zero; an exactly low-rank G (rank <= n·d) is recovered."""
    gn, G, norm, eigenvalues = problem
    lr = nystrom(gn, tol=tol, max_rank=gn.n_params, seed=0)
    err = check_lowrank(lr, G, norm)
    assert err <= 1.1 * tol and lr.report["converged"]
    assert lr.rank <= int(np.count_nonzero(eigenvalues > 0.5 * tol * norm)) + 1


@pytest.mark.parametrize("kwargs", [{"rank": 30}, {"tol": 1e-4, "max_rank": 120}])
def test_nystrom_with_its_basis_spilled_to_disk_is_the_same(problem, kwargs):
    """A memory budget too small for the Krylov basis and its image: they go to temporary
    files, the products come a few vectors at a time; the result equals the in-memory one
    to 1e-12 and stays a Nyström approximation of the dense G."""
    gn, G, norm, _ = problem
    lr = nystrom(gn, seed=4, **kwargs)
    with dgnh.config.set(memory_budget="1KiB"):
        spilled = nystrom(gn, seed=4, **kwargs)
    assert spilled.report["basis_spilled"] and not lr.report["basis_spilled"]
    assert spilled.rank == lr.rank
    scale = np.abs(lr.to_dense()).max()
    assert np.abs(spilled.to_dense() - lr.to_dense()).max() <= 1e-12 * scale
    check_lowrank(spilled, G, norm)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"rank": 3, "tol": 1e-3}, ValueError, "give either rank .* or tol .*, not both"),
    ({}, ValueError, "not neither"),
    ({"tol": 0.0}, ValueError, "tol must lie in the open interval"),
    ({"tol": 1e-3, "max_rank": 0}, ValueError, "max_rank must be an integer >= 1"),
    ({"rank": 3, "power_iterations": -1}, ValueError, "power_iterations must be an integer >= 0"),
    ({"rank": 3, "norm_estimate": -1.0}, ValueError, "norm_estimate must be >= 0"),
])
def test_nystrom_rejects_bad_mode(kwargs, error, match):
    with pytest.raises(error, match=match):
        nystrom(LowRank(np.ones((80, 2))), **kwargs)
