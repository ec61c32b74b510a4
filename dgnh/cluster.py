"""All Dask plumbing: shards resident on a cluster, one task per shard per batch.

:class:`DaskBackend` implements the :class:`~dgnh.protocols.Backend` protocol
(``map``, ``sum``, ``run``, ``close``, ``n_shards``, ``n_workers``,
``factor_bytes``; see :mod:`dgnh.backend`) on a ``distributed`` cluster:

* each shard is one task, ``make(*args)`` → :class:`~dgnh.shard_factors.ShardFactors`,
  with the key ``dgnh-shard-<token>-<s>``, softly pinned to one worker
  (``allow_other_workers=True``); the backend keeps its future, so the factors
  stay resident on the worker. ``args`` are either a dataset path and a row
  range (the worker reads its rows from the store) or the shard's own rows. In
  both cases the scheduler keeps the task spec, so a shard lost with its
  worker is recomputed elsewhere — which ``client.scatter`` would not allow;
* a request batch is one graph, sent to the scheduler in one message: one
  task per shard, ``func(shard, *args)`` (key ``dgnh-<func name>-<token>-<batch>-<s>``,
  e.g. ``dgnh-evaluate-…`` for ``ShardFactors.evaluate``), then for ``sum`` a tree
  reduction with :func:`~dgnh.backend.add_partials`, ``SPLIT_EVERY`` partials
  per task (``dgnh-sum-<token>-<batch>-<level>-<i>``): about ``1.33 × n_shards``
  tasks per batch whatever the number of blocks it holds. Shared arguments
  larger than ``ARG_TASK_BYTES`` travel once, as one ``dgnh-args-…`` task.

The tree depends only on the number of shards, so results are bit-identical
for any number of workers, and to those of :class:`~dgnh.backend.LocalBackend`
in this process, which adds by the same tree (:func:`~dgnh.backend.tree_sum`).
"""

from __future__ import annotations

import ast
import inspect
import itertools
import logging
import os
import signal
import sys
import threading
import time
import tokenize
import uuid
import weakref
from contextlib import contextmanager
from functools import reduce
from typing import Any, Callable, Sequence

import dask.config
from dask.delayed import Delayed, delayed
from dask.sizeof import sizeof
from dask.utils import parse_timedelta
from distributed import Client, Future, LocalCluster, WorkerPlugin
from distributed.security import Security

from .backend import SPLIT_EVERY, add_partials, per_shard, require_shards
from .config import tune_allocator
from .shard_factors import ShardFactors

ARG_TASK_BYTES = 2**20  # shared arguments above this size are sent once, as a task
_TLS_FILES = ("tls_ca_file", "tls_client_cert", "tls_client_key")


def make_security(security) -> Security | None:
    """A :class:`distributed.security.Security` from one, or from TLS file paths.

    ``security`` is ``None``, a ``Security``, a dict with some of the keys
    ``tls_ca_file``, ``tls_client_cert``, ``tls_client_key``, or a tuple
    ``(ca_file, cert_file[, key_file])`` (a 2-tuple when the certificate file
    also holds the key).

    Examples
    --------
    >>> make_security(None) is None
    True
    """
    if security is None or isinstance(security, Security):
        return security
    if isinstance(security, dict):
        files = dict(security)
    elif isinstance(security, (tuple, list)) and len(security) in (2, 3):
        files = dict(zip(_TLS_FILES, security))
    else:
        raise TypeError("security must be a distributed.security.Security, a dict of TLS file "
                        "paths or a tuple (ca_file, cert_file[, key_file]), "
                        f"got {type(security).__name__}")
    unknown = sorted(set(files) - set(_TLS_FILES))
    if unknown:
        raise ValueError(f"security: unknown keys {unknown}; expected some of {list(_TLS_FILES)}")
    for name, file in files.items():
        if not os.path.isfile(file):
            raise FileNotFoundError(f"security: {name} file {file} does not exist")
    return Security(require_encryption=True, **files)


def check_client_tls(security: Security) -> None:
    """Refuse TLS credentials that cannot make a client connection, in one line.

    A TLS client of a Dask scheduler needs the cluster's CA file and a client
    certificate with its key (``tls_client_key``, unless the certificate file
    holds the key); Dask alone would fail later and stall at exit.

    Examples
    --------
    >>> check_client_tls(Security(tls_ca_file="ca.pem"))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: security: a TLS client needs tls_ca_file and ...; got only tls_ca_file
    """
    given = [name for name in _TLS_FILES if getattr(security, name, None)]
    if "tls_ca_file" not in given or "tls_client_cert" not in given:
        raise ValueError("security: a TLS client needs tls_ca_file and tls_client_cert (plus "
                         "tls_client_key unless the certificate file holds the key); got "
                         + (f"only {', '.join(given)}" if given else "none of them"))
    try:
        security.get_connection_args("client")
    except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
        raise ValueError(f"security: cannot load the TLS files {given}: {e}") from None


def connect(address: str, security=None) -> Client:
    """A new ``Client`` of the scheduler at ``address``, or a ``ConnectionError``.

    Waits at most the Dask setting ``distributed.comm.timeouts.connect``
    (30 s by default) for the scheduler.
    """
    if "://" not in address:
        raise ValueError("client must be None, 'in-process', a distributed.Client or a "
                         f"scheduler address such as 'tcp://host:8786', got {address!r}")
    security = make_security(security)
    if address.startswith("tls://"):
        if security is None:
            raise ValueError(f"the scheduler at {address} uses TLS: pass security= (a "
                             "distributed.security.Security or the TLS file paths)")
        check_client_tls(security)
    timeout = connect_timeout()
    start = time.monotonic()
    try:
        return Client(address, security=security, timeout=timeout, set_as_default=False)
    except (OSError, TimeoutError) as e:
        elapsed = time.monotonic() - start
        if elapsed < 0.9 * timeout:
            how = (f": refused after {elapsed:.1f} s (credentials refused, or not a Dask "
                   "scheduler)")
        else:
            how = f" within {timeout:g} s (wrong address, or scheduler down)"
        raise ConnectionError(f"cannot connect to the Dask scheduler at {address}{how}: "
                              f"{e}") from e


def connect_timeout() -> float:
    """Seconds to wait for a scheduler or its first worker (Dask setting
    ``distributed.comm.timeouts.connect``)."""
    return parse_timedelta(dask.config.get("distributed.comm.timeouts.connect"))


class MallocTuning(WorkerPlugin):
    """Worker plugin: dgnh's glibc thresholds (:func:`dgnh.config.tune_allocator`) from the start.

    Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which
    switches glibc's adaptive mmap threshold off: every large temporary of a
    block evaluation is then a fresh ``mmap``, and the page faults make it
    about 3× slower (see ``dgnh bench distributed --dask-malloc``). Building
    shard factors tunes a worker anyway; this plugin does it when the worker
    starts (restarted ones included), before any other work. Clusters that dgnh
    starts get it; add it to your own with ``client.register_plugin(MallocTuning())``.
    """

    name = "dgnh-malloc-tuning"

    def setup(self, worker) -> None:
        tune_allocator()


def start_local_cluster() -> tuple[LocalCluster, Client]:
    """A process-based ``LocalCluster`` sized to the machine, with :class:`MallocTuning`,
    and a client of it.

    Its worker processes re-run the ``__main__`` script (Dask starts them with
    ``spawn``), so a call from the top level of a script, outside ``if __name__ ==
    "__main__":``, is refused in one line before any process starts. The
    workers never see a Ctrl-C (:func:`sigint_ignored`): the interrupt is this
    process's to handle (it closes the cluster), rather than a traceback in
    every worker; and they log errors only, not the warnings of a shutdown.
    """
    where = unguarded_main_call()
    if where is not None:
        raise RuntimeError(f"{where}: dgnh starts a local Dask cluster here, whose worker "
                           "processes re-run this script: put the script's top-level code "
                           "under `if __name__ == \"__main__\":` (or pass client=\"in-process\")")
    cluster = client = None
    try:
        with sigint_ignored():
            cluster = LocalCluster(processes=True, dashboard_address=":0",
                                   silence_logs=logging.ERROR)
            client = Client(cluster, set_as_default=False)
            client.register_plugin(MallocTuning())
    except BaseException:
        _shutdown(client, cluster)
        raise
    return cluster, client


def unguarded_main_call() -> str | None:
    """``"<file>, line <n>"`` of the statement of the ``__main__`` script this call
    comes from, when it lies at the script's top level outside ``if __name__ ==
    "__main__":`` (and would run again in every spawned process); else ``None``.

    ``None`` also without a script (interactive sessions, notebooks,
    ``python -c``), when the call does not come from the script's top level, and
    for Dask's ``fork`` start method.

    Examples
    --------
    >>> unguarded_main_call() is None  # under pytest: pytest's own main is guarded
    True
    """
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if path is None or dask.config.get("distributed.worker.multiprocessing-method") == "fork":
        return None
    frame = inspect.currentframe()
    while frame is not None and not (frame.f_globals is vars(main)
                                     and frame.f_code.co_name == "<module>"):
        frame = frame.f_back
    if frame is None:
        return None
    try:
        with tokenize.open(path) as fh:
            tree = ast.parse(fh.read())
    except (OSError, SyntaxError, ValueError):
        return None
    line = frame.f_lineno
    for node in tree.body:
        if node.lineno <= line <= node.end_lineno:
            guarded = (_is_main_guard(node)
                       and node.body[0].lineno <= line <= node.body[-1].end_lineno)
            return None if guarded else f"{path}, line {line}"
    return None


def _is_main_guard(node: ast.stmt) -> bool:
    """``node`` is ``if __name__ == "__main__":`` (either side first)."""
    if not (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and len(node.test.ops) == 1 and isinstance(node.test.ops[0], ast.Eq)):
        return False
    sides = (node.test.left, node.test.comparators[0])
    return ({s.id for s in sides if isinstance(s, ast.Name)} == {"__name__"}
            and {s.value for s in sides if isinstance(s, ast.Constant)} == {"__main__"})


@contextmanager
def sigint_ignored():
    """Ignore SIGINT while the block runs, so that the processes started meanwhile
    (the workers of a ``LocalCluster``) ignore it for good: a Ctrl-C at the
    terminal then reaches this process only. A Ctrl-C during the block itself
    is lost (a signal mask would not do: Dask's threads start with an empty one).

    A no-op outside the main thread, where Python cannot set signal handlers.
    """
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous is None:
        yield
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def call_on_shard(func: Callable[..., Any], shard: Any, args: tuple) -> Any:
    """``func(shard, *args)``: the task run on a shard.

    Examples
    --------
    >>> call_on_shard(str.split, "a b", ())
    ['a', 'b']
    """
    return func(shard, *args)


def shard_nbytes(shard: ShardFactors) -> int:
    """Bytes of one shard's factors (the task behind :attr:`DaskBackend.factor_bytes`)."""
    return shard.nbytes


def sum_partials(*parts: Any) -> Any:
    """Add partial results (one node of the reduction tree)."""
    return reduce(add_partials, parts)


class DaskBackend:
    """Shards as resident tasks on a Dask cluster (see the module docstring).

    Parameters
    ----------
    client : ``None`` (start a process-based ``LocalCluster`` sized to the
        machine, with :class:`MallocTuning`, closed by :meth:`close`), a
        ``distributed.Client`` (used, never closed), or a scheduler address
        ``"tcp://…"``/``"tls://…"`` (a client is connected and closed by
        :meth:`close`).
    security : TLS credentials for an address, see :func:`make_security`.

    Shards are created by :meth:`create_shards`.

    Examples
    --------
    >>> import numpy as np
    >>> from distributed import Client, LocalCluster
    >>> with LocalCluster(n_workers=1, processes=False, dashboard_address=":0") as lc, \\
    ...         Client(lc, set_as_default=False) as c:
    ...     backend = DaskBackend(c)
    ...     backend.create_shards([(np.arange, (3,)), (np.arange, (3, 6))])
    ...     total = backend.sum(np.ndarray.sum)
    ...     backend.close()
    >>> int(total)
    15
    """

    def __init__(self, client: Client | str | None = None, security=None):
        cluster = None
        if client is None:
            if security is not None:
                raise ValueError("security applies when connecting to a scheduler address")
            cluster, client = start_local_cluster()
            owned = True
        elif isinstance(client, Client):
            if security is not None:
                raise ValueError("security applies when connecting to a scheduler address; "
                                 "a Client carries its own")
            owned = False
        elif isinstance(client, str):
            client = connect(client, security)
            owned = True
        else:
            raise TypeError("client must be None, 'in-process', a distributed.Client or a "
                            f"scheduler address, got {type(client).__name__}")
        self.client = client
        self._owned = owned
        self._shutdown = weakref.finalize(self, _shutdown, client if owned else None, cluster)
        self._token = uuid.uuid4().hex
        self._batches = itertools.count()
        self._shards: list[Future] = []
        try:
            client.wait_for_workers(1, timeout=connect_timeout())
        except TimeoutError as e:
            self.close()
            raise ConnectionError(f"the Dask cluster at {client.scheduler.address} has no "
                                  "workers") from e

    # ----------------------------------------------------------------- setup
    def run(self, func: Callable[..., Any], *args: Any) -> Any:
        """``func(*args)`` as one task on a worker (e.g. to read store metadata
        where the data lives)."""
        return self.client.submit(func, *args, pure=False).result()

    def create_shards(self, tasks: Sequence[tuple[Callable, tuple]]) -> None:
        """Create one resident shard per ``(make, args)`` and wait for them.

        Shard ``s`` is pinned softly to worker ``s mod n_workers``; the first
        failure (e.g. an unreadable store) is raised here.
        """
        workers = sorted(self.client.scheduler_info()["workers"])
        self._shards = [
            self.client.submit(make, *args, key=f"dgnh-shard-{self._token}-{s}",
                               workers=[workers[s % len(workers)]], allow_other_workers=True)
            for s, (make, args) in enumerate(tasks)
        ]
        for future in self._shards:
            error = future.exception()  # waits for the shard; fetches no data
            if error is not None:
                raise error

    # ---------------------------------------------------------- the protocol
    @property
    def n_shards(self) -> int:
        return len(self._shards)

    @property
    def n_workers(self) -> int:
        return len(self.client.scheduler_info()["workers"])

    @property
    def factor_bytes(self) -> int:
        """Bytes of the factors of all shards (one task per shard; 0 once closed)."""
        return int(self.sum(shard_nbytes)) if self._shards else 0

    def map(self, func: Callable[..., Any], args: tuple | Sequence[tuple] = ()) -> list:
        """``func(shard, *args[s])`` on every shard, in shard order."""
        calls, _ = self._calls(func, args)
        return self.client.gather(self.client.compute(calls, optimize_graph=False))

    def sum(self, func: Callable[..., Any], args: tuple | Sequence[tuple] = ()) -> Any:
        """The calls of :meth:`map` added up over shards by a reduction tree."""
        parts, tag = self._calls(func, args)
        for level in itertools.count():
            if len(parts) == 1:
                return self.client.compute(parts[0], optimize_graph=False).result()
            parts = [
                delayed(sum_partials, pure=False)(*parts[i:i + SPLIT_EVERY],
                                                  dask_key_name=f"dgnh-sum-{tag}-{level}-{i}")
                if len(parts[i:i + SPLIT_EVERY]) > 1 else parts[i]
                for i in range(0, len(parts), SPLIT_EVERY)
            ]

    def close(self) -> None:
        """Release the shards; close the client and cluster this backend started."""
        if self._shards and not self._owned:
            self.client.cancel(self._shards)  # a client we were given keeps running
        self._shards = []
        self._shutdown()  # closing a client of our own releases its shards with it

    def _calls(self, func: Callable[..., Any],
               args: tuple | Sequence[tuple]) -> tuple[list[Delayed], str]:
        """One call task per shard; the graph of a batch is sent in one message."""
        require_shards(self.n_shards)
        tag = f"{self._token}-{next(self._batches)}"
        if isinstance(args, tuple) and args and sizeof(args) > ARG_TASK_BYTES:
            shared = delayed(tuple, pure=False)(args, dask_key_name=f"dgnh-args-{tag}")
            per = [shared] * self.n_shards
        else:
            per = per_shard(args, self.n_shards)
        name = func.__name__
        calls = [
            delayed(call_on_shard, pure=False)(func, shard, a,
                                               dask_key_name=f"dgnh-{name}-{tag}-{s}")
            for s, (shard, a) in enumerate(zip(self._shards, per))
        ]
        return calls, tag


def _shutdown(client: Client | None, cluster: LocalCluster | None) -> None:
    if client is not None:
        client.close()
    if cluster is not None:
        cluster.close()
