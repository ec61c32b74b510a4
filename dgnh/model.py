"""The multilayer perceptron whose Gauss–Newton Hessian dgnh computes.

Conventions (public contract): ``z_l = W_l x_{l-1} + b_l``, ``x_l = σ_l(z_l)``;
``W_l`` has PyTorch ``nn.Linear`` layout ``(d_l, d_{l-1})``; the flat parameter
vector is, for l = 1..L, ``W_l`` row-major then ``b_l`` — exactly
``torch.nn.utils.parameters_to_vector`` of the matching ``nn.Sequential``.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from typing import Sequence

import numpy as np

from .activations import get_activation
from .validation import check_int, check_real_array

Array = np.ndarray
FORMAT = "dgnh.mlp"
FORMAT_VERSION = 1


def read_npz(path: str | os.PathLike, what: str) -> dict[str, Array]:
    """All arrays of the ``.npz`` file ``path``, read without pickle.

    A missing, unreadable, truncated or foreign file, or one holding pickled
    objects, is refused with one line naming ``what`` and the file.

    Examples
    --------
    >>> read_npz("/nonexistent/net.npz", "model file")
    Traceback (most recent call last):
    ...
    FileNotFoundError: model file /nonexistent/net.npz does not exist
    """
    try:
        with open(path, "rb") as fh:
            magic = fh.read(2)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist") from None
    except OSError as e:  # a directory, no permission
        raise ValueError(f"{what} {path} cannot be read: {e.strerror or e}") from None
    if magic != b"PK":  # every .npz is a zip archive
        raise ValueError(f"{what} {path} is not a .npz file (MLP.save writes one)")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except ValueError as e:
        if "pickle" in str(e):
            raise ValueError(f"{what} {path} holds pickled objects, which dgnh does not "
                             "load") from None
        raise ValueError(f"{what} {path} is damaged: {e}") from None
    except (OSError, EOFError, NotImplementedError, zipfile.BadZipFile, zlib.error) as e:
        raise ValueError(f"{what} {path} is damaged (truncated or not a .npz file): "
                         f"{e}") from None
    foreign = sorted(key for key, value in arrays.items() if not isinstance(value, np.ndarray))
    if foreign:  # numpy hands out members that are not .npy files as raw bytes
        raise ValueError(f"{what} {path} is damaged: its members {foreign} are not arrays")
    return arrays


class MLP:
    """A multilayer perceptron with PyTorch-layout weights.

    Parameters
    ----------
    weights : sequence of arrays
        ``W_l`` of shape ``(d_l, d_{l-1})``.
    biases : sequence of arrays or None
        ``b_l`` of shape ``(d_l,)``, or ``None`` for a layer without bias. ``None``
        in place of the whole sequence means no biases at all.
    activations : sequence of str
        One activation name per layer (see :data:`dgnh.activations.ACTIVATIONS`).

    Examples
    --------
    >>> import numpy as np, dgnh
    >>> rng = np.random.default_rng(0)
    >>> net = dgnh.MLP([rng.normal(size=(8, 4)), rng.normal(size=(3, 8))],
    ...                [np.zeros(8), None], ["tanh", "identity"])
    >>> net.n_params, net.layer_sizes
    (64, (4, 8, 3))
    """

    def __init__(
        self,
        weights: Sequence[Array],
        biases: Sequence[Array | None] | None,
        activations: Sequence[str],
    ):
        weights = list(weights)
        if not weights:
            raise ValueError("an MLP needs at least one layer")
        if biases is None:
            biases = [None] * len(weights)
        biases = list(biases)
        if isinstance(activations, str):
            raise TypeError("activations must be a sequence of names, one per layer")
        activations = list(activations)
        if not (len(weights) == len(biases) == len(activations)):
            raise ValueError(
                f"got {len(weights)} weights, {len(biases)} biases and "
                f"{len(activations)} activations; they must have one entry per layer"
            )
        self.weights: list[Array] = []
        self.biases: list[Array | None] = []
        for l, (W, b) in enumerate(zip(weights, biases), start=1):
            W = check_real_array(W, f"weight of layer {l}", ndim=2).astype(np.float64)
            if self.weights and W.shape[1] != self.weights[-1].shape[0]:
                raise ValueError(
                    f"weight of layer {l} has shape {W.shape}: its {W.shape[1]} inputs "
                    f"do not match the {self.weights[-1].shape[0]} outputs of layer {l - 1}"
                )
            if 0 in W.shape:
                raise ValueError(f"weight of layer {l} has an empty shape {W.shape}")
            if b is not None:
                b = check_real_array(b, f"bias of layer {l}").astype(np.float64)
                if b.shape != (W.shape[0],):
                    raise ValueError(
                        f"bias of layer {l} must have shape ({W.shape[0]},), got {b.shape}"
                    )
            self.weights.append(W)
            self.biases.append(b)
        self.activations: list[str] = [get_activation(a).name for a in activations]
        sizes = [self.weights[0].shape[1]] + [W.shape[0] for W in self.weights]
        self.layer_sizes: tuple[int, ...] = tuple(int(s) for s in sizes)
        counts = [
            W.size + (0 if b is None else b.size) for W, b in zip(self.weights, self.biases)
        ]
        self.layer_offsets: Array = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.n_params: int = int(self.layer_offsets[-1])

    # ------------------------------------------------------------------ basics
    @property
    def n_layers(self) -> int:
        return len(self.weights)

    @property
    def n_inputs(self) -> int:
        return self.layer_sizes[0]

    @property
    def n_outputs(self) -> int:
        return self.layer_sizes[-1]

    def __repr__(self) -> str:
        return (
            f"MLP(layer_sizes={self.layer_sizes}, activations={self.activations}, "
            f"biases={[b is not None for b in self.biases]}, n_params={self.n_params})"
        )

    def check_inputs(self, X, what: str = "X") -> Array:
        """Validate a data matrix of shape ``(n_samples, n_inputs)``."""
        X = check_real_array(X, what)
        if X.ndim != 2 or X.shape[1] != self.n_inputs:
            raise ValueError(
                f"{what} must have shape (n_samples, {self.n_inputs}) to match the first "
                f"layer, got {X.shape}"
            )
        if X.shape[0] == 0:
            raise ValueError(f"{what} is empty (0 samples)")
        return X

    def forward(self, X: Array) -> Array:
        """Network output ``f(X)``, shape ``(n_samples, n_outputs)``."""
        X = self.check_inputs(X)
        A = X.astype(np.float64)
        for W, b, act in zip(self.weights, self.biases, self.activations):
            Z = A @ W.T
            if b is not None:
                Z = Z + b
            A = get_activation(act).f(Z)
        return A

    __call__ = forward

    # ------------------------------------------------------- parameter vector
    def parameters(self) -> Array:
        """The flat parameter vector (``W_1`` row-major, ``b_1``, ``W_2``, ...)."""
        parts = []
        for W, b in zip(self.weights, self.biases):
            parts.append(W.ravel())
            if b is not None:
                parts.append(b)
        return np.concatenate(parts)

    def with_parameters(self, w) -> "MLP":
        """A copy of this network with the flat parameter vector ``w``."""
        w = check_real_array(w, "parameter vector", ndim=1)
        if w.shape != (self.n_params,):
            raise ValueError(f"parameter vector must have length {self.n_params}, got {w.shape[0]}")
        weights, biases = [], []
        for l, (W, b) in enumerate(zip(self.weights, self.biases)):
            o = int(self.layer_offsets[l])
            weights.append(w[o:o + W.size].reshape(W.shape))
            biases.append(None if b is None else w[o + W.size:o + W.size + b.size])
        return MLP(weights, biases, self.activations)

    def split(self, w: Array) -> list[tuple[Array, Array | None]]:
        """Views ``[(W_l, b_l), ...]`` of a flat vector (or ``(N, k)`` matrix) ``w``."""
        out = []
        for l, (W, b) in enumerate(zip(self.weights, self.biases)):
            o = int(self.layer_offsets[l])
            tail = w.shape[1:]
            Wv = w[o:o + W.size].reshape(W.shape + tail)
            bv = None if b is None else w[o + W.size:o + W.size + b.size]
            out.append((Wv, bv))
        return out

    def check_indices(self, idx, what: str = "index") -> Array:
        """Validate parameter indices: integers in ``[0, n_params)``; returns int64 array."""
        arr = np.asarray(idx)
        if arr.dtype == bool or not (
            np.issubdtype(arr.dtype, np.integer)
            or (arr.size == 0 and np.issubdtype(arr.dtype, np.floating))
        ):
            raise TypeError(f"{what} must hold integers, got dtype {arr.dtype}")
        if arr.ndim > 1:
            raise ValueError(f"{what} must be a scalar or a 1-d array of indices")
        arr = arr.reshape(-1)
        if arr.size and (arr.min() < 0 or arr.max() >= self.n_params):  # before any cast
            bad = arr[(arr < 0) | (arr >= self.n_params)][0]
            raise IndexError(
                f"{what} {bad} is out of range: the network has {self.n_params} "
                f"parameters (valid indices 0..{self.n_params - 1})"
            )
        return arr.astype(np.int64)

    def locate(self, idx) -> tuple[Array, Array, Array]:
        """Vectorised ``param_info``: ``(layer, row, col)`` arrays for indices.

        ``layer`` is 0-based; for a bias ``col == n_inputs_of_layer`` (the
        "ones" input column), which is how the factors store biases.
        """
        idx = self.check_indices(idx)
        layer = np.searchsorted(self.layer_offsets, idx, side="right") - 1
        local = idx - self.layer_offsets[layer]
        d_in = np.asarray(self.layer_sizes[:-1], dtype=np.int64)[layer]
        wsize = d_in * np.asarray(self.layer_sizes[1:], dtype=np.int64)[layer]
        is_bias = local >= wsize
        row = np.where(is_bias, local - wsize, local // d_in)
        col = np.where(is_bias, d_in, local % d_in)
        return layer, row, col

    def param_info(self, i: int) -> tuple[int, str, int, int | None]:
        """``(layer, "weight"|"bias", row, col)`` of parameter ``i``; layers count from 1,
        ``col`` is ``None`` for a bias."""
        i = check_int(i, "parameter index")
        layer, row, col = (int(v[0]) for v in self.locate(np.array([i])))
        if col == self.layer_sizes[layer]:
            return layer + 1, "bias", row, None
        return layer + 1, "weight", row, col

    def param_index(self, layer: int, kind: str, row: int, col: int | None = None) -> int:
        """Inverse of :meth:`param_info` (``layer`` counts from 1)."""
        layer, row = check_int(layer, "layer"), check_int(row, "row")
        col = None if col is None else check_int(col, "col")
        if not 1 <= layer <= self.n_layers:
            raise IndexError(f"layer must be in 1..{self.n_layers}, got {layer}")
        W, b = self.weights[layer - 1], self.biases[layer - 1]
        off = int(self.layer_offsets[layer - 1])
        if not 0 <= row < W.shape[0]:
            raise IndexError(f"row {row} out of range for layer {layer} with {W.shape[0]} units")
        if kind == "weight":
            if col is None or not 0 <= col < W.shape[1]:
                raise IndexError(f"col {col} out of range for layer {layer} with {W.shape[1]} inputs")
            return off + row * W.shape[1] + col
        if kind == "bias":
            if b is None:
                raise ValueError(f"layer {layer} has no bias")
            return off + W.size + row
        raise ValueError(f"kind must be 'weight' or 'bias', got {kind!r}")

    # -------------------------------------------------------------- storage
    def save(self, path: str | os.PathLike) -> None:
        """Save as ``.npz`` (no pickle): ``W{l}``, ``b{l}``, activations, format tags."""
        arrays = {
            "format": np.array(FORMAT),
            "version": np.array(FORMAT_VERSION),
            "activations": np.array(self.activations),
        }
        for l, (W, b) in enumerate(zip(self.weights, self.biases)):
            arrays[f"W{l}"] = W
            if b is not None:
                arrays[f"b{l}"] = b
        with open(path, "wb") as fh:
            np.savez(fh, **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "MLP":
        """Load a network written by :meth:`save`.

        Anything else — a missing, truncated or foreign file, pickled objects,
        missing or extra arrays, inconsistent shapes — is refused with one line
        naming the file.

        Examples
        --------
        >>> import os, tempfile, numpy as np, dgnh
        >>> with tempfile.TemporaryDirectory() as d:
        ...     dgnh.MLP([np.ones((2, 3))], None, ["tanh"]).save(os.path.join(d, "net.npz"))
        ...     dgnh.MLP.load(os.path.join(d, "net.npz")).layer_sizes
        (3, 2)
        """
        data = read_npz(path, "model file")
        if "format" not in data or data["format"].shape != () or str(data["format"]) != FORMAT:
            raise ValueError(f"{path} is not a dgnh MLP file (missing format tag)")
        missing = [k for k in ["version", "activations"] if k not in data]
        if missing:
            raise ValueError(f"{path} lacks {missing} (damaged dgnh MLP file)")
        version, acts = data["version"], data["activations"]
        if version.shape != () or version.dtype.kind not in "iu":
            raise ValueError(f"{path}: the format version must be an integer (damaged dgnh "
                             "MLP file)")
        if int(version) > FORMAT_VERSION:
            raise ValueError(f"{path} has MLP format version {int(version)}; this dgnh "
                             f"reads up to {FORMAT_VERSION}")
        if acts.ndim != 1 or acts.dtype.kind != "U":
            raise ValueError(f"{path}: activations must be a list of names (damaged dgnh MLP "
                             "file)")
        layers = range(len(acts))
        missing = [f"W{l}" for l in layers if f"W{l}" not in data]
        if missing:
            raise ValueError(f"{path} lacks the weights {missing} (damaged dgnh MLP file)")
        extra = sorted(set(data) - {"format", "version", "activations"}
                       - {f"{k}{l}" for k in "Wb" for l in layers})
        if extra:
            raise ValueError(f"{path} holds arrays {extra} beyond its {len(acts)} layers "
                             "(damaged or not a dgnh MLP file)")
        try:
            return cls([data[f"W{l}"] for l in layers],
                       [data.get(f"b{l}") for l in layers], [str(a) for a in acts])
        except (TypeError, ValueError) as e:
            raise type(e)(f"{path}: {e}") from None

    # ---------------------------------------------------------------- interop
    @classmethod
    def from_torch(cls, module) -> "MLP":
        """Import a ``torch.nn.Sequential`` of ``Linear`` layers and activations.

        See :func:`dgnh.interop.torch_layers` (needs ``pip install 'dgnh[torch]'``).

        Examples
        --------
        >>> import torch, dgnh
        >>> net = dgnh.MLP.from_torch(torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.ReLU()))
        >>> net.layer_sizes, net.activations
        ((4, 2), ['relu'])
        """
        from .interop import torch_layers

        return cls(*torch_layers(module))

    @classmethod
    def from_onnx(cls, path: str | os.PathLike) -> "MLP":
        """Import an MLP graph (Gemm or MatMul+Add with activation nodes) from an ONNX file.

        See :func:`dgnh.interop.onnx_layers` (needs ``pip install 'dgnh[onnx]'``).

        Examples
        --------
        >>> import dgnh
        >>> net = dgnh.MLP.from_onnx("model.onnx")  # doctest: +SKIP
        """
        from .interop import onnx_layers

        return cls(*onnx_layers(path))
