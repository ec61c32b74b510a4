"""Named phases of long computations, for profiles of time and memory.

``with phase("tree"):`` marks the work inside it. Phases nest per thread, and
:func:`current_phase` names a thread's innermost path (``"compress/hmatrix/tree"``).
Another thread may read it: ``dgnh bench scale --timeline`` samples the
resident size of the process and attributes each sample to the phase the
main thread is in.

Examples
--------
>>> with phase("compress"), phase("tree"):
...     current_phase()
'compress/tree'
>>> current_phase()
''
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

_STACKS: dict[int, list[str]] = {}  # thread ident → its open phases, outermost first


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Mark the ``with`` block as the phase ``name`` of the calling thread."""
    ident = threading.get_ident()
    stack = _STACKS.setdefault(ident, [])
    stack.append(str(name))
    try:
        yield
    finally:
        stack.pop()
        if not stack:
            _STACKS.pop(ident, None)


def current_phase(thread: int | None = None) -> str:
    """The open phases of ``thread`` (an ident; default the main thread), joined by ``/``."""
    ident = threading.main_thread().ident if thread is None else thread
    return "/".join(list(_STACKS.get(ident, ())))
