"""The README's per-model performance table (issue 15), generated from recorded JSON lines.

``benchmarks/results/models.jsonl`` holds one line of ``bench_models.py`` per (model, data)
pair, as printed. This script renders them into the Markdown table between
``<!-- generated:models-table -->`` and ``<!-- /generated:models-table -->`` in README.md,
with each issue-15 target marked met or not and by how much; ``tests/test_benchmarks.py``
checks that the README holds exactly what this renders from the recorded lines.

    python benchmarks/models_table.py --run           # profile, run the four benchmarks (~25 min), record, write
    python benchmarks/models_table.py --write-readme  # re-render the README from the recorded lines
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "models.jsonl"
PROFILE = HERE / "results" / "profile_models.jsonl"
README = HERE.parent / "README.md"
BEGIN, END = "<!-- generated:models-table -->", "<!-- /generated:models-table -->"
RUNS = [("user", "matched"), ("user", "mismatched"), ("region", "matched"), ("region", "mismatched")]
EXTRA = [("region_joint", "matched"), ("region_joint", "mismatched")]  # shown when recorded
# issue 15: (warm, cold) speed-up over curvefit each model must reach
TARGETS = {"user": (10.0, 10.0), "region": (20.0, 10.0), "region_joint": (20.0, 10.0)}
QUALITY = ("frac_redchi2_lt_1.2", "frac_fwhm_broad_within_10pct", "frac_oiii_flux_within_10pct")
LABEL = dict(zip(QUALITY, ("reduced chi-square < 1.2", "broad H-beta FWHM within 10%", "[OIII] flux within 10%")))
COMPILE_TARGET_S = 5.0


def load(path: Path = RESULTS) -> list[dict]:
    """The recorded lines, in RUNS order (the last line of each (model, data) pair)."""
    found = {}
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            found[(rec["model"], rec["data"])] = rec
    missing = [r for r in RUNS if r not in found]
    if missing:
        raise SystemExit(f"{path} has no line for {missing}: run `python benchmarks/models_table.py --run`")
    return [found[r] for r in RUNS + [e for e in EXTRA if e in found]]


def load_profile(path: Path = PROFILE) -> list[dict]:
    """The recorded lines of ``profile_models.py``, in RUNS order."""
    found = {}
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            found[(rec["model"], rec["data"])] = rec
    return [found[r] for r in RUNS if r in found]


def render_profile(records: list[dict]) -> str:
    """Where a warm chunk's time goes, per model, and the A/B comparisons."""
    if not records:
        return ""
    lines = [("| model, data | warm chunk, s (spectra/s, one core) | LM solves / float64 post-processing / fallback / rest, s "
             "(restarts, absorber re-solves within them) | restarted / absorber re-solves / fallback per chunk | "
             "compilation, first chunk, empty cache, s (largest programs) | warm chunk by LM lanes: 12 / 4, s | "
             "post-processing ms per spectrum: vmapped / one row after another |"), "|" + "---|" * 7]
    for r in records:
        w = r["warm_split_seconds"]
        progs = sorted(r["compile_seconds_by_program"].items(), key=lambda kv: -kv[1])[:3]
        lanes, post = r["warm_chunk_seconds_by_lanes"], r["post_ms_per_spectrum"]
        counts = " / ".join(f"{x:g}" for x in r["per_chunk_restarted_absorber_refits_fallback"])
        lines.append(
            f"| {r['model']}, {r['data']} | {r['warm_chunk_seconds']:.2f} ({r['spectra_per_s_one_core']:.0f}/s) | "
            f"{w['solve']:.2f} / {w['post_float64']:.2f} / {w['fallback']:.2f} / {w['other']:.2f} "
            f"({' / '.join(f'{x:.2f}' for x in r['within_them_restarts_absorbers_seconds'])}) | {counts} | "
            f"{r['first_chunk_seconds_empty_cache']:.1f} ({', '.join(f'{k} {v:.1f}' for k, v in progs)}) | "
            f"{lanes['12']:.2f} / {lanes['4']:.2f} | {post['vmap']:.2f} / {post['lax_map']:.2f} |"
        )
    r0 = records[0]
    lines += ["", (f"Chunks of {r0['chunk']}, one process with a worker's environment (one XLA thread), no Dask; "
              "`python benchmarks/profile_models.py`, recorded in `benchmarks/results/profile_models.jsonl`. "
              "The A/B columns are measured interleaved in the same process (best of the repeats).")]
    return "\n".join(lines)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _quality(q: dict) -> str:
    return ", ".join(_pct(q[k]) for k in QUALITY)


def _verdict(value: float, target: float) -> str:
    return "met" if value >= target else f"**unmet**, {target / value:.1f}x short"


def render(records: list[dict], profile: list[dict] | None = None) -> str:
    """The Markdown tables and the targets' verdicts of ``records`` (and the profile's lines)."""
    head = ("| model, data | curvefit spectra/s | sheap warm | cold, empty cache | cold, cache filled | x curvefit: warm / cold / "
            "cold, cache filled | compilation per worker, s: empty cache / filled | left the batched solve: restarts / absorbers / "
            "fallback (their share of warm time) | quality, sheap on all / sheap on curvefit's sample / curvefit: "
            "redchi2 < 1.2, broad FWHM, [OIII] flux within 10% |")
    lines = [head, "|" + "---|" * 9]
    verdicts = []
    for r in records:
        s, c, same = r["sheap"], r["curvefit"], r["sheap_quality_on_curvefit_sample"]
        name = {"user": "user `sd.Model` (plain jnp)", "region": '`region("hbeta", host=False)`',
                "region_joint": '`region("hbeta", host=False, continuum="joint")`'}[r["model"]]
        seconds = lambda xs: ", ".join(f"{x:.1f}" for x in xs)
        lines.append(
            f"| {name}, {r['data']} | {c['spectra_per_s']:.1f} ({c['n_spectra']} spectra) | {s['spectra_per_s_warm']:.1f} | "
            f"{s['spectra_per_s_cold']:.1f} | {s['spectra_per_s_cold_cache_filled']:.1f} | {r['speedup_warm']:.1f}x / "
            f"{r['speedup_cold']:.1f}x / {r['speedup_cold_cache_filled']:.1f}x | {seconds(s['compile_seconds_per_worker'])} / "
            f"{seconds(s['compile_seconds_per_worker_cache_filled'])} | "
            f"{_pct(s['share_restarted'])} / {_pct(s['share_absorber_refits'])} / {_pct(s['share_fallback'])} "
            f"({_pct(s['share_of_time_restarts'])} / {_pct(s['share_of_time_absorbers'])} / {_pct(s['share_of_time_fallback'])}) | "
            f"{_quality(s)} / {_quality(same)} / {_quality(c)} |"
        )
        warm_t, cold_t = TARGETS[r["model"]]
        worse = [k for k in QUALITY if same[k] < c[k]]  # on the same spectra
        compile_s = max(s["compile_seconds_per_worker"])
        filled = max(s["compile_seconds_per_worker_cache_filled"])
        verdicts.append(
            f"- {name}, {r['data']} data: warm {r['speedup_warm']:.1f}x curvefit (target {warm_t:.0f}x): "
            f"{_verdict(r['speedup_warm'], warm_t)}; cold {r['speedup_cold']:.1f}x (target {cold_t:.0f}x): "
            f"{_verdict(r['speedup_cold'], cold_t)}; quality at least curvefit's on the same spectra: "
            + ("met" if not worse else "**unmet** (" + ", ".join(
                f"{LABEL[k]} {_pct(same[k])} vs {_pct(c[k])}: {round((c[k] - same[k]) * same['n_with_data'])} of {same['n_with_data']} spectra"
                for k in worse) + ")")
            + f"; compilation with an empty cache {compile_s:.1f} s per worker (target <= {COMPILE_TARGET_S:.0f} s): "
            f"{'met' if compile_s <= COMPILE_TARGET_S else f'**unmet**, {compile_s / COMPILE_TARGET_S:.1f}x over'}; with the cache "
            f"filled by an earlier cluster {filled:.1f} s ({'within' if filled <= COMPILE_TARGET_S else 'over'} 5 s; not the "
            f"issue's client-filled cache); chunks that compiled after the first: {s['recompiling_chunks_warm']}."
        )
    r0 = records[0]
    footer = (f"{r0['n_spectra']} spectra, chunks of {r0['chunk']}, `LocalCluster(n_workers={r0['workers']}, threads_per_worker=1)`, "
              f"{r0['cpus']} cores ({r0['machine']}, shared with other jobs), {r0['jax_device']}, JAX {r0['jax']}, Python {r0['python']}. "
              f"curvefit runs in the same invocation on the same cluster on the first {r0['curvefit']['n_spectra']} spectra "
              "(its rate is per spectrum; speed-ups are rates' ratios; the machine's load from other jobs moves both: curvefit "
              f"ran at {min(r['curvefit']['spectra_per_s'] for r in records):.1f}-{max(r['curvefit']['spectra_per_s'] for r in records):.1f} "
              "spectra/s across these runs). Compilation per worker = the first chunk's seconds "
              "minus a warm chunk's. Command: `python benchmarks/models_table.py --run` (each row: `python "
              "benchmarks/bench_models.py --model user|region|region_joint --data matched|mismatched`), recorded in "
              "`benchmarks/results/models.jsonl`.")
    out = [*lines, "", footer, "", *verdicts]
    if profile:
        out += ["", "Where the time goes:", "", render_profile(profile)]
    return "\n".join(out)


def readme_with_table(readme: str, table: str) -> str:
    from _common import replace_generated

    return replace_generated(readme, BEGIN, END, table)


def run_all(extra: list[str]) -> None:
    RESULTS.parent.mkdir(exist_ok=True)
    out = subprocess.run([sys.executable, str(HERE / "profile_models.py")], check=True, stdout=subprocess.PIPE, text=True).stdout
    PROFILE.write_text("\n".join(line for line in out.splitlines() if line.startswith("{")) + "\n")
    lines = []
    for model, data in RUNS + EXTRA:
        cmd = [sys.executable, str(HERE / "bench_models.py"), "--model", model, "--data", data, *extra]
        out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout.strip().splitlines()[-1]
        print(out, flush=True)
        lines.append(out)
    RESULTS.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", action="store_true", help="run the four benchmarks first and record their lines")
    ap.add_argument("--write-readme", action="store_true", help="write the table into README.md (implied by --run)")
    args, extra = ap.parse_known_args()
    if args.run:
        run_all(extra)
    table = render(load(), load_profile())
    if args.run or args.write_readme:
        README.write_text(readme_with_table(README.read_text(), table))
    print(table)


if __name__ == "__main__":
    main()
