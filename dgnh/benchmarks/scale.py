"""``dgnh bench scale``: large networks on this machine, float64 and float32.

For each size N (a 784-h-h/4-10 tanh network, h chosen to reach N) on synthetic
data labelled by a random teacher network (n·d ≈ ``--nd`` Jacobian rows), in
process: time and peak memory of each phase (factors, diagonal, an exact
``--block`` square block, GNH products with ``--vectors`` vectors), the rates
against this machine's GEMM rate of the same shape measured in the same run,
and float32 against float64 (factor memory, speed-up, error). A last table
gives batched against single products on a small-layer network in
gradient-times per vector.

With ``--rank r`` (float64): a certified compression of ``dgnh.compress``
(``--method``: the low rank by default, or ``hmatrix``/``hybrid`` with
``max_rank = r`` and ``--leaf-size``; its time over exact products with r
vectors in the same run, 64 vectors at a time), its factorization at
``λ = --reg·‖G‖₂`` and the analyses from it, each against an independent
reference on the exact products with the bound the certified error
``e = ‖G − G̃‖₂`` implies (:func:`verification_rows`):
the top eigenvalues against block Lanczos (Weyl: ``|λ_i(G) − λ_i(G̃)| ≤ e``),
the log-determinant of ``G + λI`` against stochastic Lanczos quadrature with
its 95% interval (``|Δ log det| ≤ N·e/λ``) and inverse-diagonal entries
against PCG solves with unit vectors to rtol 1e-10 (``|Δ| ≤ e/λ²``). A low
rank lies below ``G`` (``G − G̃`` PSD), so its bounds are one-sided and the
log-determinant's tighter: ``0 ≤ λ_i(G) − λ_i(G̃) ≤ e``,
``0 ≤ Δ log det ≤ tr(G − G̃)/λ``, ``0 ≤ Δ inverse diagonal ≤ e/λ²``.

Memory per phase: the traced peak is the largest block of numpy/Python memory
alive during it (``tracemalloc``, besides what was alive before it); the
resident peak is the process's largest resident size during it (Linux's
``VmHWM``, reset before each phase: everything alive, including the factors
and memory the allocator keeps). The process's maximum resident size is printed
at the end, and each phase on stderr as it ends. With ``--timeline PREFIX``
the resident size is also sampled every 50 ms and attributed to the phase
running, down to the builder's own phases inside ``compress``
(:mod:`~dgnh.benchmarks.timeline`): ``PREFIX.csv``, ``PREFIX.png`` and a table
of each phase's largest resident size. Figures are indicative when other work
shares the machine.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
import tracemalloc
import warnings
from typing import Any, NamedTuple

import numpy as np
from threadpoolctl import threadpool_limits

from .. import config
from ..compress import compress
from ..config import memory_budget, return_freed_memory
from ..exact_solve import solve
from ..gauss_newton import GaussNewton
from ..lowrank import LowRank
from ..phases import phase
from ..shard_factors import ShardFactors
from ..spectral import eigsh, spectral_density
from .common import best_time, gemm_rate, print_table, random_tanh_mlp
from .timeline import ResidentTimeline, status_gib

N_OUT = 10
N_IN = 784
REFERENCE_CHUNK = 64  # vectors per product of the reference "r-product" time


def hidden_for(n_params: float) -> int:
    """Width h of a 784-h-h/4-10 network with about ``n_params`` parameters.

    Examples
    --------
    >>> hidden_for(1e6)
    972
    """
    h = np.arange(4, 100_000, 4)
    count = (N_IN + 1) * h + (h + 1) * (h // 4) + (h // 4 + 1) * N_OUT
    return int(h[np.argmin(np.abs(count - n_params))])


def teacher_problem(n_params: float, n_samples: int, seed: int):
    """``(net, X, labels)``: a random student network, Gaussian inputs, a teacher's labels."""
    rng = np.random.default_rng(seed)
    h = hidden_for(n_params)
    sizes = [N_IN, h, h // 4, N_OUT]
    X = rng.normal(size=(n_samples, N_IN))
    teacher = random_tanh_mlp(rng, [N_IN, 64, N_OUT])
    return random_tanh_mlp(rng, sizes), X, np.argmax(teacher.forward(X), axis=1)


class Measured(NamedTuple):
    result: Any
    seconds: float
    traced_mib: float  # the largest traced numpy/Python block alive, beyond the start's
    resident_gib: float | str  # the largest resident size ('' where /proc is missing)


_EARLIER_PEAK = [0.0]  # GiB: the largest VmHWM read before a reset (the reset forgets it)


def _reset_resident_peak() -> None:
    """Restart the kernel's record of this process's peak resident size (``VmHWM``),
    keeping the peak so far in :func:`process_peak`."""
    _EARLIER_PEAK[0] = process_peak()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def _resident_peak() -> float | str:
    """The peak resident size in GiB since the last reset, ``''`` where /proc is missing."""
    peak = status_gib("VmHWM")
    return "" if peak is None else peak


def process_peak() -> float:
    """The process's largest resident size so far, in GiB, across :func:`measured`'s resets
    (``getrusage`` alone would report the peak since the last reset)."""
    now = _resident_peak()
    rusage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return max(_EARLIER_PEAK[0], rusage, now if now != "" else 0.0)


def measured(fn, repeat: int, name: str) -> Measured:
    """``fn()``'s result, best seconds (timed ``repeat`` times after the traced run; one
    run when ``repeat`` is 0) and the peaks of the traced run; reports on stderr. The
    memory earlier phases freed goes back to the OS first: a phase's resident peak is
    its own arrays and the allocator's, not what its predecessors left in the heap."""
    return_freed_memory()
    _reset_resident_peak()
    tracemalloc.start()
    t = time.perf_counter()
    with phase(name):
        result = fn()
    seconds = time.perf_counter() - t
    traced = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    resident = _resident_peak()
    if repeat:
        seconds = best_time(fn, repeat)
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {seconds:.1f} s, traced peak {traced:.0f} MiB,"
          f" resident peak {resident if resident == '' else f'{resident:.2f}'} GiB",
          file=sys.stderr, flush=True)
    return Measured(result, seconds, traced, resident)


def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def run_size(n_params: float, n_samples: int, args) -> tuple[list, list, list]:
    """The phase rows, the float32-vs-float64 rows and the verification rows (with
    ``--rank``) of one network size."""
    net, X, y = teacher_problem(n_params, n_samples, args.seed)
    rng = np.random.default_rng(args.seed + 1)
    N, M = net.n_params, n_samples * N_OUT
    I = np.sort(rng.choice(N, args.block, replace=False))
    J = np.sort(rng.choice(N, args.block, replace=False))
    Vs = {k: rng.normal(size=(N, k)) for k in args.vectors}
    rows, results, factor_bytes, times, checks = [], {}, {}, {}, []
    label = f"N={N:,}"
    for dtype in args.dtypes:
        m = measured(lambda: GaussNewton(net, X, y, loss="cross_entropy", dtype=dtype,
                                         client="in-process"), 0, f"{label} {dtype} factors")
        gn = m.result
        factor_bytes[dtype], times[dtype, "factors"] = gn.backend.factor_bytes, m.seconds
        n_s = gn.shard_size
        rows.append([label, dtype, "factors", m.seconds, m.traced_mib, m.resident_gib,
                     "", "", ""])
        phases = [("diagonal", lambda: gn.backend.sum(ShardFactors.diagonal), None, None)]
        phases.append((f"block {args.block}x{args.block}", lambda: gn.entries(I, J),
                       2.0 * args.block ** 2 * M, (args.block, args.block, M)))
        widest = max(zip(net.layer_sizes[:-1], net.layer_sizes[1:]), key=lambda s: s[0] * s[1])
        phases += [(f"product k={k}", lambda V=V: gn @ V, 4.0 * n_samples * N * k,
                    (widest[0] + 1, widest[1] * k, min(n_s, n_samples))) for k, V in Vs.items()]
        for name, fn, flops, shape in phases:
            m = measured(fn, args.repeat, f"{label} {dtype} {name}")
            results[dtype, name], times[dtype, name] = m.result, m.seconds
            rate = ref = ratio = ""
            if flops:
                rate = flops / m.seconds / 1e9
                ref = gemm_rate(*shape, dtype=dtype)
                ratio = rate / ref
            rows.append([label, dtype, name, m.seconds, m.traced_mib, m.resident_gib, rate, ref,
                         ratio])
        gn.close()
    compare = []
    if set(args.dtypes) == {"float64", "float32"}:
        memory = factor_bytes["float32"] / factor_bytes["float64"]
        compare = [[label, name, times["float64", name] / times[dtype, name],
                    "" if name == "factors" else _rel(results[dtype, name],
                                                      results["float64", name]),
                    memory if name == "factors" else ""]
                   for dtype, name in times if dtype == "float32"]
    # the verifications run with only their own arrays alive (the phases' closures hold
    # the vectors, ``m`` the last product, ``gn`` the closed factors: N × k floats each)
    del Vs, results, phases, fn, m, gn
    if args.rank:
        with GaussNewton(net, X, y, loss="cross_entropy", client="in-process") as gn:
            checks = verification_rows(gn, label, args, rng)
    return rows, compare, checks


def slq_logdet(gn: GaussNewton, reg: float, n_vectors: int, n_steps: int,
               seed: int) -> tuple[float, float]:
    """``log det(G + reg·I)`` by stochastic Lanczos quadrature on the exact products, and
    the half-width of its 95% confidence interval (over the Rademacher probes)."""
    sd = spectral_density(gn, n_vectors=n_vectors, n_steps=n_steps, seed=seed)
    per_probe = gn.n_params * np.sum(sd.weights * np.log(np.maximum(sd.nodes, 0.0) + reg),
                                     axis=1)
    return float(per_probe.mean()), float(1.96 * per_probe.std(ddof=1) / np.sqrt(n_vectors))


def _larger_resident(*measures: Measured) -> float | str:
    """The largest resident peak of phases reported in one row (``''`` never wins)."""
    return max((m.resident_gib for m in measures), key=lambda x: x or 0)


def verification_rows(gn: GaussNewton, label: str, args, rng: np.random.Generator) -> list:
    """Compressed form, factorization and analyses at one size, each checked against its
    reference.

    Rows: ``[network, quantity, time s, traced MiB, resident GiB, time / r-product, value,
    reference, |difference|, allowed, ok]``; ``allowed`` is the bound the certified error
    implies (plus the reference's own uncertainty) and ``ok`` whether the difference is
    within it.
    """
    N, r = gn.n_params, args.rank

    def run(fn, what: str) -> Measured:
        return measured(fn, 0, f"{label} {what}")

    V = rng.normal(size=(N, min(r, REFERENCE_CHUNK)))

    def r_products() -> None:  # one N × 64 input and output alive, not N × r
        for j in range(0, r, REFERENCE_CHUNK):
            gn @ V[:, :min(REFERENCE_CHUNK, r - j)]

    t_r = run(r_products, f"products with {r} vectors, {REFERENCE_CHUNK} at a time").seconds
    V = None  # free it before the compression
    # the references that need no compression first: their Lanczos bases (SLQ: probes·steps
    # N-vectors) are freed before the compressed form and its factorization exist
    k = min(args.eigenvalues, r, N - 1)
    m_eig = run(lambda: eigsh(gn, k, tol=1e-10, seed=args.seed), "top eigenvalues, Lanczos")
    ref_eig = m_eig.result[0]
    lam = args.reg * float(np.max(ref_eig))  # λ relative to ‖G‖₂ from Lanczos
    m_slq = run(lambda: slq_logdet(gn, lam, args.probes, args.steps, args.seed),
                "logdet, SLQ")
    ref_logdet, half = m_slq.result
    with warnings.catch_warnings():  # max_rank binds by design: the rank is fixed
        warnings.simplefilter("ignore", UserWarning)
        m = run(lambda: compress(gn, method=args.method, tol=args.tol, max_rank=r,
                                 leaf_size=args.leaf_size, progress=False), "compress")
    H, rep = m.result, m.result.report
    norm, e = rep["norm_estimate"], rep["error_estimate"] * rep["norm_estimate"]
    below = isinstance(H, LowRank)  # G − G̃ PSD: one-sided bounds
    rows = [[label, f"{rep['method']} r={r} (certified), {H.nbytes / 2**30:.2f} GiB",
             m.seconds, m.traced_mib, m.resident_gib, m.seconds / t_r, rep["error_estimate"],
             "", "", "", ""],
            [label, "  of which certificate", rep["timings"]["certificate"], "", "",
             rep["timings"]["certificate"] / t_r, "", "", "", "", ""]]
    k = min(k, H.rank) if below else k
    m = run(lambda: (np.linalg.eigvalsh(H.U.T @ H.U)[::-1][:k] if below
                     else eigsh(H, k, tol=1e-10, seed=args.seed)[0]),
            "top eigenvalues of the compressed form")
    gap = np.sort(ref_eig)[::-1][:k] - m.result
    low = -1e-8 * norm if below else -e * (1 + 1e-6)  # Weyl: |gap| ≤ e (0 ≤ gap if below)
    rows.append([label, f"top {k} eigenvalues (vs Lanczos)", m_eig.seconds, m_eig.traced_mib,
                 _larger_resident(m_eig, m),
                 m_eig.seconds / t_r, m.result[0], float(np.max(ref_eig)),
                 float(np.abs(gap).max()), e,
                 bool(gap.min() >= low and gap.max() <= e * (1 + 1e-6))])
    m = run(lambda: H.factorize(lam), "factorize")
    F = m.result
    rows.append([label, f"factorize at λ={args.reg:g}‖G‖", m.seconds, m.traced_mib,
                 m.resident_gib, m.seconds / t_r, "", "", "", "", ""])
    m = run(F.logdet, "logdet")
    # 0 ≤ log det(G+λI) − log det(G̃+λI) ≤ tr(G − G̃)/λ if G − G̃ is PSD; else |·| ≤ N·e/λ
    # (Weyl: each eigenvalue moves by at most e, each log by at most e/λ)
    bound = (float(np.sum(gn.diagonal()) - np.sum(H.U * H.U)) if below else N * e) / lam
    diff = ref_logdet - m.result
    rows.append([label, "logdet(G+λI) (vs SLQ ± 95%)", m.seconds, m_slq.traced_mib,
                 m_slq.resident_gib, m_slq.seconds / t_r, m.result, ref_logdet, abs(diff),
                 bound + half, bool((-half if below else -bound - half) <= diff <= bound + half)])
    m = run(F.inverse_diagonal, "inverse diagonal")
    inv = m.result
    cols = np.sort(rng.choice(N, args.checks, replace=False))
    E = np.zeros((N, len(cols)))
    E[cols, np.arange(len(cols))] = 1.0
    m_ref = run(lambda: solve(gn, E, reg=lam, rtol=1e-10, preconditioner=F),
                "unit-vector PCG solves")
    exact = m_ref.result.x[cols, np.arange(len(cols))]
    gaps = inv[cols] - exact
    rows.append([label, f"inverse diagonal, {len(cols)} entries (vs PCG)", m.seconds,
                 m.traced_mib, _larger_resident(m, m_ref),
                 m_ref.seconds / t_r, float(inv[cols].mean()), float(exact.mean()),
                 float(np.abs(gaps).max()), e / lam**2,
                 bool(gaps.min() >= (-1e-9 * exact.max() if below else -e / lam**2)
                      and gaps.max() <= e / lam**2)])
    return rows


def small_network_rows(seed: int) -> list:
    """Batched vs single products, in gradient-times per vector, on a 64-128-128-10 network."""
    rng = np.random.default_rng(seed)
    net = random_tanh_mlp(rng, [64, 128, 128, N_OUT])
    X = rng.normal(size=(1797, 64))
    gn = GaussNewton(net, X, rng.integers(0, N_OUT, 1797), loss="cross_entropy",
                     client="in-process")
    t_grad = best_time(gn.gradient)
    out = []
    for k in (1, 16, 128):
        V = rng.normal(size=(net.n_params, k))
        out.append([net.n_params, k, best_time(lambda: gn @ V) / k / t_grad])
    gn.close()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="dgnh bench scale", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1e5",
                    help="comma-separated network sizes N (default 1e5; the issue's: 1e5,3e5,1e6)")
    ap.add_argument("--nd", type=float, default=1e5, help="Jacobian rows n·d (default 1e5)")
    ap.add_argument("--block", type=int, default=256, help="side of the exact block")
    ap.add_argument("--vectors", default="1,16,64", help="vectors per product")
    ap.add_argument("--dtypes", default="float64,float32")
    ap.add_argument("--repeat", type=int, default=1, help="timed runs after the traced one")
    ap.add_argument("--threads", type=int, default=None,
                    help="BLAS threads (default: the library's, usually one per core)")
    ap.add_argument("--rank", type=int, default=0,
                    help="rank of the certified low rank and the verified analyses (0: skip)")
    ap.add_argument("--method", default="lowrank", choices=("lowrank", "hmatrix", "hybrid"),
                    help="the compressed form verified with --rank (its max_rank)")
    ap.add_argument("--leaf-size", type=int, default=256, help="leaf size of hmatrix/hybrid")
    ap.add_argument("--tol", type=float, default=1e-6, help="tol of that compress call")
    ap.add_argument("--reg", type=float, default=1e-2, help="λ relative to ‖G‖₂")
    ap.add_argument("--eigenvalues", type=int, default=20)
    ap.add_argument("--probes", type=int, default=16, help="SLQ probes")
    ap.add_argument("--steps", type=int, default=40, help="SLQ Lanczos steps")
    ap.add_argument("--checks", type=int, default=10, help="inverse-diagonal entries checked")
    ap.add_argument("--memory-budget", default=None,
                    help="dgnh's memory budget for the run, e.g. 2GiB (default: dgnh's, "
                         "a quarter of the machine's memory)")
    ap.add_argument("--timeline", default=None, metavar="PREFIX",
                    help="sample the resident size every 50 ms, by phase: PREFIX.csv, "
                         "PREFIX.png and a table of each phase's peak")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        budget = memory_budget(args.memory_budget)
    except (TypeError, ValueError) as exc:
        ap.error(str(exc))
    with threadpool_limits(limits=args.threads, user_api="blas"), \
            config.set(memory_budget=budget):
        if args.timeline is None:
            return _run(ap, args)
        with ResidentTimeline() as timeline:
            code = _run(ap, args)
        print_table("Resident memory by phase (sampled every 50 ms)",
                    ["phase", "from s", "to s", "max resident GiB"], timeline.peaks())
        print("\nresident timeline: " + ", ".join(timeline.write(args.timeline)))
        return code


def _run(ap: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        sizes = [float(s) for s in args.sizes.split(",")]
        args.vectors = [int(k) for k in args.vectors.split(",")]
    except ValueError:
        ap.error("--sizes and --vectors take comma-separated numbers")
    args.dtypes = [d.strip() for d in args.dtypes.split(",")]
    if not set(args.dtypes) <= {"float64", "float32"}:
        ap.error("--dtypes takes float64 and/or float32")
    n_samples = max(1, int(args.nd) // N_OUT)
    phases, compare, checks = [], [], []
    for size in sizes:
        rows, comp, check = run_size(size, n_samples, args)
        phases += rows
        compare += comp
        checks += check
    print_table(f"Phases in process, n = {n_samples} samples (n·d = {n_samples * N_OUT}), "
                "rates against numpy GEMM of the same shape in this run",
                ["network", "dtype", "phase", "time s", "traced MiB", "resident GiB", "GFLOP/s",
                 "GEMM GFLOP/s", "ratio"], phases)
    if compare:
        print_table("float32 against float64", ["network", "phase", "speed-up",
                                                 "max rel. error", "factor memory ratio"],
                    compare)
    if checks:
        print_table(f"Certified {args.method} (tol {args.tol:g}) and the analyses from it, "
                    "float64; "
                    "'allowed' is the bound its certified error implies",
                    ["network", "quantity", "time s", "traced MiB", "resident GiB",
                     "t / r-product", "value", "reference", "|diff|", "allowed", "ok"], checks)
    with phase("batched against single products"):
        batched = small_network_rows(args.seed)
    print_table("Batched against single GNH products on a small-layer network",
                ["N", "vectors", "gradient-times per vector"], batched)
    print(f"\nmaximum resident size of this process: {process_peak() * 2**10:.0f} MiB; "
          f"memory budget: {memory_budget() / 2**20:.0f} MiB; "
          f"BLAS threads: {args.threads or 'default'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
