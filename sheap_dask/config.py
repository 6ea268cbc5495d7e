"""Package defaults, registered with ``dask.config`` under the namespace ``sheap_dask``.

Every default of ``fit_dataset``, the chunk layer and the CLI lives in ``sheap_dask.yaml``
beside this module, so ``dask.config.set``, a YAML file in ``~/.config/dask`` or
``DASK_SHEAP_DASK__SECTION__KEY`` environment variables (set by the Helm chart on workers)
override any knob.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import dask.config
import yaml

DEFAULTS_FILE = Path(__file__).with_name("sheap_dask.yaml")

with open(DEFAULTS_FILE) as _f:
    DEFAULTS: dict = yaml.safe_load(_f)

# update_defaults keeps values already set from files/env and fills in the rest.
dask.config.update_defaults(DEFAULTS)


def get(key: str, default: Any = None) -> Any:
    """Read ``sheap_dask.<key>`` from dask.config (env, files and ``dask.config.set`` applied)."""
    return dask.config.get(f"sheap_dask.{key}", default=default)


def resolve(value: Any, key: str) -> Any:
    """``value`` when given, else the configured default ``sheap_dask.<key>``."""
    return get(key) if value is None else value


def configure_threads(n_threads: int | None = None) -> int:
    """Size XLA's and BLAS's thread pools to this process's CPU share.

    Must run before JAX initialises its backend (the worker plugin and the CLI call it).
    JAX otherwise starts ~20 threads per process and several workers on one machine fight
    over the cores.
    """
    n = n_threads or get("worker.xla_threads") or _cpu_share()
    n = max(1, int(n))
    flags = os.environ.get("XLA_FLAGS", "")
    if "intra_op_parallelism_threads" not in flags:
        extra = f"--xla_cpu_multi_thread_eigen={'true' if n > 1 else 'false'} intra_op_parallelism_threads={n}"
        os.environ["XLA_FLAGS"] = f"{flags} {extra}".strip()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(n))
    return n


_CACHE_ENABLED = False


def enable_compilation_cache() -> str | None:
    """Point JAX's persistent compilation cache at ``sheap_dask.worker.compilation_cache``.

    Compiling the batched solve of a region model takes tens of seconds per process; with
    the cache every later process on the machine (the other workers, the next run, the
    demo run twice) loads the compiled program from disk instead. Returns the directory,
    or None when disabled (``null`` in the config) or JAX already has one configured.
    """
    global _CACHE_ENABLED
    if _CACHE_ENABLED:
        return None
    _CACHE_ENABLED = True
    import jax

    path = get("worker.compilation_cache")
    if not path or jax.config.jax_compilation_cache_dir:
        return None
    path = os.path.expanduser(str(path))
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:  # read-only home (e.g. a locked-down pod): compile every time
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    return path


def _cpu_share() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1
