"""One plain process fitting chunks of a zarr store with ``fit_chunk`` (no Dask): the
hardware-ceiling baseline of ``bench_scaling.py``.

Run by bench_scaling as ``python _plain_fit.py STORE CHUNK FIRST STEP BARRIER_DIR ID``: fits
chunk ``FIRST`` to compile (like a worker's first chunk), writes ``BARRIER_DIR/ready-ID``, waits
for ``BARRIER_DIR/go``, then fits chunks FIRST, FIRST+STEP, ... and prints the seconds they took.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


def main(store: str, chunk: int, first: int, step: int, barrier: Path, ident: str) -> None:
    import xarray as xr

    import sheap_dask as sd
    from sheap_dask.chunk import ChunkOptions, fit_chunk

    ds = xr.open_zarr(store, chunks=None)
    flux, ivar, wl = ds.flux.values, ds.ivar.values, ds.wavelength.values
    redshift = ds.redshift.values if "redshift" in ds.coords else None
    model = sd.models.region("hbeta")
    options = ChunkOptions().resolved()
    n_chunks = -(-flux.shape[0] // chunk)

    def fit(i: int) -> None:
        sl = slice(i * chunk, (i + 1) * chunk)
        fit_chunk(model, wl, flux[sl], ivar[sl], redshift=None if redshift is None else redshift[sl], options=options, pad_to=chunk)

    fit(first)  # compile, as a worker's first chunk does
    (barrier / f"ready-{ident}").touch()
    while not (barrier / "go").exists():
        time.sleep(0.01)
    t0 = time.perf_counter()
    for i in range(first, n_chunks, step):
        fit(i)
    print(time.perf_counter() - t0, flush=True)


if __name__ == "__main__":
    s, c, f, st, b, ident = sys.argv[1:7]
    main(s, int(c), int(f), int(st), Path(b), ident)
