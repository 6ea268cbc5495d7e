"""Finding a result's model and spectra (sheap_dask.explore.link), and the errors that say how to link them."""

from __future__ import annotations

import gc
import json

import numpy as np
import pytest
import xarray as xr
from explore_data import MODEL, make_fits, make_spectra, small_model

import sheap_dask as sd
from sheap_dask.errors import InputDataError, ModelError
from sheap_dask.explore import link

spectra = pytest.fixture(make_spectra)


def test_missing_model_and_spectra_errors_say_how_to_link(spectra):
    other = small_model()
    other.metadata["note"] = "a different fingerprint, never registered"
    ds = make_fits(model=other)
    link._REGISTERED.clear()
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
    sd.accessor.register_model(model)
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
    link._REGISTERED.clear()
    del region  # as in a new session: no live model has this identity
    gc.collect()
    assert sd.model.find_model(fingerprint) is None
    assert ds.sheap.get_model().fingerprint() == fingerprint
    # a description whose rebuild does not reproduce the fingerprint is not trusted
    bad = ds.assign_attrs(sheap_model_fingerprint="0000000000000000")
    with pytest.raises(ModelError, match="cannot find the model"):
        bad.sheap.get_model()
