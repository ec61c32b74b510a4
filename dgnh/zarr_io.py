"""Zarr v3 plumbing shared by the dataset store and the result store (docs/design.md §6).

Opening a group and checking its ``format``/``version`` attributes with clear
errors, writing arrays in chunk-aligned row slabs (every chunk written, so a
missing chunk means a truncated store; every chunk checksummed with the
``crc32c`` codec, so an altered chunk is detected), reading them back with
clear errors, and the rules for replacing an output: a new store is written
beside the old one and swapped in when complete (:func:`replacing`), so a
failing write never loses what was stored.

Examples
--------
>>> import numpy as np, tempfile, os, zarr
>>> path = os.path.join(tempfile.mkdtemp(), "g.zarr")
>>> group = zarr.create_group(path, zarr_format=3)
>>> _ = write_array(group, "a", np.arange(6.0).reshape(3, 2), "six numbers")
>>> read_array(open_group(path), "a", path).sum()
np.float64(15.0)
"""

from __future__ import annotations

import os
import secrets
import shutil
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

Array = np.ndarray
CHUNK_BYTES = 4 * 2**20  # target bytes of one chunk
SLAB_CHUNKS = 16  # chunks written per call in write_rows
# zarr's default compression, then a CRC-32C of every compressed chunk (checked on read)
COMPRESSORS = (ZstdCodec(level=0), Crc32cCodec())


def chunk_shape(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """Row chunks of about ``CHUNK_BYTES`` (whole trailing dimensions).

    Examples
    --------
    >>> chunk_shape((10**6, 8), 8)
    (65536, 8)
    """
    row_bytes = itemsize * int(np.prod([max(s, 1) for s in shape[1:]]))
    rows = max(1, min(max(shape[0], 1), CHUNK_BYTES // row_bytes))
    return (rows,) + tuple(max(s, 1) for s in shape[1:])


def write_rows(array: zarr.Array, start: int, values: Array) -> None:
    """Write ``values`` into rows ``start:start+len(values)`` of ``array``.

    The region must be chunk-aligned (it starts on a chunk boundary and ends on
    one or at the end of the array), so concurrent writers — e.g. one task per
    region on different workers — never touch the same chunk.

    Examples
    --------
    >>> z = zarr.create_array(zarr.storage.MemoryStore(), shape=(10,), chunks=(4,), dtype="f8")
    >>> write_rows(z, 4, np.ones(6))
    >>> write_rows(z, 2, np.ones(2))
    Traceback (most recent call last):
    ...
    ValueError: rows 2:4 of array '' are not aligned to its chunks of 4 rows (shape (10,))
    """
    rows = array.chunks[0]
    stop = start + len(values)
    if start % rows or (stop % rows and stop != array.shape[0]) or stop > array.shape[0]:
        raise ValueError(f"rows {start}:{stop} of array {array.path!r} are not aligned to its "
                         f"chunks of {rows} rows (shape {array.shape})")
    array[start:stop] = values


def write_array(group: zarr.Group, name: str, data: Array, description: str,
                chunk_rows: int | None = None) -> zarr.Array:
    """A new array ``group/name`` holding ``data``, written in chunk-aligned slabs.

    ``chunk_rows`` rows per chunk (default: about ``CHUNK_BYTES`` per chunk);
    every chunk is written, even an all-zero one, compressed and checksummed
    (:data:`COMPRESSORS`). The array's ``description`` attribute says what it holds.
    """
    data = np.ascontiguousarray(data)
    chunks = chunk_shape(data.shape, data.dtype.itemsize)
    if chunk_rows is not None:
        chunks = (chunk_rows,) + chunks[1:]
    z = group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=chunks,
                           overwrite=True, attributes={"description": description},
                           compressors=COMPRESSORS, config={"write_empty_chunks": True})
    slab = SLAB_CHUNKS * z.chunks[0]
    for start in range(0, data.shape[0], slab):
        write_rows(z, start, data[start:start + slab])
    return z


def read_array(group: zarr.Group, name: str, where: str) -> Array:
    """``group[name]`` as numpy; clear errors for a missing or truncated array."""
    try:
        z = group[name]
    except KeyError:
        raise ValueError(f"{where}: array {name!r} is missing (incomplete or damaged "
                         f"store)") from None
    if not isinstance(z, zarr.Array):
        raise ValueError(f"{where}: {name!r} is not an array")
    if z.nchunks_initialized != z.nchunks:
        raise ValueError(f"{where} is truncated: array {name!r} has {z.nchunks_initialized} "
                         f"of its {z.nchunks} chunks")
    try:
        return np.asarray(z[...])
    except Exception as e:  # codec and I/O errors alike
        raise read_error(where, name, e) from None


def read_error(where: str, name: str, error: Exception, rows: str = "") -> ValueError:
    """The one-line error for a chunk of array ``name`` that cannot be read.

    A failed ``crc32c`` checksum says the store is damaged (a chunk altered on
    disk); ``rows`` names the rows being read, if not the whole array.

    Examples
    --------
    >>> print(read_error("result store r.zarr", "U", ValueError("Stored and computed "
    ...                  "checksum do not match.")))  # doctest: +ELLIPSIS
    damaged store: result store r.zarr: cannot read array 'U': a chunk fails its checksum ...
    """
    what = f"{rows} of array {name!r}" if rows else f"array {name!r}"
    if "checksum" in str(error).lower():
        return ValueError(f"damaged store: {where}: cannot read {what}: a chunk fails its "
                          "checksum (altered on disk); restore the store from a copy or "
                          "write it again")
    first = str(error).splitlines()[0] if str(error) else type(error).__name__
    return ValueError(f"{where}: cannot read {what} (damaged or truncated chunk?): {first}")


def open_group(path: str, mode: str = "r", what: str = "result store") -> zarr.Group:
    """The Zarr v3 group at ``path`` (``what`` names it in errors).

    ``FileNotFoundError`` for a missing path, ``ValueError`` for anything that
    is not a Zarr v3 group.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        return zarr.open_group(path, mode=mode, zarr_format=3)
    except Exception as e:  # zarr raises several types for "not a v3 group"
        raise ValueError(f"{path} is not a Zarr v3 group ({type(e).__name__}: {e})") from None


def check_format(attrs: dict[str, Any], path: str, format: str, version: int,
                 what: str) -> None:
    """``ValueError`` unless ``attrs`` name the store format ``format`` at ``version``.

    ``what`` is the kind of dgnh store (``"dataset"``, ``"result"``) in the message.

    Examples
    --------
    >>> check_format({"format": "dgnh-result", "version": 2}, "r.zarr", "dgnh-result", 1,
    ...              "result")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: result r.zarr has unsupported version 2 (dgnh-result format version 2; ...)
    """
    if attrs.get("format") != format:
        raise ValueError(f"{path} is not a dgnh {what} store: format attribute is "
                         f"{attrs.get('format')!r}, expected {format!r}")
    if attrs.get("version") != version:
        found = attrs.get("version")
        raise ValueError(f"{what} {path} has unsupported version {found!r} ({format} format "
                         f"version {found!r}; this dgnh reads version {version}: upgrade dgnh?)")


def check_new_output(path: str, overwrite: bool, what: str = "output") -> None:
    """``FileExistsError`` if ``path`` exists and ``overwrite`` is not set."""
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(f"{what} {path} already exists: pass overwrite=True "
                              f"(--overwrite) to replace it")


def check_replaceable(path: str, overwrite: bool, format: str, what: str) -> None:
    """Refuse, before anything is written, an output ``path`` that must not be replaced.

    Nothing at ``path``: fine. Otherwise ``FileExistsError`` unless
    ``overwrite``, and even then unless ``path`` is an empty directory or a
    dgnh store of this ``format`` (a ``"dgnh-result"`` or ``"dgnh-dataset"``
    Zarr group): a file or any other directory is never replaced.

    Examples
    --------
    >>> import tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "thesis.tex")
    >>> _ = open(path, "w").write("...")
    >>> check_replaceable(path, True, "dgnh-dataset", "dataset store")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    FileExistsError: refusing to replace .../thesis.tex: it is a file, not a dgnh dataset store
    """
    check_new_output(path, overwrite, what)
    if not os.path.lexists(path):
        return
    kind = format.replace("-", " ")  # "dgnh result"
    if not os.path.isdir(path):
        raise FileExistsError(f"refusing to replace {path}: it is a file, not a {kind} store")
    if not os.listdir(path):
        return
    try:
        found = zarr.open_group(path, mode="r", zarr_format=3).attrs.get("format")
    except Exception:  # not a Zarr v3 group
        raise FileExistsError(f"refusing to replace {path}: it is a directory that is not a "
                              f"Zarr store, let alone a {kind} store") from None
    if found != format:
        raise FileExistsError(f"refusing to replace {path}: it is a Zarr store but not a "
                              f"{kind} store (format attribute {found!r}); remove it yourself "
                              "if it may go")


def staging_path(path: str) -> str:
    """Where a store replacing ``path`` is written before it is swapped in (a hidden sibling).

    Examples
    --------
    >>> staging_path("/data/out.zarr")
    '/data/.out.zarr.dgnh-new'
    """
    parent, base = os.path.split(os.path.abspath(path))
    return os.path.join(parent, f".{base}.dgnh-new")


def swap_in(new: str, path: str) -> None:
    """Move the complete store ``new`` to ``path``; what was at ``path`` goes last.

    The old store is first renamed aside (a hidden sibling), so at every
    moment either it or the new one is complete on disk.
    """
    old = None
    if os.path.lexists(path):
        parent, base = os.path.split(os.path.abspath(path))
        old = os.path.join(parent, f".{base}.dgnh-old-{os.getpid()}-{secrets.token_hex(4)}")
        os.rename(path, old)
    try:
        os.rename(new, path)
    except BaseException:
        if old is not None:
            os.rename(old, path)
        raise
    if old is not None:
        remove_path(old)


@contextmanager
def replacing(path: str, overwrite: bool, format: str, what: str) -> Iterator[str]:
    """Write a new store for ``path`` at a staging path, swapped in when the block succeeds.

    Checks first (:func:`check_replaceable`); the block writes the store at
    the path it is given. If the block fails, the staging store is removed and
    whatever was at ``path`` is untouched.

    Examples
    --------
    >>> import tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "a.zarr")
    >>> with replacing(path, False, "dgnh-dataset", "dataset store") as new:
    ...     _ = zarr.create_group(new, zarr_format=3, attributes={"format": "dgnh-dataset"})
    >>> zarr.open_group(path, mode="r").attrs["format"]
    'dgnh-dataset'
    """
    check_replaceable(path, overwrite, format, what)
    new = staging_path(path)
    remove_path(new)  # a leftover of an interrupted write
    try:
        yield new
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    swap_in(new, path)


def remove_path(path: str) -> None:
    """Delete an output being overwritten: a file, an empty directory or a Zarr store.

    A directory that holds other things (no ``zarr.json`` at its top) is never
    deleted: ``FileExistsError``.
    """
    if os.path.isdir(path) and not os.path.islink(path):
        if os.listdir(path) and not os.path.isfile(os.path.join(path, "zarr.json")):
            raise FileExistsError(f"refusing to replace {path}: it is a directory that is not "
                                  "a Zarr store")
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)
