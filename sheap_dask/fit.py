"""The Dataset layer: validate a Dataset of spectra, map the chunk layer over its chunks.

``fit_dataset`` turns an ``xarray.Dataset`` (in memory, dask-backed from ``xr.open_zarr``,
or a path/URL to a zarr store) into the result Dataset of ``DESIGN.md``: one
``xr.apply_ufunc(..., dask="parallelized")`` call with every dimension and dtype stated, or,
with ``store=``, one task per chunk that fits its spectra and writes them into their region
of the output store, recording the chunk as done so an interrupted run resumes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr
import yaml

from . import config
from ._version import __version__
from .chunk import ChunkOptions, fit_chunk, result_variables
from .options import check_penalty
from .errors import ClusterWarning, InputDataError, OptionError, ResumeMismatchError
from .quality import quality_attrs
from .status import Status, status_attrs

logger = logging.getLogger("sheap_dask.fit")

__all__ = ["fit_dataset"]

PROGRESS_GROUP = "sheap_progress"  # zarr subgroup of an output store: per-chunk done markers


def fit_dataset(
    ds: xr.Dataset | str | os.PathLike,
    model,
    *,
    flux: str = "flux",
    ivar: str | None = "ivar",
    flux_err: str | None = None,
    wavelength: str = "wavelength",
    dim: str = "spectrum",
    redshift: str | None = "redshift",
    method: str | None = None,
    num_steps: int | None = None,
    learning_rate: float | None = None,
    lbfgs_options: Mapping | None = None,
    weighted: bool | None = None,
    loss_kind: str | None = None,
    robust_scale: float | None = None,
    penalty_function=None,
    penalty_weight: float | None = None,
    curvature_weight: float | None = None,
    smoothness_weight: float | None = None,
    max_weight: float | None = None,
    fallback: str | None = None,
    fallback_options: Mapping | None = None,
    init: xr.DataArray | Mapping | None = None,
    store: str | os.PathLike | None = None,
    resume: bool | None = None,
    client=None,
    progress: bool | None = None,
    return_history: bool | None = None,
    chunk_size: int | None = None,
    dtype: str | None = None,
    storage_options: Mapping | None = None,
) -> xr.Dataset:
    """Fit ``model`` to every spectrum of ``ds`` on a Dask cluster.

    Each chunk of spectra (along ``dim``) goes to a worker that runs one JIT-compiled,
    vmapped solve over the chunk; spectra whose fit fails are re-fitted there with SLSQP.
    Every default comes from ``dask.config`` (``sheap_dask.*``, see ``sheap_dask.yaml``).

    Parameters
    ----------
    ds : xarray.Dataset or str or path
        Spectra with dims (``dim``, wavelength): an in-memory Dataset (chunked here along
        ``dim``), a dask-backed one (``xr.open_zarr``), or a path/URL of a zarr store
        (fsspec URLs work when the filesystem package is installed).
    model : sheap_dask.Model
        The model, e.g. ``sd.models.region("hbeta")`` or ``sd.Model(func, params)``.
    flux, ivar, flux_err, wavelength : str
        Variable names. ``ivar`` is the inverse variance (``ivar == 0`` masks a pixel);
        give ``flux_err`` instead to use 1-sigma errors. ``wavelength`` (Angstrom) is a 1-D
        coordinate or a 2-D (spectrum, wavelength) variable for heterogeneous grids.
    dim : str
        The spectrum dimension.
    redshift : str or None
        Per-spectrum redshift variable/coordinate; when present the model is fitted in the
        rest frame. ``None`` or absent: the input is taken as rest frame.
    method : {"lm", "adam", "lbfgs"}
        Batched optimizer. ``lm`` (Levenberg-Marquardt with exact Jacobians) is the default.
    num_steps, learning_rate, lbfgs_options
        Iteration budget and optimizer options (see :class:`~sheap_dask.minimizer.Minimizer`).
    weighted, loss_kind, robust_scale, penalty_function, penalty_weight, curvature_weight, smoothness_weight, max_weight
        Loss options, as in :func:`~sheap_dask.loss.build_loss_function`.
    fallback : {"slsqp", "none"}
        Re-fit failed spectra with NLopt's SLSQP on the worker.
    fallback_options : mapping
        ``tol``, ``maxiter``, ``redchi2_sigma``, ``pinned_fraction`` (see ``sheap_dask.yaml``).
    init : DataArray or mapping, optional
        Initial values: a (``dim``, param) DataArray, or a mapping name -> scalar or
        (``dim``,) DataArray, like ``curvefit``'s ``p0``. Unspecified values come from the
        model's data-driven initializer.
    store : str or path, optional
        Stream results into this zarr store chunk by chunk and return it opened lazily.
    resume : bool
        With ``store``: fit only the chunks not yet recorded as done.
    client : distributed.Client, optional
        Cluster to use; default the current client, else a ``LocalCluster`` started (one
        single-threaded worker per core) and closed here. With ``dask.config.set(scheduler=
        "synchronous")`` and no client, the synchronous scheduler is used.
    progress : bool, optional
        Show a progress bar while computing.
    return_history : bool
        Add ``loss_history`` (spectrum, step).
    chunk_size : int, optional
        Spectra per chunk when ``ds`` is not chunked yet (default: from the model size).
    dtype : {"float32", "float64"}, optional
        Precision of the batched solve (default float32; chi-square, errors and the
        fallback are always float64).
    storage_options : mapping, optional
        Passed to fsspec when ``ds`` or ``store`` is a URL.

    Returns
    -------
    xarray.Dataset
        ``params``, ``params_err`` (spectrum, param); ``loss``, ``chi2``, ``dof``,
        ``redchi2``, ``status``, ``method``, ``n_iter`` (spectrum); ``loss_history`` when
        asked. Coordinates ``param``, ``param_min``, ``param_max`` and every per-spectrum
        coordinate of the input. Lazy and chunked like the input when a client is given
        and no store; otherwise already computed (and chunked like the input).

    Warns
    -----
    ClusterWarning
        Before anything is submitted, for workers whose memory limit is below
        ``sheap_dask.worker.min_memory`` (2 GiB: a JAX worker holds ~0.75 GiB once a model is
        compiled and Dask pauses a worker at 80% of its limit, stalling the fit) and for
        workers already paused.

    Examples
    --------
    >>> import sheap_dask as sd
    >>> ds = sd.io.synthetic_spectra(64, seed=1).chunk({"spectrum": 32})
    >>> fits = sd.fit_dataset(ds, sd.models.region("hbeta"))  # doctest: +SKIP
    >>> fits.status.to_series().value_counts()  # doctest: +SKIP
    """
    source = None
    if isinstance(ds, (str, os.PathLike)):
        source = str(ds)
        ds = _open_store(source, storage_options)
    if not isinstance(ds, xr.Dataset):
        raise InputDataError(
            f"ds must be an xarray.Dataset or the path/URL of a zarr store, got {type(ds).__name__}; "
            "e.g. fit_dataset(xr.open_zarr('spectra.zarr'), model)."
        )
    _check_model(model)
    config.warn_unknown_keys()
    fallback_options = dict(fallback_options or {})
    unknown = set(fallback_options) - {"tol", "maxiter", "redchi2_sigma", "pinned_fraction"}
    if unknown:
        raise OptionError(
            f"fallback_options has unknown keys {sorted(unknown)}; allowed: tol, maxiter, redchi2_sigma, pinned_fraction."
        )
    options = ChunkOptions(
        method=method,
        num_steps=num_steps,
        learning_rate=learning_rate,
        lbfgs_options=tuple(sorted(lbfgs_options.items())) if lbfgs_options is not None else None,
        loss_kind=loss_kind,
        robust_scale=robust_scale,
        weighted=weighted,
        penalty_weight=penalty_weight,
        curvature_weight=curvature_weight,
        smoothness_weight=smoothness_weight,
        max_weight=max_weight,
        fallback=fallback,
        fallback_tol=fallback_options.get("tol"),
        fallback_maxiter=fallback_options.get("maxiter"),
        fallback_redchi2_sigma=fallback_options.get("redchi2_sigma"),
        pinned_fraction=fallback_options.get("pinned_fraction"),
        return_history=return_history,
        dtype=dtype,
    ).resolved()
    check_penalty(options, penalty_function, penalty_weight)
    resume = config.resolve(resume, "fit.resume")
    progress = config.resolve(progress, "fit.progress")
    if progress is None:
        progress = sys.stderr.isatty()

    inputs = _prepare_inputs(ds, model, flux=flux, ivar=ivar, flux_err=flux_err, wavelength=wavelength, dim=dim, redshift=redshift, chunk_size=chunk_size)
    init_da = _prepare_init(init, model, inputs)
    attrs = _result_attrs(model, options, source, inputs)

    client, own_cluster = _resolve_client(client)
    if client is not None:
        for message in _worker_problems(client.scheduler_info().get("workers", {})):
            warnings.warn(message, ClusterWarning, stacklevel=2)
    try:
        if store is not None:
            result = _fit_to_store(inputs, init_da, model, options, attrs, str(store), resume, client, progress, penalty_function, storage_options)
        else:
            result = _build_lazy(inputs, init_da, model, options, attrs, penalty_function)
            if own_cluster is not None or client is None:
                # No cluster outlives this call: compute now, keep the input's chunking.
                result = _compute(result, client, progress).chunk({dim: inputs.chunks})
    finally:
        if own_cluster is not None:
            client.close()
            own_cluster.close()
    return result


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------
class _Inputs:
    """Validated, standardized inputs: dask arrays chunked along the spectrum dim only."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def _open_store(source: str, storage_options) -> xr.Dataset:
    try:
        return xr.open_zarr(source, storage_options=dict(storage_options) if storage_options else None)
    except FileNotFoundError as exc:
        raise InputDataError(f"ds={source!r}: no zarr store there ({exc}); pass an existing store path or URL.") from exc
    except ImportError as exc:
        raise InputDataError(
            f"ds={source!r} needs a filesystem package that is not installed ({exc}); e.g. pip install s3fs or gcsfs."
        ) from exc


def _check_model(model) -> None:
    from .model import Model

    if not isinstance(model, Model):
        raise InputDataError(
            f"model must be a sheap_dask.Model, got {type(model).__name__}; use sd.models.region('hbeta') "
            "or sd.Model(func, params)."
        )


def _prepare_inputs(ds, model, *, flux, ivar, flux_err, wavelength, dim, redshift, chunk_size) -> _Inputs:
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
    return _Inputs(
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


def _prepare_init(init, model, inputs: _Inputs) -> xr.DataArray:
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


# --------------------------------------------------------------------------------------
# The result Dataset
# --------------------------------------------------------------------------------------
def _block(flux, ivar, z, init, *extra, model, wavelength, options, pad_to, has_redshift, has_wl2d, penalty_function):
    """Worker side of apply_ufunc: one chunk of numpy blocks -> a tuple of result arrays."""
    wl = extra[0] if has_wl2d else wavelength
    out = fit_chunk(
        model,
        wl,
        flux,
        ivar,
        redshift=z if has_redshift else None,
        init=init,
        options=options,
        pad_to=pad_to,
        penalty_function=penalty_function,
    )
    return tuple(out[name] for name in result_variables(options))


def _output_specs(options: ChunkOptions) -> list[tuple[str, tuple[str, ...], str]]:
    return [(name, dims, dtype) for name, (dims, dtype) in result_variables(options).items()]


def _build_lazy(inputs: _Inputs, init_da, model, options, attrs, penalty_function) -> xr.Dataset:
    dim, wl_dim = inputs.dim, inputs.wl_dim
    z = inputs.redshift if inputs.redshift is not None else xr.zeros_like(inputs.flux.isel({wl_dim: 0}, drop=True), dtype=np.float64)
    args = [inputs.flux, inputs.ivar, z, init_da]
    core_in = [[wl_dim], [wl_dim], [], ["param"]]
    if inputs.wavelength_2d is not None:
        args.append(inputs.wavelength_2d)
        core_in.append([wl_dim])
    specs = _output_specs(options)
    outputs = xr.apply_ufunc(
        _block,
        *args,
        input_core_dims=core_in,
        output_core_dims=[list(dims) for _, dims, _ in specs],
        dask="parallelized",
        output_dtypes=[np.dtype(dt) for _, _, dt in specs],
        dask_gufunc_kwargs={"output_sizes": {"param": model.n_params, **({"step": int(options.num_steps)} if options.return_history else {})}},
        kwargs=dict(
            model=model,
            wavelength=inputs.wavelength_values,
            options=options,
            pad_to=inputs.chunks,
            has_redshift=inputs.redshift is not None,
            has_wl2d=inputs.wavelength_2d is not None,
            penalty_function=penalty_function,
        ),
        keep_attrs=False,
    )
    result = xr.Dataset({name: out.drop_vars([c for c in out.coords if c not in (dim, "param")], errors="ignore") for (name, _, _), out in zip(specs, outputs)})
    return _decorate(result, inputs, model, attrs)


def _decorate(result: xr.Dataset, inputs: _Inputs, model, attrs) -> xr.Dataset:
    """Coordinates, variable attrs and Dataset attrs of the result."""
    params = model.params
    result = result.assign_coords(
        param=("param", list(params.names)),
        param_min=("param", np.asarray(params.lower, dtype=np.float64)),
        param_max=("param", np.asarray(params.upper, dtype=np.float64)),
    )
    flux_unit = inputs.flux_units or "input flux unit"
    templates = model.metadata.get("param_units", {}) if isinstance(model.metadata, Mapping) else {}
    units = [
        templates.get(name, "{flux} (scales with the flux)" if name in model.flux_params else "").replace("{flux}", flux_unit)
        for name in params.names
    ]
    result = result.assign_coords(param_units=("param", np.asarray(units, dtype=str)))
    result = result.assign_coords({name: var for name, var in inputs.coords.items()})
    result["status"].attrs.update(status_attrs())
    result["quality"].attrs.update(quality_attrs())
    for name, (text, unit) in _DESCRIPTIONS.items():
        if name in result:
            result[name].attrs["long_name"] = text
            if unit is not None:
                result[name].attrs["units"] = unit.replace("{flux}", flux_unit)
    for name in ("params", "params_err"):
        result[name].attrs["units"] = "see the param_units coordinate (one unit per parameter)"
    result.attrs.update(attrs)
    return result


# variable -> (long_name, CF units or None)
_DESCRIPTIONS = {
    "params": ("best-fit physical parameters (ties and fixed values filled in)", None),
    "params_err": ("1-sigma errors from the covariance at the optimum; NaN where undefined", None),
    "loss": ("final value of the objective that was minimized (the same for restarts and the fallback)", "1"),
    "chi2": ("plain weighted chi-square of the final model over the pixels fitted", "1"),
    "dof": ("degrees of freedom: pixels fitted minus free parameters", "1"),
    "redchi2": ("reduced chi-square chi2/dof", "1"),
    "method": ("optimizer that produced the final parameters", None),
    "n_iter": ("iterations (batched solve) or function evaluations (fallback) used", "1"),
    "at_bound": ("the parameter ended within restart_pinned_tolerance of a bound", None),
    "n_masked": ("pixels masked as absorbers (narrow troughs far below the model)", "1"),
    "flux_scale": ("the spectrum's flux unit inside the fit (median of max(|flux|, error)); parameters are reported in the input's unit", "{flux}"),
    "loss_history": ("loss per step of the batched solve, padded after convergence", "1"),
}


def _result_attrs(model, options: ChunkOptions, source, inputs: _Inputs) -> dict:
    model_dict = model.to_dict()
    attrs = {
        "title": f"sheap_dask fits of model {model.name!r}",
        "model_description": model.description,
        "sheap_model": json.dumps(model_dict, sort_keys=True, default=str),
        "sheap_model_fingerprint": model.fingerprint(),
        "sheap_model_identity": model.identity(),
        "sheap_options": options.to_json(),
        "sheap_version": __version__,
        "sheap_frame": "rest" if inputs.redshift is not None else "input",
    }
    region = model.metadata.get("region_spec")
    if region is not None:
        attrs["sheap_region"] = json.dumps(region, sort_keys=True, default=str)
    if source is not None:
        attrs["sheap_input"] = source
    identity = {
        "model": model.identity(),
        "options": options.to_dict(),
        "n_spectra": inputs.n_spectra,
        "chunk": inputs.chunks,
    }
    attrs["sheap_fit_fingerprint"] = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return attrs


# --------------------------------------------------------------------------------------
# Scheduling: client, compute, progress
# --------------------------------------------------------------------------------------
_LOCAL_SCHEDULERS = {"sync", "synchronous", "single-threaded", "threads", "threading", "processes", "multiprocessing"}


def _resolve_client(client):
    """(client, cluster started here or None); client None means dask's local scheduler."""
    if client is not None:
        return client, None
    if dask.config.get("scheduler", None) in _LOCAL_SCHEDULERS:
        return None, None
    from distributed import Client, default_client

    try:
        return default_client(), None
    except ValueError:
        pass
    n_workers = config.get("cluster.n_workers") or config._cpu_share()
    threads = int(config.get("cluster.threads_per_worker") or 1)
    cluster = start_local_cluster(int(n_workers), threads)
    logger.info("started a LocalCluster with %d workers: %s", n_workers, cluster.dashboard_link)
    return Client(cluster), cluster


def _worker_problems(workers: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Why the workers of ``client.scheduler_info()["workers"]`` may stall a fit (empty if fine).

    A worker whose memory limit is below ``sheap_dask.worker.min_memory`` pauses once JAX has
    compiled a model (Dask pauses at 80% of the limit by default), and a paused worker runs
    nothing: without this warning the fit just waits.
    """
    from dask.utils import format_bytes, parse_bytes

    minimum = parse_bytes(config.get("worker.min_memory") or 0)
    small = {w.get("name", addr): w["memory_limit"] for addr, w in workers.items() if 0 < (w.get("memory_limit") or 0) < minimum}
    paused = sorted(str(w.get("name", addr)) for addr, w in workers.items() if w.get("status") == "paused")
    problems = []
    if small:
        limits = ", ".join(f"{name}: {format_bytes(limit)}" for name, limit in sorted(small.items(), key=str))
        problems.append(
            f"{len(small)} of {len(workers)} workers have a memory limit below {format_bytes(minimum)} ({limits}); "
            "a JAX worker holds ~0.75 GiB once a model is compiled and Dask pauses it at 80% of its limit, "
            "which stalls the fit. Give each worker at least 2 GiB (`dask worker --memory-limit 2GiB`, "
            "LocalCluster(memory_limit=...), worker.resources.limits.memory in the Helm chart, or fewer "
            "workers in the cluster fit_dataset starts: sheap_dask.cluster.n_workers), "
            "or lower sheap_dask.worker.min_memory to silence this warning."
        )
    if paused:
        problems.append(
            f"workers {', '.join(paused)} are paused (memory above distributed.worker.memory.pause of their "
            "limit): they run no task until their memory drops. Restart them or give them more memory."
        )
    return problems


def start_local_cluster(n_workers: int, threads_per_worker: int = 1, **kwargs):
    """A ``LocalCluster`` set up for JAX workers.

    Spawned worker processes (JAX deadlocks in forked ones), XLA's and BLAS's thread pools
    sized to each worker's threads, glibc malloc settings that keep XLA's buffers cheap
    (``distributed_nanny.yaml``), a free dashboard port.
    """
    from distributed import LocalCluster

    options = dict(
        processes=True,
        dashboard_address=config.get("cluster.dashboard_address"),
        memory_limit=config.get("cluster.memory_limit"),
        env=_worker_env(threads_per_worker),
        silence_logs=logging.WARNING,
    )
    options.update(kwargs)
    environ = {**dask.config.get("distributed.nanny.pre-spawn-environ", {}), **_NANNY_ENVIRON}
    with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
        return LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker, **options)


with open(Path(__file__).with_name("distributed_nanny.yaml")) as _f:
    _NANNY_ENVIRON = {k: str(v) for k, v in yaml.safe_load(_f)["distributed"]["nanny"]["pre-spawn-environ"].items()}


def _worker_env(threads: int) -> dict:
    n = config.get("worker.xla_threads") or threads
    return {
        "XLA_FLAGS": f"--xla_cpu_multi_thread_eigen={'true' if n > 1 else 'false'} intra_op_parallelism_threads={n}",
        "OMP_NUM_THREADS": str(n),
        "OPENBLAS_NUM_THREADS": str(n),
        "MKL_NUM_THREADS": str(n),
    }


def _progress_bar(total: int, enabled: bool, desc: str, unit: str = "chunk"):
    if not enabled:
        return contextlib.nullcontext(None)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit)


def _compute(result: xr.Dataset, client, progress: bool) -> xr.Dataset:
    if client is None:
        if progress:
            from dask.diagnostics import ProgressBar

            with ProgressBar():
                return result.compute()
        return result.compute()
    from distributed import as_completed, futures_of

    persisted = client.persist(result)
    futures = futures_of(persisted)
    with _progress_bar(len(futures), progress, "fitting", unit="task") as bar:
        for _ in as_completed(futures):
            if bar is not None:
                bar.update(1)
    return persisted.compute()


# --------------------------------------------------------------------------------------
# Streaming into a zarr store, with resume
# --------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_zarr():
    """Silence zarr 3's notes on fixed-width string arrays (``method``, ``param``): xarray
    reads them back unchanged; the note is about other zarr implementations."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have a Zarr V3 specification.*")
        warnings.filterwarnings("ignore", message=".*Consolidated metadata is currently not part.*")
        yield


def _fit_and_write(flux, ivar, z, init, wl2d, *, index, start, stop, store, dim, specs, model, wavelength, options, pad_to, has_redshift, penalty_function, storage_options):
    """Worker task: fit one chunk, write it into its region of the store, mark it done."""
    import zarr

    out = fit_chunk(
        model,
        wl2d if wl2d is not None else wavelength,
        flux,
        ivar,
        redshift=z if has_redshift else None,
        init=init,
        options=options,
        pad_to=pad_to,
        penalty_function=penalty_function,
    )
    block = xr.Dataset({name: ((dim, *dims), out[name]) for name, dims, _ in specs})
    with _quiet_zarr():
        block.to_zarr(store, region={dim: slice(start, stop)}, storage_options=storage_options)
    # Marked done only after the region is written: a task killed in between is redone.
    done = zarr.open_array(store, path=f"{PROGRESS_GROUP}/done", mode="r+", storage_options=storage_options)
    done[index] = 1
    counts = np.bincount(out["status"].astype(np.int64), minlength=len(Status))
    return index, counts


def _fit_to_store(inputs: _Inputs, init_da, model, options, attrs, store, resume, client, progress, penalty_function, storage_options) -> xr.Dataset:
    storage_options = dict(storage_options) if storage_options else None
    template = _build_lazy(inputs, init_da, model, options, attrs, penalty_function)
    n_chunks = len(inputs.flux.chunks[0])
    done = _prepare_store(template, store, resume, n_chunks, storage_options)
    todo = [i for i in range(n_chunks) if not done[i]]
    logger.info("store %s: %d of %d chunks to fit", store, len(todo), n_chunks)
    specs = _output_specs(options)
    bounds = np.concatenate([[0], np.cumsum(inputs.flux.chunks[0])])
    z = inputs.redshift.data if inputs.redshift is not None else None
    wl2d = inputs.wavelength_2d.data if inputs.wavelength_2d is not None else None
    # One graph key for the model and the shared grid, referenced by every chunk's task,
    # rather than a copy pickled into each of thousands of tasks.
    shared_model = dask.delayed(model, pure=True, traverse=False)
    shared_wavelength = dask.delayed(inputs.wavelength_values, pure=True, traverse=False)
    tasks = []
    for i in todo:
        tasks.append(
            dask.delayed(_fit_and_write, pure=False)(
                inputs.flux.data.blocks[i],
                inputs.ivar.data.blocks[i],
                z.blocks[i] if z is not None else None,
                init_da.data.blocks[i],
                wl2d.blocks[i] if wl2d is not None else None,
                index=i,
                start=int(bounds[i]),
                stop=int(bounds[i + 1]),
                store=store,
                dim=inputs.dim,
                specs=specs,
                model=shared_model,
                wavelength=shared_wavelength,
                options=options,
                pad_to=inputs.chunks,
                has_redshift=inputs.redshift is not None,
                penalty_function=penalty_function,
                storage_options=storage_options,
            )
        )
    if tasks:
        with _progress_bar(len(tasks), progress, "fitting") as bar:
            if client is None:
                for task in tasks:  # local scheduler: one chunk at a time keeps memory flat
                    task.compute()
                    if bar is not None:
                        bar.update(1)
            else:
                from distributed import as_completed

                for fut in as_completed(client.compute(tasks)):
                    fut.result()  # re-raise a task's error here
                    if bar is not None:
                        bar.update(1)
    result = xr.open_zarr(store, storage_options=storage_options)
    result.attrs["sheap_chunks_fitted"] = len(todo)
    return result


def _prepare_store(template: xr.Dataset, store: str, resume: bool, n_chunks: int, storage_options) -> np.ndarray:
    """Create the store's metadata (or check it on resume); return the per-chunk done flags."""
    import zarr

    existing = None
    try:
        existing = xr.open_zarr(store, storage_options=storage_options)
    except (FileNotFoundError, KeyError, ValueError):
        existing = None
    if existing is not None and resume:
        _check_resume(existing, template, store)
        try:
            done = zarr.open_array(store, path=f"{PROGRESS_GROUP}/done", mode="r", storage_options=storage_options)
            flags = np.asarray(done[:], dtype=bool)
            if flags.size == n_chunks:
                return flags
        except (FileNotFoundError, KeyError, ValueError):
            pass
        raise ResumeMismatchError(
            f"store {store!r} holds fits but no matching progress record; pass resume=False to overwrite it."
        )
    # Coordinates are small: write them now (compute=False would leave lazy ones empty).
    template = template.assign_coords({name: coord.compute() for name, coord in template.coords.items()})
    with _quiet_zarr():
        template.to_zarr(store, mode="w", compute=False, storage_options=storage_options)
    zarr.create_array(
        store,
        name=f"{PROGRESS_GROUP}/done",
        shape=(n_chunks,),
        chunks=(1,),  # one object per chunk: workers mark chunks done concurrently
        dtype="int8",
        fill_value=0,
        overwrite=True,
        storage_options=storage_options,
    )
    return np.zeros(n_chunks, dtype=bool)


def _check_resume(existing: xr.Dataset, template: xr.Dataset, store: str) -> None:
    """Refuse to resume into a store written by a different model, options or input."""
    old, new = existing.attrs, template.attrs
    if old.get("sheap_fit_fingerprint") == new.get("sheap_fit_fingerprint"):
        return
    differences = []
    if old.get("sheap_model_fingerprint") != new.get("sheap_model_fingerprint"):
        differences.append(
            f"model identity: store has {_model_name(old)!r} {old.get('sheap_model_fingerprint')}, this fit uses "
            f"{_model_name(new)!r} {new.get('sheap_model_fingerprint')} (its parameters, code, constants or templates differ)"
        )
    old_opts = json.loads(old.get("sheap_options", "{}"))
    new_opts = json.loads(new.get("sheap_options", "{}"))
    for key in sorted(set(old_opts) | set(new_opts)):
        if old_opts.get(key) != new_opts.get(key):
            differences.append(f"option {key}: store has {old_opts.get(key)!r}, this fit uses {new_opts.get(key)!r}")
    if not differences:
        differences.append(
            f"input: store has {existing.sizes.get(next(iter(existing.params.dims)), '?')} spectra in chunks of "
            f"{existing.params.encoding.get('chunks', ['?'])[0]}; this fit's input or chunking differs"
        )
    raise ResumeMismatchError(
        f"cannot resume into store {store!r}: it was written by a different fit.\n  - "
        + "\n  - ".join(differences)
        + "\nUse the same model and options, a new store path, or resume=False to overwrite."
    )


def _model_name(attrs: Mapping[str, Any]) -> str:
    try:
        return json.loads(attrs.get("sheap_model", "{}")).get("name", "?")
    except json.JSONDecodeError:
        return "?"
