"""The benchmarks' own checks: the verification rows of ``dgnh bench scale`` hold their bounds."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

import dgnh
from dgnh.benchmarks.scale import slq_logdet, teacher_problem, verification_rows


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
