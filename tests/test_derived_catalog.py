"""Every catalogue quantity of a region in one Monte Carlo run (sheap_dask.derived.catalog)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from derived_toy import MODEL, NAMES, dl_cm, err_on, make_params

import sheap_dask as sd
from sheap_dask.derived import bh_mass as bhm
from sheap_dask.derived import catalog as dc
from sheap_dask.derived import lines
from sheap_dask.derived.luminosity import log_lum_factor

Z = np.array([0.3, 0.9, 2.1])


def _params():
    return make_params(3, hb1_fwhm=[3200.0, 5200.0, 2500.0], mg_fwhm=[3900.0, 2900.0, 4400.0], powerlaw_norm=[25.0, 4.0, 12.0])


def test_one_run_equals_the_one_quantity_functions():
    params = _params()
    err = err_on(3, hb1_fwhm=200.0, hb1_flux=30.0, hb2_fwhm=500.0, oiii_flux=5.0, powerlaw_norm=0.5, mg_fwhm=150.0, civ_flux=10.0)
    plan = dc.region_plan(MODEL)
    assert {ln for ln, _ in plan.lines} == set(MODEL.metadata["lines"])
    assert set(plan.recipes) == set(bhm.RECIPES) and plan.wavelengths == (1350.0, 3000.0, 5100.0)
    x = log_lum_factor(Z, 3, 1e-17, 70.0, 0.3)
    index = np.array([11, 12, 13])
    got = dc.region_measurements(MODEL, plan, params, err, log_lum_factor=x, index=index, n_samples=64, seed=3)
    for line in ("hbeta_broad", "oiii5007", "mgii_broad", "lor_line"):
        ref = lines.measure_line(MODEL, line, params, err, index=index, n_samples=64, seed=3)
        for ours, theirs in (("flux", "flux"), ("fwhm", "fwhm"), ("sigma", "sigma"), ("shift", "shift_peak"), ("ew", "ew")):
            np.testing.assert_allclose(got[f"{line}/{ours}"][0], ref[theirs][0], rtol=1e-12, err_msg=f"{line} {ours}")
            np.testing.assert_allclose(got[f"{line}/{ours}"][1], ref[theirs][1], rtol=1e-12, err_msg=f"{line} {ours} error")
        lam0 = MODEL.metadata["lines"][line]["rest_wavelength"]
        np.testing.assert_allclose(got[f"{line}/peak"][0], lam0 * (1 + ref["shift_peak"][0] / lines.C_KMS), rtol=1e-12)
    for recipe in bhm.RECIPES:
        value, error = bhm.bh_mass(MODEL, recipe, params, err, redshift=Z, index=index, n_samples=64, seed=3)
        np.testing.assert_allclose(got[f"mbh/{recipe}"][0], value, rtol=1e-12, err_msg=recipe)
        np.testing.assert_allclose(got[f"mbh/{recipe}"][1], error, rtol=1e-12, err_msg=recipe)


def test_bolometric_luminosity_and_eddington_ratio():
    params = _params()
    x = log_lum_factor(Z, 3, 1e-17, 70.0, 0.3)
    got = dc.region_measurements(MODEL, dc.region_plan(MODEL), params, log_lum_factor=x)
    norm, index = params[:, NAMES.index("powerlaw_norm")], params[:, NAMES.index("powerlaw_index")]
    lum = 4 * np.pi * dl_cm(Z) ** 2 * 1e-17
    for recipe, wl, bc in (("vp06_hbeta", 5100.0, 9.26), ("shen11_mgii", 3000.0, 5.15), ("vp06_civ", 1350.0, 3.81)):
        lam_l = lum * wl * norm * (wl / 5100.0) ** index
        np.testing.assert_allclose(got[f"lbol/{recipe}"][0], np.log10(bc * lam_l), rtol=1e-9)
        want = np.log10(bc * lam_l) - np.log10(1.26e38) - got[f"mbh/{recipe}"][0]
        np.testing.assert_allclose(got[f"edd/{recipe}"][0], want, rtol=1e-9)
        np.testing.assert_allclose(got[f"cont/{wl:g}"][0], norm * (wl / 5100.0) ** index, rtol=1e-12)
    assert "edd/gh05_halpha" not in got  # a line-luminosity recipe has no bolometric correction of its own
    assert dc.BOLOMETRIC == {5100.0: 9.26, 3000.0: 5.15, 1350.0: 3.81} and "Richards et al. 2006" in dc.BOLOMETRIC_REFERENCE


def test_single_gaussian_lines_from_their_parameters_equal_the_profile_grid():
    # region("civ", n_broad=1): every line is one Gaussian, measured without its profile grid
    model = sd.models.region("civ", n_broad=1)
    names = model.param_names
    p = np.tile(model.params.values, (2, 1))
    for name, values in {"civ_broad_fwhm": [4200.0, 7300.0], "civ_broad_shift": [-900.0, 350.0], "civ_broad_flux": [400.0, 80.0],
                         "heii1640_fwhm": [2500.0, 9000.0], "heii1640_shift": [120.0, -40.0]}.items():
        p[:, names.index(name)] = values
    err = np.zeros_like(p)
    for name, value in {"civ_broad_fwhm": 300.0, "civ_broad_flux": 20.0, "heii1640_fwhm": 400.0, "powerlaw_norm": 0.2}.items():
        err[:, names.index(name)] = value
    plan = dc.region_plan(model)
    assert dc._single_gaussian(model, "civ_broad") is not None
    got = dc.region_measurements(model, plan, p, err, n_samples=200)
    for line in ("civ_broad", "heii1640"):
        ref = lines.measure_line(model, line, p, err, n_samples=200)
        for ours, theirs in (("flux", "flux"), ("fwhm", "fwhm"), ("sigma", "sigma"), ("shift", "shift_peak"), ("ew", "ew")):
            np.testing.assert_allclose(got[f"{line}/{ours}"][0], ref[theirs][0], rtol=2e-4, atol=0.05, err_msg=f"{line} {ours}")
            np.testing.assert_allclose(got[f"{line}/{ours}"][1], ref[theirs][1], rtol=0.02, atol=0.05, err_msg=f"{line} {ours} error")
    np.testing.assert_allclose(got["civ_broad/fwhm"][0], [4200.0, 7300.0], rtol=1e-12)
    np.testing.assert_allclose(got["civ_broad/sigma"][0], np.array([4200.0, 7300.0]) / (2 * math.sqrt(2 * math.log(2))), rtol=1e-12)


def test_feii_strength_is_the_band_integral_over_the_continuum():
    import jax.numpy as jnp

    model = sd.models.region("hbeta", n_broad=1, host=False)
    p = np.asarray(model.params.values, dtype=np.float64)
    p[model.param_names.index("feii_amplitude")] = 800.0
    plan = dc.region_plan(model)
    assert plan.feii == (("feii_optical", ("feii",), 4434.0, 4684.0),) and plan.rfeii == ("feii_optical", "hbeta_broad")
    got = dc.region_measurements(model, plan, p)
    grid = np.linspace(4434.0, 4684.0, 5001)
    fe = np.asarray(model.components["feii"](jnp.asarray(grid), jnp.asarray(p)))
    cont = np.asarray(model.components["powerlaw"](jnp.asarray(grid), jnp.asarray(p)))
    want = np.trapezoid(fe / cont, grid)
    np.testing.assert_allclose(got["feii_optical/ew"][0], want, rtol=2e-3)
    np.testing.assert_allclose(got["rfeii"][0], want / got["hbeta_broad/ew"][0], rtol=2e-3)


def test_plan_of_a_model_without_continuum_or_recipes():
    plan = dc.region_plan(MODEL, lines=["oiii5007"], recipes=[])
    assert plan.recipes == () and plan.wavelengths == () and [ln for ln, _ in plan.lines] == ["oiii5007"]
    with pytest.raises(sd.errors.OptionError, match="unknown black-hole mass recipe"):
        dc.region_plan(MODEL, recipes=["nope"])
    desc = dc.describe(dc.region_plan(MODEL))
    assert desc["recipes"] and desc["lines"]
