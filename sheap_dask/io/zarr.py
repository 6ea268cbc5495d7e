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

from ..errors import InputDataError, MissingDependencyError, OptionError, ResumeMismatchError
from ._common import make_pool

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


def store_exists(store: Any) -> bool:
    if isinstance(store, (str, os.PathLike)) and "://" not in os.fspath(store):
        return os.path.exists(store)
    return False


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
    return ds


@contextlib.contextmanager
def quiet_consolidated():
    """Silence zarr 3's note that consolidated metadata is not in the v3 spec.

    xarray writes and reads consolidated metadata by default (one read instead of one per
    array, which matters on object stores); the note would otherwise print on every open.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
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
        Replace an existing store.
    spectrum_dim : str
        Name of the spectrum dimension.
    **kwargs
        Passed to :meth:`xarray.Dataset.to_zarr`.
    """
    if spectrum_dim not in ds.dims:
        raise InputDataError(f"ds has no {spectrum_dim!r} dimension (dims: {dict(ds.sizes)}); pass spectrum_dim=")
    if store_exists(store) and not overwrite:
        raise OptionError(f"store {os.fspath(store)!r} already exists; pass overwrite=True to replace it")
    if chunk is None:
        chunked = [v.chunksizes[spectrum_dim] for v in ds.data_vars.values() if v.chunks and spectrum_dim in v.dims]
        chunk = int(chunked[0][0]) if chunked else 256
    chunk = check_chunk(chunk)
    out = ds.copy()
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


def check_store(store: Any, *, overwrite: bool, resume: bool = False) -> None:
    """Refuse an existing local store unless asked to replace it or resume into it (checked
    before the files are scanned, so a long scan does not end in this error)."""
    if store_exists(store) and not (overwrite or resume):
        raise OptionError(
            f"store {os.fspath(store)!r} already exists; pass overwrite=True to replace it "
            "(or resume=True to finish an interrupted ingestion into it)"
        )


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
                "pass overwrite=True to replace it"
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
            + "\nUse the same files and options, a new store, or overwrite=True."
        )
    return np.asarray(done, dtype=bool)[:n_chunks]


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
) -> xr.Dataset:
    """Write ``plan``'s spectra into ``store`` chunk by chunk; return the opened store.

    The coordinates and the metadata of the variables are written first; then block ``i + 1``
    is read (in ``files_pool``) while block ``i`` is written with ``to_zarr(region=...)``, so
    at most two blocks are in memory. Each written block is marked done in the store's
    ``sheap_ingest_progress`` group; ``resume=True`` on an existing store written from the same
    files and options writes only the blocks not yet done. ``attrs["sheap_ingest_complete"]``
    is 0 until the last block is written.
    """
    import dask.array as da
    import zarr

    n, nw = plan.n_spectra, plan.n_wave
    if n == 0:
        raise InputDataError("no spectrum to ingest: every spectrum was left out (see the warnings above)")
    starts = list(range(0, n, chunk))
    so = dict(storage_options) if storage_options else None
    identity = _identity(plan, chunk)
    if resume and store_exists(store):
        done = _resume_flags(store, identity, len(starts), so)
    else:
        lazy = da.zeros((n, nw), dtype=np.float32, chunks=(chunk, nw))
        template = plan.dataset((lazy,) * len(plan.variables), spectrum_dim=spectrum_dim, wavelength_dim=wavelength_dim)
        template.attrs.update(sheap_ingest_identity=json.dumps(identity), sheap_ingest_complete=0)
        encoding = {v: {"chunks": (chunk, nw)} for v in plan.variables}
        # per-spectrum coordinates chunked like the data, so the opened store has one set of
        # chunks along spectrum (``ds.chunks`` raises on inconsistent chunks)
        encoding.update({c: {"chunks": (chunk,)} for c, v in template.coords.items() if v.dims == (spectrum_dim,)})
        # Coordinates (numpy) are written now; the dask-backed variables only get their metadata.
        with quiet_consolidated():
            template.to_zarr(store, mode="w" if overwrite else "w-", compute=False, encoding=encoding, storage_options=so)
        zarr.create_array(
            store, name=f"{INGEST_PROGRESS}/done", shape=(len(starts),), chunks=(len(starts),), dtype="int8",
            fill_value=0, overwrite=True, storage_options=so,
        )
        done = np.zeros(len(starts), dtype=bool)
    todo = [s for s, d in zip(starts, done) if not d]
    flags = zarr.open_array(store, path=f"{INGEST_PROGRESS}/done", mode="r+", storage_options=so)
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
            flags[start // chunk] = 1  # only after the region is written: a killed write is redone
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
) -> xr.Dataset:
    """What every ``ingest_*`` does: check the options against ``reader``'s and the store, plan,
    and stream the plan into ``store`` with :func:`ingest`."""
    chunk = check_chunk(chunk)
    caller = reader.__name__.replace("read_", "ingest_").replace("_spectra", "")  # read_sdss_spectra -> ingest_sdss
    options = reader_options(reader, options, caller)
    check_store(store, overwrite=overwrite, resume=resume)
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
        )
