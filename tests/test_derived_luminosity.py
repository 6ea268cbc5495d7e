"""Cosmology and luminosities (sheap_dask.derived.luminosity) against astropy and analytic values."""

from __future__ import annotations

import numpy as np
import pytest
from derived_toy import MODEL, dl_cm, make_params

from sheap_dask.derived import luminosity as lum
from sheap_dask.errors import OptionError


@pytest.mark.parametrize("H0,Om0", [(70.0, 0.3), (67.7, 0.31), (100.0, 1.0)])
def test_luminosity_distance_matches_astropy(H0, Om0):
    from astropy.cosmology import FlatLambdaCDM

    z = np.array([0.001, 0.05, 0.3, 1.0, 2.5, 7.0])
    expected = FlatLambdaCDM(H0=H0, Om0=Om0).luminosity_distance(z).to("cm").value
    np.testing.assert_allclose(lum.luminosity_distance(z, H0=H0, Om0=Om0), expected, rtol=1e-8)
    assert lum.luminosity_distance(0.0) == 0.0
    assert np.isnan(lum.luminosity_distance(-0.5))


def test_luminosity_distance_rejects_bad_cosmology():
    with pytest.raises(OptionError, match="H0"):
        lum.luminosity_distance(1.0, H0=-70)
    with pytest.raises(OptionError, match="Om0"):
        lum.luminosity_distance(1.0, Om0=1.5)



def test_continuum_luminosity_of_a_power_law():
    z = np.array([0.2, 1.1])
    params = make_params(2, powerlaw_norm=[12.0, 3.0], powerlaw_index=[-1.5, -0.5])
    lam_l, _ = lum.luminosity(MODEL, 3000.0, params, redshift=z)
    f3000 = np.array([12.0, 3.0]) * (3000.0 / 5100.0) ** np.array([-1.5, -0.5])
    expected = 4 * np.pi * dl_cm(z) ** 2 * f3000 * 1e-17 * 3000.0
    np.testing.assert_allclose(lam_l, expected, rtol=1e-8)
    l_lam, _ = lum.luminosity(MODEL, 3000.0, params, redshift=z, quantity="l_lambda", flux_unit=1e-16, H0=60.0)
    np.testing.assert_allclose(l_lam, 4 * np.pi * dl_cm(z, H0=60.0) ** 2 * f3000 * 1e-16, rtol=1e-8)
    nan_z, _ = lum.luminosity(MODEL, 3000.0, params, redshift=[0.0, -0.1])
    assert np.all(np.isnan(nan_z))


def test_agn_continuum_absent_only_when_all_its_fluxes_rest_at_zero():
    """A fit whose power law (the AGN continuum of a region with a host) vanished has no AGN
    luminosity; a host at zero or FeII at zero does not make the AGN continuum absent."""
    import sheap_dask as sd
    from sheap_dask.derived.luminosity import agn_continuum_absent

    model = sd.models.region("hbeta")
    names = model.param_names
    params = np.tile(model.params.values, (3, 1))
    at_bound = np.zeros_like(params, dtype=bool)
    norm = names.index("powerlaw_norm")
    params[1, norm], at_bound[1, norm] = 0.0, True  # the power law at zero: a galaxy
    for p in [n for n in names if n.startswith("host_w")] + ["feii_amplitude"]:  # the other continua at zero
        params[2, names.index(p)], at_bound[2, names.index(p)] = 0.0, True
    np.testing.assert_array_equal(agn_continuum_absent(model, at_bound, params), [False, True, False])
