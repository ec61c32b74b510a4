"""``dgnh bench entries``: exact block rate vs this machine's GEMM rate, sampled-entry cost
as N grows, and the observed error of sampled entries against eps."""

from __future__ import annotations

import argparse
import time

import numpy as np

from ..gauss_newton import GaussNewton
from ..sampling import plan
from .common import (best_time, gemm_rate, print_table, random_tanh_mlp,
                     synthetic_classifier)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="dgnh bench entries", description=__doc__)
    ap.add_argument("--n-samples", type=int, default=12_000)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    n, d = args.n_samples, 10
    sizes, net, X, Y = synthetic_classifier(rng, n, args.hidden, d)
    t = time.perf_counter()
    gn = GaussNewton(net, X, Y, loss="cross_entropy", client="in-process")
    t_build = time.perf_counter() - t
    M = n * d
    print(f"network {sizes}, N = {net.n_params}, n = {n}, d = {d}, n*d = {M} rows; "
          f"factors built in {t_build:.2f} s ({gn.backend.factor_bytes / 2**20:.0f} MiB)")

    rows = []
    for k in (64, 256, 512):
        I = np.sort(rng.choice(net.n_params, k, replace=False))
        J = np.sort(rng.choice(net.n_params, k, replace=False))
        t_blk = best_time(lambda: gn.entries(I, J), repeat=2)
        flops = 2.0 * k * k * M
        ours = flops / t_blk / 1e9
        ref = gemm_rate(k, k, M)
        rows.append([f"{k}x{k}", t_blk, ours, k * k / t_blk, ref, ours / ref])
    print_table("Exact blocks (float64): our rate vs numpy GEMM of the same shape, same run",
                ["block", "time s", "GFLOP/s", "entries/s", "GEMM GFLOP/s", "ratio"], rows)

    rows = []
    n_req = 100
    for hidden in (32, 320):
        net_h = random_tanh_mlp(np.random.default_rng(args.seed + hidden), [64, hidden, d])
        # one shard for both: the default shard size shrinks as N grows, and the
        # per-shard overhead is not what this row measures
        g = GaussNewton(net_h, X, Y, loss="cross_entropy", shard_size=n, client="in-process")
        reqs = [([int(a)], [int(b)]) for a, b in rng.integers(0, net_h.n_params, (n_req, 2))]
        t_s = best_time(lambda: g.entries_many(reqs, eps=0.1, delta=0.1, seed=1))
        t_e = best_time(lambda: g.entries_many(reqs))
        rows.append([net_h.n_params, plan(0.1, 0.1).n_rows, t_s / n_req * 1e3, t_e / n_req * 1e3])
    print_table(f"Sampled single entries (eps=0.1, delta=0.1), n = {n}, d = {d}: cost vs N",
                ["N", "rows sampled", "ms/entry sampled", "ms/entry exact"], rows)

    rows = []
    D = np.sqrt(gn.diagonal())
    reqs = [([int(a)], [int(b)]) for a, b in rng.choice(np.flatnonzero(D > 0), (200, 2))]
    exact = np.array([b[0, 0] for b in gn.entries_many(reqs)])
    scale = np.array([D[a[0]] * D[b[0]] for a, b in reqs])
    for eps in (0.1, 0.03):
        delta = 0.1
        est = np.array([b[0, 0] for b in gn.entries_many(reqs, eps=eps, delta=delta, seed=3)])
        err = np.abs(est - exact) / scale
        q = np.quantile(err / eps, [0.5, 0.9, 0.99, 1.0])
        rows.append([eps, delta, plan(eps, delta).n_rows, *q, np.mean(err > eps)])
    print_table("Sampled-entry error |G^-G| / (eps sqrt(Gaa Gbb)) over 200 entries",
                ["eps", "delta", "rows", "q50", "q90", "q99", "max", "violations"], rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
