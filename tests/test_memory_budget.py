"""The memory budget (dgnh.config): with a tiny budget, products, batches of blocks and the
dual route chunk their work and give the results they give without one (to 1e-12), checked
against dense float64 references; what cannot fit at all is refused up front with a figure."""

from __future__ import annotations

import numpy as np
import pytest

import dgnh
import dgnh.config
from cases import dense_reference, max_relative_error, random_mlp, random_targets
from dgnh.batching import split_request, vector_chunk
from dgnh.shard_factors import ROP_MAX_VECTORS

HUGE, TINY = 2**40, 1  # a budget nothing needs to chunk for, and one that chunks everything

# (hidden sizes, activations, loss, biases, shard_size)
PROBLEMS = [
    pytest.param(([3, 5, 4], ["tanh", "identity"], "mse", True, 4), id="mse-bias"),
    pytest.param(([4, 6, 5, 3], ["relu", "gelu", "identity"], "cross_entropy",
                  [True, False, True], 5), id="ce-mixed-bias"),
    pytest.param(([3, 4, 2], ["sigmoid", "identity"], "binary_cross_entropy", False, 13),
                 id="bce-nobias-1shard"),
]


def make(spec, **options):
    sizes, acts, loss, biases, shard_size = spec
    net = random_mlp(sizes, acts, biases, seed=len(sizes))
    X = np.random.default_rng(3).normal(size=(13, sizes[0]))
    Y = random_targets(loss, 13, sizes[-1])
    gn = dgnh.GaussNewton(net, X, Y, loss=loss, shard_size=shard_size, client="in-process",
                          **options)
    return net, X, loss, gn


@pytest.mark.parametrize("spec", PROBLEMS)
@pytest.mark.parametrize("k", [1, ROP_MAX_VECTORS - 1, ROP_MAX_VECTORS, 9])
def test_products_with_a_tiny_budget_equal_those_without(spec, k):
    net, X, loss, free = make(spec, memory_budget=HUGE)
    tight = make(spec, memory_budget=TINY)[3]
    G = dense_reference(net, X, loss)
    V = np.random.default_rng(k).normal(size=(net.n_params, k))
    assert max_relative_error(free @ V, G @ V) <= 1e-6
    assert max_relative_error(tight @ V, free @ V) <= 1e-12
    assert max_relative_error(tight.hvp(V), free.hvp(V)) <= 1e-12
    JV = free.jacobian_matvec(V)
    assert max_relative_error(tight.jacobian_matvec(V), JV) <= 1e-12
    Y = np.random.default_rng(k + 1).normal(size=(free.n_jacobian_rows, k))
    assert max_relative_error(tight.jacobian_rmatvec(Y), free.jacobian_rmatvec(Y)) <= 1e-12
    # Ĵ products against G = ĴᵀĴ/n, the dense reference
    assert max_relative_error(free.jacobian_rmatvec(JV) / free.n_samples, G @ V) <= 1e-6


@pytest.mark.parametrize("spec", PROBLEMS)
def test_blocks_with_a_tiny_budget_equal_those_without(spec):
    net, X, loss, free = make(spec, memory_budget=HUGE)
    tight = make(spec, memory_budget=TINY)[3]
    G = dense_reference(net, X, loss)
    N = net.n_params
    rng = np.random.default_rng(5)
    requests = [(rng.integers(0, N, 7), rng.integers(0, N, 5)), ([3], [4]),
                (np.arange(N), np.arange(N)), ([], [1, 2])]
    for a, b, (rows, cols) in zip(tight.entries_many(requests), free.entries_many(requests),
                                  requests):
        assert a.shape == b.shape == (len(rows), len(cols))
        if a.size:
            assert max_relative_error(a, b) <= 1e-12
            assert max_relative_error(b, G[np.ix_(rows, cols)]) <= 1e-6


@pytest.mark.parametrize("budget", [
    pytest.param(lambda gn, entries: 2 * entries * (gn.n_shards + 1) * 8 * 3, id="3-groups"),
    pytest.param(lambda gn, entries: 2 * entries * (gn.n_shards + 1) * 8, id="1-group"),
])
def test_sampled_blocks_split_by_groups_equal_the_whole(budget):
    spec = PROBLEMS[1].values[0]
    net, X, loss, free = make(spec, memory_budget=HUGE)
    gn = dgnh.GaussNewton(net, np.tile(X, (100, 1)), np.tile(random_targets(loss, 13, 3), 100),
                          loss=loss, shard_size=250, client="in-process", memory_budget=HUGE)
    requests = [(np.arange(6), np.arange(10, 14)), (np.arange(20, 23), np.arange(30, 35))]
    whole = gn.entries_many(requests, eps=0.5, delta=0.01, seed=4)
    assert gn.stats["entries_sampled"] > 0
    gn.memory_budget = budget(gn, 6 * 4)
    parts = gn.entries_many(requests, eps=0.5, delta=0.01, seed=4)
    for a, b in zip(parts, whole):
        assert max_relative_error(a, b) <= 1e-12
    gn.memory_budget = 10
    with pytest.raises(ValueError, match=r"sampled 6x4 block .* 1,344 bytes.*raise memory_budget"):
        gn.entries_many(requests, eps=0.5, delta=0.01, seed=4)


def test_pieces_cover_the_block_once():
    loc = tuple(np.arange(7) for _ in range(3))
    for cap in (1, 3, 8, 20, 49):
        pieces = split_request([("exact", loc, loc)], cap)
        cover = np.zeros((7, 7), dtype=int)
        for where, specs, size in pieces:
            cover[where or (slice(None), slice(None))] += 1
            assert size <= cap and size == len(specs[0][1][0]) * len(specs[0][2][0])
        assert (cover == 1).all()


def test_dual_route_within_and_beyond_the_budget():
    spec = PROBLEMS[1].values[0]
    net, X, loss, gn = make(spec)
    G = dense_reference(net, X, loss)
    m = gn.n_jacobian_rows
    K = gn.dual_gram()
    fixed = 8 * m * m + 8 * 13 * (3 * 14 + 5 + 7 + 6)  # the matrix and the shards' factors
    gn.memory_budget = fixed + 16 * 5 * 3 * m  # room for one shard's rows at a time
    np.testing.assert_allclose(gn.dual_gram(), K, rtol=0, atol=1e-13 * np.abs(K).max())
    f = dgnh.dual_factorize(gn, 0.1)
    np.testing.assert_allclose(f.solve(np.ones(net.n_params)),
                               np.linalg.solve(G + 0.1 * np.eye(len(G)), np.ones(len(G))),
                               rtol=1e-6)
    gn.memory_budget = fixed
    with pytest.raises(ValueError, match=r"dual route needs [\d,]+ bytes .*the memory budget"):
        dgnh.dual_factorize(gn, 0.1)
    with pytest.raises(ValueError, match=r"above max_bytes = 100"):
        gn.dual_gram(max_bytes=100)


@pytest.mark.parametrize("setting, env, argument, expected", [
    (None, None, None, int(dgnh.config.DEFAULT_FRACTION * dgnh.config.machine_memory())),
    (None, "3GiB", None, 3 * 2**30),
    (None, "123456", None, 123456),
    ("1MB", "3GiB", None, 10**6),
    ("1MB", "3GiB", 2048, 2048),
    (None, None, "0.5 KiB", 512),
])
def test_budget_is_resolved_argument_setting_environment_default(monkeypatch, setting, env,
                                                                 argument, expected):
    monkeypatch.delenv(dgnh.config.ENV_VAR, raising=False)
    if env is not None:
        monkeypatch.setenv(dgnh.config.ENV_VAR, env)
    with dgnh.config.set(memory_budget=setting):
        assert dgnh.config.memory_budget(argument) == expected
    assert dgnh.config.memory_budget(argument) == (expected if setting is None else
                                                   dgnh.config.memory_budget(argument))


@pytest.mark.parametrize("call, exc, match", [
    (lambda: dgnh.config.memory_budget("lots"), ValueError, "memory_budget must be a number"),
    (lambda: dgnh.config.memory_budget(0), ValueError, "memory_budget must be >= 1"),
    (lambda: dgnh.config.memory_budget(True), TypeError, "memory_budget must be a number"),
    (lambda: dgnh.config.set(memory_budget="4 XB"), ValueError, "such as 4000000000 or '4GiB'"),
    (lambda: make(PROBLEMS[0].values[0], memory_budget=-5), ValueError, "memory_budget"),
])
def test_bad_budgets_are_named(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_bad_environment_budget_is_named(monkeypatch):
    monkeypatch.setenv(dgnh.config.ENV_VAR, "plenty")
    with pytest.raises(ValueError, match="the environment variable DGNH_MEMORY_BUDGET must be"):
        dgnh.config.memory_budget()


@pytest.mark.parametrize("k, per_vector, budget, expected", [
    (64, 10, 1000, 64), (64, 100, 1000, 10), (64, 10**9, 1000, 1), (5, 1, TINY, 1),
])
def test_vector_chunks(k, per_vector, budget, expected):
    assert vector_chunk(k, per_vector, budget) == expected
