"""Black-hole mass recipes (sheap_dask.derived.bh_mass) against the published formulae."""

from __future__ import annotations

import math

import numpy as np
from derived_toy import MODEL, NAMES, dl_cm, err_on, make_params

from sheap_dask.derived import bh_mass as bhm


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
    assert set(expected) == set(bhm.RECIPES)
    for recipe, want in expected.items():
        got, _ = bhm.bh_mass(MODEL, recipe, params, redshift=z)
        np.testing.assert_allclose(got, want, atol=2e-4, err_msg=recipe)
    assert "Vestergaard & Peterson 2006" in bhm.bh_mass.__doc__ and "Greene & Ho 2005" in bhm.bh_mass.__doc__



def test_bh_mass_error_combines_width_and_luminosity():
    params = make_params(1, hb2_flux=0.0)
    e_w = err_on(1, hb1_fwhm=300.0)
    e_l = err_on(1, powerlaw_norm=1.0)
    _, only_w = bhm.bh_mass(MODEL, "vp06_hbeta", params, e_w, redshift=0.5, n_samples=200)
    _, only_l = bhm.bh_mass(MODEL, "vp06_hbeta", params, e_l, redshift=0.5, n_samples=200)
    _, none = bhm.bh_mass(MODEL, "vp06_hbeta", params, err_on(1), redshift=0.5)
    # linearised: 2 / ln10 * dW/W and 0.5 / ln10 * dL/L
    np.testing.assert_allclose(only_w, 2 / math.log(10) * 300.0 / 3000.0, rtol=0.2)
    np.testing.assert_allclose(only_l, 0.5 / math.log(10) * 1.0 / 10.0, rtol=0.2)
    assert none[0] == 0.0
