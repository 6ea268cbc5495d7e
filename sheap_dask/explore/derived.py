"""Derived quantities of a fit result as DataArrays: the :mod:`sheap_dask.derived` functions
applied chunk by chunk along the spectrum dimension.

A quantity is a DataArray named ``<quantity>_<line>`` with ``units``; ``errors=True`` gives a
Dataset holding it and its Monte Carlo error ``<name>_err``, whose draws are keyed by the
integer spectrum labels (else positions), so a spectrum gets the same draws in any subset or
chunking.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr

from ..derived import bh_mass as _bh_mass
from ..derived import lines
from ..derived import luminosity as _luminosity
from ..derived.errors import log_upper_limit, log_value_error
from ..errors import InputDataError, ModelError, OptionError
from .link import Link

__all__ = ["Scale", "bh_mass", "ew", "line_luminosity", "line_quantity", "luminosity", "measure", "shift"]

_ERR_DOC = (
    "Monte Carlo: the fit's resampling realizations (params_mc) when it has them, else draws from the full "
    "parameter covariance (params_cov; independent Gaussians from params_err without it), clipped into bounds, "
    "ties re-applied; half the 16-84% range of the recomputed quantity; NaN when it depends on a parameter with "
    "an undefined covariance; draws keyed by the integer spectrum label (else position) (sheap_dask.derived.errors)"
)

#: ``compute(params, params_err | None, index, z, lower, upper) -> (n, 2k)``: k values, then k errors.
Compute = Callable[..., np.ndarray]


# ----------------------------------------------------------------------------------------
# applying a computation along the spectrum dimension
# ----------------------------------------------------------------------------------------
def _draw_index(link: Link) -> np.ndarray:
    """Per-spectrum keys of the Monte Carlo draws: the integer ``spectrum`` labels when the
    result has them (so a spectrum gets the same draws in any subset or chunking), else
    positions."""
    dim = link.dim
    if dim in link.ds.indexes:
        labels = np.asarray(link.ds.indexes[dim])
        if labels.dtype.kind in "iu":
            return (labels.astype(np.int64) % (2**32)).astype(np.uint32)
    return np.arange(link.ds.sizes[dim], dtype=np.uint32)


def _spectrum_like(link: Link, values: np.ndarray, like: xr.DataArray) -> xr.DataArray:
    """A per-spectrum DataArray chunked like ``like`` along the spectrum dim."""
    dim = link.dim
    da = xr.DataArray(values, dims=(dim,))
    if like.chunks:
        da = da.chunk({dim: like.chunksizes[dim]})
    return da


def _apply(link: Link, compute: Compute, names: list[str], attrs: list[dict], *, errors: bool, needs_z: bool = False, redshift=None):
    """Apply ``compute`` chunk-wise.

    Returns the k values as DataArrays (``errors=False``) or a Dataset of values and
    ``_err`` companions.
    """
    dim = link.dim
    params, err = link.params(errors)
    n = params.sizes[dim]
    index = _spectrum_like(link, _draw_index(link), params)
    if needs_z:
        if redshift is not None:
            z = _spectrum_like(link, np.broadcast_to(np.asarray(redshift, dtype=np.float64), (n,)).copy(), params)
        else:
            z = link.redshift()
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
    lower, upper = link.bounds()
    args = [params, index, z, lower, upper] + ([err] if err is not None else [])
    core = [["param"], [], [], ["param"], ["param"]] + ([["param"]] if err is not None else [])
    kind, spread = link.uncertainty() if errors else (None, None)
    if spread is not None:
        args.append(spread)
        core.append(list(spread.dims[1:]))

    def block(p, idx, zz, lo, hi, *rest):
        e = rest[0] if err is not None else None
        unc = {kind: rest[-1]} if spread is not None else {}
        return compute(p, e, idx, zz, np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64), **unc)

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


def _one(out, errors: bool):
    """The single quantity of ``_apply``: its DataArray, or the Dataset with its error."""
    return out if errors else out[0]


def _stack(pairs) -> np.ndarray:
    """[(value, error), ...] -> (n, 2k): values first, then errors."""
    values = [np.asarray(v, dtype=np.float64) for v, _ in pairs]
    errors = [np.asarray(e, dtype=np.float64) for _, e in pairs]
    return np.stack(values + errors, axis=-1)


def _maybe_log(value, error, log: bool):
    """:func:`~sheap_dask.derived.errors.log_value_error` when ``log``, else unchanged."""
    return log_value_error(value, error) if log else (value, error)


# ----------------------------------------------------------------------------------------
# detection: quantities of an undetected line
# ----------------------------------------------------------------------------------------
def _detected(link: Link, line: str):
    """Per spectrum, whether the fit detected ``line`` (``line_detected``), or ``None`` when
    the result does not say (a model without a line catalogue, an older result)."""
    ds = link.ds
    if "line_detected" not in ds or "line" not in ds.coords or line not in [str(v) for v in ds["line"].values]:
        return None
    return ds["line_detected"].sel(line=line, drop=True).astype(bool)


def _mask_undetected(link: Link, line: str, out, errors: bool, options: dict):
    """NaN for the spectra where ``line`` is not detected (unless ``undetected="keep"``);
    with ``errors=True`` the Dataset also gets ``detected_<line>``."""
    policy = options.pop("undetected", "nan")
    if policy not in ("nan", "keep"):
        raise OptionError(f"undetected={policy!r} must be 'nan' (quantities of undetected lines are NaN) or 'keep'.")
    detected = _detected(link, line)
    if detected is None:
        return out
    note = f"NaN where {line} is not detected (line_detected: flux/error < sheap_dask.lines.detection_sigma)"
    if policy == "nan":
        if isinstance(out, xr.Dataset):
            out = xr.Dataset({k: v.where(detected).assign_attrs({**v.attrs, "undetected": note}) for k, v in out.data_vars.items()})
        else:
            out = out.where(detected).assign_attrs({**out.attrs, "undetected": note})
    if errors and isinstance(out, xr.Dataset):
        out[f"detected_{line}"] = detected.assign_attrs(long_name=f"{line} detected (flux / error >= detection_sigma)")
    return out


# ----------------------------------------------------------------------------------------
# lines
# ----------------------------------------------------------------------------------------
def _line_attrs(link: Link, quantity: str, line: str) -> dict:
    try:
        flux_units = f"{link.flux_unit_for(None):g} erg/s/cm2"  # flux-density unit x Angstrom
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


def _continuum_or_none(model):
    """The model's default continuum component names, or ``None`` when it defines none."""
    try:
        return lines.continuum_names(model)
    except ModelError:
        return None


def measure(link: Link, line: str, errors: bool, continuum: Sequence[str] | None, options: dict) -> xr.Dataset:
    """All profile measurements of a line in one pass (see ``SheapAccessor.measure``)."""
    model = link.get_model()
    lines.line_info(model, line)
    has_cont = continuum is not None or bool(_continuum_or_none(model))
    keys = ["flux", "fwhm", "sigma", "shift_peak", "shift_centroid"] + (["ew"] if has_cont else [])
    names = {
        "flux": f"flux_{line}", "fwhm": f"fwhm_{line}", "sigma": f"sigma_{line}",
        "shift_peak": f"shift_{line}", "shift_centroid": f"centroid_shift_{line}", "ew": f"ew_{line}",
    }  # fmt: skip
    attrs = [_line_attrs(link, q, line) for q in keys]
    cont = continuum if has_cont else False

    def compute(p, e, idx, z, lower, upper, **unc):
        res = lines.measure_line(model, line, p, e, continuum=cont, index=idx, lower=lower, upper=upper, **unc, **options)
        return _stack([res[q] for q in keys])

    undetected = {"undetected": options.pop("undetected", "nan")}
    out = _apply(link, compute, [names[q] for q in keys], attrs, errors=errors)
    out = out if errors else xr.Dataset({da.name: da for da in out})
    if undetected["undetected"] == "nan" and _detected(link, line) is not None:
        flux = [names["flux"]] + ([names["flux"] + "_err"] if errors else [])  # a flux is meaningful at any S/N
        kept = out[flux]
        out = _mask_undetected(link, line, out, errors, undetected)
        out.update(kept)
        return out
    return _mask_undetected(link, line, out, errors, undetected)


def line_quantity(link: Link, quantity: str, line: str, errors: bool, options: dict, *, continuum=None):
    """One profile measurement (``"fwhm"``, ``"sigma"``, ``"flux"``, ``"ew"``, ``"shift_<method>"``)."""
    model = link.get_model()
    lines.line_info(model, line)
    name = {"shift_peak": "shift", "shift_centroid": "shift", "shift_median": "shift"}.get(quantity, quantity)
    attrs = _line_attrs(link, quantity, line)

    def compute(p, e, idx, z, lower, upper, **unc):
        res = lines.measure_line(
            model, line, p, e, index=idx, lower=lower, upper=upper,
            continuum=continuum,
            median=quantity == "shift_median", **unc, **options,
        )  # fmt: skip
        return _stack([res[quantity]])

    policy = {"undetected": options.pop("undetected", "nan")}
    out = _one(_apply(link, compute, [f"{name}_{line}"], [attrs], errors=errors), errors)
    if quantity == "flux":  # a flux is meaningful at any S/N (its error says how much)
        return out
    return _mask_undetected(link, line, out, errors, policy)


def ew(link: Link, line: str, errors: bool, continuum: Sequence[str] | None, options: dict):
    """Rest-frame equivalent width (see ``SheapAccessor.ew``)."""
    lines.continuum_names(link.get_model(), continuum)
    return line_quantity(link, "ew", line, errors, options, continuum=continuum)


def shift(link: Link, line: str, method: str, errors: bool, options: dict):
    """Velocity shift by ``method`` (see ``SheapAccessor.shift``)."""
    if method not in lines.SHIFT_METHODS:
        raise OptionError(f"shift(method={method!r}) is unknown; use one of {', '.join(lines.SHIFT_METHODS)}.")
    out = line_quantity(link, f"shift_{method}", line, errors, options)
    return out.assign_attrs(method=method) if not errors else out


# ----------------------------------------------------------------------------------------
# luminosities and black-hole masses
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scale:
    """How a flux becomes a luminosity: redshift (``None``: the result's), flux unit, cosmology.

    ``flux_unit`` ``None`` means the input's (see ``Link.flux_unit_for``); ``H0``/``Om0``
    ``None`` the configured flat ΛCDM cosmology.
    """

    redshift: Any = None
    flux_unit: float | str | None = None
    H0: float | None = None
    Om0: float | None = None

    def cosmology(self) -> tuple[float, float]:
        return _luminosity.cosmology(self.H0, self.Om0)


def _cosmo_attrs(H0, Om0, flux_unit) -> dict:
    return {"cosmology": f"flat LambdaCDM H0={H0:g} Om0={Om0:g}", "flux_unit": f"{flux_unit:g} erg/s/cm2/Angstrom"}


def luminosity(link: Link, wavelength: float, quantity: str, log: bool, errors: bool, continuum, scale: Scale, options: dict):
    """Continuum luminosity at a rest wavelength (see ``SheapAccessor.luminosity``)."""
    H0, Om0 = scale.cosmology()
    model = link.get_model()
    lines.continuum_names(model, continuum)
    unit = link.flux_unit_for(scale.flux_unit)
    tag = f"{float(wavelength):g}"
    if quantity == "lambda_l_lambda":
        name, units, long_name = f"lambda_l_lambda_{tag}", "erg/s", f"continuum lambda L_lambda at {tag} Angstrom (rest)"
    elif quantity == "l_lambda":
        name, units, long_name = f"l_lambda_{tag}", "erg/s/Angstrom", f"continuum L_lambda at {tag} Angstrom (rest)"
    else:
        raise OptionError(f"quantity={quantity!r} must be 'lambda_l_lambda' (erg/s) or 'l_lambda' (erg/s/A).")
    if log:
        name, units = "log_" + name, f"log10({units})"
    attrs = {"long_name": long_name, "units": units, **_cosmo_attrs(H0, Om0, unit)}

    def compute(p, e, idx, z, lower, upper, **unc):
        v, s = _luminosity.luminosity(
            model, wavelength, p, e, redshift=z, flux_unit=unit, H0=H0, Om0=Om0, quantity=quantity,
            continuum=continuum, index=idx, lower=lower, upper=upper, **unc, **options,
        )  # fmt: skip
        return _stack([_maybe_log(v, s, log)])

    out = _one(_apply(link, compute, [name], [attrs], errors=errors, needs_z=True, redshift=scale.redshift), errors)
    return _without_absent_continuum(link, model, continuum, out)


def _without_absent_continuum(link: Link, model, continuum, out):
    """NaN where the fit found no AGN continuum (its flux parameters all at zero): a galaxy's
    "AGN luminosity" would be a formal number from a vanishing power law."""
    if "at_bound" not in link.ds or "params" not in link.ds:
        return out
    absent = xr.apply_ufunc(
        lambda b, p: _luminosity.agn_continuum_absent(model, b, p, continuum), link.ds["at_bound"], link.ds["params"],
        input_core_dims=[["param"], ["param"]], dask="parallelized", output_dtypes=[bool],
    )
    masked = out.where(~absent)
    return masked.assign_attrs(out.attrs) if isinstance(out, xr.DataArray) else masked


def line_luminosity(link: Link, line: str, log: bool, errors: bool, scale: Scale, options: dict):
    """Line luminosity of a line's summed profile (see ``SheapAccessor.line_luminosity``)."""
    H0, Om0 = scale.cosmology()
    model = link.get_model()
    lines.line_info(model, line)
    unit = link.flux_unit_for(scale.flux_unit)
    name, units = f"luminosity_{line}", "erg/s"
    if log:
        name, units = "log_" + name, "log10(erg/s)"
    attrs = {"long_name": f"luminosity of {line}", "units": units, **_cosmo_attrs(H0, Om0, unit)}

    policy = options.pop("undetected", "nan")
    if policy not in ("nan", "keep"):
        raise OptionError(f"undetected={policy!r} must be 'nan' (an undetected line's log luminosity is a 3-sigma upper limit) or 'keep'.")

    def compute(p, e, idx, z, lower, upper, **unc):
        v, s = _luminosity.line_luminosity(
            model, line, p, e, redshift=z, flux_unit=unit, H0=H0, Om0=Om0, index=idx, lower=lower, upper=upper, **unc, **options
        )
        return _stack([_maybe_log(v, s, log), (log_upper_limit(v, s) if log else np.maximum(v, 0.0) + 3.0 * s, s)])

    out = _apply(link, compute, [name, name + "_ul"], [attrs, attrs], errors=errors, needs_z=True, redshift=scale.redshift)
    detected = _detected(link, line) if policy == "nan" else None
    value, limit = (out[name], out[name + "_ul"]) if errors else out
    if detected is None:
        return out[[name, name + "_err"]] if errors else value
    note = f"3-sigma upper limit where {line} is not detected ({name}_upper_limit)"
    value = value.where(detected, limit).assign_attrs({**attrs, "undetected": note})
    if not errors:
        return value
    return xr.Dataset({
        name: value,
        name + "_err": out[name + "_err"].where(detected),
        name + "_upper_limit": (~detected).assign_attrs(long_name=f"{name} is a 3-sigma upper limit: {line} not detected"),
    })  # fmt: skip


def bh_mass(link: Link, recipe: str, errors: bool, continuum, scale: Scale, options: dict):
    """Single-epoch virial black-hole mass (see ``SheapAccessor.bh_mass``)."""
    recipes = _bh_mass.RECIPES
    if recipe not in recipes:
        raise OptionError(f"unknown black-hole mass recipe {recipe!r}; use one of {', '.join(recipes)}.")
    r = recipes[recipe]
    H0, Om0 = scale.cosmology()
    model = link.get_model()
    lines.line_info(model, r.line)
    if r.luminosity == "continuum":
        lines.continuum_names(model, continuum)
    unit = link.flux_unit_for(scale.flux_unit)
    attrs = {
        "long_name": f"single-epoch black-hole mass ({recipe})",
        "units": "log10(M/M_sun)",
        "reference": r.reference,
        "scatter_dex": r.scatter_dex if r.scatter_dex is not None else np.nan,
        **_cosmo_attrs(H0, Om0, unit),
    }

    def compute(p, e, idx, z, lower, upper, **unc):
        v, s = _bh_mass.bh_mass(
            model, recipe, p, e, redshift=z, flux_unit=unit, H0=H0, Om0=Om0, continuum=continuum,
            index=idx, lower=lower, upper=upper, **unc, **options,
        )  # fmt: skip
        return _stack([(v, s)])

    name = f"log_mbh_{recipe}"
    policy = {"undetected": options.pop("undetected", "nan")}
    out = _one(_apply(link, compute, [name], [attrs], errors=errors, needs_z=True, redshift=scale.redshift), errors)
    return _mask_undetected(link, r.line, out, errors, policy)
