"""Host-galaxy quantities: host fraction, stellar velocity dispersion, AGN-only luminosity.

A model with a host component (:func:`sheap_dask.models.host_component`, listed in
``model.metadata["host"]``) splits the continuum into AGN light and starlight:

* **host fraction** at a rest wavelength ``λ``: ``f_host(λ) = H(λ) / (H(λ) + C(λ))``, with
  ``H`` the host component(s) and ``C`` the AGN continuum (``metadata["continuum"]`` without
  FeII: power law, Balmer continuum; or ``continuum=``), as PyQSOFit's ``frac_host_4200`` and
  ``frac_host_5100`` (Shen et al. 2011; Rakshit et al. 2020). The host is evaluated with its
  full template set, so ``λ`` may lie outside the fitted window (the AGN continuum is then
  extrapolated, e.g. 4200 A from the H-beta window);
* **stellar velocity dispersion** ``sigma_* = sqrt(sigma_0^2 + sigma^2 - sigma_inst^2)``:
  the templates' own dispersion ``sigma_0`` (239 km/s for the built-in set, SDSS resolution
  included) plus the fitted broadening ``{host}_sigma`` in quadrature, less the instrumental
  dispersion (default the templates' own, ~61 km/s for SDSS; pass the spectrograph's). A fit
  at ``{host}_sigma = 0`` gives an upper limit of ``sigma_0``;
* **AGN-only luminosity**: :func:`sheap_dask.derived.luminosity.luminosity` already measures
  ``λL_λ`` of ``metadata["continuum"]``, which never includes the host: ``agn_luminosity`` is
  that, ``host_luminosity`` the starlight's at the same wavelength.

Every function returns ``(value, error)`` float64 arrays with Monte Carlo errors from
:mod:`sheap_dask.derived.errors`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import ModelError, OptionError
from ..units import DEFAULT_FLUX_UNIT
from .errors import as_params, mc_options, run
from .lines import continuum_names, sum_components
from .luminosity import DEFAULT_H0, DEFAULT_OM0, luminosity, rest_wavelength, spectral_luminosity

__all__ = ["host_names", "host_fraction", "frac_host_4200", "frac_host_5100", "stellar_dispersion", "agn_luminosity",
           "host_luminosity"]


def host_names(model) -> list[str]:
    """The model's host components (``metadata["host"]``); raises when it has none."""
    names = list((getattr(model, "metadata", None) or {}).get("host") or [])
    if not names:
        raise ModelError(
            f"model {getattr(model, 'name', model)!r} has no host-galaxy component; build it with "
            "sd.models.region(..., host=True) or add sd.models.host_component()."
        )
    return names


def _host_fn(model, names):
    """``f(wavelength (n,), p) -> host flux`` with each host's full template set."""
    import jax.numpy as jnp

    parts = []
    for name in names:
        comp = getattr(model, "component_objects", {}).get(name)
        idx = np.array([model.param_names.index(n) for n in comp.param_names]) if comp is not None else None
        if comp is None or "template_obj" not in comp.info:
            parts.append((model.components[name], None, None))
            continue
        tmpl = comp.info["template_obj"]
        parts.append((None, getattr(tmpl, "parent", None) or tmpl, idx))

    def host(wavelength, p):
        total = 0.0
        for fn, tmpl, idx in parts:
            if tmpl is None:
                total = total + fn(wavelength, p)
            else:
                q = p[idx]
                total = total + tmpl.evaluate(wavelength, q[: tmpl.k], q[tmpl.k], q[tmpl.k + 1])
        return total + jnp.zeros(jnp.shape(wavelength), p.dtype)

    return host


def _build_fraction(model, key: tuple):
    import jax.numpy as jnp

    wavelength, continuum, hosts = key
    host = _host_fn(model, list(hosts))
    cont = [model.components[c] for c in continuum]

    def f(p, x):
        wl = jnp.full((1,), wavelength, dtype=p.dtype)
        h = host(wl, p)[0]
        c = sum_components(cont, wl, p)[0]
        total = h + c
        return {"frac_host": jnp.where(total != 0, h / jnp.where(total != 0, total, 1.0), jnp.nan)}

    return f


def host_fraction(model, wavelength: float, params, params_err=None, *, continuum: Sequence[str] | None = None,
                  **kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
    """Host fraction ``H / (H + C)`` of the continuum at a rest wavelength (see the module docstring).

    Parameters
    ----------
    model : Model
        With a host component (``metadata["host"]``).
    wavelength : float
        Rest wavelength in Å (4200, 5100, ...).
    params, params_err : array (n_spectra, n_params) or (n_params,)
        Best-fit parameters and their errors.
    continuum : list of str, optional
        AGN continuum components (default: ``metadata["continuum"]`` without FeII).
    **kwargs
        Monte Carlo options (``n_samples``, ``seed``, ``index``, ``lower``, ``upper``,
        ``batch_size``).

    Returns
    -------
    (value, error)
    """
    wavelength = rest_wavelength(wavelength)
    opts = mc_options(kwargs)
    p, one = as_params(model, params)
    key = (wavelength, tuple(continuum_names(model, continuum)), tuple(host_names(model)))
    val, err = run(model, _build_fraction, key, p, params_err, 0.0, **opts)["frac_host"]
    return (val[0], err[0]) if one else (val, err)


def frac_host_4200(model, params, params_err=None, **kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
    """Host fraction at 4200 Å (:func:`host_fraction`)."""
    return host_fraction(model, 4200.0, params, params_err, **kwargs)


def frac_host_5100(model, params, params_err=None, **kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
    """Host fraction at 5100 Å (:func:`host_fraction`)."""
    return host_fraction(model, 5100.0, params, params_err, **kwargs)


def stellar_dispersion(model, params, params_err=None, *, instrumental_sigma: float | None = None,
                       host: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Stellar velocity dispersion ``sqrt(sigma_0^2 + sigma^2 - sigma_inst^2)`` (km/s).

    ``instrumental_sigma`` (km/s) defaults to the instrumental dispersion included in the
    templates' ``sigma_0`` (their header's ``sigma_inst_kms``; 0 for user templates without
    one). The error propagates the fitted ``sigma``'s error linearly (NaN where it is
    undefined, e.g. at its bound).
    """
    name = host or host_names(model)[0]
    comp = getattr(model, "component_objects", {}).get(name)
    info = (comp.info if comp is not None else (model.metadata.get("components") or {}).get(name)) or {}
    sigma0 = float(info.get("sigma0", 0.0))
    inst = float(info.get("sigma_inst", 0.0)) if instrumental_sigma is None else float(instrumental_sigma)
    if not (math.isfinite(inst) and inst >= 0):
        raise OptionError(f"instrumental_sigma={instrumental_sigma!r} must be >= 0 km/s.")
    p, one = as_params(model, params)
    j = model.param_names.index(f"{name}_sigma")
    s = p[:, j].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        sq = sigma0**2 + s**2 - inst**2
        val = np.where(sq > 0, np.sqrt(np.where(sq > 0, sq, 0.0)), np.nan)
        if params_err is None:
            err = np.full_like(val, np.nan)
        else:
            e, _ = as_params(model, params_err, "params_err")
            err = np.abs(s) * e[:, j] / val
    return (val[0], err[0]) if one else (val, err)


def agn_luminosity(model, wavelength: float, params, params_err=None, *, redshift, flux_unit: float = DEFAULT_FLUX_UNIT,
                   H0: float = DEFAULT_H0, Om0: float = DEFAULT_OM0, quantity: str = "lambda_l_lambda",
                   **kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
    """``λL_λ`` (or ``L_λ``) of the AGN continuum alone, host starlight and FeII excluded.

    The same as :func:`sheap_dask.derived.luminosity.luminosity` with the default continuum
    (which never includes the host); stated explicitly for catalogues.
    """
    return luminosity(model, wavelength, params, params_err, redshift=redshift, flux_unit=flux_unit, H0=H0, Om0=Om0,
                      quantity=quantity, continuum=continuum_names(model), **kwargs)


def host_luminosity(model, wavelength: float, params, params_err=None, *, redshift, flux_unit: float = DEFAULT_FLUX_UNIT,
                    H0: float = DEFAULT_H0, Om0: float = DEFAULT_OM0, quantity: str = "lambda_l_lambda",
                    **kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
    """``λL_λ`` (or ``L_λ``) of the host starlight at a rest wavelength (full template set)."""
    key = (float(wavelength), tuple(host_names(model)))
    return spectral_luminosity(model, _build_host_flux, key, params, params_err, redshift=redshift, flux_unit=flux_unit,
                               H0=H0, Om0=Om0, quantity=quantity, **kwargs)


def _build_host_flux(model, key: tuple):
    import jax.numpy as jnp

    wavelength, hosts = key
    host = _host_fn(model, list(hosts))
    return lambda p, x: {"f_lambda": host(jnp.full((1,), wavelength, dtype=p.dtype), p)[0]}
