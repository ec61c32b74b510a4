"""Splitting work into pieces that fit the memory budget (plain functions, no Dask).

Vectors of a product are taken in chunks (:func:`vector_chunk`); a request of
entry blocks is cut into sub-blocks or ranges of sampled groups
(:func:`split_request`) and the pieces are grouped into batches
(:func:`batch_pieces`), each batch one call per shard. See ``docs/design.md`` §2.
Independent small dense problems (the nodes of one tree level) are shared among
the cores (:func:`on_cores`).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from threadpoolctl import threadpool_limits

from .config import available_cores, memory_budget


def vector_chunk(k: int, per_vector: int, budget: int | None) -> int:
    """Vectors per chunk so that ``chunk · per_vector`` bytes fit ``budget`` (≥ 1).

    ``budget=None`` reads :func:`dgnh.config.memory_budget`.

    Examples
    --------
    >>> vector_chunk(64, 10**6, 16 * 10**6), vector_chunk(64, 10**6, 10)
    (16, 1)
    """
    budget = memory_budget() if budget is None else budget
    return max(1, min(k, budget // max(per_vector, 1)))



def split_request(specs: list[tuple], cap: int, entry_bytes: int = 8) -> list[tuple]:
    """A request (one :meth:`ShardFactors.evaluate` spec per shard) in pieces of ≤ ``cap``
    entries each.

    Returns ``[(where, specs, entries)]``: an exact block splits into sub-blocks
    (``where`` = ``(row slice, column slice)``), a sampled one into ranges of its
    groups (``where`` = a group slice), which give the same numbers; ``where`` is
    ``None`` for a request kept whole. A single group of a sampled block larger
    than ``cap`` is refused (``ValueError``, with the bytes it needs at
    ``entry_bytes`` per entry): its median needs all of it.

    Examples
    --------
    >>> import numpy as np
    >>> loc = tuple(np.zeros(4, dtype=int) for _ in range(3))
    >>> [w for w, _, _ in split_request([("exact", loc, loc)], 8)]
    [(slice(0, 4, None), slice(0, 2, None)), (slice(0, 4, None), slice(2, 4, None))]
    """
    shape = request_shape(specs[0])
    k, m = shape[-2:]
    if specs[0][0] == "exact":
        I, J = specs[0][1:3]
        if k * m <= cap:
            return [(None, specs, k * m)]
        c = min(m, max(1, cap // max(k, 1)))
        r = min(k, max(1, cap // c))
        return [((slice(a, a + r), slice(b, b + c)),
                 [("exact", _part(I, a, a + r), _part(J, b, b + c))] * len(specs),
                 len(I[0][a:a + r]) * len(J[0][b:b + c]))
                for a in range(0, k, r) for b in range(0, m, c)]
    n_groups = shape[0]
    if n_groups * k * m <= cap:
        return [(None, specs, n_groups * k * m)]
    if k * m > cap:
        raise ValueError(f"a sampled {k}x{m} block needs the partial sums of one of its groups "
                         f"at once, {k * m * entry_bytes:,} bytes, above the {cap * entry_bytes:,} "
                         "the memory budget leaves them; raise memory_budget or request smaller "
                         "blocks")
    step = cap // (k * m)
    return [(slice(g, min(g + step, n_groups)),
             [sp[:8] + ((g, min(g + step, n_groups)),) for sp in specs],
             (min(g + step, n_groups) - g) * k * m) for g in range(0, n_groups, step)]



def request_shape(spec: tuple) -> tuple[int, ...]:
    """Shape of the shard sum of an :meth:`ShardFactors.evaluate` spec.

    Examples
    --------
    >>> import numpy as np
    >>> loc = tuple(np.zeros(3, dtype=int) for _ in range(3))
    >>> request_shape(("exact", loc, loc))
    (3, 3)
    """
    if spec[0] == "exact":
        return len(spec[1][0]), len(spec[2][0])
    return len(spec[5]), len(spec[1][0]), len(spec[3][0])



def _part(loc, a: int, b: int):
    """Located parameters ``a:b``."""
    return tuple(x[a:b] for x in loc)



def batch_pieces(pieces: list, cap: int) -> list[list]:
    """Consecutive pieces ``(…, entries)`` grouped so each batch holds ≤ ``cap`` entries
    (a larger piece alone).

    Examples
    --------
    >>> [[p[0] for p in b] for b in batch_pieces([("a", 3), ("b", 3), ("c", 5)], 6)]
    [['a', 'b'], ['c']]
    """
    batches, size = [], cap + 1
    for piece in pieces:
        if size + piece[-1] > cap:
            batches.append([])
            size = 0
        batches[-1].append(piece)
        size += piece[-1]
    return batches


def on_cores(func, items) -> list:
    """``[func(x) for x in items]``, the items shared among the cores, one BLAS thread each.

    For many independent dense problems of a few hundred rows (pivoted QRs and
    Cholesky factorizations of one tree level): LAPACK's threads speed each up
    little, separate cores about twice on two. The first error in item order is
    raised.

    Examples
    --------
    >>> on_cores(lambda x: x * x, [1, 2, 3])
    [1, 4, 9]
    """
    items = list(items)
    cores = available_cores()
    if cores < 2 or len(items) < 2:
        return [func(x) for x in items]
    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(cores) as pool:
        return list(pool.map(func, items))
