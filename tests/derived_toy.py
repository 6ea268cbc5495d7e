"""A toy model for the derived-physics tests: power law, a two-Gaussian broad H-beta (shift
of the second tied to the first), narrow [OIII], broad H-alpha, MgII, CIV and a Lorentzian line."""

from __future__ import annotations

import math

import numpy as np

import sheap_dask as sd
from sheap_dask.models.profiles import gaussian, lorentzian

C = 299792.458
HB, OIII, HA, MG, CIV, LOR = 4862.68, 5008.24, 6564.61, 2798.75, 1549.05, 6300.0
FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))


def toy_model() -> sd.Model:
    """Power law + two broad H-beta Gaussians (shift of the second tied to the first) +
    narrow [OIII] + broad H-alpha, MgII, CIV Gaussians + a Lorentzian line, following the
    built-in models' metadata contract."""
    p = sd.Parameters()
    p.add("powerlaw_norm", 10.0, min=0.0).add("powerlaw_index", -1.5, min=-5.0, max=5.0)
    p.add("hb1_flux", 500.0, min=0.0).add("hb1_shift", 0.0, min=-3000.0, max=3000.0).add("hb1_fwhm", 3000.0, min=500.0, max=20000.0)
    p.add("hb2_flux", 300.0, min=0.0).add("hb2_shift", 0.0, tie="hb2_shift = hb1_shift + 0").add("hb2_fwhm", 8000.0, min=500.0, max=20000.0)
    p.add("oiii_flux", 100.0, min=0.0).add("oiii_shift", 0.0, min=-1000.0, max=1000.0).add("oiii_fwhm", 400.0, min=50.0, max=1500.0)
    for name in ("ha", "mg", "civ", "lor"):
        p.add(f"{name}_flux", 200.0, min=0.0).add(f"{name}_shift", 0.0, min=-3000.0, max=3000.0)
        p.add(f"{name}_fwhm", 4000.0, min=500.0, max=20000.0)
    ix = {n: i for i, n in enumerate(p.names)}

    def g(prefix, lam0, prof=gaussian):
        return lambda x, q: prof(x, q[ix[prefix + "_flux"]], q[ix[prefix + "_shift"]], q[ix[prefix + "_fwhm"]], lam0)

    comps = {
        "powerlaw": lambda x, q: q[0] * (x / 5100.0) ** q[1],
        "hb1": g("hb1", HB), "hb2": g("hb2", HB), "oiii": g("oiii", OIII), "ha": g("ha", HA),
        "mg": g("mg", MG), "civ": g("civ", CIV), "lor": g("lor", LOR, lorentzian),
    }  # fmt: skip

    def func(x, q):
        return sum(f(x, q) for f in comps.values())

    lines = {
        "hbeta_broad": {"rest_wavelength": HB, "components": ["hb1", "hb2"], "kind": "broad"},
        "oiii5007": {"rest_wavelength": OIII, "components": ["oiii"], "kind": "narrow"},
        "halpha_broad": {"rest_wavelength": HA, "components": ["ha"], "kind": "broad"},
        "mgii_broad": {"rest_wavelength": MG, "components": ["mg"], "kind": "broad"},
        "civ_broad": {"rest_wavelength": CIV, "components": ["civ"], "kind": "broad"},
        "lor_line": {"rest_wavelength": LOR, "components": ["lor"], "kind": "broad"},
    }
    return sd.Model(func, p, name="toy", components=comps, metadata={"lines": lines, "continuum": ["powerlaw"]})


MODEL = toy_model()
NAMES = MODEL.param_names


def make_params(n: int = 3, **overrides) -> np.ndarray:
    base = np.tile(MODEL.params.values, (n, 1))
    for name, values in overrides.items():
        base[:, NAMES.index(name)] = values
    return base


def err_on(n: int, **errs) -> np.ndarray:
    e = np.zeros((n, len(NAMES)))
    for name, values in errs.items():
        e[:, NAMES.index(name)] = values
    return e



def dl_cm(z, H0=70.0, Om0=0.3):
    from astropy.cosmology import FlatLambdaCDM

    return FlatLambdaCDM(H0=H0, Om0=Om0).luminosity_distance(z).to("cm").value
