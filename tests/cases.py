"""Shared test cases and helpers: random and trained networks, independent dense
references, error measures. Plain functions and case tables; the fixtures built on
them live in ``conftest.py``.

Every reference here is written independently of dgnh's own derivative code: finite
differences for Jacobians, the output Hessians written out from their formulas, and
plain loops.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy.special import expit, softmax

import dgnh
from dgnh.digits import train_digits_mlp


# ------------------------------------------------------------------ random networks
def random_mlp(sizes, activations, biases=True, seed=0, scale=0.8) -> dgnh.MLP:
    """A random MLP; ``biases`` is a bool or one bool per layer.

    Examples
    --------
    >>> random_mlp([3, 4, 2], ["tanh", "identity"]).n_params
    26
    """
    rng = np.random.default_rng(seed)
    if isinstance(biases, bool):
        biases = [biases] * (len(sizes) - 1)
    weights = [rng.normal(scale=scale / np.sqrt(a), size=(b, a)) * 1.5
               for a, b in zip(sizes[:-1], sizes[1:])]
    bs = [rng.normal(scale=0.3, size=b) if has else None for b, has in zip(sizes[1:], biases)]
    return dgnh.MLP(weights, bs, activations)


def random_targets(loss: str, n: int, d: int, seed: int = 0) -> np.ndarray:
    """Targets for ``loss``: class labels, probabilities in [0, 1], or real values."""
    rng = np.random.default_rng(seed + 1000)
    if loss == "cross_entropy":
        return rng.integers(0, d, size=n)
    if loss == "binary_cross_entropy":
        return rng.uniform(size=(n, d))
    return rng.normal(size=(n, d))


def random_problem(sizes, loss: str, n_samples: int, seed: int = 0):
    """``(net, X, Y)``: a random tanh MLP (identity output), normal inputs, targets for ``loss``.

    Examples
    --------
    >>> net, X, Y = random_problem((3, 5, 2), "cross_entropy", 10)
    >>> X.shape, Y.shape
    ((10, 3), (10,))
    """
    net = random_mlp(list(sizes), ["tanh"] * (len(sizes) - 2) + ["identity"], seed=seed)
    X = np.random.default_rng(seed).normal(size=(n_samples, sizes[0]))
    return net, X, random_targets(loss, n_samples, sizes[-1], seed=seed)


def write_problem(directory: Path, sizes, n_samples: int, seed: int, **dataset_options) -> dict:
    """A random classifier saved as ``directory/model.npz`` and its data as ``data.zarr``.

    Returns ``{"dir", "net", "X", "Y"}``; ``dataset_options`` go to :func:`dgnh.save_dataset`.
    """
    net, X, Y = random_problem(sizes, "cross_entropy", n_samples, seed)
    net.save(directory / "model.npz")
    dgnh.save_dataset(directory / "data.zarr", X, Y, **dataset_options)
    return {"dir": directory, "net": net, "X": X, "Y": Y}


def relu_mlp_with_dead_unit(hidden: int) -> dgnh.MLP:
    """A random 5-``hidden``-3 ReLU network whose hidden unit 2 never fires (bias −50),
    so the GNH rows of its weights are exactly zero.

    Examples
    --------
    >>> relu_mlp_with_dead_unit(4).layer_sizes
    (5, 4, 3)
    """
    net = random_mlp([5, hidden, 3], ["relu", "identity"], seed=3)
    net.biases[0][2] = -50.0
    return net


def jacobian_problem(loss: str):
    """``(net, X, gn, rng)``: a 3-5-4 tanh network (no output bias) on 10 rows in 3 shards,
    in process, for the Jacobian-product tests; ``rng`` continues after drawing ``X``.

    Examples
    --------
    >>> net, X, gn, rng = jacobian_problem("mse")
    >>> gn.n_shards, gn.n_jacobian_rows
    (3, 40)
    """
    net = random_mlp([3, 5, 4], ["tanh", "identity"], biases=[True, False], seed=4)
    rng = np.random.default_rng(8)
    X, Y = rng.normal(size=(10, 3)), random_targets(loss, 10, 4)
    return net, X, dgnh.GaussNewton(net, X, Y, loss=loss, shard_size=4, client="in-process"), rng


# ------------------------------------------------------------ trained digits networks
def digits_gnh(kind: str, hidden: tuple[int, ...], n_samples: int, activation: str = "tanh",
               max_iter: int = 300, **options) -> dgnh.GaussNewton:
    """The GNH of an MLP trained by scikit-learn on the digits data; ``options`` go to
    :class:`dgnh.GaussNewton` (``shard_size``, ``client``)."""
    net, X, Y, loss, _ = train_digits_mlp(kind, hidden, n_samples, activation, max_iter)
    return dgnh.GaussNewton(net, X, Y, loss=loss, **options)


def small_digits_gnh(**options) -> dgnh.GaussNewton:
    """A 64-8-10 classifier on 40 digits: N = 610 > n·d = 400, so G is singular."""
    return digits_gnh("classifier", (8,), 40, max_iter=50, **options)


def dead_relu_digits_gnh(n_dead: int = 3) -> dgnh.GaussNewton:
    """A trained digits ReLU classifier with ``n_dead`` hidden units switched off."""
    net, X, Y, loss, _ = train_digits_mlp("classifier", (10,), 300, activation="relu",
                                          max_iter=100)
    biases = [np.array(b) for b in net.biases]
    biases[0][:n_dead] = -1e3  # never active on the data: a zero diagonal for their weights
    return dgnh.GaussNewton(dgnh.MLP(net.weights, biases, net.activations), X, Y, loss=loss)


DIGITS_CASES: dict[str, Callable[[], dgnh.GaussNewton]] = {
    "classifier": lambda: digits_gnh("classifier", (8,), 300, max_iter=200),
    "autoencoder": lambda: digits_gnh("autoencoder", (4,), 150, max_iter=200),
    "dead_relu": dead_relu_digits_gnh,
    "rank54": lambda: digits_gnh("classifier", (8,), 6, max_iter=50),  # rank ≤ 6·9
}


# ------------------------------------------------------------ independent references
def output_hessian(loss: str, F: np.ndarray) -> np.ndarray:
    """Q_i = ∇²_f ℓ for every sample, written out independently of dgnh.losses."""
    n, d = F.shape
    if loss == "mse":
        return np.broadcast_to(np.eye(d), (n, d, d))
    if loss == "cross_entropy":
        P = softmax(F, axis=1)
        return np.stack([np.diag(p) - np.outer(p, p) for p in P])
    S = expit(F)
    return np.stack([np.diag(s * (1 - s)) for s in S])


def fd_jacobians(net: dgnh.MLP, X: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """Per-sample Jacobians ∂f(x_i)/∂w by central finite differences: (n, d, N)."""
    w0 = net.parameters()
    cols = []
    for j in range(net.n_params):
        e = np.zeros_like(w0)
        e[j] = h
        plus, minus = net.with_parameters(w0 + e), net.with_parameters(w0 - e)
        cols.append((plus.forward(X) - minus.forward(X)) / (2 * h))
    return np.stack(cols, axis=-1)


def dense_reference(net: dgnh.MLP, X: np.ndarray, loss: str) -> np.ndarray:
    """G = (1/n) Σ_i J_iᵀ Q_i J_i from finite-difference Jacobians (a plain loop)."""
    J = fd_jacobians(net, X)
    Q = output_hessian(loss, net.forward(X))
    G = np.zeros((net.n_params, net.n_params))
    for Ji, Qi in zip(J, Q):
        G += Ji.T @ Qi @ Ji
    return G / len(X)


# ------------------------------------------------------------------ error measures
def max_relative_error(actual, reference) -> float:
    """``max |actual − reference| / max |reference|`` over all entries.

    Examples
    --------
    >>> max_relative_error([1.0, 2.5], np.array([1.0, 2.0]))
    0.25
    """
    return float(np.abs(np.asarray(actual) - reference).max()
                 / max(np.abs(reference).max(), 1e-300))


def norm_relative_error(actual: np.ndarray, reference: np.ndarray) -> float:
    """``‖actual − reference‖ / ‖reference‖`` in the Frobenius (vector 2-) norm."""
    return float(np.linalg.norm(actual - reference) / np.linalg.norm(reference))


# ------------------------------------------------------------------- processes, files
def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def toml_text(table: dict) -> str:
    """A small TOML writer for the job files of the tests: scalars, then one level of tables.

    Examples
    --------
    >>> print(toml_text({"loss": "mse", "compress": {"tol": 0.01}}), end="")
    loss = "mse"
    [compress]
    tol = 0.01
    """
    def value(v):
        if isinstance(v, bool):
            return str(v).lower()
        return json.dumps(v) if isinstance(v, str) else repr(v)
    top = [f"{k} = {value(v)}" for k, v in table.items() if not isinstance(v, dict)]
    tables = [f"[{k}]\n" + "\n".join(f"{kk} = {value(vv)}" for kk, vv in v.items())
              for k, v in table.items() if isinstance(v, dict)]
    return "\n".join(top + tables) + "\n"


# ------------------------------------------- held-out networks of the H-matrix contract
def random_gnh(sizes, activation: str, loss: str, n_samples: int,
               seed: int = 0) -> dgnh.GaussNewton:
    """The GNH of an untrained random MLP with ``activation`` hidden layers on normal inputs.

    Examples
    --------
    >>> random_gnh((3, 4, 2), "softplus", "mse", 5).n_params
    26
    """
    net = random_mlp(list(sizes), [activation] * (len(sizes) - 2) + ["identity"], seed=seed)
    X = np.random.default_rng(seed).normal(size=(n_samples, sizes[0]))
    return dgnh.GaussNewton(net, X, random_targets(loss, n_samples, sizes[-1], seed), loss=loss)


HMATRIX_CASES: dict[str, Callable[[], dgnh.GaussNewton]] = {  # N ≈ 1.2k–1.6k
    "tanh_trained": lambda: digits_gnh("classifier", (20,), 400, max_iter=15),
    "relu_trained": lambda: digits_gnh("classifier", (16,), 400, activation="relu", max_iter=20),
    "softplus_untrained": lambda: random_gnh((14, 36, 24, 7), "softplus", "cross_entropy", 250,
                                             seed=11),
    "regression21": lambda: random_gnh((10, 30, 24, 21), "tanh", "mse", 150, seed=12),
    "autoencoder": lambda: digits_gnh("autoencoder", (10,), 250, max_iter=20),
}
"""Networks the H-matrix's tolerance split was NOT tuned on (trained and untrained
classifiers, a regression with 21 outputs, a BCE autoencoder)."""


# ------------------------------------------------ held-out networks (compression)
def relu_regression_gnh(seed: int = 23) -> dgnh.GaussNewton:
    """A random 12-40-24 ReLU regression network (mean squared error, 24 outputs) on 300
    normal rows: N = 1 504, a flat GNH spectrum."""
    net = random_mlp([12, 40, 24], ["relu", "identity"], seed=seed)
    rng = np.random.default_rng(seed)
    return dgnh.GaussNewton(net, rng.normal(size=(300, 12)), rng.normal(size=(300, 24)))


HELD_OUT_CASES: dict[str, Callable[[], dgnh.GaussNewton]] = {
    # networks of N ≈ 1–1.7k never used to tune the compression (dense references are cheap)
    "untrained_classifier": lambda: dgnh.GaussNewton(
        *random_problem((16, 36, 24, 7), "cross_entropy", 240, seed=21), loss="cross_entropy"),
    "relu_regression": relu_regression_gnh,
    "trained_autoencoder": lambda: digits_gnh("autoencoder", (8,), 200, max_iter=150),
    "trained_classifier": lambda: digits_gnh("classifier", (16,), 400, max_iter=150),
}
