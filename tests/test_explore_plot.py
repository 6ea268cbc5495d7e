"""Plotting one spectrum with ``ds.sheap.plot`` (sheap_dask.explore.plot)."""

from __future__ import annotations

import sys

import matplotlib
import numpy as np
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
        labels = [line.get_label() for line in main.lines]
        # data, the continuum, each line as one summed profile, its two Gaussians (unlabelled), the total model
        assert labels[:2] == ["data", "powerlaw"] and labels[-1] == "total model"
        assert [x for x in labels if not x.startswith("_")] == ["data", "powerlaw", "hbeta_broad", "oiii5007", "total model"]
        assert len(main.lines) == 2 + len(MODEL.metadata["lines"]) + 2 + 1
        colours = {line.get_label(): matplotlib.colors.to_hex(line.get_color()) for line in main.lines}
        assert colours["total model"] not in {colours["hbeta_broad"], colours["oiii5007"]}
        broad = next(line for line in main.lines if line.get_label() == "hbeta_broad")
        total = next(line for line in main.lines if line.get_label() == "total model")
        x, y = broad.get_data()
        ok = np.isfinite(y)
        # the summed profile sits on the continuum: without [OIII] it is the total model near H-beta
        near = ok & (np.abs(x - 4862.68) < 30)
        np.testing.assert_allclose(y[near], total.get_data()[1][near], rtol=1e-6)
        assert len(res.lines) == 2  # residuals and the zero line
        title = main.get_title()
        assert title.startswith("spectrum 102") and "z = 0.15" in title and r"$\chi^2_\nu$" in title
        assert "[converged_after_fallback]" in title and "redshift=" not in title
        assert "erg s$^{-1}$ cm$^{-2}$" in main.get_ylabel() and "$10^{-17}$" in main.get_ylabel()
        legend = main.get_legend()
        assert legend is not None and legend.get_bbox_to_anchor().x0 > main.get_position().x1 * fig.bbox.width - 1  # outside
    finally:
        plt.close(fig)
    with pytest.raises(OptionError, match="spectrum=99"):
        fits.sheap.plot(spectrum=99)


def test_plot_into_given_axes(fits):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, sharex="col")
    try:
        assert fits.sheap.plot(spectrum=0, ax=(axes[0, 0], axes[1, 0]), legend="inside") is fig
        fits.sheap.plot(spectrum=1, ax=(axes[0, 1], axes[1, 1]), components=False, legend="none")
        assert len(fig.axes) == 4 and axes[0, 1].get_legend() is None and axes[0, 0].get_legend() is not None
        assert axes[0, 0].get_title() != axes[0, 1].get_title() and not fig._suptitle
        assert len(axes[0, 1].lines) == 2 + len(MODEL.metadata["lines"]) + 1  # no single Gaussians
    finally:
        plt.close(fig)
    with pytest.raises(OptionError, match="legend='left'"):
        fits.sheap.plot(spectrum=0, legend="left")


def test_plot_without_matplotlib_says_how_to_install(fits, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(MissingDependencyError, match=r"sheap-dask\[plot\]"):
        fits.sheap.plot(spectrum=0)
