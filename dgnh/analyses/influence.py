"""Influence of training points on the loss of query points, through ``(G + λI)⁻¹``.

Convention: ``G`` is the GNH of the *mean* loss and ``λ > 0`` a damping; the
influence of training point ``i`` on the loss of a query ``q`` (the first-order
change of ``ℓ_q`` when ``i`` is removed, up-weighting by ``−1/n``) is

    I(q, i) = −∇ℓ_qᵀ (G + λI)⁻¹ ∇ℓ_i / n,

and the self-influence of ``i`` is ``∇ℓ_iᵀ (G + λI)⁻¹ ∇ℓ_i / n`` (≥ 0).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from ..compress import compress
from ..config import memory_budget
from ..dense import Dense
from ..exact_solve import dual_factorize, solve
from ..gauss_newton import GaussNewton
from ..validation import check_fraction
from .samples import (
    check_damping,
    check_gn,
    choose_route,
    per_sample_gradients,
    query_gn,
)

Array = np.ndarray


@dataclasses.dataclass
class InverseRoute:
    """``B ↦ (G + λI)⁻¹B`` by a route, with the bound on its operator error.

    ``error`` bounds ``‖(G + λI)⁻¹ − approx‖₂``: 0 for ``"dual"`` and ``"primal"``
    (exact up to rounding), ``E/λ²`` for ``"compressed"`` with ``E`` the compression's estimated
    ``‖G − H‖₂``; ``"cg"`` reports per solve (``rtol/λ`` relative to ``‖b‖``).
    """

    solve: Callable[[Array], Array]
    route: str
    damping: float
    error: float
    inverse_diagonal: Callable[[], Array] | None = None


def inverse_route(gn: GaussNewton, damping, route: str = "auto", tol: float = 1e-6,
                  rtol: float = 1e-10, allowed=("auto", "dual", "primal", "cg", "compressed"),
                  seed: int = 0) -> InverseRoute:
    """The solves with ``G + damping·I`` by ``route`` (``"auto"``: the exact route on the
    smaller side, ``"dual"`` through the ``n·d × n·d`` dual or ``"primal"`` by Cholesky of
    the dense ``N × N`` matrix, when it fits the memory budget; see
    :func:`~dgnh.analyses.samples.choose_route`)."""
    lam = check_damping(damping)
    route = choose_route(check_gn(gn), route, allowed)
    if route in ("dual", "primal"):
        fac = (dual_factorize(gn, lam) if route == "dual" else
               Dense(gn.dense(max_bytes=memory_budget(gn.memory_budget))).factorize(lam))
        return InverseRoute(fac.solve, route, lam, 0.0, fac.inverse_diagonal)
    if route == "compressed":
        op = compress(gn, tol=check_fraction(tol, "tol"), seed=seed, progress=False)
        fac = op.factorize(lam)
        E = op.report["error_estimate"] * op.report["norm_estimate"]
        return InverseRoute(fac.solve, route, lam, E / lam**2, fac.inverse_diagonal)
    rtol = check_fraction(rtol, "rtol")
    return InverseRoute(lambda B: solve(gn, B, lam, rtol=rtol, preconditioner="diagonal").x,
                        route, lam, rtol / lam)


@dataclasses.dataclass
class InfluenceResult:
    """Influence scores ``scores[q, i] = −∇ℓ_qᵀ (G + λI)⁻¹ ∇ℓ_i / n``.

    ``error_bound[q]`` bounds ``|scores[q, i] − exact|`` over all ``i``: 0 on the exact
    routes (``"dual"``, ``"primal"``); ``rtol·‖∇ℓ_q‖·max_i‖∇ℓ_i‖/(nλ)`` after CG to relative residual ``rtol``.
    """

    scores: Array
    damping: float
    route: str
    error_bound: Array


def influence(gn: GaussNewton, X_query, Y_query, damping: float, route: str = "auto",
              rtol: float = 1e-10) -> InfluenceResult:
    """Influence of every training point of ``gn`` on the loss at each query point.

    One solve per query (``route``: ``"dual"`` exact Woodbury on the ``n·d`` side,
    ``"primal"`` exact Cholesky on the ``N`` side, ``"cg"`` preconditioned CG on exact
    GNH products, ``"auto"`` the exact route on the smaller side when it fits the memory
    budget, else CG), then per-sample gradient products through the factors.

    Examples
    --------
    >>> import numpy as np, dgnh
    >>> rng = np.random.default_rng(0)
    >>> net = dgnh.MLP([rng.normal(size=(4, 3)), rng.normal(size=(2, 4))],
    ...                [np.zeros(4), np.zeros(2)], ["tanh", "identity"])
    >>> gn = dgnh.GaussNewton(net, rng.normal(size=(30, 3)), rng.normal(size=(30, 2)))
    >>> res = influence(gn, rng.normal(size=(2, 3)), rng.normal(size=(2, 2)), damping=0.1)
    >>> res.scores.shape, res.route
    ((2, 30), 'primal')
    """
    inverse = inverse_route(gn, damping, route, rtol=rtol,
                            allowed=("auto", "dual", "primal", "cg"))
    with query_gn(gn, X_query, Y_query) as q:
        gq = per_sample_gradients(q).rows(0, q.n_samples)
    Z = inverse.solve(gq.T)
    scores = -np.atleast_2d(per_sample_gradients(gn) @ Z).T / gn.n_samples
    bound = np.zeros(len(gq))
    if inverse.route == "cg":
        bound = (inverse.error * np.linalg.norm(gq, axis=1)
                 * per_sample_gradients(gn).norms().max() / gn.n_samples)
    return InfluenceResult(scores, inverse.damping, inverse.route, bound)


@dataclasses.dataclass
class SelfInfluenceResult:
    """``values[i] = ∇ℓ_iᵀ (G + λI)⁻¹ ∇ℓ_i / n``; ``error_bound[i]`` bounds its error
    (0 on the exact routes; ``‖∇ℓ_i‖²·E/(nλ²)`` on the compressed one, ``E`` the
    compression's estimated ``‖G − H‖₂``)."""

    values: Array
    damping: float
    route: str
    error_bound: Array


def self_influence(gn: GaussNewton, damping: float, route: str = "auto", tol: float = 1e-6,
                   seed: int = 0) -> SelfInfluenceResult:
    """Self-influence of every training point through one factorization of ``G + λI``.

    ``route``: ``"dual"`` or ``"primal"`` (exact), ``"compressed"`` (:func:`dgnh.compress`
    to ``tol``, then its factorization) or ``"auto"`` (the exact route on the smaller side
    when it fits the memory budget, else compressed).

    Examples
    --------
    >>> import numpy as np, dgnh
    >>> rng = np.random.default_rng(0)
    >>> net = dgnh.MLP([rng.normal(size=(4, 3)), rng.normal(size=(2, 4))],
    ...                [np.zeros(4), np.zeros(2)], ["tanh", "identity"])
    >>> gn = dgnh.GaussNewton(net, rng.normal(size=(30, 3)), rng.normal(size=(30, 2)))
    >>> res = self_influence(gn, damping=0.1)
    >>> res.values.shape, bool(np.all(res.values >= 0))
    ((30,), True)
    """
    inverse = inverse_route(gn, damping, route, tol=tol,
                            allowed=("auto", "dual", "primal", "compressed"), seed=seed)
    values, norms2 = np.empty(gn.n_samples), np.empty(gn.n_samples)
    for a, b, g in per_sample_gradients(gn).chunks():
        values[a:b] = np.einsum("ij,ji->i", g, inverse.solve(g.T)) / gn.n_samples
        norms2[a:b] = np.einsum("ij,ij->i", g, g)
    return SelfInfluenceResult(values, inverse.damping, inverse.route,
                               norms2 * inverse.error / gn.n_samples)
