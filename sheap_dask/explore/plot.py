"""Figures (matplotlib): one fitted spectrum, every region of one catalogue object, a catalogue
overview.

- :func:`plot`: data, total model, the continuum components and each line as its summed profile
  (on top of the continuum; multi-Gaussian components optional, lighter), a residual panel; the
  title names the object (spec name or J-name, else the spectrum label), z and chi2_nu; the y
  axis carries the flux unit; the legend sits outside the data.
- :func:`plot_object`: every fitted region of one catalogue row side by side.
- :func:`plot_overview`: FWHM against continuum luminosity per broad line coloured by the
  fiducial black-hole mass, and the mass distribution.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import numpy as np
import xarray as xr

from ..errors import InputDataError, MissingDependencyError, OptionError
from ..status import Status
from . import evaluate
from .link import Link

__all__ = ["flux_unit_label", "object_name", "plot", "plot_object", "plot_overview"]

#: colours of the line profiles (tab10 without its red, kept for nothing, and grey)
LINE_COLOURS = ["#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#17becf", "#8c564b", "#e377c2", "#bcbd22"]
CONTINUUM_COLOURS = ["#7f7f7f", "#b8860b", "#6b8e23", "#708090"]


def _pyplot(what: str):
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise MissingDependencyError(f"{what} needs matplotlib; install it with: pip install 'sheap-dask[plot]'") from exc
    return plt


# --------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------
def _jname(ra: float, dec: float) -> str:
    """IAU-style designation ``JHHMMSS.ss+DDMMSS.s`` (truncated, as SDSS)."""
    h = (ra % 360.0) / 15.0
    hh, mm = int(h), int((h * 60) % 60)
    ss = math.floor(((h * 3600) % 60) * 100) / 100
    sign = "+" if dec >= 0 else "-"
    d = abs(dec)
    dd, dm = int(d), int((d * 60) % 60)
    ds = math.floor(((d * 3600) % 60) * 10) / 10
    return f"J{hh:02d}{mm:02d}{ss:05.2f}{sign}{dd:02d}{dm:02d}{ds:04.1f}"


def object_name(row: xr.Dataset, dim: str, label) -> str:
    """The name of one spectrum: its spec name (``specname``, ``objname``, ``name``), else the
    J-name of its ``ra``/``dec``, else ``<dim> <label>``."""
    for key in ("specname", "objname", "name", "targetid"):
        if key in row.coords or key in row.data_vars:
            value = np.asarray(row[key].values).reshape(-1)[0]
            value = value.decode() if isinstance(value, bytes) else str(value)
            if value and value != "nan":
                return value
    if "ra" in row.variables and "dec" in row.variables:
        ra, dec = float(np.asarray(row["ra"].values).reshape(-1)[0]), float(np.asarray(row["dec"].values).reshape(-1)[0])
        if np.isfinite(ra) and np.isfinite(dec):
            return _jname(ra, dec)
    return f"{dim} {label}"


def flux_unit_label(scale: float | None) -> str:
    """``f_λ [10^-17 erg s^-1 cm^-2 Å^-1]`` for matplotlib mathtext."""
    unit = r"erg s$^{-1}$ cm$^{-2}$ Å$^{-1}$"
    if scale is None or not np.isfinite(scale):
        return r"$f_\lambda$ [input flux unit]"
    exponent = math.log10(scale)
    if abs(exponent - round(exponent)) < 1e-9:
        prefix = "" if round(exponent) == 0 else rf"$10^{{{round(exponent)}}}$ "
    else:
        prefix = f"{scale:.3g} "
    return rf"$f_\lambda$ [{prefix}{unit}]"


def _title(one_fit: xr.Dataset, dim: str, label, z: float, model_name: str | None = None) -> str:
    """``<object>  (model)  z = ...  χ²_ν = ...`` and the status when it is not plain converged."""
    parts = [object_name(one_fit, dim, label)]
    if model_name:
        parts.append(f"({model_name})")
    if np.isfinite(z):
        parts.append(f"z = {z:.4g}")
    if "redchi2" in one_fit:
        parts.append(rf"$\chi^2_\nu$ = {float(np.asarray(one_fit['redchi2'].values).reshape(-1)[0]):.3g}")
    if "status" in one_fit:
        code = int(np.asarray(one_fit["status"].values).reshape(-1)[0])
        if code != Status.CONVERGED:
            parts.append(f"[{Status(code).meaning if code in Status._value2member_map_ else code}]")
    return "   ".join(parts)


# --------------------------------------------------------------------------------------
# One spectrum
# --------------------------------------------------------------------------------------
def plot(link: Link, spectrum: int = 0, *, spectra: xr.Dataset | None = None, ax=None, components: bool = True,
         legend: str = "outside"):
    """Plot one spectrum in the rest frame of the fit (see ``SheapAccessor.plot``); returns the Figure."""
    plt = _pyplot("fits.sheap.plot")
    if legend not in ("outside", "below", "inside", "none"):
        raise OptionError(f"legend={legend!r}: use 'outside' (right of the axes), 'below', 'inside' or 'none'.")
    dim = link.dim
    n = link.ds.sizes[dim]
    if not isinstance(spectrum, (int, np.integer)) or not -n <= int(spectrum) < n:
        raise OptionError(f"spectrum={spectrum!r} must be an integer position in [0, {n}) along {dim!r}.")
    i = int(spectrum) % n
    spectra = link.get_spectra(spectra)
    model = link.get_model()
    sub = link.isel([i], spectra=spectra)
    one_fit, one_spec = sub.ds, sub.get_spectra()
    z = float(sub.frame_redshift(one_spec).values[0])
    wl, wl_dim, _ = evaluate.grid(sub, None, one_spec)
    wl = np.asarray(wl.values, dtype=np.float64).reshape(-1)
    rest = wl / (1.0 + z)
    flux = np.asarray(one_spec["flux"].transpose(dim, wl_dim).values[0], dtype=np.float64) * (1.0 + z)
    resid = np.asarray(evaluate.residuals(sub).values[0])
    total = np.asarray(evaluate.model_curve(sub, frame="rest").values[0])
    comps = evaluate.components(sub, frame="rest") if model.components else None
    masked = ~np.isfinite(resid)
    inside = (rest >= model.window[0]) & (rest <= model.window[1]) if model.window is not None else np.ones_like(rest, dtype=bool)

    if ax is None:
        fig, (ax_main, ax_res) = plt.subplots(2, 1, sharex=True, figsize=(10, 6), gridspec_kw={"height_ratios": [3, 1], "hspace": 0.05})
        if legend == "outside":
            fig.subplots_adjust(right=0.76)
    else:
        try:
            ax_main, ax_res = ax
        except (TypeError, ValueError):
            raise OptionError("ax must be a pair (main_axes, residual_axes) of matplotlib Axes, or None.") from None
        fig = ax_main.figure
    x = rest[inside]
    shown = np.where(inside & ~masked, flux, np.nan)
    ax_main.plot(x, shown[inside], color="0.55", lw=0.7, drawstyle="steps-mid", label="data", zorder=1)
    if comps is not None:
        _draw_components(ax_main, model, comps, x, inside, components)
    ax_main.plot(x, total[inside], color="k", lw=1.4, label="total model", zorder=4)
    ax_res.plot(x, resid[inside], color="0.45", lw=0.7, drawstyle="steps-mid")
    ax_res.axhline(0.0, color="k", lw=0.9)
    ax_res.set_xlabel("rest-frame wavelength [Å]")
    ax_res.set_ylabel(r"resid. [$\sigma$]")
    try:
        scale = link.flux_unit_for(spectra=spectra)
    except Exception:  # noqa: BLE001 - an unparsable unit: say so rather than fail the figure
        scale = None
    ax_main.set_ylabel(flux_unit_label(scale) + " (rest frame)")
    finite = shown[inside][np.isfinite(shown[inside])]
    if finite.size:  # absorbers and sky residuals should not set the scale; the model's peaks do
        lo, hi = np.percentile(finite, [0.5, 99.5])
        peak = total[inside][np.isfinite(total[inside])]
        hi = max(hi, float(peak.max())) if peak.size else hi
        if comps is not None:  # the continuum components (power law, host, FeII) sit below the data: show them
            lo = min(lo, 0.0)
        pad = 0.06 * (hi - lo)
        ax_main.set_ylim(lo - pad, hi + pad)
    if legend == "outside":
        ax_main.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    elif legend == "below":
        handles, labels = ax_main.get_legend_handles_labels()
        ax_res.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.55), ncol=3, fontsize="x-small", frameon=False)
    elif legend == "inside":
        ax_main.legend(fontsize="x-small", ncol=2)
    label = one_fit[dim].values[0] if dim in one_fit.coords else i
    model_name = getattr(model, "name", None)
    ax_main.set_title(_title(one_fit, dim, label, z, model_name), fontsize="medium")
    return fig


def _draw_components(ax, model, comps, x, inside, show_parts: bool) -> None:
    """Continuum components, then each line as its summed profile on top of the continuum."""
    names = [str(c) for c in comps["component"].values]
    values = np.asarray(comps.values[0])[inside]
    col = {name: values[:, k] for k, name in enumerate(names)}
    lines = (getattr(model, "metadata", None) or {}).get("lines") or {}
    in_lines = {c for info in lines.values() for c in info.get("components", [])}
    cont_names = [c for c in names if c not in in_lines]
    continuum = np.sum([col[c] for c in cont_names], axis=0) if cont_names else np.zeros(x.size)
    for k, name in enumerate(cont_names):
        ax.plot(x, col[name], color=CONTINUUM_COLOURS[k % len(CONTINUUM_COLOURS)], lw=1.0, ls="--", label=name, zorder=2)
    if len(cont_names) > 1:
        ax.plot(x, continuum, color="0.3", lw=1.0, ls=":", label="continuum", zorder=2)
    for k, (line, info) in enumerate(lines.items()):
        parts = [c for c in info.get("components", []) if c in col]
        if not parts:
            continue
        colour = LINE_COLOURS[k % len(LINE_COLOURS)]
        profile = np.sum([col[c] for c in parts], axis=0)
        ax.plot(x, _where_visible(continuum + profile, profile), color=colour, lw=1.2, label=line, zorder=5)
        if show_parts and len(parts) > 1:
            for c in parts:
                ax.plot(x, _where_visible(continuum + col[c], col[c]), color=colour, lw=0.7, ls=":", alpha=0.7, zorder=3)
    others = [c for c in names if c in in_lines and not any(c in (i.get("components") or []) for i in lines.values())]
    for c in others:  # pragma: no cover - a component named by no line
        ax.plot(x, continuum + col[c], lw=0.8, ls="--", label=c)


def _where_visible(curve: np.ndarray, profile: np.ndarray, fraction: float = 0.01) -> np.ndarray:
    """``curve`` where the line's ``profile`` exceeds ``fraction`` of its peak, NaN elsewhere: a
    line drawn across the whole window would only retrace the continuum."""
    peak = np.nanmax(np.abs(profile)) if np.isfinite(profile).any() else 0.0
    if not peak > 0:
        return np.full_like(curve, np.nan)
    return np.where(np.abs(profile) >= fraction * peak, curve, np.nan)


# --------------------------------------------------------------------------------------
# One catalogue object: every region
# --------------------------------------------------------------------------------------
def _region_fits(cat: xr.Dataset, fits: Mapping | None) -> dict:
    if fits is not None:
        return dict(fits)
    source = cat.encoding.get("source")
    if not source:
        raise InputDataError("plot_object needs the regions' fits: pass fits={'hbeta': fits_hbeta, ...}, or open the catalogue "
                             "from its store (sd.open_catalog(path)), whose regions/ holds them.")
    root = os.path.dirname(os.path.normpath(str(source)))
    out = {}
    regions_dir = os.path.join(root, "regions")
    if os.path.isdir(regions_dir):
        from ..store import open_fits

        for entry in sorted(os.listdir(regions_dir)):
            if entry.endswith(".zarr"):
                out[entry[:-5]] = open_fits(os.path.join(regions_dir, entry))
    if not out:
        raise InputDataError(f"no region fit stores under {regions_dir!r}; pass fits={{region: fit result}} to plot_object.")
    return out


def _catalog_spectra(cat: xr.Dataset, spectra):
    if spectra is not None:
        return spectra
    source = cat.attrs.get("sheap_input")
    if not source or source == "in-memory Dataset":
        raise InputDataError("plot_object needs the input spectra: pass spectra=<the Dataset given to fit_catalog> (the catalogue "
                             "was made from an in-memory Dataset, so its attrs name no store).")
    from ..io import open_spectra

    spectra = open_spectra(source)
    dim = next(iter(cat.dims))
    if dim not in spectra.coords:  # fit_catalog labels such spectra by position
        spectra = spectra.assign_coords({dim: np.arange(spectra.sizes[dim])})
    return spectra


def plot_object(cat: xr.Dataset, spectrum: int, *, fits: Mapping | None = None, spectra: xr.Dataset | None = None,
                components: bool = True):
    """Every fitted region of catalogue row ``spectrum`` side by side (see ``SheapAccessor.plot_object``)."""
    plt = _pyplot("catalog.sheap.plot_object")
    dim = next(iter(cat.dims))
    n = cat.sizes[dim]
    if not isinstance(spectrum, (int, np.integer)) or not -n <= int(spectrum) < n:
        raise OptionError(f"spectrum={spectrum!r} must be an integer position in [0, {n}) along {dim!r}.")
    i = int(spectrum) % n
    row = cat.isel({dim: [i]})
    regions = [str(v)[: -len("_covered")] for v in cat.data_vars if str(v).endswith("_covered") and bool(row[v].values[0])]
    if not regions:
        raise InputDataError(f"catalogue row {i} ({object_name(row, dim, row[dim].values[0])}) has no fitted region: nothing to plot.")
    all_fits = _region_fits(cat, fits)
    spectra = _catalog_spectra(cat, spectra)
    label = row[dim].values[0]
    fig = plt.figure(figsize=(6.0 * len(regions), 6.2))
    grid = fig.add_gridspec(2, len(regions), height_ratios=[3, 1], hspace=0.05, wspace=0.28, bottom=0.25, top=0.88)
    for k, region in enumerate(regions):
        if region not in all_fits:
            raise InputDataError(f"fits has no {region!r} result (it has {sorted(all_fits)}); pass fits={{'{region}': ...}}.")
        fits_r = all_fits[region]
        where = np.flatnonzero(np.asarray(fits_r[dim].values) == label)
        if where.size != 1:
            raise InputDataError(f"the {region} fits hold spectrum {label!r} {where.size} times; pass the fits of this catalogue.")
        ax_main = fig.add_subplot(grid[0, k])
        ax_res = fig.add_subplot(grid[1, k], sharex=ax_main)
        ax_main.tick_params(labelbottom=False)
        fits_r.sheap.use(spectra=spectra)
        fits_r.sheap.plot(spectrum=int(where[0]), ax=(ax_main, ax_res), components=components, legend="below")
        chi2 = float(row[f"{region}_chi2_nu"].values[0]) if f"{region}_chi2_nu" in row else float("nan")
        ax_main.set_title(rf"{region}   $\chi^2_\nu$ = {chi2:.3g}", fontsize="medium")
        if k:
            ax_main.set_ylabel("")
    z = float(row["redshift"].values[0]) if "redshift" in row.variables else float("nan")
    mass = float(row["log_mbh"].values[0]) if "log_mbh" in row else float("nan")
    head = f"{object_name(row, dim, label)}   z = {z:.4g}"
    if np.isfinite(mass):
        head += rf"   log $M_\mathrm{{BH}}/M_\odot$ = {mass:.2f} ({row['mbh_recipe'].values[0]})"
    fig.suptitle(head, fontsize="large")
    return fig


# --------------------------------------------------------------------------------------
# The catalogue overview
# --------------------------------------------------------------------------------------
#: (broad line, luminosity column, axis label) of the overview's panels
OVERVIEW_PANELS = (
    ("hbeta_broad", "log_l5100", r"log $\lambda L_{5100}$ [erg s$^{-1}$]"),
    ("halpha_broad", "halpha_broad_log_lum", r"log $L_{\mathrm{H}\alpha}$ [erg s$^{-1}$]"),
    ("mgii_broad", "log_l3000", r"log $\lambda L_{3000}$ [erg s$^{-1}$]"),
    ("civ_broad", "log_l1350", r"log $\lambda L_{1350}$ [erg s$^{-1}$]"),
)


def plot_overview(cat: xr.Dataset):
    """FWHM against continuum luminosity per broad line, coloured by the fiducial mass, and the
    fiducial-mass distribution (see ``SheapAccessor.plot_overview``)."""
    plt = _pyplot("catalog.sheap.plot_overview")
    panels = [(line, lum, label) for line, lum, label in OVERVIEW_PANELS if f"{line}_fwhm" in cat and lum in cat]
    if not panels or "log_mbh" not in cat:
        raise InputDataError("plot_overview needs a catalogue of sd.fit_catalog (broad-line FWHM, luminosities and log_mbh).")
    mass = np.asarray(cat["log_mbh"].values, dtype=np.float64)
    finite_mass = mass[np.isfinite(mass)]
    vmin, vmax = (np.percentile(finite_mass, [2, 98]) if finite_mass.size else (7.0, 10.0))
    if vmax - vmin < 0.2:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(4.4 * (len(panels) + 1), 4.2))
    fig.subplots_adjust(wspace=0.4, bottom=0.16, top=0.86, left=0.05, right=0.98)
    scatter = None
    for ax, (line, lum, label) in zip(axes, panels):
        fwhm = np.asarray(cat[f"{line}_fwhm"].values, dtype=np.float64)
        fwhm_err = np.asarray(cat[f"{line}_fwhm_err"].values, dtype=np.float64) if f"{line}_fwhm_err" in cat else None
        lx = np.asarray(cat[lum].values, dtype=np.float64)
        ok = np.isfinite(fwhm) & np.isfinite(lx) & (fwhm > 0)
        if fwhm_err is not None and ok.any():
            ax.errorbar(lx[ok], np.log10(fwhm[ok]), yerr=0.434 * fwhm_err[ok] / fwhm[ok], fmt="none", ecolor="0.7", lw=0.7, zorder=1)
        has_m = ok & np.isfinite(mass)
        scatter = ax.scatter(lx[has_m], np.log10(fwhm[has_m]), c=mass[has_m], cmap="viridis", vmin=vmin, vmax=vmax, s=30,
                             edgecolor="k", lw=0.4, zorder=3)
        ax.scatter(lx[ok & ~np.isfinite(mass)], np.log10(fwhm[ok & ~np.isfinite(mass)]), facecolor="none", edgecolor="0.4", s=30,
                   lw=0.8, zorder=2, label="no fiducial mass")
        ax.set_xlabel(label)
        ax.set_ylabel(rf"log FWHM({line.replace('_broad', '')} broad) [km s$^{{-1}}$]")
        ax.set_title(f"{line.replace('_broad', '')} broad: {int(ok.sum())} spectra", fontsize="medium")
        if (ok & ~np.isfinite(mass)).any():
            ax.legend(fontsize="x-small", loc="lower left")
    if scatter is not None:
        bar = fig.colorbar(scatter, ax=list(axes[: len(panels)]), pad=0.01, fraction=0.025)
        bar.set_label(r"fiducial log $M_\mathrm{BH}/M_\odot$")
    ax = axes[-1]
    recipes = np.asarray(cat["mbh_recipe"].values).astype(str) if "mbh_recipe" in cat else np.full(mass.shape, "")
    bins = np.arange(math.floor(min(finite_mass.min(), 6.5) * 4) / 4, math.ceil(max(finite_mass.max(), 10.0) * 4) / 4 + 0.25, 0.25) \
        if finite_mass.size else np.arange(6.0, 10.5, 0.25)
    kinds = sorted(set(recipes[np.isfinite(mass)]))
    stack = [mass[(recipes == r) & np.isfinite(mass)] for r in kinds]
    if stack:
        ax.hist(stack, bins=bins, stacked=True, label=kinds, edgecolor="k", lw=0.5)
        ax.legend(fontsize="x-small", title="recipe", title_fontsize="x-small")
    ax.set_xlabel(r"fiducial log $M_\mathrm{BH}/M_\odot$")
    ax.set_ylabel("spectra")
    ax.set_title(f"fiducial mass: {finite_mass.size} of {mass.size} spectra", fontsize="medium")
    return fig
