"""Small fit problems with a known answer, shared by the tests of the numerical core.

Each :class:`Problem` carries a pure-jnp model ``func(wavelength, phys_params) -> flux``, the
:class:`~sheap_dask.parameters.Parameters` to fit (initial values offset from the truth,
bounds, ties, fixed values), the true physical parameters and a seeded generator of noisy
spectra. Problems are tiny (a few parameters, ~100 pixels) so tests compile and run fast.

>>> from problems import PROBLEMS
>>> prob = PROBLEMS["gauss_slope"]
>>> d = prob.sample(n_spectra=3, seed=1)
>>> d.flux.shape, d.truth.shape
((3, 120), (3, 5))
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np

from sheap_dask.parameters import Parameters

__all__ = ["Problem", "Sample", "PROBLEMS", "line", "gauss_slope", "two_gauss", "tied_doublet"]


@dataclass(frozen=True)
class Sample:
    """Noisy spectra drawn from a problem: wavelength (n_pix,), flux/errors (n_spectra, n_pix)
    (or (n_pix,) when ``n_spectra`` is None), the true parameters (n_spectra, n_params) (or
    (n_params,))."""

    wavelength: np.ndarray
    flux: np.ndarray
    errors: np.ndarray
    truth: np.ndarray


@dataclass(frozen=True)
class Problem:
    """A model, its Parameters, the true parameters and a noisy-data generator."""

    name: str
    func: Callable
    params: Parameters
    true: np.ndarray
    wavelength: np.ndarray
    noise: float  # 1-sigma error per pixel, constant (the generator varies it +-30%)
    jitter_scale: np.ndarray  # per-parameter scale of the per-spectrum truth jitter

    def sample(self, n_spectra: int | None = None, seed: int = 0, *, jitter: float = 0.0, noise: float | None = None, dtype=np.float64) -> Sample:
        """Draw noisy spectra.

        Parameters
        ----------
        n_spectra : int, optional
            Number of spectra; ``None`` gives one spectrum with 1-D flux/errors.
        seed : int
            Seed of the numpy generator: same seed, same data.
        jitter : float
            Per-spectrum truth = ``true + jitter * jitter_scale * N(0, 1)`` (ties and fixed
            values re-applied, kept inside the bounds); 0 gives the same truth for all.
        noise : float, optional
            Override of the problem's noise level.
        dtype : numpy dtype
            Dtype of the returned arrays.
        """
        rng = np.random.default_rng(seed)
        n = 1 if n_spectra is None else n_spectra
        truth = np.tile(self.true, (n, 1))
        if jitter:
            truth = truth + jitter * self.jitter_scale * rng.standard_normal(truth.shape)
            truth = np.clip(truth, self.params.lower + 1e-3 * np.abs(self.true), self.params.upper - 1e-3 * np.abs(self.true))
            raw = self.params.phys_to_raw(jnp.asarray(truth), self.params.lower, self.params.upper)
            truth = np.asarray(self.params.raw_to_phys(raw, values=np.tile(self.true, (n, 1))))
        sigma = (self.noise if noise is None else noise) * rng.uniform(0.7, 1.3, size=(n, self.wavelength.size))
        model = np.stack([np.asarray(self.func(jnp.asarray(self.wavelength), jnp.asarray(t))) for t in truth])
        flux = model + sigma * rng.standard_normal(model.shape)
        wl = self.wavelength.astype(dtype)
        flux, sigma = flux.astype(dtype), sigma.astype(dtype)
        if n_spectra is None:
            return Sample(wl, flux[0], sigma[0], truth[0].astype(dtype))
        return Sample(wl, flux, sigma, truth.astype(dtype))

    def model(self, wavelength, phys) -> np.ndarray:
        return np.asarray(self.func(jnp.asarray(wavelength), jnp.asarray(phys)))


def _gauss(x, amp, center, sigma):
    return amp * jnp.exp(-0.5 * ((x - center) / sigma) ** 2)


# -- a line --------------------------------------------------------------------------------
def line_func(wavelength, p):
    """Straight line ``p0 + p1 * (wavelength - 5000) / 100`` (centred to decorrelate)."""
    return p[0] + p[1] * (wavelength - 5000.0) / 100.0


def line() -> Problem:
    params = Parameters().add("intercept", 0.5, min=-10.0, max=10.0).add("slope", 0.0)
    return Problem(
        "line", line_func, params, np.array([2.0, -0.7]), np.linspace(4900.0, 5100.0, 60), 0.05, np.array([0.3, 0.2])
    )


# -- a Gaussian on a slope -----------------------------------------------------------------
def gauss_slope_func(wavelength, p):
    """Gaussian (amp, center, sigma) on a linear continuum (c0, c1 per 100 A from 5000 A)."""
    return _gauss(wavelength, p[0], p[1], p[2]) + p[3] + p[4] * (wavelength - 5000.0) / 100.0


def gauss_slope() -> Problem:
    params = (
        Parameters()
        .add("amp", 3.0, min=0.0)
        .add("center", 4995.0, min=4980.0, max=5020.0)
        .add("sigma", 6.0, min=1.0, max=30.0)
        .add("c0", 0.5)
        .add("c1", 0.0, min=-5.0, max=5.0)
    )
    return Problem(
        "gauss_slope",
        gauss_slope_func,
        params,
        np.array([5.0, 5002.0, 8.0, 1.0, 0.3]),
        np.linspace(4940.0, 5060.0, 120),
        0.1,
        np.array([0.5, 1.0, 0.5, 0.1, 0.05]),
    )


# -- a blend of two Gaussians --------------------------------------------------------------
def two_gauss_func(wavelength, p):
    """Two overlapping Gaussians (broad + narrow) on a constant ``p[6]``."""
    return _gauss(wavelength, p[0], p[1], p[2]) + _gauss(wavelength, p[3], p[4], p[5]) + p[6]


def two_gauss() -> Problem:
    params = (
        Parameters()
        .add("broad_amp", 1.5, min=0.0, max=50.0)
        .add("broad_center", 4995.0, min=4970.0, max=5030.0)
        .add("broad_sigma", 15.0, min=8.0, max=60.0)
        .add("narrow_amp", 2.0, min=0.0, max=50.0)
        .add("narrow_center", 5001.0, min=4990.0, max=5010.0)
        .add("narrow_sigma", 3.0, min=0.5, max=7.0)
        .add("cont", 0.8, min=-5.0, max=5.0)
    )
    return Problem(
        "two_gauss",
        two_gauss_func,
        params,
        np.array([2.0, 4998.0, 20.0, 4.0, 5003.0, 2.5, 1.0]),
        np.linspace(4900.0, 5100.0, 160),
        0.08,
        np.array([0.2, 1.0, 1.0, 0.3, 0.3, 0.2, 0.05]),
    )


# -- a tied doublet ------------------------------------------------------------------------
OIII_RATIO = 2.98
OIII_SEPARATION = 5008.24 - 4960.30


def tied_doublet_func(wavelength, p):
    """[OIII]-like doublet: (amp5007, center5007, sigma, amp4959, center4959, sigma4959, cont)."""
    return _gauss(wavelength, p[0], p[1], p[2]) + _gauss(wavelength, p[3], p[4], p[5]) + p[6]


def tied_doublet() -> Problem:
    params = (
        Parameters()
        .add("amp5007", 3.0, min=0.0)
        .add("center5007", 5006.0, min=4995.0, max=5020.0)
        .add("sigma5007", 3.0, min=0.5, max=15.0)
        .add("amp4959", 1.0, tie=f"amp4959 = amp5007 / {OIII_RATIO}")
        .add("center4959", 4958.0, tie=("center5007", "-", OIII_SEPARATION))
        .add("sigma4959", 3.0, tie="sigma4959 = sigma5007")
        .add("cont", 0.5, fixed=True)
    )
    true = np.array([6.0, 5008.0, 4.0, 6.0 / OIII_RATIO, 5008.0 - OIII_SEPARATION, 4.0, 0.5])
    return Problem(
        "tied_doublet", tied_doublet_func, params, true, np.linspace(4920.0, 5050.0, 130), 0.1, np.array([0.5, 0.5, 0.3, 0, 0, 0, 0])
    )


PROBLEMS: dict[str, Problem] = {p.name: p for p in (line(), gauss_slope(), two_gauss(), tied_doublet())}
