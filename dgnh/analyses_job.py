"""``dgnh analyze JOB.toml``: the job's ``[analyses]`` table, results in its result store.

The job file of ``dgnh run`` (see :mod:`dgnh.job`) gains one optional table::

    [analyses]
    prior_precision = 1.0      # Laplace prior: a scalar or one value per layer (the start
    optimize_prior = true      #   of the search when optimize_prior, else the value used)
    route = "auto"             # log-determinant route: auto | dual | primal | compressed | slq
    damping = 1e-3             # optional: λ of G + λI for the influence analyses and OBS;
                               #   default p/n (the Laplace posterior's, scalar prior)
    queries = "queries.npz"    # optional: arrays X (inputs) and Y (targets) of query points
    self_influence = true      # every training point's self-influence
    saliencies = true          # OBS saliencies of every parameter

:func:`run_analyses` reopens the exact GNH of the job (its model and data, checked
against the fingerprint of the stored result, so ``dgnh run`` comes first) and
writes ``analyses/`` into the result store: attribute ``analyses`` (the Laplace
result, routes, dampings and error bounds, ``complete`` last) and the arrays
``influence`` (queries × n), ``influence_error_bound``, ``self_influence``,
``self_influence_error_bound``, ``saliency`` and ``inverse_diagonal``. The group is
written beside the old one and swapped in when complete; an existing ``analyses/``
is replaced only with ``overwrite``. Nothing else in the store changes.
"""

from __future__ import annotations

import os
import tomllib
from typing import Any

import numpy as np
import zarr

from . import analyses as an
from . import store
from .analyses.posterior import LAPLACE_ROUTES
from .job import JobError, job_gauss_newton, parse_job
from .packing import jsonable
from .validation import check_choice, check_number
from .zarr_io import (
    check_new_output,
    open_group,
    read_array,
    remove_path,
    staging_path,
    swap_in,
    write_array,
)

KEYS = ("prior_precision", "optimize_prior", "route", "damping", "queries", "self_influence",
        "saliencies")
ARRAYS = {"influence": "influence scores, (queries, n_samples)",
          "influence_error_bound": "bound on the error of each query's scores, (queries,)",
          "self_influence": "self-influence of every training point, (n_samples,)",
          "self_influence_error_bound": "bound on the error of each self-influence",
          "saliency": "OBS saliency w²/(2[(G + λI)⁻¹]_qq) of every parameter, (N,)",
          "inverse_diagonal": "diagonal of (G + λI)⁻¹, (N,)"}


def load_analyses_job(path: str | os.PathLike):
    """``(job, options)``: the job file's job (:func:`dgnh.job.parse_job`) and its
    validated ``[analyses]`` table (:class:`~dgnh.job.JobError` naming a bad key).

    Examples
    --------
    >>> job, options = load_analyses_job("job.toml")  # doctest: +SKIP
    >>> options["route"]  # doctest: +SKIP
    'auto'
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise FileNotFoundError(f"job file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise JobError(f"job file {path} is not valid TOML: {e}") from None
    table = raw.pop("analyses", None)
    base = os.path.dirname(os.path.abspath(path))
    job = parse_job(raw, base_dir=base, source=f"job file {path}")
    if not isinstance(table, dict):
        raise JobError(f"job file {path} has no [analyses] table (see dgnh.analyses_job)")
    return job, check_options(table, base, f"job file {path}")


def check_options(table: dict[str, Any], base_dir: str = ".", source: str = "job") -> dict:
    """The ``[analyses]`` table with its defaults, each value checked."""
    extra = sorted(set(table) - set(KEYS))
    if extra:
        raise JobError(f"{source}: unknown key 'analyses.{extra[0]}' (known keys: "
                       f"{', '.join(KEYS)})")
    opts = {"prior_precision": 1.0, "optimize_prior": True, "route": "auto", "damping": None,
            "queries": None, "self_influence": True, "saliencies": True, **table}
    try:
        prior = np.atleast_1d(np.asarray(opts["prior_precision"], dtype=np.float64))
        for value in prior:
            check_number(value, "prior_precision", low=0, low_open=True)
        check_choice(opts["route"], "route", LAPLACE_ROUTES)
        if opts["damping"] is not None:
            check_number(opts["damping"], "damping", low=0, low_open=True)
        for key in ("optimize_prior", "self_influence", "saliencies"):
            if not isinstance(opts[key], bool):
                raise ValueError(f"{key} must be true or false")
    except (ValueError, TypeError) as e:
        raise JobError(f"{source}: [analyses]: {e}") from None
    if opts["queries"] is not None:
        opts["queries"] = os.path.normpath(os.path.join(base_dir, str(opts["queries"])))
        if not os.path.exists(opts["queries"]):
            raise JobError(f"{source}: analyses.queries = {table['queries']!r}: "
                           f"{opts['queries']} does not exist")
    return opts


def _queries(path: str):
    try:
        with np.load(path, allow_pickle=False) as f:
            return f["X"], f["Y"]
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"queries file {path} must be a .npz with arrays X and Y ({e})") from None


def compute_analyses(gn, opts: dict) -> tuple[dict, dict]:
    """``(attributes, arrays)``: the analyses ``opts`` asks of ``gn`` (see the module doc)."""
    prior = opts["prior_precision"]
    laplace = (an.optimize_prior_precision if opts["optimize_prior"] else
               an.log_marginal_likelihood)(gn, prior, route=opts["route"])
    attrs: dict[str, Any] = {"laplace": {
        k: getattr(laplace, k) for k in ("log_marginal_likelihood", "prior_precision", "sigma",
                                         "log_likelihood", "scatter", "log_det_ratio", "route",
                                         "error_bound", "optimized")}}
    damping = opts["damping"]
    if damping is None:
        if np.ndim(laplace.prior_precision):
            raise ValueError("a per-layer prior needs analyses.damping (the λ of G + λI)")
        damping = laplace.prior_precision * laplace.sigma**2 / gn.n_samples
    arrays: dict[str, np.ndarray] = {}
    if opts["queries"] is not None:
        X, Y = _queries(opts["queries"])
        res = an.influence(gn, X, Y, damping)
        arrays.update(influence=res.scores, influence_error_bound=res.error_bound)
        attrs["influence"] = {"route": res.route, "damping": res.damping, "queries": len(X)}
    if opts["self_influence"]:
        res = an.self_influence(gn, damping)
        arrays.update(self_influence=res.values, self_influence_error_bound=res.error_bound)
        attrs["self_influence"] = {"route": res.route, "damping": res.damping,
                                   "max_error_bound": float(res.error_bound.max())}
    if opts["saliencies"]:
        res = an.obs_saliencies(gn, damping)
        arrays.update(saliency=res.saliency, inverse_diagonal=res.inverse_diagonal)
        attrs["saliencies"] = {"route": res.route, "damping": res.damping,
                               "error_bound": res.error_bound}
    return attrs, arrays


def run_analyses(path: str | os.PathLike, scheduler: str | None = None,
                 overwrite: bool = False) -> dict[str, Any]:
    """Run the ``[analyses]`` of job file ``path``; store them in the job's result store.

    Returns the stored attributes (see the module doc).

    Examples
    --------
    >>> attrs = run_analyses("job.toml")  # doctest: +SKIP
    >>> attrs["laplace"]["route"], attrs["laplace"]["error_bound"]  # doctest: +SKIP
    ('dual', 0.0)
    """
    job, opts = load_analyses_job(path)
    if not os.path.exists(job.output):
        raise FileNotFoundError(f"result store {job.output} does not exist: run "
                                f"`dgnh run {os.fspath(path)}` first")
    store.read_attributes(job.output)  # a complete dgnh result store
    target = os.path.join(job.output, "analyses")
    check_new_output(target, overwrite, "analyses of result store")
    gn, why = job_gauss_newton(job.output, scheduler)
    if gn is None:
        raise ValueError(f"cannot analyse {job.output}: {why}")
    with gn:
        attrs, arrays = compute_analyses(gn, opts)
    new = staging_path(target)
    remove_path(new)
    try:
        group = zarr.create_group(new, zarr_format=3)
        for name, data in arrays.items():
            write_array(group, name, np.asarray(data, dtype=np.float64), ARRAYS[name])
        attrs = jsonable({**attrs, "options": opts, "complete": True})
        group.attrs.update({"analyses": attrs})
    except BaseException:
        remove_path(new)
        raise
    swap_in(new, target)
    return attrs


def read_analyses(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(attributes, arrays)`` of the analyses stored in result store ``path``.

    Examples
    --------
    >>> attrs, arrays = read_analyses("result.zarr")  # doctest: +SKIP
    >>> arrays["saliency"].shape  # doctest: +SKIP
    (1210,)
    """
    where = f"result store {os.fspath(path)}"
    root = open_group(os.fspath(path))
    if "analyses" not in root:
        raise ValueError(f"{where} holds no analyses: run `dgnh analyze JOB.toml`")
    group = root["analyses"]
    attrs = dict(group.attrs).get("analyses", {})
    if not attrs.get("complete"):
        raise ValueError(f"{where}: its analyses are incomplete")
    return attrs, {name: read_array(group, name, where) for name in ARRAYS if name in group}
