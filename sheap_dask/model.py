"""``Model``: a JAX model function plus the :class:`~sheap_dask.parameters.Parameters` it takes.

Every model sheap_dask fits is a ``Model``: user functions and the built-in AGN regions alike,
so all of them run through :func:`sheap_dask.fit_dataset` unchanged.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from .errors import ModelError

__all__ = ["Model"]


class Model:
    """A spectral model ``func(wavelength, phys_params) -> flux`` with its parameters.

    Parameters
    ----------
    func : callable
        Pure ``jax.numpy`` function of a wavelength array (n_pix,) in Angstrom and the
        physical parameter vector (n_params,), in the order of ``params.names``; returns the
        model flux (n_pix,). It is jit-compiled and vmapped over spectra, so it must not
        branch on values in Python.
    params : Parameters
        Names, initial values, bounds, ties and fixed values.
    name : str, optional
        Short name used in result attrs and logs; default ``func.__name__``.
    window : (float, float), optional
        Rest-frame wavelength range fitted, in Angstrom. Pixels outside get zero weight,
        so a full spectrum can be passed as it is. ``None`` fits every pixel.
    initializer : callable, optional
        ``initializer(wavelength, flux, ivar) -> (n_spectra, n_params)`` physical initial
        values estimated from the data, vectorized over spectra (wavelength is (n_pix,) or
        (n_spectra, n_pix), rest frame). Used when ``fit_dataset`` gets no ``init``. Values
        are clipped into the bounds; non-finite values fall back to ``params.values``.
    components : mapping of str to callable, optional
        Additive parts of the model, each ``f(wavelength, phys_params) -> flux``, for plots
        and derived quantities.
    metadata : mapping, optional
        Free-form, JSON-serializable description (line catalogue, references, ...).
    description : str, optional
        One-line human description stored in result attrs.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> import sheap_dask as sd
    >>> p = sd.Parameters().add("amp", 1.0, min=0).add("center", 5000.0).add("sigma", 5.0, min=0.1)
    >>> gauss = lambda x, p: p[0] * jnp.exp(-0.5 * ((x - p[1]) / p[2]) ** 2)
    >>> model = sd.Model(gauss, p, name="gauss")
    >>> model.n_params
    3
    """

    def __init__(
        self,
        func: Callable,
        params,
        *,
        name: str | None = None,
        window: tuple[float, float] | None = None,
        initializer: Callable | None = None,
        components: Mapping[str, Callable] | None = None,
        metadata: Mapping[str, Any] | None = None,
        description: str | None = None,
    ) -> None:
        if not callable(func):
            raise ModelError(f"Model(func=...) must be callable, got {type(func).__name__}; pass a function f(wavelength, params) -> flux.")
        if not hasattr(params, "names") or not hasattr(params, "raw_to_phys"):
            raise ModelError(
                f"Model(params=...) must be a sheap_dask.Parameters, got {type(params).__name__}; "
                "build one with sd.Parameters().add(name, value, min=..., max=...)."
            )
        if len(params.names) == 0:
            raise ModelError("Model(params=...) has no parameters; add at least one with Parameters.add(...).")
        if window is not None:
            window = (float(window[0]), float(window[1]))
            if not window[0] < window[1]:
                raise ModelError(f"Model(window={window}) must be (low, high) with low < high, in Angstrom.")
        self.func = func
        self.params = params
        self.name = name or getattr(func, "__name__", "model")
        self.window = window
        self.initializer = initializer
        self.components = dict(components or {})
        self.metadata = dict(metadata or {})
        self.description = description or f"sheap_dask.Model {self.name!r} with {len(params.names)} parameters"

    # -- introspection -------------------------------------------------------------------
    @property
    def param_names(self) -> list[str]:
        return list(self.params.names)

    @property
    def n_params(self) -> int:
        return len(self.params.names)

    @property
    def n_free(self) -> int:
        return len(self.params.free_names)

    def __repr__(self) -> str:
        window = f", window={self.window}" if self.window else ""
        return f"Model({self.name!r}, n_params={self.n_params}, n_free={self.n_free}{window})"

    def to_dict(self) -> dict:
        """JSON-serializable description (stored in result attrs, compared on resume)."""
        return {
            "name": self.name,
            "description": self.description,
            "window": list(self.window) if self.window else None,
            "params": self.params.spec(),
            "func": _callable_id(self.func),
            "metadata": self.metadata,
        }

    def fingerprint(self) -> str:
        """Stable hash of the model's definition: same model, same fingerprint."""
        text = json.dumps(self.to_dict(), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    # -- evaluation ----------------------------------------------------------------------
    def __call__(self, wavelength, params):
        """Evaluate the model (JAX): ``func(wavelength, params)``."""
        return self.func(wavelength, params)

    def evaluate(self, wavelength, params) -> np.ndarray:
        """Evaluate for one spectrum (n_params,) or many (n_spectra, n_params); numpy out."""
        import jax
        import jax.numpy as jnp

        wavelength = jnp.asarray(wavelength)
        params = jnp.asarray(params)
        if params.ndim == 1:
            return np.asarray(self.func(wavelength, params))
        wl_axis = 0 if wavelength.ndim == 2 else None
        return np.asarray(jax.vmap(self.func, in_axes=(wl_axis, 0))(wavelength, params))

    def evaluate_components(self, wavelength, params) -> dict[str, np.ndarray]:
        """Evaluate each named component, like :meth:`evaluate`."""
        import jax
        import jax.numpy as jnp

        wavelength = jnp.asarray(wavelength)
        params = jnp.asarray(params)
        out = {}
        for name, f in self.components.items():
            if params.ndim == 1:
                out[name] = np.asarray(f(wavelength, params))
            else:
                wl_axis = 0 if wavelength.ndim == 2 else None
                out[name] = np.asarray(jax.vmap(f, in_axes=(wl_axis, 0))(wavelength, params))
        return out

    def initial_values(self, wavelength, flux, ivar) -> np.ndarray:
        """Physical initial values (n_spectra, n_params) for a block of spectra.

        Uses the model's data-driven ``initializer`` when it has one, then clips into the
        bounds; otherwise repeats ``params.values``.
        """
        flux = np.asarray(flux)
        n = flux.shape[0]
        default = np.broadcast_to(np.asarray(self.params.values, dtype=np.float64), (n, self.n_params))
        if self.initializer is None:
            return np.array(default)
        with np.errstate(all="ignore"):
            guess = np.asarray(self.initializer(np.asarray(wavelength), flux, np.asarray(ivar)), dtype=np.float64)
        if guess.shape != default.shape:
            raise ModelError(
                f"Model {self.name!r}: initializer returned shape {guess.shape}, expected {default.shape} "
                "(n_spectra, n_params)."
            )
        guess = np.where(np.isfinite(guess), guess, default)
        return _clip_inside(guess, np.asarray(self.params.lower), np.asarray(self.params.upper))


def _clip_inside(values: np.ndarray, lower: np.ndarray, upper: np.ndarray, frac: float = 1e-6) -> np.ndarray:
    """Clip strictly inside finite bounds: the logistic map cannot represent the bound itself."""
    span = np.where(np.isfinite(upper - lower), upper - lower, 1.0)
    eps = frac * np.maximum(span, 1e-300)
    lo = np.where(np.isfinite(lower), lower + eps, -np.inf)
    hi = np.where(np.isfinite(upper), upper - eps, np.inf)
    return np.clip(values, lo, hi)


def _callable_id(func: Callable) -> str:
    """A stable identity for a function: its source when available, else its qualified name."""
    try:
        return inspect.getsource(func)
    except (OSError, TypeError):
        return f"{getattr(func, '__module__', '')}.{getattr(func, '__qualname__', repr(func))}"
