"""Where the time of a warm chunk goes, per model (issue 15), in one process without Dask.

For the user's plain-jnp model and ``region("hbeta", host=False)`` of ``bench_models.py``, on
matched and mismatched spectra: chunks of ``--chunk`` (250) spectra fitted by ``fit_chunk``
in one process with a worker's environment (one XLA thread), the first chunk compiling, then
``--repeats`` warm chunks. Per model it reports the seconds of a warm chunk and their split:
the batched LM solves (all of them: first fit, restarts, absorber re-solves), the float64
post-processing (objective, chi-square, ``J^T W J``: a forward-mode Jacobian per spectrum),
restarts, absorber re-solves and the SLSQP fallback (each with its own solves), and the
rest (data-driven initializer, screening, errors, line fluxes); the compile seconds of the
first chunk with an empty persistent cache, and the seconds per program (``jax_log_compiles``);
and two A/B comparisons measured interleaved in the same process (the machine is shared):
LM lanes (``lm_slots`` 12 vs 4) and the post-processing's Jacobian vmapped over a group of
rows vs one row after another (``lax.map``).

Prints one JSON line per model and data. Run: ``python benchmarks/profile_models.py``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _worker_environment() -> None:
    from sheap_dask.cluster import _NANNY_ENVIRON, _worker_env

    os.environ.update({**_worker_env(1), **_NANNY_ENVIRON})


class _CompileLog(logging.Handler):
    """Collects 'Finished XLA compilation of jit(NAME) in S sec' from jax_log_compiles."""

    pattern = re.compile(r"Finished XLA compilation of jit\(([^)]+)\) in ([0-9.eE+-]+) sec")

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.seconds: dict[str, float] = {}

    def emit(self, record):
        m = self.pattern.search(record.getMessage())
        if m:
            self.seconds[m.group(1)] = round(self.seconds.get(m.group(1), 0.0) + float(m.group(2)), 2)


def profile(model_name: str, data: str, chunk: int, repeats: int) -> dict:
    import bench_models as bm
    import jax
    import numpy as np

    import sheap_dask as sd
    from sheap_dask import batch
    from sheap_dask import compiled as compiled_mod
    from sheap_dask.chunk import ChunkOptions, fit_chunk

    n = chunk * (1 + repeats)
    mismatched = data == "mismatched"
    if model_name == "user":
        model, ds = bm.user_model(), bm.user_dataset(n, chunk, mismatched)
        init = ds.guess.values
    else:
        model, ds, init = sd.models.region("hbeta", host=False), sd.io.synthetic_spectra(n, seed=0, mismatch=mismatched), None
    wl, flux, ivar = ds.wavelength.values, ds.flux.values, ds.ivar.values
    timers = {"solve": 0.0, "post": 0.0}

    def timed(fn, key):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                timers[key] += time.perf_counter() - t0
        return wrapper

    batch.batched_solve = timed(batch.batched_solve, "solve")
    compiled_mod.CompiledModel.post = timed(compiled_mod.CompiledModel.post, "post")

    def fit(k, options):
        rows = slice(k * chunk, (k + 1) * chunk)
        return fit_chunk(model, wl, flux[rows], ivar[rows], init=None if init is None else init[rows], options=options, pad_to=chunk)

    options = ChunkOptions().resolved()
    log = _CompileLog()
    jax_logger = logging.getLogger("jax")
    jax_logger.addHandler(log)
    jax_logger.setLevel(logging.DEBUG)
    jax.config.update("jax_log_compiles", True)
    t0 = time.perf_counter()
    fit(0, options)
    first = time.perf_counter() - t0
    jax.config.update("jax_log_compiles", False)
    jax_logger.removeHandler(log)

    before = dict(compiled_mod.compile_stats())
    for key in timers:
        timers[key] = 0.0
    t0 = time.perf_counter()
    for k in range(1, 1 + repeats):
        fit(k, options)
    warm = (time.perf_counter() - t0) / repeats
    after = compiled_mod.compile_stats()
    d = {k: (after[k] - before[k]) / repeats for k in ("restart_seconds", "absorber_seconds", "fallback_seconds", "restarted",
                                                      "absorber_refits", "fallback", "traces")}
    # restarts/absorbers/fallback include their own solves and post-processing: the split
    # below attributes solves and post-processing wherever they ran, the rest to "other"
    split = {"solve": timers["solve"] / repeats, "post_float64": timers["post"] / repeats}
    split["other"] = warm - split["solve"] - split["post_float64"] - d["fallback_seconds"]
    record = {
        "benchmark": "profile_models", "model": model_name, "data": data, "chunk": chunk, "warm_chunks": repeats,
        "first_chunk_seconds_empty_cache": round(first, 2), "compile_seconds_by_program": log.seconds,
        "warm_chunk_seconds": round(warm, 3), "spectra_per_s_one_core": round(chunk / warm, 1),
        "warm_split_seconds": {k: round(v, 3) for k, v in split.items()} | {"fallback": round(d["fallback_seconds"], 3)},
        "within_them_restarts_absorbers_seconds": [round(d["restart_seconds"], 3), round(d["absorber_seconds"], 3)],
        "per_chunk_restarted_absorber_refits_fallback": [d["restarted"], d["absorber_refits"], d["fallback"]],
        "recompiles_warm": int(d["traces"]),
    }

    # A/B, interleaved: LM lanes 12 vs 4 (min over repeats of a warm chunk)
    lanes = {s: ChunkOptions(slots=s).resolved() for s in (12, 4)}
    for s, o in lanes.items():
        fit(1, o)
    best = {s: np.inf for s in lanes}
    for _ in range(2):
        for s, o in lanes.items():
            for k in range(1, 1 + repeats):
                t0 = time.perf_counter()
                fit(k, o)
                best[s] = min(best[s], time.perf_counter() - t0)
    record["warm_chunk_seconds_by_lanes"] = {str(s): round(v, 3) for s, v in best.items()}

    # A/B, interleaved: the float64 post-processing of a group of rows, vmapped vs lax.map
    c = compiled_mod.get_compiled(model, options)
    g = batch.group_size(chunk)
    with jax.enable_x64(True):
        post_one = c.post_one
        progs = {"vmap": jax.jit(jax.vmap(post_one, in_axes=(0, None, 0, 0))),
                 "lax_map": jax.jit(lambda p, w, f, e: jax.lax.map(lambda r: post_one(r[0], w, r[1], r[2]), (p, f, e)))}
        truth = np.nan_to_num(ds.true_params.values[:g]) if model_name == "region" else ds.true_params.values[:g]
        scale = np.nanmedian(np.abs(flux[:g]), axis=1)  # about the chunk's own scaling
        fmask = c.flux_mask[None, :]
        args = (np.where(fmask, truth / scale[:, None], truth), np.asarray(wl, float), np.nan_to_num(flux[:g] / scale[:, None]).astype(float),
                np.where(ivar[:g] > 0, 1.0 / np.sqrt(np.where(ivar[:g] > 0, ivar[:g], 1.0)) / scale[:, None], np.inf).astype(float))
        best_post = {}
        for name, prog in progs.items():
            jax.block_until_ready(prog(*args))
            best_post[name] = np.inf
        for _ in range(10):
            for name, prog in progs.items():
                t0 = time.perf_counter()
                jax.block_until_ready(prog(*args))
                best_post[name] = min(best_post[name], time.perf_counter() - t0)
    record["post_ms_per_spectrum"] = {k: round(1e3 * v / g, 3) for k, v in best_post.items()}
    return record


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chunk", type=int, default=250)
    ap.add_argument("--repeats", type=int, default=2, help="warm chunks timed (default 2)")
    ap.add_argument("--model", choices=["user", "region"], default=None, help="one model (default both)")
    ap.add_argument("--data", choices=["matched", "mismatched"], default=None, help="one kind of data (default both)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--record", default=None, help="also write the lines to this file (models_table.py --run: results/profile_models.jsonl)")
    args = ap.parse_args()
    if args.child:  # one (model, data) per process: an empty compile cache and clean counters
        print(json.dumps(profile(args.model, args.data, args.chunk, args.repeats)), flush=True)
        return
    import subprocess

    _worker_environment()
    lines = []
    for model in [args.model] if args.model else ["user", "region"]:
        for data in [args.data] if args.data else ["matched", "mismatched"]:
            # an empty persistent compilation cache for each child
            os.environ["DASK_SHEAP_DASK__WORKER__COMPILATION_CACHE"] = tempfile.mkdtemp(prefix="sheap_profile_cache_")
            cmd = [sys.executable, __file__, "--child", "--model", model, "--data", data, "--chunk", str(args.chunk), "--repeats", str(args.repeats)]
            out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True, env=os.environ).stdout.strip().splitlines()[-1]
            print(out, flush=True)
            lines.append(out)
    if args.record:
        Path(args.record).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
