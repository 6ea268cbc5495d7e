"""Shared pieces of the benchmarks: the reference problem, clusters, quality metrics, output."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
PLAIN_FIT = Path(__file__).with_name("_plain_fit.py")

import sheap_dask as sd  # noqa: E402
from sheap_dask.cluster import _NANNY_ENVIRON, _worker_env  # noqa: E402
from sheap_dask.models import derived  # noqa: E402


def parse_args(doc: str, configure=None):
    """The benchmarks' common command line (--n, --chunk, --workdir) -> (args, work dir).

    ``configure(parser)`` adds a script's own options.
    """
    import argparse
    import tempfile

    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--n", type=int, default=400, help="spectra (default 400)")
    ap.add_argument("--chunk", type=int, default=100, help="spectra per chunk (default 100)")
    ap.add_argument("--workdir", default=None, help="where to put the stores (default: a temp dir)")
    if configure is not None:
        configure(ap)
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="sheap_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    return args, work


def reference_store(path: Path, n: int, chunk: int, seed: int = 0) -> Path:
    """The reference problem of issue 6: synthetic H-beta-region spectra in a zarr store."""
    if not path.exists():
        sd.io.synthetic_spectra(n, seed=seed).chunk({"spectrum": chunk}).to_zarr(path)
    return path


@contextmanager
def local_cluster(n_workers: int = 2):
    """``LocalCluster(n_workers, threads_per_worker=1)`` with XLA sized to one core each."""
    from distributed import Client

    from sheap_dask.cluster import start_local_cluster

    with start_local_cluster(n_workers, 1) as cluster, Client(cluster) as client:
        yield client


def plain_processes_seconds(store: Path, chunk: int, n_procs: int) -> float:
    """Wall time of ``n_procs`` plain processes (no Dask) fitting every chunk of ``store``
    between them with ``fit_chunk``, all started together after their compiling chunk, with
    the environment of a worker (thread pools, malloc settings)."""
    env = {**os.environ, **_worker_env(1), **_NANNY_ENVIRON}
    with tempfile.TemporaryDirectory() as barrier:
        procs = [
            subprocess.Popen([sys.executable, str(PLAIN_FIT), str(store), str(chunk), str(i), str(n_procs), barrier, str(i)],
                             env=env, stdout=subprocess.PIPE, text=True)
            for i in range(n_procs)
        ]
        while len(list(Path(barrier).glob("ready-*"))) < n_procs:
            if any(p.poll() not in (None, 0) for p in procs):
                raise RuntimeError("a plain fitting process failed")
            time.sleep(0.05)
        (Path(barrier) / "go").touch()
        seconds = [float(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    return max(seconds)


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def quality(model, params: np.ndarray, truth: np.ndarray, redchi2: np.ndarray, has_data: np.ndarray) -> dict:
    """Fit quality on the spectra that have data: the issue-6 metrics."""
    ok = has_data & np.all(np.isfinite(params), axis=1)
    p = np.where(ok[:, None], params, truth)  # keep derived-quantity code NaN-free; ok masks below
    fwhm_fit, _ = derived.fwhm(model, "hbeta_broad", p)
    fwhm_true, _ = derived.fwhm(model, "hbeta_broad", truth)
    names = list(model.params.names)
    oiii = names.index("oiii5007_flux")
    n = int(has_data.sum())
    with np.errstate(invalid="ignore", divide="ignore"):
        fwhm_ok = ok & (np.abs(fwhm_fit / fwhm_true - 1) < 0.10)
        oiii_ok = ok & (np.abs(params[:, oiii] / truth[:, oiii] - 1) < 0.10)
        chi_ok = ok & (redchi2 < 1.2)
    return {
        "n_with_data": n,
        "frac_redchi2_lt_1.2": round(float(chi_ok.sum() / n), 4),
        "frac_fwhm_hbeta_broad_within_10pct": round(float(fwhm_ok.sum() / n), 4),
        "frac_oiii5007_flux_within_10pct": round(float(oiii_ok.sum() / n), 4),
        "median_redchi2": round(float(np.nanmedian(np.where(ok, redchi2, np.nan))), 4),
    }


def chi2_of(model, params, wavelength, flux, ivar, window=None):
    """Plain weighted chi-square and dof of ``params`` (for baselines that do not report it)."""
    with np.errstate(all="ignore"):
        good = np.all(np.isfinite(params), axis=1)
        safe = np.where(good[:, None], params, np.asarray(model.params.values))
        m = model.evaluate(wavelength, safe)
        use = np.isfinite(flux) & (ivar > 0)
        chi2 = np.where(use, (m - flux) ** 2 * ivar, 0).sum(1)
        dof = use.sum(1) - model.n_free
        red = np.where(good & (dof > 0), chi2 / dof, np.nan)
    return red


def machine() -> dict:
    import jax

    return {
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jax_device": str(jax.devices()[0]),
        "sheap_dask": sd.__version__,
    }


def emit(record: dict) -> None:
    """One JSON line on stdout: the benchmark's result."""
    print(json.dumps(record, sort_keys=False), flush=True)


def replace_generated(text: str, begin: str, end: str, body: str) -> str:
    """``text`` with what stands between the markers ``begin`` and ``end`` replaced by ``body``
    (a README block that a script generates and a test checks)."""
    if begin not in text or end not in text:
        raise SystemExit(f"README.md has no {begin} ... {end} block")
    start, stop = text.index(begin) + len(begin), text.index(end)
    return text[:start] + "\n" + body + "\n" + text[stop:]
