"""Result stores: round trips, the documented layout read with plain zarr, damaged stores."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import warnings

import numpy as np
import pytest
import zarr
from cases import random_targets, relu_mlp_with_dead_unit

import dgnh
from dgnh import store
from dgnh.checkpoint import JobStore
from dgnh.compress import compress
from dgnh.factorization import ScaledIdentity
from dgnh.hybrid import Hybrid
from dgnh.packing import pack_blocks, unpack_blocks
from dgnh.summary import summary
from dgnh.zarr_io import write_rows
from dgnh.hmatrix import HMatrix
from dgnh.lowrank import LowRank

REG = 0.05  # above the most negative eigenvalue of the rank-16 H-matrix (−0.006)
KINDS = {"lowrank": LowRank, "hmatrix": HMatrix, "hybrid": Hybrid}


@pytest.fixture(scope="module")
def gn():
    # a dead ReLU unit gives zero rows, kept out of the H-matrix tree
    net = relu_mlp_with_dead_unit(10)
    rng = np.random.default_rng(3)
    X = rng.normal(size=(60, 5))
    with dgnh.GaussNewton(net, X, random_targets("cross_entropy", 60, 3), loss="cross_entropy",
                          client="in-process") as g:
        yield g


@pytest.fixture(scope="module")
def dense(gn):
    return gn.dense()


@pytest.fixture(scope="module")
def ops(gn):
    return {kind: compress(gn, method=kind, tol=1e-6, max_rank=16, leaf_size=12, progress=False)
            for kind in KINDS}


def factorize(op):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return op.factorize(REG)


@pytest.fixture
def saved(ops, tmp_path):
    def make(kind, factorized=True):
        path = tmp_path / f"{kind}.zarr"
        op = ops[kind]
        store.save(op, path, factorization=factorize(op) if factorized else None)
        return op, str(path)
    return make


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_round_trip_gives_identical_products_and_solves(saved, kind, rng):
    op, path = saved(kind)
    back = dgnh.open(path)
    assert type(back) is KINDS[kind] and back.shape == op.shape
    V = rng.normal(size=(op.shape[0], 3))
    assert np.array_equal(back @ V, op @ V)
    assert np.array_equal(back @ V[:, 0], op @ V[:, 0])
    f, g = factorize(op), factorize(back)
    assert np.array_equal(g.solve(V), f.solve(V))
    assert g.logdet() == f.logdet()
    stored = store.read_factorization(path)
    assert stored["reg"] == REG and stored["logdet"] == f.logdet() and stored["exact"] is True
    assert np.array_equal(stored["inverse_diagonal"], f.inverse_diagonal())
    assert back.report["error_estimate"] == op.report["error_estimate"]
    assert back.report["parameters"] == json.loads(json.dumps(op.report["parameters"]))


def test_store_without_factorization(saved):
    _, path = saved("lowrank", factorized=False)
    assert store.read_factorization(path) is None
    assert "factorization" not in summary(path)


def test_layout_is_self_describing_with_plain_zarr(saved, gn, dense):
    """Read the H-matrix with zarr and numpy only, following the documented layout."""
    _, path = saved("hmatrix")
    root = zarr.open_group(path, mode="r")
    attrs = dict(root.attrs)
    assert (attrs["format"], attrs["version"], attrs["kind"]) == ("dgnh-result", 1, "hmatrix")
    assert attrs["complete"] is True and attrs["n_params"] == gn.n_params
    assert {"dgnh", "numpy", "scipy", "zarr", "dask", "distributed", "created"} <= set(
        attrs["provenance"])
    group = root["operator"]
    for name in group.attrs["arrays"]:
        assert group[name].attrs["description"]
    a = {name: group[name][...] for name in group.attrs["arrays"]}
    perm = a["perm"]
    zero = np.setdiff1d(np.arange(gn.n_params), perm)
    assert zero.size > 0 and np.all(dense[zero] == 0)  # the dead unit, outside the tree

    def block(prefix, i):
        off, shp = a[f"{prefix}_offsets"], a[f"{prefix}_shapes"]
        return a[f"{prefix}_values"][off[i]:off[i + 1]].reshape(shp[i])

    def skeleton(node):
        off = a["skeleton_offsets"]
        return a["skeleton_params"][off[node]:off[node + 1]]

    shift = group.attrs["report"]["details"]["psd_shift"]  # the PSD compensation σ·I, recorded
    for i, node in enumerate(a["leaf_nodes"]):  # exact diagonal blocks of G + σI in tree order
        idx = perm[a["node_start"][node]:a["node_stop"][node]]
        np.testing.assert_allclose(block("leaf", i), dense[np.ix_(idx, idx)] + shift * np.eye(
            len(idx)), rtol=1e-12, atol=1e-15)
    for i, node in enumerate(a["coupling_nodes"]):  # G[skeleton(child 1), skeleton(child 2)]
        c1, c2 = a["node_children"][node]
        np.testing.assert_allclose(block("coupling", i),
                                   dense[np.ix_(skeleton(c1), skeleton(c2))], rtol=1e-12,
                                   atol=1e-15)
    assert len(a["leaf_nodes"]) >= 2 and len(a["coupling_nodes"]) >= 1


def test_lowrank_factor_with_plain_zarr(saved, ops):
    _, path = saved("lowrank")
    U = zarr.open_group(path, mode="r")["operator/U"][...]
    np.testing.assert_array_equal(U @ U.T, ops["lowrank"].to_dense())


def test_hybrid_parts_with_plain_zarr(saved, ops, rng):
    _, path = saved("hybrid")
    root = zarr.open_group(path, mode="r")
    assert root["operator"].attrs["kind"] == "hybrid"
    assert root["operator/lowrank"].attrs["kind"] == "lowrank"
    assert root["operator/hmatrix"].attrs["kind"] == "hmatrix"
    U = root["operator/lowrank/U"][...]
    v = rng.normal(size=U.shape[0])
    np.testing.assert_allclose(U @ (U.T @ v) + ops["hybrid"].hmatrix @ v, ops["hybrid"] @ v,
                               rtol=1e-13, atol=1e-15)


def _set_attr(path, key, value, group=""):
    zarr.open_group(os.path.join(path, group), mode="r+").attrs[key] = value


def _damage(path, how):
    if how == "unknown version":
        _set_attr(path, "version", 99)
    elif how == "other format":
        _set_attr(path, "format", "something-else")
    elif how == "incomplete":
        _set_attr(path, "complete", False)
    elif how == "missing array":
        shutil.rmtree(os.path.join(path, "operator", "U"))
    elif how == "truncated":
        shutil.rmtree(os.path.join(path, "operator", "U", "c"))
    elif how == "unknown kind":
        _set_attr(path, "kind", "tensor-train", "operator")
    elif how == "missing operator":
        shutil.rmtree(os.path.join(path, "operator"))
    elif how == "not zarr":
        shutil.rmtree(path)
        os.makedirs(path)


@pytest.mark.parametrize("how, message", [
    ("unknown version", "format version 99; this dgnh reads version 1"),
    ("other format", "not a dgnh result store"),
    ("incomplete", "is incomplete: its job has not finished"),
    ("missing array", "array 'U' is missing"),
    ("truncated", "is truncated: array 'U' has 0 of its 1 chunks"),
    ("unknown kind", "unknown operator kind 'tensor-train'"),
    ("missing operator", "group 'operator' is missing"),
    ("not zarr", "is not a Zarr v3 group"),
])
def test_damaged_store_gives_a_clear_error(saved, how, message):
    _, path = saved("lowrank")
    _damage(path, how)
    with pytest.raises(ValueError, match=message):
        dgnh.open(path)


def _edit_array(path, name, edit):
    arr = zarr.open_array(os.path.join(path, "operator", name), mode="r+")
    values = arr[:]
    edit(values)
    arr[:] = values


@pytest.mark.parametrize("name, edit, message", [
    ("leaf_values", lambda v: v.__setitem__(0, np.nan), "leaf blocks: .* NaN or Inf"),
    ("perm", lambda v: v.__setitem__(1, v[0]), "perm is not a set of distinct"),
    ("leaf_offsets", lambda v: v.__setitem__(-1, v[-1] - 1), "leaf blocks: the offset/shape"),
    ("coupling_shapes", lambda v: v.__setitem__(0, v[0] + 1), "coupling blocks: the offset"),
])
def test_edited_hmatrix_store_is_refused(saved, name, edit, message):
    """Content damage (not only missing files) is caught when the store is opened."""
    _, path = saved("hmatrix")
    _edit_array(path, name, edit)
    with pytest.raises(ValueError, match=message):
        dgnh.open(path)


def test_missing_store(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dgnh.open(tmp_path / "nothing.zarr")


def test_existing_output_is_never_overwritten_without_overwrite(saved, ops):
    _, path = saved("lowrank")
    with pytest.raises(FileExistsError, match="already exists"):
        store.save(ops["hmatrix"], path)
    assert type(dgnh.open(path)) is LowRank
    store.save(ops["hmatrix"], path, overwrite=True)
    assert type(dgnh.open(path)) is HMatrix
    assert store.read_factorization(path) is None


def test_save_rejects_what_is_not_a_compressed_operator(gn, tmp_path):
    with pytest.raises(TypeError, match="cannot store a GaussNewton"):
        store.save(gn, tmp_path / "g.zarr")
    assert not os.path.exists(tmp_path / "g.zarr")


@pytest.mark.parametrize("n_rows, chunk_rows, start, length, ok", [
    (10, 4, 0, 4, True), (10, 4, 4, 6, True), (10, 4, 8, 2, True), (10, 4, 0, 10, True),
    (10, 4, 2, 4, False), (10, 4, 4, 3, False), (10, 4, 8, 3, False),
])
def test_write_rows_accepts_only_chunk_aligned_regions(tmp_path, n_rows, chunk_rows, start,
                                                        length, ok):
    z = zarr.create_array(tmp_path / "a.zarr", shape=(n_rows,), chunks=(chunk_rows,),
                          dtype="f8", fill_value=0.0)
    values = np.arange(length, dtype=float) + 1
    if ok:
        write_rows(z, start, values)
        np.testing.assert_array_equal(z[start:start + length], values)
    else:
        with pytest.raises(ValueError, match="not aligned"):
            write_rows(z, start, values)


@pytest.mark.parametrize("shapes", [[], [(2, 3)], [(2, 3), (0, 4), (1, 1), (5, 2)]])
def test_pack_blocks_round_trip(rng, shapes):
    blocks = [rng.normal(size=s) for s in shapes]
    offsets, shp, values = pack_blocks(blocks)
    assert offsets[-1] == values.size == sum(int(np.prod(s)) for s in shapes)
    back = unpack_blocks(offsets, shp, values)
    assert len(back) == len(blocks)
    for a, b in zip(back, blocks):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- job stores
def test_job_store_rounds_resume_and_refusals(tmp_path, rng, ops):
    path = str(tmp_path / "job.zarr")
    js = JobStore.begin(path, "fp-1")
    assert js.n_rounds == 0 and js.load_array("diagonal") is None
    rounds = [[rng.normal(size=(3, 2)), rng.normal(size=(1, 4))], [rng.normal(size=(2, 2))]]
    for k, blocks in enumerate(rounds):
        js.save_round(k, f"digest-{k}", blocks)
    js.save_array("diagonal", np.arange(4.0))
    with pytest.raises(ValueError, match="cannot follow"):
        js.save_round(5, "x", [])
    assert store.checkpoint_rounds(path) == 2
    with pytest.raises(ValueError, match="incomplete"):
        dgnh.open(path)

    again = JobStore.begin(path, "fp-1")  # the same job: resume
    assert again.n_rounds == 2
    np.testing.assert_array_equal(again.load_array("diagonal"), np.arange(4.0))
    for k, blocks in enumerate(rounds):
        digest, back = again.load_round(k)
        assert digest == f"digest-{k}"
        for a, b in zip(back, blocks):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(FileExistsError, match="checkpoint of a different job"):
        JobStore.begin(path, "fp-2")

    again.finish(ops["lowrank"])
    assert type(dgnh.open(path)) is LowRank
    assert "checkpoint" not in zarr.open_group(path, mode="r")
    with pytest.raises(FileExistsError, match="already holds a complete result"):
        JobStore.begin(path, "fp-1")
    assert JobStore.begin(path, "fp-1", overwrite=True).n_rounds == 0


def test_checkpoint_counts_only_complete_contiguous_rounds(tmp_path, rng):
    path = str(tmp_path / "job.zarr")
    js = JobStore.begin(path, "fp")
    for k in range(3):
        js.save_round(k, "d", [rng.normal(size=(2, 2))])
    _set_attr(path, "complete", False, "checkpoint/rounds/000001")  # killed while writing 1
    assert store.checkpoint_rounds(path) == 1
    assert JobStore.begin(path, "fp").n_rounds == 1


def test_job_store_refuses_foreign_content(tmp_path):
    path = tmp_path / "x"
    path.mkdir()
    (path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a dgnh result store"):
        JobStore.begin(path, "fp")
    for replace in (lambda: JobStore.begin(path, "fp", overwrite=True),
                    lambda: store.save(LowRank(np.ones((3, 1))), path, overwrite=True)):
        with pytest.raises(FileExistsError, match="refusing to replace .* not a Zarr store"):
            replace()
    assert (path / "notes.txt").read_text() == "mine"


def test_summary_names_the_essentials(saved, gn):
    _, path = saved("hybrid")
    text = summary(path)
    for fragment in ("hybrid", f"N = {gn.n_params}", "error", "factorization", "reg = 0.05",
                     "numpy"):
        assert fragment in text


def test_summary_names_auto_candidates_that_were_not_built(tmp_path):
    """``method="auto"`` skips a form whose memory floor a met tol already beats, and never
    builds the dense one it does not choose: the summary says so instead of failing."""
    rng = np.random.default_rng(5)  # N = 363 parameters, n·d = 60: G has rank ≤ 60
    net = dgnh.MLP([rng.normal(size=(40, 5)), rng.normal(size=(3, 40))],
                   [rng.normal(size=40), rng.normal(size=3)], ["tanh", "identity"])
    with dgnh.GaussNewton(net, rng.normal(size=(20, 5)), random_targets("cross_entropy", 20, 3),
                          loss="cross_entropy", client="in-process") as g:
        op = compress(g, method="auto", tol=1e-3, max_rank=64, leaf_size=24, progress=False)
    store.save(op, tmp_path / "auto.zarr")
    candidates = {c["method"]: c for c in op.report["candidates"]}
    assert not candidates["hybrid"]["built"] and not candidates["dense"]["built"]
    text = summary(tmp_path / "auto.zarr")
    lines = [line.split(None, 1)[1] for line in text.splitlines() if "candidate" in line]
    assert len(lines) == len(candidates) == 4
    for line, (method, c) in zip(lines, candidates.items()):
        assert line.startswith(f"{method}: ")
        if c["built"]:
            assert f"{c['nbytes'] / 2**20:,.2f} MiB" in line and "entries" in line
        else:
            assert f"{c['memory_floor'] / 2**20:,.2f} MiB" in line  # dense: its exact size
            assert "not built (a smaller form meets tol)" in line
    # a store written before the memory-floor skip: only built forms, without "built"
    report = store.read_attributes(tmp_path / "auto.zarr")["operator"]["report"]
    report["candidates"] = [{k: v for k, v in c.items() if k != "built"}
                            for c in report["candidates"] if c["built"]]
    _set_attr(tmp_path / "auto.zarr", "report", report, "operator")
    assert [line for line in summary(tmp_path / "auto.zarr").splitlines()
            if "candidate" in line] == [f"  {'candidate':<18} {line}" for line in lines
                                        if "not built" not in line]


# --------------------------------- a failing save never loses a stored result (issue 13, item 7)
class _FailingFactorization(ScaledIdentity):
    """A real factorization whose inverse diagonal fails (a disk-full stand-in) mid-write."""

    def inverse_diagonal(self):
        raise OSError("No space left on device")


def _products(path, V):
    return dgnh.open(path) @ V


@pytest.mark.parametrize("make_call, exc, message", [
    (lambda ops, path: store.save(ops["hmatrix"], path, overwrite=True, factorization="chol"),
     TypeError, "factorization must be a dgnh Factorization of shape"),
    (lambda ops, path: store.save(ops["hmatrix"], path, overwrite=True,
                                  factorization=ScaledIdentity(3, 0.1)),
     TypeError, r"factorization must be a dgnh Factorization of shape \(\d+, \d+\)"),
    (lambda ops, path: store.save(np.eye(3), path, overwrite=True), TypeError,
     "cannot store a ndarray"),
    (lambda ops, path: store.save(ops["hybrid"], path, overwrite=True,
                                  factorization=_FailingFactorization(ops["hybrid"].shape[0],
                                                                      0.1)),
     OSError, "No space left on device"),
])
def test_failing_save_keeps_the_stored_result(saved, ops, rng, make_call, exc, message):
    _, path = saved("lowrank")
    V = rng.normal(size=(ops["lowrank"].shape[0], 2))
    before, fac_before = _products(path, V), store.read_factorization(path)
    with pytest.raises(exc, match=message):
        make_call(ops, path)
    assert np.array_equal(_products(path, V), before)
    assert store.read_factorization(path)["logdet"] == fac_before["logdet"]
    assert os.listdir(os.path.dirname(path)) == [os.path.basename(path)]  # no staging left


@pytest.mark.parametrize("content", ["file", "foreign directory", "other zarr", "dataset"])
def test_overwrite_replaces_only_a_result_store(ops, tmp_path, content):
    path = tmp_path / "x"
    if content == "file":
        path.write_text("thesis")
    elif content == "foreign directory":
        path.mkdir()
        (path / "thesis.tex").write_text("thesis")
    elif content == "other zarr":
        zarr.create_group(path, zarr_format=3, attributes={"format": "someone-else"})
    else:
        dgnh.save_dataset(path, np.ones((3, 2)), np.ones(3))
    listing = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    with pytest.raises(FileExistsError, match=f"refusing to replace {re.escape(str(path))}"):
        store.save(ops["lowrank"], path, overwrite=True)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == listing
    empty = tmp_path / "empty"
    empty.mkdir()
    store.save(ops["lowrank"], empty, overwrite=True)  # an empty directory may be used
    assert type(dgnh.open(empty)) is LowRank


# ------------------------------------- altered chunks are detected (issue 13, item 9)
def _flip_a_byte(chunk_file) -> None:
    data = bytearray(open(chunk_file, "rb").read())
    data[len(data) // 2] ^= 0x10
    with open(chunk_file, "wb") as fh:
        fh.write(data)


def _array_paths(path):
    """Every array of a Zarr group on disk, with the codecs of its metadata."""
    out = {}
    for meta in sorted(pathlib.Path(path).rglob("zarr.json")):
        doc = json.loads(meta.read_text())
        if doc["node_type"] == "array":
            out[str(meta.parent.relative_to(path))] = [c["name"] for c in doc["codecs"]]
    return out


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_array_is_checksummed(saved, tmp_path, rng, kind):
    _, path = saved(kind)
    arrays = _array_paths(path)
    assert arrays and all(codecs[-1] == "crc32c" for codecs in arrays.values()), arrays
    js = JobStore.begin(tmp_path / "job.zarr", "fp")
    js.save_array("diagonal", rng.normal(size=5))
    js.save_round(0, "d", [rng.normal(size=(2, 3))])
    ds = dgnh.save_dataset(tmp_path / "d.zarr", np.ones((4, 2)), np.arange(4))
    for other in (tmp_path / "job.zarr", ds.path):
        assert all(codecs[-1] == "crc32c" for codecs in _array_paths(other).values())


@pytest.mark.parametrize("kind, array", [
    ("lowrank", "operator/U"), ("hmatrix", "operator/leaf_values"),
    ("hmatrix", "operator/perm"), ("hybrid", "operator/lowrank/U"),
    ("hybrid", "operator/hmatrix/coupling_values"),
])
def test_altered_chunk_is_a_damaged_store(saved, kind, array):
    _, path = saved(kind)
    chunk = sorted((pathlib.Path(path) / array / "c").rglob("*"))
    _flip_a_byte([c for c in chunk if c.is_file()][0])
    name = array.rsplit("/", 1)[1]
    with pytest.raises(ValueError, match=f"damaged store: .*cannot read array '{name}': a chunk "
                                         "fails its checksum") as err:
        dgnh.open(path)
    assert "\n" not in str(err.value)


def test_altered_factorization_and_checkpoint_chunks(saved, tmp_path, rng):
    _, path = saved("lowrank")
    _flip_a_byte(next((pathlib.Path(path) / "factorization" / "inverse_diagonal" / "c")
                      .rglob("0")))
    with pytest.raises(ValueError, match="damaged store: .*'inverse_diagonal'"):
        store.read_factorization(path)
    js = JobStore.begin(tmp_path / "job.zarr", "fp")
    js.save_round(0, "d", [rng.normal(size=(30, 3))])
    _flip_a_byte(tmp_path / "job.zarr" / "checkpoint" / "rounds" / "000000" / "values" / "c" / "0")
    with pytest.raises(ValueError, match="damaged store: checkpoint of .*round 0.*'values'"):
        JobStore.begin(tmp_path / "job.zarr", "fp").load_round(0)


def test_stores_written_without_checksums_are_still_read(saved, tmp_path, rng):
    """A store as dgnh wrote it before the crc32c codec: every array copied with zarr's
    default codecs."""
    op, path = saved("hybrid")
    old = tmp_path / "old.zarr"
    src = zarr.open_group(path, mode="r")

    def copy(group, into):
        into.attrs.update(dict(group.attrs))
        for name, arr in group.arrays():
            z = into.create_array(name, shape=arr.shape, dtype=arr.dtype, chunks=arr.chunks,
                                  attributes=dict(arr.attrs),
                                  config={"write_empty_chunks": True})
            z[...] = arr[...]
        for name, sub in group.groups():
            copy(sub, into.create_group(name))

    copy(src, zarr.create_group(old, zarr_format=3))
    assert not any("crc32c" in codecs for codecs in _array_paths(old).values())
    V = rng.normal(size=(op.shape[0], 2))
    assert np.array_equal(dgnh.open(old) @ V, op @ V)
    assert store.read_factorization(old)["logdet"] == store.read_factorization(path)["logdet"]
