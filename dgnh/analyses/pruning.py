"""Pruning by optimal brain surgeon (Hassibi & Stork) on ``H = G + λI``.

``G`` is the GNH of the mean loss, ``λ > 0`` a damping. The saliency of weight ``q``
(the increase of the quadratic model of the loss when ``w_q`` is set to 0 and the
other weights compensate) is ``w_q² / (2 [H⁻¹]_qq)``; pruning a set ``S`` moves the
weights by ``δw = −H⁻¹E_S (E_SᵀH⁻¹E_S)⁻¹ w_S`` (so ``w_S`` becomes 0) at the cost
``½ w_Sᵀ (E_SᵀH⁻¹E_S)⁻¹ w_S``.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..gauss_newton import GaussNewton
from ..model import MLP
from .influence import inverse_route
from .samples import check_gn

Array = np.ndarray


@dataclasses.dataclass
class Saliencies:
    """OBS saliencies ``w_q²/(2[H⁻¹]_qq)`` with the inverse diagonal they come from.

    ``error_bound`` bounds ``|inverse_diagonal − exact|`` entrywise: 0 on the exact
    routes, ``E/λ²`` on the compressed one (``E`` the estimated ``‖G − H‖₂``).
    """

    saliency: Array
    inverse_diagonal: Array
    damping: float
    route: str
    error_bound: float


def obs_saliencies(gn: GaussNewton, damping: float, route: str = "auto", tol: float = 1e-6,
                   seed: int = 0) -> Saliencies:
    """The OBS saliency of every weight, from the diagonal of ``(G + λI)⁻¹``.

    ``route``: ``"dual"`` (exact, ``O(m²·N)``), ``"primal"`` (exact, ``O(N³)``),
    ``"compressed"`` (:func:`dgnh.compress` to ``tol``, then the factorization's inverse
    diagonal) or ``"auto"`` (the exact route on the smaller side that fits, else compressed).

    Examples
    --------
    >>> import numpy as np, dgnh
    >>> rng = np.random.default_rng(0)
    >>> net = dgnh.MLP([rng.normal(size=(4, 3)), rng.normal(size=(2, 4))],
    ...                [np.zeros(4), np.zeros(2)], ["tanh", "identity"])
    >>> gn = dgnh.GaussNewton(net, rng.normal(size=(30, 3)), rng.normal(size=(30, 2)))
    >>> s = obs_saliencies(gn, damping=0.1)
    >>> H = gn.dense() + 0.1 * np.eye(gn.n_params)
    >>> bool(np.allclose(s.inverse_diagonal, np.diag(np.linalg.inv(H))))
    True
    """
    inverse = inverse_route(check_gn(gn), damping, route, tol=tol,
                            allowed=("auto", "dual", "primal", "compressed"), seed=seed)
    diag = np.asarray(inverse.inverse_diagonal(), dtype=np.float64)
    w = gn.model.parameters()
    return Saliencies(w**2 / (2 * diag), diag, inverse.damping, inverse.route, inverse.error)


@dataclasses.dataclass
class PruneResult:
    """The pruning of ``pruned`` with its compensating update.

    ``weights = w + delta`` (with ``weights[pruned] = 0``), ``model`` the MLP with them,
    ``loss_increase`` the quadratic model's cost ``½ w_Sᵀ (E_SᵀH⁻¹E_S)⁻¹ w_S``.
    """

    pruned: Array
    weights: Array
    delta: Array
    loss_increase: float
    model: MLP
    damping: float
    route: str


def obs_prune(gn: GaussNewton, prune, damping: float, route: str = "auto",
              rtol: float = 1e-10) -> PruneResult:
    """Prune the weights ``prune`` (indices) together, compensating the others (OBS).

    The columns ``H⁻¹E_S`` come from ``|S|`` solves (``route``: ``"dual"`` or ``"primal"``
    exact, ``"cg"`` to ``rtol``, ``"auto"`` the exact route on the smaller side when it
    fits the memory budget, else CG).

    Examples
    --------
    >>> import numpy as np, dgnh
    >>> rng = np.random.default_rng(0)
    >>> net = dgnh.MLP([rng.normal(size=(4, 3)), rng.normal(size=(2, 4))],
    ...                [np.zeros(4), np.zeros(2)], ["tanh", "identity"])
    >>> gn = dgnh.GaussNewton(net, rng.normal(size=(30, 3)), rng.normal(size=(30, 2)))
    >>> res = obs_prune(gn, [0, 5], damping=0.1)
    >>> res.weights[[0, 5]].tolist(), res.loss_increase > 0
    ([0.0, 0.0], True)
    """
    S = np.unique(gn.model.check_indices(prune, "prune index"))
    inverse = inverse_route(check_gn(gn), damping, route, rtol=rtol,
                            allowed=("auto", "dual", "primal", "cg"))
    E = np.zeros((gn.n_params, len(S)))
    E[S, np.arange(len(S))] = 1.0
    cols = np.asarray(inverse.solve(E), dtype=np.float64)  # H⁻¹ E_S
    w = gn.model.parameters()
    block = 0.5 * (cols[S] + cols[S].T)
    coef = np.linalg.solve(block, w[S])
    delta = -cols @ coef
    weights = w + delta
    weights[S] = 0.0
    return PruneResult(S, weights, delta, float(0.5 * w[S] @ coef),
                       gn.model.with_parameters(weights), inverse.damping, inverse.route)
