"""MLP: validation, parameter order, index mapping, save/load."""

from __future__ import annotations

import numpy as np
import pytest

import dgnh
from cases import random_mlp


def test_forward_is_a_plain_loop():
    net = random_mlp([3, 5, 2], ["elu", "sigmoid"], biases=[True, False], seed=1)
    X = np.random.default_rng(0).normal(size=(6, 3))
    for x, f in zip(X, net.forward(X)):
        z1 = net.weights[0] @ x + net.biases[0]
        a1 = np.array([v if v > 0 else np.exp(v) - 1 for v in z1])
        z2 = net.weights[1] @ a1
        np.testing.assert_allclose(f, 1 / (1 + np.exp(-z2)), rtol=1e-13)


def test_parameter_order_and_roundtrip():
    net = random_mlp([3, 4, 2], ["relu", "identity"], biases=[True, False])
    w = net.parameters()
    expected = np.concatenate([net.weights[0].ravel(), net.biases[0], net.weights[1].ravel()])
    np.testing.assert_array_equal(w, expected)
    assert net.n_params == 3 * 4 + 4 + 4 * 2 == w.size
    assert net.layer_sizes == (3, 4, 2)
    np.testing.assert_array_equal(net.with_parameters(w * 2).parameters(), 2 * w)


def test_param_info_and_inverse_cover_every_index():
    net = random_mlp([3, 4, 2], ["relu", "identity"], biases=[True, False])
    seen = []
    for i in range(net.n_params):
        layer, kind, row, col = net.param_info(i)
        assert net.param_index(layer, kind, row, col) == i
        seen.append((layer, kind, row, col))
    assert seen[0] == (1, "weight", 0, 0)
    assert seen[3] == (1, "weight", 1, 0)
    assert seen[12] == (1, "bias", 0, None)
    assert seen[16] == (2, "weight", 0, 0)
    with pytest.raises(IndexError, match="out of range"):
        net.param_info(net.n_params)
    with pytest.raises(ValueError, match="no bias"):
        net.param_index(2, "bias", 0)


def test_save_load_roundtrip(tmp_path):
    net = random_mlp([3, 4, 2], ["gelu", "softplus"], biases=[False, True])
    net.save(tmp_path / "m.npz")
    back = dgnh.MLP.load(tmp_path / "m.npz")
    assert back.activations == net.activations
    np.testing.assert_array_equal(back.parameters(), net.parameters())
    assert back.biases[0] is None
    np.save(tmp_path / "junk.npy", np.ones(3))
    with pytest.raises(ValueError, match="not a"):
        dgnh.MLP.load(tmp_path / "junk.npy")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dgnh.MLP.load(tmp_path / "missing.npz")


@pytest.mark.parametrize("weights, biases, acts, exc, match", [
    ([np.ones((4, 3)), np.ones((2, 5))], None, ["relu", "relu"], ValueError, "do not match"),
    ([np.ones((4, 3))], [np.ones(3)], ["relu"], ValueError, r"shape \(4,\)"),
    ([np.ones((4, 3))], None, ["swish"], ValueError, "unknown activation 'swish'"),
    ([np.full((4, 3), np.nan)], None, ["relu"], ValueError, "NaN or Inf"),
    ([np.ones(3)], None, ["relu"], ValueError, "2-dimensional"),
    ([np.array([["a"]])], None, ["relu"], TypeError, "numeric"),
    ([np.ones((4, 3))], None, ["relu", "relu"], ValueError, "one entry per layer"),
    ([], None, [], ValueError, "at least one layer"),
    ([np.ones((4, 3))], None, "relu", TypeError, "sequence of names"),
])
def test_bad_networks_are_named(weights, biases, acts, exc, match):
    with pytest.raises(exc, match=match):
        dgnh.MLP(weights, biases, acts)


@pytest.mark.parametrize("name", list(dgnh.ACTIVATIONS))
def test_activation_derivatives_against_finite_differences(name):
    from dgnh.activations import get_activation

    act = get_activation(name)
    z = np.linspace(-3, 3, 61) + 0.013  # avoid the kink at 0
    h = 1e-6
    np.testing.assert_allclose(act.df(z), (act.f(z + h) - act.f(z - h)) / (2 * h), atol=1e-8)
    np.testing.assert_allclose(act.d2f(z), (act.df(z + h) - act.df(z - h)) / (2 * h), atol=1e-7)


@pytest.mark.parametrize("name, z, value, slope", [
    ("relu", 0.0, 0.0, 0.0),
    ("leaky_relu", -2.0, -0.02, 0.01),
    ("leaky_relu", 0.0, 0.0, 0.01),
    ("elu", -1.0, np.exp(-1) - 1, np.exp(-1)),
    ("softplus", 0.0, np.log(2), 0.5),
    ("gelu", 1.0, 0.8413447460685429, 1.0833154705876864),
])
def test_activation_values_match_pytorch_defaults(name, z, value, slope):
    from dgnh.activations import get_activation

    act = get_activation(name)
    assert act.f(np.array([z]))[0] == pytest.approx(value, rel=1e-12, abs=1e-15)
    assert act.df(np.array([z]))[0] == pytest.approx(slope, rel=1e-12, abs=1e-15)
