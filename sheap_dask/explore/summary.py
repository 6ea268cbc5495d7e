"""Fit-status tables of a result: counts, a summary per status, the ok mask."""

from __future__ import annotations

import numpy as np
import xarray as xr

from ..status import Status

__all__ = ["ok", "status_counts", "summary"]


def status_counts(ds: xr.Dataset):
    """Number of spectra per status (pandas Series indexed by status name, every status listed)."""
    import pandas as pd

    codes = np.asarray(ds["status"].values).astype(int)
    counts = {s.meaning: int(np.sum(codes == s.value)) for s in Status}
    other = int(np.sum(~np.isin(codes, [s.value for s in Status])))
    if other:
        counts["unknown"] = other
    return pd.Series(counts, name="count")


def summary(ds: xr.Dataset):
    """Status table: count, fraction, median reduced chi-square and meaning per status (DataFrame)."""
    import pandas as pd

    codes = np.asarray(ds["status"].values).astype(int)
    redchi2 = np.asarray(ds["redchi2"].values, dtype=np.float64) if "redchi2" in ds else None
    n = max(codes.size, 1)
    rows = {}
    for s in Status:
        sel = codes == s.value
        med = float(np.nanmedian(redchi2[sel])) if redchi2 is not None and sel.any() and np.isfinite(redchi2[sel]).any() else np.nan
        rows[s.meaning] = {"count": int(sel.sum()), "fraction": sel.sum() / n, "median_redchi2": med, "message": s.message}
    return pd.DataFrame.from_dict(rows, orient="index")


def ok(ds: xr.Dataset) -> xr.DataArray:
    """Boolean mask along spectrum: status is converged or converged after fallback."""
    good = [s.value for s in Status if s.ok]
    return ds["status"].isin(good).rename("ok")
