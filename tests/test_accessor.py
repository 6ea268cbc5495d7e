"""The ``ds.sheap`` accessor on a constructed fit result (no fit needed: params = truth)."""

from __future__ import annotations

import gc
import json
import sys

import dask
import matplotlib
import numpy as np
import pytest
import xarray as xr

import sheap_dask as sd
from sheap_dask import accessor as acc
from sheap_dask.errors import InputDataError, MissingDependencyError, ModelError, OptionError
from sheap_dask.models import derived as D
from sheap_dask.models.profiles import gaussian
from sheap_dask.status import Status, status_attrs

matplotlib.use("Agg")

HB, OIII = 4862.68, 5008.24
N = 6
Z = np.array([0.05, 0.10, 0.15, 0.20, 0.25, 0.30])
NOISE = 0.05


def small_model() -> sd.Model:
    """Power law + two broad H-beta Gaussians (shared shift) + narrow [OIII], window 4700-5200 A."""
    p = sd.Parameters()
    p.add("powerlaw_norm", 10.0, min=0.0).add("powerlaw_index", -1.5, min=-5.0, max=5.0)
    p.add("hb1_flux", 500.0, min=0.0).add("hb1_shift", 0.0, min=-3000.0, max=3000.0).add("hb1_fwhm", 3000.0, min=500.0, max=20000.0)
    p.add("hb2_flux", 300.0, min=0.0).add("hb2_shift", 0.0, tie="hb2_shift = hb1_shift + 0").add("hb2_fwhm", 8000.0, min=500.0, max=20000.0)
    p.add("oiii_flux", 100.0, min=0.0).add("oiii_shift", 0.0, min=-1000.0, max=1000.0).add("oiii_fwhm", 400.0, min=50.0, max=1500.0)
    comps = {
        "powerlaw": lambda x, q: q[0] * (x / 5100.0) ** q[1],
        "hb1": lambda x, q: gaussian(x, q[2], q[3], q[4], HB),
        "hb2": lambda x, q: gaussian(x, q[5], q[6], q[7], HB),
        "oiii": lambda x, q: gaussian(x, q[8], q[9], q[10], OIII),
    }

    def func(x, q):
        return comps["powerlaw"](x, q) + comps["hb1"](x, q) + comps["hb2"](x, q) + comps["oiii"](x, q)

    lines = {
        "hbeta_broad": {"rest_wavelength": HB, "components": ["hb1", "hb2"], "kind": "broad"},
        "oiii5007": {"rest_wavelength": OIII, "components": ["oiii"], "kind": "narrow"},
    }
    return sd.Model(func, p, name="small", window=(4700.0, 5200.0), components=comps,
                    metadata={"lines": lines, "continuum": ["powerlaw"]})  # fmt: skip


MODEL = small_model()
NAMES = MODEL.param_names


def truth() -> np.ndarray:
    rng = np.random.default_rng(1)
    p = np.tile(MODEL.params.values, (N, 1))
    p[:, NAMES.index("hb1_fwhm")] = rng.uniform(2000, 5000, N)
    p[:, NAMES.index("hb1_shift")] = rng.uniform(-500, 500, N)
    p[:, NAMES.index("hb2_shift")] = p[:, NAMES.index("hb1_shift")]
    p[:, NAMES.index("oiii_flux")] = rng.uniform(50, 150, N)
    p[:, NAMES.index("powerlaw_norm")] = rng.uniform(5, 20, N)
    return p


PARAMS = truth()
WL_OBS = np.linspace(4800.0, 6900.0, 1500)
MASKED = [10, 500, 501]


def make_spectra() -> xr.Dataset:
    rest = WL_OBS[None, :] / (1 + Z[:, None])
    clean = MODEL.evaluate(rest, PARAMS) / (1 + Z[:, None])
    noise = np.random.default_rng(2).normal(0, NOISE, clean.shape)
    ivar = np.full(clean.shape, NOISE**-2)
    ivar[:, MASKED] = 0.0
    return xr.Dataset(
        {"flux": (("spectrum", "wavelength"), clean + noise, {"units": "1e-17 erg/s/cm2/Angstrom"}),
         "ivar": (("spectrum", "wavelength"), ivar)},
        coords={"wavelength": WL_OBS, "spectrum": np.arange(100, 100 + N), "redshift": ("spectrum", Z)},
    )  # fmt: skip


def make_fits(model=MODEL, params=PARAMS) -> xr.Dataset:
    n, m = params.shape
    err = np.abs(params) * 0.02
    err[:, NAMES.index("hb2_shift")] = np.nan  # tied: not free, its error never used
    status = np.array([0, 0, 1, 2, 5, 3][:n], dtype=np.int8)
    ds = xr.Dataset(
        {
            "params": (("spectrum", "param"), params),
            "params_err": (("spectrum", "param"), err),
            "loss": ("spectrum", np.ones(n)),
            "chi2": ("spectrum", np.full(n, 1400.0)),
            "dof": ("spectrum", np.full(n, 1400)),
            "redchi2": ("spectrum", np.linspace(0.9, 1.4, n)),
            "status": ("spectrum", status, status_attrs()),
            "method": ("spectrum", np.array(["adam"] * n)),
            "n_iter": ("spectrum", np.full(n, 200)),
        },
        coords={
            "spectrum": np.arange(100, 100 + n),
            "param": list(model.param_names),
            "param_min": ("param", model.params.lower),
            "param_max": ("param", model.params.upper),
            "redshift": ("spectrum", Z[:n]),
        },
        attrs={
            "sheap_model": json.dumps(model.to_dict(), default=str),
            "sheap_model_fingerprint": model.fingerprint(),
            "sheap_frame": "rest",
        },
    )
    return ds


@pytest.fixture
def spectra():
    return make_spectra()


@pytest.fixture
def fits(spectra):
    ds = make_fits()
    ds.sheap.use(model=MODEL, spectra=spectra)
    return ds


def _no_compute(*args, **kwargs):
    raise AssertionError("a dask graph was computed before it was asked for")


# ---------------------------------------------------------------------------------------
# derived quantities
# ---------------------------------------------------------------------------------------
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


def test_dask_backed_result_stays_lazy_and_matches(fits, spectra):
    lazy = make_fits().chunk({"spectrum": 4})
    lazy.sheap.use(model=MODEL, spectra=spectra.chunk({"spectrum": 4}))
    with dask.config.set(scheduler=_no_compute):
        fw = lazy.sheap.fwhm("hbeta_broad", errors=True)
        lum = lazy.sheap.luminosity(5100)
        model = lazy.sheap.model()
        resid = lazy.sheap.residuals()
    for obj in (fw["fwhm_hbeta_broad"], fw["fwhm_hbeta_broad_err"], lum, model, resid):
        assert obj.chunks is not None and obj.chunks[0] == (4, 2)
    eager = fits.sheap.fwhm("hbeta_broad", errors=True)
    # same values and, as draws are keyed by the global spectrum index, the same errors
    xr.testing.assert_allclose(fw.compute(), eager)
    np.testing.assert_allclose(lum.values, fits.sheap.luminosity(5100).values)
    np.testing.assert_allclose(resid.values, fits.sheap.residuals().values, equal_nan=True)


# ---------------------------------------------------------------------------------------
# model curves, residuals, plot
# ---------------------------------------------------------------------------------------
def test_model_components_and_residuals(fits, spectra):
    m = fits.sheap.model()
    assert m.dims == ("spectrum", "wavelength") and m.attrs["frame"] == "observed"
    clean = MODEL.evaluate(WL_OBS[None, :] / (1 + Z[:, None]), PARAMS) / (1 + Z[:, None])
    np.testing.assert_allclose(m.values, clean, rtol=1e-10)
    rest = fits.sheap.model(frame="rest")
    np.testing.assert_allclose(rest.values, clean * (1 + Z[:, None]), rtol=1e-10)
    comps = fits.sheap.components()
    assert comps.dims == ("spectrum", "wavelength", "component")
    assert list(comps["component"].values) == ["powerlaw", "hb1", "hb2", "oiii"]
    np.testing.assert_allclose(comps.sum("component").values, m.values, rtol=1e-10)
    grid = np.linspace(4800.0, 5100.0, 50)
    on_grid = fits.sheap.model(grid)
    assert on_grid.attrs["frame"] == "rest"
    np.testing.assert_allclose(on_grid.values, MODEL.evaluate(grid, PARAMS), rtol=1e-10)
    np.testing.assert_array_equal(on_grid["wavelength"].values, grid)

    r = fits.sheap.residuals()
    assert r.dims == ("spectrum", "wavelength")
    assert np.all(np.isnan(r.values[:, MASKED]))
    outside = (WL_OBS[None, :] / (1 + Z[:, None]) < 4700) | (WL_OBS[None, :] / (1 + Z[:, None]) > 5200)
    assert np.all(np.isnan(r.values[outside]))
    good = r.values[np.isfinite(r.values)]
    assert good.size > 2000 and abs(np.std(good) - 1.0) < 0.05 and abs(np.mean(good)) < 0.05


def test_plot_draws_data_model_components_and_residuals(fits):
    import matplotlib.pyplot as plt

    fig = fits.sheap.plot(spectrum=2)
    try:
        assert isinstance(fig, matplotlib.figure.Figure)
        main, res = fig.axes
        assert len(main.lines) == 2 + len(MODEL.components)  # data, model, each component
        assert len(res.lines) == 2  # residuals and the zero line
        assert "status=converged_after_fallback" in main.get_title() and "redshift=0.15" in main.get_title()
    finally:
        plt.close(fig)
    with pytest.raises(OptionError, match="spectrum=99"):
        fits.sheap.plot(spectrum=99)


def test_plot_without_matplotlib_says_how_to_install(fits, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(MissingDependencyError, match=r"sheap-dask\[plot\]"):
        fits.sheap.plot(spectrum=0)


# ---------------------------------------------------------------------------------------
# status helpers
# ---------------------------------------------------------------------------------------
def test_status_counts_summary_and_failed(fits):
    counts = fits.sheap.status_counts()
    assert counts["converged"] == 2 and counts["converged_after_fallback"] == 1
    assert counts["max_iter"] == 1 and counts["failed"] == 1 and counts["no_data"] == 1 and counts["nonfinite"] == 0
    table = fits.sheap.summary()
    assert table.loc["converged", "count"] == 2 and table["count"].sum() == N
    assert table.loc["failed", "message"] == Status.FAILED.message
    bad = fits.sheap.failed()
    assert list(bad["spectrum"].values) == [103, 104, 105]
    # links carry over to the subset
    np.testing.assert_allclose(bad.sheap.fwhm("hbeta_broad").values, fits.sheap.fwhm("hbeta_broad").values[3:])
    # a spectrum gets the same Monte Carlo draws in the subset as in the full result
    full = fits.sheap.flux("oiii5007", errors=True)["flux_oiii5007_err"].values
    np.testing.assert_array_equal(bad.sheap.flux("oiii5007", errors=True)["flux_oiii5007_err"].values, full[3:])
    assert bad.sheap.residuals().sizes["spectrum"] == 3


# ---------------------------------------------------------------------------------------
# finding the model and the spectra; clear errors
# ---------------------------------------------------------------------------------------
def test_unknown_line_lists_the_model_lines(fits):
    with pytest.raises(ModelError, match="unknown line 'hbeta'.*hbeta_broad, oiii5007"):
        fits.sheap.fwhm("hbeta")
    with pytest.raises(OptionError, match="recipe"):
        fits.sheap.bh_mass("nope")
    with pytest.raises(ModelError, match="unknown component"):
        fits.sheap.components(names=["feii"])


def test_missing_model_and_spectra_errors_say_how_to_link(spectra):
    other = small_model()
    other.metadata["note"] = "a different fingerprint, never registered"
    ds = make_fits(model=other)
    acc._REGISTERED.clear()
    del other  # no live model of this session has the result's identity
    gc.collect()
    with pytest.raises(ModelError, match=r"fits\.sheap\.use\(model="):
        ds.sheap.fwhm("hbeta_broad")
    other = small_model()
    ds2 = make_fits(model=other)
    ds2.sheap.use(model=other)
    with pytest.raises(InputDataError, match=r"fits\.sheap\.use\(spectra="):
        ds2.sheap.residuals()
    with pytest.raises(InputDataError, match="has 4 spectra but the result has 6"):
        ds2.sheap.use(spectra=spectra.isel(spectrum=slice(0, 4)).drop_vars("spectrum"))
    wrong = sd.Model(MODEL.func, sd.Parameters().add("a", 1.0), check=False)  # would fail its build check
    with pytest.raises(ModelError, match="parameters"):
        ds2.sheap.use(model=wrong)
    no_z = make_fits().drop_vars("redshift")
    no_z.sheap.use(model=MODEL)
    with pytest.raises(InputDataError, match="redshift"):
        no_z.sheap.luminosity(5100)


@pytest.mark.filterwarnings("ignore:Consolidated metadata")
def test_model_found_by_fingerprint_registry_and_spectra_by_sheap_input(tmp_path, spectra):
    model = small_model()
    model.metadata["note"] = "registered"
    acc.register_model(model)
    ds = make_fits(model=model)
    assert ds.sheap.get_model() is model
    path = tmp_path / "input.zarr"
    spectra.to_zarr(path)
    ds.attrs["sheap_input"] = str(path)
    r = ds.sheap.residuals()
    np.testing.assert_allclose(r.values, make_fits().sheap.use(model=MODEL, spectra=spectra).residuals().values, equal_nan=True)
    ds.attrs["sheap_input"] = str(tmp_path / "missing.zarr")
    fresh = ds.copy()
    with pytest.raises(InputDataError, match="missing.zarr"):
        fresh.sheap.get_spectra()


def test_builtin_region_is_rebuilt_from_attrs():
    region = sd.models.region("hbeta", n_broad=1, feii=False)
    params = np.tile(region.params.values, (2, 1))
    ds = xr.Dataset(
        {"params": (("spectrum", "param"), params)},
        coords={"param": region.param_names},
        attrs={"sheap_model_fingerprint": "not-registered", "sheap_region": json.dumps({"name": "hbeta", "kwargs": {"n_broad": 1, "feii": False}})},
    )
    model = ds.sheap.get_model()
    assert model.param_names == region.param_names
    assert "hbeta_broad" in model.metadata["lines"]


def test_builtin_region_is_rebuilt_from_the_stored_description_by_fingerprint():
    region = sd.models.region("hbeta", n_broad=1, feii=False)
    ds = xr.Dataset(
        {"params": (("spectrum", "param"), np.tile(region.params.values, (2, 1)))},
        coords={"param": region.param_names},
        attrs={"sheap_model": json.dumps(region.to_dict(), default=str), "sheap_model_fingerprint": region.fingerprint()},
    )
    fingerprint = region.fingerprint()
    acc._REGISTERED.clear()
    del region  # as in a new session: no live model has this identity
    gc.collect()
    assert sd.model.find_model(fingerprint) is None
    assert ds.sheap.get_model().fingerprint() == fingerprint
    # a description whose rebuild does not reproduce the fingerprint is not trusted
    bad = ds.assign_attrs(sheap_model_fingerprint="0000000000000000")
    with pytest.raises(ModelError, match="cannot find the model"):
        bad.sheap.get_model()
