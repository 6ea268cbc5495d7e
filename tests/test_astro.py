"""Tests of sheap_dask.astro: Galactic extinction laws, dereddening, air/vacuum wavelengths."""

from __future__ import annotations

import numpy as np
import pytest

from sheap_dask import astro
from sheap_dask.errors import InputDataError, OptionError


def test_ccm89_published_values():
    # A(V)/A(V) = 1 at y = x - 1.82 = 0 by construction; A(B)/A(V) = 1 + 1/R_V for the
    # B - V colour excess the law is normalised to (CCM89 section III).
    assert astro.extinction_curve(1e4 / 1.82) == pytest.approx(1.0, abs=1e-12)
    assert astro.extinction_curve(1e4 / 1.82, law="odonnell94") == pytest.approx(1.0, abs=1e-12)
    assert astro.extinction_curve(4400.0) == pytest.approx(1.0 + 1.0 / 3.1, abs=0.005)
    assert astro.extinction_curve(4400.0, r_v=5.0) == pytest.approx(1.2, abs=0.01)
    # the 2175 A bump is the UV maximum of the mid-UV range, above 3 A(V) for R_V = 3.1
    x = np.linspace(3.4, 5.8, 500)
    curve = astro.extinction_curve(1e4 / x)
    assert 4.5 < x[np.argmax(curve)] < 4.7 and curve.max() > 3.0
    # the piecewise segments meet (continuity at x = 1.1 and 3.3 to the few-% level)
    for edge in (1.1, 3.3):
        lo, hi = astro.extinction_curve(1e4 / np.array([edge - 1e-6, edge + 1e-6]))
        assert abs(hi - lo) / lo < 0.03


def test_f99_table3_anchor_points():
    # Fitzpatrick (1999) Table 3, R_V = 3.1: A(lambda)/E(B-V) at the spline anchor points.
    wave = [26500, 12200, 6000, 5470, 4670, 4110, 2700, 2600]
    table3 = [0.265, 0.829, 2.688, 3.055, 3.806, 4.315, 6.265, 6.591]
    k = astro.extinction_curve(wave, law="f99") * 3.1
    np.testing.assert_allclose(k, table3, atol=6e-4)
    # the spline joins the UV curve smoothly at 2700 A
    left, right = astro.extinction_curve([2700.01, 2699.99], law="f99")
    assert right == pytest.approx(left, rel=1e-4)
    # F99 and CCM89 agree within 5% in the blue-optical and drift apart to ~9% at 8000 A
    w = np.linspace(4000, 6000, 20)
    np.testing.assert_allclose(astro.extinction_curve(w, law="f99"), astro.extinction_curve(w), rtol=0.05)


def test_extinction_matches_independent_implementation():
    # A(lambda)/A(V) quoted in the documentation of the independent `extinction` package
    # (K. Barbary, MIT licence) for R_V = 3.1.
    np.testing.assert_allclose(astro.extinction_curve([2000.0, 4000.0, 8000.0]), [2.84252644, 1.4645557, 0.59748901], rtol=1e-7)
    np.testing.assert_allclose(
        astro.extinction_curve([2000.0, 3000.0, 4000.0], law="f99"), [2.76225609, 1.79674653, 1.42325373], rtol=1e-7
    )


def test_dered_vectorised_with_per_spectrum_ebv():
    wave = np.linspace(3800.0, 9200.0, 50)
    flux = np.ones((3, 50), np.float32)
    ivar = np.full((3, 50), 4.0, np.float32)
    ivar[1, 10] = 0.0
    ebv = np.array([0.0, 0.05, 0.2])
    f0, iv0 = astro.dered(wave, flux, ivar, ebv)
    assert f0.dtype == np.float32 and iv0.dtype == np.float32
    np.testing.assert_allclose(f0[0], 1.0)
    a = 0.2 * 3.1 * astro.extinction_curve(wave)
    np.testing.assert_allclose(f0[2], 10 ** (0.4 * a), rtol=1e-6)
    np.testing.assert_allclose(iv0[2], 4.0 * 10 ** (-0.8 * a), rtol=1e-6)
    assert iv0[1, 10] == 0.0
    assert np.all(f0[2, :-1] > f0[2, 1:])  # bluer pixels are corrected more
    with pytest.raises(OptionError, match="one value per spectrum"):
        astro.dered(wave, flux, ivar, [0.1, 0.2])
    with pytest.raises(OptionError, match="law"):
        astro.dered(wave, flux, ivar, 0.1, law="smc")
    with pytest.raises(InputDataError, match="wavelength"):
        astro.dered([500.0, 600.0], [1.0, 1.0], None, 0.1)


def test_air_vacuum_conversion():
    # H-alpha: 6562.80 A in air is 6564.61 A in vacuum; [OIII] 5006.84 -> 5008.24.
    np.testing.assert_allclose(astro.air_to_vacuum([6562.80, 5006.84]), [6564.61, 5008.24], atol=0.01)
    w = np.linspace(3000, 10000, 7)
    np.testing.assert_allclose(astro.vacuum_to_air(astro.air_to_vacuum(w)), w, atol=1e-8)


def test_subtract_instrumental_in_quadrature():
    np.testing.assert_allclose(astro.subtract_instrumental(np.array([500.0, 300.0, 100.0]), 300.0), [400.0, np.nan, np.nan])
