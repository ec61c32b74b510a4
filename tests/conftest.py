"""Shared fixtures: random networks and independent dense references."""

from __future__ import annotations

import os

# One BLAS thread per process in tests: the suite starts Dask workers, notebook kernels and
# CLI subprocesses beside the test process, and multithreaded OpenBLAS spin-waits badly when
# they share 2 cores. Subprocesses inherit the setting.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
import pytest
from scipy.special import expit, softmax

import dgnh


def random_mlp(sizes, activations, biases=True, seed=0, scale=0.8):
    """A random MLP; ``biases`` is a bool or one bool per layer."""
    rng = np.random.default_rng(seed)
    if isinstance(biases, bool):
        biases = [biases] * (len(sizes) - 1)
    weights = [rng.normal(scale=scale / np.sqrt(a), size=(b, a)) * 1.5
               for a, b in zip(sizes[:-1], sizes[1:])]
    bs = [rng.normal(scale=0.3, size=b) if has else None for b, has in zip(sizes[1:], biases)]
    return dgnh.MLP(weights, bs, activations)


def random_targets(loss, n, d, seed=0):
    rng = np.random.default_rng(seed + 1000)
    if loss == "cross_entropy":
        return rng.integers(0, d, size=n)
    if loss == "binary_cross_entropy":
        return rng.uniform(size=(n, d))
    return rng.normal(size=(n, d))


def output_hessian(loss, F):
    """Q_i = ∇²_f ℓ for every sample, written out independently of dgnh.losses."""
    n, d = F.shape
    if loss == "mse":
        return np.broadcast_to(np.eye(d), (n, d, d))
    if loss == "cross_entropy":
        P = softmax(F, axis=1)
        return np.stack([np.diag(p) - np.outer(p, p) for p in P])
    S = expit(F)
    return np.stack([np.diag(s * (1 - s)) for s in S])


def fd_jacobians(net, X, h=1e-6):
    """Per-sample Jacobians ∂f(x_i)/∂w by central finite differences: (n, d, N)."""
    w0 = net.parameters()
    cols = []
    for j in range(net.n_params):
        e = np.zeros_like(w0)
        e[j] = h
        cols.append((net.with_parameters(w0 + e).forward(X) - net.with_parameters(w0 - e).forward(X)) / (2 * h))
    return np.stack(cols, axis=-1)


def dense_reference(net, X, loss):
    """G = (1/n) Σ_i J_iᵀ Q_i J_i from finite-difference Jacobians (a plain loop)."""
    J = fd_jacobians(net, X)
    Q = output_hessian(loss, net.forward(X))
    G = np.zeros((net.n_params, net.n_params))
    for Ji, Qi in zip(J, Q):
        G += Ji.T @ Qi @ Ji
    return G / len(X)


@pytest.fixture
def rng():
    return np.random.default_rng(12345)
