"""Jobs: a TOML file describing one compression, and the runner behind ``dgnh run``.

A job file (paths are relative to the file's directory)::

    model = "model.npz"        # .npz (dgnh.MLP.save), .onnx, or .pt (a torch.nn.Sequential
                               #   saved whole with torch.save, read with weights_only=True:
                               #   no code in the file runs; needs torch >= 2.5)
    data = "digits.zarr"       # dataset store written by dgnh.save_dataset
    loss = "cross_entropy"     # mse | cross_entropy | binary_cross_entropy
    output = "result.zarr"     # the result store (never overwritten without --overwrite;
                               #   never the data store or the model file)
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

Checkpoint and resume: every entry round of the compression — two cluster-tree
levels, the leaves or one skeletonization level of the H-matrix build, or one
pivot batch of the low-rank factor — is stored in the output store as soon as it arrives, with
the GNH diagonal. A job killed mid-way and run again reads those rounds back
instead of evaluating them, so it evaluates only the missing entries and ends
with the same result as an uninterrupted run (the compression is
deterministic given its seed, its entries and its products, which are
bit-reproducible for a given shard layout). The GNH-vector products of the norm estimate and error certificate
(each O(n·N), like the diagonal) are recomputed. The job's fingerprint covers
the model's weights and the data's content (:meth:`dgnh.Dataset.digest`): a
checkpoint of other data is refused. ``run["checkpoint"]`` counts every entry
round (with ``method = "auto"``, all candidates'); the report, the chosen one's.

:func:`solve_result` answers ``(G + λI) x = b`` with a result store: exactly when
the job's model and data are at hand, else for the compressed G̃, saying so.
"""

from __future__ import annotations

import hashlib
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
from .compress import CompressOptions, compress
from .dataset import open_dataset
from .exact_solve import solve as exact_solve
from .factorization import IndefiniteError, check_reg
from .backend import check_shard_size
from .gauss_newton import GaussNewton
from .losses import get_loss
from .model import MLP
from .operator import Operator
from .packing import jsonable
from .solve import cg, check_rhs
from .version import __version__

Array = np.ndarray
MODEL_SUFFIXES = (".npz", ".onnx", ".pt", ".pth")
_TOP_KEYS = ("model", "data", "loss", "output", "dtype", "shard_size", "compress",
             "factorize", "cluster", "analyses")  # [analyses]: read by `dgnh analyze`
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
    unknown(comp, CompressOptions.field_names(), "compress.")
    for key, value in comp.items():
        _check(fail, f"compress.{key}", value, lambda v, k=key: CompressOptions(**{k: v}))
    comp = CompressOptions(**comp).as_dict()

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
    job = Job(model=model, data=data, loss=loss, output=output, dtype=dtype,
              shard_size=shard_size, compress=comp, factorize=fact, scheduler=scheduler,
              tls=tls or None)
    problem = output_problem(job)
    if problem:
        raise fail("output", raw["output"], problem)
    return job


def output_problem(job: Job) -> str | None:
    """Why ``job.output`` cannot be written (it is, holds or lies in the data or the model).

    Compared by real path (symbolic links resolved); ``None`` when it is fine.

    Examples
    --------
    >>> job = Job(model="/m.npz", data="/d/data.zarr", loss="mse", output="/d/data.zarr/")
    >>> output_problem(job)
    'it is the data store /d/data.zarr: the result would replace the data'
    >>> output_problem(Job(model="/m.npz", data="/d/data.zarr", loss="mse", output="/d"))
    'the data store /d/data.zarr lies inside it'
    """
    out = os.path.realpath(job.output)
    for key, what in (("data", "data store"), ("model", "model file")):
        other = os.path.realpath(getattr(job, key))
        if out == other:
            return f"it is the {what} {getattr(job, key)}: the result would replace the {key}"
        common = os.path.commonpath([out, other])
        if common == other:
            return f"it lies inside the {what} {getattr(job, key)}"
        if common == out:
            return f"the {what} {getattr(job, key)} lies inside it"
    return None


def _check(fail: Callable, key: str, value: Any, validate: Callable) -> Any:
    """``validate(value)``, re-raising its error as a :class:`JobError` naming ``key``."""
    try:
        return validate(value)
    except (TypeError, ValueError) as e:
        raise fail(key, value, str(e)) from None


def load_model(path: str) -> MLP:
    """An :class:`~dgnh.model.MLP` from ``.npz``, ``.onnx`` or ``.pt``/``.pth`` (torch).

    A ``.pt`` file is read with ``torch.load(weights_only=True)``, allowing only
    ``nn.Sequential``, ``nn.Linear``, ``nn.Identity`` and the supported
    activations: nothing in the file is run. Anything else (other objects, a
    bare ``state_dict``, a damaged file) is refused with one line naming the file.
    """
    if path.endswith(".npz"):
        return MLP.load(path)
    if path.endswith(".onnx"):
        return MLP.from_onnx(path)
    return _load_torch(path)


def _load_torch(path: str) -> MLP:
    try:
        import torch
        from torch.serialization import safe_globals
    except ImportError:
        raise ImportError(f"reading {path} needs PyTorch >= 2.5: pip install 'dgnh[torch]'"
                          ) from None
    from .interop import _TORCH_ACTIVATIONS

    allowed = [torch.nn.Sequential, torch.nn.Linear, torch.nn.Identity] + [
        getattr(torch.nn, name) for name in _TORCH_ACTIVATIONS]
    try:
        with safe_globals(allowed):
            obj = torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise FileNotFoundError(f"model file {path} does not exist") from None
    except Exception as e:  # pickle.UnpicklingError, RuntimeError (not a torch file), ...
        detail = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line),
                      f"not a file written by torch.save ({type(e).__name__})")
        raise ValueError(f"model file {path} was refused: dgnh loads only an nn.Sequential of "
                         f"Linear layers and activations (torch.save(model)) and never runs "
                         f"code from a file: {detail}") from None
    if isinstance(obj, dict):
        raise ValueError(f"model file {path} holds a state_dict (weights without the "
                         "activations): save the whole nn.Sequential with torch.save(model), "
                         "or export .onnx or .npz")
    try:
        return MLP.from_torch(obj)
    except (TypeError, ValueError) as e:
        raise ValueError(f"model file {path}: {e}") from None


def fingerprint(job: Job, model: MLP, data_digest: str | None = None,
                version: str = __version__) -> str:
    """SHA-256 of what determines a job's entries and result (``data_digest``: of the data's
    content, :meth:`dgnh.Dataset.digest`; ``version``: of dgnh)."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(model.parameters(), dtype=np.float64).tobytes())
    h.update(json.dumps(jsonable({
        "layer_sizes": model.layer_sizes, "activations": model.activations,
        "biases": [b is not None for b in model.biases], "data": job.data,
        "data_digest": data_digest, "loss": job.loss, "dtype": job.dtype,
        "shard_size": job.shard_size, "compress": job.compress, "dgnh": version}),
        sort_keys=True).encode())
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
    problem = output_problem(job)
    if problem:
        raise JobError(f"job output {job.output}: {problem}")
    t0 = time.perf_counter()
    with ph.bar("load", 1) as bar:
        model = load_model(job.model)
        data_digest = open_dataset(job.data).digest()
        job_fingerprint = fingerprint(job, model, data_digest)
        resuming = JobStore.check(job.output, job_fingerprint, overwrite, data_digest)
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
        job_store = JobStore.begin(job.output, job_fingerprint, overwrite, job=job.to_dict(),
                                   data_digest=data_digest)
        op, source = _compress(job, gn, job_store, ph)
        factorization, fact_info = _factorize(job, op, ph)
        run = {"timings": ph.timings, "n_samples": gn.n_samples, "n_shards": gn.n_shards,
               "scheduler": address, "factorization": fact_info,
               "checkpoint": {"rounds": source.rounds, "rounds_loaded": source.loaded["rounds"],
                              "entries_loaded": source.loaded["entries"],
                              "entries_evaluated": source.evaluated,
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
    ph.log("compress", f"{report['method']}: {source.rounds} entry rounds"
                       + (" (all candidates)" if "candidates" in report else "")
                       + f", {source.evaluated:,} entries evaluated, "
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


# ------------------------------------------------------- solving with a result
@dataclass
class ResultSolution:
    """What :func:`solve_result` found: ``x``, whether it solves the exact system, and how."""

    x: Array
    exact: bool
    how: str


def job_gauss_newton(path: str | os.PathLike, scheduler: str | None = None
                     ) -> tuple[GaussNewton | None, str]:
    """``(gn, what)``: the exact GNH of the job that wrote result store ``path``.

    Needs the job record of ``dgnh run``, its model and data on this machine
    and the job's fingerprint (weights, data content, loss, dtype, shards)
    unchanged; shards run on ``scheduler`` (with the job's TLS files) or
    locally. Otherwise ``(None, why not)``.
    """
    attrs = store.read_attributes(path)
    try:
        job = Job(**attrs["job"])
    except (KeyError, TypeError):
        return None, "the store has no job record of dgnh run"
    for key in ("model", "data"):
        if not os.path.exists(getattr(job, key)):
            return None, f"the job's {key} {getattr(job, key)} is not reachable"
    try:
        model, digest = load_model(job.model), open_dataset(job.data).digest()
    except (OSError, ValueError, ImportError) as e:
        return None, f"the job's model or data cannot be read ({e})"
    if attrs.get("data_digest") != digest:
        return None, f"the data store {job.data} no longer holds the result's data"
    version = attrs.get("provenance", {}).get("dgnh", __version__)
    if attrs.get("fingerprint") != fingerprint(job, model, digest, version):
        return None, f"the model {job.model} is not the result's"
    gn = GaussNewton(model, job.data, loss=job.loss, dtype=job.dtype, shard_size=job.shard_size,
                     client=scheduler, security=job.tls if scheduler else None)
    return gn, f"the job's model and data ({os.path.basename(job.data)})"


def solve_result(path: str | os.PathLike, b, reg: float, rtol: float = 1e-8,
                 scheduler: str | None = None) -> ResultSolution:
    """Solve ``(G + reg·I) x = b`` with a result store; say whether for G or for G̃.

    When the job that wrote ``path`` can be reopened (:func:`job_gauss_newton`):
    preconditioned CG on exact GNH products to ``rtol``, preconditioned by the
    stored operator's factorization at ``reg`` (the GNH diagonal when the
    compressed operator is indefinite there); ``how`` gives the true relative
    residual. Otherwise the answer is for the compressed G̃, and ``how`` says
    so with its error bound ``e·‖G‖₂/λ``.

    Examples
    --------
    >>> sol = solve_result("result.zarr", b, reg=1e-3)  # doctest: +SKIP
    >>> sol.exact, sol.how  # doctest: +SKIP
    (True, 'exactly (G, not the compressed G̃): PCG on exact GNH products of ...')
    """
    op = store.open(path)
    B = np.asarray(b)
    if B.ndim not in (1, 2) or B.shape[0] != op.shape[0]:
        raise ValueError(f"the stored operator of shape {op.shape} cannot multiply an array of "
                         f"shape {B.shape}: b must be ({op.shape[0]},) or ({op.shape[0]}, k)")
    B, reg = check_rhs(B, op.shape[0]), check_reg(reg)
    gn, source = job_gauss_newton(path, scheduler)
    if gn is None:
        return _compressed_solve(op, B, reg, source)
    with gn, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # near field: HSS part only
        warnings.simplefilter("ignore", RuntimeWarning)  # not converged: said below
        try:
            preconditioner, by = op.factorize(reg), f"the stored {type(op).__name__}"
        except IndefiniteError:
            preconditioner = "diagonal"
            by = (f"the GNH diagonal (the stored {type(op).__name__} + λI is indefinite at "
                  f"λ = {reg:g}: its factorization cannot serve)")
        result = exact_solve(gn, B, reg, rtol=rtol, preconditioner=preconditioner)
    return ResultSolution(result.x, True, (
        f"exactly (G, not the compressed G̃): PCG on exact GNH products of {source}, "
        f"preconditioned by {by}, {result.n_iter} iterations; true relative residual "
        f"{np.max(result.residual):.2e} (rtol {rtol:g}"
        + ("" if result.converged else ", NOT reached") + ")"))


def _compressed_solve(op: Operator, B: Array, reg: float, reason: str) -> ResultSolution:
    """``(G̃ + λI)⁻¹ B``, saying that it is for the compressed operator and how far off."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # near field: handled by CG below
            factorization = op.factorize(reg)
    except IndefiniteError as e:
        raise IndefiniteError(f"{e}; no exact solve instead: {reason}") from None
    if store.factorizes_exactly(op):
        x = factorization.solve(B)
        residual = np.max(np.linalg.norm(op @ x + reg * x - B, axis=0)
                          / np.maximum(np.linalg.norm(B, axis=0), 1e-300))
        how = "direct solve with its factorization"
    else:
        result = cg(op, B, reg, preconditioner=factorization)
        x, residual = result.x, np.max(result.residual)
        how = f"CG preconditioned by its HSS factorization, {result.n_iter} iterations"
    error, norm = op.report.get("error_estimate"), op.report.get("norm_estimate")
    bound = ("no error estimate is stored: its distance to the exact solution is unknown"
             if error is None or norm is None else
             f"‖G − G̃‖₂/‖G‖₂ ≈ {error:.2g}, so x may be off the exact solution by up to about "
             f"{error:.2g}·‖G‖₂/λ = {error * norm / reg:.2g} (relative)")
    return ResultSolution(x, False, f"for the COMPRESSED operator G̃, not the exact GNH "
                                    f"({reason}): {how}; relative residual {residual:.2e} "
                                    f"against G̃; {bound}")
