"""``dgnh bench distributed``: batches of blocks and of matvecs on a process-based
LocalCluster with 1 and 2 workers (one thread each, shards read from a dataset store)
against the in-process path with one BLAS thread and with all of them, all in one run;
tasks per batch counted from the scheduler's task stream."""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
from distributed import Client, LocalCluster, get_task_stream
from threadpoolctl import threadpool_limits

from ..cluster import MallocTuning
from ..config import ALLOCATOR_ENV_VAR
from ..dataset import save_dataset
from ..gauss_newton import GaussNewton
from .common import best_time, print_table, synthetic_classifier


def _workloads(gn: GaussNewton, rng, n_blocks: int, block: int, k: int) -> dict:
    """Name -> zero-argument call of one request batch."""
    N = gn.n_params
    blocks = [(rng.choice(N, block, replace=False), rng.choice(N, block, replace=False))
              for _ in range(n_blocks)]
    V = rng.normal(size=(N, k))
    return {
        f"{n_blocks} blocks {block}x{block}": lambda: gn.entries_many(blocks),
        f"matvec with {k} vectors": lambda: gn @ V,
        "1 entry (latency)": lambda: gn.entries([0], [1]),
    }


def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="dgnh bench distributed", description=__doc__)
    ap.add_argument("--n-samples", type=int, default=8_000)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--n-shards", type=int, default=8)
    ap.add_argument("--blocks", type=int, default=32, help="blocks per batch")
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--vectors", type=int, default=16, help="columns of the matvec batch")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dask-malloc", action="store_true",
                    help="keep Dask's worker malloc settings (no dgnh.cluster.MallocTuning, "
                         "DGNH_ALLOCATOR_TUNING=0 on the workers)")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    n, d = args.n_samples, 10
    sizes, net, X, Y = synthetic_classifier(rng, n, args.hidden, d)
    shard_size = -(-n // args.n_shards)
    print(f"network {sizes}, N = {net.n_params}, n = {n}, {args.n_shards} shards of "
          f"{shard_size} rows, cross_entropy, float64; {os.cpu_count()} CPU cores")

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "data.zarr")
        save_dataset(path, X, Y, chunk_rows=shard_size)
        results = {}
        for blas_threads in (None, 1):
            with threadpool_limits(limits=blas_threads):
                results[f"in-process, {blas_threads or 'all'} BLAS threads", 0] = _measure(
                    net, path, shard_size, "in-process", None, args)
        if args.dask_malloc:  # the workers (spawned: they inherit it) keep Dask's settings
            os.environ[ALLOCATOR_ENV_VAR] = "0"
        for n_workers in (1, 2):
            with LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                              dashboard_address=":0") as cluster, \
                    Client(cluster, set_as_default=False) as client:
                if not args.dask_malloc:
                    client.register_plugin(MallocTuning())
                results["LocalCluster", n_workers] = _measure(net, path, shard_size, client,
                                                              client, args)

    single, multi = (results[f"in-process, {t} BLAS threads", 0] for t in (1, "all"))
    rows = []
    for (label, n_workers), res in results.items():
        for name, (t, tasks, out) in res["batches"].items():
            ref = single["batches"][name]
            rows.append([name, label, n_workers or "-", t, tasks if tasks else "-",
                         ref[0] / t, multi["batches"][name][0] / t, _rel(out, ref[2])])
    print_table("One request batch: best wall time, tasks the scheduler ran, speed-up over "
                "the in-process path (same run)",
                ["batch", "path", "workers", "time s", "tasks", "vs 1 thread",
                 "vs all threads", "max rel diff"], rows)
    print_table("Building the shards (factors) from the dataset store",
                ["path", "workers", "time s"],
                [[label, w or "-", res["build"]] for (label, w), res in results.items()])
    print("Each worker runs one thread with single-threaded BLAS, "
          f"{'Dask default' if args.dask_malloc else 'MallocTuning'} malloc settings; 'tasks' "
          "counts every task of the batch (one per shard, reduction tree, shared argument).")
    return 0


def _measure(net, path, shard_size, client, task_client, args) -> dict:
    """Build time and, per workload, (best time, tasks per batch, result)."""
    t = time.perf_counter()
    gn = GaussNewton(net, path, loss="cross_entropy", shard_size=shard_size, client=client)
    build = time.perf_counter() - t
    batches = {}
    with gn:
        loads = _workloads(gn, np.random.default_rng(args.seed + 1), args.blocks,
                           args.block_size, args.vectors)
        for name, call in loads.items():
            t_best = best_time(call, repeat=args.repeat)
            tasks = 0
            if task_client is not None:
                with get_task_stream(task_client) as stream:
                    out = call()
                tasks = len(stream.data)
            else:
                out = call()
            batches[name] = (t_best, tasks, out)
    return {"build": build, "batches": batches}


if __name__ == "__main__":
    raise SystemExit(main())
