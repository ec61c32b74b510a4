"""Pictures of a compressed GNH: the block structure coloured by rank, and the spectrum.

Drawn with matplotlib's object API on an Agg canvas (no pyplot, no global
backend change), so it works on headless machines and leaves notebooks alone.

* :func:`plot_structure` — the matrix in cluster-tree order, the way H-matrix
  libraries draw it: dense blocks (exact diagonal leaves and near-field
  corrections) in red, far blocks shaded by their rank with the rank written
  in the block; zero rows and columns (parameters with ``G_aa = 0``) in grey.
  A global low rank is one block; a hybrid shows its H-matrix part and names
  the rank of its low-rank part.
* :func:`plot_spectrum` — the top eigenvalues of the operator (Lanczos), with
  an optional reference (e.g. the exact GNH's) and the regularization λ.
* :func:`plot_store` — both panels for a result store, written to a PNG.
"""

from __future__ import annotations

import os

import numpy as np
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from . import store
from .zarr_io import check_new_output
from .dense import Dense
from .hybrid import Hybrid
from .lowrank import LowRank
from .operator import Operator
from .spectral import eigsh
from .validation import check_choice, check_int

Array = np.ndarray
DENSE_COLOR = "tab:red"
NEAR_COLOR = "tab:orange"
ZERO_COLOR = "0.85"
RANK_CMAP = "Greens"
PANELS = ("both", "structure", "spectrum")


def _blocks(op: Operator) -> tuple[list[tuple[int, int, int, int, str, int]], int]:
    """``[(row, col, height, width, kind, rank), ...]`` and the size of the tree.

    ``kind`` is ``"leaf"`` (exact diagonal block), ``"near"`` (near-field
    correction) or ``"far"`` (a coupling, of rank ``rank``).
    """
    if isinstance(op, LowRank):
        live = int(np.count_nonzero(np.any(op.U != 0, axis=1)))
        return [(0, 0, live, live, "far", op.rank)], live
    if isinstance(op, Dense):
        return [(0, 0, op.shape[0], op.shape[0], "leaf", op.shape[0])], op.shape[0]
    h = op.hmatrix if isinstance(op, Hybrid) else op
    start, size = h.node_start, h.node_stop - h.node_start
    out = []
    for a in range(h.n_nodes):
        c1, c2 = h.node_children[a]
        if c1 < 0:
            out.append((start[a], start[a], size[a], size[a], "leaf", size[a]))
            continue
        rank = int(min(len(h.skeletons[c1]), len(h.skeletons[c2])))
        out += [(start[x], start[y], size[x], size[y], "far", rank)
                for x, y in ((c1, c2), (c2, c1))]
    for a, b in h.near_pairs:
        out += [(start[x], start[y], size[x], size[y], "near", min(size[x], size[y]))
                for x, y in ((a, b), (b, a))]
    return out, len(h.perm)


def plot_structure(op: Operator, ax: Axes) -> Axes:
    """Draw the block structure of a LowRank, HMatrix, Hybrid or Dense operator on ``ax``.

    The axes are tree positions (the H-matrix permutation; for a low rank, the
    parameters with nonzero rows first); parameters outside the tree (zero
    diagonal) come last, in grey. Far blocks are shaded by rank (written in
    the block when it is large enough), exact diagonal blocks are red and
    near-field corrections orange.

    Examples
    --------
    >>> from matplotlib.figure import Figure
    >>> ax = Figure().add_subplot()
    >>> _ = plot_structure(LowRank(np.eye(6, 2)), ax)
    >>> _ = plot_structure(Dense(np.eye(4)), ax)
    """
    store.kind_of(op)
    blocks, n_tree = _blocks(op)
    N = op.shape[0]
    norm = Normalize(vmin=0, vmax=max([r for *_, kind, r in blocks if kind == "far"] + [1]))
    cmap = ScalarMappable(norm=norm, cmap=RANK_CMAP)
    colors = {"leaf": DENSE_COLOR, "near": NEAR_COLOR}
    for row, col, height, width, kind, rank in blocks:
        ax.add_patch(Rectangle((col, row), width, height, linewidth=0.4, edgecolor="k",
                               facecolor=colors.get(kind) or cmap.to_rgba(rank)))
        if kind == "far" and min(height, width) >= 0.06 * N:
            ax.text(col + width / 2, row + height / 2, str(rank), ha="center", va="center",
                    fontsize=max(5, min(12, 120 * min(height, width) / N)),
                    color="white" if norm(rank) > 0.6 else "black")
    if n_tree < N:
        for rect in ((n_tree, 0, N - n_tree, N), (0, n_tree, n_tree, N - n_tree)):
            ax.add_patch(Rectangle(rect[:2], rect[2], rect[3], facecolor=ZERO_COLOR,
                                   edgecolor="none"))
    ax.set_xlim(0, N)
    ax.set_ylim(N, 0)
    ax.set_aspect("equal")
    if isinstance(op, LowRank):
        title = f"global low rank U Uᵀ, rank {op.rank}"
    elif isinstance(op, Dense):
        title = "dense G (the smallest form meeting tol)"
    elif isinstance(op, Hybrid):
        title = f"hybrid: U Uᵀ (rank {op.lowrank.rank}) + H-matrix"
    else:
        title = "H-matrix"
    ax.set_title(f"{title}, N = {N:,}" + _outside_tree(op, n_tree), fontsize=9)
    ax.set_xlabel("parameter (tree order)")
    ax.figure.colorbar(cmap, ax=ax, fraction=0.046, pad=0.04, label="rank of far block")
    kinds = {kind for *_, kind, _ in blocks}
    handles = [Patch(facecolor=colors[k], edgecolor="k", label=label) for k, label in
               (("leaf", "exact diagonal block"), ("near", "near-field block")) if k in kinds]
    if handles:
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2,
                  fontsize=8, frameon=False)
    return ax


def _outside_tree(op: Operator, n_tree: int) -> str:
    """The grey rows named: zero rows of G, and (hybrid) rows the low-rank part captures."""
    N = op.shape[0]
    if n_tree == N:
        return ""
    if not isinstance(op, Hybrid):
        return f" ({N - n_tree:,} zero rows, grey)"
    outside = np.setdiff1d(np.arange(N), op.hmatrix.perm)
    zero = int(np.count_nonzero(~np.any(op.lowrank.U[outside] != 0, axis=1)))
    return (f"\n(grey: {len(outside) - zero:,} rows captured by U Uᵀ, its pivots; "
            f"{zero:,} zero rows of G)")


def plot_spectrum(op: Operator, ax: Axes, k: int = 40, reference: Array | None = None,
                  reg: float | None = None, reg_label: str | None = None,
                  label: str = "compressed") -> Axes:
    """The ``k`` largest eigenvalues of ``op`` (log scale) on ``ax``.

    ``reference``: eigenvalues to draw beside them (e.g. of the exact GNH);
    ``reg``: the regularization λ of a factorization, as a horizontal line
    (labelled ``reg_label``). When ``op.report`` has ``norm_estimate`` (‖G‖₂),
    everything is drawn relative to it, as ``dgnh info`` prints it. When the
    report proves the operator indefinite (``dgnh.compress``'s Lanczos bound
    ``min_eigenvalue_estimate``), the panel draws ``|λ_min|``: a factorization
    needs λ above it. Non-positive eigenvalues cannot be drawn on the log scale
    and are counted in the legend.
    """
    k = int(min(k, op.shape[0] - 1))
    values = eigsh(op, k)[0]
    report = getattr(op, "report", {})
    norm = report.get("norm_estimate") or 1.0
    unit = "‖G‖₂" if "norm_estimate" in report else ""
    for vals, name, style in ((values, label, "o"), (reference, "exact GNH", "x")):
        if vals is None:
            continue
        vals = np.sort(np.asarray(vals))[::-1][:k] / norm
        positive = vals > 0
        suffix = f" ({np.count_nonzero(~positive)} ≤ 0 not shown)" if not positive.all() else ""
        ax.semilogy(np.flatnonzero(positive) + 1, vals[positive], style, ms=4,
                    label=name + suffix, fillstyle="none")
    if reg is not None:
        ax.axhline(reg / norm, color="tab:red", lw=0.8, ls="--",
                   label=reg_label or f"λ = {reg / norm:.3g}{unit}")
    if report.get("indefinite"):
        lowest = report["min_eigenvalue_estimate"]  # relative to ‖G‖₂, as dgnh info prints it
        ax.axhline(-lowest, color="tab:purple", lw=0.8, ls=":",
                   label=f"indefinite: λ_min ≤ {lowest:.3g}‖G‖₂ (|λ_min| shown)")
    ax.set_xlabel("index i")
    ax.set_ylabel(f"eigenvalue λ_i / ‖G‖₂ (‖G‖₂ ≈ {norm:.4g})" if unit else "eigenvalue λ_i")
    ax.set_title(f"top {k} eigenvalues", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return ax


def plot_store(path: str | os.PathLike, output: str | os.PathLike, panels: str = "both",
               k: int = 40, reference: Array | None = None, overwrite: bool = False) -> str:
    """Write a PNG of a result store: ``"structure"``, ``"spectrum"`` or ``"both"`` panels.

    Returns the path written. Refuses an existing ``output`` unless ``overwrite``.

    Examples
    --------
    >>> plot_store("result.zarr", "result.png")  # doctest: +SKIP
    'result.png'
    """
    check_choice(panels, "panels", PANELS)
    k = check_int(k, "k", minimum=1)
    output = os.fspath(output)
    check_new_output(output, overwrite, "picture")
    op = store.open(path)
    fact = store.read_factorization(path)
    failed = (store.read_attributes(path).get("run") or {}).get("factorization") or {}
    if fact is not None:
        reg, reg_label = fact["reg"], None
    elif failed.get("status") == "indefinite":
        norm = op.report.get("norm_estimate") or 1.0
        reg, reg_label = failed["reg"], (f"λ = {failed['reg'] / norm:.3g}‖G‖₂ (factorization: "
                                         "indefinite)")
    else:
        reg, reg_label = None, None
    names = ["structure", "spectrum"] if panels == "both" else [panels]
    fig = Figure(figsize=(6.0 * len(names), 5.2), layout="constrained")
    for ax, name in zip(fig.subplots(1, len(names), squeeze=False)[0], names):
        if name == "structure":
            plot_structure(op, ax)
        else:
            plot_spectrum(op, ax, k=k, reference=reference, reg=reg, reg_label=reg_label)
    report = op.report
    if "error_estimate" in report:
        fig.suptitle(f"{os.path.basename(os.fspath(path).rstrip('/'))}: ‖G − H‖₂/‖G‖₂ ≈ "
                     f"{report['error_estimate']:.2g}, {report.get('nbytes', 0) / 2**20:.2f} "
                     f"MiB ({100 * report.get('memory_fraction', 0):.1f}% of dense)",
                     fontsize=10)
    fig.savefig(output, dpi=130)
    return output
