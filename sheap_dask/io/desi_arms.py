"""DESI arms onto the common grid: placement or resampling, masks, overlap weighting, resolution.

:func:`read_rows` reads some rows of one coadd/spectra file and returns them on DESI's combined
grid (linear, 3600-9824 A, 0.8 A). It is what every reader of :mod:`.desi` runs, in threads or
spawned processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..astro import dered
from ._fits import open_checked

#: DESI's combined-arm grid: linear, 3600-9824 A in 0.8 A steps (``desispec.coaddition``).
DESI_WAVE_MIN = 3600.0
DESI_WAVE_MAX = 9824.0
DESI_WAVE_STEP = 0.8
_C_KMS = 299792.458
_FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))
# An arm pixel further than this (in pixels) from a grid point means the arm is resampled.
_ALIGN_TOLERANCE = 1e-3


@dataclass(frozen=True)
class _ArmMap:
    """How one arm's pixels land on the common grid.

    Aligned arms: input pixels ``source`` go to grid pixels ``target``. Other arms: ``matrix``
    (grid pixels ``target`` x input pixels, rows summing to 1) holds the fraction of each grid
    pixel that each input pixel covers.
    """

    target: np.ndarray
    source: np.ndarray | None = None
    matrix: Any = None  # scipy.sparse.csr_matrix

    def apply(self, values: np.ndarray) -> np.ndarray:
        """A (n, n_in) array on the grid pixels ``target``, weights averaged."""
        if self.matrix is None:
            return values[:, self.source]
        return np.asarray(self.matrix @ values.T).T

    def apply_ivar(self, ivar: np.ndarray) -> np.ndarray:
        """Inverse variance on the grid; 0 where any contributing input pixel is masked."""
        if self.matrix is None:
            return ivar[:, self.source]
        bad = ivar <= 0
        var = np.where(bad, 0.0, 1.0 / np.where(bad, 1.0, ivar))
        w = self.matrix
        var_out = np.asarray(w.multiply(w) @ var.T).T
        n_bad = np.asarray((w > 0).astype(np.float64) @ bad.T.astype(np.float64)).T
        with np.errstate(divide="ignore"):
            return np.where((n_bad > 0) | (var_out <= 0), 0.0, 1.0 / var_out)


def arm_map(wave: np.ndarray, grid: np.ndarray) -> _ArmMap:
    pix = (wave - grid[0]) / DESI_WAVE_STEP
    k = np.rint(pix)
    if np.all(np.abs(pix - k) < _ALIGN_TOLERANCE) and np.all(np.diff(k) == 1):
        keep = np.nonzero((k >= 0) & (k < grid.size))[0]
        return _ArmMap(target=k[keep].astype(np.int64), source=keep)
    from scipy import sparse  # scipy comes with jax

    # pixel edges: midpoints between centres; grid pixels are +-0.4 A around theirs
    mid = 0.5 * (wave[1:] + wave[:-1])
    edges = np.concatenate([[wave[0] - (mid[0] - wave[0])], mid, [wave[-1] + (wave[-1] - mid[-1])]])
    lo, hi = grid - DESI_WAVE_STEP / 2, grid + DESI_WAVE_STEP / 2
    first = np.clip(np.searchsorted(edges, lo, side="right") - 1, 0, wave.size - 1)
    reach = int(np.ceil(DESI_WAVE_STEP / np.min(np.diff(wave)))) + 2
    rows, cols, vals = [], [], []
    for step in range(reach):
        i = first + step
        ok = i < wave.size
        ii = np.minimum(i, wave.size - 1)
        overlap = np.minimum(edges[ii + 1], hi) - np.maximum(edges[ii], lo)
        ok &= overlap > 0
        rows.append(np.nonzero(ok)[0])
        cols.append(ii[ok])
        vals.append(overlap[ok] / DESI_WAVE_STEP)
    w = sparse.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(grid.size, wave.size))
    covered = np.nonzero(np.isclose(np.asarray(w.sum(axis=1)).ravel(), 1.0, atol=1e-6))[0]  # whole grid pixel inside the arm
    return _ArmMap(target=covered, matrix=w[covered])


def _resolution_sigma2(resolution: np.ndarray, wave: np.ndarray) -> np.ndarray:
    """Variance (Angstrom^2) of the resolution kernel at each pixel, (n, n_pix).

    ``resolution`` is DESI's (n, n_diag, n_pix) band storage of the resolution matrix R
    (``scipy.sparse.dia_matrix`` with offsets ``n_diag // 2 ... -(n_diag // 2)``): column j
    spreads a unit of flux at pixel j over its neighbours. Its second central moment in pixels,
    times the local pixel size squared, is the instrumental sigma^2 at that pixel.
    """
    n_diag = resolution.shape[1]
    offsets = (n_diag // 2 - np.arange(n_diag)).astype(np.float32)
    r = np.asarray(resolution, dtype=np.float32)
    norm = r.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        m1 = np.einsum("d,ndp->np", offsets, r) / norm
        m2 = np.einsum("d,ndp->np", offsets**2, r) / norm
    var_pix = np.where(norm > 0, np.clip(m2 - m1**2, 0.0, None), np.nan)
    return var_pix * np.gradient(wave) ** 2


def read_rows(path: str, rows: np.ndarray, arms: dict, ebv, *, grid: np.ndarray, fill_value: float, resolution: bool, law, r_v) -> np.ndarray:
    """Rows ``rows`` of one file on the common grid: (3, len(rows), n_grid) float32 with
    flux, ivar and the instrumental FWHM (module level so processes can run it)."""
    lo, hi = int(rows.min()), int(rows.max()) + 1
    pick = rows - lo
    n, g = rows.size, grid.size
    ivar_sum = np.zeros((n, g))
    weighted = np.zeros((n, g))
    flux_sum = np.zeros((n, g))  # plain mean of the arms' finite fluxes, for masked pixels
    flux_count = np.zeros((n, g))
    s2_weighted = np.zeros((n, g))
    s2_weight = np.zeros((n, g))
    with open_checked(path, memmap=True) as hdul:
        for arm, info in arms.items():
            amap: _ArmMap = info["map"]
            flux = np.asarray(hdul[f"{arm}_FLUX"].section[lo:hi], dtype=np.float64)[pick] * info["scale"]
            ivar = np.asarray(hdul[f"{arm}_IVAR"].section[lo:hi], dtype=np.float64)[pick] / info["scale"] ** 2
            bad = ~np.isfinite(flux) | ~np.isfinite(ivar) | (ivar < 0)
            if info["mask"]:
                bad |= np.asarray(hdul[f"{arm}_MASK"].section[lo:hi])[pick] != 0
            ivar = np.where(bad, 0.0, ivar)
            finite = np.isfinite(flux)
            t = amap.target
            f_on = amap.apply(np.where(finite, flux, 0.0))
            iv_on = amap.apply_ivar(ivar)
            ok_on = amap.apply(finite.astype(np.float64)) > 1 - 1e-9
            ivar_sum[:, t] += iv_on
            weighted[:, t] += iv_on * f_on
            flux_sum[:, t] += np.where(ok_on, f_on, 0.0)
            flux_count[:, t] += ok_on
            if resolution and info["resolution"]:
                res = np.asarray(hdul[f"{arm}_RESOLUTION"].section[lo:hi])[pick]
                s2 = amap.apply(np.nan_to_num(_resolution_sigma2(res, info["wave"]), nan=0.0))
                w = np.where(iv_on > 0, iv_on, 1e-30)  # masked pixels still carry the resolution
                s2_weighted[:, t] += w * s2
                s2_weight[:, t] += w
    with np.errstate(divide="ignore", invalid="ignore"):
        flux = np.where(ivar_sum > 0, weighted / ivar_sum, np.where(flux_count > 0, flux_sum / flux_count, fill_value))
        sigma = np.sqrt(s2_weighted / s2_weight)
    inst = np.where(s2_weight > 0, _FWHM_PER_SIGMA * sigma / grid * _C_KMS, np.nan)
    if ebv is not None:
        flux, ivar_sum = dered(grid, flux, ivar_sum, ebv, law=law, r_v=r_v)
    return np.stack([flux, ivar_sum, inst]).astype(np.float32)
