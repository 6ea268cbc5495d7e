"""The Dataset layer: validate a Dataset of spectra, map the chunk layer over its chunks.

``fit_dataset`` turns an ``xarray.Dataset`` (in memory, dask-backed from ``xr.open_zarr``,
or a path/URL to a zarr store) into the result Dataset of ``DESIGN.md``: one
``xr.apply_ufunc(..., dask="parallelized")`` call with every dimension and dtype stated, or,
with ``store=``, one task per chunk that fits its spectra and writes them into their region
of the output store, recording the chunk as done so an interrupted run resumes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import warnings
from collections.abc import Mapping

import numpy as np
import xarray as xr

from . import config
from ._version import __version__
from .chunk import ChunkOptions, fit_chunk, model_lines, result_sizes, result_variables
from .cluster import compute, resolve_client, worker_problems
from .errors import ClusterWarning, InputDataError, NoDataWarning, OptionError
from .inputs import Inputs, no_data_cause, open_store, prepare_init, prepare_inputs
from .options import check_penalty
from .quality import quality_attrs
from .status import Status, status_attrs
from .store import fit_to_store

logger = logging.getLogger("sheap_dask.fit")

__all__ = ["fit_dataset"]


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
    force: bool = False,
    client=None,
    progress: bool | None = None,
    return_history: bool | None = None,
    n_mc: int | None = None,
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
        ``tol``, ``maxiter``, ``redchi2_sigma``, ``outliers`` (also re-fit converged chi-square
        outliers; default False), ``pinned_fraction`` (see ``sheap_dask.yaml``).
    init : DataArray or mapping, optional
        Initial values: a (``dim``, param) DataArray, or a mapping name -> scalar or
        (``dim``,) DataArray, like ``curvefit``'s ``p0``. Unspecified values come from the
        model's data-driven initializer.
    store : str or path, optional
        Stream results into this zarr store chunk by chunk and return it opened lazily.
        A path that exists must be empty or a fit store: anything else (a file, a directory
        or zarr store sheap_dask did not write, the input or a path containing it) is
        refused and left untouched. One process writes a store at a time (a lock file with
        a heartbeat, ``<store>/sheap_lock.json``); a second one is refused with the holder's
        pid and host. See the README's section "Stores and resume".
    resume : bool
        With ``store``: fit only the chunks not yet recorded as done, after checking the
        model, the options and the input against the store's (a difference is refused, named
        one line each) and every done chunk against the checksum recorded with its marker (a
        chunk that fails is refitted, with a ``ResumeWarning``). ``False`` replaces an
        existing fit store.
    force : bool
        With ``store``: break a stale lock (one whose heartbeat stopped
        ``sheap_dask.store.lock_stale_after`` seconds ago: its writer was killed).
    client : distributed.Client, optional
        Cluster to use; default the current client, else a ``LocalCluster`` started (one
        single-threaded worker per core) and closed here. With ``dask.config.set(scheduler=
        "synchronous")`` and no client, the synchronous scheduler is used.
    progress : bool, optional
        Show a progress bar while computing.
    return_history : bool
        Add ``loss_history`` (spectrum, step).
    n_mc : int, optional
        Resampling Monte Carlo: refit every spectrum ``n_mc`` times with Gaussian noise drawn
        from its ivar added (batched, from the best fit), giving ``params_mc`` (spectrum,
        draw, param); derived-quantity errors then come from these realizations (PyQSOFit
        and the DR16Q catalogue use 25). Default ``sheap_dask.fit.n_mc`` (0: errors from the
        covariance).
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
    NoDataWarning
        Every spectrum has status ``no_data``: the message compares the observed and
        rest-frame wavelength ranges with the model's window and names the likely cause
        (wavelengths not in Angstrom, a redshift that puts the window off the spectra, ...).
    ResumeWarning
        A chunk marked done in ``store`` failed its check and is refitted.
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
        ds = open_store(source, storage_options)
    if not isinstance(ds, xr.Dataset):
        raise InputDataError(
            f"ds must be an xarray.Dataset or the path/URL of a zarr store, got {type(ds).__name__}; "
            "e.g. fit_dataset(xr.open_zarr('spectra.zarr'), model)."
        )
    _check_model(model)
    config.warn_unknown_keys()
    fallback_options = dict(fallback_options or {})
    unknown = set(fallback_options) - {"tol", "maxiter", "redchi2_sigma", "outliers", "pinned_fraction"}
    if unknown:
        raise OptionError(
            f"fallback_options has unknown keys {sorted(unknown)}; allowed: tol, maxiter, redchi2_sigma, outliers, pinned_fraction."
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
        fallback_outliers=fallback_options.get("outliers"),
        pinned_fraction=fallback_options.get("pinned_fraction"),
        return_history=return_history,
        n_mc=n_mc,
        dtype=dtype,
    ).resolved()
    check_penalty(options, penalty_function, penalty_weight)
    resume = config.resolve(resume, "fit.resume")
    progress = config.resolve(progress, "fit.progress")
    if progress is None:
        progress = sys.stderr.isatty()

    inputs = prepare_inputs(ds, model, flux=flux, ivar=ivar, flux_err=flux_err, wavelength=wavelength, dim=dim, redshift=redshift, chunk_size=chunk_size)
    init_da = prepare_init(init, model, inputs)
    attrs = _result_attrs(model, options, source, inputs)

    if store is not None:  # refusals (foreign data, the input, another writer) before a cluster starts
        from .stores import preflight

        preflight(store, "fit", [source or ds.encoding.get("source")], storage_options=storage_options, force=force)
    client, own_cluster = resolve_client(client)
    if client is not None:
        for message in worker_problems(client.scheduler_info().get("workers", {})):
            warnings.warn(message, ClusterWarning, stacklevel=2)
    try:
        if store is not None:
            template = _build_lazy(inputs, init_da, model, options, attrs, penalty_function)
            names = {"flux": flux, "ivar": None if flux_err is not None else ivar, "flux_err": flux_err, "wavelength": wavelength, "dim": dim,
                     "redshift": redshift if inputs.redshift is not None else None}
            result = fit_to_store(inputs, init_da, template, _output_specs(options, model), model, options, store, resume, client, progress,
                                  penalty_function, storage_options, force=force, source=source, names=names)
        else:
            result = _build_lazy(inputs, init_da, model, options, attrs, penalty_function)
            if own_cluster is not None or client is None:
                # No cluster outlives this call: compute now, keep the input's chunking.
                result = compute(result, client, progress).chunk({dim: inputs.chunks})
    finally:
        if own_cluster is not None:
            client.close()
            own_cluster.close()
    if store is not None or own_cluster is not None or client is None:  # computed: the statuses are known
        status = np.asarray(result["status"].values)
        if status.size and np.all(status == Status.NO_DATA):
            warnings.warn(no_data_cause(inputs, model), NoDataWarning, stacklevel=2)
    return result


def _check_model(model) -> None:
    from .model import Model

    if not isinstance(model, Model):
        raise InputDataError(
            f"model must be a sheap_dask.Model, got {type(model).__name__}; use sd.models.region('hbeta') "
            "or sd.Model(func, params)."
        )



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
    return tuple(out[name] for name in result_variables(options, model))


def _output_specs(options: ChunkOptions, model) -> list[tuple[str, tuple[str, ...], str]]:
    return [(name, dims, dtype) for name, (dims, dtype) in result_variables(options, model).items()]


def _build_lazy(inputs: Inputs, init_da, model, options, attrs, penalty_function) -> xr.Dataset:
    dim, wl_dim = inputs.dim, inputs.wl_dim
    z = inputs.redshift if inputs.redshift is not None else xr.zeros_like(inputs.flux.isel({wl_dim: 0}, drop=True), dtype=np.float64)
    args = [inputs.flux, inputs.ivar, z, init_da]
    core_in = [[wl_dim], [wl_dim], [], ["param"]]
    if inputs.wavelength_2d is not None:
        args.append(inputs.wavelength_2d)
        core_in.append([wl_dim])
    specs = _output_specs(options, model)
    outputs = xr.apply_ufunc(
        _block,
        *args,
        input_core_dims=core_in,
        output_core_dims=[list(dims) for _, dims, _ in specs],
        dask="parallelized",
        output_dtypes=[np.dtype(dt) for _, _, dt in specs],
        dask_gufunc_kwargs={"output_sizes": result_sizes(options, model)},
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


def _decorate(result: xr.Dataset, inputs: Inputs, model, attrs) -> xr.Dataset:
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
    result = result.assign_coords(param_units=("param", np.asarray(units, dtype=str)), param2=("param2", list(params.names)))
    if "line" in result.dims:
        result = result.assign_coords(line=("line", list(model_lines(model))))
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
    "params_cov": ("covariance of the parameters (param x param2) in the input's units; NaN where undefined", None),
    "line_flux": ("flux of each line: the sum of its components' fluxes", "{flux} Angstrom"),
    "line_flux_err": ("1-sigma error of line_flux from the parameter covariance", "{flux} Angstrom"),
    "line_detected": ("the line's flux / error reaches sheap_dask.lines.detection_sigma", None),
    "flux_scale": ("the spectrum's flux unit inside the fit (median of max(|flux|, error)); parameters are reported in the input's unit", "{flux}"),
    "loss_history": ("loss per step of the batched solve, padded after convergence", "1"),
    "params_mc": ("parameters of the resampling realizations (refits with noise from ivar added); NaN where one did not converge", None),
}


def _result_attrs(model, options: ChunkOptions, source, inputs: Inputs) -> dict:
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
