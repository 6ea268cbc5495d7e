"""Spectra in zarr: opening and writing stores, and the chunk-by-chunk ingestion engine.

The readers of many files (:mod:`.sdss`, :mod:`.desi`) describe what they read as a *plan*
(:class:`BlockSource`): a number of spectra, a wavelength grid, and a method that reads any
block of spectra. :func:`lazy_dataset` turns a plan into a dask-backed Dataset and
:func:`ingest` streams it into a zarr store chunk by chunk (the next block read while the
previous one is written), so every file format gets the same parallelism, progress bar and
bounded memory.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import warnings
from collections.abc import Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np
import xarray as xr

from ..errors import (
    InputDataError,
    MissingDependencyError,
    OptionError,
    ResumeMismatchError,
    ResumeWarning,
)
from ..stores import (
    KIND_ATTR,
    StoreLock,
    clear_store,
    describe_path,
    refuse_foreign,
    refuse_input_overlap,
    spell,
)
from ._common import expand_files, make_pool

__all__ = ["open_spectra", "write_zarr"]


class BlockSource(Protocol):
    """What :func:`ingest` and :func:`lazy_dataset` need from a reader's plan."""

    n_spectra: int
    n_wave: int
    #: names of the (spectrum, wavelength) float32 variables ``read_block`` returns, in order
    variables: tuple[str, ...]

    def read_block(self, start: int, stop: int, pool: Executor | None = None) -> tuple[np.ndarray, ...]:
        """The variables of spectra ``start:stop``, each ``(stop - start, n_wave)`` float32."""

    def block_token(self, start: int, stop: int) -> str:
        """A dask key for the block: changes whenever what it reads changes."""

    def dataset(self, arrays: tuple[Any, ...], *, spectrum_dim: str, wavelength_dim: str) -> xr.Dataset:
        """The Dataset with the given variables (numpy or dask) and the plan's coordinates."""


def check_chunk(chunk: Any) -> int:
    if not isinstance(chunk, (int, np.integer)) or isinstance(chunk, bool) or chunk < 1:
        raise OptionError(f"chunk must be a positive number of spectra, got {chunk!r}")
    return int(chunk)


def open_spectra(path_or_url: Any, **kwargs: Any) -> xr.Dataset:
    """Open a spectra zarr store (local path, fsspec URL such as ``s3://...``, or store object).

    Parameters
    ----------
    path_or_url : str, os.PathLike, or zarr store
        Where the store is. URLs need fsspec and the package of their filesystem
        (``s3fs`` for ``s3://``, ``gcsfs`` for ``gs://``, ...).
    **kwargs
        Passed to :func:`xarray.open_zarr` (``chunks=``, ``storage_options=``, ...).

    Returns
    -------
    xarray.Dataset
        Lazy, dask-backed, chunked as stored.

    Raises
    ------
    FileNotFoundError
        A local path that does not exist.
    sheap_dask.errors.MissingDependencyError
        fsspec, or the filesystem package of the URL's protocol, is missing.
    """
    if isinstance(path_or_url, (str, os.PathLike)):
        s = os.fspath(path_or_url)
        if "://" in s:
            protocol = s.split("://", 1)[0]
            try:
                import fsspec
            except ImportError as exc:
                raise MissingDependencyError(f"opening {s!r} needs fsspec: pip install fsspec") from exc
            if protocol not in ("file", "memory"):
                try:
                    fsspec.get_filesystem_class(protocol)
                except ImportError as exc:
                    raise MissingDependencyError(
                        f"opening {s!r} needs the fsspec filesystem for {protocol!r}, which is not installed ({exc})"
                    ) from exc
                except ValueError as exc:
                    raise OptionError(f"path_or_url={s!r}: unknown protocol {protocol!r} ({exc})") from exc
        elif not os.path.exists(s):
            raise FileNotFoundError(f"zarr store not found: {s!r} (argument path_or_url)")
    if kwargs.get("storage_options") is None:
        kwargs.pop("storage_options", None)
    with quiet_consolidated():
        ds = xr.open_zarr(path_or_url, **kwargs)
    # the ingestion's bookkeeping stays in the store; the Dataset is the spectra alone
    if ds.attrs.pop("sheap_ingest_complete", 1) == 0:
        warnings.warn(
            f"{path_or_url!r} is a partial ingestion: some chunks were never written (NaN there); "
            "run the same ingestion again with resume=True to finish it",
            UserWarning,
            stacklevel=2,
        )
    ds.attrs.pop("sheap_ingest_identity", None)
    ds.attrs.pop(KIND_ATTR, None)  # a copy written elsewhere is not one of our stores
    return ds


@contextlib.contextmanager
def quiet_consolidated():
    """Silence zarr 3's note that consolidated metadata is not in the v3 spec.

    xarray writes and reads consolidated metadata by default (one read instead of one per
    array, which matters on object stores); the note would otherwise print on every open.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        # zarr's walk of the hierarchy (consolidating metadata) meets our lock file
        warnings.filterwarnings("ignore", message=r"Object at sheap_lock\.json.* is not recognized as a component")
        yield


def write_zarr(
    ds: xr.Dataset,
    store: Any,
    *,
    chunk: int | None = None,
    overwrite: bool = False,
    spectrum_dim: str = "spectrum",
    **kwargs: Any,
) -> xr.Dataset:
    """Write a spectra Dataset to zarr in the sheap_dask conventions and return it reopened.

    The store is chunked along ``spectrum`` only (one chunk spans the whole wavelength axis,
    what ``fit_dataset`` maps over); stale ``encoding`` left by a previous open is dropped so
    the new chunks apply.

    Parameters
    ----------
    ds : xarray.Dataset
        Spectra (``flux``, ``ivar`` or ``flux_err``, coordinates).
    store : str, os.PathLike, fsspec URL or zarr store
        Destination.
    chunk : int, optional
        Spectra per chunk; default: the Dataset's current ``spectrum`` chunks, or 256.
    overwrite : bool
        Replace an existing spectra store (one written by ``write_zarr`` or an ingestion).
        Anything else at ``store`` (a file, other data, the store ``ds`` is read from) is
        refused and left untouched.
    spectrum_dim : str
        Name of the spectrum dimension.
    **kwargs
        Passed to :meth:`xarray.Dataset.to_zarr`.
    """
    if spectrum_dim not in ds.dims:
        raise InputDataError(f"ds has no {spectrum_dim!r} dimension (dims: {dict(ds.sizes)}); pass spectrum_dim=")
    if isinstance(store, (str, os.PathLike)):
        # only ever replace a spectra store; never the input the Dataset is read from
        refuse_input_overlap(store, [ds.encoding.get("source")], storage_options=kwargs.get("storage_options"))
        info = describe_path(store, kwargs.get("storage_options"))
        refuse_foreign(info, "spectra")
        if info.kind == "spectra" and not overwrite:
            raise OptionError(f"store {os.fspath(store)!r} already exists; pass {spell('overwrite=True')} to replace it")
    if chunk is None:
        chunked = [v.chunksizes[spectrum_dim] for v in ds.data_vars.values() if v.chunks and spectrum_dim in v.dims]
        chunk = int(chunked[0][0]) if chunked else 256
    chunk = check_chunk(chunk)
    out = ds.copy()
    out.attrs[KIND_ATTR] = "spectra"
    for name in out.variables:
        out[name].encoding = {}
    target = {d: (min(chunk, ds.sizes[d]) if d == spectrum_dim else -1) for d in ds.dims}
    out = out.chunk(target)
    with quiet_consolidated():
        out.to_zarr(store, mode="w" if overwrite else "w-", **kwargs)
    return open_spectra(store, storage_options=kwargs.get("storage_options"))


def reader_options(reader: Any, given: Mapping[str, Any], caller: str) -> dict[str, Any]:
    """``reader``'s keyword options (but ``chunk``) with their defaults, updated with ``given``.

    An ingest function takes the options of its reader as ``**kwargs``; this checks their
    names against the reader's signature so a typo is an error that lists the known names.
    """
    params = inspect.signature(reader).parameters.values()
    defaults = {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY and p.name != "chunk"}
    unknown = set(given) - set(defaults)
    if unknown:
        raise OptionError(f"{caller} got unknown option(s) {sorted(unknown)}; known: {sorted(defaults)}")
    return {**defaults, **given}


def lazy_dataset(plan: BlockSource, chunk: int, *, name: str, spectrum_dim: str, wavelength_dim: str) -> xr.Dataset:
    """The plan's spectra as dask-backed variables, ``chunk`` spectra per block.

    Each block is one task that reads its spectra when computed and returns every variable
    stacked, so computing ``flux`` and ``ivar`` together reads the files once.
    """
    import dask
    import dask.array as da

    n, nv = plan.n_spectra, len(plan.variables)
    blocks = []
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        task = dask.delayed(lambda a, b: np.stack(plan.read_block(a, b)), pure=True)(
            start, stop, dask_key_name=f"{name}-{plan.block_token(start, stop)}"
        )
        blocks.append(da.from_delayed(task, shape=(nv, stop - start, plan.n_wave), dtype=np.float32))
    stacked = da.concatenate(blocks, axis=1)
    return plan.dataset(tuple(stacked[i] for i in range(nv)), spectrum_dim=spectrum_dim, wavelength_dim=wavelength_dim)


#: zarr group of an ingested store holding the per-chunk done flags (what resume reads).
INGEST_PROGRESS = "sheap_ingest_progress"


def check_store(store: Any, *, overwrite: bool, resume: bool = False, files: Any = (), storage_options=None):
    """What is at ``store``, checked before the files are scanned (so a long scan does not end
    in this error): refuse a file, data that is not an ingested store, a path that is or
    contains an input file, and an ingested store unless asked to replace or resume it."""
    so = dict(storage_options) if storage_options else None
    if not isinstance(store, (str, os.PathLike)):  # a zarr store object: the caller's business
        return None
    refuse_input_overlap(store, files, storage_options=so, what="an input file")
    info = describe_path(store, so)
    refuse_foreign(info, "spectra")
    if info.kind == "spectra" and not (overwrite or resume):
        raise OptionError(
            f"store {os.fspath(store)!r} already exists (an ingested spectra store); pass {spell('overwrite=True')} to replace it "
            f"(or {spell('resume=True')} to finish an interrupted ingestion into it)"
        )
    return info


def _identity(plan: BlockSource, chunk: int) -> dict[str, Any]:
    """What an ingestion wrote, for resume to compare: the reader's options, the files (path,
    size, modification time), the shape and the chunking."""
    import dask

    files = getattr(plan, "files", [])
    stats = [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
    return {
        "reader": plan.block_token(0, plan.n_spectra),
        "files": dask.base.tokenize(stats),
        "n_files": len(files),
        "n_spectra": plan.n_spectra,
        "n_wave": plan.n_wave,
        "chunk": chunk,
    }


def _resume_flags(store: Any, identity: dict[str, Any], n_chunks: int, so) -> np.ndarray:
    """The done flags of an interrupted ingestion into ``store``, after checking it is this one."""
    import zarr

    with quiet_consolidated():
        try:
            old = json.loads(xr.open_zarr(store, storage_options=so).attrs.get("sheap_ingest_identity", "{}"))
            done = zarr.open_array(store, path=f"{INGEST_PROGRESS}/done", mode="r", storage_options=so)[:]
        except (FileNotFoundError, KeyError, ValueError, json.JSONDecodeError) as exc:
            raise ResumeMismatchError(
                f"cannot resume into {store!r}: it is not a store written by an ingestion ({exc}); "
                f"pass {spell('overwrite=True')} to replace it"
            ) from None
    differences = [
        f"{key}: store has {old.get(key)!r}, this ingestion has {value!r}"
        for key, value in identity.items()
        if old.get(key) != value
    ]
    if differences:
        raise ResumeMismatchError(
            f"cannot resume into {store!r}: it was written from other files or options.\n  - "
            + "\n  - ".join(differences)
            + f"\nUse the same files and options, a new store, or {spell('overwrite=True')}."
        )
    return np.asarray(done, dtype=bool)[:n_chunks]


def _block_checksum(arrays) -> int:
    from ..store import digest

    return digest(np.array([digest(np.asarray(a, dtype=np.float32)) for a in arrays], dtype=np.int64))


def _verify_blocks(store, so, plan, starts, done, chunk, pool) -> np.ndarray:
    """Keep the done flag of a block only if its data, read back, match the checksum
    recorded with it (``sheap_dask.store.verify_ingest``: all, sample or none)."""
    import zarr

    from .. import config

    mode = str(config.get("store.verify_ingest"))
    marked = np.flatnonzero(done)
    if mode == "none" or not marked.size:
        return done
    if mode == "sample":
        marked = marked[np.unique(np.linspace(0, marked.size - 1, min(8, marked.size)).round().astype(int))]
    elif mode != "all":
        raise OptionError(f"sheap_dask.store.verify_ingest={mode!r}: use all, sample or none")
    group = zarr.open_group(store, mode="r", storage_options=so, use_consolidated=False)
    try:
        record = np.asarray(group[f"{INGEST_PROGRESS}/record"][:], dtype=np.int64)
    except KeyError:
        raise ResumeMismatchError(
            f"cannot resume into {store!r}: it was written by an earlier sheap_dask without per-chunk checksums; "
            f"pass {spell('overwrite=True')} to replace it"
        ) from None
    n = plan.n_spectra

    def check(i: int) -> bool:
        start = starts[i]
        stop = min(start + chunk, n)
        arrays = [group[v][start:stop] for v in plan.variables]
        return _block_checksum(arrays) == int(record[i])

    bad = [int(i) for i, ok in zip(marked, pool.map(check, marked.tolist())) if not ok]
    if bad:
        done = done.copy()
        done[bad] = False
        where = ", ".join(f"{i} (spectra {starts[i]}-{min(starts[i] + chunk, n) - 1})" for i in bad[:5])
        warnings.warn(
            f"resume of {store!r}: {len(bad)} chunk(s) marked done do not match the checksum recorded when they were "
            f"written and are written again: {where}" + (f", ... ({len(bad) - 5} more)" if len(bad) > 5 else ""),
            ResumeWarning,
            stacklevel=4,
        )
    return done


def _mark_complete(store: Any, so) -> None:
    import zarr

    group = zarr.open_group(store, mode="r+", storage_options=so)
    group.attrs["sheap_ingest_complete"] = 1
    with quiet_consolidated():
        zarr.consolidate_metadata(group.store)


def ingest(
    plan: BlockSource,
    store: Any,
    files_pool: Executor,
    *,
    chunk: int,
    overwrite: bool,
    progress: bool,
    storage_options: Mapping[str, Any] | None,
    spectrum_dim: str,
    wavelength_dim: str,
    resume: bool = False,
    force: bool = False,
) -> xr.Dataset:
    """Write ``plan``'s spectra into ``store`` chunk by chunk; return the opened store.

    The coordinates and the metadata of the variables are written first; then block ``i + 1``
    is read (in ``files_pool``) while block ``i`` is written with ``to_zarr(region=...)``, so
    at most two blocks are in memory. Each written block is marked done in the store's
    ``sheap_ingest_progress`` group with its checksum; ``resume=True`` on an existing store
    written from the same files and options writes only the blocks not yet done (or whose
    data no longer match their checksum). ``attrs["sheap_ingest_complete"]`` is 0 until the
    last block is written. The store is locked while written (:class:`~sheap_dask.stores.StoreLock`).
    """
    n = plan.n_spectra
    if n == 0:
        raise InputDataError("no spectrum to ingest: every spectrum was left out (see the warnings above)")
    starts = list(range(0, n, chunk))
    so = dict(storage_options) if storage_options else None
    identity = _identity(plan, chunk)
    lock = StoreLock(store, so, force=force, purpose="an ingestion") if isinstance(store, (str, os.PathLike)) else None
    with lock if lock is not None else contextlib.nullcontext():
        return _ingest_locked(plan, store, files_pool, identity, starts, chunk=chunk, overwrite=overwrite, progress=progress, so=so,
                              spectrum_dim=spectrum_dim, wavelength_dim=wavelength_dim, resume=resume, lock=lock)


def _ingest_locked(plan, store, files_pool, identity, starts, *, chunk, overwrite, progress, so, spectrum_dim, wavelength_dim, resume, lock):
    import dask.array as da
    import zarr

    n, nw = plan.n_spectra, plan.n_wave
    info = check_store(store, overwrite=overwrite, resume=resume, storage_options=so)  # again, now that we hold the lock
    if resume and info is not None and info.kind == "spectra":
        done = _resume_flags(store, identity, len(starts), so)
        done = _verify_blocks(store, so, plan, starts, done, chunk, files_pool)
    else:
        lazy = da.zeros((n, nw), dtype=np.float32, chunks=(chunk, nw))
        template = plan.dataset((lazy,) * len(plan.variables), spectrum_dim=spectrum_dim, wavelength_dim=wavelength_dim)
        template.attrs.update({KIND_ATTR: "spectra", "sheap_ingest_identity": json.dumps(identity), "sheap_ingest_complete": 0})
        encoding = {v: {"chunks": (chunk, nw)} for v in plan.variables}
        # per-spectrum coordinates chunked like the data, so the opened store has one set of
        # chunks along spectrum (``ds.chunks`` raises on inconsistent chunks)
        encoding.update({c: {"chunks": (chunk,)} for c, v in template.coords.items() if v.dims == (spectrum_dim,)})
        if info is not None and info.kind == "spectra":  # overwrite=True: replace our own store only
            clear_store(store, info, so)
        # Coordinates (numpy) are written now; the dask-backed variables only get their metadata.
        # mode "a": the directory holds our lock, which mode "w" would delete.
        with quiet_consolidated():
            if info is not None:
                zarr.open_group(store, mode="a", storage_options=so).attrs.update({KIND_ATTR: "spectra"})
            template.to_zarr(store, mode="a" if info is not None else ("w" if overwrite else "w-"), compute=False,
                             encoding=encoding, storage_options=so)
        zarr.create_array(
            store, name=f"{INGEST_PROGRESS}/done", shape=(len(starts),), chunks=(len(starts),), dtype="int8",
            fill_value=0, overwrite=True, storage_options=so,
        )
        zarr.create_array(
            store, name=f"{INGEST_PROGRESS}/record", shape=(len(starts),), chunks=(len(starts),), dtype="int64",
            fill_value=0, overwrite=True, storage_options=so,
        )
        done = np.zeros(len(starts), dtype=bool)
    todo = [s for s, d in zip(starts, done) if not d]
    flags = zarr.open_array(store, path=f"{INGEST_PROGRESS}/done", mode="r+", storage_options=so)
    record = zarr.open_array(store, path=f"{INGEST_PROGRESS}/record", mode="r+", storage_options=so)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, initial=n - sum(min(s + chunk, n) - s for s in todo), unit="spectrum", desc="ingest")
    dims = (spectrum_dim, wavelength_dim)
    with ThreadPoolExecutor(1) as prefetch:
        pending = prefetch.submit(plan.read_block, todo[0], min(todo[0] + chunk, n), files_pool) if todo else None
        for i, start in enumerate(todo):
            stop = min(start + chunk, n)
            arrays = pending.result()
            if i + 1 < len(todo):
                nxt = todo[i + 1]
                pending = prefetch.submit(plan.read_block, nxt, min(nxt + chunk, n), files_pool)
            with quiet_consolidated():
                xr.Dataset({v: (dims, a) for v, a in zip(plan.variables, arrays)}).to_zarr(
                    store, region={spectrum_dim: slice(start, stop)}, storage_options=so
                )
            record[start // chunk] = _block_checksum(arrays)
            flags[start // chunk] = 1  # only after the region is written: a killed write is redone
            if lock is not None:
                lock.check()
            if bar is not None:
                bar.update(stop - start)
    if bar is not None:
        bar.close()
    _mark_complete(store, so)
    return open_spectra(store, storage_options=so)


def read_files(plan_class: Any, files: Any, *, name: str, chunk: int | None, parallel: str, spectrum_dim: str, wavelength_dim: str, **options: Any) -> xr.Dataset:
    """What every ``read_*_spectra`` does: plan the read of ``files`` (``plan_class`` scans them
    in one pool, spawned once), then read every spectrum now (``chunk=None``) or return a lazy
    Dataset of ``chunk``-spectra blocks."""
    if chunk is not None:
        chunk = check_chunk(chunk)
    with make_pool(parallel, options["n_jobs"]) as pool:
        plan = plan_class(files, pool=pool, **options)
        if plan.n_spectra == 0:
            raise InputDataError("no spectrum left to read: every spectrum was left out (see the warnings)")
        if chunk is None:
            return plan.dataset(plan.read_block(0, plan.n_spectra, pool), spectrum_dim=spectrum_dim, wavelength_dim=wavelength_dim)
    return lazy_dataset(plan, chunk, name=name, spectrum_dim=spectrum_dim, wavelength_dim=wavelength_dim)


def ingest_files(
    plan_class: Any,
    reader: Any,
    files: Any,
    store: Any,
    *,
    chunk: int,
    overwrite: bool,
    resume: bool,
    progress: bool,
    storage_options: Mapping[str, Any] | None,
    options: Mapping[str, Any],
    force: bool = False,
) -> xr.Dataset:
    """What every ``ingest_*`` does: check the options against ``reader``'s and the store, plan,
    and stream the plan into ``store`` with :func:`ingest`."""
    chunk = check_chunk(chunk)
    caller = reader.__name__.replace("read_", "ingest_").replace("_spectra", "")  # read_sdss_spectra -> ingest_sdss
    options = reader_options(reader, options, caller)
    files = expand_files(files, kind=getattr(plan_class, "file_kind", "SDSS spec"))
    check_store(store, overwrite=overwrite, resume=resume, files=files, storage_options=storage_options)
    spectrum_dim, wavelength_dim = options.pop("spectrum_dim"), options.pop("wavelength_dim")
    with make_pool(options.pop("parallel"), options["n_jobs"]) as files_pool:
        plan = plan_class(files, pool=files_pool, **options)
        return ingest(
            plan,
            store,
            files_pool,
            chunk=chunk,
            overwrite=overwrite,
            progress=progress,
            storage_options=storage_options,
            spectrum_dim=spectrum_dim,
            wavelength_dim=wavelength_dim,
            resume=resume,
            force=force,
        )
