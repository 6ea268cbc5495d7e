"""The catalogue's figures (catalog.sheap.plot_object, plot_overview) and status names, on the
constructed fit result of tests/explore_data.py (no fitting)."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import xarray as xr
from explore_data import N, Z, linked_fits, make_spectra

from sheap_dask.errors import InputDataError
from sheap_dask.status import Status, status_attrs

matplotlib.use("Agg")

spectra = pytest.fixture(make_spectra)
fits = pytest.fixture(linked_fits)


def small_catalog(fits) -> xr.Dataset:
    """A catalogue of the one region 'small' (all spectra but the last fitted)."""
    covered = np.ones(N, dtype=bool)
    covered[-1] = False
    mass = np.linspace(7.5, 9.0, N)
    mass[1] = np.nan
    return xr.Dataset(
        {"small_covered": ("spectrum", covered), "small_chi2_nu": ("spectrum", fits.redchi2.values),
         "small_status": ("spectrum", fits.status.values.astype(np.int8), {**status_attrs(), "long_name": "status of the small fit"}),
         "hbeta_broad_fwhm": ("spectrum", np.linspace(2000, 6000, N)), "hbeta_broad_fwhm_err": ("spectrum", np.full(N, 100.0)),
         "log_l5100": ("spectrum", np.linspace(43.5, 45.5, N)), "log_mbh": ("spectrum", mass),
         "mbh_recipe": ("spectrum", np.where(np.isfinite(mass), "vp06_hbeta", ""))},
        coords={"spectrum": fits.spectrum.values, "redshift": ("spectrum", Z),
                "specname": ("spectrum", [f"spec-{i:04d}" for i in range(N)])},
    )  # fmt: skip


def test_status_names(fits):
    names = fits.sheap.status_names()
    assert names.dims == ("spectrum",) and names.dtype.kind == "U"
    assert list(names.values) == [Status(int(c)).meaning for c in fits.status.values]
    cat = small_catalog(fits)
    assert list(cat.sheap.status_names("small_status").values) == list(names.values)
    with pytest.raises(InputDataError, match="status variables here: \\['small_status'\\]"):
        cat.sheap.status_names()


def test_plot_object_draws_every_fitted_region(fits, spectra, tmp_path):
    import matplotlib.pyplot as plt

    cat = small_catalog(fits)
    fig = cat.sheap.plot_object(2, fits={"small": fits}, spectra=spectra)
    try:
        mains = [ax for ax in fig.axes if ax.get_title()]
        assert len(mains) == 1 and mains[0].get_title().startswith("small") and r"$\chi^2_\nu$" in mains[0].get_title()
        head = fig._suptitle.get_text()
        assert head.startswith("spec-0002") and "z = 0.15" in head and "vp06_hbeta" in head
        assert "[Å]" in fig.axes[1].get_xlabel()
        fig.savefig(tmp_path / "object.png")
    finally:
        plt.close(fig)
    with pytest.raises(InputDataError, match="no fitted region"):
        cat.sheap.plot_object(N - 1, fits={"small": fits}, spectra=spectra)
    with pytest.raises(InputDataError, match="pass fits="):
        cat.sheap.plot_object(0)  # an in-memory catalogue does not know its fits


def test_plot_overview_has_units_on_every_axis(fits, tmp_path):
    import matplotlib.pyplot as plt

    fig = small_catalog(fits).sheap.plot_overview()
    try:
        panels = [ax for ax in fig.axes if ax.get_xlabel()]
        assert len(panels) == 2  # the H-beta panel and the mass histogram (the colour bar has its own label)
        scatter, hist = panels
        assert "[erg s$^{-1}$]" in scatter.get_xlabel() and "[km s$^{-1}$]" in scatter.get_ylabel()
        assert "M_\\mathrm{BH}" in hist.get_xlabel() and hist.get_ylabel() == "spectra"
        points = scatter.collections[1].get_offsets()  # [0]: the error bars
        assert len(points) == N - 1  # the spectrum without a fiducial mass is drawn apart
        colourbar = [ax for ax in fig.axes if "fiducial log" in ax.get_ylabel()]
        assert colourbar, "a colour bar labelled with the fiducial mass"
        fig.savefig(tmp_path / "overview.png")
    finally:
        plt.close(fig)
