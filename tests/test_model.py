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


def _saved_arrays(tmp_path):
    net = random_mlp([3, 4, 2], ["tanh", "identity"], biases=[True, False])
    net.save(tmp_path / "good.npz")
    with np.load(tmp_path / "good.npz") as data:
        return (tmp_path / "good.npz").read_bytes(), dict(data)


def _write(path, content):
    """``content``: bytes, or a dict of arrays for ``np.savez``, or a zip member table."""
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, dict):
        np.savez(path, **content)
    else:
        import zipfile

        with zipfile.ZipFile(path, "w") as z:
            for name, data in content:
                z.writestr(name, data)


# name -> (content from (good bytes, good arrays), exception, message)
DAMAGED_MODEL_FILES = {
    "truncated": (lambda raw, a: raw[:len(raw) // 2], ValueError,
                  r"is damaged \(truncated or not a .npz file\)"),
    "random": (lambda raw, a: bytes(np.random.default_rng(0).integers(0, 256, 3000,
                                                                      dtype=np.uint8)),
               ValueError, "is not a .npz file"),
    "empty": (lambda raw, a: b"", ValueError, "is not a .npz file"),
    "text": (lambda raw, a: b"W0 = [[1, 2]]\n", ValueError, "is not a .npz file"),
    "npy": (lambda raw, a: b"\x93NUMPY" + raw[6:], ValueError, "is not a .npz file"),
    "extra weight": (lambda raw, a: {**a, "W2": np.ones((2, 2))}, ValueError,
                     r"holds arrays \['W2'\] beyond its 2 layers"),
    "extra bias": (lambda raw, a: {**a, "b7": np.ones(2)}, ValueError,
                   r"holds arrays \['b7'\] beyond its 2 layers"),
    "stray array": (lambda raw, a: {**a, "notes": np.ones(1)}, ValueError,
                    r"holds arrays \['notes'\]"),
    "pickled activations": (lambda raw, a: {**a, "activations": np.array(["tanh", None])},
                            ValueError, "holds pickled objects, which dgnh does not load"),
    "version not an integer": (lambda raw, a: {**a, "version": np.array("one")}, ValueError,
                               "the format version must be an integer"),
    "activations 2-d": (lambda raw, a: {**a, "activations": np.array([["tanh"], ["tanh"]])},
                        ValueError, "activations must be a list of names"),
    "no layers": (lambda raw, a: {"format": a["format"], "version": a["version"],
                                  "activations": np.array([], dtype=str)},
                  ValueError, "an MLP needs at least one layer"),
    "shapes do not chain": (lambda raw, a: {**a, "W1": np.ones((2, 5))}, ValueError,
                            "do not match the 4 outputs of layer 1"),
    "member not .npy": (lambda raw, a: [("format.npy", b"garbage")], ValueError,
                        r"its members \['format'\] are not arrays"),
    "zip without format": (lambda raw, a: {"W0": a["W0"]}, ValueError, "missing format tag"),
}


@pytest.mark.parametrize("name", DAMAGED_MODEL_FILES)
def test_damaged_model_files_are_refused_in_one_line_naming_the_file(tmp_path, name):
    make, exc, match = DAMAGED_MODEL_FILES[name]
    path = tmp_path / "net.npz"
    _write(path, make(*_saved_arrays(tmp_path)))
    with pytest.raises(exc, match=match) as error:
        dgnh.MLP.load(path)
    message = str(error.value)
    assert str(path) in message and "\n" not in message and "allow_pickle" not in message


def test_model_paths_that_are_not_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"model file {tmp_path / 'no.npz'} does not"):
        dgnh.MLP.load(tmp_path / "no.npz")
    with pytest.raises(ValueError, match=f"model file {tmp_path} cannot be read"):
        dgnh.MLP.load(tmp_path)


def test_corrupted_bytes_never_load_a_different_network(tmp_path):
    """Single bit flips anywhere: a clear error naming the file, or the original network."""
    raw, _ = _saved_arrays(tmp_path)
    original = dgnh.MLP.load(tmp_path / "good.npz").parameters()
    rng = np.random.default_rng(3)
    path = tmp_path / "flipped.npz"
    for _ in range(300):
        flipped = bytearray(raw)
        flipped[rng.integers(len(raw))] ^= 1 << int(rng.integers(8))
        path.write_bytes(bytes(flipped))
        try:
            net = dgnh.MLP.load(path)
        except (ValueError, TypeError) as e:
            assert str(path) in str(e) and "\n" not in str(e)
        else:
            np.testing.assert_array_equal(net.parameters(), original)
