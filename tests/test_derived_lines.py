"""Line measurements (sheap_dask.derived.lines) against analytic and brute-force values."""

from __future__ import annotations

import numpy as np
import pytest
from derived_toy import FWHM_TO_SIGMA, HB, LOR, MODEL, NAMES, OIII, C, make_params

import sheap_dask as sd
from sheap_dask.derived import bh_mass as bhm
from sheap_dask.derived import lines
from sheap_dask.derived import luminosity as lum
from sheap_dask.errors import InputDataError, ModelError, OptionError


# ---------------------------------------------------------------------------------------
# single profiles against analytic values
# ---------------------------------------------------------------------------------------
def test_single_gaussian_matches_analytic_values():
    flux = np.array([100.0, 40.0, 7.0])
    shift = np.array([0.0, -350.0, 620.0])
    fwhm = np.array([400.0, 150.0, 1000.0])
    params = make_params(3, oiii_flux=flux, oiii_shift=shift, oiii_fwhm=fwhm, powerlaw_index=[-1.5, 0.0, -2.0])
    res = lines.measure_line(MODEL, "oiii5007", params, median=True)
    np.testing.assert_allclose(res["flux"][0], flux, rtol=1e-6)
    np.testing.assert_allclose(res["fwhm"][0], fwhm, rtol=1e-3)
    np.testing.assert_allclose(res["sigma"][0], fwhm * FWHM_TO_SIGMA, rtol=1e-4)
    np.testing.assert_allclose(res["shift_peak"][0], shift, atol=0.05)
    np.testing.assert_allclose(res["shift_centroid"][0], shift, atol=1e-6)
    np.testing.assert_allclose(res["shift_median"][0], shift, atol=0.05)
    cont = 10.0 * (OIII / 5100.0) ** np.array([-1.5, 0.0, -2.0])
    np.testing.assert_allclose(res["ew"][0], flux / cont, rtol=1e-6)
    assert np.all(np.isnan(res["fwhm"][1]))  # no params_err: errors are NaN
    # the thin wrappers return the same numbers
    np.testing.assert_allclose(lines.fwhm(MODEL, "oiii5007", params)[0], res["fwhm"][0])
    np.testing.assert_allclose(lines.ew(MODEL, "oiii5007", params)[0], res["ew"][0])
    np.testing.assert_allclose(lines.shift(MODEL, "oiii5007", params, method="centroid")[0], shift, atol=1e-6)


def test_lorentzian_fwhm_peak_and_truncated_flux():
    shift = np.array([0.0, 800.0])
    fwhm = np.array([2500.0, 6000.0])
    params = make_params(2, lor_flux=[50.0, 80.0], lor_shift=shift, lor_fwhm=fwhm)
    res = lines.measure_line(MODEL, "lor_line", params)
    np.testing.assert_allclose(res["fwhm"][0], fwhm, rtol=1e-3)
    np.testing.assert_allclose(res["shift_peak"][0], shift, atol=0.5)
    # analytic integral of the Lorentzian over the finite window |v| <= 50 000 km/s
    centre = LOR * (1 + shift / C)
    gamma = 0.5 * centre * fwhm / C
    lo, hi = LOR * (1 - 50000.0 / C), LOR * (1 + 50000.0 / C)
    expected = np.array([50.0, 80.0]) / np.pi * (np.arctan((hi - centre) / gamma) - np.arctan((lo - centre) / gamma))
    np.testing.assert_allclose(res["flux"][0], expected, rtol=1e-5)
    assert np.all(res["flux"][0] < [50.0, 80.0])  # the wings beyond the window are not counted


def brute_force(flux1, s1, w1, flux2, s2, w2):
    """FWHM, sigma and peak of a two-Gaussian H-beta from a 400 001-point numpy grid."""
    x = np.linspace(HB * (1 - 0.2), HB * (1 + 0.2), 400001)

    def gauss(f, s, w):
        c = HB * (1 + s / C)
        sd_ = c * w / C * FWHM_TO_SIGMA
        return f / (np.sqrt(2 * np.pi) * sd_) * np.exp(-0.5 * ((x - c) / sd_) ** 2)

    y = gauss(flux1, s1, w1) + gauss(flux2, s2, w2)
    k = np.argmax(y)
    above = np.flatnonzero(y >= y[k] / 2)
    fwhm = (x[above[-1]] - x[above[0]]) / x[k] * C
    mean = np.sum(x * y) / np.sum(y)
    sig = np.sqrt(np.sum((x - mean) ** 2 * y) / np.sum(y)) / x[k] * C
    return fwhm, sig, (x[k] / HB - 1) * C


@pytest.mark.parametrize(
    "case",
    [
        # core + wing (single-peaked, non-Gaussian)
        dict(hb1_flux=500.0, hb1_shift=150.0, hb1_fwhm=2500.0, hb2_flux=300.0, hb2_fwhm=9000.0),
        # well-separated equal components: double-peaked, FWHM from the outermost crossings
        dict(hb1_flux=400.0, hb1_shift=-2500.0, hb1_fwhm=2000.0, hb2_flux=380.0, hb2_fwhm=2000.0),
    ],
)
def test_two_gaussian_broad_line_matches_brute_force(case):
    params = make_params(1, **case)
    res = lines.measure_line(MODEL, "hbeta_broad", params)
    s2 = case.get("hb1_shift")  # hb2_shift is tied to hb1_shift ...
    if case["hb1_shift"] < 0:  # ... so place the second peak by hand for the double-peaked case
        params[0, NAMES.index("hb2_shift")] = 2500.0
        res = lines.measure_line(MODEL, "hbeta_broad", params)
        s2 = 2500.0
    fw, sig, peak = brute_force(case["hb1_flux"], case["hb1_shift"], case["hb1_fwhm"], case["hb2_flux"], s2, case["hb2_fwhm"])
    np.testing.assert_allclose(res["fwhm"][0], fw, rtol=2e-3)
    np.testing.assert_allclose(res["sigma"][0], sig, rtol=2e-3)
    np.testing.assert_allclose(res["shift_peak"][0], peak, atol=5.0)
    np.testing.assert_allclose(res["flux"][0], case["hb1_flux"] + case["hb2_flux"], rtol=1e-6)
    if case["hb1_shift"] < 0:
        assert res["fwhm"][0][0] > 6000.0  # spans both peaks, not one of them


def test_zero_line_gives_nan_widths_and_zero_flux():
    params = make_params(1, oiii_flux=0.0)
    res = lines.measure_line(MODEL, "oiii5007", params)
    assert res["flux"][0][0] == 0.0 and res["ew"][0][0] == 0.0
    assert np.isnan(res["fwhm"][0][0]) and np.isnan(res["sigma"][0][0]) and np.isnan(res["shift_peak"][0][0])


def test_line_profile_is_the_sum_of_the_line_components():
    params = make_params(2)
    v, wl, prof = lines.line_profile(MODEL, "hbeta_broad", params)
    assert v.shape == wl.shape == (lines.DEFAULT_N_GRID,) and prof.shape == (2, lines.DEFAULT_N_GRID)
    np.testing.assert_allclose(wl, HB * (1 + v / C))
    direct = MODEL.components["hb1"](wl, params[0]) + MODEL.components["hb2"](wl, params[0])
    np.testing.assert_allclose(prof[0], np.asarray(direct), rtol=1e-12)


def test_float32_parameters_give_float32_accuracy():
    params = make_params(2, hb2_flux=0.0, hb1_fwhm=[3000.0, 5000.0]).astype(np.float32)
    value, _ = lines.fwhm(MODEL, "hbeta_broad", params)
    np.testing.assert_allclose(value, [3000.0, 5000.0], rtol=2e-3)
    logm, _ = bhm.bh_mass(MODEL, "vp06_hbeta", params, redshift=2.0)
    assert np.all(np.isfinite(logm))  # 4π d_L² ~ 1e57 cm² would overflow float32 outside log space



# ---------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------
def test_clear_errors():
    params = make_params(1)
    with pytest.raises(ModelError, match="unknown line 'hbeta'.*hbeta_broad") as info:
        lines.fwhm(MODEL, "hbeta", params)
    assert "oiii5007" in str(info.value)
    with pytest.raises(OptionError, match="unknown black-hole mass recipe"):
        bhm.bh_mass(MODEL, "vp07", params, redshift=1.0)
    with pytest.raises(InputDataError, match="shape"):
        lines.fwhm(MODEL, "oiii5007", params[:, :3])
    with pytest.raises(InputDataError, match="redshift"):
        lum.luminosity(MODEL, 5100.0, params, redshift=None)
    with pytest.raises(OptionError, match="method"):
        lines.shift(MODEL, "oiii5007", params, method="mode")
    bare = sd.Model(MODEL.func, MODEL.params, components=MODEL.components, metadata={"lines": MODEL.metadata["lines"]})
    with pytest.raises(ModelError, match="defines no continuum"):
        lines.ew(bare, "oiii5007", params)
    with pytest.raises(ModelError, match="not components"):
        lines.ew(MODEL, "oiii5007", params, continuum=["feii"])
    no_lines = sd.Model(MODEL.func, MODEL.params)
    with pytest.raises(ModelError, match="no line catalogue"):
        lines.fwhm(no_lines, "oiii5007", params)


def test_feii_is_not_continuum_by_default():
    meta = {"continuum": ["powerlaw", "feii"], "components": {"powerlaw": {"kind": "powerlaw"}, "feii": {"kind": "feii"}}}
    model = sd.Model(MODEL.func, MODEL.params, components={**MODEL.components, "feii": MODEL.components["powerlaw"]}, metadata=meta)
    assert lines.continuum_names(model) == ["powerlaw"]
    assert lines.continuum_names(model, ["powerlaw", "feii"]) == ["powerlaw", "feii"]
