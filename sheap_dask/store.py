"""Streaming fit results into a zarr store chunk by chunk, with verified resume.

With ``fit_dataset(..., store=...)`` each chunk is one task that fits its spectra, writes
them into its region of the store, reads the region back for its checksum, records that
checksum, the row count and the content digests of its input blocks in
``<store>/sheap_progress/record`` and only then marks itself done
(``<store>/sheap_progress/done``), so an interrupted run resumes where it stopped.

Resume trusts nothing it has not checked: the model, the options and the input's identity
(shapes, chunking, wavelength grid, per-spectrum coordinates) are compared with the store's;
every chunk marked done is read back and must match the checksum and row count recorded with
its marker (else it is refitted, with a :class:`~sheap_dask.errors.ResumeWarning`); the input
blocks of the done chunks are re-read and must match the digests recorded when they were
fitted (else resume is refused, naming the first chunk and variable that differ). The store
is written by one process at a time (:class:`~sheap_dask.stores.StoreLock`); ``status`` has
the fill value ``pending`` (-1), so the rows of a chunk never written read as not fitted.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import dask
import numpy as np
import xarray as xr

from . import config
from .cluster import progress_bar
from .errors import (
    NotAStoreError,
    PartialStoreWarning,
    ResumeMismatchError,
    ResumeWarning,
)
from .inputs import Inputs
from .status import Status
from .stores import (
    KIND_ATTR,
    PathInfo,
    StoreLock,
    clear_store,
    describe_path,
    extra_store_attrs,
    refuse_foreign,
    refuse_input_overlap,
    spell,
)

logger = logging.getLogger("sheap_dask.fit")

__all__ = ["Progress", "dataset_progress", "open_fits", "store_progress"]

PROGRESS_GROUP = "sheap_progress"  # zarr subgroup of an output store: per-chunk done markers and records
#: columns of ``sheap_progress/record`` (int64, one row per chunk): the rows written, the
#: checksum of the chunk's results as read back, and the content digests of its input blocks
RECORD_COLUMNS = ("rows", "output", "flux", "ivar", "redshift", "init", "wavelength")
INPUT_COLUMNS = RECORD_COLUMNS[2:]


@contextlib.contextmanager
def _quiet_zarr():
    """Silence zarr 3's notes on fixed-width string arrays (``method``, ``param``): xarray
    reads them back unchanged; the note is about other zarr implementations."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have a Zarr V3 specification.*")
        warnings.filterwarnings("ignore", message=".*Consolidated metadata is currently not part.*")
        # zarr's walk of the hierarchy (consolidating metadata) meets our lock file
        warnings.filterwarnings("ignore", message=r"Object at sheap_lock\.json.* is not recognized as a component")
        yield


# --------------------------------------------------------------------------------------
# Digests and checksums
# --------------------------------------------------------------------------------------
def digest(a: Any) -> int:
    """A 63-bit content digest of an array (0 for None): dtype, shape and values; every NaN
    counts as the same NaN, strings by their text."""
    if a is None:
        return 0
    a = np.asarray(a)
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{a.shape}".encode())
    if a.dtype.kind in "OUS":
        h.update("\x1f".join(map(str, a.ravel().tolist())).encode())
    else:
        h.update(a.dtype.str.encode())
        if a.dtype.kind in "fc":
            a = np.where(np.isnan(a), np.nan, a).astype(a.dtype)
        h.update(np.ascontiguousarray(a).tobytes())
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1) or 1


def _input_digests(flux, ivar, z, init, wl2d) -> list[int]:
    return [digest(flux), digest(ivar), digest(z), digest(init), digest(wl2d)]


def _region_checksum(group, specs, start: int, stop: int) -> tuple[int, int]:
    """(rows fitted, checksum) of the results in rows ``start:stop`` of the store, as stored."""
    h = hashlib.blake2b(digest_size=8)
    rows = 0
    for name, _dims, _dtype in specs:
        values = np.asarray(group[name][start:stop])
        if name == "status":
            rows = int(np.sum(values != Status.PENDING))
        h.update(name.encode())
        h.update(digest(values).to_bytes(8, "little"))
    return rows, int.from_bytes(h.digest(), "little") & ((1 << 63) - 1) or 1


def _open_group(store, storage_options, mode="r"):
    import zarr

    # Not the consolidated metadata: it lists the variables, not the progress arrays
    # created after them.
    return zarr.open_group(store, mode=mode, storage_options=storage_options, use_consolidated=False)


# --------------------------------------------------------------------------------------
# Worker tasks
# --------------------------------------------------------------------------------------
def _fit_and_write(flux, ivar, z, init, wl2d, *, index, start, stop, store, dim, specs, model, wavelength, options, pad_to, has_redshift, penalty_function, storage_options):
    """Worker task: fit one chunk, write it into its region of the store, record its
    checksum and input digests, mark it done."""
    from .chunk import fit_chunk  # here: opening and checking stores never imports JAX

    digests = _input_digests(flux, ivar, z if has_redshift else None, init, wl2d)
    out = fit_chunk(
        model,
        wl2d if wl2d is not None else wavelength,
        flux,
        ivar,
        redshift=z if has_redshift else None,
        init=init,
        options=options,
        pad_to=pad_to,
        penalty_function=penalty_function,
    )
    block = xr.Dataset({name: ((dim, *dims), out[name]) for name, dims, _ in specs})
    with _quiet_zarr():
        block.to_zarr(store, region={dim: slice(start, stop)}, storage_options=storage_options)
        group = _open_group(store, storage_options, mode="r+")
        # What is in the store, read back: the checksum resume compares with.
        rows, checksum = _region_checksum(group, specs, start, stop)
        group[f"{PROGRESS_GROUP}/record"][index] = np.array([rows, checksum, *digests], dtype=np.int64)
        # Marked done only after the region and its record are written: a task killed in
        # between is redone.
        group[f"{PROGRESS_GROUP}/done"][index] = 1
    counts = np.bincount(out["status"].astype(np.int64), minlength=len(Status))
    return index, counts


def _verify_chunk(flux, ivar, z, init, wl2d, *, index, start, stop, store, specs, storage_options, has_redshift):
    """Worker task of a resume: (index, rows, checksum) of the chunk as stored, and the
    digests of its input blocks (None where the input is not re-read)."""
    with _quiet_zarr():
        rows, checksum = _region_checksum(_open_group(store, storage_options), specs, start, stop)
    digests = None if flux is None else _input_digests(flux, ivar, z if has_redshift else None, init, wl2d)
    return index, rows, checksum, digests


# --------------------------------------------------------------------------------------
# The input's identity
# --------------------------------------------------------------------------------------
def input_identity(inputs: Inputs, path: str | None, names: Mapping[str, Any]) -> dict[str, Any]:
    """What the store records about its input, compared on resume (all cheap: shapes,
    chunking, the wavelength grid, the per-spectrum coordinates; the content is compared
    chunk by chunk through the digests recorded as each chunk is fitted)."""
    ident: dict[str, Any] = {
        "path": path,
        "n_spectra": int(inputs.n_spectra),
        "n_pixels": int(inputs.flux.shape[1]),
        "chunk": int(inputs.chunks),
        "dims": [inputs.dim, inputs.wl_dim],
        "variables": {k: v for k, v in names.items()},
        "dtypes": {"flux": str(inputs.flux.dtype), "ivar": str(inputs.ivar.dtype)},
    }
    if inputs.wavelength_values is not None:
        wl = np.asarray(inputs.wavelength_values)
        ident["wavelength"] = {"grid": "1-D", "n": int(wl.size), "min": float(np.min(wl)), "max": float(np.max(wl)), "digest": str(digest(wl))}
    else:
        ident["wavelength"] = {"grid": "2-D (per spectrum: compared chunk by chunk)"}
    coords = {}
    for name, var in sorted(inputs.coords.items()):
        values = np.asarray(var.values)
        first, last = (values[0], values[-1]) if values.size else ("", "")
        coords[str(name)] = {"digest": str(digest(values)), "first": _short(first), "last": _short(last)}
    ident["coords"] = coords
    return ident


def _short(value: Any) -> str:
    text = str(value.item() if hasattr(value, "item") else value)
    return text if len(text) <= 40 else text[:37] + "..."


def _identity_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    lines = []
    for key, label in (("n_spectra", "spectra"), ("n_pixels", "pixels per spectrum"), ("chunk", "spectra per chunk"), ("dims", "dims")):
        if old.get(key) != new.get(key):
            lines.append(f"input {label}: store has {old.get(key)!r}, this input has {new.get(key)!r}")
    for key in sorted(set(old.get("variables", {})) | set(new.get("variables", {}))):
        a, b = old.get("variables", {}).get(key), new.get("variables", {}).get(key)
        if a != b:
            lines.append(f"input variable {key}=: store was fitted with {a!r}, this fit uses {b!r}")
    for key in sorted(set(old.get("dtypes", {})) | set(new.get("dtypes", {}))):
        a, b = old.get("dtypes", {}).get(key), new.get("dtypes", {}).get(key)
        if a != b:
            lines.append(f"input {key} dtype: store has {a}, this input has {b}")
    a, b = old.get("wavelength", {}), new.get("wavelength", {})
    if a != b:
        lines.append(f"input wavelength grid: store has {_grid(a)}, this input has {_grid(b)}")
    oc, nc = old.get("coords", {}), new.get("coords", {})
    for name in sorted(set(oc) | set(nc)):
        if name not in nc:
            lines.append(f"input coordinate {name!r}: the store's input has it, this input does not")
        elif name not in oc:
            lines.append(f"input coordinate {name!r}: this input has it, the store's input did not")
        elif oc[name].get("digest") != nc[name].get("digest"):
            lines.append(
                f"input coordinate {name!r} differs: store has {oc[name].get('first')} ... {oc[name].get('last')}, "
                f"this input has {nc[name].get('first')} ... {nc[name].get('last')}"
            )
    return lines


def _grid(w: Mapping[str, Any]) -> str:
    if w.get("grid") == "1-D":
        return f"{w['min']:.6g}-{w['max']:.6g} ({w['n']} pixels)"
    return str(w.get("grid", "?"))


# --------------------------------------------------------------------------------------
# Fitting into a store
# --------------------------------------------------------------------------------------
def fit_to_store(
    inputs: Inputs,
    init_da,
    template: xr.Dataset,
    specs,
    model,
    options,
    store,
    resume,
    client,
    progress,
    penalty_function,
    storage_options,
    *,
    force: bool = False,
    source: str | None = None,
    names: Mapping[str, Any] | None = None,
) -> xr.Dataset:
    """Fit every chunk not yet done into ``store`` (``template``: the lazy result, whose
    metadata the store is created from); return the store opened lazily."""
    so = dict(storage_options) if storage_options else None
    store = os.fspath(store)
    n_chunks = len(inputs.flux.chunks[0])
    bounds = np.concatenate([[0], np.cumsum(inputs.flux.chunks[0])]).astype(int)
    input_path = source or inputs.ds.encoding.get("source")

    info = describe_path(store, so)
    refuse_input_overlap(store, [input_path], storage_options=so)
    refuse_foreign(info, "fit")
    identity = input_identity(inputs, input_path, names or {})
    z = inputs.redshift.data if inputs.redshift is not None else None
    wl2d = inputs.wavelength_2d.data if inputs.wavelength_2d is not None else None
    blocks = _Blocks(inputs, init_da, z, wl2d)

    with StoreLock(store, so, force=force, purpose=_purpose()) as lock:
        info = describe_path(store, so)  # again: now nobody else writes it
        refuse_foreign(info, "fit")
        refitted: list[int] = []
        if info.kind == "fit" and resume and _creation_interrupted(store, so, info):
            info = PathInfo(info.store, "fit", info.what, {})  # ours, nothing fitted yet: made again
            resume = False
        if info.kind == "fit" and resume:
            done, refitted = _resume(info, store, so, template, identity, specs, n_chunks, bounds, blocks, inputs, client)
        else:
            if info.kind == "fit":  # resume=False on one of our fit stores: replace it
                logger.info("store %s: overwriting the fit store (resume=False)", store)
                clear_store(store, info, so)
            _create(template, identity, store, n_chunks, int(inputs.chunks), so)
            done = np.zeros(n_chunks, dtype=bool)
        todo = [i for i in range(n_chunks) if not done[i]]
        logger.info("store %s: %d of %d chunks to fit", store, len(todo), n_chunks)
        _run(todo, blocks, bounds, store, inputs, specs, model, options, penalty_function, so, client, progress, lock)
        if info.kind == "fit" and resume:
            _record_input_path(store, so, info.attrs, identity)
    with _quiet_zarr():
        result = xr.open_zarr(store, storage_options=so)
    result.attrs["sheap_chunks_fitted"] = len(todo)
    result.attrs["sheap_chunks_refitted"] = len(refitted)
    return result


def _creation_interrupted(store, so, info) -> bool:
    """A store of this version (marked ``sheap_store: fit``) whose creation stopped before its
    progress arrays were written: nothing was fitted into it."""
    if info.attrs.get(KIND_ATTR) != "fit":
        return False
    group = _open_group(store, so)
    try:
        group[f"{PROGRESS_GROUP}/done"]
    except KeyError:
        # No progress record: only if no result was written either (a copy made with
        # to_zarr has results and is refused as unverifiable, never deleted).
        try:
            return group["status"].nchunks_initialized == 0
        except KeyError:
            return True
    return False


def _purpose() -> str:
    return f"{spell('fit_dataset')} into this store"


class _Blocks:
    """The dask blocks of one chunk's task arguments."""

    def __init__(self, inputs, init_da, z, wl2d):
        self.inputs, self.init, self.z, self.wl2d = inputs, init_da, z, wl2d

    def __call__(self, i: int) -> tuple:
        return (
            self.inputs.flux.data.blocks[i],
            self.inputs.ivar.data.blocks[i],
            self.z.blocks[i] if self.z is not None else None,
            self.init.data.blocks[i],
            self.wl2d.blocks[i] if self.wl2d is not None else None,
        )


def _run(todo, blocks, bounds, store, inputs, specs, model, options, penalty_function, so, client, progress, lock) -> None:
    # One graph key for the model and the shared grid, referenced by every chunk's task,
    # rather than a copy pickled into each of thousands of tasks.
    shared_model = dask.delayed(model, pure=True, traverse=False)
    shared_wavelength = dask.delayed(inputs.wavelength_values, pure=True, traverse=False)
    tasks = [
        dask.delayed(_fit_and_write, pure=False)(
            *blocks(i),
            index=i,
            start=int(bounds[i]),
            stop=int(bounds[i + 1]),
            store=store,
            dim=inputs.dim,
            specs=specs,
            model=shared_model,
            wavelength=shared_wavelength,
            options=options,
            pad_to=inputs.chunks,
            has_redshift=inputs.redshift is not None,
            penalty_function=penalty_function,
            storage_options=so,
        )
        for i in todo
    ]
    if not tasks:
        return
    with progress_bar(len(tasks), progress, "fitting") as bar:
        if client is None:
            for task in tasks:  # local scheduler: one chunk at a time keeps memory flat
                lock.check()
                task.compute()
                if bar is not None:
                    bar.update(1)
        else:
            from distributed import as_completed

            futures = client.compute(tasks)
            try:
                for fut in as_completed(futures):
                    fut.result()  # re-raise a task's error here
                    lock.check()
                    if bar is not None:
                        bar.update(1)
            except BaseException:
                client.cancel(futures)  # an interrupted or failed run stops writing now
                raise
    lock.check()


def _create(template: xr.Dataset, identity, store: str, n_chunks: int, chunk: int, so) -> None:
    """Write the store's metadata and coordinates, its progress arrays (all not done)."""
    import zarr

    # The kind first: a store interrupted while its metadata is written is still ours.
    _open_group(store, so, mode="a").attrs.update({KIND_ATTR: "fit"})
    # Coordinates are small: write them now (compute=False would leave lazy ones empty).
    template = template.assign_coords({name: coord.compute() for name, coord in template.coords.items()})
    template.attrs.update(
        {
            KIND_ATTR: "fit",
            "sheap_input_identity": json.dumps(identity, sort_keys=True),
            "sheap_n_chunks": n_chunks,
            "sheap_chunk_size": chunk,
            **extra_store_attrs(),
        }
    )
    encoding = {"status": {"fill_value": int(Status.PENDING)}}
    with _quiet_zarr():
        template.to_zarr(store, mode="a", compute=False, encoding=encoding, storage_options=so)
        zarr.create_array(
            store,
            name=f"{PROGRESS_GROUP}/record",
            shape=(n_chunks, len(RECORD_COLUMNS)),
            chunks=(1, len(RECORD_COLUMNS)),  # one object per chunk: workers record chunks concurrently
            dtype="int64",
            fill_value=0,
            overwrite=True,
            attributes={"columns": list(RECORD_COLUMNS)},
            storage_options=so,
        )
        zarr.create_array(
            store,
            name=f"{PROGRESS_GROUP}/done",
            shape=(n_chunks,),
            chunks=(1,),
            dtype="int8",
            fill_value=0,
            overwrite=True,
            storage_options=so,
        )


def _resume(info, store, so, template, identity, specs, n_chunks, bounds, blocks, inputs, client) -> tuple[np.ndarray, list[int]]:
    """Check the store against this fit; return the chunks that count as done and those
    marked done that failed their check (refitted)."""
    old = info.attrs
    differences = _fit_differences(old, template.attrs)
    old_identity = None
    if "sheap_input_identity" in old:
        old_identity = json.loads(old["sheap_input_identity"])
        differences += _identity_differences(old_identity, identity)
    if differences:
        raise ResumeMismatchError(
            f"cannot resume into store {store!r}: it holds a different fit.\n  - "
            + "\n  - ".join(differences)
            + f"\nUse the same model, options and input; a new output path; or {spell('resume=False')} to overwrite that store."
        )
    group = _open_group(store, so)
    try:
        done = np.asarray(group[f"{PROGRESS_GROUP}/done"][:], dtype=bool)
        record = np.asarray(group[f"{PROGRESS_GROUP}/record"][:], dtype=np.int64)
    except KeyError:
        done = record = None
    if old_identity is None or record is None:
        raise ResumeMismatchError(
            f"cannot resume into store {store!r}: it was written by an earlier sheap_dask without per-chunk checksums "
            f"and input digests, so its chunks cannot be verified. Pass {spell('resume=False')} to refit it from scratch, "
            "or write to a new path."
        )
    if done.size != n_chunks or record.shape[0] != n_chunks:
        raise ResumeMismatchError(
            f"cannot resume into store {store!r}: its progress record has {done.size} chunks, this fit has {n_chunks}; "
            f"pass {spell('resume=False')} to overwrite it."
        )
    marked = np.flatnonzero(done)
    if not marked.size:
        return done, []
    results = _verify(marked, store, so, specs, bounds, blocks, inputs, client)
    # The input first: a different input is refused, whatever the results look like.
    mismatched = [(i, d) for i, _, _, d in results if d is not None and list(record[i, 2:]) != d]
    if mismatched:
        i, d = mismatched[0]
        which = [name for name, a, b in zip(INPUT_COLUMNS, record[i, 2:], d) if a != b]
        raise ResumeMismatchError(
            f"cannot resume into store {store!r}: the input differs from the spectra fitted into it.\n"
            f"  - input chunk {i} (spectra {bounds[i]}-{bounds[i + 1] - 1}): {', '.join(which)} differ from the ones "
            f"fitted (content digest)"
            + (f"; {len(mismatched) - 1} more of the {len(results)} checked chunks differ" if len(mismatched) > 1 else "")
            + f"\nResume with the input that was fitted, write to a new path, or pass {spell('resume=False')} to refit from scratch."
        )
    refitted, reasons = [], []
    for i, rows, checksum, _ in results:
        want_rows, want_sum = int(record[i, 0]), int(record[i, 1])
        if rows == want_rows and checksum == want_sum:
            continue
        done[i] = False
        refitted.append(int(i))
        if rows != want_rows:
            reasons.append(f"chunk {i} (spectra {bounds[i]}-{bounds[i + 1] - 1}): {rows} of its {want_rows} fitted rows are in the store")
        else:
            reasons.append(f"chunk {i} (spectra {bounds[i]}-{bounds[i + 1] - 1}): its data differ from the checksum recorded with its done marker")
    if refitted:
        message = (
            f"resume of store {store!r}: {len(refitted)} chunk(s) marked done failed their check and are refitted: "
            + "; ".join(reasons[:5])
            + (f"; and {len(reasons) - 5} more" if len(reasons) > 5 else "")
        )
        logger.warning(message)
        warnings.warn(message, ResumeWarning, stacklevel=4)
    return done, refitted


def _verify(marked, store, so, specs, bounds, blocks, inputs, client) -> list[tuple[int, int, int, list[int] | None]]:
    """Read back the done chunks (and, per ``sheap_dask.store.verify_input``, their input blocks)."""
    mode = str(config.get("store.verify_input"))
    if mode == "all":
        check_input = set(marked.tolist())
    elif mode == "sample":
        pick = np.unique(np.linspace(0, marked.size - 1, min(8, marked.size)).round().astype(int))
        check_input = set(marked[pick].tolist())
    elif mode == "none":
        check_input = set()
    else:
        raise ResumeMismatchError(f"sheap_dask.store.verify_input={mode!r}: use all, sample or none")
    tasks = []
    for i in marked.tolist():
        args = blocks(i) if i in check_input else (None,) * 5
        tasks.append(
            dask.delayed(_verify_chunk, pure=False)(
                *args,
                index=i,
                start=int(bounds[i]),
                stop=int(bounds[i + 1]),
                store=store,
                specs=specs,
                storage_options=so,
                has_redshift=inputs.redshift is not None,
            )
        )
    logger.info("store %s: verifying %d done chunks (%d with their input)", store, len(tasks), len(check_input))
    if client is None:
        return list(dask.compute(*tasks))
    return client.gather(client.compute(tasks))


def _fit_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """One line per difference of model and options between a store's attrs and this fit's."""
    differences = []
    if old.get("sheap_model_fingerprint") != new.get("sheap_model_fingerprint"):
        differences.append(
            f"model: store has {_model_name(old)!r} (fingerprint {old.get('sheap_model_fingerprint')}), this fit uses "
            f"{_model_name(new)!r} (fingerprint {new.get('sheap_model_fingerprint')}): their parameters, code, constants or "
            "templates differ"
        )
    try:
        old_opts = json.loads(old.get("sheap_options", "{}"))
    except json.JSONDecodeError:
        old_opts = {}
    new_opts = json.loads(new.get("sheap_options", "{}"))
    for key in sorted(set(old_opts) | set(new_opts)):
        if old_opts.get(key) != new_opts.get(key):
            differences.append(f"option {key}: store has {old_opts.get(key)!r}, this fit uses {new_opts.get(key)!r}")
    return differences


def _model_name(attrs: Mapping[str, Any]) -> str:
    try:
        return json.loads(attrs.get("sheap_model", "{}")).get("name", "?")
    except json.JSONDecodeError:
        return "?"


def _record_input_path(store, so, old_attrs, identity) -> None:
    """The same input at a new path: the store now names the new path."""
    import zarr

    old_identity = json.loads(old_attrs.get("sheap_input_identity", "{}"))
    if old_identity.get("path") == identity.get("path"):
        return
    logger.info("store %s: the input moved from %s to %s", store, old_identity.get("path"), identity.get("path"))
    group = _open_group(store, so, mode="r+")
    update = {"sheap_input_identity": json.dumps(identity, sort_keys=True)}
    if identity.get("path"):
        update["sheap_input"] = identity["path"]
    group.attrs.update(update)
    with _quiet_zarr():
        zarr.consolidate_metadata(group.store)


# --------------------------------------------------------------------------------------
# Partial stores
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Progress:
    """Which chunks of a fit store are done: ``done`` per chunk, ``bounds`` the first spectrum
    of each chunk and the total."""

    done: np.ndarray
    bounds: np.ndarray

    @property
    def n_chunks(self) -> int:
        return int(self.done.size)

    @property
    def n_done(self) -> int:
        return int(self.done.sum())

    @property
    def complete(self) -> bool:
        return bool(self.done.all())

    @property
    def missing(self) -> list[int]:
        return np.flatnonzero(~self.done).tolist()

    def missing_runs(self) -> list[tuple[int, int]]:
        """Runs of consecutive missing chunks as (first, last)."""
        runs: list[tuple[int, int]] = []
        for i in self.missing:
            if runs and runs[-1][1] == i - 1:
                runs[-1] = (runs[-1][0], i)
            else:
                runs.append((i, i))
        return runs

    def describe_missing(self, limit: int = 8) -> str:
        parts = []
        for a, b in self.missing_runs():
            chunks = f"{a}" if a == b else f"{a}-{b}"
            parts.append(f"{chunks} (spectra {self.bounds[a]}-{self.bounds[b + 1] - 1})")
        shown = ", ".join(parts[:limit])
        return shown + (f", ... ({len(parts) - limit} more runs)" if len(parts) > limit else "")

    def describe(self) -> str:
        """E.g. ``3 of 15 chunks done; missing chunks 3-14 (spectra 24-119)``."""
        text = f"{self.n_done} of {self.n_chunks} chunks done"
        if not self.complete:
            text += f"; missing chunks {self.describe_missing()}"
        return text


def store_progress(store: Any, storage_options: Mapping[str, Any] | None = None) -> Progress:
    """The done chunks of the fit store at ``store`` (from its done markers)."""
    so = dict(storage_options) if storage_options else None
    group = _open_group(os.fspath(store), so)
    status = group["status"]
    n, chunk = int(status.shape[0]), int(status.chunks[0])
    bounds = np.minimum(np.arange(0, n + chunk, chunk), n)
    bounds = np.unique(bounds) if n else np.array([0])
    try:
        done = np.asarray(group[f"{PROGRESS_GROUP}/done"][:], dtype=bool)
    except KeyError:  # not a streamed store: complete when no row is pending
        done = _done_from_status(np.asarray(status[:]), bounds)
    return Progress(done=done, bounds=bounds)


def _done_from_status(status: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    return np.array([not np.any(status[a:b] == Status.PENDING) for a, b in itertools.pairwise(bounds)], dtype=bool)


def dataset_progress(ds: xr.Dataset) -> Progress | None:
    """Which chunks of a fit result are done: from its store's done markers when it was opened
    from one, else from its ``status`` (a chunk with a ``pending`` row is not done); None when
    ``ds`` has no ``status``."""
    source = ds.encoding.get("source")
    if source and ds.attrs.get(KIND_ATTR) == "fit":
        with contextlib.suppress(Exception):
            return store_progress(source)
    if "status" not in ds:
        return None
    dim = ds["status"].dims[0]
    n = ds.sizes[dim]
    chunk = int(ds.attrs.get("sheap_chunk_size") or (ds["status"].chunks[0][0] if ds["status"].chunks else n) or 1)
    bounds = np.minimum(np.arange(0, n + chunk, chunk), n)
    bounds = np.unique(bounds) if n else np.array([0])
    return Progress(done=_done_from_status(np.asarray(ds["status"].values), bounds), bounds=bounds)


def partial_message(where: str, progress: Progress) -> str:
    return (
        f"{where} is a partial fit store: {progress.describe()}. The rows of the missing chunks have status "
        "'pending' (never fitted) and NaN parameters; run the same fit again to finish it."
    )


def open_fits(store: Any, *, storage_options: Mapping[str, Any] | None = None, **kwargs: Any) -> xr.Dataset:
    """Open a fit store written by ``fit_dataset(..., store=...)`` or ``sheap-dask fit``.

    Like ``xr.open_zarr`` (lazy), but the path must be a fit store (a clear error otherwise),
    and a partial store (an interrupted fit) warns with the chunks still missing.

    Parameters
    ----------
    store : str or path
        A local path or fsspec URL.
    storage_options : mapping, optional
        fsspec options of a URL.
    **kwargs
        Passed to :func:`xarray.open_zarr`.

    Raises
    ------
    NotAStoreError
        Nothing is there, or something that is not a fit store.

    Warns
    -----
    PartialStoreWarning
        Some chunks were never fitted (their rows have status ``pending``).
    """
    so = dict(storage_options) if storage_options else None
    info = describe_path(store, so)
    if info.kind != "fit":
        raise NotAStoreError(
            f"{os.fspath(store)!r} is not a sheap_dask fit store: "
            + ("nothing is there" if info.kind == "missing" else f"it is {info.what}")
            + ". Fit stores are written by fit_dataset(..., store=...) and sheap-dask fit."
        )
    with _quiet_zarr():
        ds = xr.open_zarr(os.fspath(store), storage_options=so, **kwargs)
    progress = store_progress(store, so)
    if not progress.complete:
        warnings.warn(partial_message(repr(os.fspath(store)), progress), PartialStoreWarning, stacklevel=2)
    return ds
