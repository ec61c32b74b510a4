"""Pictures of a result: what the labels say, against dense references (issue 13, item 6)."""

from __future__ import annotations

import re

import numpy as np
import pytest
from cases import random_targets, relu_mlp_with_dead_unit
from matplotlib.figure import Figure

import dgnh
from dgnh import store
from dgnh.compress import compress
from dgnh.plot import plot_spectrum, plot_structure
from dgnh.summary import summary


@pytest.fixture(scope="module")
def gn():
    net = relu_mlp_with_dead_unit(10)  # a dead unit: exactly zero rows of G
    X = np.random.default_rng(3).normal(size=(60, 5))
    with dgnh.GaussNewton(net, X, random_targets("cross_entropy", 60, 3), loss="cross_entropy",
                          client="in-process") as g:
        yield g


@pytest.fixture(scope="module")
def dense(gn):
    return gn.dense()


def axes():
    return Figure().add_subplot()


@pytest.mark.parametrize("method", ["hmatrix", "hybrid"])
def test_structure_title_names_zero_rows_and_pivots_apart(gn, dense, method):
    # the pivoted-Cholesky low rank has pivots (rows the hybrid's U Uᵀ captures exactly)
    op = compress(gn, method=method, tol=1e-6, max_rank=16, leaf_size=12,
                  lowrank_method="pivoted_cholesky", progress=False)
    title = plot_structure(op, axes()).get_title()
    zero = int(np.count_nonzero(np.diag(dense) == 0))
    assert zero > 0
    if method == "hmatrix":
        assert title.endswith(f"({zero:,} zero rows, grey)")
        return
    U = op.lowrank.U
    remainder = np.diag(dense) - np.einsum("ij,ij->i", U, U)
    captured = int(np.count_nonzero((np.diag(dense) > 0)
                                    & (remainder <= 1e-12 * np.diag(dense))))
    assert captured > 0
    assert f"{captured:,} rows captured by U Uᵀ, its pivots; {zero:,} zero rows of G" in title


def test_spectrum_is_relative_to_the_norm_as_info_prints_it(gn, dense, tmp_path):
    """An indefinite H-matrix (its leaf diagonals lowered): the λ_min line and label equal
    what `dgnh info` prints, relative to ‖G‖₂."""
    op = compress(gn, method="hmatrix", tol=1e-6, max_rank=16, leaf_size=12, progress=False)
    norm = op.report["norm_estimate"]
    for leaf in op.leaf_blocks.values():
        leaf[np.diag_indices_from(leaf)] -= 0.01 * norm
    eigenvalues = np.linalg.eigvalsh(op.to_dense())
    lowest = eigenvalues[0] / norm
    assert lowest < -1e-3
    op.report = {**op.report, "indefinite": True, "min_eigenvalue_estimate": lowest}
    reg = 0.05 * norm
    ax = plot_spectrum(op, axes(), k=6, reference=np.linalg.eigvalsh(dense), reg=reg)
    lines = {line.get_label(): line for line in ax.get_lines()}
    indefinite = next(label for label in lines if label.startswith("indefinite"))
    assert indefinite == f"indefinite: λ_min ≤ {lowest:.3g}‖G‖₂ (|λ_min| shown)"
    assert lines[indefinite].get_ydata()[0] == pytest.approx(-lowest)
    assert lines[f"λ = {0.05:.3g}‖G‖₂"].get_ydata()[0] == pytest.approx(0.05)
    compressed = next(line for label, line in lines.items() if label.startswith("compressed"))
    top = np.sort(eigenvalues)[::-1][:6]
    np.testing.assert_allclose(compressed.get_ydata(), top[top > 0] / norm, rtol=1e-6)
    assert "/ ‖G‖₂" in ax.get_ylabel()
    dgnh.save(op, tmp_path / "h.zarr")
    printed = re.search(r"λ_min ≤ (\S+)‖G‖₂", summary(tmp_path / "h.zarr")).group(1)
    assert indefinite.startswith(f"indefinite: λ_min ≤ {printed}‖G‖₂")
    assert store.open(tmp_path / "h.zarr").report["min_eigenvalue_estimate"] == lowest
