"""Where the shards live: the in-process backend and the helpers every backend shares.

A backend (the :class:`~dgnh.protocols.Backend` protocol) owns the
:class:`~dgnh.shard_factors.ShardFactors` of every shard and runs one call per
shard per request batch:

* ``map(func, args)`` — ``func(shard, *args[s])`` on every shard ``s``, results
  in shard order; ``func`` is usually a ``ShardFactors`` method itself, e.g.
  ``backend.map(ShardFactors.sq_norm_sums, (loc,))``;
* ``sum(func, args)`` — the same, added up over shards (arrays, floats and
  lists of arrays add elementwise);
* ``run(func, *args)``, ``close()``, ``n_shards``, ``n_workers``, ``factor_bytes``.

``args`` is either one tuple shared by all shards or a list with one tuple per
shard. :class:`LocalBackend` runs in this process; :mod:`dgnh.cluster` runs the
same calls on a Dask cluster.
"""

from __future__ import annotations

from functools import reduce
from typing import Any, Callable, Sequence

import numpy as np

from .shard_factors import ShardFactors


def add_partials(a: Any, b: Any) -> Any:
    """Add two partial results: arrays/floats, or lists of them elementwise.

    Examples
    --------
    >>> add_partials([1.0, 2.0], [10.0, 20.0])
    [11.0, 22.0]
    """
    if isinstance(a, list):
        return [add_partials(x, y) for x, y in zip(a, b)]
    return a + b


def per_shard(args: tuple | Sequence[tuple], n_shards: int) -> list[tuple]:
    """Normalise ``args`` to a list of one argument tuple per shard.

    Examples
    --------
    >>> per_shard((1,), 2), per_shard([(1,), (2,)], 2)
    ([(1,), (1,)], [(1,), (2,)])
    """
    if isinstance(args, tuple):
        return [args] * n_shards
    if len(args) != n_shards:
        raise ValueError(f"got {len(args)} argument tuples for {n_shards} shards")
    return list(args)


def require_shards(n_shards: int) -> None:
    """Refuse work on a closed backend (like a closed file: ``ValueError``)."""
    if n_shards == 0:
        raise ValueError("the GaussNewton is closed: its shards were released "
                         "(create a new GaussNewton)")


def shard_bounds(n_samples: int, shard_size: int) -> list[tuple[int, int]]:
    """Row ranges ``[(start, stop), ...]`` of consecutive shards.

    Examples
    --------
    >>> shard_bounds(5, 2)
    [(0, 2), (2, 4), (4, 5)]
    """
    return [(s, min(s + shard_size, n_samples)) for s in range(0, n_samples, shard_size)]


class LocalBackend:
    """All shards in this process, one call after the other.

    Examples
    --------
    >>> import numpy as np
    >>> backend = LocalBackend([np.arange(3), np.arange(3, 6)])
    >>> int(backend.sum(np.ndarray.sum)), [int(m) for m in backend.map(np.ndarray.max)]
    (15, [2, 5])
    """

    def __init__(self, shards: Sequence[ShardFactors]):
        self.shards = list(shards)

    @property
    def n_shards(self) -> int:
        return len(self.shards)

    @property
    def n_workers(self) -> int:
        """1: every call runs in this process."""
        return 1

    @property
    def factor_bytes(self) -> int:
        return int(sum(s.nbytes for s in self.shards))

    def map(self, func: Callable[..., Any], args: tuple | Sequence[tuple] = ()) -> list:
        require_shards(self.n_shards)
        return [func(s, *a) for s, a in zip(self.shards, per_shard(args, self.n_shards))]

    def sum(self, func: Callable[..., Any], args: tuple | Sequence[tuple] = ()) -> Any:
        return reduce(add_partials, self.map(func, args))

    def run(self, func: Callable[..., Any], *args: Any) -> Any:
        return func(*args)

    def close(self) -> None:
        self.shards = []


def default_shard_size(model, dtype) -> int:
    """Rows per shard so that one shard's factors take about 128 MiB."""
    sizes = model.layer_sizes
    per_row = sizes[-1] * sum(sizes[1:]) + 3 * sum(s + 1 for s in sizes[:-1]) + sum(sizes[1:])
    return max(1, (128 * 2**20) // (per_row * np.dtype(dtype).itemsize))
