"""The columns of the quasar catalogue: one region's fits -> its measurements, and the regions
of every spectrum -> one row per spectrum (Dataset layer; :func:`sheap_dask.catalog.fit_catalog`
runs it).

A region's table (:func:`region_table`) is computed chunk by chunk along the spectrum
dimension from its fit result with one Monte Carlo run per chunk
(:func:`sheap_dask.derived.catalog.region_measurements`), then masked by the fit's own verdicts:
a spectrum whose fit has no usable parameters (status ``no_data``, ``nonfinite``, ``failed``,
``pending``) gets NaN everywhere; a line that is not detected (``line_detected``) keeps its flux
(with its error) but its peak, widths, shift and EW are NaN and its log luminosity is a
3-sigma upper limit; masses that use an undetected broad line are NaN.
:func:`assemble` puts the regions' tables side by side along the full spectrum dimension and
adds the fiducial black-hole mass, the Eddington ratio and the catalogue flags.

Every column has CF ``long_name`` and ``units`` (flags ``flag_masks``/``flag_values`` and
``flag_meanings``); :data:`UNITS_FITS` maps the units to FITS for the exports.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence

import numpy as np
import xarray as xr

from .derived import catalog as measure
from .derived.bh_mass import RECIPES
from .derived.errors import log_upper_limit, log_value_error
from .derived.luminosity import agn_continuum_absent, log_lum_factor
from .quality import quality_attrs
from .status import Status, status_attrs

__all__ = ["CatalogFlag", "LineFlag", "FIDUCIAL_RULE", "fiducial_recipes", "region_table", "assemble", "line_columns"]

#: Statuses whose parameters are measured (``max_iter``: kept, flagged ``fit_not_converged``).
MEASURED_STATUSES = (Status.CONVERGED, Status.CONVERGED_AFTER_FALLBACK, Status.MAX_ITER)

#: DR16Q's fiducial black-hole mass by redshift (Wu & Shen 2022, ApJS 263, 42, sect. 4.3, as
#: Shen et al. 2011): H-beta (Vestergaard & Peterson 2006) below z = 0.8, MgII (Shen et al.
#: 2011 calibration) for 0.8 <= z < 1.9, CIV (Vestergaard & Peterson 2006) from z = 1.9.
FIDUCIAL_RULE: tuple[tuple[float, str], ...] = ((0.8, "vp06_hbeta"), (1.9, "shen11_mgii"), (math.inf, "vp06_civ"))
FIDUCIAL_RULE_TEXT = ("DR16Q (Wu & Shen 2022, ApJS 263, 42; as Shen et al. 2011): vp06_hbeta for z < 0.8, shen11_mgii for "
                      "0.8 <= z < 1.9, vp06_civ for z >= 1.9")
#: Greene & Ho 2005 (ApJ 630, 122) eq. 3: FWHM(H-beta) = 1.07e3 (FWHM(H-alpha) / 1e3 km/s)^1.03 km/s.
GH05_WIDTHS = (1.07e3, 1.03)


class LineFlag(enum.IntFlag):
    """Bits of ``<line>_flags``."""

    NOT_DETECTED = 1
    PARAM_AT_BOUND = 2
    ERROR_UNDEFINED = 4
    FIT_NOT_CONVERGED = 8
    NOT_MEASURED = 16


LINE_FLAG_MESSAGES = {
    LineFlag.NOT_DETECTED: "the line is not detected (flux / error below sheap_dask.lines.detection_sigma): its peak, widths, "
                           "shift and EW are NaN, its log luminosity is a 3-sigma upper limit",
    LineFlag.PARAM_AT_BOUND: "a parameter of the line's components ended at its bound",
    LineFlag.ERROR_UNDEFINED: "some error of the line is NaN (a degenerate direction of the covariance)",
    LineFlag.FIT_NOT_CONVERGED: "the region's fit stopped at its iteration limit (status max_iter): values kept",
    LineFlag.NOT_MEASURED: "the region was not fitted for this spectrum (not covered) or its fit failed: all NaN",
}


class CatalogFlag(enum.IntFlag):
    """Bits of the per-spectrum ``flags``."""

    BROAD_WIDTH_MISMATCH = 1
    FIDUCIAL_UNAVAILABLE = 2
    NO_REGION = 4


CATALOG_FLAG_MESSAGES = {
    CatalogFlag.BROAD_WIDTH_MISMATCH: "broad H-beta and H-alpha widths disagree: |FWHM(H-beta) - 1.07e3 (FWHM(H-alpha)/1e3)^1.03| "
                                      "> width_sigma x their combined error (Greene & Ho 2005, eq. 3)",
    CatalogFlag.FIDUCIAL_UNAVAILABLE: "no fiducial black-hole mass: its region was not fitted, its broad line is not detected "
                                      "or its fit failed",
    CatalogFlag.NO_REGION: "the spectrum covers no region of the catalogue",
}


def flag_attrs(flags: type[enum.IntFlag], messages: Mapping, long_name: str) -> dict:
    return {
        "flag_masks": np.array([f.value for f in flags], dtype=np.int32),
        "flag_meanings": " ".join(str(f.name).lower() for f in flags),
        "flag_descriptions": "; ".join(f"{str(f.name).lower()}: {messages[f]}" for f in flags),
        "long_name": long_name,
        "units": "1",
    }


# --------------------------------------------------------------------------------------
# Names, units and descriptions
# --------------------------------------------------------------------------------------
#: line quantity -> (long_name template, units template); "{flux}" is the flux unit scale
LINE_COLUMNS = {
    "peak": ("rest-frame wavelength of the peak of {line}'s model profile", "Angstrom"),
    "flux": ("integrated flux of {line} (its model profile; the observed flux)", "{flux} erg/s/cm2"),
    "log_lum": ("log10 luminosity of {line}; a 3-sigma upper limit where it is not detected (see {line}_flags)", "log10(erg/s)"),
    "fwhm": ("FWHM of {line}'s summed model profile", "km/s"),
    "sigma": ("line dispersion (second moment) of {line}'s model profile", "km/s"),
    "ew": ("rest-frame equivalent width of {line} against the AGN continuum", "Angstrom"),
    "shift": ("velocity of the peak of {line} relative to its rest wavelength (positive: redshift)", "km/s"),
}

#: CF units of this module -> FITS units (``TUNITn``); log quantities use the FITS function form.
UNITS_FITS = {
    "Angstrom": "Angstrom",
    "km/s": "km s-1",
    "erg/s": "erg s-1",
    "log10(erg/s)": "log(erg s-1)",
    "log10(M/M_sun)": "log(solMass)",
    "1": "",
}

_ERR_NOTE = ("1-sigma Monte Carlo error (half the 16-84% range over draws from the fit's params_mc, else params_cov, else "
             "params_err; sheap_dask.derived.errors)")


def line_columns(line: str) -> list[str]:
    """The columns of one line, values then errors then flags."""
    cols = []
    for q in LINE_COLUMNS:
        cols += [f"{line}_{q}", f"{line}_{q}_err"]
    return cols + [f"{line}_detected", f"{line}_flags"]


def _set(da: xr.DataArray, attrs: Mapping) -> xr.DataArray:
    """``da`` with exactly ``attrs`` (operations carry their operands' attrs along)."""
    da = da.copy(deep=False)
    da.attrs = dict(attrs)
    return da


def _attrs(long_name: str, units: str | None, **extra) -> dict:
    out = {"long_name": long_name}
    if units is not None:
        out["units"] = units
    out.update(extra)
    return out


def _err_attrs(attrs: Mapping) -> dict:
    return {**attrs, "long_name": f"1-sigma error of {attrs['long_name']}", "error_method": _ERR_NOTE}


# --------------------------------------------------------------------------------------
# One region
# --------------------------------------------------------------------------------------
def _measure_block(params, unc, z, index, *, model, plan, names, kind, flux_unit, H0, Om0, n_samples, seed, batch_size):
    """Worker side: one chunk of a region's fits -> (n, 2K + 1): values, errors, log10 of the
    luminosity factor."""
    n = params.shape[0]
    with np.errstate(all="ignore"):
        x = log_lum_factor(np.asarray(z, dtype=np.float64), n, flux_unit, H0, Om0) if z is not None else np.full(n, np.nan)
    options = {"n_samples": n_samples, "seed": seed, "index": np.asarray(index), "batch_size": batch_size}
    if kind == "draws":
        options["draws"] = unc
    elif kind == "cov":
        options["cov"] = unc
    res = measure.region_measurements(model, plan, params, unc if kind == "err" else None, log_lum_factor=x, **options)
    values = [np.asarray(res[k][0], dtype=np.float64) for k in names]
    errors = [np.asarray(res[k][1], dtype=np.float64) for k in names]
    return np.stack(values + errors + [np.asarray(x, dtype=np.float64)], axis=-1).reshape(n, 2 * len(names) + 1)


def plan_names(plan: measure.RegionPlan) -> list[str]:
    """The keys of :func:`~sheap_dask.derived.catalog.region_measurements` for ``plan``, in order."""
    names = [f"{ln}/{q}" for ln, _ in plan.lines for q in measure.LINE_QUANTITIES if q != "ew" or plan.continuum]
    names += [f"cont/{w:g}" for w in plan.wavelengths]
    names += [f"frac_host/{w:g}" for w in plan.host_wavelengths]
    names += [f"{name}/ew" for name, *_ in plan.feii]
    if plan.rfeii is not None:
        names.append("rfeii")
    for r in plan.recipes:
        names.append(f"mbh/{r}")
        if RECIPES[r].luminosity == "continuum" and float(RECIPES[r].wavelength) in measure.BOLOMETRIC:
            names += [f"lbol/{r}", f"edd/{r}"]
    return names


def region_table(
    fits: xr.Dataset,
    model,
    region: str,
    plan: measure.RegionPlan,
    *,
    flux_unit: float,
    H0: float,
    Om0: float,
    index: xr.DataArray,
    n_samples: int,
    seed: int,
    batch_size: int = 256,
    redshift: str = "redshift",
) -> xr.Dataset:
    """The catalogue columns of one region, along the spectrum dim of ``fits`` (lazy when
    ``fits`` is dask-backed).

    ``index`` (along the spectrum dim) keys each spectrum's Monte Carlo draws, so a spectrum
    gets the same draws whatever else is fitted with it.
    """
    dim = fits["params"].dims[0]
    names = plan_names(plan)
    k = len(names)
    if "params_mc" in fits:
        kind, unc, core = "draws", fits["params_mc"], list(fits["params_mc"].dims[1:])
    elif "params_cov" in fits:
        kind, unc, core = "cov", fits["params_cov"], list(fits["params_cov"].dims[1:])
    else:
        kind, unc, core = "err", fits["params_err"], ["param"]
    z = fits[redshift] if redshift in fits.variables else None
    zz = z.astype(np.float64) if z is not None else xr.full_like(index, np.nan, dtype=np.float64)
    if fits["params"].chunks:
        chunks = fits["params"].chunksizes[dim]
        zz = zz.chunk({dim: chunks})
        index = index.chunk({dim: chunks})
    raw = xr.apply_ufunc(
        _measure_block,
        fits["params"],
        unc,
        zz,
        index,
        input_core_dims=[["param"], core, [], []],
        output_core_dims=[["_quantity"]],
        dask="parallelized",
        output_dtypes=[np.float64],
        dask_gufunc_kwargs={"output_sizes": {"_quantity": 2 * k + 1}},
        kwargs=dict(model=model, plan=plan, names=names, kind=kind, flux_unit=flux_unit, H0=H0, Om0=Om0,
                    n_samples=int(n_samples), seed=int(seed), batch_size=int(batch_size)),
        keep_attrs=False,
    )
    raw = raw.drop_vars([c for c in raw.coords if c != dim], errors="ignore")

    def value(key: str) -> xr.DataArray:
        return raw.isel(_quantity=names.index(key), drop=True)

    def error(key: str) -> xr.DataArray:
        return raw.isel(_quantity=k + names.index(key), drop=True)

    x = raw.isel(_quantity=2 * k, drop=True)
    status = fits["status"]
    measured = status.isin([int(s) for s in MEASURED_STATUSES])
    not_converged = status == int(Status.MAX_ITER)
    flux_label = f"{flux_unit:g}"
    out: dict[str, xr.DataArray] = {}

    detected_all = fits["line_detected"] if "line_detected" in fits else None
    fit_lines = [str(v) for v in fits["line"].values] if "line" in fits.coords else []
    at_bound = fits["at_bound"] if "at_bound" in fits else None
    param_names = [str(p) for p in fits["param"].values]
    comps_of = {ln: list((model.metadata.get("lines") or {})[ln].get("components", [])) for ln, _ in plan.lines}
    detected_of: dict[str, xr.DataArray] = {}
    for ln, _ in plan.lines:
        if detected_all is not None and ln in fit_lines:
            det = detected_all.sel(line=ln, drop=True).astype(bool)
        else:  # a model without detection verdicts: finite, positive flux
            det = value(f"{ln}/flux") > 0
        det = det & measured
        detected_of[ln] = det
        for q in ("peak", "fwhm", "sigma", "shift") + (("ew",) if plan.continuum else ()):
            long_name, units = LINE_COLUMNS[q]
            attrs = _attrs(long_name.format(line=ln), units, undetected=f"NaN where {ln} is not detected")
            out[f"{ln}_{q}"] = value(f"{ln}/{q if q != 'shift' else 'shift'}").where(det).pipe(_set, attrs)
            out[f"{ln}_{q}_err"] = error(f"{ln}/{q}").where(det).pipe(_set, _err_attrs(attrs))
        long_name, units = LINE_COLUMNS["flux"]
        attrs = _attrs(long_name.format(line=ln), units.replace("{flux}", flux_label))
        flux_v, flux_e = value(f"{ln}/flux").where(measured), error(f"{ln}/flux").where(measured)
        out[f"{ln}_flux"] = flux_v.pipe(_set, attrs)
        out[f"{ln}_flux_err"] = flux_e.pipe(_set, _err_attrs(attrs))
        lum, lum_e = xr.apply_ufunc(_log_lum, flux_v, flux_e, x, dask="parallelized", output_dtypes=[np.float64, np.float64],
                                    output_core_dims=[[], []])
        ul = xr.apply_ufunc(_log_lum_upper, flux_v, flux_e, x, dask="parallelized", output_dtypes=[np.float64])
        long_name, units = LINE_COLUMNS["log_lum"]
        attrs = _attrs(long_name.format(line=ln), units, cosmology=f"flat LambdaCDM H0={H0:g} Om0={Om0:g}")
        out[f"{ln}_log_lum"] = xr.where(det, lum, ul).where(measured).pipe(_set, attrs)
        out[f"{ln}_log_lum_err"] = lum_e.where(det).pipe(_set, _err_attrs(attrs))
        out[f"{ln}_detected"] = det.pipe(_set, _attrs(f"{ln} detected (flux / error >= sheap_dask.lines.detection_sigma) in a "
                                                        "measured fit", "1"))
        flags = xr.zeros_like(status, dtype=np.int16)
        flags = flags | xr.where(measured & ~det, int(LineFlag.NOT_DETECTED), 0)
        if at_bound is not None:
            mine = [p for p in param_names if any(p.startswith(f"{c}_") for c in comps_of[ln])]
            if mine:
                flags = flags | xr.where(measured & at_bound.sel(param=mine).any("param"), int(LineFlag.PARAM_AT_BOUND), 0)
        undefined = False
        for q in ("flux", "fwhm", "sigma", "shift"):
            undefined = undefined | (np.isnan(out[f"{ln}_{q}_err"]) & np.isfinite(out[f"{ln}_{q}"]))
        flags = flags | xr.where(undefined, int(LineFlag.ERROR_UNDEFINED), 0)
        flags = flags | xr.where(not_converged, int(LineFlag.FIT_NOT_CONVERGED), 0)
        flags = flags | xr.where(~measured, int(LineFlag.NOT_MEASURED), 0)
        out[f"{ln}_flags"] = flags.astype(np.int16).pipe(_set, flag_attrs(LineFlag, LINE_FLAG_MESSAGES, f"quality flags of {ln}"))

    # no AGN continuum found (its flux parameters all at zero, e.g. a galaxy): no AGN luminosity
    absent = (xr.apply_ufunc(lambda b, p: agn_continuum_absent(model, b, p), at_bound, fits["params"], input_core_dims=[["param"], ["param"]],
                             dask="parallelized", output_dtypes=[bool])
              if at_bound is not None else False)
    for w in plan.wavelengths:
        tag = f"{w:g}"
        f_v, f_e = value(f"cont/{tag}").where(measured & ~absent), error(f"cont/{tag}").where(measured & ~absent)
        lv, le = xr.apply_ufunc(_log_cont, f_v, f_e, x, kwargs={"wavelength": w}, dask="parallelized",
                                output_dtypes=[np.float64, np.float64], output_core_dims=[[], []])
        host_note = " (AGN continuum: host starlight and FeII excluded)" if plan.host else " (AGN continuum, FeII excluded)"
        attrs = _attrs(f"log10 of the continuum lambda L_lambda at {tag} Angstrom (rest){host_note}, from the {region} fit",
                       "log10(erg/s)", cosmology=f"flat LambdaCDM H0={H0:g} Om0={Om0:g}", host_corrected=int(bool(plan.host)))
        out[f"log_l{tag}"] = lv.pipe(_set, attrs)
        out[f"log_l{tag}_err"] = le.pipe(_set, _err_attrs(attrs))
    for w in plan.host_wavelengths:
        tag = f"{w:g}"
        attrs = _attrs(f"host-galaxy fraction of the continuum at {tag} Angstrom (rest) in the {region} fit: host / (host + AGN)", "1")
        out[f"{region}_frac_host_{tag}"] = value(f"frac_host/{tag}").where(measured).pipe(_set, attrs)
        out[f"{region}_frac_host_{tag}_err"] = error(f"frac_host/{tag}").where(measured).pipe(_set, _err_attrs(attrs))
    for name, _comps, lo, hi in plan.feii:
        attrs = _attrs(f"rest-frame equivalent width of FeII over {lo:g}-{hi:g} Angstrom (integral of F_FeII / F_continuum)",
                       "Angstrom")
        out[f"ew_{name}"] = value(f"{name}/ew").where(measured).pipe(_set, attrs)
        out[f"ew_{name}_err"] = error(f"{name}/ew").where(measured).pipe(_set, _err_attrs(attrs))
    if plan.rfeii is not None:
        band, line = plan.rfeii
        attrs = _attrs(f"R_FeII = EW(FeII 4434-4684) / EW({line}) (Boroson & Green 1992); NaN where {line} is not detected", "1")
        out["r_feii"] = value("rfeii").where(detected_of[line]).pipe(_set, attrs)
        out["r_feii_err"] = error("rfeii").where(detected_of[line]).pipe(_set, _err_attrs(attrs))
    for r in plan.recipes:
        recipe = RECIPES[r]
        ok = detected_of[recipe.line]
        attrs = _attrs(f"single-epoch virial black-hole mass, recipe {r}; NaN where {recipe.line} is not detected",
                       "log10(M/M_sun)", reference=recipe.reference,
                       scatter_dex=recipe.scatter_dex if recipe.scatter_dex is not None else np.nan,
                       error_note="measurement error only; the recipe's intrinsic scatter (scatter_dex) is not included")
        out[f"log_mbh_{r}"] = value(f"mbh/{r}").where(ok).pipe(_set, attrs)
        out[f"log_mbh_{r}_err"] = error(f"mbh/{r}").where(ok).pipe(_set, _err_attrs(attrs))
        if f"lbol/{r}" in names:  # kept for the fiducial choice (assemble), dropped from the catalogue
            w = float(recipe.wavelength)
            texts = {"lbol": (f"log10 bolometric luminosity {measure.BOLOMETRIC[w]:g} x lambda L{w:g} (recipe {r}'s luminosity)",
                              "log10(erg/s)"),
                     "edd": (f"log10 Eddington ratio with log_mbh_{r} and its bolometric luminosity", "1")}
            for key, label in (("lbol", "_log_lbol"), ("edd", "_log_edd")):
                attrs = _attrs(*texts[key], reference=measure.BOLOMETRIC_REFERENCE)
                out[f"{label}_{r}"] = value(f"{key}/{r}").where(ok).pipe(_set, attrs)
                out[f"{label}_{r}_err"] = error(f"{key}/{r}").where(ok).pipe(_set, _err_attrs(attrs))

    p = region
    out[f"{p}_status"] = status.astype(np.int8).pipe(_set, {**status_attrs(), "long_name": f"status of the {region} fit", "units": "1"})
    out[f"{p}_quality"] = fits["quality"].astype(np.int32).pipe(_set, 
        {**quality_attrs(), "long_name": f"quality bitmask of the {region} fit (0: no caveat)", "units": "1"})
    out[f"{p}_chi2_nu"] = fits["redchi2"].astype(np.float64).pipe(_set, _attrs(f"reduced chi-square of the {region} fit", "1"))
    out[f"{p}_n_iter"] = fits["n_iter"].astype(np.int32).pipe(_set, 
        _attrs(f"iterations (batched solve) or function evaluations (fallback) of the {region} fit", "1"))
    out[f"{p}_method"] = fits["method"].astype(str).pipe(_set, _attrs(f"optimizer that produced the {region} fit's parameters", None))
    if "n_masked" in fits:
        out[f"{p}_n_masked"] = fits["n_masked"].astype(np.int32).pipe(_set, 
            _attrs(f"pixels masked as absorbers in the {region} fit", "1"))
    table = xr.Dataset(out)
    return table.drop_vars([c for c in table.coords if c != dim], errors="ignore")


def _log_lum(flux, err, x):
    with np.errstate(all="ignore"):
        factor = 10.0 ** x
        return log_value_error(flux * factor, err * factor)


def _log_lum_upper(flux, err, x):
    with np.errstate(all="ignore"):
        factor = 10.0 ** x
        return log_upper_limit(flux * factor, err * factor)


def _log_cont(f, err, x, *, wavelength):
    with np.errstate(all="ignore"):
        factor = wavelength * 10.0 ** x
        return log_value_error(f * factor, err * factor)


# --------------------------------------------------------------------------------------
# All regions: one row per spectrum
# --------------------------------------------------------------------------------------
def fill_values(table: xr.Dataset) -> dict:
    """What a region's columns hold for the spectra it was not fitted on."""
    fill = {}
    for name, var in table.data_vars.items():
        kind = np.dtype(var.dtype).kind
        if name.endswith("_status"):
            fill[name] = int(Status.NO_DATA)
        elif name.endswith("_flags"):
            fill[name] = int(LineFlag.NOT_MEASURED)
        elif kind in "iu":
            fill[name] = 0
        elif kind == "b":
            fill[name] = False
        elif kind in "USO":
            fill[name] = ""
        else:
            fill[name] = np.nan
    return fill


def expand(table: xr.Dataset, positions: np.ndarray, n: int, dim: str) -> xr.Dataset:
    """``table`` (rows at ``positions`` of the catalogue) along all ``n`` spectra."""
    fill = fill_values(table)
    attrs = {k: v.attrs for k, v in table.data_vars.items()}
    table = table.assign_coords({dim: np.asarray(positions, dtype=np.int64)})
    full = table.reindex({dim: np.arange(n, dtype=np.int64)}, fill_value=fill)
    for k, a in attrs.items():
        full[k].attrs = a
    return full.drop_vars(dim)


def fiducial_recipes(z: np.ndarray, fiducial: str | Mapping | None, available: Sequence[str]) -> np.ndarray:
    """Per spectrum, the recipe of the fiducial mass ("" where none applies).

    ``fiducial``: ``"dr16q"`` (:data:`FIDUCIAL_RULE`), a recipe name (for every spectrum),
    a region/line name (``"hbeta"``, ``"mgii"``, ``"civ"``, ``"halpha"``: its continuum recipe of
    the rule, or its only recipe), or a sequence of ``(z_max, recipe)`` pairs.
    """
    z = np.asarray(z, dtype=np.float64)
    out = np.full(z.shape, "", dtype=object)
    rule = fiducial_rule(fiducial)
    lower = -np.inf
    for z_max, recipe in rule:
        out[(z >= lower) & (z < z_max)] = recipe
        lower = z_max
    return out.astype(str)


def fiducial_rule(fiducial) -> tuple[tuple[float, str], ...]:
    from .errors import OptionError

    if fiducial is None or fiducial == "dr16q":
        return FIDUCIAL_RULE
    if isinstance(fiducial, str):
        if fiducial in RECIPES:
            return ((math.inf, fiducial),)
        by_line = {"hbeta": "vp06_hbeta", "mgii": "shen11_mgii", "civ": "vp06_civ", "halpha": "gh05_halpha"}
        if fiducial in by_line:
            return ((math.inf, by_line[fiducial]),)
        raise OptionError(f"fiducial={fiducial!r}: use 'dr16q', a region (hbeta, halpha, mgii, civ), a recipe "
                          f"({', '.join(RECIPES)}) or a sequence of (z_max, recipe) pairs.")
    try:
        rule = tuple((float(zm), str(r)) for zm, r in fiducial)
    except (TypeError, ValueError):
        raise OptionError(f"fiducial={fiducial!r}: a sequence of (z_max, recipe) pairs, e.g. [(0.8, 'vp06_hbeta'), "
                          "(inf, 'vo09_mgii')].") from None
    for _, r in rule:
        if r not in RECIPES:
            raise OptionError(f"fiducial: unknown recipe {r!r}; use one of {', '.join(RECIPES)}.")
    return rule


def describe_fiducial(fiducial) -> str:
    rule = fiducial_rule(fiducial)
    if rule == FIDUCIAL_RULE:
        return FIDUCIAL_RULE_TEXT
    parts, lower = [], None
    for z_max, r in rule:
        span = ("all z" if lower is None else f"z >= {lower:g}") if math.isinf(z_max) else (f"z < {z_max:g}" if lower is None else f"{lower:g} <= z < {z_max:g}")
        parts.append(f"{r} for {span}")
        lower = z_max
    return "chosen by the user: " + ", ".join(parts)


def assemble(
    tables: Mapping[str, tuple[np.ndarray, xr.Dataset]],
    coords: Mapping[str, xr.Variable],
    n: int,
    dim: str,
    *,
    redshift: np.ndarray | None,
    fiducial,
    width_sigma: float,
    index=None,
) -> xr.Dataset:
    """One row per spectrum: every region's table (``region -> (positions, table)``), the
    fiducial mass and Eddington ratio, the catalogue flags, and the input's coordinates."""
    parts = []
    covered = {}
    for region, (positions, table) in tables.items():
        parts.append(expand(table, positions, n, dim))
        c = np.zeros(n, dtype=bool)
        c[np.asarray(positions, dtype=np.int64)] = True
        covered[region] = c
    cat = xr.merge(parts, compat="override", join="exact") if parts else xr.Dataset()
    for region, c in covered.items():
        cat[f"{region}_covered"] = xr.DataArray(c, dims=(dim,), attrs=_attrs(
            f"the spectrum covers the {region} region (coverage rule, sheap_dask.coverage) and it was fitted", "1"))

    # the fiducial mass: one recipe per spectrum by the rule
    z = np.full(n, np.nan) if redshift is None else np.asarray(redshift, dtype=np.float64)
    choice = fiducial_recipes(z, fiducial, [])
    log_mbh = xr.DataArray(np.full(n, np.nan), dims=(dim,))
    log_mbh_err = log_mbh.copy()
    log_lbol = log_mbh.copy()
    log_lbol_err = log_mbh.copy()
    log_edd = log_mbh.copy()
    log_edd_err = log_mbh.copy()
    choice_da = xr.DataArray(choice, dims=(dim,))
    for r in sorted(set(choice) - {""}):
        if f"log_mbh_{r}" not in cat:
            continue
        pick = choice_da == r
        log_mbh = xr.where(pick, cat[f"log_mbh_{r}"], log_mbh)
        log_mbh_err = xr.where(pick, cat[f"log_mbh_{r}_err"], log_mbh_err)
        if f"_log_lbol_{r}" in cat:  # continuum recipe: L_bol and L/L_Edd from the same draws as the mass
            lb, lbe, ed, ede = cat[f"_log_lbol_{r}"], cat[f"_log_lbol_{r}_err"], cat[f"_log_edd_{r}"], cat[f"_log_edd_{r}_err"]
        elif "log_l5100" in cat:  # a line-luminosity recipe: L_bol from lambda L5100 (independent errors)
            lb = math.log10(measure.BOLOMETRIC[5100.0]) + cat["log_l5100"]
            lbe = cat["log_l5100_err"]
            ed = lb - math.log10(measure.L_EDD_PER_MSUN) - cat[f"log_mbh_{r}"]
            ede = np.sqrt(lbe**2 + cat[f"log_mbh_{r}_err"] ** 2)
        else:
            continue
        log_lbol = xr.where(pick, lb, log_lbol)
        log_lbol_err = xr.where(pick, lbe, log_lbol_err)
        log_edd = xr.where(pick, ed, log_edd)
        log_edd_err = xr.where(pick, ede, log_edd_err)
    rule_text = describe_fiducial(fiducial)
    mass_attrs = _attrs(f"fiducial single-epoch black-hole mass: the recipe in mbh_recipe, chosen by redshift ({rule_text})",
                        "log10(M/M_sun)", error_note="measurement error only; the recipe's intrinsic scatter is not included")
    cat["log_mbh"] = log_mbh.pipe(_set, mass_attrs)
    cat["log_mbh_err"] = log_mbh_err.pipe(_set, _err_attrs(mass_attrs))
    cat["mbh_recipe"] = xr.where(np.isfinite(log_mbh), choice_da, "").astype(str).pipe(_set, 
        _attrs(f"recipe of log_mbh ({rule_text}); empty where no fiducial mass is available", None))
    bc = ", ".join(f"{v:g} at {k:g} A" for k, v in measure.BOLOMETRIC.items())
    lbol_attrs = _attrs(f"log10 bolometric luminosity L_bol = BC lambda L_lambda at the fiducial recipe's wavelength "
                        f"(BC: {bc}; {measure.BOLOMETRIC_REFERENCE}); from lambda L5100 for line-luminosity recipes",
                        "log10(erg/s)", reference=measure.BOLOMETRIC_REFERENCE)
    cat["log_lbol"] = log_lbol.pipe(_set, lbol_attrs)
    cat["log_lbol_err"] = log_lbol_err.pipe(_set, _err_attrs(lbol_attrs))
    edd_attrs = _attrs(f"log10 Eddington ratio L_bol / L_Edd, L_Edd = {measure.L_EDD_PER_MSUN:.3g} (M_BH/M_sun) erg/s, with "
                       "log_lbol and log_mbh (from the same Monte Carlo draws for continuum recipes)", "1",
                       reference=measure.BOLOMETRIC_REFERENCE)
    cat["log_edd_ratio"] = log_edd.pipe(_set, edd_attrs)
    cat["log_edd_ratio_err"] = log_edd_err.pipe(_set, _err_attrs(edd_attrs))

    # catalogue flags
    flags = xr.DataArray(np.zeros(n, dtype=np.int16), dims=(dim,))
    if "hbeta_broad_fwhm" in cat and "halpha_broad_fwhm" in cat:
        mismatch = xr.apply_ufunc(
            _width_mismatch, cat["hbeta_broad_fwhm"], cat["hbeta_broad_fwhm_err"], cat["halpha_broad_fwhm"],
            cat["halpha_broad_fwhm_err"], kwargs={"n_sigma": float(width_sigma)}, dask="parallelized", output_dtypes=[bool])
        flags = flags | xr.where(mismatch, int(CatalogFlag.BROAD_WIDTH_MISMATCH), 0)
    flags = flags | xr.where(choice_da != "", xr.where(np.isfinite(log_mbh), 0, int(CatalogFlag.FIDUCIAL_UNAVAILABLE)), 0)
    anything = np.zeros(n, dtype=bool)
    for c in covered.values():
        anything |= c
    flags = flags | xr.DataArray(np.where(anything, 0, int(CatalogFlag.NO_REGION)), dims=(dim,))
    cat["flags"] = flags.astype(np.int16).pipe(_set, flag_attrs(
        CatalogFlag, CATALOG_FLAG_MESSAGES, f"catalogue flags (broad-width consistency at width_sigma = {width_sigma:g})"))
    cat = cat.drop_vars([v for v in cat.data_vars if str(v).startswith("_")])
    cat = cat.assign_coords({name: (dim, np.asarray(var.values), dict(var.attrs)) for name, var in coords.items()})
    if index is not None:
        cat = cat.assign_coords({dim: index})
    return cat


def _width_mismatch(hb, hb_err, ha, ha_err, *, n_sigma: float):
    a, b = GH05_WIDTHS
    with np.errstate(all="ignore"):
        predicted = a * (ha / 1e3) ** b
        predicted_err = b * predicted * ha_err / ha
        combined = np.sqrt(hb_err**2 + predicted_err**2)
        return np.isfinite(combined) & (np.abs(hb - predicted) > n_sigma * combined)
