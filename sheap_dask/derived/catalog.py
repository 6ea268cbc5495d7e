"""Every catalogue quantity of one fitted region in one Monte Carlo run.

:func:`region_measurements` measures, from the same parameter draws
(:mod:`sheap_dask.derived.errors`), what a quasar catalogue reports for one region
(the DR16Q set of Wu & Shen 2022, ApJS 263, 42, and of Shen et al. 2011, ApJS 194, 45):

* per line (``model.metadata["lines"]``, a multi-Gaussian line as its summed profile): the
  rest-frame peak wavelength, flux, FWHM, sigma (second moment), peak and centroid velocity
  shifts and the rest-frame EW, as :func:`sheap_dask.derived.lines.measure_line`;
* continuum flux densities ``f_λ`` at rest wavelengths (luminosities are these times
  ``4π d_L² λ``), of ``metadata["continuum"]`` without FeII and without host starlight: the
  AGN continuum, so with a host component they are host-corrected;
* the host fraction ``H / (H + C)`` at rest wavelengths, when the model has a host;
* FeII strength: the rest-frame EW of the FeII template over a band,
  ``∫ F_FeII / F_cont dλ`` (DR16Q: 4434-4684 A for the optical template, 2200-3090 A for
  the UV one), and ``R_FeII = EW(FeII 4434-4684) / EW(H-beta broad)`` (Boroson & Green 1992,
  ApJS 80, 109);
* single-epoch virial masses of every recipe of :data:`~sheap_dask.derived.bh_mass.RECIPES`
  whose line is in the model, and, for the continuum recipes, the bolometric luminosity
  ``L_bol = BC λL_λ`` and the Eddington ratio ``L_bol / L_Edd`` with
  ``L_Edd = 1.26e38 (M / M_sun) erg/s``.

One run means one compiled program per region (not one per quantity), and the errors of
quantities that share parameters (a mass and its FWHM and luminosity, R_FeII and its two EWs)
come from the same draws. The values and errors equal those of the one-quantity functions
(:func:`~sheap_dask.derived.lines.measure_line`, :func:`~sheap_dask.derived.bh_mass.bh_mass`)
for the same seed and spectrum index: the draws depend only on those.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import OptionError
from .bh_mass import RECIPES
from .errors import as_params, mc_options, run
from .lines import C_KMS, DEFAULT_N_GRID, check_n_grid, continuum_names, line_info, line_stats_fn, sum_components, velocity_half_range

__all__ = ["BOLOMETRIC", "FEII_BANDS", "L_EDD_PER_MSUN", "RegionPlan", "region_measurements", "region_plan"]

#: Bolometric corrections ``L_bol = BC λL_λ`` at 5100, 3000 and 1350 A from the mean quasar
#: SED of Richards et al. 2006 (ApJS 166, 470), as used by Shen et al. 2011 and DR16Q (Wu &
#: Shen 2022): 9.26, 5.15, 3.81.
BOLOMETRIC: dict[float, float] = {5100.0: 9.26, 3000.0: 5.15, 1350.0: 3.81}
BOLOMETRIC_REFERENCE = "Richards et al. 2006, ApJS 166, 470 (BC5100 = 9.26, BC3000 = 5.15, BC1350 = 3.81), as Shen et al. 2011"
#: Eddington luminosity per solar mass (erg/s): 4π G m_p c / σ_T for ionised hydrogen.
L_EDD_PER_MSUN = 1.26e38
#: FeII EW bands (rest Angstrom) by template kind, as in DR16Q (Wu & Shen 2022, table 4).
FEII_BANDS: dict[str, tuple[float, float]] = {"optical": (4434.0, 4684.0), "uv": (2200.0, 3090.0)}
#: Points of the FeII band integral (trapezoid rule, ~1 A steps over the optical band).
FEII_GRID = 251

#: Line quantities, in output order: ``<line>/<quantity>``.
LINE_QUANTITIES = ("peak", "flux", "fwhm", "sigma", "shift", "centroid_shift", "ew")


@dataclass(frozen=True)
class RegionPlan:
    """What :func:`region_measurements` measures for one model (hashable: the compile key)."""

    lines: tuple[tuple[str, float], ...]  # (line, velocity half-range km/s)
    continuum: tuple[str, ...]  # AGN continuum components (no FeII, no host)
    wavelengths: tuple[float, ...]  # continuum f_lambda at these rest wavelengths
    host: tuple[str, ...]  # host components (host fractions at ``host_wavelengths``)
    host_wavelengths: tuple[float, ...]
    feii: tuple[tuple[str, tuple[str, ...], float, float], ...]  # (name, components, low, high)
    rfeii: tuple[str, str] | None  # (FeII band name, broad line) of R_FeII
    recipes: tuple[str, ...]
    n_grid: int = DEFAULT_N_GRID

    def key(self) -> tuple:
        return (self.lines, self.continuum, self.wavelengths, self.host, self.host_wavelengths, self.feii, self.rfeii,
                self.recipes, self.n_grid)


def region_plan(
    model,
    *,
    lines: Sequence[str] | None = None,
    wavelengths: Sequence[float] = (),
    host_wavelengths: Sequence[float] = (4200.0, 5100.0),
    recipes: Sequence[str] | None = None,
    n_grid: int = DEFAULT_N_GRID,
) -> RegionPlan:
    """The catalogue measurements that apply to ``model``.

    Parameters
    ----------
    lines : list of str, optional
        Lines to measure (default: every line of ``model.metadata["lines"]``).
    wavelengths : list of float
        Rest wavelengths (A) of continuum flux densities (luminosities); those a recipe needs
        are added.
    host_wavelengths : list of float
        Rest wavelengths of the host fraction (only when the model has a host component).
    recipes : list of str, optional
        Mass recipes (default: every recipe of :data:`RECIPES` whose line the model has).
    n_grid : int
        Points of each line's velocity grid.
    """
    meta = getattr(model, "metadata", None) or {}
    known = list(meta.get("lines") or {})
    lines = known if lines is None else list(lines)
    plan_lines = tuple((ln, velocity_half_range(line_info(model, ln), None)) for ln in lines)
    try:
        cont = tuple(continuum_names(model))
    except Exception:  # noqa: BLE001 - a model without a continuum: no EW, luminosity or mass
        cont = ()
    if recipes is None:
        recipes = [name for name, r in RECIPES.items() if r.line in lines and (r.luminosity == "line" or cont)]
    for name in recipes:
        if name not in RECIPES:
            raise OptionError(f"unknown black-hole mass recipe {name!r}; use one of {', '.join(RECIPES)}.")
    wl = {float(w) for w in wavelengths} | {float(RECIPES[r].wavelength) for r in recipes if RECIPES[r].luminosity == "continuum"}
    hosts = tuple(meta.get("host") or ())
    comps = meta.get("components") or {}
    feii = []
    for name, info in comps.items():
        if (info or {}).get("kind") != "feii":
            continue
        template = str((info or {}).get("template", "")).lower()
        kind = "uv" if "uv" in template else "optical" if "optical" in template else None
        if kind is None:  # an own template: by the window
            window = getattr(model, "window", None) or (0.0, 0.0)
            kind = "uv" if window[1] < 4000.0 else "optical"
        lo, hi = FEII_BANDS[kind]
        feii.append((f"feii_{kind}", (name,), lo, hi))
    feii = tuple(feii) if cont else ()
    rfeii = None
    if any(f[0] == "feii_optical" for f in feii) and "hbeta_broad" in lines:
        rfeii = ("feii_optical", "hbeta_broad")
    return RegionPlan(
        lines=plan_lines,
        continuum=cont,
        wavelengths=tuple(sorted(wl)) if cont else (),
        host=hosts if cont else (),
        host_wavelengths=tuple(float(w) for w in host_wavelengths) if hosts and cont else (),
        feii=feii,
        rfeii=rfeii,
        recipes=tuple(recipes),
        n_grid=check_n_grid(n_grid),
    )


def _host_function(model, hosts):
    """``f(wavelength (n,), p)``: the host starlight with its full template set when the host
    module provides it, else the host components as fitted."""
    try:
        from .host import _host_fn
    except ImportError:  # pragma: no cover - a package without the host module
        funcs = [model.components[h] for h in hosts]
        return lambda wl, p: sum_components(funcs, wl, p)
    return _host_fn(model, list(hosts))


def _single_gaussian(model, line: str):
    """``(parameter indices of flux, shift, fwhm, rest wavelength)`` of a line made of one
    Gaussian component, else None."""
    info = line_info(model, line)
    if len(info["components"]) != 1:
        return None
    comp = info["components"][0]
    kind = ((getattr(model, "metadata", None) or {}).get("components") or {}).get(comp, {}).get("kind")
    names = list(model.param_names)
    wanted = [f"{comp}_{q}" for q in ("flux", "shift", "fwhm")]
    if kind != "gaussian" or any(w not in names for w in wanted):
        return None
    return tuple(names.index(w) for w in wanted), info["rest_wavelength"]


def _gaussian_stats(gauss):
    """Profile measurements of one Gaussian from its parameters: what the profile grid gives
    (:func:`~sheap_dask.derived.lines.measure_line`, to its grid's precision), without
    evaluating it. The profile is a Gaussian in velocity centred on ``shift`` with FWHM
    ``fwhm (1 + shift/c)``; widths are reported at the peak wavelength, i.e. ``fwhm``."""
    import jax.numpy as jnp

    (i_flux, i_shift, i_fwhm), _ = gauss
    from ..models.profiles import MIN_FWHM_KMS

    def stats(p):
        flux, shift, fwhm = p[i_flux], p[i_shift], jnp.maximum(p[i_fwhm], MIN_FWHM_KMS)
        positive = flux > 0
        return {
            "flux": flux,
            "fwhm": jnp.where(positive, fwhm, jnp.nan),
            "sigma": jnp.where(positive, fwhm / (2.0 * math.sqrt(2.0 * math.log(2.0))), jnp.nan),
            "shift_peak": jnp.where(positive, shift, jnp.nan),
            "shift_centroid": jnp.where(positive, shift, jnp.nan),
        }

    return stats


def _build_region(model, key: tuple):
    """The measurement ``f(p, x) -> {name: scalar}`` of a :class:`RegionPlan` (its ``key()``);
    ``x = log10(4π d_L² flux_unit)``."""
    import jax.numpy as jnp

    plan = RegionPlan(*key)
    stats = {}
    for ln, vhalf in plan.lines:
        gauss = _single_gaussian(model, ln)
        stats[ln] = (_gaussian_stats(gauss), gauss[1]) if gauss is not None else line_stats_fn(model, ln, vhalf, plan.n_grid)
    cont_funcs = [model.components[c] for c in plan.continuum]
    host = _host_function(model, plan.host) if plan.host else None
    feii_funcs = {name: ([model.components[c] for c in comps], lo, hi) for name, comps, lo, hi in plan.feii}
    log_edd_unit = math.log10(L_EDD_PER_MSUN)

    def cont(wl, p):
        return sum_components(cont_funcs, wl, p)

    def f(p, x):
        out = {}
        ews, line_stats = {}, {}
        for ln, (fn, lam0) in stats.items():
            s = line_stats[ln] = fn(p)
            out[f"{ln}/peak"] = lam0 * (1.0 + s["shift_peak"] / C_KMS)
            out[f"{ln}/flux"] = s["flux"]
            out[f"{ln}/fwhm"] = s["fwhm"]
            out[f"{ln}/sigma"] = s["sigma"]
            out[f"{ln}/shift"] = s["shift_peak"]
            out[f"{ln}/centroid_shift"] = s["shift_centroid"]
            if cont_funcs:
                ews[ln] = s["flux"] / cont(jnp.full((1,), lam0, p.dtype), p)[0]
                out[f"{ln}/ew"] = ews[ln]
        f_lambda = {}
        for w in plan.wavelengths:
            f_lambda[w] = cont(jnp.full((1,), w, p.dtype), p)[0]
            out[f"cont/{w:g}"] = f_lambda[w]
        for w in plan.host_wavelengths:
            wl = jnp.full((1,), w, p.dtype)
            h = host(wl, p)[0]
            total = h + cont(wl, p)[0]
            out[f"frac_host/{w:g}"] = jnp.where(total != 0, h / jnp.where(total != 0, total, 1.0), jnp.nan)
        feii_ew = {}
        for name, (funcs, lo, hi) in feii_funcs.items():
            grid = jnp.linspace(lo, hi, FEII_GRID, dtype=p.dtype)
            ratio = sum_components(funcs, grid, p) / cont(grid, p)
            step = (hi - lo) / (FEII_GRID - 1)
            feii_ew[name] = (jnp.sum(ratio) - 0.5 * (ratio[0] + ratio[-1])) * step
            out[f"{name}/ew"] = feii_ew[name]
        if plan.rfeii is not None:
            band, line = plan.rfeii
            out["rfeii"] = feii_ew[band] / ews[line]
        for name in plan.recipes:
            r = RECIPES[name]
            s_line = line_stats[r.line]
            if r.luminosity == "continuum":
                log_l = jnp.log10(r.wavelength * f_lambda[float(r.wavelength)]) + x
            else:
                log_l = jnp.log10(s_line["flux"]) + x
            log_m = r.zero_point + r.lum_slope * (log_l - math.log10(r.lum_norm)) + r.fwhm_slope * jnp.log10(s_line["fwhm"] / 1000.0)
            out[f"mbh/{name}"] = log_m
            bc = BOLOMETRIC.get(float(r.wavelength)) if r.luminosity == "continuum" else None
            if bc is not None:
                log_lbol = math.log10(bc) + log_l
                out[f"lbol/{name}"] = log_lbol
                out[f"edd/{name}"] = log_lbol - log_edd_unit - log_m
        return out

    return f


def region_measurements(
    model,
    plan: RegionPlan,
    params,
    params_err=None,
    *,
    log_lum_factor=None,
    **kwargs: Any,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every quantity of ``plan`` for each spectrum, from one Monte Carlo run.

    Parameters
    ----------
    model : Model
    plan : RegionPlan
        From :func:`region_plan`.
    params, params_err : array (n_spectra, n_params)
        Best-fit parameters and their errors (or ``cov=``/``draws=`` in ``kwargs``).
    log_lum_factor : array (n_spectra,), optional
        ``log10(4π d_L² flux_unit)`` per spectrum (:func:`sheap_dask.derived.luminosity.log_lum_factor`);
        needed for masses (NaN masses without it).
    **kwargs
        Monte Carlo options of :func:`sheap_dask.derived.errors.run` (``n_samples``, ``seed``,
        ``index``, ``lower``, ``upper``, ``batch_size``, ``cov``, ``draws``).

    Returns
    -------
    dict
        ``"<line>/<quantity>"`` (quantities :data:`LINE_QUANTITIES`; peak in A, flux in the
        input flux unit x A, widths and shifts km/s, EW A), ``"cont/<wavelength>"`` (AGN
        continuum f_lambda, input flux unit), ``"frac_host/<wavelength>"``, ``"<feii band>/ew"``
        (A), ``"rfeii"``, ``"mbh/<recipe>"`` (log10 M_sun), ``"lbol/<recipe>"`` (log10 erg/s)
        and ``"edd/<recipe>"`` (log10 L_bol/L_Edd), each ``(value, error)``.
    """
    opts = mc_options(kwargs)
    p, one = as_params(model, params)
    x = np.full(p.shape[0], np.nan) if log_lum_factor is None else np.broadcast_to(np.asarray(log_lum_factor, dtype=np.float64), (p.shape[0],))
    res = run(model, _build_region, plan.key(), p, params_err, x, **opts)
    if one:
        res = {k: (v[0], e[0]) for k, (v, e) in res.items()}
    return res


def describe(plan: RegionPlan) -> Mapping[str, Any]:
    """A JSON-serialisable description of ``plan`` (for provenance attrs)."""
    return {
        "lines": [ln for ln, _ in plan.lines],
        "continuum": list(plan.continuum),
        "wavelengths": list(plan.wavelengths),
        "host": list(plan.host),
        "host_wavelengths": list(plan.host_wavelengths),
        "feii": [{"name": n, "components": list(c), "band": [lo, hi]} for n, c, lo, hi in plan.feii],
        "rfeii": list(plan.rfeii) if plan.rfeii else None,
        "recipes": list(plan.recipes),
        "n_grid": plan.n_grid,
    }
