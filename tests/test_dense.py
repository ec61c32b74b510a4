"""The dense compressed form and its Cholesky factorization against dense float64 numpy
references; its storage in a result store; bad input."""

from __future__ import annotations

import numpy as np
import pytest

import dgnh
from dgnh.dense import Dense, DenseCholesky
from dgnh.factorization import IndefiniteError


@pytest.mark.parametrize("name", ["classifier", "dead_relu"])
@pytest.mark.parametrize("relative_reg", [1e-3, 1e-6])
def test_dense_form_and_factorization_are_exact(problems, name, relative_reg):
    gn, G, norm = problems(name)
    op = dgnh.compress(gn, method="dense", progress=False)
    assert isinstance(op, Dense) and op.nbytes == 8 * gn.n_params**2
    assert np.allclose(op.to_dense(), G, rtol=0, atol=1e-14 * norm)
    rep = op.report
    assert rep["method"] == "dense" and rep["tol_met"] and rep["error_estimate"] < 1e-12
    assert rep["min_eigenvalue_estimate"] >= -1e-12 and not rep["indefinite"]
    assert not rep["max_rank_binds"] and rep["n_capped_nodes"] == 0
    reg = relative_reg * norm
    A = op.to_dense() + reg * np.eye(gn.n_params)
    f = op.factorize(reg)
    B = np.random.default_rng(0).normal(size=(gn.n_params, 2))
    X_ref = np.linalg.solve(A, B)
    assert np.linalg.norm(f.solve(B) - X_ref) <= 1e-8 * np.linalg.norm(X_ref)
    assert f.logdet() == pytest.approx(np.linalg.slogdet(A)[1], rel=1e-8)
    np.testing.assert_allclose(f.inverse_diagonal(), np.diag(np.linalg.inv(A)), rtol=1e-8)
    np.testing.assert_allclose(f.factorized_matmat(B), A @ B, rtol=1e-12, atol=1e-12 * norm)


def test_dense_store_round_trip(problems, tmp_path):
    gn, G, norm = problems("classifier")
    op = dgnh.compress(gn, method="dense", progress=False)
    f = op.factorize(1e-3 * norm)
    path = tmp_path / "dense.zarr"
    dgnh.save(op, path, factorization=f)
    back = dgnh.open(path)
    assert isinstance(back, Dense) and np.array_equal(back.G, op.G)
    assert back.report["error_estimate"] == op.report["error_estimate"]
    stored = dgnh.store.read_factorization(path)
    assert stored["reg"] == f.reg and stored["logdet"] == pytest.approx(f.logdet(), rel=1e-14)
    assert stored["exact"]


@pytest.mark.parametrize("G, error, match", [
    (np.ones((2, 3)), ValueError, r"G must be a square matrix .* got \(2, 3\)"),
    (np.ones(3), ValueError, "G must be 2-dimensional"),
    (np.zeros((0, 0)), ValueError, "N >= 1"),
    (np.array([[np.nan]]), ValueError, "G contains NaN or Inf"),
    (np.array([["a"]]), TypeError, "G must be a real numeric array"),
])
def test_dense_rejects_bad_matrix(G, error, match):
    with pytest.raises(error, match=match):
        Dense(G)


def test_dense_from_arrays_checks_the_shape():
    with pytest.raises(ValueError, match=r"G has shape \(2, 2\), n_params is 5"):
        Dense.from_arrays({"G": np.eye(2)}, {"n_params": 5})


def test_dense_refuses_above_its_memory_limit(problems):
    gn, G, norm = problems("classifier")
    with pytest.raises(ValueError, match=r"needs 2,976,800 bytes .* max_bytes=1,000"):
        Dense.from_source(gn, max_bytes=1000)


def test_indefinite_matrix_is_refused_by_cholesky():
    with pytest.raises(IndefiniteError, match="G \\+ reg·I is not positive definite at reg = 0.5"):
        DenseCholesky(np.diag([1.0, -1.0]), 0.5)
    assert DenseCholesky(np.diag([1.0, -1.0]), 2.0).logdet() == pytest.approx(np.log(3.0))


def test_all_zero_gnh_dense():
    rng = np.random.default_rng(0)
    net = dgnh.MLP([rng.normal(size=(5, 3)), rng.normal(size=(2, 5))], None, ["tanh", "identity"])
    gn = dgnh.GaussNewton(net, np.zeros((10, 3)), rng.normal(size=(10, 2)))
    op = dgnh.compress(gn, method="dense", progress=False)
    assert np.all(op.to_dense() == 0) and op.report["error_estimate"] == 0
    assert op.factorize(0.5).logdet() == pytest.approx(gn.n_params * np.log(0.5))
