"""The resident memory of this process over time, attributed to the phases it ran.

:class:`ResidentTimeline` samples the resident size (``VmRSS`` of
``/proc/self/status``) every ``interval`` seconds on a daemon thread, each
sample tagged with :func:`dgnh.phases.current_phase` of the main thread (the
benchmark's phase, and inside ``compress`` the builder's: ``"N=1,001,899
compress/hybrid/hmatrix/tree"``). ``dgnh bench scale --timeline PREFIX`` writes
the samples to ``PREFIX.csv``, a picture to ``PREFIX.png`` and prints the
largest resident size of every phase: which arrays make a peak.
"""

from __future__ import annotations

import csv
import os
import threading
import time

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from ..phases import current_phase

INTERVAL = 0.05  # seconds between samples
PALETTE = colormaps["tab20"]  # a colour per phase (20 before they repeat)


def status_gib(field: str) -> float | None:
    """The size ``field`` of ``/proc/self/status`` (e.g. ``"VmRSS"``) in GiB, ``None`` where
    ``/proc`` is missing."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def resident_gib() -> float:
    """This process's resident size in GiB now (``nan`` where ``/proc`` is missing)."""
    now = status_gib("VmRSS")
    return float("nan") if now is None else now


class ResidentTimeline:
    """Samples ``(seconds since start, resident GiB, phase)`` while the ``with`` block runs.

    Examples
    --------
    >>> import numpy as np
    >>> from dgnh.phases import phase
    >>> with ResidentTimeline(interval=0.01) as timeline, phase("fill"):
    ...     a = np.ones(2**22)  # 32 MiB
    ...     time.sleep(0.1)
    >>> "fill" in [name for name, *_ in timeline.peaks()]
    True
    """

    def __init__(self, interval: float = INTERVAL):
        self.interval = float(interval)
        self.samples: list[tuple[float, float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True, name="dgnh-timeline")
        self._t0 = 0.0

    def _sample(self) -> None:
        while True:
            self.samples.append((time.perf_counter() - self._t0, resident_gib(), current_phase()))
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> "ResidentTimeline":
        self._t0 = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def peaks(self) -> list[tuple[str, float, float, float]]:
        """Per phase, in order of first appearance: ``(phase, first s, last s, max GiB)``."""
        found: dict[str, list[float]] = {}
        for t, gib, name in self.samples:
            entry = found.setdefault(name, [t, t, gib])
            entry[1], entry[2] = t, max(entry[2], gib)
        return [(name, *values) for name, values in found.items()]

    def write(self, prefix: str | os.PathLike, title: str = "",
              levels: int = 3) -> tuple[str, str]:
        """``prefix.csv`` (the samples) and ``prefix.png`` (resident size over time, the
        phases' spans shaded and labelled by their top ``levels`` levels, e.g. a builder's
        phases inside ``compress``); returns both paths."""
        prefix = os.fspath(prefix)
        with open(prefix + ".csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["seconds", "resident_gib", "phase"])
            writer.writerows((f"{t:.3f}", f"{g:.4f}", p) for t, g, p in self.samples)
        fig = Figure(figsize=(12, 4.5))
        ax = fig.add_subplot()
        t = np.array([s[0] for s in self.samples])
        gib = np.array([s[1] for s in self.samples])
        ax.plot(t, gib, color="black", lw=1)
        spans = _spans([(s[0], "/".join(s[2].split("/")[:levels])) for s in self.samples])
        names = list(dict.fromkeys(name for name, _, _ in spans if name))
        labelled: set[str] = set()
        for name, start, stop in spans:
            if name:
                ax.axvspan(start, stop, color=PALETTE(names.index(name) % 20), alpha=0.3, lw=0,
                           label=None if name in labelled else name)
                labelled.add(name)
        ax.set_xlabel("seconds")
        ax.set_ylabel("resident GiB")
        ax.set_title(title or "resident memory by phase")
        if names:
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
        fig.tight_layout()
        fig.savefig(prefix + ".png", dpi=110)
        return prefix + ".csv", prefix + ".png"


def _spans(tagged: list[tuple[float, str]]) -> list[tuple[str, float, float]]:
    """Runs of equal tags: ``(tag, first time, next run's first time)``.

    Examples
    --------
    >>> _spans([(0.0, "a"), (1.0, "a"), (2.0, "b"), (3.0, "b")])
    [('a', 0.0, 2.0), ('b', 2.0, 3.0)]
    """
    spans: list[list] = []
    for t, name in tagged:
        if spans and spans[-1][0] == name:
            spans[-1][2] = t
        else:
            if spans:
                spans[-1][2] = t
            spans.append([name, t, t])
    return [tuple(s) for s in spans]
