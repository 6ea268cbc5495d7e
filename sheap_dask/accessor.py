"""``ds.sheap``: explore a fit result — model curves, residuals, plots and derived physics.

Importing :mod:`sheap_dask` registers the accessor on every ``xarray.Dataset`` (the package
imports this module lazily; ``import sheap_dask.accessor`` or any ``sd.fit_dataset`` call
does it). A fit result (see "The result Dataset" in DESIGN.md) knows its model by fingerprint
and, optionally, where its input spectra live::

    fits = sd.fit_dataset(ds, model)
    fits.sheap.use(spectra=ds)                 # link the input spectra (or a zarr path in attrs)
    fits.sheap.plot(spectrum=0)                # data, model, components, residuals
    fits.sheap.fwhm("hbeta_broad")             # DataArray along spectrum, km/s
    fits.sheap.fwhm("hbeta_broad", errors=True)  # Dataset: fwhm_hbeta_broad, fwhm_hbeta_broad_err
    fits.sheap.bh_mass("vp06_hbeta")           # log10 M_BH / M_sun

Finding the model: ``use(model=...)``, else the registry of models by fingerprint
(any live model of this process with the identity stored in the attrs), else the built-in region named in
``attrs["sheap_region"]`` is rebuilt. Finding the spectra: a ``spectra=`` argument, else
``use(spectra=...)``, else ``xr.open_zarr(attrs["sheap_input"])``.

Every method returns results along the ``spectrum`` dimension, computed chunk by chunk with
``xr.apply_ufunc(..., dask="parallelized")``: on a dask-backed result nothing is computed until
you ask (``.compute()``, ``.values``, ``.to_zarr``). Derived quantities return a DataArray
named ``<quantity>_<line>`` with ``units``; ``errors=True`` returns a Dataset holding it and
its Monte Carlo error ``<name>_err`` (see :mod:`sheap_dask.models.derived` for the methods).
The accessor keeps what ``use`` links only for this Dataset object: a new object (``isel``,
``sel``, ...) must be linked again, except that :meth:`SheapAccessor.failed` carries it over.
"""

from __future__ import annotations

import collections
import json
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import xarray as xr

from .errors import InputDataError, MissingDependencyError, ModelError, OptionError
from .identity import LRUCache
from .model import find_model
from .status import Status

__all__ = ["SheapAccessor", "register_model", "registered_model"]

#: Strong references to registered models: a model alive in the process is found by
#: identity (``sheap_dask.model.find_model``); registering keeps it alive (bounded).
_REGISTERED: collections.deque = collections.deque(maxlen=64)


def register_model(model):
    """Keep ``model`` alive so fit results made with it find it by identity; returns it.

    Any :class:`~sheap_dask.Model` alive in this process is found by the identity stored in a
    result's attrs, so in the session that ran a fit ``fits.sheap`` works without
    ``use(model=...)``. In a new session, rebuild your model (same code, same arguments: same
    identity) and it is found again; built-in regions are rebuilt from the result's attrs.
    """
    if not hasattr(model, "identity") or not hasattr(model, "components"):
        raise ModelError(f"register_model expects a sheap_dask.Model, got {type(model).__name__}.")
    if model not in _REGISTERED:
        _REGISTERED.append(model)
    return model


def registered_model(fingerprint: str):
    """The live model with this fingerprint (or full identity), or ``None``."""
    return find_model(fingerprint)


def _dask_aware_chunks(da: xr.DataArray, dim: str):
    return da.chunksizes.get(dim) if da.chunks else None


@xr.register_dataset_accessor("sheap")
class SheapAccessor:
    """Exploration methods on a sheap_dask fit result (``fits.sheap``)."""

    def __init__(self, ds: xr.Dataset) -> None:
        self._ds = ds
        self._model = None
        self._spectra = None
        self._flux_unit = None

    # ------------------------------------------------------------------------------------
    # linking the model and the spectra
    # ------------------------------------------------------------------------------------
    def use(self, *, model=None, spectra: xr.Dataset | None = None, flux_unit: float | str | None = None) -> SheapAccessor:
        """Link the model and/or the input spectra of this result; returns the accessor.

        Parameters
        ----------
        model : sheap_dask.Model, optional
            The model that was fitted; its parameter names must equal the result's ``param``.
        spectra : xarray.Dataset, optional
            The input spectra (``flux``, ``ivar`` or ``flux_err``, ``wavelength``), with the
            same spectra in the same order (or a superset, matched by the spectrum coordinate).
        flux_unit : float or str, optional
            Flux-density unit of the input in erg/s/cm²/Å (e.g. ``1e-17``) or a unit string;
            default: the input's ``flux.attrs["units"]``, else 1e-17 (SDSS).
        """
        if model is not None:
            self._check_model(model)
            self._model = model
        if spectra is not None:
            self._spectra = self._match_spectra(spectra)
        if flux_unit is not None:
            self._flux_unit = _flux_unit_value(flux_unit)
        return self

    @property
    def _dim(self) -> str:
        if "params" not in self._ds:
            raise InputDataError(
                "this Dataset is not a sheap_dask fit result: it has no 'params' variable "
                f"(variables: {sorted(map(str, self._ds.data_vars))})."
            )
        return self._ds["params"].dims[0]

    @property
    def _param_names(self) -> list[str]:
        return [str(p) for p in self._ds["param"].values]

    def _check_model(self, model) -> None:
        if not hasattr(model, "param_names") or not hasattr(model, "components"):
            raise ModelError(f"use(model=...) expects a sheap_dask.Model, got {type(model).__name__}.")
        names = self._param_names
        if list(model.param_names) != names:
            raise ModelError(
                f"model {model.name!r} has parameters {model.param_names} but this result has {names}; "
                "pass the model that produced the fit."
            )
        fp = self._ds.attrs.get("sheap_model_fingerprint")
        if fp is not None and model.fingerprint() != fp:
            warnings.warn(
                f"model {model.name!r} has fingerprint {model.fingerprint()} but the result was fitted with "
                f"{fp}; the parameter names match, so it is used, but check that its functions are the same.",
                UserWarning,
                stacklevel=3,
            )

    def get_model(self):
        """The fitted :class:`~sheap_dask.Model` (``use``, the registry, or the region in attrs).

        Raises
        ------
        ModelError
            The model cannot be found; the message says how to link it.
        """
        if self._model is not None:
            return self._model
        names = self._param_names
        fp = self._ds.attrs.get("sheap_model_identity") or self._ds.attrs.get("sheap_model_fingerprint")
        model = find_model(fp, names) if fp else None
        if model is not None and list(model.param_names) == names:
            self._model = model
            return model
        region = self._ds.attrs.get("sheap_region")
        if region:
            spec = json.loads(region) if isinstance(region, str) else dict(region)
            from . import models as _models

            model = _models.region(spec["name"], **(spec.get("kwargs") or {}))
            if list(model.param_names) != names:
                raise ModelError(
                    f"rebuilt region {spec['name']!r} has parameters {model.param_names}, not the result's {names}; "
                    "pass the fitted model with fits.sheap.use(model=...)."
                )
            self._model = register_model(model)
            return model
        model = _rebuild_region_by_fingerprint(self._ds.attrs.get("sheap_model"), fp)
        if model is not None and list(model.param_names) == names:
            self._model = register_model(model)
            return model
        try:
            name = json.loads(self._ds.attrs.get("sheap_model", "{}")).get("name", "?")
        except (TypeError, ValueError):
            name = "?"
        raise ModelError(
            f"cannot find the model of this fit result (model {name!r}, fingerprint {fp}): it is not "
            "registered in this session and the result names no built-in region. Link it with "
            "fits.sheap.use(model=your_model, spectra=input_dataset) or sd.accessor.register_model(your_model)."
        )

    def _match_spectra(self, spectra: xr.Dataset) -> xr.Dataset:
        if not isinstance(spectra, xr.Dataset):
            raise InputDataError(f"spectra must be an xarray.Dataset of the input spectra, got {type(spectra).__name__}.")
        dim = self._dim
        if "flux" not in spectra:
            raise InputDataError(
                f"spectra has no 'flux' variable (variables: {sorted(map(str, spectra.data_vars))}); pass the "
                "input Dataset that was fitted."
            )
        if dim not in spectra.dims:
            raise InputDataError(f"spectra has no {dim!r} dimension (dims: {dict(spectra.sizes)}).")
        n = self._ds.sizes[dim]
        if spectra.sizes[dim] != n:
            if dim in spectra.indexes and dim in self._ds.indexes:
                return spectra.sel({dim: self._ds[dim].values})
            raise InputDataError(
                f"spectra has {spectra.sizes[dim]} spectra but the result has {n}; pass the input that was "
                f"fitted (or give both a {dim!r} coordinate so they can be matched)."
            )
        return spectra

    def get_spectra(self, spectra: xr.Dataset | None = None) -> xr.Dataset:
        """The input spectra: ``spectra``, else ``use(spectra=...)``, else ``attrs["sheap_input"]``.

        Raises
        ------
        InputDataError
            No spectra are linked; the message says how to link them.
        """
        if spectra is not None:
            return self._match_spectra(spectra)
        if self._spectra is not None:
            return self._spectra
        source = self._ds.attrs.get("sheap_input")
        if source:
            try:
                opened = xr.open_zarr(source)
            except Exception as exc:  # noqa: BLE001 - any failure: say what was tried and how to fix
                raise InputDataError(
                    f"cannot open the input spectra at attrs['sheap_input'] = {source!r} ({exc}); pass "
                    "spectra=input_dataset or call fits.sheap.use(spectra=input_dataset)."
                ) from exc
            self._spectra = self._match_spectra(opened)
            return self._spectra
        raise InputDataError(
            "this fit result has no linked input spectra: pass spectra=input_dataset, or call "
            "fits.sheap.use(spectra=input_dataset) once (results written by fit_dataset from a zarr store "
            "record its path in attrs['sheap_input'])."
        )

    # ------------------------------------------------------------------------------------
    # per-spectrum helpers
    # ------------------------------------------------------------------------------------
    def _redshift(self, spectra: xr.Dataset | None = None) -> xr.DataArray | None:
        if "redshift" in self._ds.coords or "redshift" in self._ds.data_vars:
            return self._ds["redshift"].astype(np.float64)
        if spectra is not None and "redshift" in spectra.variables and spectra["redshift"].dims == (self._dim,):
            return spectra["redshift"].astype(np.float64)
        return None

    def _frame_redshift(self, spectra: xr.Dataset | None = None) -> xr.DataArray:
        """Redshift used to move between the input grid and the model's frame (0: no shift)."""
        z = None if self._ds.attrs.get("sheap_frame") == "input" else self._redshift(spectra)
        if z is None:
            return xr.zeros_like(self._ds["params"].isel(param=0, drop=True), dtype=np.float64)
        return z

    def _flux_unit_for(self, flux_unit, spectra=None) -> float:
        if flux_unit is not None:
            return _flux_unit_value(flux_unit)
        if self._flux_unit is not None:
            return self._flux_unit
        from .models import derived

        if spectra is None:
            try:
                spectra = self.get_spectra()
            except InputDataError:
                spectra = None
        units = spectra["flux"].attrs.get("units") if spectra is not None else None
        units = units or self._ds.attrs.get("flux_units")
        return derived.parse_flux_unit(units) if units else derived.DEFAULT_FLUX_UNIT

    def _params(self, errors: bool):
        """``params`` (and ``params_err``) with one chunk along ``param`` and equal spectrum chunks."""
        dim = self._dim
        params = self._ds["params"]
        err = None
        if errors:
            if "params_err" not in self._ds:
                raise InputDataError("errors=True needs the result's 'params_err' variable, which this Dataset lacks.")
            err = self._ds["params_err"]
        if params.chunks or (err is not None and err.chunks):
            chunks = (params if params.chunks else err).chunksizes[dim]
            params = params.chunk({dim: chunks, "param": -1})
            if err is not None:
                err = err.chunk({dim: chunks, "param": -1})
        return params, err

    def _draw_index(self) -> np.ndarray:
        """Per-spectrum keys of the Monte Carlo draws: the integer ``spectrum`` labels when the
        result has them (so a spectrum gets the same draws in any subset or chunking), else
        positions."""
        dim = self._dim
        if dim in self._ds.indexes:
            labels = np.asarray(self._ds.indexes[dim])
            if labels.dtype.kind in "iu":
                return (labels.astype(np.int64) % (2**32)).astype(np.uint32)
        return np.arange(self._ds.sizes[dim], dtype=np.uint32)

    def _spectrum_like(self, values: np.ndarray, like: xr.DataArray) -> xr.DataArray:
        """A per-spectrum DataArray chunked like ``like`` along the spectrum dim."""
        dim = self._dim
        da = xr.DataArray(values, dims=(dim,))
        if like.chunks:
            da = da.chunk({dim: like.chunksizes[dim]})
        return da

    def _derived(self, compute, names: list[str], attrs: list[dict], *, errors: bool, needs_z: bool = False, redshift=None):
        """Apply ``compute(params, params_err|None, index, z) -> (n, 2k)`` chunk-wise.

        Returns the k values as DataArrays (``errors=False``) or a Dataset of values and
        ``_err`` companions.
        """
        from .models import derived  # noqa: F401  (fail early on import problems)

        dim = self._dim
        params, err = self._params(errors)
        n = params.sizes[dim]
        index = self._spectrum_like(self._draw_index(), params)
        if needs_z:
            if redshift is not None:
                z = self._spectrum_like(np.broadcast_to(np.asarray(redshift, dtype=np.float64), (n,)).copy(), params)
            else:
                z = self._redshift()
                if z is None:
                    raise InputDataError(
                        "luminosities need redshifts: this result has no 'redshift' coordinate; pass redshift=... "
                        "(a number or one per spectrum)."
                    )
                if params.chunks:
                    z = z.chunk({dim: params.chunksizes[dim]})
        else:
            z = xr.zeros_like(index, dtype=np.float64)
        k = len(names)
        lower, upper = self._bounds()
        args = [params, index, z, lower, upper] + ([err] if err is not None else [])
        core = [["param"], [], [], ["param"], ["param"]] + ([["param"]] if err is not None else [])

        def block(p, idx, zz, lo, hi, *e):
            return compute(p, e[0] if e else None, idx, zz, np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64))

        out = xr.apply_ufunc(
            block,
            *args,
            input_core_dims=core,
            output_core_dims=[["_quantity"]],
            dask="parallelized",
            output_dtypes=[np.float64],
            dask_gufunc_kwargs={"output_sizes": {"_quantity": 2 * k}},
            keep_attrs=False,
        )
        result = {}
        for i, (name, a) in enumerate(zip(names, attrs)):
            result[name] = out.isel(_quantity=i, drop=True).rename(name).assign_attrs(a)
            if errors:
                result[name + "_err"] = (
                    out.isel(_quantity=k + i, drop=True)
                    .rename(name + "_err")
                    .assign_attrs({**a, "long_name": f"1-sigma error of {a.get('long_name', name)}", "error_method": _ERR_DOC})
                )
        if errors:
            return xr.Dataset(result)
        return [result[name] for name in names]

    def _check_line(self, line: str) -> dict:
        from .models import derived

        return derived.line_info(self.get_model(), line)

    # ------------------------------------------------------------------------------------
    # derived quantities of lines
    # ------------------------------------------------------------------------------------
    def measure(self, line: str, *, errors: bool = False, continuum: Sequence[str] | None = None, **options) -> xr.Dataset:
        """All profile measurements of a line in one pass: flux, FWHM, sigma, shifts[, EW].

        Parameters
        ----------
        line : str
            Line name (``model.metadata["lines"]``), e.g. ``"hbeta_broad"``.
        errors : bool
            Add ``<name>_err`` Monte Carlo errors (costs ``n_samples`` profile evaluations).
        continuum : list of str, optional
            Continuum components for the EW (default: the model's, without FeII).
        **options
            ``n_samples``, ``seed``, ``velocity_range``, ``n_grid``, ``batch_size``
            (see :func:`sheap_dask.models.derived.measure_line`).

        Returns
        -------
        xarray.Dataset
            ``flux_<line>``, ``fwhm_<line>``, ``sigma_<line>``, ``shift_<line>`` (peak),
            ``centroid_shift_<line>``, and ``ew_<line>`` when the model has a continuum.
        """
        from .models import derived

        model = self.get_model()
        derived.line_info(model, line)
        has_cont = continuum is not None or bool(derived_continuum_or_none(model))
        keys = ["flux", "fwhm", "sigma", "shift_peak", "shift_centroid"] + (["ew"] if has_cont else [])
        names = {
            "flux": f"flux_{line}", "fwhm": f"fwhm_{line}", "sigma": f"sigma_{line}",
            "shift_peak": f"shift_{line}", "shift_centroid": f"centroid_shift_{line}", "ew": f"ew_{line}",
        }  # fmt: skip
        attrs = [self._line_attrs(q, line) for q in keys]
        cont = continuum if has_cont else False

        def compute(p, e, idx, z, lower, upper):
            res = derived.measure_line(model, line, p, e, continuum=cont, index=idx, lower=lower, upper=upper, **options)
            return _stack([res[q] for q in keys])

        out = self._derived(compute, [names[q] for q in keys], attrs, errors=errors)
        return out if errors else xr.Dataset({da.name: da for da in out})

    def _bounds(self):
        """Parameter bounds as (param,) DataArrays (lazy when the result is): the model's when absent."""
        ds = self._ds
        model = self.get_model()
        out = []
        for name, default in (("param_min", model.params.lower), ("param_max", model.params.upper)):
            if name in ds.variables:
                da = ds[name].astype(np.float64)
                da = da.chunk({"param": -1}) if da.chunks else da
            else:
                da = xr.DataArray(np.asarray(default, dtype=np.float64), dims=("param",))
            out.append(da.drop_vars([c for c in da.coords]))
        return out[0], out[1]

    def _line_attrs(self, quantity: str, line: str) -> dict:
        try:
            flux_units = f"{self._flux_unit_for(None):g} erg/s/cm2"  # flux-density unit x Angstrom
        except InputDataError:
            flux_units = "input flux-density unit x Angstrom"
        table = {
            "flux": ("integrated flux of " + line, flux_units),
            "fwhm": ("FWHM of " + line, "km/s"),
            "sigma": ("line dispersion (second moment) of " + line, "km/s"),
            "shift_peak": ("velocity shift of the peak of " + line, "km/s"),
            "shift_centroid": ("velocity shift of the flux-weighted centroid of " + line, "km/s"),
            "shift_median": ("velocity shift of the flux-bisecting point of " + line, "km/s"),
            "ew": ("rest-frame equivalent width of " + line, "Angstrom"),
        }
        long_name, units = table[quantity]
        return {"long_name": long_name, "units": units, "line": line}

    def _line_quantity(self, quantity: str, line: str, errors: bool, options: dict, **extra):
        from .models import derived

        model = self.get_model()
        derived.line_info(model, line)
        name = {"shift_peak": "shift", "shift_centroid": "shift", "shift_median": "shift"}.get(quantity, quantity)
        attrs = self._line_attrs(quantity, line)

        def compute(p, e, idx, z, lower, upper):
            res = derived.measure_line(
                model, line, p, e, index=idx, lower=lower, upper=upper,
                continuum=extra.get("continuum"),
                median=quantity == "shift_median", **options,
            )  # fmt: skip
            return _stack([res[quantity]])

        out = self._derived(compute, [f"{name}_{line}"], [attrs], errors=errors)
        return out if errors else out[0]

    def fwhm(self, line: str, *, errors: bool = False, **options):
        """FWHM (km/s) of a line's summed model profile, per spectrum.

        Parameters
        ----------
        line : str
            Line name, e.g. ``"hbeta_broad"`` (a multi-Gaussian broad line is one name).
        errors : bool
            False: a DataArray ``fwhm_<line>``. True: a Dataset with it and ``fwhm_<line>_err``.
        **options
            ``n_samples``, ``seed``, ``velocity_range``, ``n_grid``, ``batch_size``.
        """
        return self._line_quantity("fwhm", line, errors, options)

    def sigma(self, line: str, *, errors: bool = False, **options):
        """Line dispersion (km/s; second moment, Peterson et al. 2004). As :meth:`fwhm`."""
        return self._line_quantity("sigma", line, errors, options)

    def flux(self, line: str, *, errors: bool = False, **options):
        """Integrated line flux (input flux-density unit × Å, i.e. observed flux). As :meth:`fwhm`."""
        return self._line_quantity("flux", line, errors, options)

    def ew(self, line: str, *, errors: bool = False, continuum: Sequence[str] | None = None, **options):
        """Rest-frame equivalent width (Å) against the continuum at the line's rest wavelength.

        ``continuum`` defaults to the model's continuum components without FeII. As :meth:`fwhm`.
        """
        from .models import derived

        derived.continuum_names(self.get_model(), continuum)
        return self._line_quantity("ew", line, errors, options, continuum=continuum)

    def shift(self, line: str, *, method: str = "peak", errors: bool = False, **options):
        """Velocity shift (km/s, positive = redshift) of a line relative to its rest wavelength.

        ``method``: ``"peak"`` (default), ``"centroid"`` or ``"median"``. As :meth:`fwhm`.
        """
        from .models import derived

        if method not in derived.SHIFT_METHODS:
            raise OptionError(f"shift(method={method!r}) is unknown; use one of {', '.join(derived.SHIFT_METHODS)}.")
        out = self._line_quantity(f"shift_{method}", line, errors, options)
        return out.assign_attrs(method=method) if not errors else out

    # ------------------------------------------------------------------------------------
    # luminosities and black-hole masses
    # ------------------------------------------------------------------------------------
    def _cosmo_attrs(self, H0, Om0, flux_unit) -> dict:
        return {"cosmology": f"flat LambdaCDM H0={H0:g} Om0={Om0:g}", "flux_unit": f"{flux_unit:g} erg/s/cm2/Angstrom"}

    def luminosity(
        self,
        wavelength: float,
        *,
        quantity: str = "lambda_l_lambda",
        log: bool = False,
        errors: bool = False,
        redshift=None,
        flux_unit: float | str | None = None,
        H0: float | None = None,
        Om0: float | None = None,
        continuum: Sequence[str] | None = None,
        **options,
    ):
        """Continuum luminosity at a rest wavelength: ``λL_λ`` (erg/s, default) or ``L_λ``.

        Parameters
        ----------
        wavelength : float
            Rest wavelength in Å (5100, 3000, 1350, ...).
        quantity : {"lambda_l_lambda", "l_lambda"}
            ``λL_λ`` in erg/s or ``L_λ`` in erg/s/Å.
        log : bool
            Return log10 of the luminosity (its error in dex).
        errors : bool
            Return a Dataset with the ``_err`` companion.
        redshift : float or array, optional
            Default: the result's ``redshift`` coordinate.
        flux_unit : float or str, optional
            Input flux unit (erg/s/cm²/Å); default from the input's ``flux.attrs["units"]``,
            else 1e-17.
        H0, Om0 : float, optional
            Flat ΛCDM cosmology (default 70, 0.3).
        continuum : list of str, optional
            Continuum components (default: the model's, without FeII).
        """
        from .models import derived

        H0, Om0 = derived.cosmology(H0, Om0)
        model = self.get_model()
        derived.continuum_names(model, continuum)
        unit = self._flux_unit_for(flux_unit)
        tag = f"{float(wavelength):g}"
        if quantity == "lambda_l_lambda":
            name, units, long_name = f"lambda_l_lambda_{tag}", "erg/s", f"continuum lambda L_lambda at {tag} Angstrom (rest)"
        elif quantity == "l_lambda":
            name, units, long_name = f"l_lambda_{tag}", "erg/s/Angstrom", f"continuum L_lambda at {tag} Angstrom (rest)"
        else:
            raise OptionError(f"quantity={quantity!r} must be 'lambda_l_lambda' (erg/s) or 'l_lambda' (erg/s/A).")
        if log:
            name, units = "log_" + name, f"log10({units})"
        attrs = {"long_name": long_name, "units": units, **self._cosmo_attrs(H0, Om0, unit)}

        def compute(p, e, idx, z, lower, upper):
            v, s = derived.luminosity(
                model, wavelength, p, e, redshift=z, flux_unit=unit, H0=H0, Om0=Om0, quantity=quantity,
                continuum=continuum, index=idx, lower=lower, upper=upper, **options,
            )  # fmt: skip
            return _stack([_maybe_log(v, s, log)])

        out = self._derived(compute, [name], [attrs], errors=errors, needs_z=True, redshift=redshift)
        return out if errors else out[0]

    def line_luminosity(
        self,
        line: str,
        *,
        log: bool = False,
        errors: bool = False,
        redshift=None,
        flux_unit: float | str | None = None,
        H0: float | None = None,
        Om0: float | None = None,
        **options,
    ):
        """Line luminosity ``4π d_L² × flux`` (erg/s) of a line's summed profile. As :meth:`luminosity`."""
        from .models import derived

        H0, Om0 = derived.cosmology(H0, Om0)
        model = self.get_model()
        derived.line_info(model, line)
        unit = self._flux_unit_for(flux_unit)
        name, units = f"luminosity_{line}", "erg/s"
        if log:
            name, units = "log_" + name, "log10(erg/s)"
        attrs = {"long_name": f"luminosity of {line}", "units": units, **self._cosmo_attrs(H0, Om0, unit)}

        def compute(p, e, idx, z, lower, upper):
            v, s = derived.line_luminosity(
                model, line, p, e, redshift=z, flux_unit=unit, H0=H0, Om0=Om0, index=idx, lower=lower, upper=upper, **options
            )
            return _stack([_maybe_log(v, s, log)])

        out = self._derived(compute, [name], [attrs], errors=errors, needs_z=True, redshift=redshift)
        return out if errors else out[0]

    def bh_mass(
        self,
        recipe: str,
        *,
        errors: bool = False,
        redshift=None,
        flux_unit: float | str | None = None,
        H0: float | None = None,
        Om0: float | None = None,
        continuum: Sequence[str] | None = None,
        **options,
    ):
        """Single-epoch virial black-hole mass ``log10(M_BH / M_sun)`` per spectrum.

        ``recipe``: ``"vp06_hbeta"``, ``"vp06_hbeta_line"``, ``"vp06_civ"``, ``"vo09_mgii"``,
        ``"shen11_mgii"`` or ``"gh05_halpha"`` (formulae and references in
        :func:`sheap_dask.models.derived.bh_mass`). Errors (``errors=True``) are measurement
        errors only, without the recipe's intrinsic scatter (in the ``scatter_dex`` attr).
        Other arguments as :meth:`luminosity`.
        """
        from .models import derived

        if recipe not in derived.RECIPES:
            raise OptionError(f"unknown black-hole mass recipe {recipe!r}; use one of {', '.join(derived.RECIPES)}.")
        r = derived.RECIPES[recipe]
        H0, Om0 = derived.cosmology(H0, Om0)
        model = self.get_model()
        derived.line_info(model, r.line)
        if r.luminosity == "continuum":
            derived.continuum_names(model, continuum)
        unit = self._flux_unit_for(flux_unit)
        attrs = {
            "long_name": f"single-epoch black-hole mass ({recipe})",
            "units": "log10(M/M_sun)",
            "reference": r.reference,
            "scatter_dex": r.scatter_dex if r.scatter_dex is not None else np.nan,
            **self._cosmo_attrs(H0, Om0, unit),
        }

        def compute(p, e, idx, z, lower, upper):
            v, s = derived.bh_mass(
                model, recipe, p, e, redshift=z, flux_unit=unit, H0=H0, Om0=Om0, continuum=continuum,
                index=idx, lower=lower, upper=upper, **options,
            )  # fmt: skip
            return _stack([(v, s)])

        out = self._derived(compute, [f"log_mbh_{recipe}"], [attrs], errors=errors, needs_z=True, redshift=redshift)
        return out if errors else out[0]

    # ------------------------------------------------------------------------------------
    # model curves and residuals
    # ------------------------------------------------------------------------------------
    def _grid(self, wavelength, spectra):
        """(wavelength DataArray, wl dim, explicit?) — the input grid or an explicit rest grid."""
        if wavelength is not None:
            wl = np.asarray(wavelength, dtype=np.float64)
            if wl.ndim != 1 or wl.size == 0 or not np.all(np.isfinite(wl)):
                raise OptionError(
                    f"wavelength must be a 1-D array of finite rest-frame wavelengths (Angstrom), got shape {wl.shape}."
                )
            return xr.DataArray(wl, dims=("wavelength",), coords={"wavelength": wl}), "wavelength", True
        spectra = self.get_spectra(spectra)
        dim = self._dim
        flux = spectra["flux"]
        wl_dim = next(d for d in flux.dims if d != dim)
        wl_name = "wavelength" if "wavelength" in spectra.variables else wl_dim
        if wl_name not in spectra.variables:
            raise InputDataError(f"spectra has no wavelength coordinate ({wl_dim!r}); add one in Angstrom.")
        wl = spectra[wl_name].astype(np.float64)
        if wl.ndim == 2:
            wl = wl.transpose(dim, wl_dim)
            if wl.chunks:
                wl = wl.chunk({wl_dim: -1})
        return wl, wl_dim, False

    def _evaluate(self, names, wavelength, spectra, frame):
        """Sum (names None) or stack of components on the grid; (spectrum, wl[, component])."""
        model = self.get_model()
        if names is not None:
            unknown = [c for c in names if c not in model.components]
            if unknown:
                raise ModelError(
                    f"unknown component(s) {unknown} of model {model.name!r}; its components are: "
                    f"{', '.join(model.components) or 'none'}."
                )
            if not names:
                raise ModelError(f"model {model.name!r} has no components to evaluate.")
        wl, wl_dim, explicit = self._grid(wavelength, spectra)
        if frame is None:
            frame = "rest" if explicit else "observed"
        if frame not in ("rest", "observed"):
            raise OptionError(f"frame={frame!r} must be 'rest' or 'observed'.")
        params, _ = self._params(False)
        z = self._frame_redshift(None if explicit else self.get_spectra(spectra))
        if params.chunks:
            z = z.chunk({self._dim: params.chunksizes[self._dim]})
        fn = _evaluator(model, tuple(names) if names is not None else None)
        wl_core = [wl_dim]

        def block(p, w, zz):
            opz = 1.0 + np.asarray(zz, dtype=np.float64)
            w = np.asarray(w, dtype=np.float64)
            if explicit:
                rest = np.broadcast_to(w, (p.shape[0], w.shape[-1]))
            elif w.ndim == 2:
                rest = w / opz[:, None]
            else:
                rest = w[None, :] / opz[:, None]
            out = np.asarray(fn(rest, p), dtype=np.float64)
            if frame == "observed":
                out = out / opz.reshape((-1,) + (1,) * (out.ndim - 1))
            return out

        out_core = [wl_dim] + (["component"] if names is not None else [])
        sizes = {"component": len(names)} if names is not None else {}
        out = xr.apply_ufunc(
            block,
            params,
            wl,
            z,
            input_core_dims=[["param"], wl_core, []],
            output_core_dims=[out_core],
            dask="parallelized",
            output_dtypes=[np.float64],
            dask_gufunc_kwargs={"output_sizes": sizes} if sizes else {},
        )
        if names is not None:
            out = out.assign_coords(component=list(names))
        out.attrs.update({"frame": frame, "model": model.name})
        return out

    def model(self, wavelength=None, *, spectra: xr.Dataset | None = None, frame: str | None = None) -> xr.DataArray:
        """The fitted model, (spectrum, wavelength).

        Parameters
        ----------
        wavelength : 1-D array, optional
            Rest-frame grid (Å) shared by all spectra. Default: each spectrum's own input
            grid, moved to the rest frame (``λ / (1 + z)``).
        spectra : xarray.Dataset, optional
            Input spectra (for the default grid), if not linked with :meth:`use`.
        frame : {"observed", "rest"}, optional
            Flux scale of the output: ``"observed"`` (``f_obs = f_rest / (1 + z)``, comparable
            pixel by pixel with the input ``flux``; default on the input grid) or ``"rest"``
            (``f_rest``, the fitted quantity; default on an explicit grid).
        """
        out = self._evaluate(None, wavelength, spectra, frame)
        return out.rename("model")

    def components(
        self, wavelength=None, *, spectra: xr.Dataset | None = None, frame: str | None = None, names: Sequence[str] | None = None
    ) -> xr.DataArray:
        """Each model component, (spectrum, wavelength, component); arguments as :meth:`model`.

        ``names`` selects components (default: all of ``model.components``).
        """
        model = self.get_model()
        names = list(model.components) if names is None else list(names)
        return self._evaluate(names, wavelength, spectra, frame).rename("components")

    def residuals(self, spectra: xr.Dataset | None = None) -> xr.DataArray:
        """Normalised residuals ``(flux - model) * sqrt(ivar)``, (spectrum, wavelength).

        NaN where a pixel is masked (``ivar <= 0`` or non-finite, non-finite flux, or a
        ``flux_err`` that is not positive) or outside the model's rest-frame ``window``.
        """
        spectra = self.get_spectra(spectra)
        model = self.get_model()
        dim = self._dim
        flux = spectra["flux"]
        wl_dim = next(d for d in flux.dims if d != dim)
        flux = flux.transpose(dim, wl_dim)
        if "ivar" in spectra:
            ivar = spectra["ivar"].transpose(dim, wl_dim)
        elif "flux_err" in spectra:
            err = spectra["flux_err"].transpose(dim, wl_dim)
            ivar = xr.where(np.isfinite(err) & (err > 0), 1.0 / err**2, 0.0)
        else:
            raise InputDataError(
                f"spectra has neither 'ivar' nor 'flux_err' (variables: {sorted(map(str, spectra.data_vars))})."
            )
        if flux.chunks:
            flux = flux.chunk({wl_dim: -1})
        if ivar.chunks:
            ivar = ivar.chunk({wl_dim: -1})
        fitted = self.model(spectra=spectra, frame="observed")
        wl, _, _ = self._grid(None, spectra)
        z = self._frame_redshift(spectra)
        window = model.window

        def block(f, iv, m, w, zz):
            w = np.asarray(w, dtype=np.float64)
            rest = (w if w.ndim == 2 else w[None, :]) / (1.0 + np.asarray(zz, dtype=np.float64))[:, None]
            good = np.isfinite(f) & np.isfinite(iv) & (iv > 0)
            if window is not None:
                good &= (rest >= window[0]) & (rest <= window[1])
            with np.errstate(invalid="ignore"):
                r = (f - m) * np.sqrt(np.where(good, iv, 0.0))
            return np.where(good, r, np.nan)

        out = xr.apply_ufunc(
            block,
            flux,
            ivar,
            fitted,
            wl,
            z,
            input_core_dims=[[wl_dim], [wl_dim], [wl_dim], [wl_dim], []],
            output_core_dims=[[wl_dim]],
            dask="parallelized",
            output_dtypes=[np.float64],
        )
        return out.rename("residuals").assign_attrs(long_name="(data - model) / sigma", units="1")

    # ------------------------------------------------------------------------------------
    # plotting
    # ------------------------------------------------------------------------------------
    def plot(self, spectrum: int = 0, *, spectra: xr.Dataset | None = None, ax=None, components: bool = True):
        """Plot one spectrum: data, total model, each component, and a residual panel.

        Everything is drawn in the rest frame of the fit (rest wavelength, ``(1+z) f_obs``),
        restricted to the model's window when it has one.

        Parameters
        ----------
        spectrum : int
            Position of the spectrum along the spectrum dimension (0-based, like ``isel``).
        spectra : xarray.Dataset, optional
            Input spectra, if not linked with :meth:`use`.
        ax : pair of matplotlib Axes, optional
            ``(main, residual)`` axes to draw into; default a new Figure with both panels.
        components : bool
            Draw each component (default True).

        Returns
        -------
        matplotlib.figure.Figure
        """
        try:
            import matplotlib.pyplot as plt
        except ImportError as exc:
            raise MissingDependencyError(
                "fits.sheap.plot needs matplotlib; install it with: pip install 'sheap-dask[plot]'"
            ) from exc
        dim = self._dim
        n = self._ds.sizes[dim]
        if not isinstance(spectrum, (int, np.integer)) or not -n <= int(spectrum) < n:
            raise OptionError(f"spectrum={spectrum!r} must be an integer position in [0, {n}) along {dim!r}.")
        i = int(spectrum) % n
        spectra = self.get_spectra(spectra)
        model = self.get_model()
        one_fit = self._ds.isel({dim: [i]})
        one_spec = spectra.isel({dim: [i]})
        sub = one_fit.sheap.use(model=model, spectra=one_spec)
        if self._flux_unit is not None:
            sub.use(flux_unit=self._flux_unit)
        z = float(sub._frame_redshift(one_spec).values[0])
        wl, wl_dim, _ = sub._grid(None, one_spec)
        wl = np.asarray(wl.values, dtype=np.float64).reshape(-1)
        rest = wl / (1.0 + z)
        flux = np.asarray(one_spec["flux"].transpose(dim, wl_dim).values[0], dtype=np.float64) * (1.0 + z)
        resid = np.asarray(sub.residuals().values[0])
        total = np.asarray(sub.model(frame="rest").values[0])
        comps = sub.components(frame="rest") if components and model.components else None
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
        ax_main.set_title(", ".join(title), fontsize="small")
        return fig

    # ------------------------------------------------------------------------------------
    # fit status
    # ------------------------------------------------------------------------------------
    def status_counts(self):
        """Number of spectra per status (pandas Series indexed by status name, every status listed)."""
        import pandas as pd

        codes = np.asarray(self._ds["status"].values).astype(int)
        counts = {s.meaning: int(np.sum(codes == s.value)) for s in Status}
        other = int(np.sum(~np.isin(codes, [s.value for s in Status])))
        if other:
            counts["unknown"] = other
        return pd.Series(counts, name="count")

    def summary(self):
        """Status table: count, fraction, median reduced chi-square and meaning per status (DataFrame)."""
        import pandas as pd

        codes = np.asarray(self._ds["status"].values).astype(int)
        redchi2 = np.asarray(self._ds["redchi2"].values, dtype=np.float64) if "redchi2" in self._ds else None
        n = max(codes.size, 1)
        rows = {}
        for s in Status:
            sel = codes == s.value
            med = float(np.nanmedian(redchi2[sel])) if redchi2 is not None and sel.any() and np.isfinite(redchi2[sel]).any() else np.nan
            rows[s.meaning] = {"count": int(sel.sum()), "fraction": sel.sum() / n, "median_redchi2": med, "message": s.message}
        return pd.DataFrame.from_dict(rows, orient="index")

    def ok(self) -> xr.DataArray:
        """Boolean mask along spectrum: status is converged or converged after fallback."""
        status = self._ds["status"]
        good = [s.value for s in Status if s.ok]
        return status.isin(good).rename("ok")

    def failed(self) -> xr.Dataset:
        """The spectra whose status is not ok (not converged), with model and spectra links kept."""
        dim = self._dim
        bad = np.flatnonzero(~np.asarray(self.ok().values))
        sub = self._ds.isel({dim: bad})
        acc = sub.sheap
        acc._model = self._model
        acc._flux_unit = self._flux_unit
        if self._spectra is not None:
            acc._spectra = self._spectra.isel({dim: bad})
        return sub


_ERR_DOC = (
    "Monte Carlo: free parameters drawn from independent Gaussians with params_err, clipped into bounds, "
    "ties re-applied; standard deviation of the recomputed quantity; draws keyed by the integer spectrum "
    "label (else position) (sheap_dask.models.derived)"
)


def derived_continuum_or_none(model):
    """The model's default continuum component names, or ``None`` when it defines none."""
    from .models import derived

    try:
        return derived.continuum_names(model)
    except ModelError:
        return None


def _rebuild_region_by_fingerprint(model_json, fingerprint):
    """A built-in region model rebuilt from the result's model description, or ``None``.

    Used when the result has no ``sheap_region`` attribute: the region name and options are
    read from the stored metadata, and the rebuilt model is accepted only if its fingerprint
    equals the one recorded at fit time (so it is exactly the fitted model).
    """
    if not model_json or not fingerprint:
        return None
    try:
        desc = json.loads(model_json) if isinstance(model_json, str) else dict(model_json)
        meta = desc.get("metadata") or {}
        name = meta.get("region")
        if not name:
            return None
        comps = meta.get("components") or {}
        kinds = {str((v or {}).get("kind")) for v in comps.values()}
        base = {"feii": "feii" in kinds or "feii" in comps}
        if meta.get("n_broad") is not None:
            base["n_broad"] = int(meta["n_broad"])
        if desc.get("window"):
            base["window"] = tuple(desc["window"])
        from . import models as _models

        for extra in ({}, {"balmer": True}, {"share_narrow": True}, {"share_narrow": False}):
            try:
                model = _models.region(name, **base, **extra)
            except (TypeError, ValueError):
                continue
            if model.fingerprint() == fingerprint:
                return model
    except Exception:  # noqa: BLE001 - a best-effort fallback; the caller raises a clear error
        return None
    return None


def _stack(pairs) -> np.ndarray:
    """[(value, error), ...] -> (n, 2k): values first, then errors."""
    values = [np.asarray(v, dtype=np.float64) for v, _ in pairs]
    errors = [np.asarray(e, dtype=np.float64) for _, e in pairs]
    return np.stack(values + errors, axis=-1)


def _maybe_log(value, error, log: bool):
    if not log:
        return value, error
    with np.errstate(divide="ignore", invalid="ignore"):
        v = np.where(value > 0, np.log10(np.where(value > 0, value, 1.0)), np.nan)
        e = error / (np.where(value > 0, value, np.nan) * np.log(10.0))
    return v, e


def _flux_unit_value(flux_unit) -> float:
    from .models import derived

    if isinstance(flux_unit, str):
        return derived.parse_flux_unit(flux_unit)
    value = float(flux_unit)
    if not (np.isfinite(value) and value > 0):
        raise OptionError(f"flux_unit={flux_unit!r} must be a positive scale in erg/s/cm2/A (e.g. 1e-17) or a unit string.")
    return value


_EVALUATORS = LRUCache(16)


def _evaluator(model, names: tuple[str, ...] | None):
    """Jitted ``f(rest_wavelength (n, n_pix), params (n, n_params))`` -> model or stacked components."""
    return _EVALUATORS.get_or_build((model.identity(), names), lambda: _build_evaluator(model, names))[0]


def _build_evaluator(model, names: tuple[str, ...] | None):
    import jax
    import jax.numpy as jnp

    if names is None:
        one = model.func
    else:
        funcs = [model.components[c] for c in names]

        def one(w, p):
            return jnp.stack([f(w, p) for f in funcs], axis=-1)

    jitted = jax.jit(jax.vmap(one, in_axes=(0, 0)))

    def run(rest, params):
        params = jnp.asarray(params)
        return jitted(jnp.asarray(rest, dtype=params.dtype), params)

    return run
