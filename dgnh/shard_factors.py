"""Per-shard precomputed factors and every per-shard computation (plain numpy).

A *shard* is a block of data rows. :class:`ShardFactors` holds, for its rows,
the forward activations and the backward factors of design.md §2 laid out for
fast gathers:

* ``CT[l]`` of shape ``(d_l, n_s, d)``: ``CT[l][p, i, o] = C_l,i[o, p]``;
* ``XT[l]`` of shape ``(d_{l-1} (+1), n_s)``: the layer input transposed, with a
  row of ones appended when the layer has a bias (a bias is "column d_{l-1}").

The scaled Jacobian column of parameter a = (l, p, q) is then
``Ĵ[:, a] = CT[l][p] * XT[l][q][:, None]`` and a GNH block is one GEMM.

Every method returns an *unscaled partial sum over this shard's rows*; the
driver adds the partials of all shards and divides by ``n``. A backend
(:class:`~dgnh.protocols.Backend`) calls the methods themselves, e.g.
``backend.sum(ShardFactors.gnh_matvec, (V,))``. Nothing here knows about Dask.
"""

from __future__ import annotations

import numpy as np

from .activations import get_activation
from .batching import vector_chunk
from .config import tune_allocator
from .losses import Loss
from .model import MLP
from .validation import check_float_dtype, check_int

Array = np.ndarray
GATHER_BYTES = 16 * 2**20  # size of the reused Jacobian buffers of one block chunk
GATHER_FLOPS = 250  # cost of gathering one Jacobian element into a block buffer, in GEMM
# flops (a memory-bound gather, fancy index and multiply: ~40 bytes moved per element)
ROP_MAX_VECTORS = 4  # GNH products with fewer vectors take the R-op route (faster there)


class ShardFactors:
    """Factors of one shard of data rows.

    Parameters
    ----------
    model : MLP
    X, Y : arrays
        The shard's inputs ``(n_s, d_0)`` and validated targets.
    loss : Loss
    dtype : numpy float dtype of the factors and of all computations.
    index : int
        Global shard number (seeds the sampler deterministically).
    """

    def __init__(self, model: MLP, X: Array, Y: Array, loss: Loss, dtype=np.float64,
                 index: int = 0):
        self.dtype = check_float_dtype(dtype)
        self.index = check_int(index, "index", minimum=0)
        self.loss = loss
        self.sizes = model.layer_sizes
        self.W = [W.astype(self.dtype) for W in model.weights]
        self.b = [None if b is None else b.astype(self.dtype) for b in model.biases]
        self.acts = [get_activation(a) for a in model.activations]
        self.Y = Y
        self.n = X.shape[0]
        self.offsets = model.layer_offsets
        tune_allocator()
        # forward pass
        A = [np.ascontiguousarray(X, dtype=self.dtype)]
        Z = []
        for W, b, act in zip(self.W, self.b, self.acts):
            z = A[-1] @ W.T
            if b is not None:
                z += b
            Z.append(z)
            A.append(act.f(z).astype(self.dtype, copy=False))
        self.A, self.Z = A, Z
        self.dS = [act.df(z).astype(self.dtype, copy=False) for act, z in zip(self.acts, Z)]
        self.F = A[-1]
        # backward factors C_l (n_s, d, d_l), stored transposed as (d_l, n_s, d)
        d = self.sizes[-1]
        C = loss.factor(self.F).astype(self.dtype, copy=False) * self.dS[-1][:, None, :]
        self.CT: list[Array] = [None] * len(self.W)
        for l in range(len(self.W) - 1, -1, -1):
            self.CT[l] = np.ascontiguousarray(C.transpose(2, 0, 1))
            if l:
                C = (C.reshape(-1, self.sizes[l + 1]) @ self.W[l]).reshape(
                    self.n, d, self.sizes[l]) * self.dS[l - 1][:, None, :]
        self.XT = []
        for l in range(len(self.W)):
            rows = [A[l].T]
            if self.b[l] is not None:
                rows.append(np.ones((1, self.n), dtype=self.dtype))
            self.XT.append(np.ascontiguousarray(np.vstack(rows)))
        self.S = [np.einsum("pio,pio->pi", c, c) for c in self.CT]  # ‖C_l,i[:, p]‖²

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.CT + self.XT + self.S))

    # ------------------------------------------------------------ gathers
    def gather(self, loc, rows=slice(None)) -> Array:
        """Ĵ columns for located parameters: shape ``(k, n_rows, d)``."""
        layer, p, q = loc
        n_rows = len(np.arange(self.n)[rows])
        out = np.empty((len(layer), n_rows, self.sizes[-1]), dtype=self.dtype)
        for l in np.unique(layer):
            pos = np.flatnonzero(layer == l)
            if isinstance(rows, slice):  # basic slice on the row axis: no full copy
                c, x = self.CT[l][p[pos], rows], self.XT[l][q[pos], rows]
            else:
                c, x = self.CT[l][np.ix_(p[pos], rows)], self.XT[l][np.ix_(q[pos], rows)]
            if pos.size == len(layer):
                np.multiply(c, x[:, :, None], out=out)
            else:
                out[pos] = c * x[:, :, None]
        return out

    def sq_norms(self, loc) -> Array:
        """Per-row squared norms ``‖Ĵ[(i,:), a]‖²``, shape ``(k, n_s)``."""
        layer, p, q = loc
        out = np.empty((len(layer), self.n), dtype=self.dtype)
        for l in np.unique(layer):
            pos = np.flatnonzero(layer == l)
            x = self.XT[l][q[pos]]
            out[pos] = self.S[l][p[pos]] * (x * x)
        return out

    # ------------------------------------------------------- exact entries
    def _fill(self, buf: Array, loc, ranges, rows: slice) -> Array:
        """Write Ĵ columns of layer-sorted parameters for a row slice into ``buf``."""
        layer, p, q = loc
        for l, a, b in ranges:  # fancy index + slice: copies only the gathered rows
            np.multiply(self.CT[l][p[a:b], rows], self.XT[l][q[a:b], rows][:, :, None],
                        out=buf[a:b])
        return buf

    def _flat(self, loc) -> Array:
        """Flat parameter indices of located parameters (inverse of ``MLP.locate``)."""
        layer, p, q = loc
        d_in = np.asarray(self.sizes[:-1], dtype=np.int64)[layer]
        d_out = np.asarray(self.sizes[1:], dtype=np.int64)[layer]
        return self.offsets[layer] + np.where(q < d_in, p * d_in + q, d_out * d_in + p)

    def _column_cheaper(self, k: int, m: int) -> bool:
        """True when ``G[I, J]`` with ``|I| = k`` rows and ``|J| = m`` columns costs less as
        the rows ``I`` of the whole columns ``Ĵᵀ(Ĵ[:, J])`` (``Ĵ[:, J]`` gathered, then one
        pass of ``2·n_s·N·m`` flops at about half the GEMM rate) than as a gathered block
        (``k·n_s·d`` gathered elements and ``2·k·m·n_s·d`` flops): tall blocks with
        few columns, such as the sampled columns of the tree's top nodes."""
        return 0 < m and 4 * self.n_params * m < k * self.sizes[-1] * (2 * m + GATHER_FLOPS)

    def columns(self, loc_J, budget: int | None = None) -> Array:
        """Σ_i Ĵ_iᵀ Ĵ_i[:, J] over this shard for all ``N`` rows: ``(N, |J|)``, chunked over
        columns within ``budget`` bytes."""
        d = self.sizes[-1]
        U = self.gather(loc_J).transpose(1, 2, 0).reshape(self.n * d, -1)
        return self._by_vectors(lambda Uc: self._jt_times(Uc.reshape(self.n, d, -1)), U,
                                self.n_params, self._product_bytes(), budget)

    def block(self, loc_I, loc_J) -> Array:
        """Σ_i Ĵ_i[:, I]ᵀ Ĵ_i[:, J] over this shard: one GEMM per cache-sized row chunk.

        Parameters are sorted by (layer, row, col) so that each layer's columns
        are gathered with one ``take`` into a reused buffer; the result is put
        back into the requested order. A tall block with few columns is taken
        from whole columns instead (:meth:`columns`, :meth:`_column_cheaper`).
        """
        if self._column_cheaper(len(loc_I[0]), len(loc_J[0])):
            return self.columns(loc_J)[self._flat(loc_I)]
        if self._column_cheaper(len(loc_J[0]), len(loc_I[0])):
            return self.columns(loc_I)[self._flat(loc_J)].T
        (sI, rI, oI), (sJ, rJ, oJ) = _sorted(loc_I), _sorted(loc_J)
        k, m = len(oI), len(oJ)
        same = k == m and all(np.array_equal(a, b) for a, b in zip(loc_I, loc_J))
        d = self.sizes[-1]
        step = max(1, min(self.n, GATHER_BYTES // (max(k + m, 1) * d * self.dtype.itemsize)))
        step = -(-self.n // -(-self.n // step))  # equal chunks: the buffers are allocated once
        out = np.zeros((k, m), dtype=self.dtype)
        bufI = bufJ = None
        for s in range(0, self.n, step):
            rows = slice(s, min(s + step, self.n))
            r = rows.stop - rows.start
            if bufI is None or bufI.shape[1] != r:
                bufI = np.empty((k, r, d), dtype=self.dtype)
                bufJ = bufI if same else np.empty((m, r, d), dtype=self.dtype)
            a = self._fill(bufI, sI, rI, rows).reshape(k, r * d)
            b = a if same else self._fill(bufJ, sJ, rJ, rows).reshape(m, r * d)
            out += a @ b.T
        result = np.empty_like(out)
        result[np.ix_(oI, oJ)] = out
        return result

    def diagonal(self) -> Array:
        """Σ_i diag(Ĵ_iᵀ Ĵ_i) in parameter order (one small GEMM per layer)."""
        parts = []
        for l, (S, X) in enumerate(zip(self.S, self.XT)):
            D = S @ (X * X).T  # (d_l, d_{l-1} (+1))
            d_in = self.sizes[l]
            parts.append(D[:, :d_in].ravel())
            if self.b[l] is not None:
                parts.append(D[:, d_in])
        return np.concatenate(parts)

    # ----------------------------------------------------- sampled entries
    def row_weights(self, loc_I, coef_I, loc_J, coef_J) -> Array:
        """Unnormalised sampling weights w_i = ½(Σ_a c_a‖u^a_i‖² + Σ_b c_b‖v^b_i‖²)."""
        # float64: 1/G_aa of a nearly dead unit overflows float32
        return 0.5 * (coef_I @ self.sq_norms(loc_I).astype(np.float64)
                      + coef_J @ self.sq_norms(loc_J).astype(np.float64))

    def sampled_block(self, loc_I, coef_I, loc_J, coef_J, counts, total_weight,
                      seed, groups: tuple[int, int] | None = None) -> Array:
        """Importance-sampled group sums for a block (design.md §3).

        Draws ``counts[g]`` rows of this shard for each group g with probability
        ∝ ``row_weights`` and returns ``Σ_k Ĵ_ik[:, I]ᵀ Ĵ_ik[:, J] · W / w_ik`` per
        group, shape ``(n_groups, |I|, |J|)``; the driver divides by ``n`` and the
        group size and takes the entrywise median over groups. ``groups=(g0, g1)``
        returns only those groups (the same numbers); the sampled Jacobian rows
        are gathered in chunks of ``GATHER_BYTES``.
        """
        counts = np.asarray(counts, dtype=np.int64)
        g0, g1 = (0, len(counts)) if groups is None else groups
        k, m = len(loc_I[0]), len(loc_J[0])
        out = np.zeros((g1 - g0, k, m), dtype=self.dtype)
        if counts.sum() == 0:
            return out
        w = self.row_weights(loc_I, coef_I, loc_J, coef_J)
        wsum = w.sum()
        rng = np.random.default_rng(seed)
        rows = rng.choice(self.n, size=int(counts.sum()), p=w / wsum)
        scale = (total_weight / w[rows]).astype(self.dtype)
        ends = np.cumsum(counts)
        step = max(1, GATHER_BYTES // (max(k + m, 1) * self.sizes[-1] * self.dtype.itemsize))
        for g in range(g0, g1):
            for a in range(ends[g] - counts[g], ends[g], step):
                sl = slice(a, min(a + step, ends[g]))
                A = self.gather(loc_I, rows[sl]) * scale[None, sl, None]
                out[g - g0] += A.reshape(k, -1) @ self.gather(loc_J, rows[sl]).reshape(m, -1).T
        return out

    # ----------------------------------------- loss, gradient, products
    def loss_sum(self) -> float:
        return float(np.sum(self.loss.value(self.F, self.Y), dtype=np.float64))

    def _backprop(self, delta: Array) -> list[tuple[Array, Array]]:
        """Parameter gradients from output-side deltas ``(k, n_s, d_L)`` (pre-σ_L')."""
        grads = [None] * len(self.W)
        delta = delta * self.dS[-1]
        for l in range(len(self.W) - 1, -1, -1):
            grads[l] = (_t_times(delta, self.A[l]), delta.sum(axis=1))
            if l:
                delta = _times(delta, self.W[l]) * self.dS[l - 1]
        return grads

    def _flatten(self, grads) -> Array:
        """Stack per-layer ``(k, d_l, d_in)``/``(k, d_l)`` gradients into ``(N, k)``."""
        parts = []
        for l, (gW, gb) in enumerate(grads):
            parts.append(gW.reshape(gW.shape[0], -1).T)
            if self.b[l] is not None:
                parts.append(gb.T)
        return np.concatenate(parts, axis=0)

    def gradient_sum(self) -> Array:
        """Σ_i ∂ℓ_i/∂w, shape ``(N,)``."""
        return self._flatten(self._backprop(self.loss.grad(self.F, self.Y)[None]))[:, 0]

    def _split(self, V: Array) -> list[tuple[Array, Array | None]]:
        """Per-layer directions ``dW (k, d_l, d_in)``, ``db (k, d_l)`` from ``V (N, k)``."""
        # V deserialized on a worker may be unaligned: numpy then skips BLAS and rounds
        # differently from run to run; an aligned copy keeps products bit-reproducible
        V = np.require(V, requirements="A")
        out, o = [], 0
        for W, b in zip(self.W, self.b):
            dW = V[o:o + W.size].T.reshape((-1,) + W.shape)
            o += W.size
            db = None
            if b is not None:
                db = V[o:o + b.size].T
                o += b.size
            out.append((dW.astype(self.dtype, copy=False),
                        None if db is None else db.astype(self.dtype, copy=False)))
        return out

    def _forward_tangent(self, dirs):
        """R-op forward pass: tangents of pre-activations ``Ṙz_l`` and outputs ``Ṙa_l``."""
        Rz, Ra = [], [None]
        for l, (W, (dW, db)) in enumerate(zip(self.W, dirs)):
            rz = _times_t(self.A[l], dW)
            if db is not None:
                rz += db[:, None, :]
            if Ra[-1] is not None:
                rz += _times(Ra[-1], W.T)
            Rz.append(rz)
            Ra.append(rz * self.dS[l])
        return Rz, Ra

    def gnh_matvec(self, V: Array, budget: int | None = None) -> Array:
        """Σ_i Ĵ_iᵀ Ĵ_i V for ``V`` of shape ``(N, k)``, through the stored factors.

        Per layer one GEMM with the layer inputs each way across all vectors
        (4·n_s·N·k flops in all) plus small per-sample products with ``C_l``;
        chunked over vectors so the working memory stays within ``budget``
        bytes (default :func:`dgnh.config.memory_budget`).
        """
        if V.shape[1] < ROP_MAX_VECTORS:  # streaming C_l costs more than the R-op's GEMVs
            return self._by_vectors(self._gnh_rop, V, self.n_params, self._rop_bytes(), budget)
        return self._by_vectors(lambda Vc: self._jt_times(self._j_times(Vc)), V, self.n_params,
                                self._product_bytes(), budget)

    def _gnh_rop(self, V: Array) -> Array:
        """Σ_i J_iᵀ Q_i J_i V by a forward R-op pass, the output curvature, then backprop."""
        Ra = self._forward_tangent(self._split(V))[1][-1]
        return self._flatten(self._backprop(self.loss.curvature_matvec(self.F, Ra)))

    def _rop_bytes(self) -> int:
        """Working bytes per vector of the R-op passes (tangents of every layer kept)."""
        return self.dtype.itemsize * (3 * self.n_params + 2 * self.n * sum(self.sizes[1:])
                                      + 6 * self.n * max(self.sizes[1:]))

    def _product_bytes(self) -> int:
        """Working bytes per vector of :meth:`_j_times` + :meth:`_jt_times` (input and output
        chunks, the layer's direction/gradient, per-sample tangents; temporaries twice)."""
        widest = max((d_in + 1) * d_l + self.n * d_l
                     for d_in, d_l in zip(self.sizes[:-1], self.sizes[1:]))
        return self.dtype.itemsize * (2 * self.n_params + 2 * widest + 2 * self.n * self.sizes[-1])

    @property
    def n_params(self) -> int:
        return int(self.offsets[-1])

    def _by_vectors(self, func, V: Array, n_rows: int, per_vector: int,
                    budget: int | None) -> Array:
        """``func`` on column chunks of ``V`` that each fit ``budget`` bytes, side by side."""
        k = V.shape[1]
        step = vector_chunk(k, per_vector, budget)
        if step >= k:
            return func(V)
        out = np.empty((n_rows, k), dtype=self.dtype)
        for a in range(0, k, step):
            out[:, a:a + step] = func(V[:, a:a + step])
        return out

    def _layer_params(self, l: int):
        """Row ranges of layer ``l``'s weights and bias in the flat parameter vector."""
        o, d_l, d_in = int(self.offsets[l]), self.sizes[l + 1], self.sizes[l]
        return slice(o, o + d_l * d_in), slice(o + d_l * d_in, int(self.offsets[l + 1]))

    def _j_times(self, V: Array) -> Array:
        """``Ĵ_s V`` as ``(n_s, d, k)``: ``Σ_l C_l,i (X_l,i-directions)`` per sample."""
        k = V.shape[1]
        out = np.zeros((self.n, self.sizes[-1], k), dtype=self.dtype)
        for l, (CT, XT) in enumerate(zip(self.CT, self.XT)):
            d_in, d_l = self.sizes[l], self.sizes[l + 1]
            w, b = self._layer_params(l)
            M = np.empty((XT.shape[0], d_l, k), dtype=self.dtype)  # directions (d_in(+1), d_l, k)
            M[:d_in] = V[w].reshape(d_l, d_in, k).transpose(1, 0, 2)
            if self.b[l] is not None:
                M[d_in] = V[b]
            T = (XT.T @ M.reshape(-1, d_l * k)).reshape(self.n, d_l, k)
            out += np.matmul(CT.transpose(1, 2, 0), T)  # C_l,i (d, d_l) @ T_i (d_l, k)
        return out

    def _jt_times(self, U: Array) -> Array:
        """``Ĵ_sᵀ U`` as ``(N, k)`` for ``U`` of shape ``(n_s, d, k)``."""
        k = U.shape[2]
        out = np.empty((self.n_params, k), dtype=self.dtype)
        for l, (CT, XT) in enumerate(zip(self.CT, self.XT)):
            d_in, d_l = self.sizes[l], self.sizes[l + 1]
            w, b = self._layer_params(l)
            D = np.matmul(CT.transpose(1, 0, 2), U)  # C_l,iᵀ (d_l, d) @ U_i (d, k)
            R = (XT @ D.reshape(self.n, d_l * k)).reshape(-1, d_l, k)
            out[w].reshape(d_l, d_in, k)[...] = R[:d_in].transpose(1, 0, 2)
            if self.b[l] is not None:
                out[b] = R[d_in]
        return out

    def hessian_matvec(self, V: Array, budget: int | None = None) -> Array:
        """Σ_i ∇²_w ℓ_i V (Pearlmutter's R{backprop}), ``V`` of shape ``(N, k)``, chunked
        over vectors within ``budget`` bytes."""
        return self._by_vectors(self._hessian_chunk, V, self.n_params, self._rop_bytes(), budget)

    def _hessian_chunk(self, V: Array) -> Array:
        dirs = self._split(V)
        Rz, Ra = self._forward_tangent(dirs)
        L = len(self.W)
        # base backprop deltas δ_l = ∂ℓ/∂z_l (n_s, d_l)
        delta0 = [None] * L
        delta = self.loss.grad(self.F, self.Y) * self.dS[-1]
        for l in range(L - 1, -1, -1):
            delta0[l] = delta
            if l:
                delta = (delta @ self.W[l]) * self.dS[l - 1]
        g_out = self.loss.grad(self.F, self.Y)
        # R-backward
        Rdelta = (self.loss.curvature_matvec(self.F, Ra[-1]) * self.dS[-1]
                  + g_out * self.acts[-1].d2f(self.Z[-1]) * Rz[-1])
        grads = [None] * L
        for l in range(L - 1, -1, -1):
            dW, _ = dirs[l]
            gW = _t_times(Rdelta, self.A[l])
            if Ra[l] is not None:
                gW += np.swapaxes(_t_times(Ra[l], delta0[l]), 1, 2)
            grads[l] = (gW, Rdelta.sum(axis=-2))
            if l:
                back = delta0[l] @ self.W[l]
                Rdelta = ((_times(Rdelta, self.W[l]) + _times_t(delta0[l], np.swapaxes(dW, 1, 2)))
                          * self.dS[l - 1]
                          + back * self.acts[l - 1].d2f(self.Z[l - 1]) * Rz[l - 1])
        return self._flatten(grads)

    # -------------------------------------------------- request protocol
    def sq_norm_sums(self, loc) -> Array:
        """Σ_i ‖Ĵ[(i,:), a]‖² over this shard for located parameters (float64)."""
        return self.sq_norms(loc).sum(axis=1, dtype=np.float64)

    def evaluate(self, specs) -> list[Array]:
        """Evaluate a batch of block requests in one call (one task per shard).

        ``specs`` holds ``("exact", loc_I, loc_J)`` or ``("sampled", loc_I, coef_I,
        loc_J, coef_J, counts, total_weight, seed[, groups])`` (see :func:`split_request`).
        """
        out = []
        for spec in specs:
            if spec[0] == "exact":
                out.append(self.block(spec[1], spec[2]))
            else:
                out.append(self.sampled_block(*spec[1:]))
        return out

    # ------------------------------------------- dual route (dgnh.solve)
    def jacobian_matvec(self, V: Array, budget: int | None = None) -> Array:
        """``Ĵ_s V``: this shard's rows of the scaled Jacobian ``Ĵ = RJ`` times ``V (N, k)``.

        Rows are ordered ``(i, o)`` (sample-major), shape ``(n_s·d, k)``; one GEMM per
        layer through the factors, O(n_s·N·k), chunked over vectors within ``budget``.
        """
        m = self.n * self.sizes[-1]
        return self._by_vectors(lambda Vc: self._j_times(Vc).reshape(m, -1), V, m,
                                self._product_bytes(), budget)

    def jacobian_rmatvec(self, Y: Array, budget: int | None = None) -> Array:
        """``Ĵ_sᵀ Y`` for ``Y`` of shape ``(n_s·d, k)`` (rows ``(i, o)``): shape ``(N, k)``."""
        # an aligned copy in the factors' dtype: numpy skips BLAS on unaligned arrays
        Y = np.require(Y, dtype=self.dtype, requirements="A")
        return self._by_vectors(
            lambda Yc: self._jt_times(Yc.reshape(self.n, self.sizes[-1], -1)), Y,
            self.n_params, self._product_bytes(), budget)

    def dual_factors(self) -> tuple[list[Array], list[Array]]:
        """Per layer ``C_l`` as ``(n_s·d, d_l)`` (rows ``(i, o)``) and ``XT[l]``, float64."""
        d = self.sizes[-1]
        C = [c.transpose(1, 2, 0).reshape(self.n * d, -1).astype(np.float64) for c in self.CT]
        return C, [x.astype(np.float64) for x in self.XT]

    def dual_gram(self, others) -> Array:
        """Row block ``[ĴĴᵀ]_{s,t}`` of this shard against the shards ``t`` in ``others``.

        ``others`` is a list of :meth:`dual_factors` results; the blocks are
        ``Σ_l (C_{l,s} C_{l,t}ᵀ) ∘ (X_{l-1,s}X_{l-1,t}ᵀ + 1_bias)`` side by side,
        shape ``(n_s·d, Σ_t n_t·d)``, without forming Ĵ.
        """
        d = self.sizes[-1]
        if not others:
            return np.empty((self.n * d, 0))
        C_s, X_s = self.dual_factors()
        blocks = []
        for C_t, X_t in others:
            n_t = X_t[0].shape[1]
            K = np.zeros((self.n, d, n_t, d))
            for Cs, Xs, Ct, Xt in zip(C_s, X_s, C_t, X_t):
                K += (Cs @ Ct.T).reshape(self.n, d, n_t, d) * (Xs.T @ Xt)[:, None, :, None]
            blocks.append(K.reshape(self.n * d, n_t * d))
        return np.hstack(blocks)

    # ------------------------------------------ per-sample (dgnh.analyses)
    def sample_losses(self) -> Array:
        """The losses ``ℓ(f(x_i), y_i)`` of this shard's rows, shape ``(n_s,)``, float64."""
        return self.loss.value(self.F, self.Y).astype(np.float64)

    def sample_gradients(self, rows: slice) -> Array:
        """Per-sample gradients ``∇_w ℓ_i`` of the shard rows ``rows``, shape ``(r, N)``."""
        delta = self.loss.grad(self.F[rows], self.Y[rows]) * self.dS[-1][rows]
        parts = [None] * len(self.W)
        for l in range(len(self.W) - 1, -1, -1):
            gW = delta[:, :, None] * self.A[l][rows][:, None, :]
            gW = gW.reshape(len(delta), self.W[l].size)
            parts[l] = [gW] if self.b[l] is None else [gW, delta]
            if l:
                delta = (delta @ self.W[l]) * self.dS[l - 1][rows]
        return np.concatenate([p for layer in parts for p in layer], axis=1)

    def sample_gradient_products(self, V: Array, budget: int | None = None) -> Array:
        """``∇ℓ_iᵀ V`` for this shard's rows, shape ``(n_s, k)``: the output tangents of a
        forward R-op pass against ``∂ℓ_i/∂f``, chunked over vectors within ``budget``."""
        g = self.loss.grad(self.F, self.Y)
        return self._by_vectors(
            lambda Vc: np.einsum("kio,io->ik", self._forward_tangent(self._split(Vc))[1][-1], g),
            V, self.n, self._rop_bytes(), budget)


# Batched products as single 2-D GEMMs (numpy's broadcasting matmul over a batch of
# transposed views falls back to a slow non-BLAS loop).
def _times(X3: Array, W: Array) -> Array:
    """``X3[k] @ W`` for every k: ``(k, n, a) @ (a, b) -> (k, n, b)``."""
    k, n, a = X3.shape
    return (np.ascontiguousarray(X3).reshape(k * n, a) @ W).reshape(k, n, -1)


def _times_t(A: Array, B3: Array) -> Array:
    """``A @ B3[k].T`` for every k: ``(n, a), (k, b, a) -> (k, n, b)``."""
    k, b, a = B3.shape
    out = A @ np.ascontiguousarray(B3).reshape(k * b, a).T  # (n, k*b)
    return np.ascontiguousarray(out.reshape(-1, k, b).transpose(1, 0, 2))


def _t_times(X3: Array, A: Array) -> Array:
    """``X3[k].T @ A`` for every k: ``(k, n, a), (n, m) -> (k, a, m)``."""
    k, n, a = X3.shape
    Xn = np.ascontiguousarray(X3.transpose(1, 0, 2)).reshape(n, k * a)
    return (Xn.T @ A).reshape(k, a, -1)


def _sorted(loc):
    """Sort located parameters by (layer, row, col): ``(sorted loc, layer ranges, order)``."""
    layer, p, q = loc
    order = np.lexsort((q, p, layer))
    sl, sp, sq = layer[order], p[order], q[order]
    bounds = np.flatnonzero(np.diff(sl)) + 1
    starts = np.concatenate([[0], bounds]).astype(int)
    ends = np.concatenate([bounds, [len(sl)]]).astype(int)
    ranges = [(int(sl[a]), int(a), int(b)) for a, b in zip(starts, ends) if b > a]
    return (sl, sp, sq), ranges, order


