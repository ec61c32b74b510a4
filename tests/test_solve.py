"""CG and the exact dual route for ``G + λI`` against dense float64 solves."""

from __future__ import annotations

import numpy as np
import pytest
from distributed import Client, LocalCluster

import dgnh
from cases import (dense_reference, jacobian_problem, norm_relative_error, random_mlp,
                   random_targets, small_digits_gnh)
from dgnh.lowrank import LowRank, pivoted_cholesky
from dgnh.exact_solve import dual_factorize, dual_solve, solve
from dgnh.solve import CGResult, cg

REL_REGS = [1e-3, 1e-6]


@pytest.fixture(scope="module")
def digits():
    """Trained digits GNH in 3 shards: N = 610 > n·d = 400 (singular G)."""
    gn = small_digits_gnh(shard_size=15, client="in-process")
    G = gn.dense()
    norm = float(np.linalg.eigvalsh(G)[-1])
    yield gn, G, norm
    gn.close()


@pytest.fixture(scope="module")
def lowrank(digits):
    gn, _, _ = digits
    return pivoted_cholesky(gn, tol=1e-3, max_rank=300)


def dense_solve(G, reg, B):
    return np.linalg.solve(G + reg * np.eye(len(G)), B)


# ------------------------------------------------------------------------- CG
# without a good preconditioner λ = 1e-6‖G‖ takes thousands of iterations (see below)
@pytest.mark.parametrize("pre, rel_reg", [(None, 1e-3), ("diagonal", 1e-3), ("lowrank", 1e-3),
                                          ("lowrank", 1e-6), ("factorization", 1e-6)])
def test_cg_on_exact_products_reaches_rtol(digits, lowrank, pre, rel_reg):
    gn, G, norm = digits
    reg = rel_reg * norm
    precond = {"lowrank": lowrank, "factorization": lowrank.factorize(reg)}.get(pre, pre)
    B = np.random.default_rng(0).normal(size=(gn.n_params, 2))
    res = cg(gn, B, reg, preconditioner=precond, rtol=1e-8)
    assert isinstance(res, CGResult) and res.converged
    assert res.residual_history.shape == (res.n_iter + 1, 2)
    np.testing.assert_allclose(res.residual_history[0], 1.0)
    assert np.all(res.residual_history[-1] <= 1e-8)
    true = np.linalg.norm(G @ res.x + reg * res.x - B, axis=0) / np.linalg.norm(B, axis=0)
    np.testing.assert_allclose(res.residual, true, rtol=1e-3)
    assert np.all(true <= 2e-8)
    assert norm_relative_error(res.x, dense_solve(G, reg, B)) <= 1e-8 / rel_reg


@pytest.mark.parametrize("rel_reg", REL_REGS)
def test_solve_reaches_rtol_at_small_reg(digits, rel_reg):
    gn, G, norm = digits
    reg = rel_reg * norm
    b = gn.gradient()
    res = solve(gn, b, reg, rtol=1e-8, preconditioner=pivoted_cholesky(gn, tol=1e-2))
    assert res.converged and res.x.shape == b.shape and res.residual_history.ndim == 1
    assert np.linalg.norm(G @ res.x + reg * res.x - b) / np.linalg.norm(b) <= 1.5e-8


@pytest.mark.parametrize("rel_reg", REL_REGS)
def test_compressed_preconditioner_beats_none(digits, lowrank, rel_reg):
    gn, _, norm = digits
    reg = rel_reg * norm
    b = np.random.default_rng(1).normal(size=gn.n_params)
    plain = cg(gn, b, reg, rtol=1e-8)
    pre = cg(gn, b, reg, preconditioner=lowrank, rtol=1e-8)
    assert plain.converged and pre.converged
    assert pre.n_iter < plain.n_iter
    assert pre.n_iter <= 0.5 * plain.n_iter


def test_cg_on_compressed_operator_matches_its_factorization(lowrank):
    reg = 1e-2
    b = np.random.default_rng(2).normal(size=lowrank.shape[0])
    res = cg(lowrank, b, reg, rtol=1e-12)
    np.testing.assert_allclose(res.x, lowrank.factorize(reg).solve(b), rtol=0,
                               atol=1e-9 * np.abs(res.x).max())


def test_cg_detects_indefinite_operator():
    """The Hessian of an untrained tanh network is indefinite: CG must not return silently."""
    net = random_mlp([3, 5, 2], ["tanh", "identity"], seed=1, scale=3.0)
    rng = np.random.default_rng(0)
    gn = dgnh.GaussNewton(net, rng.normal(size=(20, 3)), rng.normal(size=(20, 2)) * 5,
                          client="in-process")
    hessian = gn.hessian()
    w, V = np.linalg.eigh(hessian.to_dense())
    assert w[0] < -1e-3
    with pytest.raises(dgnh.IndefiniteError, match="not positive definite"):
        cg(hessian, V[:, 0], reg=1e-6)


def test_cg_zero_rhs_and_maxiter(digits):
    gn, _, norm = digits
    B = np.zeros((gn.n_params, 2))
    B[:, 1] = 1.0
    res = cg(gn, B, 1e-3 * norm, maxiter=3)
    assert res.n_iter == 3 and not res.converged
    np.testing.assert_array_equal(res.x[:, 0], 0.0)
    assert res.residual_history.shape == (4, 2)
    with pytest.warns(RuntimeWarning, match="CG stopped after 3 iterations"):
        solve(gn, B[:, 1], 1e-3 * norm, maxiter=3)


# -------------------------------------------------------------------- dual route
@pytest.mark.parametrize("loss", ["mse", "cross_entropy", "binary_cross_entropy"])
def test_shard_jacobian_products_and_dual_gram(loss):
    """Per-shard Ĵ products and ĴĴᵀ blocks against a finite-difference G = ĴᵀĴ/n."""
    net, X, gn, rng = jacobian_problem(loss)
    shards = gn.backend.shards
    J = [s.jacobian_matvec(np.eye(gn.n_params)) for s in shards]  # Ĵ_s, (n_s·d, N)
    np.testing.assert_allclose(sum(j.T @ j for j in J) / 10, dense_reference(net, X, loss),
                               atol=1e-7)
    Ys = [rng.normal(size=(len(j), 2)) for j in J]
    for s, j, y in zip(shards, J, Ys):
        np.testing.assert_allclose(s.jacobian_rmatvec(y), j.T @ y, atol=1e-12)
    factors = [s.dual_factors() for s in shards]
    for a, s in enumerate(shards):
        np.testing.assert_allclose(s.dual_gram(factors[a:]), J[a] @ np.vstack(J[a:]).T,
                                   atol=1e-12)


@pytest.mark.parametrize("rel_reg", [1e-2, 1e-3])
def test_dual_solve_equals_dense(digits, rel_reg):
    gn, G, norm = digits
    reg = rel_reg * norm
    B = np.random.default_rng(3).normal(size=(gn.n_params, 3))
    X = dense_solve(G, reg, B)
    assert norm_relative_error(dual_solve(gn, B, reg), X) <= 1e-10
    np.testing.assert_allclose(dual_solve(gn, B[:, 0], reg), X[:, 0],
                               atol=1e-10 * np.abs(X).max())


@pytest.mark.parametrize("rel_reg", REL_REGS)
def test_dual_logdet_and_inverse_diagonal(digits, rel_reg):
    gn, G, norm = digits
    reg = rel_reg * norm
    f = dual_factorize(gn, reg)
    A = G + reg * np.eye(gn.n_params)
    sign, logdet = np.linalg.slogdet(A)
    assert sign == 1 and abs(f.logdet() - logdet) <= 1e-10 * abs(logdet)
    np.testing.assert_allclose(f.inverse_diagonal(chunk=300), np.diag(np.linalg.inv(A)),
                               rtol=1e-13 / rel_reg)
    b = np.random.default_rng(4).normal(size=gn.n_params)
    assert np.linalg.norm(A @ f.solve(b) - b) / np.linalg.norm(b) <= 1e-14 / rel_reg


@pytest.mark.parametrize("loss", ["mse", "binary_cross_entropy"])
def test_dual_solve_other_losses(loss):
    net = random_mlp([4, 6, 3], ["tanh", "sigmoid"], seed=2)
    rng = np.random.default_rng(5)
    X, Y = rng.normal(size=(9, 4)), random_targets(loss, 9, 3)
    gn = dgnh.GaussNewton(net, X, Y, loss=loss, shard_size=4, client="in-process")
    G = gn.dense()
    b = rng.normal(size=gn.n_params)
    np.testing.assert_allclose(dual_solve(gn, b, 1e-3), dense_solve(G, 1e-3, b), rtol=1e-9,
                               atol=1e-10)


def test_dual_route_on_dask_cluster_matches_in_process(digits):
    """Cross-shard blocks of ĴĴᵀ gathered through a real 2-worker cluster."""
    gn, _, norm = digits
    reg = 1e-3 * norm
    b = np.random.default_rng(6).normal(size=gn.n_params)
    local = dual_factorize(gn, reg)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster, \
            Client(cluster, set_as_default=False) as client:
        remote_gn = small_digits_gnh(shard_size=15, client=client)
        remote = dual_factorize(remote_gn, reg)
        np.testing.assert_allclose(remote.solve(b), local.solve(b), rtol=1e-12, atol=1e-12)
        assert remote.logdet() == pytest.approx(local.logdet(), rel=1e-13)
        remote_gn.close()


# ------------------------------------------------------------------- bad input
def _with_nan(N):
    b = np.ones(N)
    b[3] = np.nan
    return b


# (name, (gn, N) -> (op, b, keyword arguments), error, message)
BAD_CG_CALLS = [
    ("reg zero", lambda gn, N: (gn, np.ones(N), {"reg": 0.0}), ValueError, "reg must be"),
    ("reg negative", lambda gn, N: (gn, np.ones(N), {"reg": -1.0}), ValueError, "reg must be"),
    ("rows", lambda gn, N: (gn, np.ones((N + 1, 2)), {}), ValueError,
     "right-hand side must have shape"),
    ("nan", lambda gn, N: (gn, _with_nan(N), {}), ValueError, "NaN or Inf"),
    ("preconditioner name", lambda gn, N: (gn, np.ones(N), {"preconditioner": "jacobi"}),
     ValueError, "unknown preconditioner"),
    ("preconditioner shape",
     lambda gn, N: (gn, np.ones(N), {"preconditioner": LowRank(np.ones((N - 1, 1)))}),
     ValueError, "does not match"),
    ("preconditioner type", lambda gn, N: (gn, np.ones(N), {"preconditioner": np.eye(N)}),
     TypeError, "preconditioner must be"),
    ("diagonal without diagonal()",
     lambda gn, N: (LowRank(np.ones((N, 1))).factorize(1.0), np.ones(N),
                    {"preconditioner": "diagonal"}), TypeError, "diagonal"),
    ("rtol", lambda gn, N: (gn, np.ones(N), {"rtol": 0.0}), ValueError, "rtol"),
    ("maxiter", lambda gn, N: (gn, np.ones(N), {"maxiter": -1}), ValueError, "maxiter"),
    ("operator", lambda gn, N: (np.eye(N), np.ones(N), {}), TypeError, "Operator"),
]


@pytest.mark.parametrize("name, make, error, match", BAD_CG_CALLS,
                         ids=[c[0] for c in BAD_CG_CALLS])
def test_cg_rejects_bad_input(digits, name, make, error, match):
    gn, _, _ = digits
    op, b, kwargs = make(gn, gn.n_params)
    kwargs.setdefault("reg", 1e-3)
    with pytest.raises(error, match=match):
        cg(op, b, **kwargs)


@pytest.mark.parametrize("call", [solve, dual_solve])
@pytest.mark.parametrize("B, reg, error", [
    (np.ones(3), 1e-3, ValueError), (None, 0.0, ValueError), (None, -1e-3, ValueError),
    ("inf", 1e-3, ValueError),
])
def test_solvers_reject_bad_input(digits, call, B, reg, error):
    gn, _, _ = digits
    if B is None:
        B = np.ones(gn.n_params)
    elif isinstance(B, str):
        B = np.ones(gn.n_params)
        B[0] = np.inf
    with pytest.raises(error):
        call(gn, B, reg)


def test_dual_rejects_large_problems_and_other_operators(digits, lowrank):
    gn, _, _ = digits
    with pytest.raises(ValueError, match="GiB"):
        dual_factorize(gn, 1.0, max_bytes=1000)
    with pytest.raises(TypeError, match="GaussNewton"):
        dual_solve(lowrank, np.ones(gn.n_params), 1.0)
    with pytest.raises(TypeError, match="GaussNewton"):
        solve(lowrank, np.ones(gn.n_params), 1.0)
