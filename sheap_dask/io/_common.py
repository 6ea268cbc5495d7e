"""Helpers the readers share: file lists, reader pools, units."""

from __future__ import annotations

import functools
import glob
import multiprocessing
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor

import numpy as np

from ..errors import InputDataError, OptionError

FLUX_UNITS = "1e-17 erg / (s cm2 Angstrom)"
IVAR_UNITS = "(1e-17 erg / (s cm2 Angstrom))**-2"


def default_jobs(n_jobs: int | None) -> int:
    if n_jobs is None:
        # Reading FITS files is I/O plus small numpy work that releases the GIL for the copy;
        # the ThreadPoolExecutor default is a good fit.
        return min(32, (os.cpu_count() or 1) + 4)
    if not isinstance(n_jobs, (int, np.integer)) or n_jobs < 1:
        raise OptionError(f"n_jobs must be a positive integer or None, got {n_jobs!r}")
    return int(n_jobs)


def expand_files(files: str | os.PathLike | Iterable[str | os.PathLike], kind: str = "SDSS spec") -> list[str]:
    """Normalise ``files``: a path, a glob pattern, a directory, or an iterable of those.

    ``kind`` names the files in messages ("SDSS spec", "DESI coadd").
    """
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    out: list[str] = []
    for item in files:
        s = os.fspath(item)
        if any(c in s for c in "*?[") and not os.path.exists(s):
            matched = sorted(glob.glob(s))
            if not matched:
                raise FileNotFoundError(f"files: the pattern {s!r} matches no file")
            out.extend(matched)
        elif os.path.isdir(s):
            matched = sorted(glob.glob(os.path.join(s, "*.fits")))
            if not matched:
                raise FileNotFoundError(f"files: the directory {s!r} holds no *.fits file")
            out.extend(matched)
        else:
            out.append(s)
    if not out:
        raise OptionError(f"files is empty: pass one or more {kind} FITS paths")
    for s in out:
        if not os.path.isfile(s):
            raise FileNotFoundError(f"{kind.split()[0]} spectrum file not found: {s!r} (argument files); check the path")
    # The same file twice (two globs, a path and a link): read once, at its first place.
    seen: set[str] = set()
    unique, repeats = [], []
    for s in out:
        key = os.path.realpath(s)
        if key in seen:
            repeats.append(s)
            continue
        seen.add(key)
        unique.append(s)
    if repeats:
        warnings.warn(
            f"files: {len(repeats)} of the {len(out)} files given repeat another one (e.g. {repeats[0]!r}); each file is read once",
            UserWarning,
            stacklevel=3,
        )
    return unique


def colmap(columns: Sequence[str]) -> dict[str, str]:
    return {c.lower(): c for c in columns}


PARALLEL = ("threads", "processes")


def make_pool(parallel: str, n_jobs: int | None) -> Executor:
    if parallel not in PARALLEL:
        raise OptionError(f"parallel={parallel!r}: use 'threads' (I/O-bound, default) or 'processes' (CPU-bound, many cores)")
    n_jobs = default_jobs(n_jobs)
    if parallel == "processes":
        # spawn, not fork: forking a process that has started JAX or dask threads can deadlock
        return ProcessPoolExecutor(n_jobs, mp_context=multiprocessing.get_context("spawn"))
    return ThreadPoolExecutor(n_jobs)


def _scan_or_error(scan: Callable[[str], dict], path: str) -> dict | InputDataError:
    try:
        return scan(path)
    except (InputDataError, OSError) as exc:  # OSError: unreadable, vanished, permissions
        return exc if isinstance(exc, InputDataError) else InputDataError(f"{path}: {exc}")


def scan_files(
    pool: Executor, scan: Callable[[str], dict], files: list[str], *, skip_bad: bool, chunksize: int = 1
) -> tuple[list[int], list[dict], list[str]]:
    """Run ``scan`` (metadata of one file) over ``files`` in ``pool``.

    Returns the indices of the files that scanned, their metadata, and one ``"path: reason"``
    line per bad file. A bad file raises its error (which names it) unless ``skip_bad``; then
    it is left out, and a warning says how many were and names the first.
    """
    keep, metas, bad = [], [], []
    guarded = functools.partial(_scan_or_error, scan)
    for i, meta in enumerate(pool.map(guarded, files, chunksize=chunksize)):
        if isinstance(meta, InputDataError):
            if not skip_bad:
                from ..stores import spell

                # The first bad file names itself, among thousands, with the way past it.
                raise InputDataError(
                    f"{meta} (file {i + 1} of {len(files)}; to leave unreadable files out and list them in the "
                    f"store's attrs['skipped_files'], pass {spell('skip_bad=True')})"
                ) from meta
            bad.append(str(meta))
        else:
            keep.append(i)
            metas.append(meta)
    if bad:
        warnings.warn(
            f"skip_bad: left out {len(bad)} of {len(files)} files that cannot be read, e.g. {bad[0]} "
            "(all are listed in the attribute skipped_files)",
            UserWarning,
            stacklevel=3,
        )
    return keep, metas, bad
