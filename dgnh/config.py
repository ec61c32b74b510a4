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
