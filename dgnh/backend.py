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
shard. :class:`LocalBackend` runs the calls of a batch in this process, one
after the other or on a thread pool (numpy and BLAS release the GIL), with BLAS
limited so that threads × BLAS threads stay within the cores;
:mod:`dgnh.cluster` runs the same calls on a Dask cluster.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import reduce
from typing import Any, Callable, Sequence

import numpy as np

from .config import available_cores
from .losses import get_loss
from .model import MLP
from .shard_factors import ShardFactors
from .validation import check_int, is_integer

Array = np.ndarray


SPLIT_EVERY = 4  # partial results added by one node of the reduction tree


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


def tree_sum(parts: Sequence[Any]) -> Any:
    """Add partial results in shard order by the reduction tree of every backend.

    Groups of ``SPLIT_EVERY`` consecutive partials are added, level by level,
    as :class:`~dgnh.cluster.DaskBackend` does with one task per group: a sum
    rounds the same in this process, on threads and on any cluster.

    Examples
    --------
    >>> tree_sum([1e16, 0.0, 0.0, 0.0, 1.0, 1.0]) - 1e16  # (1e16 + 0 + 0 + 0) + (1 + 1)
    2.0
    """
    parts = list(parts)
    while len(parts) > 1:
        parts = [reduce(add_partials, parts[i:i + SPLIT_EVERY])
                 for i in range(0, len(parts), SPLIT_EVERY)]
    return parts[0]


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
    """All shards in this process: one call after the other, or on a thread pool.

    Parameters
    ----------
    shards : the shards (:class:`~dgnh.shard_factors.ShardFactors`), or none
        yet: :meth:`create_shards` builds them.
    threads : shards worked on at once (default 1: one after the other). With
        more, the calls of a batch run on a ``ThreadPoolExecutor`` and BLAS is
        limited to ``max(1, available_cores() // threads)`` threads while the
        batch runs (threadpoolctl, process-wide), so threads × BLAS threads do
        not oversubscribe the cores. Results do not depend on ``threads``:
        partial sums are added in shard order.

    Examples
    --------
    >>> import numpy as np
    >>> backend = LocalBackend([np.arange(3), np.arange(3, 6)], threads=2)
    >>> int(backend.sum(np.ndarray.sum)), [int(m) for m in backend.map(np.ndarray.max)]
    (15, [2, 5])
    >>> backend.close()
    """

    def __init__(self, shards: Sequence[ShardFactors] = (), threads: int = 1):
        self.shards = list(shards)
        self.threads = check_int(threads, "threads", minimum=1)
        self._pool = (ThreadPoolExecutor(self.threads, thread_name_prefix="dgnh-shard")
                      if self.threads > 1 else None)
        self._blas = None  # threadpoolctl controller of the BLAS libraries, on first use

    @property
    def n_shards(self) -> int:
        return len(self.shards)

    @property
    def n_workers(self) -> int:
        """Threads working on shards at once (1: one call after the other)."""
        return self.threads

    @property
    def factor_bytes(self) -> int:
        return int(sum(s.nbytes for s in self.shards))

    def create_shards(self, tasks: Sequence[tuple[Callable, tuple]]) -> None:
        """Build the shards ``make(*args)`` of ``tasks = [(make, args), ...]`` (on the pool)."""
        self.shards = self._each(lambda task: task[0](*task[1]), list(tasks))

    def map(self, func: Callable[..., Any], args: tuple | Sequence[tuple] = ()) -> list:
        require_shards(self.n_shards)
        calls = list(zip(self.shards, per_shard(args, self.n_shards)))
        return self._each(lambda call: func(call[0], *call[1]), calls)

    def sum(self, func: Callable[..., Any], args: tuple | Sequence[tuple] = ()) -> Any:
        """The calls of :meth:`map` added up by :func:`tree_sum`."""
        return tree_sum(self.map(func, args))

    def run(self, func: Callable[..., Any], *args: Any) -> Any:
        return func(*args)

    def close(self) -> None:
        self.shards = []
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def _each(self, call: Callable[[Any], Any], items: list) -> list:
        """``[call(x) for x in items]``, on the pool when there is one and work for it.

        On an error or an interrupt, calls not started yet are cancelled; the
        first error in item order is raised.
        """
        if self._pool is None or len(items) < 2:
            return [call(x) for x in items]
        with self._blas_limit():
            futures = [self._pool.submit(call, x) for x in items]
            try:
                return [f.result() for f in futures]
            finally:
                for f in futures:
                    f.cancel()

    def _blas_limit(self):
        """A context limiting BLAS to its share of the cores (never raising its threads)."""
        if self._blas is None:
            from threadpoolctl import ThreadpoolController  # loaded on first parallel batch

            self._blas = ThreadpoolController().select(user_api="blas")
        share = max(1, available_cores() // self.threads)
        current = min((lib["num_threads"] for lib in self._blas.info()), default=share)
        return self._blas.limit(limits=min(share, current))


def default_shard_size(model, dtype) -> int:
    """Rows per shard so that one shard's factors take about 128 MiB."""
    sizes = model.layer_sizes
    per_row = sizes[-1] * sum(sizes[1:]) + 3 * sum(s + 1 for s in sizes[:-1]) + sum(sizes[1:])
    return max(1, (128 * 2**20) // (per_row * np.dtype(dtype).itemsize))


def shard_from_arrays(X: Array, Y: Array, model: MLP, loss_name: str, dtype,
                      index: int) -> ShardFactors:
    """The factors of one shard from its validated rows (runs where the shard lives)."""
    return ShardFactors(model, X, Y, get_loss(loss_name), dtype, index=index)



def shard_from_store(path: str, start: int, stop: int, model: MLP, loss_name: str, dtype,
                     index: int) -> ShardFactors:
    """The factors of one shard from rows ``start:stop`` of a dataset store."""
    from .dataset import open_dataset

    X, Y = open_dataset(path).read(start, stop)
    try:
        X = model.check_inputs(X)
        Y = get_loss(loss_name).check_targets(Y, stop - start, model.n_outputs, dtype)
    except (TypeError, ValueError) as e:
        raise type(e)(f"dataset {path}, rows {start}:{stop}: {e}") from None
    return shard_from_arrays(X, Y, model, loss_name, dtype, index)



def check_shard_size(shard_size) -> int:
    """``shard_size`` as a positive ``int``.

    Examples
    --------
    >>> check_shard_size(np.int64(100))
    100
    """
    if not is_integer(shard_size):
        raise TypeError(f"shard_size must be a positive integer, got {shard_size!r}")
    if shard_size <= 0:
        raise ValueError(f"shard_size must be a positive integer, got {shard_size}")
    return int(shard_size)
