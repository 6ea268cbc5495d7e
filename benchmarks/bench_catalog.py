"""The catalogue's overhead: ``fit_catalog`` against its regions' ``fit_dataset`` runs (issue 13).

Synthetic quasars on one observed grid, half H-beta at z 0.15-0.3 and half MgII at z 0.9-1.1,
so each region fits the half that covers it. On one LocalCluster, after a warm-up catalogue
(compilation of both regions' fits and measurements on every worker), the same run measures:

* ``regions_s``: each region's ``fit_dataset`` on its covering spectra, one after the other,
  computed; ``sum_regions_s`` their sum;
* ``catalog_s``: ``fit_catalog`` of all spectra (coverage selection, both regions' fits side
  by side, the Monte Carlo measurement of every catalogue column, assembly);
* ``ratio`` = ``catalog_s / sum_regions_s`` (target <= 1.2).

Prints one JSON line. Run: ``python benchmarks/bench_catalog.py [--n 128] [--chunk 32] [--workers 2]``.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import xarray as xr


def mixed(n: int) -> xr.Dataset:
    import sheap_dask as sd

    wl = 10 ** np.arange(np.log10(3800.0), np.log10(9200.0), 1e-4)
    a = sd.io.synthetic_spectra(n // 2, region="hbeta", seed=1, redshift=(0.15, 0.3), wavelength=wl, masked_fraction=0)
    b = sd.io.synthetic_spectra(n - n // 2, region="mgii", seed=2, redshift=(0.9, 1.1), wavelength=wl, masked_fraction=0)
    ds = xr.concat([a[["flux", "ivar"]], b[["flux", "ivar"]]], dim="spectrum")
    return ds.assign_coords(spectrum=np.arange(n))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()

    from distributed import Client

    import sheap_dask as sd
    from sheap_dask.catalog import _covering

    ds = mixed(args.n)
    regions = ["hbeta", "mgii"]
    with sd.start_local_cluster(args.workers, 1, dashboard_address=":0") as cluster, Client(cluster) as client:
        t0 = time.perf_counter()
        sd.fit_catalog(ds, regions, client=client, chunk_size=args.chunk, progress=False)  # warm-up: compiles everywhere
        cold = time.perf_counter() - t0
        regions_s = {}
        for name in regions:
            model = sd.models.region(name)
            pos = _covering(ds, model, dim="spectrum", flux="flux", ivar="ivar", redshift="redshift")
            sub = ds.isel(spectrum=pos).chunk({"spectrum": args.chunk})
            t0 = time.perf_counter()
            sd.fit_dataset(sub, model, client=client, progress=False).compute()
            regions_s[name] = time.perf_counter() - t0
        t0 = time.perf_counter()
        cat = sd.fit_catalog(ds, regions, client=client, chunk_size=args.chunk, progress=False)
        catalog_s = time.perf_counter() - t0
    total = sum(regions_s.values())
    print(json.dumps({
        "benchmark": "catalog_overhead",
        "n_spectra": args.n,
        "chunk": args.chunk,
        "workers": args.workers,
        "regions_s": {k: round(v, 2) for k, v in regions_s.items()},
        "sum_regions_s": round(total, 2),
        "catalog_s": round(catalog_s, 2),
        "ratio": round(catalog_s / total, 3),
        "target_ratio": 1.2,
        "warmup_catalog_s": round(cold, 2),
        "n_columns": len(cat.data_vars),
        "sheap_version": sd.__version__,
    }))


if __name__ == "__main__":  # LocalCluster workers are spawned
    main()
