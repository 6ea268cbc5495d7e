"""The Monte Carlo error engine (sheap_dask.derived.errors): scaling, reproducibility, ties."""

from __future__ import annotations

import numpy as np
from derived_toy import MODEL, err_on, make_params

from sheap_dask.derived import lines


# ---------------------------------------------------------------------------------------
# error propagation
# ---------------------------------------------------------------------------------------
def test_monte_carlo_errors_scale_with_params_err_and_vanish_without_them():
    params = make_params(3)
    e1 = err_on(3, oiii_flux=[5.0, 10.0, 0.0], oiii_fwhm=[20.0, 40.0, 0.0], oiii_shift=[10.0, 20.0, 0.0])
    res = lines.measure_line(MODEL, "oiii5007", params, e1, n_samples=1000)
    # against the input errors, within Monte Carlo accuracy (the 16-84% half-range of 1000
    # draws: ~5%)
    np.testing.assert_allclose(res["flux"][1][:2], [5.0, 10.0], rtol=0.2)
    np.testing.assert_allclose(res["fwhm"][1][:2], [20.0, 40.0], rtol=0.2)
    np.testing.assert_allclose(res["shift_centroid"][1][:2], [10.0, 20.0], rtol=0.2)
    for key in res:
        assert res[key][1][2] == 0.0, key  # zero errors give exactly zero
    # same spectrum (same draws), doubled errors: a linear quantity's error doubles exactly
    doubled = lines.measure_line(MODEL, "oiii5007", params, 2 * e1, n_samples=1000)
    np.testing.assert_allclose(doubled["flux"][1], 2 * res["flux"][1], rtol=1e-9)
    np.testing.assert_allclose(doubled["fwhm"][1], 2 * res["fwhm"][1], rtol=0.02)


def test_errors_are_reproducible_and_chunk_invariant():
    params = make_params(5, oiii_flux=[50, 60, 70, 80, 90])
    err = err_on(5, oiii_flux=3.0, oiii_fwhm=15.0)
    _, full = lines.fwhm(MODEL, "oiii5007", params, err, seed=7)
    _, part = lines.fwhm(MODEL, "oiii5007", params[2:], err[2:], seed=7, index=np.arange(2, 5))
    np.testing.assert_array_equal(full[2:], part)
    _, again = lines.fwhm(MODEL, "oiii5007", params, err, seed=7)
    np.testing.assert_array_equal(full, again)
    _, other = lines.fwhm(MODEL, "oiii5007", params, err, seed=8)
    assert not np.array_equal(full, other)


def test_nan_errors_propagate_only_where_used_and_ties_hold():
    params = make_params(2)
    err = err_on(2, oiii_flux=[np.nan, 2.0], ha_flux=[1.0, np.nan], hb1_shift=50.0)
    oiii = lines.measure_line(MODEL, "oiii5007", params, err)
    assert np.isnan(oiii["flux"][1][0]) and np.isfinite(oiii["flux"][1][1])
    # hb2_shift is tied to hb1_shift: the whole profile moves rigidly, so the peak shift error
    # equals the hb1_shift error and the width does not change at all
    hb = lines.measure_line(MODEL, "hbeta_broad", params, err, n_samples=200)
    np.testing.assert_allclose(hb["shift_peak"][1], 50.0, rtol=0.2)
    np.testing.assert_allclose(hb["fwhm"][1], 0.0, atol=0.5)


def test_correlated_draws_give_the_error_of_a_sum_and_undefined_parameters_nan_it():
    """Two components of one line whose fluxes are anti-correlated: the summed flux is well
    determined even though each part is not; draws from independent errors say otherwise."""
    params = make_params(2)
    names = MODEL.param_names
    i, j = names.index("hb1_flux"), names.index("hb2_flux")
    err = err_on(2, hb1_flux=100.0, hb2_flux=100.0)
    cov = np.zeros((2, len(names), len(names)))
    cov[:, i, i] = cov[:, j, j] = 100.0**2
    cov[:, i, j] = cov[:, j, i] = -0.99 * 100.0**2  # rho = -0.99: sigma(sum) = 100 sqrt(2 * 0.01) = 14.1
    independent = lines.line_flux(MODEL, "hbeta_broad", params, err, n_samples=2000)[1]
    correlated = lines.line_flux(MODEL, "hbeta_broad", params, err, cov=cov, n_samples=2000)[1]
    np.testing.assert_allclose(independent, 100.0 * np.sqrt(2), rtol=0.1)
    np.testing.assert_allclose(correlated, 100.0 * np.sqrt(0.02), rtol=0.1)
    # a parameter with an undefined (NaN) covariance: quantities that depend on it get NaN
    # errors, the others keep theirs
    cov[1, names.index("hb1_fwhm"), :] = np.nan
    cov[1, :, names.index("hb1_fwhm")] = np.nan
    fwhm = lines.fwhm(MODEL, "hbeta_broad", params, err, cov=cov)[1]
    oiii = lines.line_flux(MODEL, "oiii5007", params, err, cov=cov)[1]
    assert np.isfinite(fwhm[0]) and np.isnan(fwhm[1]) and np.all(np.isfinite(oiii))


def test_a_huge_error_elsewhere_leaves_correlated_draws_intact():
    """A line off the data's edge can get a 1e50 flux error; the draws of every other
    parameter must keep their precision (a plain eigendecomposition of such a covariance
    returns zero variance for the small ones)."""
    params = make_params(1)
    names = MODEL.param_names
    idx = [names.index(n) for n in ("hb1_flux", "hb1_fwhm", "oiii_flux")]
    sigma = np.array([100.0, 10.0, 1e50])
    rho = np.array([[1.0, 0.5, 0.3], [0.5, 1.0, 0.2], [0.3, 0.2, 1.0]])
    cov = np.zeros((1, len(names), len(names)))
    cov[0][np.ix_(idx, idx)] = sigma[:, None] * rho * sigma[None, :]
    err = np.sqrt(np.einsum("nii->ni", cov))
    width = lines.measure_line(MODEL, "hbeta_broad", params, err, cov=cov, n_samples=2000)["fwhm"][1]
    alone = cov.copy()
    alone[0][idx[2], :] = alone[0][:, idx[2]] = 0.0
    expected = lines.measure_line(MODEL, "hbeta_broad", params, err, cov=alone, n_samples=2000)["fwhm"][1]
    assert expected > 0
    np.testing.assert_allclose(width, expected, rtol=0.1)


def test_resampling_realizations_are_used_as_they_are():
    params = make_params(1)
    names = MODEL.param_names
    k = names.index("oiii_flux")
    draws = np.repeat(params[:, None, :], 25, axis=1)
    draws[0, :, k] = params[0, k] + np.linspace(-10.0, 10.0, 25)  # uniform: p16..p84 half-width 6.8
    draws[0, 3] = np.nan  # a realization that did not converge is left out
    _, err = lines.line_flux(MODEL, "oiii5007", params, None, draws=draws)
    np.testing.assert_allclose(err, 0.5 * (np.nanpercentile(draws[0, :, k], 84) - np.nanpercentile(draws[0, :, k], 16)), rtol=1e-6)
