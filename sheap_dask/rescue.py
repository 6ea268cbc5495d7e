"""Fits that need more than the batched solve: restarts, absorber rejection, the SLSQP fallback.

All batched except the fallback, which is the only loop over spectra (failed ones only);
each compares and minimises the objective of the batched solve (``loss``).
"""

from __future__ import annotations

import functools
import logging
import time

import numpy as np

from .batch import (
    ChunkArrays,
    converged_median,
    group_size,
    redchi2_outlier,
    solve,
    update_redchi2,
)
from .batch import (
    pinned as pinned_params,
)
from .compiled import _STATS
from .quality import Quality
from .status import Status

logger = logging.getLogger("sheap_dask.chunk")

__all__ = ["fallback_candidates", "reject_absorbers", "restart_suspects", "run_fallback", "trough_mask"]


def _timed(count_key: str, seconds_key: str):
    """Count the spectra a step takes (its return value) and the seconds it spends."""

    def wrap(step):
        @functools.wraps(step)
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            n = step(*args, **kwargs) or 0
            _STATS[count_key] += int(n)
            _STATS[seconds_key] += time.perf_counter() - t0
            return n

        return timed

    return wrap


@_timed("restarted", "restart_seconds")
def restart_suspects(out, jtwj, compiled, chunk: ChunkArrays, options) -> int:
    """Batched restarts for fits stuck in a local minimum; keeps the lowest objective.

    A parameter driven onto a bound (a line flux at 0, a shift at its limit) has a vanishing
    gradient in the optimizer's bounded coordinates, so LM cannot bring it back even when
    the fit is clearly poor. Suspects are spectra with a reduced chi-square above
    ``median * (1 + redchi2_sigma * sqrt(2 / dof))`` or a pinned parameter (other than the
    model's resting bounds, ``metadata["components"][c]["resting_bounds"]``: a host dispersion
    at 0, where the model's derivative vanishes anyway) and a chi-square above the median.
    Each is re-fitted in one batch from two or three starts: with its pinned parameters reset
    to their initial values; with the whole components of its pinned parameters reset; and,
    where the initial lines' shifts are not the model's defaults, from the initial values with
    every line's shift at its default (the redshift's frame): the initializer takes the narrow
    lines' shift from a peak, which a blend (narrow H-alpha and [NII] on a broad H-alpha) can
    put hundreds of km/s off, and the fit from there can end in a poorer minimum. The lowest
    objective of the fits is kept.
    """
    good = chunk.good
    median = converged_median(out, good)
    if median is None:
        return 0
    ok = good & (out["status"] == Status.CONVERGED) & np.isfinite(out["redchi2"])
    outlier = redchi2_outlier(out["redchi2"], out["dof"], median, options.redchi2_sigma)
    # a parameter at a bound where the model is stationary anyway (a host dispersion at 0) is not stuck
    pinned = pinned_params(out["params"], compiled, chunk.lower, chunk.upper, options.pinned_tolerance) & ~compiled.resting_bound_mask
    suspects = np.flatnonzero(ok & (outlier | (pinned.any(axis=1) & (out["redchi2"] > median))))
    if suspects.size == 0:
        return 0
    pinned = pinned[suspects]
    whole = pinned.copy()
    for group in compiled.component_groups:
        whole[:, group] |= whole[:, group].any(axis=1, keepdims=True)
    current = out["params"][suspects]
    start = chunk.start[suspects]
    trials = [(suspects, np.where(pinned, start, current)), (suspects, np.where(whole, start, current))]
    in_frame = np.where(compiled.line_shift_mask, np.asarray(compiled.model.params.values, dtype=np.float64), start)
    moved = np.any(in_frame != start, axis=1)  # otherwise the same start as the first fit
    if moved.any():
        trials.append((suspects[moved], in_frame[moved]))
    # every start of every suspect in one batched solve (one pass of the lanes)
    rows = np.concatenate([r for r, _ in trials])
    pair = ChunkArrays(**{**chunk.__dict__, "wl": chunk.wl[rows] if chunk.wl.ndim == 2 else chunk.wl, "flux": chunk.flux[rows],
                          "errors": chunk.errors[rows], "lower": chunk.lower[rows], "upper": chunk.upper[rows]})
    res = solve(compiled, pair, np.concatenate([t for _, t in trials]), np.arange(rows.size))
    valid = (res["status"] == Status.CONVERGED) & np.isfinite(res["loss"])
    offset = 0
    for trial_rows, _ in trials:  # an earlier start wins a tie, as when run one after the other
        part = slice(offset, offset + trial_rows.size)
        offset += trial_rows.size
        v = valid[part]
        win = v & (res["loss"][part] < out["loss"][trial_rows])
        i = trial_rows[win]
        for name in ("params", "loss", "chi2"):
            out[name][i] = res[name][part][win]
        out["n_iter"][trial_rows[v]] += res["n_iter"][part][v]
        jtwj[i] = res["jtwj"][part][win]
    update_redchi2(out, suspects)
    return suspects.size


@_timed("absorber_refits", "absorber_seconds")
def reject_absorbers(out, jtwj, compiled, chunk: ChunkArrays, options) -> int:
    """Mask narrow troughs far below the model and re-solve the spectra that have them.

    Rule (documented in the README): with residuals r = (data - model)/sigma measured from
    their running clipped mean (so broad model mismatch does not count), a trough is a run of
    adjacent pixels below -``absorber_sigma`` / 1.5 whose deepest pixel is below
    -``absorber_sigma``, two to ``absorber_max_width`` pixels long (one pixel below -2 x
    ``absorber_sigma`` also counts); it is grown by ``absorber_grow`` pixels on each side
    and masked. A spectrum whose masked pixels would exceed ``absorber_max_fraction`` of its
    usable pixels is left alone (the model, not absorbers, is wrong there). The affected
    spectra are re-solved from their current parameters in one batched call, up to
    ``absorber_iterations`` times.
    """
    refits = 0
    for _ in range(int(options.absorber_iterations)):
        rows = np.flatnonzero(chunk.good & (out["status"] == Status.CONVERGED))  # an unconverged fit's residuals say little
        if rows.size == 0:
            break
        resid, sharp = _residuals(compiled, chunk, out["params"], rows, int(options.absorber_max_width))
        mask = trough_mask(resid, options.absorber_sigma, int(options.absorber_grow), int(options.absorber_max_width))
        mask &= ~sharp  # a misfit narrow emission peak is not an absorber
        n_new = mask.sum(axis=1)
        usable = np.isfinite(chunk.errors[rows])
        n_total = out["n_masked"][rows] + n_new
        accept = (n_new > 0) & (n_total <= options.absorber_max_fraction * usable.sum(axis=1))
        if not accept.any():
            break
        hit = rows[accept]
        refits += hit.size
        chunk.errors[hit] = np.where(mask[accept], np.inf, chunk.errors[hit])
        chunk.flux[hit] = np.where(mask[accept], 0.0, chunk.flux[hit])
        out["n_masked"][hit] = n_total[accept]
        out["dof"][hit] -= n_new[accept]
        out["quality"][hit] |= Quality.ABSORBERS_MASKED
        res = solve(compiled, chunk, out["params"], hit)
        done = np.isfinite(res["loss"]) & np.all(np.isfinite(res["params"]), axis=1)
        i = hit[done]
        for name in ("params", "loss", "chi2", "status"):
            out[name][i] = res[name][done]
        out["n_iter"][i] += res["n_iter"][done]
        jtwj[i] = res["jtwj"][done]
        update_redchi2(out, hit)
    return refits


def _residuals(compiled, chunk: ChunkArrays, params: np.ndarray, rows: np.ndarray, max_width: int) -> tuple[np.ndarray, np.ndarray]:
    """(data - model)/sigma of ``rows`` (NaN where masked), and where the model itself has a
    narrow peak (more than 3 sigma above its own running mean over +-``2 max_width`` pixels,
    grown by ``max_width``): the neighbourhood of narrow emission lines, never masked."""
    wl = chunk.wl[rows] if chunk.wl.ndim == 2 else chunk.wl
    model = compiled.evaluate_rows(wl, params[rows], group_size(chunk.batch))
    errors = chunk.errors[rows]
    with np.errstate(all="ignore"):
        resid = np.where(np.isfinite(errors), (chunk.flux[rows] - model) / errors, np.nan)
        peak = np.where(np.isfinite(errors), (model - _running_mean(model, 2 * max_width)) / errors, 0.0) > 3.0
    sharp = peak.copy()
    for shift in range(1, max_width + 1):
        sharp[:, shift:] |= peak[:, :-shift]
        sharp[:, :-shift] |= peak[:, shift:]
    return resid, sharp


def _running_mean(values: np.ndarray, half: int, weights: np.ndarray | None = None) -> np.ndarray:
    """Weighted mean over +-``half`` pixels (``values`` already multiplied by 0/1 ``weights``);
    cumulative sums: linear in the number of pixels, edges shortened; 0 where no weight."""
    weights = np.ones_like(values) if weights is None else weights
    pad = ((0, 0), (1, 0))
    total, count = np.cumsum(np.pad(values, pad), axis=1), np.cumsum(np.pad(weights, pad), axis=1)
    idx = np.arange(values.shape[1])
    lo, hi = np.clip(idx - half, 0, None), np.clip(idx + half + 1, None, values.shape[1])
    n = count[:, hi] - count[:, lo]
    return np.where(n > 0, (total[:, hi] - total[:, lo]) / np.maximum(n, 1e-300), 0.0)


def trough_mask(resid: np.ndarray, sigma: float, grow: int, max_width: int) -> np.ndarray:
    """Pixels of narrow troughs (see :func:`reject_absorbers`), vectorised over spectra.

    Residuals are measured against their running (clipped) mean over ``4 * max_width + 1`` pixels,
    so a broad stretch where the model is off (continuum or FeII mismatch, common at high
    S/N) is not mistaken for absorption: only dips narrower than ``max_width`` pixels are.
    """
    n_spec, n_pix = resid.shape
    baseline = _running_level(resid, 2 * max_width)
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


def _running_level(resid: np.ndarray, half: int) -> np.ndarray:
    """The local level of the residuals: their mean over +-``half`` pixels after clipping at
    +-2 (so the troughs themselves barely move it); NaN pixels left out."""
    finite = np.isfinite(resid)
    return _running_mean(np.where(finite, np.clip(resid, -2.0, 2.0), 0.0), half, finite.astype(float))


def _edge(n_pix: int, where: int) -> np.ndarray:
    edge = np.zeros(n_pix, dtype=bool)
    edge[where] = True
    return edge


def fallback_candidates(out, good, compiled, chunk: ChunkArrays, options) -> np.ndarray:
    """Indices of spectra to re-fit with SLSQP (the documented rule, see sheap_dask.yaml)."""
    status = out["status"]
    bad = good & (status != Status.CONVERGED)
    median = converged_median(out, good)
    if median is not None and options.fallback_outliers:
        converged = good & (status == Status.CONVERGED) & np.isfinite(out["redchi2"])
        bad |= converged & redchi2_outlier(out["redchi2"], out["dof"], median, options.fallback_redchi2_sigma)
    if options.pinned_fraction > 0:
        bad |= good & pinned_params(out["params"], compiled, chunk.lower, chunk.upper, options.pinned_fraction).any(axis=1)
    return np.flatnonzero(bad)


@_timed("fallback", "fallback_seconds")
def run_fallback(retry, out, jtwj, compiled, chunk: ChunkArrays, options) -> int:
    """Re-fit ``retry`` spectra one by one with SLSQP on the batched solve's objective; keep
    whichever fit has the lower objective."""
    import jax

    params = compiled.model.params
    free = compiled.free_index
    solver = compiled.slsqp(options)
    batch_rows = out["params"][retry]
    offsets = params.expand_free(np.zeros((retry.size, compiled.n_free)), np.where(np.isfinite(batch_rows), batch_rows, chunk.start[retry]))
    logger.info("SLSQP fallback for %d spectra", retry.size)
    done = []  # (row, SLSQP result, candidate parameters, was converged)
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
        done.append((i, res, params.expand_free(np.asarray(res.values, dtype=np.float64), offsets[k]), out["status"][i] == Status.CONVERGED))
    if not done:
        return retry.size
    # objective, chi-square and J^T W J of every SLSQP fit at once, in the post-processing
    # groups compiled with the first chunk (no one-row program to compile)
    rows = np.array([d[0] for d in done])
    wl, flux, errors, _, _ = chunk.rows(rows)
    chi2, objective, jtwj_new = compiled.post_rows(np.stack([d[2] for d in done]), wl, flux, errors, rows.size, group_size(chunk.batch))
    for j, (i, res, candidate, was_converged) in enumerate(done):
        # A converged batch fit (re-fitted only as an outlier) is replaced only by a
        # converged SLSQP fit with a lower objective: never by a worse or unconverged one.
        # An unconverged one is replaced by a converged SLSQP fit that is no worse.
        old = out["loss"][i]
        better = np.isfinite(objective[j]) and not (objective[j] >= old)  # also when the old one is NaN
        as_good = np.isfinite(objective[j]) and res.converged and not was_converged and objective[j] <= old + 1e-9 * abs(old)
        if (better or as_good) and (res.converged or not was_converged):
            out["params"][i] = candidate
            out["loss"][i], out["chi2"][i] = objective[j], chi2[j]
            out["method"][i] = "slsqp"
            out["n_iter"][i] = res.n_eval
            out["status"][i] = Status.CONVERGED_AFTER_FALLBACK if res.converged else Status.FAILED
            jtwj[i] = jtwj_new[j]
            update_redchi2(out, np.array([i]))
        elif out["status"][i] == Status.NONFINITE:
            out["status"][i] = Status.FAILED
    return retry.size
