"""Fit-status tables of a result: counts, a summary per status, the ok mask."""

from __future__ import annotations

import warnings

import numpy as np
import xarray as xr

from ..status import Status

__all__ = ["ok", "status_counts", "status_names", "summary"]


def status_names(ds: xr.Dataset, variable: str = "status") -> xr.DataArray:
    """``ds[variable]`` decoded to names from its CF ``flag_values``/``flag_meanings`` (the
    :class:`~sheap_dask.status.Status` names when it has none); ``unknown_<code>`` otherwise."""
    from ..errors import InputDataError

    if variable not in ds:
        options = sorted(str(v) for v in ds.data_vars if str(v) == "status" or str(v).endswith("_status"))
        raise InputDataError(f"variable={variable!r} is not in this Dataset; status variables here: {options or 'none'}.")
    var = ds[variable]
    values, meanings = var.attrs.get("flag_values"), var.attrs.get("flag_meanings")
    if values is not None and meanings:
        table = dict(zip((int(v) for v in np.atleast_1d(values)), str(meanings).split()))
    else:
        table = {s.value: s.meaning for s in Status}

    def decode(codes):
        codes = np.asarray(codes).astype(int)
        out = np.array([table.get(int(c), f"unknown_{int(c)}") for c in codes.ravel()], dtype=object)
        return out.reshape(codes.shape).astype(str)

    names = xr.apply_ufunc(decode, var, dask="parallelized", output_dtypes=[str])
    names.attrs = {"long_name": f"{var.attrs.get('long_name', variable)} (names)"}
    return names.rename(f"{variable}_name")


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
    """Status table: count, fraction, median reduced chi-square and meaning per status (DataFrame).

    The table's ``attrs`` say how many chunks are done: ``progress`` ("k of n chunks done"
    and the missing chunks), ``chunks_done``, ``n_chunks``, ``missing_chunks``. A partial fit
    store (an interrupted fit: rows with status ``pending``) warns with the chunks missing.
    """
    import pandas as pd

    codes = np.asarray(ds["status"].values).astype(int)
    redchi2 = np.asarray(ds["redchi2"].values, dtype=np.float64) if "redchi2" in ds else None
    n = max(codes.size, 1)
    rows = {}
    for s in Status:
        sel = codes == s.value
        med = float(np.nanmedian(redchi2[sel])) if redchi2 is not None and sel.any() and np.isfinite(redchi2[sel]).any() else np.nan
        rows[s.meaning] = {"count": int(sel.sum()), "fraction": sel.sum() / n, "median_redchi2": med, "message": s.message}
    table = pd.DataFrame.from_dict(rows, orient="index")
    _report_progress(ds, table)
    return table


def _report_progress(ds: xr.Dataset, table) -> None:
    from ..errors import PartialStoreWarning
    from ..store import dataset_progress, partial_message

    progress = dataset_progress(ds)
    if progress is None:
        return
    table.attrs.update(
        progress=progress.describe(), chunks_done=progress.n_done, n_chunks=progress.n_chunks, missing_chunks=progress.missing
    )
    if not progress.complete:
        source = ds.encoding.get("source")
        where = repr(source) if source else "this fit result"
        warnings.warn(partial_message(where, progress), PartialStoreWarning, stacklevel=4)


def ok(ds: xr.Dataset) -> xr.DataArray:
    """Boolean mask along spectrum: status is converged or converged after fallback."""
    good = [s.value for s in Status if s.ok]
    return ds["status"].isin(good).rename("ok")
