"""Validating a Dataset of spectra for the Dataset layer: names, dims, dtypes, chunking, ``init``.

:func:`prepare_inputs` checks a Dataset against the data conventions of ``DESIGN.md`` and
returns the standardized dask arrays (chunked along the spectrum dim only); every error names
the argument, its bad value and the fix.
"""

import warnings
from collections.abc import Mapping

import dask.array as da
import numpy as np
import xarray as xr

from . import config
from .errors import InputDataError, OptionError


class Inputs:
    """Validated, standardized inputs: dask arrays chunked along the spectrum dim only."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def open_store(source: str, storage_options) -> xr.Dataset:
    try:
        return xr.open_zarr(source, storage_options=dict(storage_options) if storage_options else None)
    except FileNotFoundError as exc:
        raise InputDataError(f"ds={source!r}: no zarr store there ({exc}); pass an existing store path or URL.") from exc
    except ImportError as exc:
        raise InputDataError(
            f"ds={source!r} needs a filesystem package that is not installed ({exc}); e.g. pip install s3fs or gcsfs."
        ) from exc


def prepare_inputs(ds, model, *, flux, ivar, flux_err, wavelength, dim, redshift, chunk_size) -> Inputs:
    available = sorted(map(str, ds.variables))
    if flux not in ds.variables:
        raise InputDataError(f"flux={flux!r} is not a variable of the Dataset (it has {available}); pass flux='<name>'.")
    flux_da = ds[flux]
    if flux_da.ndim != 2 or dim not in flux_da.dims:
        raise InputDataError(
            f"flux {flux!r} has dims {flux_da.dims}; expected 2 dims ({dim!r}, wavelength). "
            f"Pass dim='<spectrum dim>' or transpose/stack your data."
        )
    wl_dim = next(d for d in flux_da.dims if d != dim)
    flux_da = flux_da.transpose(dim, wl_dim)
    _check_real(flux_da, "flux", flux)

    if flux_err is not None:
        if flux_err not in ds.variables:
            raise InputDataError(f"flux_err={flux_err!r} is not a variable of the Dataset (it has {available}).")
        err = ds[flux_err].transpose(dim, wl_dim)
        _check_real(err, "flux_err", flux_err)
        err = err.astype(np.float64)  # 1/err**2 overflows float32 for errors below ~1e-19
        ivar_da = xr.where(np.isfinite(err) & (err > 0), 1.0 / err**2, 0.0)
    else:
        if ivar is None or ivar not in ds.variables:
            raise InputDataError(
                f"ivar={ivar!r} is not a variable of the Dataset (it has {available}); pass ivar='<name>' for the "
                "inverse variance, or flux_err='<name>' for 1-sigma errors."
            )
        ivar_da = ds[ivar]
        if set(ivar_da.dims) != {dim, wl_dim}:
            raise InputDataError(f"ivar {ivar!r} has dims {ivar_da.dims}; expected the dims of flux {(dim, wl_dim)}.")
        ivar_da = ivar_da.transpose(dim, wl_dim)
        _check_real(ivar_da, "ivar", ivar)
        if not ivar_da.chunks:
            with np.errstate(invalid="ignore"):
                n_neg = int(np.sum(ivar_da.values < 0))
            if n_neg:
                raise InputDataError(
                    f"ivar {ivar!r} has {n_neg} negative values; inverse variances must be >= 0 "
                    "(0 masks a pixel). Fix them, e.g. ds[ivar] = ds[ivar].clip(min=0)."
                )

    if wavelength not in ds.variables:
        raise InputDataError(
            f"wavelength={wavelength!r} is not a coordinate/variable of the Dataset (it has {available}); "
            "pass wavelength='<name>' (Angstrom)."
        )
    wl_var = ds[wavelength]
    if wl_var.ndim == 1:
        if wl_var.dims != (wl_dim,):
            raise InputDataError(f"wavelength {wavelength!r} has dims {wl_var.dims}; expected ({wl_dim!r},) like flux's second dim.")
        wl_values = np.asarray(wl_var.values, dtype=np.float64)
        if wl_values.size != flux_da.sizes[wl_dim]:
            raise InputDataError(
                f"wavelength {wavelength!r} has {wl_values.size} values but flux has {flux_da.sizes[wl_dim]} pixels along {wl_dim!r}."
            )
        diffs = np.diff(wl_values)
        if not (np.all(np.isfinite(wl_values)) and (np.all(diffs > 0) or np.all(diffs < 0))):
            raise InputDataError(
                f"wavelength {wavelength!r} is not strictly monotonic (or has NaN); sort the Dataset with "
                f"ds.sortby({wavelength!r}) and drop duplicate pixels."
            )
        wl_2d = None
    elif wl_var.ndim == 2 and set(wl_var.dims) == {dim, wl_dim}:
        wl_values = None
        wl_2d = wl_var.transpose(dim, wl_dim).astype(np.float64)
    else:
        raise InputDataError(
            f"wavelength {wavelength!r} has dims {wl_var.dims}; expected ({wl_dim!r},) or ({dim!r}, {wl_dim!r})."
        )

    z_da = None
    if redshift is not None and redshift in ds.variables:
        z_da = ds[redshift]
        if z_da.dims != (dim,):
            raise InputDataError(f"redshift {redshift!r} has dims {z_da.dims}; expected ({dim!r},).")
        z_da = z_da.astype(np.float64)

    # Chunking: along the spectrum dim only, regular (zarr regions need equal chunks).
    arrays = {"flux": flux_da, "ivar": ivar_da}
    if wl_2d is not None:
        arrays["wavelength"] = wl_2d
    chunks = _spectrum_chunks(flux_da, dim, wl_dim, model, chunk_size)
    for name, arr in arrays.items():
        if arr.chunks and len(arr.chunks[1]) > 1:
            warnings.warn(
                f"{name} is chunked along {wl_dim!r} ({len(arr.chunks[1])} chunks); each spectrum must be fitted "
                f"whole, so it is rechunked to one chunk along {wl_dim!r}. Chunk only along {dim!r} to avoid this copy.",
                UserWarning,
                stacklevel=4,
            )
        arrays[name] = arr.chunk({dim: chunks, wl_dim: -1})
    if z_da is not None:
        z_da = z_da.chunk({dim: chunks})

    per_spectrum_coords = {
        name: coord.variable for name, coord in ds.coords.items() if coord.dims == (dim,) and name != dim
    }
    if dim in ds.coords:
        per_spectrum_coords[dim] = ds.coords[dim].variable
    if z_da is not None and redshift not in per_spectrum_coords:
        per_spectrum_coords[redshift] = ds[redshift].variable
    return Inputs(
        ds=ds,
        flux_units=str(ds[flux].attrs.get("units", "")) or None,
        dim=dim,
        wl_dim=wl_dim,
        flux=arrays["flux"],
        ivar=arrays["ivar"],
        wavelength_values=wl_values,
        wavelength_2d=arrays.get("wavelength"),
        redshift=z_da,
        chunks=chunks,
        n_spectra=flux_da.sizes[dim],
        coords=per_spectrum_coords,
    )


def _check_real(da: xr.DataArray, argument: str, name: str) -> None:
    """Refuse complex or non-numeric data: its imaginary part would be dropped silently."""
    kind = np.dtype(da.dtype).kind
    if kind not in "fiu":
        what = "complex" if kind == "c" else f"non-numeric ({da.dtype})"
        fix = "take .real or abs() explicitly" if kind == "c" else "convert it with .astype('float64')"
        raise InputDataError(f"{argument}={name!r} is {what}; spectra must be real numbers (float32/float64): {fix}.")


def _spectrum_chunks(flux_da, dim, wl_dim, model, chunk_size) -> int:
    """A regular chunk size along ``dim``: the input's first chunk, or one from the model size."""
    if chunk_size is None and flux_da.chunks:
        return int(flux_da.chunks[0][0])
    if chunk_size is None:
        chunk_size = config.get("fit.chunk_size")
    if chunk_size in (None, "auto"):
        chunk_size = _auto_chunk_size(model, flux_da.sizes[wl_dim])
    if not (isinstance(chunk_size, (int, np.integer)) and chunk_size > 0):
        raise OptionError(f"chunk_size={chunk_size!r} must be a positive integer (spectra per chunk).")
    return int(min(chunk_size, max(1, flux_da.sizes[dim])))


def _auto_chunk_size(model, n_pix: int) -> int:
    """Spectra per chunk: the Jacobian of a chunk (spectra x pixels x free params) ~ 64 MB."""
    per_spectrum = 8 * n_pix * max(model.n_free, 1) * 3
    return int(np.clip(64e6 // per_spectrum, 32, 1024))


def prepare_init(init, model, inputs: Inputs) -> xr.DataArray:
    """Initial values as a (dim, param) float64 DataArray, NaN where the model decides."""
    names = model.param_names
    dim = inputs.dim
    base = xr.DataArray(
        da.full((inputs.n_spectra, len(names)), np.nan, chunks=(inputs.chunks, -1)),
        dims=(dim, "param"),
        coords={"param": names},
    )
    if init is None:
        return base
    if isinstance(init, xr.DataArray):
        if "param" not in init.dims:
            raise InputDataError(f"init DataArray has dims {init.dims}; expected ({dim!r}, 'param') with a 'param' coordinate of parameter names.")
        given = [str(p) for p in init["param"].values]
        items = {p: init.sel(param=p) for p in given}
    elif isinstance(init, Mapping):
        items = dict(init)
        given = list(items)
    else:
        raise InputDataError(f"init must be a DataArray (spectrum, param) or a dict name -> value, got {type(init).__name__}.")
    unknown = [p for p in given if p not in names]
    if unknown:
        raise InputDataError(f"init has unknown parameter names {unknown}; the model's parameters are {names}.")
    columns = []
    for p in names:
        if p in items:
            value = items[p]
            col = xr.DataArray(value) if not isinstance(value, xr.DataArray) else value
            col = col.astype(np.float64).broadcast_like(base.isel(param=0, drop=True))
        else:
            col = base.isel(param=0, drop=True)
        columns.append(col.drop_vars([c for c in col.coords if c != dim], errors="ignore"))
    out = xr.concat(columns, dim="param").transpose(dim, "param").assign_coords(param=names)
    return out.chunk({dim: inputs.chunks, "param": -1})
