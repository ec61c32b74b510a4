"""Trained MLPs on scikit-learn's digits data (ships with scikit-learn: no download).

Used by the demo, the benchmarks, the notebooks and the deploy example.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np

from .model import MLP


class TrainedDigits(NamedTuple):
    """A trained network with its data: ``Y`` are labels (classifier) or binarized
    pixels (autoencoder); ``score`` is scikit-learn's training accuracy."""

    model: MLP
    X: np.ndarray
    Y: np.ndarray
    loss: str
    score: float


def train_digits_mlp(kind: str = "classifier", hidden: tuple[int, ...] = (32,),
                     n_samples: int | None = None, activation: str = "tanh",
                     max_iter: int = 300, seed: int = 0) -> TrainedDigits:
    """An MLP trained by scikit-learn (Adam) on the digits pixels scaled to [0, 1].

    ``kind="classifier"``: logits of the 10 classes for the ``cross_entropy`` loss;
    ``kind="autoencoder"``: logits of the 64 binarized pixels (> 0.5) for the
    ``binary_cross_entropy`` loss (scikit-learn's multi-label classifier, sigmoid
    outputs). The network outputs logits: the softmax/sigmoid belongs to the loss.

    Examples
    --------
    >>> t = train_digits_mlp("classifier", hidden=(4,), n_samples=50, max_iter=5)
    >>> t.model.layer_sizes, t.loss
    ((64, 4, 10), 'cross_entropy')
    """
    from sklearn.datasets import load_digits
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    if kind not in ("classifier", "autoencoder"):
        raise ValueError(f"kind must be 'classifier' or 'autoencoder', got {kind!r}")
    X, y = load_digits(return_X_y=True)
    X = X[:n_samples] / 16.0
    Y, loss = ((y[:n_samples], "cross_entropy") if kind == "classifier"
               else ((X > 0.5).astype(float), "binary_cross_entropy"))
    with warnings.catch_warnings():  # a few hundred Adam steps suffice here
        warnings.simplefilter("ignore", ConvergenceWarning)
        fit = MLPClassifier(hidden, activation=activation, max_iter=max_iter,
                            random_state=seed).fit(X, Y)
    # scikit-learn stores (d_in, d_out) weights; dgnh (like PyTorch) uses (d_out, d_in)
    net = MLP([c.T for c in fit.coefs_], list(fit.intercepts_),
              [activation] * len(hidden) + ["identity"])
    return TrainedDigits(net, X, Y, loss, float(fit.score(X, Y)))
