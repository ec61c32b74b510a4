"""The ``dgnh`` command line: a thin layer over the library.

Errors are printed as one line on stderr with a non-zero exit code; ``--debug``
shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

BENCHMARKS = {
    "entries": "exact block rate vs GEMM, sampled-entry cost vs N, sampled error",
    "distributed": "batches of blocks and matvecs on 1 and 2 workers vs in-process",
    "compress": "H-matrix / low-rank / hybrid vs truncated eigendecomposition, K-FAC, dense",
    "solve": "factorization + solve and CG vs dense Cholesky and the dual route",
}


def _bench(args: argparse.Namespace) -> int:
    module = importlib.import_module(f"dgnh.benchmarks.{args.name}")
    return int(module.main(args.rest) or 0)


def build_parser() -> argparse.ArgumentParser:
    """The ``dgnh`` argument parser with one subcommand per task."""
    ap = argparse.ArgumentParser(prog="dgnh", description="Gauss-Newton Hessians of MLPs")
    ap.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    b = sub.add_parser("bench", help="run a benchmark and print its table",
                       description="\n".join(f"{k}: {v}" for k, v in BENCHMARKS.items()))
    b.add_argument("name", choices=sorted(BENCHMARKS))
    b.add_argument("rest", nargs=argparse.REMAINDER, help="options of the benchmark")
    b.set_defaults(func=_bench)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("dgnh: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one line, no traceback, unless --debug
        if args.debug:
            raise
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"dgnh {args.command}: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
