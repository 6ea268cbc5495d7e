"""Batched solves of a chunk's spectra and the small helpers every chunk step shares.

:class:`ChunkArrays` holds one chunk's scaled, rest-frame arrays and bounds; :func:`solve`
runs the compiled batched solve on any subset of its spectra (padded to the compiled batch
size, in groups of it) and post-processes the result in float64 (exact ties, objective,
chi-square, J^T W J).
"""

from __future__ import annotations

import numpy as np

from .status import Status

__all__ = ["ChunkArrays", "solve", "batched_solve", "group_size", "update_redchi2", "pinned", "redchi2_outlier", "converged_median"]


class ChunkArrays:
    """The scaled, rest-frame arrays of one chunk and its bookkeeping (numpy)."""

    def __init__(self, **kw):
        self.__dict__.update(kw)

    def rows(self, idx):
        """(wavelength, flux, errors, lower, upper) of rows ``idx``."""
        wl = self.wl[idx] if self.wl.ndim == 2 else self.wl
        return wl, self.flux[idx], self.errors[idx], self.lower[idx], self.upper[idx]


def solve(compiled, chunk: ChunkArrays, start: np.ndarray, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Batched solve of ``rows`` from ``start[rows]`` (padded to the chunk's batch size, in
    groups of it when there are more rows): parameters with exact float64 ties, the
    objective, chi-square and J^T W J in float64."""
    batch = chunk.batch
    keys = ("params", "loss", "chi2", "status", "n_iter", "loss_history", "jtwj")
    parts = {k: [] for k in keys}
    for first in range(0, rows.size, batch):  # groups of the compiled batch, not a loop over spectra
        idx = rows[first : first + batch]
        take = np.concatenate([idx, np.full(batch - idx.size, idx[0])])
        wl, flux, errors, lower, upper = chunk.rows(take)
        res = batched_solve(compiled, chunk, start[take], take, idx.size)
        # ties and fixed values rebuilt in float64 from the free parameters: exact whatever
        # precision the solve ran in
        params = compiled.model.params.expand_free(res["params"][:, compiled.free_index], start[take])
        chi2, objective, jtwj = compiled.post_rows(params, wl, flux, errors, idx.size, group_size(batch))
        k = idx.size
        for name, value in (("params", params), ("loss", objective), ("chi2", chi2), ("jtwj", jtwj)):
            parts[name].append(value[:k])
        for name in ("status", "n_iter", "loss_history"):
            parts[name].append(res[name][:k])
    return {k: np.concatenate(v) for k, v in parts.items()}


def batched_solve(compiled, chunk: ChunkArrays, start: np.ndarray, take: np.ndarray, n_active: int) -> dict[str, np.ndarray]:
    """The compiled solve of the padded rows ``take`` (the first ``n_active`` are real)."""
    cast = lambda a: np.asarray(a).astype(chunk.dtype)  # noqa: E731
    wl, flux, errors, lower, upper = chunk.rows(take)
    queue = {"n_active": n_active} if compiled.slots else {}  # lanes skip the padding
    res = compiled.minimizer.run(cast(start), cast(flux), cast(wl), cast(errors), compiled.constraints(lower, upper), **queue)
    return {
        "params": np.array(res.params, dtype=np.float64),
        "status": np.array(res.status, dtype=np.int8),
        "n_iter": np.array(res.n_iter, dtype=np.int32),
        "loss_history": np.array(res.loss_history, dtype=np.float64),
    }


def group_size(batch: int) -> int:
    """Rows per float64 post-processing call: an eighth of the chunk, at least 8 (the
    Jacobian of padding rows is not worth computing)."""
    return max(1, min(batch, max(8, batch // 8)))


def update_redchi2(out, rows) -> None:
    with np.errstate(invalid="ignore", divide="ignore"):
        dof = out["dof"][rows]
        out["redchi2"][rows] = out["chi2"][rows] / np.where(dof > 0, dof, np.nan)


def pinned(params: np.ndarray, compiled, lower: np.ndarray, upper: np.ndarray, fraction: float) -> np.ndarray:
    """(n, n_params) mask: free parameters within ``fraction`` of their range from a bound
    (of max(|value|, 1) for a parameter with one finite bound)."""
    span = upper - lower
    near = np.zeros(params.shape, dtype=bool)
    with np.errstate(invalid="ignore"):
        tol = np.where(np.isfinite(span), fraction * span, fraction * np.maximum(np.abs(params), 1.0))
        near |= np.isfinite(lower) & (params - lower < tol)
        near |= np.isfinite(upper) & (upper - params < tol)
    free = np.zeros(compiled.n_params, dtype=bool)
    free[compiled.free_index] = True
    return near & free


def redchi2_outlier(redchi2, dof, median: float, n_sigma: float) -> np.ndarray:
    """Reduced chi-square more than ``n_sigma`` standard deviations (sqrt(2/dof) for a
    chi-square) above the chunk's median, scaled by that median (real data rarely sit at 1)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return redchi2 > median * (1.0 + n_sigma * np.sqrt(2.0 / np.maximum(dof, 1)))


def converged_median(out, good) -> float | None:
    ok = good & np.isin(out["status"], (Status.CONVERGED, Status.CONVERGED_AFTER_FALLBACK)) & np.isfinite(out["redchi2"])
    return float(np.median(out["redchi2"][ok])) if ok.any() else None


def clip_inside(values, lower, upper):
    """Clip strictly inside the bounds (per spectrum), see :func:`sheap_dask.model._clip_inside`."""
    from .model import _clip_inside

    return _clip_inside(values, lower, upper)
