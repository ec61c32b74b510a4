"""The benchmarks' own checks: the verification rows of ``dgnh bench scale`` hold their bounds."""

from __future__ import annotations

import argparse
import csv
import mmap
import time

import numpy as np
import pytest

import dgnh
from dgnh.benchmarks.scale import slq_logdet, teacher_problem, verification_rows
from dgnh.benchmarks.timeline import ResidentTimeline, resident_gib
from dgnh.operator import Operator
from dgnh.phases import current_phase, phase


@pytest.fixture(scope="module")
def small_gn():
    net, X, y = teacher_problem(3e3, 60, seed=0)
    with dgnh.GaussNewton(net, X, y, loss="cross_entropy", client="in-process") as gn:
        yield gn


@pytest.mark.parametrize("method, rank, reg", [
    ("lowrank", 16, 1e-2), ("lowrank", 48, 1e-3), ("hmatrix", 16, 1e-2), ("hybrid", 16, 1e-3)])
def test_every_verification_holds_its_bound(small_gn, method, rank, reg):
    args = argparse.Namespace(rank=rank, tol=1e-6, reg=reg, eigenvalues=10, probes=24,
                              steps=60, checks=6, seed=0, method=method, leaf_size=64)
    rows = verification_rows(small_gn, "small", args, np.random.default_rng(1))
    checked = [r for r in rows if r[-1] != ""]
    assert len(checked) == 3
    for row in checked:
        assert row[-1] is True, row
        assert row[8] <= row[9]  # |difference| ≤ allowed


def test_slq_logdet_covers_the_dense_value_over_seeds(small_gn):
    G = small_gn.dense()
    lam = 1e-2 * np.linalg.norm(G, 2)
    exact = np.linalg.slogdet(G + lam * np.eye(len(G)))[1]
    inside = 0
    for seed in range(40):
        value, half = slq_logdet(small_gn, lam, n_vectors=8, n_steps=40, seed=seed)
        inside += abs(value - exact) <= half
    assert inside >= 32  # a 95% interval (from 8 probes) covers the exact value


def test_resident_timeline_attributes_an_allocation_to_its_phase(tmp_path):
    held = 256 * 2**20  # bytes of fresh pages (an anonymous map, whatever malloc keeps)
    with ResidentTimeline(interval=0.01) as timeline:
        with phase("idle"):
            time.sleep(0.15)
        before = resident_gib()
        with phase("hold"), mmap.mmap(-1, held) as block:
            np.frombuffer(block, dtype=np.uint8)[::4096] = 1  # touch every page
            time.sleep(0.15)
    peaks = {name: gib for name, _, _, gib in timeline.peaks()}
    assert peaks["hold"] - before >= 0.9 * held / 2**30
    assert peaks["idle"] < peaks["hold"]
    csv_path, png_path = timeline.write(tmp_path / "timeline", title="test")
    with open(csv_path) as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["seconds", "resident_gib", "phase"] and len(rows) == len(timeline.samples) + 1
    assert {r[2] for r in rows[1:]} >= {"idle", "hold"}
    assert open(png_path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


class PhaseRecorder(Operator):
    """The GNH of ``gn``, recording the phase of every entry round and product."""

    def __init__(self, gn):
        self.gn, self.n_params, self.seen = gn, gn.n_params, set()
        self.shape, self.dtype = gn.shape, np.dtype(np.float64)

    def diagonal(self):
        return self.gn.diagonal()

    def entries_many(self, requests, **options):
        self.seen.add(current_phase())
        return self.gn.entries_many(requests, **options)

    def _matmat(self, V):
        self.seen.add(current_phase())
        return self.gn @ V


def test_compress_names_its_phases(small_gn):
    recorder = PhaseRecorder(small_gn)
    options = dict(method="hybrid", tol=0.5, max_rank=16, leaf_size=64, progress=False)
    with phase("bench"):
        H = dgnh.compress(recorder, **options)
    V = np.random.default_rng(0).standard_normal((small_gn.n_params, 3))
    assert np.allclose(H @ V, dgnh.compress(small_gn, **options) @ V, rtol=0, atol=1e-12)
    for expected in ["bench/norm", "bench/hybrid/lowrank", "bench/hybrid/remainder norm",
                     "bench/hybrid/hmatrix/tree/", "bench/hybrid/hmatrix/skeletons/couplings level",
                     "bench/hybrid certificate"]:  # entry rounds add what they fetch
        assert any(p.startswith(expected) for p in recorder.seen), (expected, recorder.seen)
    assert current_phase() == ""
