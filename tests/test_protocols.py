"""Every implementation of the declared interfaces (dgnh.protocols) conforms to them.

Conformance is checked twice: ``isinstance`` with the ``runtime_checkable``
protocols (the members exist) and the signatures (parameter names, kinds and
defaults of every method; properties stay properties). Also: the public Jacobian
products of GaussNewton (the dual route's interface) against independent
references, and that no module outside the execution layer's backend owners
reaches into ``GaussNewton._backend``.
"""

from __future__ import annotations

import inspect
import pathlib

import numpy as np
import pytest
from distributed import Client, LocalCluster

import dgnh
from cases import dense_reference, random_mlp, random_problem, random_targets
from dgnh.backend import LocalBackend
from dgnh.checkpoint import CheckpointedGaussNewton
from dgnh.cluster import DaskBackend
from dgnh.hybrid import RemainderSource
from dgnh.protocols import Backend, EntrySource
from dgnh.shard_factors import ShardFactors

PACKAGE = pathlib.Path(dgnh.__file__).resolve().parent
BACKEND_OWNERS = {"backend.py", "cluster.py", "gauss_newton.py"}  # paths in the package


def members(protocol: type) -> set[str]:
    """The public members a protocol declares (methods, properties, annotated attributes)."""
    return {n for n in vars(protocol) if not n.startswith("_")} | set(protocol.__annotations__)


def signature_mismatches(cls: type, protocol: type) -> list[str]:
    """What ``cls`` declares differently from ``protocol``: missing members, properties
    that are not properties, methods whose parameters differ (names, kinds, defaults)."""
    problems = []
    for name in sorted(members(protocol)):
        declared = inspect.getattr_static(protocol, name, None)
        if declared is None:  # an annotated attribute: may be set per instance
            continue
        found = inspect.getattr_static(cls, name, None)
        if found is None:
            problems.append(f"{name}: missing")
        elif isinstance(declared, property):
            if not isinstance(found, property):
                problems.append(f"{name}: not a property")
        else:
            want = list(inspect.signature(declared).parameters.values())
            got = list(inspect.signature(getattr(cls, name)).parameters.values())
            if [(p.name, p.kind, p.default) for p in want] != [
                    (p.name, p.kind, p.default) for p in got]:
                problems.append(f"{name}{inspect.signature(getattr(cls, name))} differs from "
                                f"{name}{inspect.signature(declared)}")
    return problems


# ------------------------------------------------------------------ instances
@pytest.fixture(scope="module")
def gn():
    net, X, Y = random_problem((3, 4, 2), "mse", 9)
    with dgnh.GaussNewton(net, X, Y, shard_size=4, client="in-process") as gn:
        yield gn


@pytest.fixture(scope="module")
def dask_client():
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=":0") as cluster, \
            Client(cluster, set_as_default=False) as client:
        yield client


def entry_sources(gn):
    """One instance of every EntrySource implementation, by name."""
    U = np.zeros((gn.n_params, 1))
    return {"GaussNewton": gn,
            "CheckpointedGaussNewton": CheckpointedGaussNewton(gn, job_store=None),
            "RemainderSource": RemainderSource(gn, U)}


ENTRY_SOURCE_CLASSES = [dgnh.GaussNewton, CheckpointedGaussNewton, RemainderSource]
BACKEND_CLASSES = [LocalBackend, DaskBackend]


# ----------------------------------------------------------------- signatures
@pytest.mark.parametrize("cls", ENTRY_SOURCE_CLASSES, ids=lambda c: c.__name__)
def test_entry_source_signatures(cls):
    assert signature_mismatches(cls, EntrySource) == []


@pytest.mark.parametrize("cls", BACKEND_CLASSES, ids=lambda c: c.__name__)
def test_backend_signatures(cls):
    assert signature_mismatches(cls, Backend) == []


def test_signature_check_sees_a_missing_delta():
    class NoDelta:
        n_params = 1

        def diagonal(self):
            return np.ones(1)

        def entries_many(self, requests, eps=None, seed=0):
            return []

        def matvec(self, V):
            return V

    assert isinstance(NoDelta(), EntrySource)  # isinstance alone does not see it
    [problem] = signature_mismatches(NoDelta, EntrySource)
    assert problem.startswith("entries_many(self, requests, eps=None, seed=0) differs")


# -------------------------------------------------------------------- isinstance
def test_entry_sources_are_instances(gn):
    for name, source in entry_sources(gn).items():
        assert isinstance(source, EntrySource), name
        assert not isinstance(source, Backend), name


def test_in_process_backend_conforms(gn):
    backend = gn.backend
    assert isinstance(backend, LocalBackend) and isinstance(backend, Backend)
    assert backend.n_shards == gn.n_shards == 3 and backend.n_workers == 1
    assert backend.factor_bytes == sum(s.nbytes for s in backend.shards) > 0


def test_dask_backend_conforms(dask_client):
    net, X, Y = random_problem((3, 4, 2), "mse", 9)
    reference = dgnh.GaussNewton(net, X, Y, shard_size=4, client="in-process")
    with dgnh.GaussNewton(net, X, Y, shard_size=4, client=dask_client) as remote:
        backend = remote.backend
        assert isinstance(backend, DaskBackend) and isinstance(backend, Backend)
        assert isinstance(remote, EntrySource)
        assert backend.n_shards == 3 and backend.n_workers == 1
        assert backend.factor_bytes == reference.backend.factor_bytes
        assert backend.run(len, "abc") == reference.backend.run(len, "abc") == 3
        V = np.random.default_rng(0).normal(size=(net.n_params, 2))
        np.testing.assert_allclose(remote.jacobian_matvec(V), reference.jacobian_matvec(V),
                                   rtol=1e-13)
        np.testing.assert_allclose(remote.dual_gram(), reference.dual_gram(), rtol=1e-13)
    assert backend.factor_bytes == 0 and backend.n_shards == 0


def test_backends_call_shard_factors_methods_themselves(gn):
    """``map``/``sum`` take the ShardFactors method, not its name."""
    norms = gn.backend.map(ShardFactors.sq_norm_sums, (gn.model.locate(np.array([0, 5])),))
    assert len(norms) == gn.n_shards and all(n.shape == (2,) for n in norms)
    np.testing.assert_allclose(gn.backend.sum(ShardFactors.diagonal) / gn.n_samples,
                               gn.diagonal(), rtol=1e-14)


# ------------------------------------------------------- Jacobian products
@pytest.mark.parametrize("loss", ["mse", "cross_entropy", "binary_cross_entropy"])
def test_jacobian_products(loss):
    """Ĵ = RJ from GaussNewton's public products against G = ĴᵀĴ/n by finite differences."""
    net = random_mlp([3, 5, 4], ["tanh", "identity"], biases=[True, False], seed=4)
    rng = np.random.default_rng(8)
    X, Y = rng.normal(size=(10, 3)), random_targets(loss, 10, 4)
    gn = dgnh.GaussNewton(net, X, Y, loss=loss, shard_size=4, client="in-process")
    N, m = gn.n_params, gn.n_jacobian_rows
    J = gn.jacobian_matvec(np.eye(N))
    assert J.shape == (m, N) == (40, N)
    np.testing.assert_allclose(J.T @ J / 10, dense_reference(net, X, loss), atol=1e-7)
    v, y = rng.normal(size=N), rng.normal(size=(m, 3))
    np.testing.assert_allclose(gn.jacobian_matvec(v), J @ v, atol=1e-12)
    np.testing.assert_allclose(gn.jacobian_rmatvec(y), J.T @ y, atol=1e-12)
    np.testing.assert_allclose(gn.jacobian_rmatvec(y[:, 0]), J.T @ y[:, 0], atol=1e-12)
    assert gn.jacobian_matvec(np.zeros((N, 0))).shape == (m, 0)
    np.testing.assert_allclose(gn.jacobian_columns([7, 0, 7]), J[:, [7, 0, 7]], atol=1e-14)
    np.testing.assert_allclose(gn.dual_gram(), J @ J.T, atol=1e-12)


def test_jacobian_products_refuse_bad_input(gn):
    with pytest.raises(ValueError, match=r"V must have 26 rows, got shape \(5,\)"):
        gn.jacobian_matvec(np.ones(5))
    with pytest.raises(ValueError, match="Y contains NaN or Inf"):
        gn.jacobian_rmatvec(np.full(gn.n_jacobian_rows, np.nan))
    with pytest.raises(ValueError, match="the dual route needs .* = 18 rows 2,592"):
        gn.dual_gram(max_bytes=100)


# --------------------------------------------------------------- encapsulation
def test_only_the_backend_owners_touch_the_private_backend():
    users = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = path.relative_to(PACKAGE).as_posix()
        if name not in BACKEND_OWNERS and "_backend" in path.read_text():
            users.append(name)
    assert users == []
