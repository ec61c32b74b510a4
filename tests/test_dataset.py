"""Dataset stores on disk: round trips, validation on write and open, GaussNewton from a path."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

import dgnh
from cases import random_mlp, random_targets


# ------------------------------------------------------------------ round trip
@pytest.mark.parametrize("n, d, x_dtype, y_kind, chunk_rows", [
    (1, 3, np.float64, "labels", None),
    (10, 3, np.float64, "labels", 4),      # last chunk partial
    (12, 2, np.float32, "vectors", 4),     # chunks divide n
    (25, 5, np.int32, "vectors", 7),       # integer X is stored as float64
    (40, 4, np.float64, "zeros", 8),       # all-zero chunks are written too
])
def test_round_trip(tmp_path, n, d, x_dtype, y_kind, chunk_rows):
    rng = np.random.default_rng(n)
    X = (rng.normal(size=(n, d)) * 10).astype(x_dtype)
    Y = {"labels": rng.integers(0, 3, n), "vectors": rng.normal(size=(n, 2)),
         "zeros": np.zeros((n, 1))}[y_kind]
    if y_kind == "zeros":
        X[:] = 0
    path = tmp_path / "d.zarr"
    ds = dgnh.save_dataset(path, X, Y, chunk_rows=chunk_rows)
    assert ds == dgnh.open_dataset(path) == dgnh.open_dataset(str(path))
    assert (ds.n_samples, ds.n_inputs, ds.target_shape) == (n, d, Y.shape[1:])
    assert ds.x_dtype == (np.float32 if x_dtype == np.float32 else np.float64)
    assert ds.y_dtype == (np.int64 if y_kind == "labels" else np.float64)
    Xr, Yr = ds.read()
    np.testing.assert_array_equal(Xr, X.astype(ds.x_dtype))
    np.testing.assert_array_equal(Yr, Y)
    for a, b in [(0, n), (n // 3, n // 3 + 1), (n - 1, n), (n, n)]:
        Xs, Ys = ds.read(a, b)
        np.testing.assert_array_equal(Xs, X[a:b].astype(ds.x_dtype))
        np.testing.assert_array_equal(Ys, Y[a:b])
    with pytest.raises(ValueError, match=rf"rows 0:{n + 1} are outside \[0, {n}\]"):
        ds.read(0, n + 1)
    group = zarr.open_group(path, mode="r")
    assert group.attrs["format"] == "dgnh-dataset" and group.attrs["version"] == 1
    n_chunks = -(-n // ds.chunk_rows)
    assert len(list((path / "X" / "c").iterdir())) == n_chunks  # one file per row chunk


def test_default_chunks_about_4_mib(tmp_path):
    X = np.zeros((300_000, 8))
    ds = dgnh.save_dataset(tmp_path / "d.zarr", X, np.zeros(300_000))
    assert ds.chunk_rows == 4 * 2**20 // (8 * 8)


# --------------------------------------------------------- validation on write
@pytest.mark.parametrize("X, Y, kwargs, exc, match", [
    (np.ones(5), np.ones(5), {}, ValueError, "X must be 2-dimensional"),
    (np.ones((0, 3)), np.ones(0), {}, ValueError, "at least one row"),
    (np.array([[1.0, np.nan]]), np.ones(1), {}, ValueError, "X contains NaN"),
    (np.ones((3, 2)), np.array([1.0, np.inf, 0]), {}, ValueError, "Y contains NaN"),
    (np.ones((3, 2)), np.ones(4), {}, ValueError, r"Y must have shape \(3,\)"),
    (np.ones((3, 2)), np.ones((3, 2, 1)), {}, ValueError, r"Y must have shape"),
    (np.array([["a", "b"]]), np.ones(1), {}, TypeError, "X must be a real numeric"),
    (np.ones((3, 2)), np.ones(3), {"chunk_rows": 0}, ValueError, "chunk_rows must be"),
    (np.ones((3, 2)), np.ones(3), {"chunk_rows": 1.5}, ValueError, "chunk_rows must be"),
])
def test_bad_data_is_refused(tmp_path, X, Y, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        dgnh.save_dataset(tmp_path / "d.zarr", X, Y, **kwargs)
    assert not (tmp_path / "d.zarr").exists()


def test_existing_store_needs_overwrite(tmp_path):
    path = tmp_path / "d.zarr"
    dgnh.save_dataset(path, np.ones((3, 2)), np.ones(3))
    with pytest.raises(FileExistsError, match=f"{re.escape(str(path))} already exists"):
        dgnh.save_dataset(path, np.zeros((4, 2)), np.zeros(4))
    ds = dgnh.save_dataset(path, np.zeros((4, 2)), np.zeros(4), overwrite=True)
    assert ds.n_samples == 4


# ---------------------------------------------------------- validation on open
def _damage(path: Path, how: str) -> None:
    """Damage a 10-row store with 4 rows per chunk in one way."""
    group = zarr.open_group(path, mode="r+")
    if how == "missing path":
        shutil.rmtree(path)
    elif how == "empty directory":
        shutil.rmtree(path)
        path.mkdir()
    elif how == "format":
        group.attrs["format"] = "something-else"
    elif how == "version":
        group.attrs["version"] = 99
    elif how == "attribute":
        del group.attrs["n_inputs"]
    elif how == "array":
        shutil.rmtree(path / "Y")
    elif how == "chunk":
        (path / "X" / "c" / "1" / "0").unlink()
    elif how == "rows":
        group["Y"].resize((9,))
    elif how == "n_samples":
        group.attrs["n_samples"] = 11
    elif how == "dtype":
        group.attrs["x_dtype"] = "float32"
    elif how == "chunk_rows":
        group.attrs["chunk_rows"] = 5


@pytest.mark.parametrize("how, exc, match", [
    ("missing path", FileNotFoundError, "dataset store {path} does not exist"),
    ("empty directory", ValueError, "{path} is not a Zarr v3 group"),
    ("format", ValueError, "{path} is not a dgnh dataset store: format attribute is "
                           "'something-else'"),
    ("version", ValueError, "dataset {path} has unsupported version 99"),
    ("attribute", ValueError, r"dataset {path} lacks the attributes \['n_inputs'\]"),
    ("array", ValueError, "dataset {path} has no array 'Y'"),
    ("chunk", ValueError, "dataset {path} is truncated: array 'X' has 2 of 3 chunks stored"),
    ("rows", ValueError, r"dataset {path}: array 'Y' has shape \(9,\) .* \(mismatched store\)"),
    ("n_samples", ValueError, r"dataset {path}: array 'X' has shape \(10, 3\) .* say \(11, 3\)"),
    ("dtype", ValueError, "dataset {path}: array 'X' .* float32 .mismatched store."),
    ("chunk_rows", ValueError, "dataset {path}: array 'X' has 4 rows per chunk, the "
                               "attributes say 5"),
])
def test_damaged_store_is_named(tmp_path, how, exc, match):
    path = tmp_path / "d.zarr"
    rng = np.random.default_rng(0)
    dgnh.save_dataset(path, rng.normal(size=(10, 3)), rng.normal(size=10), chunk_rows=4)
    _damage(path, how)
    with pytest.raises(exc, match=match.format(path=re.escape(str(path)))):
        dgnh.open_dataset(path)
    net = random_mlp([3, 2, 1], ["tanh", "identity"])
    with pytest.raises(exc, match=match.format(path=re.escape(str(path)))):
        dgnh.GaussNewton(net, path, client="in-process")


def test_corrupt_chunk_is_named_by_the_shard_reading_it(tmp_path):
    path = tmp_path / "d.zarr"
    rng = np.random.default_rng(0)
    dgnh.save_dataset(path, rng.normal(size=(10, 3)), rng.normal(size=10), chunk_rows=4)
    chunk = path / "X" / "c" / "2" / "0"
    chunk.write_bytes(chunk.read_bytes()[:5])  # truncated file
    net = random_mlp([3, 2, 1], ["tanh", "identity"])
    match = f"dataset {re.escape(str(path))}: cannot read rows 8:10 of array 'X'"
    with pytest.raises(ValueError, match=match):
        dgnh.GaussNewton(net, path, shard_size=2, client="in-process")


# ------------------------------------------------ store against model and loss
@pytest.mark.parametrize("sizes, loss, Y, exc, match", [
    ([4, 3, 2], "mse", np.zeros((12, 2)), ValueError, ": X has 3 columns, the model takes 4"),
    ([3, 3, 2], "mse", np.zeros((12, 3)), ValueError,
     r": targets Y of shape \(12, 3\) .* do not fit .* targets must have shape"),
    ([3, 3, 4], "cross_entropy", np.zeros((12, 4)), ValueError,
     r": targets Y .* do not fit the model and loss: cross_entropy: targets must be integer "
     "class labels"),
    ([3, 3, 4], "cross_entropy", np.arange(12), ValueError,
     r", rows 4:8: cross_entropy: class labels must lie in \[0, 4\)"),
    ([3, 3, 2], "binary_cross_entropy", np.full((12, 2), 2.0), ValueError,
     r", rows 0:4: binary_cross_entropy: targets must lie in \[0, 1\]"),
])
def test_store_mismatching_model_or_loss_is_named(tmp_path, sizes, loss, Y, exc, match):
    path = tmp_path / "d.zarr"
    dgnh.save_dataset(path, np.zeros((12, 3)), Y)
    net = random_mlp(sizes, ["tanh", "identity"])
    with pytest.raises(exc, match=f"dataset {re.escape(str(path))}" + match):
        dgnh.GaussNewton(net, path, loss=loss, shard_size=4, client="in-process")


def test_path_with_targets_is_refused(tmp_path):
    path = tmp_path / "d.zarr"
    dgnh.save_dataset(path, np.zeros((4, 3)), np.zeros(4))
    net = random_mlp([3, 2, 1], ["tanh", "identity"])
    with pytest.raises(ValueError, match="pass Y=None"):
        dgnh.GaussNewton(net, path, np.zeros(4), client="in-process")
    with pytest.raises(ValueError, match="Y is required"):
        dgnh.GaussNewton(net, np.zeros((4, 3)), client="in-process")


# ----------------------------------------- GaussNewton from a path, in process
@pytest.mark.parametrize("loss", ["mse", "cross_entropy", "binary_cross_entropy"])
@pytest.mark.parametrize("chunk_rows, shard_size", [(5, 5), (3, 7), (64, 64)])
def test_store_gives_the_same_operator_as_arrays(tmp_path, loss, chunk_rows, shard_size):
    net = random_mlp([4, 5, 3], ["sigmoid", "identity"])
    rng = np.random.default_rng(2)
    X, Y = rng.normal(size=(23, 4)), random_targets(loss, 23, 3)
    path = tmp_path / "d.zarr"
    dgnh.save_dataset(path, X, Y, chunk_rows=chunk_rows)
    from_arrays = dgnh.GaussNewton(net, X, Y, loss=loss, shard_size=shard_size,
                                   client="in-process")
    from_store = dgnh.GaussNewton(net, path, loss=loss, shard_size=shard_size,
                                 client="in-process")
    assert from_store.n_samples == 23 and from_store.n_shards == from_arrays.n_shards
    V = rng.normal(size=(net.n_params, 2))
    np.testing.assert_array_equal(from_store.dense(), from_arrays.dense())
    np.testing.assert_array_equal(from_store @ V, from_arrays @ V)
    np.testing.assert_array_equal(from_store.gradient(), from_arrays.gradient())
    assert from_store.loss() == from_arrays.loss()


# ------------------------ overwrite replaces only a dataset store (issue 13, items 7, 11)
def _thesis_dir(path):
    path.mkdir()
    (path / "thesis.tex").write_text("four years")


@pytest.mark.parametrize("make, match", [
    (_thesis_dir, "it is a directory that is not a Zarr store"),
    (lambda p: p.write_text("four years"), "it is a file, not a dgnh dataset store"),
    (lambda p: zarr.create_group(p, zarr_format=3, attributes={"format": "mine"}),
     r"it is a Zarr store but not a dgnh dataset store \(format attribute 'mine'\)"),
    (lambda p: dgnh.save(dgnh.LowRank(np.ones((3, 1))), p),
     "it is a Zarr store but not a dgnh dataset store .*'dgnh-result'"),
])
def test_overwrite_refuses_what_is_not_a_dataset_store(tmp_path, make, match):
    path = tmp_path / "target"
    make(path)
    listing = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(FileExistsError, match=f"refusing to replace {re.escape(str(path))}: "
                                              f"{match}"):
        dgnh.save_dataset(path, np.ones((4, 2)), np.ones(4), overwrite=True)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == listing


def test_overwrite_swaps_in_a_complete_store(tmp_path):
    path = tmp_path / "d.zarr"
    dgnh.save_dataset(path, np.ones((5, 2)), np.arange(5))
    with pytest.raises(ValueError, match="X contains NaN or Inf"):
        dgnh.save_dataset(path, np.full((4, 2), np.nan), np.arange(4), overwrite=True)
    assert dgnh.open_dataset(path).n_samples == 5
    ds = dgnh.save_dataset(path, np.zeros((7, 3)), np.arange(7), overwrite=True)
    assert (ds.n_samples, ds.n_inputs) == (7, 3)
    assert os.listdir(tmp_path) == ["d.zarr"]  # no staging store or old copy left behind
    (tmp_path / "empty").mkdir()
    assert dgnh.save_dataset(tmp_path / "empty", np.ones((2, 2)), np.ones(2),
                             overwrite=True).n_samples == 2


# ------------------------------------------- content digest and checksums (issue 13, items 8, 9)
@pytest.mark.parametrize("change, same", [
    (lambda X, Y: (X, Y, {"chunk_rows": 3}), True),
    (lambda X, Y: (X.astype(np.float32), Y, {}), False),
    (lambda X, Y: (X + np.eye(*X.shape) * 1e-12, Y, {}), False),
    (lambda X, Y: (X, Y[::-1].copy(), {}), False),
    (lambda X, Y: (X[:-1], Y[:-1], {}), False),
])
def test_digest_follows_the_content(tmp_path, change, same):
    rng = np.random.default_rng(0)
    X, Y = rng.normal(size=(11, 3)), rng.integers(0, 3, 11)
    a = dgnh.save_dataset(tmp_path / "a.zarr", X, Y, chunk_rows=4).digest()
    X2, Y2, options = change(X, Y)
    b = dgnh.save_dataset(tmp_path / "a.zarr", X2, Y2, overwrite=True, **options).digest()
    assert (a == b) is same


def test_altered_chunk_is_a_damaged_store_for_the_shard_reading_it(tmp_path):
    path = tmp_path / "d.zarr"
    rng = np.random.default_rng(0)
    dgnh.save_dataset(path, rng.normal(size=(10, 3)), rng.normal(size=10), chunk_rows=4)
    chunk = path / "X" / "c" / "1" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 1  # same size, other bytes
    chunk.write_bytes(bytes(data))
    ds = dgnh.open_dataset(path)  # metadata only: fine
    match = (f"damaged store: dataset {re.escape(str(path))}: cannot read rows 4:8 of array "
             "'X': a chunk fails its checksum")
    with pytest.raises(ValueError, match=match):
        ds.read(4, 8)
    net = random_mlp([3, 2, 1], ["tanh", "identity"])
    with pytest.raises(ValueError, match="damaged store: .*array 'X': a chunk fails"):
        dgnh.GaussNewton(net, path, shard_size=4, client="in-process")
    with pytest.raises(ValueError, match="damaged store"):
        ds.digest()
