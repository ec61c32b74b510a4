"""The Laplace posterior precision ``nG/σ² + P`` of a GaussNewton: priors, log-determinants, solves.

Conventions (as laplace-torch's ``FullLaplace``): the GNH of the *sum* loss is
``nG = ĴᵀĴ`` (``Ĵ = RJ``, ``m = n·d`` rows); the likelihood is ``exp(−Σ_i ℓ_i)``
for the classification losses and ``N(y | f, σ²I)`` for ``mse``, whose GNH is
then ``nG/σ²``; the prior is ``N(0, P⁻¹)`` with ``P`` diagonal, constant on groups
of parameters. With ``M = I_m + Ĵ P⁻¹ Ĵᵀ/σ²`` the determinant identity gives
``log det(nG/σ² + P) − log det P = log det M``, which every route evaluates:

* ``"dual"`` — exact: the eigenvalues of ``ĴĴᵀ`` (scalar prior) or the Cholesky
  factor of ``M`` assembled from per-group dual Grams (grouped prior);
* ``"compressed"`` — the Nyström low rank ``H = UUᵀ ≼ G`` of :func:`dgnh.compress`;
  the missing part is certified by ``0 ≤ log det M − log det M_H ≤ n·tr(G − H)/(pσ²)``;
* ``"slq"`` — stochastic Lanczos quadrature (:func:`dgnh.spectral_density`), with
  a 95% confidence interval from the spread over probes.
"""

from __future__ import annotations

import itertools

import numpy as np
import scipy.linalg

from ..compress import compress
from ..gauss_newton import GaussNewton
from ..shard_factors import ShardFactors
from ..solve import cg
from ..spectral import spectral_density
from ..validation import check_real_array
from .samples import dual_fits

Array = np.ndarray
Z95 = 1.959963984540054


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


class Spectrum:
    """``log det M(p, σ)`` of a scalar prior from eigenvalues ``e`` of ``nG`` with counts ``c``.

    Each row of ``e``/``c`` is one estimate (one per SLQ probe; a single row
    when exact); the value is their mean.
    """

    def __init__(self, e: Array, c: Array, route: str, trace_gap: float = 0.0):
        self.e, self.c = np.atleast_2d(e), np.atleast_2d(c)
        self.route, self.trace_gap = route, trace_gap

    def _ratio(self, t: float, s: float) -> Array:
        return self.e * np.exp(-t - 2 * s)

    def logdet(self, t: float, s: float) -> float:
        return float(np.mean(np.sum(self.c * np.log1p(self._ratio(t, s)), axis=1)))

    def weight(self, t: float, s: float) -> float:
        """``Σ c x/(1 + x)`` with ``x = e/(pσ²)``: ``−∂ log det M/∂ log p``."""
        x = self._ratio(t, s)
        return float(np.mean(np.sum(self.c * x / (1 + x), axis=1)))

    def error(self, t: float, s: float) -> float:
        """Bound on ``|log det M − estimate|``: the certified trace gap, or the 95% interval."""
        if self.e.shape[0] > 1:
            per = np.sum(self.c * np.log1p(self._ratio(t, s)), axis=1)
            return float(Z95 * per.std(ddof=1) / np.sqrt(len(per)))
        return float(self.trace_gap * np.exp(-t - 2 * s))


def spectrum(gn: GaussNewton, route: str, tol: float, n_vectors: int, n_steps: int,
             seed: int) -> tuple[Spectrum, Array | None]:
    """The spectrum of ``nG`` by ``route`` (and the dual eigenvectors for ``"dual"``)."""
    n, N = gn.n_samples, gn.n_params
    if route == "dual":
        mu, Q = np.linalg.eigh(gn.dual_gram())
        mu = np.maximum(mu, 0.0)
        return Spectrum(mu, np.ones_like(mu), route), (mu, Q)
    if route == "compressed":
        op = compress(gn, method="lowrank", tol=tol, seed=seed, progress=False)
        sv = np.linalg.svd(op.U, compute_uv=False)
        gap = max(0.0, float(np.sum(gn.diagonal())) - float(np.sum(op.U * op.U)))
        return Spectrum(n * sv**2, np.ones_like(sv), route, trace_gap=n * gap), None
    sd = spectral_density(gn, n_vectors=n_vectors, n_steps=min(n_steps, N), seed=seed)
    return Spectrum(n * np.maximum(sd.nodes, 0.0), N * sd.weights, route), None


class Posterior:
    """Solves with the posterior precision ``A = ĴᵀĴ/σ² + D`` (``D`` the diagonal prior).

    ``"dual"``: Woodbury, ``A⁻¹ = D⁻¹ − D⁻¹Ĵᵀ(σ²I + ĴD⁻¹Ĵᵀ)⁻¹ĴD⁻¹``, exact;
    ``"cg"``: CG on ``(σ²/n)(G + λI)⁻¹`` with ``λ = pσ²/n`` (scalar prior), to ``rtol``.
    """

    def __init__(self, gn: GaussNewton, values: Array, group: Array, sigma: float,
                 route: str, dual=None, grams=None, rtol: float = 1e-10):
        self.gn, self.sigma, self.route, self.rtol = gn, sigma, route, rtol
        self.D = values[group]
        if route == "dual":
            if dual is not None:  # scalar prior: C = Q diag(σ² + μ/p) Qᵀ
                mu, Q = dual
                self._inv = (Q / (sigma**2 + mu / values[0])) @ Q.T
            else:
                C = sigma**2 * np.eye(gn.n_jacobian_rows) + sum(K / v for K, v in
                                                                zip(grams, values))
                self._inv = scipy.linalg.cho_solve(scipy.linalg.cho_factor(C), np.eye(len(C)))
        elif len(values) > 1:
            raise ValueError("a per-layer prior needs the dual route (n_samples·n_outputs "
                             "squared within the memory budget)")

    def solve(self, B: Array) -> Array:
        """``A⁻¹ B`` for ``B`` of shape ``(N, k)``."""
        if self.route == "dual":
            DB = B / self.D[:, None]
            Y = self._inv @ self.gn.jacobian_matvec(DB)
            return DB - self.gn.jacobian_rmatvec(Y) / self.D[:, None]
        n, s2 = self.gn.n_samples, self.sigma**2
        res = cg(self.gn, B, self.D[0] * s2 / n, preconditioner="diagonal", rtol=self.rtol)
        return (s2 / n) * res.x


def route_fits(gn: GaussNewton, n_groups: int) -> bool:
    """Whether the dual route's matrices (``n_groups`` Grams + 3) fit the memory budget."""
    return dual_fits(gn, copies=n_groups + 3)
