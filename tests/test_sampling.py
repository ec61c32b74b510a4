"""Sampled entries: the per-entry contract over many seeds, and N-independence."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binom

import dgnh
from cases import random_mlp, random_targets

N_SEEDS = 200


@pytest.fixture(scope="module")
def big_n():
    """n = 60 000 rows (more than any plan below), a small network with a dead unit."""
    net = random_mlp([3, 5, 4, 2], ["tanh", "relu", "identity"], seed=11)
    rng = np.random.default_rng(5)
    X = rng.normal(size=(60_000, 3)) * np.array([1.0, 0.0, 3.0])
    Y = random_targets("cross_entropy", 60_000, 2)
    gn = dgnh.GaussNewton(net, X, Y, loss="cross_entropy", shard_size=7_000, client="in-process")
    return gn, gn.dense()


def _pairs(G, k, seed):
    rng = np.random.default_rng(seed)
    live = np.flatnonzero(np.diag(G) > 0)
    return [(int(a), int(b)) for a, b in rng.choice(live, size=(k, 2))]


@pytest.mark.parametrize("eps", [0.1, 0.03])
@pytest.mark.parametrize("delta", [0.1, 0.01])
def test_entry_contract_holds_over_seeds(big_n, eps, delta):
    gn, G = big_n
    pairs = _pairs(G, 5, seed=int(eps * 1000 + delta * 100))
    requests = [([a], [b]) for a, b in pairs]
    before = gn.stats["rows_sampled"]
    violations, differs, trials = 0, 0, 0
    for seed in range(N_SEEDS):
        for (a, b), est in zip(pairs, gn.entries_many(requests, eps=eps, delta=delta, seed=seed)):
            bound = eps * np.sqrt(G[a, a] * G[b, b])
            violations += abs(est[0, 0] - G[a, b]) > bound
            differs += est[0, 0] != G[a, b]
            trials += 1
    plan = dgnh.sampling_plan(eps, delta)
    assert gn.stats["rows_sampled"] - before == N_SEEDS * len(pairs) * plan.n_rows
    assert differs > 0.9 * trials  # really sampled, not the exact fallback
    # observed violation rate at most delta (with a one-sided binomial allowance)
    assert violations <= binom.ppf(0.999, trials, delta)
    assert violations / trials <= delta


def test_block_contract_and_shared_rows(big_n):
    gn, G = big_n
    rng = np.random.default_rng(1)
    live = np.flatnonzero(np.diag(G) > 0)
    rows, cols = rng.choice(live, 2, replace=False), rng.choice(live, 3, replace=False)
    eps, delta = 0.1, 0.1
    d = np.sqrt(np.diag(G))
    bound = eps * np.outer(d[rows], d[cols])
    viol = 0
    for seed in range(N_SEEDS):
        est = gn.entries(rows, cols, eps=eps, delta=delta, seed=seed)
        viol += np.sum(np.abs(est - G[np.ix_(rows, cols)]) > bound)
    assert viol / (N_SEEDS * rows.size * cols.size) <= delta


def test_dead_parameters_are_exact_zero(big_n):
    gn, G = big_n
    dead = np.flatnonzero(np.diag(G) == 0)
    live = np.flatnonzero(np.diag(G) > 0)
    assert dead.size > 0, "the fixture network should have a dead (constant-zero) input"
    est = gn.entries(dead[:2], live[:3], eps=0.1, delta=0.1, seed=0)
    assert np.all(est == 0)


def test_same_seed_same_result_and_sharding_invariant(big_n):
    gn, G = big_n
    a = gn.entries([1, 2], [3], eps=0.1, delta=0.1, seed=42)
    b = gn.entries([1, 2], [3], eps=0.1, delta=0.1, seed=42)
    c = gn.entries([1, 2], [3], eps=0.1, delta=0.1, seed=43)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


@pytest.mark.parametrize("hidden", [5, 50])
def test_sample_count_does_not_grow_with_n_params(hidden):
    """Same n and d, 10x the parameters: the same number of rows is sampled."""
    net = random_mlp([3, hidden, 2], ["tanh", "identity"], seed=2)
    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(30_000, 3)), rng.normal(size=(30_000, 2))
    gn = dgnh.GaussNewton(net, X, Y, client="in-process")
    gn.entries([0], [net.n_params - 1], eps=0.1, delta=0.01, seed=0)
    assert gn.stats["rows_sampled"] == dgnh.sampling_plan(0.1, 0.01).n_rows == 4735


def test_plan_falls_back_to_exact_when_cheaper():
    net = random_mlp([3, 4, 2], ["tanh", "identity"], seed=2)
    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(100, 3)), rng.normal(size=(100, 2))
    gn = dgnh.GaussNewton(net, X, Y, client="in-process")
    est = gn.entries([0, 1], [2, 3], eps=0.1, delta=0.1, seed=0)
    assert gn.stats["rows_sampled"] == 0
    np.testing.assert_allclose(est, gn.entries([0, 1], [2, 3]), rtol=1e-14)


@pytest.mark.parametrize("eps, delta", [(0.1, 0.1), (0.1, 0.01), (0.03, 0.01), (0.3, 0.001)])
def test_plan_meets_its_own_tail_bound(eps, delta):
    plan = dgnh.sampling_plan(eps, delta)
    p_group = 1 / (plan.group_size * eps**2)  # Chebyshev per group
    tail = binom.sf((plan.n_groups + 1) // 2 - 1, plan.n_groups, p_group)
    assert tail <= delta
    assert plan.n_rows <= np.ceil(1 / (eps**2 * delta))  # never worse than Chebyshev


def test_float32_sampling_survives_a_nearly_dead_unit():
    """G_aa ~ 1e-44 (a saturated sigmoid): 1/G_aa overflows float32; weights stay float64."""
    rng = np.random.default_rng(0)
    net = dgnh.MLP([rng.normal(size=(2, 3)), rng.normal(size=(2, 2))],
                   [np.array([-50.0, 0.0]), np.zeros(2)], ["sigmoid", "identity"])
    X, Y = rng.normal(size=(20_000, 3)), rng.normal(size=(20_000, 2))
    gn = dgnh.GaussNewton(net, X, Y, dtype=np.float32, client="in-process")
    tiny = net.param_index(1, "bias", 0)
    live = net.param_index(2, "weight", 0, 1)
    est = gn.entries([tiny, live], [live], eps=0.1, delta=0.1, seed=0)
    assert np.all(np.isfinite(est)) and gn.stats["rows_sampled"] > 0
    exact = gn.entries([tiny, live], [live])
    assert abs(est[1, 0] - exact[1, 0]) <= 0.1 * gn.diagonal()[live]
