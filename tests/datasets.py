"""Small xarray datasets of known-answer spectra for the chunk, fit and cluster tests."""

from __future__ import annotations

import numpy as np
import xarray as xr
from problems import gauss_slope

import sheap_dask as sd


#: fit_dataset options of the quick tests: LM, few steps, float64, no progress bar
FAST = dict(method="lm", num_steps=100, progress=False, dtype="float64")

def gauss_model() -> sd.Model:
    """A Gaussian on a slope as an ``sd.Model`` (5 free parameters)."""
    prob = gauss_slope()
    return sd.Model(prob.func, prob.params, name="gauss_slope")


def gauss_dataset(n: int = 24, *, seed: int = 0, chunk: int | None = 8, bad: bool = True, dtype=np.float64) -> xr.Dataset:
    """``n`` noisy Gaussian-on-slope spectra with ids and, when ``bad``, three bad spectra:
    index 1 all-NaN flux, index 2 all-zero ivar, index 3 with one infinite flux pixel."""
    prob = gauss_slope()
    sample = prob.sample(n, seed=seed, jitter=1.0)
    flux = sample.flux.astype(dtype)
    ivar = (1.0 / sample.errors**2).astype(dtype)
    if bad:
        flux[1] = np.nan
        ivar[2] = 0.0
        flux[3, 10] = np.inf
    ds = xr.Dataset(
        {"flux": (("spectrum", "wavelength"), flux), "ivar": (("spectrum", "wavelength"), ivar), "true_params": (("spectrum", "param"), sample.truth)},
        coords={
            "wavelength": sample.wavelength,
            "spectrum": np.arange(n),
            "objid": ("spectrum", np.array([f"obj{i:04d}" for i in range(n)])),
            "param": prob.params.names,
        },
    )
    return ds.chunk({"spectrum": chunk}) if chunk else ds
