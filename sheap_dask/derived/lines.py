"""Line measurements on a line's *summed* model profile: flux, FWHM, sigma, shifts, EW.

A broad line built from several Gaussians is measured as one line. Every function is
vectorised over spectra (no Python loop over spectra) and returns ``(value, error)`` as
float64 numpy arrays of shape ``(n_spectra,)``; errors come from the Monte Carlo engine of
:mod:`sheap_dask.derived.errors`.

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
  luminosities (:mod:`sheap_dask.derived.luminosity`) use the same components.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import ModelError, OptionError
from .errors import as_params, mc_options, run

__all__ = [
    "C_KMS",
    "DEFAULT_N_GRID",
    "LINE_NAMES",
    "SHIFT_METHODS",
    "continuum_names",
    "ew",
    "fwhm",
    "line_flux",
    "line_info",
    "line_profile",
    "measure_line",
    "shift",
    "sigma",
]

#: Speed of light (km/s).
C_KMS = 299792.458
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


def velocity_half_range(info: dict, velocity_range: float | None) -> float:
    if velocity_range is None:
        return VELOCITY_HALF_RANGE.get(info.get("kind", "broad"), VELOCITY_HALF_RANGE["broad"])
    v = float(velocity_range)
    if not (math.isfinite(v) and 0 < v < C_KMS):
        raise OptionError(f"velocity_range={velocity_range!r} must be a half-width in km/s in (0, c).")
    return v


def check_n_grid(n_grid: int) -> int:
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


def sum_components(funcs, wavelength, p):
    out = funcs[0](wavelength, p)
    for f in funcs[1:]:
        out = out + f(wavelength, p)
    return out


def line_stats_fn(model, line: str, vhalf: float, n_grid: int, with_median: bool = False):
    """``f(p (n_params,)) -> dict of scalars`` for one line."""
    import jax.numpy as jnp

    info = line_info(model, line)
    funcs = [model.components[c] for c in info["components"]]
    lam0 = info["rest_wavelength"]

    def stats(p):
        v = jnp.linspace(-vhalf, vhalf, n_grid, dtype=p.dtype)
        prof = sum_components(funcs, lam0 * (1.0 + v / C_KMS), p)
        return _profile_stats(v, prof, lam0, with_median)

    return stats, lam0


def continuum_fn(model, continuum: Sequence[str] | None):
    import jax.numpy as jnp

    funcs = [model.components[c] for c in continuum_names(model, continuum)]

    def cont(wavelength: float, p):
        return sum_components(funcs, jnp.full((1,), wavelength, dtype=p.dtype), p)[0]

    return cont


def _build_line(model, key: tuple):
    """The measurement ``f(p, x) -> {flux, fwhm, sigma, shifts[, ew]}`` of one line."""
    line, vhalf, n_grid, continuum, with_median = key
    stats, lam0 = line_stats_fn(model, line, vhalf, n_grid, with_median)
    cont = continuum_fn(model, continuum) if continuum is not False else None

    def f(p, x):
        out = stats(p)
        if cont is not None:
            out["ew"] = out["flux"] / cont(lam0, p)
        return out

    return f


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
    key = (line, velocity_half_range(info, velocity_range), check_n_grid(n_grid), continuum, bool(median))
    return run(model, _build_line, key, params, params_err, 0.0, **mc_options(kwargs))


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
    vhalf = velocity_half_range(info, velocity_range)
    n_grid = check_n_grid(n_grid)
    p, one = as_params(model, params)
    pj = jnp.asarray(p)
    v = jnp.linspace(-vhalf, vhalf, n_grid, dtype=pj.dtype)
    wl = info["rest_wavelength"] * (1.0 + v / C_KMS)
    funcs = [model.components[c] for c in info["components"]]
    prof = jax.vmap(lambda q: sum_components(funcs, wl, q))(pj)
    prof = np.asarray(prof)
    return np.asarray(v), np.asarray(wl), prof[0] if one else prof
