"""sheap_dask: fit models to very many spectra with JAX on Dask.

Heavy submodules (JAX, Dask) load on first use, so ``import sheap_dask`` and the CLI stay fast.
"""

from __future__ import annotations

import importlib

from . import config as _config  # registers the defaults with dask.config
from ._version import __version__
from .explore import accessor as _accessor  # noqa: F401  (registers ds.sheap; imports no JAX)

_config.warn_unknown_keys()

# public name -> submodule that defines it
_LAZY = {
    "Parameters": "parameters",
    "build_loss_function": "loss",
    "Minimizer": "minimizer",
    "MinimizeResult": "minimizer",
    "SLSQP": "slsqp",
    "FitResult": "slsqp",
    "Model": "model",
    "ContinuumStage": "model",
    "Status": "status",
    "Quality": "quality",
    "find_model": "model",
    "fit_chunk": "chunk",
    "fit_dataset": "fit",
    "open_fits": "store",
    "fit_catalog": "catalog",
    "open_catalog": "catalog",
    "start_local_cluster": "cluster",
}
_SUBMODULES = {"models", "io", "errors", "config", "parameters", "loss", "minimizer", "slsqp", "chunk", "fit", "accessor", "status",
               "model", "cli", "synthetic", "lm", "astro", "identity", "options", "compiled", "quality",
               "cluster", "store", "stores", "inputs", "derived", "explore", "units", "catalog", "catalog_table"}

__all__ = ["__version__", *_LAZY, "models", "io"]


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'sheap_dask' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
