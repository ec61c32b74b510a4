"""Flat-array packing shared by the operators' ``to_arrays`` and the Zarr store.

Ragged pieces (interpolation matrices, coupling and near blocks) are packed into
one value array with an offset and a shape table, never one array per block.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

Array = np.ndarray


def pack_blocks(blocks: Sequence[Array]) -> tuple[Array, Array, Array]:
    """Ragged 2-D blocks → ``(offsets (n+1,), shapes (n, 2), values (Σ sizes,))``.

    Examples
    --------
    >>> off, shp, val = pack_blocks([np.ones((2, 3)), np.zeros((1, 1))])
    >>> off.tolist(), shp.tolist(), val.size
    ([0, 6, 7], [[2, 3], [1, 1]], 7)
    """
    shapes = np.array([np.shape(b) for b in blocks], dtype=np.int64).reshape(-1, 2)
    offsets = np.concatenate([[0], np.cumsum(shapes.prod(axis=1))]).astype(np.int64)
    dtype = np.result_type(*blocks) if len(blocks) else np.float64
    values = (np.concatenate([np.asarray(b, dtype=dtype).ravel() for b in blocks])
              if len(blocks) else np.zeros(0, dtype=dtype))
    return offsets, shapes, values


def packed_nbytes(blocks: Sequence[Array]) -> int:
    """Bytes of :func:`pack_blocks`'s three arrays, without packing (no copy of the blocks).

    Examples
    --------
    >>> blocks = [np.ones((2, 3)), np.zeros((1, 1))]
    >>> packed_nbytes(blocks) == sum(a.nbytes for a in pack_blocks(blocks))
    True
    """
    n = len(blocks)
    itemsize = (np.result_type(*blocks) if n else np.dtype(np.float64)).itemsize
    return 8 * (n + 1) + 16 * n + itemsize * int(sum(np.size(b) for b in blocks))


def unpack_blocks(offsets: Array, shapes: Array, values: Array,
                  what: str = "packed blocks") -> list[Array]:
    """The inverse of :func:`pack_blocks`; checks the tables and finiteness first.

    Raises ``ValueError`` naming ``what`` when the offset/shape tables do not
    describe ``values`` or the values hold NaN/Inf (a damaged or edited store).
    """
    offsets, shapes, values = np.asarray(offsets), np.asarray(shapes), np.asarray(values)
    n = len(shapes)
    if (shapes.ndim != 2 or offsets.shape != (n + 1,) or (n and shapes.shape[1] != 2)
            or offsets[0] != 0 or np.any(shapes < 0)
            or not np.array_equal(np.diff(offsets), shapes.prod(axis=1))
            or offsets[-1] != values.size):
        raise ValueError(f"{what}: the offset/shape tables do not match the {values.size} "
                         "stored values (damaged store?)")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{what}: the stored values contain NaN or Inf (damaged store?)")
    return [values[offsets[i]:offsets[i + 1]].reshape(shapes[i]) for i in range(n)]


def jsonable(obj: Any) -> Any:
    """Plain JSON values: numpy scalars/arrays → Python, tuples → lists, keys → str,
    non-finite floats → ``None``."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
