"""Reading spectra into the sheap_dask data conventions, and writing them to zarr.

Every reader returns an :class:`xarray.Dataset` with dimensions ``("spectrum", "wavelength")``,
``flux`` and ``ivar`` float32 variables (``ivar == 0`` masks a pixel), a ``wavelength``
coordinate in Angstrom and per-spectrum coordinates (``redshift``, ``plate``, ``mjd``, ...).

SDSS/BOSS/eBOSS spec files (:mod:`.sdss`)
    :func:`read_sdss_spectra` puts many spec files on the common 1e-4 log10-wavelength grid;
    :func:`ingest_sdss` streams them into a zarr store chunk by chunk.
DESI coadd and spectra files (:mod:`.desi`)
    :func:`read_desi_spectra` puts the B, R, Z arms on DESI's linear 0.8 A grid and matches
    redrock/zcatalog redshifts; :func:`ingest_desi` streams them into a zarr store.
Tables and quasar-catalogue products (:mod:`.tables`)
    :func:`read_table_spectrum` reads a (wavelength, flux, error) CSV/whitespace table;
    :func:`read_rest_frame_fits` the rest-frame spectrum of a DR16Q/DR19 ``op`` file.
zarr (:mod:`.zarr`)
    :func:`open_spectra`, :func:`write_zarr`, and the chunk-by-chunk ingestion engine.
Catalogue exports (:mod:`.export`)
    :func:`to_fits`, :func:`to_parquet`, :func:`to_csv`: a catalogue of
    :func:`sheap_dask.fit_catalog` as a file, with units, descriptions and flag meanings.
Galactic extinction and air/vacuum wavelengths
    live in :mod:`sheap_dask.astro` and are re-exported here: :func:`extinction_curve`,
    :func:`dered`, :func:`air_to_vacuum`, :func:`vacuum_to_air`.

astropy is needed only for FITS files; it is the optional extra ``sheap-dask[sdss]``.
"""

from __future__ import annotations

from typing import Any

import xarray as xr

from ..astro import air_to_vacuum, dered, extinction_curve, vacuum_to_air
from . import desi as _desi
from . import sdss as _sdss
from . import tables as _tables
from . import zarr as _zarr
from .desi import (
    DESI_WAVE_MAX,
    DESI_WAVE_MIN,
    DESI_WAVE_STEP,
    ingest_desi,
    instrumental_fwhm_at,
    is_desi_file,
    read_desi_spectra,
)
from .export import to_csv, to_fits, to_parquet
from .sdss import (
    DEFAULT_MASK_BITS,
    LOGLAM_STEP,
    SDSS_PIXMASK_BITS,
    ingest_sdss,
    mask_value,
    read_sdss_spectra,
)
from .tables import read_rest_frame_fits, read_table_spectrum
from .zarr import open_spectra, write_zarr

__all__ = [
    *_sdss.__all__,
    *_desi.__all__,
    *_tables.__all__,
    *_zarr.__all__,
    "extinction_curve",
    "dered",
    "air_to_vacuum",
    "vacuum_to_air",
    "synthetic_spectra",
    "to_fits",
    "to_parquet",
    "to_csv",
]


def synthetic_spectra(*args: Any, **kwargs: Any) -> xr.Dataset:
    """Synthetic spectra for demos and tests: see :func:`sheap_dask.synthetic.synthetic_spectra`."""
    from ..synthetic import synthetic_spectra as _synthetic

    return _synthetic(*args, **kwargs)
