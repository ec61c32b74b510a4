"""Run a dgnh job on SLURM: a Dask cluster of SLURM jobs (dask-jobqueue), then ``dgnh run``.

This process hosts the Dask scheduler (TLS only) and submits the workers as SLURM
jobs with the settings of ``jobqueue.yaml``; once the workers are up, it runs
``dgnh run JOB.toml --scheduler tls://...`` against that scheduler and returns its
exit status. Run it from an sbatch job (``dgnh.sbatch``) or from a login node.

Usage::

    python deploy/slurm/dgnh_slurm.py JOB.toml [--workers N] [--tls-dir DIR]
                                      [--config deploy/slurm/jobqueue.yaml] [--dry-run]

``--tls-dir`` holds ``ca.pem``, ``dask.pem`` and ``dask-key.pem`` from
``deploy/tls/make-certs.sh`` (default ``~/.dgnh/tls``) on a file system that the
compute nodes share; the job file's TLS keys must name the same files.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import dask.config
import yaml
from dask_jobqueue import SLURMCluster
from distributed import Client
from distributed.security import Security

HERE = os.path.dirname(os.path.abspath(__file__))


def tls_security(tls_dir: str) -> Security:
    """TLS credentials from ``tls_dir`` for every role (scheduler, workers, client)."""
    ca, cert, key = (os.path.join(tls_dir, name) for name in ("ca.pem", "dask.pem", "dask-key.pem"))
    for path in (ca, cert, key):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"TLS file {path} is missing: run deploy/tls/make-certs.sh "
                                    f"{tls_dir}")
    roles = {f"tls_{role}_{kind}": path for role in ("scheduler", "worker", "client")
             for kind, path in (("cert", cert), ("key", key))}
    return Security(tls_ca_file=ca, require_encryption=True, **roles)


def make_cluster(config: str, tls_dir: str) -> SLURMCluster:
    """A ``SLURMCluster`` configured by the Dask config file ``config`` (jobqueue.slurm)."""
    with open(config) as fh:
        dask.config.update(dask.config.config, yaml.safe_load(fh), priority="new")
    return SLURMCluster(security=tls_security(tls_dir), protocol="tls://")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("job", help="the dgnh job file (TOML)")
    ap.add_argument("--workers", type=int, default=4, help="SLURM worker jobs (default 4)")
    ap.add_argument("--tls-dir", default=os.path.expanduser("~/.dgnh/tls"))
    ap.add_argument("--config", default=os.path.join(HERE, "jobqueue.yaml"))
    ap.add_argument("--dry-run", action="store_true",
                    help="print the worker job script and the dgnh command, submit nothing")
    args = ap.parse_args(argv)
    with make_cluster(args.config, args.tls_dir) as cluster:
        command = ["dgnh", "run", args.job, "--scheduler", cluster.scheduler_address]
        if args.dry_run:
            print(cluster.job_script())
            print(" ".join(command))
            return 0
        cluster.scale(jobs=args.workers)
        print(f"scheduler {cluster.scheduler_address}; waiting for {args.workers} worker jobs "
              f"(squeue -u $USER shows them)", flush=True)
        with Client(cluster) as client:
            client.wait_for_workers(len(cluster.plan))
        return subprocess.call(command)


if __name__ == "__main__":
    sys.exit(main())
