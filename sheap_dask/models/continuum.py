"""Continuum shapes: power law, polynomial and the Balmer pseudo-continuum.

All functions are pure ``jax.numpy`` and broadcast; wavelengths in Angstrom (rest frame).
"""

from __future__ import annotations

import jax.numpy as jnp

__all__ = ["powerlaw", "polynomial", "balmer_continuum", "BALMER_EDGE"]

#: Balmer edge (vacuum, Angstrom): the n=2 ionisation limit of hydrogen.
BALMER_EDGE = 3646.0

# hc/k in Angstrom * Kelvin (CODATA 2018: h c / k = 1.438776877e-2 m K).
_HC_OVER_K = 1.438776877e8


def powerlaw(wavelength, norm, index, ref_wavelength):
    """Power law ``norm * (wavelength / ref_wavelength) ** index``.

    Parameters
    ----------
    wavelength : array
        Angstrom.
    norm : float
        Flux density at ``ref_wavelength`` (so it is the monochromatic continuum used for
        luminosities, e.g. at 5100 A).
    index : float
        Slope ``alpha_lambda`` (``F_lambda ~ lambda^alpha``; quasars typically -1.5).
    ref_wavelength : float
        Normalisation wavelength (Angstrom).
    """
    x = jnp.asarray(wavelength) / ref_wavelength
    # x > 0 for physical wavelengths; the floor keeps log finite for padded zero pixels.
    return norm * jnp.exp(index * jnp.log(jnp.maximum(x, 1e-30)))


def polynomial(wavelength, coeffs, ref_wavelength):
    """Polynomial ``sum_i c_i t^i`` in ``t = wavelength / ref_wavelength - 1``.

    The scaled variable keeps the coefficients of order one and the normal equations well
    conditioned. ``coeffs`` is a sequence or an array whose first axis is the order.
    """
    t = jnp.asarray(wavelength) / ref_wavelength - 1.0
    out = jnp.zeros_like(t) + coeffs[-1]
    for c in list(coeffs)[-2::-1]:  # Horner; the degree is static
        out = out * t + c
    return out


def balmer_continuum(wavelength, amplitude, temperature=15000.0, tau_edge=1.0, edge=BALMER_EDGE):
    """Balmer pseudo-continuum of a partially optically thick, isothermal cloud.

    Grandi (1982, ApJ 255, 25) form, as used by Dietrich et al. (2002, ApJ 564, 581):

    ``F(lambda) = F_BE * B_lambda(T_e) * (1 - exp(-tau_lambda))`` for ``lambda <= 3646 A``,
    ``tau_lambda = tau_BE * (lambda / lambda_BE) ** 3`` and zero redward of the edge.

    Here the shape is normalised so that ``amplitude`` is the flux density just blueward of
    the edge (``F(lambda_BE) = amplitude``).

    Parameters
    ----------
    wavelength : array
        Angstrom.
    amplitude : float
        Flux density at the Balmer edge.
    temperature : float
        Electron temperature T_e in K (Dietrich et al. 2002 use 15000 K).
    tau_edge : float
        Optical depth at the edge, tau_BE (of order 1).
    edge : float
        Edge wavelength, default :data:`BALMER_EDGE`.
    """
    x = jnp.asarray(wavelength)
    xs = jnp.clip(x, 0.1 * edge, edge)  # evaluate the formula only where it applies

    def shape(lam):
        # Planck B_lambda up to constants; expm1 is accurate in the Rayleigh-Jeans limit.
        planck = lam ** -5 / jnp.expm1(_HC_OVER_K / (lam * temperature))
        return planck * -jnp.expm1(-tau_edge * (lam / edge) ** 3)

    return jnp.where(x <= edge, amplitude * shape(xs) / shape(jnp.asarray(edge, xs.dtype)), 0.0)
