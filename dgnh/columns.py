"""A tall matrix built column block by column block, in memory or spilled to disk.

:class:`ColumnStore` holds an ``n_rows × n_cols`` float64 matrix whose columns
arrive in blocks (:meth:`ColumnStore.append`) and that is read back in row
chunks with all its columns (:meth:`ColumnStore.row_chunks`): the access pattern
of a Krylov basis and its image (:class:`dgnh.nystrom.KrylovNystrom`), whose
``N × k`` size outgrows the memory at large ``N`` (two of them are 8.5 GB at
N = 1M and k = 532). Up to ``max_bytes`` it is one preallocated array; beyond,
every block is a raw file in a temporary directory, written once and read in
row chunks with plain reads (no memory map: only the chunk being worked on is
resident, the operating system's page cache keeps recently written blocks
fast to read). The directory is removed with the store (:meth:`close`, or when
it is garbage collected).
"""

from __future__ import annotations

import tempfile
import weakref
from pathlib import Path
from typing import Iterator

import numpy as np

Array = np.ndarray
CHUNK_BYTES = 64 * 2**20  # bytes of one row chunk of all the columns


class ColumnStore:
    """An ``n_rows × n_cols`` float64 matrix appended to by column blocks.

    Parameters
    ----------
    n_rows : number of rows.
    capacity : most columns it will hold.
    max_bytes : in memory when ``8·n_rows·capacity <= max_bytes``, else spilled to
        files in a temporary directory (``directory``: where to create it; default
        the system's temporary directory).

    Examples
    --------
    >>> store = ColumnStore(5, 3, max_bytes=0)  # spilled
    >>> store.append(np.arange(10.0).reshape(5, 2)); store.append(np.ones((5, 1)))
    >>> store.spilled, store.n_cols, store.to_array()[1].tolist()
    (True, 3, [2.0, 3.0, 1.0])
    >>> [(rows.start, block.shape) for rows, block in store.row_chunks(chunk_rows=4)]
    [(0, (4, 3)), (4, (1, 3))]
    >>> store.close()
    """

    def __init__(self, n_rows: int, capacity: int, max_bytes: int,
                 directory: str | None = None):
        self.n_rows, self.capacity = int(n_rows), int(capacity)
        self.spilled = 8 * self.n_rows * self.capacity > max_bytes
        self._memory = None if self.spilled else np.zeros((self.n_rows, self.capacity))
        self._blocks: list[tuple[Path, int]] = []  # spilled: (file, number of columns)
        self._dir = None
        if self.spilled:
            self._dir = tempfile.TemporaryDirectory(prefix="dgnh-columns-", dir=directory)
            self._finalizer = weakref.finalize(self, self._dir.cleanup)
        self.n_cols = 0

    @property
    def nbytes(self) -> int:
        """Bytes held in memory (0 when spilled)."""
        return 0 if self._memory is None else int(self._memory.nbytes)

    def append(self, block: Array) -> None:
        """Add the columns of ``block`` (``n_rows × b``) after the present ones."""
        block = np.asarray(block, dtype=np.float64)
        if block.ndim != 2 or block.shape[0] != self.n_rows:
            raise ValueError(f"a column block must have {self.n_rows} rows, got shape "
                             f"{block.shape}")
        b = block.shape[1]
        if self.n_cols + b > self.capacity:
            raise ValueError(f"{self.n_cols + b} columns exceed the capacity {self.capacity}")
        if self._memory is not None:
            self._memory[:, self.n_cols:self.n_cols + b] = block
        elif b:
            path = Path(self._dir.name) / f"block{len(self._blocks)}.f8"
            np.ascontiguousarray(block).tofile(path)
            self._blocks.append((path, b))
        self.n_cols += b

    def row_chunks(self, chunk_rows: int | None = None) -> Iterator[tuple[slice, Array]]:
        """``(rows, M[rows, :n_cols])`` for consecutive row ranges covering all rows.

        In memory the chunks are views; spilled, each is read from the block files
        into a fresh ``rows × n_cols`` array.
        """
        if chunk_rows is None:
            chunk_rows = max(1, CHUNK_BYTES // max(8 * self.n_cols, 1))
        for start in range(0, self.n_rows, chunk_rows):
            rows = slice(start, min(start + chunk_rows, self.n_rows))
            if self._memory is not None:
                yield rows, self._memory[rows, :self.n_cols]
                continue
            out = np.empty((rows.stop - start, self.n_cols))
            col = 0
            for path, b in self._blocks:
                with open(path, "rb") as f:
                    f.seek(8 * start * b)
                    out[:, col:col + b] = np.fromfile(f, dtype=np.float64,
                                                      count=(rows.stop - start) * b).reshape(-1, b)
                col += b
            yield rows, out

    def to_array(self) -> Array:
        """The whole matrix in memory (for small stores and tests)."""
        chunks = [chunk for _, chunk in self.row_chunks()]
        return np.vstack(chunks) if chunks else np.zeros((0, self.n_cols))

    def close(self) -> None:
        """Free the memory or remove the spill files."""
        self._memory = None
        if self._dir is not None:
            self._finalizer()
