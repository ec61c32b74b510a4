"""GaussNewton against independent references: finite-difference Jacobians, dense G."""

from __future__ import annotations

import numpy as np
import pytest

import dgnh
from cases import dense_reference, max_relative_error, random_mlp, random_targets

ACTS = list(dgnh.ACTIVATIONS)
LOSSES = ["mse", "cross_entropy", "binary_cross_entropy"]

# (sizes, hidden activation, output activation, loss, biases): every activation, every
# loss, depth 1..4, with and without biases.
CASES = []
for k, act in enumerate(ACTS):
    for m, loss in enumerate(LOSSES):
        depth = 1 + (k + m) % 4
        sizes = [3] + [4] * (depth - 1) + [3]
        out_act = act if depth == 1 or (k + m) % 3 == 0 else "identity"
        hidden = [act] * (depth - 1) + [out_act]
        biases = [(j + k + m) % 2 == 0 for j in range(depth)] if (k + m) % 2 else True
        CASES.append(pytest.param((sizes, hidden, loss, biases), id=f"{act}-{loss}-L{depth}"))


@pytest.fixture(params=CASES)
def problem(request):
    sizes, acts, loss, biases = request.param
    net = random_mlp(sizes, acts, biases, seed=len(request.node.name))
    rng = np.random.default_rng(7)
    X = rng.normal(size=(11, sizes[0]))
    Y = random_targets(loss, 11, sizes[-1])
    gn = dgnh.GaussNewton(net, X, Y, loss=loss, shard_size=4, client="in-process")
    return net, X, Y, loss, gn


def test_entries_blocks_diagonal_column_dense(problem):
    net, X, Y, loss, gn = problem
    G = dense_reference(net, X, loss)
    N = net.n_params
    assert max_relative_error(gn.dense(), G) <= 1e-6
    rng = np.random.default_rng(0)
    rows, cols = rng.integers(0, N, 7), rng.integers(0, N, 5)
    assert max_relative_error(gn.entries(rows, cols), G[np.ix_(rows, cols)]) <= 1e-6
    assert max_relative_error(gn.entries([rows[0]], [cols[0]]),
                              G[rows[:1]][:, cols[:1]]) <= 1e-6
    assert max_relative_error(gn.diagonal(), np.diag(G)) <= 1e-6
    j = int(cols[1])
    assert max_relative_error(gn.column(j), G[:, j]) <= 1e-6
    blocks = gn.entries_many([(rows, cols), (cols, rows), (np.arange(N), [j])])
    assert max_relative_error(blocks[0], G[np.ix_(rows, cols)]) <= 1e-6
    assert max_relative_error(blocks[1], G[np.ix_(cols, rows)]) <= 1e-6
    assert max_relative_error(blocks[2][:, 0], G[:, j]) <= 1e-6


def test_matvec_against_dense(problem):
    net, X, Y, loss, gn = problem
    G = gn.dense()
    V = np.random.default_rng(1).normal(size=(net.n_params, 3))
    assert max_relative_error(gn @ V, G @ V) <= 1e-12
    assert max_relative_error(gn @ V[:, 0], G @ V[:, 0]) <= 1e-12
    assert max_relative_error(gn.as_linear_operator() @ V[:, 1], G @ V[:, 1]) <= 1e-12
    assert max_relative_error(gn.T @ V, G @ V) <= 1e-12


def _loss_and_grad(net, X, Y, loss, w):
    g = dgnh.GaussNewton(net.with_parameters(w), X, Y, loss=loss, client="in-process")
    return g.loss(), g.gradient()


def test_gradient_and_hvp_against_finite_differences(problem):
    net, X, Y, loss, gn = problem
    w0, h = net.parameters(), 1e-6
    g_fd, H_fd = [], []
    for j in range(net.n_params):
        e = np.zeros_like(w0)
        e[j] = h
        lp, gp = _loss_and_grad(net, X, Y, loss, w0 + e)
        lm, gm = _loss_and_grad(net, X, Y, loss, w0 - e)
        g_fd.append((lp - lm) / (2 * h))
        H_fd.append((gp - gm) / (2 * h))
    assert max_relative_error(gn.gradient(), np.array(g_fd)) <= 1e-6
    H = np.array(H_fd).T
    assert max_relative_error(gn.hvp(np.eye(net.n_params)), H) <= 1e-6
    v = np.random.default_rng(3).normal(size=net.n_params)
    assert max_relative_error(gn.hessian() @ v, H @ v) <= 1e-6


@pytest.mark.parametrize("loss", LOSSES)
def test_float32_agrees_with_float64(loss):
    net = random_mlp([5, 8, 6, 4], ["tanh", "gelu", "identity"], seed=3)
    rng = np.random.default_rng(2)
    X = rng.normal(size=(40, 5))
    Y = random_targets(loss, 40, 4)
    g64 = dgnh.GaussNewton(net, X, Y, loss=loss, client="in-process")
    g32 = dgnh.GaussNewton(net, X, Y, loss=loss, dtype=np.float32, client="in-process")
    G64, G32 = g64.dense(), g32.dense()
    assert G32.dtype == np.float32
    assert max_relative_error(G32, G64) <= 1e-5
    V = rng.normal(size=(net.n_params, 2))
    assert max_relative_error(g32 @ V, g64 @ V) <= 1e-5
    assert max_relative_error(g32.hvp(V), g64.hvp(V)) <= 1e-5
    assert max_relative_error(g32.diagonal(), g64.diagonal()) <= 1e-5
    assert abs(g32.loss() - g64.loss()) <= 1e-5 * abs(g64.loss())


def test_sharding_does_not_change_results():
    net = random_mlp([4, 6, 3], ["relu", "identity"], seed=5)
    rng = np.random.default_rng(4)
    X, Y = rng.normal(size=(23, 4)), rng.integers(0, 3, 23)
    one = dgnh.GaussNewton(net, X, Y, loss="cross_entropy", client="in-process")
    many = dgnh.GaussNewton(net, X, Y, loss="cross_entropy", shard_size=5, client="in-process")
    assert many.n_shards == 5 and one.n_shards == 1
    assert max_relative_error(many.dense(), one.dense()) <= 1e-13
    assert max_relative_error(many.gradient(), one.gradient()) <= 1e-13


def test_dense_refuses_when_too_large():
    net = random_mlp([4, 6, 3], ["relu", "identity"])
    gn = dgnh.GaussNewton(net, np.ones((3, 4)), np.zeros((3, 3)), client="in-process")
    with pytest.raises(ValueError, match=r"needs 20,808 bytes"):
        gn.dense(max_bytes=1000)


def _bad(**kw):
    net = random_mlp([3, 4, 2], ["tanh", "identity"])
    args = dict(model=net, X=np.ones((5, 3)), Y=np.zeros((5, 2)), loss="mse")
    args.update(kw)
    return args


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(X=np.ones((5, 4))), ValueError, r"shape \(n_samples, 3\)"),
    (dict(X=np.ones((0, 3)), Y=np.zeros((0, 2))), ValueError, "empty"),
    (dict(X=np.full((5, 3), np.nan)), ValueError, "NaN or Inf"),
    (dict(Y=np.zeros((5, 3))), ValueError, r"targets must have shape"),
    (dict(Y=np.full((5, 2), np.inf)), ValueError, "NaN or Inf"),
    (dict(loss="hinge"), ValueError, "unknown loss 'hinge'"),
    (dict(loss="cross_entropy", Y=np.array([0, 1, 2, 0, 1])), ValueError, r"in \[0, 2\)"),
    (dict(loss="cross_entropy", Y=np.array([0, 1, 0.5, 0, 1])), TypeError, "integers"),
    (dict(loss="cross_entropy", Y=np.zeros((5, 2))), ValueError, "class labels of shape"),
    (dict(loss="binary_cross_entropy", Y=np.full((5, 2), 1.5)), ValueError, r"\[0, 1\]"),
    (dict(dtype=np.int32), TypeError, "float64 or float32"),
    (dict(shard_size=0), ValueError, "shard_size"),
    (dict(model="net"), TypeError, "dgnh.MLP"),
])
def test_bad_input_is_named(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        dgnh.GaussNewton(client="in-process", **_bad(**kwargs))


@pytest.mark.parametrize("call, exc, match", [
    (lambda gn: gn.entries([0, 26], [1]), IndexError, "26 is out of range"),
    (lambda gn: gn.entries([-1], [1]), IndexError, "-1 is out of range"),
    (lambda gn: gn.entries([0.5], [1]), TypeError, "integers"),
    (lambda gn: gn.entries([[0]], [1]), ValueError, "1-d"),
    (lambda gn: gn.entries([0], [1], eps=0.0), ValueError, "eps must lie"),
    (lambda gn: gn.entries([0], [1], eps=1.5), ValueError, "eps must lie"),
    (lambda gn: gn.entries([0], [1], eps=0.1, delta=1.0), ValueError, "delta must lie"),
    (lambda gn: gn.column([1, 2]), ValueError, "single integer"),
    (lambda gn: gn.entries([0], [1], eps=0.1, seed=None), ValueError, "seed must be"),
    (lambda gn: gn.entries(np.array([2**64 - 1], dtype=np.uint64), [1]), IndexError,
     "18446744073709551615 is out of range"),
    (lambda gn: gn @ np.ones(5), ValueError, r"cannot multiply an array of shape \(5,\)"),
    (lambda gn: gn @ np.full(26, np.nan), ValueError, "NaN or Inf"),
    (lambda gn: gn.hvp(np.ones((26, 2, 1))), ValueError, "cannot multiply"),
])
def test_bad_requests_are_named(call, exc, match):
    gn = dgnh.GaussNewton(client="in-process", **_bad())
    with pytest.raises(exc, match=match):
        call(gn)


@pytest.mark.parametrize("rows, cols", [([], [1, 2]), ([1, 1, 0], [2, 2]), ([5, 0, 3], []),
                                        ([25, 0, 13, 2], [0, 25, 25])])
def test_unsorted_duplicate_and_empty_indices(rows, cols):
    gn = dgnh.GaussNewton(client="in-process", **_bad(X=np.random.default_rng(0).normal(size=(5, 3))))
    G = gn.dense()
    block = gn.entries(rows, cols)
    assert block.shape == (len(rows), len(cols))
    np.testing.assert_allclose(block, G[np.ix_(rows, cols)], rtol=1e-13, atol=0)


def test_blocks_by_gather_and_by_whole_columns_agree(problem, monkeypatch):
    """Tall, wide and square blocks give the same numbers gathered and taken from whole
    columns Ĵᵀ(Ĵ[:, J]) (the route ShardFactors._column_cheaper picks by cost)."""
    from dgnh.shard_factors import ShardFactors

    net, X, Y, loss, gn = problem
    G = dense_reference(net, X, loss)
    rng = np.random.default_rng(3)
    rows, cols = rng.permutation(net.n_params), rng.integers(0, net.n_params, 3)
    requests = [(rows, cols), (cols, rows), (rows[:5], rows[:5]), (rows[:4], cols), (rows[:0], cols)]
    results = []
    for by_columns in (False, True):
        monkeypatch.setattr(ShardFactors, "_column_cheaper", lambda self, k, m: by_columns)
        results.append(gn.entries_many(requests))
        for (r, c), block in zip(requests, results[-1]):
            assert block.shape == (len(r), len(c))
            assert block.size == 0 or max_relative_error(block, G[np.ix_(r, c)]) <= 1e-6
    for a, b in zip(*results):
        assert a.size == 0 or max_relative_error(a, b) <= 1e-12


def test_use_after_close_is_refused():
    gn = dgnh.GaussNewton(client="in-process", **_bad())
    gn.close()
    with pytest.raises(ValueError, match="closed"):
        gn @ np.ones(gn.n_params)


def test_batched_products_through_the_factors_against_dense(problem):
    """≥ ROP_MAX_VECTORS vectors take the route through the stored factors (one GEMM per
    layer across all vectors), fewer the R-op: both equal the dense G V (from blocks)."""
    from dgnh.shard_factors import ROP_MAX_VECTORS

    net, X, Y, loss, gn = problem
    G = gn.dense()
    V = np.random.default_rng(2).normal(size=(net.n_params, ROP_MAX_VECTORS + 3))
    for k in (1, ROP_MAX_VECTORS - 1, ROP_MAX_VECTORS, V.shape[1]):
        assert max_relative_error(gn @ V[:, :k], G @ V[:, :k]) <= 1e-12
    J = gn.jacobian_matvec(np.eye(net.n_params))
    assert max_relative_error(J.T @ J / gn.n_samples, G) <= 1e-12


@pytest.mark.parametrize("call, exc, match", [
    (lambda gn: gn.entries_many(([0, 5], [7, 8])), ValueError,
     r"requests\[0\] must be a pair \(rows, cols\) of 1-D index arrays, got rows of shape \(\) "
     r"\(for one block pass \[\(rows, cols\)\]\)"),
    (lambda gn: gn.entries_many([([0], [1]), ([0], [1], [2])]), ValueError,
     r"requests\[1\] must be a pair .*, got 3 items"),
    (lambda gn: gn.entries_many([0]), TypeError, r"requests\[0\] must be a pair .*, got int"),
    (lambda gn: gn.entries_many([([1],)]), ValueError,
     r"requests\[0\] must be a pair .*got 1 item$"),
    (lambda gn: gn.entries_many(7), TypeError, r"requests must be a sequence of \(rows, cols\)"),
    (lambda gn: gn.entries_many("rc"), TypeError, r"requests must be a sequence .*got str"),
    (lambda gn: gn.entries_many([([0, [1]], [2])]), ValueError, "got ragged rows"),
    (lambda gn: gn.entries_many([([0], [[1, 2]])]), ValueError, r"got cols of shape \(1, 2\)"),
    (lambda gn: gn.entries_many([([0], [26])]), IndexError, "column index 26 is out of range"),
    (lambda gn: gn.entries([0], [1], delta=-1), ValueError, "delta must lie in the open interval"),
    (lambda gn: gn.entries([0], [1], delta=0), ValueError, "delta must lie in the open interval"),
    (lambda gn: gn.entries_many([([0], [1])], delta="x"), TypeError, "delta must be a number"),
    (lambda gn: gn.entries([0], [1], seed=-3), ValueError, "seed must be a non-negative integer"),
])
def test_malformed_requests_are_named_in_one_line(call, exc, match):
    gn = dgnh.GaussNewton(client="in-process", **_bad())
    with pytest.raises(exc, match=match) as error:
        call(gn)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("make, pairs", [
    (lambda: [([0, 5], [7, 8])], [([0, 5], [7, 8])]),
    (lambda: (([0, 5], [7, 8]),), [([0, 5], [7, 8])]),
    (lambda: [(np.array([3]), np.arange(26)), ([], [2]), (range(4), (25, 0))],
     [([3], list(range(26))), ([], [2]), ([0, 1, 2, 3], [25, 0])]),
    (lambda: iter([([1, 1], [2])]), [([1, 1], [2])]),
])
def test_well_formed_requests_match_the_dense_matrix(make, pairs):
    X = np.random.default_rng(1).normal(size=(5, 3))
    gn = dgnh.GaussNewton(client="in-process", **_bad(X=X))
    G = gn.dense()
    blocks = gn.entries_many(make())
    assert len(blocks) == len(pairs)
    for (rows, cols), block in zip(pairs, blocks):
        assert block.shape == (len(rows), len(cols))
        np.testing.assert_allclose(block, G[np.ix_(rows, cols)], rtol=1e-13, atol=0)
