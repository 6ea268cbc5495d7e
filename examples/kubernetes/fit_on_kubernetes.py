"""Fit spectra on the Dask cluster of the sheap-dask Helm chart.

Connect to the release's scheduler (through ``kubectl port-forward``, or its Service address from a
pod in the cluster), check that client and cluster run the same versions, fit, and print what
happened::

    kubectl -n spectra port-forward service/fits-sheap-dask-scheduler 8786:8786 8787:8787 &
    python examples/kubernetes/fit_on_kubernetes.py                          # synthetic spectra
    python examples/kubernetes/fit_on_kubernetes.py --input s3://survey/dr16q_hbeta.zarr \\
        --output s3://survey/dr16q_hbeta_fits.zarr                           # a store the workers can read

``--input``/``--output`` are read and written by the *workers*: use object storage (the chart's
``objectStorage`` values give them credentials) or a volume they mount, never a local path.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scheduler", default=os.environ.get("DASK_SCHEDULER_ADDRESS", "tcp://localhost:8786"),
                   help="scheduler address (default: $DASK_SCHEDULER_ADDRESS or tcp://localhost:8786)")
    p.add_argument("--input", default=None, help="zarr store of spectra (fsspec URL); default: synthetic spectra")
    p.add_argument("--output", default=None, help="zarr store the fits are streamed into (resumed when re-run)")
    p.add_argument("--model", default="hbeta", help="built-in region model (default hbeta)")
    p.add_argument("--n", type=int, default=256, help="number of synthetic spectra when --input is not given")
    p.add_argument("--chunk", type=int, default=64, help="spectra per chunk of the synthetic spectra")
    args = p.parse_args(argv)

    import xarray as xr
    from dask.distributed import Client

    import sheap_dask as sd

    client = Client(args.scheduler, timeout="30s")
    print(f"connected to {args.scheduler}; dashboard: {client.dashboard_link}")
    # Client, scheduler and workers must agree (pickled tasks and results cross between them).
    client.get_versions(check=True)
    versions = set(client.run(lambda: __import__("sheap_dask").__version__).values())
    if versions != {sd.__version__}:
        print(f"error: workers run sheap_dask {sorted(versions)}, this client {sd.__version__}: "
              f"install sheap-dask=={sd.__version__} here or deploy the matching image", file=sys.stderr)
        return 1
    n_workers = len(client.scheduler_info()["workers"])
    print(f"{n_workers} workers, sheap_dask {sd.__version__}")
    if n_workers == 0:
        print("waiting for a worker (check `kubectl get pods`)...")
        client.wait_for_workers(1, timeout=300)

    if args.input:
        ds = xr.open_zarr(args.input)
    else:
        ds = sd.io.synthetic_spectra(args.n, seed=0).chunk({"spectrum": args.chunk})
    model = sd.models.region(args.model)

    t0 = time.perf_counter()
    fits = sd.fit_dataset(ds, model, client=client, store=args.output)
    fits = fits.load()
    elapsed = time.perf_counter() - t0
    n = fits.sizes["spectrum"]
    print(f"fitted {n} spectra in {elapsed:.1f} s ({n / elapsed:.1f} spectra/s)")
    print(fits.status.to_series().map(lambda s: sd.Status(int(s)).name.lower()).value_counts().to_string())
    if args.output:
        print(f"fits in {args.output} (sheap-dask info {args.output})")
    client.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
