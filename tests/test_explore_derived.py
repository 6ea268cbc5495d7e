"""Derived quantities on ``ds.sheap`` (sheap_dask.explore.derived) against the plain-array functions."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from explore_data import (
    MODEL,
    NAMES,
    OIII,
    PARAMS,
    Z,
    linked_fits,
    make_fits,
    make_spectra,
)

from sheap_dask.errors import ModelError, OptionError
from sheap_dask.models import (
    derived as D,  # the plain-array functions, by their documented path
)

spectra = pytest.fixture(make_spectra)
fits = pytest.fixture(linked_fits)  # the result with MODEL and spectra linked


def test_line_quantities_match_derived_functions(fits):
    da = fits.sheap.fwhm("hbeta_broad")
    assert isinstance(da, xr.DataArray) and da.name == "fwhm_hbeta_broad" and da.dims == ("spectrum",)
    assert da.attrs["units"] == "km/s"
    assert list(da["spectrum"].values) == list(range(100, 106)) and "redshift" in da.coords
    np.testing.assert_allclose(da.values, D.fwhm(MODEL, "hbeta_broad", PARAMS)[0])
    ds = fits.sheap.fwhm("hbeta_broad", errors=True)
    assert set(ds.data_vars) == {"fwhm_hbeta_broad", "fwhm_hbeta_broad_err"}
    # Monte Carlo draws are keyed by the integer spectrum labels
    labels = fits["spectrum"].values
    np.testing.assert_allclose(ds["fwhm_hbeta_broad_err"].values, D.fwhm(MODEL, "hbeta_broad", PARAMS, fits.params_err.values, index=labels)[1])
    assert np.all(ds["fwhm_hbeta_broad_err"].values > 0)
    flux = fits.sheap.flux("oiii5007")
    np.testing.assert_allclose(flux.values, PARAMS[:, NAMES.index("oiii_flux")], rtol=1e-6)
    assert flux.attrs["units"] == "1e-17 erg/s/cm2"
    np.testing.assert_allclose(fits.sheap.shift("hbeta_broad").values, PARAMS[:, NAMES.index("hb1_shift")], atol=1.0)
    np.testing.assert_allclose(fits.sheap.sigma("oiii5007").values, 400.0 / 2.3548200450309493, rtol=1e-4)
    ew = fits.sheap.ew("oiii5007")
    cont = PARAMS[:, 0] * (OIII / 5100.0) ** PARAMS[:, 1]
    np.testing.assert_allclose(ew.values, PARAMS[:, NAMES.index("oiii_flux")] / cont, rtol=1e-6)
    table = fits.sheap.measure("oiii5007")
    assert {"flux_oiii5007", "fwhm_oiii5007", "ew_oiii5007", "shift_oiii5007"} <= set(table.data_vars)


def test_luminosity_and_bh_mass(fits, spectra):
    lum = fits.sheap.luminosity(5100)
    assert lum.name == "lambda_l_lambda_5100" and lum.attrs["units"] == "erg/s"
    want, _ = D.luminosity(MODEL, 5100.0, PARAMS, redshift=Z)
    np.testing.assert_allclose(lum.values, want, rtol=1e-10)
    logl = fits.sheap.luminosity(5100, log=True, errors=True)
    np.testing.assert_allclose(logl["log_lambda_l_lambda_5100"].values, np.log10(want), rtol=1e-12)
    assert np.all(logl["log_lambda_l_lambda_5100_err"].values > 0)
    # the flux unit is read from the input's attrs; an explicit argument wins
    other = spectra.copy()
    other["flux"] = other["flux"].assign_attrs(units="1e-16 erg/s/cm2/A")
    tenfold = make_fits().sheap.use(model=MODEL, spectra=other).luminosity(5100)
    np.testing.assert_allclose(tenfold.values, 10 * want, rtol=1e-10)
    np.testing.assert_allclose(fits.sheap.luminosity(5100, flux_unit=1e-18).values, want / 10, rtol=1e-10)
    mass = fits.sheap.bh_mass("vp06_hbeta")
    np.testing.assert_allclose(mass.values, D.bh_mass(MODEL, "vp06_hbeta", PARAMS, redshift=Z)[0])
    assert "Vestergaard & Peterson 2006" in mass.attrs["reference"] and mass.attrs["units"] == "log10(M/M_sun)"
    assert np.all((mass.values > 6) & (mass.values < 10))



def test_unknown_line_lists_the_model_lines(fits):
    with pytest.raises(ModelError, match="unknown line 'hbeta'.*hbeta_broad, oiii5007"):
        fits.sheap.fwhm("hbeta")
    with pytest.raises(OptionError, match="recipe"):
        fits.sheap.bh_mass("nope")
    with pytest.raises(ModelError, match="unknown component"):
        fits.sheap.components(names=["feii"])


def test_undetected_lines_give_nan_shapes_and_upper_limits_and_errors_use_the_covariance():
    """A fit result through fit_dataset: one spectrum without a broad line. Its FWHM and mass
    are NaN (flagged), its log line luminosity a 3-sigma upper limit; errors of the detected
    ones come from params_cov (correlated), or from params_mc with n_mc."""
    import dask

    from explore_data import spectra_for

    import sheap_dask as sd
    from sheap_dask.quality import Quality

    p = PARAMS.copy()
    p[0, NAMES.index("hb1_flux")] = p[0, NAMES.index("hb2_flux")] = 0.0
    ds = spectra_for(p)
    with dask.config.set(scheduler="synchronous"):
        fits = sd.fit_dataset(ds, MODEL, progress=False, num_steps=200).compute()
    fits.sheap.use(model=MODEL, spectra=ds)
    detected = fits.line_detected.sel(line="hbeta_broad").values
    assert not detected[0] and detected[1:].all()
    assert fits.quality.values[0] & Quality.BROAD_LINE_UNDETECTED
    fwhm = fits.sheap.fwhm("hbeta_broad", errors=True)
    assert np.isnan(fwhm.fwhm_hbeta_broad.values[0]) and np.isfinite(fwhm.fwhm_hbeta_broad.values[1:]).all()
    assert not fwhm.detected_hbeta_broad.values[0]
    kept = fits.sheap.fwhm("hbeta_broad", undetected="keep").values
    assert np.isfinite(kept[0])
    lum = fits.sheap.line_luminosity("hbeta_broad", log=True, errors=True)
    name = "log_luminosity_hbeta_broad"
    assert lum[name + "_upper_limit"].values[0] and np.isnan(lum[name + "_err"].values[0]) and np.isfinite(lum[name].values[0])
    assert np.all(lum[name + "_err"].values[1:] < 0.2)  # bounded: no 1e5-dex errors
    assert np.isnan(fits.sheap.bh_mass("vp06_hbeta").values[0])
    # the summed broad flux: from the covariance (the two Gaussians trade flux), close to the
    # fit's own line_flux_err, not to the independent-errors estimate
    flux = fits.sheap.flux("hbeta_broad", errors=True)
    np.testing.assert_allclose(flux.flux_hbeta_broad_err.values[1:], fits.line_flux_err.sel(line="hbeta_broad").values[1:], rtol=0.25)
