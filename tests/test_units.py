"""Results do not depend on the flux unit: a spectrum multiplied by any factor from 1e-30 to
1e30 (ivar divided by its square) gives the same fit, fluxes scaled by the factor, with the
solve in float32 or float64 (to 1e-4 relative; in practice to the last digits). Data rounded
to float32 after scaling are different data (by ~1e-7 of each value): the fit then stays
within a tenth of its errors. The flux-unit strings of the input (sheap_dask.units) parse to
their scale in erg/s/cm2/A."""

from __future__ import annotations

import dask
import numpy as np
import pytest
import xarray as xr

import sheap_dask as sd
from sheap_dask import units
from sheap_dask.chunk import ChunkOptions, fit_chunk
from sheap_dask.errors import InputDataError
from sheap_dask.quality import Quality

FACTORS = (1e-30, 1e-17, 1e17, 1e30)


@pytest.fixture(scope="module")
def hbeta():
    return sd.models.region("hbeta")


def assert_same_fit(model, ref: dict, out: dict, factor: float, rtol: float = 1e-4, sigma_tol: float = 0.0) -> None:
    """Same statuses and flags; parameters (fluxes divided by ``factor``), chi-square and
    errors to ``rtol`` relative, or, with ``sigma_tol``, within that fraction of the
    parameter's error (for shifts near 0 when the input itself was rounded to float32)."""
    flux_param = np.isin(model.param_names, model.flux_params)
    unit = np.where(flux_param, factor, 1.0)
    np.testing.assert_array_equal(out["status"], ref["status"])
    if sigma_tol:  # different data: a parameter that rests within the rounding of its bound
        # (a host dispersion of a host-free spectrum, a narrow width at its cap) may be pinned
        # in one fit and not the other
        np.testing.assert_array_equal(out["quality"] & ~Quality.PARAM_AT_BOUND, ref["quality"] & ~Quality.PARAM_AT_BOUND)
    else:
        np.testing.assert_array_equal(out["quality"], ref["quality"])
    ok = np.isfinite(ref["params"])
    if sigma_tol:  # different data: compare the well-measured parameters (error < half the value);
        # poorly constrained ones (NaN or large errors, a host weight near 0) may move along
        # their flat directions
        ok &= np.isfinite(ref["params_err"]) & (ref["params_err"] < 0.5 * np.abs(ref["params"]))
    got = out["params"][ok] / np.broadcast_to(unit, ref["params"].shape)[ok]
    want = ref["params"][ok]
    allowed = rtol * np.abs(want) + sigma_tol * np.nan_to_num(ref["params_err"][ok])
    assert np.all(np.abs(got - want) <= allowed), np.max(np.abs(got - want) / np.maximum(allowed, 1e-300))
    chi2_rtol = max(rtol, 2e-3) if sigma_tol else rtol  # different data: a chi-square of ~1000 moves by ~1
    np.testing.assert_allclose(out["chi2"], ref["chi2"], rtol=chi2_rtol)
    np.testing.assert_allclose(out["redchi2"], ref["redchi2"], rtol=chi2_rtol)
    ok_err = np.isfinite(ref["params_err"]) & (ref["params_err"] > 0)
    if sigma_tol:  # different data: compare the errors of well-measured parameters (an error
        # wider than half its value is itself poorly determined, and may flip to NaN)
        ok_err &= np.isfinite(out["params_err"]) & (ref["params_err"] < 0.5 * np.abs(ref["params"]))
    np.testing.assert_allclose(
        out["params_err"][ok_err] / np.broadcast_to(unit, ref["params_err"].shape)[ok_err], ref["params_err"][ok_err],
        rtol=max(rtol, sigma_tol),
    )


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_synthetic_spectra_any_unit(hbeta, dtype):
    ds = sd.io.synthetic_spectra(16, seed=3)
    wl, flux, ivar = ds.wavelength.values, ds.flux.values.astype(np.float64), ds.ivar.values.astype(np.float64)
    options = ChunkOptions(dtype=dtype)
    ref = fit_chunk(hbeta, wl, flux, ivar, options=options)
    assert (ref["status"] == 0).sum() >= 14
    for factor in FACTORS:
        assert_same_fit(hbeta, ref, fit_chunk(hbeta, wl, flux * factor, ivar / factor**2, options=options), factor)


def test_float32_input_with_errors_any_unit(hbeta):
    """float32 flux and errors (an ivar of 1e60 does not fit in float32): through fit_dataset
    with flux_err, whose inverse square is taken in float64."""
    base = sd.io.synthetic_spectra(8, seed=4)
    err = (1.0 / np.sqrt(base.ivar)).astype(np.float64)

    def fit(factor):
        ds = xr.Dataset(
            {"flux": ((base.flux * factor).astype(np.float32)), "flux_err": (err * factor).astype(np.float32)},
            coords={"wavelength": base.wavelength},
        ).chunk({"spectrum": 8})
        with dask.config.set(scheduler="synchronous"):
            fits = sd.fit_dataset(ds, hbeta, ivar=None, flux_err="flux_err", progress=False).compute()
        return {name: fits[name].values for name in ("params", "params_err", "status", "quality", "chi2", "redchi2")}

    ref = fit(1.0)
    assert (ref["status"] == 0).all()
    for factor in FACTORS:
        # float32 rounding of flux * factor changes the data by ~1e-7 of each value: the fit
        # stays within the solvers' stopping tolerance (two stages), far inside its errors
        assert_same_fit(hbeta, ref, fit(factor), factor, sigma_tol=0.25)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_real_sdss_spectra_any_unit(shared_spectra, hbeta, dtype):
    files = sorted((shared_spectra / "pyqsofit_rm017").glob("*.fits"))[:6]
    ds = sd.io.read_sdss_spectra(files)
    wl, z = ds.wavelength.values, ds.redshift.values
    flux, ivar = ds.flux.values.astype(np.float64), ds.ivar.values.astype(np.float64)
    options = ChunkOptions(dtype=dtype)
    ref = fit_chunk(hbeta, wl, flux, ivar, redshift=z, options=options)
    assert np.isin(ref["status"], (0, 1)).all()
    assert ref["n_masked"].any()  # real spectra: the absorber rejection takes part
    for factor in FACTORS:
        assert_same_fit(hbeta, ref, fit_chunk(hbeta, wl, flux * factor, ivar / factor**2, redshift=z, options=options), factor)


# ---------------------------------------------------------------------------------------
# the flux-unit parser (sheap_dask.units)
# ---------------------------------------------------------------------------------------
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
    assert units.parse_flux_unit(text) == pytest.approx(scale, rel=1e-12)


def test_parse_flux_unit_rejects_non_flux_density():
    with pytest.raises(InputDataError, match="flux_unit="):
        units.parse_flux_unit("Jy km/s")
