"""What a chunk reports besides the parameters: errors and covariance, line fluxes and their
detection, the quality bits of the final fit."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .batch import ChunkArrays, converged_median, redchi2_outlier
from .batch import pinned as pinned_params
from .quality import Quality
from .status import Status

__all__ = ["finish_quality", "absent_params", "absent_line_components", "parameter_errors", "line_fluxes", "model_lines"]


def model_lines(model) -> dict[str, list[str]]:
    """line name -> the flux parameters that add up to its flux (from ``metadata["lines"]``)."""
    lines = model.metadata.get("lines", {}) if isinstance(model.metadata, Mapping) else {}
    out = {}
    for name, info in lines.items():
        params = [f"{c}_flux" for c in (info or {}).get("components", []) if f"{c}_flux" in model.params.names]
        if params:
            out[name] = params
    return out


def finish_quality(out, good, compiled, chunk: ChunkArrays, options) -> None:
    """``at_bound`` and the quality bits that depend on the final fit."""
    fitted = good & np.isin(out["status"], [s.value for s in Status if s.ok])
    at_bound = pinned_params(out["params"], compiled, chunk.lower, chunk.upper, options.pinned_tolerance) & fitted[:, None]
    out["at_bound"][:] = at_bound
    # an absent component (its fluxes or template weights resting on a zero lower bound) is
    # "not there", not "stuck": the detection bits report it, and its shape parameters are
    # free to sit anywhere, so neither raises PARAM_AT_BOUND
    # and a flux at a zero lower bound is a value, not a stuck parameter: a template weight
    # of a non-negative combination (the host's) is zero whenever that template is not needed
    with np.errstate(invalid="ignore"):
        zero_flux = compiled.flux_mask[None, :] & (chunk.lower == 0) & (out["params"] <= 0.5 * chunk.upper)
    excused = absent_params(out["params"], at_bound, compiled, chunk) | zero_flux
    out["quality"][(at_bound & ~excused).any(axis=1)] |= Quality.PARAM_AT_BOUND
    out["quality"][out["method"] == "slsqp"] |= Quality.FALLBACK_USED
    median = converged_median(out, good)
    if median is not None:
        outlier = fitted & redchi2_outlier(out["redchi2"], out["dof"], median, options.fallback_redchi2_sigma)
        out["quality"][outlier] |= Quality.CHI2_OUTLIER


def absent_params(params, at_bound, compiled, chunk: ChunkArrays) -> np.ndarray:
    """(n, n_params) mask: the parameters of components whose flux parameters all rest at a
    zero lower bound (an undetected line, a host with zero weights), those flux parameters
    included. Components come from ``model.metadata["components"][name]["params"]``; a model
    without that metadata treats each flux parameter as its own component."""
    with np.errstate(invalid="ignore"):
        zero = compiled.flux_mask[None, :] & at_bound & (chunk.lower == 0) & (params <= 0.5 * chunk.upper)
    absent = zero.copy()
    meta = compiled.model.metadata if isinstance(compiled.model.metadata, Mapping) else {}
    names = list(compiled.names)
    for info in (meta.get("components") or {}).values():
        members = [names.index(p) for p in (info or {}).get("params", ()) if p in names]
        fluxes = [i for i in members if compiled.flux_mask[i]]
        if fluxes:
            absent[:, members] |= zero[:, fluxes].all(axis=1)[:, None]
    return absent


def absent_line_components(params, at_bound, compiled, chunk: ChunkArrays) -> tuple[np.ndarray, np.ndarray]:
    """(n, n_params) masks ``(absent, unused)``: the parameters of the absent components
    (:func:`absent_params`) of the model's lines, and among them those of lines that keep at
    least one present component (the Gaussians a multi-Gaussian line does not use; a line
    with every component absent, an undetected line, is absent but not unused)."""
    every = absent_params(params, at_bound, compiled, chunk)
    absent, unused = np.zeros_like(every), np.zeros_like(every)
    meta = compiled.model.metadata if isinstance(compiled.model.metadata, Mapping) else {}
    components = meta.get("components") or {}
    names = list(compiled.names)
    for info in (meta.get("lines") or {}).values():
        members = [[names.index(p) for p in (components.get(c) or {}).get("params", ()) if p in names]
                   for c in (info or {}).get("components", ())]
        members = [m for m in members if m]
        if not members:
            continue
        gone = np.stack([every[:, m].all(axis=1) for m in members], axis=1)  # (n, n_components)
        some_present = ~gone.all(axis=1)
        for k, m in enumerate(members):
            absent[:, m] |= gone[:, k][:, None]
            unused[:, m] |= (gone[:, k] & some_present)[:, None]
    return absent, unused


def parameter_errors(jtwj, compiled, out, options, span, absent=None, unused=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """1-sigma errors sqrt(diag(E C E^T)) with C the covariance of the free parameters and
    ``(undefined,)`` per spectrum: NaN only for parameters along a degenerate direction.

    C is the pseudo-inverse of the (IRLS-weighted) J^T W J (:func:`sheap_dask.lm.lm_covariance`:
    a parameter with a non-negligible component along a null direction gets NaN, the others
    keep finite errors); tied parameters follow their source, fixed ones are 0. An error
    wider than the parameter's allowed range (``span``, per spectrum) says only that the data
    do not constrain it: it is NaN too. Also returns the covariance E C E^T of all
    parameters (NaN rows and columns for the undefined ones).

    ``absent`` (n, n_params), optional: the parameters of line components resting at zero
    flux (:func:`absent_line_components`), an active bound. The errors of every other parameter are those
    with the absent ones held at their values: otherwise an absent Gaussian's free shape
    (anywhere, any width) spreads its degeneracy into the errors of the components that are
    there. The absent ones keep their own block of the unconditioned covariance (the flux
    error an undetected line's upper limit comes from), uncorrelated with the rest; those in
    ``unused`` (an unused Gaussian of a line that has others)
    get NaN errors and zero covariance instead.
    """
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
    scale = np.where(np.isfinite(out["redchi2"][ok]), out["redchi2"][ok], np.nan) if options.error_scale == "redchi2" else None
    jtwj = np.asarray(jtwj[ok], dtype=np.float64)
    e, full, bad = _covariance(jtwj, compiled, span[ok], scale)
    if absent is not None and absent[ok].any():
        E = compiled.embed_matrix
        sets = (E != 0).T  # (n_free, n_params); a free parameter is held when all it sets are absent
        held_free = np.stack([absent[ok][:, sets[j]].all(axis=1) if sets[j].any() else np.zeros(int(ok.sum()), bool)
                              for j in range(compiled.n_free)], axis=1)
        held = (held_free.astype(float) @ sets) > 0
        rows, cols = np.nonzero(held_free)
        conditioned = jtwj.copy()
        conditioned[rows, cols, :] = 0.0
        conditioned[rows, :, cols] = 0.0
        conditioned[rows, cols, cols] = 1.0  # decoupled; its variance is replaced below
        e_c, full_c, bad_c = _covariance(conditioned, compiled, span[ok], scale)
        own = held[:, :, None] & held[:, None, :]
        cross = held[:, :, None] ^ held[:, None, :]
        full = np.where(own, full, np.where(cross, 0.0, full_c))
        e = np.where(held, e, e_c)
        bad = np.where(held_free, bad, bad_c)
        if unused is not None:
            gone = held & unused[ok]
            e[gone] = np.nan
            full[gone[:, :, None] | gone[:, None, :]] = 0.0
    err[ok] = e
    cov_all[ok] = full
    undefined[ok] = bad.any(axis=1)
    return err, undefined, cov_all


def _covariance(jtwj, compiled, span, scale) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Errors, covariance of all parameters and (bad,) per free parameter, see parameter_errors."""
    from .lm import lm_covariance

    cov = lm_covariance(jtwj)
    bad_free = np.isnan(np.einsum("nii->ni", cov))
    E = compiled.embed_matrix
    with np.errstate(all="ignore"):
        full = np.einsum("ij,njk,lk->nil", E, np.nan_to_num(cov), E)
        e = np.sqrt(np.clip(np.einsum("nii->ni", full), 0, None))
    # a parameter is undefined when any free parameter it depends on is
    e[(bad_free.astype(float) @ (E.T != 0)) > 0] = np.nan
    if scale is not None:
        e = e * np.sqrt(scale)[:, None]
    with np.errstate(invalid="ignore"):
        unconstrained = e > span
    e[unconstrained] = np.nan
    e[:, compiled.embed_fixed_mask] = 0.0
    nan = np.isnan(e)
    full[nan[:, :, None] | nan[:, None, :]] = np.nan
    if scale is not None:
        full = full * scale[:, None, None]
    # a free parameter is bad when its error is undefined or wider than its range
    bad = bad_free | ((unconstrained.astype(float) @ (E != 0)) > 0)
    return e, full, bad


def line_fluxes(out, model, options) -> None:
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
        # only the line's own parameters: a NaN row elsewhere (an undefined width) must not
        # leak into the flux through a zero weight
        var = np.stack([out["params_cov"][:, w > 0][:, :, w > 0].sum(axis=(1, 2)) for w in weights], axis=1)
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
