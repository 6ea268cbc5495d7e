"""Which spectra a model can fit: the one coverage rule of the chunk layer, the catalogue and
``covering_spectra``.

A model may declare, in ``metadata["coverage"]``, the rest-frame ranges it needs:

``line``
    ranges the fit is about (e.g. H-beta and [OIII]): each must be spanned by usable pixels
    over at least ``sheap_dask.coverage.line`` (0.9) of its width, else the spectrum is not
    fitted (status ``no_data``);
``continuum``
    line-free ranges that fix the continuum: one spanned over at least
    ``sheap_dask.coverage.continuum`` (0.5) of its width is enough to fit; if some are not,
    the fit is flagged ``window_incomplete``; if none is, the spectrum is not fitted.

A model without such a declaration needs its windows spanned over ``coverage.min`` (0.5)
and is flagged below ``coverage.flag`` (0.95). "Spanned" means from the bluest to the
reddest usable pixel inside the range: interior gaps (sky lines, masked pixels) do not count,
missing ends do.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from . import config

__all__ = ["span_fraction", "coverage", "covering"]


def span_fraction(wl: np.ndarray, usable: np.ndarray, low: float, high: float) -> np.ndarray:
    """Per spectrum, the fraction of [low, high] spanned by its usable pixels inside it.

    ``wl`` (n_pix,) or (n, n_pix) rest-frame Angstrom, ``usable`` (n, n_pix) bool.
    """
    wl2 = np.broadcast_to(wl, usable.shape)
    inside = usable & (wl2 >= low) & (wl2 <= high)
    lo = np.min(np.where(inside, wl2, np.inf), axis=1)
    hi = np.max(np.where(inside, wl2, -np.inf), axis=1)
    span = np.where(inside.any(axis=1), hi - lo, 0.0)
    return np.clip(span / (high - low), 0.0, 1.0)


def coverage(model, wl: np.ndarray, usable: np.ndarray, *, minimum: float | None = None, flag: float | None = None,
             line: float | None = None, continuum: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(fit, incomplete)`` per spectrum: whether ``model`` can fit it, and whether it is
    to be flagged ``window_incomplete`` (see the module docstring for the rule).

    ``usable`` marks pixels with data (any wavelength); thresholds default to the
    ``sheap_dask.coverage.*`` configuration.
    """
    declared = model.metadata.get("coverage") if isinstance(model.metadata, Mapping) else None
    n = usable.shape[0]
    if declared:
        line = config.resolve(line, "coverage.line")
        continuum = config.resolve(continuum, "coverage.continuum")
        fit = np.ones(n, dtype=bool)
        for lo, hi in declared.get("line", ()):
            fit &= span_fraction(wl, usable, lo, hi) >= line
        covered = [span_fraction(wl, usable, lo, hi) >= continuum for lo, hi in declared.get("continuum", ())]
        if covered:
            covered = np.stack(covered)
            fit &= covered.any(axis=0)
            return fit, fit & ~covered.all(axis=0)
        return fit, np.zeros(n, dtype=bool)
    windows: Sequence = getattr(model, "windows", None) or ((model.window,) if model.window is not None else ())
    if not windows:
        return np.ones(n, dtype=bool), np.zeros(n, dtype=bool)
    minimum = config.resolve(minimum, "coverage.min")
    flag = config.resolve(flag, "coverage.flag")
    fractions = np.stack([span_fraction(wl, usable, lo, hi) for lo, hi in windows])
    return (fractions >= minimum).any(axis=0), (fractions < flag).any(axis=0)


def covering(ds, model, *, redshift: str = "redshift") -> np.ndarray:
    """Indices of the spectra of ``ds`` (flux, ivar, wavelength; rest frame from
    ``redshift`` when present) that ``model`` can fit under the coverage rule."""
    wl = np.asarray(ds.wavelength.values, dtype=np.float64)
    n = ds.sizes["spectrum"]
    z = np.asarray(ds[redshift].values, dtype=np.float64) if redshift in ds.variables else np.zeros(n)
    rest = (wl if wl.ndim == 2 else wl[None, :]) / (1.0 + z[:, None])
    flux = np.asarray(ds.flux.values)
    usable = (np.asarray(ds.ivar.values) > 0) & np.isfinite(flux) & np.isfinite(z)[:, None]
    fit, _ = coverage(model, rest, usable)
    return np.flatnonzero(fit)
