"""``Model``: a JAX model function plus the :class:`~sheap_dask.parameters.Parameters` it takes.

Every model sheap_dask fits is a ``Model``: user functions and the built-in AGN regions alike,
so all of them run through :func:`sheap_dask.fit_dataset` unchanged.

A model's identity (:meth:`Model.identity`) is a content hash of everything that changes its
output: the parameters (names, values, bounds, ties, fixed values), the window, the flux
parameters, the code, closure values, defaults and globals of its functions (user functions
by content, package functions by name and version), template arrays by content, the
metadata, and a user-declared ``version``. Built-in regions are identified by their declared
specification plus the package version. Compiled-program caches, resume and the accessor all
use it.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from .errors import ModelError
from .identity import Tokenizer

__all__ = ["Model", "ContinuumStage", "find_model", "ModelIdentityWarning"]

# Models alive in this process, so a fit result can find the model that made it by identity
# without the Dataset layer registering anything (weak: dropping a model frees it).
_LIVE: weakref.WeakSet = weakref.WeakSet()
_LIVE_LOCK = threading.Lock()
# Attributes behind the cached part of the identity (setting one drops the cache).
_DEFINING = frozenset({"func", "initializer", "components", "declared_identity", "params", "continuum_stage", "windows"})


class ModelIdentityWarning(UserWarning):
    """Part of a model could not be captured by its identity (declare a ``version=``)."""


def find_model(fingerprint: str, param_names: Sequence[str] | None = None):
    """A live :class:`Model` of this process whose fingerprint (or full identity) is
    ``fingerprint``, or ``None``; with ``param_names``, only one with those parameters."""
    if not fingerprint:
        return None
    with _LIVE_LOCK:
        models = list(_LIVE)
    for model in models:
        ident = model.identity()
        if (ident == fingerprint or ident[:16] == fingerprint) and (param_names is None or model.param_names == list(param_names)):
            return model
    return None


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
    window : (float, float) or sequence of them, optional
        Rest-frame wavelength range(s) fitted, in Angstrom. Pixels outside get zero weight,
        so a full spectrum can be passed as it is. ``None`` fits every pixel. With several
        ranges (e.g. line-free continuum windows), ``model.windows`` holds them and
        ``model.window`` their hull.
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
    flux_params : sequence of str, optional
        Parameters proportional to the flux unit (amplitudes, line fluxes, continuum
        normalisations): the fit scales each spectrum to order unity and these parameters
        with it, so results do not depend on the flux unit. Default: detected when the model
        is built (the parameters the model is linear in, if the model is proportional to
        them jointly); ``()`` fits in the input's unit.
    version : str, optional
        Declared version, part of the identity. Set it when the model's output depends on
        something its identity cannot see (a file read at call time, a C extension's state).
    continuum_stage : ContinuumStage, optional
        Fit a continuum model on line-free windows first, then this model with the
        continuum's parameters fixed at those values (the pseudo-continuum method of the
        quasar catalogues): see :class:`ContinuumStage`.
    check : bool
        Evaluate the model once on its own window and parameter values when it is built, so
        an out-of-range parameter index (which JAX clamps silently) or a non-vmappable
        function fails here with a clear error. Default True.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> import sheap_dask as sd
    >>> p = sd.Parameters().add("amp", 1.0, min=0).add("center", 5000.0).add("sigma", 5.0, min=0.1)
    >>> gauss = lambda x, p: p[0] * jnp.exp(-0.5 * ((x - p[1]) / p[2]) ** 2)
    >>> model = sd.Model(gauss, p, name="gauss")
    >>> model.n_params, model.flux_params
    (3, ('amp',))
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
        flux_params: Sequence[str] | None = None,
        version: str | None = None,
        continuum_stage: ContinuumStage | None = None,
        check: bool = True,
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
        windows = _windows(window, "window")
        if version is not None and not isinstance(version, str):
            raise ModelError(f"Model(version={version!r}) must be a string, e.g. version='2'.")
        self.func = func
        self.params = params
        self.name = name or getattr(func, "__name__", "model")
        self.windows = windows
        self.window = (min(w[0] for w in windows), max(w[1] for w in windows)) if windows else None
        self.initializer = initializer
        self.components = dict(components or {})
        self.metadata = dict(metadata or {})
        self.description = description or f"sheap_dask.Model {self.name!r} with {len(params.names)} parameters"
        self.version = version
        self.declared_identity = None
        if continuum_stage is not None:
            continuum_stage.check(params)
        self.continuum_stage = continuum_stage
        if flux_params is not None:
            flux_params = tuple(str(p) for p in flux_params)
            unknown = [p for p in flux_params if p not in params.names]
            if unknown:
                raise ModelError(f"Model {self.name!r}: flux_params {unknown} are not parameters of the model ({list(params.names)}).")
        if check:
            detected = _check_model_function(self, detect=flux_params is None)
            if flux_params is None:
                flux_params = detected
        self.flux_params = tuple(flux_params or ())
        with _LIVE_LOCK:
            _LIVE.add(self)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _DEFINING:
            self.__dict__.pop("_token", None)
        object.__setattr__(self, name, value)

    def __getstate__(self) -> dict:
        # The identity is recomputed where the model is unpickled (a worker): it must be the
        # same there, and a test checks that it is.
        state = dict(self.__dict__)
        state.pop("_token", None)
        state.pop("_line_stage", None)
        return state

    def __sheap_identity__(self) -> str:
        return self.identity()

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("version", None)
        self.__dict__.setdefault("declared_identity", None)
        self.__dict__.setdefault("flux_params", ())
        self.__dict__.setdefault("continuum_stage", None)
        self.__dict__.setdefault("windows", (self.window,) if self.window else ())
        with _LIVE_LOCK:
            _LIVE.add(self)

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
        """JSON-serializable description (stored in result attrs; resume compares the identity)."""
        return {
            "name": self.name,
            "description": self.description,
            "window": list(self.window) if self.window else None,
            "windows": [list(w) for w in self.windows] if len(self.windows) > 1 else None,
            "continuum_stage": None if self.continuum_stage is None else self.continuum_stage.describe(),
            "params": self.params.spec(),
            "flux_params": list(self.flux_params),
            "func": f"{getattr(self.func, '__module__', '')}.{getattr(self.func, '__qualname__', type(self.func).__name__)}",
            "version": self.version,
            "identity": self.identity(),
            "metadata": self.metadata,
        }

    def identity(self) -> str:
        """Content hash (hex SHA-256) of everything that defines the model's output.

        The same in every process, after pickling and in a new session; different whenever
        the parameters, window, flux parameters, functions (code, closure values, defaults,
        globals), templates, metadata or declared ``version`` differ. Built-in regions hash
        their declared specification and the package version instead of their functions.
        """
        tokenizer = Tokenizer()
        definition = self.__dict__.get("_token")
        if definition is None:  # functions and templates: hashed once (attribute changes reset it)
            definition = tokenizer.token(
                self.declared_identity
                if self.declared_identity is not None
                else {"func": self.func, "initializer": self.initializer, "components": self.components}
            )
            self.__dict__["_token"] = definition
        # small and mutable in place: hashed every time
        identity = tokenizer.token(
            {
                "definition": definition,
                "params": self.params.spec(),
                "windows": [list(w) for w in self.windows],
                "flux_params": list(self.flux_params),
                "continuum_stage": None if self.continuum_stage is None else self.continuum_stage.spec(),
                "version": self.version,
                "metadata": self.metadata,
            }
        )
        if tokenizer.uncaptured and not self.version:
            warnings.warn(
                f"model {self.name!r}: its identity cannot capture {sorted(set(tokenizer.uncaptured))}; a change "
                "there would not be noticed by the compile cache or by resume. Declare the model's version "
                "with Model(..., version='1') and change it whenever that part changes.",
                ModelIdentityWarning,
                stacklevel=2,
            )
        return identity

    def line_stage(self) -> Model:
        """With a continuum stage: this model with the continuum's parameters fixed (their
        values then come from each spectrum's initial values: the continuum fit)."""
        if self.continuum_stage is None:
            raise ModelError(f"model {self.name!r} has no continuum stage.")
        cached = self.__dict__.get("_line_stage")
        if cached is None:
            fixed = set(self.continuum_stage.model.param_names)
            params = self.params.copy()
            params.fix(fixed)
            cached = Model(self.func, params, name=f"{self.name}_lines", window=list(self.windows) or None,
                           initializer=self.initializer, components=self.components, metadata=self.metadata,
                           description=f"{self.description} (lines on a fixed continuum)", flux_params=self.flux_params,
                           version=self.version, check=False)
            cached.component_objects = getattr(self, "component_objects", {})
            cached.declared_identity = None if self.declared_identity is None else {"lines_of": self.declared_identity}
            self.__dict__["_line_stage"] = cached
        return cached

    def fingerprint(self) -> str:
        """The first 16 hex digits of :meth:`identity` (stored in result attrs)."""
        return self.identity()[:16]

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

    def initial_values(self, wavelength, flux, ivar, *, clip: bool = True) -> np.ndarray:
        """Physical initial values (n_spectra, n_params) for a block of spectra.

        Uses the model's data-driven ``initializer`` when it has one (non-finite values fall
        back to ``params.values``), then, with ``clip``, clips strictly inside the bounds;
        otherwise repeats ``params.values``. The chunk layer clips after scaling each
        spectrum to order unity (``clip=False``): the margin is relative to that unit.
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
        return _clip_inside(guess, np.asarray(self.params.lower), np.asarray(self.params.upper)) if clip else guess


class ContinuumStage:
    """A continuum fitted on line-free windows before the lines (the pseudo-continuum method).

    Parameters
    ----------
    model : Model
        The continuum alone (power law, FeII, Balmer continuum, host...), whose parameters
        have the same names as the corresponding parameters of the full model.
    windows : sequence of (float, float)
        Rest-frame line-free ranges (Angstrom) the continuum is fitted on.

    lines : Model, optional
        The lines alone (the full model's other parameters, same names). Then the second
        stage fits ``lines`` to the spectrum minus the continuum found, and the continuum is
        not evaluated again in every iteration; without it, the full model is fitted with the
        continuum's parameters fixed (``Model.line_stage``).
    refine_steps : int
        With ``lines``: after the two stages, this many projected Gauss-Newton steps of the
        continuum over the whole window on the spectrum minus the lines found (lines held),
        each kept only where it lowers the objective (default 0: the continuum stays the
        windows' fit; with steps, that fit skips its batched restarts: the steps move what it
        left on a bound). The windows leave the starlight/power-law split of a host poorly
        constrained; the window between them (the lines subtracted) carries the rest of it.
    joint_steps : int
        With ``lines``: after the refinement and the error propagation, this many projected
        Gauss-Newton steps of the continuum and the detected lines together over the whole
        window (the staged solution's Jacobian serves every step), each kept only where it
        lowers the objective (default 0). They take up the correlation between the starlight
        and the lines that the two stages leave out. Lines the staged fit did not detect, and
        parameters it left on a bound or undefined, are held: the steps polish what the staged
        fit found and cannot switch on a broad line it did not find. The errors stay the staged
        fit's (with the continuum's uncertainty propagated), which the joint steps can only
        shrink, so they err on the large side.

    The chunk layer fits ``model`` on ``windows`` (batched, with restarts, absorber
    rejection and the fallback like any fit), then the lines on the window with the continuum
    held at the values found. The result
    holds both: the continuum's parameters and errors from the first stage, the lines' from
    the second (Shen et al. 2011, ApJS 194, 45; Wu & Shen 2022, ApJS 263, 42).
    """

    def __init__(self, model: Model, windows: Sequence[tuple[float, float]], *, lines: Model | None = None, refine_steps: int = 0,
                 joint_steps: int = 0):
        for arg, value in (("model", model), ("lines", lines)):
            if value is not None and not isinstance(value, Model):
                raise ModelError(f"ContinuumStage({arg}=...) must be a sheap_dask.Model, got {type(value).__name__}.")
        self.model = model
        self.lines = lines
        for arg, steps in (("refine_steps", refine_steps), ("joint_steps", joint_steps)):
            if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 0:
                raise ModelError(f"ContinuumStage({arg}={steps!r}) must be an integer >= 0.")
            if steps and lines is None:
                raise ModelError(f"ContinuumStage({arg}=...) needs lines=...: its steps start from the lines found.")
        self.refine_steps = int(refine_steps)
        self.joint_steps = int(joint_steps)
        self.windows = _windows(list(windows), "ContinuumStage(windows=...)")
        if not self.windows:
            raise ModelError("ContinuumStage(windows=...) needs at least one (low, high) range.")
        if lines is not None:
            shared = set(lines.param_names) & set(model.param_names)
            if shared:
                raise ModelError(f"ContinuumStage: the lines model shares parameters {sorted(shared)} with the continuum model.")

    def check(self, params) -> None:
        expected = self.model.param_names + (self.lines.param_names if self.lines is not None else [])
        if self.lines is not None and sorted(expected) != sorted(params.names):
            raise ModelError(
                f"ContinuumStage: continuum {self.model.param_names} and lines {self.lines.param_names} parameters must "
                f"together be the model's {list(params.names)}."
            )
        missing = [n for n in self.model.param_names if n not in params.names]
        if missing:
            raise ModelError(f"continuum stage parameters {missing} are not parameters of the model ({list(params.names)}).")
        tied = [n for n in self.model.param_names if params[n].tie is not None]
        if tied:
            raise ModelError(f"continuum stage parameters {tied} are tied in the model; the stage fixes them, so they must be free.")

    def spec(self) -> dict:
        out = {"model": self.model.identity(), "windows": [list(w) for w in self.windows],
               "lines": None if self.lines is None else self.lines.identity()}
        out.update(self._steps())
        return out

    def describe(self) -> dict:
        out = {"model": self.model.name, "params": self.model.param_names, "windows": [list(w) for w in self.windows],
               "lines": None if self.lines is None else self.lines.name}
        out.update(self._steps())
        return out

    def _steps(self) -> dict:
        """The non-zero step counts (absent when 0, and in stages pickled before they existed,
        so such a stage keeps its identity)."""
        return {name: getattr(self, name) for name in ("refine_steps", "joint_steps") if getattr(self, name, 0)}

    def __repr__(self) -> str:
        return f"ContinuumStage({self.model.name!r}, windows={list(self.windows)})"


def _windows(window, argument: str) -> tuple[tuple[float, float], ...]:
    """Normalise ``(low, high)`` or a sequence of them into a tuple of float pairs."""
    if window is None:
        return ()
    items = list(window)
    if len(items) == 2 and all(isinstance(v, (int, float, np.integer, np.floating)) for v in items):
        items = [items]
    out = []
    for item in items:
        try:
            lo, hi = (float(v) for v in item)
        except (TypeError, ValueError):
            raise ModelError(f"{argument}={window!r} must be (low, high) or a list of (low, high) ranges in Angstrom.") from None
        if not lo < hi:
            raise ModelError(f"{argument}: range ({lo}, {hi}) must have low < high, in Angstrom.")
        out.append((lo, hi))
    return tuple(sorted(out))


def _clip_inside(values: np.ndarray, lower: np.ndarray, upper: np.ndarray, frac: float = 1e-6) -> np.ndarray:
    """Clip strictly inside finite bounds: the logistic map cannot represent the bound itself."""
    span = np.where(np.isfinite(upper - lower), upper - lower, 1.0)
    eps = frac * np.maximum(span, 1e-300)
    lo = np.where(np.isfinite(lower), lower + eps, -np.inf)
    hi = np.where(np.isfinite(upper), upper - eps, np.inf)
    return np.clip(values, lo, hi)


def _clip_inside(values: np.ndarray, lower: np.ndarray, upper: np.ndarray, frac: float = 1e-6) -> np.ndarray:
    """Clip strictly inside finite bounds: the logistic map cannot represent the bound itself."""
    span = np.where(np.isfinite(upper - lower), upper - lower, 1.0)
    eps = frac * np.maximum(span, 1e-300)
    lo = np.where(np.isfinite(lower), lower + eps, -np.inf)
    hi = np.where(np.isfinite(upper), upper - eps, np.inf)
    return np.clip(values, lo, hi)


# -- the build-time check -------------------------------------------------------------------------
_CHECK_PIXELS = 2048  # fine enough that a narrow line between samples still moves the output


def _check_model_function(model: Model, *, detect: bool) -> tuple[str, ...]:
    """Evaluate ``model.func`` on its window and parameter values (jitted, vmapped, index-checked).

    Raises :class:`ModelError` when the function reads a parameter index beyond
    ``n_params`` (JAX would clamp it silently), cannot be vmapped, or returns the wrong
    shape. With ``detect``, returns the flux parameters: those the model is linear in, when
    the model is proportional to all of them jointly (a sum of amplitude x shape terms).
    """
    import jax
    import jax.numpy as jnp
    from jax.experimental import checkify

    params = model.params
    n = len(params.names)
    lo, hi = model.window or (1000.0, 10000.0)
    wl = np.linspace(lo, hi, _CHECK_PIXELS)
    base = _sample_inside(params)
    probes = [base]
    if detect:  # two steps along each parameter: linear ones move the output in proportion
        for j in range(n):
            step = 0.5 * max(abs(base[j]), 1.0)
            for k in (1, 2):
                p = base.copy()
                p[j] += k * step
                probes.append(p)
    batch = np.stack(probes)
    checked = jax.jit(checkify.checkify(jax.vmap(model.func, in_axes=(None, 0)), errors=checkify.index_checks))

    def evaluate(points: np.ndarray) -> np.ndarray:
        try:
            with jax.enable_x64(True):
                err, out = checked(jnp.asarray(wl), jnp.asarray(points))
                message = err.get()
                out = np.asarray(out, dtype=np.float64)
        except Exception as exc:  # noqa: BLE001 - any failure to evaluate is the model's
            raise ModelError(
                f"model {model.name!r} fails when evaluated on its own parameter values (vmapped over spectra, "
                f"wavelength {lo:g}-{hi:g} A): {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} A model function must be pure jax.numpy, "
                "take (wavelength (n_pix,), params (n_params,)) and not branch on values in Python."
            ) from exc
        if message:
            raise ModelError(
                f"model {model.name!r} reads a parameter that does not exist: {message.strip()} The model has "
                f"{n} parameters {list(params.names)}; index p[0] .. p[{n - 1}] only."
            )
        if out.shape != (len(points), _CHECK_PIXELS):
            raise ModelError(
                f"model {model.name!r} returns shape {out.shape[1:]} for {_CHECK_PIXELS} wavelengths; it must return one "
                "flux value per wavelength, shape (n_pix,)."
            )
        return out

    out = evaluate(batch)
    if not detect:
        return ()
    linear = _linear_parameters(model.params, out)
    if not linear:
        return ()
    doubled = base.copy()
    doubled[linear] *= 2.0
    f_doubled = evaluate(np.repeat(doubled[None], len(batch), axis=0))[0]  # same shape: no recompile
    ok = np.all(np.isfinite(out), axis=0)
    scale = np.max(np.abs(out[0][ok])) + 1e-300
    if np.max(np.abs(f_doubled[ok] - 2.0 * out[0][ok])) <= 1e-7 * scale:
        return tuple(params.names[j] for j in linear)
    return ()


def _sample_inside(params) -> np.ndarray:
    """A generic point inside the bounds (ties applied): not the initial values, where
    amplitudes are often 0 and every test of proportionality passes trivially."""
    import jax
    import jax.numpy as jnp

    raw0 = np.asarray(params.raw_init(), dtype=np.float64)
    shift = 0.3 + 0.1 * np.arange(raw0.size) / max(raw0.size, 1)
    with jax.enable_x64(True):
        return np.asarray(params.raw_to_phys(jnp.asarray(raw0 + shift)), dtype=np.float64)


def _linear_parameters(params, out: np.ndarray) -> list[int]:
    """Indices of the parameters the model is linear in (``out``: base, then two steps per
    parameter); a tie keeps its target and source together, additive ties never scale."""
    ok = np.all(np.isfinite(out), axis=0)
    if not ok.any():
        return []
    f0 = out[0][ok]
    scale = np.max(np.abs(f0)) + 1e-300
    linear = []
    for j in range(len(params.names)):
        f1, f2 = out[1 + 2 * j][ok], out[2 + 2 * j][ok]
        moved = np.max(np.abs(f1 - f0))
        if moved > 1e-9 * scale and np.max(np.abs(f2 - 2 * f1 + f0)) <= 1e-7 * moved:
            linear.append(j)
    names = list(params.names)
    for target, source, op, _ in params.ties:
        t, s = names.index(target), names.index(source)
        if (t in linear) != (s in linear) or (op in "+-" and t in linear):
            linear = [j for j in linear if j not in (t, s)]
    return linear
