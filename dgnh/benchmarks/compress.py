"""``dgnh bench compress``: H-matrix, low-rank and hybrid compression of trained GNHs,
against the optimal truncated eigendecomposition of equal memory, block-diagonal K-FAC
and the dense matrix, all measured in the same run.

Two networks trained by scikit-learn on the digits data: a classifier (softmax
cross-entropy) and an autoencoder with sigmoid outputs and binary cross-entropy
(binarized pixels as targets). For every tolerance and method: build time, memory,
entries evaluated, the estimated error (block Lanczos on ``G − H`` with exact GNH
products) and the true ``‖G − H‖₂/‖G‖₂`` against the dense G, plus the error of the
best rank-r approximation with the same memory (``r = nbytes / (8N)``). The
``auto`` column marks what ``method="auto"`` picks from these candidates.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from ..compress import choose_candidate, compress
from ..gauss_newton import GaussNewton
from ..digits import train_digits_mlp
from ..shard_factors import ShardFactors
from .common import print_table


def digits_gnh(kind: str = "classifier", hidden: tuple[int, ...] = (32,),
               n_samples: int | None = None, activation: str = "tanh", max_iter: int = 300,
               seed: int = 0, **options) -> GaussNewton:
    """The GNH of an MLP trained by scikit-learn on the digits data (pixels / 16).

    ``kind="classifier"``: softmax cross-entropy on the 10 classes;
    ``kind="autoencoder"``: sigmoid outputs with binary cross-entropy on the
    binarized pixels (scikit-learn's multi-label ``MLPClassifier``). ``options`` go to
    :class:`GaussNewton` (e.g. ``shard_size``, ``client``).

    Examples
    --------
    >>> gn = digits_gnh("classifier", hidden=(4,), n_samples=50, max_iter=5)
    >>> gn.model.layer_sizes, gn.loss_name
    ((64, 4, 10), 'cross_entropy')
    """
    net, X, Y, loss, _ = train_digits_mlp(kind, hidden, n_samples, activation, max_iter, seed)
    return GaussNewton(net, X, Y, loss=loss, **options)


def trained_networks(quick: bool = False, seed: int = 0) -> dict[str, GaussNewton]:
    """The benchmark's GNHs: a digits classifier and a digits autoencoder."""
    gns = ([digits_gnh("classifier", (8,), 300, seed=seed),
            digits_gnh("autoencoder", (4,), 150, seed=seed)] if quick else
           [digits_gnh("classifier", (32,), seed=seed),
            digits_gnh("autoencoder", (16,), 600, seed=seed)])
    return {f"{'classifier' if gn.loss_name == 'cross_entropy' else 'autoencoder'} "
            f"{'-'.join(map(str, gn.model.layer_sizes))}": gn for gn in gns}


def kfac_partials(shard: ShardFactors) -> list[np.ndarray]:
    """One shard's K-FAC sums per layer: ``Σ_i C_l,iᵀC_l,i`` and ``Σ_i x̃_l,i x̃_l,iᵀ``.

    ``x̃`` is the layer input with a 1 appended when the layer has a bias; a task
    run on the shard (:meth:`dgnh.protocols.Backend.sum` adds the lists up).
    """
    sums = []
    for CT, XT in zip(shard.CT, shard.XT):
        C = CT.reshape(CT.shape[0], -1)  # (d_l, n_s·d)
        sums += [C @ C.T, XT @ XT.T]
    return sums


def kfac_dense(gn: GaussNewton) -> np.ndarray:
    """Block-diagonal K-FAC ``G_l ≈ E[CᵀC] ⊗ E[x̃x̃ᵀ]`` per layer, dense, in parameter order.

    Examples
    --------
    >>> gn = digits_gnh("classifier", hidden=(4,), n_samples=50, max_iter=5)
    >>> kfac_dense(gn).shape == gn.shape
    True
    """
    sums = gn.backend.sum(kfac_partials)
    n, N = gn.n_samples, gn.n_params
    sizes = gn.model.layer_sizes
    K = np.zeros((N, N))
    start = 0
    for l, (CC, XX) in enumerate(zip(sums[::2], sums[1::2])):
        d_out, d_in = sizes[l + 1], sizes[l]
        w = XX.shape[0]  # d_in (+1 with a bias)
        p, q = np.divmod(np.arange(d_out * d_in), d_in)
        order = p * w + q
        if w > d_in:
            order = np.concatenate([order, np.arange(d_out) * w + d_in])
        size = len(order)
        K[start:start + size, start:start + size] = np.kron(CC / n, XX / n)[np.ix_(order, order)]
        start += size
    return K


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="dgnh bench compress", description=__doc__)
    ap.add_argument("--tols", type=float, nargs="+", default=[1e-2, 1e-3, 1e-4])
    ap.add_argument("--methods", nargs="+", default=["lowrank", "hmatrix", "hybrid"])
    ap.add_argument("--max-rank", type=int, default=512)
    ap.add_argument("--leaf-size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="small networks (a smoke test)")
    args = ap.parse_args(argv)

    rows = []
    for name, gn in trained_networks(args.quick, args.seed).items():
        N = gn.n_params
        t = time.perf_counter()
        G = gn.dense()
        t_dense = time.perf_counter() - t
        lam = np.linalg.eigvalsh(G)[::-1]
        norm = lam[0]
        dense_bytes = 8 * N * N
        print(f"{name}: N = {N}, n = {gn.n_samples}, n*d = {gn.n_samples * gn.model.n_outputs}, "
              f"dense G in {t_dense:.2f} s; eigenvalues λ_k/λ_1 at k = 10, 100, 500: "
              + ", ".join(f"{lam[k] / norm:.1e}" for k in (10, 100, 500) if k < N))

        def eig_at(nbytes: int) -> float:
            r = int(nbytes // (8 * N))  # U = V Λ^½ of shape (N, r)
            return float(max(lam[r], 0.0) / norm) if r < N else 0.0

        for tol in args.tols:
            cands = []
            for method in args.methods:
                op = compress(gn, method=method, tol=tol, max_rank=args.max_rank,
                              leaf_size=args.leaf_size, seed=args.seed, progress=False)
                rep = op.report
                build, cert = rep["timings"]["build"], rep["timings"]["certificate"]
                true = float(np.linalg.norm(G - op.to_dense(), 2) / norm)
                cands.append({"method": method, "nbytes": rep["nbytes"],
                              "error_estimate": rep["error_estimate"]})
                rank = (rep["rank"] if "rank" in rep else f"{rep['rank_max']}" if method ==
                        "hmatrix" else f"{rep['lowrank_rank']}+{rep['rank_max']}")
                rows.append([name, N, f"{tol:.0e}", method, build, build / t_dense, cert,
                             rep["nbytes"] / dense_bytes, rank, rep["entries_evaluated"] / N**2,
                             rep["error_estimate"], true, eig_at(rep["nbytes"]), ""])
            pick = choose_candidate(cands, tol)
            for r in rows[-len(args.methods):]:
                r[-1] = "*" if r[3] == pick else ""
        t = time.perf_counter()
        K = kfac_dense(gn)
        t_kfac = time.perf_counter() - t
        sizes = gn.model.layer_sizes
        kfac_bytes = 8 * sum(a * a + (b + 1) ** 2 for a, b in zip(sizes[1:], sizes[:-1]))
        rows.append([name, N, "-", "K-FAC (block diag)", t_kfac, t_kfac / t_dense, "-",
                     kfac_bytes / dense_bytes, "-", 0.0, "-",
                     float(np.linalg.norm(G - K, 2) / norm), eig_at(kfac_bytes), ""])
        rows.append([name, N, "-", "dense", t_dense, 1.0, "-", 1.0, N, 1.0, "-", 0.0, 0.0, ""])
        gn.close()
    print_table(
        "Compression of trained digits GNHs (one run; build = compression, cert = error "
        "certificate; rank: low-rank rank, H-matrix max skeleton, or both for the hybrid)",
        ["network", "N", "tol", "method", "build s", "build/dense", "cert s", "mem/dense",
         "rank", "entries/N²", "est. err", "true err", "eig err same mem", "auto"], rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
