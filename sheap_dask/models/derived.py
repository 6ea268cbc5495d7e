"""Derived physics from fitted parameters, each with a propagated error.

Line widths, fluxes, equivalent widths and velocity shifts measured numerically on a line's
*summed* model profile (so a broad line built from several Gaussians is measured as one
line), continuum and line luminosities in a flat ΛCDM cosmology, and single-epoch virial
black-hole masses. Every function is vectorised over spectra (no Python loop over spectra)
and returns ``(value, error)`` as float64 numpy arrays of shape ``(n_spectra,)``.

Conventions
-----------
* **Frame and units.** Models work in the rest frame: the fit sees wavelength
  ``λ_rest = λ_obs / (1 + z)`` and flux density ``f_rest = (1 + z) f_obs``. A line's
  integrated model flux ``∫ f_rest dλ_rest = ∫ f_obs dλ_obs`` is therefore the *observed*
  integrated flux, in the input flux-density unit times Angstrom. Equivalent widths are rest
  frame (Angstrom).
* **Profile grid.** A line is evaluated (only its own components) on ``n_grid`` points
  uniform in velocity, ``λ = λ0 (1 + v / c)`` for ``|v| <= velocity_range`` around its rest
  wavelength ``λ0`` (default 2001 points over ±50 000 km/s for broad lines and ±5 000 km/s
  for narrow ones: 50 and 5 km/s steps). Flux, second moment and EW are integrals over that
  window (a Lorentzian's wings beyond it are not counted; its second moment is finite only
  because of the window).
* **FWHM** uses the outermost half-maximum crossings (correct for double-peaked and
  multi-component profiles), linearly interpolated between grid points; the maximum is
  refined by a parabola through the three highest points. **sigma** is the line dispersion,
  the square root of the second moment about the flux-weighted centroid (Peterson et al.
  2004, ApJ 613, 682, eq. 3). Widths are converted to km/s at the profile's peak wavelength,
  ``W_kms = c W_Å / λ_peak``, so one component's measured FWHM equals its ``fwhm`` parameter.
  A profile whose half maximum is not reached inside the window, or that is zero, has FWHM NaN.
* **Shift** (km/s, positive = redshifted) relative to ``λ0``: ``method="peak"`` (default: the
  velocity of the profile maximum, which for one component is its ``shift`` parameter and is
  insensitive to how the wings are modelled), ``"centroid"`` (flux-weighted mean) or
  ``"median"`` (the velocity bisecting the flux, as used for CIV blueshifts by Coatman et al.
  2016, MNRAS 461, 647).
* **EW** = line flux / continuum flux density at ``λ0``; the continuum is the sum of the
  model's ``metadata["continuum"]`` components *except FeII* (power law, Balmer, polynomial:
  the AGN continuum, as in Shen et al. 2011), or the ``continuum=`` names. Continuum
  luminosities use the same components.
* **Luminosities.** With ``d_L`` the luminosity distance, ``L_λ(λ_rest) = 4π d_L² f_rest(λ_rest)``
  (erg/s/Å), ``λL_λ`` (erg/s) and the line luminosity ``L = 4π d_L² ∫ f_rest dλ_rest`` (erg/s),
  with the flux unit ``flux_unit`` in erg/s/cm²/Å (SDSS: 1e-17). ``d_L`` is computed for a flat
  ΛCDM cosmology without radiation (``H0 = 70`` km/s/Mpc, ``Om0 = 0.3`` by default) by
  Gauss-Legendre quadrature of ``1/E(z)``; it matches ``astropy.cosmology.FlatLambdaCDM``
  (with ``Tcmb0 = 0``) to better than 1e-10. Luminosities are NaN for ``z <= 0``.

Error propagation (Monte Carlo)
-------------------------------
For each spectrum, ``n_samples`` (default 100) parameter vectors are drawn: every *free*
parameter from an independent Gaussian centred on its best-fit value with standard deviation
``params_err``; draws are clipped into the parameter bounds; fixed parameters keep their
fitted values and tied parameters are recomputed from their drawn sources, so the ties hold in
every draw. The quantity is recomputed for each draw and the error is the sample standard
deviation (ddof=1) of the finite results (NaN if fewer than half are finite, e.g. because a
used parameter has a NaN error). The draws come from ``jax.random`` keyed by ``seed`` and by
each spectrum's global index, so results are reproducible and do not depend on how the
spectra are chunked, and every quantity of one spectrum uses the same draws. Zero errors give
exactly zero; without ``params_err`` the errors are NaN. Correlations between parameters are
ignored (the fit reports only marginal errors). Black-hole mass errors are measurement errors
only: the recipes' intrinsic scatter (``RECIPES[name].scatter_dex``) is not added.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InputDataError, ModelError, OptionError
from ..identity import LRUCache, token
from ..parameters import _apply_op

__all__ = [
    "C_KMS",
    "DEFAULT_FLUX_UNIT",
    "DEFAULT_H0",
    "DEFAULT_OM0",
    "LINE_NAMES",
    "RECIPES",
    "Recipe",
    "bh_mass",
    "continuum_names",
    "ew",
    "fwhm",
    "line_flux",
    "line_info",
    "line_luminosity",
    "line_profile",
    "luminosity",
    "luminosity_distance",
    "measure_line",
    "parse_flux_unit",
    "shift",
    "sigma",
]

#: Speed of light (km/s).
C_KMS = 299792.458
#: One megaparsec in cm (IAU 2015: 1 pc = 648000/π au, 1 au = 1.495978707e13 cm).
MPC_CM = 3.0856775814913673e24
#: Flux-density unit assumed when the input does not say: SDSS's 1e-17 erg/s/cm²/Å.
DEFAULT_FLUX_UNIT = 1e-17
#: Default cosmology: flat ΛCDM with H0 = 70 km/s/Mpc and Ωm = 0.3.
DEFAULT_H0 = 70.0
DEFAULT_OM0 = 0.3
DEFAULT_N_SAMPLES = 100
DEFAULT_N_GRID = 2001
#: Half-width (km/s) of the velocity window a line is measured on, by line kind.
VELOCITY_HALF_RANGE = {"broad": 50000.0, "narrow": 5000.0}

#: Line names of the built-in regions (``model.metadata["lines"]``); a multi-component
#: broad line is one name.
LINE_NAMES = (
    "hbeta_broad", "hbeta_narrow", "oiii5007", "oiii4959", "heii4686",
    "halpha_broad", "halpha_narrow", "nii6584", "nii6548", "sii6717", "sii6731",
    "mgii_broad", "mgii_narrow", "civ_broad", "heii1640", "oiii1663",
)  # fmt: skip

SHIFT_METHODS = ("peak", "centroid", "median")


# ----------------------------------------------------------------------------------------
# black-hole mass recipes
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Recipe:
    """A single-epoch virial mass calibration.

    ``log10(M/M_sun) = zero_point + lum_slope * log10(L / lum_norm)
    + fwhm_slope * log10(FWHM / 1000 km/s)``, where ``L`` is ``λL_λ`` at ``wavelength``
    (``luminosity="continuum"``) or the luminosity of ``line`` itself (``"line"``).
    """

    name: str
    line: str
    luminosity: str  # "continuum" or "line"
    wavelength: float | None
    lum_norm: float
    lum_slope: float
    fwhm_slope: float
    zero_point: float
    scatter_dex: float | None
    reference: str


RECIPES: dict[str, Recipe] = {
    # VP06 eq. (5): log M = log{[FWHM(Hβ)/1000]^2 [λL5100/1e44]^0.50} + 6.91; scatter 0.43 dex.
    "vp06_hbeta": Recipe(
        "vp06_hbeta", "hbeta_broad", "continuum", 5100.0, 1e44, 0.50, 2.0, 6.91, 0.43,
        "Vestergaard & Peterson 2006, ApJ 641, 689, eq. 5",
    ),
    # VP06 eq. (6): log M = log{[FWHM(Hβ)/1000]^2 [L(Hβ)/1e42]^0.63} + 6.67; scatter 0.43 dex.
    "vp06_hbeta_line": Recipe(
        "vp06_hbeta_line", "hbeta_broad", "line", None, 1e42, 0.63, 2.0, 6.67, 0.43,
        "Vestergaard & Peterson 2006, ApJ 641, 689, eq. 6",
    ),
    # VP06 eq. (7): log M = log{[FWHM(CIV)/1000]^2 [λL1350/1e44]^0.53} + 6.66; scatter 0.36 dex.
    "vp06_civ": Recipe(
        "vp06_civ", "civ_broad", "continuum", 1350.0, 1e44, 0.53, 2.0, 6.66, 0.36,
        "Vestergaard & Peterson 2006, ApJ 641, 689, eq. 7",
    ),
    # VO09 eq. (1): log M = log{[FWHM(MgII)/1000]^2 [λL3000/1e44]^0.5} + 6.86; scatter 0.55 dex.
    "vo09_mgii": Recipe(
        "vo09_mgii", "mgii_broad", "continuum", 3000.0, 1e44, 0.50, 2.0, 6.86, 0.55,
        "Vestergaard & Osmer 2009, ApJ 699, 800, eq. 1",
    ),
    # Shen et al. 2011 eq. (10) with their own MgII calibration (a, b) = (0.740, 0.62):
    # log M = 0.740 + 0.62 log(λL3000/1e44) + 2 log(FWHM/km/s) = 6.74 + ... with FWHM/1000.
    "shen11_mgii": Recipe(
        "shen11_mgii", "mgii_broad", "continuum", 3000.0, 1e44, 0.62, 2.0, 6.74, None,
        "Shen et al. 2011, ApJS 194, 45, eq. 10 with (a, b) = (0.740, 0.62)",
    ),
    # GH05 eq. (6): M = 2.0e6 (L_Hα/1e42)^0.55 (FWHM_Hα/1000)^2.06 M_sun.
    "gh05_halpha": Recipe(
        "gh05_halpha", "halpha_broad", "line", None, 1e42, 0.55, 2.06, math.log10(2.0e6), None,
        "Greene & Ho 2005, ApJ 630, 122, eq. 6",
    ),
}  # fmt: skip


# ----------------------------------------------------------------------------------------
# model metadata
# ----------------------------------------------------------------------------------------
def line_info(model, line: str) -> dict:
    """The catalogue entry of ``line`` in ``model.metadata["lines"]``, validated.

    Raises
    ------
    ModelError
        The model has no line catalogue, ``line`` is not in it (the message lists the known
        lines), or the entry names components the model does not have.
    """
    lines = (getattr(model, "metadata", None) or {}).get("lines") or {}
    if not lines:
        raise ModelError(
            f"model {getattr(model, 'name', model)!r} has no line catalogue; derived line quantities need "
            "model.metadata['lines'] = {name: {'rest_wavelength': A, 'components': [component names], "
            "'kind': 'broad'|'narrow'}}."
        )
    if line not in lines:
        raise ModelError(
            f"unknown line {line!r} for model {getattr(model, 'name', model)!r}; its lines are: "
            f"{', '.join(sorted(lines))}."
        )
    info = dict(lines[line])
    comps = list(info.get("components") or [])
    if "rest_wavelength" not in info or not comps:
        raise ModelError(
            f"model.metadata['lines'][{line!r}] needs 'rest_wavelength' and a non-empty 'components' list; got {info!r}."
        )
    missing = [c for c in comps if c not in model.components]
    if missing:
        raise ModelError(
            f"line {line!r} names components {missing} that model {model.name!r} does not have "
            f"(its components: {', '.join(model.components)})."
        )
    info["components"] = comps
    info["rest_wavelength"] = float(info["rest_wavelength"])
    info.setdefault("kind", "broad")
    return info


def continuum_names(model, continuum: Sequence[str] | None = None) -> list[str]:
    """Names of the components that make the continuum (``continuum=`` or the model's metadata).

    By default ``model.metadata["continuum"]`` *without* FeII components (those whose
    ``metadata["components"][name]["kind"]`` is ``"feii"`` or whose name starts with
    ``feii``): FeII is a blend of emission lines, so EWs and λL_λ are measured against the AGN
    continuum (power law, Balmer continuum, polynomial), as in Shen et al. 2011 (ApJS 194, 45).
    Pass ``continuum=[...]`` to choose other components, FeII included.

    Raises
    ------
    ModelError
        No continuum is defined, or a name is not a component of the model.
    """
    meta = getattr(model, "metadata", None) or {}
    if continuum is not None:
        names = continuum
    else:
        # FeII is a blend of lines, not continuum: EW and λL_λ are against the AGN continuum.
        kinds = {k: (v or {}).get("kind") for k, v in (meta.get("components") or {}).items()}
        names = [c for c in meta.get("continuum") or [] if kinds.get(c) != "feii" and not c.lower().startswith("feii")]
    if isinstance(names, str):
        names = [names]
    if not names:
        raise ModelError(
            f"model {getattr(model, 'name', model)!r} defines no continuum; set model.metadata['continuum'] = "
            f"[component names] or pass continuum=[...] (components: {', '.join(model.components) or 'none'})."
        )
    missing = [c for c in names if c not in model.components]
    if missing:
        raise ModelError(
            f"continuum components {missing} are not components of model {model.name!r} "
            f"(its components: {', '.join(model.components) or 'none'})."
        )
    return list(names)


def _velocity_half_range(info: dict, velocity_range: float | None) -> float:
    if velocity_range is None:
        return VELOCITY_HALF_RANGE.get(info.get("kind", "broad"), VELOCITY_HALF_RANGE["broad"])
    v = float(velocity_range)
    if not (math.isfinite(v) and 0 < v < C_KMS):
        raise OptionError(f"velocity_range={velocity_range!r} must be a half-width in km/s in (0, c).")
    return v


def _check_n_grid(n_grid: int) -> int:
    if int(n_grid) != n_grid or n_grid < 101:
        raise OptionError(f"n_grid={n_grid!r} must be an integer >= 101 (points across the line window).")
    return int(n_grid)


# ----------------------------------------------------------------------------------------
# profile measurements (pure jax, one spectrum; batched with lax.map)
# ----------------------------------------------------------------------------------------
def _profile_stats(v, prof, lam0, with_median: bool = False):
    """Flux, FWHM, sigma and shifts of one profile sampled on the uniform velocity grid ``v``.

    Index searches use min/max reductions over ``where(mask, index, sentinel)`` rather than
    ``argmax``: on CPU they are several times faster, and this runs n_spectra x n_samples times.
    """
    import jax.numpy as jnp

    n = v.shape[0]
    idx = jnp.arange(n)
    dv = v[1] - v[0]
    dlam = lam0 * dv / C_KMS
    # trapezoid rule on the uniform grid
    total = jnp.sum(prof) - 0.5 * (prof[0] + prof[-1])
    flux = total * dlam
    centroid = (jnp.sum(prof * v) - 0.5 * (prof[0] * v[0] + prof[-1] * v[-1])) / total
    dev2 = (v - centroid) ** 2
    sig_v = jnp.sqrt((jnp.sum(prof * dev2) - 0.5 * (prof[0] * dev2[0] + prof[-1] * dev2[-1])) / total)

    # peak, refined by a parabola through the highest sample and its neighbours
    top = jnp.max(prof)
    i = jnp.clip(jnp.min(jnp.where(prof == top, idx, n - 1)), 1, n - 2)
    y0, y1, y2 = prof[i - 1], prof[i], prof[i + 1]
    denom = y0 - 2.0 * y1 + y2
    safe = jnp.where(denom < 0, denom, -1.0)
    delta = jnp.where(denom < 0, jnp.clip(0.5 * (y0 - y2) / safe, -0.5, 0.5), 0.0)
    v_peak = v[i] + delta * dv
    peak = y1 - 0.25 * (y0 - y2) * delta

    # outermost half-maximum crossings, linearly interpolated
    half = 0.5 * peak
    above = prof >= half
    left = jnp.min(jnp.where(above, idx, n - 1))
    right = jnp.max(jnp.where(above, idx, 0))
    lp = jnp.maximum(left - 1, 0)
    rn = jnp.minimum(right + 1, n - 1)
    dl = prof[left] - prof[lp]
    dr = prof[right] - prof[rn]
    v_left = v[lp] + (half - prof[lp]) / jnp.where(dl != 0, dl, 1.0) * dv
    v_right = v[right] + (prof[right] - half) / jnp.where(dr != 0, dr, 1.0) * dv
    inside = (left > 0) & (right < n - 1) & (peak > 0)
    stretch = 1.0 + v_peak / C_KMS  # λ_peak / λ0: widths in km/s at the peak wavelength
    ok = total > 0
    out = {
        "flux": flux,
        "fwhm": jnp.where(inside, (v_right - v_left) / stretch, jnp.nan),
        "sigma": jnp.where(ok, sig_v / stretch, jnp.nan),
        "shift_peak": jnp.where(peak > 0, v_peak, jnp.nan),
        "shift_centroid": jnp.where(ok, centroid, jnp.nan),
    }
    if with_median:
        # velocity bisecting the flux (trapezoid cumulative integral)
        cum = jnp.concatenate([jnp.zeros((1,), prof.dtype), jnp.cumsum(0.5 * (prof[1:] + prof[:-1]))])
        target = 0.5 * cum[-1]
        j = jnp.clip(jnp.min(jnp.where(cum >= target, idx, n - 1)), 1, n - 1)
        step = cum[j] - cum[j - 1]
        frac = jnp.where(step > 0, (target - cum[j - 1]) / jnp.where(step > 0, step, 1.0), 0.0)
        out["shift_median"] = jnp.where(ok, v[j - 1] + frac * dv, jnp.nan)
    return out


def _sum_components(funcs, wavelength, p):
    out = funcs[0](wavelength, p)
    for f in funcs[1:]:
        out = out + f(wavelength, p)
    return out


def _line_stats_fn(model, line: str, vhalf: float, n_grid: int, with_median: bool = False):
    """``f(p (n_params,)) -> dict of scalars`` for one line."""
    import jax.numpy as jnp

    info = line_info(model, line)
    funcs = [model.components[c] for c in info["components"]]
    lam0 = info["rest_wavelength"]

    def stats(p):
        v = jnp.linspace(-vhalf, vhalf, n_grid, dtype=p.dtype)
        prof = _sum_components(funcs, lam0 * (1.0 + v / C_KMS), p)
        return _profile_stats(v, prof, lam0, with_median)

    return stats, lam0


def _continuum_fn(model, continuum: Sequence[str] | None):
    import jax.numpy as jnp

    funcs = [model.components[c] for c in continuum_names(model, continuum)]

    def cont(wavelength: float, p):
        return _sum_components(funcs, jnp.full((1,), wavelength, dtype=p.dtype), p)[0]

    return cont


# ----------------------------------------------------------------------------------------
# the Monte Carlo engine
# ----------------------------------------------------------------------------------------
_COMPILED = LRUCache(64)


def _compiled(model, kind: str, key: tuple, n_samples: int, batch_size: int):
    """Jitted ``values(params, extra)`` and ``errors(params, err, lower, upper, index, extra, seed)``.

    ``kind``/``key`` select the per-spectrum function ``f(p, x) -> dict of scalars`` (``x`` a
    per-spectrum scalar such as log10 of the luminosity factor). Cached by the model's
    identity (LRU), so a second chunk of the same shape does not recompile and a changed
    model never reuses a stale program.
    """
    cache_key = (model.identity(), kind, token(key), n_samples, batch_size)
    return _COMPILED.get_or_build(cache_key, lambda: _build_compiled(model, kind, key, n_samples, batch_size))[0]


def _build_compiled(model, kind: str, key: tuple, n_samples: int, batch_size: int):
    import jax
    import jax.numpy as jnp

    f = _build(model, kind, key)
    params_spec = model.params
    names = list(params_spec.names)
    free = np.array([params_spec[nm].free for nm in names], dtype=bool)
    ties = [(names.index(t), names.index(s), op, operand) for t, s, op, operand in params_spec.ties]

    vf = jax.vmap(f)

    def batched(flat_p, flat_x):
        # Pad to whole batches so every row takes the same (vmapped) code path: lax.map's own
        # remainder path rounds differently, which would make identical draws differ.
        n = flat_p.shape[0]
        b = max(1, min(batch_size, n))
        nb = -(-n // b)
        pad = nb * b - n
        if pad:
            flat_p = jnp.concatenate([flat_p, jnp.broadcast_to(flat_p[-1:], (pad,) + flat_p.shape[1:])])
            flat_x = jnp.concatenate([flat_x, jnp.broadcast_to(flat_x[-1:], (pad,))])
        out = jax.lax.map(lambda a: vf(a[0], a[1]), (flat_p.reshape(nb, b, -1), flat_x.reshape(nb, b)))
        return {k: v.reshape(nb * b)[:n] for k, v in out.items()}

    def values(params, extra):
        return batched(params, extra)

    def errors(params, err, lower, upper, index, extra, seed):
        n, m = params.shape
        dtype = params.dtype
        base = jax.random.PRNGKey(seed)
        keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(index)
        z = jax.vmap(lambda k: jax.random.normal(k, (n_samples, m), dtype))(keys)  # (n, N, m)
        # only free parameters are perturbed; where() keeps NaN errors of fixed/tied ones out
        scale = jnp.where(jnp.asarray(free), err, 0.0)
        s = params[:, None, :] + scale[:, None, :] * z
        s = jnp.where(jnp.asarray(free), jnp.clip(s, lower, upper), s)
        for t, src, op, operand in ties:
            s = s.at[..., t].set(_apply_op(s[..., src], op, operand))
        out = batched(s.reshape(n * n_samples, m), jnp.repeat(extra, n_samples))
        res = {}
        for name, val in out.items():
            val = val.reshape(n, n_samples)
            fin = jnp.isfinite(val)
            cnt = jnp.sum(fin, axis=1)
            # deviations from one finite draw: identical draws give exactly zero, not rounding
            ref = jnp.max(jnp.where(fin, val, -jnp.inf), axis=1, keepdims=True)
            d = jnp.where(fin, val - ref, 0.0)
            mean = jnp.sum(d, axis=1) / jnp.maximum(cnt, 1)
            var = jnp.sum(jnp.where(fin, (d - mean[:, None]) ** 2, 0.0), axis=1) / jnp.maximum(cnt - 1, 1)
            res[name] = jnp.where(2 * cnt >= n_samples, jnp.sqrt(var), jnp.nan)
        return res

    return jax.jit(values), jax.jit(errors)


def _build(model, kind: str, key: tuple):
    """The per-spectrum function ``f(p, x) -> dict`` for a kind of measurement."""
    import jax.numpy as jnp

    if kind == "line":
        line, vhalf, n_grid, continuum, with_median = key
        stats, lam0 = _line_stats_fn(model, line, vhalf, n_grid, with_median)
        cont = _continuum_fn(model, continuum) if continuum is not False else None

        def f(p, x):
            out = stats(p)
            if cont is not None:
                out["ew"] = out["flux"] / cont(lam0, p)
            return out

        return f
    if kind == "continuum":
        (wavelength, continuum) = key
        cont = _continuum_fn(model, continuum)
        return lambda p, x: {"f_lambda": cont(wavelength, p)}
    if kind == "bh_mass":
        recipe_name, vhalf, n_grid, continuum = key
        r = RECIPES[recipe_name]
        stats, _ = _line_stats_fn(model, r.line, vhalf, n_grid)
        cont = _continuum_fn(model, continuum) if r.luminosity == "continuum" else None

        def f(p, x):
            # x = log10(4π d_L² flux_unit); L in erg/s: λ f_λ (continuum) or ∫ f dλ (line)
            s = stats(p)
            if cont is not None:
                log_l = jnp.log10(r.wavelength * cont(r.wavelength, p)) + x
            else:
                log_l = jnp.log10(s["flux"]) + x
            log_m = r.zero_point + r.lum_slope * (log_l - math.log10(r.lum_norm)) + r.fwhm_slope * jnp.log10(s["fwhm"] / 1000.0)
            return {"log_mass": log_m}

        return f
    raise AssertionError(kind)


def _as_params(model, params, name: str = "params") -> np.ndarray:
    arr = np.asarray(params)
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
    one = arr.ndim == 1
    arr = np.atleast_2d(arr)
    if arr.ndim != 2 or arr.shape[1] != model.n_params:
        raise InputDataError(
            f"{name} has shape {np.shape(params)}; expected (n_spectra, n_params) or (n_params,) with "
            f"n_params={model.n_params} in the order of model.param_names."
        )
    return arr, one


def _run(model, kind, key, params, params_err, extra, *, n_samples, seed, index, lower, upper, batch_size):
    """Values and Monte Carlo errors of every output of a measurement: dict name -> (value, error)."""
    import jax.numpy as jnp

    p, one = _as_params(model, params)
    n = p.shape[0]
    n_samples = int(n_samples)
    if n_samples < 2:
        raise OptionError(f"n_samples={n_samples!r} must be >= 2 (Monte Carlo draws per spectrum).")
    values_fn, errors_fn = _compiled(model, kind, key, n_samples, int(batch_size))
    # Pad the rows to a few bucket sizes so chunks of slightly different lengths (the last
    # one, a subset) reuse the compiled functions; the copies of row 0 are dropped at the end.
    m = _bucket(n)
    rows = np.concatenate([np.arange(n), np.zeros(m - n, dtype=int)]) if n else np.zeros(0, dtype=int)
    pj = jnp.asarray(p[rows])
    dtype = pj.dtype
    x = jnp.asarray(np.broadcast_to(np.asarray(extra, dtype=np.float64), (n,))[rows], dtype=dtype)
    if n == 0:  # an empty chunk: shapes only (evaluate one dummy row for the output names)
        names = values_fn(jnp.asarray(model.params.values, dtype)[None], jnp.zeros((1,), dtype)).keys()
        return {k: (np.zeros(0), np.zeros(0)) for k in names}
    vals = {k: np.asarray(v, dtype=np.float64)[:n] for k, v in values_fn(pj, x).items()}
    if params_err is None:
        errs = {k: np.full(n, np.nan) for k in vals}
    else:
        e, _ = _as_params(model, params_err, "params_err")
        lo = model.params.lower if lower is None else np.asarray(lower, dtype=np.float64)
        hi = model.params.upper if upper is None else np.asarray(upper, dtype=np.float64)
        idx = np.arange(n) if index is None else np.asarray(index)
        if idx.shape != (n,):
            raise OptionError(f"index has shape {idx.shape}; expected ({n},), one global position per spectrum.")
        with np.errstate(over="ignore"):  # huge errors in float32: inf, then clipped into the bounds
            e32, lo32, hi32 = (np.asarray(a, dtype=dtype) for a in (e[rows], lo, hi))
        out = errors_fn(
            pj, jnp.asarray(e32), jnp.asarray(lo32), jnp.asarray(hi32),
            jnp.asarray(idx[rows], jnp.uint32), x, jnp.uint32(seed),
        )  # fmt: skip
        errs = {k: np.asarray(v, dtype=np.float64)[:n] for k, v in out.items()}
    res = {k: (vals[k], errs[k]) for k in vals}
    if one:
        res = {k: (v[0], e[0]) for k, (v, e) in res.items()}
    return res


def _bucket(n: int) -> int:
    """Smallest allowed row count >= n: at least 8, then multiples of 1/8 of the power of two below."""
    if n <= 8:
        return 8
    q = 2 ** (int(math.log2(n)) - 3)
    return -(-n // q) * q


def _common(kw: dict) -> dict:
    opts = {
        "n_samples": kw.pop("n_samples", DEFAULT_N_SAMPLES),
        "seed": kw.pop("seed", 0),
        "index": kw.pop("index", None),
        "lower": kw.pop("lower", None),
        "upper": kw.pop("upper", None),
        "batch_size": kw.pop("batch_size", 256),
    }
    if kw:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(kw)}")
    return opts


# ----------------------------------------------------------------------------------------
# public API: lines
# ----------------------------------------------------------------------------------------
def measure_line(
    model,
    line: str,
    params,
    params_err=None,
    *,
    continuum: Sequence[str] | None | bool = None,
    velocity_range: float | None = None,
    n_grid: int = DEFAULT_N_GRID,
    median: bool = False,
    **kwargs: Any,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every profile measurement of one line at once (one Monte Carlo run).

    Parameters
    ----------
    model : sheap_dask.Model
        Model with ``metadata["lines"]`` (see the module docstring).
    line : str
        Line name, e.g. ``"hbeta_broad"``.
    params : array, (n_spectra, n_params) or (n_params,)
        Physical parameters in the order of ``model.param_names``.
    params_err : array like ``params``, optional
        1-sigma errors; ``None`` gives NaN errors.
    continuum : list of str, False or None
        Continuum components for the EW (default ``model.metadata["continuum"]``); ``False``
        skips the EW.
    velocity_range : float, optional
        Half-width of the velocity window (km/s); default by line kind.
    n_grid : int
        Points on the velocity grid (default 2001).
    median : bool
        Also compute ``shift_median`` (a cumulative integral: costs extra time).
    **kwargs
        ``n_samples`` (100), ``seed`` (0), ``index`` (global spectrum positions, for
        chunk-invariant draws), ``lower``/``upper`` (bounds, default the model's),
        ``batch_size`` (profiles evaluated at once, 256).

    Returns
    -------
    dict
        ``{"flux", "fwhm", "sigma", "shift_peak", "shift_centroid"[, "shift_median"][, "ew"]}``
        each mapped to ``(value, error)``.
    """
    info = line_info(model, line)
    if continuum is None and not (model.metadata or {}).get("continuum"):
        continuum = False
    if continuum is not False:
        continuum = tuple(continuum_names(model, continuum))
    key = (line, _velocity_half_range(info, velocity_range), _check_n_grid(n_grid), continuum, bool(median))
    return _run(model, "line", key, params, params_err, 0.0, **_common(kwargs))


def fwhm(model, line: str, params, params_err=None, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """FWHM (km/s) of a line's summed profile, from its outermost half-maximum crossings.

    Parameters and keywords as :func:`measure_line`. Returns ``(value, error)``.

    Examples
    --------
    >>> import jax.numpy as jnp, sheap_dask as sd
    >>> from sheap_dask.models.profiles import gaussian
    >>> p = sd.Parameters().add("f", 10.0).add("v", 0.0).add("w", 3000.0)
    >>> comp = lambda x, q: gaussian(x, q[0], q[1], q[2], 4862.68)
    >>> m = sd.Model(comp, p, components={"hb": comp},
    ...              metadata={"lines": {"hbeta_broad": {"rest_wavelength": 4862.68, "components": ["hb"]}}})
    >>> value, error = fwhm(m, "hbeta_broad", [10.0, 0.0, 3000.0], [1.0, 0.0, 0.0])
    >>> round(float(value))
    3000
    >>> bool(float(error) < 1e-5 * float(value))  # the flux does not change the width (to float precision)
    True
    """
    return measure_line(model, line, params, params_err, **kwargs)["fwhm"]


def sigma(model, line: str, params, params_err=None, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """Line dispersion (km/s): square root of the profile's second moment (Peterson et al. 2004).

    Parameters and keywords as :func:`measure_line`. Returns ``(value, error)``.
    """
    return measure_line(model, line, params, params_err, **kwargs)["sigma"]


def line_flux(model, line: str, params, params_err=None, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """Integrated line flux (input flux-density unit × Å) over the velocity window.

    Parameters and keywords as :func:`measure_line`. Returns ``(value, error)``.
    """
    return measure_line(model, line, params, params_err, **kwargs)["flux"]


def ew(model, line: str, params, params_err=None, *, continuum=None, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """Rest-frame equivalent width (Å): line flux over the continuum at the rest wavelength.

    ``continuum`` names the continuum components (default ``model.metadata["continuum"]``).
    Other parameters as :func:`measure_line`. Returns ``(value, error)``.
    """
    if continuum is False:
        raise OptionError("ew(continuum=False) is meaningless; pass continuum component names or None.")
    continuum_names(model, continuum)  # a clear error when the model defines no continuum
    return measure_line(model, line, params, params_err, continuum=continuum, **kwargs)["ew"]


def shift(model, line: str, params, params_err=None, *, method: str = "peak", **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """Velocity shift (km/s, positive = redshift) of a line relative to its rest wavelength.

    ``method``: ``"peak"`` (default; velocity of the maximum), ``"centroid"`` (flux-weighted
    mean velocity) or ``"median"`` (velocity bisecting the flux). Other parameters as
    :func:`measure_line`. Returns ``(value, error)``.
    """
    if method not in SHIFT_METHODS:
        raise OptionError(f"shift(method={method!r}) is unknown; use one of {', '.join(SHIFT_METHODS)}.")
    return measure_line(model, line, params, params_err, median=method == "median", **kwargs)[
        f"shift_{method}"
    ]


def line_profile(model, line: str, params, *, velocity_range: float | None = None, n_grid: int = DEFAULT_N_GRID):
    """A line's summed model profile on its velocity grid.

    Returns
    -------
    velocity : ndarray (n_grid,)
        km/s relative to the rest wavelength.
    wavelength : ndarray (n_grid,)
        Rest-frame Angstrom, ``λ0 (1 + v / c)``.
    profile : ndarray (n_spectra, n_grid) or (n_grid,)
        Flux density of the line's components only.
    """
    import jax
    import jax.numpy as jnp

    info = line_info(model, line)
    vhalf = _velocity_half_range(info, velocity_range)
    n_grid = _check_n_grid(n_grid)
    p, one = _as_params(model, params)
    pj = jnp.asarray(p)
    v = jnp.linspace(-vhalf, vhalf, n_grid, dtype=pj.dtype)
    wl = info["rest_wavelength"] * (1.0 + v / C_KMS)
    funcs = [model.components[c] for c in info["components"]]
    prof = jax.vmap(lambda q: _sum_components(funcs, wl, q))(pj)
    prof = np.asarray(prof)
    return np.asarray(v), np.asarray(wl), prof[0] if one else prof


# ----------------------------------------------------------------------------------------
# cosmology and luminosities
# ----------------------------------------------------------------------------------------
def cosmology(H0: float | None = None, Om0: float | None = None) -> tuple[float, float]:
    """``(H0, Om0)``: the given values, else the configured ``sheap_dask.cosmology.H0/Om0``."""
    from .. import config

    H0 = float(config.resolve(H0, "cosmology.H0"))
    Om0 = float(config.resolve(Om0, "cosmology.Om0"))
    _check_cosmology(H0, Om0)
    return H0, Om0


def _check_cosmology(H0: float, Om0: float) -> None:
    if not (math.isfinite(H0) and H0 > 0):
        raise OptionError(f"H0={H0!r} must be a positive Hubble constant in km/s/Mpc (e.g. 70).")
    if not (math.isfinite(Om0) and 0 <= Om0 <= 1):
        raise OptionError(f"Om0={Om0!r} must be the matter density in [0, 1] of a flat ΛCDM cosmology (e.g. 0.3).")


def luminosity_distance(z, *, H0: float = DEFAULT_H0, Om0: float = DEFAULT_OM0) -> np.ndarray:
    """Luminosity distance (cm) in a flat ΛCDM cosmology without radiation.

    ``d_L = (1 + z) (c / H0) ∫_0^z dz' / E(z')`` with ``E(z) = sqrt(Om0 (1+z)^3 + 1 - Om0)``,
    integrated by 64-point Gauss-Legendre quadrature (the integrand is smooth, so this is
    exact to rounding). NaN for ``z < 0`` or non-finite ``z``.

    Parameters
    ----------
    z : float or array
        Redshift(s).
    H0 : float
        Hubble constant, km/s/Mpc (default 70).
    Om0 : float
        Matter density parameter today (default 0.3); ``Ω_Λ = 1 - Om0``.

    Examples
    --------
    >>> round(float(luminosity_distance(1.0)) / MPC_CM, 1)   # Mpc
    6607.7
    """
    _check_cosmology(float(H0), float(Om0))
    z = np.asarray(z, dtype=np.float64)
    x, w = np.polynomial.legendre.leggauss(64)
    zz = np.where(np.isfinite(z) & (z >= 0), z, 0.0)
    nodes = 0.5 * zz[..., None] * (x + 1.0)  # map [-1, 1] -> [0, z]
    inv_e = 1.0 / np.sqrt(Om0 * (1.0 + nodes) ** 3 + (1.0 - Om0))
    comoving = 0.5 * zz * np.sum(w * inv_e, axis=-1)  # in units of c/H0
    d = (1.0 + zz) * comoving * (C_KMS / H0) * MPC_CM
    return np.where(np.isfinite(z) & (z >= 0), d, np.nan)


def _log_lum_factor(redshift, n: int, flux_unit: float, H0: float, Om0: float) -> np.ndarray:
    """log10(4π d_L² × flux_unit) per spectrum; NaN where z <= 0."""
    if redshift is None:
        raise InputDataError(
            "luminosities need a redshift; pass redshift=... (one per spectrum) or give the result a "
            "'redshift' coordinate."
        )
    flux_unit = float(flux_unit)
    if not (math.isfinite(flux_unit) and flux_unit > 0):
        raise OptionError(f"flux_unit={flux_unit!r} must be the input flux-density unit in erg/s/cm²/Å (e.g. 1e-17).")
    z = np.broadcast_to(np.asarray(redshift, dtype=np.float64), (n,))
    d = luminosity_distance(z, H0=H0, Om0=Om0)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.log10(4.0 * np.pi * flux_unit) + 2.0 * np.log10(d)
    return np.where(z > 0, out, np.nan)


def luminosity(
    model,
    wavelength: float,
    params,
    params_err=None,
    *,
    redshift,
    flux_unit: float = DEFAULT_FLUX_UNIT,
    H0: float = DEFAULT_H0,
    Om0: float = DEFAULT_OM0,
    quantity: str = "lambda_l_lambda",
    continuum: Sequence[str] | None = None,
    **kwargs: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """Continuum luminosity at a rest wavelength: ``λL_λ`` (erg/s) or ``L_λ`` (erg/s/Å).

    ``L_λ(λ) = 4π d_L² f_rest(λ)``, with ``f_rest`` the model's continuum components at the
    rest wavelength ``λ`` (in ``flux_unit`` erg/s/cm²/Å) and ``d_L`` from
    :func:`luminosity_distance`. The error scales the Monte Carlo error of the continuum flux
    density (the redshift is taken as exact).

    Parameters
    ----------
    model, params, params_err
        As :func:`measure_line`.
    wavelength : float
        Rest wavelength in Å (e.g. 5100, 3000, 1350).
    redshift : float or array (n_spectra,)
        Redshift of each spectrum.
    flux_unit : float
        Input flux-density unit in erg/s/cm²/Å (default 1e-17, SDSS).
    H0, Om0 : float
        Flat ΛCDM cosmology (default 70 km/s/Mpc, 0.3).
    quantity : {"lambda_l_lambda", "l_lambda"}
        ``λL_λ`` in erg/s (default) or ``L_λ`` in erg/s/Å.
    continuum : list of str, optional
        Continuum components (default ``model.metadata["continuum"]``).

    Returns
    -------
    (value, error)
    """
    wavelength = float(wavelength)
    if not (math.isfinite(wavelength) and wavelength > 0):
        raise OptionError(f"wavelength={wavelength!r} must be a positive rest wavelength in Angstrom (e.g. 5100).")
    if quantity not in ("lambda_l_lambda", "l_lambda"):
        raise OptionError(f"quantity={quantity!r} must be 'lambda_l_lambda' (erg/s) or 'l_lambda' (erg/s/A).")
    opts = _common(kwargs)
    p, one = _as_params(model, params)
    log_factor = _log_lum_factor(redshift, p.shape[0], flux_unit, H0, Om0)
    key = (wavelength, tuple(continuum_names(model, continuum)))
    val, err = _run(model, "continuum", key, p, params_err, 0.0, **opts)["f_lambda"]
    factor = 10.0**log_factor * (wavelength if quantity == "lambda_l_lambda" else 1.0)
    val, err = val * factor, err * factor
    return (val[0], err[0]) if one else (val, err)


def line_luminosity(
    model,
    line: str,
    params,
    params_err=None,
    *,
    redshift,
    flux_unit: float = DEFAULT_FLUX_UNIT,
    H0: float = DEFAULT_H0,
    Om0: float = DEFAULT_OM0,
    **kwargs: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """Line luminosity (erg/s): ``4π d_L² ∫ f_rest dλ_rest`` of the line's summed profile.

    Parameters as :func:`luminosity` and :func:`measure_line`. Returns ``(value, error)``.
    """
    velocity_range = kwargs.pop("velocity_range", None)
    n_grid = kwargs.pop("n_grid", DEFAULT_N_GRID)
    p, one = _as_params(model, params)
    log_factor = _log_lum_factor(redshift, p.shape[0], flux_unit, H0, Om0)
    val, err = measure_line(model, line, p, params_err, velocity_range=velocity_range, n_grid=n_grid, **kwargs)["flux"]
    factor = 10.0**log_factor
    val, err = val * factor, err * factor
    return (val[0], err[0]) if one else (val, err)


def bh_mass(
    model,
    recipe: str,
    params,
    params_err=None,
    *,
    redshift,
    flux_unit: float = DEFAULT_FLUX_UNIT,
    H0: float = DEFAULT_H0,
    Om0: float = DEFAULT_OM0,
    continuum: Sequence[str] | None = None,
    velocity_range: float | None = None,
    n_grid: int = DEFAULT_N_GRID,
    **kwargs: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """Single-epoch virial black-hole mass, ``log10(M_BH / M_sun)``, with its error.

    ``log10 M = zero_point + lum_slope log10(L / lum_norm) + fwhm_slope log10(FWHM / 1000 km/s)``
    with the FWHM measured on the line's summed profile (:func:`fwhm`). Recipes
    (:data:`RECIPES`):

    ``"vp06_hbeta"``
        Vestergaard & Peterson 2006, ApJ 641, 689, eq. 5:
        ``log M = log{[FWHM(Hβ)/1000]² [λL5100/1e44 erg/s]^0.50} + 6.91`` (scatter 0.43 dex).
    ``"vp06_hbeta_line"``
        ibid. eq. 6: ``log M = log{[FWHM(Hβ)/1000]² [L(Hβ)/1e42 erg/s]^0.63} + 6.67`` (0.43 dex).
    ``"vp06_civ"``
        ibid. eq. 7: ``log M = log{[FWHM(CIV)/1000]² [λL1350/1e44 erg/s]^0.53} + 6.66`` (0.36 dex).
    ``"vo09_mgii"``
        Vestergaard & Osmer 2009, ApJ 699, 800, eq. 1:
        ``log M = log{[FWHM(MgII)/1000]² [λL3000/1e44 erg/s]^0.5} + 6.86`` (0.55 dex).
    ``"shen11_mgii"``
        Shen et al. 2011, ApJS 194, 45, eq. 10 with their MgII calibration (a, b) = (0.740, 0.62):
        ``log M = 0.740 + 0.62 log(λL3000/1e44 erg/s) + 2 log(FWHM/km/s)``.
    ``"gh05_halpha"``
        Greene & Ho 2005, ApJ 630, 122, eq. 6:
        ``M = 2.0e6 (L(Hα)/1e42 erg/s)^0.55 (FWHM(Hα)/1000 km/s)^2.06 M_sun``.

    The error is the Monte Carlo measurement error (FWHM and luminosity from the same draws);
    the recipe's intrinsic scatter is not included (see ``RECIPES[recipe].scatter_dex``).

    Parameters
    ----------
    recipe : str
        A key of :data:`RECIPES`.
    Others
        As :func:`luminosity` and :func:`measure_line`.

    Returns
    -------
    (value, error)
        log10 solar masses and its 1-sigma error (dex).
    """
    if recipe not in RECIPES:
        raise OptionError(f"unknown black-hole mass recipe {recipe!r}; use one of {', '.join(RECIPES)}.")
    r = RECIPES[recipe]
    info = line_info(model, r.line)
    cont = tuple(continuum_names(model, continuum)) if r.luminosity == "continuum" else None
    opts = _common(kwargs)
    p, one = _as_params(model, params)
    log_factor = _log_lum_factor(redshift, p.shape[0], flux_unit, H0, Om0)
    key = (recipe, _velocity_half_range(info, velocity_range), _check_n_grid(n_grid), cont)
    # the luminosity factor enters as log10 so float32 never overflows (4π d_L² ~ 1e57 cm²)
    val, err = _run(model, "bh_mass", key, p, params_err, log_factor, **opts)["log_mass"]
    return (val[0], err[0]) if one else (val, err)


# ----------------------------------------------------------------------------------------
# flux units
# ----------------------------------------------------------------------------------------
_ANGSTROM = {"a", "aa", "ang", "angstrom", "angstroms", "å", "angstroem"}
_UNIT_WORDS = {"erg", "ergs", "s", "sec", "cm", "m", "nm", "um", "w", "jy", "hz"}


def parse_flux_unit(units: str) -> float:
    """The scale (erg/s/cm²/Å) of a flux-density unit string such as ``"1e-17 erg/s/cm2/A"``.

    Understands SDSS-style strings (``"1E-17 erg/cm^2/s/Ang"``, ``"10^-17 erg s-1 cm-2 A-1"``,
    where ``A`` means Angstrom) and, when astropy is installed, anything
    ``astropy.units`` can convert to erg/s/cm²/Å.

    Raises
    ------
    InputDataError
        The string is not a flux density per unit wavelength.
    """
    text = str(units).strip()
    # a trailing remark such as "(nominal)" is not part of the unit
    remark = re.search(r"\(([^()]*)\)\s*$", text)
    if remark and not any(w in _UNIT_WORDS or w in _ANGSTROM for w in re.findall(r"[a-zå]+", remark.group(1).lower())):
        text = text[: remark.start()].strip()
    m = re.match(r"^\(?\s*(?:(10\s*(?:\^|\*\*)\s*\(?\s*([-+]?\d+)\s*\)?)|([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?))?\s*\)?\s*\*?\s*(.*)$", text)
    if m is not None and m.group(4):
        scale = 10.0 ** int(m.group(2)) if m.group(1) else float(m.group(3)) if m.group(3) else 1.0
        words = re.findall(r"([a-zå]+)\s*(?:\^|\*\*)?\s*\(?\s*([-+]?\d+)?", m.group(4).lower())
        bases = {}
        for word, power in words:
            base = "A" if word in _ANGSTROM else {"erg": "erg", "ergs": "erg", "s": "s", "sec": "s", "cm": "cm"}.get(word)
            if base is None:
                bases = None
                break
            bases[base] = abs(int(power)) if power else 1
        if bases == {"erg": 1, "s": 1, "cm": 2, "A": 1} and scale > 0:
            return float(scale)
    try:
        import astropy.units as u

        return float(u.Unit(text).to(u.erg / u.s / u.cm**2 / u.AA))
    except Exception:
        pass
    raise InputDataError(
        f"cannot read flux unit {units!r} as a flux density per Angstrom; pass flux_unit=<scale in "
        "erg/s/cm2/A> (e.g. 1e-17 for SDSS) or set flux.attrs['units'] = '1e-17 erg/s/cm2/A'."
    )
