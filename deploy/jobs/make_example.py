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
import warnings

from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.neural_network import MLPClassifier

import dgnh


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    outdir = args[0] if args else "/data"
    os.makedirs(outdir, exist_ok=True)
    X, y = load_digits(return_X_y=True)
    X = X / 16.0
    with warnings.catch_warnings():  # 300 epochs fit the training set; full convergence
        warnings.simplefilter("ignore", ConvergenceWarning)  # is not needed for an example
        clf = MLPClassifier(hidden_layer_sizes=(32,), activation="tanh", max_iter=300,
                            random_state=0).fit(X, y)
    # scikit-learn stores (d_in, d_out) weights; dgnh (and PyTorch) use (d_out, d_in).
    # The softmax is the loss's: the network outputs logits.
    net = dgnh.MLP([W.T for W in clf.coefs_], clf.intercepts_, ["tanh", "identity"])
    net.save(os.path.join(outdir, "model.npz"))
    dgnh.save_dataset(os.path.join(outdir, "digits.zarr"), X, y, chunk_rows=256,
                      overwrite=True)
    print(f"wrote {outdir}/model.npz ({net.n_params} parameters, training accuracy "
          f"{clf.score(X, y):.3f}) and {outdir}/digits.zarr ({len(X)} samples)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
