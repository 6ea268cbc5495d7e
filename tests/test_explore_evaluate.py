"""Model curves on ``ds.sheap`` (sheap_dask.explore.evaluate): model, components, residuals."""

from __future__ import annotations

import numpy as np
import pytest
from explore_data import MASKED, MODEL, PARAMS, WL_OBS, Z, linked_fits, make_spectra

spectra = pytest.fixture(make_spectra)
fits = pytest.fixture(linked_fits)  # the result with MODEL and spectra linked


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
