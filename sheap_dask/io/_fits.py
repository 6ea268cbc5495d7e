"""FITS access the readers share: the optional astropy import and a fast binary-table row reader.

astropy is needed only for FITS files; it is the optional extra ``sheap-dask[sdss]``.
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Iterable
from typing import Any

import numpy as np

from ..errors import InputDataError, MissingDependencyError

FITS_INSTALL_HINT = "pip install 'sheap-dask[sdss]'"


def open_checked(path: str, *, n_hdus: int | None = None, memmap: bool = False):
    """Open a FITS file, read the headers of its first ``n_hdus`` HDUs (all when None) and
    check that their data lie inside the file: a truncated file is an error that says so.

    astropy alone drops the HDUs past the cut (with a warning), so a truncated file would
    otherwise surface as a confusing "HDU missing" error, or as a short read much later.
    (Not ``warnings.catch_warnings``: the readers run in threads, and it is process-wide.)
    """
    fits = fits_module()
    try:
        hdul = fits.open(path, memmap=memmap)
        hdus = list(hdul) if n_hdus is None else _first_hdus(hdul, n_hdus)
    except (OSError, ValueError, IndexError) as exc:
        raise InputDataError(f"{path}: not a readable FITS file ({exc})") from exc
    size = os.path.getsize(path)
    end = max(getattr(h, "_data_offset", 0) + getattr(h, "_data_size", 0) for h in hdus)
    # all HDUs read: bytes after the last complete one are the start of a cut-off HDU
    if end > size or (n_hdus is None and size > end):
        hdul.close()
        raise InputDataError(
            f"{path}: the file is truncated (its HDUs need {max(end, size + 2880)} bytes or more, "
            f"the file has {size}); download it again"
        )
    return hdul


def _first_hdus(hdul, n: int) -> list:
    out = []
    for i in range(n):  # not len(hdul): that reads every header of the file
        try:
            out.append(hdul[i])
        except IndexError:
            break
    return out


def fits_module():
    """Import ``astropy.io.fits`` or raise :class:`MissingDependencyError` with the fix."""
    try:
        return importlib.import_module("astropy.io.fits")
    except ImportError as exc:  # pragma: no cover - exercised with a monkeypatched import
        raise MissingDependencyError(
            "reading FITS spectra needs astropy, which is not installed; install it with "
            f"{FITS_INSTALL_HINT}"
        ) from exc


_TFORM = re.compile(r"^\s*(\d*)([LXBIJKAEDCMPQ])")
_TFORM_SIZE = {"L": 1, "B": 1, "I": 2, "J": 4, "K": 8, "A": 1, "E": 4, "D": 8, "C": 8, "M": 16, "P": 8, "Q": 16}
_TFORM_DTYPE = {"L": "i1", "B": "u1", "I": ">i2", "J": ">i4", "K": ">i8", "E": ">f4", "D": ">f8"}


def table_columns(header) -> dict[str, str]:
    """Lower-case name -> name of a binary table's columns, from its header alone."""
    n = int(header.get("TFIELDS", 0))
    return {str(header[f"TTYPE{i}"]).strip().lower(): str(header[f"TTYPE{i}"]).strip() for i in range(1, n + 1) if f"TTYPE{i}" in header}


def table_row(hdul, index: int, wanted: Iterable[str], row_index: int = 0) -> dict[str, Any]:
    """Values of the ``wanted`` columns (lower-case names) in one row of binary table ``index``.

    astropy builds a Column object for each of the ~240 columns of an SPALL/SPECOBJ table
    when its ``.data`` is touched (0.3-0.5 s a file); here the byte offsets come from the
    TFORMn keywords and only one row is read, which is ~50x faster.
    """
    header = hdul[index].header
    want = {w.lower() for w in wanted}
    offset, fields = 0, {}
    for i in range(1, int(header.get("TFIELDS", 0)) + 1):
        name = str(header[f"TTYPE{i}"]).strip()
        m = _TFORM.match(str(header[f"TFORM{i}"]))
        if m is None:
            raise InputDataError(f"HDU{index}: unsupported TFORM{i} = {header[f'TFORM{i}']!r}")
        rep = int(m.group(1)) if m.group(1) else 1
        code = m.group(2)
        size = (rep + 7) // 8 if code == "X" else rep * _TFORM_SIZE[code]
        if name.lower() in want and (code == "A" or code in _TFORM_DTYPE) and (
            f"TZERO{i}" not in header and f"TSCAL{i}" not in header
        ):
            fields[name.lower()] = (offset, code, rep)
        offset += size
    if not fields:
        return {}
    row_len = int(header["NAXIS1"])
    if offset != row_len:
        raise InputDataError(f"HDU{index}: TFORMs add up to {offset} bytes but NAXIS1 = {row_len}")
    # HDUList.fileinfo() gives the data offset too, but it re-serialises every header of the
    # file (0.3 s); the HDU's own offset attribute is what fileinfo reads.
    data_loc = getattr(hdul[index], "_data_offset", None)
    if data_loc is None:  # pragma: no cover - older/newer astropy without the attribute
        data_loc = hdul.fileinfo(index)["datLoc"]
    fileobj = hdul._file  # the file handle astropy already holds open
    if not 0 <= row_index < int(header.get("NAXIS2", 0)):
        raise InputDataError(f"HDU{index}: row {row_index} does not exist (NAXIS2 = {header.get('NAXIS2')})")
    fileobj.seek(data_loc + row_index * row_len)
    row = fileobj.read(row_len)
    out = {}
    for name, (off, code, rep) in fields.items():
        if code == "A":
            out[name] = row[off : off + rep].decode("ascii", "replace").rstrip("\x00 ")
        else:
            vals = np.frombuffer(row, dtype=_TFORM_DTYPE[code], count=rep, offset=off)
            out[name] = vals[0] if rep == 1 else vals.copy()
    return out
