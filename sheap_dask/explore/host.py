"""Host-galaxy quantities of a fit result as DataArrays (``fits.sheap.frac_host_5100()``, ...):
the :mod:`sheap_dask.derived.host` functions applied chunk by chunk along the spectrum
dimension, like :mod:`sheap_dask.explore.derived`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..derived import host as _host
from .derived import _apply, _one, _stack
from .link import Link

__all__ = ["host_fraction", "stellar_dispersion"]


def host_fraction(link: Link, wavelength: float, errors: bool, continuum: Sequence[str] | None, options: dict):
    """Host fraction at a rest wavelength (see ``SheapAccessor.frac_host``)."""
    model = link.get_model()
    _host.host_names(model)
    tag = f"{float(wavelength):g}"
    name = f"frac_host_{tag}"
    attrs = {"long_name": f"host-galaxy fraction of the continuum at {tag} Angstrom (rest): host / (host + AGN continuum)",
             "units": "1"}

    def compute(p, e, idx, z, lower, upper, **unc):
        v, s = _host.host_fraction(model, wavelength, p, e, continuum=continuum, index=idx, lower=lower, upper=upper, **unc,
                                   **options)
        return _stack([(v, s)])

    return _one(_apply(link, compute, [name], [attrs], errors=errors), errors)


def stellar_dispersion(link: Link, errors: bool, instrumental_sigma: float | None):
    """Stellar velocity dispersion (see ``SheapAccessor.stellar_dispersion``)."""
    model = link.get_model()
    _host.host_names(model)
    attrs = {"long_name": "stellar velocity dispersion of the host (sqrt(sigma_0^2 + host_sigma^2 - sigma_inst^2))",
             "units": "km/s"}

    def compute(p, e, idx, z, lower, upper, **unc):  # linear error from params_err
        v, s = _host.stellar_dispersion(model, p, e, instrumental_sigma=instrumental_sigma)
        return _stack([(np.asarray(v), np.asarray(s))])

    return _one(_apply(link, compute, ["sigma_star"], [attrs], errors=errors), errors)
