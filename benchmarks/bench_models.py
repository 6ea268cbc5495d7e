"""Throughput for every model, cold or warm, on matched and mismatched spectra (issue 15).

One model per run (``--model user`` or ``--model region``) on ``--n`` spectra (default 2000)
in chunks of ``--chunk`` (250), ``LocalCluster(n_workers=2, threads_per_worker=1)``:

* ``user``: the H-beta model a user would write in plain ``jax.numpy`` (power law, a 14-line
  FeII blend, two broad and one narrow Gaussian for H-beta, the [OIII] doublet, HeII; 20 free
  parameters; no custom JVP, no hints), wrapped in ``sd.Model`` with bounds and per-spectrum
  ``init``; the baseline is ``xarray.curvefit`` with the same function in numpy and the same
  starting values.
* ``region``: ``sd.models.region("hbeta", host=False)`` (continuum on line-free windows, then
  the lines); the baseline is curvefit on the same region model in numpy (joint fit).
  ``region_joint``: the same with ``continuum="joint"`` (everything in one fit, as curvefit).
  No host-galaxy component (``host="auto"`` would add one): the synthetic spectra have none.

``--data matched`` draws the spectra from the fitted model itself; ``--data mismatched`` from
one it does not match exactly (Lorentzian broad lines, other FeII ratios; as every real
spectrum differs from its model). Quality: reduced chi-square < 1.2 (matched data) and broad
H-beta FWHM and [OIII] 5007 flux within 10% of the truth. The sheap fit is timed three
ways: cold on a fresh cluster whose JAX persistent compilation cache is an empty directory of
this run (every program compiled: the first use of a model on a machine), warm (a second
``fit_dataset`` on that cluster) and cold again on a second fresh cluster that finds the
cache filled (a later job on the same machine). ``--shared-cache`` uses the configured
``sheap_dask.worker.compilation_cache`` instead of the empty directory (never emptied here).
The share of spectra that left the batched solve (restarts, absorber re-solves, SLSQP) and
the seconds there come from the workers' counters of the warm run; the seconds of the first
chunk per worker (compilation included) too.

Prints one JSON line. Run: ``python benchmarks/bench_models.py --model user --data matched``.
"""

from __future__ import annotations

import math
import os

import dask
import numpy as np
import xarray as xr
from _common import emit, local_cluster, machine, parse_args, timed

import sheap_dask as sd

C_KMS = 299792.458
SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))
HB, O3, O3B, HE2 = 4862.68, 5008.24, 4960.30, 4687.02
# 14 optical Fe II lines (vacuum A, multiplets 37/38/42/48/49) and relative strengths
FEII = np.array([[4491.4, 0.6], [4508.3, 0.6], [4515.3, 0.5], [4520.2, 0.4], [4522.6, 0.9], [4549.5, 0.8], [4583.8, 1.0],
                 [4629.3, 0.8], [4923.9, 0.9], [5018.4, 1.0], [5169.0, 0.9], [5197.6, 0.5], [5276.0, 0.6], [5316.6, 0.8]])
NAMES = ["norm", "index", "feii_amp", "feii_fwhm", "feii_shift", "b1_flux", "b1_shift", "b1_fwhm", "b2_flux", "b2_shift", "b2_fwhm",
         "n_flux", "n_shift", "n_fwhm", "o3_flux", "o3_shift", "o3_fwhm", "he2_flux", "he2_shift", "he2_fwhm"]


def user_function(xp, feii=FEII, broad="gaussian"):
    """The user's model ``f(wavelength, p)`` in array module ``xp`` (jax.numpy or numpy)."""
    lam, strength = xp.asarray(feii[:, 0]), xp.asarray(feii[:, 1] / feii[:, 1].sum())

    def gauss(x, flux, shift, fwhm, rest):
        c = rest * (1.0 + shift / C_KMS)
        s = c * fwhm / C_KMS * SIGMA
        return flux / (math.sqrt(2.0 * math.pi) * s) * xp.exp(-0.5 * ((x - c) / s) ** 2)

    def lorentz(x, flux, shift, fwhm, rest):
        c = rest * (1.0 + shift / C_KMS)
        g = 0.5 * c * fwhm / C_KMS
        return flux / math.pi * g / ((x - c) ** 2 + g * g)

    bline = gauss if broad == "gaussian" else lorentz

    def f(x, p):
        pl = p[0] * (x / 5100.0) ** p[1]
        c = lam * (1.0 + p[4] / C_KMS)
        s = c * p[3] / C_KMS * SIGMA
        fe = p[2] * xp.sum(strength[:, None] / (math.sqrt(2.0 * math.pi) * s[:, None]) * xp.exp(-0.5 * ((x[None, :] - c[:, None]) / s[:, None]) ** 2), axis=0)
        lines = (bline(x, p[5], p[6], p[7], HB) + bline(x, p[8], p[9], p[10], HB) + gauss(x, p[11], p[12], p[13], HB)
                 + gauss(x, p[14], p[15], p[16], O3) + gauss(x, p[14] / 2.98, p[15], p[16], O3B) + gauss(x, p[17], p[18], p[19], HE2))
        return pl + fe + lines

    return f


def user_model() -> sd.Model:
    import jax.numpy as jnp

    bounds = {"norm": (0, None), "index": (-6, 4), "feii_amp": (0, None), "feii_fwhm": (1000, 10000), "feii_shift": (-3000, 3000)}
    for comp, (fw, sh) in {"b1": ((1000, 20000), 3000), "b2": ((1000, 20000), 3000), "n": ((100, 1200), 1000), "o3": ((100, 1200), 1000),
                           "he2": ((1000, 20000), 3000)}.items():
        bounds.update({f"{comp}_flux": (0, None), f"{comp}_shift": (-sh, sh), f"{comp}_fwhm": fw})
    start = {"index": -1.5, "feii_fwhm": 3000.0, "b1_fwhm": 3000.0, "b2_fwhm": 8000.0, "n_fwhm": 400.0, "o3_fwhm": 400.0,
             "he2_fwhm": 3000.0}
    params = sd.Parameters()
    for name in NAMES:
        lo, hi = bounds[name]
        params.add(name, start.get(name, 0.0 if name.endswith("shift") else 1.0), min=lo, max=hi)
    return sd.Model(user_function(jnp), params, name="user_hbeta")


USER_PARAMS = user_model().params


def user_truth(n: int, rng) -> np.ndarray:
    u = rng.uniform
    norm = np.exp(u(np.log(5), np.log(50), n))
    cols = {
        "norm": norm, "index": u(-2.5, -0.5, n), "feii_amp": u(0.2, 1.0, n) * 80 * norm, "feii_fwhm": u(1500, 5000, n),
        "feii_shift": u(-300, 300, n), "b1_flux": u(20, 60, n) * norm, "b1_shift": u(-500, 500, n), "b1_fwhm": u(1500, 4000, n),
        "b2_flux": u(20, 60, n) * norm, "b2_shift": u(-1500, 1500, n), "b2_fwhm": u(4500, 10000, n), "n_flux": u(1, 5, n) * norm,
        "n_shift": u(-150, 150, n), "n_fwhm": u(250, 700, n), "o3_flux": u(5, 40, n) * norm, "o3_shift": u(-300, 100, n),
        "o3_fwhm": u(300, 900, n), "he2_flux": u(1, 6, n) * norm, "he2_shift": u(-500, 500, n), "he2_fwhm": u(2000, 6000, n),
    }  # fmt: skip
    return np.stack([cols[k] for k in NAMES], axis=1)


def user_dataset(n: int, chunk: int, mismatched: bool, seed: int = 0) -> xr.Dataset:
    """Spectra of the user's model (or, mismatched, of Lorentzian broad lines and shuffled FeII
    strengths), with a per-spectrum starting guess 10-20% off the truth."""
    rng = np.random.default_rng(seed)
    wl = sd.synthetic.sdss_grid(4400.0, 5600.0)
    truth = user_truth(n, rng)
    feii = FEII.copy()
    if mismatched:
        feii[:, 1] = rng.permutation(feii[:, 1]) * rng.uniform(0.6, 1.4, len(feii))
    f = user_function(np, feii, "lorentzian" if mismatched else "gaussian")
    clean = np.stack([f(wl, p) for p in truth])
    sigma = truth[:, 0] / rng.uniform(10, 40, n)
    flux = clean + rng.normal(size=clean.shape) * sigma[:, None]
    ivar = np.broadcast_to(1.0 / sigma[:, None] ** 2, flux.shape)
    guess = truth * rng.lognormal(0.0, 0.15, truth.shape)
    for k, name in enumerate(NAMES):
        if name.endswith("shift"):
            guess[:, k] = truth[:, k] + rng.normal(0, 100, n)
    guess[:, 1] = truth[:, 1] + rng.normal(0, 0.2, n)
    # a user clips the start into the bounds (curve_fit refuses a start outside them)
    lo, hi = (np.array([getattr(USER_PARAMS[k], side) for k in NAMES], float) for side in ("min", "max"))
    guess = np.clip(guess, np.where(np.isfinite(lo), lo + 1e-6 * np.maximum(np.abs(lo), 1), lo),
                    np.where(np.isfinite(hi), hi - 1e-6 * np.maximum(np.abs(hi), 1), hi))
    true_fwhm = np.array([_fwhm(np, f, p) for p in truth])
    return xr.Dataset(
        {"flux": (("spectrum", "wavelength"), flux.astype(np.float32)), "ivar": (("spectrum", "wavelength"), ivar.astype(np.float32)),
         "true_params": (("spectrum", "param"), truth), "guess": (("spectrum", "param"), guess), "true_fwhm_broad": ("spectrum", true_fwhm)},
        coords={"wavelength": wl, "param": NAMES},
    ).chunk({"spectrum": chunk})  # fmt: skip


def _fwhm(xp, f, p) -> float:
    """FWHM (km/s) of the broad H-beta of parameters ``p`` (both broad components summed)."""
    v = np.linspace(-30000, 30000, 60001)
    x = HB * (1 + v / C_KMS)
    q = np.array(p, dtype=float)
    keep = np.zeros(len(NAMES), bool)
    keep[[5, 6, 7, 8, 9, 10]] = True
    q[~keep & np.array([n.endswith(("flux", "amp", "norm")) for n in NAMES])] = 0.0
    y = f(x, q)
    above = np.flatnonzero(y >= 0.5 * y.max())
    return float(v[above[-1]] - v[above[0]])


def curvefit(ds: xr.Dataset, f_np, free_names, p0, bounds, client) -> tuple[np.ndarray, float]:
    """scipy curve_fit through xarray's curvefit on the cluster (whitened data)."""
    use = np.isfinite(ds.flux.values) & (ds.ivar.values > 0)
    weight = np.where(use, np.sqrt(np.where(use, ds.ivar.values, 1.0)), np.nan)
    chunks = ds.chunks["spectrum"][0]
    da = xr.DataArray(np.where(use, ds.flux.values * weight, np.nan), dims=("spectrum", "wavelength"))
    da = da.assign_coords(wavelength=ds.wavelength.values, w=(("spectrum", "wavelength"), np.nan_to_num(weight))).chunk({"spectrum": chunks})

    def fcw(x, *p):
        wl, w = x
        return f_np(wl, np.asarray(p)) * w

    init = {n: xr.DataArray(p0[:, k], dims="spectrum").chunk({"spectrum": chunks}) for k, n in enumerate(free_names)}
    t0 = __import__("time").perf_counter()
    with dask.config.set(scheduler=client.get):
        res = da.curvefit(coords=["wavelength", "w"], func=fcw, param_names=list(free_names), p0=init, bounds=bounds, errors="ignore")
        coeffs = res.curvefit_coefficients.compute().values
    return coeffs, __import__("time").perf_counter() - t0


def worker_counters(client) -> dict:
    stats = client.run(lambda: __import__("sheap_dask.compiled", fromlist=["compile_stats"]).compile_stats())
    keys = ("spectra", "restarted", "restart_seconds", "absorber_refits", "absorber_seconds", "fallback", "fallback_seconds",
            "compiling_seconds", "warm_seconds", "compiling_chunks", "chunks")
    return {k: sum(s[k] for s in stats.values()) for k in keys} | {"compiling_seconds_per_worker": [round(s["compiling_seconds"], 1) for s in stats.values()]}


def main() -> None:
    def options(ap):
        ap.set_defaults(n=2000, chunk=250)
        ap.add_argument("--model", choices=["user", "region", "region_joint"], default="user",
                        help="region_joint: the region with continuum='joint' (one fit of everything, like curvefit)")
        ap.add_argument("--data", choices=["matched", "mismatched"], default="matched")
        ap.add_argument("--workers", type=int, default=2)
        ap.add_argument("--shared-cache", action="store_true", help="use the configured persistent compilation cache, not an empty one")
        ap.add_argument("--skip-curvefit", action="store_true")
        ap.add_argument("--curvefit-n", type=int, default=500,
                        help="curvefit fits the first N spectra (default 500; its rate is per spectrum, so the comparison scales)")

    args, work = parse_args(__doc__, options)
    mismatched = args.data == "mismatched"
    if not args.shared_cache:  # an empty cache of this run, here and on the workers (fit_dataset ships the client's config)
        os.environ["DASK_SHEAP_DASK__WORKER__COMPILATION_CACHE"] = str(work / "jax_cache")
        dask.config.set({"sheap_dask.worker.compilation_cache": str(work / "jax_cache")})
    if args.model == "user":
        model = user_model()
        ds = user_dataset(args.n, args.chunk, mismatched)
        init = xr.DataArray(ds.guess.values, dims=("spectrum", "param"), coords={"param": NAMES})
        truth_fwhm = ds.true_fwhm_broad.values
        f_np = user_function(np)
        free_names, p0 = NAMES, ds.guess.values
        bounds = {n: (float(model.params[n].min), float(model.params[n].max)) for n in NAMES}
        fit_kwargs = {"init": init}

        def broad_fwhm(params):
            return np.array([_fwhm(np, f_np, p) if np.all(np.isfinite(p)) else np.nan for p in params])

        oiii = NAMES.index("o3_flux")
    else:
        model = sd.models.region("hbeta", host=False, **({"continuum": "joint"} if args.model == "region_joint" else {}))
        ds = sd.io.synthetic_spectra(args.n, seed=0, mismatch=mismatched).chunk({"spectrum": args.chunk})
        truth_fwhm = ds.true_fwhm_broad.values if mismatched else sd.models.derived.fwhm(model, "hbeta_broad", np.nan_to_num(ds.true_params.values))[0]
        from numpy_model import numpy_model

        joint = sd.models.region("hbeta", host=False, continuum="joint")
        f_free = numpy_model(joint)
        params = joint.params
        free_names = list(params.free_names)
        idx = [params.names.index(n) for n in free_names]
        flux, ivar = ds.flux.values.astype(float), ds.ivar.values.astype(float)
        with np.errstate(all="ignore"):
            use = np.isfinite(flux) & (ivar > 0)
            p0 = joint.initial_values(ds.wavelength.values, np.where(use, flux, np.nan), np.where(use, ivar, 0.0))[:, idx]
        bounds = {n: (float(params.lower[j]), float(params.upper[j])) for n, j in zip(free_names, idx)}
        fit_kwargs = {}

        def f_np(wl, free):
            return f_free(wl, free)

        def broad_fwhm(phys):
            return sd.models.derived.fwhm(model, "hbeta_broad", np.nan_to_num(phys))[0]

        oiii = model.param_names.index("oiii5007_flux")
    store = work / f"spectra_{args.model}_{args.data}_{args.n}.zarr"
    if not store.exists():
        ds.to_zarr(store)
    truth = ds.true_params.values
    has_data = np.all(np.isfinite(truth), axis=1)

    def quality(params, redchi2):
        """The quality rule on the first len(params) spectra (those with data)."""
        m = len(params)
        has, tr, tfw = has_data[:m], truth[:m], truth_fwhm[:m]
        with np.errstate(invalid="ignore", divide="ignore"):
            ok = has & np.all(np.isfinite(params), axis=1)
            fw = broad_fwhm(params)
            return {
                "n_with_data": int(has.sum()),
                "frac_redchi2_lt_1.2": round(float(np.mean((redchi2 < 1.2)[has])), 4),
                "median_redchi2": round(float(np.nanmedian(redchi2[has])), 4),
                "frac_fwhm_broad_within_10pct": round(float(np.mean((ok & (np.abs(fw / tfw - 1) < 0.1))[has])), 4),
                "frac_oiii_flux_within_10pct": round(float(np.mean((ok & (np.abs(params[:, oiii] / tr[:, oiii] - 1) < 0.1))[has])), 4),
            }

    record = {"benchmark": "models", "model": args.model, "data": args.data, "n_spectra": args.n, "chunk": args.chunk,
              "workers": args.workers, "empty_compilation_cache": not args.shared_cache, **machine()}  # fmt: skip

    def run(client, out):
        return sd.fit_dataset(str(store), model, client=client, store=str(out), resume=False, progress=False, **fit_kwargs)

    with local_cluster(args.workers) as client:
        _, t_cold = timed(run, client, work / "cold.zarr")
        cold = worker_counters(client)
        fits, t_warm = timed(run, client, work / "warm.zarr")
        warm = {k: v - cold[k] for k, v in worker_counters(client).items() if not isinstance(v, list)}
        fitted = fits.compute()
    with local_cluster(args.workers) as client:
        _, t_cached = timed(run, client, work / "cached.zarr")
        cached = worker_counters(client)
        record["sheap"] = {
            "seconds_cold": round(t_cold, 2), "seconds_warm": round(t_warm, 2), "seconds_cold_cache_filled": round(t_cached, 2),
            "spectra_per_s_cold": round(args.n / t_cold, 1), "spectra_per_s_warm": round(args.n / t_warm, 1),
            "spectra_per_s_cold_cache_filled": round(args.n / t_cached, 1),
            "first_chunk_seconds_per_worker": cold["compiling_seconds_per_worker"],
            "first_chunk_seconds_per_worker_cache_filled": cached["compiling_seconds_per_worker"],
            "warm_chunk_seconds_mean": round(warm["warm_seconds"] / max(warm["chunks"], 1), 3),
            # compilation = first chunk - a warm chunk's fit (the first chunk also fits its spectra)
            "compile_seconds_per_worker": [round(x - warm["warm_seconds"] / max(warm["chunks"], 1), 1) for x in cold["compiling_seconds_per_worker"]],
            "compile_seconds_per_worker_cache_filled": [round(x - warm["warm_seconds"] / max(warm["chunks"], 1), 1)
                                                        for x in cached["compiling_seconds_per_worker"]],
            "recompiling_chunks_warm": int(warm["compiling_chunks"]),
            "share_restarted": round(warm["restarted"] / max(warm["spectra"], 1), 3),
            "share_absorber_refits": round(warm["absorber_refits"] / max(warm["spectra"], 1), 3),
            "share_fallback": round(warm["fallback"] / max(warm["spectra"], 1), 3),
            "share_of_time_restarts": round(warm["restart_seconds"] / max(warm["warm_seconds"], 1e-9), 3),
            "share_of_time_absorbers": round(warm["absorber_seconds"] / max(warm["warm_seconds"], 1e-9), 3),
            "share_of_time_fallback": round(warm["fallback_seconds"] / max(warm["warm_seconds"], 1e-9), 3),
            "status_counts": {sd.Status(int(k)).meaning: int(v) for k, v in zip(*np.unique(fitted.status.values, return_counts=True))},
            **quality(fitted.params.values, fitted.redchi2.values),
        }  # fmt: skip
        if not args.skip_curvefit:
            n_cf = min(args.curvefit_n, args.n)
            coeffs, t_cf = curvefit(xr.open_zarr(store).isel(spectrum=slice(0, n_cf)), f_np, free_names, p0[:n_cf], bounds, client)
            if args.model == "user":
                phys = coeffs
                resid_model = user_model()
            else:
                phys = joint.params.expand_free(coeffs, joint.params.values)
                resid_model = joint
            with np.errstate(all="ignore"):
                flux, ivar = ds.flux.values[:n_cf].astype(float), ds.ivar.values[:n_cf].astype(float)
                good = np.all(np.isfinite(phys), axis=1)
                m = resid_model.evaluate(ds.wavelength.values, np.where(good[:, None], phys, np.asarray(resid_model.params.values)))
                use = np.isfinite(flux) & (ivar > 0)
                red = np.where(use, (m - flux) ** 2 * ivar, 0).sum(1) / (use.sum(1) - len(free_names))
                red[~good] = np.nan
            record["curvefit"] = {"n_spectra": n_cf, "seconds": round(t_cf, 2), "spectra_per_s": round(n_cf / t_cf, 2), **quality(phys, red)}
            record["sheap_quality_on_curvefit_sample"] = quality(fitted.params.values[:n_cf], fitted.redchi2.values[:n_cf])
            record["speedup_warm"] = round(record["sheap"]["spectra_per_s_warm"] / record["curvefit"]["spectra_per_s"], 1)
            record["speedup_cold"] = round(record["sheap"]["spectra_per_s_cold"] / record["curvefit"]["spectra_per_s"], 1)
            record["speedup_cold_cache_filled"] = round(record["sheap"]["spectra_per_s_cold_cache_filled"] / record["curvefit"]["spectra_per_s"], 1)
    emit(record)


if __name__ == "__main__":
    main()
