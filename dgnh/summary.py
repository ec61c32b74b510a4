"""A readable text summary of a result store (what ``dgnh info`` prints)."""

from __future__ import annotations

import os

from .store import read_attributes


def summary(path: str | os.PathLike) -> str:
    """A readable summary of a result store, from its attributes (no arrays read)."""
    a = read_attributes(path)
    report = a["operator"].get("report", {})
    params = report.get("parameters", {})
    run, prov, fac = a.get("run") or {}, a.get("provenance", {}), a.get("factorization")
    rows = [("operator", f"{a['kind']}, N = {a['n_params']:,} parameters")]
    for key, label in (("rank", "rank"), ("lowrank_rank", "low-rank part rank"),
                       ("rank_max", "max skeleton rank"), ("rank_mean", "mean skeleton rank")):
        if key in report:
            rows.append((label, f"{report[key]:.1f}" if isinstance(report[key], float)
                         else str(report[key])))
    if "nbytes" in report:
        rows.append(("memory", f"{report['nbytes'] / 2**20:,.2f} MiB ("
                               f"{100 * report.get('memory_fraction', 0):.2f}% of dense)"))
    if "error_estimate" in report:
        met = "met" if report.get("tol_met") else "NOT met"
        rows.append(("error", f"‖G − H‖₂/‖G‖₂ ≈ {report['error_estimate']:.3g} (estimated; tol "
                              f"{params.get('tol')} {met})"))
        rows.append(("‖G‖₂", f"≈ {report['norm_estimate']:.6g}"))
    if report.get("indefinite"):
        rows.append(("indefinite", f"λ_min ≤ {report['min_eigenvalue_estimate']:.3g}‖G‖₂ "
                                   "(Lanczos): factorize with reg above that"))
    rows += [("candidate", _candidate(c)) for c in report.get("candidates", [])]
    if params:
        rows.append(("parameters", ", ".join(f"{k}={v}" for k, v in params.items())))
    if "entries_evaluated" in report and not run:
        rows.append(("entries", f"{report['entries_evaluated']:,} evaluated"))
    if run:  # the job's entry rounds: every candidate's, as a resume loads them
        ck = run["checkpoint"]
        rows.append(("entries", f"{ck['entries_evaluated'] + ck['entries_loaded']:,} in the "
                                f"job's {ck['rounds']} entry rounds"
                                + (" (all candidates)" if "candidates" in report else "")
                                + f": {ck['entries_evaluated']:,} evaluated, "
                                f"{ck['entries_loaded']:,} loaded from the checkpoint"))
        if ck["rounds_loaded"]:
            rows.append(("resumed", f"{ck['rounds_loaded']} of {ck['rounds']} entry rounds "
                                    f"({ck['entries_loaded']:,} entries) from the checkpoint"))
        rows.append(("data", f"{run['n_samples']:,} samples in {run['n_shards']} shards"))
        rows.append(("timings", ", ".join(f"{k} {v:.2f} s" for k, v in run["timings"].items())))
        failed = run.get("factorization") or {}
        if failed.get("status") == "indefinite":
            rows.append(("factorization", f"none: at reg = {failed['reg']:.6g} the "
                                          "approximation is indefinite"))
    if fac:
        rows.append(("factorization", f"reg = {fac['reg']:.6g}, log det = {fac['logdet']:.10g}"
                     + ("" if fac.get("exact") else " (HSS part only: a preconditioner)")))
    rows.append(("created", f"{prov.get('created')} with dgnh {prov.get('dgnh')}, "
                            + ", ".join(f"{k} {prov.get(k)}" for k in ("numpy", "zarr", "dask"))))
    return "\n".join([f"{os.fspath(path)}: dgnh result, format version {a['version']}"]
                     + [f"  {label:<18} {text}" for label, text in rows])


def _candidate(c: dict) -> str:
    """One of ``method="auto"``'s candidates: built, or why not (``dgnh.compress``)."""
    if c.get("built", True):  # stores before the memory-floor skip list built forms only
        return (f"{c['method']}: {c['nbytes'] / 2**20:,.2f} MiB, error ≈ "
                f"{c['error_estimate']:.3g}, {c['entries_evaluated']:,} entries")
    size = f"{c['memory_floor'] / 2**20:,.2f} MiB"
    if c["method"] == "dense":  # exact, built only if chosen
        return f"dense: {size}, exact; not built (a smaller form meets tol)"
    return f"{c['method']}: at least {size}; not built (a smaller form meets tol)"
