"""Job files and the job runner (in this process; the CLI tests use real processes)."""

from __future__ import annotations

import dataclasses
import io
import os
import re
import shutil

import numpy as np
import pytest
import zarr
from cases import toml_text, write_problem

import dgnh
from dgnh import store
from dgnh.compress import CompressOptions, compress
from dgnh.checkpoint import CheckpointedGaussNewton, JobStore
from dgnh.job import (JobError, fingerprint, load_job, load_model, parse_job, run_job,
                      solve_result)
from dgnh.summary import summary

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
    given = {"method": "hybrid", "tol": 1e-5, "max_rank": 12, "leaf_size": 8}
    defaults = {"budget": 0.0, "neighbors": 32, "metric": "angle", "eps": None, "seed": 0}
    assert {k: job.compress[k] for k in {**given, **defaults}} == {**given, **defaults}
    assert job.compress == CompressOptions(**given).as_dict()  # every other option at its default
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


# ------------------------------------------- the output is never the data (issue 13, item 12)
@pytest.mark.parametrize("output, message", [
    ("data.zarr", "it is the data store"),
    ("./data.zarr/", "it is the data store"),
    ("link.zarr", "it is the data store"),  # a symbolic link to the data store
    ("data.zarr/result.zarr", "it lies inside the data store"),
    ("model.npz", "it is the model file"),
])
def test_output_that_is_the_data_or_the_model_is_refused(job_dir, output, message):
    os.symlink(job_dir / "data.zarr", job_dir / "link.zarr")
    table = base_job()
    table["output"] = output
    path = write_job(job_dir, table)
    with pytest.raises(JobError, match=f"output = '{re.escape(output)}': {message}"):
        load_job(path)
    job = parse_job({**base_job(), "output": "out.zarr"}, base_dir=str(job_dir))
    job = dataclasses.replace(job, output=str(job_dir / output))
    before = dgnh.open_dataset(job_dir / "data.zarr").digest()
    with pytest.raises(JobError, match=message):
        run_job(job, overwrite=True, out=io.StringIO())
    assert dgnh.open_dataset(job_dir / "data.zarr").digest() == before
    assert os.path.isfile(job_dir / "model.npz")


# ------------------------- the checkpoint belongs to the data's content (issue 13, items 6, 8)
def checkpoint_of(job, complete_rounds: bool = True) -> JobStore:
    """The checkpoint a killed run of ``job`` leaves when every entry round was stored."""
    model = load_model(job.model)
    digest = dgnh.open_dataset(job.data).digest()
    js = JobStore.begin(job.output, fingerprint(job, model, digest), job=job.to_dict(),
                        data_digest=digest)
    with dgnh.GaussNewton(model, job.data, loss=job.loss, client="in-process") as gn:
        compress(CheckpointedGaussNewton(gn, js), **job.compress, progress=False)
    return js


def test_resume_counts_every_candidate_and_refuses_changed_data(problem, tmp_path):
    for name in ("model.npz",):
        os.symlink(problem["dir"] / name, tmp_path / name)
    dgnh.save_dataset(tmp_path / "own.zarr", problem["X"], problem["Y"])
    table = {**base_job(method="auto"), "data": "own.zarr"}
    fresh = run_job(load_job(write_job(tmp_path, {**table, "output": "fresh.zarr"}, "f.toml")),
                    out=io.StringIO())
    job = load_job(write_job(tmp_path, table))
    checkpoint_of(job)
    resumed = run_job(job, out=io.StringIO())
    f, r = fresh["run"]["checkpoint"], resumed["run"]["checkpoint"]
    # the same entries counted both ways: all candidates' rounds, evaluated or loaded
    assert r["rounds_loaded"] == r["rounds"] == f["rounds"] and r["entries_evaluated"] == 0
    assert r["entries_loaded"] == f["entries_evaluated"] > 0
    assert f["entries_evaluated"] > fresh["report"]["entries_evaluated"]  # > the chosen one's
    assert f"{f['entries_evaluated']:,} in the job's" in summary(job.output)
    v = np.random.default_rng(1).normal(size=problem["net"].n_params)
    assert np.array_equal(dgnh.open(job.output) @ v, dgnh.open(fresh["job"]["output"]) @ v)

    # the same data rewritten (other chunks): its content is unchanged, so it resumes
    shutil.rmtree(job.output)
    checkpoint_of(job)
    dgnh.save_dataset(job.data, problem["X"], problem["Y"], chunk_rows=7, overwrite=True)
    assert run_job(job, out=io.StringIO())["run"]["checkpoint"]["entries_evaluated"] == 0
    # other values at the same path and shape: refused, the checkpoint kept
    shutil.rmtree(job.output)
    checkpoint_of(job)
    X = problem["X"].copy()
    X[17, 2] += 1e-9
    dgnh.save_dataset(job.data, X, problem["Y"], overwrite=True)
    with pytest.raises(FileExistsError, match="checkpoint made from other data"):
        run_job(job, out=io.StringIO())
    assert store.checkpoint_rounds(job.output) == f["rounds"]
    run_job(job, overwrite=True, out=io.StringIO())  # --overwrite starts over on the new data
    with dgnh.GaussNewton(problem["net"], X, problem["Y"], loss="cross_entropy",
                          client="in-process") as gn:
        direct = compress(gn, **job.compress, progress=False)
    np.testing.assert_allclose(dgnh.open(job.output) @ v, direct @ v, rtol=1e-12)


# --------------------------------- a failing --overwrite run keeps the result (issue 13, item 7)
def test_failed_overwrite_keeps_the_stored_result(job_dir):
    job = load_job(write_job(job_dir, base_job(method="lowrank")))
    run_job(job, out=io.StringIO())
    v = np.ones(dgnh.open(job.output).shape[0])
    before = dgnh.open(job.output) @ v
    broken = dataclasses.replace(job, loss="mse")  # the data hold class labels: fails in factors
    with pytest.raises(ValueError):
        run_job(broken, overwrite=True, out=io.StringIO())
    assert np.array_equal(dgnh.open(job.output) @ v, before)
    other = dataclasses.replace(job, compress={**job.compress, "method": "hmatrix"})
    run_job(other, overwrite=True, out=io.StringIO())
    assert type(dgnh.open(job.output)).__name__ == "HMatrix"
    assert sorted(os.listdir(job_dir)) == ["data.zarr", "job.toml", "model.npz", "out.zarr"]
    # a file or a foreign directory is never replaced, even with overwrite
    for name, make in (("thesis.tex", lambda p: p.write_text("mine")),
                       ("notes", lambda p: (p.mkdir(), (p / "a.txt").write_text("mine")))):
        make(job_dir / name)
        with pytest.raises(FileExistsError, match=f"refusing to replace .*{name}"):
            run_job(dataclasses.replace(job, output=str(job_dir / name)), overwrite=True,
                    out=io.StringIO())
        assert "mine" in ((job_dir / name).read_text() if name.endswith(".tex")
                          else (job_dir / name / "a.txt").read_text())


# --------------------------------------- .pt models load without unpickling (issue 13, item 10)
class _Touch:
    """Unpickling this runs ``touch <path>`` (what a malicious .pt file does)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def test_torch_model_is_loaded_without_running_code(problem, job_dir):
    torch = pytest.importorskip("torch")
    net = problem["net"]
    seq = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(),
                              torch.nn.Sequential(torch.nn.Linear(8, 3)))
    with torch.no_grad():
        for layer, W, b in zip((seq[0], seq[2][0]), net.weights, net.biases):
            layer.weight.copy_(torch.from_numpy(W))
            layer.bias.copy_(torch.from_numpy(b))
    torch.save(seq, job_dir / "whole.pt")
    loaded = load_model(str(job_dir / "whole.pt"))
    assert loaded.activations == net.activations
    np.testing.assert_allclose(loaded.parameters(), net.parameters(), rtol=1e-6)

    marker = job_dir / "pwned"
    torch.save({"weights": _Touch(marker)}, job_dir / "evil.pt")
    torch.save(seq.state_dict(), job_dir / "state.pt")
    (job_dir / "junk.pt").write_bytes(b"not a torch file")
    torch.save(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Softmax(dim=1)),
               job_dir / "softmax.pt")
    cases = [("evil.pt", "was refused: .*never runs code from a file: .*posix.system"),
             ("state.pt", "holds a state_dict"),
             ("junk.pt", "was refused: .*not a file written by torch.save"),
             ("softmax.pt", "was refused: .*torch.nn.modules.activation.Softmax")]
    for name, message in cases:
        with pytest.raises(ValueError, match=f"model file .*{name} {message}") as err:
            load_model(str(job_dir / name))
        assert "\n" not in str(err.value)
    assert not marker.exists()
    # and through a job: refused in the load phase, nothing written
    table = base_job(method="lowrank")
    table["model"] = "evil.pt"
    with pytest.raises(ValueError, match="evil.pt was refused"):
        run_job(load_job(write_job(job_dir, table)), out=io.StringIO())
    assert not marker.exists() and not os.path.exists(job_dir / "out.zarr")


# ------------------------------- solving with a result: G or G̃, said plainly (issue 13, item 5)
def dense_gnh(problem, X=None) -> np.ndarray:
    with dgnh.GaussNewton(problem["net"], problem["X"] if X is None else X, problem["Y"],
                          loss="cross_entropy", client="in-process") as gn:
        return gn.dense()


def relative_residual(A, x, b) -> float:
    return float(np.linalg.norm(A @ x - b) / np.linalg.norm(b))


@pytest.fixture
def loose_result(problem, job_dir):
    """A job's low-rank result far enough from G that (G̃ + λI)⁻¹b is visibly off."""
    job = load_job(write_job(job_dir, base_job(method="lowrank", tol=0.2, max_rank=3)))
    run_job(job, out=io.StringIO())
    G = dense_gnh(problem)
    reg = 1e-3 * np.linalg.norm(G, 2)
    b = np.random.default_rng(7).normal(size=(G.shape[0], 2))
    return job, G, reg, b


def test_solve_result_solves_the_exact_system(loose_result):
    job, G, reg, b = loose_result
    A = G + reg * np.eye(len(G))
    A_tilde = dgnh.open(job.output).to_dense() + reg * np.eye(len(G))
    assert relative_residual(A, np.linalg.solve(A_tilde, b), b) > 1e-3  # G̃ answers otherwise
    for rtol in (1e-6, 1e-10):
        sol = solve_result(job.output, b, reg, rtol=rtol)
        assert sol.exact and sol.x.shape == b.shape
        assert relative_residual(A, sol.x, b) <= 1.01 * rtol
        assert "exactly (G, not the compressed G̃)" in sol.how
        assert re.search(rf"true relative residual \S+ \(rtol {rtol:g}\)", sol.how), sol.how
        printed = float(re.search(r"true relative residual (\S+)", sol.how).group(1))
        assert printed == pytest.approx(max(relative_residual(A, sol.x[:, j], b[:, j])
                                            for j in range(2)), rel=0.02)
    with pytest.raises(ValueError, match=r"cannot multiply an array of shape \(3,\)"):
        solve_result(job.output, np.ones(3), reg)


def _remove_data(job_dir, problem):
    os.unlink(job_dir / "data.zarr")


def _change_data(job_dir, problem):
    os.unlink(job_dir / "data.zarr")
    dgnh.save_dataset(job_dir / "data.zarr", problem["X"] + 1e-6, problem["Y"])


def _change_model(job_dir, problem):
    os.unlink(job_dir / "model.npz")
    net = problem["net"]
    dgnh.MLP([W * 1.001 for W in net.weights], net.biases, net.activations).save(
        job_dir / "model.npz")


def _drop_job_record(job_dir, problem):
    path = job_dir / "out.zarr"
    op = dgnh.open(path)
    dgnh.save(op, path, overwrite=True)


@pytest.mark.parametrize("damage, reason", [
    (_remove_data, r"the job's data .*data.zarr is not reachable"),
    (_change_data, r"the data store .*data.zarr no longer holds the result's data"),
    (_change_model, r"the model .*model.npz is not the result's"),
    (_drop_job_record, "the store has no job record of dgnh run"),
])
def test_solve_result_says_when_it_answers_for_the_compressed_operator(
        loose_result, problem, job_dir, damage, reason):
    job, G, reg, b = loose_result
    op = dgnh.open(job.output)
    damage(job_dir, problem)
    sol = solve_result(job.output, b[:, 0], reg)
    expected = np.linalg.solve(op.to_dense() + reg * np.eye(len(G)), b[:, 0])
    assert not sol.exact
    np.testing.assert_allclose(sol.x, expected, rtol=1e-8, atol=1e-12)
    assert re.search(rf"for the COMPRESSED operator G̃, not the exact GNH \({reason}\)", sol.how)
    e, norm = op.report["error_estimate"], op.report["norm_estimate"]
    assert f"‖G − G̃‖₂/‖G‖₂ ≈ {e:.2g}" in sol.how
    assert f"{e:.2g}·‖G‖₂/λ = {e * norm / reg:.2g} (relative)" in sol.how
    # the bound holds: x is that far from the exact solution at most
    exact = np.linalg.solve(G + reg * np.eye(len(G)), b[:, 0])
    assert np.linalg.norm(sol.x - exact) <= 1.5 * e * norm / reg * np.linalg.norm(exact)


def test_solve_result_with_an_indefinite_compressed_operator(problem, job_dir):
    """G̃ + λI indefinite (leaf diagonals lowered by c > λ): PCG on exact products still
    solves G + λI, preconditioned by the GNH diagonal."""
    job = load_job(write_job(job_dir, base_job(method="hmatrix")))
    run_job(job, out=io.StringIO())
    G = dense_gnh(problem)
    norm = np.linalg.norm(G, 2)
    c, reg = 0.02 * norm, 0.01 * norm
    leaves = zarr.open_group(job.output, mode="r+")["operator"]
    values, offsets, shapes = (leaves[f"leaf_{n}"][...] for n in ("values", "offsets", "shapes"))
    for start, (rows, cols) in zip(offsets, shapes):
        values[start:start + rows * cols:cols + 1] -= c  # the diagonal of a row-major block
    leaves["leaf_values"][...] = values
    op = dgnh.open(job.output)
    assert np.linalg.eigvalsh(op.to_dense())[0] < -reg
    with pytest.raises(dgnh.IndefiniteError):
        op.factorize(reg)
    b = np.random.default_rng(8).normal(size=len(G))
    sol = solve_result(job.output, b, reg)
    assert sol.exact and "preconditioned by the GNH diagonal (the stored HMatrix + λI is " \
                         "indefinite" in sol.how
    assert relative_residual(G + reg * np.eye(len(G)), sol.x, b) <= 1.01e-8
