"""Reading spectra into the sheap_dask data conventions, and writing them to zarr.

Every reader returns an :class:`xarray.Dataset` with dimensions ``("spectrum", "wavelength")``,
``flux`` and ``ivar`` float32 variables (``ivar == 0`` masks a pixel), a ``wavelength``
coordinate in Angstrom and per-spectrum coordinates (``redshift``, ``plate``, ``mjd``, ...).

SDSS/BOSS/eBOSS spec files
    :func:`read_sdss_spectra` puts many ``spec-*.fits`` / ``spec-*_lite.fits`` /
    ``PLATE-MJD-FIBER.fits`` files on one common grid. SDSS coadds are sampled at exactly
    ``1e-4`` in log10(lambda / Angstrom) on a grid anchored at ``loglam = 0``, so pixel ``i``
    of a file lands on the integer grid index ``round(loglam[i] / 1e-4)`` without any
    resampling; the residual of that rounding is checked for every pixel.
    :func:`ingest_sdss` streams the same thing into a zarr store chunk by chunk.
Tables
    :func:`read_table_spectrum` reads a (wavelength, flux, error) CSV/whitespace table.
Quasar-catalogue products
    :func:`read_rest_frame_fits` reads the rest-frame, dereddened spectrum (HDU3) of the
    PyQSOFit ``op-*.fits`` / ``op_*.fits`` files of the DR16Q / DR19 quasar catalogues.
Galactic extinction
    :func:`extinction_curve` and :func:`dered` (CCM89, CCM89 + O'Donnell 1994, Fitzpatrick 1999).

astropy is needed only for FITS files; it is the optional extra ``sheap-dask[sdss]``.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import importlib
import io as _stdio
import os
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
import functools
import multiprocessing
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from .errors import InputDataError, MissingDependencyError, OptionError

__all__ = [
    "SDSS_PIXMASK_BITS",
    "DEFAULT_MASK_BITS",
    "LOGLAM_STEP",
    "read_sdss_spectra",
    "ingest_sdss",
    "read_table_spectrum",
    "read_rest_frame_fits",
    "extinction_curve",
    "dered",
    "air_to_vacuum",
    "vacuum_to_air",
    "mask_value",
    "open_spectra",
    "write_zarr",
    "synthetic_spectra",
]

#: log10(lambda) pixel size of SDSS/BOSS/eBOSS coadded spectra.
LOGLAM_STEP = 1e-4
# A pixel whose loglam is further than this (in pixels) from the 1e-4 grid is not an SDSS
# coadd pixel. float32 loglam near 4.0 has a spacing of 4.8e-7 dex = 0.005 pixel, so genuine
# files stay below ~0.003; 0.02 leaves margin and still catches any real offset.
_GRID_TOLERANCE = 0.02

#: SDSS spectroscopic pixel mask bits (``SPPIXMASK``, the ``and_mask``/``or_mask`` columns).
#: Bits 0-15 are per-fibre conditions propagated to every pixel, 16-31 per-pixel conditions.
#: Source: SDSS bitmask documentation (idlspec2d ``sdssMaskbits.par``).
SDSS_PIXMASK_BITS: dict[str, int] = {
    "NOPLUG": 0,          # fibre not listed in the plug map
    "BADTRACE": 1,        # bad trace
    "BADFLAT": 2,         # low counts in the fibre flat
    "BADARC": 3,          # bad arc solution
    "MANYBADCOLUMNS": 4,  # more than 10% of the pixels are bad columns
    "MANYREJECTED": 5,    # more than 10% of the pixels rejected in extraction
    "LARGESHIFT": 6,      # large spatial shift between flat and object
    "BADSKYFIBER": 7,     # sky fibre shows extreme residuals
    "NEARWHOPPER": 8,     # within 2 fibres of a whopping fibre
    "WHOPPER": 9,         # whopping fibre (very bright source)
    "SMEARIMAGE": 10,     # smear available for red and blue cameras
    "SMEARHIGHSN": 11,    # S/N sufficient for the full smear fit
    "SMEARMEDSN": 12,     # S/N only sufficient for the scaled median fit
    "NEARBADPIXEL": 16,   # bad pixel within 3 pixels of the trace
    "LOWFLAT": 17,        # flat field less than 0.5
    "FULLREJECT": 18,     # pixel fully rejected in extraction
    "PARTIALREJECT": 19,  # some pixels rejected in extraction
    "SCATTEREDLIGHT": 20, # scattered light significant
    "CROSSTALK": 21,      # cross-talk significant
    "NOSKY": 22,          # sky level unknown at this wavelength
    "BRIGHTSKY": 23,      # sky level > flux + 10 * flux error
    "NODATA": 24,         # no data available in the combine B-spline
    "COMBINEREJ": 25,     # rejected in the combine B-spline
    "BADFLUXFACTOR": 26,  # low flux-calibration or flux-correction factor
    "BADSKYCHI": 27,      # relative chi^2 > 3 in the sky residuals at this wavelength
    "REDMONSTER": 28,     # contiguous region of bad chi^2 in the sky residuals
    "EMLINE": 30,         # emission line detected here (a real line: never a reason to mask)
}

#: Bits masked by ``mask_bits="default"``: pixels whose flux is missing or dominated by sky
#: or calibration failures. Deliberately *not* masked: MANYBADCOLUMNS, BADFLAT, NEARBADPIXEL,
#: PARTIALREJECT, LOWFLAT, SCATTEREDLIGHT, CROSSTALK (set in the ``and_mask`` over long stretches
#: of usable data: MANYBADCOLUMNS covers 46% of spec-0266-51602-0013 and BADFLAT 33% of
#: eBOSS 8222-57431-0561, whose fluxes and ivar are fine) and EMLINE (marks real lines).
DEFAULT_MASK_BITS: tuple[str, ...] = (
    "FULLREJECT",
    "NOSKY",
    "BRIGHTSKY",
    "NODATA",
    "COMBINEREJ",
    "BADFLUXFACTOR",
    "BADSKYCHI",
    "REDMONSTER",
)

_FLUX_UNITS = "1e-17 erg / (s cm2 Angstrom)"
_IVAR_UNITS = "(1e-17 erg / (s cm2 Angstrom))**-2"
_SDSS_INSTALL_HINT = "pip install 'sheap-dask[sdss]'"

# SDSS specObj/spAll EXTINCTION = A_ugriz for E(B-V)_SFD with the Schlafly & Finkbeiner
# (2011, ApJ 737, 103; Table 6, R_V = 3.1) coefficients; r is the best measured band.
_SF11_R_BAND = 2.285
_SF11_RECALIBRATION = 0.86


# --------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------


def _fits():
    """Import ``astropy.io.fits`` or raise :class:`MissingDependencyError` with the fix."""
    try:
        return importlib.import_module("astropy.io.fits")
    except ImportError as exc:  # pragma: no cover - exercised with a monkeypatched import
        raise MissingDependencyError(
            "reading FITS spectra needs astropy, which is not installed; install it with "
            f"{_SDSS_INSTALL_HINT}"
        ) from exc


def _default_jobs(n_jobs: int | None) -> int:
    if n_jobs is None:
        # Reading FITS files is I/O plus small numpy work that releases the GIL for the copy;
        # the ThreadPoolExecutor default is a good fit.
        return min(32, (os.cpu_count() or 1) + 4)
    if not isinstance(n_jobs, (int, np.integer)) or n_jobs < 1:
        raise OptionError(f"n_jobs must be a positive integer or None, got {n_jobs!r}")
    return int(n_jobs)


def _expand_files(files: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """Normalise ``files``: a path, a glob pattern, a directory, or an iterable of those."""
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    out: list[str] = []
    for item in files:
        s = os.fspath(item)
        if any(c in s for c in "*?[") and not os.path.exists(s):
            matched = sorted(glob.glob(s))
            if not matched:
                raise FileNotFoundError(f"files: the pattern {s!r} matches no file")
            out.extend(matched)
        elif os.path.isdir(s):
            matched = sorted(glob.glob(os.path.join(s, "*.fits")))
            if not matched:
                raise FileNotFoundError(f"files: the directory {s!r} holds no *.fits file")
            out.extend(matched)
        else:
            out.append(s)
    if not out:
        raise OptionError("files is empty: pass one or more SDSS spec FITS paths")
    for s in out:
        if not os.path.isfile(s):
            raise FileNotFoundError(f"SDSS spectrum file not found: {s!r} (argument files); check the path")
    return out


def mask_value(mask_bits: Any = "default") -> int:
    """Turn a ``mask_bits`` option into the integer bit mask it stands for.

    Parameters
    ----------
    mask_bits : "default", "all", "none", None, int, or iterable of str/int
        ``"default"``: :data:`DEFAULT_MASK_BITS`. ``"all"``: every bit except EMLINE.
        ``"none"``/``None``/``0``: no bit masks (only ``ivar == 0`` and non-finite values do).
        An ``int`` is used as the bit mask itself; an iterable lists bit names
        (:data:`SDSS_PIXMASK_BITS`) or bit numbers.

    Returns
    -------
    int
        The mask: a pixel is masked when ``and_mask & value != 0``.

    Examples
    --------
    >>> mask_value(["NOSKY", "BRIGHTSKY"]) == (1 << 22) | (1 << 23)
    True
    """
    if mask_bits is None or (isinstance(mask_bits, str) and mask_bits.lower() == "none"):
        return 0
    if isinstance(mask_bits, str):
        key = mask_bits.lower()
        if key == "default":
            return mask_value(DEFAULT_MASK_BITS)
        if key == "all":
            return sum(1 << b for n, b in SDSS_PIXMASK_BITS.items() if n != "EMLINE")
        if mask_bits.upper() in SDSS_PIXMASK_BITS:
            return 1 << SDSS_PIXMASK_BITS[mask_bits.upper()]
        raise OptionError(
            f"mask_bits={mask_bits!r} is not understood; use 'default', 'all', 'none', an int, "
            f"or a list of bit names from {sorted(SDSS_PIXMASK_BITS)}"
        )
    if isinstance(mask_bits, (int, np.integer)) and not isinstance(mask_bits, bool):
        if mask_bits < 0 or mask_bits >= 1 << 32:
            raise OptionError(f"mask_bits={mask_bits!r} must be a 32-bit unsigned bit mask")
        return int(mask_bits)
    value = 0
    for bit in mask_bits:
        if isinstance(bit, str):
            if bit.upper() not in SDSS_PIXMASK_BITS:
                raise OptionError(
                    f"mask_bits: unknown SDSS pixel-mask bit {bit!r}; known bits: {sorted(SDSS_PIXMASK_BITS)}"
                )
            value |= 1 << SDSS_PIXMASK_BITS[bit.upper()]
        elif isinstance(bit, (int, np.integer)) and 0 <= bit < 32:
            value |= 1 << int(bit)
        else:
            raise OptionError(f"mask_bits: {bit!r} is neither a bit name nor a bit number 0-31")
    return value


def _mask_names(value: int) -> list[str]:
    lookup = {b: n for n, b in SDSS_PIXMASK_BITS.items()}
    return [lookup.get(b, f"BIT{b}") for b in range(32) if value >> b & 1]


def _colmap(columns: Sequence[str]) -> dict[str, str]:
    return {c.lower(): c for c in columns}


# --------------------------------------------------------------------------------------
# Galactic extinction
# --------------------------------------------------------------------------------------

_LAWS = ("ccm89", "odonnell94", "f99")


def _ccm89_ab(x: np.ndarray, optical: str) -> tuple[np.ndarray, np.ndarray]:
    """CCM89 a(x), b(x) with x = 1/lambda in inverse microns (0.3 <= x <= 10)."""
    a = np.empty_like(x)
    b = np.empty_like(x)
    ir = x < 1.1
    a[ir] = 0.574 * x[ir] ** 1.61
    b[ir] = -0.527 * x[ir] ** 1.61
    op = (x >= 1.1) & (x < 3.3)
    y = x[op] - 1.82
    if optical == "ccm89":
        # Cardelli, Clayton & Mathis (1989) eq. 3a,b; polyval wants the highest power first.
        ca = [0.32999, -0.77530, 0.01979, 0.72085, -0.02427, -0.50447, 0.17699, 1.0]
        cb = [-2.09002, 5.30260, -0.62251, -5.38434, 1.07233, 2.28305, 1.41338, 0.0]
    else:
        # O'Donnell (1994, ApJ 422, 158) eq. 2 coefficients for the optical/NIR range.
        ca = [-0.505, 1.647, -0.827, -1.718, 1.137, 0.701, -0.609, 0.104, 1.0]
        cb = [3.347, -10.805, 5.491, 11.102, -7.985, -3.989, 2.908, 1.952, 0.0]
    a[op] = np.polyval(ca, y)
    b[op] = np.polyval(cb, y)
    uv = (x >= 3.3) & (x < 8.0)
    xu = x[uv]
    fa = np.where(xu >= 5.9, -0.04473 * (xu - 5.9) ** 2 - 0.009779 * (xu - 5.9) ** 3, 0.0)
    fb = np.where(xu >= 5.9, 0.2130 * (xu - 5.9) ** 2 + 0.1207 * (xu - 5.9) ** 3, 0.0)
    a[uv] = 1.752 - 0.316 * xu - 0.104 / ((xu - 4.67) ** 2 + 0.341) + fa
    b[uv] = -3.090 + 1.825 * xu + 1.206 / ((xu - 4.62) ** 2 + 0.263) + fb
    fuv = x >= 8.0
    z = x[fuv] - 8.0
    a[fuv] = np.polyval([-0.070, 0.137, -0.628, -1.073], z)
    b[fuv] = np.polyval([0.374, -0.420, 4.257, 13.670], z)
    return a, b


def _f99_k(x: np.ndarray, r_v: float) -> np.ndarray:
    """Fitzpatrick (1999) A(lambda)/E(B-V) with x = 1/lambda in inverse microns."""
    from scipy.interpolate import CubicSpline  # scipy comes with jax

    # UV: Fitzpatrick & Massa (1990) form with the R_V-dependent c1, c2 of F99 section 3.
    x0, gamma, c3, c4 = 4.596, 0.99, 3.23, 0.41
    c2 = -0.824 + 4.717 / r_v
    c1 = 2.030 - 3.007 * c2

    def uv(xx):
        d = xx**2 / ((xx**2 - x0**2) ** 2 + (xx * gamma) ** 2)
        xs = np.clip(xx - 5.9, 0.0, None)
        f = 0.5392 * xs**2 + 0.05644 * xs**3
        return c1 + c2 * xx + c3 * d + c4 * f + r_v

    # Optical/IR: natural cubic spline through the F99 anchor points (Table 3 / IDL fm_unred):
    # IR points scale with R_V, optical points are the published polynomials in R_V, and the
    # two UV points at 2700 and 2600 A tie the spline to the UV curve.
    x_uv_anchor = 1e4 / np.array([2700.0, 2600.0])
    x_anchor = np.concatenate([[0.0], 1e4 / np.array([26500.0, 12200.0, 6000.0, 5470.0, 4670.0, 4110.0]), x_uv_anchor])
    y_ir = np.array([0.0, 0.26469, 0.82925]) * r_v / 3.1
    y_op = np.array(
        [
            np.polyval([2.13572e-04, 1.00270, -4.22809e-01], r_v),
            np.polyval([-7.35778e-05, 1.00216, -5.13540e-02], r_v),
            np.polyval([-3.32598e-05, 1.00184, 7.00127e-01], r_v),
            np.polyval([-4.45636e-05, 7.97809e-04, -5.46959e-03, 1.01707, 1.19456], r_v),
        ]
    )
    y_anchor = np.concatenate([y_ir, y_op, uv(x_uv_anchor)])
    spline = CubicSpline(x_anchor, y_anchor, bc_type="natural")
    return np.where(x >= 1e4 / 2700.0, uv(x), spline(x))


def extinction_curve(wavelength: Any, *, law: str = "ccm89", r_v: float = 3.1) -> np.ndarray:
    r"""Galactic extinction curve :math:`A(\lambda)/A(V)`.

    Parameters
    ----------
    wavelength : array_like
        Wavelengths in Angstrom (any shape). ``"ccm89"``/``"odonnell94"`` are defined on
        1000 A - 33333 A (x = 0.3-10 inverse microns), ``"f99"`` on lambda >= 1000 A.
    law : {"ccm89", "odonnell94", "f99"}
        ``"ccm89"``: Cardelli, Clayton & Mathis (1989, ApJ 345, 245), eqs. 2-5.
        ``"odonnell94"``: CCM89 with the optical (1.1-3.3 inverse micron) coefficients of
        O'Donnell (1994, ApJ 422, 158). ``"f99"``: Fitzpatrick (1999, PASP 111, 63): the
        Fitzpatrick & Massa UV curve shortward of 2700 A and a cubic spline through the
        R_V-dependent optical/IR anchor points of its Table 3 longward.
    r_v : float
        :math:`R_V = A(V)/E(B-V)`; 3.1 is the diffuse Milky Way average.

    Returns
    -------
    numpy.ndarray
        :math:`A(\lambda)/A(V)` (float64, same shape as ``wavelength``); multiply by
        ``r_v * ebv`` for :math:`A(\lambda)` in magnitudes. NaN where ``wavelength`` is NaN.

    Notes
    -----
    CCM89: :math:`A(\lambda)/A(V) = a(x) + b(x)/R_V` with polynomials in
    :math:`y = x - 1.82` in the optical, power laws in the IR and the bump + far-UV terms in
    the UV. F99 tabulates :math:`k(\lambda) = A(\lambda)/E(B-V)`; here :math:`k/R_V` is
    returned. F99's normalisation is to broad-band V, so at 5470 A it gives 0.985, not 1.

    Examples
    --------
    >>> float(extinction_curve(1e4 / 1.82))  # y = 0: 1 by construction
    1.0
    """
    if law not in _LAWS:
        raise OptionError(f"law={law!r} is not a known extinction law; use one of {_LAWS}")
    r_v = float(r_v)
    if not np.isfinite(r_v) or r_v <= 0:
        raise OptionError(f"r_v={r_v!r} must be a positive number (Milky Way average: 3.1)")
    wave = np.asarray(wavelength, dtype=np.float64)
    out = np.full(wave.shape, np.nan)
    ok = np.isfinite(wave)
    x = 1e4 / wave[ok]
    lo = 1000.0
    hi = 33333.4 if law != "f99" else np.inf
    if np.any((wave[ok] < lo) | (wave[ok] > hi)):
        bad = wave[ok][(wave[ok] < lo) | (wave[ok] > hi)]
        raise InputDataError(
            f"wavelength: {law} is defined on {lo:g}-{hi:g} Angstrom, got values from {bad.min():g} to "
            f"{bad.max():g}; deredden in the observed frame and pass wavelengths in Angstrom"
        )
    if law == "f99":
        out[ok] = _f99_k(x, r_v) / r_v
    else:
        a, b = _ccm89_ab(x, "ccm89" if law == "ccm89" else "odonnell94")
        out[ok] = a + b / r_v
    return out


def dered(
    wavelength: Any,
    flux: Any,
    ivar: Any | None,
    ebv: Any,
    *,
    law: str = "ccm89",
    r_v: float = 3.1,
) -> tuple[np.ndarray, np.ndarray | None]:
    r"""Correct spectra for Galactic extinction given :math:`E(B-V)`.

    :math:`F_0 = F \, 10^{0.4 A(\lambda)}`, :math:`\mathrm{ivar}_0 = \mathrm{ivar} \, 10^{-0.8 A(\lambda)}`
    with :math:`A(\lambda) = E(B-V)\, R_V\, [A(\lambda)/A(V)]` from :func:`extinction_curve`.

    Parameters
    ----------
    wavelength : array_like
        Observed-frame wavelengths in Angstrom, shape ``(n_wave,)`` or the shape of ``flux``.
    flux : array_like
        Shape ``(..., n_wave)``; one spectrum or a stack ``(n_spectrum, n_wave)``.
    ivar : array_like or None
        Inverse variance, same shape as ``flux`` (``None`` to correct the flux only).
    ebv : float or array_like
        :math:`E(B-V)` in magnitudes: a scalar or one value per spectrum, shape ``flux.shape[:-1]``.
    law, r_v
        See :func:`extinction_curve`.

    Returns
    -------
    flux, ivar : numpy.ndarray
        Corrected arrays in the dtype of the inputs (``ivar`` is ``None`` when passed ``None``).
        Masked pixels stay masked: ``ivar == 0`` stays 0 and NaN flux stays NaN.

    Examples
    --------
    >>> f, iv = dered([5494.5], [1.0], [1.0], ebv=0.1)  # A = 0.31 mag at V
    >>> round(float(f[0]), 4), round(float(iv[0]), 4)
    (1.3305, 0.5649)
    """
    flux_arr = np.asarray(flux)
    dtype = flux_arr.dtype if np.issubdtype(flux_arr.dtype, np.floating) else np.float64
    ebv_arr = np.asarray(ebv, dtype=np.float64)
    if not np.all(np.isfinite(ebv_arr)) or np.any(ebv_arr < 0):
        raise OptionError(f"ebv must be finite and >= 0 (magnitudes), got {ebv!r}")
    if ebv_arr.ndim > 0:
        if ebv_arr.shape != flux_arr.shape[:-1]:
            raise OptionError(
                f"ebv has shape {ebv_arr.shape}; it must be a scalar or one value per spectrum, "
                f"shape {flux_arr.shape[:-1]}"
            )
        ebv_arr = ebv_arr[..., None]
    a_lambda = ebv_arr * float(r_v) * extinction_curve(wavelength, law=law, r_v=r_v)
    factor = 10.0 ** (0.4 * a_lambda)
    out_flux = (flux_arr * factor).astype(dtype, copy=False)
    if ivar is None:
        return out_flux, None
    ivar_arr = np.asarray(ivar)
    idtype = ivar_arr.dtype if np.issubdtype(ivar_arr.dtype, np.floating) else np.float64
    return out_flux, (ivar_arr / factor**2).astype(idtype, copy=False)


def vacuum_to_air(wavelength: Any) -> np.ndarray:
    """Vacuum to air wavelengths (Angstrom), IAU standard of Morton (2000, ApJS 130, 403), eq. 8."""
    w = np.asarray(wavelength, dtype=np.float64)
    s2 = (1e4 / w) ** 2
    n = 1.0 + 8.34254e-5 + 2.406147e-2 / (130.0 - s2) + 1.5998e-4 / (38.9 - s2)
    return w / n


def air_to_vacuum(wavelength: Any) -> np.ndarray:
    """Air to vacuum wavelengths (Angstrom): the inverse of :func:`vacuum_to_air`.

    Solved by fixed-point iteration on Morton (2000) eq. 8, so the two functions round-trip to
    better than 1e-8 Angstrom (N. Piskunov's closed-form inverse agrees to ~1e-4 A).
    """
    air = np.asarray(wavelength, dtype=np.float64)
    vac = air.copy()
    for _ in range(6):  # converges by a factor ~3e-4 per step
        vac = vac + (air - vacuum_to_air(vac))
    return vac


# --------------------------------------------------------------------------------------
# SDSS spec files
# --------------------------------------------------------------------------------------


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


_TFORM = re.compile(r"^\s*(\d*)([LXBIJKAEDCMPQ])")
_TFORM_SIZE = {"L": 1, "B": 1, "I": 2, "J": 4, "K": 8, "A": 1, "E": 4, "D": 8, "C": 8, "M": 16, "P": 8, "Q": 16}
_TFORM_DTYPE = {"L": "i1", "B": "u1", "I": ">i2", "J": ">i4", "K": ">i8", "E": ">f4", "D": ">f8"}


def _table_columns(header) -> dict[str, str]:
    """Lower-case name -> name of a binary table's columns, from its header alone."""
    n = int(header.get("TFIELDS", 0))
    return {str(header[f"TTYPE{i}"]).strip().lower(): str(header[f"TTYPE{i}"]).strip() for i in range(1, n + 1) if f"TTYPE{i}" in header}


def _table_row(hdul, index: int, wanted: Iterable[str], row_index: int = 0) -> dict[str, Any]:
    """Values of the ``wanted`` columns (lower-case names) in one row of binary table ``index``.

    astropy builds a Column object for each of the ~240 columns of an SPALL/SPECOBJ table
    when its ``.data`` is touched (0.3-0.5 s a file); here the byte offsets come from the
    TFORMn keywords and only one row is read, which is ~50x faster.
    """
    header = hdul[index].header
    want = {w.lower() for w in wanted}
    offset, fields = 0, {}
    for i in range(1, int(header.get("TFIELDS", 0)) + 1):
        name = str(header[f"TTYPE{i}"]).strip()
        m = _TFORM.match(str(header[f"TFORM{i}"]))
        if m is None:
            raise InputDataError(f"HDU{index}: unsupported TFORM{i} = {header[f'TFORM{i}']!r}")
        rep = int(m.group(1)) if m.group(1) else 1
        code = m.group(2)
        size = (rep + 7) // 8 if code == "X" else rep * _TFORM_SIZE[code]
        if name.lower() in want and (code == "A" or code in _TFORM_DTYPE) and (
            f"TZERO{i}" not in header and f"TSCAL{i}" not in header
        ):
            fields[name.lower()] = (offset, code, rep)
        offset += size
    if not fields:
        return {}
    row_len = int(header["NAXIS1"])
    if offset != row_len:
        raise InputDataError(f"HDU{index}: TFORMs add up to {offset} bytes but NAXIS1 = {row_len}")
    # HDUList.fileinfo() gives the data offset too, but it re-serialises every header of the
    # file (0.3 s); the HDU's own offset attribute is what fileinfo reads.
    data_loc = getattr(hdul[index], "_data_offset", None)
    if data_loc is None:  # pragma: no cover - older/newer astropy without the attribute
        data_loc = hdul.fileinfo(index)["datLoc"]
    fileobj = hdul._file  # the file handle astropy already holds open
    if not 0 <= row_index < int(header.get("NAXIS2", 0)):
        raise InputDataError(f"HDU{index}: row {row_index} does not exist (NAXIS2 = {header.get('NAXIS2')})")
    fileobj.seek(data_loc + row_index * row_len)
    row = fileobj.read(row_len)
    out = {}
    for name, (off, code, rep) in fields.items():
        if code == "A":
            out[name] = row[off : off + rep].decode("ascii", "replace").rstrip("\x00 ")
        else:
            vals = np.frombuffer(row, dtype=_TFORM_DTYPE[code], count=rep, offset=off)
            out[name] = vals[0] if rep == 1 else vals.copy()
    return out


def _scan_sdss_file(path: str, ebv_mode: str | None) -> dict[str, Any]:
    """Read one spec file's metadata and its grid extent without reading the spectrum."""
    fits = _fits()
    try:
        hdul = fits.open(path, memmap=False)
    except OSError as exc:
        raise InputDataError(f"{path}: not a readable FITS file ({exc})") from exc
    with hdul:
        try:
            hdul[2]
        except IndexError:
            raise InputDataError(
                f"{path}: has {len(hdul)} HDUs; an SDSS spec file has HDU1 COADD and HDU2 SPECOBJ/SPALL "
                "(DR7 spSpec files are not supported: download the DR8+ spec file)"
            ) from None
        h1 = hdul[1].header
        cols1 = _table_columns(h1)
        missing = [c for c in ("flux", "loglam", "ivar") if c not in cols1]
        if missing:
            hint = ""
            if len(hdul) > 3 and "wave_prereduced" in _table_columns(hdul[3].header):
                hint = "; this is a quasar-catalogue op file: read it with sheap_dask.io.read_rest_frame_fits"
            raise InputDataError(
                f"{path}: HDU1 lacks the column(s) {missing} of an SDSS COADD table "
                f"(it has {list(cols1.values())}){hint}"
            )
        if hdul[2].header.get("XTENSION", "").strip() != "BINTABLE":
            raise InputDataError(f"{path}: HDU2 is not the SPECOBJ/SPALL table of an SDSS spec file")
        wanted = ("z", "z_err", "zwarning", "plate", "mjd", "fiberid", "plug_ra", "plug_dec", "ra", "dec", "class", "extinction")
        row = _table_row(hdul, 2, wanted)
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
        }
        if ebv_mode is not None:
            ext = get("EXTINCTION")
            if ext is None:
                raise InputDataError(
                    f"{path}: ebv={ebv_mode!r} needs the EXTINCTION column of HDU2, which this file "
                    "(SDSS-I/II era SPECOBJ) lacks; pass E(B-V) values explicitly with ebv=[...]"
                )
            e_sfd = float(np.asarray(ext)[2]) / _SF11_R_BAND
            meta["ebv"] = e_sfd * (_SF11_RECALIBRATION if ebv_mode == "sf11" else 1.0)
        # The grid extent from the first and last loglam (ascending in every coadd). Not from
        # the primary header's COEFF0: it is one pixel off in some spec-lite files (1325-52762).
        n_pix = int(h1.get("NAXIS2", 0))
        if n_pix < 1:
            raise InputDataError(f"{path}: the COADD table of HDU1 has no rows")
        first = _table_row(hdul, 1, ["loglam"], 0).get("loglam")
        last = _table_row(hdul, 1, ["loglam"], n_pix - 1).get("loglam")
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
    fits = _fits()
    with fits.open(path, memmap=False) as hdul:
        data = hdul[1].data
        cols = _colmap(hdul[1].columns.names)
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


_PARALLEL = ("threads", "processes")


def _make_pool(parallel: str, n_jobs: int | None) -> Executor:
    if parallel not in _PARALLEL:
        raise OptionError(f"parallel={parallel!r}: use 'threads' (I/O-bound, default) or 'processes' (CPU-bound, many cores)")
    n_jobs = _default_jobs(n_jobs)
    if parallel == "processes":
        # spawn, not fork: forking a process that has started JAX or dask threads can deadlock
        return ProcessPoolExecutor(n_jobs, mp_context=multiprocessing.get_context("spawn"))
    return ThreadPoolExecutor(n_jobs)


class _SdssPlan:
    """What a read/ingest needs: the file list, the grid, the metadata and the options."""

    def __init__(self, files, *, mask_bits, ebv, dereddening, r_v, wavelength_range, fill_value, n_jobs, pool: Executor):
        self.files = _expand_files(files)
        self.mask = mask_value(mask_bits)
        self.n_jobs = _default_jobs(n_jobs)
        self.fill_value = float(fill_value)
        if dereddening not in _LAWS:
            raise OptionError(f"dereddening={dereddening!r} is not a known extinction law; use one of {_LAWS}")
        self.law, self.r_v = dereddening, float(r_v)
        ebv_spec = _resolve_ebv(ebv, len(self.files))
        ebv_mode = ebv_spec if isinstance(ebv_spec, str) else None
        scan = functools.partial(_scan_sdss_file, ebv_mode=ebv_mode)
        self.meta = list(pool.map(scan, self.files, chunksize=self._chunksize(len(self.files))))
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
        from ._version import __version__

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
        return attrs

    def dataset(self, flux, ivar, *, spectrum_dim: str, wavelength_dim: str) -> xr.Dataset:
        dims = (spectrum_dim, wavelength_dim)
        return xr.Dataset(
            {
                "flux": (dims, flux, {"units": _FLUX_UNITS, "long_name": "flux density"}),
                "ivar": (dims, ivar, {"units": _IVAR_UNITS, "long_name": "inverse variance of flux (0 = masked)"}),
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
    spectrum_dim, wavelength_dim : str
        Dimension names.

    Returns
    -------
    xarray.Dataset
        ``flux`` and ``ivar`` (spectrum, wavelength) float32 in 1e-17 erg/s/cm2/A;
        ``wavelength`` (Angstrom, vacuum, ``10**loglam``) and ``loglam`` along wavelength;
        ``redshift``, ``redshift_err``, ``zwarning``, ``plate``, ``mjd``, ``fiberid``, ``ra``,
        ``dec``, ``objclass``, ``specname``, ``filename`` (and ``ebv``) along spectrum.

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
    if chunk is not None:
        chunk = _check_chunk(chunk)
    # one pool for the metadata scan and (eager reads) the spectra: spawning is not free
    with _make_pool(parallel, n_jobs) as pool:
        plan = _SdssPlan(
            files,
            mask_bits=mask_bits,
            ebv=ebv,
            dereddening=dereddening,
            r_v=r_v,
            wavelength_range=wavelength_range,
            fill_value=fill_value,
            n_jobs=n_jobs,
            pool=pool,
        )
        n = plan.n_spectra
        if chunk is None:
            flux, ivar = plan.read_block(0, n, pool)
            return plan.dataset(flux, ivar, spectrum_dim=spectrum_dim, wavelength_dim=wavelength_dim)
    import dask
    import dask.array as da

    blocks = []
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        # one task per block returns flux and ivar stacked, so computing both reads once
        task = dask.delayed(lambda a, b: np.stack(plan.read_block(a, b)), pure=True)(
            start, stop, dask_key_name=f"read-sdss-{dask.base.tokenize(plan.files[start:stop], plan.k0, plan.n_wave, plan.mask, plan.fill_value, None if plan.ebv is None else plan.ebv[start:stop], plan.law, plan.r_v)}"
        )
        blocks.append(da.from_delayed(task, shape=(2, stop - start, plan.n_wave), dtype=np.float32))
    stacked = da.concatenate(blocks, axis=1)
    return plan.dataset(stacked[0], stacked[1], spectrum_dim=spectrum_dim, wavelength_dim=wavelength_dim)


def _check_chunk(chunk: Any) -> int:
    if not isinstance(chunk, (int, np.integer)) or isinstance(chunk, bool) or chunk < 1:
        raise OptionError(f"chunk must be a positive number of spectra, got {chunk!r}")
    return int(chunk)


def _store_exists(store: Any) -> bool:
    if isinstance(store, (str, os.PathLike)) and "://" not in os.fspath(store):
        return os.path.exists(store)
    return False


def ingest_sdss(
    files: str | os.PathLike | Iterable[str | os.PathLike],
    store: Any,
    *,
    chunk: int = 256,
    overwrite: bool = False,
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
        Replace an existing store; otherwise an existing store is an error.
    progress : bool
        Show a tqdm progress bar over chunks.
    storage_options : dict, optional
        Passed to fsspec for URL stores (credentials, endpoint...).
    **kwargs
        Any option of :func:`read_sdss_spectra`: ``mask_bits``, ``ebv``, ``dereddening``,
        ``r_v``, ``wavelength_range``, ``fill_value``, ``n_jobs``, ``parallel``,
        ``spectrum_dim``, ``wavelength_dim``.

    Returns
    -------
    xarray.Dataset
        ``xr.open_zarr(store)``: lazy, chunked ``chunk`` spectra along ``spectrum``.

    Examples
    --------
    >>> ds = ingest_sdss("spectra/spec-*.fits", "sdss.zarr", chunk=512)  # doctest: +SKIP
    """
    chunk = _check_chunk(chunk)
    allowed = {
        "mask_bits", "ebv", "dereddening", "r_v", "wavelength_range", "fill_value", "n_jobs", "parallel", "spectrum_dim", "wavelength_dim",
    }
    unknown = set(kwargs) - allowed
    if unknown:
        raise OptionError(f"ingest_sdss got unknown option(s) {sorted(unknown)}; known: {sorted(allowed)}")
    if _store_exists(store) and not overwrite:
        raise OptionError(f"store {os.fspath(store)!r} already exists; pass overwrite=True to replace it")
    spectrum_dim = kwargs.pop("spectrum_dim", "spectrum")
    wavelength_dim = kwargs.pop("wavelength_dim", "wavelength")
    files_pool = _make_pool(kwargs.get("parallel", "threads"), kwargs.get("n_jobs"))
    try:
        return _ingest(files, store, files_pool, chunk, overwrite, progress, storage_options, spectrum_dim, wavelength_dim, kwargs)
    finally:
        files_pool.shutdown()


def _ingest(files, store, files_pool, chunk, overwrite, progress, storage_options, spectrum_dim, wavelength_dim, kwargs):
    plan = _SdssPlan(
        files,
        mask_bits=kwargs.get("mask_bits", "default"),
        ebv=kwargs.get("ebv"),
        dereddening=kwargs.get("dereddening", "ccm89"),
        r_v=kwargs.get("r_v", 3.1),
        wavelength_range=kwargs.get("wavelength_range"),
        fill_value=kwargs.get("fill_value", np.nan),
        n_jobs=kwargs.get("n_jobs"),
        pool=files_pool,
    )
    import dask.array as da

    n, nw = plan.n_spectra, plan.n_wave
    lazy = da.zeros((n, nw), dtype=np.float32, chunks=(chunk, nw))
    template = plan.dataset(lazy, lazy, spectrum_dim=spectrum_dim, wavelength_dim=wavelength_dim)
    encoding = {v: {"chunks": (chunk, nw)} for v in ("flux", "ivar")}
    # per-spectrum coordinates chunked like the data, so the opened store has one set of
    # chunks along spectrum (``ds.chunks`` raises on inconsistent chunks)
    encoding.update({c: {"chunks": (chunk,)} for c, v in template.coords.items() if v.dims == (spectrum_dim,)})
    so = dict(storage_options) if storage_options else None
    # Coordinates (numpy) are written now; the dask-backed flux/ivar only get their metadata.
    with _quiet_consolidated():
        template.to_zarr(store, mode="w" if overwrite else "w-", compute=False, encoding=encoding, storage_options=so)

    starts = list(range(0, n, chunk))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, unit="spectrum", desc="ingest")
    with ThreadPoolExecutor(1) as prefetch:
        pending = prefetch.submit(plan.read_block, starts[0], min(starts[0] + chunk, n), files_pool)
        for i, start in enumerate(starts):
            stop = min(start + chunk, n)
            flux, ivar = pending.result()
            if i + 1 < len(starts):
                nxt = starts[i + 1]
                pending = prefetch.submit(plan.read_block, nxt, min(nxt + chunk, n), files_pool)
            dims = (spectrum_dim, wavelength_dim)
            with _quiet_consolidated():
                xr.Dataset({"flux": (dims, flux), "ivar": (dims, ivar)}).to_zarr(
                    store, region={spectrum_dim: slice(start, stop)}, storage_options=so
                )
            if bar is not None:
                bar.update(stop - start)
    if bar is not None:
        bar.close()
    return open_spectra(store, storage_options=so)


# --------------------------------------------------------------------------------------
# tables and rest-frame catalogue spectra
# --------------------------------------------------------------------------------------

_WAVE_NAMES = ("wavelength", "wave", "lam", "lambda", "wl", "loglam")
_FLUX_NAMES = ("flux", "flam", "f_lambda", "f")
_ERR_NAMES = ("error", "err", "flux_err", "fluxerr", "sigma", "noise", "ferr", "e_flux", "unc", "uncertainty")


def _one_spectrum_dataset(
    wave, flux, ivar, *, coords: dict[str, Any], attrs: dict[str, Any], flux_units: str, spectrum_dim: str, wavelength_dim: str
) -> xr.Dataset:
    dims = (spectrum_dim, wavelength_dim)
    ivar_units = f"({flux_units})**-2" if flux_units else ""
    all_coords = {wavelength_dim: (wavelength_dim, wave, {"units": "Angstrom"})}
    all_coords.update({k: (spectrum_dim, np.asarray([v]), a) for k, (v, a) in coords.items()})
    return xr.Dataset(
        {
            "flux": (dims, flux[None, :].astype(np.float32), {"units": flux_units, "long_name": "flux density"}),
            "ivar": (dims, ivar[None, :].astype(np.float32), {"units": ivar_units, "long_name": "inverse variance of flux (0 = masked)"}),
        },
        coords=all_coords,
        attrs=attrs,
    )


def _ivar_from_err(flux: np.ndarray, err: np.ndarray) -> np.ndarray:
    ok = np.isfinite(err) & (err > 0) & np.isfinite(flux)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        ivar = np.where(ok, 1.0 / np.where(ok, err, 1.0) ** 2, 0.0)
    return np.where(np.isfinite(ivar), ivar, 0.0)


def read_table_spectrum(
    path: str | os.PathLike,
    *,
    columns: Sequence[str | int] | None = None,
    redshift: float | None = None,
    flux_scale: float | None = None,
    flux_units: str = "",
    air: bool = False,
    ebv: float | None = None,
    dereddening: str = "ccm89",
    r_v: float = 3.1,
    delimiter: str | None = None,
    spectrum_dim: str = "spectrum",
    wavelength_dim: str = "wavelength",
) -> xr.Dataset:
    """Read a (wavelength, flux, error) table into a one-spectrum Dataset.

    Parameters
    ----------
    path : str or os.PathLike
        CSV or whitespace-separated text; ``#`` starts a comment. A header line is optional.
    columns : sequence of 3 names or indices, optional
        The wavelength, flux and error columns. Default: recognised header names
        (wavelength/wave/lam/lambda, flux/flam, error/err/flux_err/sigma/noise), else the
        first three columns.
    redshift : float, optional
        Stored as the ``redshift`` coordinate. Without it the Dataset has no ``redshift``
        and models take it as rest frame.
    flux_scale : float, optional
        Divide flux and error by this (e.g. ``1e-17`` to express erg/s/cm2/A tables in the
        SDSS unit, which keeps the numbers near 1 for float32 fits).
    flux_units : str
        Units of the (scaled) flux, stored in the ``units`` attribute.
    air : bool
        The table's wavelengths are in air: convert to vacuum (:func:`air_to_vacuum`), the
        convention of SDSS and of the model line lists.
    ebv, dereddening, r_v
        Galactic dereddening as in :func:`dered` (``ebv=None``: none).
    delimiter : str, optional
        Column separator (default: ``,`` if the first data line has one, else whitespace).
    spectrum_dim, wavelength_dim : str
        Dimension names.

    Returns
    -------
    xarray.Dataset
        ``flux``/``ivar`` (1, n_wave) float32, ``ivar = 1/err**2`` (0 where the error is
        non-finite or <= 0, or the flux non-finite), ``wavelength`` in Angstrom (ascending),
        ``specname`` and ``filename`` coordinates, ``redshift`` when given.

    Examples
    --------
    >>> ds = read_table_spectrum("spec.csv", redshift=0.1684, flux_scale=1e-17)  # doctest: +SKIP
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"table spectrum not found: {os.fspath(path)!r} (argument path)")
    text = p.read_text()
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise InputDataError(f"{path}: no data lines")
    if delimiter is None:
        delimiter = "," if "," in lines[0] else None
    first = lines[0].split(delimiter) if delimiter else lines[0].split()
    first = [c.strip() for c in first]

    def is_number(s):
        try:
            float(s)
            return True
        except ValueError:
            return False

    header = None if all(is_number(c) for c in first) else [c.lower() for c in first]
    body = lines[1:] if header else lines
    if delimiter:
        rows = list(csv.reader(_stdio.StringIO("\n".join(body)), delimiter=delimiter))
    else:
        rows = [ln.split() for ln in body]
    try:
        table = np.array([[float(v) for v in r] for r in rows], dtype=np.float64)
    except ValueError as exc:
        raise InputDataError(f"{path}: a data line is not numeric ({exc})") from exc
    if table.ndim != 2 or table.shape[1] < 3:
        raise InputDataError(f"{path}: needs at least 3 columns (wavelength, flux, error), found {table.shape[-1]}")

    def find(names, given, role):
        if isinstance(given, (int, np.integer)):
            return int(given)
        if given is not None:
            if header is None or given.lower() not in header:
                raise OptionError(f"columns: {role} column {given!r} not in the header {header} of {path}")
            return header.index(given.lower())
        if header is not None:
            for n in names:
                if n in header:
                    return header.index(n)
        return None

    if columns is not None and len(columns) != 3:
        raise OptionError(f"columns={columns!r} must name 3 columns: wavelength, flux, error")
    given = list(columns) if columns is not None else [None, None, None]
    idx = [find(_WAVE_NAMES, given[0], "wavelength"), find(_FLUX_NAMES, given[1], "flux"), find(_ERR_NAMES, given[2], "error")]
    if any(i is None for i in idx):
        if header is not None and columns is None and not all(i is None for i in idx):
            raise InputDataError(
                f"{path}: could not tell the wavelength/flux/error columns from the header {header}; pass columns=[...]"
            )
        idx = [0, 1, 2]
    wave, flux, err = (table[:, i] for i in idx)
    if header is not None and header[idx[0]] == "loglam":
        wave = 10.0**wave
    order = np.argsort(wave, kind="stable")
    wave, flux, err = wave[order], flux[order], err[order]
    if np.any(np.diff(wave) == 0):
        raise InputDataError(f"{path}: repeated wavelength values")
    if air:
        wave = air_to_vacuum(wave)
    if flux_scale is not None:
        flux, err = flux / flux_scale, err / flux_scale
    ivar = _ivar_from_err(flux, err)
    if ebv is not None:
        flux, ivar = dered(wave, flux, ivar, ebv, law=dereddening, r_v=r_v)
    coords: dict[str, Any] = {
        "specname": (np.asarray(p.stem, dtype=object), {}),
        "filename": (np.asarray(p.name, dtype=object), {}),
    }
    if redshift is not None:
        coords["redshift"] = (float(redshift), {})
    if ebv is not None:
        coords["ebv"] = (float(ebv), {"units": "mag"})
    attrs = {"source": f"table {p.name}", "wavelength_medium": "vacuum" if air else "as in file"}
    if ebv is not None:
        attrs.update(dereddening=dereddening, dereddening_r_v=float(r_v))
    return _one_spectrum_dataset(
        wave, flux, ivar, coords=coords, attrs=attrs, flux_units=flux_units, spectrum_dim=spectrum_dim, wavelength_dim=wavelength_dim
    )


def read_rest_frame_fits(
    path: str | os.PathLike, *, spectrum_dim: str = "spectrum", wavelength_dim: str = "wavelength"
) -> xr.Dataset:
    """Read the rest-frame spectrum of a quasar-catalogue PyQSOFit ``op-*.fits``/``op_*.fits`` file.

    HDU3 holds the spectrum that the catalogue fitted: ``wave_prereduced`` (rest-frame
    Angstrom), ``flux_prereduced`` and ``err_prereduced`` (already Galactic-dereddened and
    multiplied by 1+z, 1e-17 erg/s/cm2/A). Because it is already in the rest frame, the
    returned Dataset has **no** ``redshift`` coordinate (models then take it as rest frame);
    the catalogue redshift is kept as ``catalog_redshift`` and ``attrs["frame"] = "rest"``.

    Parameters
    ----------
    path : str or os.PathLike
        The op file (DR16Q: Wu & Shen 2022; SDSS-V DR19 quasar VAC).
    spectrum_dim, wavelength_dim : str
        Dimension names.

    Returns
    -------
    xarray.Dataset
        One spectrum: ``flux``, ``ivar`` (float32; ``ivar = 1/err**2``, 0 where err <= 0 or
        non-finite), ``wavelength`` (rest frame), and ``catalog_redshift``, ``catalog_ebv``,
        ``plate``, ``mjd``, ``fiberid``, ``ra``, ``dec``, ``specname``, ``filename`` where
        the file's HDU1 has them.
    """
    fits = _fits()
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"op file not found: {os.fspath(path)!r} (argument path)")
    with fits.open(p, memmap=False) as hdul:
        if len(hdul) < 4 or not hasattr(hdul[3], "columns"):
            raise InputDataError(f"{path}: no HDU3 table; a quasar-catalogue op file has the spectrum in HDU3")
        cols = _colmap(hdul[3].columns.names)
        need = ["wave_prereduced", "flux_prereduced", "err_prereduced"]
        missing = [c for c in need if c not in cols]
        if missing:
            raise InputDataError(f"{path}: HDU3 lacks {missing} (has {list(cols.values())})")
        d3 = hdul[3].data
        wave, flux, err = (np.asarray(d3[cols[c]], dtype=np.float64) for c in need)
        info = {}
        if hasattr(hdul[1], "columns"):
            c1 = _colmap(hdul[1].columns.names)
            d1 = hdul[1].data

            def get(*names):
                for n in names:
                    if n.lower() in c1:
                        return d1[c1[n.lower()]][0]
                return None

            info = {
                "catalog_redshift": get("Z_FIT", "redshift", "Z"),
                "catalog_ebv": get("EBV"),
                "plate": get("PLATE", "plateid"),
                "mjd": get("MJD"),
                "fiberid": get("FIBERID"),
                "ra": get("RA"),
                "dec": get("DEC"),
            }
    ok = np.isfinite(wave)
    wave, flux, err = wave[ok], flux[ok], err[ok]
    order = np.argsort(wave, kind="stable")
    wave, flux, err = wave[order], flux[order], err[order]
    ivar = _ivar_from_err(flux, err)
    flux = np.where(np.isfinite(flux), flux, np.nan)
    units = {"catalog_ebv": {"units": "mag"}, "ra": {"units": "deg"}, "dec": {"units": "deg"}}
    casts = {"plate": int, "mjd": int, "fiberid": int}
    coords: dict[str, Any] = {}
    for k, v in info.items():
        if v is not None:
            coords[k] = (casts.get(k, float)(v), units.get(k, {}))
    coords["specname"] = (np.asarray(p.stem, dtype=object), {})
    coords["filename"] = (np.asarray(p.name, dtype=object), {})
    attrs = {
        "source": f"quasar-catalogue op file {p.name} (HDU3 *_prereduced)",
        "frame": "rest",
        "dereddened": "yes (by the catalogue pipeline)",
    }
    ds = _one_spectrum_dataset(
        wave, flux, ivar, coords=coords, attrs=attrs, flux_units=_FLUX_UNITS, spectrum_dim=spectrum_dim, wavelength_dim=wavelength_dim
    )
    ds[wavelength_dim].attrs.update(long_name="rest-frame vacuum wavelength", frame="rest")
    return ds


# --------------------------------------------------------------------------------------
# zarr conventions
# --------------------------------------------------------------------------------------


def open_spectra(path_or_url: Any, **kwargs: Any) -> xr.Dataset:
    """Open a spectra zarr store (local path, fsspec URL such as ``s3://...``, or store object).

    Parameters
    ----------
    path_or_url : str, os.PathLike, or zarr store
        Where the store is. URLs need fsspec and the package of their filesystem
        (``s3fs`` for ``s3://``, ``gcsfs`` for ``gs://``, ...).
    **kwargs
        Passed to :func:`xarray.open_zarr` (``chunks=``, ``storage_options=``, ...).

    Returns
    -------
    xarray.Dataset
        Lazy, dask-backed, chunked as stored.

    Raises
    ------
    FileNotFoundError
        A local path that does not exist.
    sheap_dask.errors.MissingDependencyError
        fsspec, or the filesystem package of the URL's protocol, is missing.
    """
    if isinstance(path_or_url, (str, os.PathLike)):
        s = os.fspath(path_or_url)
        if "://" in s:
            protocol = s.split("://", 1)[0]
            try:
                import fsspec
            except ImportError as exc:
                raise MissingDependencyError(f"opening {s!r} needs fsspec: pip install fsspec") from exc
            if protocol not in ("file", "memory"):
                try:
                    fsspec.get_filesystem_class(protocol)
                except ImportError as exc:
                    raise MissingDependencyError(
                        f"opening {s!r} needs the fsspec filesystem for {protocol!r}, which is not installed ({exc})"
                    ) from exc
                except ValueError as exc:
                    raise OptionError(f"path_or_url={s!r}: unknown protocol {protocol!r} ({exc})") from exc
        elif not os.path.exists(s):
            raise FileNotFoundError(f"zarr store not found: {s!r} (argument path_or_url)")
    if kwargs.get("storage_options") is None:
        kwargs.pop("storage_options", None)
    with _quiet_consolidated():
        return xr.open_zarr(path_or_url, **kwargs)


@contextlib.contextmanager
def _quiet_consolidated():
    """Silence zarr 3's note that consolidated metadata is not in the v3 spec.

    xarray writes and reads consolidated metadata by default (one read instead of one per
    array, which matters on object stores); the note would otherwise print on every open.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        yield


def write_zarr(
    ds: xr.Dataset,
    store: Any,
    *,
    chunk: int | None = None,
    overwrite: bool = False,
    spectrum_dim: str = "spectrum",
    **kwargs: Any,
) -> xr.Dataset:
    """Write a spectra Dataset to zarr in the sheap_dask conventions and return it reopened.

    The store is chunked along ``spectrum`` only (one chunk spans the whole wavelength axis,
    what ``fit_dataset`` maps over); stale ``encoding`` left by a previous open is dropped so
    the new chunks apply.

    Parameters
    ----------
    ds : xarray.Dataset
        Spectra (``flux``, ``ivar`` or ``flux_err``, coordinates).
    store : str, os.PathLike, fsspec URL or zarr store
        Destination.
    chunk : int, optional
        Spectra per chunk; default: the Dataset's current ``spectrum`` chunks, or 256.
    overwrite : bool
        Replace an existing store.
    spectrum_dim : str
        Name of the spectrum dimension.
    **kwargs
        Passed to :meth:`xarray.Dataset.to_zarr`.
    """
    if spectrum_dim not in ds.dims:
        raise InputDataError(f"ds has no {spectrum_dim!r} dimension (dims: {dict(ds.sizes)}); pass spectrum_dim=")
    if _store_exists(store) and not overwrite:
        raise OptionError(f"store {os.fspath(store)!r} already exists; pass overwrite=True to replace it")
    if chunk is None:
        chunked = [v.chunksizes[spectrum_dim] for v in ds.data_vars.values() if v.chunks and spectrum_dim in v.dims]
        chunk = int(chunked[0][0]) if chunked else 256
    chunk = _check_chunk(chunk)
    out = ds.copy()
    for name in out.variables:
        out[name].encoding = {}
    target = {d: (min(chunk, ds.sizes[d]) if d == spectrum_dim else -1) for d in ds.dims}
    out = out.chunk(target)
    with _quiet_consolidated():
        out.to_zarr(store, mode="w" if overwrite else "w-", **kwargs)
    return open_spectra(store, storage_options=kwargs.get("storage_options"))


def synthetic_spectra(*args: Any, **kwargs: Any) -> xr.Dataset:
    """Synthetic spectra for demos and tests: see :func:`sheap_dask.synthetic.synthetic_spectra`."""
    from .synthetic import synthetic_spectra as _synthetic

    return _synthetic(*args, **kwargs)
