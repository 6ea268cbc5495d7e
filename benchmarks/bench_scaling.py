"""Scaling, memory and compilation: 1 vs 2 workers, peak RSS at N and 10N spectra (issue 6).

* ``speedup_2_vs_1``: warm fit_dataset time (zarr -> zarr) of the 10N spectra on a 1-worker
  LocalCluster over a 2-worker one (target >= 1.7 on 2 cores).
* ``ceiling_2_vs_1_without_dask``: the same chunks fitted by ``fit_chunk`` in 1 plain process
  vs 2 plain processes running at once (no Dask, no zarr writes; each warmed up on its first
  chunk, started together): what the machine itself allows. ``dask_scaling_efficiency`` =
  speedup_2_vs_1 / that ceiling.
* ``peak_rss_mib``: peak resident memory of each worker process (``ru_maxrss``) after fitting
  N and 10N spectra with ``store=`` on a fresh 2-worker cluster (flat means memory does not
  grow with the number of spectra).
* ``compile``: per worker, the number of chunks during which something compiled, their wall
  time (compilation included), the mean time of the other chunks, and the compiles seen in a
  second run (target 0).

Prints one JSON line. Run: ``python benchmarks/bench_scaling.py [--n 400] [--chunk 100]``.
"""

from __future__ import annotations

import resource

from _common import parse_args, emit, local_cluster, machine, plain_processes_seconds, reference_store, timed

import sheap_dask as sd
from sheap_dask.chunk import compile_stats


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main() -> None:
    args, work = parse_args(__doc__)
    model = sd.models.region("hbeta")
    small = reference_store(work / f"spectra_{args.n}.zarr", args.n, args.chunk)
    big = reference_store(work / f"spectra_{10 * args.n}.zarr", 10 * args.n, args.chunk, seed=1)
    record = {"benchmark": "scaling", "n_spectra": args.n, "chunk": args.chunk, **machine()}

    def fit(client, store, out):
        return sd.fit_dataset(str(store), model, client=client, store=str(out), resume=False, progress=False)

    warm = {}
    for n_workers in (1, 2):
        with local_cluster(n_workers) as client:
            fit(client, small, work / f"w{n_workers}_cold.zarr")  # compiles on every worker
            first = client.run(compile_stats)
            # Scaling on the 10N store: a job long enough that per-job costs do not dominate.
            _, warm[n_workers] = timed(fit, client, big, work / f"w{n_workers}_warm.zarr")
            second = client.run(compile_stats)
        if n_workers == 2:
            record["compile"] = {
                f"worker{i}": {
                    "compiling_chunks": s["compiling_chunks"],
                    "compiling_chunk_seconds": round(s["compiling_seconds"], 2),
                    "warm_chunk_seconds_mean": round(s["warm_seconds"] / max(s["chunks"] - s["compiling_chunks"], 1), 3),
                    "compiles_in_second_run": second[w]["compiling_chunks"] - s["compiling_chunks"],
                }
                for i, (w, s) in enumerate(sorted(first.items()))
            }
    record["seconds_warm_1_worker"] = round(warm[1], 2)
    record["seconds_warm_2_workers"] = round(warm[2], 2)
    record["speedup_2_vs_1"] = round(warm[1] / warm[2], 2)
    plain = {n: plain_processes_seconds(big, args.chunk, n) for n in (1, 2)}
    record["seconds_plain_1_process"] = round(plain[1], 2)
    record["seconds_plain_2_processes"] = round(plain[2], 2)
    record["ceiling_2_vs_1_without_dask"] = round(plain[1] / plain[2], 2)
    record["dask_scaling_efficiency"] = round(record["speedup_2_vs_1"] / record["ceiling_2_vs_1_without_dask"], 2)

    rss = {}
    for label, store in (("n", small), ("10n", big)):
        with local_cluster(2) as client:
            _, seconds = timed(fit, client, store, work / f"mem_{label}.zarr")
            rss[label] = sorted(round(v, 1) for v in client.run(_peak_rss_mib).values())
            record[f"seconds_{label}"] = round(seconds, 2)
    record["peak_rss_mib"] = {"n": rss["n"], "10n": rss["10n"]}
    record["rss_growth_10n_over_n"] = round(max(rss["10n"]) / max(rss["n"]), 3)
    record["spectra_per_s_10n"] = round(10 * args.n / record["seconds_10n"], 1)
    emit(record)


if __name__ == "__main__":
    main()
