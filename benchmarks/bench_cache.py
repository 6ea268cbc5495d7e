"""Persistent compilation cache: what a new process pays with a filled cache, when the cache
holds only the programs that took over 1 s to compile (JAX's default threshold) and when it
holds every program (the package's ``worker.compilation_cache_min_seconds: 0``).

The work is the SDSS catalogue of ``examples/catalog_sdss.py`` (the 19 real spectra of
``../shared/data/spectra``: ingest, the H-beta/H-alpha/MgII fits, every derived quantity with
its Monte Carlo errors), in a fresh process on the synchronous scheduler, as a new worker
would run it. For each threshold, in one run: a first process fills an empty cache, a second
one does the same work with it filled; each process writes its own new catalogue (a store
left from the first would be resumed, not refitted). Prints one JSON line: the seconds of
each process, the cache's files and MB, and ``ratio_filled`` (filled-cache seconds with
JAX's threshold over those with every program cached).

Run: ``python benchmarks/bench_cache.py [--spectra DIR]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "catalog_sdss.py"

WORK = """
import importlib.util, sys, time
from pathlib import Path
import dask
spec = importlib.util.spec_from_file_location("catalog_sdss", sys.argv[1])
example = importlib.util.module_from_spec(spec)
spec.loader.exec_module(example)
start = time.perf_counter()
with dask.config.set(scheduler="synchronous"):
    example.make_catalog(Path(sys.argv[2]), Path(sys.argv[3]))
print(time.perf_counter() - start)
"""


def one_process(cache: Path, minimum: float, spectra: Path, out: Path) -> float:
    """Seconds of the catalogue in a new process whose persistent cache is ``cache``."""
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")}
    env.update(DASK_SHEAP_DASK__WORKER__COMPILATION_CACHE=str(cache), DASK_SHEAP_DASK__WORKER__COMPILATION_CACHE_MIN_SECONDS=str(minimum))
    done = subprocess.run([sys.executable, "-c", WORK, str(EXAMPLE), str(spectra), str(out)], env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"the catalogue process failed:\n{done.stderr[-3000:]}")
    return float(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spectra", type=Path, default=REPO.parent / "shared" / "data" / "spectra")
    args = ap.parse_args()
    if not args.spectra.is_dir():
        raise SystemExit(f"--spectra {args.spectra}: no such folder (the real spectra of ../shared/data/spectra)")
    record = {"benchmark": "compilation_cache", "work": "examples/catalog_sdss.py make_catalog, synchronous", "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        for tag, minimum in (("jax_default", 1.0), ("all_programs", 0.0)):
            cache = Path(tmp) / f"cache_{tag}"
            record[f"seconds_empty_cache_{tag}"] = round(one_process(cache, minimum, args.spectra, Path(tmp) / f"fill_{tag}"), 1)
            record[f"seconds_filled_cache_{tag}"] = round(one_process(cache, minimum, args.spectra, Path(tmp) / f"again_{tag}"), 1)
            files = [p for p in cache.rglob("*") if p.is_file()]
            record[f"cache_files_{tag}"] = len(files)
            record[f"cache_mb_{tag}"] = round(sum(p.stat().st_size for p in files) / 2**20, 1)
    record["ratio_filled"] = round(record["seconds_filled_cache_jax_default"] / record["seconds_filled_cache_all_programs"], 2)
    print(json.dumps(record))


if __name__ == "__main__":
    main()
