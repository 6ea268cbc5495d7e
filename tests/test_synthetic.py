"""Tests of sheap_dask.synthetic: the synthetic spectra shared by tests, demo and benchmarks."""

from __future__ import annotations

import numpy as np
import pytest

from sheap_dask.errors import InputDataError
from sheap_dask.synthetic import sdss_grid, synthetic_spectra


@pytest.fixture(scope="module")
def ds():
    return synthetic_spectra(120, seed=5)


def test_layout_and_conventions(ds):
    assert ds.flux.dims == ("spectrum", "wavelength") and ds.ivar.dims == ("spectrum", "wavelength")
    assert ds.flux.dtype == np.float32 and ds.ivar.dtype == np.float32
    wl = ds.wavelength.values
    assert wl[0] >= 4400.0 and wl[-1] <= 5600.0 and wl.size == 1047
    np.testing.assert_allclose(np.diff(np.log10(wl)), 1e-4, rtol=1e-6)  # SDSS pixels
    assert np.allclose(np.log10(wl) / 1e-4, np.round(np.log10(wl) / 1e-4))  # on the SDSS grid
    assert ds.true_params.dims == ("spectrum", "param")
    assert list(ds.param.values[:2]) == ["powerlaw_norm", "powerlaw_index"] and ds.sizes["param"] == 23
    assert "redshift" not in ds.coords and ds.attrs["frame"] == "rest"


def test_truth_in_bounds_ties_and_snr(ds):
    from sheap_dask import models

    m = models.region("hbeta", host=False)  # quasar-only truth
    ok = ~ds.all_nan.values
    truth = ds.true_params.values[ok]
    assert np.all(truth >= m.params.lower) and np.all(truth <= m.params.upper)
    i5, i4 = m.params.index("oiii5007_flux"), m.params.index("oiii4959_flux")
    np.testing.assert_allclose(truth[:, i4] * 2.98, truth[:, i5], rtol=1e-12)
    snr = ds.snr.values
    assert snr.min() >= 10 and snr.max() <= 40
    # measured S/N of the noise: residual of flux against the noise-free model
    import jax

    clean = np.asarray(jax.jit(jax.vmap(m.func, in_axes=(None, 0)))(ds.wavelength.values, truth))
    good = ds.ivar.values[ok] > 0
    resid = (ds.flux.values[ok] - clean) * np.sqrt(ds.ivar.values[ok])
    assert np.std(resid[good]) == pytest.approx(1.0, rel=0.03)


def test_masks_and_all_nan_spectra(ds):
    flux, ivar = ds.flux.values, ds.ivar.values
    all_nan = ds.all_nan.values
    assert all_nan.sum() == 1  # 1% of 120, at least one
    assert np.all(np.isnan(flux[all_nan])) and np.all(ivar[all_nan] == 0)
    assert np.all(np.isnan(ds.true_params.values[all_nan]))
    rest = ~all_nan
    masked_rows = (ivar[rest] == 0).any(axis=1)
    assert 0.15 < masked_rows.mean() < 0.45  # masked_fraction=0.3
    # masked pixels come in runs of >= 3
    row = ivar[rest][masked_rows][0] == 0
    edges = np.flatnonzero(np.diff(np.r_[0, row.astype(int), 0]))
    assert np.all(edges[1::2] - edges[::2] >= 3)
    # NaN flux only where ivar == 0
    assert np.all(ivar[np.isnan(flux)] == 0)


def test_deterministic_for_a_seed():
    a = synthetic_spectra(20, seed=11)
    b = synthetic_spectra(20, seed=11)
    c = synthetic_spectra(20, seed=12)
    np.testing.assert_array_equal(a.flux.values, b.flux.values)
    np.testing.assert_array_equal(a.true_params.values, b.true_params.values)
    assert not np.array_equal(a.true_params.values, c.true_params.values)
    assert a.all_nan.sum() == 0  # fewer than 100 spectra: none blanked by default


def test_redshift_options_and_chunking():
    ds = synthetic_spectra(6, seed=2, redshift=(0.1, 0.5), chunk=4, dtype="float64", masked_fraction=0.0)
    z = ds.redshift.values
    assert ds.attrs["frame"] == "observed" and np.all((z >= 0.1) & (z <= 0.5))
    assert ds.flux.chunks[0] == (4, 2) and ds.flux.dtype == np.float64
    wl = ds.wavelength.values
    assert wl[0] >= 4400 * 1.1 - 1 and wl[-1] <= 5600 * 1.5 + 1
    ivar = ds.ivar.values
    for i in range(6):  # data only inside each spectrum's rest window
        rest = wl / (1 + z[i])
        inside = (rest >= 4400) & (rest <= 5600)
        assert np.all(ivar[i, ~inside] == 0) and np.all(ivar[i, inside] > 0)


def test_other_regions_and_custom_grid():
    ds = synthetic_spectra(5, region="mgii", seed=0, wavelength=sdss_grid(2650.0, 3000.0), snr=20.0)
    assert "mgii_broad1_flux" in ds.param.values and np.all(np.isfinite(ds.flux.values[ds.ivar.values > 0]))
    np.testing.assert_allclose(ds.snr.values, 20.0)


@pytest.mark.parametrize(
    "kwargs,match",
    [({"n_spectra": 0}, "at least 1"), ({"snr": (40, 10)}, "low <= high"), ({"masked_fraction": 2.0}, "masked_fraction"),
     ({"redshift": [0.1, 0.2]}, "one per spectrum"), ({"n_all_nan": 99}, "n_all_nan")],
)
def test_bad_arguments(kwargs, match):
    kw = {"n_spectra": 4, "seed": 0} | kwargs
    with pytest.raises(InputDataError, match=match):
        synthetic_spectra(**kw)


def test_mismatched_spectra_differ_from_the_fitted_model():
    """mismatch=True: Lorentzian broad lines and other FeII multiplet ratios, same parameters;
    the generated broad line's FWHM is measured into true_fwhm_broad."""
    import sheap_dask as sd

    plain = sd.io.synthetic_spectra(6, seed=5, n_all_nan=0, snr=1e6)
    other = sd.io.synthetic_spectra(6, seed=5, n_all_nan=0, snr=1e6, mismatch=True)
    np.testing.assert_array_equal(plain.true_params.values, other.true_params.values)
    assert other.attrs["mismatch"] == 1 and "true_fwhm_broad" in other
    assert np.all(np.isfinite(other.true_fwhm_broad.values))
    diff = np.abs(np.nan_to_num(other.flux.values - plain.flux.values))  # NaN: masked pixel runs
    assert np.all(diff.max(axis=1) > 0.01 * np.nanmax(np.abs(plain.flux.values), axis=1))  # visibly different spectra
