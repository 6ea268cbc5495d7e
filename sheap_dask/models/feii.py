"""FeII pseudo-continuum templates built from a documented line list, broadened in velocity.

Why a line list: the package ships no template file from other projects (Boroson & Green
1992, Vestergaard & Wilkes 2001, Tsuzuki et al. 2006 are not redistributed). The default
templates are built at import from the tables below:

* **wavelengths**: laboratory Fe II lines (air wavelengths, Angstrom) of the Moore (1945)
  multiplets, as listed in the NIST Atomic Spectra Database (Kramida et al., NIST ASD v5;
  Nave & Johansson 2013, ApJS 204, 1), converted to vacuum with the IAU formula (Morton
  2000, ApJS 130, 403) because SDSS spectra use vacuum wavelengths;
* **optical multiplets** 27, 28, 37, 38, 41, 42, 43, 48, 49, 55 between 4170 and 5540 A, the
  groups Kovacevic, Popovic & Dimitrijevic (2010, ApJS 189, 15) use around H-beta and that
  Veron-Cetty, Joly & Veron (2004, A&A 417, 515) identify in I Zw 1;
* **UV multiplets** UV1, UV2, UV3, UV32, UV35, UV36, UV60, UV61, UV62, UV63, UV64, UV78
  around MgII (Moore 1950 UV designations; Popovic et al. 2019, MNRAS 484, 3180 use UV60-63
  and UV78 for 2650-3050 A);
* **relative strengths**: approximate, on a 0.1-2 scale, chosen by us so that the broadened
  template reproduces the relative heights of the FeII blends of I Zw 1 (optical: the
  4500-4680 and 5150-5350 A blends of similar height, 4924/5018/5169 of multiplet 42 the
  strongest single lines; Veron-Cetty et al. 2004, fig. 4; Kovacevic et al. 2010, fig. 4)
  and the UV shape (the 2400 and 2600 A humps of UV2/UV1 strongest, the 2700-3050 A
  plateau weaker; Popovic et al. 2019, fig. A1). They are **not** fitted gf values; users
  who need a published empirical template pass it with ``template=(wavelength, flux)`` or a
  file path.

The template is stored as flux per unit ln(lambda) on a uniform ln(lambda) grid. A Gaussian
in velocity is a Gaussian of constant width in ln(lambda), so broadening is one FFT product
(:meth:`FeIITemplate.evaluate`, pure jnp, differentiable in FWHM and shift), then the result
is read at the data wavelengths by linear interpolation and turned into flux per Angstrom
(divided by lambda), which conserves the flux.

Normalisation: ``amplitude`` is the integrated flux of the unbroadened template in its
normalisation band, 4434-4684 A for the optical template (the band of R_FeII, Boroson &
Green 1992) and 2200-3090 A for the UV template (e.g. Tsuzuki et al. 2006), in the
spectrum's flux unit times Angstrom.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np

from ..astro import air_to_vacuum  # the exact inverse of Morton (2000) eq. 8; re-exported
from ..errors import ModelError
from .profiles import C_KMS, LogLambdaTemplate

__all__ = [
    "OPTICAL_FEII_LINES",
    "UV_FEII_LINES",
    "FeIITemplate",
    "optical_template",
    "uv_template",
    "load_template",
    "air_to_vacuum",
]

# (multiplet, [(air wavelength in A, relative strength), ...])
OPTICAL_FEII_LINES: list[tuple[str, list[tuple[float, float]]]] = [
    ("27", [(4173.45, 0.5), (4233.17, 0.9), (4303.17, 0.6), (4351.76, 0.7), (4385.38, 0.3), (4416.82, 0.5)]),
    ("28", [(4178.86, 0.4), (4258.15, 0.2), (4296.57, 0.3), (4369.40, 0.2)]),
    ("37", [(4472.92, 0.3), (4489.18, 0.6), (4491.40, 0.6), (4515.34, 0.8), (4520.22, 0.8), (4534.17, 0.3),
            (4555.89, 1.0), (4582.84, 0.6), (4629.34, 0.9), (4666.75, 0.3)]),
    ("38", [(4508.28, 0.8), (4522.63, 1.0), (4541.52, 0.4), (4549.47, 1.0), (4576.33, 0.6), (4583.83, 1.2),
            (4620.51, 0.5)]),
    ("43", [(4656.98, 0.2), (4731.44, 0.3)]),
    ("42", [(4923.92, 1.3), (5018.44, 1.5), (5169.03, 1.5)]),
    ("35", [(5100.73, 0.2), (5132.67, 0.2), (5146.12, 0.2)]),
    ("49", [(5197.57, 0.9), (5234.62, 1.0), (5254.92, 0.3), (5275.99, 1.0), (5316.61, 1.5), (5325.55, 0.3)]),
    ("41", [(5284.10, 0.6)]),
    ("48", [(5264.80, 0.4), (5362.87, 0.7), (5414.07, 0.3), (5425.26, 0.3)]),
    ("55", [(5534.85, 0.4)]),
]

UV_FEII_LINES: list[tuple[str, list[tuple[float, float]]]] = [
    ("UV36", [(2249.18, 0.3), (2260.08, 0.3)]),
    ("UV3", [(2332.80, 0.5), (2338.01, 0.5), (2343.50, 1.0), (2348.30, 0.6), (2359.11, 0.4), (2364.83, 0.3)]),
    ("UV2", [(2373.74, 0.8), (2382.04, 1.6), (2388.63, 0.8), (2395.63, 1.2), (2399.24, 0.8), (2404.89, 1.0),
             (2406.66, 0.8), (2410.52, 0.7), (2411.07, 0.7)]),
    ("UV35", [(2484.24, 0.3), (2493.26, 0.3), (2506.80, 0.2)]),
    ("UV64", [(2562.54, 0.4), (2563.48, 0.4), (2577.92, 0.3)]),
    ("UV1", [(2585.88, 1.2), (2598.37, 1.0), (2599.40, 1.8), (2607.09, 1.0), (2611.87, 1.2), (2613.82, 0.8),
             (2617.62, 0.8), (2621.67, 0.5), (2625.67, 0.8), (2628.29, 0.6), (2631.05, 0.5), (2631.32, 0.5)]),
    ("UV63", [(2692.83, 0.4), (2714.41, 0.6), (2727.54, 0.5), (2730.73, 0.4), (2736.97, 0.5), (2743.20, 0.7),
              (2746.48, 0.6)]),
    ("UV62", [(2739.55, 0.8), (2746.98, 0.6), (2749.32, 0.7), (2755.73, 0.9), (2761.81, 0.3)]),
    ("UV32", [(2825.56, 0.2), (2831.56, 0.2)]),
    ("UV78", [(2839.51, 0.3), (2845.57, 0.3), (2848.32, 0.3), (2868.87, 0.3)]),
    ("UV61", [(2880.76, 0.3), (2917.46, 0.3)]),
    ("UV60", [(2926.58, 0.5), (2945.26, 0.3), (2953.77, 0.4), (2970.52, 0.3), (2979.35, 0.3), (2984.83, 0.3)]),
]

#: Integration band (Angstrom) that defines ``amplitude`` for each default template.
NORM_BANDS = {"optical": (4434.0, 4684.0), "uv": (2200.0, 3090.0)}

# Template grid: 60 km/s pixels, finer than SDSS pixels (69 km/s); the narrowest kernel (FWHM
# 1000 km/s) spans 7 pixels per sigma, so the linear deposit and read-out add < 0.2% to its
# width, while the FFT stays short (cost halves from 40 km/s). 21000 km/s of zero padding on
# each side. The FFT
# convolution is circular: with a kernel reaching 4 sigma + shift <= 20000 km/s (FWHM <= 10000,
# |shift| <= 3000 km/s) and lines kept up to 20000 km/s outside a range, nothing wraps into it.
_VELOCITY_STEP = 60.0
_PAD_KMS = 21000.0
# Lines farther than this outside a restricted range are dropped (see FeIITemplate.restricted).
_KEEP_KMS = 20000.0


def _next_fast_len(n: int) -> int:
    """Smallest 2^a 3^b 5^c >= n (fast for XLA's FFT)."""
    best = 1 << (n - 1).bit_length()
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            p = p35
            while p < n:
                p *= 2
            best = min(best, p)
            p35 *= 3
        p5 *= 5
    return best


class FeIITemplate(LogLambdaTemplate):
    """An FeII template on a uniform ln(lambda) grid, broadened by a Gaussian in velocity.

    Build one with :meth:`from_lines`, :meth:`from_arrays` or :func:`load_template`; the
    default ones are :func:`optical_template` and :func:`uv_template`.

    Attributes
    ----------
    name : str
    loglam : ndarray
        Natural log of the grid wavelengths (vacuum Angstrom), uniform step ``dlnlam``.
    density : ndarray
        Unbroadened template, flux per unit ln(lambda), normalised so that its integral over
        ``norm_band`` is 1 (so a fitted ``amplitude`` is the FeII flux in that band).
    norm_band : (float, float)
    """

    def __init__(self, loglam: np.ndarray, density: np.ndarray, *, name: str, norm_band: tuple[float, float]):
        loglam = np.asarray(loglam, dtype=np.float64)
        dln = float(loglam[1] - loglam[0])
        lam = np.exp(loglam)
        band = (lam >= norm_band[0]) & (lam <= norm_band[1])
        total = float(np.sum(np.asarray(density)[band]) * dln)
        if not total > 0:
            raise ModelError(
                f"FeII template {name!r} has no positive flux in its normalisation band "
                f"{tuple(norm_band)} A; pass norm_band=(low, high) inside the template's range."
            )
        self._setup(loglam, np.asarray(density, dtype=np.float64) / total, name=name, norm_band=norm_band)

    def _setup(self, loglam, density, *, name, norm_band):
        self.name = name
        self.loglam = np.asarray(loglam, dtype=np.float64)
        self.dlnlam = float(self.loglam[1] - self.loglam[0])
        self.norm_band = (float(norm_band[0]), float(norm_band[1]))
        self.density = np.asarray(density, dtype=np.float64)
        self.n = self.density.size
        self._spectrum = np.fft.rfft(self.density)
        self._freq = np.fft.rfftfreq(self.n)  # cycles per pixel

    def __repr__(self) -> str:
        lo, hi = np.exp(self.loglam[[0, -1]])
        return f"FeIITemplate({self.name!r}, {lo:.0f}-{hi:.0f} A, {self.n} pixels, norm_band={self.norm_band})"

    # -- constructors --------------------------------------------------------------------
    @classmethod
    def _grid(cls, lo: float, hi: float, dln: float | None = None) -> tuple[np.ndarray, float]:
        dln = _VELOCITY_STEP / C_KMS if dln is None else dln
        pad = math.log1p(_PAD_KMS / C_KMS)
        n = _next_fast_len(int(math.ceil((math.log(hi) - math.log(lo) + 2 * pad) / dln)) + 1)
        start = math.log(lo) - pad
        return start + dln * np.arange(n), dln

    @classmethod
    def from_lines(
        cls,
        wavelength: Sequence[float],
        strength: Sequence[float],
        *,
        name: str = "feii",
        norm_band: tuple[float, float] | None = None,
    ) -> FeIITemplate:
        """Template from a line list: each line is a delta function of the given strength.

        Parameters
        ----------
        wavelength : sequence of float
            Vacuum wavelengths (Angstrom).
        strength : sequence of float
            Relative integrated fluxes (>= 0).
        name : str
        norm_band : (float, float), optional
            Band defining ``amplitude``; default the full range of the lines.
        """
        wl = np.asarray(wavelength, dtype=np.float64)
        st = np.asarray(strength, dtype=np.float64)
        if wl.ndim != 1 or wl.shape != st.shape or wl.size == 0:
            raise ModelError(
                f"FeIITemplate.from_lines: wavelength and strength must be 1-D of the same "
                f"non-zero length, got shapes {wl.shape} and {st.shape}."
            )
        if np.any(~np.isfinite(wl)) or np.any(wl <= 0) or np.any(~np.isfinite(st)) or np.any(st < 0):
            raise ModelError("FeIITemplate.from_lines: wavelengths must be finite and > 0, strengths finite and >= 0.")
        loglam, dln = cls._grid(wl.min(), wl.max())
        # Each delta is shared between the two nearest grid points (linear deposit): it keeps
        # the flux and the centroid exactly and adds <= 25 km/s rms of width (h / sqrt(6)).
        t = (np.log(wl) - loglam[0]) / dln
        i = np.floor(t).astype(int)
        w = t - i
        density = np.zeros_like(loglam)
        np.add.at(density, i, st * (1 - w) / dln)
        np.add.at(density, i + 1, st * w / dln)
        band = norm_band if norm_band is not None else (float(wl.min()) - 1.0, float(wl.max()) + 1.0)
        return cls(loglam, density, name=name, norm_band=band)

    @classmethod
    def from_arrays(
        cls,
        wavelength,
        flux,
        *,
        name: str = "user",
        norm_band: tuple[float, float] | None = None,
    ) -> FeIITemplate:
        """Template from tabulated ``(wavelength, flux per Angstrom)``.

        The table is taken as the template's intrinsic shape (whatever width it already
        has); the fitted FWHM adds a Gaussian broadening to it. Wavelengths must be
        vacuum Angstrom in the rest frame, strictly increasing.
        """
        wl = np.asarray(wavelength, dtype=np.float64)
        fl = np.asarray(flux, dtype=np.float64)
        if wl.ndim != 1 or wl.shape != fl.shape or wl.size < 2:
            raise ModelError(
                f"FeII template: wavelength and flux must be 1-D arrays of the same length >= 2, "
                f"got shapes {wl.shape} and {fl.shape}."
            )
        cls.check_grid(wl, fl, "FeII template")
        loglam, _ = cls._grid(wl[0], wl[-1])
        lam = np.exp(loglam)
        # flux per ln(lambda) = lambda * flux per Angstrom
        density = np.interp(lam, wl, fl, left=0.0, right=0.0) * lam
        band = norm_band if norm_band is not None else (float(wl[0]), float(wl[-1]))
        return cls(loglam, density, name=name, norm_band=band)

    # -- evaluation (pure jnp) ---------------------------------------------------------------
    def restricted(self, low: float, high: float) -> FeIITemplate:
        """The same template on a grid covering only ``[low, high]`` (plus padding).

        Lines farther than 20000 km/s outside the range are dropped (their broadened wings
        cannot reach it for FWHM <= 10000 km/s, |shift| <= 3000 km/s); the normalisation is
        kept. A shorter grid makes every evaluation cheaper, so regions restrict the template
        to their window.
        """
        keep = math.log1p(_KEEP_KMS / C_KMS)
        pad = math.log1p(_PAD_KMS / C_KMS)
        dln, ln0 = self.dlnlam, float(self.loglam[0])
        # the new grid is a window of the old one (same step, integer offset), extended with
        # zeros where it reaches past the old grid
        k0 = int(math.floor((math.log(low) - pad - ln0) / dln))
        n = _next_fast_len(int(math.ceil((math.log(high) + pad - ln0) / dln)) - k0 + 1)
        if n >= self.n:
            return self
        loglam = ln0 + dln * (k0 + np.arange(n))
        src = np.arange(self.n)
        keep_src = (self.loglam >= math.log(low) - keep) & (self.loglam <= math.log(high) + keep)
        tgt = src - k0
        ok = keep_src & (tgt >= 0) & (tgt < n)
        density = np.zeros(n)
        density[tgt[ok]] = self.density[src[ok]]
        new = FeIITemplate.__new__(FeIITemplate)
        new._setup(loglam, density, name=self.name, norm_band=self.norm_band)
        return new

    def evaluate(self, wavelength, amplitude, fwhm_kms, shift_kms):
        """Broadened, shifted template at ``wavelength`` (flux per Angstrom), pure jnp.

        Differentiable in ``amplitude``, ``fwhm_kms`` and ``shift_kms`` with a custom JVP:
        the partial derivatives are three inverse FFTs computed once from the primal values,
        so a forward-mode Jacobian over many parameters costs no extra FFT per parameter.

        Parameters
        ----------
        wavelength : array
            Rest-frame vacuum Angstrom; zero outside the template grid.
        amplitude : float
            Integrated flux in :attr:`norm_band` (of the unbroadened template).
        fwhm_kms : float
            FWHM of the Gaussian broadening kernel (km/s); floored at one grid step.
        shift_kms : float
            Velocity shift (km/s).
        """
        import jax
        import jax.numpy as jnp

        wavelength = jnp.asarray(wavelength)
        dtype = jnp.result_type(wavelength, amplitude, fwhm_kms, shift_kms, float)
        cdtype = jnp.complex64 if dtype == jnp.float32 else jnp.complex128
        n, dln = self.n, self.dlnlam
        spectrum = jnp.asarray(self._spectrum, cdtype)
        freq = jnp.asarray(self._freq, dtype)
        to_sigma = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)) * C_KMS * dln)
        wl = wavelength.astype(dtype)
        i, w, scale = self.pixel_weights(wl)

        sample = self.sample  # (..., n) -> (..., n_pix) flux per Angstrom

        def kernel(fwhm, shift):
            fw = jnp.asarray(fwhm, dtype)
            sigma = jnp.maximum(fw, _VELOCITY_STEP) * to_sigma
            d = jnp.log1p(jnp.asarray(shift, dtype) / C_KMS) / dln
            damp = jnp.exp(-2.0 * (jnp.pi * freq * sigma) ** 2)
            phase = -2.0 * jnp.pi * freq * d
            k = (damp * jnp.cos(phase)).astype(cdtype) + 1j * (damp * jnp.sin(phase)).astype(cdtype)
            return k, sigma, fw, d

        # The sampling arrays are explicit arguments (with zero tangents) rather than closed
        # over, so the custom JVP never captures tracers of an outer vmap.
        @jax.custom_jvp
        def unit(fwhm, shift, i, w, scale):
            k, *_ = kernel(fwhm, shift)
            return sample(jnp.fft.irfft(spectrum * k, n=n).astype(dtype), i, w, scale)

        @unit.defjvp
        def unit_jvp(primals, tangents):
            fwhm, shift, i, w, scale = primals
            t_fwhm, t_shift = tangents[:2]
            k, sigma, fw, _ = kernel(fwhm, shift)
            # dK/dfwhm = -4 pi^2 k^2 sigma dsigma/dfwhm K (zero below the floor);
            # dK/dshift = -2 pi i k dd/dshift K with d = ln(1 + v/c) / dln.
            dsig = jnp.where(fw > _VELOCITY_STEP, to_sigma, 0.0)
            d_fwhm = (-4.0 * jnp.pi**2 * freq**2 * sigma * dsig).astype(cdtype)
            d_shift = (-2j * jnp.pi * freq / ((C_KMS + jnp.asarray(shift, dtype)) * dln)).astype(cdtype)
            stack = jnp.stack([spectrum * k, spectrum * k * d_fwhm, spectrum * k * d_shift])
            value, g_fwhm, g_shift = sample(jnp.fft.irfft(stack, n=n, axis=-1).astype(dtype), i, w, scale)
            return value, g_fwhm * t_fwhm + g_shift * t_shift

        return amplitude * unit(fwhm_kms, shift_kms, i, w, scale)

    def evaluate_numpy(self, wavelength, fwhm_kms: float, shift_kms: float = 0.0) -> np.ndarray:
        """Unit-amplitude broadened template with numpy (for initial values and plots)."""
        lam = np.asarray(wavelength, dtype=np.float64)
        sigma_pix = max(float(fwhm_kms), _VELOCITY_STEP) / (2.0 * math.sqrt(2.0 * math.log(2.0)) * C_KMS * self.dlnlam)
        shift_pix = math.log1p(float(shift_kms) / C_KMS) / self.dlnlam
        kernel = np.exp(-2.0 * (np.pi * self._freq * sigma_pix) ** 2 - 2j * np.pi * self._freq * shift_pix)
        broadened = np.fft.irfft(self._spectrum * kernel, n=self.n)
        with np.errstate(divide="ignore", invalid="ignore"):
            t = (np.log(lam) - self.loglam[0]) / self.dlnlam
        value = np.interp(t, np.arange(self.n), broadened, left=0.0, right=0.0)
        return np.where(np.isfinite(lam) & (lam > 0), value / lam, 0.0)


def _from_table(table, name: str) -> FeIITemplate:
    wl = np.array([w for _, lines in table for w, _ in lines])
    st = np.array([s for _, lines in table for _, s in lines])
    return FeIITemplate.from_lines(air_to_vacuum(wl), st, name=name, norm_band=NORM_BANDS[name])


_DEFAULTS: dict[str, FeIITemplate] = {}


def optical_template() -> FeIITemplate:
    """The default optical FeII template (~4170-5540 A) from :data:`OPTICAL_FEII_LINES`."""
    if "optical" not in _DEFAULTS:
        _DEFAULTS["optical"] = _from_table(OPTICAL_FEII_LINES, "optical")
    return _DEFAULTS["optical"]


def uv_template() -> FeIITemplate:
    """The default UV FeII template (~2250-2990 A) from :data:`UV_FEII_LINES`."""
    if "uv" not in _DEFAULTS:
        _DEFAULTS["uv"] = _from_table(UV_FEII_LINES, "uv")
    return _DEFAULTS["uv"]


def load_template(template, *, norm_band: tuple[float, float] | None = None, name: str | None = None) -> FeIITemplate:
    """Normalise the ways of naming a template into a :class:`FeIITemplate`.

    Parameters
    ----------
    template : {"optical", "uv"}, FeIITemplate, (wavelength, flux) arrays, or path
        A path names a two-column text or CSV file (wavelength in vacuum Angstrom, flux per
        Angstrom; ``#`` comments and one header line are skipped).
    norm_band : (float, float), optional
        Band that defines the amplitude for user templates (default: the full range).
    """
    if isinstance(template, FeIITemplate):
        return template
    if isinstance(template, str) and template in ("optical", "uv"):
        return optical_template() if template == "optical" else uv_template()
    if isinstance(template, (str, os.PathLike)):
        path = os.fspath(template)
        if not os.path.isfile(path):
            raise ModelError(
                f"FeII template {path!r} is not a file and not one of 'optical', 'uv'; pass a path to a "
                "two-column (wavelength, flux) text/CSV file, or (wavelength, flux) arrays."
            )
        data = _read_two_columns(path)
        return FeIITemplate.from_arrays(data[:, 0], data[:, 1], name=name or os.path.basename(path), norm_band=norm_band)
    if isinstance(template, (tuple, list)) and len(template) == 2:
        return FeIITemplate.from_arrays(template[0], template[1], name=name or "user", norm_band=norm_band)
    raise ModelError(
        f"FeII template {template!r} not understood; use 'optical', 'uv', a (wavelength, flux) pair of "
        "arrays, a file path, or an FeIITemplate."
    )


def _read_two_columns(path: str) -> np.ndarray:
    with open(path) as fh:
        text = fh.read()
    delimiter = "," if "," in text.split("\n", 5)[-1] or path.endswith(".csv") else None
    for skip in (0, 1):
        try:
            data = np.loadtxt(path, delimiter=delimiter, comments="#", skiprows=skip, usecols=(0, 1), ndmin=2)
            break
        except ValueError:
            data = None
    if data is None or data.shape[0] < 2:
        raise ModelError(f"FeII template file {path!r}: expected two numeric columns (wavelength, flux).")
    return data
