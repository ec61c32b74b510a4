"""Job files and the job runner (in this process; the CLI tests use real processes)."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import zarr
from cases import toml_text, write_problem

import dgnh
from dgnh import store
from dgnh.compress import compress
from dgnh.checkpoint import CheckpointedGaussNewton, JobStore
from dgnh.job import JobError, load_job, parse_job, run_job

N_SAMPLES = 80


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
    """A model file, a dataset store and the same data in memory."""
    return write_problem(tmp_path_factory.mktemp("problem"), (4, 8, 3), N_SAMPLES, seed=5)


def base_job(**compress_overrides) -> dict:
    return {"model": "model.npz", "data": "data.zarr", "loss": "cross_entropy",
            "output": "out.zarr",
            "compress": {"method": "hybrid", "tol": 1e-5, "max_rank": 12, "leaf_size": 8,
                         **compress_overrides},
            "factorize": {"relative_reg": 0.05}}


def write_job(directory, table: dict, name: str = "job.toml") -> str:
    path = os.path.join(directory, name)
    with open(path, "w") as fh:
        fh.write(toml_text(table))
    return path


# ------------------------------------------------------------------ validation
def _edit(**changes):
    def apply(table):
        for key, value in changes.items():
            section, _, name = key.rpartition(".")
            target = table.setdefault(section, {}) if section else table
            if value is _DROP:
                target.pop(name)
            else:
                target[name] = value
        return table
    return apply


_DROP = object()

BAD_JOBS = [
    (_edit(colour="red"), "unknown key 'colour'"),
    (_edit(model=_DROP), "missing key 'model'"),
    (_edit(model="nowhere.npz"), "model = 'nowhere.npz': .*does not exist"),
    (_edit(model="data.zarr"), "model = 'data.zarr': unsupported model file type"),
    (_edit(loss="hinge"), "loss = 'hinge': unknown loss"),
    (_edit(loss=3), "loss = 3: must be a non-empty string"),
    (_edit(dtype="float16"), "dtype = 'float16': must be 'float64' or 'float32'"),
    (_edit(shard_size=0), "shard_size = 0: shard_size must be a positive integer"),
    (_edit(**{"compress.tol": 2.0}), r"compress.tol = 2.0: tol must lie in the open interval"),
    (_edit(**{"compress.method": "svd"}), "compress.method = 'svd': unknown method"),
    (_edit(**{"compress.max_rank": 0}), "compress.max_rank = 0: max_rank must be"),
    (_edit(**{"compress.eps": 1.5}), "compress.eps = 1.5: eps must lie in"),
    (_edit(**{"compress.tolerance": 0.1}), "unknown key 'compress.tolerance'"),
    (_edit(**{"factorize.reg": -1.0, "factorize.relative_reg": _DROP}),
     r"factorize.reg = -1.0: reg must be a finite number > 0"),
    (_edit(**{"factorize.reg": 1.0}), r"takes exactly one of reg .* or relative_reg"),
    (_edit(**{"cluster.scheduler": "localhost:8786"}), "cluster.scheduler = 'localhost:8786'"),
    (_edit(**{"cluster.tls_ca_file": "ca.pem"}), "cluster.tls_ca_file = 'ca.pem': .*does not "
                                                 "exist"),
    (_edit(compress=3), r"compress = 3: must be a table"),
]


@pytest.mark.parametrize("edit, message", BAD_JOBS)
def test_validation_names_the_key_and_value(problem, edit, message):
    path = write_job(problem["dir"], edit(base_job()), "bad.toml")
    with pytest.raises(JobError, match=message) as err:
        load_job(path)
    assert str(err.value).startswith(f"job file {path}: ")


def test_invalid_toml_and_missing_file(problem):
    path = os.path.join(problem["dir"], "broken.toml")
    with open(path, "w") as fh:
        fh.write("model = \n")
    with pytest.raises(JobError, match="is not valid TOML"):
        load_job(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_job(os.path.join(problem["dir"], "absent.toml"))


def test_parse_resolves_paths_and_defaults(problem):
    job = parse_job(base_job(), base_dir=str(problem["dir"]))
    assert job.model == os.path.join(problem["dir"], "model.npz")
    assert job.output == os.path.join(problem["dir"], "out.zarr")
    assert job.compress == {"method": "hybrid", "tol": 1e-5, "max_rank": 12, "leaf_size": 8,
                            "budget": 0.0, "neighbors": 32, "metric": "angle", "eps": None,
                            "seed": 0}
    assert job.factorize == {"relative_reg": 0.05} and job.scheduler is None


def test_tls_files_need_a_scheduler(problem):
    for name in ("ca.pem", "cert.pem"):
        (problem["dir"] / name).write_text("not used")
    table = base_job()
    table["cluster"] = {"tls_ca_file": "ca.pem", "tls_client_cert": "cert.pem"}
    job = load_job(write_job(problem["dir"], table, "tls.toml"))
    assert job.tls == {"tls_ca_file": os.path.join(problem["dir"], "ca.pem"),
                       "tls_client_cert": os.path.join(problem["dir"], "cert.pem")}
    with pytest.raises(JobError, match="TLS files but no scheduler address"):
        run_job(job, out=io.StringIO())


# ------------------------------------------------------------------ the runner
@pytest.fixture
def job_dir(problem, tmp_path):
    for name in ("model.npz", "data.zarr"):
        os.symlink(problem["dir"] / name, tmp_path / name)
    return tmp_path


def test_run_job_matches_compress_and_stores_everything(problem, job_dir, capsys):
    """One shard (in this process): the stored result is exactly dgnh.compress's."""
    job = load_job(write_job(job_dir, base_job()))
    log = io.StringIO()
    result = run_job(job, progress=True, out=log)
    bars = capsys.readouterr().err
    for phase in ("load", "factors", "compress", "certify", "factorize", "store"):
        assert phase in bars  # one progress bar per phase
        assert phase in log.getvalue()

    op = dgnh.open(job.output)
    with dgnh.GaussNewton(problem["net"], problem["X"], problem["Y"], loss="cross_entropy",
                          client="in-process") as gn:
        direct = compress(gn, **job.compress, progress=False)
        G = gn.dense()
    V = np.random.default_rng(0).normal(size=(gn.n_params, 2))
    assert np.array_equal(op @ V, direct @ V)
    assert op.report["entries_evaluated"] == direct.report["entries_evaluated"] > 0

    # the factorization against dense numpy on the stored operator
    fac = store.read_factorization(job.output)
    reg = 0.05 * op.report["norm_estimate"]
    A = op.to_dense() + reg * np.eye(gn.n_params)
    assert fac["reg"] == pytest.approx(reg, rel=1e-15)
    assert fac["logdet"] == pytest.approx(np.linalg.slogdet(A)[1], rel=1e-10)
    np.testing.assert_allclose(fac["inverse_diagonal"], np.diag(np.linalg.inv(A)), rtol=1e-8)
    # and the compression against the dense GNH, within the certified error
    true_err = np.linalg.norm(G - op.to_dense(), 2) / np.linalg.norm(G, 2)
    assert true_err <= 3 * op.report["error_estimate"] + 1e-12

    attrs = zarr.open_group(job.output, mode="r").attrs
    run = attrs["run"]
    assert set(run["timings"]) == {"load", "factors", "compress", "certify", "factorize"}
    assert run["checkpoint"] == {"rounds": result["run"]["checkpoint"]["rounds"],
                                 "rounds_loaded": 0, "entries_loaded": 0,
                                 "entries_evaluated": direct.report["entries_evaluated"],
                                 "diagonal_loaded": False}
    assert run["n_samples"] == N_SAMPLES and run["n_shards"] == 1
    assert attrs["job"]["compress"]["tol"] == 1e-5 and attrs["job"]["output"] == job.output
    assert op.report["parameters"]["seed"] == 0


def test_complete_output_is_refused_then_overwritten(job_dir):
    job = load_job(write_job(job_dir, base_job(method="lowrank")))
    run_job(job, out=io.StringIO())
    with pytest.raises(FileExistsError, match="already holds a complete result"):
        run_job(job, out=io.StringIO())
    other = load_job(write_job(job_dir, base_job(method="hmatrix"), "other.toml"))
    run_job(other, overwrite=True, out=io.StringIO())
    assert type(dgnh.open(job.output)).__name__ == "HMatrix"


def test_another_jobs_checkpoint_is_refused(job_dir):
    job = load_job(write_job(job_dir, base_job()))
    JobStore.begin(job.output, "fingerprint of another job")
    with pytest.raises(FileExistsError, match="checkpoint of a different job"):
        run_job(job, out=io.StringIO())


def test_failed_factors_leave_no_output(job_dir):
    table = base_job()
    table["data"] = "missing.zarr"
    job = load_job(write_job(job_dir, table))
    with pytest.raises(FileNotFoundError, match="missing.zarr"):
        run_job(job, out=io.StringIO())
    assert not os.path.exists(job.output)


# ------------------------------------------------------------ the checkpoint
@pytest.fixture
def gn(problem):
    with dgnh.GaussNewton(problem["net"], problem["X"], problem["Y"], loss="cross_entropy",
                          client="in-process") as g:
        yield g


def assert_entries_and_diagonal(source, requests, G):
    """Every batch of ``requests`` and the diagonal, read through ``source``, equal G's."""
    for batch in requests:
        for block, (r, c) in zip(source.entries_many(batch), batch):
            np.testing.assert_allclose(block, G[np.ix_(r, c)], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(source.diagonal(), np.diag(G), rtol=1e-12)


def test_checkpointed_source_stores_then_loads_rounds(gn, tmp_path):
    path = tmp_path / "ck.zarr"
    G = gn.dense()
    requests = [[([0, 3, 5], [1, 2]), ([7], [7, 8, 9])], [(np.arange(10), [4])]]
    first = CheckpointedGaussNewton(gn, JobStore.begin(path, "fp"))
    assert_entries_and_diagonal(first, requests, G)
    assert first.stats["entries_exact"] == 6 + 3 + 10 and first.loaded["rounds"] == 0

    seen = []
    again = CheckpointedGaussNewton(gn, JobStore.begin(path, "fp"),
                                    on_round=lambda k, n, loaded: seen.append((k, n, loaded)))
    before = dict(gn.stats)
    assert_entries_and_diagonal(again, requests, G)
    assert gn.stats == before  # nothing evaluated
    assert again.stats["entries_exact"] == 0
    assert again.loaded == {"rounds": 2, "entries": 19, "diagonal": True}
    assert seen == [(0, 9, True), (1, 10, True)]
    # a third round is evaluated and stored after the loaded ones
    again.entries_many([([1], [2])])
    assert again.stats["entries_exact"] == 1 and store.checkpoint_rounds(path) == 3

    other = CheckpointedGaussNewton(gn, JobStore.begin(path, "fp"))
    with pytest.raises(RuntimeError, match="round 0 .* holds other entry requests"):
        other.entries_many([([0, 3, 5], [1, 2])], seed=1)


def test_onnx_model(problem, job_dir):
    """A job reads a .onnx model (Gemm + Tanh + Gemm, written with onnx.helper)."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    net = problem["net"]
    inits = [numpy_helper.from_array(a, name) for name, a in
             (("W0", net.weights[0]), ("b0", net.biases[0]),
              ("W1", net.weights[1]), ("b1", net.biases[1]))]
    nodes = [helper.make_node("Gemm", ["x", "W0", "b0"], ["z0"], transB=1),
             helper.make_node("Tanh", ["z0"], ["h0"]),
             helper.make_node("Gemm", ["h0", "W1", "b1"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "mlp",
                              [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [None, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [None, 3])],
                              inits)
    onnx.save(helper.make_model(graph), str(job_dir / "model.onnx"))
    table = base_job(method="lowrank")
    table["model"] = "model.onnx"
    job = load_job(write_job(job_dir, table))
    run_job(job, out=io.StringIO())
    with dgnh.GaussNewton(net, problem["X"], problem["Y"], loss="cross_entropy",
                          client="in-process") as g:
        direct = compress(g, **job.compress, progress=False)
    v = np.ones(net.n_params)
    np.testing.assert_allclose(dgnh.open(job.output) @ v, direct @ v, rtol=1e-12)
