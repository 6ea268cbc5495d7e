"""The ``ds.sheap`` facade (sheap_dask.explore.accessor): laziness on dask, status helpers, links carried to subsets."""

from __future__ import annotations

import dask
import numpy as np
import pytest
import xarray as xr
from explore_data import MODEL, N, linked_fits, make_fits, make_spectra, no_compute

from sheap_dask.status import Status

spectra = pytest.fixture(make_spectra)
fits = pytest.fixture(linked_fits)  # the result with MODEL and spectra linked


def test_dask_backed_result_stays_lazy_and_matches(fits, spectra):
    lazy = make_fits().chunk({"spectrum": 4})
    lazy.sheap.use(model=MODEL, spectra=spectra.chunk({"spectrum": 4}))
    with dask.config.set(scheduler=no_compute):
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
