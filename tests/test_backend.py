"""LocalBackend: shards in this process, one after the other or on a thread pool; the
default ``client=None`` with arrays runs there, also from a plain script without a guard."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from cases import max_relative_error, random_problem
from threadpoolctl import threadpool_info, threadpool_limits

import dgnh
from dgnh.backend import LocalBackend, available_cores, tree_sum


def blas_threads() -> int:
    return min(lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas")


def row_blocks(A: np.ndarray, n_shards: int) -> list[np.ndarray]:
    return np.array_split(A, n_shards, axis=0)


def gram_times(block: np.ndarray, V: np.ndarray) -> np.ndarray:
    return block.T @ (block @ V)


# (n_shards, threads): fewer, as many and more threads than shards, and than cores
BACKEND_CASES = [(1, 1), (1, 3), (3, 1), (3, 2), (3, 3), (7, 2), (7, 4), (16, 8)]


@pytest.mark.parametrize("n_shards, threads", BACKEND_CASES)
def test_map_and_sum_equal_dense_reference(n_shards, threads):
    rng = np.random.default_rng(n_shards + 10 * threads)
    A = rng.normal(size=(200, 30))
    V = rng.normal(size=(30, 4))
    blocks = row_blocks(A, n_shards)
    backend = LocalBackend(threads=threads)
    backend.create_shards([(np.array, (b,)) for b in blocks])
    assert backend.n_shards == n_shards and backend.n_workers == threads
    assert backend.factor_bytes == A.nbytes
    assert max_relative_error(backend.sum(gram_times, (V,)), A.T @ (A @ V)) <= 1e-12
    sums = backend.map(np.ndarray.sum)
    assert sums == [b.sum() for b in blocks]  # shard order, one call per shard
    per_shard = [(float(s),) for s in range(n_shards)]
    assert backend.map(lambda b, s: s, per_shard) == [float(s) for s in range(n_shards)]
    backend.close()
    with pytest.raises(ValueError, match="closed"):
        backend.map(np.ndarray.sum)


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_blas_is_limited_to_its_share_of_the_cores_during_a_batch(threads):
    cores = available_cores()
    with threadpool_limits(limits=cores, user_api="blas"):
        before = blas_threads()
        backend = LocalBackend([np.ones(3)] * 4, threads=threads)
        inside = backend.map(lambda shard: blas_threads())
        expected = before if threads == 1 else min(before, max(1, cores // threads))
        assert inside == [expected] * 4
        assert blas_threads() == before  # restored after the batch
        backend.close()


@pytest.mark.parametrize("threads", [1, 3])
def test_first_error_in_shard_order_is_raised(threads):
    def fail_on_odd(shard):
        if shard % 2:
            raise ValueError(f"shard {shard} failed")
        return shard

    backend = LocalBackend(list(range(6)), threads=threads)
    with pytest.raises(ValueError, match="shard 1 failed"):
        backend.map(fail_on_odd)


@pytest.mark.parametrize("threads", [0, -1, 1.5, "2"])
def test_bad_thread_counts_are_named(threads):
    with pytest.raises((TypeError, ValueError), match="threads must be an integer"):
        LocalBackend(threads=threads)


# ------------------------------------------- the default client with arrays
N_SAMPLES, SHARD_SIZE = 600, 100  # 6 shards
PLAIN_SCRIPT = """\
import sys
import numpy as np
import dgnh

net = dgnh.MLP.load("model.npz")
X, Y, V = np.load("X.npy"), np.load("Y.npy"), np.load("V.npy")
gn = dgnh.GaussNewton(net, X, Y, loss="cross_entropy", shard_size={shard_size})
np.savez("out.npz", backend=type(gn.backend).__name__, n_shards=gn.n_shards,
         n_workers=gn.backend.n_workers, dask_loaded="distributed" in sys.modules,
         dense=gn.dense(), diagonal=gn.diagonal(), matvec=gn @ V, gradient=gn.gradient(),
         loss=gn.loss(), sampled=gn.entries(np.arange(40), np.arange(10, 30), eps=0.3, seed=4))
"""


def test_plain_script_without_main_guard_runs_shards_on_threads(tmp_path):
    """A script without ``if __name__ == "__main__":`` and several shards: no worker
    processes, no Dask; the results are the single-shard ones."""
    net, X, Y = random_problem((6, 16, 5), "cross_entropy", N_SAMPLES, seed=3)
    V = np.random.default_rng(5).normal(size=(net.n_params, 3))
    net.save(tmp_path / "model.npz")
    for name, a in (("X", X), ("Y", Y), ("V", V)):
        np.save(tmp_path / f"{name}.npy", a)
    (tmp_path / "plain.py").write_text(PLAIN_SCRIPT.format(shard_size=SHARD_SIZE))
    run = subprocess.run([sys.executable, "plain.py"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0 and run.stderr == "", run.stderr[-3000:]
    out = np.load(tmp_path / "out.npz")
    assert str(out["backend"]) == "LocalBackend" and int(out["n_shards"]) == 6
    assert int(out["n_workers"]) == min(6, available_cores())
    assert not bool(out["dask_loaded"])

    one = dgnh.GaussNewton(net, X, Y, loss="cross_entropy", client="in-process")
    assert one.n_shards == 1
    expected = {"dense": one.dense(), "diagonal": one.diagonal(), "matvec": one @ V,
                "gradient": one.gradient(), "loss": one.loss()}
    for name, want in expected.items():
        assert max_relative_error(out[name], want) <= 1e-12, name
    same_shards = dgnh.GaussNewton(net, X, Y, loss="cross_entropy", shard_size=SHARD_SIZE,
                                   client="in-process")  # sampling depends on the shards
    sampled = same_shards.entries(np.arange(40), np.arange(10, 30), eps=0.3, seed=4)
    assert max_relative_error(out["sampled"], sampled) <= 1e-12


@pytest.mark.parametrize("client, n_samples, threads", [
    (None, 90, min(3, available_cores())),  # arrays: a thread per core, at most one per shard
    (None, 25, 1),  # one shard
    ("in-process", 90, 1),  # one shard after the other
])
def test_in_process_backends(client, n_samples, threads):
    net, X, Y = random_problem((4, 6, 3), "mse", n_samples, seed=1)
    with dgnh.GaussNewton(net, X, Y, shard_size=30, client=client) as gn:
        assert isinstance(gn.backend, LocalBackend) and gn.backend.n_workers == threads
        reference = dgnh.GaussNewton(net, X, Y, client="in-process")
        assert max_relative_error(gn.dense(), reference.dense()) <= 1e-12



def _add(*xs):
    total = xs[0]
    for x in xs[1:]:
        total = total + x
    return total


# n partials -> the order DaskBackend's reduction tree adds them in (4 per node, by level)
TREE_ORDERS = {
    1: lambda p: p[0],
    4: lambda p: _add(*p),
    6: lambda p: _add(_add(*p[:4]), _add(*p[4:])),
    9: lambda p: _add(_add(*p[:4]), _add(*p[4:8]), p[8]),
    17: lambda p: _add(_add(*(_add(*p[i:i + 4]) for i in range(0, 16, 4))), p[16]),
}


@pytest.mark.parametrize("n", TREE_ORDERS)
def test_tree_sum_adds_in_the_cluster_tree_order(n):
    rng = np.random.default_rng(n)
    parts = [rng.normal(size=3) * 10.0 ** rng.integers(-8, 17) for _ in range(n)]
    expected = TREE_ORDERS[n](parts)
    assert np.array_equal(tree_sum(parts), expected)
    lists = tree_sum([[p, 2 * p] for p in parts])  # lists add elementwise
    assert np.array_equal(lists[0], expected) and np.array_equal(lists[1], 2 * expected)
    backend = LocalBackend([np.array(p) for p in parts], threads=2)
    assert np.array_equal(backend.sum(np.ndarray.copy), expected)
