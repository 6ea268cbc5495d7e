"""Single-epoch virial black-hole masses: the published recipes and :func:`bh_mass`.

``log10 M = zero_point + lum_slope log10(L / lum_norm) + fwhm_slope log10(FWHM / 1000 km/s)``
with the FWHM measured on the line's summed profile (:mod:`sheap_dask.derived.lines`) and
``L`` a continuum ``λL_λ`` or the line's own luminosity (:mod:`sheap_dask.derived.luminosity`),
both from the same Monte Carlo draws (:mod:`sheap_dask.derived.errors`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import OptionError
from ..units import DEFAULT_FLUX_UNIT
from .errors import as_params, mc_options, run
from .lines import (
    DEFAULT_N_GRID,
    check_n_grid,
    continuum_fn,
    continuum_names,
    line_info,
    line_stats_fn,
    velocity_half_range,
)
from .luminosity import DEFAULT_H0, DEFAULT_OM0, log_lum_factor

__all__ = ["RECIPES", "Recipe", "bh_mass"]


@dataclass(frozen=True)
class Recipe:
    """A single-epoch virial mass calibration.

    ``log10(M/M_sun) = zero_point + lum_slope * log10(L / lum_norm)
    + fwhm_slope * log10(FWHM / 1000 km/s)``, where ``L`` is ``λL_λ`` at ``wavelength``
    (``luminosity="continuum"``) or the luminosity of ``line`` itself (``"line"``).
    """

    name: str
    line: str
    luminosity: str  # "continuum" or "line"
    wavelength: float | None
    lum_norm: float
    lum_slope: float
    fwhm_slope: float
    zero_point: float
    scatter_dex: float | None
    reference: str


RECIPES: dict[str, Recipe] = {
    # VP06 eq. (5): log M = log{[FWHM(Hβ)/1000]^2 [λL5100/1e44]^0.50} + 6.91; scatter 0.43 dex.
    "vp06_hbeta": Recipe(
        "vp06_hbeta", "hbeta_broad", "continuum", 5100.0, 1e44, 0.50, 2.0, 6.91, 0.43,
        "Vestergaard & Peterson 2006, ApJ 641, 689, eq. 5",
    ),
    # VP06 eq. (6): log M = log{[FWHM(Hβ)/1000]^2 [L(Hβ)/1e42]^0.63} + 6.67; scatter 0.43 dex.
    "vp06_hbeta_line": Recipe(
        "vp06_hbeta_line", "hbeta_broad", "line", None, 1e42, 0.63, 2.0, 6.67, 0.43,
        "Vestergaard & Peterson 2006, ApJ 641, 689, eq. 6",
    ),
    # VP06 eq. (7): log M = log{[FWHM(CIV)/1000]^2 [λL1350/1e44]^0.53} + 6.66; scatter 0.36 dex.
    "vp06_civ": Recipe(
        "vp06_civ", "civ_broad", "continuum", 1350.0, 1e44, 0.53, 2.0, 6.66, 0.36,
        "Vestergaard & Peterson 2006, ApJ 641, 689, eq. 7",
    ),
    # VO09 eq. (1): log M = log{[FWHM(MgII)/1000]^2 [λL3000/1e44]^0.5} + 6.86; scatter 0.55 dex.
    "vo09_mgii": Recipe(
        "vo09_mgii", "mgii_broad", "continuum", 3000.0, 1e44, 0.50, 2.0, 6.86, 0.55,
        "Vestergaard & Osmer 2009, ApJ 699, 800, eq. 1",
    ),
    # Shen et al. 2011 eq. (10) with their own MgII calibration (a, b) = (0.740, 0.62):
    # log M = 0.740 + 0.62 log(λL3000/1e44) + 2 log(FWHM/km/s) = 6.74 + ... with FWHM/1000.
    "shen11_mgii": Recipe(
        "shen11_mgii", "mgii_broad", "continuum", 3000.0, 1e44, 0.62, 2.0, 6.74, None,
        "Shen et al. 2011, ApJS 194, 45, eq. 10 with (a, b) = (0.740, 0.62)",
    ),
    # GH05 eq. (6): M = 2.0e6 (L_Hα/1e42)^0.55 (FWHM_Hα/1000)^2.06 M_sun.
    "gh05_halpha": Recipe(
        "gh05_halpha", "halpha_broad", "line", None, 1e42, 0.55, 2.06, math.log10(2.0e6), None,
        "Greene & Ho 2005, ApJ 630, 122, eq. 6",
    ),
}  # fmt: skip


def _build_bh_mass(model, key: tuple):
    """The measurement ``f(p, x) -> {log_mass}`` of one recipe; ``x = log10(4π d_L² flux_unit)``."""
    import jax.numpy as jnp

    recipe_name, vhalf, n_grid, continuum = key
    r = RECIPES[recipe_name]
    stats, _ = line_stats_fn(model, r.line, vhalf, n_grid)
    cont = continuum_fn(model, continuum) if r.luminosity == "continuum" else None

    def f(p, x):
        # L in erg/s: λ f_λ (continuum) or ∫ f dλ (line)
        s = stats(p)
        if cont is not None:
            log_l = jnp.log10(r.wavelength * cont(r.wavelength, p)) + x
        else:
            log_l = jnp.log10(s["flux"]) + x
        log_m = r.zero_point + r.lum_slope * (log_l - math.log10(r.lum_norm)) + r.fwhm_slope * jnp.log10(s["fwhm"] / 1000.0)
        return {"log_mass": log_m}

    return f


def bh_mass(
    model,
    recipe: str,
    params,
    params_err=None,
    *,
    redshift,
    flux_unit: float = DEFAULT_FLUX_UNIT,
    H0: float = DEFAULT_H0,
    Om0: float = DEFAULT_OM0,
    continuum: Sequence[str] | None = None,
    velocity_range: float | None = None,
    n_grid: int = DEFAULT_N_GRID,
    **kwargs: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """Single-epoch virial black-hole mass, ``log10(M_BH / M_sun)``, with its error.

    ``log10 M = zero_point + lum_slope log10(L / lum_norm) + fwhm_slope log10(FWHM / 1000 km/s)``
    with the FWHM measured on the line's summed profile (:func:`fwhm`). Recipes
    (:data:`RECIPES`):

    ``"vp06_hbeta"``
        Vestergaard & Peterson 2006, ApJ 641, 689, eq. 5:
        ``log M = log{[FWHM(Hβ)/1000]² [λL5100/1e44 erg/s]^0.50} + 6.91`` (scatter 0.43 dex).
    ``"vp06_hbeta_line"``
        ibid. eq. 6: ``log M = log{[FWHM(Hβ)/1000]² [L(Hβ)/1e42 erg/s]^0.63} + 6.67`` (0.43 dex).
    ``"vp06_civ"``
        ibid. eq. 7: ``log M = log{[FWHM(CIV)/1000]² [λL1350/1e44 erg/s]^0.53} + 6.66`` (0.36 dex).
    ``"vo09_mgii"``
        Vestergaard & Osmer 2009, ApJ 699, 800, eq. 1:
        ``log M = log{[FWHM(MgII)/1000]² [λL3000/1e44 erg/s]^0.5} + 6.86`` (0.55 dex).
    ``"shen11_mgii"``
        Shen et al. 2011, ApJS 194, 45, eq. 10 with their MgII calibration (a, b) = (0.740, 0.62):
        ``log M = 0.740 + 0.62 log(λL3000/1e44 erg/s) + 2 log(FWHM/km/s)``.
    ``"gh05_halpha"``
        Greene & Ho 2005, ApJ 630, 122, eq. 6:
        ``M = 2.0e6 (L(Hα)/1e42 erg/s)^0.55 (FWHM(Hα)/1000 km/s)^2.06 M_sun``.

    The error is the Monte Carlo measurement error (FWHM and luminosity from the same draws);
    the recipe's intrinsic scatter is not included (see ``RECIPES[recipe].scatter_dex``).

    Parameters
    ----------
    recipe : str
        A key of :data:`RECIPES`.
    Others
        As :func:`luminosity` and :func:`measure_line`.

    Returns
    -------
    (value, error)
        log10 solar masses and its 1-sigma error (dex).
    """
    if recipe not in RECIPES:
        raise OptionError(f"unknown black-hole mass recipe {recipe!r}; use one of {', '.join(RECIPES)}.")
    r = RECIPES[recipe]
    info = line_info(model, r.line)
    cont = tuple(continuum_names(model, continuum)) if r.luminosity == "continuum" else None
    opts = mc_options(kwargs)
    p, one = as_params(model, params)
    log_factor = log_lum_factor(redshift, p.shape[0], flux_unit, H0, Om0)
    key = (recipe, velocity_half_range(info, velocity_range), check_n_grid(n_grid), cont)
    # the luminosity factor enters as log10 so float32 never overflows (4π d_L² ~ 1e57 cm²)
    val, err = run(model, _build_bh_mass, key, p, params_err, log_factor, **opts)["log_mass"]
    return (val[0], err[0]) if one else (val, err)
