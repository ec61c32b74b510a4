"""The Laplace posterior precision ``nG/σ² + P`` of a GaussNewton: priors, log-determinants, solves.

Conventions (as laplace-torch's ``FullLaplace``): the GNH of the *sum* loss is
``nG = ĴᵀĴ`` (``Ĵ = RJ``, ``m = n·d`` rows); the likelihood is ``exp(−Σ_i ℓ_i)``
for the classification losses and ``N(y | f, σ²I)`` for ``mse``, whose GNH is
then ``nG/σ²``; the prior is ``N(0, P⁻¹)`` with ``P = diag(D)`` constant on groups
of parameters (a scalar, per layer or per tensor). With the whitened GNH
``B = P^{-1/2}(nG/σ²)P^{-1/2}`` (:class:`Whitened`) and ``M = I_m + ĴP⁻¹Ĵᵀ/σ²``,

    log det(nG/σ² + P) − log det P = log det(I_N + B) = log det M,

which every route evaluates, with ``per_g = −∂/∂ log p_g`` of it (the evidence's gradient):

* ``"dual"`` — exact, on the ``m × m`` side: the eigenvalues of ``ĴĴᵀ`` (scalar
  prior) or the Cholesky factor of ``M`` from per-group dual Grams (grouped prior);
* ``"primal"`` — exact, on the ``N × N`` side: the eigenvalues of the dense ``nG``
  (scalar prior) or the Cholesky factor of ``I + B`` (grouped prior);
* ``"compressed"`` — the form :func:`dgnh.compress` returns: a low rank ``H = UUᵀ ≼ G``
  (any prior; certified one-sided by ``0 ≤ log det M − log det M_H ≤ Σ_g n·tr_g(G − H)/(p_gσ²)``),
  a dense form (any prior), an H-matrix or hybrid (scalar prior, through ``factorize(λ)``
  with ``λ = pσ²/n``); the last three certified by ``N·x/(1 − x)`` with ``x = n‖G − H‖₂/(min p·σ²)``
  (Weyl), ``‖G − H‖₂`` the compression's estimate;
* ``"slq"`` — stochastic Lanczos quadrature, with a 95% confidence interval from
  the spread over probes: on ``nG`` once for a scalar prior, on ``B`` with probes
  restricted to each group for a grouped prior.
"""

from __future__ import annotations

import itertools

import numpy as np
import scipy.linalg

from ..dense import Dense, DenseCholesky
from ..gauss_newton import GaussNewton
from ..lowrank import LowRank
from ..operator import Operator
from ..shard_factors import ShardFactors
from ..solve import cg
from ..spectral import lanczos
from ..validation import check_real_array

Array = np.ndarray
Z95 = 1.959963984540054
LAPLACE_ROUTES = ("auto", "dual", "primal", "compressed", "slq")


def prior_groups(model, precision) -> tuple[Array, Array, list[slice]]:
    """The prior precision as values per group, the group of each parameter, the groups.

    ``precision`` is a positive scalar (one group), one value per layer (weights
    and bias of a layer share it) or one value per parameter tensor, weights and
    biases apart in layer order (laplace-torch's ``"layerwise"``).

    Examples
    --------
    >>> import numpy as np, dgnh
    >>> net = dgnh.MLP([np.ones((2, 3)), np.ones((1, 2))], [np.zeros(2), None], ["tanh"] * 2)
    >>> values, group, _ = prior_groups(net, [1.0, 2.0, 3.0])
    >>> group.tolist()
    [0, 0, 0, 0, 0, 0, 1, 1, 2, 2]
    """
    p = check_real_array(precision, "prior_precision", ndim=(0, 1)).astype(np.float64)
    if np.any(p <= 0):
        raise ValueError(f"prior_precision must be positive, got {p.min()}")
    offsets = model.layer_offsets
    layers = [slice(int(a), int(b)) for a, b in itertools.pairwise(offsets)]
    tensors = []
    for l, (W, b) in enumerate(zip(model.weights, model.biases)):
        o = int(offsets[l])
        tensors.append(slice(o, o + W.size))
        if b is not None:
            tensors.append(slice(o + W.size, int(offsets[l + 1])))
    if p.ndim == 0 or p.size == 1:
        slices = [slice(0, model.n_params)]
    elif p.size == len(layers):
        slices = layers
    elif p.size == len(tensors):
        slices = tensors
    else:
        raise ValueError(f"prior_precision must be a scalar, {len(layers)} values (one per "
                         f"layer) or {len(tensors)} (one per weight and bias tensor), "
                         f"got {p.size}")
    group = np.empty(model.n_params, dtype=np.int64)
    for g, s in enumerate(slices):
        group[s] = g
    return p.reshape(-1), group, slices


def group_grams(gn: GaussNewton, slices: list[slice]) -> list[Array]:
    """``Ĵ_g Ĵ_gᵀ`` (``m × m``) for each group of parameter slices (layers or tensors),
    from the shards' compact dual factors (:meth:`ShardFactors.dual_factors`)."""
    factors = gn.backend.map(ShardFactors.dual_factors)
    n, d, model = gn.n_samples, gn.model.n_outputs, gn.model
    grams = [np.zeros((n * d, n * d)) for _ in slices]
    for l in range(model.n_layers):
        C = np.vstack([f[0][l] for f in factors])
        X = np.hstack([f[1][l] for f in factors])
        CC = (C @ C.T).reshape(n, d, n, d)
        o, d_in = int(model.layer_offsets[l]), model.layer_sizes[l]
        w_end = o + model.weights[l].size
        for g, s in enumerate(slices):
            rows = []  # the rows of X (inputs, bias) whose parameters lie in s
            if s.start <= o < s.stop:
                rows += list(range(d_in))
            if X.shape[0] > d_in and s.start <= w_end < s.stop:
                rows.append(d_in)
            if rows:
                grams[g] += (CC * (X[rows].T @ X[rows])[:, None, :, None]).reshape(n * d, -1)
    return grams


def whitening(group: Array, n: int, t: Array, s: float) -> Array:
    """The scale ``√(n/(p_g σ²))`` per parameter of the whitened GNH ``B`` at ``t = log p``,
    ``s = log σ``."""
    return np.sqrt(n * np.exp(-np.asarray(t)[group] - 2 * s))


class Whitened(Operator):
    """``diag(scale)·op·diag(scale)``: with ``op = G`` and ``scale = √(n/(Dσ²))``, the
    whitened GNH ``B = P^{-1/2}(nG/σ²)P^{-1/2}``.

    Examples
    --------
    >>> import numpy as np
    >>> from dgnh.dense import Dense
    >>> B = Whitened(Dense(np.eye(2)), np.array([1.0, 2.0]))
    >>> (B @ np.ones(2)).tolist(), B.diagonal().tolist()
    ([1.0, 4.0], [1.0, 4.0])
    """

    def __init__(self, op, scale: Array):
        self.op, self.scale = op, np.asarray(scale, dtype=np.float64)
        self.shape = op.shape

    def _matmat(self, V: Array) -> Array:
        s = self.scale[:, None]
        return s * np.asarray(self.op @ (s * V), dtype=np.float64)

    def diagonal(self) -> Array:
        return self.scale**2 * np.asarray(self.op.diagonal(), dtype=np.float64)


def weyl_bound(n_params: int, x: float) -> float:
    """``N·x/(1 − x)``: bound on ``|log det(I + B) − log det(I + B̃)|`` when ``‖B − B̃‖₂ ≤ x``
    and ``B ≽ 0`` (each eigenvalue term moves by at most ``x/(1 − x)``); ``inf`` for ``x ≥ 1``."""
    if x <= 0:
        return 0.0
    return n_params * x / (1 - x) if x < 1 else float("inf")


class Spectrum:
    """``log det M`` of a scalar prior from eigenvalues ``e`` of ``nG`` with counts ``c``.

    Each row of ``e``/``c`` is one estimate (one per SLQ probe; a single row
    when exact); the value is their mean. ``trace_gap`` (``n·tr(G − H)`` of a low
    rank ``H ≼ G``) and ``op_error`` (``n‖G − H‖₂`` of another form) give the bound.
    """

    def __init__(self, e: Array, c: Array, trace_gap: float = 0.0, op_error: float = 0.0):
        self.e, self.c = np.atleast_2d(e), np.atleast_2d(c)
        self.trace_gap, self.op_error = trace_gap, op_error
        self.n_params = float(np.sum(self.c[0]))

    def evaluate(self, t: Array, s: float) -> tuple[float, Array, float]:
        """``(log det M, per, error bound)`` at ``t = [log p]``, ``s = log σ``."""
        r = float(np.exp(-t[0] - 2 * s))
        x = self.e * r
        per_probe = np.sum(self.c * np.log1p(x), axis=1)
        weight = float(np.mean(np.sum(self.c * x / (1 + x), axis=1)))
        if len(per_probe) > 1:
            error = float(Z95 * per_probe.std(ddof=1) / np.sqrt(len(per_probe)))
        else:
            error = self.trace_gap * r + weyl_bound(int(self.n_params), self.op_error * r)
        return float(np.mean(per_probe)), np.array([weight]), error


class DualGrams:
    """``log det M`` of a grouped prior from the per-group dual Grams ``K_g = Ĵ_gĴ_gᵀ``."""

    def __init__(self, grams: list[Array]):
        self.grams = grams

    def evaluate(self, t: Array, s: float) -> tuple[float, Array, float]:
        scale = np.exp(-np.asarray(t) - 2 * s)
        M = np.eye(len(self.grams[0])) + sum(K * c for K, c in zip(self.grams, scale))
        L = scipy.linalg.cho_factor(M, lower=True)
        Minv = scipy.linalg.cho_solve(L, np.eye(len(M)))
        per = np.array([np.sum(Minv * K) * c for K, c in zip(self.grams, scale)])
        return 2 * float(np.sum(np.log(np.diag(L[0])))), per, 0.0

    def solver(self, values: Array, group: Array, sigma: float, gn: GaussNewton):
        """``B ↦ (nG/σ² + D)⁻¹B`` by Woodbury through ``σ²I + ĴD⁻¹Ĵᵀ``."""
        C = sigma**2 * np.eye(len(self.grams[0])) + sum(K / v for K, v in zip(self.grams, values))
        return woodbury(gn, values[group], scipy.linalg.cho_solve(
            scipy.linalg.cho_factor(C), np.eye(len(C))))


def woodbury(gn: GaussNewton, D: Array, inner: Array):
    """``B ↦ D⁻¹B − D⁻¹Ĵᵀ·inner·ĴD⁻¹B`` (``inner = (σ²I + ĴD⁻¹Ĵᵀ)⁻¹``)."""
    def solve(B: Array) -> Array:
        DB = B / D[:, None]
        return DB - gn.jacobian_rmatvec(inner @ gn.jacobian_matvec(DB)) / D[:, None]
    return solve


class DualSpectrum(Spectrum):
    """The exact spectrum of ``nG`` from the eigendecomposition ``ĴĴᵀ = Q diag(μ) Qᵀ``."""

    def __init__(self, gn: GaussNewton):
        mu, self.Q = scipy.linalg.eigh(gn.dual_gram(), driver="evd", overwrite_a=True,
                                       check_finite=False)
        self.mu = np.maximum(mu, 0.0)
        super().__init__(self.mu, np.ones_like(self.mu))

    def solver(self, values: Array, group: Array, sigma: float, gn: GaussNewton):
        """``B ↦ (nG/σ² + pI)⁻¹B`` by Woodbury with ``(σ²I + ĴĴᵀ/p)⁻¹ = Q diag(1/(σ² + μ/p))Qᵀ``."""
        return woodbury(gn, values[group], (self.Q / (sigma**2 + self.mu / values[0])) @ self.Q.T)


class Factorized:
    """``log det M`` through factorizations of a form ``op`` of ``G`` (exact or compressed).

    A :class:`~dgnh.lowrank.LowRank` or :class:`~dgnh.dense.Dense` form is whitened
    (any prior: ``factorize(1)`` of ``B̃``); another form (H-matrix, hybrid) takes a
    scalar prior only, through ``op.factorize(λ)`` with ``λ = pσ²/n`` and
    ``I + B̃ = (H + λI)/λ``. ``gaps`` (``n·tr_g(G − H)`` per group) or ``op_error``
    (``n‖G − H‖₂``) give the error bound.
    """

    def __init__(self, op, slices: list[slice], group: Array, n: int,
                 gaps: Array | None = None, op_error: float = 0.0):
        self.op, self.slices, self.group, self.n = op, slices, group, n
        self.gaps, self.op_error = gaps, op_error
        self.whitens = isinstance(op, (LowRank, Dense))

    def factorization(self, t: Array, s: float):
        """``(F, λ)``: ``F`` factorizes ``λ(I + B̃)`` (``λ = 1`` for a whitened form)."""
        scale = whitening(self.group, self.n, t, s)
        if isinstance(self.op, LowRank):
            return LowRank(scale[:, None] * self.op.U).factorize(1.0), 1.0
        if isinstance(self.op, Dense):
            return DenseCholesky(scale[:, None] * self.op.G * scale[None, :], 1.0), 1.0
        lam = 1.0 / scale[0] ** 2
        return self.op.factorize(lam), lam

    def evaluate(self, t: Array, s: float) -> tuple[float, Array, float]:
        F, lam = self.factorization(t, s)
        N = self.op.shape[0]
        inv = lam * np.asarray(F.inverse_diagonal(), dtype=np.float64)  # diag (I + B̃)⁻¹
        per = np.array([(sl.stop - sl.start) - inv[sl].sum() for sl in self.slices])
        r = np.exp(-np.asarray(t) - 2 * s)
        error = weyl_bound(N, self.op_error * float(r.max()))
        if self.gaps is not None:
            error += float(self.gaps @ r)
        return F.logdet() - N * np.log(lam), per, error

    def spectrum(self) -> Spectrum:
        """The whole spectrum of ``nH`` (scalar priors at the cost of one)."""
        if isinstance(self.op, LowRank):
            e = self.n * np.linalg.svd(self.op.U, compute_uv=False) ** 2
        else:
            e = self.n * np.maximum(np.linalg.eigvalsh(self.op.G), 0.0)
        gap = 0.0 if self.gaps is None else float(np.sum(self.gaps))
        return Spectrum(e, np.ones_like(e), gap, self.op_error)

    def solver(self, t: Array, s: float):
        """``B ↦ (nH/σ² + D)⁻¹B = S(I + B̃)⁻¹SB`` with ``S = D^{-1/2}``."""
        F, lam = self.factorization(t, s)
        S = np.exp(-0.5 * np.asarray(t))[self.group][:, None]
        return lambda B: S * (lam * F.solve(S * B))


class GroupedSLQ:
    """Stochastic Lanczos quadrature of ``log det(I + B)`` for a grouped prior.

    ``n_vectors`` Rademacher probes per group, supported on the group (``±1/√N_g``):
    ``N_g·zᵀf(B)z`` estimates ``tr_g f(B)``, so one Lanczos run per probe on the
    whitened ``B`` gives the group's share of the log-determinant (``f = log1p``) and
    of its gradient (``per_g = tr_g(B(I + B)⁻¹)``). The same probes (``seed``) at
    every prior, so that the estimate is a smooth function of it.
    """

    def __init__(self, gn: GaussNewton, slices: list[slice], group: Array,
                 n_vectors: int, n_steps: int, seed: int):
        self.gn, self.slices, self.group = gn, slices, group
        self.k, self.n_steps = n_vectors, min(n_steps, gn.n_params)
        rng = np.random.default_rng(seed)
        self.probes = np.zeros((gn.n_params, len(slices) * n_vectors))
        for g, sl in enumerate(slices):
            size = sl.stop - sl.start
            self.probes[sl, g * n_vectors:(g + 1) * n_vectors] = rng.choice(
                [-1.0, 1.0], size=(size, n_vectors)) / np.sqrt(size)
        self.sizes = np.array([sl.stop - sl.start for sl in slices], dtype=np.float64)

    def evaluate(self, t: Array, s: float) -> tuple[float, Array, float]:
        scale = whitening(self.group, self.gn.n_samples, t, s)
        krylov = lanczos(Whitened(self.gn, scale).matvec, self.probes, self.n_steps,
                         independent=True)
        logs, fracs = np.zeros(self.probes.shape[1]), np.zeros(self.probes.shape[1])
        for p, m in enumerate(krylov.steps):
            theta, V = scipy.linalg.eigh(krylov.projection(p))
            x, w = np.maximum(theta, 0.0), V[0] ** 2
            logs[p], fracs[p] = w @ np.log1p(x), w @ (x / (1 + x))
        logs = logs.reshape(len(self.slices), self.k) * self.sizes[:, None]
        fracs = fracs.reshape(len(self.slices), self.k) * self.sizes[:, None]
        totals = logs.sum(axis=0)  # one estimate of log det M per probe index
        error = float(Z95 * totals.std(ddof=1) / np.sqrt(self.k))
        return float(totals.mean()), fracs.mean(axis=1), error


def cg_solver(gn: GaussNewton, values: Array, group: Array, sigma: float, rtol: float):
    """``B ↦ (nG/σ² + D)⁻¹B = S(I + B)⁻¹SB`` by Jacobi-preconditioned CG on the whitened
    exact products, to relative residual ``rtol``."""
    t, s = np.log(values), np.log(sigma)
    B_op = Whitened(gn, whitening(group, gn.n_samples, t, s))
    S = (1 / np.sqrt(values))[group][:, None]
    return lambda B: S * cg(B_op, S * B, 1.0, preconditioner="diagonal", rtol=rtol).x


class Posterior:
    """Solves with the posterior precision ``A = nG/σ² + D`` (``D`` the diagonal prior).

    ``route``: ``"dual"`` (Woodbury through the ``m × m`` dual, exact), ``"primal"``
    (Cholesky of the dense ``N × N`` whitened precision, exact) or ``"cg"``
    (CG on the whitened exact products, to relative residual ``rtol = 1e-10``).
    """

    def __init__(self, gn: GaussNewton, values: Array, group: Array, sigma: float,
                 route: str, solver):
        self.gn, self.values, self.sigma, self.route = gn, values, sigma, route
        self.D = values[group]
        self._solve = solver

    def solve(self, B: Array) -> Array:
        """``A⁻¹ B`` for ``B`` of shape ``(N, k)``."""
        return self._solve(np.asarray(B, dtype=np.float64))
