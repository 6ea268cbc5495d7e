"""Fit synthetic H-beta-region quasar spectra on a local Dask cluster and explore the results.

Run:  python examples/local_cluster.py [N_SPECTRA]
"""

import sys

from dask.distributed import Client

import sheap_dask as sd


def main(n_spectra: int = 200) -> None:
    # One single-threaded worker per core, spawned, XLA threads and malloc set up for JAX.
    with sd.start_local_cluster(n_workers=2) as cluster, Client(cluster) as client:
        print("dashboard:", client.dashboard_link)
        ds = sd.io.synthetic_spectra(n_spectra, seed=1).chunk({"spectrum": 50})
        model = sd.models.region("hbeta")
        fits = sd.fit_dataset(ds, model, client=client).compute()  # lazy until computed

    print(fits.status.to_series().value_counts().rename(lambda code: sd.Status(code).meaning))
    print("median reduced chi-square:", float(fits.redchi2.median()))
    failed = fits.where(~fits.status.isin([0, 1]), drop=True)
    print("spectra that did not converge:", failed.sizes.get("spectrum", 0))
    fwhm = fits.params.sel(param="hbeta_broad1_fwhm")
    print("broad H-beta (component 1) FWHM [km/s] quartiles:", fwhm.quantile([0.25, 0.5, 0.75]).values)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 200)
