"""Throughput and fit quality: fit_dataset vs xarray curvefit vs the seed's Adam fit (issue 6).

All three fit the same synthetic H-beta-region spectra (20 free parameters, SDSS pixels
4400-5600 A, S/N 10-40, masked pixel runs, a few all-NaN spectra) from the same zarr store on
the same ``LocalCluster(n_workers=2, threads_per_worker=1)``, in one invocation:

* ``sheap``: ``fit_dataset`` with its defaults (batched Levenberg-Marquardt, SLSQP fallback),
  zarr -> zarr. Timed cold (first call: includes compiling on each worker) and warm.
* ``curvefit``: ``xarray.DataArray.curvefit`` (scipy ``curve_fit``, bounded ``trf``, ivar
  weights, the same model written in numpy, the same data-driven initial values).
* ``seed``: the seed's algorithm, vmapped optax Adam for 1000 fixed steps on the log-cosh loss.

Prints one JSON line. Run: ``python benchmarks/bench_throughput.py [--n 400] [--chunk 100]``.
"""

from __future__ import annotations


import dask
import numpy as np
import xarray as xr
from _common import parse_args, chi2_of, emit, local_cluster, machine, quality, reference_store, timed

import sheap_dask as sd


def run_sheap(store, model, client, out, **kwargs):
    fits = sd.fit_dataset(str(store), model, client=client, store=str(out), resume=False, progress=False, **kwargs)
    return fits.compute()


def run_curvefit(store, model, client):
    """scipy curve_fit through xarray's curvefit, on the same cluster."""
    from numpy_model import numpy_model

    ds = xr.open_zarr(store)
    f = numpy_model(model)
    params = model.params
    free = list(params.free_names)
    idx = [list(params.names).index(n) for n in free]
    # Data-driven start, exactly as fit_dataset's: the model's initializer (cheap, vectorized).
    flux = ds.flux.values.astype(np.float64)
    ivar = ds.ivar.values.astype(np.float64)
    with np.errstate(all="ignore"):
        use = np.isfinite(flux) & (ivar > 0)
        init = model.initial_values(ds.wavelength.values, np.where(use, flux, np.nan), np.where(use, ivar, 0.0))
        weight = np.where(use, np.sqrt(np.where(use, ivar, 1.0)), np.nan)
    chunks = ds.chunks["spectrum"]
    # curve_fit has no per-spectrum sigma in curvefit: fit whitened data y*w with model(x)*w,
    # passing w as a second (per-spectrum) coordinate. NaN where masked (skipna drops them).
    da = xr.DataArray(np.where(use, flux * weight, np.nan), dims=("spectrum", "wavelength"))
    da = da.assign_coords(wavelength=ds.wavelength.values, w=(("spectrum", "wavelength"), np.nan_to_num(weight)))
    da = da.chunk({"spectrum": chunks[0]})

    def fcw(x, *p):
        wl, w = x
        return f(wl, p) * w

    p0 = {n: xr.DataArray(init[:, j], dims="spectrum").chunk({"spectrum": chunks[0]}) for n, j in zip(free, idx)}
    bounds = {n: (float(params.lower[j]), float(params.upper[j])) for n, j in zip(free, idx)}
    with dask.config.set(scheduler=client.get):
        res = da.curvefit(coords=["wavelength", "w"], func=fcw, param_names=free, p0=p0, bounds=bounds, errors="ignore")
        coeffs = res.curvefit_coefficients.compute()

    return params.expand_free(coeffs.values, params.values)


def main() -> None:
    def options(ap):
        ap.add_argument("--workers", type=int, default=2)
        ap.add_argument("--skip-seed", action="store_true", help="skip the (slow) seed Adam baseline")

    args, work = parse_args(__doc__, options)
    store = reference_store(work / f"spectra_{args.n}.zarr", args.n, args.chunk)
    ds = xr.open_zarr(store)
    truth = ds.true_params.values
    has_data = ~ds.all_nan.values
    model = sd.models.region("hbeta")
    wl, flux, ivar = ds.wavelength.values, ds.flux.values.astype(float), ds.ivar.values.astype(float)
    record = {"benchmark": "throughput", "n_spectra": args.n, "chunk": args.chunk, "workers": args.workers, **machine()}

    with local_cluster(args.workers) as client:
        fits, t_cold = timed(run_sheap, store, model, client, work / "fits_cold.zarr")
        fits, t_warm = timed(run_sheap, store, model, client, work / "fits_warm.zarr")
        q_sheap = quality(model, fits.params.values, truth, fits.redchi2.values, has_data)
        record["sheap"] = {
            "seconds_cold": round(t_cold, 2),
            "seconds_warm": round(t_warm, 2),
            "spectra_per_s_cold": round(args.n / t_cold, 1),
            "spectra_per_s_warm": round(args.n / t_warm, 1),
            "status_counts": {sd.Status(int(k)).meaning: int(v) for k, v in zip(*np.unique(fits.status.values, return_counts=True))},
            **q_sheap,
        }

        cf_params, t_cf = timed(run_curvefit, store, model, client)
        red = chi2_of(model, cf_params, wl, flux, ivar)
        record["curvefit"] = {"seconds": round(t_cf, 2), "spectra_per_s": round(args.n / t_cf, 2), **quality(model, cf_params, truth, red, has_data)}

        if not args.skip_seed:
            # The seed: Adam, 1000 fixed steps (convergence test off), log-cosh loss, no fallback.
            with dask.config.set({"sheap_dask.convergence.rtol": 0.0, "sheap_dask.convergence.gtol": 0.0}):
                sfits, t_seed = timed(
                    run_sheap, store, model, client, work / "fits_seed.zarr", method="adam", num_steps=1000, fallback="none", loss_kind="logcosh"
                )
            record["seed_adam"] = {"seconds": round(t_seed, 2), "spectra_per_s": round(args.n / t_seed, 2), **quality(model, sfits.params.values, truth, sfits.redchi2.values, has_data)}

    record["speedup_vs_curvefit_warm"] = round(record["sheap"]["spectra_per_s_warm"] / record["curvefit"]["spectra_per_s"], 1)
    record["speedup_vs_curvefit_cold"] = round(record["sheap"]["spectra_per_s_cold"] / record["curvefit"]["spectra_per_s"], 1)
    if "seed_adam" in record:
        # The seed run is cold (one run, compile included): compare it with both.
        record["speedup_vs_seed_warm"] = round(record["sheap"]["spectra_per_s_warm"] / record["seed_adam"]["spectra_per_s"], 1)
        record["speedup_vs_seed_cold"] = round(record["sheap"]["spectra_per_s_cold"] / record["seed_adam"]["spectra_per_s"], 1)
    emit(record)


if __name__ == "__main__":
    main()
