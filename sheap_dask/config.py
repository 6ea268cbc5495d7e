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

_WARNED: set[str] = set()


def known_keys(tree: dict | None = None, prefix: str = "") -> dict[str, Any]:
    """Every documented key below ``sheap_dask`` as ``"section.key" -> default``."""
    tree = DEFAULTS["sheap_dask"] if tree is None else tree
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(known_keys(value, f"{name}."))
        else:
            out[name] = value
    return out


def unknown_keys() -> list[str]:
    """Keys set under ``sheap_dask`` (YAML files, env vars, ``dask.config.set``) that no
    part of the package reads: usually a misspelling."""
    known = known_keys()
    free_form = {k for k, v in known.items() if isinstance(v, dict)}  # e.g. fit.lbfgs_options

    def walk(tree: Any, prefix: str) -> list[str]:
        found = []
        if not isinstance(tree, dict):
            return found
        for key, value in tree.items():
            name = f"{prefix}{str(key).replace('-', '_')}"
            if name in free_form:
                continue
            if name in known:
                continue
            if isinstance(value, dict) and any(k.startswith(f"{name}.") for k in known):
                found += walk(value, f"{name}.")
            else:
                found.append(name)
        return found

    return walk(dask.config.get("sheap_dask", default={}), "")


def warn_unknown_keys() -> list[str]:
    """Warn once per unknown ``sheap_dask.*`` key, naming the closest known key."""
    import difflib
    import warnings

    unknown = [k for k in unknown_keys() if k not in _WARNED]
    for key in unknown:
        _WARNED.add(key)
        close = difflib.get_close_matches(key, list(known_keys()), n=1, cutoff=0.5)
        hint = f"; did you mean sheap_dask.{close[0]}?" if close else "; see sheap_dask/sheap_dask.yaml for the known keys."
        warnings.warn(f"unknown configuration key sheap_dask.{key} is ignored{hint}", UserWarning, stacklevel=3)
    return unknown


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
    demo run twice) loads the compiled program from disk instead. Programs that compile in
    less than ``worker.compilation_cache_min_seconds`` (default 0: all) are not written:
    JAX's own default, 1 s, leaves out the many small programs of the error propagation and
    the derived quantities, which every new worker then compiles again (a third of the SDSS
    catalogue's time in a new process with a filled cache: ``benchmarks/bench_cache.py``).
    Returns the directory, or None when disabled (``null`` in the config) or JAX already has
    one configured (its settings are then left alone, as is a
    ``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` set in the environment).
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
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        key = "worker.compilation_cache_min_seconds"
        value = get(key, 0.0)
        try:
            minimum = float(value)
        except (TypeError, ValueError):
            minimum = float("nan")
        if not minimum >= 0.0:
            from .errors import OptionError

            raise OptionError(f"sheap_dask.{key}={value!r} must be a number of seconds >= 0 "
                              "(0 caches every compiled program); set it with dask.config.set or "
                              "DASK_SHEAP_DASK__WORKER__COMPILATION_CACHE_MIN_SECONDS")
        jax.config.update("jax_persistent_cache_min_compile_time_secs", minimum)
    return path


def _cpu_share() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1
