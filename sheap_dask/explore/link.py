"""Linking a fit result to its model and its input spectra.

A result (see "The result Dataset" in DESIGN.md) finds its model in this order:
``use(model=...)``; any live model of this process with the identity stored in the attrs
(:func:`sheap_dask.model.find_model`; :func:`register_model` keeps one alive); the built-in
region named in ``attrs["sheap_region"]``, rebuilt; a built-in region rebuilt from the stored
description whose fingerprint matches the one recorded at fit time. Its spectra: a
``spectra=`` argument, else ``use(spectra=...)``, else ``xr.open_zarr(attrs["sheap_input"])``.
"""

from __future__ import annotations

import collections
import json
import warnings

import numpy as np
import xarray as xr

from ..errors import InputDataError, ModelError
from ..model import find_model
from ..units import DEFAULT_FLUX_UNIT, flux_unit_scale, parse_flux_unit

__all__ = ["Link", "register_model", "registered_model"]

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


class Link:
    """One fit result and what is linked to it: its model, its input spectra, their flux unit.

    ``ds.sheap`` holds one per Dataset object; the evaluation, derived-quantity and plotting
    functions of :mod:`sheap_dask.explore` read the result through it.
    """

    def __init__(self, ds: xr.Dataset, *, model=None, spectra: xr.Dataset | None = None, flux_unit: float | None = None) -> None:
        self.ds = ds
        self._model = model
        self._spectra = spectra
        self._flux_unit = flux_unit

    def use(self, *, model=None, spectra: xr.Dataset | None = None, flux_unit: float | str | None = None) -> None:
        """Link the model, the input spectra and/or their flux unit (see ``SheapAccessor.use``)."""
        if model is not None:
            self._check_model(model)
            self._model = model
        if spectra is not None:
            self._spectra = self._match_spectra(spectra)
        if flux_unit is not None:
            self._flux_unit = flux_unit_scale(flux_unit)

    def isel(self, positions, spectra: xr.Dataset | None = None) -> Link:
        """This link for the spectra at ``positions``: model, flux unit and spectra carried over."""
        dim = self.dim
        spectra = self._spectra if spectra is None else spectra
        return Link(
            self.ds.isel({dim: positions}),
            model=self._model,
            spectra=None if spectra is None else spectra.isel({dim: positions}),
            flux_unit=self._flux_unit,
        )

    @property
    def dim(self) -> str:
        """The spectrum dimension of the result."""
        if "params" not in self.ds:
            raise InputDataError(
                "this Dataset is not a sheap_dask fit result: it has no 'params' variable "
                f"(variables: {sorted(map(str, self.ds.data_vars))})."
            )
        return self.ds["params"].dims[0]

    @property
    def param_names(self) -> list[str]:
        return [str(p) for p in self.ds["param"].values]

    @property
    def flux_unit(self) -> float | None:
        """The flux unit linked with ``use(flux_unit=...)``, or ``None``."""
        return self._flux_unit

    # ------------------------------------------------------------------------------------
    # the model
    # ------------------------------------------------------------------------------------
    def _check_model(self, model) -> None:
        if not hasattr(model, "param_names") or not hasattr(model, "components"):
            raise ModelError(f"use(model=...) expects a sheap_dask.Model, got {type(model).__name__}.")
        names = self.param_names
        if list(model.param_names) != names:
            raise ModelError(
                f"model {model.name!r} has parameters {model.param_names} but this result has {names}; "
                "pass the model that produced the fit."
            )
        fp = self.ds.attrs.get("sheap_model_fingerprint")
        if fp is not None and model.fingerprint() != fp:
            warnings.warn(
                f"model {model.name!r} has fingerprint {model.fingerprint()} but the result was fitted with "
                f"{fp}; the parameter names match, so it is used, but check that its functions are the same.",
                UserWarning,
                stacklevel=4,
            )

    def get_model(self):
        """The fitted model: ``use``, a live model by identity, or a built-in region rebuilt."""
        if self._model is not None:
            return self._model
        attrs = self.ds.attrs
        names = self.param_names
        fp = attrs.get("sheap_model_identity") or attrs.get("sheap_model_fingerprint")
        model = find_model(fp, names) if fp else None
        if model is not None and list(model.param_names) == names:
            self._model = model
            return model
        region = attrs.get("sheap_region")
        if region:
            spec = json.loads(region) if isinstance(region, str) else dict(region)
            from .. import models as _models

            model = _models.region(spec["name"], **(spec.get("kwargs") or {}))
            if list(model.param_names) != names:
                raise ModelError(
                    f"rebuilt region {spec['name']!r} has parameters {model.param_names}, not the result's {names}; "
                    "pass the fitted model with fits.sheap.use(model=...)."
                )
            self._model = register_model(model)
            return model
        model = _rebuild_region_by_fingerprint(attrs.get("sheap_model"), fp)
        if model is not None and list(model.param_names) == names:
            self._model = register_model(model)
            return model
        try:
            name = json.loads(attrs.get("sheap_model", "{}")).get("name", "?")
        except (TypeError, ValueError):
            name = "?"
        raise ModelError(
            f"cannot find the model of this fit result (model {name!r}, fingerprint {fp}): it is not "
            "registered in this session and the result names no built-in region. Link it with "
            "fits.sheap.use(model=your_model, spectra=input_dataset) or sd.accessor.register_model(your_model)."
        )

    # ------------------------------------------------------------------------------------
    # the spectra
    # ------------------------------------------------------------------------------------
    def _match_spectra(self, spectra: xr.Dataset) -> xr.Dataset:
        if not isinstance(spectra, xr.Dataset):
            raise InputDataError(f"spectra must be an xarray.Dataset of the input spectra, got {type(spectra).__name__}.")
        dim = self.dim
        if "flux" not in spectra:
            raise InputDataError(
                f"spectra has no 'flux' variable (variables: {sorted(map(str, spectra.data_vars))}); pass the "
                "input Dataset that was fitted."
            )
        if dim not in spectra.dims:
            raise InputDataError(f"spectra has no {dim!r} dimension (dims: {dict(spectra.sizes)}).")
        n = self.ds.sizes[dim]
        if spectra.sizes[dim] != n:
            if dim in spectra.indexes and dim in self.ds.indexes:
                return spectra.sel({dim: self.ds[dim].values})
            raise InputDataError(
                f"spectra has {spectra.sizes[dim]} spectra but the result has {n}; pass the input that was "
                f"fitted (or give both a {dim!r} coordinate so they can be matched)."
            )
        return spectra

    def get_spectra(self, spectra: xr.Dataset | None = None) -> xr.Dataset:
        """The input spectra: ``spectra``, else ``use(spectra=...)``, else ``attrs["sheap_input"]``."""
        if spectra is not None:
            return self._match_spectra(spectra)
        if self._spectra is not None:
            return self._spectra
        source = self.ds.attrs.get("sheap_input")
        if source:
            try:
                opened = xr.open_zarr(source)
            except Exception as exc:  # any failure: say what was tried and how to fix
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
    # per-spectrum values of the result
    # ------------------------------------------------------------------------------------
    def redshift(self, spectra: xr.Dataset | None = None) -> xr.DataArray | None:
        """The result's ``redshift`` (else the spectra's), float64; ``None`` when neither has one."""
        if "redshift" in self.ds.coords or "redshift" in self.ds.data_vars:
            return self.ds["redshift"].astype(np.float64)
        if spectra is not None and "redshift" in spectra.variables and spectra["redshift"].dims == (self.dim,):
            return spectra["redshift"].astype(np.float64)
        return None

    def frame_redshift(self, spectra: xr.Dataset | None = None) -> xr.DataArray:
        """Redshift used to move between the input grid and the model's frame (0: no shift)."""
        z = None if self.ds.attrs.get("sheap_frame") == "input" else self.redshift(spectra)
        if z is None:
            return xr.zeros_like(self.ds["params"].isel(param=0, drop=True), dtype=np.float64)
        return z

    def flux_unit_for(self, flux_unit=None, spectra: xr.Dataset | None = None) -> float:
        """The input's flux unit (erg/s/cm²/Å): ``flux_unit``, ``use``, the spectra's or result's attrs, else 1e-17."""
        if flux_unit is not None:
            return flux_unit_scale(flux_unit)
        if self._flux_unit is not None:
            return self._flux_unit
        if spectra is None:
            try:
                spectra = self.get_spectra()
            except InputDataError:
                spectra = None
        units = spectra["flux"].attrs.get("units") if spectra is not None else None
        units = units or self.ds.attrs.get("flux_units")
        return parse_flux_unit(units) if units else DEFAULT_FLUX_UNIT

    def params(self, errors: bool):
        """``params`` (and ``params_err``) with one chunk along ``param`` and equal spectrum chunks."""
        dim = self.dim
        params = self.ds["params"]
        err = None
        if errors:
            if "params_err" not in self.ds:
                raise InputDataError("errors=True needs the result's 'params_err' variable, which this Dataset lacks.")
            err = self.ds["params_err"]
        if params.chunks or (err is not None and err.chunks):
            chunks = (params if params.chunks else err).chunksizes[dim]
            params = params.chunk({dim: chunks, "param": -1})
            if err is not None:
                err = err.chunk({dim: chunks, "param": -1})
        return params, err

    def uncertainty(self):
        """``(kind, DataArray)`` the derived-quantity errors come from: ``("draws", params_mc)``
        when the fit made resampling realizations, else ``("cov", params_cov)``, else
        ``(None, None)`` (independent errors from ``params_err``). Chunked like ``params``."""
        for kind, name in (("draws", "params_mc"), ("cov", "params_cov")):
            if name in self.ds:
                da = self.ds[name]
                if self.ds["params"].chunks or da.chunks:
                    chunks = (self.ds["params"] if self.ds["params"].chunks else da).chunksizes[self.dim]
                    da = da.chunk({self.dim: chunks, **{d: -1 for d in da.dims[1:]}})
                return kind, da.drop_vars([c for c in da.coords if c != self.dim], errors="ignore")
        return None, None

    def bounds(self):
        """Parameter bounds as (param,) DataArrays (lazy when the result is): the model's when absent."""
        ds = self.ds
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
        from .. import models as _models

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
