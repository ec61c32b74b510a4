"""``dgnh analyze JOB.toml``: the [analyses] table, results under analyses/ in the result store."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import zarr
from cases import toml_text, write_problem

import dgnh
from dgnh.analyses_job import read_analyses, run_analyses
from dgnh.cli import main
from dgnh.job import load_job, run_job

N_SAMPLES = 60


@pytest.fixture(scope="module")
def problem(tmp_path_factory):
    return write_problem(tmp_path_factory.mktemp("problem"), (4, 6, 3), N_SAMPLES, seed=7)


def write_job(directory, analyses: dict | None) -> str:
    table = {"model": "model.npz", "data": "data.zarr", "loss": "cross_entropy",
             "output": "out.zarr", "compress": {"method": "lowrank", "tol": 1e-6}}
    with open(os.path.join(directory, "job.toml"), "w") as fh:
        fh.write(toml_text(table))  # dgnh run reads the job without [analyses]
    with open(os.path.join(directory, "analyses.toml"), "w") as fh:
        fh.write(toml_text({**table, **({"analyses": analyses} if analyses else {})}))
    return os.path.join(directory, "analyses.toml")


@pytest.fixture
def job_dir(problem, tmp_path):
    for name in ("model.npz", "data.zarr"):
        os.symlink(problem["dir"] / name, tmp_path / name)
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "queries.npz", X=rng.normal(size=(3, 4)), Y=np.array([0, 2, 1]))
    np.savez(tmp_path / "wide.npz", X=rng.normal(size=(3, 5)), Y=np.array([0, 2, 1]))
    write_job(tmp_path, None)
    run_job(load_job(tmp_path / "job.toml"), out=io.StringIO())
    return tmp_path


def dense_reference(problem, p: float, lam: float, Xq, Yq) -> dict:
    """Laplace evidence, influence, self-influence and saliencies from dense float64 G."""
    net, X, Y = problem["net"], problem["X"], problem["Y"]
    n = len(X)
    gn = dgnh.GaussNewton(net, X, Y, loss="cross_entropy", client="in-process")
    G, w = gn.dense(), net.parameters()
    ev = np.maximum(np.linalg.eigvalsh(G), 0)
    grads = np.stack([dgnh.GaussNewton(net, X[i:i + 1], Y[i:i + 1], loss="cross_entropy",
                                       client="in-process").gradient() for i in range(n)])
    gq = np.stack([dgnh.GaussNewton(net, Xq[i:i + 1], Yq[i:i + 1], loss="cross_entropy",
                                    client="in-process").gradient() for i in range(len(Xq))])
    Hinv = np.linalg.inv(G + lam * np.eye(len(w)))
    return {"lml": -n * gn.loss() - p / 2 * (w @ w) - 0.5 * np.sum(np.log1p(n * ev / p)),
            "influence": -gq @ Hinv @ grads.T / n,
            "self_influence": np.einsum("ij,jk,ik->i", grads, Hinv, grads) / n,
            "saliency": w**2 / (2 * np.diag(Hinv))}


@pytest.mark.parametrize("analyses", [
    {"queries": "queries.npz"},                                   # defaults, prior optimised
    {"prior_precision": 2.5, "optimize_prior": False, "damping": 0.01, "route": "dual",
     "queries": "queries.npz"},
    {"prior_precision": 0.7, "optimize_prior": False, "route": "primal", "queries": "queries.npz"},
])
def test_stored_analyses_match_dense_reference(problem, job_dir, analyses):
    path = write_job(job_dir, analyses)
    before = np.asarray(zarr.open_group(job_dir / "out.zarr", mode="r")["operator/U"][...])
    attrs = run_analyses(path)
    stored, arrays = read_analyses(job_dir / "out.zarr")
    assert stored == attrs and stored["complete"]
    lap = stored["laplace"]
    p = lap["prior_precision"]
    lam = analyses.get("damping", p / N_SAMPLES)
    q = np.load(job_dir / "queries.npz")
    ref = dense_reference(problem, p, lam, q["X"], q["Y"])
    # N = 51 < n·d = 180: "auto" takes the exact primal side
    assert lap["route"] == analyses.get("route", "primal")
    assert lap["optimized"] == analyses.get("optimize_prior", True)
    if lap["optimized"]:
        assert p != 1.0
    np.testing.assert_allclose(lap["log_marginal_likelihood"], ref["lml"], rtol=1e-10)
    for name in ("influence", "self_influence", "saliency"):
        np.testing.assert_allclose(arrays[name], ref[name], rtol=1e-8,
                                   atol=1e-12 * np.abs(ref[name]).max())
    assert stored["saliencies"]["damping"] == pytest.approx(lam, rel=1e-14)
    after = np.asarray(zarr.open_group(job_dir / "out.zarr", mode="r")["operator/U"][...])
    np.testing.assert_array_equal(before, after)  # the rest of the result is untouched
    assert dgnh.store.open(job_dir / "out.zarr").shape == (problem["net"].n_params,) * 2


def test_existing_analyses_kept_unless_overwrite(job_dir, capsys):
    path = write_job(job_dir, {"self_influence": False})
    assert main(["analyze", path]) == 0
    assert "route primal" in capsys.readouterr().out
    assert main(["analyze", path]) == 1
    assert "already exists" in capsys.readouterr().err
    write_job(job_dir, {"saliencies": False})
    assert main(["analyze", path, "--overwrite"]) == 0
    _, arrays = read_analyses(job_dir / "out.zarr")
    assert set(arrays) == {"self_influence", "self_influence_error_bound"}
    assert [p for p in os.listdir(job_dir / "out.zarr") if "dgnh-" in p] == []


@pytest.mark.parametrize("analyses, message", [
    ({"prior_precision": 0.0}, "prior_precision must"),
    ({"prior_precision": -1.0}, "prior_precision must"),
    ({"route": "exact"}, "unknown route 'exact'"),
    ({"damping": 0}, "damping must"),
    ({"saliency": True}, "unknown key 'analyses.saliency'"),
    ({"queries": "missing.npz"}, "analyses.queries = 'missing.npz'"),
    ({"queries": "wide.npz"}, "X_query"),
    (None, "has no [analyses] table"),
])
def test_bad_analyses_one_line_and_nothing_stored(job_dir, capsys, analyses, message):
    path = write_job(job_dir, analyses)
    assert main(["analyze", path]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dgnh analyze: error:") and message in err
    assert "analyses" not in zarr.open_group(job_dir / "out.zarr", mode="r")
    assert [p for p in os.listdir(job_dir / "out.zarr") if "dgnh-" in p] == []


def test_analyze_before_run_says_so(problem, tmp_path, capsys):
    for name in ("model.npz", "data.zarr"):
        os.symlink(problem["dir"] / name, tmp_path / name)
    path = write_job(tmp_path, {"saliencies": True})
    assert main(["analyze", path]) == 1
    assert "does not exist: run `dgnh run" in capsys.readouterr().err
