"""Real SDSS spec files of ../shared/data and one ingested store of them, for the io tests."""

from __future__ import annotations

import csv
import functools

import numpy as np
import pytest

from sheap_dask import io as sio

fits = pytest.importorskip("astropy.io.fits")

SDSS_FOLDERS = ("sdss_sheap", "pyqsofit_examples", "pyqsofit_rm017", "gelato_examples", "qsfit_example")
CHUNK = 8


def _manifest(shared):
    with open(shared / "MANIFEST.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def sdss_files(shared_spectra):
    rows = _manifest(shared_spectra)
    files = [
        shared_spectra / r["file"]
        for r in rows
        if r["file"].split("/")[0] in SDSS_FOLDERS and r["file"].endswith(".fits")
    ]
    assert len(files) == 19, files
    return [str(f) for f in files]


@pytest.fixture(scope="module")
def ingested(sdss_files, tmp_path_factory):
    store = tmp_path_factory.mktemp("io") / "sdss.zarr"
    ds = sio.ingest_sdss(sdss_files, store, chunk=CHUNK, n_jobs=4)
    return store, ds


@functools.lru_cache(maxsize=None)
def _coadd(path):
    # astropy's full parse of HDU2 (~240 columns) is the slow part: read each file once
    with fits.open(path) as h:
        d = h[1].data
        t = h[2].data
        return (
            {k: np.asarray(d[k]) for k in ("flux", "loglam", "ivar", "and_mask")},
            {k: t[k][0] for k in ("Z", "PLATE", "MJD", "FIBERID", "CLASS", "SUBCLASS")},
        )
