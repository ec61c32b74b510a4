"""Import networks from PyTorch (``nn.Sequential``) and ONNX (MLP graphs).

This is the only dgnh module that touches ``torch`` or ``onnx``, and it imports
them inside the functions, so ``import dgnh`` never needs them. Install them
with the extras ``pip install 'dgnh[torch]'`` / ``pip install 'dgnh[onnx]'``.

Both importers keep the parameter order of the source: the flat vector of the
resulting :class:`~dgnh.model.MLP` equals ``torch.nn.utils.parameters_to_vector``
of the module (``W_1`` row-major, ``b_1``, ``W_2``, ...). Anything that is not a
plain MLP (an unknown layer or op, a non-default activation parameter) is
refused with an error that names it: dgnh never imports an approximation of
the network silently.
"""

from __future__ import annotations

import importlib
import math
import os
from collections import defaultdict

import numpy as np

from .activations import LEAKY_SLOPE

Array = np.ndarray
Layers = tuple[list[Array], list[Array | None], list[str]]  # weights, biases, activations

# --------------------------------------------------------------------- torch
# class name -> (dgnh activation, {attribute: value dgnh implements (PyTorch's default)})
_TORCH_ACTIVATIONS: dict[str, tuple[str, dict]] = {
    "ReLU": ("relu", {}),
    "LeakyReLU": ("leaky_relu", {"negative_slope": LEAKY_SLOPE}),
    "Tanh": ("tanh", {}),
    "Sigmoid": ("sigmoid", {}),
    "Softplus": ("softplus", {"beta": 1.0, "threshold": 20.0}),
    "GELU": ("gelu", {"approximate": "none"}),
    "ELU": ("elu", {"alpha": 1.0}),
}


def _require(module: str, extra: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(
            f"this importer needs the optional dependency {module!r}; "
            f"install it with: pip install 'dgnh[{extra}]'"
        ) from None


def _torch_layers(module, torch, prefix: str = ""):
    """``(position, layer)`` for the leaves of a (possibly nested) ``nn.Sequential``."""
    for name, child in module.named_children():
        where = f"{prefix}{name}"
        if type(child) is torch.nn.Sequential:
            yield from _torch_layers(child, torch, prefix=f"{where}.")
        else:
            yield where, child


def _float64(tensor, torch) -> Array:
    return tensor.detach().to("cpu", torch.float64).numpy()


def _torch_activation(layer, where: str, torch) -> str:
    kind = type(layer).__name__
    if kind not in _TORCH_ACTIVATIONS or type(layer) is not getattr(torch.nn, kind):
        raise ValueError(
            f"unsupported layer {kind} at position {where}: dgnh imports nn.Sequential "
            f"stacks of nn.Linear, nn.Identity and the activations "
            f"{', '.join(sorted(_TORCH_ACTIVATIONS))}"
        )
    name, required = _TORCH_ACTIVATIONS[kind]
    for attr, value in required.items():
        got = getattr(layer, attr)
        if got != value:
            raise ValueError(
                f"unsupported {kind}({attr}={got!r}) at position {where}: dgnh's "
                f"{name!r} activation is {kind}({attr}={value!r}), PyTorch's default"
            )
    return name


def torch_layers(module) -> Layers:
    """The layers ``(weights, biases, activations)`` of an ``nn.Sequential`` of ``nn.Linear``
    layers and activations (what :meth:`dgnh.MLP.from_torch` is built from).

    Supported activations: ``ReLU``, ``LeakyReLU`` (slope 0.01), ``Tanh``,
    ``Sigmoid``, ``Softplus`` (beta 1, threshold 20), ``GELU`` (exact erf form),
    ``ELU`` (alpha 1); ``nn.Identity`` is skipped and a ``Linear`` not followed by
    an activation gets ``"identity"``. Nested ``nn.Sequential`` are flattened.
    Weights are copied as float64.

    Raises
    ------
    TypeError
        ``module`` is not an ``nn.Sequential``.
    ValueError
        An unsupported layer or activation parameter (the message names it), an
        activation before the first ``Linear``, or two activations in a row.

    Examples
    --------
    >>> import torch, dgnh
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    >>> dgnh.MLP.from_torch(net).activations
    ['tanh', 'identity']
    """
    torch = _require("torch", "torch")
    if not isinstance(module, torch.nn.Sequential):
        raise TypeError(
            f"expected a torch.nn.Sequential of Linear layers and activations, "
            f"got {type(module).__name__}"
        )
    weights: list[Array] = []
    biases: list[Array | None] = []
    activations: list[str] = []
    for where, layer in _torch_layers(module, torch):
        if type(layer) is torch.nn.Identity:
            continue
        if type(layer) is torch.nn.Linear:
            if len(activations) < len(weights):
                activations.append("identity")
            weights.append(_float64(layer.weight, torch))
            biases.append(None if layer.bias is None else _float64(layer.bias, torch))
            continue
        name = _torch_activation(layer, where, torch)
        if not weights:
            raise ValueError(
                f"activation {type(layer).__name__} at position {where} comes before "
                f"the first Linear layer"
            )
        if len(activations) == len(weights):
            raise ValueError(
                f"two activations in a row ({activations[-1]!r}, then "
                f"{type(layer).__name__} at position {where}); dgnh allows one per layer"
            )
        activations.append(name)
    if not weights:
        raise ValueError("the nn.Sequential contains no nn.Linear layer")
    if len(activations) < len(weights):
        activations.append("identity")
    return weights, biases, activations


# ---------------------------------------------------------------------- onnx
_LINEAR_OPS = ("Gemm", "MatMul")
# single-node activation ops; their supported attributes are checked in _check_attributes
_ONNX_ACTIVATIONS = {
    "Relu": "relu", "LeakyRelu": "leaky_relu", "Tanh": "tanh", "Sigmoid": "sigmoid",
    "Softplus": "softplus", "Elu": "elu", "Gelu": "gelu",
}
# attribute -> the value dgnh implements (which is also the ONNX default)
_ONNX_ATTRIBUTES = {
    "LeakyRelu": ("alpha", LEAKY_SLOPE), "Elu": ("alpha", 1.0), "Gelu": ("approximate", "none"),
}
# elementwise ops allowed inside the decompositions torch.onnx.export writes
_ONNX_ELEMENTWISE = set(_ONNX_ACTIVATIONS) | {"Identity", "Mul", "Add", "Div", "Erf",
                                              "Greater", "Where"}
_Z = "z"  # the activation's input in expression trees


def _canonical(expr):
    """Normal form of an expression tree: Div by a constant becomes Mul, nested
    Mul/Add are flattened with their constants folded into a leading number and
    their other terms sorted, Identity disappears."""
    if not isinstance(expr, tuple):
        return expr
    op, args = expr[0], [_canonical(a) for a in expr[1:]]
    if op == "Identity":
        return args[0]
    if op == "Div" and isinstance(args[1], float):
        op, args = "Mul", [args[0], 1.0 / args[1]]
    if op not in ("Mul", "Add"):
        return (op, *args)
    fold, const, terms = (math.prod, 1.0, []) if op == "Mul" else (math.fsum, 0.0, [])
    for a in args:
        if isinstance(a, tuple) and a[0] == op:
            const, terms = fold([const, a[1]]), terms + list(a[2:])
        elif isinstance(a, float):
            const = fold([const, a])
        else:
            terms.append(a)
    if not terms:
        return const
    if len(terms) == 1 and const == (1.0 if op == "Mul" else 0.0):
        return terms[0]
    return (op, const, *sorted(terms, key=lambda t: repr(_key(t))))


def _key(expr):
    """Hashable comparison key: constants to 6 significant digits (float32 exports)."""
    if isinstance(expr, float):
        return float(f"{expr:.6g}")
    if isinstance(expr, tuple):
        return tuple(_key(a) for a in expr)
    return expr


# activation subgraphs, as exported by torch.onnx (legacy and dynamo exporters)
_ONNX_FORMS = {
    _key(_canonical(expr)): name
    for expr, name in [
        (_Z, "identity"),
        *(((op, _Z), name) for op, name in _ONNX_ACTIVATIONS.items()),
        # GELU at opsets < 20: x * 0.5 * (1 + erf(x / sqrt 2))
        (("Mul", ("Mul", _Z, 0.5), ("Add", ("Erf", ("Div", _Z, math.sqrt(2.0))), 1.0)), "gelu"),
        # Softplus(beta=1, threshold=20) of the dynamo exporter
        (("Where", ("Greater", _Z, 20.0), _Z, ("Softplus", _Z)), "softplus"),
    ]
}


class _OnnxGraph:
    """A chain reader for an MLP-shaped ONNX graph."""

    def __init__(self, graph, numpy_helper):
        to_array = numpy_helper.to_array
        self.consts = {t.name: to_array(t) for t in graph.initializer}
        self.nodes = []
        for node in graph.node:
            if node.op_type == "Constant":
                attrs = {a.name: a for a in node.attribute}
                if "value" not in attrs:
                    raise ValueError(f"unsupported Constant node {node.name!r} with "
                                     f"attributes {sorted(attrs)} (dgnh reads 'value')")
                self.consts[node.output[0]] = to_array(attrs["value"].t)
            else:
                self.nodes.append(node)
        self.producer = {out: k for k, n in enumerate(self.nodes) for out in n.output}
        self.consumers = defaultdict(list)
        for k, node in enumerate(self.nodes):
            for name in node.input:
                self.consumers[name].append(k)
        inputs = [i.name for i in graph.input if i.name not in self.consts]
        if len(inputs) != 1 or len(graph.output) != 1:
            raise ValueError(
                f"an MLP graph has one data input and one output, got inputs {inputs} "
                f"and outputs {[o.name for o in graph.output]}"
            )
        self.input, self.output = inputs[0], graph.output[0].name
        self.used: set[int] = set()

    def describe(self, k: int) -> str:
        node = self.nodes[k]
        return f"op {node.op_type!r} (node {node.name or node.output[0]!r})"

    def const(self, name: str, what: str) -> Array:
        if name not in self.consts:
            raise ValueError(f"{what} {name!r} is not a constant (initializer) of the graph")
        return self.consts[name].astype(np.float64)

    def only_consumer(self, tensor: str) -> int | None:
        ks = self.consumers.get(tensor, [])
        if len(ks) > 1:
            raise ValueError(
                f"tensor {tensor!r} feeds {len(ks)} nodes ({', '.join(map(self.describe, ks))}); "
                f"an MLP graph is a chain"
            )
        return ks[0] if ks else None

    def linear(self, tensor: str, layer: int) -> tuple[Array, Array | None, str]:
        """Match ``Gemm`` or ``MatMul`` (+ ``Add``) reading ``tensor``: ``(W, b, output)``."""
        k = self.only_consumer(tensor)
        if k is None or self.nodes[k].op_type not in _LINEAR_OPS:
            found = "nothing" if k is None else self.describe(k)
            raise ValueError(
                f"unsupported ONNX graph: layer {layer} must start with Gemm or MatMul, "
                f"found {found}"
            )
        node = self.nodes[k]
        self.used.add(k)
        where = f"layer {layer} ({self.describe(k)})"
        if node.input[0] != tensor:
            raise ValueError(f"{where}: the weight is the first operand; dgnh expects "
                             f"the data first (x·Wᵀ)")
        B = self.const(node.input[1], f"{where}: the weight")
        if B.ndim != 2:
            raise ValueError(f"{where}: the weight must be a matrix, got shape {B.shape}")
        if node.op_type == "MatMul":
            W, bias, out = B.T, None, node.output[0]
            after = self.consumers.get(out, [])
            if len(after) == 1 and self.nodes[after[0]].op_type == "Add":
                add = self.nodes[after[0]]
                other = add.input[1] if add.input[0] == out else add.input[0]
                if other in self.consts:
                    self.used.add(after[0])
                    bias, out = self.const(other, f"{where}: the bias"), add.output[0]
        else:
            attrs = {a.name: a for a in node.attribute}
            if "transA" in attrs and attrs["transA"].i:
                raise ValueError(f"{where}: unsupported Gemm attribute transA=1")
            alpha = attrs["alpha"].f if "alpha" in attrs else 1.0
            beta = attrs["beta"].f if "beta" in attrs else 1.0
            W = alpha * (B if "transB" in attrs and attrs["transB"].i else B.T)
            has_bias = len(node.input) > 2 and node.input[2]
            bias = beta * self.const(node.input[2], f"{where}: the bias") if has_bias else None
            out = node.output[0]
        if bias is not None:
            if bias.size != W.shape[0]:
                raise ValueError(
                    f"{where}: the bias of shape {bias.shape} does not have one entry "
                    f"per output ({W.shape[0]})"
                )
            bias = bias.reshape(-1)
        return W, bias, out

    def activation(self, z: str, layer: int) -> tuple[str, str]:
        """Match the elementwise subgraph from ``z`` to the next linear op or the graph
        output: ``(activation name, output tensor)``."""
        region, frontier, ends = set(), [z], set()
        while frontier:
            tensor = frontier.pop()
            if tensor == self.output:
                ends.add(tensor)
            for k in self.consumers.get(tensor, []):
                op = self.nodes[k].op_type
                if op in _LINEAR_OPS:
                    ends.add(tensor)
                elif op not in _ONNX_ELEMENTWISE:
                    raise ValueError(
                        f"unsupported ONNX {self.describe(k)} after layer {layer}; dgnh "
                        f"imports Gemm/MatMul+Add layers with the activations "
                        f"{', '.join(sorted(_ONNX_ACTIVATIONS))}"
                    )
                elif k not in region:
                    region.add(k)
                    frontier.extend(self.nodes[k].output)
        if len(ends) != 1:
            raise ValueError(
                f"the activation after layer {layer} has {len(ends)} outputs "
                f"{sorted(ends)}; an MLP graph is a chain"
            )
        out = ends.pop()
        used: set[int] = set()
        expr = self._expression(out, z, region, used, layer)
        form = _ONNX_FORMS.get(_key(_canonical(expr)))
        if form is None or used != region:
            ops = [self.nodes[k].op_type for k in sorted(region)]
            raise ValueError(
                f"unsupported activation after layer {layer}: the ops {ops} do not form "
                f"one of {', '.join(sorted(_ONNX_ACTIVATIONS))} (nor the Erf form of Gelu "
                f"or torch's thresholded Softplus)"
            )
        self.used |= region
        return form, out

    def _expression(self, tensor, z, region, used, layer):
        if tensor == z:
            return _Z
        if tensor in self.consts:
            value = self.consts[tensor]
            if value.size != 1:
                raise ValueError(
                    f"the activation after layer {layer} uses a non-scalar constant {tensor!r}"
                )
            return float(value.reshape(-1)[0])
        k = self.producer.get(tensor)
        if k not in region:
            raise ValueError(
                f"the activation after layer {layer} reads {tensor!r}, which is neither its "
                f"input nor a constant"
            )
        used.add(k)
        node = self.nodes[k]
        _check_attributes(node, layer)
        return (node.op_type, *(self._expression(t, z, region, used, layer)
                                for t in node.input if t))


def _check_attributes(node, layer: int) -> None:
    if node.op_type not in _ONNX_ATTRIBUTES:
        return
    attr, value = _ONNX_ATTRIBUTES[node.op_type]
    found = {a.name: a for a in node.attribute}
    if attr not in found:
        return
    if isinstance(value, str):
        got = found[attr].s.decode()
        same, shown = got == value, repr(got)
    else:  # ONNX stores float attributes in float32
        got = found[attr].f
        same, shown = math.isclose(got, value, rel_tol=1e-6), f"{got:.6g}"
    if not same:
        raise ValueError(
            f"unsupported {node.op_type}({attr}={shown}) after layer {layer}: dgnh's "
            f"{_ONNX_ACTIVATIONS[node.op_type]!r} activation has {attr}={value!r}"
        )


def onnx_layers(path: str | os.PathLike) -> Layers:
    """The layers ``(weights, biases, activations)`` of an MLP in an ONNX file (e.g. written by ``torch.onnx.export``).

    The graph must be a chain of linear layers — ``Gemm`` (any ``transB``,
    ``alpha``/``beta`` folded into the weights) or ``MatMul`` with an optional
    ``Add`` of a constant bias — each followed by one activation: ``Relu``,
    ``LeakyRelu`` (alpha 0.01), ``Tanh``, ``Sigmoid``, ``Softplus``, ``Elu``
    (alpha 1), ``Gelu`` (opset 20, exact), the Erf decomposition of GELU
    (``x·0.5·(1 + erf(x/√2))``, written at opsets < 20) or torch's thresholded
    ``Where(x > 20, x, Softplus(x))``; nothing (or ``Identity``) means identity.
    Weights and biases are the graph's initializers (or ``Constant`` nodes),
    converted to float64.

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    ValueError
        The file is not ONNX, or the graph holds an unsupported op (the message
        names it and its node) or is not a chain.

    Examples
    --------
    >>> import dgnh
    >>> net = dgnh.MLP.from_onnx("model.onnx")  # doctest: +SKIP
    """
    onnx = _require("onnx", "onnx")
    numpy_helper = _require("onnx.numpy_helper", "onnx")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ONNX file {os.fspath(path)!r} does not exist")
    try:
        model = onnx.load(os.fspath(path))
    except Exception as exc:  # protobuf raises its own DecodeError
        raise ValueError(f"{os.fspath(path)!r} is not a readable ONNX model: {exc}") from None
    graph = _OnnxGraph(model.graph, numpy_helper)
    weights, biases, activations = [], [], []
    tensor = graph.input
    while True:
        layer = len(weights) + 1
        W, b, z = graph.linear(tensor, layer)
        act, tensor = graph.activation(z, layer)
        weights.append(W)
        biases.append(b)
        activations.append(act)
        if tensor == graph.output:
            break
    left = [graph.describe(k) for k in range(len(graph.nodes)) if k not in graph.used]
    if left:
        raise ValueError(f"unsupported ONNX graph: nodes outside the MLP chain: {', '.join(left)}")
    return weights, biases, activations
