"""DESI ingestion rate: coadd files -> one zarr store with ``ingest_desi`` (issue 16).

Writes ``--files`` DESI healpix coadd files of ``--per-file`` synthetic quasars each with
desispec (the test-only dependency; ``pip install -e ".[test]"``), as tests/desi_files.py does:
B/R/Z arms, masks, 11-diagonal resolution matrices, a redrock table. Then ingests them into a
zarr store, chunks of ``--chunk`` spectra, ``--jobs`` reader threads, twice: with the
instrumental FWHM from the resolution matrices (the default) and without (``resolution=False``).
Prints one JSON line with spectra/s for both.

Run: ``python benchmarks/bench_ingest_desi.py [--files 4] [--per-file 250] [--chunk 256] [--jobs 2]``.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import numpy as np
from _common import emit, machine, parse_args

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from desi_files import write_coadd, write_redrock  # noqa: E402

import sheap_dask as sd  # noqa: E402


def configure(ap):
    ap.add_argument("--files", type=int, default=4, help="coadd files (default 4)")
    ap.add_argument("--per-file", type=int, default=250, help="spectra per file (default 250)")
    ap.add_argument("--jobs", type=int, default=2, help="reader threads (default 2, the 2 cores)")
    ap.set_defaults(chunk=256)  # ingest_desi's default, not the fit benchmarks' 100


def main() -> None:
    args, work = parse_args(__doc__, configure)
    files, tid = [], []
    for k in range(args.files):
        path = work / f"coadd-main-dark-{10000 + k}.fits"
        truth = write_coadd(path, args.per_file, seed=k, first_targetid=39627000000000000 + 100000 * k, hpx=10000 + k)
        files.append(str(path))
        tid.append(truth.targetid)
    tid = np.concatenate(tid)
    redrock = write_redrock(work / "redrock.fits", tid, np.full(tid.size, 0.2))
    n = tid.size
    rates = {}
    for label, resolution in (("with_resolution", True), ("without_resolution", False)):
        store = work / f"desi-{label}.zarr"
        shutil.rmtree(store, ignore_errors=True)
        t0 = time.perf_counter()
        ds = sd.io.ingest_desi(files, store, chunk=args.chunk, redshifts=redrock, resolution=resolution, n_jobs=args.jobs)
        seconds = time.perf_counter() - t0
        assert ds.sizes["spectrum"] == n
        rates[label] = {"seconds": round(seconds, 2), "spectra_per_s": round(n / seconds, 1)}
    size_mb = sum(Path(f).stat().st_size for f in files) / 1e6
    emit(
        {
            "benchmark": "ingest_desi",
            "spectra": n,
            "files": args.files,
            "input_mb": round(size_mb, 1),
            "chunk": args.chunk,
            "reader_threads": args.jobs,
            **rates,
            "machine": machine(),
        }
    )


if __name__ == "__main__":
    main()
