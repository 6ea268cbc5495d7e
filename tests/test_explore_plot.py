"""Plotting one spectrum with ``ds.sheap.plot`` (sheap_dask.explore.plot)."""

from __future__ import annotations

import sys

import matplotlib
import pytest
from explore_data import MODEL, linked_fits, make_spectra

from sheap_dask.errors import MissingDependencyError, OptionError

matplotlib.use("Agg")

spectra = pytest.fixture(make_spectra)
fits = pytest.fixture(linked_fits)  # the result with MODEL and spectra linked


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
