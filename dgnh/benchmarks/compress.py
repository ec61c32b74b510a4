"""``dgnh bench compress``: every compressed form of four GNHs against the physical
limit (the optimal truncated eigendecomposition), all measured in the same run.

Four networks on the digits pixels, small enough for dense float64 references
(:func:`benchmark_networks`): a classifier trained by scikit-learn (softmax
cross-entropy), the same architecture untrained, a regression network with 20
outputs (mean squared error, trained on a random teacher) and a trained
autoencoder (sigmoid outputs, binary cross-entropy on binarized pixels).

For every tolerance and form (``dgnh.compress`` with ``method`` = lowrank by
Nyström, lowrank by pivoted Cholesky, hmatrix, hybrid, dense) the table gives the
true ``‖G − H‖₂/‖G‖₂`` against the dense G and the certificate's estimate, the
memory (MiB and relative to dense), ``mem/opt`` = memory over that of the optimal
truncated eigendecomposition reaching the same true error (``8·N·r`` for the
smallest such rank ``r``; below 1 the form beats it), ``λ_min(H)/‖G‖₂``, the
wall time of the ``compress`` call (build and certificate) over that of one exact
GNH product with 256 vectors measured in the same run (``t/t256``), whether ``max_rank`` binds (``cap``: ``rank`` for a low
rank, else the number of capped H-matrix nodes), and what ``method="auto"``
picks (``*``; its own row gives its total time). Block-diagonal K-FAC is
listed once per network for scale.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np

from ..compress import compress
from ..digits import train_digits_mlp
from ..gauss_newton import GaussNewton
from ..model import MLP
from ..shard_factors import ShardFactors
from .common import best_time, print_table, random_tanh_mlp

FORMS = {  # form -> dgnh.compress options
    "lowrank": {"method": "lowrank"},
    "pivoted_cholesky": {"method": "lowrank", "lowrank_method": "pivoted_cholesky"},
    "hmatrix": {"method": "hmatrix"},
    "hybrid": {"method": "hybrid"},
    "dense": {"method": "dense"},
}


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


def regression_gnh(hidden: tuple[int, ...] = (32,), n_samples: int = 1000,
                   n_outputs: int = 20, max_iter: int = 300, seed: int = 0) -> GaussNewton:
    """The GNH (mean squared error) of a ReLU MLP trained by scikit-learn to regress
    ``n_outputs`` targets of a random tanh teacher on the digits pixels / 16.

    Examples
    --------
    >>> regression_gnh((4,), n_samples=30, max_iter=5).model.layer_sizes
    (64, 4, 20)
    """
    from sklearn.datasets import load_digits
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPRegressor

    X = load_digits().data[:n_samples] / 16.0
    teacher = random_tanh_mlp(np.random.default_rng([seed, 20]), [64, 16, n_outputs])
    Y = np.tanh(teacher.forward(X))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        fit = MLPRegressor(hidden_layer_sizes=hidden, activation="relu", max_iter=max_iter,
                           random_state=seed).fit(X, Y)
    net = MLP([c.T for c in fit.coefs_], list(fit.intercepts_),
              ["relu"] * len(hidden) + ["identity"])
    return GaussNewton(net, X, Y, loss="mse")


def untrained_classifier_gnh(hidden: tuple[int, ...] = (32,), n_samples: int | None = None,
                             seed: int = 0) -> GaussNewton:
    """The GNH of a random (untrained) tanh classifier on the digits pixels / 16 and labels."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    net = random_tanh_mlp(np.random.default_rng([seed, 10]), [64, *hidden, 10])
    return GaussNewton(net, X[:n_samples] / 16.0, y[:n_samples], loss="cross_entropy")


def benchmark_networks(quick: bool = False, seed: int = 0) -> dict[str, GaussNewton]:
    """The benchmark's GNHs by name (``quick``: small ones, a smoke test)."""
    h, n = ((8,), 300) if quick else ((32,), None)
    return {
        "trained classifier": digits_gnh("classifier", h, n, seed=seed),
        "untrained classifier": untrained_classifier_gnh(h, n, seed=seed),
        "regression (20 outputs)": regression_gnh(h, 100 if quick else 1000, seed=seed),
        "autoencoder": digits_gnh("autoencoder", (4,) if quick else (16,),
                                  150 if quick else 600, seed=seed),
    }


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


def measure(op, G: np.ndarray, eigenvalues: np.ndarray, seconds: float,
            t256: float) -> list:
    """The measured columns of one compressed form (see the module doc), from dense references.

    ``eigenvalues`` are those of ``G``, descending.
    """
    rep, norm, N = op.report, eigenvalues[0], len(G)
    H = op.to_dense()
    true = float(np.abs(np.linalg.eigvalsh(G - H)).max() / norm)
    r_opt = int(np.count_nonzero(eigenvalues > true * norm))  # λ_{r+1} <= true error
    cap = ("rank" if rep["max_rank_binds"] and not rep["n_capped_nodes"]
           else rep["n_capped_nodes"] or "-")
    return [true, rep["error_estimate"], op.nbytes / 2**20, rep["memory_fraction"],
            op.nbytes / (8 * N * r_opt) if r_opt else float("inf"),
            float(np.linalg.eigvalsh(H)[0] / norm), seconds / t256, cap]


def _timed_compress(gn: GaussNewton, **options):
    """``(compress(gn, **options), wall seconds)`` without the warnings (the table shows them)."""
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        op = compress(gn, progress=False, **options)
    return op, time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="dgnh bench compress", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tols", type=float, nargs="+", default=[1e-3, 1e-4])
    ap.add_argument("--methods", nargs="+", default=list(FORMS), choices=list(FORMS),
                    help="the forms to build (besides auto)")
    ap.add_argument("--max-rank", type=int, default=512)
    ap.add_argument("--leaf-size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="small networks (a smoke test)")
    args = ap.parse_args(argv)
    shared = {"max_rank": args.max_rank, "leaf_size": args.leaf_size, "seed": args.seed}

    rows = []
    for name, gn in benchmark_networks(args.quick, args.seed).items():
        N = gn.n_params
        G = gn.dense()
        lam = np.linalg.eigvalsh(G)[::-1]
        V = np.random.default_rng(args.seed).standard_normal((N, 256))
        t256 = best_time(lambda: gn @ V, repeat=1)
        print(f"{name} {'-'.join(map(str, gn.model.layer_sizes))}: N = {N}, n·d = "
              f"{gn.n_samples * gn.model.n_outputs}, one product with 256 vectors "
              f"{t256:.3f} s; λ_k/λ_1 at k = 10, 100, 500: "
              + ", ".join(f"{lam[k] / lam[0]:.1e}" for k in (10, 100, 500) if k < N))
        label = f"{name} (N={N})"
        for tol in args.tols:
            first = len(rows)
            for form in args.methods:
                op, seconds = _timed_compress(gn, tol=tol, **FORMS[form], **shared)
                rows.append([label, f"{tol:.0e}", form,
                             *measure(op, G, lam, seconds, t256), ""])
            op, seconds = _timed_compress(gn, method="auto", tol=tol, **shared)
            pick = op.report["method"]
            rows.append([label, f"{tol:.0e}", f"auto → {pick}",
                         *measure(op, G, lam, seconds, t256), ""])
            for row in rows[first:-1]:
                row[-1] = "*" if row[2] == pick else ""
        t = time.perf_counter()
        K = kfac_dense(gn)
        t_kfac = time.perf_counter() - t
        sizes = gn.model.layer_sizes
        kfac_bytes = 8 * sum(a * a + (b + 1) ** 2 for a, b in zip(sizes[1:], sizes[:-1]))
        true = float(np.abs(np.linalg.eigvalsh(G - K)).max() / lam[0])
        r_opt = int(np.count_nonzero(lam > true * lam[0]))
        rows.append([label, "-", "K-FAC (block diag)", true, "-", kfac_bytes / 2**20,
                     kfac_bytes / G.nbytes, kfac_bytes / (8 * N * r_opt) if r_opt else "-",
                     float(np.linalg.eigvalsh(K)[0] / lam[0]), t_kfac / t256, "-", ""])
        gn.close()
    print_table(
        "Compressed GNHs against the optimal truncated eigendecomposition (one run; true "
        "errors from the dense G; mem/opt < 1: better than the optimal low rank at that "
        "error; t/t256: compress time over one 256-vector GNH product; * = auto's pick)",
        ["network", "tol", "form", "true err", "est. err", "MiB", "mem/dense", "mem/opt",
         "λmin/‖G‖", "t/t256", "cap", "auto"], rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
