"""GaussNewton on real Dask clusters against the in-process path.

Clusters (module-scoped, on 127.0.0.1, one thread per worker):

* ``local2``: a process-based ``LocalCluster`` with 2 workers;
* ``cli2``: a ``dask scheduler`` and two ``dask worker`` processes started here;
* ``tls1``: a TLS ``LocalCluster`` (``Security.temporary()``) with 1 worker.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import dask
import numpy as np
import pytest
from distributed import Client, LocalCluster, get_task_stream
from distributed.deploy.utils import nprocesses_nthreads
from distributed.security import Security

import dgnh
from cases import free_port, max_relative_error, random_problem
from dgnh.backend import LocalBackend
from dgnh.cluster import MallocTuning
from dgnh.config import set_malloc_thresholds

REPO = Path(__file__).resolve().parents[1]
N_SAMPLES, SHARD_SIZE = 90, 20  # 5 shards
N_SHARDS = -(-N_SAMPLES // SHARD_SIZE)
LOSSES = ["mse", "cross_entropy", "binary_cross_entropy"]


# ------------------------------------------------------------------ clusters
@pytest.fixture(scope="module")
def local2():
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=":0") as cluster, \
            Client(cluster, set_as_default=False) as client:
        yield client


@pytest.fixture(scope="module")
def tls1():
    security = Security.temporary()
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, security=security,
                      dashboard_address=":0") as cluster:
        yield cluster.scheduler_address, security


@pytest.fixture(scope="module")
def cli2(tmp_path_factory):
    """A real ``dask scheduler`` and two ``dask worker`` processes, stopped at the end."""
    tmp = tmp_path_factory.mktemp("cli")
    scheduler_file = tmp / "scheduler.json"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    dask_cli = [sys.executable, "-m", "dask"]
    procs = [subprocess.Popen(dask_cli + ["scheduler", "--host", "127.0.0.1", "--port", "0",
                                          "--no-dashboard", "--scheduler-file",
                                          str(scheduler_file)],
                              cwd=tmp, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)]
    try:
        deadline = time.monotonic() + 60
        while not scheduler_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        procs += [subprocess.Popen(dask_cli + ["worker", "--scheduler-file", str(scheduler_file),
                                               "--host", "127.0.0.1", "--nthreads", "1",
                                               "--no-dashboard", "--name", f"w{i}"],
                                   cwd=tmp, env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
                  for i in range(2)]
        time.sleep(0.2)  # the scheduler writes the file just before listening
        address = json.loads(scheduler_file.read_text())["address"]
        with Client(address, set_as_default=False) as client:
            client.wait_for_workers(2, timeout=60)
            yield client
            client.shutdown()  # scheduler and workers exit
    finally:
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)  # no-op after a clean shutdown
        for p in reversed(procs):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.fixture
def connect_timeout_2s():
    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}):
        yield


def cluster_client(request, name):
    """The ``client`` and ``security`` arguments for a cluster fixture by name."""
    value = request.getfixturevalue(name)
    return value if name == "tls1" else (value, None)


# ------------------------------------------------------------------ problems
def make_problem(loss, n_samples=N_SAMPLES, sizes=(5, 7, 3), seed=0):
    """``(net, X, Y)`` with this file's default size."""
    return random_problem(sizes, loss, n_samples, seed)


@pytest.fixture(scope="module", params=LOSSES)
def problem(request, tmp_path_factory):
    """(loss, net, X, Y, dataset path, in-process reference GaussNewton)."""
    loss = request.param
    net, X, Y = make_problem(loss)
    path = tmp_path_factory.mktemp("data") / f"{loss}.zarr"
    dgnh.save_dataset(path, X, Y, chunk_rows=SHARD_SIZE)
    reference = dgnh.GaussNewton(net, X, Y, loss=loss, shard_size=SHARD_SIZE,
                                 client="in-process")
    return loss, net, X, Y, path, reference


ROWS = np.array([0, 3, 11, 40, 2])
COLS = np.array([5, 1, 20, 33])
REQUESTS = [(ROWS, COLS), (COLS, ROWS), (np.arange(10), [7]), ([12], [12])]


def all_results(gn, V, sampled_seed=3):
    """Every operation of GaussNewton, in one dict."""
    return {
        "dense": gn.dense(),
        "entries": gn.entries(ROWS, COLS),
        "entries_many": gn.entries_many(REQUESTS),
        "sampled": gn.entries_many(REQUESTS, eps=0.5, delta=0.1, seed=sampled_seed),
        "diagonal": gn.diagonal(),
        "column": gn.column(17),
        "matvec": gn @ V,
        "hvp": gn.hvp(V),
        "loss": gn.loss(),
        "gradient": gn.gradient(),
    }


# --------------------------------------------------- equality with in-process
@pytest.mark.parametrize("cluster", ["local2", "cli2", "tls1"])
@pytest.mark.parametrize("source", ["arrays", "store"])
def test_cluster_equals_in_process(request, problem, cluster, source):
    loss, net, X, Y, path, reference = problem
    client, security = cluster_client(request, cluster)
    data = (X, Y) if source == "arrays" else (path, None)
    V = np.random.default_rng(1).normal(size=(net.n_params, 3))
    expected = all_results(reference, V)
    with dgnh.GaussNewton(net, *data, loss=loss, shard_size=SHARD_SIZE, client=client,
                          security=security) as gn:
        assert gn.n_shards == N_SHARDS and gn.n_samples == N_SAMPLES
        got = all_results(gn, V)
    for name, want in expected.items():
        if isinstance(want, list):
            for g, w in zip(got[name], want):
                assert max_relative_error(g, w) <= 1e-12, name
        else:
            assert max_relative_error(got[name], want) <= 1e-12, name


def test_sampled_identical_for_1_and_2_workers(request):
    """Sampled blocks with one seed are bit-identical on 1 and 2 workers."""
    net, X, Y = make_problem("mse", n_samples=200)
    out = []
    for name in ["tls1", "local2"]:
        client, security = cluster_client(request, name)
        with dgnh.GaussNewton(net, X, Y, shard_size=30, client=client,
                              security=security) as gn:
            assert gn.backend.n_workers == (1 if name == "tls1" else 2)
            out.append(gn.entries_many(REQUESTS, eps=0.3, delta=0.05, seed=11))
    for a, b in zip(*out):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("method", ["hmatrix", "lowrank", "hybrid"])
def test_compress_identical_for_1_and_2_workers(request, method):
    """The compressed operator is the same on 1 worker, 2 workers and in process."""
    net, X, Y = make_problem("cross_entropy", n_samples=200)
    V = np.random.default_rng(0).normal(size=(net.n_params, 3))
    out = []
    for name in ["tls1", "local2", None]:
        client, security = cluster_client(request, name) if name else ("in-process", None)
        with dgnh.GaussNewton(net, X, Y, loss="cross_entropy", shard_size=30, client=client,
                              security=security) as gn:
            H = dgnh.compress(gn, method=method, tol=1e-4, max_rank=16, leaf_size=16,
                              seed=5, progress=False)
            out.append(H @ V)
    assert (max_relative_error(out[0], out[2]) <= 1e-12
            and max_relative_error(out[1], out[2]) <= 1e-12)


# -------------------------------------------------------- tasks per batch
def batch_keys(client, call):
    with get_task_stream(client) as ts:
        call()
    return [d["key"] for d in ts.data]


def prefix_count(keys, prefix):
    return sum(k.startswith(prefix) for k in keys)


@pytest.mark.parametrize("n_blocks", [1, 40])
def test_tasks_per_batch_are_O_shards(local2, n_blocks):
    net, X, Y = make_problem("mse", n_samples=160)
    rng = np.random.default_rng(0)
    requests = [(rng.integers(0, net.n_params, 6), rng.integers(0, net.n_params, 4))
                for _ in range(n_blocks)]
    with dgnh.GaussNewton(net, X, Y, shard_size=10, client=local2) as gn:  # 16 shards
        s = gn.n_shards
        tree = 4 + 1  # reduction tasks for 16 shards, 4 partials per task
        exact = batch_keys(local2, lambda: gn.entries_many(requests))
        assert prefix_count(exact, "dgnh-evaluate-") == s
        assert prefix_count(exact, "dgnh-sum-") == tree and len(exact) == s + tree
        sampled = batch_keys(local2, lambda: gn.entries_many(requests, eps=0.5, seed=1))
        assert prefix_count(sampled, "dgnh-sq_norm_sums-") == s
        assert prefix_count(sampled, "dgnh-evaluate-") == s and len(sampled) == 2 * s + tree
        big = np.ones((net.n_params, 4000))  # > 1 MiB: sent once as an argument task
        products = batch_keys(local2, lambda: gn @ big)
        assert prefix_count(products, "dgnh-args-") == 1 and len(products) == s + tree + 1


# ----------------------------------------------------- default local cluster
def test_default_client_starts_and_closes_a_local_cluster(tmp_path):
    """With client=None a dataset store of several shards goes to a local cluster (arrays
    stay in this process on threads: tests/test_backend.py)."""
    net, X, Y = make_problem("mse", n_samples=40)
    path = tmp_path / "data.zarr"
    dgnh.save_dataset(path, X, Y, chunk_rows=10)
    reference = dgnh.GaussNewton(net, X, Y, shard_size=10, client="in-process")
    with dgnh.GaussNewton(net, path, shard_size=10) as gn:
        backend = gn.backend
        assert backend.n_workers == nprocesses_nthreads()[0]
        plugins = backend.client.run(lambda dask_worker: sorted(dask_worker.plugins))
        assert all(MallocTuning.name in p for p in plugins.values())
        assert max_relative_error(gn.dense(), reference.dense()) <= 1e-12
    assert backend.client.status == "closed"
    single = dgnh.GaussNewton(net, path)  # one shard: no cluster
    assert isinstance(single.backend, LocalBackend)
    assert max_relative_error(single.dense(), reference.dense()) <= 1e-12


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_malloc_thresholds_are_set_on_glibc():
    assert set_malloc_thresholds()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
@pytest.mark.parametrize("env, expected", [("1", "True False"), ("0", "False False")])
def test_allocator_tuned_once_per_process_unless_disabled(env, expected):
    """A fresh process: the first call tunes glibc, the second does nothing;
    DGNH_ALLOCATOR_TUNING=0 leaves it alone."""
    code = "from dgnh.config import tune_allocator as t; print(t(), t())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "DGNH_ALLOCATOR_TUNING": env}, timeout=60)
    assert out.stdout.split() == expected.split(), out.stderr


# ----------------------------------------------------------------- TLS
def test_tls_with_file_paths(tls1, tmp_path):
    address, security = tls1
    files = {}
    for name in ("tls_ca_file", "tls_client_cert", "tls_client_key"):
        files[name] = str(tmp_path / f"{name}.pem")
        Path(files[name]).write_text(getattr(security, name))
    net, X, Y = make_problem("mse")
    reference = dgnh.GaussNewton(net, X, Y, shard_size=SHARD_SIZE, client="in-process")
    for creds in (files, tuple(files.values())):
        with dgnh.GaussNewton(net, X, Y, shard_size=SHARD_SIZE, client=address,
                              security=creds) as gn:
            assert max_relative_error(gn.diagonal(), reference.diagonal()) <= 1e-12


@pytest.mark.parametrize("how, exc, match", [
    ("other CA", ConnectionError, "cannot connect to the Dask scheduler at tls://"),
    ("plain tcp", ConnectionError, "cannot connect to the Dask scheduler at tcp://"),
    ("no credentials", ValueError, "uses TLS: pass security="),
])
def test_tls_refuses_clients_without_credentials(tls1, connect_timeout_2s, how, exc, match):
    address, _ = tls1
    net, X, Y = make_problem("mse")
    client, security = {"other CA": (address, Security.temporary()),
                        "plain tcp": (address.replace("tls://", "tcp://"), None),
                        "no credentials": (address, None)}[how]
    start = time.monotonic()
    with pytest.raises(exc, match=match):
        dgnh.GaussNewton(net, X, Y, shard_size=SHARD_SIZE, client=client, security=security)
    assert time.monotonic() - start < 10


# ------------------------------------------------------------- bad input
def test_unreachable_address_fails_fast(connect_timeout_2s):
    net, X, Y = make_problem("mse")
    address = f"tcp://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(ConnectionError, match=f"scheduler at {address} within 2 s"):
        dgnh.GaussNewton(net, X, Y, shard_size=SHARD_SIZE, client=address)
    assert time.monotonic() - start < 10


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(client="localhost"), ValueError, "scheduler address such as 'tcp://"),
    (dict(client=42), TypeError, "client must be None"),
    (dict(security=("ca.pem", "cert.pem")), ValueError, "security applies when client is a"),
    (dict(client="in-process", security={"tls_ca_file": "x"}), ValueError, "security applies"),
    (dict(client="tls://127.0.0.1:1", security={"tls_ca_file": "/nonexistent/ca.pem"}),
     FileNotFoundError, "tls_ca_file file /nonexistent/ca.pem does not exist"),
    (dict(client="tls://127.0.0.1:1", security={"ca": "x"}), ValueError, r"unknown keys \['ca'\]"),
    (dict(client="tls://127.0.0.1:1", security=5), TypeError, "security must be"),
    (dict(shard_size=0), ValueError, "shard_size must be a positive integer"),
    (dict(shard_size=-4), ValueError, "shard_size must be a positive integer"),
    (dict(shard_size=2.5), TypeError, "shard_size must be a positive integer"),
])
def test_bad_cluster_arguments(kwargs, exc, match):
    net, X, Y = make_problem("mse")
    with pytest.raises(exc, match=match):
        dgnh.GaussNewton(net, X, Y, **kwargs)


def test_use_after_close_is_refused(local2):
    net, X, Y = make_problem("mse", n_samples=60)
    gn = dgnh.GaussNewton(net, X, Y, shard_size=20, client=local2)
    gn.close()
    with pytest.raises(ValueError, match="closed"):
        gn.entries([0], [1])


def test_client_object_refuses_security(local2):
    net, X, Y = make_problem("mse")
    with pytest.raises(ValueError, match="a Client carries its own"):
        dgnh.GaussNewton(net, X, Y, shard_size=SHARD_SIZE, client=local2,
                         security=Security.temporary())


def test_missing_store_on_cluster_is_named(local2, tmp_path):
    net, _, _ = make_problem("mse")
    path = tmp_path / "absent.zarr"
    with pytest.raises(FileNotFoundError, match=f"dataset store {path} does not exist"):
        dgnh.GaussNewton(net, path, shard_size=SHARD_SIZE, client=local2)


# --------------------------------------------------- a worker killed mid-batch
@pytest.mark.parametrize("source", ["store", "arrays"])
def test_worker_killed_mid_batch_recomputes_shards(cli2, tmp_path, source):
    """SIGKILL a worker while it evaluates a batch: the batch still returns the
    exact result, and the task stream shows shards rebuilt (from the store, or
    from the rows kept in the task spec)."""
    net, X, Y = make_problem("mse", n_samples=2400, sizes=(8, 24, 24, 4))
    path = tmp_path / "big.zarr"
    dgnh.save_dataset(path, X, Y, chunk_rows=300)
    reference = dgnh.GaussNewton(net, X, Y, shard_size=300, client="in-process")
    expected = reference.dense()
    cli2.wait_for_workers(2, timeout=60)  # a worker killed before has been restarted
    pids = cli2.run(os.getpid)
    data = (path, None) if source == "store" else (X, Y)
    with dgnh.GaussNewton(net, *data, shard_size=300, client=cli2) as gn:
        with get_task_stream(cli2) as stream:
            result = {}
            batch = threading.Thread(target=lambda: result.setdefault("G", gn.dense()))
            batch.start()
            victim = None
            while victim is None and batch.is_alive():
                busy = [w for w, keys in cli2.processing().items()
                        if any(k.startswith("dgnh-evaluate-") for k in keys)]
                victim = busy[0] if busy else None
                time.sleep(0.005)
            assert victim is not None, "the batch ended before a worker could be killed"
            os.kill(pids[victim], signal.SIGKILL)
            batch.join(timeout=120)
        assert not batch.is_alive()
        assert max_relative_error(result["G"], expected) <= 1e-12
        rebuilt = [d["key"] for d in stream.data if d["key"].startswith("dgnh-shard-")]
        assert rebuilt, "no shard was recomputed"
        # later batches use the rebuilt shards
        assert max_relative_error(gn.diagonal(), reference.diagonal()) <= 1e-12


# ------------------------------------------------ scripts without a main guard
STORE_SCRIPT = """\
import numpy as np
import dgnh

net = dgnh.MLP.load("model.npz")
{call}
"""
UNGUARDED = "gn = dgnh.GaussNewton(net, 'data.zarr', shard_size={shard_size})"
GUARDED = """\
def main():
    with dgnh.GaussNewton(net, "data.zarr", shard_size={shard_size}) as gn:
        print(type(gn.backend).__name__, gn.n_shards)
        np.save("dense.npy", gn.dense())


if __name__ == "__main__":
    main()"""


@pytest.fixture
def store_script(tmp_path):
    """Write ``model.npz``, ``data.zarr`` (5 shards) and a script; returns a runner."""
    net, X, Y = make_problem("mse")
    net.save(tmp_path / "model.npz")
    dgnh.save_dataset(tmp_path / "data.zarr", X, Y, chunk_rows=SHARD_SIZE)

    def run(call):
        (tmp_path / "script.py").write_text(
            STORE_SCRIPT.format(call=call.format(shard_size=SHARD_SIZE)))
        return subprocess.run([sys.executable, "script.py"], cwd=tmp_path, capture_output=True,
                              text=True, timeout=300)
    return run, net, X, Y, tmp_path


def test_unguarded_script_with_a_store_is_refused_in_one_line(store_script):
    """A dataset store with client=None starts worker processes, which re-run the script:
    from the script's top level without a guard that is refused before any process starts."""
    run, *_, tmp_path = store_script
    out = run(UNGUARDED)
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last == (f"RuntimeError: {tmp_path / 'script.py'}, line 5: dgnh starts a local Dask "
                    "cluster here, whose worker processes re-run this script: put the script's "
                    "top-level code under `if __name__ == \"__main__\":` (or pass "
                    "client=\"in-process\")")
    assert "Nanny" not in out.stderr and out.stderr.count("Traceback") == 1


def test_guarded_script_with_a_store_runs_on_a_local_cluster(store_script):
    run, net, X, Y, tmp_path = store_script
    out = run(GUARDED)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["DaskBackend", str(N_SHARDS)]
    reference = dgnh.GaussNewton(net, X, Y, client="in-process")
    assert max_relative_error(np.load(tmp_path / "dense.npy"), reference.dense()) <= 1e-12


# ----------------------------------------------------- TLS credentials, refusals
def write_tls_files(security, directory):
    files = {}
    for name in ("tls_ca_file", "tls_client_cert", "tls_client_key"):
        files[name] = str(directory / f"{name}.pem")
        Path(files[name]).write_text(getattr(security, name))
    return files


@pytest.mark.parametrize("keys, match", [
    (["tls_ca_file"], r"a TLS client needs tls_ca_file and tls_client_cert .*; got only "
                      r"tls_ca_file$"),
    (["tls_client_cert", "tls_client_key"], "got only tls_client_cert, tls_client_key$"),
    (["tls_ca_file", "tls_client_cert"], r"cannot load the TLS files \['tls_ca_file', "
                                         r"'tls_client_cert'\]"),
    (["tls_ca_file", "garbage cert", "tls_client_key"], "cannot load the TLS files"),
])
def test_incomplete_tls_credentials_are_named(tmp_path, keys, match):
    files = write_tls_files(Security.temporary(), tmp_path)
    (tmp_path / "garbage.pem").write_text("not a certificate\n")
    creds = {("tls_client_cert" if k == "garbage cert" else k):
             (str(tmp_path / "garbage.pem") if k == "garbage cert" else files[k]) for k in keys}
    net, X, Y = make_problem("mse")
    with pytest.raises(ValueError, match=match) as error:
        dgnh.GaussNewton(net, X, Y, client="tls://127.0.0.1:1", security=creds)
    assert str(error.value).startswith("security: ") and "\n" not in str(error.value)


CA_ONLY_SCRIPT = """\
import sys
import numpy as np
import dgnh

net = dgnh.MLP([np.ones((2, 3))], None, ["tanh"])
try:
    dgnh.GaussNewton(net, np.ones((4, 3)), np.ones((4, 2)), client=sys.argv[1],
                     security={{"tls_ca_file": {ca!r}}})
except ValueError as e:
    print(e)
"""


def test_tls_with_only_a_ca_file_fails_at_once_and_exits(tls1, tmp_path):
    """Dask alone fails with a message about ``ssl_context`` and stalls 60 s at exit."""
    address, security = tls1
    files = write_tls_files(security, tmp_path)
    (tmp_path / "ca_only.py").write_text(CA_ONLY_SCRIPT.format(ca=files["tls_ca_file"]))
    out = subprocess.run([sys.executable, "ca_only.py", address], cwd=tmp_path,
                         capture_output=True, text=True, timeout=40)
    assert out.returncode == 0 and out.stderr == "", out.stderr[-3000:]
    assert out.stdout.startswith("security: a TLS client needs tls_ca_file and tls_client_cert")


@pytest.mark.parametrize("how", ["other CA", "plain tcp"])
def test_a_quick_refusal_says_so(tls1, how):
    """A refusal that took no time is not reported as a timeout."""
    address, _ = tls1
    net, X, Y = make_problem("mse")
    client, security = {"other CA": (address, Security.temporary()),
                        "plain tcp": (address.replace("tls://", "tcp://"), None)}[how]
    with pytest.raises(ConnectionError, match=r"cannot connect to the Dask scheduler at "
                                              r"\S+: refused after \d+\.\d s") as error:
        dgnh.GaussNewton(net, X, Y, shard_size=SHARD_SIZE, client=client, security=security)
    assert "within" not in str(error.value)


@pytest.mark.parametrize("client", ["in-process", None])
def test_in_process_results_are_bit_identical_to_the_cluster(local2, client):
    """LocalBackend (one thread, or a thread pool) adds the shards' partial sums by the
    cluster's reduction tree: the same bits as on a cluster."""
    net, X, Y = make_problem("binary_cross_entropy")
    V = np.random.default_rng(3).normal(size=(net.n_params, 4))
    with dgnh.GaussNewton(net, X, Y, loss="binary_cross_entropy", shard_size=13,
                          client=local2) as remote:
        assert remote.n_shards == 7
        expected = all_results(remote, V)
    local = dgnh.GaussNewton(net, X, Y, loss="binary_cross_entropy", shard_size=13, client=client)
    for name, got in all_results(local, V).items():
        want = expected[name]
        assert all(np.array_equal(g, w) for g, w in zip(got, want)) \
            if isinstance(want, list) else np.array_equal(got, want), name
