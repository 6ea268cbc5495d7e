"""Clusters and scheduling: the client a fit runs on, local clusters set up for JAX workers,
computing with a progress bar.

``start_local_cluster`` gives spawned worker processes (JAX deadlocks in forked ones), XLA's
and BLAS's thread pools sized to each worker's threads, and glibc malloc settings that keep
XLA's buffers cheap (``distributed_nanny.yaml``, which the container image installs for
``dask worker`` too).
"""

import contextlib
import logging
import signal
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import dask
import xarray as xr
import yaml

from . import config

logger = logging.getLogger("sheap_dask.fit")

LOCAL_SCHEDULERS = {"sync", "synchronous", "single-threaded", "threads", "threading", "processes", "multiprocessing"}


def resolve_client(client):
    """(client, cluster started here or None); client None means dask's local scheduler."""
    if client is not None:
        return client, None
    if dask.config.get("scheduler", None) in LOCAL_SCHEDULERS:
        return None, None
    from distributed import default_client

    try:
        return default_client(), None
    except ValueError:
        pass
    return start_default_cluster()


@contextlib.contextmanager
def using_client(client):
    """:func:`resolve_client` as a context: yields the client (None: dask's local scheduler)
    and closes the client and cluster it started itself, whatever happens inside."""
    client, own = resolve_client(client)
    try:
        yield client
    finally:
        if own is not None:
            client.close()
            own.close()


def start_default_cluster(**kwargs):
    """(client, cluster): the ``LocalCluster`` of ``sheap_dask.cluster.*`` (one worker per
    core by default) and a client of it."""
    from distributed import Client

    n_workers = config.get("cluster.n_workers") or config._cpu_share()
    threads = int(config.get("cluster.threads_per_worker") or 1)
    cluster = start_local_cluster(int(n_workers), threads, **kwargs)
    logger.info("started a LocalCluster with %d workers: %s", n_workers, cluster.dashboard_link)
    client = Client(cluster)
    with contextlib.suppress(Exception):  # a restarted worker ignores Ctrl-C too
        client.register_plugin(_ignore_interrupt_plugin(), name="sheap-dask-ignore-sigint")
    return client, cluster


def worker_problems(workers: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Why the workers of ``client.scheduler_info()["workers"]`` may stall a fit (empty if fine).

    A worker whose memory limit is below ``sheap_dask.worker.min_memory`` pauses once JAX has
    compiled a model (Dask pauses at 80% of the limit by default), and a paused worker runs
    nothing: without this warning the fit just waits.
    """
    from dask.utils import format_bytes, parse_bytes

    minimum = parse_bytes(config.get("worker.min_memory") or 0)
    small = {w.get("name", addr): w["memory_limit"] for addr, w in workers.items() if 0 < (w.get("memory_limit") or 0) < minimum}
    paused = sorted(str(w.get("name", addr)) for addr, w in workers.items() if w.get("status") == "paused")
    problems = []
    if small:
        limits = ", ".join(f"{name}: {format_bytes(limit)}" for name, limit in sorted(small.items(), key=str))
        problems.append(
            f"{len(small)} of {len(workers)} workers have a memory limit below {format_bytes(minimum)} ({limits}); "
            "a JAX worker holds ~0.75 GiB once a model is compiled and Dask pauses it at 80% of its limit, "
            "which stalls the fit. Give each worker at least 2 GiB (`dask worker --memory-limit 2GiB`, "
            "LocalCluster(memory_limit=...), worker.resources.limits.memory in the Helm chart, or fewer "
            "workers in the cluster fit_dataset starts: sheap_dask.cluster.n_workers), "
            "or lower sheap_dask.worker.min_memory to silence this warning."
        )
    if paused:
        problems.append(
            f"workers {', '.join(paused)} are paused (memory above distributed.worker.memory.pause of their "
            "limit): they run no task until their memory drops. Restart them or give them more memory."
        )
    return problems


def start_local_cluster(n_workers: int, threads_per_worker: int = 1, **kwargs):
    """A ``LocalCluster`` set up for JAX workers.

    Spawned worker processes (JAX deadlocks in forked ones), XLA's and BLAS's thread pools
    sized to each worker's threads, glibc malloc settings that keep XLA's buffers cheap
    (``distributed_nanny.yaml``), a free dashboard port. The workers ignore SIGINT: Ctrl-C in
    a terminal reaches every process of its group, and the client (this process) is the one
    that stops the fit and closes them; otherwise each worker prints its own traceback.
    """
    from distributed import LocalCluster

    options = dict(
        processes=True,
        dashboard_address=config.get("cluster.dashboard_address"),
        memory_limit=config.get("cluster.memory_limit"),
        env=_worker_env(threads_per_worker),
        silence_logs=logging.WARNING,
    )
    options.update(kwargs)
    environ = {**dask.config.get("distributed.nanny.pre-spawn-environ", {}), **_NANNY_ENVIRON}
    with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}), _children_ignore_sigint():
        return LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker, **options)


@contextlib.contextmanager
def _children_ignore_sigint():
    """Processes spawned inside inherit an ignored SIGINT (a disposition of SIG_IGN survives
    exec, and Python keeps it); this process ignores it meanwhile too, for those seconds."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _ignore_sigint() -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _ignore_interrupt_plugin():
    from distributed import WorkerPlugin

    class IgnoreInterrupt(WorkerPlugin):
        """Workers of a local cluster leave Ctrl-C to the client (also once restarted)."""

        def setup(self, worker):
            _ignore_sigint()

    return IgnoreInterrupt()


with open(Path(__file__).with_name("distributed_nanny.yaml")) as _f:
    _NANNY_ENVIRON = {k: str(v) for k, v in yaml.safe_load(_f)["distributed"]["nanny"]["pre-spawn-environ"].items()}


def _worker_env(threads: int) -> dict:
    n = config.get("worker.xla_threads") or threads
    return {
        "XLA_FLAGS": f"--xla_cpu_multi_thread_eigen={'true' if n > 1 else 'false'} intra_op_parallelism_threads={n}",
        "OMP_NUM_THREADS": str(n),
        "OPENBLAS_NUM_THREADS": str(n),
        "MKL_NUM_THREADS": str(n),
    }


def progress_bar(total: int, enabled: bool, desc: str, unit: str = "chunk"):
    if not enabled:
        return contextlib.nullcontext(None)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit)


def compute(result: xr.Dataset, client, progress: bool) -> xr.Dataset:
    if client is None:
        if progress:
            from dask.diagnostics import ProgressBar

            with ProgressBar():
                return result.compute()
        return result.compute()
    from distributed import as_completed, futures_of

    persisted = client.persist(result)
    futures = futures_of(persisted)
    with progress_bar(len(futures), progress, "fitting", unit="task") as bar:
        for _ in as_completed(futures):
            if bar is not None:
                bar.update(1)
    return persisted.compute()
