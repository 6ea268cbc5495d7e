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
    res = lines.measure_line(MODEL, "oiii5007", params, e1, n_samples=200)
    # against the input errors, within Monte Carlo accuracy (200 draws: ~5%)
    np.testing.assert_allclose(res["flux"][1][:2], [5.0, 10.0], rtol=0.2)
    np.testing.assert_allclose(res["fwhm"][1][:2], [20.0, 40.0], rtol=0.2)
    np.testing.assert_allclose(res["shift_centroid"][1][:2], [10.0, 20.0], rtol=0.2)
    for key in res:
        assert res[key][1][2] == 0.0, key  # zero errors give exactly zero
    # same spectrum (same draws), doubled errors: a linear quantity's error doubles exactly
    doubled = lines.measure_line(MODEL, "oiii5007", params, 2 * e1, n_samples=200)
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
