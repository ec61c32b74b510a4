"""The ``dgnh`` command line: a thin layer over the library.

Errors are printed as one line on stderr with a non-zero exit code; ``--debug``
shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
import threading
import warnings

BENCHMARKS = {
    "entries": "exact block rate vs GEMM, sampled-entry cost vs N, sampled error",
    "distributed": "batches of blocks and matvecs on 1 and 2 workers vs in-process",
    "compress": "H-matrix / low-rank / hybrid vs truncated eigendecomposition, K-FAC, dense",
    "solve": "factorization + solve and CG vs dense Cholesky and the dual route",
    "analyses": "Laplace evidence, influence, OBS saliencies at N = 1e4..1e6 (laplace-torch "
                "full needs 8·N² bytes)",
    "scale": "large networks (N up to 1e6): time, peak memory, GEMM ratios, float32 vs float64",
}


def _bench(args: argparse.Namespace) -> int:
    module = importlib.import_module(f"dgnh.benchmarks.{args.name}")
    return int(module.main(args.rest) or 0)


def _run(args: argparse.Namespace) -> int:
    from .job import load_job, run_job

    result = run_job(load_job(args.job), scheduler=args.scheduler, overwrite=args.overwrite,
                     progress=False if args.quiet else None)
    print(f"result: {result['job']['output']} (dgnh info / plot / solve / eig it)")
    return 0


def _analyze(args: argparse.Namespace) -> int:
    from .analyses_job import run_analyses

    a = run_analyses(args.job, scheduler=args.scheduler, overwrite=args.overwrite)
    lap = a["laplace"]
    print(f"log evidence {lap['log_marginal_likelihood']:.10g} ± {lap['error_bound']:.3g} "
          f"(route {lap['route']}), prior precision {lap['prior_precision']}")
    for key in ("influence", "self_influence", "saliencies"):
        if key in a:
            print(f"{key}: route {a[key]['route']}, damping {a[key]['damping']:.4g}")
    print("stored under analyses/ in the job's result store (dgnh.analyses_job.read_analyses)")
    return 0


def _info(args: argparse.Namespace) -> int:
    from .summary import summary

    print(summary(args.path))
    return 0


def _plot(args: argparse.Namespace) -> int:
    from .plot import plot_store

    path = plot_store(args.path, args.output, panels=args.panels, k=args.k,
                      overwrite=args.overwrite)
    print(f"wrote {path}")
    return 0


def _load_npy(path: str, what: str):
    import numpy as np

    try:
        with open(path, "rb") as fh:
            if fh.read(6) != b"\x93NUMPY":
                raise ValueError(f"{what} file {path} is not a .npy file (numpy.save writes one)")
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} file {path} does not exist") from None
    except (OSError, ValueError) as e:
        if str(e).startswith(f"{what} file"):
            raise
        raise ValueError(f"{what} file {path} is not a readable .npy array: {e}") from None


def _solve(args: argparse.Namespace) -> int:
    """Exact PCG when the job's model and data are at hand, else the compressed operator."""
    import numpy as np

    from .job import solve_result
    from .zarr_io import check_new_output

    check_new_output(args.output, args.overwrite, "solution")
    b = _load_npy(args.rhs, "right-hand side")
    sol = solve_result(args.path, b, args.reg, rtol=args.rtol, scheduler=args.scheduler)
    with open(args.output, "wb") as fh:
        np.save(fh, sol.x)
    system = "(G + λI) x = b" if sol.exact else "(G̃ + λI) x = b"
    print(f"wrote {args.output}: x of shape {sol.x.shape} solving {system}, λ = {args.reg:g}, "
          f"{sol.how}")
    return 0


def _eig(args: argparse.Namespace) -> int:
    import numpy as np

    from . import store
    from .spectral import eigsh
    from .zarr_io import check_new_output

    if args.output:
        check_new_output(args.output, args.overwrite, "eigenvectors")
    op = store.open(args.path)
    values, vectors = eigsh(op, args.k)
    residuals = np.linalg.norm(op @ vectors - vectors * values, axis=0)
    if args.output:
        with open(args.output, "wb") as fh:
            np.save(fh, vectors)
    print(f"top {len(values)} eigenpairs (λ_i, v_i) of {args.path}"
          + (f", eigenvectors v_i in {args.output} (columns)" if args.output else "")
          + ": i, λ_i, residual ‖Hv_i − λ_i v_i‖")
    for i, (value, residual) in enumerate(zip(values, residuals), 1):
        print(f"{i:5d}  {value: .10e}  {residual:17.2e}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.out, overwrite=args.overwrite)
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line on stderr too (exit code 2), like every other error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``dgnh`` argument parser with one subcommand per task."""
    ap = _Parser(prog="dgnh", description="Gauss-Newton Hessians of MLPs")
    ap.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    b = sub.add_parser("bench", help="run a benchmark and print its table",
                       description="\n".join(f"{k}: {v}" for k, v in BENCHMARKS.items()))
    b.add_argument("name", choices=sorted(BENCHMARKS))
    b.add_argument("rest", nargs=argparse.REMAINDER, help="options of the benchmark")
    b.set_defaults(func=_bench)

    r = sub.add_parser("run", help="run a job file: compress, certify, factorize, store",
                       description="Run a TOML job file (see dgnh.job). A job killed mid-way "
                                   "resumes from its checkpoint when run again.")
    r.add_argument("job", metavar="JOB.toml")
    r.add_argument("--scheduler", metavar="ADDR",
                   help="Dask scheduler address (overrides the job's [cluster] scheduler)")
    r.add_argument("--overwrite", action="store_true", help="replace an existing output store")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.set_defaults(func=_run)

    a = sub.add_parser("analyze", help="run a job file's [analyses]: Laplace evidence, "
                                       "influence, OBS saliencies (after dgnh run)",
                       description="Read the [analyses] table of a job file (see "
                                   "dgnh.analyses_job) and store the results under analyses/ "
                                   "in the job's result store.")
    a.add_argument("job", metavar="JOB.toml")
    a.add_argument("--scheduler", metavar="ADDR", help="Dask scheduler address")
    a.add_argument("--overwrite", action="store_true", help="replace stored analyses")
    a.set_defaults(func=_analyze)

    i = sub.add_parser("info", help="summarize a result store")
    i.add_argument("path", metavar="PATH")
    i.set_defaults(func=_info)

    p = sub.add_parser("plot", help="draw the block structure and the spectrum of a result")
    p.add_argument("path", metavar="PATH")
    p.add_argument("-o", "--output", required=True, metavar="FILE.png")
    p.add_argument("--panels", choices=("both", "structure", "spectrum"), default="both")
    p.add_argument("-k", type=int, default=40, help="eigenvalues in the spectrum (default 40)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing picture")
    p.set_defaults(func=_plot)

    s = sub.add_parser("solve", help="solve (G + λI) x = b with a stored result",
                       description="With the job's model and data at hand (a result of dgnh "
                                   "run): PCG on exact GNH products, preconditioned by the "
                                   "stored factorization, to --rtol. Otherwise the answer is "
                                   "for the compressed G̃, and its error bound is printed.")
    s.add_argument("path", metavar="PATH")
    s.add_argument("--rhs", required=True, metavar="b.npy",
                   help="right-hand side(s), (N,) or (N, k)")
    s.add_argument("--reg", required=True, type=float, metavar="λ", help="regularization λ > 0")
    s.add_argument("-o", "--output", required=True, metavar="x.npy")
    s.add_argument("--rtol", type=float, default=1e-8,
                   help="relative residual of the exact solve (default 1e-8)")
    s.add_argument("--scheduler", metavar="ADDR",
                   help="Dask scheduler for the exact products (default: this machine)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing x.npy")
    s.set_defaults(func=_solve)

    e = sub.add_parser("eig", help="top eigenpairs of a stored result")
    e.add_argument("path", metavar="PATH")
    e.add_argument("-k", type=int, default=10, help="number of eigenpairs (default 10)")
    e.add_argument("-o", "--output", metavar="vectors.npy",
                   help="write the eigenvectors, (N, k), columns in the printed order")
    e.add_argument("--overwrite", action="store_true", help="replace an existing vectors.npy")
    e.set_defaults(func=_eig)

    d = sub.add_parser("demo", help="train a digits MLP and run the whole pipeline on a "
                                    "local cluster (the README's main job)")
    d.add_argument("--out", default="dgnh-demo", metavar="DIR", help="output directory")
    d.add_argument("--overwrite", action="store_true", help="replace an existing demo output")
    d.set_defaults(func=_demo)
    return ap


def _interrupt(signum, frame):
    """Ctrl-C: silence logging and warnings for the shutdown that follows (Dask closing, a
    Zarr write cut short), then interrupt as usual."""
    logging.disable(logging.CRITICAL)
    warnings.simplefilter("ignore")
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    quiet_interrupt = (threading.current_thread() is threading.main_thread()
                       and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
    if quiet_interrupt:
        signal.signal(signal.SIGINT, _interrupt)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:  # one line; logging stays off while the process ends
        print("dgnh: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one line, no traceback, unless --debug
        if args.debug:
            raise
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"dgnh {args.command}: error: {msg}", file=sys.stderr)
        return 1
    finally:
        if quiet_interrupt:
            signal.signal(signal.SIGINT, signal.default_int_handler)


if __name__ == "__main__":
    raise SystemExit(main())
