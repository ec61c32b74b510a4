"""The dgnh command line: real processes, a real Dask cluster, kill and resume, errors."""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr
from cases import free_port, toml_text, write_problem
from distributed import Client

import dgnh
from dgnh import store
from dgnh.cli import main
from dgnh.compress import compress
from dgnh.demo import run_demo
from dgnh.job import load_job

N_SAMPLES = 400
JOB = {"model": "model.npz", "data": "data.zarr", "loss": "cross_entropy",
       "output": "out.zarr", "shard_size": N_SAMPLES // 2,
       "compress": {"method": "hybrid", "tol": 1e-4, "max_rank": 16, "leaf_size": 16},
       "factorize": {"relative_reg": 0.1}}


def dgnh_cli(*args, timeout=300, **kw):
    return subprocess.run([sys.executable, "-m", "dgnh.cli", *args], capture_output=True,
                          text=True, timeout=timeout, **kw)


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory):
    """A ``dask scheduler`` and one ``dask worker`` (no nanny: the worker is this process)."""
    dask = shutil.which("dask", path=os.path.dirname(sys.executable)) or shutil.which("dask")
    assert dask, "the dask console command is missing"
    logs = tmp_path_factory.mktemp("dask-logs")
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    with open(logs / "scheduler.log", "w") as s_log, open(logs / "worker.log", "w") as w_log:
        scheduler = subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port",
                                      str(port), "--no-dashboard"], stdout=s_log,
                                     stderr=subprocess.STDOUT)
        worker = subprocess.Popen([dask, "worker", address, "--nthreads", "1", "--no-nanny",
                                   "--no-dashboard", "--memory-limit", "0"], stdout=w_log,
                                  stderr=subprocess.STDOUT)
        try:
            with Client(address, timeout=60, set_as_default=False) as client:
                client.wait_for_workers(1, timeout=60)
            yield address, worker
        finally:
            stop(worker)
            stop(scheduler)


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
    return write_problem(tmp_path_factory.mktemp("cli"), (6, 20, 4), N_SAMPLES, seed=1,
                         chunk_rows=N_SAMPLES // 4)


def write_job(problem, output: str, name: str) -> str:
    path = problem["dir"] / name
    path.write_text(toml_text({**JOB, "output": output}))
    return str(path)


def operator_arrays(path) -> dict[str, np.ndarray]:
    def walk(group, prefix=""):
        for name, arr in group.arrays():
            yield prefix + name, arr[...]
        for name, sub in group.groups():
            yield from walk(sub, f"{prefix}{name}/")
    return dict(walk(zarr.open_group(path, mode="r")["operator"]))


def test_run_on_a_dask_cluster_killed_and_resumed(problem, dask_cluster):
    """`dgnh run --scheduler` on real scheduler/worker processes; kill -9 and run again."""
    address, worker = dask_cluster
    reference = problem["dir"] / "reference.zarr"
    done = dgnh_cli("run", write_job(problem, str(reference), "reference.toml"),
                    "--scheduler", address)
    assert done.returncode == 0, done.stderr
    assert f"2 shards on {address}" in done.stdout
    ref_attrs = dict(zarr.open_group(reference, mode="r").attrs)
    assert ref_attrs["run"]["scheduler"] == address and ref_attrs["run"]["n_shards"] == 2
    total = ref_attrs["run"]["checkpoint"]

    # the same job into another output: kill it once its first tree level is stored
    output = problem["dir"] / "resumed.zarr"
    job = write_job(problem, str(output), "job.toml")
    run = subprocess.Popen([sys.executable, "-m", "dgnh.cli", "run", job, "--scheduler",
                            address], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while store.checkpoint_rounds(output) < 1:
        assert run.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    os.kill(worker.pid, signal.SIGSTOP)  # freeze the cluster so the job cannot finish
    try:
        run.kill()
        run.wait()
    finally:
        os.kill(worker.pid, signal.SIGCONT)
    stored = store.checkpoint_rounds(output)
    assert 1 <= stored < total["rounds"]
    with pytest.raises(ValueError, match="incomplete"):
        dgnh.open(output)

    again = dgnh_cli("run", job, "--scheduler", address)
    assert again.returncode == 0, again.stderr
    assert f"resuming: {stored} entry rounds stored" in again.stdout
    ck = zarr.open_group(output, mode="r").attrs["run"]["checkpoint"]
    assert ck["rounds_loaded"] == stored and ck["diagonal_loaded"] is True
    assert ck["entries_loaded"] > 0
    assert ck["entries_evaluated"] + ck["entries_loaded"] == total["entries_evaluated"]

    ref, res = operator_arrays(reference), operator_arrays(output)
    assert sorted(ref) == sorted(res)
    for name in ref:
        assert np.array_equal(ref[name], res[name]), name
    fac_ref, fac_res = store.read_factorization(reference), store.read_factorization(output)
    assert fac_ref["logdet"] == fac_res["logdet"]
    assert dgnh.open(output).report["error_estimate"] == \
        dgnh.open(reference).report["error_estimate"]

    # and the cluster's result is the in-process one, to rounding
    with dgnh.GaussNewton(problem["net"], problem["X"], problem["Y"], loss="cross_entropy",
                          client="in-process", shard_size=N_SAMPLES // 2) as gn:
        direct = compress(gn, **load_job(job).compress, progress=False)
    v = np.random.default_rng(2).normal(size=gn.n_params)
    np.testing.assert_allclose(dgnh.open(output) @ v, direct @ v, rtol=1e-9, atol=1e-12)


@pytest.fixture(scope="module")
def result(problem, tmp_path_factory):
    """A stored H-matrix result (run in this process, one shard)."""
    d = tmp_path_factory.mktemp("result")
    with dgnh.GaussNewton(problem["net"], problem["X"], problem["Y"], loss="cross_entropy",
                          client="in-process") as gn:
        op = compress(gn, method="hmatrix", tol=1e-6, max_rank=48, leaf_size=16,
                      progress=False)
    path = str(d / "h.zarr")
    reg = 0.05 * op.report["norm_estimate"]
    store.save(op, path, factorization=op.factorize(reg))
    return {"path": path, "op": op, "dir": d, "reg": reg}


def test_info(result, capsys):
    assert main(["info", result["path"]]) == 0
    text = capsys.readouterr().out
    assert "hmatrix" in text and f"N = {result['op'].shape[0]}" in text
    assert "error" in text and "factorization" in text


def test_solve_matches_dense(result, capsys):
    op = result["op"]
    rng = np.random.default_rng(4)
    for shape, name in (((op.shape[0],), "b1"), ((op.shape[0], 3), "b3")):
        b = rng.normal(size=shape)
        np.save(result["dir"] / f"{name}.npy", b)
        x_path = str(result["dir"] / f"x-{name}.npy")
        assert main(["solve", result["path"], "--rhs", str(result["dir"] / f"{name}.npy"),
                     "--reg", repr(result["reg"]), "-o", x_path]) == 0
        assert "direct solve" in capsys.readouterr().out
        reference = np.linalg.solve(op.to_dense() + result["reg"] * np.eye(op.shape[0]), b)
        np.testing.assert_allclose(np.load(x_path), reference, rtol=1e-8, atol=1e-10)


def test_solve_with_a_near_field_runs_cg(problem, tmp_path, capsys):
    """The HSS factorization of an H-matrix with a near field only preconditions CG."""
    with dgnh.GaussNewton(problem["net"], problem["X"], problem["Y"], loss="cross_entropy",
                          client="in-process") as gn:
        op = compress(gn, method="hmatrix", tol=1e-8, max_rank=64, leaf_size=16, budget=0.2,
                      progress=False)
    assert not op.is_hss
    dgnh.save(op, tmp_path / "near.zarr")
    b = np.random.default_rng(5).normal(size=op.shape[0])
    np.save(tmp_path / "b.npy", b)
    reg = 0.05 * op.report["norm_estimate"]
    assert main(["solve", str(tmp_path / "near.zarr"), "--rhs", str(tmp_path / "b.npy"),
                 "--reg", repr(reg), "-o", str(tmp_path / "x.npy")]) == 0
    assert "CG preconditioned by its HSS factorization" in capsys.readouterr().out
    reference = np.linalg.solve(op.to_dense() + reg * np.eye(op.shape[0]), b)
    np.testing.assert_allclose(np.load(tmp_path / "x.npy"), reference, rtol=1e-6, atol=1e-9)


def test_eig_matches_dense(result, capsys):
    assert main(["eig", result["path"], "-k", "5"]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    printed = np.array([float(line.split()[1]) for line in lines])
    reference = np.linalg.eigvalsh(result["op"].to_dense())[::-1][:5]
    np.testing.assert_allclose(printed, reference, rtol=1e-8)


@pytest.mark.parametrize("panels", ["both", "structure", "spectrum"])
def test_plot_writes_a_png(result, panels, capsys):
    png = str(result["dir"] / f"{panels}.png")
    assert main(["plot", result["path"], "-o", png, "--panels", panels, "-k", "8"]) == 0
    assert png in capsys.readouterr().out
    with open(png, "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(png) > 10_000


CLI_ERRORS = [
    (["info", "{dir}/absent.zarr"], "info", "does not exist"),
    (["info", "{dir}/b1.npy"], "info", "is not a Zarr v3 group"),
    (["run", "{dir}/absent.toml"], "run", "job file .*absent.toml does not exist"),
    (["solve", "{path}", "--rhs", "{dir}/wrong.npy", "--reg", "0.1", "-o", "{dir}/x9.npy"],
     "solve", r"cannot multiply an array of shape \(3,\)"),
    (["solve", "{path}", "--rhs", "{dir}/b1.npy", "--reg", "0", "-o", "{dir}/x9.npy"],
     "solve", "reg must be a finite number > 0"),
    (["solve", "{path}", "--rhs", "{dir}/b1.npy", "--reg", "0.1", "-o", "{dir}/b1.npy"],
     "solve", "already exists: pass overwrite=True"),
    (["eig", "{path}", "-k", "100000"], "eig", "k must be in"),
    (["plot", "{path}", "-o", "{dir}/both.png"], "plot", "already exists"),
]


@pytest.mark.parametrize("argv, command, message", CLI_ERRORS)
def test_errors_are_one_line_on_stderr(result, argv, command, message, capsys):
    np.save(result["dir"] / "wrong.npy", np.ones(3))
    np.save(result["dir"] / "b1.npy", np.ones(result["op"].shape[0]))
    (result["dir"] / "both.png").write_bytes(b"mine")
    argv = [a.format(dir=result["dir"], path=result["path"]) for a in argv]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"dgnh {command}: error: ")
    assert re.search(message, err), err
    with pytest.raises(Exception):
        main(["--debug"] + argv)  # --debug lets the exception (and its traceback) through


@pytest.mark.parametrize("argv, message", [
    (["solve", "x.zarr"], "dgnh solve: error: the following arguments are required: --rhs"),
    (["eig", "x.zarr", "-k", "many"], "dgnh eig: error: argument -k: invalid int value"),
    (["frobnicate"], "dgnh: error: argument COMMAND: invalid choice: 'frobnicate'"),
])
def test_usage_errors_are_one_line_too(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and err.startswith(message)


def test_error_in_a_real_process_has_no_traceback(result):
    out = dgnh_cli("info", str(result["dir"] / "absent.zarr"))
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    out = dgnh_cli("--debug", "info", str(result["dir"] / "absent.zarr"))
    assert out.returncode == 1 and "Traceback" in out.stderr


def test_run_refuses_an_existing_result_without_overwrite(problem, result):
    job = write_job(problem, result["path"], "onto-result.toml")
    out = dgnh_cli("run", job)
    assert out.returncode == 1 and out.stderr.count("\n") == 1
    assert "already holds a complete result: pass --overwrite" in out.stderr
    assert type(dgnh.open(result["path"])).__name__ == "HMatrix"


def test_demo_writes_store_and_pictures(tmp_path):
    """The demo, small (the full-size one is `dgnh demo`): LocalCluster, store, PNGs."""
    out = io.StringIO()
    paths = run_demo(tmp_path / "demo", hidden=4, max_iter=50, max_rank=24, leaf_size=24,
                     progress=False, stream=out)
    text = out.getvalue()
    for name, path in paths.items():
        assert os.path.exists(path) and path in text, name
    op = dgnh.open(paths["result.zarr"])
    assert op.shape == (310, 310)  # 64-4-10 with biases
    run = zarr.open_group(paths["result.zarr"], mode="r").attrs["run"]
    assert run["n_shards"] == 3 and run["scheduler"] is None
    assert "on a local cluster" in text
    for name in ("structure.png", "spectrum.png"):
        with open(paths[name], "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(FileExistsError, match="demo output .* already exists"):
        run_demo(tmp_path / "demo", hidden=4, max_iter=5, stream=io.StringIO())


def test_demo_at_its_defaults_as_the_readme_types_it(tmp_path):
    """`dgnh demo` exactly as a new user runs it (its default network, tol and ranks): to the
    end, with the summary of every `auto` candidate, built or not."""
    out = dgnh_cli("demo", "--out", str(tmp_path / "demo"), timeout=600)
    assert out.returncode == 0, out.stderr
    assert "demo done in" in out.stdout and out.stdout.count("  candidate ") == 4
    assert "not built (a smaller form meets tol)" in out.stdout
    assert dgnh.open(tmp_path / "demo" / "result.zarr").shape == (1210, 1210)  # 64-16-10


# ------------------------------------ dgnh solve says which system it solved (issue 13, item 5)
@pytest.fixture(scope="module")
def job_result(problem):
    """A job's result (one shard, in this process), loose enough that G̃ answers otherwise."""
    from dgnh.job import run_job

    job = write_job(problem, str(problem["dir"] / "loose.zarr"), "loose.toml")
    table = {**JOB, "output": "loose.zarr", "shard_size": N_SAMPLES,
             "compress": {"method": "lowrank", "tol": 0.2, "max_rank": 4}}
    (problem["dir"] / "loose.toml").write_text(toml_text(table))
    run_job(load_job(job), out=io.StringIO())
    with dgnh.GaussNewton(problem["net"], problem["X"], problem["Y"], loss="cross_entropy",
                          client="in-process") as gn:
        G = gn.dense()
    return {"path": str(problem["dir"] / "loose.zarr"), "G": G,
            "reg": float(1e-3 * np.linalg.norm(G, 2))}


@pytest.mark.parametrize("rtol", [None, "1e-11"])
def test_solve_with_the_jobs_model_and_data_is_exact(job_result, tmp_path, rtol, capsys):
    G, reg = job_result["G"], job_result["reg"]
    b = np.random.default_rng(11).normal(size=len(G))
    np.save(tmp_path / "b.npy", b)
    argv = ["solve", job_result["path"], "--rhs", str(tmp_path / "b.npy"), "--reg", repr(reg),
            "-o", str(tmp_path / "x.npy")] + (["--rtol", rtol] if rtol else [])
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "solving (G + λI) x = b" in out and "exactly (G, not the compressed G̃)" in out
    bound = float(rtol or 1e-8)
    A = G + reg * np.eye(len(G))
    x = np.load(tmp_path / "x.npy")
    residual = np.linalg.norm(A @ x - b) / np.linalg.norm(b)
    assert residual <= 1.01 * bound
    printed = float(re.search(r"true relative residual (\S+) \(rtol", out).group(1))
    assert printed == pytest.approx(residual, rel=0.02)
    op = dgnh.open(job_result["path"])
    x_tilde = np.linalg.solve(op.to_dense() + reg * np.eye(len(G)), b)
    assert np.linalg.norm(A @ x_tilde - b) / np.linalg.norm(b) > 1e-3  # what it printed before


def test_solve_without_the_job_says_it_answers_for_the_compressed_operator(result, capsys):
    b = np.random.default_rng(12).normal(size=result["op"].shape[0])
    np.save(result["dir"] / "b-compressed.npy", b)
    x_path = str(result["dir"] / "x-compressed.npy")
    assert main(["solve", result["path"], "--rhs", str(result["dir"] / "b-compressed.npy"),
                 "--reg", repr(result["reg"]), "-o", x_path]) == 0
    out = capsys.readouterr().out
    report = result["op"].report
    bound = report["error_estimate"] * report["norm_estimate"] / result["reg"]
    assert "solving (G̃ + λI) x = b" in out
    assert "for the COMPRESSED operator G̃, not the exact GNH (the store has no job record" in out
    assert f"‖G‖₂/λ = {bound:.2g} (relative)" in out and out.count("\n") == 1


# -------------------------------------------- dgnh eig writes eigenpairs (issue 13, item 6)
def test_eig_writes_the_eigenvectors_and_their_residuals(result, capsys):
    vectors = str(result["dir"] / "vectors.npy")
    assert main(["eig", result["path"], "-k", "4", "-o", vectors]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert vectors in lines[0] and "‖Hv_i − λ_i v_i‖" in lines[0]
    dense = result["op"].to_dense()
    values, reference = np.linalg.eigh(dense)
    V = np.load(vectors)
    assert V.shape == (dense.shape[0], 4)
    for j, line in enumerate(lines[1:]):
        i, value, residual = line.split()
        assert int(i) == j + 1
        assert float(value) == pytest.approx(values[::-1][j], rel=1e-8)
        ritz = V[:, j] @ dense @ V[:, j]
        r = np.linalg.norm(dense @ V[:, j] - ritz * V[:, j])
        assert float(residual) == pytest.approx(r, abs=1e-12 * values[-1])
        assert float(residual) < 1e-8 * values[-1]
        assert abs(V[:, j] @ reference[:, -1 - j]) == pytest.approx(1.0, abs=1e-6)
    assert main(["eig", result["path"], "-k", "4", "-o", vectors]) == 1
    assert "eigenvectors " in capsys.readouterr().err
    assert main(["eig", result["path"], "-k", "2", "-o", vectors, "--overwrite"]) == 0
    assert np.load(vectors).shape == (dense.shape[0], 2)


def test_ctrl_c_during_run_prints_one_line(tmp_path):
    """Ctrl-C at the terminal (SIGINT to the whole process group: `dgnh run` and the worker
    processes of its local cluster) while the job compresses: one line, exit code 130."""
    write_problem(tmp_path, (10, 40, 6), 2000, seed=1, chunk_rows=500)
    job = tmp_path / "job.toml"
    job.write_text(toml_text({**JOB, "shard_size": 500, "compress": {
        "method": "hybrid", "tol": 1e-6, "max_rank": 64, "leaf_size": 16}}))
    # the child gets SIGINT's default disposition whatever this process's is (an ignored
    # SIGINT would be inherited across exec, and the job would rightly ignore Ctrl-C)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        run = subprocess.Popen([sys.executable, "-m", "dgnh.cli", "run", str(job), "--quiet"],
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        for _ in range(2):  # the "load" line, then "factors": shards live on the cluster
            line = run.stdout.readline()
        assert line.startswith("factors") and "4 shards on a local cluster" in line, line
        os.killpg(run.pid, signal.SIGINT)
        out, err = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    assert (run.returncode, err) == (130, "dgnh: interrupted\n"), err[-3000:]
    assert not out.startswith("compress"), "the job ended before the interrupt"
