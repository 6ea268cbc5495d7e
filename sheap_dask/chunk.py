"""The chunk layer: one block of spectra in (numpy), result arrays out (numpy).

Everything a Dask worker does for one chunk lives here, so it is testable without a cluster:

1. put spectra in the rest frame (``redshift``) and build the pixel mask (non-finite flux,
   ``ivar <= 0``, outside the model's window);
2. screen spectra: too few usable pixels, or a window covered less than
   ``sheap_dask.coverage.min`` -> status ``no_data``, never sent to the solver (one all-NaN
   spectrum in a vmapped batch slows the whole batch down);
3. scale each spectrum to order unity (a robust statistic of its flux and errors) and the
   model's flux parameters with it, so results never depend on the flux unit;
4. one compiled, batched solve of the chunk (:class:`~sheap_dask.minimizer.Minimizer`),
   padded to a common batch size so every chunk reuses one program;
5. batched restarts of fits stuck at a bound or with an outlying chi-square, keeping the
   lowest objective;
6. absorber rejection: pixels far below the model (narrow absorption, sky residuals) are
   masked and the affected spectra re-solved, batched;
7. the SLSQP fallback, one spectrum at a time, for what is still failed or an outlier: it
   minimises the same objective and replaces the batch fit only where that is lower;
8. chi-square, degrees of freedom, parameter errors from the covariance, quality flags;
   parameters and errors scaled back to the input's unit.

Compiled programs are cached per process (:mod:`sheap_dask.compiled`): a worker compiles once
and reuses the programs for every later chunk.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Mapping

import numpy as np

from .compiled import _STATS, compile_stats, get_compiled
from .coverage import coverage
from .errors import InputDataError
from .options import ChunkOptions, check_penalty
from .quality import Quality
from .status import Status

logger = logging.getLogger("sheap_dask.chunk")

__all__ = ["ChunkOptions", "fit_chunk", "compile_stats", "RESULT_VARIABLES", "result_variables"]

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
    "quality": ((), "int32"),
    "at_bound": (("param",), "bool"),
    "n_masked": ((), "int32"),
    "flux_scale": ((), "float64"),
    "params_cov": (("param", "param2"), "float64"),
}


# per line of the model's line catalogue (metadata["lines"]), when it has one
LINE_VARIABLES: dict[str, tuple[tuple[str, ...], str]] = {
    "line_flux": (("line",), "float64"),
    "line_flux_err": (("line",), "float64"),
    "line_detected": (("line",), "bool"),
}


def model_lines(model) -> dict[str, list[str]]:
    """line name -> the flux parameters that add up to its flux (from ``metadata["lines"]``)."""
    lines = model.metadata.get("lines", {}) if isinstance(model.metadata, Mapping) else {}
    out = {}
    for name, info in lines.items():
        params = [f"{c}_flux" for c in (info or {}).get("components", []) if f"{c}_flux" in model.params.names]
        if params:
            out[name] = params
    return out


def result_variables(options: ChunkOptions, model=None) -> dict[str, tuple[tuple[str, ...], str]]:
    """The variables :func:`fit_chunk` returns for ``model`` with these options: per line
    when the model has a line catalogue, ``loss_history`` on demand."""
    out = dict(RESULT_VARIABLES)
    if model is not None and model_lines(model):
        out.update(LINE_VARIABLES)
    if options.return_history:
        out["loss_history"] = (("step",), "float64")
    if options.n_mc:
        out["params_mc"] = (("draw", "param"), "float64")
    return out


def result_sizes(options: ChunkOptions, model) -> dict[str, int]:
    """Sizes of the dimensions beyond ``spectrum`` of :func:`result_variables`."""
    sizes = {"param": model.n_params, "param2": model.n_params}
    if model_lines(model):
        sizes["line"] = len(model_lines(model))
    if options.return_history:
        sizes["step"] = int(options.num_steps)
    if options.n_mc:
        sizes["draw"] = int(options.n_mc)
    return sizes


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
        ``ivar`` or non-finite flux masks a pixel. Any flux unit: each spectrum is scaled to
        order unity inside and the results are reported in the input's unit.
    redshift : ndarray, optional
        (n_spectra,) redshifts: the model is fitted in the rest frame
        (wavelength / (1 + z), flux * (1 + z), ivar / (1 + z)^2), so line fluxes are
        observed integrated fluxes. ``None`` means the input is already rest frame.
    init : ndarray, optional
        (n_spectra, n_params) physical initial values in the input's unit; NaN entries fall
        back to the model's data-driven estimate. Default: the model's initializer (or its
        parameter values).
    options : ChunkOptions, optional
        Solver, loss, fallback and error options; defaults from ``dask.config``.
    pad_to : int, optional
        Batch size of the compiled solve. A short last chunk is padded up to it so it reuses
        the program compiled for the full chunks. Default: the number of spectra.
    penalty_function : callable, optional
        Extra penalty term for adam/lbfgs (see :func:`~sheap_dask.loss.build_loss_function`);
        it sees parameters in the input's unit, so spectra are then fitted unscaled.

    Returns
    -------
    dict of ndarray
        The variables of :data:`RESULT_VARIABLES` (``loss_history`` (n_spectra, num_steps)
        too when ``options.return_history``), one row per spectrum.
    """
    options = (options or ChunkOptions()).resolved()
    check_penalty(options, penalty_function)
    traces_before, t0 = compile_stats()["traces"], time.perf_counter()
    out = _fit_any(model, wavelength, flux, ivar, redshift, init, options, pad_to, penalty_function)
    if options.n_mc:
        out["params_mc"] = _resample(model, out, wavelength, flux, ivar, redshift, options, pad_to, penalty_function)
    compiled = compile_stats()["traces"] != traces_before
    _STATS["chunks"] += 1
    if compiled:
        _STATS["compiling_chunks"] += 1
    _STATS["compiling_seconds" if compiled else "warm_seconds"] += time.perf_counter() - t0
    return out


def _fit_any(model, wavelength, flux, ivar, redshift, init, options, pad_to, penalty_function) -> dict[str, np.ndarray]:
    if getattr(model, "continuum_stage", None) is not None:
        return _fit_staged(model, wavelength, flux, ivar, redshift, init, options, pad_to, penalty_function)
    return _fit_chunk(model, wavelength, flux, ivar, redshift, init, options, pad_to, penalty_function)


def _resample(model, out, wavelength, flux, ivar, redshift, options, pad_to, penalty_function) -> np.ndarray:
    """(n_spectra, n_mc, n_params) parameters of ``n_mc`` refits of each fitted spectrum with
    Gaussian noise drawn from its ivar added (the resampling errors of PyQSOFit and the
    DR16Q catalogue), through the same batched solve as the fit, from the best fit.

    The noise of each spectrum comes from a generator seeded by its own (unit-free) data, so
    a spectrum gets the same realizations in any chunk and any flux unit. A realization whose
    refit does not converge is NaN. Realizations start at the best fit, so they skip the
    restarts and the SLSQP fallback and make one absorber pass.
    """
    import dataclasses
    import hashlib

    n_spec, n_mc = np.shape(flux)[0], int(options.n_mc)
    result = np.full((n_spec, n_mc, model.n_params), np.nan)
    rows = np.flatnonzero(np.isin(out["status"], [s.value for s in Status if s.ok]))
    if rows.size == 0:
        return result
    flux = np.asarray(flux, dtype=np.float64)
    ivar = np.asarray(ivar, dtype=np.float64)
    with np.errstate(all="ignore"):
        err = np.where(ivar > 0, 1.0 / np.sqrt(np.where(ivar > 0, ivar, 1.0)), 0.0)
    draws = np.empty((rows.size, n_mc, flux.shape[1]))
    for k, i in enumerate(rows):  # one generator per spectrum (drawing only; the fits are batched)
        unit_free = _round_bits(np.nan_to_num(flux[i] / out["flux_scale"][i]))
        seed = int.from_bytes(hashlib.sha256(unit_free.tobytes()).digest()[:8], "little")
        draws[k] = np.random.default_rng(seed).standard_normal((n_mc, flux.shape[1]))
    noisy = (flux[rows, None, :] + err[rows, None, :] * draws).reshape(-1, flux.shape[1])
    take = np.repeat(rows, n_mc)
    wl = np.asarray(wavelength)
    z = None if redshift is None else np.asarray(redshift)[take]
    start = out["params"][take]
    # from the best fit: no restarts, one absorber pass, no SLSQP
    quiet = dataclasses.replace(options, n_mc=0, fallback="none", return_history=False, restarts=False,
                                absorber_iterations=min(1, options.absorber_iterations))
    batch = max(int(pad_to or n_spec), n_spec)
    fitted = np.full((take.size, model.n_params), np.nan)
    for first in range(0, take.size, batch):  # groups of the compiled batch size, not a loop over spectra
        sl = slice(first, first + batch)
        part = _fit_any(model, wl[take[sl]] if wl.ndim == 2 else wl, noisy[sl], ivar[take[sl]], None if z is None else z[sl], start[sl],
                        quiet, batch, penalty_function)
        ok = np.isin(part["status"], [s.value for s in Status if s.ok])
        fitted[sl] = np.where(ok[:, None], part["params"], np.nan)
    result[rows] = fitted.reshape(rows.size, n_mc, model.n_params)
    return result


class _Chunk:
    """The scaled, rest-frame arrays of one chunk and its bookkeeping (numpy)."""

    def __init__(self, **kw):
        self.__dict__.update(kw)

    def rows(self, idx):
        """(wavelength, flux, errors, lower, upper) of rows ``idx``."""
        wl = self.wl[idx] if self.wl.ndim == 2 else self.wl
        return wl, self.flux[idx], self.errors[idx], self.lower[idx], self.upper[idx]


def _fit_chunk(model, wavelength, flux, ivar, redshift, init, options, pad_to, penalty_function) -> dict[str, np.ndarray]:
    import jax

    flux, ivar, wavelength = _check_arrays(flux, ivar, wavelength)
    n_spec, _ = flux.shape
    batch = max(int(pad_to or n_spec), n_spec)
    compiled = get_compiled(model, options, penalty_function)
    n_params, n_free = compiled.n_params, compiled.n_free

    with np.errstate(all="ignore"):
        wl, flux, ivar, z_ok = _to_rest_frame(wavelength, flux, ivar, redshift)
        usable = np.isfinite(flux) & np.isfinite(ivar) & (ivar > 0)
        covered, incomplete = coverage(model, wl, usable, minimum=options.coverage_min, flag=options.coverage_flag,
                                       line=options.coverage_line, continuum=options.coverage_continuum)
        if model.windows:
            wl2 = np.broadcast_to(wl, usable.shape)
            usable &= np.any([(wl2 >= lo) & (wl2 <= hi) for lo, hi in model.windows], axis=0)
        n_usable = usable.sum(axis=1)
        good = z_ok & (n_usable >= n_free + int(options.min_extra_pixels)) & covered
        errors = np.where(usable, 1.0 / np.sqrt(np.where(usable, ivar, 1.0)), np.inf)
        raw_flux = np.where(usable, flux, 0.0)

    out = _empty_result(n_spec, model, options)
    out["dof"][:] = np.maximum(n_usable - n_free, 0)
    out["quality"][incomplete] |= Quality.WINDOW_INCOMPLETE
    good_idx = np.flatnonzero(good)
    if good_idx.size == 0:
        logger.info("chunk of %d spectra: none has enough usable pixels", n_spec)
        return out

    # Unit-free: every spectrum in units of a robust statistic of itself, the model's flux
    # parameters (amplitudes, line fluxes, continuum norms) in the same units.
    # The scaled arrays are rounded to 20 significant bits: a spectrum given in another unit
    # then reaches the solver as exactly the same numbers (its rounding differs only in the
    # last bits of float64), so the fit is the same to the last digit, in float32 as in
    # float64; 20 bits are 5e-7 of each value, far below any noise.
    scale = _flux_scale(raw_flux, errors, usable, good) if penalty_function is None else np.ones(n_spec)
    param_scale = np.where(compiled.flux_mask[None, :], scale[:, None], 1.0)
    start = _initial_values(model, compiled, wl, flux, ivar, usable, init, good_idx)
    lower = _round_bits(compiled.lower[None, :] / param_scale)
    upper = _round_bits(compiled.upper[None, :] / param_scale)
    chunk = _Chunk(
        wl=wl, flux=_round_bits(raw_flux / scale[:, None]), errors=_round_bits(errors / scale[:, None]), lower=lower, upper=upper,
        start=_clip_inside(_sane_start(_round_bits(start / param_scale), model), lower, upper), good=good, batch=batch, n_usable=n_usable,
        dtype=np.dtype(options.dtype),
    )

    with jax.enable_x64(options.dtype == "float64"):
        first = good_idx[0]
        wl_first = chunk.wl if chunk.wl.ndim == 1 else chunk.wl[first]
        compiled.warm_up(options, chunk.start[first], chunk.flux[first], wl_first, chunk.errors[first], lower[first], upper[first], _group_size(batch))
        solved = _solve(compiled, chunk, chunk.start, good_idx)
    for name in ("params", "loss", "chi2", "status", "n_iter"):
        out[name][good_idx] = solved[name]
    out["method"][good_idx] = options.method
    if options.return_history:
        out["loss_history"][good_idx] = solved["loss_history"]
    jtwj = np.full((n_spec, n_free, n_free), np.nan)
    jtwj[good_idx] = solved["jtwj"]
    _update_redchi2(out, good_idx)
    nonfinite = good & ~(np.all(np.isfinite(out["params"]), axis=1) & np.isfinite(out["chi2"]))
    out["status"][nonfinite] = Status.NONFINITE

    with jax.enable_x64(options.dtype == "float64"):
        if options.method == "lm" and options.restarts:
            _restart_suspects(out, jtwj, compiled, chunk, options)
        if options.absorber_iterations:
            _reject_absorbers(out, jtwj, compiled, chunk, options)
    if options.fallback == "slsqp":
        retry = _fallback_candidates(out, good, compiled, chunk, options)
        if retry.size:
            _run_fallback(retry, out, jtwj, compiled, chunk, options)

    _finish_quality(out, good, compiled, chunk, options)
    err, undefined, cov = _parameter_errors(jtwj, compiled, out, options, chunk.upper - chunk.lower)
    out["quality"][undefined] |= Quality.ERRORS_UNDEFINED
    # back to the input's unit
    out["params"] *= param_scale
    out["params_err"] = err * param_scale
    out["params_cov"] = cov * param_scale[:, :, None] * param_scale[:, None, :]
    out["flux_scale"][good] = scale[good]
    _line_fluxes(out, model, options)
    return out


def _line_fluxes(out, model, options) -> None:
    """Each line's flux (the sum of its components' fluxes), its error from the covariance
    (correlations between the components included) and whether it is detected: flux /
    error >= ``sheap_dask.lines.detection_sigma``. The quality bits say when a main line of
    the model (``metadata["main_lines"]``, default every line) is not detected."""
    lines = model_lines(model)
    if not lines:
        return
    names = model.param_names
    weights = np.zeros((len(lines), len(names)))
    for k, params in enumerate(lines.values()):
        weights[k, [names.index(p) for p in params]] = 1.0
    with np.errstate(invalid="ignore"):
        out["line_flux"] = out["params"] @ weights.T
        var = np.einsum("kp,npq,kq->nk", weights, out["params_cov"], weights)
        out["line_flux_err"] = np.sqrt(np.where(var >= 0, var, np.nan))
        significance = out["line_flux"] / out["line_flux_err"]
    out["line_detected"] = np.nan_to_num(significance, nan=0.0) >= options.detection_sigma
    meta = model.metadata.get("lines", {})
    main = model.metadata.get("main_lines") or list(lines)
    fitted = np.isin(out["status"], [s.value for s in Status if s.ok])
    for k, name in enumerate(lines):
        if name not in main:
            continue
        bit = Quality.BROAD_LINE_UNDETECTED if (meta.get(name) or {}).get("kind") == "broad" else Quality.NARROW_LINE_UNDETECTED
        out["quality"][fitted & ~out["line_detected"][:, k]] |= bit


def _fit_staged(model, wavelength, flux, ivar, redshift, init, options, pad_to, penalty_function) -> dict[str, np.ndarray]:
    """A model with a continuum stage: the continuum on its line-free windows first, then the
    lines with the continuum fixed at what the first stage found (see ContinuumStage)."""
    stage = model.continuum_stage
    names = model.param_names
    cont_idx = np.array([names.index(n) for n in stage.model.param_names])
    n_spec = np.shape(flux)[0]
    init = None if init is None else np.asarray(init, dtype=np.float64)
    first = _fit_chunk(stage.model, wavelength, flux, ivar, redshift, None if init is None else init[:, cont_idx], options, pad_to,
                       penalty_function)
    start = np.full((n_spec, len(names)), np.nan) if init is None else init.copy()
    start[:, cont_idx] = first["params"]
    second = _fit_chunk(model.line_stage(), wavelength, flux, ivar, redshift, start, options, pad_to, penalty_function)
    # a continuum that did not converge (or could not be fitted) is the spectrum's status
    out = second
    failed = ~np.isin(first["status"], [s.value for s in Status if s.ok])
    out["status"] = np.where(failed, first["status"], second["status"]).astype(np.int8)
    out["params_err"][:, cont_idx] = first["params_err"]
    out["params_cov"][:, cont_idx[:, None], cont_idx[None, :]] = first["params_cov"]
    out["at_bound"][:, cont_idx] |= first["at_bound"]
    out["quality"] |= first["quality"] & ~(Quality.BROAD_LINE_UNDETECTED | Quality.NARROW_LINE_UNDETECTED)
    out["n_iter"] += first["n_iter"]
    no_data = out["status"] == Status.NO_DATA
    for name in ("params", "params_err", "params_cov", "loss", "chi2", "redchi2"):
        out[name][no_data] = np.nan
    return out


def _check_arrays(flux, ivar, wavelength):
    flux = np.asarray(flux)
    ivar = np.asarray(ivar)
    for name, arr in (("flux", flux), ("ivar", ivar)):
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise InputDataError(
                f"fit_chunk: {name} has dtype {arr.dtype}; it must be real numbers (float32 or float64). "
                + ("Take the real part or the modulus explicitly." if np.iscomplexobj(arr) else "Convert it with .astype('float64').")
            )
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
    return flux.astype(np.float64), ivar.astype(np.float64), wavelength


def _solve(compiled, chunk: _Chunk, start: np.ndarray, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Batched solve of ``rows`` from ``start[rows]`` (padded to the chunk's batch size, in
    groups of it when there are more rows): parameters with exact float64 ties, the
    objective, chi-square and J^T W J in float64."""
    batch = chunk.batch
    keys = ("params", "loss", "chi2", "status", "n_iter", "loss_history", "jtwj")
    parts = {k: [] for k in keys}
    for first in range(0, rows.size, batch):  # groups of the compiled batch, not a loop over spectra
        idx = rows[first : first + batch]
        take = np.concatenate([idx, np.full(batch - idx.size, idx[0])])
        wl, flux, errors, lower, upper = chunk.rows(take)
        res = _batched_solve(compiled, chunk, start[take], take, idx.size)
        # ties and fixed values rebuilt in float64 from the free parameters: exact whatever
        # precision the solve ran in
        params = compiled.model.params.expand_free(res["params"][:, compiled.free_index], start[take])
        chi2, objective, jtwj = compiled.post_rows(params, wl, flux, errors, idx.size, _group_size(batch))
        k = idx.size
        for name, value in (("params", params), ("loss", objective), ("chi2", chi2), ("jtwj", jtwj)):
            parts[name].append(value[:k])
        for name in ("status", "n_iter", "loss_history"):
            parts[name].append(res[name][:k])
    return {k: np.concatenate(v) for k, v in parts.items()}


def _batched_solve(compiled, chunk: _Chunk, start: np.ndarray, take: np.ndarray, n_active: int) -> dict[str, np.ndarray]:
    """The compiled solve of the padded rows ``take`` (the first ``n_active`` are real)."""
    cast = lambda a: np.asarray(a).astype(chunk.dtype)  # noqa: E731
    wl, flux, errors, lower, upper = chunk.rows(take)
    queue = {"n_active": n_active} if compiled.slots else {}  # lanes skip the padding
    res = compiled.minimizer.run(cast(start), cast(flux), cast(wl), cast(errors), compiled.constraints(lower, upper), **queue)
    return {
        "params": np.array(res.params, dtype=np.float64),
        "status": np.array(res.status, dtype=np.int8),
        "n_iter": np.array(res.n_iter, dtype=np.int32),
        "loss_history": np.array(res.loss_history, dtype=np.float64),
    }


def _group_size(batch: int) -> int:
    """Rows per float64 post-processing call: an eighth of the chunk, at least 8 (the
    Jacobian of padding rows is not worth computing)."""
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


def _sane_start(start: np.ndarray, model) -> np.ndarray:
    """Starting values the solver can use: non-finite ones from the model's defaults, and
    a flux parameter beyond 1e6 times its spectrum's unit (an initializer's linear solve
    on a barely covered line) capped there."""
    default = np.broadcast_to(np.asarray(model.params.values, dtype=np.float64), start.shape)
    start = np.where(np.isfinite(start), start, default)
    flux = np.isin(model.param_names, list(model.flux_params))
    return np.where(flux[None, :], np.clip(start, -1e6, 1e6), start)


def _round_bits(x: np.ndarray, bits: int = 20) -> np.ndarray:
    """``x`` with its mantissa rounded to ``bits`` bits (inf, NaN and 0 unchanged)."""
    mantissa, exponent = np.frexp(x)
    with np.errstate(invalid="ignore"):
        return np.where(np.isfinite(x), np.ldexp(np.round(mantissa * 2.0**bits) / 2.0**bits, exponent), x)


def _flux_scale(flux, errors, usable, good) -> np.ndarray:
    """Per-spectrum unit: the median of max(|flux|, error) over usable pixels.

    Proportional to the flux unit (multiplying a spectrum by c multiplies it by c exactly,
    up to rounding), robust to outliers, and positive whenever a pixel is usable.
    """
    with np.errstate(all="ignore"):
        level = np.where(usable, np.maximum(np.abs(flux), errors), np.nan)
        scale = np.nanmedian(np.where(good[:, None], level, 1.0), axis=1)
    return np.where(np.isfinite(scale) & (scale > 0), scale, 1.0)


def _empty_result(n_spec: int, model, options: ChunkOptions) -> dict[str, np.ndarray]:
    out = {}
    sizes = result_sizes(options, model)
    for name, (dims, dtype) in result_variables(options, model).items():
        shape = (n_spec, *(sizes[d] for d in dims))
        if dtype.startswith("float"):
            out[name] = np.full(shape, np.nan, dtype=dtype)
        elif dtype == "<U8":
            out[name] = np.full(shape, "none", dtype=dtype)
        else:
            out[name] = np.zeros(shape, dtype=dtype)
    out["status"][:] = Status.NO_DATA
    return out


def _initial_values(model, compiled, wl, flux, ivar, usable, init, good_idx) -> np.ndarray:
    """Physical starting values (n_spectra, n_params) in the input's unit: the model's
    initializer sees the spectra as given, ``init`` overrides where finite."""
    n_spec = flux.shape[0]
    start = np.broadcast_to(np.asarray(model.params.values, dtype=np.float64), (n_spec, compiled.n_params)).copy()
    rows = good_idx
    if init is not None:  # the model's estimate only where init leaves a value open
        open_ = ~np.all(np.isfinite(np.asarray(init, dtype=np.float64)[rows]), axis=1) if np.shape(init) == start.shape else np.ones(rows.size, bool)
        rows = rows[open_]
    wl_g = wl[rows] if wl.ndim == 2 else wl
    with np.errstate(all="ignore"):
        if rows.size:
            start[rows] = model.initial_values(wl_g, np.where(usable[rows], flux[rows], np.nan), np.where(usable[rows], ivar[rows], 0.0),
                                               clip=False)
    if init is not None:
        init = np.asarray(init, dtype=np.float64)
        if init.shape != start.shape:
            raise InputDataError(
                f"init has shape {init.shape}; expected (n_spectra, n_params) = {start.shape} "
                f"(parameters {compiled.names})."
            )
        start = np.where(np.isfinite(init), init, start)
    return start


def _clip_inside(values, lower, upper):
    from .model import _clip_inside as clip

    return clip(values, lower, upper)


def _update_redchi2(out, rows) -> None:
    with np.errstate(invalid="ignore", divide="ignore"):
        dof = out["dof"][rows]
        out["redchi2"][rows] = out["chi2"][rows] / np.where(dof > 0, dof, np.nan)


def _pinned(params: np.ndarray, compiled, lower: np.ndarray, upper: np.ndarray, fraction: float) -> np.ndarray:
    """(n, n_params) mask: free parameters within ``fraction`` of their range from a bound
    (of max(|value|, 1) for a parameter with one finite bound)."""
    span = upper - lower
    near = np.zeros(params.shape, dtype=bool)
    with np.errstate(invalid="ignore"):
        tol = np.where(np.isfinite(span), fraction * span, fraction * np.maximum(np.abs(params), 1.0))
        near |= np.isfinite(lower) & (params - lower < tol)
        near |= np.isfinite(upper) & (upper - params < tol)
    free = np.zeros(compiled.n_params, dtype=bool)
    free[compiled.free_index] = True
    return near & free


def _redchi2_outlier(redchi2, dof, median: float, n_sigma: float) -> np.ndarray:
    """Reduced chi-square more than ``n_sigma`` standard deviations (sqrt(2/dof) for a
    chi-square) above the chunk's median, scaled by that median (real data rarely sit at 1)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return redchi2 > median * (1.0 + n_sigma * np.sqrt(2.0 / np.maximum(dof, 1)))


def _converged_median(out, good) -> float | None:
    ok = good & np.isin(out["status"], (Status.CONVERGED, Status.CONVERGED_AFTER_FALLBACK)) & np.isfinite(out["redchi2"])
    return float(np.median(out["redchi2"][ok])) if ok.any() else None


def _restart_suspects(out, jtwj, compiled, chunk: _Chunk, options) -> None:
    """Batched restarts for fits stuck in a local minimum; keeps the lowest objective.

    A parameter driven onto a bound (a line flux at 0, a shift at its limit) has a vanishing
    gradient in the optimizer's bounded coordinates, so LM cannot bring it back even when
    the fit is clearly poor. Suspects are spectra with a reduced chi-square above
    ``median * (1 + redchi2_sigma * sqrt(2 / dof))`` or a pinned parameter. Each is re-fitted
    twice in one batch: with its pinned parameters reset to their initial values, and with
    the whole components of its pinned parameters reset; the lowest objective of the three
    fits is kept.
    """
    good = chunk.good
    median = _converged_median(out, good)
    if median is None:
        return
    ok = good & (out["status"] == Status.CONVERGED) & np.isfinite(out["redchi2"])
    outlier = _redchi2_outlier(out["redchi2"], out["dof"], median, options.redchi2_sigma)
    pinned = _pinned(out["params"], compiled, chunk.lower, chunk.upper, options.pinned_tolerance)
    suspects = np.flatnonzero(ok & (outlier | (pinned.any(axis=1) & (out["redchi2"] > median))))
    if suspects.size == 0:
        return
    pinned = pinned[suspects]
    whole = pinned.copy()
    for group in compiled.component_groups:
        whole[:, group] |= whole[:, group].any(axis=1, keepdims=True)
    current = out["params"][suspects]
    starts = chunk.start.copy()
    for trial in (np.where(pinned, chunk.start[suspects], current), np.where(whole, chunk.start[suspects], current)):
        starts[suspects] = trial
        res = _solve(compiled, chunk, starts, suspects)
        valid = (res["status"] == Status.CONVERGED) & np.isfinite(res["loss"])
        win = valid & (res["loss"] < out["loss"][suspects])
        i = suspects[win]
        for name in ("params", "loss", "chi2"):
            out[name][i] = res[name][win]
        out["n_iter"][suspects[valid]] += res["n_iter"][valid]
        jtwj[i] = res["jtwj"][win]
    _update_redchi2(out, suspects)


def _reject_absorbers(out, jtwj, compiled, chunk: _Chunk, options) -> None:
    """Mask narrow troughs far below the model and re-solve the spectra that have them.

    Rule (documented in the README): with residuals r = (data - model)/sigma measured from
    their running median (so broad model mismatch does not count), a trough is a run of
    adjacent pixels below -``absorber_sigma`` / 1.5 whose deepest pixel is below
    -``absorber_sigma``, two to ``absorber_max_width`` pixels long (one pixel below -2 x
    ``absorber_sigma`` also counts); it is grown by ``absorber_grow`` pixels on each side
    and masked. A spectrum whose masked pixels would exceed ``absorber_max_fraction`` of its
    usable pixels is left alone (the model, not absorbers, is wrong there). The affected
    spectra are re-solved from their current parameters in one batched call, up to
    ``absorber_iterations`` times.
    """
    for _ in range(int(options.absorber_iterations)):
        rows = np.flatnonzero(chunk.good & (out["status"] == Status.CONVERGED))  # an unconverged fit's residuals say little
        if rows.size == 0:
            return
        resid = _residuals(compiled, chunk, out["params"], rows)
        mask = _trough_mask(resid, options.absorber_sigma, int(options.absorber_grow), int(options.absorber_max_width))
        n_new = mask.sum(axis=1)
        usable = np.isfinite(chunk.errors[rows])
        n_total = out["n_masked"][rows] + n_new
        accept = (n_new > 0) & (n_total <= options.absorber_max_fraction * usable.sum(axis=1))
        if not accept.any():
            return
        hit = rows[accept]
        chunk.errors[hit] = np.where(mask[accept], np.inf, chunk.errors[hit])
        chunk.flux[hit] = np.where(mask[accept], 0.0, chunk.flux[hit])
        out["n_masked"][hit] = n_total[accept]
        out["dof"][hit] -= n_new[accept]
        out["quality"][hit] |= Quality.ABSORBERS_MASKED
        res = _solve(compiled, chunk, out["params"], hit)
        done = np.isfinite(res["loss"]) & np.all(np.isfinite(res["params"]), axis=1)
        i = hit[done]
        for name in ("params", "loss", "chi2", "status"):
            out[name][i] = res[name][done]
        out["n_iter"][i] += res["n_iter"][done]
        jtwj[i] = res["jtwj"][done]
        _update_redchi2(out, hit)


def _residuals(compiled, chunk: _Chunk, params: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """(data - model)/sigma of ``rows`` (NaN where masked)."""
    wl = chunk.wl[rows] if chunk.wl.ndim == 2 else chunk.wl
    model = compiled.evaluate_rows(wl, params[rows], _group_size(chunk.batch))
    with np.errstate(all="ignore"):
        return np.where(np.isfinite(chunk.errors[rows]), (chunk.flux[rows] - model) / chunk.errors[rows], np.nan)


def _trough_mask(resid: np.ndarray, sigma: float, grow: int, max_width: int) -> np.ndarray:
    """Pixels of narrow troughs (see :func:`_reject_absorbers`), vectorised over spectra.

    Residuals are measured against their running median over ``4 * max_width + 1`` pixels,
    so a broad stretch where the model is off (continuum or FeII mismatch, common at high
    S/N) is not mistaken for absorption: only dips narrower than ``max_width`` pixels are.
    """
    n_spec, n_pix = resid.shape
    half = 2 * max_width
    padded = np.pad(resid, ((0, 0), (half, half)), constant_values=np.nan)
    windows = np.lib.stride_tricks.sliding_window_view(padded, 2 * half + 1, axis=1)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN windows (masked stretches)
        baseline = np.nan_to_num(np.nanmedian(windows, axis=2), nan=0.0)
    dip = np.nan_to_num(resid - baseline, nan=0.0)
    low = dip < -sigma / 1.5
    # label runs of `low` per spectrum: a run id increments at each False -> True edge
    edges = np.diff(np.concatenate([np.zeros((n_spec, 1), bool), low], axis=1).astype(np.int8), axis=1) == 1
    run_id = np.cumsum(edges, axis=1) * low
    n_runs = int(run_id.max(initial=0))
    if n_runs == 0:
        return np.zeros_like(low)
    flat = (np.arange(n_spec)[:, None] * (n_runs + 1) + run_id).ravel()
    length = np.bincount(flat, weights=low.ravel(), minlength=n_spec * (n_runs + 1))
    deepest = np.zeros(n_spec * (n_runs + 1))
    np.minimum.at(deepest, flat, np.where(low, dip, 0.0).ravel())
    keep = (((length >= 2) & (deepest < -sigma)) | (deepest < -2.0 * sigma)) & (length <= max_width)
    keep[:: n_runs + 1] = False  # run id 0 is "not low"
    mask = keep[flat].reshape(n_spec, n_pix)
    for _ in range(grow):
        mask = mask | np.roll(mask, 1, axis=1) & ~_edge(n_pix, 0) | np.roll(mask, -1, axis=1) & ~_edge(n_pix, -1)
    return mask & np.isfinite(resid)


def _edge(n_pix: int, where: int) -> np.ndarray:
    edge = np.zeros(n_pix, dtype=bool)
    edge[where] = True
    return edge


def _fallback_candidates(out, good, compiled, chunk: _Chunk, options) -> np.ndarray:
    """Indices of spectra to re-fit with SLSQP (the documented rule, see sheap_dask.yaml)."""
    status = out["status"]
    bad = good & (status != Status.CONVERGED)
    median = _converged_median(out, good)
    if median is not None:
        converged = good & (status == Status.CONVERGED) & np.isfinite(out["redchi2"])
        bad |= converged & _redchi2_outlier(out["redchi2"], out["dof"], median, options.fallback_redchi2_sigma)
    if options.pinned_fraction > 0:
        bad |= good & _pinned(out["params"], compiled, chunk.lower, chunk.upper, options.pinned_fraction).any(axis=1)
    return np.flatnonzero(bad)


def _run_fallback(retry, out, jtwj, compiled, chunk: _Chunk, options) -> None:
    """Re-fit ``retry`` spectra one by one with SLSQP on the batched solve's objective; keep
    whichever fit has the lower objective."""
    import jax

    params = compiled.model.params
    free = compiled.free_index
    solver = compiled.slsqp(options)
    batch_rows = out["params"][retry]
    offsets = params.expand_free(np.zeros((retry.size, compiled.n_free)), np.where(np.isfinite(batch_rows), batch_rows, chunk.start[retry]))
    logger.info("SLSQP fallback for %d spectra", retry.size)
    for k, i in enumerate(retry):  # the only Python loop over spectra: failed ones only
        wl_i, flux_i, err_i, lower_i, upper_i = chunk.rows(i)
        batch_p = out["params"][i, free]
        inside = np.all(np.isfinite(batch_p)) and np.all(batch_p >= lower_i[free]) and np.all(batch_p <= upper_i[free])
        x0 = batch_p if inside else chunk.start[i, free]
        try:
            with jax.enable_x64(True):
                res = solver.minimize(
                    compiled.objective_free,
                    params={"value": x0, "lower": lower_i[free], "upper": upper_i[free], "name": params.free_names},
                    args=(offsets[k], wl_i, flux_i, err_i),
                )
        except Exception as exc:  # a failed re-fit must never crash its chunk
            logger.warning("SLSQP fallback raised for spectrum %d of the chunk: %r", i, exc)
            if out["status"][i] == Status.NONFINITE:
                out["status"][i] = Status.FAILED
            continue
        was_converged = out["status"][i] == Status.CONVERGED
        candidate = params.expand_free(np.asarray(res.values, dtype=np.float64), offsets[k])
        chi2, objective, jtwj_i = compiled.post(candidate[None], wl_i if wl_i.ndim == 1 else wl_i[None], flux_i[None], err_i[None])
        # A converged batch fit (re-fitted only as an outlier) is replaced only by a
        # converged SLSQP fit with a lower objective: never by a worse or unconverged one.
        # An unconverged one is replaced by a converged SLSQP fit that is no worse.
        old = out["loss"][i]
        better = np.isfinite(objective[0]) and not (objective[0] >= old)  # also when the old one is NaN
        as_good = np.isfinite(objective[0]) and res.converged and not was_converged and objective[0] <= old + 1e-9 * abs(old)
        if (better or as_good) and (res.converged or not was_converged):
            out["params"][i] = candidate
            out["loss"][i], out["chi2"][i] = objective[0], chi2[0]
            out["method"][i] = "slsqp"
            out["n_iter"][i] = res.n_eval
            out["status"][i] = Status.CONVERGED_AFTER_FALLBACK if res.converged else Status.FAILED
            jtwj[i] = jtwj_i[0]
            _update_redchi2(out, np.array([i]))
        elif out["status"][i] == Status.NONFINITE:
            out["status"][i] = Status.FAILED


def _finish_quality(out, good, compiled, chunk: _Chunk, options) -> None:
    """``at_bound`` and the quality bits that depend on the final fit."""
    fitted = good & np.isin(out["status"], [s.value for s in Status if s.ok])
    at_bound = _pinned(out["params"], compiled, chunk.lower, chunk.upper, options.pinned_tolerance) & fitted[:, None]
    out["at_bound"][:] = at_bound
    out["quality"][at_bound.any(axis=1)] |= Quality.PARAM_AT_BOUND
    out["quality"][out["method"] == "slsqp"] |= Quality.FALLBACK_USED
    median = _converged_median(out, good)
    if median is not None:
        outlier = fitted & _redchi2_outlier(out["redchi2"], out["dof"], median, options.fallback_redchi2_sigma)
        out["quality"][outlier] |= Quality.CHI2_OUTLIER


def _parameter_errors(jtwj, compiled, out, options, span) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """1-sigma errors sqrt(diag(E C E^T)) with C the covariance of the free parameters and
    ``(undefined,)`` per spectrum: NaN only for parameters along a degenerate direction.

    C is the pseudo-inverse of the (IRLS-weighted) J^T W J (:func:`sheap_dask.lm.lm_covariance`:
    a parameter with a non-negligible component along a null direction gets NaN, the others
    keep finite errors); tied parameters follow their source, fixed ones are 0. An error
    wider than the parameter's allowed range (``span``, per spectrum) says only that the data
    do not constrain it: it is NaN too. Also returns the covariance E C E^T of all
    parameters (NaN rows and columns for the undefined ones).
    """
    import jax

    from .lm import lm_covariance

    n_spec = jtwj.shape[0]
    n_params = compiled.n_params
    err = np.full((n_spec, n_params), np.nan)
    cov_all = np.full((n_spec, n_params, n_params), np.nan)
    undefined = np.zeros(n_spec, dtype=bool)
    ok = np.all(np.isfinite(jtwj.reshape(n_spec, -1)), axis=1) & np.isin(out["status"], [s.value for s in Status if s.ok])
    if not ok.any() or compiled.n_free == 0:
        err[ok] = 0.0
        cov_all[ok] = 0.0
        return err, undefined, cov_all
    with jax.enable_x64(True):
        cov = np.asarray(lm_covariance(np.asarray(jtwj[ok], dtype=np.float64)), dtype=np.float64)
    bad_free = np.isnan(np.einsum("nii->ni", cov))
    E = compiled.embed_matrix
    with np.errstate(all="ignore"):
        full = np.einsum("ij,njk,lk->nil", E, np.nan_to_num(cov), E)
        e = np.sqrt(np.clip(np.einsum("nii->ni", full), 0, None))
    # a parameter is undefined when any free parameter it depends on is
    e[(bad_free.astype(float) @ (E.T != 0)) > 0] = np.nan
    if options.error_scale == "redchi2":
        e = e * np.sqrt(np.where(np.isfinite(out["redchi2"][ok]), out["redchi2"][ok], np.nan))[:, None]
    with np.errstate(invalid="ignore"):
        unconstrained = e > span[ok]
    e[unconstrained] = np.nan
    e[:, compiled.embed_fixed_mask] = 0.0
    nan = np.isnan(e)
    full[nan[:, :, None] | nan[:, None, :]] = np.nan
    if options.error_scale == "redchi2":
        full = full * np.where(np.isfinite(out["redchi2"][ok]), out["redchi2"][ok], np.nan)[:, None, None]
    err[ok] = e
    cov_all[ok] = full
    undefined[ok] = bad_free.any(axis=1) | unconstrained.any(axis=1)
    return err, undefined, cov_all
