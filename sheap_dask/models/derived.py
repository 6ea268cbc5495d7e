"""Derived physics in one namespace: the public functions of :mod:`sheap_dask.derived`.

The code lives in ``sheap_dask/derived/`` (``lines``, ``luminosity``, ``bh_mass``, ``host``, ``errors``)
and the flux-unit parser in :mod:`sheap_dask.units`; this module keeps
``from sheap_dask.models import derived`` (the README's spelling) working.
"""

from __future__ import annotations

from ..derived.bh_mass import RECIPES, Recipe, bh_mass
from ..derived.errors import DEFAULT_N_SAMPLES
from ..derived.lines import (
    C_KMS,
    DEFAULT_N_GRID,
    LINE_NAMES,
    SHIFT_METHODS,
    VELOCITY_HALF_RANGE,
    continuum_names,
    ew,
    fwhm,
    line_flux,
    line_info,
    line_profile,
    measure_line,
    shift,
    sigma,
)
from ..derived.host import agn_luminosity, frac_host_4200, frac_host_5100, host_fraction, host_luminosity, stellar_dispersion
from ..derived.luminosity import (
    DEFAULT_H0,
    DEFAULT_OM0,
    MPC_CM,
    cosmology,
    line_luminosity,
    luminosity,
    luminosity_distance,
)
from ..units import DEFAULT_FLUX_UNIT, parse_flux_unit

__all__ = [
    "C_KMS",
    "DEFAULT_FLUX_UNIT",
    "DEFAULT_H0",
    "DEFAULT_N_GRID",
    "DEFAULT_N_SAMPLES",
    "DEFAULT_OM0",
    "LINE_NAMES",
    "MPC_CM",
    "RECIPES",
    "SHIFT_METHODS",
    "VELOCITY_HALF_RANGE",
    "Recipe",
    "agn_luminosity",
    "bh_mass",
    "continuum_names",
    "cosmology",
    "ew",
    "frac_host_4200",
    "frac_host_5100",
    "fwhm",
    "host_fraction",
    "host_luminosity",
    "line_flux",
    "line_info",
    "line_luminosity",
    "line_profile",
    "luminosity",
    "luminosity_distance",
    "measure_line",
    "parse_flux_unit",
    "shift",
    "sigma",
    "stellar_dispersion",
]
