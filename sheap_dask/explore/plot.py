"""Plotting one spectrum of a fit result: data, model, components and residuals (matplotlib)."""

from __future__ import annotations

import numpy as np
import xarray as xr

from ..errors import MissingDependencyError, OptionError
from ..status import Status
from . import evaluate
from .link import Link

__all__ = ["plot"]


def plot(link: Link, spectrum: int = 0, *, spectra: xr.Dataset | None = None, ax=None, components: bool = True):
    """Plot one spectrum in the rest frame of the fit (see ``SheapAccessor.plot``); returns the Figure."""
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise MissingDependencyError(
            "fits.sheap.plot needs matplotlib; install it with: pip install 'sheap-dask[plot]'"
        ) from exc
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
    comps = evaluate.components(sub, frame="rest") if components and model.components else None
    masked = ~np.isfinite(resid)
    if model.window is not None:
        inside = (rest >= model.window[0]) & (rest <= model.window[1])
    else:
        inside = np.ones_like(rest, dtype=bool)

    if ax is None:
        fig, (ax_main, ax_res) = plt.subplots(
            2, 1, sharex=True, figsize=(9, 6), gridspec_kw={"height_ratios": [3, 1], "hspace": 0.05}
        )
    else:
        try:
            ax_main, ax_res = ax
        except (TypeError, ValueError):
            raise OptionError("ax must be a pair (main_axes, residual_axes) of matplotlib Axes, or None.") from None
        fig = ax_main.figure
    shown = np.where(inside & ~masked, flux, np.nan)
    ax_main.plot(rest[inside], shown[inside], color="0.35", lw=0.8, drawstyle="steps-mid", label="data")
    ax_main.plot(rest[inside], total[inside], color="C3", lw=1.5, label="model")
    if comps is not None:
        cvals = np.asarray(comps.values[0])
        for k, name in enumerate(comps["component"].values):
            ax_main.plot(rest[inside], cvals[inside, k], lw=1.0, ls="--", label=str(name))
    ax_res.plot(rest[inside], resid[inside], color="0.35", lw=0.8, drawstyle="steps-mid")
    ax_res.axhline(0.0, color="C3", lw=1.0)
    ax_res.set_xlabel("rest wavelength [Å]")
    ax_res.set_ylabel("resid. [σ]")
    ax_main.set_ylabel("flux density (rest frame)")
    ax_main.legend(fontsize="small", ncol=2)
    ax_main.set_title(_title(one_fit, dim, i), fontsize="small")
    return fig


def _title(one_fit: xr.Dataset, dim: str, i: int) -> str:
    """``<dim> i, <scalar coordinates>, status=..., redchi2=...`` of a one-spectrum result."""
    title = [f"{dim} {i}"]
    for name, coord in one_fit.coords.items():
        if coord.dims == (dim,) and name != dim and coord.size == 1 and np.asarray(coord.values).dtype.kind in "iufU":
            value = coord.values[0]
            title.append(f"{name}={value:.4g}" if np.asarray(value).dtype.kind == "f" else f"{name}={value}")
    if "status" in one_fit:
        code = int(one_fit["status"].values[0])
        title.append(f"status={Status(code).meaning if code in Status._value2member_map_ else code}")
    if "redchi2" in one_fit:
        title.append(f"redchi2={float(one_fit['redchi2'].values[0]):.3g}")
    return ", ".join(title)
