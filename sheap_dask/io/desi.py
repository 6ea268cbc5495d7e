"""DESI coadd and spectra files: the B, R, Z arms on one linear 0.8 A grid, read or streamed to zarr.

A DESI coadd (``coadd-SURVEY-PROGRAM-HEALPIX.fits``, ``coadd-PETAL-TILEID-*.fits``) or spectra
file holds, per camera arm ``B``, ``R`` and ``Z``: ``*_WAVELENGTH`` (vacuum Angstrom),
``*_FLUX`` and ``*_IVAR`` (spectrum, pixel), ``*_MASK`` (0 = good) and ``*_RESOLUTION``
(spectrum, diagonal, pixel), plus a ``FIBERMAP`` table with one row per spectrum.

:func:`read_desi_spectra` puts the arms on DESI's own combined grid, linear from 3600 to 9824 A
in steps of 0.8 A (7781 pixels). The pipeline's arm grids lie on that grid, so their pixels are
placed without resampling; an arm on any other grid is resampled (flux-conserving, pixel
overlaps). Where two arms overlap (5760-5800 A, 7520-7620 A) a pixel gets the inverse-variance
weighted mean flux and the summed inverse variance, as DESI's own ``coadd_cameras`` does.
The per-pixel resolution matrix gives ``inst_fwhm``, the instrumental FWHM in km/s at each
pixel. :func:`ingest_desi` streams the same thing into a zarr store chunk by chunk with the
machinery of SDSS ingestion (:mod:`.zarr`).

Redshifts come from a redrock or zcatalog table, matched on ``TARGETID`` (see
:func:`read_desi_spectra`).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any

import numpy as np
import xarray as xr

from ..astro import EXTINCTION_LAWS, SF11_RECALIBRATION
from ..errors import InputDataError, OptionError
from ._common import (
    FLUX_UNITS,
    IVAR_UNITS,
    default_jobs,
    expand_files,
    scan_files,
)
from ._fits import open_checked
from .desi_arms import DESI_WAVE_MAX, DESI_WAVE_MIN, DESI_WAVE_STEP, arm_map, read_rows
from .desi_redshifts import match_redshifts
from .zarr import ingest_files, read_files

__all__ = [
    "DESI_WAVE_MIN",
    "DESI_WAVE_MAX",
    "DESI_WAVE_STEP",
    "read_desi_spectra",
    "ingest_desi",
    "is_desi_file",
    "instrumental_fwhm_at",
]

# FIBERMAP column -> (coordinate, kind, attrs); the first present column of a coordinate wins
# (COADD_FIBERSTATUS in coadds, FIBERSTATUS in spectra files).
_FIBERMAP_COORDS: dict[str, tuple[str, str, dict[str, str]]] = {
    "TARGET_RA": ("ra", "f", {"units": "deg", "long_name": "target right ascension (TARGET_RA)"}),
    "TARGET_DEC": ("dec", "f", {"units": "deg", "long_name": "target declination (TARGET_DEC)"}),
    "COADD_FIBERSTATUS": ("fiberstatus", "i", {"long_name": "FIBERMAP COADD_FIBERSTATUS (0: good)"}),
    "FIBERSTATUS": ("fiberstatus", "i", {"long_name": "FIBERMAP FIBERSTATUS (0: good)"}),
    "OBJTYPE": ("objtype", "s", {"long_name": "FIBERMAP OBJTYPE (TGT, SKY, ...)"}),
    "DESI_TARGET": ("desi_target", "i", {"long_name": "DESI_TARGET targeting bits"}),
    "TILEID": ("tileid", "i", {"long_name": "DESI tile"}),
    "FIBER": ("fiber", "i", {}),
    "NIGHT": ("night", "i", {}),
    "EXPID": ("expid", "i", {}),
    "COADD_NUMEXP": ("coadd_numexp", "i", {"long_name": "exposures in the coadd"}),
    "COADD_EXPTIME": ("coadd_exptime", "f", {"units": "s", "long_name": "exposure time of the coadd"}),
}
DESI_FLUX_UNIT = "1e-17 erg / (s cm2 Angstrom)"
_MISSING = {"f": np.nan, "i": -1, "s": ""}
_DTYPE = {"f": np.float64, "i": np.int64, "s": object}


def is_desi_file(path: str | os.PathLike) -> bool:
    """True when ``path`` (or the first file of a directory or glob pattern) is a FITS file with
    DESI's ``FIBERMAP`` and ``*_FLUX`` HDUs."""
    try:
        with open_checked(expand_files(path, kind="DESI coadd")[0]) as hdul:
            names = {h.name.upper() for h in hdul}
    except (InputDataError, OSError):
        return False
    return "FIBERMAP" in names and any(n.endswith("_FLUX") for n in names)


# --------------------------------------------------------------------------------------
# one file's metadata
# --------------------------------------------------------------------------------------


def _flux_scale(bunit: str | None, path: str, arm: str) -> float:
    """Factor from the file's flux unit to 1e-17 erg/s/cm2/A (DESI's, the package's)."""
    if not bunit:
        return 1.0  # DESI's documented unit
    from astropy import units as u

    try:
        return float(u.Unit(bunit).to(u.Unit(DESI_FLUX_UNIT)))
    except (ValueError, u.UnitConversionError) as exc:
        raise InputDataError(f"{path}: {arm}_FLUX has BUNIT = {bunit!r}, not a flux density per Angstrom ({exc})") from None


def _scan_desi_file(path: str) -> dict[str, Any]:
    """One file's FIBERMAP columns, header keywords and arm layout, without its spectra."""
    with open_checked(path, memmap=True) as hdul:
        names = [h.name.upper() for h in hdul]
        if "FIBERMAP" not in names or not any(n.endswith("_FLUX") for n in names):
            raise InputDataError(
                f"{path}: not a DESI coadd or spectra file: no FIBERMAP and *_FLUX HDUs (it has {names[:6]}"
                f"{' ...' if len(names) > 6 else ''}); SDSS spec files are read with read_sdss_spectra"
            )
        arms = [n[: -len("_WAVELENGTH")] for n in names if n.endswith("_WAVELENGTH")]
        if arms != ["BRZ"]:
            missing = [a for a in ("B", "R", "Z") if a not in arms]
            if missing:
                raise InputDataError(
                    f"{path}: the {', '.join(missing)} arm is missing (no {missing[0]}_WAVELENGTH HDU; it has arms {arms}); "
                    "a DESI coadd has B, R and Z"
                )
        fibermap = hdul["FIBERMAP"].data
        if fibermap is None or "TARGETID" not in fibermap.names:
            raise InputDataError(f"{path}: the FIBERMAP table has no TARGETID column")
        n = len(fibermap)
        out: dict[str, Any] = {"path": path, "n": n, "targetid": np.asarray(fibermap["TARGETID"], dtype=np.int64), "columns": {}}
        for column, (coord, kind, _) in _FIBERMAP_COORDS.items():
            if column in fibermap.names and coord not in out["columns"]:
                values = np.asarray(fibermap[column])
                out["columns"][coord] = values.astype(str) if kind == "s" else values.astype(_DTYPE[kind])
        out["ebv"] = np.asarray(fibermap["EBV"], dtype=np.float64) if "EBV" in fibermap.names else None
        header = hdul[0].header
        out["survey"] = str(header.get("SURVEY", "")).strip()
        out["program"] = str(header.get("PROGRAM", "")).strip()
        healpix = header.get("HPXPIXEL", header.get("SPGRPVAL") if str(header.get("SPGRP", "")).strip() == "healpix" else None)
        out["healpix"] = -1 if healpix is None else int(healpix)
        if "tileid" not in out["columns"] and "TILEID" in header:
            out["columns"]["tileid"] = np.full(n, int(header["TILEID"]), dtype=np.int64)
        out["arms"] = {}
        for arm in arms:
            missing = [f"{arm}_{k}" for k in ("FLUX", "IVAR") if f"{arm}_{k}" not in names]
            if missing:
                raise InputDataError(f"{path}: arm {arm} has no {' and no '.join(missing)} HDU")
            wave = np.asarray(hdul[f"{arm}_WAVELENGTH"].data, dtype=np.float64)
            shape = hdul[f"{arm}_FLUX"].shape
            if shape != (n, wave.size) or hdul[f"{arm}_IVAR"].shape != shape:
                raise InputDataError(
                    f"{path}: {arm}_FLUX/{arm}_IVAR have shapes {shape}/{hdul[f'{arm}_IVAR'].shape}; expected "
                    f"({n} FIBERMAP rows, {wave.size} {arm}_WAVELENGTH pixels)"
                )
            if wave.size < 2 or np.any(np.diff(wave) <= 0):
                raise InputDataError(f"{path}: {arm}_WAVELENGTH is not increasing")
            res_shape = hdul[f"{arm}_RESOLUTION"].shape if f"{arm}_RESOLUTION" in names else None
            out["arms"][arm] = {
                "wave": wave,
                "scale": _flux_scale(hdul[f"{arm}_FLUX"].header.get("BUNIT"), path, arm),
                "unit": str(hdul[f"{arm}_FLUX"].header.get("BUNIT", "")),
                "mask": f"{arm}_MASK" in names,
                "resolution": res_shape is not None and res_shape[0] == n and res_shape[2] == wave.size,
            }
    out["filename"] = os.path.basename(path)
    return out


# --------------------------------------------------------------------------------------
# the plan: which rows of which files, on which grid
# --------------------------------------------------------------------------------------


class _DesiPlan:
    """What a read/ingest needs: the files, the selected rows, the grid and the options."""

    variables = ("flux", "ivar", "inst_fwhm")
    file_kind = "DESI coadd"

    def __init__(self, files, *, redshifts, qso_only, missing_redshift, resolution, ebv, dereddening, r_v, fill_value, n_jobs, skip_bad, pool: Executor):
        self.files = expand_files(files, kind="DESI coadd")
        self.n_jobs = default_jobs(n_jobs)
        self.fill_value = float(fill_value)
        self.resolution = bool(resolution)
        if dereddening not in EXTINCTION_LAWS:
            raise OptionError(f"dereddening={dereddening!r} is not a known extinction law; use one of {EXTINCTION_LAWS}")
        self.law, self.r_v = dereddening, float(r_v)
        keep, metas, self.skipped = scan_files(pool, _scan_desi_file, self.files, skip_bad=skip_bad)
        if not keep:
            raise InputDataError(f"none of the {len(self.files)} files is a readable DESI file: {self.skipped[0]}, ...")
        self.files = [self.files[i] for i in keep]
        self.wavelength = DESI_WAVE_MIN + DESI_WAVE_STEP * np.arange(int(round((DESI_WAVE_MAX - DESI_WAVE_MIN) / DESI_WAVE_STEP)) + 1)
        self.n_wave = self.wavelength.size
        maps: dict[bytes, tuple] = {}  # arm grids repeat across files: one grid and map each
        self.arms = []
        for meta in metas:
            arms = {}
            for arm, info in meta.pop("arms").items():
                key = info["wave"].tobytes()
                if key not in maps:
                    maps[key] = (info["wave"], arm_map(info["wave"], self.wavelength))
                arms[arm] = {**info, "wave": maps[key][0], "map": maps[key][1]}
            self.arms.append(arms)
        self.units = sorted({a["unit"] for arms in self.arms for a in arms.values()})
        self._select(metas, redshifts, qso_only, missing_redshift)
        self._resolve_ebv(ebv, metas)

    def _select(self, metas, redshifts, qso_only, missing_redshift) -> None:
        file_of = np.concatenate([np.full(m["n"], i) for i, m in enumerate(metas)])
        row_of = np.concatenate([np.arange(m["n"]) for m in metas])
        self.coord_values: dict[str, np.ndarray] = {"targetid": np.concatenate([m["targetid"] for m in metas])}
        for name in ("survey", "program"):
            self.coord_values[name] = np.concatenate([np.full(m["n"], m[name], dtype=object) for m in metas])
        self.coord_values["healpix"] = np.concatenate([np.full(m["n"], m["healpix"]) for m in metas])
        present = {c: kind for _, (c, kind, _) in _FIBERMAP_COORDS.items() if any(c in m["columns"] for m in metas)}
        for coord, kind in present.items():
            self.coord_values[coord] = np.concatenate(
                [m["columns"].get(coord, np.full(m["n"], _MISSING[kind])).astype(_DTYPE[kind]) for m in metas]
            )
        self.coord_values["filename"] = np.concatenate([np.full(m["n"], m["filename"], dtype=object) for m in metas])
        self.fibermap_ebv = np.concatenate([m["ebv"] if m["ebv"] is not None else np.full(m["n"], np.nan) for m in metas])
        self.redshift_note = "none given"
        if missing_redshift not in ("keep", "drop", "raise"):
            raise OptionError(f"missing_redshift={missing_redshift!r}: use 'keep', 'drop' or 'raise'")
        keep = np.ones(file_of.size, dtype=bool)
        if redshifts is not None:
            z_coords, keep, self.redshift_note = match_redshifts(
                redshifts, self.coord_values, qso_only=qso_only, missing=missing_redshift
            )
            self.coord_values.update(z_coords)
        elif qso_only:
            raise OptionError("qso_only=True needs redshifts= (a redrock/zcatalog table with SPECTYPE and ZWARN)")
        self.file_of, self.row_of = file_of[keep], row_of[keep]
        self.coord_values = {k: v[keep] for k, v in self.coord_values.items()}
        self.fibermap_ebv = self.fibermap_ebv[keep]

    def _resolve_ebv(self, ebv, metas) -> None:
        self.ebv_source = None
        if ebv is None:
            self.ebv = None
            return
        if isinstance(ebv, str):
            if ebv.lower() not in ("sfd", "sf11"):
                raise OptionError(f"ebv={ebv!r}: use a number, 'sfd' (FIBERMAP EBV, SFD98) or 'sf11' (0.86 x SFD)")
            if not np.all(np.isfinite(self.fibermap_ebv)):
                bad = sorted({self.files[i] for i in self.file_of[~np.isfinite(self.fibermap_ebv)]})
                raise InputDataError(f"{bad[0]}: ebv={ebv!r} needs the EBV column of FIBERMAP, which this file lacks")
            self.ebv = self.fibermap_ebv * (SF11_RECALIBRATION if ebv.lower() == "sf11" else 1.0)
            self.ebv_source = ebv.lower()
            return
        value = np.asarray(ebv, dtype=np.float64)
        if value.ndim != 0 or not np.isfinite(value) or value < 0:
            raise OptionError(f"ebv={ebv!r}: give one E(B-V) >= 0 for all spectra, or 'sfd'/'sf11' for each spectrum's FIBERMAP EBV")
        self.ebv = np.full(self.n_spectra, float(value))
        self.ebv_source = "user"

    @property
    def n_spectra(self) -> int:
        return int(self.file_of.size)

    def block_token(self, start: int, stop: int) -> str:
        import dask

        ebv = None if self.ebv is None else self.ebv[start:stop]
        return dask.base.tokenize(
            self.files, self.file_of[start:stop], self.row_of[start:stop], self.fill_value, self.resolution, ebv, self.law, self.r_v
        )

    def _pieces(self, start: int, stop: int) -> list[tuple[int, int, int]]:
        """(file, first, last) runs of block rows, cut so the pool has work for every reader."""
        size = max(8, -(-(stop - start) // self.n_jobs))
        change = np.nonzero(np.diff(self.file_of[start:stop]))[0] + 1
        bounds = np.concatenate([[0], change, [stop - start]]) + start
        out = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            out.extend((int(self.file_of[a]), int(s), int(min(s + size, b))) for s in range(a, b, size))
        return out

    def read_block(self, start: int, stop: int, pool: Executor | None = None) -> tuple[np.ndarray, ...]:
        """Flux, ivar and instrumental FWHM of spectra ``start:stop``, (stop - start, n_wave) float32."""
        out = np.empty((3, stop - start, self.n_wave), dtype=np.float32)
        pieces = self._pieces(start, stop)
        reader = functools.partial(
            read_rows, grid=self.wavelength, fill_value=self.fill_value, resolution=self.resolution, law=self.law, r_v=self.r_v
        )
        paths = [self.files[f] for f, _, _ in pieces]
        rows = [self.row_of[a:b] for _, a, b in pieces]
        arms = [self.arms[f] for f, _, _ in pieces]
        ebvs = [None if self.ebv is None else self.ebv[a:b] for _, a, b in pieces]
        own = pool is None
        if own:  # a block read on its own (the lazy dask path): threads, dask parallelises blocks
            pool = ThreadPoolExecutor(min(self.n_jobs, len(pieces)))
        try:
            for (_, a, b), arrays in zip(pieces, pool.map(reader, paths, rows, arms, ebvs)):
                out[:, a - start : b - start] = arrays
        finally:
            if own:
                pool.shutdown()
        return tuple(out)

    def dataset(self, arrays, *, spectrum_dim: str, wavelength_dim: str) -> xr.Dataset:
        from .._version import __version__

        flux, ivar, inst = arrays
        dims = (spectrum_dim, wavelength_dim)
        coords: dict[str, Any] = {
            wavelength_dim: (wavelength_dim, self.wavelength, {"units": "Angstrom", "long_name": "vacuum wavelength (observed frame)", "medium": "vacuum"}),
        }
        attrs_of = {c: a for _, (c, _, a) in _FIBERMAP_COORDS.items()}
        attrs_of.update(
            targetid={"long_name": "DESI TARGETID"},
            survey={"long_name": "DESI survey (header SURVEY)"},
            program={"long_name": "DESI program (header PROGRAM)"},
            healpix={"long_name": "healpix of a healpix coadd (nside 64, nested; -1: tile based)"},
            filename={"long_name": "source file name"},
            redshift={"long_name": "redshift (redrock Z)"},
            redshift_err={"long_name": "redshift error (ZERR)"},
            zwarning={"long_name": "redrock ZWARN flags (0: good; -1: no redshift)"},
            objclass={"long_name": "redrock SPECTYPE (QSO, GALAXY, STAR; empty: no redshift)"},
        )
        for name, values in self.coord_values.items():
            coords[name] = (spectrum_dim, values, attrs_of.get(name, {}))
        if self.ebv is not None:
            coords["ebv"] = (spectrum_dim, self.ebv, {"units": "mag", "long_name": f"E(B-V) used for dereddening ({self.ebv_source})"})
        attrs = {
            "source": "DESI coadd/spectra files (B, R, Z arms)",
            "wavelength_grid": f"linear {DESI_WAVE_MIN:g}-{DESI_WAVE_MAX:g} A, step {DESI_WAVE_STEP:g} A",
            "arm_overlap": "inverse-variance weighted mean flux, summed ivar",
            "mask": "*_MASK != 0 -> ivar 0",
            "flux_units_in_files": ", ".join(u or "(none: DESI's 1e-17 erg/s/cm2/A assumed)" for u in self.units),
            "redshifts": self.redshift_note,
            "outside_coverage": f"flux={self.fill_value}, ivar=0",
            "sheap_dask_version": __version__,
        }
        if self.ebv is not None:
            attrs.update(dereddening=self.law, dereddening_r_v=self.r_v)
        if self.skipped:
            attrs["skipped_files"] = "\n".join(self.skipped)
        inst_attrs = {
            "units": "km/s",
            "long_name": "instrumental FWHM: 2.3548 x the sigma of the DESI resolution matrix kernel (NaN: no *_RESOLUTION)",
        }
        return xr.Dataset(
            {
                "flux": (dims, flux, {"units": FLUX_UNITS, "long_name": "flux density"}),
                "ivar": (dims, ivar, {"units": IVAR_UNITS, "long_name": "inverse variance of flux (0 = masked)"}),
                "inst_fwhm": (dims, inst, inst_attrs),
            },
            coords=coords,
            attrs=attrs,
        )


# --------------------------------------------------------------------------------------
# public functions
# --------------------------------------------------------------------------------------


def read_desi_spectra(
    files: str | os.PathLike | Iterable[str | os.PathLike],
    *,
    redshifts: Any = None,
    qso_only: bool = False,
    missing_redshift: str = "keep",
    chunk: int | None = None,
    resolution: bool = True,
    ebv: Any = None,
    dereddening: str = "ccm89",
    r_v: float = 3.1,
    fill_value: float = np.nan,
    n_jobs: int | None = None,
    parallel: str = "threads",
    skip_bad: bool = False,
    spectrum_dim: str = "spectrum",
    wavelength_dim: str = "wavelength",
) -> xr.Dataset:
    """Read DESI coadd or spectra files onto DESI's linear 0.8 A grid (3600-9824 A).

    Parameters
    ----------
    files : path, glob pattern, directory, or iterable of those
        DESI coadd (``coadd-*.fits``) or spectra (``spectra-*.fits``) files, healpix or tile
        based; every row of every file's FIBERMAP is one spectrum, in file order.
    redshifts : path, astropy Table, or mapping, optional
        A redrock (``redrock-*.fits``, HDU ``REDSHIFTS``) or zcatalog (``zpix-*``/``ztile-*``,
        HDU ``ZCATALOG``) table, or any table astropy reads, with ``TARGETID`` and ``Z``
        (``ZERR``, ``ZWARN``, ``SPECTYPE`` when present); or a mapping of columns
        (``{"TARGETID": [...], "Z": [...]}``) or of TARGETID to redshift. Matched on
        ``TARGETID`` (and on ``SURVEY``/``PROGRAM`` where a zcatalog lists a target more than
        once; else its ``ZCAT_PRIMARY`` rows). Without it the Dataset has no ``redshift``
        and models take the spectra as rest frame.
    qso_only : bool
        Keep only spectra whose redshift row has ``SPECTYPE == "QSO"`` and ``ZWARN == 0``.
    missing_redshift : {"keep", "drop", "raise"}
        Spectra whose TARGETID is not in ``redshifts``: kept with NaN ``redshift`` (they fit
        as ``no_data``), left out, or an error. Either way a warning counts them and names
        the first few, and ``attrs["redshifts"]`` says how many there were. With ``qso_only``
        they are left out (their class is unknown).
    chunk : int, optional
        ``None``: read everything now. An int: dask-backed variables, ``chunk`` spectra per
        block, each block read when computed.
    resolution : bool
        Compute ``inst_fwhm`` from the ``*_RESOLUTION`` HDUs (about half the reading time;
        ``False`` leaves it NaN).
    ebv : None, float, "sfd" or "sf11"
        Galactic E(B-V) for dereddening: one value for all spectra, or each spectrum's
        FIBERMAP ``EBV`` (SFD98; ``"sf11"``: times 0.86). Stored in an ``ebv`` coordinate.
    dereddening, r_v
        Extinction law and R_V, see :func:`sheap_dask.astro.extinction_curve`.
    fill_value : float
        Flux where no arm covers a pixel (``ivar`` is 0 there).
    n_jobs, parallel
        Parallel readers (threads by default; ``"processes"``: spawned workers).
    skip_bad : bool
        Leave out files that cannot be read (truncated, not DESI, an arm missing) with a
        warning, listed in ``attrs["skipped_files"]``; by default the first one is an error
        that names it.
    spectrum_dim, wavelength_dim : str
        Dimension names.

    Returns
    -------
    xarray.Dataset
        ``flux``, ``ivar`` (1e-17 erg/s/cm2/A, converted from each file's ``BUNIT``) and
        ``inst_fwhm`` (km/s), all (spectrum, wavelength) float32; ``wavelength`` (vacuum
        Angstrom); per spectrum ``targetid``, ``ra``, ``dec``, ``survey``, ``program``,
        ``healpix``, ``tileid``, ``fiberstatus``, ``desi_target``, ... (the FIBERMAP columns
        the files have), ``filename``, and with ``redshifts``: ``redshift``, ``redshift_err``,
        ``zwarning`` (ZWARN, -1: no redshift), ``objclass`` (SPECTYPE).

    Raises
    ------
    sheap_dask.errors.InputDataError
        A file is not a DESI file, lacks an arm or is truncated (the message names it); a
        redshift table without TARGETID/Z or with ambiguous rows.

    Examples
    --------
    >>> ds = read_desi_spectra("coadd-main-dark-*.fits", redshifts="zpix-main-dark.fits", qso_only=True)  # doctest: +SKIP
    """
    options = {k: v for k, v in locals().items() if k != "files"}  # the signature is the one list
    return read_files(_DesiPlan, files, name="read-desi", **options)


def ingest_desi(
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
    """Write DESI coadd/spectra files to a zarr store chunk by chunk; return the opened store.

    The same engine as :func:`sheap_dask.io.ingest_sdss`: the metadata of every file first
    (in parallel), then ``chunk`` spectra at a time read in parallel while the previous chunk
    is written with ``to_zarr(region=...)``; bounded memory, a progress bar, and ``resume``.
    ``sheap-dask ingest FILES... OUT.zarr`` calls this function for DESI files.

    Parameters
    ----------
    files : path, glob pattern, directory, or iterable of those
        As in :func:`read_desi_spectra`.
    store : str, os.PathLike, fsspec URL or zarr store
        The output zarr store.
    chunk : int
        Spectra per zarr chunk (256 x 7781 pixels x 3 float32 variables: 24 MB).
    overwrite, resume, force, progress, storage_options
        As in :func:`sheap_dask.io.ingest_sdss`.
    **kwargs
        Any option of :func:`read_desi_spectra` (``redshifts``, ``qso_only``,
        ``missing_redshift``, ``resolution``, ``ebv``, ``skip_bad``, ``n_jobs``, ...).

    Returns
    -------
    xarray.Dataset
        The store opened with :func:`sheap_dask.io.open_spectra`.

    Examples
    --------
    >>> ds = ingest_desi("healpix/*/coadd-*.fits", "desi.zarr", redshifts="zpix-main-dark.fits")  # doctest: +SKIP
    """
    return ingest_files(
        _DesiPlan, read_desi_spectra, files, store, chunk=chunk, overwrite=overwrite, resume=resume, force=force,
        progress=progress, storage_options=storage_options, options=kwargs,
    )


def instrumental_fwhm_at(
    spectra: xr.Dataset, rest_wavelength: float, *, redshift: str = "redshift", wavelength_dim: str = "wavelength"
) -> xr.DataArray:
    """Each spectrum's instrumental FWHM (km/s) at a rest-frame wavelength, from ``inst_fwhm``.

    The observed wavelength is ``rest_wavelength * (1 + redshift)`` (the ``redshift``
    coordinate; rest frame without it); ``inst_fwhm`` is interpolated there. Pass the result
    with a fitted narrow-line FWHM to :func:`sheap_dask.astro.subtract_instrumental`.

    Examples
    --------
    >>> inst = instrumental_fwhm_at(spectra, 5008.24)  # doctest: +SKIP
    >>> from sheap_dask.astro import subtract_instrumental
    >>> subtract_instrumental(fits.sheap.fwhm("oiii5007"), inst)  # doctest: +SKIP
    """
    if "inst_fwhm" not in spectra:
        raise InputDataError(
            "spectra has no inst_fwhm variable: read DESI files with read_desi_spectra/ingest_desi (resolution=True)"
        )
    inst = spectra["inst_fwhm"]
    spectrum_dim = next(d for d in inst.dims if d != wavelength_dim)
    z = np.asarray(spectra[redshift], dtype=np.float64) if redshift in spectra.coords else 0.0
    observed = xr.DataArray(float(rest_wavelength) * (1.0 + z) * np.ones(inst.sizes[spectrum_dim]), dims=spectrum_dim)
    out = inst.interp({wavelength_dim: observed}).drop_vars(wavelength_dim)
    out.attrs = {"units": "km/s", "long_name": f"instrumental FWHM at rest {rest_wavelength:g} A"}
    return out
