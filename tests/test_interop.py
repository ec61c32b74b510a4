"""Importing networks from PyTorch and ONNX (dgnh.interop).

References are independent of dgnh's numerics: ``torch.func`` autodiff for the
GNH, its products, the Hessian, the gradient and the loss; ``onnx.reference``
(the ONNX reference evaluator) for the forward pass of hand-built graphs.
"""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import warnings

import numpy as np
import pytest

import dgnh

ACTIVATIONS = ["relu", "leaky_relu", "tanh", "sigmoid", "softplus", "gelu", "elu", "identity"]
LOSSES = ["mse", "cross_entropy", "binary_cross_entropy"]
RTOL = 1e-8
# the legacy TorchScript-based exporter (torch.onnx.export(dynamo=False)) warns on import
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.script.* is deprecated")


def assert_close(actual, reference, rtol=RTOL):
    """Entrywise relative agreement, with a floor at ``rtol`` times the largest entry."""
    reference = np.asarray(reference)
    scale = float(np.max(np.abs(reference))) if reference.size else 0.0
    np.testing.assert_allclose(actual, reference, rtol=rtol, atol=rtol * scale)


def test_core_imports_neither_torch_nor_onnx():
    code = ("import sys, dgnh; dgnh.MLP, dgnh.GaussNewton; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'onnx'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("importer, module", [
    (dgnh.MLP.from_torch, "torch"), (dgnh.MLP.from_onnx, "onnx"),
])
def test_missing_extra_names_the_install(monkeypatch, importer, module):
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    with pytest.raises(ImportError, match=rf"pip install 'dgnh\[{module}\]'"):
        importer("model.onnx")


# ------------------------------------------------------------------ PyTorch
def torch_activation(torch, name):
    nn = torch.nn
    return {
        "relu": nn.ReLU(), "leaky_relu": nn.LeakyReLU(), "tanh": nn.Tanh(),
        "sigmoid": nn.Sigmoid(), "softplus": nn.Softplus(), "gelu": nn.GELU(),
        "elu": nn.ELU(), "identity": nn.Identity(),
    }[name]


def torch_mlp(torch, activation, seed=0):
    """3 -> 5 -> 4 (no bias) -> 3, float64, ``activation`` after both hidden layers."""
    torch.manual_seed(seed)
    nn = torch.nn
    return nn.Sequential(
        nn.Linear(3, 5), torch_activation(torch, activation),
        nn.Linear(5, 4, bias=False), torch_activation(torch, activation),
        nn.Linear(4, 3),
    ).double()


def torch_sample_loss(torch, loss, F, Y):
    """Per-sample losses written with torch.nn.functional (dgnh's conventions)."""
    fn = torch.nn.functional
    if loss == "mse":
        return 0.5 * ((F - Y) ** 2).sum(-1)
    if loss == "cross_entropy":
        return fn.cross_entropy(F, Y, reduction="none")
    return fn.binary_cross_entropy_with_logits(F, Y, reduction="none").sum(-1)


def make_targets(rng, loss, n, d):
    if loss == "mse":
        return rng.normal(size=(n, d))
    if loss == "cross_entropy":
        return rng.integers(0, d, size=n)
    return rng.uniform(size=(n, d))


@dataclasses.dataclass
class TorchCase:
    mlp: dgnh.MLP
    gn: dgnh.GaussNewton
    w0: np.ndarray  # parameters_to_vector of the torch module
    G: np.ndarray  # (1/n) Σ J_iᵀ Q_i J_i from jacrev and per-sample Hessians of ℓ
    H: np.ndarray  # hessian of the mean loss
    gnh_products: callable  # V -> G V through jvp, Q and vjp
    gradient: np.ndarray
    loss: float


@pytest.fixture(scope="module", params=[(l, a) for l in LOSSES for a in ACTIVATIONS],
                ids=lambda p: f"{p[0]}-{p[1]}")
def torch_case(request):
    torch = pytest.importorskip("torch")
    from torch.func import functional_call, grad, hessian, jacrev, jvp, vjp, vmap

    loss, activation = request.param
    module = torch_mlp(torch, activation)
    rng = np.random.default_rng(1)
    n = 7
    X = rng.normal(size=(n, 3))
    Y = make_targets(rng, loss, n, 3)
    Xt, Yt = torch.from_numpy(X), torch.from_numpy(Y)

    w0 = torch.nn.utils.parameters_to_vector(module.parameters()).detach()
    names = [k for k, _ in module.named_parameters()]
    shapes = [p.shape for p in module.parameters()]
    sizes = [math.prod(s) for s in shapes]

    def f(w):
        params = {k: p.reshape(s) for k, p, s in zip(names, torch.split(w, sizes), shapes)}
        return functional_call(module, params, (Xt,))

    def mean_loss(w):
        return torch_sample_loss(torch, loss, f(w), Yt).mean()

    def loss_of_output(Fi, Yi):  # ℓ(f_i, y_i) of one sample
        return torch_sample_loss(torch, loss, Fi[None], Yi[None]).sum()

    F0 = f(w0).detach()
    J = jacrev(f)(w0)  # (n, d, N)
    Q = vmap(hessian(loss_of_output))(F0, Yt)  # (n, d, d)
    G = torch.einsum("iap,iab,ibq->pq", J, Q, J) / n

    def gnh_products(V):
        columns = []
        for v in torch.from_numpy(V).T:
            _, u = jvp(f, (w0,), (v,))
            _, Qu = jvp(lambda F: vmap(grad(loss_of_output))(F, Yt), (F0,), (u,))
            _, pullback = vjp(f, w0)
            columns.append(pullback(Qu)[0] / n)
        return torch.stack(columns, 1).numpy()

    mlp = dgnh.MLP.from_torch(module)
    gn = dgnh.GaussNewton(mlp, X, Y, loss=loss, dtype=np.float64, shard_size=4,
                         client="in-process")
    yield TorchCase(mlp, gn, w0.numpy(), G.numpy(), hessian(mean_loss)(w0).numpy(),
                    gnh_products, grad(mean_loss)(w0).numpy(), float(mean_loss(w0)))
    gn.close()


def test_torch_parameter_order(torch_case):
    np.testing.assert_array_equal(torch_case.mlp.parameters(), torch_case.w0)


def test_torch_dense_and_entries(torch_case):
    assert_close(torch_case.gn.dense(), torch_case.G)
    rng = np.random.default_rng(2)
    rows = rng.choice(torch_case.gn.n_params, size=9, replace=False)
    cols = rng.choice(torch_case.gn.n_params, size=6, replace=False)
    assert_close(torch_case.gn.entries(rows, cols), torch_case.G[np.ix_(rows, cols)])


def test_torch_matvec(torch_case):
    V = np.random.default_rng(3).normal(size=(torch_case.gn.n_params, 3))
    reference = torch_case.gnh_products(V)
    assert_close(torch_case.gn @ V, reference)
    assert_close(torch_case.gn @ V[:, 0], reference[:, 0])


def test_torch_hvp(torch_case):
    V = np.random.default_rng(4).normal(size=(torch_case.gn.n_params, 3))
    assert_close(torch_case.gn.hvp(V), torch_case.H @ V)


def test_torch_gradient_and_loss(torch_case):
    assert_close(torch_case.gn.gradient(), torch_case.gradient)
    assert math.isclose(torch_case.gn.loss(), torch_case.loss, rel_tol=RTOL)


def test_from_torch_float32_and_nested():
    torch = pytest.importorskip("torch")
    nn = torch.nn
    torch.manual_seed(0)
    module = nn.Sequential(nn.Sequential(nn.Linear(2, 3), nn.Tanh()), nn.Linear(3, 1))
    mlp = dgnh.MLP.from_torch(module)
    assert mlp.activations == ["tanh", "identity"]
    w = torch.nn.utils.parameters_to_vector(module.parameters()).detach().double().numpy()
    np.testing.assert_array_equal(mlp.parameters(), w)
    X = np.random.default_rng(0).normal(size=(4, 2))
    expected = module.double()(torch.from_numpy(X)).detach().numpy()
    assert_close(mlp.forward(X), expected)


def _bad_torch(torch, what):
    nn = torch.nn
    lin = nn.Linear(3, 3)
    return {
        "Dropout": nn.Sequential(lin, nn.Dropout(0.1), nn.Linear(3, 1)),
        "BatchNorm1d": nn.Sequential(lin, nn.BatchNorm1d(3)),
        "Softmax": nn.Sequential(lin, nn.Softmax(dim=1)),
        "negative_slope": nn.Sequential(lin, nn.LeakyReLU(0.2)),
        "approximate": nn.Sequential(lin, nn.GELU(approximate="tanh")),
        "beta": nn.Sequential(lin, nn.Softplus(beta=2.0)),
        "alpha": nn.Sequential(lin, nn.ELU(alpha=0.5)),
        "before the first Linear": nn.Sequential(nn.ReLU(), lin),
        "two activations in a row": nn.Sequential(lin, nn.ReLU(), nn.Tanh()),
        "no nn.Linear": nn.Sequential(nn.Identity()),
    }[what]


@pytest.mark.parametrize("what", [
    "Dropout", "BatchNorm1d", "Softmax", "negative_slope", "approximate", "beta", "alpha",
    "before the first Linear", "two activations in a row", "no nn.Linear",
])
def test_from_torch_rejects(what):
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError, match=what):
        dgnh.MLP.from_torch(_bad_torch(torch, what))


def test_from_torch_needs_sequential():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="Sequential"):
        dgnh.MLP.from_torch(torch.nn.Linear(3, 2))


# ------------------------------------------------------- torch.onnx.export
EXPORTERS = [("legacy", 17), ("legacy", 20), ("dynamo", 18), ("dynamo", 20)]


def export_onnx(torch, module, path, exporter, opset):
    if exporter == "dynamo":
        pytest.importorskip("onnxscript")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.zeros(2, 3, dtype=torch.float64),), str(path),
                          dynamo=exporter == "dynamo", opset_version=opset, verbose=False)


@pytest.mark.parametrize("exporter, opset", EXPORTERS, ids=[f"{e}{o}" for e, o in EXPORTERS])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_torch_onnx_export_imports_same_mlp(tmp_path, activation, exporter, opset):
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnx")
    module = torch_mlp(torch, activation)
    path = tmp_path / "net.onnx"
    export_onnx(torch, module, path, exporter, opset)
    expected = dgnh.MLP.from_torch(module)
    imported = dgnh.MLP.from_onnx(path)
    assert imported.activations == expected.activations
    assert [b is None for b in imported.biases] == [b is None for b in expected.biases]
    np.testing.assert_array_equal(imported.parameters(), expected.parameters())


@pytest.mark.parametrize("exporter, opset", EXPORTERS, ids=[f"{e}{o}" for e, o in EXPORTERS])
def test_torch_onnx_export_unsupported(tmp_path, exporter, opset):
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnx")
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Softmax(dim=1)).double()
    path = tmp_path / "net.onnx"
    export_onnx(torch, module, path, exporter, opset)
    with pytest.raises(ValueError, match="Softmax"):
        dgnh.MLP.from_onnx(path)


# -------------------------------------------------- graphs from onnx.helper
class GraphBuilder:
    """Writes MLP graphs node by node with onnx.helper and records the expected MLP."""

    def __init__(self, onnx, seed=0, dtype=np.float64):
        self.onnx, self.rng, self.dtype = onnx, np.random.default_rng(seed), dtype
        self.nodes, self.inits, self.count = [], [], 0
        self.weights, self.biases, self.activations = [], [], []

    def name(self, stem):
        self.count += 1
        return f"{stem}_{self.count}"

    def const(self, value, as_node=False):
        name = self.name("c")
        tensor = self.onnx.numpy_helper.from_array(np.asarray(value, dtype=self.dtype), name)
        if as_node:
            self.nodes.append(self.onnx.helper.make_node("Constant", [], [name], value=tensor))
        else:
            self.inits.append(tensor)
        return name

    def node(self, op, inputs, **attrs):
        out = self.name(op.lower())
        self.nodes.append(self.onnx.helper.make_node(op, inputs, [out], **attrs))
        return out

    def linear(self, x, d_in, d_out, kind):
        W = self.rng.normal(size=(d_out, d_in)).astype(self.dtype)
        b = self.rng.normal(size=d_out).astype(self.dtype)
        if kind == "gemm_transB":
            y = self.node("Gemm", [x, self.const(W), self.const(b)], transB=1)
        elif kind == "gemm":
            y = self.node("Gemm", [x, self.const(W.T), self.const(b)])
        elif kind == "gemm_scaled":  # alpha, beta folded into W, b
            y = self.node("Gemm", [x, self.const(W / 2), self.const(b * 4)],
                          transB=1, alpha=2.0, beta=0.25)
        elif kind == "gemm_nobias":
            y, b = self.node("Gemm", [x, self.const(W)], transB=1), None
        elif kind == "matmul_add":
            y = self.node("Add", [self.node("MatMul", [x, self.const(W.T)]), self.const(b)])
        elif kind == "add_bias_first":
            y = self.node("Add", [self.const(b[None, :]), self.node("MatMul", [x, self.const(W.T)])])
        elif kind == "matmul":
            y, b = self.node("MatMul", [x, self.const(W.T, as_node=True)]), None
        self.weights.append(W)
        self.biases.append(b)
        return y

    def activation(self, z, kind):
        single = {"Relu": "relu", "LeakyRelu": "leaky_relu", "Tanh": "tanh",
                  "Sigmoid": "sigmoid", "Softplus": "softplus", "Elu": "elu", "Gelu": "gelu"}
        if kind in single:
            y = self.node(kind, [z])
            self.activations.append(single[kind])
        elif kind == "LeakyRelu_alpha":
            y = self.node("LeakyRelu", [z], alpha=0.01)
            self.activations.append("leaky_relu")
        elif kind == "gelu_erf":  # 0.5 * z * (1 + erf(z / sqrt 2)), constants as nodes
            erf = self.node("Erf", [self.node("Div", [z, self.const(math.sqrt(2), True)])])
            half_z = self.node("Mul", [self.const(0.5, True), z])
            y = self.node("Mul", [half_z, self.node("Add", [self.const(1.0, True), erf])])
            self.activations.append("gelu")
        elif kind == "softplus_where":
            above = self.node("Greater", [z, self.const(20.0)])
            y = self.node("Where", [above, z, self.node("Softplus", [z])])
            self.activations.append("softplus")
        elif kind == "identity_node":
            y = self.node("Identity", [z])
            self.activations.append("identity")
        elif kind == "none":
            y = z
            self.activations.append("identity")
        return y

    def model(self, layers, sizes, opset=20):
        helper, tp = self.onnx.helper, self.onnx.TensorProto
        elem = tp.DOUBLE if self.dtype == np.float64 else tp.FLOAT
        x = "x"
        for (lin, act), d_in, d_out in zip(layers, sizes[:-1], sizes[1:]):
            x = self.activation(self.linear(x, d_in, d_out, lin), act)
        self.nodes.append(helper.make_node("Identity", [x], ["y"]))
        graph = helper.make_graph(
            self.nodes, "mlp", [helper.make_tensor_value_info("x", elem, ["n", sizes[0]])],
            [helper.make_tensor_value_info("y", elem, ["n", sizes[-1]])], self.inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


HELPER_GRAPHS = {
    "gemm-relu": [("gemm_transB", "Relu"), ("gemm_transB", "none")],
    "gemm-tanh-sigmoid": [("gemm", "Tanh"), ("gemm_scaled", "Sigmoid")],
    "matmul-leaky-elu": [("matmul_add", "LeakyRelu"), ("add_bias_first", "Elu")],
    "nobias-softplus": [("matmul", "Softplus"), ("gemm_nobias", "LeakyRelu_alpha")],
    "gelu-op": [("gemm_transB", "Gelu"), ("matmul_add", "Gelu")],
    "gelu-erf": [("matmul", "gelu_erf"), ("gemm_transB", "gelu_erf")],
    "softplus-where": [("gemm_transB", "softplus_where"), ("matmul", "identity_node")],
    "identity-between": [("matmul_add", "none"), ("gemm", "identity_node"), ("gemm", "Tanh")],
}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("graph", sorted(HELPER_GRAPHS))
def test_onnx_helper_graph(tmp_path, graph, dtype):
    onnx = pytest.importorskip("onnx")
    from onnx.reference import ReferenceEvaluator

    layers = HELPER_GRAPHS[graph]
    sizes = [4, 6, 5, 3][:len(layers) + 1]
    builder = GraphBuilder(onnx, seed=len(graph), dtype=dtype)
    model = builder.model(layers, sizes)
    onnx.checker.check_model(model, full_check=True)
    path = tmp_path / "net.onnx"
    onnx.save(model, path)

    mlp = dgnh.MLP.from_onnx(path)
    expected = dgnh.MLP(builder.weights, builder.biases, builder.activations)
    assert mlp.activations == expected.activations
    assert_close(mlp.parameters(), expected.parameters(), rtol=1e-6 if dtype == np.float32 else 0)

    X = np.random.default_rng(5).normal(size=(11, sizes[0])).astype(dtype)
    (reference,) = ReferenceEvaluator(model).run(None, {"x": X})
    # ONNX stores attributes (LeakyRelu's alpha) in float32 and onnx.reference evaluates
    # Erf and Gelu in float32, so even a float64 graph agrees to float32 accuracy only
    assert_close(mlp.forward(X), reference, rtol=1e-5 if dtype == np.float32 else 1e-6)


def bad_graph(onnx, what):
    """Graphs dgnh must refuse, each with the word its error must contain."""
    b = GraphBuilder(onnx)
    helper = onnx.helper
    z = b.linear("x", 3, 4, "gemm_transB")
    if what == "Selu":
        y = b.node("Selu", [z])
    elif what == "LeakyRelu":
        y = b.node("LeakyRelu", [z], alpha=0.2)
    elif what == "Gelu":
        y = b.node("Gelu", [z], approximate="tanh")
    elif what == "do not form":  # x * sigmoid(1.702 x): not a supported activation
        y = b.node("Mul", [z, b.node("Sigmoid", [b.node("Mul", [z, b.const(1.702)])])])
    elif what == "Softmax":
        y = b.node("Softmax", [z], axis=1)
    elif what == "chain":  # two branches
        y = b.node("Add", [b.linear(z, 4, 2, "gemm_transB"), b.linear(z, 4, 2, "gemm_transB")])
    elif what == "transA":
        y = b.node("Gemm", [z, b.const(np.ones((4, 2)))], transA=1)
    elif what == "Conv":
        y = b.node("Conv", [z, b.const(np.ones((1, 1, 1)))])
    nodes = b.nodes + [helper.make_node("Identity", [y], ["y"])]
    graph = helper.make_graph(nodes, "bad", [helper.make_tensor_value_info(
        "x", onnx.TensorProto.DOUBLE, ["n", 3])], [helper.make_tensor_value_info(
            "y", onnx.TensorProto.DOUBLE, None)], b.inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), what


@pytest.mark.parametrize("what", [
    "Selu", "LeakyRelu", "Gelu", "do not form", "Softmax", "chain", "transA", "Conv",
])
def test_from_onnx_rejects(tmp_path, what):
    onnx = pytest.importorskip("onnx")
    model, match = bad_graph(onnx, what)
    path = tmp_path / "bad.onnx"
    onnx.save(model, path)
    with pytest.raises(ValueError, match=match):
        dgnh.MLP.from_onnx(path)


def test_from_onnx_bad_files(tmp_path):
    pytest.importorskip("onnx")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dgnh.MLP.from_onnx(tmp_path / "missing.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\xff\x00 not a protobuf \x12\x34" * 10)
    with pytest.raises(ValueError, match="not a readable ONNX model"):
        dgnh.MLP.from_onnx(garbage)
