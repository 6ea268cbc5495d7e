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

import dataclasses
import logging
import time

import numpy as np

from .batch import ChunkArrays, clip_inside, group_size, pinned, solve, update_redchi2
from .compiled import _STATS, compile_stats, get_compiled
from .coverage import coverage
from .errors import InputDataError
from .loss import irls_weight, robust_rho
from .options import ChunkOptions, check_penalty
from .outcome import absent_line_components, absent_params, finish_quality, line_fluxes, model_lines, parameter_errors
from .quality import Quality
from .rescue import (
    fallback_candidates,
    reject_absorbers,
    restart_suspects,
    run_fallback,
)
from .status import Status

#: Key of the per-pixel absorber mask a stage's result carries inside the chunk layer.
REJECTED_PIXELS = "_rejected_pixels"

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
    out.pop(REJECTED_PIXELS, None)
    if options.n_mc:
        out["params_mc"] = _resample(model, out, wavelength, flux, ivar, redshift, options, pad_to, penalty_function)
    compiled = compile_stats()["traces"] != traces_before
    _STATS["chunks"] += 1
    _STATS["spectra"] += int(np.shape(flux)[0])
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


def _fit_chunk(model, wavelength, flux, ivar, redshift, init, options, pad_to, penalty_function) -> dict[str, np.ndarray]:
    import jax

    flux, ivar, wavelength = _check_arrays(flux, ivar, wavelength)
    n_spec, _ = flux.shape
    batch = max(int(pad_to or n_spec), n_spec)
    compiled = get_compiled(model, options, penalty_function)
    n_free = compiled.n_free

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
    chunk = ChunkArrays(
        wl=wl, flux=_round_bits(raw_flux / scale[:, None]), errors=_round_bits(errors / scale[:, None]), lower=lower, upper=upper,
        start=clip_inside(_sane_start(_round_bits(start / param_scale), model), lower, upper), good=good, batch=batch, n_usable=n_usable,
        dtype=np.dtype(options.dtype),
    )

    with jax.enable_x64(options.dtype == "float64"):
        first = good_idx[0]
        wl_first = chunk.wl if chunk.wl.ndim == 1 else chunk.wl[first]
        compiled.warm_up(options, chunk.start[first], chunk.flux[first], wl_first, chunk.errors[first], lower[first], upper[first], group_size(batch))
        solved = solve(compiled, chunk, chunk.start, good_idx)
    for name in ("params", "loss", "chi2", "status", "n_iter"):
        out[name][good_idx] = solved[name]
    out["method"][good_idx] = options.method
    if options.return_history:
        out["loss_history"][good_idx] = solved["loss_history"]
    jtwj = np.full((n_spec, n_free, n_free), np.nan)
    jtwj[good_idx] = solved["jtwj"]
    update_redchi2(out, good_idx)
    nonfinite = good & ~(np.all(np.isfinite(out["params"]), axis=1) & np.isfinite(out["chi2"]))
    out["status"][nonfinite] = Status.NONFINITE

    with jax.enable_x64(options.dtype == "float64"):
        if options.method == "lm" and options.restarts:
            restart_suspects(out, jtwj, compiled, chunk, options)
        if options.absorber_iterations:
            reject_absorbers(out, jtwj, compiled, chunk, options)
    if options.fallback == "slsqp":
        retry = fallback_candidates(out, good, compiled, chunk, options)
        if retry.size:
            run_fallback(retry, out, jtwj, compiled, chunk, options)

    finish_quality(out, good, compiled, chunk, options)
    absent_lines, unused = absent_line_components(out["params"], out["at_bound"], compiled, chunk)
    err, undefined, cov = parameter_errors(jtwj, compiled, out, options, chunk.upper - chunk.lower, absent=absent_lines, unused=unused)
    # undefined errors of an absent component's shape are expected (its detection bit says so),
    # and of a parameter with a resting bound (a host dispersion): the model's derivative
    # vanishes towards that bound, so its error is NaN for any value near it (rounding decides
    # which), and the NaN in params_err says so
    expected = absent_params(out["params"], out["at_bound"], compiled, chunk) | compiled.resting_bound_mask[None, :]
    undefined &= (np.isnan(err) & ~expected).any(axis=1)
    out["quality"][undefined] |= Quality.ERRORS_UNDEFINED
    # back to the input's unit
    out["params"] *= param_scale
    out["params_err"] = err * param_scale
    out["params_cov"] = cov * param_scale[:, :, None] * param_scale[:, None, :]
    out["flux_scale"][good] = scale[good]
    line_fluxes(out, model, options)
    # the pixels absorber rejection masked (usable, now infinite errors): a later stage of a
    # staged fit leaves them out as this one did; fit_chunk drops the key
    out[REJECTED_PIXELS] = usable & np.isinf(chunk.errors)
    return out


#: Relative objective change under which the line-free windows' continuum fit of a refined
#: region (``continuum="refined"``, the default with a host) stops, instead of
#: ``sheap_dask.convergence.rtol``: about 0.005 in chi-square on a window's ~500 pixels, far
#: below what moves a parameter by a fraction of its error. The whole-window steps that follow
#: polish the continuum; the tighter default only added iterations along the host templates'
#: nearly degenerate directions (bench_host.py: the host's cost 1.20x -> 1.06x with "sdss",
#: 1.57x -> 1.30x with "sdss+ssp", accuracy unchanged within its standard error).
REFINED_WINDOWS_RTOL = 1e-5


def _windows_options(stage, options: ChunkOptions) -> ChunkOptions:
    """The options of a continuum stage's fit on its windows, and of every use of its compiled
    program (one program per stage). Refined: the whole-window steps move the parameters the
    windows' fit left on a bound, so its batched restarts (a third of a host continuum's time)
    are not run, and they polish what the windows' fit leaves, so it stops at
    :data:`REFINED_WINDOWS_RTOL`."""
    if getattr(stage, "refine_steps", 0):
        return dataclasses.replace(options, restarts=False, rtol=max(options.rtol, REFINED_WINDOWS_RTOL))
    return options


def _fit_staged(model, wavelength, flux, ivar, redshift, init, options, pad_to, penalty_function) -> dict[str, np.ndarray]:
    """A model with a continuum stage: the continuum on its line-free windows first, then the
    lines with the continuum fixed at what the first stage found (see ContinuumStage)."""
    stage = model.continuum_stage
    names = model.param_names
    cont_idx = np.array([names.index(n) for n in stage.model.param_names])
    n_spec = np.shape(flux)[0]
    init = None if init is None else np.asarray(init, dtype=np.float64)
    first_options = _windows_options(stage, options)
    first = _fit_chunk(stage.model, wavelength, flux, ivar, redshift, None if init is None else init[:, cont_idx], first_options, pad_to,
                       penalty_function)
    if stage.lines is not None:
        second = _fit_lines_on_continuum(model, stage, first, wavelength, flux, ivar, redshift, init, options, pad_to, penalty_function)
    else:
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
    _finish_staged_fit(out, model, stage, wavelength, flux, ivar, redshift, options, pad_to, penalty_function,
                       rejected=out.get(REJECTED_PIXELS))
    return out


def _finish_staged_fit(out, model, stage, wavelength, flux, ivar, redshift, options, pad_to, penalty_function,
                       rejected=None) -> None:
    """Finish a staged fit with a lines model (in place): the continuum's refinement over the
    whole window (``stage.refine_steps``), the continuum's uncertainty added to the lines'
    errors, then the continuum and the detected lines stepped together (``stage.joint_steps``).

    The lines were fitted with the continuum held at the first stage's values, so their
    covariance ``P_l`` says nothing of how they would move with the continuum. Linearised
    (the second step of a two-step estimator, Murphy & Topel 1985, J. Bus. Econ. Stat. 3,
    370), a continuum change ``dc`` moves the lines by ``-P_l F_lc dc``, with
    ``F_lc = J_l^T W J_c`` over the pixels the lines were fitted on (``W`` the inverse
    variances times the IRLS weights of the robust loss at the solution); so the lines'
    covariance gains ``P_l F_lc P_c F_cl P_l`` and the continuum-line covariance is
    ``-P_c F_cl P_l`` (``P_c`` the first stage's covariance). The correlation through the
    pixels both stages use (the continuum windows, where the lines are faint) is left out,
    which errs on the side of larger errors. The Jacobians are forward differences of the
    stages' own compiled models (no further compilation of the full model), in each
    spectrum's own flux unit (``flux_scale``), so the result is the same in any unit; line
    fluxes, their errors and detections are then redone. Needs ``ContinuumStage(lines=...)``
    (every built-in region); otherwise the lines' errors are left as they are. ``rejected``
    (n, pix): pixels the lines' fit masked as absorbers, left out here too.
    """
    if stage.lines is None:
        return
    names = list(model.param_names)
    ok = np.isin(out["status"], [s.value for s in Status if s.ok]) & np.all(np.isfinite(out["params"]), axis=1)
    if not ok.any():
        return
    rows = np.flatnonzero(ok)
    flux, ivar, wl = _check_arrays(flux, ivar, wavelength)
    with np.errstate(all="ignore"):
        wl, flux, ivar, _ = _to_rest_frame(wl, flux, ivar, redshift)
        usable = np.isfinite(flux) & np.isfinite(ivar) & (ivar > 0)
        if model.windows:
            wl2 = np.broadcast_to(wl, usable.shape)
            usable &= np.any([(wl2 >= lo) & (wl2 <= hi) for lo, hi in model.windows], axis=0)
    if rejected is not None:
        usable &= ~rejected
    usable = usable[rows]
    scale = np.where(np.isfinite(out["flux_scale"]) & (out["flux_scale"] > 0), out["flux_scale"], 1.0)[rows]
    data = np.where(usable, flux[rows], 0.0) / scale[:, None]
    inv_var = np.where(usable, ivar[rows], 0.0) * scale[:, None] ** 2
    wl_rows = wl[rows] if wl.ndim == 2 else wl
    group = group_size(max(int(pad_to or len(out["status"])), len(out["status"])))
    flux_mask = np.isin(names, list(getattr(model, "flux_params", ()) or ()))
    p_all = out["params"][rows] / np.where(flux_mask[None, :], scale[:, None], 1.0)
    refine, joint = (int(getattr(stage, steps, 0)) for steps in ("refine_steps", "joint_steps"))
    parts = {}
    for key, part, part_options in (("c", stage.model, _windows_options(stage, options)), ("l", stage.lines, options)):
        compiled = get_compiled(part, part_options, penalty_function)
        idx = np.array([names.index(n) for n in part.param_names])
        parts[key] = (compiled, idx, compiled.embed_matrix, *_value_and_jacobian(compiled, wl_rows, p_all[:, idx], group))
    (compiled_c, c_idx, Ec, cont, Jc), (compiled_l, l_idx, El, lines, Jl) = parts["c"], parts["l"]
    objective = before = _objective(data - cont - lines, inv_var, usable, options)
    chi2_before = _chi2(data - cont - lines, inv_var, usable)
    src_c, src_l = c_idx[np.argmax(Ec != 0, axis=0)], l_idx[np.argmax(El != 0, axis=0)]  # each free parameter's own
    # A parameter the windows' fit left undefined (a host dispersion resting at 0) stays where it is.
    undefined = np.isnan(np.einsum("nii->ni", out["params_cov"][rows][:, src_c[:, None], src_c[None, :]]))
    # chord steps: the staged fit's Jacobian serves every step (most continuum parameters
    # are linear; each step is kept only where it lowers the objective) and then the lines'
    # error propagation. The continuum keeps the windows' fit's errors: the refined values
    # scatter less, so they err on the large side (its covariance with the lines held at a
    # fit on the windows' continuum is not the whole window's).
    lower_c, upper_c = stage.model.params.lower, stage.model.params.upper
    for _ in range(refine):
        p_all[:, c_idx], cont, objective = _gauss_newton_step(lambda p: _evaluate(compiled_c, wl_rows, p, group), p_all[:, c_idx], Ec,
                                                              lower_c, upper_c, cont, objective, Jc, data - lines, inv_var, usable,
                                                              options, undefined)
    weight = _irls_weights(data - cont - lines, inv_var, options)
    F_lc = np.einsum("nip,np,njp->nij", Jl, weight, Jc)
    unit = np.where(flux_mask[None, :], scale[:, None], 1.0)
    cov = out["params_cov"][rows] / (unit[:, :, None] * unit[:, None, :])
    P_c = np.nan_to_num(cov[:, src_c[:, None], src_c[None, :]])
    P_l = cov[:, src_l[:, None], src_l[None, :]]
    if options.error_scale == "redchi2":  # P_l carries the scale once; the gain term takes it from P_c
        P_l = P_l / np.where(np.isfinite(out["redchi2"][rows]) & (out["redchi2"][rows] > 0), out["redchi2"][rows], 1.0)[:, None, None]
    K = np.einsum("nij,njk->nik", np.nan_to_num(P_l), F_lc)  # d lines / d continuum (free parameters)
    gain = np.einsum("nij,njk,nlk->nil", K, P_c, K)
    cross = -np.einsum("nij,nkj->nik", P_c, K)  # (continuum, lines)
    n_params = len(names)
    Ml = np.zeros((n_params, El.shape[1]))
    Ml[l_idx] = El
    Mc = np.zeros((n_params, Ec.shape[1]))
    Mc[c_idx] = Ec
    add = np.einsum("pi,nij,qj->npq", Ml, gain, Ml) + np.einsum("pi,nij,qj->npq", Mc, cross, Ml)
    add = add + np.swapaxes(np.einsum("pi,nij,qj->npq", Mc, cross, Ml), 1, 2)
    new = cov + add
    # what was undefined stays undefined
    undefined_l = np.isnan(np.einsum("nii->ni", P_l))
    bad = np.isnan(np.einsum("nii->ni", cov)) | ((undefined_l.astype(float) @ (Ml.T != 0)) > 0)
    new[bad[:, :, None] | bad[:, None, :]] = np.nan
    new = new * (unit[:, :, None] * unit[:, None, :])
    out["params_cov"][rows] = new
    err = np.sqrt(np.clip(np.einsum("nii->ni", new), 0.0, None))
    err[np.isnan(np.einsum("nii->ni", new))] = np.nan
    line_params = (Ml != 0).any(axis=1)
    # an unused Gaussian's NaN error (its covariance is zero by construction) stays NaN
    keep_nan = np.isnan(out["params_err"][rows])
    out["params_err"][rows[:, None], np.flatnonzero(line_params)[None, :]] = np.where(keep_nan[:, line_params], np.nan, err[:, line_params])
    out["quality"] &= ~(Quality.BROAD_LINE_UNDETECTED | Quality.NARROW_LINE_UNDETECTED)
    line_fluxes(out, model, options)
    if not (refine or joint):
        return
    if joint:
        # continuum and detected lines together, from here; what the staged fit did not
        # detect, left on a bound or undefined is held (M: every free parameter of both parts)
        M = np.zeros((n_params, Ec.shape[1] + El.shape[1]))
        M[c_idx, : Ec.shape[1]], M[l_idx, Ec.shape[1] :] = Ec, El
        src = np.concatenate([src_c, src_l])
        parts_at = [(stage.model, c_idx, compiled_c), (stage.lines, l_idx, compiled_l)]
        hold = (_at_bound(parts_at, p_all, options) | _undetected_line_params(out, model)[rows] | np.isnan(out["params_err"][rows]))[:, src]
        hold[:, : Ec.shape[1]] |= undefined
        J = np.concatenate([Jc, Jl], axis=1)
        hold |= ~np.any(J != 0, axis=2)

        def both(p):
            return _evaluate(compiled_c, wl_rows, p[:, c_idx], group) + _evaluate(compiled_l, wl_rows, p[:, l_idx], group)

        value = cont + lines
        for _ in range(joint):
            p_all, value, objective = _gauss_newton_step(both, p_all, M, model.params.lower, model.params.upper, value, objective, J, data,
                                                         inv_var, usable, options, hold)
    # the reported fit is the refined one: its objective and plain chi-square
    residual = data - (value if joint else cont + lines)
    out["chi2"][rows] += _chi2(residual, inv_var, usable) - chi2_before
    update_redchi2(out, rows)
    # in the lines' objective's own scale: LM's 2 sum(rho) (sum of r^2 for a chi-square),
    # or the mean of rho of adam/lbfgs
    change = objective - before
    if compiled_l.objective_is_mean:
        change = change / (2.0 if options.loss_kind == "logcosh" else 1.0) / np.maximum(usable.sum(axis=1), 1)
    out["loss"][rows] += change
    moved = [(stage.model, c_idx, compiled_c)] + ([(stage.lines, l_idx, compiled_l)] if joint else [])
    idx = np.concatenate([m[1] for m in moved])
    out["params"][rows[:, None], idx[None, :]] = p_all[:, idx] * np.where(flux_mask[idx][None, :], scale[:, None], 1.0)
    out["at_bound"][rows[:, None], idx[None, :]] = _at_bound(moved, p_all, options)[:, idx]
    if joint:  # the lines moved: their fluxes and detections again
        out["quality"] &= ~(Quality.BROAD_LINE_UNDETECTED | Quality.NARROW_LINE_UNDETECTED)
        line_fluxes(out, model, options)


def _at_bound(parts, params, options) -> np.ndarray:
    """(n, params) mask: the free parameters of each ``(part, its columns, its compiled
    program)`` in ``parts`` that ``params`` puts on a bound (``pinned``); False elsewhere."""
    mask = np.zeros(params.shape, dtype=bool)
    for part, idx, compiled in parts:
        lower, upper = (np.broadcast_to(b, params[:, idx].shape) for b in (part.params.lower, part.params.upper))
        mask[:, idx] = pinned(params[:, idx], compiled, lower, upper, options.pinned_tolerance)
    return mask


def _undetected_line_params(out, model) -> np.ndarray:
    """(n, params) mask: the parameters of every component of a line ``out["line_detected"]``
    says is not detected."""
    names = model.param_names
    lines, components = (model.metadata.get(key) or {} for key in ("lines", "components"))
    mask = np.zeros((len(out["status"]), len(names)), dtype=bool)
    if "line_detected" not in out:  # a model without lines
        return mask
    for k, line in enumerate(model_lines(model)):  # the columns of line_detected
        own = np.isin(names, [p for c in (lines.get(line) or {}).get("components", ()) for p in (components.get(c) or {}).get("params", ())])
        mask |= (~out["line_detected"][:, k])[:, None] & own[None, :]
    return mask


def _value_and_jacobian(compiled, wavelength, params, group: int) -> tuple[np.ndarray, np.ndarray]:
    """The model (n, pix) and its Jacobian in the free parameters (n, free, pix): one forward
    difference per free parameter, all in one batch of evaluations of the compiled model."""
    E = compiled.embed_matrix  # (params, free)
    value = _evaluate(compiled, wavelength, params, group)
    step = 1e-6 * np.maximum(np.abs(params @ np.where(E != 0, 1.0, 0.0)), 1.0)  # (n, free)
    shifted = params[:, None, :] + step[:, :, None] * E.T[None, :, :]  # (n, free, params)
    n, k = step.shape
    wl_rep = np.repeat(wavelength, k, axis=0) if np.ndim(wavelength) == 2 else wavelength
    moved = _evaluate(compiled, wl_rep, shifted.reshape(n * k, -1), group).reshape(n, k, -1)
    return value, (moved - value[:, None, :]) / step[:, :, None]


def _irls_weights(residual, inv_var, options) -> np.ndarray:
    """The weights of the robust loss at ``residual`` (IRLS: log-cosh's tanh(u)/u), or the
    inverse variances for a chi-square."""
    if options.loss_kind != "logcosh":
        return inv_var
    return inv_var * irls_weight(residual * np.sqrt(inv_var) / float(options.robust_scale))


def _objective(residual, inv_var, usable, options) -> np.ndarray:
    """Per spectrum, LM's objective of ``residual``: 2 sum(:func:`~sheap_dask.loss.robust_rho`)
    (float64 numpy for numpy input), or the sum of r^2 for a chi-square."""
    if options.loss_kind != "logcosh":
        return _chi2(residual, inv_var, usable)
    u = np.where(usable, residual, 0.0) * np.sqrt(inv_var)
    return 2.0 * np.sum(robust_rho(u, float(options.robust_scale)), axis=1)


def _chi2(residual, inv_var, usable) -> np.ndarray:
    """Per spectrum, the plain chi-square of ``residual`` over the usable pixels."""
    return np.sum(np.where(usable, inv_var * residual**2, 0.0), axis=1)


def _gauss_newton_step(evaluate, p, E, lower, upper, value, objective, J, target, inv_var, usable, options, hold):
    """One projected Gauss-Newton step of the parameters ``p`` (n, params) towards ``target``
    over the usable pixels, with the IRLS weights of the robust loss; ``evaluate(p)`` gives the
    model (n, pix), ``value`` its value at ``p``, ``J`` its Jacobian in the free parameters
    (``E``: params x free), ``lower``/``upper`` the parameters' bounds. Free parameters in
    ``hold`` (n, free) do not move; one whose step would leave its range is set on the bound
    and the others re-solved (up to four rounds); the step is kept only where it lowers the
    objective (``objective``: its value at ``p``). Returns the new parameters, the model there
    and its objective."""
    resid = np.where(usable, target - value, 0.0)
    weight = _irls_weights(resid, inv_var, options)
    H = np.einsum("nip,np,njp->nij", J, weight, J, optimize=True)
    g = np.einsum("nip,np,np->ni", J, weight, resid, optimize=True)
    src = np.argmax(E != 0, axis=0)  # each free parameter's own
    lower, upper = np.asarray(lower), np.asarray(upper)
    x = p[:, src]
    eye = np.eye(H.shape[1])
    held = np.asarray(hold, dtype=bool).copy()
    held_step = np.zeros_like(x)
    for _ in range(4):
        free_H = np.where(held[:, :, None] | held[:, None, :], 0.0, H)
        damping = 1e-3 * np.maximum(np.einsum("nii->ni", free_H), 1e-30)  # Marquardt's, on the free ones
        system = free_H + (held + np.where(held, 0.0, damping))[:, :, None] * eye[None]
        rhs = np.where(held, held_step, g - np.einsum("nij,nj->ni", H, np.where(held, held_step, 0.0)))
        with np.errstate(all="ignore"):
            try:
                delta = np.nan_to_num(np.linalg.solve(system, rhs[:, :, None])[:, :, 0])
            except np.linalg.LinAlgError:  # a singular row: no step anywhere in this chunk
                return p, value, objective
        moved = x + delta
        leaves = ((moved < lower[src]) | (moved > upper[src])) & ~held
        if not leaves.any():
            break
        held_step = np.where(leaves, np.clip(moved, lower[src], upper[src]) - x, held_step)
        held |= leaves
    trial = np.clip(p + delta @ E.T, lower, upper)
    trial_value = evaluate(trial)
    trial_objective = _objective(target - trial_value, inv_var, usable, options)
    better = trial_objective < objective
    return np.where(better[:, None], trial, p), np.where(better[:, None], trial_value, value), np.where(better, trial_objective, objective)


def _evaluate(compiled, wavelength, params, group: int) -> np.ndarray:
    """The model for each row of ``params``, NaN-free (a model evaluated outside its range
    contributes nothing to a Jacobian of usable pixels)."""
    return np.nan_to_num(compiled.evaluate_rows(wavelength, params, group))


def _fit_lines_on_continuum(model, stage, first, wavelength, flux, ivar, redshift, init, options, pad_to, penalty_function):
    """The second stage with a lines model: fit it to the spectra minus the continuum found,
    and report the result on the full model's parameters (the continuum's from ``first``)."""
    names = model.param_names
    line_idx = np.array([names.index(n) for n in stage.lines.param_names])
    cont_idx = np.array([names.index(n) for n in stage.model.param_names])
    flux = np.asarray(flux, dtype=np.float64)
    n_spec = flux.shape[0]
    z = np.zeros(n_spec) if redshift is None else np.nan_to_num(np.asarray(redshift, dtype=np.float64).reshape(n_spec), nan=0.0)
    wl = np.asarray(wavelength, dtype=np.float64)
    rest = (wl if wl.ndim == 2 else wl[None, :]) / (1.0 + z[:, None])
    ok = np.all(np.isfinite(first["params"]), axis=1)
    continuum = np.zeros_like(flux)
    if ok.any():  # the rest-frame continuum, back in the observed frame
        cont_params = np.where(ok[:, None], first["params"], np.asarray(stage.model.params.values)[None])
        compiled = get_compiled(stage.model, _windows_options(stage, options), penalty_function)
        evaluated = compiled.evaluate_rows(rest if wl.ndim == 2 else rest[0] if np.all(z == z[0]) else rest, cont_params,
                                           group_size(max(int(pad_to or n_spec), n_spec)))
        continuum = np.where(ok[:, None], evaluated / (1.0 + z[:, None]), 0.0)
    lines_init = None if init is None else np.asarray(init, dtype=np.float64)[:, line_idx]
    if lines_init is None:  # starting values from the full model's initializer, on the full spectra
        with np.errstate(all="ignore"):
            usable = np.isfinite(flux) & (np.asarray(ivar) > 0)
            guess = model.initial_values(rest if wl.ndim == 2 or not np.all(z == z[0]) else rest[0],
                                         np.where(usable, flux * (1.0 + z[:, None]), np.nan),
                                         np.where(usable, np.asarray(ivar) / (1.0 + z[:, None]) ** 2, 0.0), clip=False)
        lines_init = guess[:, line_idx]
    second = _fit_chunk(stage.lines, wavelength, flux - continuum, ivar, redshift, lines_init, options, pad_to, penalty_function)
    # on the full model's parameters: lines from the second stage, continuum from the first
    out = dict(second)
    params = np.full((n_spec, len(names)), np.nan)
    params[:, line_idx] = second["params"]
    params[:, cont_idx] = first["params"]
    out["params"] = params
    for name in ("params_err", "at_bound"):
        full = np.zeros((n_spec, len(names)), dtype=second[name].dtype) if name == "at_bound" else np.full((n_spec, len(names)), np.nan)
        full[:, line_idx] = second[name]
        out[name] = full
    cov = np.full((n_spec, len(names), len(names)), np.nan)
    cov[:, line_idx[:, None], line_idx[None, :]] = second["params_cov"]
    cov[:, line_idx[:, None], cont_idx[None, :]] = 0.0  # the stages' parameters are taken as independent
    cov[:, cont_idx[:, None], line_idx[None, :]] = 0.0
    out["params_cov"] = cov
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
