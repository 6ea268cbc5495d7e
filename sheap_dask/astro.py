"""Astrophysical conversions used when reading spectra: Galactic extinction and air/vacuum.

Pure numpy (scipy for the F99 spline): no I/O, no xarray, so :mod:`sheap_dask.models` can use
it too (the FeII line list is converted from air to vacuum with :func:`air_to_vacuum`).

Galactic extinction
    :func:`extinction_curve` and :func:`dered` (CCM89, CCM89 + O'Donnell 1994, Fitzpatrick 1999).
Air and vacuum wavelengths
    :func:`vacuum_to_air` and its exact inverse :func:`air_to_vacuum` (Morton 2000).
Instrumental resolution
    :func:`subtract_instrumental` removes the instrumental width from a measured line FWHM.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import InputDataError, OptionError

__all__ = [
    "extinction_curve",
    "dered",
    "air_to_vacuum",
    "vacuum_to_air",
    "subtract_instrumental",
    "EXTINCTION_LAWS",
    "SF11_RECALIBRATION",
]

#: Extinction laws known to :func:`extinction_curve`.
EXTINCTION_LAWS = ("ccm89", "odonnell94", "f99")
_LAWS = EXTINCTION_LAWS
#: E(B-V) of the Schlafly & Finkbeiner (2011, ApJ 737, 103) recalibration = 0.86 x SFD98.
SF11_RECALIBRATION = 0.86


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



def subtract_instrumental(fwhm: Any, instrumental: Any) -> Any:
    r"""Intrinsic line FWHM from a measured one, the instrumental FWHM removed in quadrature.

    :math:`\mathrm{FWHM}_\mathrm{int} = \sqrt{\mathrm{FWHM}^2 - \mathrm{FWHM}_\mathrm{inst}^2}`,
    exact when line and line-spread function are Gaussian, and a good approximation for any
    line much wider than the instrument. The fitted models do not convolve with the instrument,
    so a fitted FWHM is the observed (line (x) instrument) width: for broad lines (thousands of
    km/s) the correction is below 1%, for narrow lines (a few hundred km/s against DESI's
    ~60-170 km/s or SDSS's ~150 km/s) it is not.

    Parameters
    ----------
    fwhm : array_like or xarray.DataArray
        Measured FWHM (e.g. ``fits.sheap.fwhm("oiii5007")``), km/s.
    instrumental : array_like or xarray.DataArray
        Instrumental FWHM at the line in the same unit (e.g.
        :func:`sheap_dask.io.instrumental_fwhm_at`).

    Returns
    -------
    same type as ``fwhm``
        The intrinsic FWHM; NaN where the line is not wider than the instrument (unresolved).

    Examples
    --------
    >>> float(subtract_instrumental(500.0, 300.0))
    400.0
    """
    square = fwhm * fwhm - instrumental * instrumental
    return np.sqrt(square.where(square > 0)) if hasattr(square, "where") else np.sqrt(np.where(square > 0, square, np.nan))
