"""Single spectra from tables and quasar-catalogue products.

Tables
    :func:`read_table_spectrum` reads a (wavelength, flux, error) CSV/whitespace table.
Quasar-catalogue products
    :func:`read_rest_frame_fits` reads the rest-frame, dereddened spectrum (HDU3) of the
    PyQSOFit ``op-*.fits`` / ``op_*.fits`` files of the DR16Q / DR19 quasar catalogues.
"""

from __future__ import annotations

import csv
import io as _stdio
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from ..astro import air_to_vacuum, dered
from ..errors import InputDataError, OptionError
from ._common import FLUX_UNITS, colmap
from ._fits import fits_module

__all__ = ["read_table_spectrum", "read_rest_frame_fits"]

_WAVE_NAMES = ("wavelength", "wave", "lam", "lambda", "wl", "loglam")
_FLUX_NAMES = ("flux", "flam", "f_lambda", "f")
_ERR_NAMES = ("error", "err", "flux_err", "fluxerr", "sigma", "noise", "ferr", "e_flux", "unc", "uncertainty")


def _one_spectrum_dataset(
    wave, flux, ivar, *, coords: dict[str, Any], attrs: dict[str, Any], flux_units: str, spectrum_dim: str, wavelength_dim: str
) -> xr.Dataset:
    dims = (spectrum_dim, wavelength_dim)
    ivar_units = f"({flux_units})**-2" if flux_units else ""
    all_coords = {wavelength_dim: (wavelength_dim, wave, {"units": "Angstrom"})}
    all_coords.update({k: (spectrum_dim, np.asarray([v]), a) for k, (v, a) in coords.items()})
    return xr.Dataset(
        {
            "flux": (dims, flux[None, :].astype(np.float32), {"units": flux_units, "long_name": "flux density"}),
            "ivar": (dims, ivar[None, :].astype(np.float32), {"units": ivar_units, "long_name": "inverse variance of flux (0 = masked)"}),
        },
        coords=all_coords,
        attrs=attrs,
    )


def _ivar_from_err(flux: np.ndarray, err: np.ndarray) -> np.ndarray:
    ok = np.isfinite(err) & (err > 0) & np.isfinite(flux)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        ivar = np.where(ok, 1.0 / np.where(ok, err, 1.0) ** 2, 0.0)
    return np.where(np.isfinite(ivar), ivar, 0.0)


def read_table_spectrum(
    path: str | os.PathLike,
    *,
    columns: Sequence[str | int] | None = None,
    redshift: float | None = None,
    flux_scale: float | None = None,
    flux_units: str = "",
    air: bool = False,
    ebv: float | None = None,
    dereddening: str = "ccm89",
    r_v: float = 3.1,
    delimiter: str | None = None,
    spectrum_dim: str = "spectrum",
    wavelength_dim: str = "wavelength",
) -> xr.Dataset:
    """Read a (wavelength, flux, error) table into a one-spectrum Dataset.

    Parameters
    ----------
    path : str or os.PathLike
        CSV or whitespace-separated text; ``#`` starts a comment. A header line is optional.
    columns : sequence of 3 names or indices, optional
        The wavelength, flux and error columns. Default: recognised header names
        (wavelength/wave/lam/lambda, flux/flam, error/err/flux_err/sigma/noise), else the
        first three columns.
    redshift : float, optional
        Stored as the ``redshift`` coordinate. Without it the Dataset has no ``redshift``
        and models take it as rest frame.
    flux_scale : float, optional
        Divide flux and error by this (e.g. ``1e-17`` to express erg/s/cm2/A tables in the
        SDSS unit, which keeps the numbers near 1 for float32 fits).
    flux_units : str
        Units of the (scaled) flux, stored in the ``units`` attribute.
    air : bool
        The table's wavelengths are in air: convert to vacuum (:func:`air_to_vacuum`), the
        convention of SDSS and of the model line lists.
    ebv, dereddening, r_v
        Galactic dereddening as in :func:`dered` (``ebv=None``: none).
    delimiter : str, optional
        Column separator (default: ``,`` if the first data line has one, else whitespace).
    spectrum_dim, wavelength_dim : str
        Dimension names.

    Returns
    -------
    xarray.Dataset
        ``flux``/``ivar`` (1, n_wave) float32, ``ivar = 1/err**2`` (0 where the error is
        non-finite or <= 0, or the flux non-finite), ``wavelength`` in Angstrom (ascending),
        ``specname`` and ``filename`` coordinates, ``redshift`` when given.

    Examples
    --------
    >>> ds = read_table_spectrum("spec.csv", redshift=0.1684, flux_scale=1e-17)  # doctest: +SKIP
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"table spectrum not found: {os.fspath(path)!r} (argument path)")
    text = p.read_text()
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise InputDataError(f"{path}: no data lines")
    if delimiter is None:
        delimiter = "," if "," in lines[0] else None
    first = lines[0].split(delimiter) if delimiter else lines[0].split()
    first = [c.strip() for c in first]

    def is_number(s):
        try:
            float(s)
            return True
        except ValueError:
            return False

    header = None if all(is_number(c) for c in first) else [c.lower() for c in first]
    body = lines[1:] if header else lines
    if delimiter:
        rows = list(csv.reader(_stdio.StringIO("\n".join(body)), delimiter=delimiter))
    else:
        rows = [ln.split() for ln in body]
    try:
        table = np.array([[float(v) for v in r] for r in rows], dtype=np.float64)
    except ValueError as exc:
        raise InputDataError(f"{path}: a data line is not numeric ({exc})") from exc
    if table.ndim != 2 or table.shape[1] < 3:
        raise InputDataError(f"{path}: needs at least 3 columns (wavelength, flux, error), found {table.shape[-1]}")

    def find(names, given, role):
        if isinstance(given, (int, np.integer)):
            return int(given)
        if given is not None:
            if header is None or given.lower() not in header:
                raise OptionError(f"columns: {role} column {given!r} not in the header {header} of {path}")
            return header.index(given.lower())
        if header is not None:
            for n in names:
                if n in header:
                    return header.index(n)
        return None

    if columns is not None and len(columns) != 3:
        raise OptionError(f"columns={columns!r} must name 3 columns: wavelength, flux, error")
    given = list(columns) if columns is not None else [None, None, None]
    idx = [find(_WAVE_NAMES, given[0], "wavelength"), find(_FLUX_NAMES, given[1], "flux"), find(_ERR_NAMES, given[2], "error")]
    if any(i is None for i in idx):
        if header is not None and columns is None and not all(i is None for i in idx):
            raise InputDataError(
                f"{path}: could not tell the wavelength/flux/error columns from the header {header}; pass columns=[...]"
            )
        idx = [0, 1, 2]
    wave, flux, err = (table[:, i] for i in idx)
    if header is not None and header[idx[0]] == "loglam":
        wave = 10.0**wave
    order = np.argsort(wave, kind="stable")
    wave, flux, err = wave[order], flux[order], err[order]
    if np.any(np.diff(wave) == 0):
        raise InputDataError(f"{path}: repeated wavelength values")
    if air:
        wave = air_to_vacuum(wave)
    if flux_scale is not None:
        flux, err = flux / flux_scale, err / flux_scale
    ivar = _ivar_from_err(flux, err)
    if ebv is not None:
        flux, ivar = dered(wave, flux, ivar, ebv, law=dereddening, r_v=r_v)
    coords: dict[str, Any] = {
        "specname": (np.asarray(p.stem, dtype=object), {}),
        "filename": (np.asarray(p.name, dtype=object), {}),
    }
    if redshift is not None:
        coords["redshift"] = (float(redshift), {})
    if ebv is not None:
        coords["ebv"] = (float(ebv), {"units": "mag"})
    attrs = {"source": f"table {p.name}", "wavelength_medium": "vacuum" if air else "as in file"}
    if ebv is not None:
        attrs.update(dereddening=dereddening, dereddening_r_v=float(r_v))
    return _one_spectrum_dataset(
        wave, flux, ivar, coords=coords, attrs=attrs, flux_units=flux_units, spectrum_dim=spectrum_dim, wavelength_dim=wavelength_dim
    )


def read_rest_frame_fits(
    path: str | os.PathLike, *, spectrum_dim: str = "spectrum", wavelength_dim: str = "wavelength"
) -> xr.Dataset:
    """Read the rest-frame spectrum of a quasar-catalogue PyQSOFit ``op-*.fits``/``op_*.fits`` file.

    HDU3 holds the spectrum that the catalogue fitted: ``wave_prereduced`` (rest-frame
    Angstrom), ``flux_prereduced`` and ``err_prereduced`` (already Galactic-dereddened and
    multiplied by 1+z, 1e-17 erg/s/cm2/A). Because it is already in the rest frame, the
    returned Dataset has **no** ``redshift`` coordinate (models then take it as rest frame);
    the catalogue redshift is kept as ``catalog_redshift`` and ``attrs["frame"] = "rest"``.

    Parameters
    ----------
    path : str or os.PathLike
        The op file (DR16Q: Wu & Shen 2022; SDSS-V DR19 quasar VAC).
    spectrum_dim, wavelength_dim : str
        Dimension names.

    Returns
    -------
    xarray.Dataset
        One spectrum: ``flux``, ``ivar`` (float32; ``ivar = 1/err**2``, 0 where err <= 0 or
        non-finite), ``wavelength`` (rest frame), and ``catalog_redshift``, ``catalog_ebv``,
        ``plate``, ``mjd``, ``fiberid``, ``ra``, ``dec``, ``specname``, ``filename`` where
        the file's HDU1 has them.
    """
    fits = fits_module()
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"op file not found: {os.fspath(path)!r} (argument path)")
    with fits.open(p, memmap=False) as hdul:
        if len(hdul) < 4 or not hasattr(hdul[3], "columns"):
            raise InputDataError(f"{path}: no HDU3 table; a quasar-catalogue op file has the spectrum in HDU3")
        cols = colmap(hdul[3].columns.names)
        need = ["wave_prereduced", "flux_prereduced", "err_prereduced"]
        missing = [c for c in need if c not in cols]
        if missing:
            raise InputDataError(f"{path}: HDU3 lacks {missing} (has {list(cols.values())})")
        d3 = hdul[3].data
        wave, flux, err = (np.asarray(d3[cols[c]], dtype=np.float64) for c in need)
        info = {}
        if hasattr(hdul[1], "columns"):
            c1 = colmap(hdul[1].columns.names)
            d1 = hdul[1].data

            def get(*names):
                for n in names:
                    if n.lower() in c1:
                        return d1[c1[n.lower()]][0]
                return None

            info = {
                "catalog_redshift": get("Z_FIT", "redshift", "Z"),
                "catalog_ebv": get("EBV"),
                "plate": get("PLATE", "plateid"),
                "mjd": get("MJD"),
                "fiberid": get("FIBERID"),
                "ra": get("RA"),
                "dec": get("DEC"),
            }
    ok = np.isfinite(wave)
    wave, flux, err = wave[ok], flux[ok], err[ok]
    order = np.argsort(wave, kind="stable")
    wave, flux, err = wave[order], flux[order], err[order]
    ivar = _ivar_from_err(flux, err)
    flux = np.where(np.isfinite(flux), flux, np.nan)
    units = {"catalog_ebv": {"units": "mag"}, "ra": {"units": "deg"}, "dec": {"units": "deg"}}
    casts = {"plate": int, "mjd": int, "fiberid": int}
    coords: dict[str, Any] = {}
    for k, v in info.items():
        if v is not None:
            coords[k] = (casts.get(k, float)(v), units.get(k, {}))
    coords["specname"] = (np.asarray(p.stem, dtype=object), {})
    coords["filename"] = (np.asarray(p.name, dtype=object), {})
    attrs = {
        "source": f"quasar-catalogue op file {p.name} (HDU3 *_prereduced)",
        "frame": "rest",
        "dereddened": "yes (by the catalogue pipeline)",
    }
    ds = _one_spectrum_dataset(
        wave, flux, ivar, coords=coords, attrs=attrs, flux_units=FLUX_UNITS, spectrum_dim=spectrum_dim, wavelength_dim=wavelength_dim
    )
    ds[wavelength_dim].attrs.update(long_name="rest-frame vacuum wavelength", frame="rest")
    return ds

