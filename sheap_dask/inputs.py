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
    """Initial values as a (dim, param) float64 DataArray, NaN where the model decides.

    ``init`` is a (dim, param) DataArray (labels matched), a numpy array of shape
    ``(n_params,)`` (the same for every spectrum) or ``(n_spectra, n_params)``, or a mapping
    name -> scalar, (n_spectra,) array or (dim,) DataArray. Anything else is an error that
    names ``init``, what was expected and what was given.
    """
    names = list(model.param_names)
    dim, n = inputs.dim, inputs.n_spectra
    base = xr.DataArray(
        da.full((n, len(names)), np.nan, chunks=(inputs.chunks, -1)),
        dims=(dim, "param"),
        coords={"param": names},
    )
    if init is None:
        return base
    if isinstance(init, (np.ndarray, list, tuple)):
        arr = np.asarray(init, dtype=np.float64)
        if arr.shape == (len(names),):
            arr = np.broadcast_to(arr, (n, len(names)))
        elif arr.shape != (n, len(names)):
            raise InputDataError(
                f"init has shape {arr.shape}; expected ({len(names)},) (one value per parameter: {names}) or "
                f"({n}, {len(names)}) (spectra x parameters)."
            )
        out = xr.DataArray(arr, dims=(dim, "param"), coords={"param": names})
        return out.chunk({dim: inputs.chunks, "param": -1})
    if isinstance(init, xr.DataArray):
        if "param" not in init.dims:
            raise InputDataError(f"init DataArray has dims {init.dims}; expected ({dim!r}, 'param') with a 'param' coordinate of parameter names.")
        extra = [d for d in init.dims if d not in (dim, "param")]
        if extra:
            raise InputDataError(f"init DataArray has dims {init.dims}; expected ({dim!r}, 'param') (or ('param',)); {extra} are not allowed.")
        if "param" not in init.coords:
            raise InputDataError(f"init DataArray has no 'param' coordinate; label its values with the parameter names {names}.")
        given = [str(p) for p in init["param"].values]
        _check_init_spectra(init, inputs, "init")
        items = {p: init.sel(param=p) for p in given}
    elif isinstance(init, Mapping):
        items = dict(init)
        given = list(items)
    else:
        raise InputDataError(
            f"init must be a DataArray (spectrum, param), a numpy array or a dict name -> value, got {type(init).__name__}."
        )
    unknown = [p for p in given if p not in names]
    if unknown:
        raise InputDataError(f"init has unknown parameter names {unknown}; the model's parameters are {names}.")
    columns = []
    for p in names:
        if p in items:
            columns.append(_init_column(items[p], p, inputs))
        else:
            columns.append(base.isel(param=0, drop=True))
    out = xr.concat(columns, dim="param").transpose(dim, "param").assign_coords(param=names)
    return out.chunk({dim: inputs.chunks, "param": -1})


def _check_init_spectra(value: xr.DataArray, inputs: Inputs, label: str) -> None:
    """A (dim, ...) DataArray of initial values must have the input's spectra, by label when both have them."""
    dim, n = inputs.dim, inputs.n_spectra
    if dim not in value.dims:
        return
    if value.sizes[dim] != n:
        raise InputDataError(f"{label} has {value.sizes[dim]} values along {dim!r}; the input has {n} spectra.")
    if dim in value.coords and dim in inputs.coords:
        mine = np.asarray(inputs.coords[dim].values)
        theirs = np.asarray(value[dim].values)
        if mine.shape == theirs.shape and not np.array_equal(mine, theirs):
            k = int(np.flatnonzero(mine != theirs)[0])
            raise InputDataError(
                f"{label} labels along {dim!r} do not match the input's: position {k} is {theirs[k].item()!r} in {label}, "
                f"{mine[k].item()!r} in the input. Reorder it with {label}.sel({dim}=ds.{dim}) or drop its {dim!r} coordinate."
            )


def _init_column(value, name: str, inputs: Inputs) -> xr.DataArray:
    dim, n = inputs.dim, inputs.n_spectra
    label = f"init[{name!r}]"
    if isinstance(value, xr.DataArray):
        if value.ndim > 1 or (value.ndim == 1 and value.dims != (dim,)):
            raise InputDataError(f"{label} has dims {value.dims}; expected a scalar or ({dim!r},).")
        _check_init_spectra(value, inputs, label)
        col = value.astype(np.float64).drop_vars([c for c in value.coords], errors="ignore")
        if col.ndim == 0:
            col = col.expand_dims({dim: n})
        return col.chunk({dim: inputs.chunks}) if col.chunks is None else col
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 0:
        arr = np.full(n, float(arr))
    elif arr.shape != (n,):
        raise InputDataError(f"{label} has shape {arr.shape}; expected a scalar or ({n},) (one value per spectrum).")
    return xr.DataArray(arr, dims=(dim,)).chunk({dim: inputs.chunks})


def no_data_cause(inputs: Inputs, model) -> str:
    """Why every spectrum of a fit got ``no_data``, most likely: the observed and rest-frame
    wavelength ranges of the input against the model's window, and what to change."""
    import dask

    if inputs.wavelength_values is not None:
        lo, hi = float(np.nanmin(inputs.wavelength_values)), float(np.nanmax(inputs.wavelength_values))
    else:
        wl = inputs.wavelength_2d.data
        lo, hi = (float(v) for v in dask.compute(da.nanmin(wl), da.nanmax(wl)))
    n = inputs.n_spectra
    text = f"all {n} spectra have status no_data (not fitted): the observed wavelengths span {lo:.6g} to {hi:.6g}"
    window = getattr(model, "window", None)
    zlo = zhi = None
    if inputs.redshift is not None:
        zlo, zhi = (float(v) for v in dask.compute(da.nanmin(inputs.redshift.data), da.nanmax(inputs.redshift.data)))
        if np.isfinite(zlo) and np.isfinite(zhi) and zlo > -1:
            rest = (lo / (1 + zhi), hi / (1 + zlo))
            text += f", i.e. rest frame {rest[0]:.6g} to {rest[1]:.6g} for redshifts {zlo:.4g} to {zhi:.4g}"
        else:
            rest = (lo, hi)
    else:
        rest = (lo, hi)
        text += " (no redshift variable: taken as rest frame)"
    if window:
        text += f"; the model {getattr(model, 'name', '')!r} needs rest frame {window[0]:.6g} to {window[1]:.6g} Angstrom"
    if lo <= 0:
        cause = "the wavelengths include zero or negative values: they must be positive, in Angstrom"
    elif hi < 1000:
        unit = "micrometres (multiply by 1e4)" if hi < 30 else "nanometres (multiply by 10)"
        cause = f"the wavelengths look like {unit}: sheap_dask expects Angstrom"
    elif window and (rest[1] <= window[0] or rest[0] >= window[1]):
        if inputs.redshift is None:
            cause = (
                "the model's window lies outside the spectra; if they are observed-frame spectra, give their redshifts "
                "(a per-spectrum 'redshift' variable, or redshift='<name>')"
            )
        else:
            cause = "at these redshifts the model's window lies outside the spectra: fit a region they cover" + _regions_covering(rest)
    elif window and (rest[0] > window[0] or rest[1] < window[1]):
        cause = (
            "the spectra cover only part of the model's window, less than sheap_dask.coverage requires: fit a region "
            "they cover" + _regions_covering(rest)
        )
    else:
        cause = "the window is covered, but no spectrum has enough usable pixels there: check ivar (0 masks a pixel) and NaN flux"
    return f"{text}. Likely cause: {cause}."


def _regions_covering(rest: tuple[float, float]) -> str:
    from .models.regions import REGIONS

    names = [name for name, spec in REGIONS.items() if rest[0] <= spec.window[0] and spec.window[1] <= rest[1]]
    return f" (built-in regions inside the rest-frame range: {', '.join(names)})" if names else " (no built-in region lies inside the rest-frame range)"
