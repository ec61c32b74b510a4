"""Parameter and array checks shared by every layer of dgnh.

Each check returns the value normalised (a Python ``int``/``float``, a numpy
array) or raises ``TypeError`` (wrong kind of value) or ``ValueError`` (out of
range, NaN/Inf, wrong shape) with a one-line message naming the parameter, what
was expected and what was given — never an error from deep inside numpy.

Examples
--------
>>> check_int(3, "max_rank", minimum=1)
3
>>> check_number(0.5, "tol", low=0, high=1, low_open=True, high_open=True)
0.5
>>> check_choice("gram", "metric", ("angle", "gram"))
'gram'
>>> check_int(0, "max_rank", minimum=1)
Traceback (most recent call last):
...
ValueError: max_rank must be an integer >= 1, got 0
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

Array = np.ndarray


def is_integer(value) -> bool:
    """True for Python and numpy integers, False for ``bool`` and everything else."""
    return not isinstance(value, bool) and isinstance(value, (int, np.integer))


def is_number(value) -> bool:
    """True for Python and numpy reals (not ``bool``)."""
    return not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))


def check_int(value, name: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """An integer in ``[minimum, maximum]`` (either bound optional)."""
    if not is_integer(value):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        if maximum is None:
            allowed = f">= {minimum}"
        elif minimum is None:
            allowed = f"<= {maximum}"
        else:
            allowed = f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be an integer {allowed}, got {value}")
    return int(value)


def _interval(low, high, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        if low_open and high_open:
            return f"lie in the open interval ({low}, {high})"
        return f"lie in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f"be {'>' if low_open else '>='} {low}"
    return f"be {'<' if high_open else '<='} {high}"


def check_number(value, name: str, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, hint: str = "") -> float:
    """A finite real in the interval from ``low`` to ``high`` (open ends where asked).

    ``hint`` is appended to the range error (e.g. what the parameter means).
    """
    if not is_number(value):
        raise TypeError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        raise ValueError(f"{name} must {_interval(low, high, low_open, high_open)}, "
                         f"got {value}{hint}")
    return value


def check_fraction(value, name: str) -> float:
    """A number in the open interval (0, 1) (tolerances, probabilities)."""
    return check_number(value, name, 0, 1, low_open=True, high_open=True)


def check_choice(value, name: str, choices: Sequence[str]) -> str:
    """One of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"unknown {name} {value!r}: choose one of {', '.join(choices)}")
    return value


def check_real_array(a, what: str, ndim: int | Sequence[int] | None = None) -> Array:
    """``a`` as a real numeric array (integer or floating), finite, of the given ndim.

    ``ndim`` is one allowed number of dimensions or a sequence of them.
    """
    arr = np.asarray(a)
    if arr.dtype == object or not (
        np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    ):
        raise TypeError(f"{what} must be a real numeric array, got dtype {arr.dtype}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if arr.ndim not in allowed:
            dims = " or ".join(str(k) for k in allowed)
            raise ValueError(f"{what} must be {dims}-dimensional, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} contains NaN or Inf")
    return arr


def check_float_dtype(dtype, name: str = "dtype") -> np.dtype:
    """``dtype`` as a ``numpy.dtype``, which must be float64 or float32 (``TypeError`` else).

    Examples
    --------
    >>> check_float_dtype("float32")
    dtype('float32')
    """
    message = f"{name} must be float64 or float32, got {dtype!r}"
    try:
        normalised = np.dtype(dtype)
    except TypeError:
        raise TypeError(message) from None
    if normalised not in (np.dtype(np.float64), np.dtype(np.float32)):
        raise TypeError(message)
    return normalised


_BYTE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def check_bytes(value, name: str) -> int:
    """A positive number of bytes: an integer, a float, or a string such as ``"4GiB"``.

    Examples
    --------
    >>> check_bytes("1.5 KiB", "memory_budget"), check_bytes(2e9, "memory_budget")
    (1536, 2000000000)
    """
    if isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        number = text.rstrip("kmgtib")
        unit = text[len(number):]
        try:
            amount = float(number)
        except ValueError:
            amount = None
        if amount is None or unit not in _BYTE_UNITS:
            raise ValueError(f"{name} must be a number of bytes such as 4000000000 or '4GiB', "
                             f"got {value!r}")
        value = amount * _BYTE_UNITS[unit]
    check_number(value, name, low=1)
    return int(value)


def check_index_pairs(requests, name: str = "requests") -> list[tuple[Array, Array]]:
    """``requests`` as a list of ``(rows, cols)`` pairs of 1-D arrays (values unchecked).

    Each request is a pair of 1-D index sequences; a single pair passed without
    its list (``([0, 5], [7, 8])``) is refused, since it would read as two pairs.

    Examples
    --------
    >>> [(r.tolist(), c.tolist()) for r, c in check_index_pairs([([0, 5], [7])])]
    [([0, 5], [7])]
    >>> check_index_pairs(([0, 5], [7, 8]))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: requests[0] must be a pair (rows, cols) of 1-D index arrays, got rows of ...
    """
    if isinstance(requests, (str, bytes)) or not np.iterable(requests):
        raise TypeError(f"{name} must be a sequence of (rows, cols) pairs, e.g. [(rows, cols)], "
                        f"got {type(requests).__name__}")
    pairs = []
    for k, request in enumerate(requests):
        expected = f"{name}[{k}] must be a pair (rows, cols) of 1-D index arrays"
        if isinstance(request, (str, bytes)) or not np.iterable(request):
            raise TypeError(f"{expected}, got {type(request).__name__}")
        request = list(request)
        if len(request) != 2:
            raise ValueError(f"{expected}, got {len(request)} item{'s' * (len(request) != 1)}")
        pair = []
        for label, indices in zip(("rows", "cols"), request):
            try:
                indices = np.asarray(indices)
            except ValueError:  # ragged nested lists
                raise ValueError(f"{expected}, got ragged {label}") from None
            if indices.ndim != 1:
                raise ValueError(f"{expected}, got {label} of shape {indices.shape} (for one "
                                 "block pass [(rows, cols)])")
            pair.append(indices)
        pairs.append((pair[0], pair[1]))
    return pairs
