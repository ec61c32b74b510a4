"""Laplace evidence and GLM predictive of a trained MLP (laplace-torch's ``full`` structure).

Conventions (those of laplace-torch, ``hessian_structure="full"``): with ``n``
training points and the mean loss ``L(w)``, the log-likelihood is ``−n·L(w)`` for
``cross_entropy`` / ``binary_cross_entropy``, and ``−n·L(w)/σ² − n·d·log(σ√(2π))``
for ``mse`` (``ℓ = ½‖f − y‖²``, likelihood ``N(y | f, σ²I)``); the prior is
``N(0, P⁻¹)``; the posterior precision is ``nG/σ² + P`` (``nG`` the GNH of the sum
loss). Then

    log p(D) ≈ log-likelihood − ½ wᵀPw − ½ [log det(nG/σ² + P) − log det P].

The log-determinant comes by the route of :mod:`dgnh.analyses.posterior` (``"dual"``
and ``"primal"`` exact, on the ``n·d`` or the ``N`` side; ``"compressed"`` certified;
``"slq"`` with a 95% interval), for a scalar or grouped prior alike, recorded in the
result with its ``error_bound`` on the log marginal likelihood.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import scipy.optimize
from scipy.special import expit, softmax

from ..compress import compress
from ..config import memory_budget
from ..dense import Dense
from ..gauss_newton import GaussNewton
from ..lowrank import LowRank
from ..spectral import spectral_density
from ..validation import check_choice, check_fraction, check_int, check_number
from .posterior import (
    LAPLACE_ROUTES,
    DualGrams,
    DualSpectrum,
    Factorized,
    GroupedSLQ,
    Posterior,
    Spectrum,
    cg_solver,
    group_grams,
    prior_groups,
)
from .samples import check_gn, choose_route, query_gn

Array = np.ndarray
COMPRESS_FORMS = ("lowrank", "dense", "hmatrix", "hybrid", "auto")
LOG_BOUNDS = (np.log(1e-8), np.log(1e8))  # of the prior precision and the noise scale σ


@dataclasses.dataclass
class LaplaceResult:
    """The Laplace approximation at a prior precision (and noise scale σ for ``mse``).

    Attributes
    ----------
    log_marginal_likelihood : the evidence estimate.
    prior_precision : float (scalar prior) or array (one value per group).
    sigma : noise standard deviation (1.0 for classification).
    log_likelihood, scatter, log_det_ratio : the terms: ``log_likelihood −
        ½(scatter + log_det_ratio)`` with ``scatter = wᵀPw`` and ``log_det_ratio =
        log det(nG/σ² + P) − log det P``.
    route : ``"dual"``, ``"primal"`` (both exact), ``"compressed"`` or ``"slq"``.
    error_bound : bound on ``|log_marginal_likelihood − exact|`` (0 for the exact routes
        up to rounding; for ``"compressed"`` the certified one-sided trace bound of a low
        rank, else the Weyl bound from the compression's ``‖G − H‖₂``; the half-width of
        the 95% confidence interval for ``"slq"``).
    optimized : whether the prior (and σ) maximise the evidence.
    loss, n_samples, n_params : of the GaussNewton.
    """

    log_marginal_likelihood: float
    prior_precision: float | Array
    sigma: float
    log_likelihood: float
    scatter: float
    log_det_ratio: float
    route: str
    error_bound: float
    optimized: bool
    loss: str
    n_samples: int
    n_params: int
    posterior: Posterior | None = dataclasses.field(default=None, repr=False)


def compressed_logdet(gn: GaussNewton, slices, group, method: str, tol: float, seed: int):
    """The log-determinant evaluator of ``route="compressed"`` (see :mod:`.posterior`)."""
    n, grouped = gn.n_samples, len(slices) > 1
    if grouped and method not in ("lowrank", "dense"):
        raise ValueError(f"route='compressed' with a per-layer prior needs a low rank or dense "
                         f"form, not method='{method}': use method='lowrank' or 'dense', or "
                         "route='slq', 'dual' or 'primal'")
    op = compress(gn, method=method, tol=tol, seed=seed, progress=False)
    if not getattr(op, "is_hss", True):
        raise ValueError("route='compressed' needs a form factorized exactly (an H-matrix "
                         "without near field, budget=0); use route='slq' otherwise")
    gaps, op_error = None, n * op.report["error_estimate"] * op.report["norm_estimate"]
    if isinstance(op, LowRank) and op.report["parameters"].get("eps") is None:
        gap = gn.diagonal() - np.einsum("ij,ij->i", op.U, op.U)  # H ≼ G: one-sided
        gaps, op_error = n * np.maximum([gap[sl].sum() for sl in slices], 0.0), 0.0
    fac = Factorized(op, slices, group, n, gaps, op_error)
    return fac if grouped or not fac.whitens else fac.spectrum()


class _Evidence:
    """The evidence as a function of ``t = log p`` (per group) and ``s = log σ``."""

    def __init__(self, gn: GaussNewton, prior_precision, route, method, tol, n_vectors,
                 n_steps, seed):
        self.gn = gn
        self.values, self.group, self.slices = prior_groups(gn.model, prior_precision)
        k = len(self.values)
        route = choose_route(gn, route, LAPLACE_ROUTES, dual_copies=3 + (k if k > 1 else 0))
        self.route, self.n, self.d = route, gn.n_samples, gn.model.n_outputs
        w = gn.model.parameters()
        self.W = np.array([float(w[s] @ w[s]) for s in self.slices])
        self.S = gn.loss() * self.n
        self.regression = gn.loss_name == "mse"
        self.exact = None  # the evaluator that also solves, on an exact route
        if route == "dual":
            self.exact = DualSpectrum(gn) if k == 1 else DualGrams(group_grams(gn, self.slices))
            self.logdet = self.exact
        elif route == "primal":
            G = Dense(gn.dense(max_bytes=memory_budget(gn.memory_budget)))
            self.exact = Factorized(G, self.slices, self.group, self.n)
            self.logdet = self.exact.spectrum() if k == 1 else self.exact
        elif route == "compressed":
            self.logdet = compressed_logdet(gn, self.slices, self.group, method, tol, seed)
        elif k == 1:
            sd = spectral_density(gn, n_vectors=n_vectors, n_steps=min(n_steps, gn.n_params),
                                  seed=seed)
            self.logdet = Spectrum(self.n * np.maximum(sd.nodes, 0.0), gn.n_params * sd.weights)
        else:
            self.logdet = GroupedSLQ(gn, self.slices, self.group, n_vectors, n_steps, seed)
        self._last = None

    def loglik(self, s: float) -> tuple[float, float]:
        """The log-likelihood and its derivative in ``s = log σ``."""
        if not self.regression:
            return -self.S, 0.0
        nd = self.n * self.d
        return (-self.S * np.exp(-2 * s) - nd * (s + 0.5 * np.log(2 * np.pi)),
                2 * self.S * np.exp(-2 * s) - nd)

    def evaluate(self, t, s: float) -> tuple[float, Array, float]:
        """``(log det M, per, error)`` at ``(t, s)``, the last one kept."""
        key = (tuple(np.atleast_1d(t)), float(s))
        if self._last is None or self._last[0] != key:
            self._last = key, self.logdet.evaluate(np.array(key[0]), key[1])
        return self._last[1]

    def value(self, t, s: float) -> tuple[float, Array, float]:
        """The evidence, its gradient in ``t`` (per group) and its derivative in ``s``.

        ``−½ ∂ log det M/∂s = Σ_g per_g``: ``log det M`` depends on ``σ`` through
        ``p_g σ²`` only.
        """
        t = np.atleast_1d(np.asarray(t, dtype=np.float64))
        ll, dll = self.loglik(s)
        p = np.exp(t)
        logdet, per, _ = self.evaluate(t, s)
        value = ll - 0.5 * float(p @ self.W) - 0.5 * logdet
        return value, -0.5 * p * self.W + 0.5 * per, dll + float(np.sum(per))

    def result(self, t, s: float, optimized: bool) -> LaplaceResult:
        t = np.atleast_1d(np.asarray(t, dtype=np.float64))
        value = self.value(t, s)[0]
        error = 0.5 * self.evaluate(t, s)[2]
        ll = self.loglik(s)[0]
        scatter = float(np.exp(t) @ self.W)
        p, sigma = np.exp(t), float(np.exp(s))
        if self.route == "primal":
            solver = self.exact.solver(t, s)
        elif self.route == "dual":
            solver = self.exact.solver(p, self.group, sigma, self.gn)
        else:
            solver = cg_solver(self.gn, p, self.group, sigma, rtol=1e-10)
        posterior = Posterior(self.gn, p, self.group, sigma, self.route if self.exact else "cg",
                              solver)
        return LaplaceResult(float(value), float(p[0]) if len(p) == 1 else p, sigma,
                             float(ll), scatter, float(2 * (ll - value) - scatter), self.route,
                             error, optimized, self.gn.loss_name, self.n, self.gn.n_params,
                             posterior)


def _check_sigma(gn, sigma) -> float:
    sigma = check_number(sigma, "sigma", low=0, low_open=True)
    if gn.loss_name != "mse" and sigma != 1.0:
        raise ValueError(f"sigma applies to the mse loss (regression), not {gn.loss_name}")
    return sigma


def _evidence(gn, prior_precision, route, method, tol, n_vectors, n_steps, seed) -> _Evidence:
    """The validated parameters' :class:`_Evidence`."""
    return _Evidence(gn, prior_precision, route, check_choice(method, "method", COMPRESS_FORMS),
                     check_fraction(tol, "tol"), check_int(n_vectors, "n_vectors", minimum=2),
                     check_int(n_steps, "n_steps", minimum=1), check_int(seed, "seed", minimum=0))


def log_marginal_likelihood(gn: GaussNewton, prior_precision=1.0, sigma: float = 1.0,
                            route: str = "auto", method: str = "lowrank", tol: float = 1e-6,
                            n_vectors: int = 32, n_steps: int = 60,
                            seed: int = 0) -> LaplaceResult:
    """The Laplace log marginal likelihood of ``gn``'s model and data (see module doc).

    Parameters
    ----------
    gn : GaussNewton at the trained weights (the MAP).
    prior_precision : positive scalar, one value per layer, or one per weight and bias
        tensor (laplace-torch's layerwise prior); every route takes either.
    sigma : noise standard deviation of the ``mse`` likelihood (1 for classification).
    route : ``"auto"`` (the exact route on the smaller side that fits ``gn.memory_budget``:
        ``"dual"`` (``m = n·d`` rows) when ``m ≤ N``, else ``"primal"`` (``N × N``); else
        ``"compressed"``), ``"dual"``, ``"primal"``, ``"compressed"`` or ``"slq"``.
    method, tol : the form and relative tolerance :func:`dgnh.compress` builds for
        ``route="compressed"`` (``"lowrank"``: certified one-sided, any prior; ``"dense"``
        any prior; ``"hmatrix"``, ``"hybrid"``, ``"auto"``: a scalar prior).
    n_vectors, n_steps, seed : of stochastic Lanczos quadrature (and the compression seed).

    Examples
    --------
    >>> import numpy as np, dgnh
    >>> rng = np.random.default_rng(0)
    >>> net = dgnh.MLP([rng.normal(size=(4, 3)), rng.normal(size=(2, 4))],
    ...                [np.zeros(4), np.zeros(2)], ["tanh", "identity"])
    >>> gn = dgnh.GaussNewton(net, rng.normal(size=(30, 3)), rng.normal(size=(30, 2)))
    >>> res = log_marginal_likelihood(gn, prior_precision=2.0, sigma=0.5)
    >>> res.route, res.error_bound
    ('primal', 0.0)
    >>> A = 30 * gn.dense() / 0.25 + 2.0 * np.eye(gn.n_params)
    >>> bool(np.isclose(res.log_det_ratio, np.linalg.slogdet(A)[1] - 26 * np.log(2.0)))
    True
    """
    gn = check_gn(gn)
    sigma = _check_sigma(gn, sigma)
    ev = _evidence(gn, prior_precision, route, method, tol, n_vectors, n_steps, seed)
    return ev.result(np.log(ev.values), np.log(sigma), optimized=False)


def _root(f, lo: float, hi: float) -> float:
    """The root of a decreasing ``f`` on ``[lo, hi]``, or the bound it does not cross."""
    f_lo, f_hi = f(lo), f(hi)
    if f_lo <= 0:
        return lo
    if f_hi >= 0:
        return hi
    return scipy.optimize.brentq(f, lo, hi, xtol=1e-14, rtol=1e-15, maxiter=500)


def optimize_prior_precision(gn: GaussNewton, prior_precision=1.0, sigma: float = 1.0,
                             optimize_sigma: bool | None = None, route: str = "auto",
                             method: str = "lowrank", tol: float = 1e-6, n_vectors: int = 32,
                             n_steps: int = 60, seed: int = 0) -> LaplaceResult:
    """The prior precision (and, for ``mse``, σ) maximising the Laplace evidence.

    ``prior_precision`` gives the structure (a scalar, per layer, per tensor) and the
    start; the search runs on ``log p`` and ``log σ`` within ``[1e-8, 1e8]``. A scalar
    prior takes one dimensional root finding (:func:`scipy.optimize.brentq`) of the
    evidence's derivative, which is monotone in ``log p`` (and, nested, in ``log σ``),
    from the spectrum of ``nG`` (all prior values at the cost of one); a grouped prior
    takes L-BFGS-B with the route's gradient (exact on ``"dual"``/``"primal"``, of the
    compressed form on ``"compressed"``, the estimate with fixed probes on ``"slq"``).
    ``optimize_sigma``
    defaults to True for ``mse``. Other parameters as :func:`log_marginal_likelihood`.

    Examples
    --------
    >>> import numpy as np, dgnh
    >>> rng = np.random.default_rng(0)
    >>> net = dgnh.MLP([rng.normal(size=(4, 3)), rng.normal(size=(2, 4))],
    ...                [np.zeros(4), np.zeros(2)], ["tanh", "identity"])
    >>> gn = dgnh.GaussNewton(net, rng.normal(size=(30, 3)), rng.normal(size=(30, 2)))
    >>> best = optimize_prior_precision(gn)
    >>> near = log_marginal_likelihood(gn, best.prior_precision * 1.01, best.sigma)
    >>> bool(best.log_marginal_likelihood > near.log_marginal_likelihood)
    True
    """
    gn = check_gn(gn)
    sigma = _check_sigma(gn, sigma)
    if optimize_sigma is None:
        optimize_sigma = gn.loss_name == "mse"
    if optimize_sigma and gn.loss_name != "mse":
        raise ValueError(f"optimize_sigma applies to the mse loss, not {gn.loss_name}")
    ev = _evidence(gn, prior_precision, route, method, tol, n_vectors, n_steps, seed)
    lo, hi = LOG_BOUNDS

    def best_s(t):
        if not optimize_sigma:
            return np.log(sigma)
        return _root(lambda s: ev.value(t, s)[2], lo, hi)

    if len(ev.values) == 1:
        t = _root(lambda t: ev.value(t, best_s(t))[1][0], lo, hi)
        return ev.result(t, best_s(t), optimized=True)
    k = len(ev.values)

    def negative(x):
        s = x[k] if optimize_sigma else np.log(sigma)
        value, dt, ds = ev.value(x[:k], s)
        return -value, -np.r_[dt, ds if optimize_sigma else []]

    x0 = np.r_[np.log(ev.values), [np.log(sigma)] if optimize_sigma else []]
    opt = scipy.optimize.minimize(negative, x0, jac=True, method="L-BFGS-B",
                                  bounds=[(lo, hi)] * len(x0),
                                  options={"ftol": 1e-15, "gtol": 1e-10, "maxiter": 1000})
    s = opt.x[k] if optimize_sigma else np.log(sigma)
    return ev.result(opt.x[:k], s, optimized=True)


@dataclasses.dataclass
class Predictive:
    """The GLM predictive at new inputs.

    Attributes
    ----------
    mean : ``f(x*)``, shape ``(n*, d)``.
    covariance : ``J_* (nG/σ² + P)⁻¹ J_*ᵀ`` per point, ``(n*, d, d)`` (of ``f``).
    probabilities : classification: probit or Monte Carlo class probabilities.
    variance : regression: ``diag(covariance) + σ²``, ``(n*, d)``.
    link, route : the link approximation (``"probit"``, ``"mc"`` or ``None``) and the
        solve route (``"dual"`` or ``"primal"`` exact, ``"cg"`` to relative residual
        ``1e-10``).
    """

    mean: Array
    covariance: Array
    probabilities: Array | None
    variance: Array | None
    link: str | None
    route: str


def glm_predictive(result: LaplaceResult, gn: GaussNewton, X_new, link: str = "probit",
                   n_samples: int = 1000, seed: int = 0) -> Predictive:
    """The linearised (GLM) predictive of a Laplace posterior at the inputs ``X_new``.

    ``J_*`` is the output Jacobian at ``X_new`` (from a GaussNewton on the new inputs);
    the covariance ``J_* (nG/σ² + P)⁻¹ J_*ᵀ`` comes from one solve per output row
    (Woodbury through the dual matrix, Cholesky of the primal one, or CG). Classification: ``link="probit"``
    (``softmax(f/√(1 + π/8·diag Σ))``, as laplace-torch; the sigmoid for
    binary cross entropy) or ``"mc"`` (``n_samples`` draws of ``f``); regression adds σ².

    Examples
    --------
    >>> import numpy as np, dgnh
    >>> rng = np.random.default_rng(0)
    >>> net = dgnh.MLP([rng.normal(size=(4, 3)), rng.normal(size=(2, 4))],
    ...                [np.zeros(4), np.zeros(2)], ["tanh", "identity"])
    >>> gn = dgnh.GaussNewton(net, rng.normal(size=(30, 3)), rng.normal(size=(30, 2)))
    >>> pred = glm_predictive(log_marginal_likelihood(gn), gn, rng.normal(size=(5, 3)))
    >>> pred.covariance.shape, bool(np.all(pred.variance > 1.0))
    ((5, 2, 2), True)
    """
    if not isinstance(result, LaplaceResult) or result.posterior is None:
        raise TypeError("result must be a LaplaceResult from log_marginal_likelihood or "
                        "optimize_prior_precision")
    gn = check_gn(gn)
    if result.posterior.gn is not gn:
        raise ValueError("gn must be the GaussNewton the LaplaceResult was computed on")
    link = check_choice(link, "link", ("probit", "mc"))
    n_samples = check_int(n_samples, "n_samples", minimum=1)
    star = query_gn(gn, X_new, what="X_new")
    d = gn.model.n_outputs
    n_star = star.n_samples
    mean = gn.model.forward(X_new)
    cov = np.empty((n_star, d, d))
    step = max(1, 256 // d)
    with star:
        for a in range(0, n_star, step):
            b = min(a + step, n_star)
            E = np.zeros((n_star * d, (b - a) * d))
            E[a * d:b * d] = np.eye((b - a) * d)
            B = star.jacobian_rmatvec(E).astype(np.float64)  # J_*ᵀ columns of points a:b
            S = (B.T @ result.posterior.solve(B)).reshape(b - a, d, b - a, d)
            cov[a:b] = S[np.arange(b - a), :, np.arange(b - a), :]
    if gn.loss_name == "mse":
        var = np.diagonal(cov, axis1=1, axis2=2) + result.sigma**2
        return Predictive(mean, cov, None, var, None, result.posterior.route)
    squash = ((lambda f: softmax(f, axis=-1)) if gn.loss_name == "cross_entropy" else expit)
    if link == "probit":
        kappa = 1 / np.sqrt(1 + np.pi / 8 * np.diagonal(cov, axis1=1, axis2=2))
        probs = squash(kappa * mean)
    else:
        rng = np.random.default_rng(seed)
        vals, vecs = np.linalg.eigh(cov)
        root = vecs * np.sqrt(np.maximum(vals, 0))[:, None, :]
        draws = mean + np.einsum("ioj,sij->sio", root, rng.standard_normal((n_samples, n_star, d)))
        probs = squash(draws).mean(axis=0)
    return Predictive(mean, cov, probs, None, link, result.posterior.route)
