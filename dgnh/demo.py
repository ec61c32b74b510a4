"""``dgnh demo``: the whole pipeline on scikit-learn's digits, on a local Dask cluster.

1. Train a small tanh MLP (64-``hidden``-10) on ``sklearn.datasets.load_digits``
   (1797 images of 8×8 pixels; shipped with scikit-learn, no download) with
   scikit-learn's Adam (``MLPClassifier``), and take its weights as a
   :class:`~dgnh.model.MLP` whose outputs are the logits of the cross-entropy loss.
2. Write ``model.npz``, the dataset store ``digits.zarr`` and ``job.toml``.
3. Run the job (:func:`dgnh.job.run_job`) on a LocalCluster: build the factors
   on the workers, compress (``method = "auto"``: low rank, H-matrix and
   hybrid, the smallest that meets ``tol``), certify, factorize, store in
   ``result.zarr``.
4. Draw ``structure.png`` (block structure coloured by rank) and
   ``spectrum.png`` (top eigenvalues of the compressed and of the exact GNH).
"""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO

import numpy as np

from .dataset import save_dataset
from .digits import train_digits_mlp
from .gauss_newton import GaussNewton
from .job import load_job, run_job
from .model import MLP
from .plot import plot_store
from .spectral import eigsh
from .summary import summary
from .zarr_io import check_new_output

FILES = ("model.npz", "digits.zarr", "job.toml", "result.zarr", "structure.png",
         "spectrum.png")
SHARD_ROWS = 600  # 3 shards of the 1797 digits
SPECTRUM_K = 100  # eigenvalues in spectrum.png
JOB_TEMPLATE = """\
# dgnh job written by `dgnh demo` (see dgnh/job.py for every key)
model = "model.npz"
data = "digits.zarr"
loss = "cross_entropy"
output = "result.zarr"
shard_size = {shard_size}

[compress]
method = "auto"       # low rank, H-matrix and hybrid: the smallest that meets tol
tol = {tol}
max_rank = {max_rank}
leaf_size = {leaf_size}
seed = 0

[factorize]
relative_reg = 1e-3   # λ = 1e-3 ‖G‖₂
"""


def train_digits(hidden: int = 16, max_iter: int = 300,
                 seed: int = 0) -> tuple[MLP, np.ndarray, np.ndarray, float]:
    """A tanh MLP 64-``hidden``-10 trained on the digits; ``(net, X, y, accuracy)``.

    ``X`` are the pixels scaled to [0, 1], ``y`` the integer labels; the network
    outputs logits (the softmax belongs to the ``cross_entropy`` loss).

    Examples
    --------
    >>> net, X, y, acc = train_digits(hidden=4, max_iter=20)  # doctest: +SKIP
    >>> net.layer_sizes  # doctest: +SKIP
    (64, 4, 10)
    """
    net, X, y, _, score = train_digits_mlp("classifier", (hidden,), max_iter=max_iter, seed=seed)
    return net, X, y, score


def run_demo(out: str | os.PathLike = "dgnh-demo", overwrite: bool = False, hidden: int = 16,
             max_iter: int = 300, tol: float = 1e-3, max_rank: int = 256, leaf_size: int = 128,
             progress: bool | None = None, stream: TextIO | None = None) -> dict[str, str]:
    """Run the demo (see the module docstring); returns ``{name: path}`` of what it wrote.

    Refuses to replace any of its files under ``out`` unless ``overwrite``.
    """
    stream = sys.stdout if stream is None else stream
    out = os.path.abspath(os.fspath(out))
    paths = {name: os.path.join(out, name) for name in FILES}
    for path in paths.values():
        check_new_output(path, overwrite, "demo output")
    os.makedirs(out, exist_ok=True)
    t_start = time.perf_counter()

    net, X, y, accuracy = train_digits(hidden, max_iter)
    print(f"trained a {'-'.join(map(str, net.layer_sizes))} tanh MLP on the digits "
          f"({len(X)} images): training accuracy {accuracy:.3f}, {net.n_params:,} parameters "
          f"({time.perf_counter() - t_start:.1f} s)", file=stream)
    net.save(paths["model.npz"])
    save_dataset(paths["digits.zarr"], X, y, chunk_rows=SHARD_ROWS // 2, overwrite=overwrite)
    with open(paths["job.toml"], "w") as fh:
        fh.write(JOB_TEMPLATE.format(shard_size=SHARD_ROWS, tol=tol, max_rank=max_rank,
                                     leaf_size=leaf_size))
    run_job(load_job(paths["job.toml"]), overwrite=overwrite, progress=progress, out=stream)

    with GaussNewton(net, X, y, loss="cross_entropy", client="in-process") as gn:
        exact = eigsh(gn, min(SPECTRUM_K, net.n_params - 1))[0]
    for name in ("structure", "spectrum"):
        plot_store(paths["result.zarr"], paths[f"{name}.png"], panels=name, k=SPECTRUM_K,
                   reference=exact, overwrite=overwrite)
    print(f"\n{summary(paths['result.zarr'])}\n\ndemo done in "
          f"{time.perf_counter() - t_start:.1f} s; wrote:", file=stream)
    for path in paths.values():
        print(f"  {path}", file=stream)
    return paths
