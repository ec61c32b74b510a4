"""Checkpoints of running jobs: entry rounds stored in the job's result store.

:class:`JobStore` is the output store of a job (its ``checkpoint/`` group while
it runs, then the result, see :mod:`dgnh.store`); :class:`CheckpointedGaussNewton`
routes every entry round of a compression through it, so a killed job resumes
where it stopped and gives the identical result (docs/design.md §6).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Callable, Sequence

import numpy as np
import zarr

from .factorization import Factorization
from .gauss_newton import GaussNewton
from .operator import Operator
from .packing import jsonable, pack_blocks, unpack_blocks
from .store import (FORMAT, LAYOUT, VERSION, checkpoint_rounds, describe, round_name,
                    write_result)
from .zarr_io import (check_format, check_replaceable, open_group, read_array, remove_path,
                      staging_path, swap_in, write_array)

Array = np.ndarray


def request_digest(requests: Sequence[tuple], **options) -> str:
    """SHA-256 of a batch of entry requests ``[(rows, cols), ...]`` and its options.

    Examples
    --------
    >>> a = request_digest([([0, 1], [2])], eps=None, seed=0)
    >>> a == request_digest([(np.array([0, 1]), [2])], eps=None, seed=0)
    True
    >>> a == request_digest([([0, 1], [2])], eps=None, seed=1)
    False
    """
    h = hashlib.sha256(json.dumps(jsonable(options), sort_keys=True).encode())
    for rows, cols in requests:
        for idx in (rows, cols):
            idx = np.ascontiguousarray(idx, dtype=np.int64)
            h.update(np.int64(idx.size).tobytes())
            h.update(idx.tobytes())
    return h.hexdigest()


class JobStore:
    """The output store of a job: its checkpoint while it runs, then its result.

    Use :meth:`begin`. Entry rounds are saved with :meth:`save_round` (one group
    per round, its ``complete`` attribute written last) and read back by
    :meth:`load_round` when a killed job runs again; :meth:`finish` writes the
    result, marks the store complete and removes the checkpoint. A job
    replacing an existing store (``overwrite``) runs in a staging store beside
    it (:func:`dgnh.zarr_io.staging_path`) that :meth:`finish` swaps in, so the
    old result stays until the new one is complete.
    """

    def __init__(self, path: str, root: zarr.Group, final: str | None = None):
        self.path = path  # where the store is being written
        self.final = path if final is None else final  # where the result goes
        self.root = root
        self.checkpoint = root["checkpoint"]
        self.n_rounds = checkpoint_rounds(path)

    @staticmethod
    def check(path: str | os.PathLike, fingerprint: str, overwrite: bool = False,
              data_digest: str | None = None) -> bool:
        """Whether ``path`` holds a checkpoint of this job (same fingerprint) to resume.

        ``False`` when ``path`` does not exist or ``overwrite`` (start over).
        Raises ``FileExistsError`` for a complete result, another job's
        checkpoint (naming the data when their ``data_digest`` differs) or
        anything else at ``path`` (unless ``overwrite``; even then, anything
        but a result store or an empty directory).
        """
        path = os.fspath(path)
        if overwrite:
            check_replaceable(path, True, FORMAT, "output")
            return False
        if not os.path.lexists(path):
            return False
        try:
            root = open_group(path)
            attrs = dict(root.attrs)
            check_format(attrs, path, FORMAT, VERSION, "result")
        except ValueError as e:
            raise FileExistsError(f"output {path} exists and is not a dgnh result store ({e}): "
                                  "pass --overwrite (overwrite=True) to replace it") from None
        if attrs.get("complete") is True:
            raise FileExistsError(f"output {path} already holds a complete result: pass "
                                  "--overwrite (overwrite=True) to replace it")
        stored_digest = attrs.get("data_digest")
        if data_digest is not None and stored_digest not in (None, data_digest):
            raise FileExistsError(f"output {path} holds a checkpoint made from other data: the "
                                  "content of the job's data store changed since it was "
                                  "written; pass --overwrite (overwrite=True) to start over")
        if attrs.get("fingerprint") != fingerprint or "checkpoint" not in root:
            raise FileExistsError(f"output {path} holds the checkpoint of a different job "
                                  "(other model, data or parameters): pass --overwrite "
                                  "(overwrite=True) to start over")
        return True

    @classmethod
    def begin(cls, path: str | os.PathLike, fingerprint: str, overwrite: bool = False,
              job: dict | None = None, data_digest: str | None = None) -> "JobStore":
        """Reopen the checkpoint of the same job, or create the store (see :meth:`check`).

        ``data_digest`` (:meth:`dgnh.Dataset.digest`) is stored so that a resume
        after the data changed is refused with a message saying so.
        """
        path = os.fspath(path)
        if cls.check(path, fingerprint, overwrite, data_digest):
            return cls(path, open_group(path, mode="r+"))
        where = staging_path(path) if os.path.lexists(path) else path
        remove_path(where)  # a staging store left by an interrupted job
        root = zarr.create_group(where, zarr_format=3)
        root.create_group("checkpoint/rounds")
        root.attrs.update(jsonable({"format": FORMAT, "version": VERSION, "layout": LAYOUT,
                                    "complete": False, "fingerprint": fingerprint,
                                    "data_digest": data_digest, "job": job or {}}))
        return cls(where, root, final=path)

    # ------------------------------------------------------------- arrays
    def load_array(self, name: str) -> Array | None:
        """A checkpointed array (e.g. ``"diagonal"``), or ``None`` if not stored."""
        if name not in self.checkpoint or self.checkpoint[name].attrs.get("complete") is not True:
            return None
        return read_array(self.checkpoint, name, f"checkpoint of {self.path}")

    def save_array(self, name: str, data: Array) -> None:
        """Checkpoint an array (its ``complete`` attribute written after its chunks)."""
        z = write_array(self.checkpoint, name, np.asarray(data), describe(name))
        z.attrs["complete"] = True

    # ------------------------------------------------------------- rounds
    def load_round(self, k: int) -> tuple[str, list[Array]]:
        """The digest and blocks of stored round ``k`` (``k < n_rounds``)."""
        group = self.checkpoint["rounds"][round_name(k)]
        where = f"checkpoint of {self.path}, round {k}"
        blocks = unpack_blocks(*(read_array(group, n, where)
                                 for n in ("offsets", "shapes", "values")), where)
        return group.attrs["digest"], blocks

    def save_round(self, k: int, digest: str, blocks: Sequence[Array]) -> None:
        """Store round ``k`` (arrays first, then its attributes with ``complete``)."""
        if k != self.n_rounds:
            raise ValueError(f"round {k} cannot follow the {self.n_rounds} stored rounds")
        group = self.checkpoint["rounds"].create_group(round_name(k), overwrite=True)
        for name, data in zip(("offsets", "shapes", "values"), pack_blocks(blocks)):
            write_array(group, name, data, describe(name))
        group.attrs.update({"digest": digest, "n_blocks": len(blocks),
                            "n_entries": int(sum(np.size(b) for b in blocks)),
                            "complete": True})
        self.n_rounds = k + 1

    # ------------------------------------------------------------- result
    def finish(self, op: Operator, factorization: Factorization | None = None,
               attrs: dict | None = None, factorization_seconds: float | None = None) -> None:
        """Write the result, mark the store complete, drop the checkpoint, swap it in."""
        write_result(self.root, op, factorization, attrs, factorization_seconds)
        del self.root["checkpoint"]
        if self.path != self.final:
            swap_in(self.path, self.final)
            self.path = self.final


class CheckpointedGaussNewton(Operator):
    """A :class:`~dgnh.gauss_newton.GaussNewton` whose entry rounds go through a checkpoint.

    Every ``entries_many`` call is one round: round ``k`` is read from the
    :class:`~dgnh.JobStore` when stored there for the same requests, else
    evaluated by ``gn`` and stored. ``stats`` counts only the entries evaluated
    here (what :func:`dgnh.compress` reports), :attr:`evaluated` their total over
    every round (all candidates of ``method="auto"``); ``loaded`` counts the rest.
    Products ``@`` and everything else go to ``gn``.
    """

    def __init__(self, gn: GaussNewton, job_store: JobStore,
                 on_round: Callable[[int, int, bool], None] | None = None,
                 on_product: Callable[[int], None] | None = None):
        self.gn, self.job_store = gn, job_store
        self.shape, self.dtype, self.n_params = gn.shape, gn.dtype, gn.n_params
        self.n_jacobian_rows = gn.n_jacobian_rows  # what an entry costs (the H-matrix tree)
        self.stats = {"entries_exact": 0, "entries_sampled": 0, "blocks": 0}
        self.loaded = {"rounds": 0, "entries": 0, "diagonal": False}
        self.rounds = 0
        self._on_round, self._on_product = on_round, on_product
        self._diag = None

    @property
    def evaluated(self) -> int:
        """Entries evaluated here (exact and sampled), over every round so far."""
        return self.stats["entries_exact"] + self.stats["entries_sampled"]

    def diagonal(self) -> Array:
        """The GNH diagonal: from the checkpoint when stored, else evaluated and stored."""
        if self._diag is None:
            self._diag = self.job_store.load_array("diagonal")
            self.loaded["diagonal"] = self._diag is not None
            if self._diag is None:
                self._diag = self.gn.diagonal()
                self.job_store.save_array("diagonal", self._diag)
        return self._diag.copy()

    def entries_many(self, requests, eps: float | None = None, delta: float = 0.01,
                     seed: int = 0) -> list[Array]:
        """One round: the stored blocks of round ``k`` if they match, else evaluated and stored."""
        k = self.rounds
        digest = request_digest(requests, eps=eps, delta=delta, seed=seed)
        blocks = None
        if k < self.job_store.n_rounds:
            stored_digest, blocks = self.job_store.load_round(k)
            if stored_digest != digest:
                raise RuntimeError(f"checkpoint round {k} in {self.job_store.path} holds other "
                                   "entry requests than this run makes: pass --overwrite "
                                   "(overwrite=True) to start over")
        loaded = blocks is not None
        n_entries = int(sum(len(r) * len(c) for r, c in requests))
        if loaded:
            self.loaded["rounds"] += 1
            self.loaded["entries"] += n_entries
        else:
            before = dict(self.gn.stats)
            blocks = self.gn.entries_many(requests, eps=eps, delta=delta, seed=seed)
            for key in self.stats:
                self.stats[key] += self.gn.stats[key] - before[key]
            self.job_store.save_round(k, digest, blocks)
        self.rounds += 1
        if self._on_round is not None:
            self._on_round(k, n_entries, loaded)
        return blocks

    def _matmat(self, V: Array) -> Array:
        out = self.gn @ V
        if self._on_product is not None:
            self._on_product(V.shape[1])
        return out
