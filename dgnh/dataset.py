"""Data sets on disk: inputs ``X`` and targets ``Y`` in a Zarr v3 store, rows chunked.

Layout (``format = "dgnh-dataset"``, ``version = 1``; docs/design.md §6)::

    <path>/                 Zarr v3 group; attributes:
        format, version     "dgnh-dataset", 1
        n_samples, n_inputs number of rows, columns of X
        target_shape        shape of one target row: [] (class labels) or [n_targets]
        x_dtype, y_dtype    numpy dtype names of X and Y
        chunk_rows          rows per chunk of X and Y
    <path>/X                (n_samples, n_inputs) float32/float64, chunks (chunk_rows, n_inputs)
    <path>/Y                (n_samples,) int64 labels or (n_samples, n_targets) floats,
                            chunks (chunk_rows, ...)

Every chunk is written, even an all-zero one, so a missing chunk means a
truncated store, and checksummed (``crc32c``), so an altered chunk is reported
as a damaged store; each array carries a ``description`` attribute.
:func:`open_dataset` checks the attributes against the arrays and the chunks
present; :meth:`Dataset.read` is what a shard task runs on a worker to fetch
its rows; :meth:`Dataset.digest` fingerprints the content (what a job's
checkpoint is tied to).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np
import zarr

from .validation import check_real_array, is_integer
from .zarr_io import (SLAB_CHUNKS, check_format, chunk_shape, open_group, read_error,
                      replacing, write_array)

Array = np.ndarray

FORMAT = "dgnh-dataset"
VERSION = 1
_DESCRIPTIONS = {"X": "inputs, one sample per row", "Y": "targets, one sample per row"}
_ATTRS = ("n_samples", "n_inputs", "target_shape", "x_dtype", "y_dtype", "chunk_rows")


@dataclass(frozen=True)
class Dataset:
    """Metadata of a validated dataset store; :meth:`read` fetches rows.

    Only metadata is held, so a ``Dataset`` is cheap to pickle and to send to a
    worker. Obtain one from :func:`open_dataset` or :func:`save_dataset`.
    """

    path: str
    n_samples: int
    n_inputs: int
    target_shape: tuple[int, ...]
    x_dtype: np.dtype
    y_dtype: np.dtype
    chunk_rows: int

    def read(self, start: int = 0, stop: int | None = None) -> tuple[Array, Array]:
        """Rows ``start:stop`` of ``X`` and ``Y`` as numpy arrays.

        Examples
        --------
        >>> import numpy as np, dgnh, tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "d.zarr")
        >>> ds = dgnh.save_dataset(path, np.ones((10, 3)), np.arange(10))
        >>> X, Y = ds.read(2, 5)
        >>> X.shape, Y.tolist()
        ((3, 3), [2, 3, 4])
        """
        stop = self.n_samples if stop is None else stop
        if not 0 <= start <= stop <= self.n_samples:
            raise ValueError(f"dataset {self.path}: rows {start}:{stop} are outside "
                             f"[0, {self.n_samples}]")
        return self._rows(open_group(self.path, what="dataset store"), start, stop)

    def _rows(self, group: zarr.Group, start: int, stop: int) -> tuple[Array, Array]:
        out = []
        for name in ("X", "Y"):
            try:
                out.append(np.asarray(group[name][start:stop]))
            except Exception as e:  # codec, I/O and missing-key errors alike
                raise read_error(f"dataset {self.path}", name, e,
                                 rows=f"rows {start}:{stop}") from None
        return out[0], out[1]

    def digest(self) -> str:
        """SHA-256 of the content: shapes and dtypes, then ``X`` and ``Y`` row by row.

        Read in slabs of whole chunks (memory: a few chunks), so it costs one
        pass over the store; equal for equal data whatever the chunking.

        Examples
        --------
        >>> import numpy as np, dgnh, tempfile, os
        >>> d = tempfile.mkdtemp()
        >>> a = dgnh.save_dataset(os.path.join(d, "a.zarr"), np.ones((9, 2)), np.arange(9))
        >>> b = dgnh.save_dataset(os.path.join(d, "b.zarr"), np.ones((9, 2)), np.arange(9),
        ...                       chunk_rows=4)
        >>> a.digest() == b.digest()
        True
        """
        h = hashlib.sha256(repr((self.n_samples, self.n_inputs, self.target_shape,
                                 self.x_dtype.str, self.y_dtype.str)).encode())
        group = open_group(self.path, what="dataset store")
        step = SLAB_CHUNKS * self.chunk_rows
        for start in range(0, self.n_samples, step):
            for block in self._rows(group, start, min(start + step, self.n_samples)):
                h.update(np.ascontiguousarray(block).tobytes())
        return h.hexdigest()


def save_dataset(path: str | os.PathLike, X, Y, chunk_rows: int | None = None,
                 overwrite: bool = False) -> Dataset:
    """Write ``X`` (n_samples, n_inputs) and ``Y`` to a new Zarr v3 dataset store.

    Parameters
    ----------
    path : directory of the store (must not exist unless ``overwrite``).
    X : real finite array ``(n_samples, n_inputs)``; stored as float32 if given
        float32, else float64.
    Y : real finite targets ``(n_samples,)`` (e.g. class labels, stored as int64
        when integer) or ``(n_samples, n_targets)``.
    chunk_rows : rows per chunk (default: about 4 MiB of ``X`` per chunk, see
        :func:`dgnh.zarr_io.chunk_shape`). A shard reads whole chunks, so a
        shard size that is a multiple of it reads each chunk once.
    overwrite : replace a dataset store (or an empty directory) at ``path``;
        anything else there is refused. The new store is written beside
        ``path`` and swapped in when complete, so a failing call loses nothing.

    Examples
    --------
    >>> import numpy as np, dgnh, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "d.zarr")
    >>> ds = dgnh.save_dataset(path, np.zeros((100, 3)), np.zeros((100, 2)), chunk_rows=32)
    >>> ds.n_samples, ds.n_inputs, ds.target_shape, ds.chunk_rows
    (100, 3, (2,), 32)
    """
    path = os.fspath(path)
    X = check_real_array(X, "X", ndim=2)
    Y = check_real_array(Y, "Y")
    n = X.shape[0]
    if n == 0 or X.shape[1] == 0:
        raise ValueError(f"X must have at least one row and one column, got shape {X.shape}")
    if Y.ndim not in (1, 2) or Y.shape[0] != n:
        raise ValueError(f"Y must have shape ({n},) or ({n}, n_targets) to match X, "
                         f"got {Y.shape}")
    X = X.astype(np.float32 if X.dtype == np.float32 else np.float64, copy=False)
    Y = Y.astype(np.int64 if np.issubdtype(Y.dtype, np.integer) else
                 (np.float32 if Y.dtype == np.float32 else np.float64), copy=False)
    if chunk_rows is None:
        chunk_rows = chunk_shape(X.shape, X.dtype.itemsize)[0]
    if not is_integer(chunk_rows) or chunk_rows <= 0:
        raise ValueError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
    with replacing(path, overwrite, FORMAT, "dataset store") as new:
        group = zarr.create_group(new, zarr_format=3)
        for name, arr in (("X", X), ("Y", Y)):
            write_array(group, name, arr, _DESCRIPTIONS[name], chunk_rows=int(chunk_rows))
        # attributes last: a store interrupted while writing has no valid metadata
        group.attrs.update(format=FORMAT, version=VERSION, n_samples=int(n),
                           n_inputs=int(X.shape[1]), target_shape=list(Y.shape[1:]),
                           x_dtype=X.dtype.name, y_dtype=Y.dtype.name,
                           chunk_rows=int(chunk_rows))
    return open_dataset(path)


def open_dataset(path: str | os.PathLike) -> Dataset:
    """Open and validate a dataset store written by :func:`save_dataset`.

    Raises ``FileNotFoundError`` for a missing path and ``ValueError`` naming
    the path and the problem for anything else: not a Zarr v3 group, another
    format or version, missing attributes or arrays, arrays that disagree with
    the attributes or with each other, missing chunks (a truncated store).

    Examples
    --------
    >>> import numpy as np, dgnh, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "d.zarr")
    >>> _ = dgnh.save_dataset(path, np.ones((10, 3)), np.ones(10))
    >>> dgnh.open_dataset(path).n_samples
    10
    """
    path = os.fspath(path)
    group = open_group(path, what="dataset store")
    attrs = dict(group.attrs)
    check_format(attrs, path, FORMAT, VERSION, "dataset")
    missing = [k for k in _ATTRS if k not in attrs]
    if missing:
        raise ValueError(f"dataset {path} lacks the attributes {missing} (truncated store?)")
    ds = Dataset(path=path, n_samples=int(attrs["n_samples"]), n_inputs=int(attrs["n_inputs"]),
                 target_shape=tuple(int(s) for s in attrs["target_shape"]),
                 x_dtype=np.dtype(attrs["x_dtype"]), y_dtype=np.dtype(attrs["y_dtype"]),
                 chunk_rows=int(attrs["chunk_rows"]))
    expected = {"X": ((ds.n_samples, ds.n_inputs), ds.x_dtype),
                "Y": ((ds.n_samples,) + ds.target_shape, ds.y_dtype)}
    for name, (shape, dtype) in expected.items():
        try:
            arr = group[name]
        except KeyError:
            raise ValueError(f"dataset {path} has no array {name!r} (truncated store?)") from None
        if not isinstance(arr, zarr.Array):
            raise ValueError(f"dataset {path}: {name!r} is not an array")
        if arr.shape != shape or arr.dtype != dtype:
            raise ValueError(f"dataset {path}: array {name!r} has shape {arr.shape} and dtype "
                             f"{arr.dtype}, but the attributes say {shape} and {dtype} "
                             f"(mismatched store)")
        if arr.chunks[0] != ds.chunk_rows:
            raise ValueError(f"dataset {path}: array {name!r} has {arr.chunks[0]} rows per "
                             f"chunk, the attributes say {ds.chunk_rows} (mismatched store)")
        if arr.nchunks_initialized != arr.nchunks:
            raise ValueError(f"dataset {path} is truncated: array {name!r} has "
                             f"{arr.nchunks_initialized} of {arr.nchunks} chunks stored")
    return ds

