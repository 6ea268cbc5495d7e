"""Cosmology and luminosities: luminosity distance, continuum ``λL_λ``/``L_λ``, line luminosities.

With ``d_L`` the luminosity distance, ``L_λ(λ_rest) = 4π d_L² f_rest(λ_rest)``
(erg/s/Å), ``λL_λ`` (erg/s) and the line luminosity ``L = 4π d_L² ∫ f_rest dλ_rest`` (erg/s),
with the flux unit ``flux_unit`` in erg/s/cm²/Å (SDSS: 1e-17). ``d_L`` is computed for a flat
ΛCDM cosmology without radiation (``H0 = 70`` km/s/Mpc, ``Om0 = 0.3`` by default) by
Gauss-Legendre quadrature of ``1/E(z)``; it matches ``astropy.cosmology.FlatLambdaCDM``
(with ``Tcmb0 = 0``) to better than 1e-10. Luminosities are NaN for ``z <= 0``.

The cosmology defaults come from the configuration (``sheap_dask.cosmology.H0/Om0``, see
:func:`cosmology`); the functions here take explicit ``H0``/``Om0``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import InputDataError, OptionError
from ..units import DEFAULT_FLUX_UNIT
from .errors import as_params, mc_options, run
from .lines import C_KMS, DEFAULT_N_GRID, continuum_fn, continuum_names, measure_line

__all__ = [
    "DEFAULT_H0",
    "DEFAULT_OM0",
    "MPC_CM",
    "cosmology",
    "line_luminosity",
    "luminosity",
    "luminosity_distance",
]

#: One megaparsec in cm (IAU 2015: 1 pc = 648000/π au, 1 au = 1.495978707e13 cm).
MPC_CM = 3.0856775814913673e24
#: Default cosmology: flat ΛCDM with H0 = 70 km/s/Mpc and Ωm = 0.3.
DEFAULT_H0 = 70.0
DEFAULT_OM0 = 0.3


def cosmology(H0: float | None = None, Om0: float | None = None) -> tuple[float, float]:
    """``(H0, Om0)``: the given values, else the configured ``sheap_dask.cosmology.H0/Om0``."""
    from .. import config

    H0 = float(config.resolve(H0, "cosmology.H0"))
    Om0 = float(config.resolve(Om0, "cosmology.Om0"))
    _check_cosmology(H0, Om0)
    return H0, Om0


def _check_cosmology(H0: float, Om0: float) -> None:
    if not (math.isfinite(H0) and H0 > 0):
        raise OptionError(f"H0={H0!r} must be a positive Hubble constant in km/s/Mpc (e.g. 70).")
    if not (math.isfinite(Om0) and 0 <= Om0 <= 1):
        raise OptionError(f"Om0={Om0!r} must be the matter density in [0, 1] of a flat ΛCDM cosmology (e.g. 0.3).")


def luminosity_distance(z, *, H0: float = DEFAULT_H0, Om0: float = DEFAULT_OM0) -> np.ndarray:
    """Luminosity distance (cm) in a flat ΛCDM cosmology without radiation.

    ``d_L = (1 + z) (c / H0) ∫_0^z dz' / E(z')`` with ``E(z) = sqrt(Om0 (1+z)^3 + 1 - Om0)``,
    integrated by 64-point Gauss-Legendre quadrature (the integrand is smooth, so this is
    exact to rounding). NaN for ``z < 0`` or non-finite ``z``.

    Parameters
    ----------
    z : float or array
        Redshift(s).
    H0 : float
        Hubble constant, km/s/Mpc (default 70).
    Om0 : float
        Matter density parameter today (default 0.3); ``Ω_Λ = 1 - Om0``.

    Examples
    --------
    >>> round(float(luminosity_distance(1.0)) / MPC_CM, 1)   # Mpc
    6607.7
    """
    _check_cosmology(float(H0), float(Om0))
    z = np.asarray(z, dtype=np.float64)
    x, w = np.polynomial.legendre.leggauss(64)
    zz = np.where(np.isfinite(z) & (z >= 0), z, 0.0)
    nodes = 0.5 * zz[..., None] * (x + 1.0)  # map [-1, 1] -> [0, z]
    inv_e = 1.0 / np.sqrt(Om0 * (1.0 + nodes) ** 3 + (1.0 - Om0))
    comoving = 0.5 * zz * np.sum(w * inv_e, axis=-1)  # in units of c/H0
    d = (1.0 + zz) * comoving * (C_KMS / H0) * MPC_CM
    return np.where(np.isfinite(z) & (z >= 0), d, np.nan)


def log_lum_factor(redshift, n: int, flux_unit: float, H0: float, Om0: float) -> np.ndarray:
    """log10(4π d_L² × flux_unit) per spectrum; NaN where z <= 0."""
    if redshift is None:
        raise InputDataError(
            "luminosities need a redshift; pass redshift=... (one per spectrum) or give the result a "
            "'redshift' coordinate."
        )
    flux_unit = float(flux_unit)
    if not (math.isfinite(flux_unit) and flux_unit > 0):
        raise OptionError(f"flux_unit={flux_unit!r} must be the input flux-density unit in erg/s/cm²/Å (e.g. 1e-17).")
    z = np.broadcast_to(np.asarray(redshift, dtype=np.float64), (n,))
    d = luminosity_distance(z, H0=H0, Om0=Om0)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.log10(4.0 * np.pi * flux_unit) + 2.0 * np.log10(d)
    return np.where(z > 0, out, np.nan)


def rest_wavelength(wavelength) -> float:
    """``wavelength`` as a float, refused unless a positive rest wavelength (Angstrom)."""
    wavelength = float(wavelength)
    if not (math.isfinite(wavelength) and wavelength > 0):
        raise OptionError(f"wavelength={wavelength!r} must be a positive rest wavelength in Angstrom (e.g. 5100).")
    return wavelength


def agn_continuum_absent(model, at_bound, params, continuum: Sequence[str] | None = None) -> np.ndarray:
    """(n,) bool: every flux parameter of the AGN continuum (``continuum`` or the model's,
    without FeII) rests at its zero lower bound, i.e. the fit found no AGN continuum (a
    galaxy). Its luminosity is then no measurement: the callers report NaN there.

    ``at_bound`` and ``params`` are (n, n_params) in the model's parameter order.
    """
    names = list(model.param_names)
    comps = (getattr(model, "metadata", None) or {}).get("components") or {}
    flux = set(getattr(model, "flux_params", ()) or ())
    members = [p for c in continuum_names(model, continuum) for p in (comps.get(c) or {}).get("params", ()) if p in flux]
    at_bound = np.asarray(at_bound, dtype=bool).reshape(-1, len(names))
    if not members:
        return np.zeros(at_bound.shape[0], dtype=bool)
    idx = [names.index(p) for p in members]
    zero_floor = np.asarray(model.params.lower)[idx] == 0.0
    with np.errstate(invalid="ignore"):
        resting = at_bound[:, idx] & zero_floor[None, :] & (np.asarray(params, dtype=np.float64).reshape(-1, len(names))[:, idx] >= 0)
    return resting.all(axis=1)


def _build_continuum(model, key: tuple):
    """The measurement ``f(p, x) -> {f_lambda}``: continuum flux density at one rest wavelength."""
    wavelength, continuum = key
    cont = continuum_fn(model, continuum)
    return lambda p, x: {"f_lambda": cont(wavelength, p)}


def luminosity(
    model,
    wavelength: float,
    params,
    params_err=None,
    *,
    redshift,
    flux_unit: float = DEFAULT_FLUX_UNIT,
    H0: float = DEFAULT_H0,
    Om0: float = DEFAULT_OM0,
    quantity: str = "lambda_l_lambda",
    continuum: Sequence[str] | None = None,
    **kwargs: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """Continuum luminosity at a rest wavelength: ``λL_λ`` (erg/s) or ``L_λ`` (erg/s/Å).

    ``L_λ(λ) = 4π d_L² f_rest(λ)``, with ``f_rest`` the model's continuum components at the
    rest wavelength ``λ`` (in ``flux_unit`` erg/s/cm²/Å) and ``d_L`` from
    :func:`luminosity_distance`. The error scales the Monte Carlo error of the continuum flux
    density (the redshift is taken as exact).

    Parameters
    ----------
    model, params, params_err
        As :func:`measure_line`.
    wavelength : float
        Rest wavelength in Å (e.g. 5100, 3000, 1350).
    redshift : float or array (n_spectra,)
        Redshift of each spectrum.
    flux_unit : float
        Input flux-density unit in erg/s/cm²/Å (default 1e-17, SDSS).
    H0, Om0 : float
        Flat ΛCDM cosmology (default 70 km/s/Mpc, 0.3).
    quantity : {"lambda_l_lambda", "l_lambda"}
        ``λL_λ`` in erg/s (default) or ``L_λ`` in erg/s/Å.
    continuum : list of str, optional
        Continuum components (default ``model.metadata["continuum"]``).

    Returns
    -------
    (value, error)
    """
    wavelength = rest_wavelength(wavelength)
    key = (wavelength, tuple(continuum_names(model, continuum)))
    return spectral_luminosity(model, _build_continuum, key, params, params_err, redshift=redshift, flux_unit=flux_unit,
                               H0=H0, Om0=Om0, quantity=quantity, **kwargs)


def spectral_luminosity(model, builder, key: tuple, params, params_err=None, *, redshift, flux_unit: float, H0: float,
                        Om0: float, quantity: str, **kwargs: Any):
    """``λL_λ`` or ``L_λ`` of the rest-frame ``f_lambda`` that ``builder(model, key)`` computes
    at ``key[0]`` Angstrom (the AGN continuum here, the host in :mod:`.host`), with its Monte
    Carlo error."""
    if quantity not in ("lambda_l_lambda", "l_lambda"):
        raise OptionError(f"quantity={quantity!r} must be 'lambda_l_lambda' (erg/s) or 'l_lambda' (erg/s/A).")
    opts = mc_options(kwargs)
    p, one = as_params(model, params)
    log_factor = log_lum_factor(redshift, p.shape[0], flux_unit, H0, Om0)
    val, err = run(model, builder, key, p, params_err, 0.0, **opts)["f_lambda"]
    factor = 10.0**log_factor * (key[0] if quantity == "lambda_l_lambda" else 1.0)
    val, err = val * factor, err * factor
    return (val[0], err[0]) if one else (val, err)


def line_luminosity(
    model,
    line: str,
    params,
    params_err=None,
    *,
    redshift,
    flux_unit: float = DEFAULT_FLUX_UNIT,
    H0: float = DEFAULT_H0,
    Om0: float = DEFAULT_OM0,
    **kwargs: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """Line luminosity (erg/s): ``4π d_L² ∫ f_rest dλ_rest`` of the line's summed profile.

    Parameters as :func:`luminosity` and :func:`measure_line`. Returns ``(value, error)``.
    """
    velocity_range = kwargs.pop("velocity_range", None)
    n_grid = kwargs.pop("n_grid", DEFAULT_N_GRID)
    p, one = as_params(model, params)
    log_factor = log_lum_factor(redshift, p.shape[0], flux_unit, H0, Om0)
    val, err = measure_line(model, line, p, params_err, velocity_range=velocity_range, n_grid=n_grid, **kwargs)["flux"]
    factor = 10.0**log_factor
    val, err = val * factor, err * factor
    return (val[0], err[0]) if one else (val, err)
