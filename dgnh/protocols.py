"""The declared interfaces between dgnh's layers (typing only, no behaviour).

* :class:`Backend` — where the shards live: :class:`~dgnh.backend.LocalBackend`
  (this process) and :class:`~dgnh.cluster.DaskBackend` (a Dask cluster). A
  :class:`~dgnh.gauss_newton.GaussNewton` sends it per-shard calls: a function
  taking a :class:`~dgnh.shard_factors.ShardFactors` first, usually one of its
  methods itself (``backend.sum(ShardFactors.gnh_matvec, (V,))``; unbound methods
  pickle by reference, so they travel to Dask workers by name).
* :class:`EntrySource` — what the compressions (:mod:`dgnh.lowrank`,
  :mod:`dgnh.hmatrix`, :mod:`dgnh.compress`) read a matrix through: its size,
  its diagonal, batches of blocks (exact or sampled, docs/design.md §3) and exact
  products. :class:`~dgnh.gauss_newton.GaussNewton`,
  :class:`~dgnh.checkpoint.CheckpointedGaussNewton` and
  :class:`~dgnh.hybrid.RemainderSource` implement it. An entry source may also
  have a ``stats`` dict counting the entries it evaluated (``entries_exact``,
  ``entries_sampled``, ``blocks``), which compression reports copy.

Both protocols are ``runtime_checkable``: ``isinstance(obj, EntrySource)``
checks that the members exist (not their signatures; ``tests/test_protocols.py``
checks those).

Examples
--------
>>> import numpy as np
>>> class Dense:
...     def __init__(self, G): self.G, self.n_params = G, len(G)
...     def diagonal(self): return np.diag(self.G).copy()
...     def entries_many(self, requests, eps=None, delta=0.01, seed=0):
...         return [self.G[np.ix_(r, c)] for r, c in requests]
...     def matvec(self, V): return self.G @ V
>>> isinstance(Dense(np.eye(3)), EntrySource)
True
"""

from __future__ import annotations

from typing import (TYPE_CHECKING, Any, Callable, Concatenate, Protocol, Sequence,
                    runtime_checkable)

import numpy as np

if TYPE_CHECKING:
    from .shard_factors import ShardFactors

Array = np.ndarray


@runtime_checkable
class Backend(Protocol):
    """The shards of a GNH and the per-shard calls on them (docs/design.md §2, §5).

    ``args`` of :meth:`map` and :meth:`sum` is one argument tuple shared by all
    shards, or a sequence with one tuple per shard; ``func(shard, *args[s])``
    runs on shard ``s``. A closed backend (no shards) refuses calls with a
    ``ValueError``.
    """

    @property
    def n_shards(self) -> int:
        """Number of shards (0 once closed)."""

    @property
    def n_workers(self) -> int:
        """Number of processes or Dask workers the shards are spread over."""

    @property
    def factor_bytes(self) -> int:
        """Bytes of the precomputed factors of all shards (0 once closed)."""

    def map(self, func: Callable[Concatenate[ShardFactors, ...], Any],
            args: tuple | Sequence[tuple] = ()) -> list:
        """``func(shard, *args[s])`` on every shard, results in shard order."""

    def sum(self, func: Callable[Concatenate[ShardFactors, ...], Any],
            args: tuple | Sequence[tuple] = ()) -> Any:
        """The results of :meth:`map` added up over shards (lists add elementwise)."""

    def run(self, func: Callable[..., Any], *args: Any) -> Any:
        """``func(*args)`` once, where the shards live (e.g. to read store metadata)."""

    def close(self) -> None:
        """Release the shards and whatever this backend started."""


@runtime_checkable
class EntrySource(Protocol):
    """A symmetric ``n_params × n_params`` matrix read by entries and products.

    Optional: a ``stats`` dict of evaluated-entry counts (see the module docstring).
    """

    n_params: int

    def diagonal(self) -> Array:
        """The diagonal, shape ``(n_params,)``."""

    def entries_many(self, requests: Sequence[tuple], eps: float | None = None,
                     delta: float = 0.01, seed: int = 0) -> list[Array]:
        """Blocks ``[G[rows1, cols1], ...]`` for ``requests = [(rows1, cols1), ...]``.

        Exact for ``eps=None``; else every entry within ``eps·√(G_aa G_bb)`` with
        probability ≥ ``1 − delta`` (docs/design.md §3), reproducible by ``seed``.
        """

    def matvec(self, V: Array) -> Array:
        """The exact product with a vector ``(n_params,)`` or a block ``(n_params, k)``."""
