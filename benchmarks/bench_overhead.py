"""Overhead of the Dataset layer: end-to-end fit_dataset (zarr -> zarr) vs the bare solver.

* ``bare``: the compiled, batched solve of every chunk (``_batched_solve``: the vmapped LM
  and its straggler stage), called in this process on arrays already in memory, warm.
* ``end_to_end``: ``fit_dataset`` from the zarr store to a zarr store on a one-worker
  ``LocalCluster`` (reading, screening, initial values, the solve, restarts, the SLSQP
  fallback, errors, writing, scheduling), warm (second run, programs cached on the worker).

* ``fit_chunk``: everything the chunk layer does (screening, data-driven initial values, the
  solve, LM restarts, the SLSQP fallback, errors) in one plain process with a worker's
  environment (no Dask, no zarr writes), warm.

Target (issue 6): end_to_end / bare <= 1.3; ``dask_zarr_ratio_warm`` = end_to_end / fit_chunk
isolates what Dask and zarr add. Prints one JSON line.
Run: ``python benchmarks/bench_overhead.py [--n 400] [--chunk 100]``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

# Measure the bare solver on one XLA thread, like a single-threaded worker.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import jax  # noqa: E402
import numpy as np
import xarray as xr
from _common import parse_args, emit, local_cluster, machine, plain_processes_seconds, reference_store, timed

import sheap_dask as sd
from sheap_dask.chunk import ChunkOptions
from sheap_dask.compiled import get_compiled


def bare_seconds(store: Path, model, chunk: int) -> tuple[float, float]:
    """(seconds of the bare batched solves over all chunks, seconds of the first call)."""
    ds = xr.open_zarr(store).compute()
    options = ChunkOptions().resolved()
    compiled = get_compiled(model, options)
    dtype = np.dtype(options.dtype)
    wl = ds.wavelength.values.astype(dtype)
    constraints = np.broadcast_to(np.stack([compiled.lower, compiled.upper], axis=-1), (chunk, compiled.n_params, 2))
    batches = []
    for a in range(0, ds.sizes["spectrum"], chunk):
        flux = ds.flux.values[a : a + chunk].astype(np.float64)
        ivar = ds.ivar.values[a : a + chunk].astype(np.float64)
        use = np.isfinite(flux) & (ivar > 0)
        good = use.sum(1) > model.n_free
        flux, ivar, use = flux[good], ivar[good], use[good]
        start = model.initial_values(wl, np.where(use, flux, np.nan), np.where(use, ivar, 0.0))
        take = np.concatenate([np.arange(len(flux)), np.zeros(chunk - len(flux), dtype=int)])
        err = np.where(use, 1 / np.sqrt(np.where(use, ivar, 1.0)), np.inf)
        batches.append((start[take], np.where(use, flux, 0.0)[take], err[take], len(flux)))
    with jax.enable_x64(options.dtype == "float64"):
        t0 = time.perf_counter()
        start, flux, err, n_good = batches[0]
        compiled.minimizer.run(start.astype(dtype), flux.astype(dtype), wl, err.astype(dtype), constraints, n_active=n_good)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        for start, flux, err, n_good in batches:  # the padding is not solved, as in fit_chunk
            compiled.minimizer.run(start.astype(dtype), flux.astype(dtype), wl, err.astype(dtype), constraints, n_active=n_good)
        return time.perf_counter() - t0, first


def main() -> None:
    args, work = parse_args(__doc__)
    store = reference_store(work / f"spectra_{args.n}.zarr", args.n, args.chunk)
    model = sd.models.region("hbeta")

    with local_cluster(1) as client:
        run = lambda out: sd.fit_dataset(str(store), model, client=client, store=str(out), resume=False, progress=False)  # noqa: E731
        _, cold = timed(run, work / "e2e_cold.zarr")
        _, warm = timed(run, work / "e2e_warm.zarr")
    bare, bare_first = bare_seconds(store, model, args.chunk)
    numeric = plain_processes_seconds(store, args.chunk, 1)
    emit(
        {
            "benchmark": "overhead",
            "n_spectra": args.n,
            "chunk": args.chunk,
            **machine(),
            "bare_solver_seconds": round(bare, 3),
            "end_to_end_seconds_warm": round(warm, 3),
            "end_to_end_seconds_cold": round(cold, 3),
            "bare_first_call_seconds": round(bare_first, 3),
            "fit_chunk_seconds": round(numeric, 3),
            "overhead_ratio_warm": round(warm / bare, 3),
            "dask_zarr_ratio_warm": round(warm / numeric, 3),
            "target_ratio": 1.3,
        }
    )


if __name__ == "__main__":
    main()
