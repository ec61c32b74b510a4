"""Write an example model and dataset for the deploy/ job files.

Trains a small MLP (64-32-10, tanh) on scikit-learn's digits data (shipped with
scikit-learn, no download) and writes, under OUTDIR (default /data):

- ``model.npz``: the network (``dgnh.MLP.save``);
- ``digits.zarr``: the dataset store (``dgnh.save_dataset``), inputs scaled to [0, 1]
  and integer labels for the ``cross_entropy`` loss, in chunks of 256 rows (a shard
  reads whole chunks).

Usage: ``python make_example.py [OUTDIR]``
"""

from __future__ import annotations

import os
import sys

import dgnh
from dgnh.digits import train_digits_mlp


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    outdir = args[0] if args else "/data"
    os.makedirs(outdir, exist_ok=True)
    net, X, y, _, score = train_digits_mlp("classifier", (32,), max_iter=300, seed=0)
    net.save(os.path.join(outdir, "model.npz"))
    dgnh.save_dataset(os.path.join(outdir, "digits.zarr"), X, y, chunk_rows=256,
                      overwrite=True)
    print(f"wrote {outdir}/model.npz ({net.n_params} parameters, training accuracy "
          f"{score:.3f}) and {outdir}/digits.zarr ({len(X)} samples)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
