"""Emission-line profiles parameterised by integrated flux, velocity shift and FWHM.

Every profile has the signature ``f(wavelength, flux, shift_kms, fwhm_kms, [extra,]
rest_wavelength)`` and returns a flux density (flux per Angstrom) on ``wavelength``:

* the line centre is ``rest_wavelength * (1 + shift_kms / c)``;
* the FWHM in Angstrom is ``centre * fwhm_kms / c`` (velocity width measured at the centre);
* the profile integrates to ``flux`` over all wavelengths (exactly, analytically).

All functions are pure ``jax.numpy``, broadcast over their arguments (so ``n_lines`` profiles
can be evaluated at once with parameters of shape ``(n_lines, 1)`` against wavelength
``(n_pix,)``) and are safe for widths at or near zero: the width is floored at
:data:`MIN_FWHM_KMS` so neither the value nor the derivatives become infinite.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from jax.scipy.special import erf

__all__ = [
    "C_KMS",
    "MIN_FWHM_KMS",
    "gaussian",
    "lorentzian",
    "pseudo_voigt",
    "skewed_gaussian",
    "gaussian_sum",
    "PROFILES",
]

#: Speed of light in km/s (exact, SI definition).
C_KMS = 299792.458
#: Smallest FWHM (km/s) a profile uses; protects divisions when a bound is 0.
MIN_FWHM_KMS = 1e-3

_FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))
_SQRT_2PI = math.sqrt(2.0 * math.pi)


def _centre_width(flux, shift_kms, fwhm_kms, rest_wavelength, wavelength):
    wavelength = jnp.asarray(wavelength)
    dtype = jnp.result_type(wavelength, flux, shift_kms, fwhm_kms, float)
    centre = rest_wavelength * (1.0 + jnp.asarray(shift_kms, dtype) / C_KMS)
    fwhm_aa = centre * jnp.maximum(jnp.asarray(fwhm_kms, dtype), MIN_FWHM_KMS) / C_KMS
    return jnp.asarray(wavelength, dtype), jnp.asarray(flux, dtype), centre, fwhm_aa


def gaussian(wavelength, flux, shift_kms, fwhm_kms, rest_wavelength):
    """Gaussian line: ``flux / (sqrt(2 pi) s) * exp(-(x - x0)^2 / (2 s^2))``.

    ``s = FWHM / (2 sqrt(2 ln 2))`` with FWHM in Angstrom at the centre ``x0``.

    Parameters
    ----------
    wavelength : array
        Wavelengths in Angstrom.
    flux : float or array
        Integrated line flux (flux density unit times Angstrom).
    shift_kms : float or array
        Velocity of the centre relative to ``rest_wavelength`` (km/s, positive = redshift).
    fwhm_kms : float or array
        Full width at half maximum in km/s.
    rest_wavelength : float or array
        Rest wavelength of the line (Angstrom).

    Returns
    -------
    jax.Array
        Flux density, broadcast shape of the inputs.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.linspace(4700.0, 5000.0, 30001)
    >>> y = gaussian(x, 10.0, 0.0, 2000.0, 4862.68)
    >>> round(float(np.trapezoid(np.asarray(y), x)), 6)
    10.0
    """
    x, flux, x0, fwhm = _centre_width(flux, shift_kms, fwhm_kms, rest_wavelength, wavelength)
    sigma = fwhm * _FWHM_TO_SIGMA
    z = (x - x0) / sigma
    return flux / (_SQRT_2PI * sigma) * jnp.exp(-0.5 * z * z)


def lorentzian(wavelength, flux, shift_kms, fwhm_kms, rest_wavelength):
    """Lorentzian (Cauchy) line: ``flux / pi * g / ((x - x0)^2 + g^2)`` with ``g = FWHM / 2``.

    Parameters are those of :func:`gaussian`. The wings fall as ``x^-2``, so a finite window
    contains slightly less than ``flux``.
    """
    x, flux, x0, fwhm = _centre_width(flux, shift_kms, fwhm_kms, rest_wavelength, wavelength)
    gamma = 0.5 * fwhm
    d = x - x0
    return flux / jnp.pi * gamma / (d * d + gamma * gamma)


def pseudo_voigt(wavelength, flux, shift_kms, fwhm_kms, eta, rest_wavelength):
    """Pseudo-Voigt line: ``eta * Lorentzian + (1 - eta) * Gaussian`` with a common FWHM.

    Parameters
    ----------
    eta : float or array
        Lorentzian fraction, clipped to [0, 1]; 0 gives :func:`gaussian`, 1
        :func:`lorentzian`. Both parts have the same FWHM and flux, so the sum has exactly
        that FWHM and integrates to ``flux``.

    Other parameters are those of :func:`gaussian`.
    """
    eta = jnp.clip(eta, 0.0, 1.0)
    return eta * lorentzian(wavelength, flux, shift_kms, fwhm_kms, rest_wavelength) + (1.0 - eta) * gaussian(
        wavelength, flux, shift_kms, fwhm_kms, rest_wavelength
    )


def skewed_gaussian(wavelength, flux, shift_kms, fwhm_kms, skew, rest_wavelength):
    """Skew-normal line (Azzalini 1985): ``2 / s * phi(z) * Phi(skew * z)`` times ``flux``.

    ``z = (x - x0) / s`` with ``x0`` and ``s`` the centre and Gaussian sigma defined from
    ``shift_kms`` and ``fwhm_kms`` as in :func:`gaussian`. The profile integrates to ``flux``
    exactly for every ``skew``. For ``skew = 0`` it is :func:`gaussian`; otherwise
    ``shift_kms``/``fwhm_kms`` are the location and width of the kernel, not the centroid
    and FWHM of the skewed profile (measure those numerically on the evaluated profile).

    Parameters
    ----------
    skew : float or array
        Shape parameter alpha; positive values put the longer wing to the red.

    Other parameters are those of :func:`gaussian`.
    """
    x, flux, x0, fwhm = _centre_width(flux, shift_kms, fwhm_kms, rest_wavelength, wavelength)
    sigma = fwhm * _FWHM_TO_SIGMA
    z = (x - x0) / sigma
    cdf = 0.5 * (1.0 + erf(skew * z / math.sqrt(2.0)))
    return 2.0 * flux / (_SQRT_2PI * sigma) * jnp.exp(-0.5 * z * z) * cdf


def gaussian_sum(wavelength, flux, shift_kms, fwhm_kms, rest_wavelength):
    """Sum of ``n_lines`` Gaussians (parameters of shape (n_lines,)) on ``wavelength`` (n_pix,).

    Same values as ``gaussian(wavelength[None], flux[:, None], ...).sum(0)``, with a
    hand-written JVP: the partial derivatives of all lines are formed once from the primal
    values and contracted with the tangents (a matrix product), so a forward-mode Jacobian
    over many parameters costs little more than one evaluation. Model functions built by
    :func:`sheap_dask.models.compose` use it for their Gaussian lines.
    """
    dtype = jnp.result_type(wavelength, flux, shift_kms, fwhm_kms, float)
    args = [jnp.asarray(a, dtype) for a in (flux, shift_kms, fwhm_kms, rest_wavelength)]
    return _gaussian_sum(jnp.asarray(wavelength, dtype), *args)


def _gaussian_parts(x, flux, shift, fwhm, rest):
    centre = rest * (1.0 + shift / C_KMS)
    width = jnp.maximum(fwhm, MIN_FWHM_KMS)
    sigma = centre * width / C_KMS * _FWHM_TO_SIGMA
    z = (x[None, :] - centre[:, None]) / sigma[:, None]
    g = jnp.exp(-0.5 * z * z) / (_SQRT_2PI * sigma[:, None])  # unit-flux profiles (n_lines, n_pix)
    return centre, width, sigma, z, g


def _make_gaussian_sum():
    import jax

    @jax.custom_jvp
    def fn(x, flux, shift, fwhm, rest):
        *_, g = _gaussian_parts(x, flux, shift, fwhm, rest)
        return flux @ g

    @fn.defjvp
    def fn_jvp(primals, tangents):
        x, flux, shift, fwhm, rest = primals
        t_x, t_flux, t_shift, t_fwhm, _ = tangents
        centre, width, sigma, z, g = _gaussian_parts(x, flux, shift, fwhm, rest)
        f = flux[:, None] * g
        # d ln f / d centre = z / sigma + (z^2 - 1) / centre (sigma grows with the centre);
        # d ln f / d fwhm = (z^2 - 1) / fwhm above the floor; d f / d x = -f z / sigma
        zz1 = z * z - 1.0
        d_shift = f * (rest / C_KMS)[:, None] * (z / sigma[:, None] + zz1 / centre[:, None])
        d_fwhm = f * zz1 * jnp.where(fwhm > MIN_FWHM_KMS, 1.0 / width, 0.0)[:, None]
        d_x = -jnp.sum(f * z / sigma[:, None], axis=0)
        tangent = t_flux @ g + t_shift @ d_shift + t_fwhm @ d_fwhm + d_x * t_x
        return jnp.sum(f, axis=0), tangent

    return fn


_gaussian_sum_cache: list = []


def _gaussian_sum(x, flux, shift, fwhm, rest):
    if not _gaussian_sum_cache:
        _gaussian_sum_cache.append(_make_gaussian_sum())
    return _gaussian_sum_cache[0](x, flux, shift, fwhm, rest)


#: profile kind -> (function, names of the extra shape parameters after fwhm)
PROFILES = {
    "gaussian": (gaussian, ()),
    "lorentzian": (lorentzian, ()),
    "pseudo_voigt": (pseudo_voigt, ("eta",)),
    "skewed_gaussian": (skewed_gaussian, ("skew",)),
}


class LogLambdaTemplate:
    """A template sampled on a uniform ln-lambda grid (``loglam``) as flux per ln-lambda
    (``density``), the form a velocity broadening is a convolution in; the FeII and host
    templates share it."""

    loglam: np.ndarray
    density: np.ndarray

    @property
    def wavelength(self) -> np.ndarray:
        """Grid wavelengths (Angstrom)."""
        return np.exp(self.loglam)

    @property
    def flux(self) -> np.ndarray:
        """The template(s) as flux per Angstrom on :attr:`wavelength` (..., n)."""
        return self.density / self.wavelength

    @staticmethod
    def check_grid(wavelength: np.ndarray, flux: np.ndarray, what: str) -> None:
        """Refuse non-finite values and a wavelength grid that is not positive and strictly
        increasing (rest-frame Angstrom), naming the template (``what``)."""
        from ..errors import ModelError

        if not (np.all(np.isfinite(wavelength)) and np.all(np.isfinite(flux))):
            raise ModelError(f"{what}: wavelength and flux must be finite (remove or interpolate NaN rows).")
        if np.any(wavelength <= 0) or np.any(np.diff(wavelength) <= 0):
            raise ModelError(f"{what}: wavelength must be positive and strictly increasing (rest-frame Angstrom).")

    def pixel_weights(self, wl):
        """``(i, w, scale)`` for linear interpolation of the grid at wavelengths ``wl`` (a jnp
        array): left pixel, weight of the right one, and 1/lambda (density per ln-lambda to
        flux per Angstrom), 0 outside the grid."""
        t = (jnp.log(jnp.maximum(wl, 1e-30)) - float(self.loglam[0])) / self.dlnlam
        n = self.n
        inside = (t >= 0) & (t <= n - 1)
        i = jnp.clip(jnp.floor(t), 0, n - 2).astype(jnp.int32)
        w = jnp.clip(t - i, 0.0, 1.0)
        return i, w, jnp.where(inside, 1.0 / jnp.where(inside, wl, 1.0), 0.0)

    @staticmethod
    def sample(arr, i, w, scale):
        """Rows of ``arr`` (..., n) on the grid interpolated at pixel weights ``(i, w, scale)``
        of :meth:`pixel_weights` (..., n_pix), as flux per Angstrom. ``i`` is already clipped
        into the grid, so the gathers skip JAX's negative-index handling (~1.5x faster)."""
        left = jnp.take(arr, i, axis=-1, mode="clip")
        right = jnp.take(arr, i + 1, axis=-1, mode="clip")
        return (left * (1 - w) + right * w) * scale
