"""Zarr v3 storage of compressed GNH results and of the checkpoints of running jobs.

Layout (``format = "dgnh-result"``, ``version = 1``; docs/design.md §6)::

    <path>/                       Zarr v3 group; attributes:
        format, version           "dgnh-result", 1
        layout                    one line pointing to this description
        complete                  true once the result is written (written last)
        kind                      "lowrank" | "hmatrix" | "hybrid"
        n_params                  N
        provenance                created (UTC), dgnh/python/numpy/scipy/zarr/dask/
                                  distributed versions, platform
        fingerprint, data_digest, only from `dgnh run`: the job's fingerprint (only the
        job, run                  same job on the same data resumes its checkpoint); the
                                  SHA-256 of the data's content (dgnh.Dataset.digest);
                                  the validated job parameters; timings per phase,
                                  shards, workers, checkpoint counts
    <path>/operator/              the compressed operator; attributes: kind, report
                                  (parameters, seed, timings, entries evaluated, memory,
                                  error estimate), arrays (the names of its arrays)
        kind "lowrank":  U        (N, r) float64, G ≈ U Uᵀ; attributes also n_params
        kind "hmatrix":           the arrays of HMatrix.to_arrays(), attributes also
                                  format "dgnh.hmatrix", version, n_params:
            perm, node_parent, node_children, node_start, node_stop   the cluster tree
            skeleton_offsets, skeleton_params          packed skeleton index lists
            {interp,coupling,leaf,near}_{offsets,shapes,values}
                                  packed blocks: block i is
                                  values[offsets[i]:offsets[i+1]].reshape(shapes[i])
            coupling_nodes, leaf_nodes, near_pairs     which node (pair) owns each block
        kind "hybrid":            no arrays; operator/lowrank (as above) +
                                  operator/hmatrix (as above), G ≈ U Uᵀ + H
    <path>/factorization/         optional: a factorization of operator + reg·I
        attributes                reg, logdet, exact (false: HSS part only, a
                                  preconditioner), kind, seconds
        inverse_diagonal          (N,) float64, diagonal of (operator + reg·I)⁻¹
    <path>/checkpoint/            only while a job runs (see dgnh.checkpoint.JobStore)
        diagonal                  (N,) the GNH diagonal; attribute complete
        rounds/<k>/               entry round k (tree levels, leaves, coupling level, pivot batch),
                                  k zero-padded to 6 digits: values, offsets, shapes
                                  (packed blocks as above); attributes digest (of the
                                  requests), n_blocks, n_entries, complete (written last)

Every array carries a ``description`` attribute; every chunk is written (even
an all-zero one), so a missing chunk means a truncated store, and ends with a
CRC-32C (the ``crc32c`` codec after zstd), so an altered chunk is reported as a
damaged store naming the array (stores written before it are still read). A
store is written beside its path and swapped in when complete. Numbers in the
JSON attributes that are not finite are stored as ``null``. Arrays are written
in chunk-aligned row slabs (:func:`dgnh.zarr_io.write_rows`), so writers never
share a chunk; the attributes (metadata) are written by the driver only, after
the arrays they describe.

Stored kinds: :data:`STORED_KINDS` maps each ``kind`` to its class, and the
class says how it becomes arrays and back (:class:`StoredOperator`:
``to_arrays()``, ``attrs()``, ``from_arrays(arrays, attrs)``). An operator made
of other stored operators (the hybrid) names them in its ``parts``; each is
stored as above in a subgroup of that name. Reading and writing are the same
code for every kind.

Examples
--------
>>> import numpy as np, tempfile, os, dgnh
>>> from dgnh.lowrank import LowRank
>>> path = os.path.join(tempfile.mkdtemp(), "r.zarr")
>>> save(LowRank(np.ones((5, 2))), path)
>>> op = dgnh.open(path)
>>> type(op).__name__, op.rank
('LowRank', 2)
"""

from __future__ import annotations

import os
import platform
import warnings
from datetime import datetime, timezone
from typing import Any, ClassVar, Protocol

import numpy as np
import zarr

from .dense import Dense
from .factorization import Factorization
from .hmatrix import HMatrix
from .hybrid import Hybrid
from .lowrank import LowRank
from .operator import Operator
from .packing import jsonable
from .version import __version__
from .zarr_io import check_format, open_group, read_array, replacing, write_array

Array = np.ndarray

FORMAT = "dgnh-result"
VERSION = 1
LAYOUT = "dgnh result store, see the docstring of dgnh.store"

_DESCRIPTIONS = {
    "U": "low-rank factor (N, r): G ≈ U Uᵀ",
    "perm": "parameter index of each tree position (nonzero-diagonal parameters only)",
    "node_parent": "parent node of each tree node (-1 for the root), level order",
    "node_children": "the two children of each node (-1 for leaves)",
    "node_start": "first tree position of each node",
    "node_stop": "one past the last tree position of each node",
    "skeleton_offsets": "skeleton i is skeleton_params[skeleton_offsets[i]:skeleton_offsets[i+1]]",
    "skeleton_params": "packed skeleton parameter indices of all nodes",
    "coupling_nodes": "inner node owning each coupling block (its children's interaction)",
    "leaf_nodes": "leaf node owning each exact diagonal block",
    "near_pairs": "leaf node pair of each near-field correction block",
    "inverse_diagonal": "diagonal of (operator + reg·I)^-1",
    "diagonal": "diagonal of the GNH",
    "values": "packed block values; block i is values[offsets[i]:offsets[i+1]].reshape(shapes[i])",
    "offsets": "start of each packed block in values (n_blocks + 1)",
    "shapes": "shape (rows, cols) of each packed block",
}
_PACKED = {"interp": "interpolation matrix of each node",
           "coupling": "coupling block of each inner node",
           "leaf": "exact diagonal block of each leaf",
           "near": "near-field correction block of each near leaf pair"}


# ------------------------------------------------------------ stored kinds
class StoredOperator(Protocol):
    """What every class in :data:`STORED_KINDS` provides (see the module docstring).

    A class made of other stored operators also names them in a class
    attribute ``parts`` (attribute names; each is stored in a subgroup of that
    name), carries their attributes under the same names in :meth:`attrs`, and
    is rebuilt by the classmethod ``from_parts(parts, attrs)``.
    """

    kind: ClassVar[str]
    shape: tuple[int, int]
    report: dict[str, Any]

    def to_arrays(self) -> dict[str, Array]:
        """The operator as named numpy arrays."""

    def attrs(self) -> dict[str, Any]:
        """JSON-friendly attributes stored beside the arrays (with ``report``)."""

    @classmethod
    def from_arrays(cls, arrays: dict[str, Array], attrs: dict[str, Any]) -> "StoredOperator":
        """The inverse of :meth:`to_arrays` and :meth:`attrs`."""


STORED_KINDS: dict[str, type[StoredOperator]] = {
    "lowrank": LowRank, "hmatrix": HMatrix, "hybrid": Hybrid, "dense": Dense}
"""Every operator a result store holds, by its ``kind`` attribute."""

_KIND_OF_CLASS = {cls: kind for kind, cls in STORED_KINDS.items()}


def kind_of(op: Operator) -> str:
    """The stored kind of ``op`` (a key of :data:`STORED_KINDS`); ``TypeError`` for others.

    Examples
    --------
    >>> kind_of(LowRank(np.ones((3, 1))))
    'lowrank'
    """
    kind = _KIND_OF_CLASS.get(type(op))
    if kind is None:
        raise TypeError(f"cannot store a {type(op).__name__}: expected a compressed operator "
                        "(dgnh LowRank, HMatrix or Hybrid, e.g. from dgnh.compress)")
    return kind


def factorizes_exactly(op: Operator) -> bool:
    """False when ``op.factorize`` covers only the HSS part (a near field exists)."""
    return bool(op.is_hss)


# ------------------------------------------------------------------- helpers
def provenance() -> dict[str, str]:
    """Creation time and the versions of dgnh and the libraries that made a result."""
    import dask
    import distributed
    import scipy

    return {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "dgnh": __version__, "python": platform.python_version(),
            "numpy": np.__version__, "scipy": scipy.__version__, "zarr": zarr.__version__,
            "dask": dask.__version__, "distributed": distributed.__version__,
            "platform": platform.platform()}


def describe(name: str) -> str:
    """The ``description`` attribute of a stored array called ``name``.

    Examples
    --------
    >>> describe("leaf_shapes")
    'exact diagonal block of each leaf: shape (rows, cols) of each packed block'
    """
    if name in _DESCRIPTIONS:
        return _DESCRIPTIONS[name]
    prefix, _, part = name.rpartition("_")
    if prefix in _PACKED and part in _DESCRIPTIONS:
        return f"{_PACKED[prefix]}: {_DESCRIPTIONS[part]}"
    return "see dgnh.store"


# ------------------------------------------------------------ the operator
def _part_names(cls: type) -> tuple[str, ...]:
    """The stored operators ``cls`` is made of (``()`` for one stored as arrays)."""
    return getattr(cls, "parts", ())


def _write_operator(group: zarr.Group, op: StoredOperator) -> None:
    """``op`` in ``group``: its parts as subgroups, else its arrays; its attributes last."""
    kind = kind_of(op)
    parts = _part_names(type(op))
    for name in parts:
        _write_operator(group.create_group(name, overwrite=True), getattr(op, name))
    arrays = {} if parts else op.to_arrays()
    for name, data in arrays.items():
        write_array(group, name, data, describe(name))
    own = {key: value for key, value in op.attrs().items() if key not in parts}
    group.attrs.update(jsonable({**own, "kind": kind, "arrays": sorted(arrays)}))


def _read_operator(group: zarr.Group, where: str) -> StoredOperator:
    """The inverse of :func:`_write_operator`; ``ValueError`` naming ``where`` if damaged."""
    attrs = dict(group.attrs)
    kind = attrs.get("kind")
    if kind not in STORED_KINDS:
        raise ValueError(f"{where}: unknown operator kind {kind!r} (expected one of "
                         f"{tuple(STORED_KINDS)})")
    cls = STORED_KINDS[kind]
    parts = {}
    for name in _part_names(cls):
        if name not in group:
            raise ValueError(f"{where}: the {kind} operator lacks its {name!r} part "
                             "(incomplete or damaged store)")
        parts[name] = _read_operator(group[name], f"{where}/{name}")
    arrays = {name: read_array(group, name, where) for name in attrs.get("arrays", [])}
    try:
        return cls.from_parts(parts, attrs) if parts else cls.from_arrays(arrays, attrs)
    except (KeyError, ValueError, TypeError, IndexError) as e:
        raise ValueError(f"{where}: inconsistent {kind} operator: {e}") from e


def check_factorization(op: Operator, factorization: Factorization | None) -> None:
    """``TypeError`` unless ``factorization`` is ``None`` or a Factorization of ``op``'s shape."""
    if factorization is not None and (not isinstance(factorization, Factorization)
                                      or factorization.shape != op.shape):
        raise TypeError(f"factorization must be a dgnh Factorization of shape {op.shape} "
                        f"(from op.factorize(reg)), got {type(factorization).__name__}")


def _write_factorization(root: zarr.Group, op: Operator, factorization: Factorization,
                         seconds: float | None = None) -> None:
    """The ``factorization`` group: ``reg``, ``logdet``, ``exact`` and the inverse diagonal."""
    check_factorization(op, factorization)
    group = root.create_group("factorization", overwrite=True)
    write_array(group, "inverse_diagonal", factorization.inverse_diagonal(),
                describe("inverse_diagonal"))
    group.attrs.update(jsonable({"reg": factorization.reg, "logdet": factorization.logdet(),
                                 "exact": factorizes_exactly(op),
                                 "kind": type(factorization).__name__, "seconds": seconds}))


def write_result(root: zarr.Group, op: Operator, factorization: Factorization | None,
                 extra_attrs: dict | None = None, factorization_seconds: float | None = None
                 ) -> None:
    """Operator, factorization, then the root attributes with ``complete = true`` last.

    ``root`` is the store's root group (its ``format``/``version`` already
    written); ``extra_attrs`` go into the root attributes (``job``, ``run``).
    """
    kind = kind_of(op)
    _write_operator(root.create_group("operator", overwrite=True), op)
    if factorization is not None:
        _write_factorization(root, op, factorization, factorization_seconds)
    elif "factorization" in root:
        del root["factorization"]
    root.attrs.update(jsonable({**(extra_attrs or {}), "kind": kind, "n_params": op.shape[0],
                                "provenance": provenance(), "complete": True}))


def save(op: Operator, path: str | os.PathLike, overwrite: bool = False,
         factorization: Factorization | None = None) -> None:
    """Write a compressed operator (and optionally its factorization) to a new store.

    Parameters
    ----------
    op : LowRank, HMatrix or Hybrid (e.g. from :func:`dgnh.compress`); its
        ``report`` is stored with it.
    path : directory of the Zarr v3 store; must not exist unless ``overwrite``.
    overwrite : replace a result store (or an empty directory) at ``path``;
        anything else there is refused.
    factorization : optional ``op.factorize(reg)``: its ``reg``, ``logdet`` and
        ``inverse_diagonal`` are stored.

    Everything is checked before anything is written, and the store is
    written beside ``path`` and swapped in when complete: a failing call
    leaves what was at ``path`` as it was.

    Examples
    --------
    >>> import numpy as np, tempfile, os
    >>> from dgnh.lowrank import LowRank
    >>> op = LowRank(np.eye(4, 2))
    >>> path = os.path.join(tempfile.mkdtemp(), "lr.zarr")
    >>> save(op, path, factorization=op.factorize(0.5))
    >>> round(read_factorization(path)["logdet"], 6)  # log det diag(1.5, 1.5, 0.5, 0.5)
    -0.575364
    """
    path = os.fspath(path)
    kind_of(op)
    check_factorization(op, factorization)
    with replacing(path, overwrite, FORMAT, "result store") as new:
        root = zarr.create_group(new, zarr_format=3)
        root.attrs.update({"format": FORMAT, "version": VERSION, "layout": LAYOUT,
                           "complete": False})
        write_result(root, op, factorization)


def _open_complete(path: str | os.PathLike) -> tuple[str, zarr.Group]:
    """The path and root group of a complete result store; clear errors otherwise."""
    path = os.fspath(path)
    root = open_group(path)
    attrs = dict(root.attrs)
    check_format(attrs, path, FORMAT, VERSION, "result")
    if attrs.get("complete") is not True:
        raise ValueError(f"result store {path} is incomplete: its job has not finished "
                         f"({checkpoint_rounds(path)} entry rounds checkpointed); run the job "
                         "again to resume it")
    if "operator" not in root:
        raise ValueError(f"result store {path}: group 'operator' is missing (damaged store)")
    return path, root


def open(path: str | os.PathLike) -> Operator:
    """Open a result store: the compressed operator, usable without a cluster.

    Returns the :class:`~dgnh.lowrank.LowRank`, :class:`~dgnh.hmatrix.HMatrix`
    or :class:`~dgnh.hybrid.Hybrid` that was stored, with its ``report``.
    Raises ``FileNotFoundError`` for a missing path and ``ValueError`` naming
    the path and the problem for an unknown format or version, an incomplete
    job, missing arrays, a truncated store or a chunk failing its checksum
    ("damaged store").

    Examples
    --------
    >>> import dgnh
    >>> H = dgnh.open("result.zarr")  # doctest: +SKIP
    >>> x = H.factorize(1e-3).solve(b)  # doctest: +SKIP
    """
    path, root = _open_complete(path)
    return _read_operator(root["operator"], f"result store {path}")


def read_factorization(path: str | os.PathLike) -> dict[str, Any] | None:
    """The stored factorization: ``reg``, ``logdet``, ``exact``, ``kind``,
    ``seconds``, ``inverse_diagonal``; ``None`` if the store has none."""
    path, root = _open_complete(path)
    if "factorization" not in root:
        return None
    group = root["factorization"]
    where = f"result store {path}/factorization"
    return {**dict(group.attrs),
            "inverse_diagonal": read_array(group, "inverse_diagonal", where)}


def read_attributes(path: str | os.PathLike) -> dict[str, Any]:
    """Root attributes plus ``operator`` (its attributes, with the report), no arrays."""
    path, root = _open_complete(path)
    out = dict(root.attrs)
    out["operator"] = dict(root["operator"].attrs)
    if "factorization" in root:
        out["factorization"] = dict(root["factorization"].attrs)
    return out


# ---------------------------------------------------------------- checkpoints
def checkpoint_rounds(path: str | os.PathLike) -> int:
    """Entry rounds stored, complete and contiguous from 0, in a job's checkpoint.

    0 when there is no checkpoint (or nothing readable yet); safe to call while
    the job writes.
    """
    try:
        rounds = zarr.open_group(os.fspath(path), mode="r", zarr_format=3)["checkpoint/rounds"]
        with warnings.catch_warnings():  # zarr's temporary files of a write in progress
            warnings.simplefilter("ignore")
            names = sorted(rounds.group_keys())
        count = 0
        for name in names:
            if name != round_name(count) or rounds[name].attrs.get("complete") is not True:
                break
            count += 1
        return count
    except Exception:  # missing, or being written right now
        return 0


def round_name(k: int) -> str:
    """The group name of checkpointed entry round ``k`` (zero-padded: sorted in order)."""
    return f"{k:06d}"


