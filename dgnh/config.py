"""Settings of dgnh read at call time: the memory budget.

``memory_budget`` is the working memory, in bytes, that one operation may use in
each process holding shards (besides the factors and the operation's inputs and
result): products with many vectors, batches of blocks and the dual route chunk
their work to stay within it, and refuse up front only what cannot fit at all.
It is resolved, first match wins, from

1. the ``memory_budget=`` argument of :class:`~dgnh.gauss_newton.GaussNewton`;
2. :func:`set` (``dgnh.config.set(memory_budget="4GiB")``, also as a ``with`` block);
3. the environment variable ``DGNH_MEMORY_BUDGET`` (bytes, or e.g. ``"4GiB"``);
4. :data:`DEFAULT_FRACTION` of this machine's physical memory.

Examples
--------
>>> with set(memory_budget="64MiB"):
...     memory_budget()
67108864
>>> memory_budget(1000)
1000
"""

from __future__ import annotations

import os
import sys

from .validation import check_bytes

ENV_VAR = "DGNH_MEMORY_BUDGET"
DEFAULT_FRACTION = 0.25
FALLBACK_MEMORY = 8 * 2**30  # assumed machine memory where the OS does not tell
_settings: dict[str, int | None] = {"memory_budget": None}


def machine_memory() -> int:
    """Physical memory of this machine in bytes (8 GiB where the OS does not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):  # pragma: no cover - non-POSIX
        return FALLBACK_MEMORY


def memory_budget(value=None) -> int:
    """The memory budget in bytes: ``value`` if given, else the setting (see the module doc).

    Examples
    --------
    >>> memory_budget("2GiB")
    2147483648
    """
    if value is not None:
        return check_bytes(value, "memory_budget")
    if _settings["memory_budget"] is not None:
        return _settings["memory_budget"]
    if os.environ.get(ENV_VAR):
        return check_bytes(os.environ[ENV_VAR], f"the environment variable {ENV_VAR}")
    return int(DEFAULT_FRACTION * machine_memory())


class set:  # noqa: N801 - named like dask.config.set
    """Set ``memory_budget`` for this process; a ``with`` block restores the old value.

    ``None`` returns to the environment variable or the default.

    Examples
    --------
    >>> with set(memory_budget=10**9):
    ...     memory_budget()
    1000000000
    """

    def __init__(self, memory_budget=None):
        self._old = _settings["memory_budget"]
        _settings["memory_budget"] = (None if memory_budget is None
                                      else check_bytes(memory_budget, "memory_budget"))

    def __enter__(self) -> "set":
        return self

    def __exit__(self, *exc) -> None:
        _settings["memory_budget"] = self._old


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one).

    Examples
    --------
    >>> available_cores() >= 1
    True
    """
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


ALLOCATOR_ENV_VAR = "DGNH_ALLOCATOR_TUNING"
MMAP_THRESHOLD = 2**30  # arrays up to this size come from the heap (glibc)
TRIM_THRESHOLD = 2**30  # free memory kept at the top of the heap before it is returned
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, glibc malloc.h
_allocator = {"tuned": False}


def _libc_function(name: str):
    """``name`` from the C library through ctypes, ``None`` off glibc."""
    import ctypes
    import ctypes.util

    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c")), name)
    except (OSError, AttributeError, TypeError):
        return None


def set_malloc_thresholds(trim_bytes: int = TRIM_THRESHOLD,
                          mmap_bytes: int = MMAP_THRESHOLD) -> bool:
    """Set glibc's trim and mmap thresholds in this process; ``False`` off glibc."""
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return False
    return bool(mallopt(_M_TRIM_THRESHOLD, trim_bytes)) and bool(
        mallopt(_M_MMAP_THRESHOLD, mmap_bytes))


def return_freed_memory() -> bool:
    """Give the heap's free pages back to the OS (glibc ``malloc_trim(0)``, which also
    releases free pages between live blocks); ``False`` off glibc.

    A long computation that frees many mid-sized arrays while keeping others (an
    H-matrix build, level by level) otherwise keeps its freed memory resident.

    Examples
    --------
    >>> return_freed_memory() in (True, False)
    True
    """
    trim = _libc_function("malloc_trim")
    return bool(trim(0)) if trim is not None else False


_MADV_DONTNEED = 4  # Linux


def discard_rows(array, start: int, stop: int) -> int:
    """Give the whole memory pages that hold only rows ``start:stop`` of a C- or
    column-major (Fortran) 2-D ``array`` back to the OS (Linux ``madvise(MADV_DONTNEED)``);
    returns the bytes given back (0 off Linux or for other layouts).

    For a large array read row block by row block, the rest still needed: its
    memory shrinks as it is read instead of staying until its last row is done.
    **The rows' values are gone**: whole pages inside them read as 0 afterwards
    (rows sharing a page with rows outside ``start:stop`` keep their values).

    Examples
    --------
    >>> import numpy as np
    >>> a = np.ones((1 << 16, 2), order="F")
    >>> released = discard_rows(a, 0, 1 << 15)
    >>> bool(a[1 << 15:].min() == 1.0), int((a == 0).sum()) * 8 == released
    (True, True)
    """
    import ctypes
    import mmap

    start, stop = int(start), int(stop)
    madvise = _libc_function("madvise") if sys.platform == "linux" else None
    if madvise is None or array.ndim != 2 or array.size == 0 or stop <= start:
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    item, (n_rows, n_cols) = array.itemsize, array.shape
    base = array.ctypes.data
    if array.flags.c_contiguous:  # the rows are one range
        spans = [(base + start * n_cols * item, base + stop * n_cols * item)]
    elif array.flags.f_contiguous:  # a range per column
        spans = [(base + (j * n_rows + start) * item, base + (j * n_rows + stop) * item)
                 for j in range(n_cols)]
    else:
        return 0
    page, released = mmap.PAGESIZE, 0
    for lo, hi in spans:
        lo, hi = -(-lo // page) * page, hi // page * page  # the whole pages inside
        if hi > lo and madvise(lo, hi - lo, _MADV_DONTNEED) == 0:
            released += hi - lo
    return released


def tune_allocator() -> bool:
    """Let glibc reuse freed product temporaries instead of page-faulting fresh ones.

    Products and blocks allocate temporaries of tens to hundreds of MiB per layer.
    By default glibc serves each from a fresh ``mmap`` and unmaps it when freed
    (always so on Dask workers, whose nanny sets ``MALLOC_TRIM_THRESHOLD_``), so
    every product touches (page-faults and zeroes) all of them again: on the
    digits classifier (N = 26 122) one 256-vector product took 2.3–2.6 s
    instead of 1.1–1.3 s, every other call. Raising ``M_MMAP_THRESHOLD`` and
    ``M_TRIM_THRESHOLD`` to 1 GiB (:func:`set_malloc_thresholds`) keeps such
    blocks in the heap for reuse (larger arrays, e.g. an ``N × k`` basis at
    large N, are still mapped and returned); the process keeps up to 1 GiB of
    freed memory (once 1 GiB is free at the top of the heap, glibc's trim returns
    all of it but ``M_TOP_PAD``, 128 KiB). Done once per process, when the first shard's factors are
    built (in every Dask worker too); ``DGNH_ALLOCATOR_TUNING=0`` leaves the
    allocator alone. Returns True if glibc accepted the settings now (False
    when already done, disabled, or off glibc, e.g. macOS or musl); tested in a
    fresh process in ``tests/test_cluster.py``.
    """
    if _allocator["tuned"] or os.environ.get(ALLOCATOR_ENV_VAR, "1") == "0":
        return False
    _allocator["tuned"] = True
    return set_malloc_thresholds()
