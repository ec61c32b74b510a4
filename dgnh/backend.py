"""Where the shards live: the in-process backend and the backend protocol.

A backend owns the :class:`~dgnh.shard_factors.ShardFactors` of every shard and runs
one method call per shard per request batch:

* ``map(method, args)`` — ``getattr(shard, method)(*args[s])`` on every shard
  ``s``, results in shard order;
* ``sum(method, args)`` — the same, added up over shards (arrays, floats and
  lists of arrays add elementwise);
* ``close()``.

``args`` is either one tuple shared by all shards or a list with one tuple per
shard. :class:`LocalBackend` runs in this process; :mod:`dgnh.cluster` runs the
same calls on a Dask cluster.
"""

from __future__ import annotations

from functools import reduce
from typing import Any, Sequence

import numpy as np

from .shard_factors import ShardFactors


def add_partials(a: Any, b: Any) -> Any:
    """Add two partial results: arrays/floats, or lists of them elementwise."""
    if isinstance(a, list):
        return [add_partials(x, y) for x, y in zip(a, b)]
    return a + b


def per_shard(args, n_shards: int) -> list[tuple]:
    """Normalise ``args`` to a list of one argument tuple per shard."""
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
    """Row ranges ``[(start, stop), ...]`` of consecutive shards."""
    return [(s, min(s + shard_size, n_samples)) for s in range(0, n_samples, shard_size)]


class LocalBackend:
    """All shards in this process."""

    def __init__(self, shards: Sequence[ShardFactors]):
        self.shards = list(shards)

    @property
    def n_shards(self) -> int:
        return len(self.shards)

    def map(self, method: str, args=()) -> list:
        require_shards(self.n_shards)
        return [getattr(s, method)(*a) for s, a in zip(self.shards, per_shard(args, self.n_shards))]

    def sum(self, method: str, args=()):
        return reduce(add_partials, self.map(method, args))

    def close(self) -> None:
        self.shards = []

    @property
    def factor_bytes(self) -> int:
        return int(sum(s.nbytes for s in self.shards))


def default_shard_size(model, dtype) -> int:
    """Rows per shard so that one shard's factors take about 128 MiB."""
    sizes = model.layer_sizes
    per_row = sizes[-1] * sum(sizes[1:]) + 3 * sum(s + 1 for s in sizes[:-1]) + sum(sizes[1:])
    return max(1, (128 * 2**20) // (per_row * np.dtype(dtype).itemsize))
