"""Jobs: a TOML file describing one compression, and the runner behind ``dgnh run``.

A job file (paths are relative to the file's directory)::

    model = "model.npz"        # .npz (dgnh.MLP.save), .onnx, or .pt (a torch.nn.Sequential
                               #   saved whole with torch.save; needs torch)
    data = "digits.zarr"       # dataset store written by dgnh.save_dataset
    loss = "cross_entropy"     # mse | cross_entropy | binary_cross_entropy
    output = "result.zarr"     # the result store (never overwritten without --overwrite)
    dtype = "float64"          # optional: float64 | float32
    shard_size = 600           # optional: data rows per shard

    [compress]                 # optional; the arguments of dgnh.compress (eps omitted:
    method = "auto"            #   exact entries)
    tol = 1e-3
    max_rank = 256
    leaf_size = 256
    seed = 0

    [factorize]                # optional: factorize G̃ + λI with
    relative_reg = 1e-3        #   λ = relative_reg · ‖G‖₂ (estimated), or reg = λ

    [cluster]                  # optional; default: a LocalCluster on this machine
    scheduler = "tls://10.0.0.5:8786"
    tls_ca_file = "ca.pem"     # TLS files, for a tls:// scheduler
    tls_client_cert = "client-cert.pem"
    tls_client_key = "client-key.pem"

:func:`run_job` runs the phases load, factors (the shards are built on the
workers), compress (entry rounds), certify (GNH-vector products for ‖G‖₂ and
the error estimate), factorize and store, with one progress bar per phase.

Checkpoint and resume: every entry round of the compression — one level of
the H-matrix tree (cluster-tree levels, the leaves, skeletonization levels,
the root coupling) or one pivot batch of the low-rank factor — is stored in
the output store as soon as it arrives, with the GNH diagonal. A job killed
mid-way and run again reads those rounds back instead of evaluating them, so
it evaluates only the missing entries and ends with the same result as an
uninterrupted run (the compression is deterministic given its seed and its
entries). The GNH-vector products of the norm estimate and error certificate
(each O(n·N), like the diagonal) are recomputed. The report counts the entries
evaluated and those loaded from the checkpoint.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import sys
import time
import tomllib
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, TextIO

import numpy as np
from tqdm import tqdm

from . import store
from .checkpoint import CheckpointedGaussNewton, JobStore
from .compress import check_parameters, compress
from .factorization import IndefiniteError, check_reg
from .gauss_newton import GaussNewton, check_shard_size
from .losses import get_loss
from .model import MLP
from .operator import Operator
from .packing import jsonable
from .version import __version__

Array = np.ndarray
MODEL_SUFFIXES = (".npz", ".onnx", ".pt", ".pth")
_TOP_KEYS = ("model", "data", "loss", "output", "dtype", "shard_size", "compress",
             "factorize", "cluster")
_CLUSTER_KEYS = ("scheduler", "tls_ca_file", "tls_client_cert", "tls_client_key")
_FACTORIZE_KEYS = ("reg", "relative_reg")


class JobError(ValueError):
    """A job file that cannot be run; the message names the key and its value."""


@dataclass(frozen=True)
class Job:
    """A validated job (see the module docstring for the file format).

    Build one with :func:`load_job` (from a TOML file) or :func:`parse_job`
    (from a dict). Paths are absolute.
    """

    model: str
    data: str
    loss: str
    output: str
    dtype: str = "float64"
    shard_size: int | None = None
    compress: dict[str, Any] = field(default_factory=dict)
    factorize: dict[str, float] | None = None
    scheduler: str | None = None
    tls: dict[str, str] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The job as a plain dict (what the result store records as ``job``)."""
        return asdict(self)


# ------------------------------------------------------------------- the file
def load_job(path: str | os.PathLike) -> Job:
    """Read and validate a TOML job file.

    Raises ``FileNotFoundError`` for a missing file and :class:`JobError` (a
    ``ValueError``) naming the file, the offending key and its value otherwise.

    Examples
    --------
    >>> import tempfile, os, numpy as np, dgnh
    >>> d = tempfile.mkdtemp()
    >>> dgnh.MLP([np.ones((2, 3))], [None], ["identity"]).save(os.path.join(d, "m.npz"))
    >>> _ = open(os.path.join(d, "job.toml"), "w").write(
    ...     'model = "m.npz"\\ndata = "d.zarr"\\nloss = "mse"\\noutput = "out.zarr"\\n'
    ...     '[compress]\\ntol = 2.0\\n')
    >>> load_job(os.path.join(d, "job.toml"))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    dgnh.job.JobError: job file .../job.toml: compress.tol = 2.0: tol must lie in ...
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise FileNotFoundError(f"job file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise JobError(f"job file {path} is not valid TOML: {e}") from None
    return parse_job(raw, base_dir=os.path.dirname(os.path.abspath(path)),
                     source=f"job file {path}")


def parse_job(raw: dict[str, Any], base_dir: str = ".", source: str = "job") -> Job:
    """Validate a job given as a dict (the parsed TOML); relative paths start at ``base_dir``."""

    def fail(key: str, value: Any, problem: str) -> JobError:
        return JobError(f"{source}: {key} = {value!r}: {problem}")

    def unknown(table: dict, known: tuple, prefix: str) -> None:
        extra = sorted(set(table) - set(known))
        if extra:
            raise JobError(f"{source}: unknown key {prefix + extra[0]!r} (known keys: "
                           f"{', '.join(known)})")

    def text(table: dict, key: str, prefix: str = "", required: bool = True) -> str | None:
        if key not in table:
            if required:
                raise JobError(f"{source}: missing key {prefix + key!r}")
            return None
        value = table[key]
        if not isinstance(value, str) or not value:
            raise fail(prefix + key, value, "must be a non-empty string")
        return value

    def file_path(table: dict, key: str, prefix: str = "", must_exist: bool = True,
                  required: bool = True) -> str | None:
        value = text(table, key, prefix, required)
        if value is None:
            return None
        full = os.path.normpath(os.path.join(base_dir, os.path.expanduser(value)))
        if must_exist and not os.path.exists(full):
            raise fail(prefix + key, value, f"{full} does not exist")
        return full

    def table_of(key: str) -> dict:
        value = raw.get(key, {})
        if not isinstance(value, dict):
            raise fail(key, value, "must be a table ([" + key + "])")
        return value

    unknown(raw, _TOP_KEYS, "")
    model = file_path(raw, "model")
    if not model.endswith(MODEL_SUFFIXES):
        raise fail("model", raw["model"], f"unsupported model file type (use one of "
                                          f"{', '.join(MODEL_SUFFIXES)})")
    data = file_path(raw, "data", must_exist=False)
    output = file_path(raw, "output", must_exist=False)
    loss = text(raw, "loss")
    _check(fail, "loss", loss, get_loss)
    dtype = raw.get("dtype", "float64")
    if dtype not in ("float64", "float32"):
        raise fail("dtype", dtype, "must be 'float64' or 'float32'")
    shard_size = raw.get("shard_size")
    if shard_size is not None:
        _check(fail, "shard_size", shard_size, check_shard_size)

    comp = table_of("compress")
    unknown(comp, tuple(inspect.signature(check_parameters).parameters), "compress.")
    for key, value in comp.items():
        _check(fail, f"compress.{key}", value, lambda v, k=key: check_parameters(**{k: v}))
    comp = check_parameters(**comp)

    fact = None
    if "factorize" in raw:
        fact_table = table_of("factorize")
        unknown(fact_table, _FACTORIZE_KEYS, "factorize.")
        if len(fact_table) != 1:
            raise JobError(f"{source}: [factorize] takes exactly one of reg (λ) or "
                           f"relative_reg (λ/‖G‖₂), got {sorted(fact_table) or 'none'}")
        (key, value), = fact_table.items()
        fact = {key: _check(fail, f"factorize.{key}", value, check_reg)}

    cluster = table_of("cluster")
    unknown(cluster, _CLUSTER_KEYS, "cluster.")
    scheduler = text(cluster, "scheduler", "cluster.", required=False)
    if scheduler is not None and "://" not in scheduler:
        raise fail("cluster.scheduler", scheduler, "must be an address such as "
                                                  "'tcp://host:8786' or 'tls://host:8786'")
    tls = {k: file_path(cluster, k, "cluster.") for k in _CLUSTER_KEYS[1:] if k in cluster}
    return Job(model=model, data=data, loss=loss, output=output, dtype=dtype,
               shard_size=shard_size, compress=comp, factorize=fact, scheduler=scheduler,
               tls=tls or None)


def _check(fail: Callable, key: str, value: Any, validate: Callable) -> Any:
    """``validate(value)``, re-raising its error as a :class:`JobError` naming ``key``."""
    try:
        return validate(value)
    except (TypeError, ValueError) as e:
        raise fail(key, value, str(e)) from None


def load_model(path: str) -> MLP:
    """An :class:`~dgnh.model.MLP` from ``.npz``, ``.onnx`` or ``.pt``/``.pth`` (torch)."""
    if path.endswith(".npz"):
        return MLP.load(path)
    if path.endswith(".onnx"):
        return MLP.from_onnx(path)
    try:
        import torch
    except ImportError:
        raise ImportError(f"reading {path} needs PyTorch: pip install 'dgnh[torch]'") from None
    return MLP.from_torch(torch.load(path, weights_only=False))


def fingerprint(job: Job, model: MLP) -> str:
    """SHA-256 of everything that determines a job's entries and result."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(model.parameters(), dtype=np.float64).tobytes())
    h.update(json.dumps(jsonable({
        "layer_sizes": model.layer_sizes, "activations": model.activations,
        "biases": [b is not None for b in model.biases], "data": job.data, "loss": job.loss,
        "dtype": job.dtype, "shard_size": job.shard_size, "compress": job.compress,
        "dgnh": __version__}), sort_keys=True).encode())
    return h.hexdigest()


# ------------------------------------------------------------------ the runner
class _Phases:
    """One tqdm bar per phase (on a terminal, or when asked) plus a log line each."""

    def __init__(self, progress: bool | None, out: TextIO):
        self.disable = None if progress is None else not progress
        self.out = out
        self.timings: dict[str, float] = {}

    def bar(self, name: str, total: int | None = None, unit: str = "step") -> tqdm:
        return tqdm(total=total, desc=f"{name:<9}", unit=unit, disable=self.disable,
                    leave=True, dynamic_ncols=True)

    def log(self, name: str, message: str) -> None:
        tqdm.write(f"{name:<9} {message}", file=self.out)
        self.out.flush()


def run_job(job: Job, scheduler: str | None = None, overwrite: bool = False,
            progress: bool | None = None, out: TextIO | None = None) -> dict[str, Any]:
    """Run a job: load, factors, compress, certify, factorize, store.

    Parameters
    ----------
    job : from :func:`load_job` or :func:`parse_job`.
    scheduler : a Dask scheduler address; overrides the job's ``[cluster]``
        scheduler. Neither: a LocalCluster on this machine (or this process
        when the data make a single shard).
    overwrite : replace an existing output store (else a complete result is
        refused, and a checkpoint of the same job is resumed).
    progress : progress bars on stderr (``None``: only on a terminal).
    out : where the one-line log of each phase goes (default stdout).

    Returns
    -------
    dict
        ``job`` and ``run`` (timings per phase, shards, checkpoint counts), as
        stored in the root attributes, and ``report`` (the operator's report).

    Examples
    --------
    >>> result = run_job(load_job("job.toml"))  # doctest: +SKIP
    >>> result["run"]["checkpoint"]["entries_loaded"]  # doctest: +SKIP
    0
    """
    ph = _Phases(progress, sys.stdout if out is None else out)
    address = scheduler or job.scheduler
    if job.tls and not address:
        raise JobError("the job gives TLS files but no scheduler address (cluster.scheduler "
                       "or --scheduler)")
    t0 = time.perf_counter()
    with ph.bar("load", 1) as bar:
        model = load_model(job.model)
        job_fingerprint = fingerprint(job, model)
        resuming = JobStore.check(job.output, job_fingerprint, overwrite)
        bar.update()
    ph.timings["load"] = time.perf_counter() - t0
    ph.log("load", f"model {os.path.basename(job.model)}: {model.n_params:,} parameters, "
                   f"layers {model.layer_sizes}; output {job.output}"
                   + (f" (resuming: {store.checkpoint_rounds(job.output)} entry rounds stored)"
                      if resuming else ""))

    t0 = time.perf_counter()
    with ph.bar("factors", 1) as bar:
        gn = GaussNewton(model, job.data, loss=job.loss, dtype=job.dtype,
                         shard_size=job.shard_size, client=address, security=job.tls)
        bar.update()
    ph.timings["factors"] = time.perf_counter() - t0
    where = address or ("a local cluster" if gn.n_shards > 1 else "this process")
    ph.log("factors", f"{gn.n_samples:,} samples in {gn.n_shards} shards on {where}")
    try:
        job_store = JobStore.begin(job.output, job_fingerprint, overwrite, job=job.to_dict())
        op, source = _compress(job, gn, job_store, ph)
        factorization, fact_info = _factorize(job, op, ph)
        run = {"timings": ph.timings, "n_samples": gn.n_samples, "n_shards": gn.n_shards,
               "scheduler": address, "factorization": fact_info,
               "checkpoint": {"rounds": source.rounds, "rounds_loaded": source.loaded["rounds"],
                              "entries_loaded": source.loaded["entries"],
                              "entries_evaluated": op.report["entries_evaluated"],
                              "diagonal_loaded": source.loaded["diagonal"]}}
    finally:
        gn.close()
    t0 = time.perf_counter()
    with ph.bar("store", 1) as bar:
        job_store.finish(op, factorization, {"job": job.to_dict(), "run": run},
                         ph.timings.get("factorize"))
        bar.update()
    ph.log("store", f"{job.output} ({time.perf_counter() - t0:.2f} s)")
    return {"job": job.to_dict(), "run": run, "report": op.report}


def _compress(job: Job, gn: GaussNewton, job_store: JobStore,
              ph: _Phases) -> tuple[Operator, CheckpointedGaussNewton]:
    """The compress and certify phases (one call of :func:`dgnh.compress`)."""
    t0 = time.perf_counter()
    rounds_bar = ph.bar("compress", unit="round")
    products_bar = ph.bar("certify", unit="product")

    def on_round(k: int, n_entries: int, loaded: bool) -> None:
        rounds_bar.set_postfix_str(f"round {k}: {n_entries:,} entries "
                                   f"{'loaded' if loaded else 'evaluated'}", refresh=False)
        rounds_bar.update()

    source = CheckpointedGaussNewton(gn, job_store, on_round, products_bar.update)
    try:
        op = compress(source, **job.compress, progress=False)
    finally:
        rounds_bar.close()
        products_bar.close()
    report = op.report
    ph.timings["certify"] = sum(report["timings"].get(k, 0.0) for k in ("norm", "certificate"))
    ph.timings["compress"] = time.perf_counter() - t0 - ph.timings["certify"]
    ph.log("compress", f"{report['method']}: {source.rounds} entry rounds, "
                       f"{report['entries_evaluated']:,} entries evaluated, "
                       f"{source.loaded['entries']:,} loaded from the checkpoint; "
                       f"{report['nbytes'] / 2**20:.2f} MiB "
                       f"({100 * report['memory_fraction']:.2f}% of dense)")
    ph.log("certify", f"‖G − H‖₂/‖G‖₂ ≈ {report['error_estimate']:.3g} (tol "
                      f"{job.compress['tol']:g}: {'met' if report['tol_met'] else 'NOT met'}),"
                      f" ‖G‖₂ ≈ {report['norm_estimate']:.4g}" + (
                          f"; indefinite: λ_min ≤ {report['min_eigenvalue_estimate']:.2g}‖G‖₂"
                          if report.get("indefinite") else ""))
    return op, source


def _factorize(job: Job, op: Operator, ph: _Phases) -> tuple[Any, dict | None]:
    """The factorize phase: ``op.factorize(λ)``, or a record of why it failed."""
    if job.factorize is None:
        return None, None
    t0 = time.perf_counter()
    reg = job.factorize.get("reg") or job.factorize["relative_reg"] * op.report["norm_estimate"]
    factorization = None
    with ph.bar("factorize", 1) as bar:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # near field: "exact" says so
                factorization = op.factorize(reg)
            info = {"reg": reg, "status": "ok", "exact": store.factorizes_exactly(op)}
            message = f"log det = {factorization.logdet():.10g}" + (
                "" if info["exact"] else " (HSS part only: use it as a preconditioner)")
        except IndefiniteError as e:
            info = {"reg": reg, "status": "indefinite", "message": str(e)}
            message = f"NOT factorized: {e}"
        bar.update()
    ph.timings["factorize"] = time.perf_counter() - t0
    ph.log("factorize", f"λ = {reg:.4g}: {message}")
    return factorization, info
