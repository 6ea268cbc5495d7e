"""The chunk layer: one block of spectra in (numpy), result arrays out (numpy).

Everything a Dask worker does for one chunk lives here, so it is testable without a cluster:

1. put spectra in the rest frame (``redshift``) and build the pixel mask (non-finite flux,
   ``ivar <= 0``, outside the model's window);
2. screen spectra: too few usable pixels -> status ``no_data``, never sent to the solver
   (one all-NaN spectrum in a vmapped batch slows the whole batch down);
3. one jit(vmap) :class:`~sheap_dask.minimizer.Minimizer` call over the chunk, padded to a
   common batch size so chunks of one dataset share one compiled program;
4. re-fit spectra that failed (non-finite, unconverged, or reduced chi-square far above the
   chunk's median) one by one with :class:`~sheap_dask.slsqp.SLSQP`, keeping the better fit;
5. chi-square, degrees of freedom and parameter errors from the covariance at the optimum.

Compiled programs are cached per process, keyed by the model's fingerprint, the options and
the shapes: a worker compiles once and reuses the program for every later chunk.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from . import config
from .errors import InputDataError, OptionError
from .status import Status

logger = logging.getLogger("sheap_dask.chunk")

__all__ = ["ChunkOptions", "fit_chunk", "compile_stats", "RESULT_VARIABLES"]

METHODS = ("lm", "adam", "lbfgs")
FALLBACKS = ("slsqp", "none")
LOSS_KINDS = ("logcosh", "chi2")
ERROR_SCALES = ("absolute", "redchi2")

# name -> (dims beyond "spectrum", numpy dtype); the Dataset layer builds its outputs from this.
RESULT_VARIABLES: dict[str, tuple[tuple[str, ...], str]] = {
    "params": (("param",), "float64"),
    "params_err": (("param",), "float64"),
    "loss": ((), "float64"),
    "chi2": ((), "float64"),
    "dof": ((), "int32"),
    "redchi2": ((), "float64"),
    "status": ((), "int8"),
    "method": ((), "<U8"),
    "n_iter": ((), "int32"),
}


@dataclasses.dataclass(frozen=True)
class ChunkOptions:
    """Every option of the chunk layer; ``None`` fields are filled from ``dask.config``.

    Frozen and hashable: it is part of the compile-cache key and is stored in result attrs.
    See ``sheap_dask.yaml`` for the meaning and default of each field.
    """

    method: str | None = None
    num_steps: int | None = None
    learning_rate: float | None = None
    lbfgs_options: tuple = ()
    loss_kind: str | None = None
    robust_scale: float | None = None
    weighted: bool | None = None
    penalty_weight: float | None = None
    curvature_weight: float | None = None
    smoothness_weight: float | None = None
    max_weight: float | None = None
    rtol: float | None = None
    gtol: float | None = None
    fallback: str | None = None
    fallback_tol: float | None = None
    fallback_maxiter: int | None = None
    fallback_redchi2_sigma: float | None = None
    pinned_fraction: float | None = None
    error_scale: str | None = None
    min_extra_pixels: int | None = None
    return_history: bool | None = None
    dtype: str | None = None
    stage_iter: int | None = None
    slots: int | None = None
    restarts: bool | None = None
    redchi2_sigma: float | None = None
    pinned_tolerance: float | None = None

    _CONFIG_KEYS = {
        "method": "fit.method",
        "learning_rate": "fit.learning_rate",
        "loss_kind": "loss.kind",
        "robust_scale": "loss.robust_scale",
        "weighted": "loss.weighted",
        "penalty_weight": "loss.penalty_weight",
        "curvature_weight": "loss.curvature_weight",
        "smoothness_weight": "loss.smoothness_weight",
        "max_weight": "loss.max_weight",
        "rtol": "convergence.rtol",
        "gtol": "convergence.gtol",
        "fallback": "fallback.method",
        "fallback_tol": "fallback.tol",
        "fallback_maxiter": "fallback.maxiter",
        "fallback_redchi2_sigma": "fallback.redchi2_sigma",
        "pinned_fraction": "fallback.pinned_fraction",
        "error_scale": "errors.scale",
        "min_extra_pixels": "screen.min_extra_pixels",
        "return_history": "fit.return_history",
        "dtype": "fit.dtype",
        "stage_iter": "fit.lm_stage_iter",
        "slots": "fit.lm_slots",
        "restarts": "fit.lm_restarts",
        "redchi2_sigma": "fit.restart_redchi2_sigma",
        "pinned_tolerance": "fit.restart_pinned_tolerance",
    }

    def resolved(self) -> ChunkOptions:
        """A copy with every ``None`` replaced by its configured default, validated."""
        values = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None and field.name in self._CONFIG_KEYS:
                value = config.get(self._CONFIG_KEYS[field.name])
            values[field.name] = value
        method = values["method"]
        if values["num_steps"] is None:
            values["num_steps"] = config.get("fit.lm_max_iter") if method == "lm" else config.get("fit.num_steps")
        if isinstance(values["lbfgs_options"], Mapping):
            values["lbfgs_options"] = tuple(sorted(values["lbfgs_options"].items()))
        if values["fallback"] is None or values["fallback"] is False:
            values["fallback"] = "none"
        out = ChunkOptions(**values)
        out.validate()
        return out

    def validate(self) -> None:
        _check_choice("method", self.method, METHODS)
        _check_choice("fallback", self.fallback, FALLBACKS)
        _check_choice("loss_kind", self.loss_kind, LOSS_KINDS)
        _check_choice("error_scale", self.error_scale, ERROR_SCALES)
        _check_choice("dtype", self.dtype, ("float32", "float64"))
        if not (isinstance(self.num_steps, (int, np.integer)) and self.num_steps > 0):
            raise OptionError(f"num_steps={self.num_steps!r} must be a positive integer, e.g. num_steps=1000.")
        if self.learning_rate is not None and not (float(self.learning_rate) > 0):
            raise OptionError(f"learning_rate={self.learning_rate!r} must be > 0 (or None for the default 1e-2).")
        if not float(self.robust_scale) > 0:
            raise OptionError(f"robust_scale={self.robust_scale!r} must be > 0 (in units of sigma, e.g. 3).")
        if isinstance(self.slots, bool) or not (isinstance(self.slots, (int, np.integer)) and self.slots >= 0):
            raise OptionError(f"slots={self.slots!r} (sheap_dask.fit.lm_slots) must be an int >= 0, e.g. 12 (0: one vmapped loop per chunk).")

    def to_dict(self) -> dict:
        """JSON-serializable options (stored in result attrs and compared on resume)."""
        d = dataclasses.asdict(self)
        d["lbfgs_options"] = dict(self.lbfgs_options)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, default=str)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise OptionError(f"{name}={value!r} is not one of {', '.join(map(repr, choices))}; pick one of those.")


# --------------------------------------------------------------------------------------
# Per-process cache of compiled programs: one entry per (model, options).
# --------------------------------------------------------------------------------------
_CACHE: dict[tuple, _CompiledModel] = {}
_CACHE_LOCK = threading.Lock()
_STATS = {"solver_builds": 0, "traces": 0, "chunks": 0, "compiling_chunks": 0, "compiling_seconds": 0.0, "warm_seconds": 0.0}


def compile_stats() -> dict:
    """Compile and timing counters of this process (for tests and benchmarks).

    ``traces`` counts JAX traces of the batched solves and the post-processing (it stays
    constant once every shape of a fit has been compiled); ``compiling_chunks`` counts the
    chunks during which something was compiled and ``compiling_seconds`` their wall time,
    ``warm_seconds`` the wall time of the other chunks.
    """
    stats = dict(_STATS)
    stats["traces"] += sum(c.minimizer.n_compilations + (c.straggler_minimizer.n_compilations if c.straggler_minimizer else 0) for c in _CACHE.values())
    return stats


class _CompiledModel:
    """The jitted programs of one (model, options) pair, reused for every chunk."""

    def __init__(self, model, options: ChunkOptions, penalty_function=None):
        import jax
        import jax.numpy as jnp

        from .loss import weighted_residuals
        from .minimizer import Minimizer

        self.model = model
        self.options = options
        params = model.params
        self.names = list(params.names)
        self.n_params = len(self.names)
        self.lower = np.asarray(params.lower, dtype=np.float64)
        self.upper = np.asarray(params.upper, dtype=np.float64)
        self.free_index = np.array([self.names.index(n) for n in params.free_names], dtype=int)
        self.n_free = len(self.free_index)
        self.embed_matrix, self.embed_fixed_mask = _embedding(params)
        # Parameters that belong together (one line's flux, shift, width): reset together.
        components = model.metadata.get("components", {}) if isinstance(model.metadata, Mapping) else {}
        self.component_groups = [
            [self.names.index(p) for p in info.get("params", []) if p in self.names]
            for info in components.values()
            if isinstance(info, Mapping)
        ]

        extra = {"rtol": options.rtol, "gtol": options.gtol, "loss_kind": options.loss_kind}
        # LM through a queue of lanes (see lm_slots in sheap_dask.yaml); restarts reuse it.
        self.slots = int(options.slots or 0) if options.method == "lm" else 0
        if options.method == "lm":
            extra["robust_scale"] = options.robust_scale
            extra["slots"] = self.slots

        def minimizer(num_steps: int) -> Minimizer:
            return Minimizer(
                model.func,
                non_optimize_in_axis=4,
                num_steps=int(num_steps),
                learning_rate=options.learning_rate,
                weighted=bool(options.weighted),
                method=options.method,
                lbfgs_options=dict(options.lbfgs_options) or None,
                penalty_function=penalty_function,
                param_converter=params,
                penalty_weight=options.penalty_weight,
                curvature_weight=options.curvature_weight,
                smoothness_weight=options.smoothness_weight,
                max_weight=options.max_weight,
                **extra,
            )

        # A vmapped while_loop runs until its slowest spectrum stops, so LM runs in two
        # stages: the whole chunk for `stage_iter` iterations, then only the stragglers, in
        # batches an eighth the size (at least 8), for the rest of the budget.
        self.stage_iter = int(options.stage_iter or 0)
        staged = options.method == "lm" and not self.slots and 0 < self.stage_iter < int(options.num_steps)
        self.minimizer = minimizer(self.stage_iter if staged else options.num_steps)
        self.straggler_minimizer = minimizer(int(options.num_steps) - self.stage_iter) if staged else None
        func = model.func
        embed = jnp.asarray(self.embed_matrix)

        def residuals(phys, wavelength, flux, errors):
            return weighted_residuals(func, phys, wavelength, flux, errors)

        def post_one(phys, wavelength, flux, errors):
            _STATS["traces"] += 1  # runs at trace time only
            r = residuals(phys, wavelength, flux, errors)
            jac_full = jax.jacfwd(residuals)(phys, wavelength, flux, errors)  # (n_pix, n_params)
            jac_free = jac_full @ embed.astype(jac_full.dtype)  # ties/fixed folded in
            return jnp.sum(r * r), jac_free.T @ jac_free

        self._post = jax.jit(jax.vmap(post_one, in_axes=(0, None, 0, 0)))
        self._post_2d = jax.jit(jax.vmap(post_one, in_axes=(0, 0, 0, 0)))

        def chi2_free(x_free, fixed_values, wavelength, flux, errors):
            phys = fixed_values + embed.astype(x_free.dtype) @ x_free
            r = residuals(phys, wavelength, flux, errors)
            return jnp.sum(r * r)

        chi2_free.errordef = 1.0
        self.chi2_free = chi2_free  # one function object: SLSQP caches its compiled gradient
        self._slsqp = None
        self._warm = False

    def post(self, phys, wavelength, flux, errors):
        """Chi-square and J^T W J, always in float64: the covariance needs the precision
        even when the solve ran in float32."""
        import jax

        fn = self._post_2d if np.ndim(wavelength) == 2 else self._post
        f64 = lambda a: np.asarray(a, dtype=np.float64)  # noqa: E731
        with jax.enable_x64(True):
            chi2, jtj = fn(f64(phys), f64(wavelength), f64(flux), f64(errors))
        return np.asarray(chi2, dtype=np.float64), np.asarray(jtj, dtype=np.float64)

    def post_rows(self, phys, wavelength, flux, errors, n_rows: int, group: int):
        """:meth:`post` of the first ``n_rows`` rows in groups of ``group`` (the last padded):
        the padding of a batch is not worth a float64 Jacobian."""
        chi2 = np.full(len(phys), np.nan)
        jtj = np.full((len(phys), self.n_free, self.n_free), np.nan)
        for first in range(0, n_rows, group):  # one compiled shape: (group, ...)
            take = np.minimum(np.arange(first, first + group), n_rows - 1)
            wl = wavelength[take] if np.ndim(wavelength) == 2 else wavelength
            c, j = self.post(phys[take], wl, flux[take], errors[take])
            k = min(group, n_rows - first)
            chi2[first : first + k], jtj[first : first + k] = c[:k], j[:k]
        return chi2, jtj

    def warm_up(self, start, flux, wavelength, errors, batch: int, dtype) -> None:
        """Compile, during a worker's first chunk, every program a later chunk may need.

        The straggler/restart batch, its post-processing and the SLSQP fallback are only
        needed when some spectrum is slow or stuck; compiled lazily, a worker would stop to
        compile them in the middle of a run, whenever such a spectrum first turns up.
        ``start``, ``flux``, ``wavelength`` (1-D or one row) and ``errors`` describe one spectrum.
        """
        if self._warm:
            return
        self._warm = True
        constraints = np.stack([self.lower, self.upper], axis=-1).astype(dtype)
        rep = lambda a: np.repeat(np.asarray(a)[None], _group_size(batch), axis=0)  # noqa: E731
        wl_g = wavelength if np.ndim(wavelength) == 1 else rep(wavelength)
        if self.straggler_minimizer is not None:
            self.straggler_minimizer.run(rep(start).astype(dtype), rep(flux).astype(dtype), np.asarray(wl_g).astype(dtype), rep(errors).astype(dtype), constraints)
        if self.options.method == "lm" and self.options.restarts:  # post-processing of restart groups
            self.post(rep(start), wl_g, rep(flux), rep(errors))
        if self.options.fallback == "slsqp":
            from .slsqp import SLSQP

            self.post(np.asarray(start)[None], wavelength if np.ndim(wavelength) == 1 else np.asarray(wavelength)[None], np.asarray(flux)[None], np.asarray(errors)[None])
            free = self.free_index
            offsets = expand_free(self.model.params, np.zeros(len(free)), start)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                SLSQP(tol=self.options.fallback_tol, maxiter=3).minimize(
                    self.chi2_free,
                    params={"value": np.asarray(start, dtype=np.float64)[free], "lower": self.lower[free], "upper": self.upper[free]},
                    args=(offsets, np.asarray(wavelength, dtype=np.float64), np.asarray(flux, dtype=np.float64), np.asarray(errors, dtype=np.float64)),
                )

    def slsqp(self):
        if self._slsqp is None:
            from .slsqp import SLSQP

            self._slsqp = SLSQP(tol=self.options.fallback_tol, maxiter=self.options.fallback_maxiter)
        return self._slsqp


def _embedding(params) -> tuple[np.ndarray, np.ndarray]:
    """Linear map from free physical parameters to all physical parameters.

    Ties are affine in their source (``target = source OP c``), fixed values are constants,
    so ``phys = fixed + E @ free`` with ``E`` (n_params, n_free). Used for the covariance of
    tied parameters and for the SLSQP fallback, which works in physical units.
    """
    names = list(params.names)
    free = list(params.free_names)
    E = np.zeros((len(names), len(free)))
    for j, name in enumerate(free):
        E[names.index(name), j] = 1.0
    for target, source, op, operand in params.ties:
        factor = {"*": operand, "/": 1.0 / operand, "+": 1.0, "-": 1.0}[op]
        E[names.index(target)] = E[names.index(source)] * factor
    fixed_mask = ~np.any(E != 0, axis=1)
    return E, fixed_mask


def expand_free(params, free, reference) -> np.ndarray:
    """All physical parameters from the free ones: ``offsets + E @ free``.

    Tied values are rebuilt exactly (in float64) from their sources; fixed values come from
    ``reference``, the additive offsets of ``+``/``-`` ties from the ties. ``free`` is
    (n_free,) or (n, n_free), ``reference`` (n_params,) or (n, n_params); ``free = 0`` gives
    the offsets alone.
    """
    E, fixed_mask = _embedding(params)
    names = list(params.names)
    reference = np.asarray(reference, dtype=np.float64)
    offsets = np.where(fixed_mask, reference, 0.0)
    for target, _source, op, operand in params.ties:
        if op in "+-":
            offsets[..., names.index(target)] = operand if op == "+" else -operand
    return offsets + np.asarray(free, dtype=np.float64) @ E.T


def _get_compiled(model, options: ChunkOptions, penalty_function=None) -> _CompiledModel:
    config.enable_compilation_cache()
    key = (model.fingerprint(), options, id(penalty_function) if penalty_function else None)
    with _CACHE_LOCK:
        compiled = _CACHE.get(key)
        if compiled is None:
            compiled = _CompiledModel(model, options, penalty_function)
            _CACHE[key] = compiled
            _STATS["solver_builds"] += 1
    return compiled


# --------------------------------------------------------------------------------------
# The chunk function
# --------------------------------------------------------------------------------------
def fit_chunk(
    model,
    wavelength: np.ndarray,
    flux: np.ndarray,
    ivar: np.ndarray,
    *,
    redshift: np.ndarray | None = None,
    init: np.ndarray | None = None,
    options: ChunkOptions | None = None,
    pad_to: int | None = None,
    penalty_function=None,
) -> dict[str, np.ndarray]:
    """Fit one block of spectra; numpy in, numpy out.

    Parameters
    ----------
    model : Model
        The model to fit.
    wavelength : ndarray
        Observed-frame wavelength in Angstrom, (n_pix,) shared or (n_spectra, n_pix).
    flux, ivar : ndarray
        (n_spectra, n_pix) flux density and inverse variance. ``ivar <= 0``, non-finite
        ``ivar`` or non-finite flux masks a pixel.
    redshift : ndarray, optional
        (n_spectra,) redshifts: the model is fitted in the rest frame
        (wavelength / (1 + z), flux * (1 + z), ivar / (1 + z)^2), so line fluxes are
        observed integrated fluxes. ``None`` means the input is already rest frame.
    init : ndarray, optional
        (n_spectra, n_params) physical initial values; NaN entries fall back to the model's
        data-driven estimate. Default: the model's initializer (or its parameter values).
    options : ChunkOptions, optional
        Solver, loss, fallback and error options; defaults from ``dask.config``.
    pad_to : int, optional
        Batch size of the compiled solve. A short last chunk is padded up to it so it reuses
        the program compiled for the full chunks. Default: the number of spectra.
    penalty_function : callable, optional
        Extra penalty term passed to the loss (see :func:`~sheap_dask.loss.build_loss_function`).

    Returns
    -------
    dict of ndarray
        ``params``, ``params_err`` (n_spectra, n_params); ``loss``, ``chi2``, ``dof``,
        ``redchi2``, ``status`` (int8 :class:`~sheap_dask.status.Status` codes), ``method``,
        ``n_iter`` (n_spectra,); and ``loss_history`` (n_spectra, num_steps) when
        ``options.return_history``.
    """
    options = (options or ChunkOptions()).resolved()
    traces_before, t0 = compile_stats()["traces"], time.perf_counter()
    out = _fit_chunk(model, wavelength, flux, ivar, redshift, init, options, pad_to, penalty_function)
    compiled = compile_stats()["traces"] != traces_before
    _STATS["chunks"] += 1
    if compiled:
        _STATS["compiling_chunks"] += 1
    _STATS["compiling_seconds" if compiled else "warm_seconds"] += time.perf_counter() - t0
    return out


def _fit_chunk(model, wavelength, flux, ivar, redshift, init, options, pad_to, penalty_function) -> dict[str, np.ndarray]:
    import jax

    dtype = np.dtype(options.dtype)
    flux = np.asarray(flux)
    ivar = np.asarray(ivar)
    if flux.ndim != 2 or ivar.shape != flux.shape:
        raise InputDataError(
            f"fit_chunk needs flux and ivar of the same shape (n_spectra, n_pix); got flux {flux.shape}, ivar {ivar.shape}."
        )
    n_spec, n_pix = flux.shape
    wavelength = np.asarray(wavelength, dtype=np.float64)
    if wavelength.shape not in ((n_pix,), (n_spec, n_pix)):
        raise InputDataError(
            f"fit_chunk: wavelength shape {wavelength.shape} matches neither (n_pix,) = ({n_pix},) nor flux {flux.shape}."
        )
    batch = max(int(pad_to or n_spec), n_spec)
    compiled = _get_compiled(model, options, penalty_function)
    n_params, n_free = compiled.n_params, compiled.n_free

    with np.errstate(all="ignore"):
        wl, flux, ivar, z_ok = _to_rest_frame(wavelength, flux.astype(np.float64), ivar.astype(np.float64), redshift)
        usable = np.isfinite(flux) & np.isfinite(ivar) & (ivar > 0)
        if model.window is not None:
            usable &= (wl >= model.window[0]) & (wl <= model.window[1])
        n_usable = usable.sum(axis=1)
        good = z_ok & (n_usable >= n_free + int(options.min_extra_pixels))
        errors = np.where(usable, 1.0 / np.sqrt(np.where(usable, ivar, 1.0)), np.inf)
        clean_flux = np.where(usable, flux, 0.0)

    out = _empty_result(n_spec, n_params, options)
    out["dof"][:] = np.maximum(n_usable - n_free, 0)
    good_idx = np.flatnonzero(good)
    if good_idx.size == 0:
        logger.info("chunk of %d spectra: none has usable pixels", n_spec)
        return out

    start = _initial_values(model, compiled, wl, flux, ivar, usable, init, good_idx)

    # The batch holds the good spectra only, padded with copies of the first one: bad
    # spectra never enter the vmapped solve and every chunk has the same compiled shape.
    take = np.concatenate([good_idx, np.full(batch - good_idx.size, good_idx[0])])
    wl_b = wl[take] if wl.ndim == 2 else wl
    constraints = np.stack([compiled.lower, compiled.upper], axis=-1)
    with jax.enable_x64(options.dtype == "float64"):
        first = good_idx[0]
        compiled.warm_up(start[first], clean_flux[first], wl_b if wl.ndim == 1 else wl[first], errors[first], batch, dtype)
        solved = _batched_solve(compiled, start[take], clean_flux[take], wl_b, errors[take], constraints, dtype, options, n_active=good_idx.size)
        # Ties and fixed values rebuilt in float64 from the free parameters: exact whatever
        # precision the solve ran in.
        phys = solved["params"]
        solved["params"] = expand_free(compiled.model.params, phys[:, compiled.free_index], phys)
        chi2_b, jtj_b = compiled.post(solved["params"], wl_b, clean_flux[take], errors[take])
    sel = slice(0, good_idx.size)
    for name in ("params", "loss", "status", "n_iter"):
        out[name][good_idx] = solved[name][sel]
    out["chi2"][good_idx] = chi2_b[sel]
    out["method"][good_idx] = options.method
    if options.return_history:
        out["loss_history"][good_idx] = solved["loss_history"][sel]
    jtj = np.full((n_spec, n_free, n_free), np.nan)
    jtj[good_idx] = jtj_b[sel]

    with np.errstate(all="ignore"):
        out["redchi2"] = out["chi2"] / np.where(out["dof"] > 0, out["dof"], np.nan)
        nonfinite = good & ~(np.all(np.isfinite(out["params"]), axis=1) & np.isfinite(out["chi2"]))
    out["status"][nonfinite] = Status.NONFINITE

    if options.method == "lm" and options.restarts:
        _restart_suspects(out, jtj, good, compiled, wl, clean_flux, errors, start, dtype, options, batch)

    if options.fallback == "slsqp":
        retry = _fallback_candidates(out, good, compiled, options)
        if retry.size:
            _run_fallback(retry, out, jtj, compiled, wl, clean_flux, errors, start, options)

    out["params_err"] = _parameter_errors(jtj, compiled, out, options)
    return out


def _batched_solve(compiled, start, flux, wl, errors, constraints, dtype, options, n_active=None) -> dict[str, np.ndarray]:
    """The solve of a padded batch (the first ``n_active`` rows are real): LM lanes work
    through it as a queue, or one vmapped loop whose stragglers get a second, smaller batch."""
    cast = lambda a: np.asarray(a).astype(dtype)  # noqa: E731
    queue = {"n_active": n_active} if compiled.slots and n_active is not None else {}  # padding never runs
    result = compiled.minimizer.run(cast(start), cast(flux), cast(wl), cast(errors), cast(constraints), **queue)
    solved = {  # writable copies: stragglers are filled in below
        "params": np.array(result.params, dtype=np.float64),
        "loss": np.array(result.loss, dtype=np.float64),
        "status": np.array(result.status, dtype=np.int8),
        "n_iter": np.array(result.n_iter, dtype=np.int32),
        "loss_history": np.array(result.loss_history, dtype=np.float64),
    }
    if compiled.straggler_minimizer is None:
        return solved
    todo = np.flatnonzero(solved["status"] == Status.MAX_ITER)
    batch = len(start)
    group = _group_size(batch)
    tail = compiled.straggler_minimizer.num_steps
    history = np.concatenate([solved["loss_history"], np.repeat(solved["loss"][:, None], tail, axis=1)], axis=1)
    for first in range(0, todo.size, group):  # loops over groups of stragglers, not spectra
        rows = todo[first : first + group]
        take = np.concatenate([rows, np.full(group - rows.size, rows[0])])
        wl_g = wl[take] if np.ndim(wl) == 2 else wl
        again = compiled.straggler_minimizer.run(cast(solved["params"][take]), cast(flux[take]), cast(wl_g), cast(errors[take]), cast(constraints))
        k = rows.size
        solved["params"][rows] = np.asarray(again.params, dtype=np.float64)[:k]
        solved["loss"][rows] = np.asarray(again.loss, dtype=np.float64)[:k]
        solved["status"][rows] = np.asarray(again.status, dtype=np.int8)[:k]
        solved["n_iter"][rows] += np.asarray(again.n_iter, dtype=np.int32)[:k]
        history[rows, compiled.stage_iter :] = np.asarray(again.loss_history, dtype=np.float64)[:k]
    solved["loss_history"] = history
    return solved


def _group_size(batch: int) -> int:
    """Batch size of the straggler and restart solves: an eighth of the chunk, at least 8
    (10% faster than a quarter on the H-beta benchmark: few spectra straggle)."""
    return max(1, min(batch, max(8, batch // 8)))


def _to_rest_frame(wavelength, flux, ivar, redshift):
    """Observed -> rest frame; spectra with a non-finite or <= -1 redshift are flagged."""
    n_spec = flux.shape[0]
    if redshift is None:
        return wavelength, flux, ivar, np.ones(n_spec, dtype=bool)
    z = np.asarray(redshift, dtype=np.float64).reshape(n_spec)
    z_ok = np.isfinite(z) & (z > -1)
    opz = np.where(z_ok, 1.0 + z, 1.0)[:, None]
    wl = (wavelength if wavelength.ndim == 2 else wavelength[None, :]) / opz
    return wl, flux * opz, ivar / opz**2, z_ok


def _empty_result(n_spec: int, n_params: int, options: ChunkOptions) -> dict[str, np.ndarray]:
    out = {}
    for name, (dims, dtype) in RESULT_VARIABLES.items():
        shape = (n_spec, n_params) if dims else (n_spec,)
        if dtype.startswith("float"):
            out[name] = np.full(shape, np.nan, dtype=dtype)
        elif dtype == "<U8":
            out[name] = np.full(shape, "none", dtype=dtype)
        else:
            out[name] = np.zeros(shape, dtype=dtype)
    out["status"][:] = Status.NO_DATA
    if options.return_history:
        out["loss_history"] = np.full((n_spec, int(options.num_steps)), np.nan)
    return out


def _initial_values(model, compiled, wl, flux, ivar, usable, init, good_idx) -> np.ndarray:
    """Physical starting values (n_spectra, n_params), strictly inside the bounds."""
    from .model import _clip_inside

    n_spec = flux.shape[0]
    start = np.broadcast_to(np.asarray(model.params.values, dtype=np.float64), (n_spec, compiled.n_params)).copy()
    rows = good_idx
    wl_g = wl[rows] if wl.ndim == 2 else wl
    with np.errstate(all="ignore"):
        start[rows] = model.initial_values(wl_g, np.where(usable[rows], flux[rows], np.nan), np.where(usable[rows], ivar[rows], 0.0))
    if init is not None:
        init = np.asarray(init, dtype=np.float64)
        if init.shape != start.shape:
            raise InputDataError(f"init has shape {init.shape}; expected (n_spectra, n_params) = {start.shape}.")
        start = np.where(np.isfinite(init), init, start)
    return _clip_inside(start, compiled.lower, compiled.upper)


def _pinned(params: np.ndarray, compiled, fraction: float) -> np.ndarray:
    """(n, n_params) mask: free parameters within ``fraction`` of their range from a bound."""
    lo, hi = compiled.lower, compiled.upper
    span = hi - lo
    near = np.zeros(params.shape, dtype=bool)
    with np.errstate(invalid="ignore"):
        finite_span = np.isfinite(span)
        tol = np.where(finite_span, fraction * span, fraction * np.maximum(np.abs(params), 1.0))
        near |= np.isfinite(lo) & (params - lo < tol)
        near |= np.isfinite(hi) & (hi - params < tol)
    free = np.zeros(compiled.n_params, dtype=bool)
    free[compiled.free_index] = True
    return near & free


def _redchi2_outlier(redchi2, dof, median: float, n_sigma: float) -> np.ndarray:
    """Reduced chi-square more than ``n_sigma`` standard deviations (sqrt(2/dof) for a
    chi-square) above the chunk's median, scaled by that median (real data rarely sit at 1)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return redchi2 > median * (1.0 + n_sigma * np.sqrt(2.0 / np.maximum(dof, 1)))


def _restart_suspects(out, jtj, good, compiled, wl, clean_flux, errors, start, dtype, options, batch: int) -> None:
    """Batched LM restarts for fits stuck in a local minimum; keeps the best of three.

    A parameter driven onto a bound (a line flux at 0, a shift at its limit) has a vanishing
    gradient in the optimizer's bounded coordinates, so LM cannot bring it back even when
    the fit is clearly poor. Suspects are spectra with a reduced chi-square above
    ``median * (1 + redchi2_sigma * sqrt(2 / dof))`` or a pinned parameter. Each is re-fitted
    twice in one batch: with its pinned parameters reset to their initial values, and with
    the whole components of its pinned parameters reset; the lowest chi-square is kept.
    (Running the second start only where the first left a suspect is ~15% faster per chunk
    but misses fits the second start improves by a chi-square of 70-90: both always run.)
    """
    redchi2 = out["redchi2"]
    ok = good & (out["status"] == Status.CONVERGED) & np.isfinite(redchi2)
    if not ok.any():
        return
    median = float(np.median(redchi2[ok]))
    outlier = _redchi2_outlier(redchi2, out["dof"], median, options.redchi2_sigma)
    pinned = _pinned(out["params"], compiled, options.pinned_tolerance)
    suspects = np.flatnonzero(ok & (outlier | (pinned.any(axis=1) & (redchi2 > median))))
    if suspects.size == 0:
        return
    pinned = pinned[suspects]
    whole = pinned.copy()
    for group in compiled.component_groups:
        whole[:, group] |= whole[:, group].any(axis=1, keepdims=True)
    current = out["params"][suspects]
    starts = np.concatenate([np.where(pinned, start[suspects], current), np.where(whole, start[suspects], current)])
    rows = np.concatenate([suspects, suspects])
    solver = compiled.straggler_minimizer or compiled.minimizer
    # groups of the padded chunk's size: the shape warm_up compiled, also for a short last chunk
    group = _group_size(batch) if compiled.straggler_minimizer else batch
    cast = lambda a: np.asarray(a).astype(dtype)  # noqa: E731
    constraints = np.stack([compiled.lower, compiled.upper], axis=-1)
    for first in range(0, rows.size, group):  # groups of restarts, not a loop over spectra
        idx = np.arange(first, min(first + group, rows.size))
        take = np.concatenate([idx, np.full(group - idx.size, idx[0])])
        r = rows[take]
        wl_g = wl[r] if wl.ndim == 2 else wl
        queue = {"n_active": idx.size} if compiled.slots else {}  # lanes skip the padding
        res = solver.run(cast(starts[take]), cast(clean_flux[r]), cast(wl_g), cast(errors[r]), cast(constraints), **queue)
        params = np.asarray(res.params, dtype=np.float64)
        params = expand_free(compiled.model.params, params[:, compiled.free_index], params)  # exact ties
        # the real rows only, in groups of the warmed-up shape
        chi2, jtj_g = compiled.post_rows(params, wl_g, clean_flux[r], errors[r], idx.size, _group_size(batch))
        # Per spectrum, the best converged restart of this group replaces the current fit
        # when its chi-square is lower (a spectrum's two starts may share a group).
        valid = np.flatnonzero((np.asarray(res.status[: idx.size]) == Status.CONVERGED) & np.isfinite(chi2[: idx.size]))
        order = valid[np.lexsort((chi2[valid], r[valid]))]
        best = order[np.unique(r[order], return_index=True)[1]]
        win = best[chi2[best] < out["chi2"][r[best]]]
        i = r[win]
        out["params"][i] = params[win]
        out["chi2"][i] = chi2[win]
        out["loss"][i] = np.asarray(res.loss, dtype=np.float64)[win]
        out["n_iter"][i] += np.asarray(res.n_iter, dtype=np.int32)[win]
        jtj[i] = jtj_g[win]
    with np.errstate(invalid="ignore", divide="ignore"):
        out["redchi2"][suspects] = out["chi2"][suspects] / np.where(out["dof"][suspects] > 0, out["dof"][suspects], np.nan)


def _fallback_candidates(out, good, compiled, options) -> np.ndarray:
    """Indices of spectra to re-fit with SLSQP (the documented rule, see sheap_dask.yaml)."""
    status = out["status"]
    bad = good & (status != Status.CONVERGED)
    redchi2 = out["redchi2"]
    converged = good & (status == Status.CONVERGED) & np.isfinite(redchi2)
    if converged.any():
        bad |= converged & _redchi2_outlier(redchi2, out["dof"], float(np.median(redchi2[converged])), options.fallback_redchi2_sigma)
    if options.pinned_fraction and options.pinned_fraction > 0:
        bad |= good & _pinned(out["params"], compiled, options.pinned_fraction).any(axis=1)
    return np.flatnonzero(bad)


def _run_fallback(retry, out, jtj, compiled, wl, clean_flux, errors, start, options) -> None:
    """Re-fit ``retry`` spectra one by one with SLSQP; keep whichever fit is better."""
    import jax

    params = compiled.model.params
    lower_f = compiled.lower[compiled.free_index]
    upper_f = compiled.upper[compiled.free_index]
    solver = compiled.slsqp()
    batch_rows = out["params"][retry]
    offsets = expand_free(params, np.zeros((retry.size, compiled.n_free)), np.where(np.isfinite(batch_rows), batch_rows, start[retry]))
    logger.info("SLSQP fallback for %d spectra", retry.size)
    for k, i in enumerate(retry):  # the only Python loop over spectra: failed ones only
        batch_p = out["params"][i, compiled.free_index]
        inside = np.all(np.isfinite(batch_p)) and np.all(batch_p >= lower_f) and np.all(batch_p <= upper_f)
        x0 = batch_p if inside else start[i, compiled.free_index]
        wl_i = wl[i] if wl.ndim == 2 else wl
        try:
            with jax.enable_x64(True):
                res = solver.minimize(
                    compiled.chi2_free,
                    params={"value": x0, "lower": lower_f, "upper": upper_f, "name": params.free_names},
                    args=(offsets[k], wl_i, clean_flux[i], errors[i]),
                )
        except Exception as exc:  # a failed re-fit must never crash its chunk
            logger.warning("SLSQP fallback raised for spectrum %d of the chunk: %r", i, exc)
            if out["status"][i] == Status.NONFINITE:
                out["status"][i] = Status.FAILED
            continue
        old = out["chi2"][i]
        # A converged batch fit (re-fitted only as a chi-square outlier) is replaced only by
        # a converged SLSQP fit: a lower but unconverged chi-square would lose its status.
        was_converged = out["status"][i] == Status.CONVERGED
        if np.isfinite(res.fmin) and not (res.fmin >= old) and (res.converged or not was_converged):  # also when old is NaN
            x = np.asarray(res.values, dtype=np.float64)
            out["params"][i] = expand_free(params, x, offsets[k])
            out["chi2"][i] = out["loss"][i] = res.fmin
            out["method"][i] = "slsqp"
            out["n_iter"][i] = res.n_eval
            out["status"][i] = Status.CONVERGED_AFTER_FALLBACK if res.converged else Status.FAILED
            dof = out["dof"][i]
            out["redchi2"][i] = res.fmin / dof if dof > 0 else np.nan
            jtj[i] = _jtj_single(compiled, out["params"][i], wl_i, clean_flux[i], errors[i])
        elif out["status"][i] == Status.NONFINITE:
            out["status"][i] = Status.FAILED


def _jtj_single(compiled, phys, wl, flux, err) -> np.ndarray:
    _, jtj = compiled.post(phys[None], wl if wl.ndim == 1 else wl[None], flux[None], err[None])
    return jtj[0]


def _parameter_errors(jtj, compiled, out, options) -> np.ndarray:
    """1-sigma errors: sqrt(diag(E (J^T W J)^-1 E^T)); NaN where singular or not fitted."""
    n_spec = jtj.shape[0]
    err = np.full((n_spec, compiled.n_params), np.nan)
    ok = np.all(np.isfinite(jtj.reshape(n_spec, -1)), axis=1) & np.isin(out["status"], [s.value for s in Status if s.ok])
    if not ok.any():
        return err
    m = jtj[ok]
    # Scale to unit diagonal before inverting: parameters span many decades.
    d = np.sqrt(np.abs(np.einsum("nii->ni", m)))
    d = np.where(d > 0, d, 1.0)
    scaled = m / d[:, :, None] / d[:, None, :]
    with np.errstate(all="ignore"):
        # One symmetric eigendecomposition gives both the condition number and the
        # pseudo-inverse (singular values of a symmetric matrix = |eigenvalues|).
        w, V = np.linalg.eigh(scaled)
        sv = np.abs(w)
        top = sv.max(axis=1, keepdims=True)
        singular = ~(sv.min(axis=1) > 0) | (top[:, 0] / sv.min(axis=1) > 1e12)
        inv_w = np.where(sv > 1e-15 * top, 1.0 / w, 0.0)
        cov = np.einsum("nij,nj,nkj->nik", V, inv_w, V) / d[:, :, None] / d[:, None, :]
        E = compiled.embed_matrix
        # Only the diagonal of E C E^T is needed.
        e = np.sqrt(np.clip(np.einsum("ij,njk,ik->ni", E, cov, E), 0, None))
    if options.error_scale == "redchi2":
        e = e * np.sqrt(np.where(np.isfinite(out["redchi2"][ok]), out["redchi2"][ok], np.nan))[:, None]
    e[singular] = np.nan
    e[:, compiled.embed_fixed_mask] = 0.0
    err[ok] = e
    return err
