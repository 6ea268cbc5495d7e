"""Derived physics (sheap_dask.models.derived) against analytic and brute-force values."""

from __future__ import annotations

import math

import numpy as np
import pytest

import sheap_dask as sd
from sheap_dask.errors import InputDataError, ModelError, OptionError
from sheap_dask.models import derived as D
from sheap_dask.models.profiles import gaussian, lorentzian

C = 299792.458
HB, OIII, HA, MG, CIV, LOR = 4862.68, 5008.24, 6564.61, 2798.75, 1549.05, 6300.0
FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))


def toy_model() -> sd.Model:
    """Power law + two broad H-beta Gaussians (shift of the second tied to the first) +
    narrow [OIII] + broad H-alpha, MgII, CIV Gaussians + a Lorentzian line, following the
    built-in models' metadata contract."""
    p = sd.Parameters()
    p.add("powerlaw_norm", 10.0, min=0.0).add("powerlaw_index", -1.5, min=-5.0, max=5.0)
    p.add("hb1_flux", 500.0, min=0.0).add("hb1_shift", 0.0, min=-3000.0, max=3000.0).add("hb1_fwhm", 3000.0, min=500.0, max=20000.0)
    p.add("hb2_flux", 300.0, min=0.0).add("hb2_shift", 0.0, tie="hb2_shift = hb1_shift + 0").add("hb2_fwhm", 8000.0, min=500.0, max=20000.0)
    p.add("oiii_flux", 100.0, min=0.0).add("oiii_shift", 0.0, min=-1000.0, max=1000.0).add("oiii_fwhm", 400.0, min=50.0, max=1500.0)
    for name in ("ha", "mg", "civ", "lor"):
        p.add(f"{name}_flux", 200.0, min=0.0).add(f"{name}_shift", 0.0, min=-3000.0, max=3000.0)
        p.add(f"{name}_fwhm", 4000.0, min=500.0, max=20000.0)
    ix = {n: i for i, n in enumerate(p.names)}

    def g(prefix, lam0, prof=gaussian):
        return lambda x, q: prof(x, q[ix[prefix + "_flux"]], q[ix[prefix + "_shift"]], q[ix[prefix + "_fwhm"]], lam0)

    comps = {
        "powerlaw": lambda x, q: q[0] * (x / 5100.0) ** q[1],
        "hb1": g("hb1", HB), "hb2": g("hb2", HB), "oiii": g("oiii", OIII), "ha": g("ha", HA),
        "mg": g("mg", MG), "civ": g("civ", CIV), "lor": g("lor", LOR, lorentzian),
    }  # fmt: skip

    def func(x, q):
        return sum(f(x, q) for f in comps.values())

    lines = {
        "hbeta_broad": {"rest_wavelength": HB, "components": ["hb1", "hb2"], "kind": "broad"},
        "oiii5007": {"rest_wavelength": OIII, "components": ["oiii"], "kind": "narrow"},
        "halpha_broad": {"rest_wavelength": HA, "components": ["ha"], "kind": "broad"},
        "mgii_broad": {"rest_wavelength": MG, "components": ["mg"], "kind": "broad"},
        "civ_broad": {"rest_wavelength": CIV, "components": ["civ"], "kind": "broad"},
        "lor_line": {"rest_wavelength": LOR, "components": ["lor"], "kind": "broad"},
    }
    return sd.Model(func, p, name="toy", components=comps, metadata={"lines": lines, "continuum": ["powerlaw"]})


MODEL = toy_model()
NAMES = MODEL.param_names


def make_params(n: int = 3, **overrides) -> np.ndarray:
    base = np.tile(MODEL.params.values, (n, 1))
    for name, values in overrides.items():
        base[:, NAMES.index(name)] = values
    return base


def err_on(n: int, **errs) -> np.ndarray:
    e = np.zeros((n, len(NAMES)))
    for name, values in errs.items():
        e[:, NAMES.index(name)] = values
    return e


# ---------------------------------------------------------------------------------------
# single profiles against analytic values
# ---------------------------------------------------------------------------------------
def test_single_gaussian_matches_analytic_values():
    flux = np.array([100.0, 40.0, 7.0])
    shift = np.array([0.0, -350.0, 620.0])
    fwhm = np.array([400.0, 150.0, 1000.0])
    params = make_params(3, oiii_flux=flux, oiii_shift=shift, oiii_fwhm=fwhm, powerlaw_index=[-1.5, 0.0, -2.0])
    res = D.measure_line(MODEL, "oiii5007", params, median=True)
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
    np.testing.assert_allclose(D.fwhm(MODEL, "oiii5007", params)[0], res["fwhm"][0])
    np.testing.assert_allclose(D.ew(MODEL, "oiii5007", params)[0], res["ew"][0])
    np.testing.assert_allclose(D.shift(MODEL, "oiii5007", params, method="centroid")[0], shift, atol=1e-6)


def test_lorentzian_fwhm_peak_and_truncated_flux():
    shift = np.array([0.0, 800.0])
    fwhm = np.array([2500.0, 6000.0])
    params = make_params(2, lor_flux=[50.0, 80.0], lor_shift=shift, lor_fwhm=fwhm)
    res = D.measure_line(MODEL, "lor_line", params)
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
    res = D.measure_line(MODEL, "hbeta_broad", params)
    s2 = case.get("hb1_shift")  # hb2_shift is tied to hb1_shift ...
    if case["hb1_shift"] < 0:  # ... so place the second peak by hand for the double-peaked case
        params[0, NAMES.index("hb2_shift")] = 2500.0
        res = D.measure_line(MODEL, "hbeta_broad", params)
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
    res = D.measure_line(MODEL, "oiii5007", params)
    assert res["flux"][0][0] == 0.0 and res["ew"][0][0] == 0.0
    assert np.isnan(res["fwhm"][0][0]) and np.isnan(res["sigma"][0][0]) and np.isnan(res["shift_peak"][0][0])


def test_line_profile_is_the_sum_of_the_line_components():
    params = make_params(2)
    v, wl, prof = D.line_profile(MODEL, "hbeta_broad", params)
    assert v.shape == wl.shape == (D.DEFAULT_N_GRID,) and prof.shape == (2, D.DEFAULT_N_GRID)
    np.testing.assert_allclose(wl, HB * (1 + v / C))
    direct = MODEL.components["hb1"](wl, params[0]) + MODEL.components["hb2"](wl, params[0])
    np.testing.assert_allclose(prof[0], np.asarray(direct), rtol=1e-12)


def test_float32_parameters_give_float32_accuracy():
    params = make_params(2, hb2_flux=0.0, hb1_fwhm=[3000.0, 5000.0]).astype(np.float32)
    value, _ = D.fwhm(MODEL, "hbeta_broad", params)
    np.testing.assert_allclose(value, [3000.0, 5000.0], rtol=2e-3)
    logm, _ = D.bh_mass(MODEL, "vp06_hbeta", params, redshift=2.0)
    assert np.all(np.isfinite(logm))  # 4π d_L² ~ 1e57 cm² would overflow float32 outside log space


# ---------------------------------------------------------------------------------------
# cosmology, luminosities, black-hole masses
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("H0,Om0", [(70.0, 0.3), (67.7, 0.31), (100.0, 1.0)])
def test_luminosity_distance_matches_astropy(H0, Om0):
    from astropy.cosmology import FlatLambdaCDM

    z = np.array([0.001, 0.05, 0.3, 1.0, 2.5, 7.0])
    expected = FlatLambdaCDM(H0=H0, Om0=Om0).luminosity_distance(z).to("cm").value
    np.testing.assert_allclose(D.luminosity_distance(z, H0=H0, Om0=Om0), expected, rtol=1e-8)
    assert D.luminosity_distance(0.0) == 0.0
    assert np.isnan(D.luminosity_distance(-0.5))


def test_luminosity_distance_rejects_bad_cosmology():
    with pytest.raises(OptionError, match="H0"):
        D.luminosity_distance(1.0, H0=-70)
    with pytest.raises(OptionError, match="Om0"):
        D.luminosity_distance(1.0, Om0=1.5)


def dl_cm(z, H0=70.0, Om0=0.3):
    from astropy.cosmology import FlatLambdaCDM

    return FlatLambdaCDM(H0=H0, Om0=Om0).luminosity_distance(z).to("cm").value


def test_continuum_luminosity_of_a_power_law():
    z = np.array([0.2, 1.1])
    params = make_params(2, powerlaw_norm=[12.0, 3.0], powerlaw_index=[-1.5, -0.5])
    lam_l, _ = D.luminosity(MODEL, 3000.0, params, redshift=z)
    f3000 = np.array([12.0, 3.0]) * (3000.0 / 5100.0) ** np.array([-1.5, -0.5])
    expected = 4 * np.pi * dl_cm(z) ** 2 * f3000 * 1e-17 * 3000.0
    np.testing.assert_allclose(lam_l, expected, rtol=1e-8)
    l_lam, _ = D.luminosity(MODEL, 3000.0, params, redshift=z, quantity="l_lambda", flux_unit=1e-16, H0=60.0)
    np.testing.assert_allclose(l_lam, 4 * np.pi * dl_cm(z, H0=60.0) ** 2 * f3000 * 1e-16, rtol=1e-8)
    nan_z, _ = D.luminosity(MODEL, 3000.0, params, redshift=[0.0, -0.1])
    assert np.all(np.isnan(nan_z))


def test_bh_mass_recipes_match_the_published_formulae():
    # single-Gaussian broad lines (hb2 off) so FWHM is the fwhm parameter exactly
    z = np.array([0.3, 1.6])
    params = make_params(
        2, hb2_flux=0.0, hb1_fwhm=[3200.0, 5200.0], ha_fwhm=[2100.0, 4100.0], ha_flux=[900.0, 150.0],
        mg_fwhm=[3900.0, 2900.0], civ_fwhm=[4500.0, 6500.0], powerlaw_norm=[25.0, 4.0], hb1_flux=[800.0, 90.0],
    )  # fmt: skip
    col = {n: params[:, NAMES.index(n)] for n in NAMES}
    lum = 4 * np.pi * dl_cm(z) ** 2 * 1e-17

    def lam_l(lam):
        return lum * lam * col["powerlaw_norm"] * (lam / 5100.0) ** col["powerlaw_index"]

    expected = {
        # Vestergaard & Peterson 2006 eqs. 5, 6, 7
        "vp06_hbeta": 6.91 + 2 * np.log10(col["hb1_fwhm"] / 1e3) + 0.50 * np.log10(lam_l(5100.0) / 1e44),
        "vp06_hbeta_line": 6.67 + 2 * np.log10(col["hb1_fwhm"] / 1e3) + 0.63 * np.log10(lum * col["hb1_flux"] / 1e42),
        "vp06_civ": 6.66 + 2 * np.log10(col["civ_fwhm"] / 1e3) + 0.53 * np.log10(lam_l(1350.0) / 1e44),
        # Vestergaard & Osmer 2009 eq. 1; Shen et al. 2011 eq. 10 (a, b) = (0.740, 0.62)
        "vo09_mgii": 6.86 + 2 * np.log10(col["mg_fwhm"] / 1e3) + 0.5 * np.log10(lam_l(3000.0) / 1e44),
        "shen11_mgii": 0.740 + 2 * np.log10(col["mg_fwhm"]) + 0.62 * np.log10(lam_l(3000.0) / 1e44),
        # Greene & Ho 2005 eq. 6: M = 2.0e6 (L_Ha/1e42)^0.55 (FWHM/1e3)^2.06
        "gh05_halpha": np.log10(2.0e6 * (lum * col["ha_flux"] / 1e42) ** 0.55 * (col["ha_fwhm"] / 1e3) ** 2.06),
    }
    assert set(expected) == set(D.RECIPES)
    for recipe, want in expected.items():
        got, _ = D.bh_mass(MODEL, recipe, params, redshift=z)
        np.testing.assert_allclose(got, want, atol=2e-4, err_msg=recipe)
    assert "Vestergaard & Peterson 2006" in D.bh_mass.__doc__ and "Greene & Ho 2005" in D.bh_mass.__doc__


# ---------------------------------------------------------------------------------------
# error propagation
# ---------------------------------------------------------------------------------------
def test_monte_carlo_errors_scale_with_params_err_and_vanish_without_them():
    params = make_params(3)
    e1 = err_on(3, oiii_flux=[5.0, 10.0, 0.0], oiii_fwhm=[20.0, 40.0, 0.0], oiii_shift=[10.0, 20.0, 0.0])
    res = D.measure_line(MODEL, "oiii5007", params, e1, n_samples=200)
    # against the input errors, within Monte Carlo accuracy (200 draws: ~5%)
    np.testing.assert_allclose(res["flux"][1][:2], [5.0, 10.0], rtol=0.2)
    np.testing.assert_allclose(res["fwhm"][1][:2], [20.0, 40.0], rtol=0.2)
    np.testing.assert_allclose(res["shift_centroid"][1][:2], [10.0, 20.0], rtol=0.2)
    for key in res:
        assert res[key][1][2] == 0.0, key  # zero errors give exactly zero
    # same spectrum (same draws), doubled errors: a linear quantity's error doubles exactly
    doubled = D.measure_line(MODEL, "oiii5007", params, 2 * e1, n_samples=200)
    np.testing.assert_allclose(doubled["flux"][1], 2 * res["flux"][1], rtol=1e-9)
    np.testing.assert_allclose(doubled["fwhm"][1], 2 * res["fwhm"][1], rtol=0.02)


def test_errors_are_reproducible_and_chunk_invariant():
    params = make_params(5, oiii_flux=[50, 60, 70, 80, 90])
    err = err_on(5, oiii_flux=3.0, oiii_fwhm=15.0)
    _, full = D.fwhm(MODEL, "oiii5007", params, err, seed=7)
    _, part = D.fwhm(MODEL, "oiii5007", params[2:], err[2:], seed=7, index=np.arange(2, 5))
    np.testing.assert_array_equal(full[2:], part)
    _, again = D.fwhm(MODEL, "oiii5007", params, err, seed=7)
    np.testing.assert_array_equal(full, again)
    _, other = D.fwhm(MODEL, "oiii5007", params, err, seed=8)
    assert not np.array_equal(full, other)


def test_nan_errors_propagate_only_where_used_and_ties_hold():
    params = make_params(2)
    err = err_on(2, oiii_flux=[np.nan, 2.0], ha_flux=[1.0, np.nan], hb1_shift=50.0)
    oiii = D.measure_line(MODEL, "oiii5007", params, err)
    assert np.isnan(oiii["flux"][1][0]) and np.isfinite(oiii["flux"][1][1])
    # hb2_shift is tied to hb1_shift: the whole profile moves rigidly, so the peak shift error
    # equals the hb1_shift error and the width does not change at all
    hb = D.measure_line(MODEL, "hbeta_broad", params, err, n_samples=200)
    np.testing.assert_allclose(hb["shift_peak"][1], 50.0, rtol=0.2)
    np.testing.assert_allclose(hb["fwhm"][1], 0.0, atol=0.5)


def test_bh_mass_error_combines_width_and_luminosity():
    params = make_params(1, hb2_flux=0.0)
    e_w = err_on(1, hb1_fwhm=300.0)
    e_l = err_on(1, powerlaw_norm=1.0)
    _, only_w = D.bh_mass(MODEL, "vp06_hbeta", params, e_w, redshift=0.5, n_samples=200)
    _, only_l = D.bh_mass(MODEL, "vp06_hbeta", params, e_l, redshift=0.5, n_samples=200)
    _, none = D.bh_mass(MODEL, "vp06_hbeta", params, err_on(1), redshift=0.5)
    # linearised: 2 / ln10 * dW/W and 0.5 / ln10 * dL/L
    np.testing.assert_allclose(only_w, 2 / math.log(10) * 300.0 / 3000.0, rtol=0.2)
    np.testing.assert_allclose(only_l, 0.5 / math.log(10) * 1.0 / 10.0, rtol=0.2)
    assert none[0] == 0.0


# ---------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------
def test_clear_errors():
    params = make_params(1)
    with pytest.raises(ModelError, match="unknown line 'hbeta'.*hbeta_broad") as info:
        D.fwhm(MODEL, "hbeta", params)
    assert "oiii5007" in str(info.value)
    with pytest.raises(OptionError, match="unknown black-hole mass recipe"):
        D.bh_mass(MODEL, "vp07", params, redshift=1.0)
    with pytest.raises(InputDataError, match="shape"):
        D.fwhm(MODEL, "oiii5007", params[:, :3])
    with pytest.raises(InputDataError, match="redshift"):
        D.luminosity(MODEL, 5100.0, params, redshift=None)
    with pytest.raises(OptionError, match="method"):
        D.shift(MODEL, "oiii5007", params, method="mode")
    bare = sd.Model(MODEL.func, MODEL.params, components=MODEL.components, metadata={"lines": MODEL.metadata["lines"]})
    with pytest.raises(ModelError, match="defines no continuum"):
        D.ew(bare, "oiii5007", params)
    with pytest.raises(ModelError, match="not components"):
        D.ew(MODEL, "oiii5007", params, continuum=["feii"])
    no_lines = sd.Model(MODEL.func, MODEL.params)
    with pytest.raises(ModelError, match="no line catalogue"):
        D.fwhm(no_lines, "oiii5007", params)


def test_feii_is_not_continuum_by_default():
    meta = {"continuum": ["powerlaw", "feii"], "components": {"powerlaw": {"kind": "powerlaw"}, "feii": {"kind": "feii"}}}
    model = sd.Model(MODEL.func, MODEL.params, components={**MODEL.components, "feii": MODEL.components["powerlaw"]}, metadata=meta)
    assert D.continuum_names(model) == ["powerlaw"]
    assert D.continuum_names(model, ["powerlaw", "feii"]) == ["powerlaw", "feii"]


@pytest.mark.parametrize(
    "text,scale",
    [
        ("1e-17 erg/s/cm2/A", 1e-17),
        ("1E-17 erg/cm^2/s/Ang", 1e-17),
        ("10^-17 erg s^-1 cm^-2 Angstrom^-1", 1e-17),
        ("erg / (Angstrom cm2 s)", 1.0),
        ("1e-16 erg/s/cm**2/AA", 1e-16),
        ("1e-17 erg/s/cm2/A (nominal)", 1e-17),
        ("W / (m2 nm)", 100.0),  # via astropy
    ],
)
def test_parse_flux_unit(text, scale):
    assert D.parse_flux_unit(text) == pytest.approx(scale, rel=1e-12)


def test_parse_flux_unit_rejects_non_flux_density():
    with pytest.raises(InputDataError, match="flux_unit="):
        D.parse_flux_unit("Jy km/s")
