"""A constructed fit result for the ``ds.sheap`` tests (no fit needed: params = truth)."""

from __future__ import annotations

import json

import numpy as np
import xarray as xr

import sheap_dask as sd
from sheap_dask.models.profiles import gaussian
from sheap_dask.status import status_attrs

HB, OIII = 4862.68, 5008.24
N = 6
Z = np.array([0.05, 0.10, 0.15, 0.20, 0.25, 0.30])
NOISE = 0.05


def small_model() -> sd.Model:
    """Power law + two broad H-beta Gaussians (shared shift) + narrow [OIII], window 4700-5200 A."""
    p = sd.Parameters()
    p.add("powerlaw_norm", 10.0, min=0.0).add("powerlaw_index", -1.5, min=-5.0, max=5.0)
    p.add("hb1_flux", 500.0, min=0.0).add("hb1_shift", 0.0, min=-3000.0, max=3000.0).add("hb1_fwhm", 3000.0, min=500.0, max=20000.0)
    p.add("hb2_flux", 300.0, min=0.0).add("hb2_shift", 0.0, tie="hb2_shift = hb1_shift + 0").add("hb2_fwhm", 8000.0, min=500.0, max=20000.0)
    p.add("oiii_flux", 100.0, min=0.0).add("oiii_shift", 0.0, min=-1000.0, max=1000.0).add("oiii_fwhm", 400.0, min=50.0, max=1500.0)
    comps = {
        "powerlaw": lambda x, q: q[0] * (x / 5100.0) ** q[1],
        "hb1": lambda x, q: gaussian(x, q[2], q[3], q[4], HB),
        "hb2": lambda x, q: gaussian(x, q[5], q[6], q[7], HB),
        "oiii": lambda x, q: gaussian(x, q[8], q[9], q[10], OIII),
    }

    def func(x, q):
        return comps["powerlaw"](x, q) + comps["hb1"](x, q) + comps["hb2"](x, q) + comps["oiii"](x, q)

    lines = {
        "hbeta_broad": {"rest_wavelength": HB, "components": ["hb1", "hb2"], "kind": "broad"},
        "oiii5007": {"rest_wavelength": OIII, "components": ["oiii"], "kind": "narrow"},
    }
    return sd.Model(func, p, name="small", window=(4700.0, 5200.0), components=comps,
                    metadata={"lines": lines, "continuum": ["powerlaw"]})  # fmt: skip


MODEL = small_model()
NAMES = MODEL.param_names


def truth() -> np.ndarray:
    rng = np.random.default_rng(1)
    p = np.tile(MODEL.params.values, (N, 1))
    p[:, NAMES.index("hb1_fwhm")] = rng.uniform(2000, 5000, N)
    p[:, NAMES.index("hb1_shift")] = rng.uniform(-500, 500, N)
    p[:, NAMES.index("hb2_shift")] = p[:, NAMES.index("hb1_shift")]
    p[:, NAMES.index("oiii_flux")] = rng.uniform(50, 150, N)
    p[:, NAMES.index("powerlaw_norm")] = rng.uniform(5, 20, N)
    return p


PARAMS = truth()
WL_OBS = np.linspace(4800.0, 6900.0, 1500)
MASKED = [10, 500, 501]


def make_spectra() -> xr.Dataset:
    return spectra_for(PARAMS)


def spectra_for(params: np.ndarray) -> xr.Dataset:
    """Noisy observed-frame spectra of MODEL with these parameters (one row per spectrum)."""
    rest = WL_OBS[None, :] / (1 + Z[:, None])
    clean = MODEL.evaluate(rest, params) / (1 + Z[:, None])
    noise = np.random.default_rng(2).normal(0, NOISE, clean.shape)
    ivar = np.full(clean.shape, NOISE**-2)
    ivar[:, MASKED] = 0.0
    return xr.Dataset(
        {"flux": (("spectrum", "wavelength"), clean + noise, {"units": "1e-17 erg/s/cm2/Angstrom"}),
         "ivar": (("spectrum", "wavelength"), ivar)},
        coords={"wavelength": WL_OBS, "spectrum": np.arange(100, 100 + N), "redshift": ("spectrum", Z)},
    )  # fmt: skip


def make_fits(model=MODEL, params=PARAMS) -> xr.Dataset:
    n, m = params.shape
    err = np.abs(params) * 0.02
    err[:, NAMES.index("hb2_shift")] = np.nan  # tied: not free, its error never used
    status = np.array([0, 0, 1, 2, 5, 3][:n], dtype=np.int8)
    ds = xr.Dataset(
        {
            "params": (("spectrum", "param"), params),
            "params_err": (("spectrum", "param"), err),
            "loss": ("spectrum", np.ones(n)),
            "chi2": ("spectrum", np.full(n, 1400.0)),
            "dof": ("spectrum", np.full(n, 1400)),
            "redchi2": ("spectrum", np.linspace(0.9, 1.4, n)),
            "status": ("spectrum", status, status_attrs()),
            "method": ("spectrum", np.array(["adam"] * n)),
            "n_iter": ("spectrum", np.full(n, 200)),
        },
        coords={
            "spectrum": np.arange(100, 100 + n),
            "param": list(model.param_names),
            "param_min": ("param", model.params.lower),
            "param_max": ("param", model.params.upper),
            "redshift": ("spectrum", Z[:n]),
        },
        attrs={
            "sheap_model": json.dumps(model.to_dict(), default=str),
            "sheap_model_fingerprint": model.fingerprint(),
            "sheap_frame": "rest",
        },
    )
    return ds



def linked_fits(spectra: xr.Dataset) -> xr.Dataset:
    """The constructed result with its model and input spectra linked."""
    ds = make_fits()
    ds.sheap.use(model=MODEL, spectra=spectra)
    return ds


def no_compute(*args, **kwargs):
    raise AssertionError("a dask graph was computed before it was asked for")
