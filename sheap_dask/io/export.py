"""The catalogue as files: FITS, parquet and CSV, with units, descriptions and flag meanings.

Every column along the spectrum dimension (the spectrum index, the input's coordinates, the
catalogue's variables) becomes one table column with the same values and dtype (integers stay
integers, booleans booleans, strings plain text). What CF attrs say travels with it:

- **FITS** (:func:`to_fits`): a binary table (int8 columns as int16: FITS has no signed
  byte, and astropy would write them as logicals); ``TUNITn`` the FITS form of the CF unit
  (``km s-1``, ``10**-17 erg s-1 cm-2``, ``log(erg s-1)`` for log10 quantities), ``TCOMMn`` the
  description, and for flag columns ``TFLAGn`` = ``"1:not_detected 2:param_at_bound ..."``
  (bit masks) or ``"0:converged 1:converged_after_fallback ..."`` (values); the catalogue's
  provenance in the primary header.
- **parquet** (:func:`to_parquet`, needs the optional ``pyarrow``: ``pip install
  sheap-dask[parquet]``): each field's metadata holds ``units``, ``long_name`` and the flag
  attrs; the schema metadata ``sheap_units`` and ``sheap_flag_meanings`` (JSON: column ->
  text) and ``sheap_attrs`` (the catalogue's attrs).
- **CSV** (:func:`to_csv`): ECSV (a CSV with a ``#``-commented YAML header holding each
  column's unit, description and flag attrs): ``astropy.table.Table.read(path)`` restores them,
  ``pandas.read_csv(path, comment="#")`` reads the values. An empty text (``mbh_recipe`` where
  no fiducial mass exists) reads back as a missing value there.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import xarray as xr

from ..errors import InputDataError, MissingDependencyError, StoreExistsError

__all__ = ["catalog_columns", "fits_unit", "to_csv", "to_fits", "to_parquet"]

#: CF flag attrs carried into the files
FLAG_ATTRS = ("flag_masks", "flag_values", "flag_meanings")


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def catalog_columns(cat: xr.Dataset, dim: str | None = None) -> list[tuple[str, np.ndarray, dict]]:
    """``(name, values, attrs)`` of every column of ``cat`` along ``dim`` (default: its only
    dimension), in order: the index, the coordinates, the variables."""
    if dim is None:
        dims = [d for d in cat.dims]
        if len(dims) != 1:
            raise InputDataError(f"cat has dimensions {dims}; a catalogue table has one (the spectrum dimension): pass dim=.")
        dim = dims[0]
    names = [dim] if dim in cat.variables else []
    names += [str(c) for c in cat.coords if c != dim and cat[c].dims == (dim,)]
    names += [str(v) for v in cat.data_vars if cat[v].dims == (dim,)]
    skipped = [str(v) for v in cat.variables if cat[v].dims not in ((dim,), ()) and str(v) not in names]
    if skipped:
        raise InputDataError(f"cat has variables that are not one column along {dim!r}: {skipped}; drop or reduce them first.")
    out = []
    for name in names:
        var = cat[name]
        values = np.asarray(var.values)
        if values.dtype.kind not in "biufc":  # zarr v3 strings (StringDType), objects -> plain text
            values = np.array([v.decode() if isinstance(v, bytes) else str(v) for v in values.ravel()], dtype=str).reshape(values.shape)
        out.append((name, values, dict(var.attrs)))
    return out


def fits_unit(units: str | None) -> str:
    """The FITS ``TUNITn`` of a CF unit string (``"log10(erg/s)"`` -> ``"log(erg s-1)"``)."""
    from ..catalog_table import UNITS_FITS

    if not units or units == "1":
        return ""
    if units in UNITS_FITS:
        return UNITS_FITS[units]
    if units.startswith("log10(") and units.endswith(")"):
        return f"log({fits_unit(units[6:-1])})"
    import warnings

    import astropy.units as u

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CF's "erg/s/cm2" has several slashes: fine to read, FITS writes it otherwise
        unit = u.Unit(units, parse_strict="silent")
    return units if isinstance(unit, u.UnrecognizedUnit) else unit.to_string("fits")


def _flag_text(attrs: Mapping) -> str | None:
    meanings = attrs.get("flag_meanings")
    if not meanings:
        return None
    codes = attrs.get("flag_masks", attrs.get("flag_values"))
    if codes is None:
        return str(meanings)
    return " ".join(f"{int(c)}:{m}" for c, m in zip(np.atleast_1d(codes), str(meanings).split()))


def _check_path(path, overwrite: bool) -> str:
    path = os.fspath(path)
    if os.path.isdir(path):
        raise StoreExistsError(f"path {path!r} is a directory; pass a file name (e.g. catalog.fits).")
    if os.path.exists(path) and not overwrite:
        raise StoreExistsError(f"path {path!r} exists; pass overwrite=True to replace it (or a new path).")
    return path


def to_fits(cat: xr.Dataset, path: str | os.PathLike, *, overwrite: bool = False) -> str:
    """Write the catalogue as a FITS binary table (extension ``CATALOG``).

    Parameters
    ----------
    cat : xarray.Dataset
        A catalogue of :func:`sheap_dask.fit_catalog` (any Dataset of one dimension works).
    path : str or path
        The file.
    overwrite : bool
        Replace an existing file.

    Returns
    -------
    str
        ``path``. ``astropy.table.Table.read(path)`` reads it back with its units;
        ``TCOMMn`` holds each column's description and ``TFLAGn`` its flag meanings.
    """
    from astropy.io import fits
    from astropy.table import Column, Table

    path = _check_path(path, overwrite)
    columns = catalog_columns(cat)
    table = Table()
    for name, values, attrs in columns:
        unit = fits_unit(attrs.get("units"))
        if values.dtype == np.int8:  # astropy writes int8 as a FITS logical ('L'): widen to 16 bits
            values = values.astype(np.int16)
        table[name] = Column(values, name=name, unit=unit or None, description=attrs.get("long_name"))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # log units are FITS function units that astropy does not parse
        hdu = fits.table_to_hdu(table)
    hdu.name = "CATALOG"
    for i, (name, _, attrs) in enumerate(columns, start=1):
        if attrs.get("long_name"):
            hdu.header[f"TCOMM{i}"] = str(attrs["long_name"])
        flags = _flag_text(attrs)
        if flags:
            hdu.header[f"TFLAG{i}"] = flags
    primary = fits.PrimaryHDU()
    for key, value in cat.attrs.items():
        primary.header[f"HIERARCH {key}"[:70]] = str(value) if not isinstance(value, (int, float)) else value
    primary.header["COMMENT"] = "sheap_dask catalogue: the table is extension CATALOG; TCOMMn describe the columns, TFLAGn the flags."
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fits.verify.VerifyWarning)  # long HIERARCH cards continue
        fits.HDUList([primary, hdu]).writeto(path, overwrite=overwrite)
    return path


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingDependencyError("to_parquet needs pyarrow: pip install 'sheap-dask[parquet]' (or pip install pyarrow).") from None
    return pa, pq


def to_parquet(cat: xr.Dataset, path: str | os.PathLike, *, overwrite: bool = False) -> str:
    """Write the catalogue as a parquet file (needs ``pyarrow``: ``sheap-dask[parquet]``).

    Each field carries ``units``, ``long_name`` and the CF flag attrs in its metadata; the
    schema metadata holds ``sheap_units`` and ``sheap_flag_meanings`` (JSON, column -> text) and
    ``sheap_attrs`` (the catalogue's attrs). Returns ``path``.
    """
    pa, pq = _pyarrow()
    path = _check_path(path, overwrite)
    fields, arrays, units, flags = [], [], {}, {}
    for name, values, attrs in catalog_columns(cat):
        meta = {"long_name": str(attrs.get("long_name", "")), "units": str(attrs.get("units", ""))}
        for key in FLAG_ATTRS:
            if key in attrs:
                meta[key] = json.dumps(_plain(attrs[key]))
        arr = pa.array(values)
        fields.append(pa.field(name, arr.type, metadata=meta))
        arrays.append(arr)
        if "units" in attrs:
            units[name] = str(attrs["units"])
        if _flag_text(attrs):
            flags[name] = _flag_text(attrs)
    schema = pa.schema(fields, metadata={
        "sheap_units": json.dumps(units),
        "sheap_flag_meanings": json.dumps(flags),
        "sheap_attrs": json.dumps({k: _plain(v) for k, v in cat.attrs.items()}, default=str),
    })
    pq.write_table(pa.Table.from_arrays(arrays, schema=schema), path)
    return path


def to_csv(cat: xr.Dataset, path: str | os.PathLike, *, overwrite: bool = False) -> str:
    """Write the catalogue as ECSV: comma-separated values after a ``#``-commented YAML header
    with each column's unit, description and flag meanings (read it with
    ``astropy.table.Table.read(path, format="ascii.ecsv")`` or ``pandas.read_csv(path,
    comment="#")``). Returns ``path``."""
    import warnings

    from astropy.table import Column, Table

    path = _check_path(path, overwrite)
    table = Table()
    for name, values, attrs in catalog_columns(cat):
        meta = {k: _plain(attrs[k]) for k in FLAG_ATTRS if k in attrs}
        unit = attrs.get("units")
        table[name] = Column(values, name=name, unit=None if unit in (None, "1") else unit, description=attrs.get("long_name"), meta=meta)
    table.meta = {k: _plain(v) for k, v in cat.attrs.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # log10(...) units are kept as text
        table.write(path, format="ascii.ecsv", delimiter=",", overwrite=overwrite)
    return path
