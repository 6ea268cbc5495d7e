"""SDSS/BOSS/eBOSS spec files: one common log10-wavelength grid, read or streamed to zarr.

:func:`read_sdss_spectra` puts many ``spec-*.fits`` / ``spec-*_lite.fits`` /
``PLATE-MJD-FIBER.fits`` files on one common grid. SDSS coadds are sampled at exactly
``1e-4`` in log10(lambda / Angstrom) on a grid anchored at ``loglam = 0``, so pixel ``i``
of a file lands on the integer grid index ``round(loglam[i] / 1e-4)`` without any
resampling; the residual of that rounding is checked for every pixel.
:func:`ingest_sdss` streams the same thing into a zarr store chunk by chunk.

astropy is needed only for FITS files; it is the optional extra ``sheap-dask[sdss]``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any

import numpy as np
import xarray as xr

from ..astro import EXTINCTION_LAWS, SF11_RECALIBRATION, dered
from ..errors import InputDataError, OptionError
from ._common import (
    FLUX_UNITS,
    IVAR_UNITS,
    colmap,
    default_jobs,
    expand_files,
    scan_files,
)
from ._fits import fits_module, open_checked, table_columns, table_row
from .sdss_masks import DEFAULT_MASK_BITS, SDSS_PIXMASK_BITS, _mask_names, mask_value
from .zarr import ingest_files, read_files

__all__ = [
    "SDSS_PIXMASK_BITS",
    "DEFAULT_MASK_BITS",
    "LOGLAM_STEP",
    "read_sdss_spectra",
    "ingest_sdss",
    "mask_value",
]

#: log10(lambda) pixel size of SDSS/BOSS/eBOSS coadded spectra.
LOGLAM_STEP = 1e-4
# A pixel whose loglam is further than this (in pixels) from the 1e-4 grid is not an SDSS
# coadd pixel. float32 loglam near 4.0 has a spacing of 4.8e-7 dex = 0.005 pixel, so genuine
# files stay below ~0.003; 0.02 leaves margin and still catches any real offset.
_GRID_TOLERANCE = 0.02

# SDSS specObj/spAll EXTINCTION = A_ugriz for E(B-V)_SFD with the Schlafly & Finkbeiner
# (2011, ApJ 737, 103; Table 6, R_V = 3.1) coefficients; r is the best measured band.
_SF11_R_BAND = 2.285


def _resolve_ebv(ebv: Any, n_files: int) -> np.ndarray | str | None:
    if ebv is None:
        return None
    if isinstance(ebv, str):
        key = ebv.lower()
        if key not in ("sfd", "sf11"):
            raise OptionError(
                f"ebv={ebv!r}: use a number, one number per file, 'sfd' (E(B-V) of the SFD98 map, from the "
                "files' EXTINCTION column) or 'sf11' (0.86 x SFD, Schlafly & Finkbeiner 2011)"
            )
        return key
    arr = np.asarray(ebv, dtype=np.float64)
    if arr.ndim == 0:
        arr = np.full(n_files, float(arr))
    if arr.shape != (n_files,):
        raise OptionError(f"ebv has {arr.size} values for {n_files} files; pass a scalar or one value per file")
    if not np.all(np.isfinite(arr)) or np.any(arr < 0):
        raise OptionError(f"ebv must be finite and >= 0 magnitudes, got {ebv!r}")
    return arr


def _scan_sdss_file(path: str, ebv_mode: str | None) -> dict[str, Any]:
    """Read one spec file's metadata and its grid extent without reading the spectrum."""
    with open_checked(path, n_hdus=3) as hdul:
        try:
            hdul[2]
        except IndexError:
            raise InputDataError(
                f"{path}: has {len(hdul)} HDUs; an SDSS spec file has HDU1 COADD and HDU2 SPECOBJ/SPALL "
                "(DR7 spSpec files are not supported: download the DR8+ spec file)"
            ) from None
        h1 = hdul[1].header
        cols1 = table_columns(h1)
        missing = [c for c in ("flux", "loglam", "ivar") if c not in cols1]
        if missing:
            hint = ""
            if len(hdul) > 3 and "wave_prereduced" in table_columns(hdul[3].header):
                hint = "; this is a quasar-catalogue op file: read it with sheap_dask.io.read_rest_frame_fits"
            raise InputDataError(
                f"{path}: HDU1 lacks the column(s) {missing} of an SDSS COADD table "
                f"(it has {list(cols1.values())}){hint}"
            )
        if hdul[2].header.get("XTENSION", "").strip() != "BINTABLE":
            raise InputDataError(f"{path}: HDU2 is not the SPECOBJ/SPALL table of an SDSS spec file")
        wanted = ("z", "z_err", "zwarning", "plate", "mjd", "fiberid", "plug_ra", "plug_dec", "ra", "dec", "class", "subclass", "extinction")
        row = table_row(hdul, 2, wanted)
        hdr0 = hdul[0].header
        hdu2_name = hdul[2].name

        def get(*names, default=None, header_key=None):
            for n in names:
                if n.lower() in row:
                    return row[n.lower()]
            if header_key is not None:
                if header_key in hdr0:
                    return hdr0[header_key]
                raise InputDataError(
                    f"{path}: HDU2 has no {names[0]} column and the primary header no {header_key} keyword"
                )
            return default

        z = get("Z")
        if z is None:
            raise InputDataError(f"{path}: HDU2 ({hdu2_name}) has no Z column: the pipeline redshift is missing")
        meta = {
            "redshift": float(z),
            "redshift_err": float(get("Z_ERR", default=np.nan)),
            "zwarning": int(get("ZWARNING", default=-1)),
            "plate": int(get("PLATE", header_key="PLATEID")),
            "mjd": int(get("MJD", header_key="MJD")),
            "fiberid": int(get("FIBERID", header_key="FIBERID")),
            "ra": float(get("PLUG_RA", "RA", default=np.nan)),
            "dec": float(get("PLUG_DEC", "DEC", default=np.nan)),
            "objclass": str(get("CLASS", default="")).strip(),
            "subclass": str(get("SUBCLASS", default="")).strip(),
        }
        if ebv_mode is not None:
            ext = get("EXTINCTION")
            if ext is None:
                raise InputDataError(
                    f"{path}: ebv={ebv_mode!r} needs the EXTINCTION column of HDU2, which this file "
                    "(SDSS-I/II era SPECOBJ) lacks; pass E(B-V) values explicitly with ebv=[...]"
                )
            e_sfd = float(np.asarray(ext)[2]) / _SF11_R_BAND
            meta["ebv"] = e_sfd * (SF11_RECALIBRATION if ebv_mode == "sf11" else 1.0)
        # The grid extent from the first and last loglam (ascending in every coadd). Not from
        # the primary header's COEFF0: it is one pixel off in some spec-lite files (1325-52762).
        n_pix = int(h1.get("NAXIS2", 0))
        if n_pix < 1:
            raise InputDataError(f"{path}: the COADD table of HDU1 has no rows")
        first = table_row(hdul, 1, ["loglam"], 0).get("loglam")
        last = table_row(hdul, 1, ["loglam"], n_pix - 1).get("loglam")
        if first is None or last is None:  # loglam stored with TSCAL/TZERO: let astropy decode
            loglam = np.asarray(hdul[1].data[cols1["loglam"]], dtype=np.float64)
            first, last = loglam.min(), loglam.max()
        k_start = int(np.rint(float(first) / LOGLAM_STEP))
        k_stop = int(np.rint(float(last) / LOGLAM_STEP)) + 1
        if k_stop <= k_start:
            raise InputDataError(f"{path}: loglam is not ascending in the COADD table (first {first}, last {last})")
    meta["k_start"], meta["k_stop"] = k_start, k_stop
    meta["filename"] = os.path.basename(path)
    meta["specname"] = f"spec-{meta['plate']:04d}-{meta['mjd']:05d}-{meta['fiberid']:04d}"
    return meta


def _read_sdss_pixels(
    path: str, k0: int, n_wave: int, mask: int, fill_value: float, clip: bool
) -> tuple[np.ndarray, np.ndarray]:
    """One file's flux and ivar placed on the grid ``k0 .. k0 + n_wave - 1`` (float32 rows)."""
    fits = fits_module()
    with fits.open(path, memmap=False) as hdul:
        data = hdul[1].data
        cols = colmap(hdul[1].columns.names)
        loglam = np.asarray(data[cols["loglam"]], dtype=np.float64)
        flux = np.asarray(data[cols["flux"]], dtype=np.float32)
        ivar = np.asarray(data[cols["ivar"]], dtype=np.float32)
        if mask:
            if "and_mask" not in cols:
                raise InputDataError(
                    f"{path}: HDU1 has no and_mask column; pass mask_bits=None to read it without pixel masks"
                )
            and_mask = np.asarray(data[cols["and_mask"]]).astype(np.int64)
        else:
            and_mask = None
    pix = loglam / LOGLAM_STEP
    k = np.rint(pix)
    resid = np.abs(pix - k)
    if not np.all(np.isfinite(resid)) or resid.max() > _GRID_TOLERANCE:
        worst = float(np.nanmax(resid)) if np.any(np.isfinite(resid)) else float("nan")
        raise InputDataError(
            f"{path}: loglam is not on the SDSS 1e-4 log10(lambda) grid (largest offset {worst:.3g} pixel); "
            "this is not an SDSS coadd: read it with read_table_spectrum"
        )
    idx = k.astype(np.int64) - k0
    if np.unique(idx).size != idx.size:
        raise InputDataError(f"{path}: two pixels fall on the same 1e-4 log10(lambda) grid point")
    keep = (idx >= 0) & (idx < n_wave)
    if not clip and not np.all(keep):
        raise InputDataError(
            f"{path}: loglam is not ascending: pixels fall outside the range of its first and last loglam"
        )
    bad = ~np.isfinite(ivar) | (ivar < 0) | ~np.isfinite(flux)
    if and_mask is not None:
        bad |= (and_mask & mask) != 0
    ivar = np.where(bad, np.float32(0), ivar)
    flux = np.where(np.isfinite(flux), flux, np.float32(fill_value))
    row_flux = np.full(n_wave, fill_value, dtype=np.float32)
    row_ivar = np.zeros(n_wave, dtype=np.float32)
    row_flux[idx[keep]] = flux[keep]
    row_ivar[idx[keep]] = ivar[keep]
    return row_flux, row_ivar


def _read_sdss_row(path, ebv, *, k0, n_wave, mask, fill_value, clip, wavelength, law, r_v):
    """One file on the grid, dereddened when ``ebv > 0`` (module level so processes can run it)."""
    f, iv = _read_sdss_pixels(path, k0, n_wave, mask, fill_value, clip)
    if ebv is not None and ebv > 0:
        f, iv = dered(wavelength, f, iv, ebv, law=law, r_v=r_v)
    return f, iv


class _SdssPlan:
    """What a read/ingest needs: the file list, the grid, the metadata and the options."""

    variables = ("flux", "ivar")
    file_kind = "SDSS spec"

    def __init__(self, files, *, mask_bits, ebv, dereddening, r_v, wavelength_range, fill_value, n_jobs, skip_bad, pool: Executor):
        self.files = expand_files(files)
        self.mask = mask_value(mask_bits)
        self.n_jobs = default_jobs(n_jobs)
        self.fill_value = float(fill_value)
        if dereddening not in EXTINCTION_LAWS:
            raise OptionError(f"dereddening={dereddening!r} is not a known extinction law; use one of {EXTINCTION_LAWS}")
        self.law, self.r_v = dereddening, float(r_v)
        ebv_spec = _resolve_ebv(ebv, len(self.files))
        ebv_mode = ebv_spec if isinstance(ebv_spec, str) else None
        scan = functools.partial(_scan_sdss_file, ebv_mode=ebv_mode)
        keep, self.meta, self.skipped = scan_files(
            pool, scan, self.files, skip_bad=skip_bad, chunksize=self._chunksize(len(self.files))
        )
        if not keep:
            raise InputDataError(f"none of the {len(self.files)} files is a readable SDSS spec file: {self.skipped[0]}, ...")
        self.files = [self.files[i] for i in keep]
        if isinstance(ebv_spec, np.ndarray):
            ebv_spec = ebv_spec[keep]
        if ebv_spec is None:
            self.ebv = None
        elif isinstance(ebv_spec, str):
            self.ebv = np.array([m["ebv"] for m in self.meta])
        else:
            self.ebv = ebv_spec
        self.ebv_source = ebv_spec if isinstance(ebv_spec, str) else ("user" if ebv_spec is not None else None)
        if wavelength_range is None:
            self.k0 = min(m["k_start"] for m in self.meta)
            k1 = max(m["k_stop"] for m in self.meta)
            self.clip = False
        else:
            try:
                wmin, wmax = (float(w) for w in wavelength_range)
            except (TypeError, ValueError) as exc:
                raise OptionError(
                    f"wavelength_range={wavelength_range!r} must be (min, max) in Angstrom"
                ) from exc
            if not (0 < wmin < wmax):
                raise OptionError(f"wavelength_range={wavelength_range!r} must satisfy 0 < min < max (Angstrom)")
            self.k0 = int(np.ceil(np.log10(wmin) / LOGLAM_STEP - 1e-6))
            k1 = int(np.floor(np.log10(wmax) / LOGLAM_STEP + 1e-6)) + 1
            self.clip = True
        self.n_wave = k1 - self.k0
        self.loglam = (self.k0 + np.arange(self.n_wave)) * LOGLAM_STEP
        self.wavelength = 10.0**self.loglam

    @property
    def n_spectra(self) -> int:
        return len(self.files)

    def _chunksize(self, n: int) -> int:
        # batches of files per process task amortise pickling; threads ignore it
        return max(1, n // (4 * self.n_jobs))

    def block_token(self, start: int, stop: int) -> str:
        import dask

        ebv = None if self.ebv is None else self.ebv[start:stop]
        return dask.base.tokenize(self.files[start:stop], self.k0, self.n_wave, self.mask, self.fill_value, ebv, self.law, self.r_v)

    def read_block(self, start: int, stop: int, pool: Executor | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Flux and ivar of files ``start:stop`` as ``(stop - start, n_wave)`` float32 arrays."""
        n = stop - start
        flux = np.empty((n, self.n_wave), dtype=np.float32)
        ivar = np.empty((n, self.n_wave), dtype=np.float32)
        reader = functools.partial(
            _read_sdss_row,
            k0=self.k0,
            n_wave=self.n_wave,
            mask=self.mask,
            fill_value=self.fill_value,
            clip=self.clip,
            wavelength=self.wavelength,
            law=self.law,
            r_v=self.r_v,
        )
        ebvs = [None] * n if self.ebv is None else [float(e) for e in self.ebv[start:stop]]
        own = pool is None
        if own:  # a block read on its own (the lazy dask path): threads, dask parallelises blocks
            pool = ThreadPoolExecutor(min(self.n_jobs, max(n, 1)))
        try:
            for i, (f, iv) in enumerate(pool.map(reader, self.files[start:stop], ebvs, chunksize=self._chunksize(n))):
                flux[i], ivar[i] = f, iv
        finally:
            if own:
                pool.shutdown()
        return flux, ivar

    def coords(self, wavelength_dim: str, spectrum_dim: str) -> dict[str, Any]:
        def col(name, dtype):
            return np.array([m[name] for m in self.meta], dtype=dtype)

        coords: dict[str, Any] = {
            wavelength_dim: (
                wavelength_dim,
                self.wavelength,
                {"units": "Angstrom", "long_name": "vacuum wavelength (observed frame)", "medium": "vacuum"},
            ),
            "loglam": (wavelength_dim, self.loglam, {"units": "log10(Angstrom)", "long_name": "log10 vacuum wavelength"}),
            "redshift": (spectrum_dim, col("redshift", np.float64), {"long_name": "pipeline redshift (HDU2 Z)"}),
            "redshift_err": (spectrum_dim, col("redshift_err", np.float64), {"long_name": "pipeline redshift error (Z_ERR)"}),
            "zwarning": (spectrum_dim, col("zwarning", np.int32), {"long_name": "pipeline ZWARNING flags (-1: absent)"}),
            "plate": (spectrum_dim, col("plate", np.int32), {}),
            "mjd": (spectrum_dim, col("mjd", np.int32), {}),
            "fiberid": (spectrum_dim, col("fiberid", np.int32), {}),
            "ra": (spectrum_dim, col("ra", np.float64), {"units": "deg"}),
            "dec": (spectrum_dim, col("dec", np.float64), {"units": "deg"}),
            "objclass": (spectrum_dim, col("objclass", object), {"long_name": "pipeline CLASS"}),
            # the pipeline's own broad-line call ("BROADLINE"), to compare ours with
            "subclass": (spectrum_dim, col("subclass", object), {"long_name": "pipeline SUBCLASS (e.g. AGN, STARFORMING, BROADLINE)"}),
            "specname": (spectrum_dim, col("specname", object), {"long_name": "spec-PLATE-MJD-FIBER"}),
            "filename": (spectrum_dim, col("filename", object), {"long_name": "source file name"}),
        }
        if self.ebv is not None:
            coords["ebv"] = (
                spectrum_dim,
                np.asarray(self.ebv, dtype=np.float64),
                {"units": "mag", "long_name": f"E(B-V) used for dereddening ({self.ebv_source})"},
            )
        return coords

    def attrs(self) -> dict[str, Any]:
        from .._version import __version__

        attrs = {
            "source": "SDSS/BOSS/eBOSS spec files (HDU1 COADD)",
            "loglam_step": LOGLAM_STEP,
            "mask_column": "and_mask",
            "mask_bits": int(self.mask),
            "mask_bit_names": ",".join(_mask_names(self.mask)),
            "outside_coverage": f"flux={self.fill_value}, ivar=0",
            "sheap_dask_version": __version__,
        }
        if self.ebv is not None:
            attrs["dereddening"] = self.law
            attrs["dereddening_r_v"] = self.r_v
        if self.skipped:
            attrs["skipped_files"] = "\n".join(self.skipped)
        return attrs

    def dataset(self, arrays, *, spectrum_dim: str, wavelength_dim: str) -> xr.Dataset:
        flux, ivar = arrays
        dims = (spectrum_dim, wavelength_dim)
        return xr.Dataset(
            {
                "flux": (dims, flux, {"units": FLUX_UNITS, "long_name": "flux density"}),
                "ivar": (dims, ivar, {"units": IVAR_UNITS, "long_name": "inverse variance of flux (0 = masked)"}),
            },
            coords=self.coords(wavelength_dim, spectrum_dim),
            attrs=self.attrs(),
        )


def read_sdss_spectra(
    files: str | os.PathLike | Iterable[str | os.PathLike],
    *,
    chunk: int | None = None,
    mask_bits: Any = "default",
    ebv: Any = None,
    dereddening: str = "ccm89",
    r_v: float = 3.1,
    wavelength_range: tuple[float, float] | None = None,
    fill_value: float = np.nan,
    n_jobs: int | None = None,
    parallel: str = "threads",
    skip_bad: bool = False,
    spectrum_dim: str = "spectrum",
    wavelength_dim: str = "wavelength",
) -> xr.Dataset:
    """Read SDSS/BOSS/eBOSS spec files onto one common log10-wavelength grid.

    Reads ``spec-PLATE-MJD-FIBER.fits``, ``spec-..._lite.fits`` and ``PLATE-MJD-FIBER.fits``
    files (DR8+ format, including the SDSS-I/II spectra re-reduced with run2d 26): HDU1
    ``COADD`` (``flux``, ``loglam``, ``ivar``, ``and_mask``) and HDU2 ``SPECOBJ``/``SPALL``
    (``Z``, ``PLATE``, ``MJD``, ``FIBERID``, ...). Files are read in parallel threads.

    Parameters
    ----------
    files : path, glob pattern, directory, or iterable of those
        The spec files; the output keeps their order. A directory stands for its ``*.fits``.
    chunk : int, optional
        ``None`` (default): read everything now into numpy-backed variables. An int: return
        dask-backed variables chunked ``chunk`` spectra along ``spectrum`` (the whole grid
        along ``wavelength``); each chunk reads its files when computed, so memory stays
        bounded. Metadata and the grid are read up front either way.
    mask_bits : "default", "all", "none", None, int, or list of names/bit numbers
        ``and_mask`` bits that set ``ivar = 0``; see :func:`mask_value`. The default,
        :data:`DEFAULT_MASK_BITS`, masks FULLREJECT, NOSKY, BRIGHTSKY, NODATA, COMBINEREJ,
        BADFLUXFACTOR, BADSKYCHI and REDMONSTER: pixels without a usable sky subtraction,
        flux calibration or extraction. The ``and_mask`` (set in every exposure) is used so a
        problem in one exposure of a coadd does not mask the pixel.
    ebv : None, float, array of one value per file, "sfd" or "sf11"
        Galactic E(B-V) for dereddening (``None``: no correction). ``"sfd"`` takes the SFD98
        value from the ``EXTINCTION`` column of BOSS/eBOSS HDU2 (A_r / 2.285, the
        Schlafly & Finkbeiner 2011 r-band coefficient the pipeline uses); ``"sf11"`` is 0.86
        times that (their recalibration). The values are stored in an ``ebv`` coordinate.
    dereddening : {"ccm89", "odonnell94", "f99"}
        Extinction law (see :func:`extinction_curve`). ``r_v`` is its R_V.
    wavelength_range : (float, float), optional
        Keep only this observed-frame range in Angstrom (default: the union of the files'
        coverage). A fixed range gives the same grid for every batch of files.
    fill_value : float
        Flux outside a spectrum's coverage (default NaN; ``ivar`` is 0 there either way, and
        ``ivar == 0`` is what masks). Masked pixels inside the coverage keep their flux.
    n_jobs : int, optional
        Parallel readers (default ``min(32, cpu_count + 4)``).
    parallel : {"threads", "processes"}
        ``"threads"`` (default) overlaps file I/O, best on network filesystems; astropy's
        header parsing holds the GIL, so on local disks with many cores ``"processes"``
        (spawned workers, ~1 s start-up) scales further. The lazy ``chunk=`` path always uses
        threads inside a chunk (dask already runs chunks in parallel).
    skip_bad : bool
        Leave out files that cannot be read (not FITS, truncated, not an SDSS spec file) with a
        warning, and list them in ``attrs["skipped_files"]``; by default the first such file is
        an error that names it.
    spectrum_dim, wavelength_dim : str
        Dimension names.

    Returns
    -------
    xarray.Dataset
        ``flux`` and ``ivar`` (spectrum, wavelength) float32 in 1e-17 erg/s/cm2/A;
        ``wavelength`` (Angstrom, vacuum, ``10**loglam``) and ``loglam`` along wavelength;
        ``redshift``, ``redshift_err``, ``zwarning``, ``plate``, ``mjd``, ``fiberid``, ``ra``,
        ``dec``, ``objclass`` and ``subclass`` (the pipeline's CLASS and SUBCLASS: SUBCLASS holds
        its own "BROADLINE" call), ``specname``, ``filename`` (and ``ebv``) along spectrum.

    Raises
    ------
    FileNotFoundError
        A file does not exist (the message names it).
    sheap_dask.errors.InputDataError
        A file is not an SDSS spec file or lacks a required column (the message names both).
    sheap_dask.errors.MissingDependencyError
        astropy is not installed (``pip install 'sheap-dask[sdss]'``).

    Examples
    --------
    >>> ds = read_sdss_spectra("spectra/*.fits", chunk=256)  # doctest: +SKIP
    >>> ds.flux.where(ds.ivar > 0).sel(wavelength=slice(4000, 7000))  # doctest: +SKIP
    """
    options = {k: v for k, v in locals().items() if k != "files"}  # the signature is the one list
    return read_files(_SdssPlan, files, name="read-sdss", **options)


def ingest_sdss(
    files: str | os.PathLike | Iterable[str | os.PathLike],
    store: Any,
    *,
    chunk: int = 256,
    overwrite: bool = False,
    resume: bool = False,
    force: bool = False,
    progress: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> xr.Dataset:
    """Write SDSS spec files to a zarr store chunk by chunk; return the opened store.

    The metadata of every file is read first (headers and HDU2 only, in parallel); then the
    spectra are read ``chunk`` files at a time (in parallel threads, the next chunk read while
    the previous one is written) and written with ``to_zarr(region=...)``. At most two chunks
    are in memory, so thousands to millions of files ingest in bounded memory. The command line
    ``sheap-dask ingest FILES... OUT.zarr`` calls this function.

    Parameters
    ----------
    files : path, glob pattern, directory, or iterable of those
        As in :func:`read_sdss_spectra`.
    store : str, os.PathLike, fsspec URL or zarr store
        The output zarr store.
    chunk : int
        Spectra per zarr chunk (and per read batch). 256 spectra x ~4700 pixels x 2 float32
        variables is ~10 MB, a good dask chunk.
    overwrite : bool
        Replace an existing store written by an ingestion; otherwise an existing store is an
        error. A path holding anything else (a file, other data, one of the input files or a
        directory containing them) is always refused and left untouched.
    resume : bool
        Finish an interrupted ingestion: write only the chunks not yet written into the
        existing ``store``, after checking that it was written from the same files (paths,
        sizes, modification times) and options (a difference is an error that names it) and
        that every chunk marked done still holds what was written (else it is rewritten).
    force : bool
        Break a stale lock on ``store`` (one process writes a store at a time; a lock whose
        heartbeat stopped ``sheap_dask.store.lock_stale_after`` seconds ago is stale).
    progress : bool
        Show a tqdm progress bar over chunks.
    storage_options : dict, optional
        Passed to fsspec for URL stores (credentials, endpoint...).
    **kwargs
        Any option of :func:`read_sdss_spectra`: ``mask_bits``, ``ebv``, ``dereddening``,
        ``r_v``, ``wavelength_range``, ``fill_value``, ``n_jobs``, ``parallel``, ``skip_bad``,
        ``spectrum_dim``, ``wavelength_dim``.

    Returns
    -------
    xarray.Dataset
        ``xr.open_zarr(store)``: lazy, chunked ``chunk`` spectra along ``spectrum``.

    Examples
    --------
    >>> ds = ingest_sdss("spectra/spec-*.fits", "sdss.zarr", chunk=512)  # doctest: +SKIP
    """
    return ingest_files(
        _SdssPlan, read_sdss_spectra, files, store, chunk=chunk, overwrite=overwrite, resume=resume, force=force,
        progress=progress, storage_options=storage_options, options=kwargs,
    )
