"""Tests of sheap_dask.io.zarr: store layout of an ingestion, zarr round trips, open_spectra."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import xarray as xr
from sdss_data import CHUNK, ingested, sdss_files  # noqa: F401 (fixtures)

from sheap_dask import io as sio
from sheap_dask.errors import MissingDependencyError, OptionError


def test_ingest_chunks_along_spectrum_only(sdss_files, ingested):
    _, ds = ingested
    n, nw = ds.sizes["spectrum"], ds.sizes["wavelength"]
    assert ds.flux.chunks == ((CHUNK, CHUNK, n - 2 * CHUNK), (nw,))
    assert ds.ivar.chunks == ds.flux.chunks
    # coordinates are chunked like the data, so the Dataset has one set of chunks
    assert ds.chunks["spectrum"] == ds.flux.chunks[0]
    assert ds.flux.dtype == np.float32 and ds.ivar.dtype == np.float32
    assert ds.flux.dims == ("spectrum", "wavelength")


def test_zarr_round_trip_identical(sdss_files, ingested, tmp_path):
    store, ds = ingested
    eager = sio.read_sdss_spectra(sdss_files)
    xr.testing.assert_identical(ds.compute(), eager)
    lazy = sio.read_sdss_spectra(sdss_files, chunk=5)
    assert lazy.flux.chunks[0] == (5, 5, 5, 4)
    xr.testing.assert_identical(lazy.compute(), eager)
    again = sio.write_zarr(ds, tmp_path / "copy.zarr")
    xr.testing.assert_identical(again.compute(), eager)
    assert again.flux.chunks == ds.flux.chunks


def test_open_spectra_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.zarr"):
        sio.open_spectra(tmp_path / "absent.zarr")
    with pytest.raises(OptionError, match="nosuchprotocol"):
        sio.open_spectra("nosuchprotocol://bucket/store.zarr")
    try:
        import s3fs  # noqa: F401
    except ImportError:
        with pytest.raises(MissingDependencyError, match="s3"):
            sio.open_spectra("s3://bucket/store.zarr")


def test_synthetic_spectra_is_a_lazy_reexport(monkeypatch):
    fake = types.ModuleType("sheap_dask.synthetic")
    fake.synthetic_spectra = lambda *a, **k: ("called", a, k)
    monkeypatch.setitem(sys.modules, "sheap_dask.synthetic", fake)
    assert sio.synthetic_spectra(3, seed=1) == ("called", (3,), {"seed": 1})
