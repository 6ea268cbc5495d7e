"""Streaming fit results into a zarr store chunk by chunk, with resume.

With ``fit_dataset(..., store=...)`` each chunk is one task that fits its spectra, writes
them into its region of the store and then marks itself done (``<store>/sheap_progress/done``),
so an interrupted run resumes where it stopped.
"""

import contextlib
import json
import logging
import warnings
from collections.abc import Mapping
from typing import Any

import dask
import numpy as np
import xarray as xr

from .chunk import fit_chunk
from .cluster import progress_bar
from .errors import ResumeMismatchError
from .inputs import Inputs
from .status import Status

logger = logging.getLogger("sheap_dask.fit")

PROGRESS_GROUP = "sheap_progress"  # zarr subgroup of an output store: per-chunk done markers


@contextlib.contextmanager
def _quiet_zarr():
    """Silence zarr 3's notes on fixed-width string arrays (``method``, ``param``): xarray
    reads them back unchanged; the note is about other zarr implementations."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have a Zarr V3 specification.*")
        warnings.filterwarnings("ignore", message=".*Consolidated metadata is currently not part.*")
        yield


def _fit_and_write(flux, ivar, z, init, wl2d, *, index, start, stop, store, dim, specs, model, wavelength, options, pad_to, has_redshift, penalty_function, storage_options):
    """Worker task: fit one chunk, write it into its region of the store, mark it done."""
    import zarr

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
    # Marked done only after the region is written: a task killed in between is redone.
    done = zarr.open_array(store, path=f"{PROGRESS_GROUP}/done", mode="r+", storage_options=storage_options)
    done[index] = 1
    counts = np.bincount(out["status"].astype(np.int64), minlength=len(Status))
    return index, counts


def fit_to_store(inputs: Inputs, init_da, template: xr.Dataset, specs, model, options, store, resume, client, progress, penalty_function, storage_options) -> xr.Dataset:
    """Fit every chunk not yet done into ``store`` (``template``: the lazy result, whose
    metadata the store is created from); return the store opened lazily."""
    storage_options = dict(storage_options) if storage_options else None
    n_chunks = len(inputs.flux.chunks[0])
    done = _prepare_store(template, store, resume, n_chunks, storage_options)
    todo = [i for i in range(n_chunks) if not done[i]]
    logger.info("store %s: %d of %d chunks to fit", store, len(todo), n_chunks)
    bounds = np.concatenate([[0], np.cumsum(inputs.flux.chunks[0])])
    z = inputs.redshift.data if inputs.redshift is not None else None
    wl2d = inputs.wavelength_2d.data if inputs.wavelength_2d is not None else None
    # One graph key for the model and the shared grid, referenced by every chunk's task,
    # rather than a copy pickled into each of thousands of tasks.
    shared_model = dask.delayed(model, pure=True, traverse=False)
    shared_wavelength = dask.delayed(inputs.wavelength_values, pure=True, traverse=False)
    tasks = []
    for i in todo:
        tasks.append(
            dask.delayed(_fit_and_write, pure=False)(
                inputs.flux.data.blocks[i],
                inputs.ivar.data.blocks[i],
                z.blocks[i] if z is not None else None,
                init_da.data.blocks[i],
                wl2d.blocks[i] if wl2d is not None else None,
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
                storage_options=storage_options,
            )
        )
    if tasks:
        with progress_bar(len(tasks), progress, "fitting") as bar:
            if client is None:
                for task in tasks:  # local scheduler: one chunk at a time keeps memory flat
                    task.compute()
                    if bar is not None:
                        bar.update(1)
            else:
                from distributed import as_completed

                for fut in as_completed(client.compute(tasks)):
                    fut.result()  # re-raise a task's error here
                    if bar is not None:
                        bar.update(1)
    result = xr.open_zarr(store, storage_options=storage_options)
    result.attrs["sheap_chunks_fitted"] = len(todo)
    return result


def _prepare_store(template: xr.Dataset, store: str, resume: bool, n_chunks: int, storage_options) -> np.ndarray:
    """Create the store's metadata (or check it on resume); return the per-chunk done flags."""
    import zarr

    existing = None
    try:
        existing = xr.open_zarr(store, storage_options=storage_options)
    except (FileNotFoundError, KeyError, ValueError):
        existing = None
    if existing is not None and resume:
        _check_resume(existing, template, store)
        try:
            done = zarr.open_array(store, path=f"{PROGRESS_GROUP}/done", mode="r", storage_options=storage_options)
            flags = np.asarray(done[:], dtype=bool)
            if flags.size == n_chunks:
                return flags
        except (FileNotFoundError, KeyError, ValueError):
            pass
        raise ResumeMismatchError(
            f"store {store!r} holds fits but no matching progress record; pass resume=False to overwrite it."
        )
    # Coordinates are small: write them now (compute=False would leave lazy ones empty).
    template = template.assign_coords({name: coord.compute() for name, coord in template.coords.items()})
    with _quiet_zarr():
        template.to_zarr(store, mode="w", compute=False, storage_options=storage_options)
    zarr.create_array(
        store,
        name=f"{PROGRESS_GROUP}/done",
        shape=(n_chunks,),
        chunks=(1,),  # one object per chunk: workers mark chunks done concurrently
        dtype="int8",
        fill_value=0,
        overwrite=True,
        storage_options=storage_options,
    )
    return np.zeros(n_chunks, dtype=bool)


def _check_resume(existing: xr.Dataset, template: xr.Dataset, store: str) -> None:
    """Refuse to resume into a store written by a different model, options or input."""
    old, new = existing.attrs, template.attrs
    if old.get("sheap_fit_fingerprint") == new.get("sheap_fit_fingerprint"):
        return
    differences = []
    if old.get("sheap_model_fingerprint") != new.get("sheap_model_fingerprint"):
        differences.append(
            f"model identity: store has {_model_name(old)!r} {old.get('sheap_model_fingerprint')}, this fit uses "
            f"{_model_name(new)!r} {new.get('sheap_model_fingerprint')} (its parameters, code, constants or templates differ)"
        )
    old_opts = json.loads(old.get("sheap_options", "{}"))
    new_opts = json.loads(new.get("sheap_options", "{}"))
    for key in sorted(set(old_opts) | set(new_opts)):
        if old_opts.get(key) != new_opts.get(key):
            differences.append(f"option {key}: store has {old_opts.get(key)!r}, this fit uses {new_opts.get(key)!r}")
    if not differences:
        differences.append(
            f"input: store has {existing.sizes.get(next(iter(existing.params.dims)), '?')} spectra in chunks of "
            f"{existing.params.encoding.get('chunks', ['?'])[0]}; this fit's input or chunking differs"
        )
    raise ResumeMismatchError(
        f"cannot resume into store {store!r}: it was written by a different fit.\n  - "
        + "\n  - ".join(differences)
        + "\nUse the same model and options, a new store path, or resume=False to overwrite."
    )


def _model_name(attrs: Mapping[str, Any]) -> str:
    try:
        return json.loads(attrs.get("sheap_model", "{}")).get("name", "?")
    except json.JSONDecodeError:
        return "?"
