"""The catalogue job (sheap_dask.catalog.fit_catalog) on a mixed-redshift set of synthetic
spectra: three H-beta quasars at z ~ 0.2 and three MgII quasars at z ~ 1 on one observed grid,
so each region fits only the spectra that cover it. The synchronous scheduler keeps the fits
in this process (one compilation per region for the whole module)."""

from __future__ import annotations

import json

import dask
import numpy as np
import pytest
import xarray as xr

import sheap_dask as sd
from sheap_dask import catalog as catalog_module
from sheap_dask import catalog_table as ct
from sheap_dask.errors import (
    NotAStoreError,
    OptionError,
    ResumeMismatchError,
    StoreExistsError,
)
from sheap_dask.status import Status

FIT = {"num_steps": 30}
N_SAMPLES = 32


def mixed_spectra() -> xr.Dataset:
    wl = 10 ** np.arange(np.log10(3800.0), np.log10(9200.0), 2e-4)
    a = sd.io.synthetic_spectra(3, region="hbeta", seed=1, redshift=(0.15, 0.3), wavelength=wl, masked_fraction=0)
    b = sd.io.synthetic_spectra(3, region="mgii", seed=2, redshift=(0.9, 1.1), wavelength=wl, masked_fraction=0)
    ds = xr.concat([a[["flux", "ivar"]], b[["flux", "ivar"]]], dim="spectrum").assign_coords(spectrum=np.arange(100, 106))
    ds["flux"].attrs["units"] = "1e-17 erg/s/cm2/Angstrom"
    return ds.assign_coords(specname=("spectrum", [f"obj{i}" for i in range(6)]))


@pytest.fixture(scope="module")
def synchronous():
    with dask.config.set(scheduler="synchronous"):
        yield


@pytest.fixture(scope="module")
def spectra():
    return mixed_spectra()


@pytest.fixture(scope="module")
def catalog(spectra, synchronous):
    return sd.fit_catalog(spectra, ["hbeta", "mgii"], fit_options=FIT, n_samples=N_SAMPLES)


def test_each_region_fits_the_spectra_that_cover_it(catalog, spectra, synchronous):
    assert catalog.sizes["spectrum"] == 6 and list(catalog.spectrum.values) == list(range(100, 106))
    assert list(catalog["hbeta_covered"].values) == [True] * 3 + [False] * 3
    assert list(catalog["mgii_covered"].values) == [False] * 3 + [True] * 3
    # uncovered rows: not fitted (no_data), not measured, NaN
    assert (catalog["mgii_status"].values[:3] == Status.NO_DATA).all()
    assert (catalog["mgii_broad_flags"].values[:3] & ct.LineFlag.NOT_MEASURED).all()
    assert np.isnan(catalog["hbeta_broad_fwhm"].values[3:]).all() and np.isnan(catalog["log_l5100"].values[3:]).all()
    # the region columns are those of fit_dataset on the sub-selection
    fits = sd.fit_dataset(spectra.isel(spectrum=[3, 4, 5]), sd.models.region("mgii"), progress=False, **FIT)
    np.testing.assert_array_equal(catalog["mgii_status"].values[3:], fits.status.values)
    np.testing.assert_allclose(catalog["mgii_chi2_nu"].values[3:], fits.redchi2.values)
    assert np.isfinite(catalog["mgii_broad_fwhm"].values[3:]).all() and np.isfinite(catalog["log_l3000"].values[3:]).all()
    # DR16Q fiducial mass: H-beta below z 0.8, MgII above
    assert set(catalog["mbh_recipe"].values[3:]) == {"shen11_mgii"}
    np.testing.assert_allclose(catalog["log_mbh"].values[3:], catalog["log_mbh_shen11_mgii"].values[3:])
    assert list(catalog["specname"].values) == [f"obj{i}" for i in range(6)]
    assert catalog["hbeta_status"].dtype == np.int8 and catalog["flags"].dtype == np.int16


def test_units_descriptions_and_provenance(catalog):
    for name, var in catalog.variables.items():
        assert var.attrs.get("long_name"), name
        if var.dtype.kind in "fiub" and name not in catalog.dims:
            assert "units" in var.attrs, name
    regions = json.loads(catalog.attrs["sheap_regions"])
    assert set(regions) == {"hbeta", "mgii"}
    assert regions["mgii"]["model_identity"] == sd.models.region("mgii").identity() and regions["mgii"]["n_fitted"] == 3
    assert regions["hbeta"]["fit_options"]["num_steps"] == 30
    assert catalog.attrs["sheap_version"] == sd.__version__ and "DR16Q" in catalog.attrs["fiducial_rule"]


def test_arguments_are_checked_before_any_work(spectra):
    with pytest.raises(OptionError, match="unknown region.*'hbta'"):
        sd.fit_catalog(spectra, "hbta")
    with pytest.raises(OptionError, match="region_options names region"):
        sd.fit_catalog(spectra, ["mgii"], region_options={"hbeta": {"oiii_wing": True}})
    with pytest.raises(OptionError, match=r"region_options\['mgii'\]"):
        sd.fit_catalog(spectra, ["mgii"], region_options={"mgii": {"oiii_wingz": True}})
    with pytest.raises(OptionError, match="fiducial"):
        sd.fit_catalog(spectra, ["mgii"], fiducial="nope")
    assert list(catalog_module.catalog_regions("auto")) == list(sd.models.REGIONS)
    assert list(catalog_module.catalog_regions("mgii, hbeta")) == ["mgii", "hbeta"]


def test_an_interrupted_catalogue_resumes_without_refitting(catalog, spectra, synchronous, tmp_path, monkeypatch):
    store = tmp_path / "cat"
    real_fit = sd.fit.fit_dataset
    fitted = []
    real_write = sd.store._fit_and_write

    def counting(*args, **kwargs):
        fitted.append(kwargs["store"])
        return real_write(*args, **kwargs)

    def interrupted(ds, model, **kwargs):
        if model.name.startswith("mgii"):
            raise KeyboardInterrupt  # Ctrl-C once the H-beta region is done
        return real_fit(ds, model, **kwargs)

    monkeypatch.setattr(sd.store, "_fit_and_write", counting)
    monkeypatch.setattr(sd.fit, "fit_dataset", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sd.fit_catalog(spectra, ["hbeta", "mgii"], store=store, fit_options=FIT, n_samples=N_SAMPLES)
    assert (store / "regions" / "hbeta.zarr").is_dir() and not (store / "catalog.zarr").exists()
    with pytest.raises(NotAStoreError, match="unfinished"):
        sd.open_catalog(store)
    assert sd.store.store_progress(store / "regions" / "hbeta.zarr").complete
    n_hbeta = len(fitted)
    assert n_hbeta >= 1

    monkeypatch.setattr(sd.fit, "fit_dataset", real_fit)
    resumed = sd.fit_catalog(spectra, ["hbeta", "mgii"], store=store, fit_options=FIT, n_samples=N_SAMPLES).load()
    assert all("mgii" in s for s in fitted[n_hbeta:]), "the finished H-beta region was refitted"
    xr.testing.assert_identical(resumed.drop_attrs(), catalog.drop_attrs())
    for name in catalog.variables:
        assert resumed[name].attrs.keys() == catalog[name].attrs.keys(), name
    assert resumed.attrs["sheap_catalog_fingerprint"] == catalog.attrs["sheap_catalog_fingerprint"]

    # complete: a third run fits nothing and opens the same catalogue
    n = len(fitted)
    again = sd.fit_catalog(spectra, ["hbeta", "mgii"], store=store, fit_options=FIT, n_samples=N_SAMPLES).load()
    assert len(fitted) == n
    xr.testing.assert_identical(again, resumed)
    xr.testing.assert_identical(sd.open_catalog(store).load(), resumed)

    # another catalogue into the same store is refused, naming the difference
    with pytest.raises(ResumeMismatchError, match="options.n_samples"):
        sd.fit_catalog(spectra, ["hbeta", "mgii"], store=store, fit_options=FIT, n_samples=16)


def test_foreign_directories_are_never_touched(spectra, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(StoreExistsError, match="not a sheap_dask catalogue store"):
        sd.fit_catalog(spectra, ["mgii"], store=foreign)
    with pytest.raises(StoreExistsError):
        sd.fit_catalog(spectra, ["mgii"], store=foreign, resume=False)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"] and (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(NotAStoreError, match="not a sheap_dask catalogue store"):
        sd.open_catalog(foreign)
