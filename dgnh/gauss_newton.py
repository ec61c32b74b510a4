"""The Gauss–Newton Hessian of an MLP on a data set: entries, blocks, products.

``G = (1/n) Σ_i J_iᵀ Q_i J_i`` (docs/design.md §1–§3), organised as per-shard
factors (:class:`~dgnh.shard_factors.ShardFactors`) plus an exact sum over shards,
which a backend (:class:`~dgnh.protocols.Backend`) computes in this process or on
a Dask cluster. Besides entries and GNH products, :class:`GaussNewton` gives the
products with the loss-scaled Jacobian ``Ĵ = RJ`` (``G = ĴᵀĴ/n``) that the dual
route of :mod:`dgnh.exact_solve` needs.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from .backend import (LocalBackend, available_cores, check_shard_size,
                      default_shard_size, require_shards, shard_bounds, shard_from_arrays,
                      shard_from_store)
from .losses import get_loss
from .model import MLP
from .operator import Operator, check_dense_size
from .protocols import Backend
from .sampling import check_eps_delta, plan
from .config import memory_budget as configured_budget
from .batching import batch_pieces, request_shape, split_request, vector_chunk
from .shard_factors import ShardFactors
from .validation import (check_bytes, check_float_dtype, check_fraction, check_index_pairs,
                         check_real_array, is_integer)

Array = np.ndarray


class GaussNewton(Operator):
    """The GNH ``G = (1/n) Σ_i J_iᵀ Q_i J_i`` of ``model`` on data ``(X, Y)``.

    Parameters
    ----------
    model : MLP
    X : array ``(n_samples, n_inputs)``
    Y : targets: ``(n_samples, n_outputs)`` floats for ``mse`` and
        ``binary_cross_entropy`` (in [0, 1]), ``(n_samples,)`` integer class labels for
        ``cross_entropy``.
    loss : ``"mse"``, ``"cross_entropy"`` or ``"binary_cross_entropy"``.
    dtype : ``numpy.float64`` (default) or ``numpy.float32`` for factors and arithmetic.
    shard_size : rows per shard (default: about 128 MiB of factors per shard).
    memory_budget : bytes (or e.g. ``"4GiB"``) of working memory per process that
        products, batches of blocks and the dual route stay within, chunking over
        vectors, blocks and groups (results do not change); default
        :func:`dgnh.config.memory_budget` at call time.
    client : where the shards live. ``None`` (default): arrays in this process,
        on a thread pool with one thread per core (no worker processes, so a plain
        script needs no ``if __name__ == "__main__":`` guard); a dataset store with
        more than one shard on a process-based ``LocalCluster`` sized to the
        machine, started here and closed by :meth:`close`. ``"in-process"``:
        always in this process, one shard after the other. A
        ``distributed.Client`` or a scheduler address
        (``"tcp://host:8786"``, ``"tls://…"``): on that cluster, one resident
        task per shard (see :mod:`dgnh.cluster`); an unreachable address fails
        after the Dask setting ``distributed.comm.timeouts.connect``.
    security : TLS credentials for an address: a ``distributed.security.Security``,
        a dict of ``tls_ca_file``/``tls_client_cert``/``tls_client_key`` paths or
        a tuple ``(ca_file, cert_file[, key_file])``.

    ``X`` may instead be the path of a dataset store (:func:`dgnh.save_dataset`),
    with ``Y=None``: each shard then reads its own rows where it lives. Arrays
    given in memory travel to a cluster as the shard tasks' arguments, so the
    scheduler can recompute a shard lost with its worker.

    Examples
    --------
    >>> import numpy as np, dgnh
    >>> rng = np.random.default_rng(0)
    >>> net = dgnh.MLP([rng.normal(size=(5, 3)), rng.normal(size=(2, 5))],
    ...                [np.zeros(5), np.zeros(2)], ["tanh", "identity"])
    >>> gn = dgnh.GaussNewton(net, rng.normal(size=(50, 3)), rng.normal(size=(50, 2)))
    >>> G = gn.dense()
    >>> bool(np.allclose(gn.entries([0, 4], [7]), G[[0, 4]][:, [7]]))
    True

    On a cluster, from a dataset store (closed on leaving the block)::

        dgnh.save_dataset("data.zarr", X, Y)
        with dgnh.GaussNewton(net, "data.zarr", client="tcp://scheduler:8786") as gn:
            block = gn.entries(rows, cols)
    """

    def __init__(self, model: MLP, X, Y=None, loss: str = "mse", dtype=np.float64,
                 shard_size: int | None = None, client=None, security=None,
                 memory_budget=None):
        if not isinstance(model, MLP):
            raise TypeError(f"model must be a dgnh.MLP, got {type(model).__name__}")
        self.model = model
        self.loss_name = get_loss(loss).name
        self.dtype = check_float_dtype(dtype)
        if shard_size is None:
            shard_size = default_shard_size(model, self.dtype)
        self.shard_size = check_shard_size(shard_size)
        if isinstance(X, (str, os.PathLike)):
            if Y is not None:
                raise ValueError("X is a dataset path, which holds the targets: pass Y=None")
            X = os.fspath(X)
        else:
            if Y is None:
                raise ValueError("Y is required when X is an array (or pass a dataset path as X)")
            X = model.check_inputs(X)
            Y = get_loss(loss).check_targets(Y, X.shape[0], model.n_outputs, self.dtype)
            self.n_samples = int(X.shape[0])
        self.n_params = model.n_params
        self.shape = (self.n_params, self.n_params)
        self.stats = {"blocks": 0, "entries_exact": 0, "entries_sampled": 0, "rows_sampled": 0}
        self._diag = None
        self.memory_budget = (None if memory_budget is None
                              else check_bytes(memory_budget, "memory_budget"))
        self._backend = self._make_backend(X, Y, client, security)

    def _make_backend(self, X, Y, client, security):
        """Shards in this process or as resident tasks on a Dask cluster.

        In process for ``client="in-process"`` (one thread), and for
        ``client=None`` with arrays (a thread per core, at most one per shard)
        or a single shard; ``client=None`` with a multi-shard dataset store
        starts a local cluster. A dataset path is read where the shards live
        (the metadata through one task on a given cluster, whose workers may
        not share this file system).
        """
        in_process = client is None or (isinstance(client, str) and client == "in-process")
        if in_process and security is not None:
            raise ValueError("security applies when client is a scheduler address")
        backend = None if in_process else dask_backend(client, security)
        try:
            if isinstance(X, str):
                from .dataset import open_dataset  # Zarr is loaded on first use

                dataset = open_dataset(X) if backend is None else backend.run(open_dataset, X)
                self.n_samples = self._check_dataset(dataset)
            tasks = self._shard_tasks(X, Y)
            if backend is None and client is None and isinstance(X, str) and len(tasks) > 1:
                backend = dask_backend()
            elif backend is None:
                threads = 1 if client is not None else min(len(tasks), available_cores())
                backend = LocalBackend(threads=threads)
            backend.create_shards(tasks)
        except BaseException:
            if backend is not None:
                backend.close()
            raise
        return backend

    def _check_dataset(self, dataset) -> int:
        """Check a store's shapes and dtypes against the model and loss; its n_samples."""
        if dataset.n_inputs != self.model.n_inputs:
            raise ValueError(f"dataset {dataset.path}: X has {dataset.n_inputs} columns, the "
                             f"model takes {self.model.n_inputs} inputs (mismatched store)")
        n = dataset.n_samples  # a zero-strided stand-in: the real shape, no memory
        like = np.broadcast_to(np.zeros((), dtype=dataset.y_dtype), (n,) + dataset.target_shape)
        try:
            get_loss(self.loss_name).check_targets(like, n, self.model.n_outputs, self.dtype)
        except (TypeError, ValueError) as e:
            raise type(e)(f"dataset {dataset.path}: targets Y of shape "
                          f"{(dataset.n_samples,) + dataset.target_shape} and dtype "
                          f"{dataset.y_dtype} do not fit the model and loss: {e}") from None
        return dataset.n_samples

    def _shard_tasks(self, X, Y) -> list[tuple]:
        """One ``(make, args)`` per shard: reads its rows from a store, or holds them."""
        common = (self.model, self.loss_name, self.dtype)
        bounds = shard_bounds(self.n_samples, self.shard_size)
        if isinstance(X, str):
            return [(shard_from_store, (X, a, b) + common + (s,))
                    for s, (a, b) in enumerate(bounds)]
        return [(shard_from_arrays, (X[a:b], Y[a:b]) + common + (s,))
                for s, (a, b) in enumerate(bounds)]

    # -------------------------------------------------------------- lifecycle
    @property
    def backend(self) -> Backend:
        """Where the shards live: a :class:`~dgnh.backend.LocalBackend` or a
        :class:`~dgnh.cluster.DaskBackend` (the :class:`~dgnh.protocols.Backend` protocol)."""
        return self._backend

    @property
    def n_shards(self) -> int:
        return self._backend.n_shards

    def close(self) -> None:
        """Release the shards, and the client or local cluster this object started."""
        self._backend.close()

    def __enter__(self) -> "GaussNewton":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"GaussNewton(n_params={self.n_params}, n_samples={self.n_samples}, "
                f"loss={self.loss_name!r}, dtype={self.dtype.name}, n_shards={self.n_shards})")

    # ---------------------------------------------------------------- entries
    def entries(self, rows, cols, eps: float | None = None, delta: float = 0.01,
                seed: int = 0) -> Array:
        """The block ``G[rows, cols]``, exact or (with ``eps``) sampled.

        With ``eps``, every entry satisfies ``|Ĝ_ab − G_ab| ≤ eps·√(G_aa G_bb)`` with
        probability ≥ 1 − ``delta`` (median of means, see :mod:`dgnh.sampling`);
        all entries of the block share their sampled data rows, so the work is
        a GEMM. When the plan asks for at least ``n_samples`` rows the exact block
        is cheaper and is returned instead.
        """
        rows = self.model.check_indices(rows, "row index")  # a scalar: one row, as 1-D
        cols = self.model.check_indices(cols, "column index")
        return self.entries_many([(rows, cols)], eps=eps, delta=delta, seed=seed)[0]

    def entries_many(self, requests: Sequence[tuple], eps: float | None = None,
                     delta: float = 0.01, seed: int = 0) -> list[Array]:
        """Many blocks ``[(rows1, cols1), ...]`` in one batch (one call per shard).

        ``requests`` is a sequence of pairs of 1-D index arrays (a single pair is
        ``[(rows, cols)]``); ``delta`` and ``seed`` are checked even without ``eps``.
        """
        locs = [(self.model.locate(self.model.check_indices(r, "row index")),
                 self.model.locate(self.model.check_indices(c, "column index")))
                for r, c in check_index_pairs(requests)]
        delta = check_fraction(delta, "delta")
        if not is_integer(seed) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        if eps is not None:
            eps, delta = check_eps_delta(eps, delta)
            specs, post = self._sampling_specs(locs, eps, delta, seed)
        else:
            specs = [[("exact", I, J)] * self.n_shards for I, J in locs]
            post = [None] * len(locs)
        sums = self._evaluate(specs)
        n = self.n_samples
        out = []
        for r, how in enumerate(post):
            part, sums[r] = sums[r], None  # each sum freed as its block is made: never two
            # copies of a round's blocks (at N ≈ 1M the leaf blocks are 1 GB)
            if how is None:
                block = part / n
                self.stats["entries_exact"] += block.size
            else:
                block = np.median(part, axis=0) / (n * how)
                self.stats["entries_sampled"] += block.shape[0] * block.shape[1]
            self.stats["blocks"] += 1
            out.append(block.astype(self.dtype, copy=False))
        return out

    def _sampling_specs(self, locs, eps, delta, seed):
        """Round 1 (per-shard norm sums) and the per-shard round-2 requests."""
        union = tuple(np.concatenate([np.concatenate([I[k], J[k]]) for I, J in locs])
                      for k in range(3))
        norms = np.array(self._backend.map(ShardFactors.sq_norm_sums, (union,)))  # (shards, k)
        total = norms.sum(axis=0)  # n · G_aa
        specs, post = [], []  # per request: one spec per shard
        start = 0
        for r, (I, J) in enumerate(locs):
            kI, kJ = len(I[0]), len(J[0])
            nI, nJ = norms[:, start:start + kI], norms[:, start + kI:start + kI + kJ]
            tI, tJ = total[start:start + kI], total[start + kI:start + kI + kJ]
            start += kI + kJ
            coef_I, coef_J = _mixture_coefficients(tI), _mixture_coefficients(tJ)
            shard_w = 0.5 * (nI @ coef_I + nJ @ coef_J)
            W = float(shard_w.sum())
            p = plan(eps, delta, (max(1, np.count_nonzero(tI)), max(1, np.count_nonzero(tJ))))
            if W <= 0 or p.n_rows >= self.n_samples:
                specs.append([("exact", I, J)] * self.n_shards)
                post.append(None)
                continue
            rng = np.random.default_rng([seed, r])
            counts = rng.multinomial(p.group_size, shard_w / W, size=p.n_groups).T  # (shards, K)
            specs.append([("sampled", I, coef_I, J, coef_J, counts[s], W, [seed, r, s])
                          for s in range(self.n_shards)])
            self.stats["rows_sampled"] += p.n_rows
            post.append(p.group_size)
        return specs, post

    def _budgets(self) -> tuple[int, int]:
        """Bytes for the partial sums of one batch, and for each shard call.

        Half the memory budget each; the shards' half is shared by the shards
        that a :class:`~dgnh.backend.LocalBackend` works on at once. The partial
        sums are counted as if the backend held every shard's at once.
        """
        budget = configured_budget(self.memory_budget)
        at_once = self._backend.n_workers if isinstance(self._backend, LocalBackend) else 1
        return max(1, budget // 2), max(1, budget // 2 // at_once)

    def _evaluate(self, specs: list[list[tuple]]) -> list[Array]:
        """The shard sums of every request, in batches whose partial sums fit the budget.

        A block too large for one batch is computed in pieces (sub-blocks, or
        ranges of a sampled block's groups) and put together here.
        """
        require_shards(self.n_shards)  # a closed GaussNewton has no shards to split over
        entry = self.dtype.itemsize * (self.n_shards + 1)
        cap = max(1, self._budgets()[0] // entry)
        pieces = [(r,) + piece for r, sp in enumerate(specs)
                  for piece in split_request(sp, cap, entry)]
        sums: list = [None] * len(specs)
        for batch in batch_pieces(pieces, cap):
            args = [([p[2][s] for p in batch],) for s in range(self.n_shards)]
            for (r, where, sp, _), part in zip(batch, self._backend.sum(ShardFactors.evaluate,
                                                                         args)):
                if where is None:
                    sums[r] = part
                    continue
                if sums[r] is None:
                    sums[r] = np.empty(request_shape(specs[r][0]), dtype=part.dtype)
                sums[r][where] = part
        return sums

    def diagonal(self) -> Array:
        """The diagonal of G, O(n·N)."""
        if self._diag is None:
            diagonal_sum = self._backend.sum(ShardFactors.diagonal)
            self._diag = (diagonal_sum / self.n_samples).astype(self.dtype)
        return self._diag.copy()

    def column(self, j: int) -> Array:
        """Column ``G[:, j]`` (one exact GNH-vector product)."""
        if np.ndim(j) != 0:
            raise ValueError("column() takes a single integer index")
        j = int(self.model.check_indices(j, "column index")[0])
        e = np.zeros(self.n_params, dtype=self.dtype)
        e[j] = 1
        return self.matvec(e)

    def dense(self, max_bytes: int = 2**30) -> Array:
        """The dense N × N GNH; refuses above ``max_bytes`` with the bytes it needs."""
        check_dense_size(self.n_params, self.dtype.itemsize, max_bytes)
        idx = np.arange(self.n_params)
        return self.entries(idx, idx)

    # --------------------------------------------------------------- products
    def _matmat(self, V: Array) -> Array:
        return self._vector_sum(ShardFactors.gnh_matvec, V, 1 / self.n_samples)

    def _vector_sum(self, func, V: Array, scale: float, rows=None) -> Array:
        """``scale · Σ_s func(shard_s, V_s, budget)`` of shape ``(N, k)``, chunked over vectors
        so that the shards' partial sums of a chunk fit half the memory budget.

        ``rows``: per-shard row ranges of ``V`` (each shard gets its own rows),
        else every shard gets all of ``V``.
        """
        partials, shard_budget = self._budgets()
        k = V.shape[1]
        step = vector_chunk(k, (self.n_shards + 1) * self.n_params * self.dtype.itemsize, partials)
        out = np.empty((self.n_params, k), dtype=self.dtype) if step < k else None
        for a in range(0, k, step):
            Vc = np.ascontiguousarray(V[:, a:a + step])
            args = ((Vc, shard_budget) if rows is None
                    else [(Vc[b:e], shard_budget) for b, e in rows])
            part = (self._backend.sum(func, args) * scale).astype(self.dtype, copy=False)
            if out is None:
                return part
            out[:, a:a + step] = part
        return out

    def hvp(self, V) -> Array:
        """The full Hessian of the mean loss times ``V`` (vector or ``(N, k)``)."""
        return HessianOperator(self).matvec(V)

    def hessian(self) -> "HessianOperator":
        """The full Hessian as an :class:`~dgnh.operator.Operator`."""
        return HessianOperator(self)

    def loss(self) -> float:
        """The mean loss ``(1/n) Σ_i ℓ(f(x_i), y_i)``."""
        return self._backend.sum(ShardFactors.loss_sum) / self.n_samples

    def gradient(self) -> Array:
        """The gradient of the mean loss, shape ``(N,)``."""
        return (self._backend.sum(ShardFactors.gradient_sum) / self.n_samples).astype(self.dtype)

    def _hessian_matmat(self, V: Array) -> Array:
        """The full Hessian of the mean loss times a validated ``V (N, k)``."""
        return self._vector_sum(ShardFactors.hessian_matvec, V, 1 / self.n_samples)

    # ------------------------------------------ Jacobian products (dual route)
    @property
    def n_jacobian_rows(self) -> int:
        """Rows ``m = n_samples · n_outputs`` of the loss-scaled Jacobian ``Ĵ``."""
        return self.n_samples * self.model.n_outputs

    def jacobian_matvec(self, V) -> Array:
        """``Ĵ V``: the loss-scaled Jacobian ``Ĵ = RJ`` (``G = ĴᵀĴ/n``) times ``V``.

        ``V`` is ``(N,)`` or ``(N, k)``; the result is ``(m,)`` or ``(m, k)`` with
        ``m = n_samples · n_outputs`` rows ``(i, o)`` in sample order (docs/design.md
        §2), computed on the shards through the stored factors (one GEMM per layer
        across all vectors), O(n·N·k), chunked over vectors within the memory budget.

        Examples
        --------
        >>> import numpy as np, dgnh
        >>> rng = np.random.default_rng(0)
        >>> net = dgnh.MLP([rng.normal(size=(2, 3))], [np.zeros(2)], ["tanh"])
        >>> gn = dgnh.GaussNewton(net, rng.normal(size=(5, 3)), rng.normal(size=(5, 2)))
        >>> J = gn.jacobian_matvec(np.eye(gn.n_params))
        >>> J.shape, bool(np.allclose(J.T @ J / gn.n_samples, gn.dense()))
        ((10, 8), True)
        """
        V2 = _check_vectors(V, self.n_params, "V")
        if V2.shape[1] == 0:
            return np.zeros((self.n_jacobian_rows, 0), dtype=self.dtype)
        out = np.vstack(self._backend.map(ShardFactors.jacobian_matvec,
                                          (V2, self._budgets()[1])))
        return out[:, 0] if np.ndim(V) == 1 else out

    def jacobian_rmatvec(self, Y) -> Array:
        """``ĴᵀY`` for ``Y`` of shape ``(m,)`` or ``(m, k)`` (rows ``(i, o)`` in sample order).

        The result is ``(N,)`` or ``(N, k)``; each shard backpropagates its rows of ``Y``.

        Examples
        --------
        >>> import numpy as np, dgnh
        >>> rng = np.random.default_rng(0)
        >>> net = dgnh.MLP([rng.normal(size=(2, 3))], [np.zeros(2)], ["tanh"])
        >>> gn = dgnh.GaussNewton(net, rng.normal(size=(5, 3)), rng.normal(size=(5, 2)))
        >>> Y = rng.normal(size=gn.n_jacobian_rows)
        >>> J = gn.jacobian_matvec(np.eye(gn.n_params))
        >>> bool(np.allclose(gn.jacobian_rmatvec(Y), J.T @ Y))
        True
        """
        Y2 = _check_vectors(Y, self.n_jacobian_rows, "Y")
        if Y2.shape[1] == 0:
            return np.zeros((self.n_params, 0), dtype=self.dtype)
        d = self.model.n_outputs
        rows = [(a * d, b * d) for a, b in shard_bounds(self.n_samples, self.shard_size)]
        out = self._vector_sum(ShardFactors.jacobian_rmatvec, Y2, 1.0, rows)
        return out[:, 0] if np.ndim(Y) == 1 else out

    def sample_gradient_products(self, V) -> Array:
        """``[∇ℓ_iᵀ V]_i``: every per-sample loss gradient times ``V`` (``(N,)`` or ``(N, k)``).

        The result is ``(n_samples,)`` or ``(n_samples, k)`` in sample order, by one
        forward R-op pass per shard (no per-sample object), O(n·N·k).

        Examples
        --------
        >>> import numpy as np, dgnh
        >>> rng = np.random.default_rng(0)
        >>> net = dgnh.MLP([rng.normal(size=(2, 3))], [np.zeros(2)], ["tanh"])
        >>> gn = dgnh.GaussNewton(net, rng.normal(size=(5, 3)), rng.normal(size=(5, 2)))
        >>> bool(np.isclose(gn.sample_gradient_products(np.ones(8)).mean(),
        ...                 gn.gradient().sum()))
        True
        """
        V2 = _check_vectors(V, self.n_params, "V")
        out = np.vstack(self._backend.map(ShardFactors.sample_gradient_products,
                                          (V2, self._budgets()[1])))
        return out[:, 0] if np.ndim(V) == 1 else out

    def jacobian_columns(self, params) -> Array:
        """The columns ``Ĵ[:, params]``, shape ``(m, len(params))``, rows in sample order.

        Examples
        --------
        >>> import numpy as np, dgnh
        >>> rng = np.random.default_rng(0)
        >>> net = dgnh.MLP([rng.normal(size=(2, 3))], [np.zeros(2)], ["tanh"])
        >>> gn = dgnh.GaussNewton(net, rng.normal(size=(5, 3)), rng.normal(size=(5, 2)))
        >>> J = gn.jacobian_matvec(np.eye(gn.n_params))
        >>> bool(np.allclose(gn.jacobian_columns([1, 6]), J[:, [1, 6]]))
        True
        """
        loc = self.model.locate(self.model.check_indices(params, "parameter index"))
        columns = self._backend.map(ShardFactors.gather, (loc,))  # per shard (k, n_s, d)
        return np.concatenate([c.reshape(c.shape[0], -1) for c in columns], axis=1).T

    def dual_gram(self, max_bytes=None) -> Array:
        """The dual Gram matrix ``ĴĴᵀ`` (``m × m``, float64), rows in sample order.

        Assembled from the per-shard factors without forming ``Ĵ``: every shard
        first returns its compact factors (``n_s·Σ_l(d·d_l + d_{l-1} + 1)`` numbers),
        then shard ``s`` computes its row blocks against the shards ``t ≥ s``
        (docs/design.md §4, the dual route), in groups of shards whose row blocks
        fit the memory left. Needs ``8·m²`` bytes for the matrix, 8 bytes per
        factor number and twice the largest row block; refused up front with
        these figures above ``max_bytes`` (bytes or e.g. ``"8GiB"``; default the
        memory budget, :mod:`dgnh.config`). Time ``O(m²·Σ_l d_l)``.

        Examples
        --------
        >>> import numpy as np, dgnh
        >>> rng = np.random.default_rng(0)
        >>> net = dgnh.MLP([rng.normal(size=(2, 3))], [np.zeros(2)], ["tanh"])
        >>> gn = dgnh.GaussNewton(net, rng.normal(size=(5, 3)), rng.normal(size=(5, 2)),
        ...                       shard_size=2, client="in-process")
        >>> J = gn.jacobian_matvec(np.eye(gn.n_params))
        >>> bool(np.allclose(gn.dual_gram(), J @ J.T))
        True
        """
        m, d, sizes = self.n_jacobian_rows, self.model.n_outputs, self.model.layer_sizes
        limit = configured_budget(self.memory_budget if max_bytes is None else max_bytes)
        bounds = shard_bounds(self.n_samples, self.shard_size)
        row_bytes = [16 * (b - a) * d * (m - a * d) for a, b in bounds]  # a row block, twice
        factor_bytes = 8 * self.n_samples * (d * sum(sizes[1:]) + sum(s + 1 for s in sizes[:-1]))
        fixed = 8 * m * m + factor_bytes
        if fixed + max(row_bytes) > limit:
            need = fixed + max(row_bytes)
            raise ValueError(
                f"the dual route needs {need:,} bytes ({need / 2**30:.2f} GiB): the matrix ĴĴᵀ "
                f"of n_samples·n_outputs = {m} rows {8 * m * m:,}, the shards' factors "
                f"{factor_bytes:,} and a row block {max(row_bytes):,}; above "
                f"{'max_bytes' if max_bytes is not None else 'the memory budget'} = {limit:,}: "
                "raise it or use dgnh.solve (CG) instead")
        factors = self._backend.map(ShardFactors.dual_factors)
        groups, used = [[]], 0
        for s, need in enumerate(row_bytes):
            if groups[-1] and used + need > limit - fixed:
                groups.append([])
                used = 0
            groups[-1].append(s)
            used += need
        K = np.empty((m, m))
        for group in groups:
            args = [(factors[s:] if s in group else [],) for s in range(len(bounds))]
            rows = self._backend.map(ShardFactors.dual_gram, args)
            for s in group:
                a, b = bounds[s][0] * d, bounds[s][1] * d
                K[a:b, a:] = rows[s]
                K[a:, a:b] = rows[s].T
        return K


class HessianOperator(Operator):
    """The Hessian ∇²L(w) of the mean loss, applied by Pearlmutter's R{backprop}."""

    def __init__(self, gn: GaussNewton):
        self.gn = gn
        self.shape = gn.shape
        self.dtype = gn.dtype

    def _matmat(self, V: Array) -> Array:
        return self.gn._hessian_matmat(V)


def _mixture_coefficients(total_sq_norms: Array) -> Array:
    """c_a = 1/(k' · n G_aa) over the k' nonzero columns, 0 for zero columns."""
    nz = total_sq_norms > 0
    c = np.zeros_like(total_sq_norms)
    c[nz] = 1.0 / (np.count_nonzero(nz) * total_sq_norms[nz])
    return c


def _check_vectors(V, n_rows: int, name: str) -> Array:
    """``V`` (a vector or a matrix of vectors with ``n_rows`` rows) as a 2-D array."""
    V = check_real_array(V, name, ndim=(1, 2))
    if V.shape[0] != n_rows:
        raise ValueError(f"{name} must have {n_rows} rows, got shape {V.shape}")
    return V[:, None] if V.ndim == 1 else V


def dask_backend(client=None, security=None):
    """A :class:`~dgnh.cluster.DaskBackend` (Dask loads on first use, not on ``import dgnh``)."""
    from .cluster import DaskBackend

    return DaskBackend(client, security)
