"""ColumnStore: column blocks in, row chunks out, in memory and spilled, against the plain matrix."""

from __future__ import annotations

import os

import numpy as np
import pytest

from dgnh.columns import ColumnStore

# (rows, block widths, row chunk): one block, several, a single row, chunks of every size
CASES = [(7, [3], 2), (50, [4, 1, 6], 7), (1, [2, 2], 1), (33, [5, 5], 33), (20, [1] * 9, 64)]


@pytest.mark.parametrize("n_rows, widths, chunk", CASES)
@pytest.mark.parametrize("max_bytes", [0, 10**9])  # spilled, in memory
def test_row_chunks_equal_the_matrix(n_rows, widths, chunk, max_bytes, tmp_path):
    rng = np.random.default_rng(n_rows)
    blocks = [rng.normal(size=(n_rows, w)) for w in widths]
    store = ColumnStore(n_rows, sum(widths) + 1, max_bytes, directory=str(tmp_path))
    for B in blocks:
        store.append(B)
    M = np.hstack(blocks)
    assert store.spilled == (max_bytes == 0) and store.n_cols == M.shape[1]
    assert store.nbytes == (0 if store.spilled else 8 * n_rows * (sum(widths) + 1))
    np.testing.assert_array_equal(store.to_array(), M)
    seen = np.zeros(n_rows, dtype=int)
    for rows, part in store.row_chunks(chunk):
        np.testing.assert_array_equal(part, M[rows])
        seen[rows] += 1
    assert (seen == 1).all()
    store.close()
    assert not list(tmp_path.iterdir())  # the spill directory is gone


@pytest.mark.parametrize("block, match", [
    (np.ones((4, 2)), "a column block must have 5 rows, got shape \\(4, 2\\)"),
    (np.ones(5), "a column block must have 5 rows, got shape \\(5,\\)"),
    (np.ones((5, 4)), "4 columns exceed the capacity 3"),
])
def test_bad_blocks_are_named(block, match):
    store = ColumnStore(5, 3, max_bytes=0)
    with pytest.raises(ValueError, match=match):
        store.append(block)
    assert store.n_cols == 0
    store.close()


def test_spill_directory_removed_when_collected(tmp_path):
    store = ColumnStore(4, 2, 0, directory=str(tmp_path))
    store.append(np.ones((4, 2)))
    assert len(os.listdir(tmp_path)) == 1
    del store
    assert not os.listdir(tmp_path)
