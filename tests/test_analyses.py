"""dgnh.analyses against dense float64 references (finite-difference Jacobians) and laplace-torch."""

from __future__ import annotations

import numpy as np
import pytest
from cases import dense_reference, fd_jacobians, random_problem
from scipy.optimize import brentq, minimize
from scipy.special import expit, log_softmax, softmax

import dgnh
from dgnh.analyses import (
    glm_predictive,
    influence,
    log_marginal_likelihood,
    obs_prune,
    obs_saliencies,
    optimize_prior_precision,
    per_sample_gradients,
    per_sample_losses,
    self_influence,
)

CASES = [  # (loss, sizes, n_samples, shard_size)
    ("cross_entropy", (3, 5, 3), 12, 5),
    ("mse", (3, 5, 2), 40, 16),
    ("binary_cross_entropy", (4, 4, 2), 9, 4),
]
IDS = [c[0] for c in CASES]


def loss_grad(loss, F, Y):
    """Independent per-sample losses and output gradients."""
    if loss == "cross_entropy":
        onehot = np.eye(F.shape[1])[Y]
        return -np.sum(log_softmax(F, axis=1) * onehot, axis=1), softmax(F, axis=1) - onehot
    if loss == "mse":
        return 0.5 * np.sum((F - Y) ** 2, axis=1), F - Y
    return np.sum(np.logaddexp(0, F) - Y * F, axis=1), expit(F) - Y


class Reference:
    """Dense float64 quantities of one problem."""

    def __init__(self, loss, sizes, n, shard_size, seed=0):
        self.loss = loss
        self.net, self.X, self.Y = random_problem(sizes, loss, n, seed=seed)
        self.gn = dgnh.GaussNewton(self.net, self.X, self.Y, loss=loss, shard_size=shard_size,
                                   client="in-process")
        self.n, self.N = n, self.net.n_params
        self.G = dense_reference(self.net, self.X, loss)
        self.J = fd_jacobians(self.net, self.X)  # (n, d, N)
        self.losses, g = loss_grad(loss, self.net.forward(self.X), self.Y)
        self.grads = np.einsum("io,ion->in", g, self.J)
        self.w = self.net.parameters()

    def log_evidence(self, D, sigma=1.0):
        A = self.n * self.G / sigma**2 + np.diag(D)
        ratio = np.linalg.slogdet(A)[1] - np.sum(np.log(D))
        S = self.losses.sum()
        ll = -S
        if self.loss == "mse":
            nd = self.Y.size
            ll = -S / sigma**2 - nd * np.log(sigma * np.sqrt(2 * np.pi))
        return ll - 0.5 * (self.w * D) @ self.w - 0.5 * ratio

    def inverse(self, lam):
        return np.linalg.inv(self.G + lam * np.eye(self.N))


@pytest.fixture(scope="module", params=CASES, ids=IDS)
def ref(request):
    r = Reference(*request.param)
    yield r
    r.gn.close()


def rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - b)) / max(np.max(np.abs(b)), 1e-300))


# ------------------------------------------------------------------ per-sample quantities
def test_per_sample_losses_and_gradients(ref):
    assert rel(per_sample_losses(ref.gn), ref.losses) < 1e-12
    grads = per_sample_gradients(ref.gn)
    assert grads.shape == (ref.n, ref.N)
    assert rel(grads.rows(0, ref.n), ref.grads) < 1e-7
    assert rel(grads.rows(3, 8), ref.grads[3:8]) < 1e-7  # across shard boundaries
    assert rel(np.vstack([g for _, _, g in grads.chunks(2)]), ref.grads) < 1e-7
    V = np.random.default_rng(1).normal(size=(ref.N, 3))
    assert rel(grads @ V, ref.grads @ V) < 1e-7
    assert rel(grads @ V[:, 0], ref.grads @ V[:, 0]) < 1e-7
    assert rel(grads.norms(), np.linalg.norm(ref.grads, axis=1)) < 1e-7


# ---------------------------------------------------------------------------- Laplace
PRIORS = [2.0, "layer", "tensor"]


def prior_values(ref, kind):
    """(the prior argument, its dense diagonal)."""
    if kind == "layer":
        p = np.array([0.5, 3.0])
        return p, np.repeat(p, np.diff(ref.net.layer_offsets))
    if kind == "tensor":
        p = np.array([0.5, 1.5, 3.0, 0.7])
        sizes = [W.size if k == 0 else b.size for W, b in zip(ref.net.weights, ref.net.biases)
                 for k in (0, 1)]
        return p, np.repeat(p, sizes)
    return kind, np.full(ref.N, kind)


def smaller_side(ref):
    """The exact route "auto" takes: the smaller of n·d (dual) and N (primal)."""
    return "dual" if ref.gn.n_jacobian_rows <= ref.N else "primal"


@pytest.mark.parametrize("route", ["auto", "dual", "primal"])
@pytest.mark.parametrize("kind", PRIORS)
def test_log_marginal_likelihood_exact(ref, kind, route):
    prior, D = prior_values(ref, kind)
    sigma = 0.7 if ref.loss == "mse" else 1.0
    res = log_marginal_likelihood(ref.gn, prior, sigma=sigma, route=route)
    assert res.route == (smaller_side(ref) if route == "auto" else route)
    assert res.error_bound == 0.0
    assert abs(res.log_marginal_likelihood - ref.log_evidence(D, sigma)) < 1e-6 * max(
        1, abs(ref.log_evidence(D, sigma)))
    A = ref.n * ref.G / sigma**2 + np.diag(D)
    assert abs(res.log_det_ratio - (np.linalg.slogdet(A)[1] - np.log(D).sum())) < 1e-6


def test_log_marginal_likelihood_compressed_within_bound(ref):
    res = log_marginal_likelihood(ref.gn, 0.5, route="compressed", tol=1e-3)
    exact = ref.log_evidence(np.full(ref.N, 0.5))
    assert res.route == "compressed"
    assert abs(res.log_marginal_likelihood - exact) <= res.error_bound + 1e-6


def test_log_marginal_likelihood_slq_confidence_over_seeds(ref):
    exact = ref.log_evidence(np.full(ref.N, 0.5))
    hits = [abs(r.log_marginal_likelihood - exact) <= r.error_bound + 1e-8
            for r in (log_marginal_likelihood(ref.gn, 0.5, route="slq", n_vectors=16,
                                              n_steps=8, seed=s) for s in range(40))]
    assert np.mean(hits) >= 0.8  # a 95% interval, from 16 probes each


def test_optimize_scalar_prior(ref):
    best = optimize_prior_precision(ref.gn, 1.0)
    assert best.optimized and best.route == smaller_side(ref)
    D = np.ones(ref.N)
    if ref.loss != "mse":  # dense derivative in log p: ½N − ½p tr((nG + pI)⁻¹) − ½p‖w‖²
        def slope(t):
            p = np.exp(t)
            inv = np.linalg.inv(ref.n * ref.G + p * np.eye(ref.N))
            return 0.5 * ref.N - 0.5 * p * np.trace(inv) - 0.5 * p * ref.w @ ref.w
        p_ref = np.exp(brentq(slope, np.log(1e-8), np.log(1e8), xtol=1e-14))
        assert abs(best.prior_precision - p_ref) < 1e-6 * p_ref
        return
    x = minimize(lambda x: -ref.log_evidence(np.exp(x[0]) * D, np.exp(x[1])),
                 [0.0, 0.0], method="Nelder-Mead",
                 options={"xatol": 1e-10, "fatol": 1e-14, "maxiter": 4000}).x
    assert abs(np.log(best.prior_precision) - x[0]) < 1e-4
    assert abs(np.log(best.sigma) - x[1]) < 1e-4
    assert best.log_marginal_likelihood >= ref.log_evidence(np.exp(x[0]) * D, np.exp(x[1])) - 1e-7


def test_optimize_per_layer_prior(ref):
    best = optimize_prior_precision(ref.gn, np.ones(2))
    assert best.prior_precision.shape == (2,)
    sizes = np.diff(ref.net.layer_offsets)
    sigma = lambda x: np.exp(x[2]) if ref.loss == "mse" else 1.0
    x0 = np.r_[np.log(best.prior_precision), [np.log(best.sigma)] if ref.loss == "mse" else []]
    x = minimize(lambda x: -ref.log_evidence(np.repeat(np.exp(x[:2]), sizes), sigma(x)), x0,
                 method="Nelder-Mead", options={"xatol": 1e-10, "fatol": 1e-14}).x
    assert np.allclose(x, x0, atol=1e-4)
    assert abs(best.log_marginal_likelihood
               - ref.log_evidence(np.repeat(best.prior_precision, sizes), best.sigma)) < 1e-6


@pytest.mark.parametrize("kind", [2.0, "layer"])
def test_glm_predictive(ref, kind):
    prior, D = prior_values(ref, kind)
    sigma = 0.7 if ref.loss == "mse" else 1.0
    res = log_marginal_likelihood(ref.gn, prior, sigma=sigma)
    X_new = np.random.default_rng(5).normal(size=(7, ref.net.n_inputs))
    pred = glm_predictive(res, ref.gn, X_new)
    Js = fd_jacobians(ref.net, X_new)
    Sigma = np.linalg.inv(ref.n * ref.G / sigma**2 + np.diag(D))
    cov = np.einsum("ion,nm,ipm->iop", Js, Sigma, Js)
    f = ref.net.forward(X_new)
    assert rel(pred.mean, f) < 1e-12 and rel(pred.covariance, cov) < 1e-6
    if ref.loss == "mse":
        assert rel(pred.variance, np.diagonal(cov, axis1=1, axis2=2) + sigma**2) < 1e-6
        return
    kappa = 1 / np.sqrt(1 + np.pi / 8 * np.diagonal(cov, axis1=1, axis2=2))
    probit = softmax(kappa * f, axis=1) if ref.loss == "cross_entropy" else expit(kappa * f)
    assert rel(pred.probabilities, probit) < 1e-6


def test_glm_predictive_cg_route_and_monte_carlo():
    r = Reference("binary_cross_entropy", (3, 6, 1), 30, 8)
    res = log_marginal_likelihood(r.gn, 1.5, route="compressed", tol=1e-4)
    X_new = np.random.default_rng(2).normal(size=(4, 3))
    pred = glm_predictive(res, r.gn, X_new, link="mc", n_samples=20000, seed=3)
    assert pred.route == "cg"
    Js = fd_jacobians(r.net, X_new)[:, 0]
    var = np.einsum("in,nm,im->i", Js, np.linalg.inv(30 * r.G + 1.5 * np.eye(r.N)), Js)
    mu = r.net.forward(X_new)[:, 0]
    assert rel(pred.covariance[:, 0, 0], var) < 1e-6
    z, wq = np.polynomial.hermite_e.hermegauss(80)  # E[sigmoid(f)], f ~ N(mu, var)
    exact = expit(mu[:, None] + np.sqrt(var)[:, None] * z) @ wq / np.sqrt(2 * np.pi)
    sd = np.sqrt(exact * (1 - exact) / 20000)
    assert np.all(np.abs(pred.probabilities[:, 0] - exact) < 5 * sd)
    r.gn.close()


# -------------------------------------------------------------------------- influence
@pytest.mark.parametrize("route", ["dual", "primal", "cg"])
def test_influence(ref, route):
    q = random_problem(ref.net.layer_sizes, ref.loss, 3, seed=7)
    Xq, Yq = q[1], q[2]
    res = influence(ref.gn, Xq, Yq, damping=0.05, route=route)
    _, gq = loss_grad(ref.loss, ref.net.forward(Xq), np.asarray(Yq))
    grad_q = np.einsum("io,ion->in", gq, fd_jacobians(ref.net, Xq))
    exact = -grad_q @ ref.inverse(0.05) @ ref.grads.T / ref.n
    assert res.route == route and res.scores.shape == (3, ref.n)
    assert rel(res.scores, exact) < 1e-6
    assert np.all(np.abs(res.scores - exact) <= res.error_bound[:, None] + 1e-6 * abs(exact).max())


@pytest.mark.parametrize("route", ["dual", "primal", "compressed"])
def test_self_influence(ref, route):
    res = self_influence(ref.gn, damping=0.05, route=route, tol=1e-6)
    exact = np.einsum("in,nm,im->i", ref.grads, ref.inverse(0.05), ref.grads) / ref.n
    assert res.route == route
    assert np.all(np.abs(res.values - exact) <= res.error_bound + 1e-6 * exact.max())
    if route != "compressed":
        assert rel(res.values, exact) < 1e-6


# ---------------------------------------------------------------------------- pruning
@pytest.mark.parametrize("route", ["dual", "primal", "compressed"])
def test_obs_saliencies(ref, route):
    res = obs_saliencies(ref.gn, damping=0.05, route=route, tol=1e-6)
    diag = np.diag(ref.inverse(0.05))
    assert np.all(np.abs(res.inverse_diagonal - diag) <= res.error_bound + 1e-6 * diag.max())
    if route != "compressed":
        assert rel(res.saliency, ref.w**2 / (2 * diag)) < 1e-6


@pytest.mark.parametrize("route", ["dual", "primal", "cg"])
def test_obs_prune(ref, route):
    S = np.array([1, 4, ref.N - 1])
    res = obs_prune(ref.gn, S, damping=0.05, route=route)
    Hinv = ref.inverse(0.05)
    coef = np.linalg.solve(Hinv[np.ix_(S, S)], ref.w[S])
    delta = -Hinv[:, S] @ coef
    assert rel(res.delta, delta) < 1e-6 and np.all(res.weights[S] == 0)
    assert abs(res.loss_increase - 0.5 * ref.w[S] @ coef) < 1e-6 * abs(ref.w[S] @ coef)
    assert np.allclose(res.model.parameters(), res.weights)


# ------------------------------------------------------------------------ bad inputs
BAD = [
    (lambda gn: log_marginal_likelihood(gn, 0.0), ValueError, "prior_precision must be positive"),
    (lambda gn: log_marginal_likelihood(gn, [1.0, -2.0]), ValueError, "prior_precision"),
    (lambda gn: log_marginal_likelihood(gn, [1.0, 2.0, 3.0]), ValueError, "one per layer"),
    (lambda gn: log_marginal_likelihood(gn, 1.0, sigma=2.0), ValueError, "sigma applies"),
    (lambda gn: log_marginal_likelihood(gn, [1.0, 1.0], route="compressed", method="hmatrix"),
     ValueError, "per-layer prior needs a low rank or dense form"),
    (lambda gn: glm_predictive(log_marginal_likelihood(gn), gn, np.ones((2, 5))), ValueError,
     "X_new must have shape"),
    (lambda gn: influence(gn, np.ones((2, 3)), [0, 1], damping=0.0), ValueError, "damping"),
    (lambda gn: influence(gn, np.ones((2, 3)), [0, 7], damping=0.1), ValueError,
     "class labels"),
    (lambda gn: obs_prune(gn, [10**6], damping=0.1), IndexError, "prune index"),
    (lambda gn: log_marginal_likelihood("gn"), TypeError, "dgnh.GaussNewton"),
]


@pytest.mark.parametrize("call, error, message", BAD)
def test_bad_inputs_one_clear_line(call, error, message):
    net, X, Y = random_problem((3, 4, 3), "cross_entropy", 10)
    with (dgnh.GaussNewton(net, X, Y, loss="cross_entropy", client="in-process") as gn,
          pytest.raises(error, match=message) as info):
        call(gn)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------ side by side: laplace-torch
TORCH_CASES = [("classification", "cross_entropy", 3), ("regression", "mse", 2)]


@pytest.mark.parametrize("likelihood, loss, d", TORCH_CASES, ids=[c[0] for c in TORCH_CASES])
def test_equal_to_laplace_torch_full(likelihood, loss, d):
    torch = pytest.importorskip("torch")
    laplace = pytest.importorskip("laplace")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(),
                                torch.nn.Linear(8, d)).double()
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 4))
    Y = rng.integers(0, d, size=40) if loss == "cross_entropy" else rng.normal(size=(40, d))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.from_numpy(X), torch.from_numpy(Y)), batch_size=16)
    # BackPACK's GGN is exact in float64 (curvlinops' differed by 2e-8 relative on this net)
    la = laplace.Laplace(model, likelihood, subset_of_weights="all", hessian_structure="full",
                         backend=laplace.curvature.BackPackGGN)
    la.fit(loader)
    gn = dgnh.GaussNewton(dgnh.MLP.from_torch(model), X, Y, loss=loss, client="in-process")
    sigma = 0.8 if loss == "mse" else 1.0

    def theirs(t, s):  # laplace-torch's evidence at log p = t, log σ = s
        kwargs = {"sigma_noise": torch.exp(s)} if loss == "mse" else {}
        return la.log_marginal_likelihood(prior_precision=torch.exp(t), **kwargs)

    for prior in (0.3, np.array([0.5, 1.5, 3.0, 0.7])):  # scalar, layerwise (per tensor)
        ours = log_marginal_likelihood(gn, prior, sigma=sigma).log_marginal_likelihood
        ref = float(theirs(torch.log(torch.as_tensor(prior, dtype=torch.float64)),
                           torch.log(torch.tensor(sigma, dtype=torch.float64))))
        assert abs(ours - ref) <= 1e-8 * abs(ref)
    best = optimize_prior_precision(gn, 1.0)
    x = torch.tensor([np.log(best.prior_precision), np.log(best.sigma)], dtype=torch.float64)
    f = (lambda x: theirs(x[0], x[1])) if loss == "mse" else (lambda x: theirs(x[0], x[1] * 0))
    grad = torch.autograd.functional.jacobian(f, x).numpy()
    hess = torch.autograd.functional.hessian(f, x).numpy()
    k = 2 if loss == "mse" else 1
    step = np.linalg.solve(hess[:k, :k], grad[:k])  # Newton step to laplace-torch's optimum
    assert np.all(np.abs(step) <= 1e-8)  # log scale: relative 1e-8 in p (and σ)
    X_new = rng.normal(size=(5, 4))
    la.prior_precision = best.prior_precision
    if loss == "mse":
        la.sigma_noise = best.sigma
    _, f_var = la._glm_predictive_distribution(torch.from_numpy(X_new))
    pred = glm_predictive(best, gn, X_new)
    assert rel(pred.covariance, f_var.numpy()) < 1e-8
    gn.close()


# ------------------------------------- exact route on the smaller side, within the budget
AUTO_CASES = [  # (n_samples, budget in dense matrices of each side, laplace, influence)
    (40, None, "primal", "primal"),  # N = 32 < n·d = 80: the primal side
    (40, ("primal", 4), "primal", "primal"),
    (40, ("primal", 2), "compressed", "cg"),  # the dual side (larger) does not fit either
    (10, None, "dual", "dual"),  # n·d = 20 < N = 32: the dual side
    (10, ("dual", 4), "dual", "dual"),
    (10, ("dual", 1), "compressed", "cg"),
]


@pytest.mark.parametrize("n, budget, laplace_route, influence_route", AUTO_CASES)
def test_auto_takes_the_exact_side_that_fits_the_budget(n, budget, laplace_route,
                                                        influence_route):
    net, X, Y = random_problem((3, 5, 2), "mse", n)
    if budget is not None:
        side = net.n_params if budget[0] == "primal" else 2 * n
        budget = budget[1] * 8 * side * side
    with dgnh.GaussNewton(net, X, Y, client="in-process", memory_budget=budget) as gn:
        res = log_marginal_likelihood(gn, 0.5, tol=1e-3)
        assert res.route == laplace_route
        assert influence(gn, X[:2], Y[:2], damping=0.1).route == influence_route
        if laplace_route == "compressed":
            for route in ("dual", "primal"):
                with pytest.raises(ValueError, match="above the memory budget") as info:
                    obs_saliencies(gn, 0.1, route=route)
                assert "\n" not in str(info.value)
        else:
            assert res.error_bound == 0.0


# ---------------------------------------------- grouped priors and forms on every route
@pytest.mark.parametrize("method", ["lowrank", "dense", "hmatrix", "hybrid"])
def test_compressed_forms_scalar_prior_within_bound(ref, method):
    exact = ref.log_evidence(np.full(ref.N, 0.5))
    res = log_marginal_likelihood(ref.gn, 0.5, route="compressed", method=method, tol=1e-4)
    assert res.route == "compressed" and np.isfinite(res.error_bound)
    assert abs(res.log_marginal_likelihood - exact) <= res.error_bound + 1e-7 * abs(exact)
    if method == "dense":
        assert abs(res.log_marginal_likelihood - exact) < 1e-8 * abs(exact)


@pytest.mark.parametrize("kind", ["layer", "tensor"])
@pytest.mark.parametrize("method", ["lowrank", "dense"])
def test_compressed_grouped_prior_within_bound(ref, method, kind):
    prior, D = prior_values(ref, kind)
    res = log_marginal_likelihood(ref.gn, prior, route="compressed", method=method, tol=1e-3)
    exact = ref.log_evidence(D)
    assert abs(res.log_marginal_likelihood - exact) <= res.error_bound + 1e-7 * abs(exact)
    if method == "lowrank":  # one-sided: the low rank H ≼ G underestimates log det
        assert res.log_marginal_likelihood >= exact - 1e-7 * abs(exact)


def test_grouped_slq_confidence_over_seeds(ref):
    prior, D = prior_values(ref, "layer")
    exact = ref.log_evidence(D)
    hits = [abs(r.log_marginal_likelihood - exact) <= r.error_bound + 1e-8
            for r in (log_marginal_likelihood(ref.gn, prior, route="slq", n_vectors=8,
                                              n_steps=8, seed=s) for s in range(40))]
    assert np.mean(hits) >= 0.8  # a 95% interval, from 8 probes per group


def test_optimize_grouped_prior_on_every_route(ref):
    exact = optimize_prior_precision(ref.gn, np.ones(2), route="dual")
    sizes = np.diff(ref.net.layer_offsets)
    best = ref.log_evidence(np.repeat(exact.prior_precision, sizes), exact.sigma)
    for route, kw, tol in (("primal", {}, 1e-6), ("compressed", {"method": "dense"}, 1e-6),
                           ("compressed", {"tol": 1e-8}, 1e-3), ("slq", {"n_steps": 40}, 2e-2)):
        res = optimize_prior_precision(ref.gn, np.ones(2), route=route, **kw)
        found = ref.log_evidence(np.repeat(res.prior_precision, sizes), res.sigma)
        assert res.route == route and res.optimized
        assert best - found <= tol * abs(best)  # the dense evidence at its optimum
        if route == "primal":
            assert np.allclose(np.log(res.prior_precision), np.log(exact.prior_precision),
                               atol=1e-5)


@pytest.mark.parametrize("route", ["primal", "slq"])
def test_glm_predictive_grouped_prior_exact_and_cg(ref, route):
    prior, D = prior_values(ref, "tensor")
    sigma = 0.7 if ref.loss == "mse" else 1.0
    res = log_marginal_likelihood(ref.gn, prior, sigma=sigma, route=route, n_steps=4)
    X_new = np.random.default_rng(6).normal(size=(3, ref.net.n_inputs))
    pred = glm_predictive(res, ref.gn, X_new)
    Js = fd_jacobians(ref.net, X_new)
    Sigma = np.linalg.inv(ref.n * ref.G / sigma**2 + np.diag(D))
    assert pred.route == ("primal" if route == "primal" else "cg")
    assert rel(pred.covariance, np.einsum("ion,nm,ipm->iop", Js, Sigma, Js)) < 1e-6


MORE_BAD = [  # (call on gn, error, message)
    (lambda gn: log_marginal_likelihood(gn, np.nan), ValueError, "prior_precision contains NaN"),
    (lambda gn: log_marginal_likelihood(gn, np.ones(5)), ValueError, "4 \\(one per weight"),
    (lambda gn: optimize_prior_precision(gn, -1.0), ValueError, "must be positive"),
    (lambda gn: influence(gn, np.ones((2, 4)), [0, 1], 0.1), ValueError,
     "X_query must have shape"),
    (lambda gn: influence(gn, np.full((2, 3), np.nan), [0, 1], 0.1), ValueError,
     "X_query contains NaN"),
    (lambda gn: glm_predictive(log_marginal_likelihood(gn), gn, np.full((2, 3), np.inf)),
     ValueError, "X_new contains NaN"),
    (lambda gn: dgnh.GaussNewton(gn.model, np.ones((4, 5)), [0, 1, 2, 0]), ValueError,
     "X must have shape"),  # a model the data does not fit
    (lambda gn: dgnh.GaussNewton(gn.model, np.ones((4, 3)), [0, 1, 5, 0],
                                 loss="cross_entropy"), ValueError, "class labels must lie"),
    (lambda gn: log_marginal_likelihood(gn, 1.0, route="compressed", method="qr"), ValueError,
     "method"),
]


@pytest.mark.parametrize("call, error, message", MORE_BAD)
def test_more_bad_inputs_one_clear_line(call, error, message):
    test_bad_inputs_one_clear_line(call, error, message)


def test_readme_section_runs():
    """The README's "From a trained PyTorch model ..." example runs as written."""
    pytest.importorskip("torch")
    import pathlib
    import re
    import subprocess
    import sys
    text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    title = "## From a trained PyTorch model to its Laplace evidence, influence and pruning\n"
    assert text.count(title) == 1
    code = re.findall(r"```python\n(.*?)```", text.split(title)[1], re.DOTALL)[0]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("primal ")  # N = 115 < n·d = 600: the exact primal side
