"""DESI redshifts: a redrock or zcatalog table matched to spectra on TARGETID."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import InputDataError, OptionError
from ._fits import open_checked

_TABLE_HDUS = ("REDSHIFTS", "ZCATALOG", "ZCAT")


def _from_fits(path: str) -> Any:
    from astropy.table import Table

    with open_checked(path) as hdul:
        names = [h.name.upper() for h in hdul]
        hdu = next((n for n in _TABLE_HDUS if n in names), None)
        if hdu is None:  # any table with the two columns that matter
            hdu = next(
                (i for i, h in enumerate(hdul) if getattr(h, "columns", None) is not None and {"TARGETID", "Z"} <= {c.upper() for c in h.columns.names}),
                None,
            )
        if hdu is None:
            raise InputDataError(f"{path}: no REDSHIFTS/ZCATALOG HDU and no table with TARGETID and Z columns (HDUs: {names})")
        return Table(hdul[hdu].data)


def load_redshift_table(redshifts: Any) -> dict[str, np.ndarray]:
    """Columns (upper-case names) of a redshift table given as a path, a table or a mapping."""
    if isinstance(redshifts, (str, os.PathLike)):
        path = os.fspath(redshifts)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"redshift table not found: {path!r} (argument redshifts)")
        if path.lower().endswith((".fits", ".fit", ".fits.gz", ".fz")):
            table = _from_fits(path)
        else:
            from astropy.table import Table

            table = Table.read(path)
    else:
        table = redshifts
    if hasattr(table, "colnames"):  # astropy Table
        columns = {c.upper(): np.asarray(table[c]) for c in table.colnames}
    elif hasattr(table, "columns") and hasattr(table, "__getitem__"):  # pandas DataFrame
        columns = {str(c).upper(): np.asarray(table[c]) for c in table.columns}
    elif isinstance(table, Mapping):
        if any(str(k).upper() == "TARGETID" for k in table):
            columns = {str(k).upper(): np.asarray(v) for k, v in table.items()}
        else:  # {targetid: z}
            columns = {"TARGETID": np.asarray(list(table.keys())), "Z": np.asarray(list(table.values()), dtype=np.float64)}
    else:
        raise OptionError(
            f"redshifts={type(redshifts).__name__}: give a path to a redrock/zcatalog file, an astropy Table, "
            "or a mapping ({'TARGETID': [...], 'Z': [...]} or {targetid: z})"
        )
    missing = [c for c in ("TARGETID", "Z") if c not in columns]
    if missing:
        raise InputDataError(f"redshifts: the table has no {' and no '.join(missing)} column (it has {sorted(columns)[:12]})")
    return columns


def _strings(values: np.ndarray) -> np.ndarray:
    if values.dtype.kind == "S":
        values = np.char.decode(values, "ascii", "replace")
    return np.char.strip(values.astype(str)).astype(object)


def _positions(table_keys: list[np.ndarray], spectra_keys: list[np.ndarray]) -> np.ndarray | None:
    """Row of the table for each spectrum (-1: none), or None when a key is not unique."""
    import pandas as pd

    def index(keys):
        return pd.Index(keys[0]) if len(keys) == 1 else pd.MultiIndex.from_arrays(keys)

    table = index(table_keys)
    if not table.is_unique:
        return None
    return np.asarray(table.get_indexer(index(spectra_keys)))


def match_redshifts(
    redshifts: Any, spectra: Mapping[str, np.ndarray], *, qso_only: bool, missing: str
) -> tuple[dict[str, np.ndarray], np.ndarray, str]:
    """Redshift coordinates for every spectrum, which spectra to keep, and a note for attrs.

    ``spectra`` holds ``targetid``, ``survey`` and ``program`` per spectrum. A target listed
    more than once (a zcatalog over several surveys/programs) is matched on TARGETID, SURVEY
    and PROGRAM, else on its ``ZCAT_PRIMARY`` row; any other repeat is an error.
    """
    cols = load_redshift_table(redshifts)
    tid = cols["TARGETID"].astype(np.int64)
    target = spectra["targetid"]
    pos = _positions([tid], [target])
    if pos is None and {"SURVEY", "PROGRAM"} <= set(cols) and all(np.all(spectra[k] != "") for k in ("survey", "program")):
        pos = _positions(
            [tid, _strings(cols["SURVEY"]), _strings(cols["PROGRAM"])],
            [target, spectra["survey"].astype(object), spectra["program"].astype(object)],
        )
    if pos is None and "ZCAT_PRIMARY" in cols:
        primary = np.nonzero(cols["ZCAT_PRIMARY"].astype(bool))[0]
        sub = _positions([tid[primary]], [target])
        pos = None if sub is None else np.where(sub >= 0, primary[np.maximum(sub, 0)], -1)
    if pos is None:
        values, counts = np.unique(tid, return_counts=True)
        raise InputDataError(
            f"redshifts: TARGETID {values[counts > 1][:5].tolist()} appear more than once in the table; "
            "give one row per target (e.g. the ZCAT_PRIMARY rows of a zcatalog)"
        )
    found = pos >= 0
    at = np.maximum(pos, 0)

    def column(name, fill, dtype):
        if name not in cols:
            return np.full(target.size, fill, dtype=dtype)
        values = _strings(cols[name]) if dtype is object else cols[name].astype(dtype)
        return np.where(found, values[at], fill).astype(dtype)

    coords = {
        "redshift": column("Z", np.nan, np.float64),
        "redshift_err": column("ZERR", np.nan, np.float64),
        "zwarning": np.where(found, column("ZWARN", 0, np.int64), -1),
        "objclass": column("SPECTYPE", "", object),
    }
    n, n_missing = target.size, int(np.sum(~found))
    note = f"{n - n_missing} of {n} spectra matched on TARGETID"
    if n_missing:
        first = target[~found][:5].tolist()
        if missing == "raise":
            raise InputDataError(
                f"redshifts: {n_missing} of {n} spectra have no row in the redshift table (TARGETID {first}"
                f"{' ...' if n_missing > 5 else ''}); pass missing_redshift='keep' or 'drop' to go on without them"
            )
        left_out = missing == "drop" or qso_only
        note += f"; {n_missing} without a redshift {'left out' if left_out else 'kept with NaN redshift'}"
        warnings.warn(
            f"redshifts: {n_missing} of {n} spectra have no redshift (TARGETID {first}{' ...' if n_missing > 5 else ''}); "
            + ("they are left out" if left_out else "they are kept with redshift NaN and fit as no_data"),
            UserWarning,
            stacklevel=4,
        )
    keep = found.copy() if missing == "drop" else np.ones(n, dtype=bool)
    if qso_only:
        absent = [c for c in ("SPECTYPE", "ZWARN") if c not in cols]
        if absent:
            raise OptionError(f"qso_only=True needs the {' and '.join(absent)} column(s), which the redshift table lacks")
        qso = found & (coords["objclass"] == "QSO") & (coords["zwarning"] == 0)
        note += f"; qso_only: {int(np.sum(found & ~qso))} not QSO or ZWARN != 0 left out"
        keep &= qso
    return coords, keep, note
