"""Per-sample quantities of a :class:`~dgnh.gauss_newton.GaussNewton`, and shared helpers.

Per-sample losses and gradients come from the stored per-shard factors, with no
object per sample: :func:`per_sample_losses` (``(n,)``) and
:func:`per_sample_gradients`, an ``n × N`` matrix given by products
(``grads @ V``, one forward R-op pass per shard) or in row chunks.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ..backend import shard_bounds
from ..config import memory_budget
from ..gauss_newton import GaussNewton
from ..shard_factors import ShardFactors
from ..validation import check_choice, check_int, check_number

Array = np.ndarray


def check_gn(gn) -> GaussNewton:
    """``gn`` if it is a :class:`~dgnh.gauss_newton.GaussNewton` (``TypeError`` otherwise)."""
    if not isinstance(gn, GaussNewton):
        raise TypeError(f"gn must be a dgnh.GaussNewton, got {type(gn).__name__}")
    return gn


def per_sample_losses(gn: GaussNewton) -> Array:
    """The losses ``ℓ(f(x_i), y_i)`` of every training point, shape ``(n_samples,)``.

    Examples
    --------
    >>> import numpy as np, dgnh
    >>> rng = np.random.default_rng(0)
    >>> net = dgnh.MLP([rng.normal(size=(2, 3))], [np.zeros(2)], ["tanh"])
    >>> gn = dgnh.GaussNewton(net, rng.normal(size=(5, 3)), rng.normal(size=(5, 2)))
    >>> bool(np.isclose(per_sample_losses(gn).mean(), gn.loss()))
    True
    """
    return np.concatenate(check_gn(gn).backend.map(ShardFactors.sample_losses))


class SampleGradients:
    """The ``n × N`` matrix of per-sample gradients ``∇_w ℓ(f(x_i), y_i)`` (rows).

    Never formed whole: ``grads @ V`` (``V`` of shape ``(N,)`` or ``(N, k)``) is one
    forward R-op pass per shard; :meth:`rows` and :meth:`chunks` give dense row
    blocks computed on the shards.

    Examples
    --------
    >>> import numpy as np, dgnh
    >>> rng = np.random.default_rng(0)
    >>> net = dgnh.MLP([rng.normal(size=(2, 3))], [np.zeros(2)], ["tanh"])
    >>> gn = dgnh.GaussNewton(net, rng.normal(size=(5, 3)), rng.normal(size=(5, 2)))
    >>> grads = per_sample_gradients(gn)
    >>> v = rng.normal(size=gn.n_params)
    >>> bool(np.allclose(grads @ v, grads.rows(0, 5) @ v))
    True
    """

    def __init__(self, gn: GaussNewton):
        self.gn = check_gn(gn)
        self.shape = (gn.n_samples, gn.n_params)

    def __matmul__(self, V) -> Array:
        return self.gn.sample_gradient_products(V)

    def rows(self, start: int, stop: int) -> Array:
        """Dense rows ``start:stop`` (samples), shape ``(stop − start, N)``."""
        n = self.shape[0]
        start = check_int(start, "start", minimum=0, maximum=n)
        stop = check_int(stop, "stop", minimum=start, maximum=n)
        args = [(slice(max(a, start) - a, max(min(b, stop) - a, 0)),)
                for a, b in shard_bounds(n, self.gn.shard_size)]
        blocks = self.gn.backend.map(ShardFactors.sample_gradients, args)
        return np.vstack(blocks).astype(np.float64, copy=False)

    def chunks(self, size: int | None = None) -> Iterator[tuple[int, int, Array]]:
        """``(start, stop, rows)`` blocks of at most ``size`` rows (default: a quarter of
        the memory budget per block)."""
        n, N = self.shape
        if size is None:
            size = max(1, memory_budget(self.gn.memory_budget) // (32 * N))
        size = check_int(size, "size", minimum=1)
        for a in range(0, n, size):
            yield a, min(a + size, n), self.rows(a, min(a + size, n))

    def norms(self) -> Array:
        """``‖∇ℓ_i‖`` of every sample, shape ``(n,)``."""
        return np.concatenate([np.linalg.norm(g, axis=1) for _, _, g in self.chunks()])


def per_sample_gradients(gn: GaussNewton) -> SampleGradients:
    """The per-sample gradients of ``gn``'s training points as a :class:`SampleGradients`.

    Examples
    --------
    >>> import numpy as np, dgnh
    >>> rng = np.random.default_rng(0)
    >>> net = dgnh.MLP([rng.normal(size=(2, 3))], [np.zeros(2)], ["tanh"])
    >>> gn = dgnh.GaussNewton(net, rng.normal(size=(5, 3)), rng.normal(size=(5, 2)))
    >>> g = per_sample_gradients(gn).rows(0, 5)
    >>> g.shape, bool(np.allclose(g.mean(axis=0), gn.gradient()))
    ((5, 8), True)
    """
    return SampleGradients(gn)


ROUTES = ("auto", "dual", "primal", "compressed", "cg")
EXACT_ROUTES = ("dual", "primal")


def exact_sides(gn: GaussNewton, dual_copies: int = 3, primal_copies: int = 4) -> list[tuple]:
    """``(route, side, bytes)`` of the exact routes, the smaller side first: ``"dual"``
    factorizes ``dual_copies`` dense ``m × m`` matrices (``m = n·d``), ``"primal"``
    ``primal_copies`` dense ``N × N`` ones."""
    m, N = gn.n_jacobian_rows, gn.n_params
    sides = [("dual", m, dual_copies * 8 * m * m), ("primal", N, primal_copies * 8 * N * N)]
    return sorted(sides, key=lambda side: (side[1], side[0] == "primal"))


def choose_route(gn: GaussNewton, route: str, allowed=ROUTES, dual_copies: int = 3,
                 primal_copies: int = 4) -> str:
    """``route``, with ``"auto"`` resolved: the exact route on the smaller side (``"dual"``
    when ``n·d ≤ N``, else ``"primal"``) when its matrices fit the memory budget, else the
    other exact side if it fits, else the first inexact route of ``allowed``. An exact
    ``route`` that does not fit is refused in one line.

    Examples
    --------
    >>> import numpy as np, dgnh
    >>> net = dgnh.MLP([np.ones((2, 3))], [None], ["tanh"])
    >>> gn = dgnh.GaussNewton(net, np.ones((10, 3)), np.zeros((10, 2)))
    >>> choose_route(gn, "auto")  # N = 6 < n·d = 20
    'primal'
    """
    route = check_choice(route, "route", allowed)
    if route not in ("auto",) + EXACT_ROUTES:
        return route
    budget = memory_budget(gn.memory_budget)
    sides = exact_sides(gn, dual_copies, primal_copies)
    if route == "auto":
        fitting = [r for r, _, need in sides if need <= budget and r in allowed]
        return fitting[0] if fitting else next(r for r in allowed if r not in
                                               ("auto",) + EXACT_ROUTES)
    _, side, need = next(s for s in sides if s[0] == route)
    if need > budget:
        others = "', '".join(r for r in allowed if r not in ("auto", route))
        raise ValueError(f"route='{route}' needs {need:,} bytes (dense {side} × {side} "
                         f"matrices) above the memory budget of {budget:,}: raise "
                         f"gn.memory_budget or choose route='{others}'")
    return route


def check_damping(damping) -> float:
    """A damping ``λ > 0`` (the ``λI`` added to ``G``)."""
    return check_number(damping, "damping", low=0, low_open=True,
                        hint=" (the λ of G + λI; it must be positive)")


def query_gn(gn: GaussNewton, X, Y=None, what: str = "X_query") -> GaussNewton:
    """A GaussNewton of ``gn``'s model on new rows (``Y=None``: zero targets and ``mse``
    loss, so that its ``Ĵ`` is the plain output Jacobian)."""
    X = gn.model.check_inputs(X, what)
    if Y is None:
        return GaussNewton(gn.model, X, np.zeros((len(X), gn.model.n_outputs)), loss="mse",
                           client="in-process")
    return GaussNewton(gn.model, X, Y, loss=gn.loss_name, client="in-process")
