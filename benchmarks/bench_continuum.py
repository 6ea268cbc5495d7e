"""The staged H-beta continuum on spectra the model generates itself: is it unbiased?

One process, the chunk layer (``fit_chunk``): ``--n`` synthetic quasar spectra made by
``region("hbeta", host=False)`` itself (``synthetic_spectra``: power law, FeII, two broad and
a narrow H-beta, [OIII], HeII; S/N 10-40, no masked runs) are fitted with the default staged
fit (the continuum on its line-free windows, then the lines) and with ``continuum="joint"``.
Prints one JSON line with, per fit:

* for the power-law norm and index and the FeII amplitude: the median of
  ``(fit - truth) / error`` and the fraction beyond 3 errors (0 and ~0.003 if unbiased with
  honest errors);
* the broad H-beta flux (all broad Gaussians) at S/N >= 25: median relative error and the
  fraction within 10% of the truth.

The line records the H-beta continuum windows and HeII's FWHM bound it measured, so lines of
other versions can be compared. ``--record`` appends it to
``benchmarks/results/continuum.jsonl``; ``render_readme`` turns the first and the last line
into the README's paragraph (``--write-readme``; ``tests/test_benchmarks.py`` checks it).

Run: ``python benchmarks/bench_continuum.py [--n 300] [--seed 5] [--record]``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RECORD = HERE / "results" / "continuum.jsonl"
README = HERE.parent / "README.md"
BEGIN, END = "<!-- generated:continuum-bias -->", "<!-- /generated:continuum-bias -->"
CONTINUUM = ("powerlaw_norm", "powerlaw_index", "feii_amplitude")


def measure(model, ds, chunk: int) -> dict:
    from sheap_dask.chunk import fit_chunk

    wl, flux, ivar = ds["wavelength"], ds["flux"].astype(np.float64), ds["ivar"].astype(np.float64)
    parts = [fit_chunk(model, wl, flux[s : s + chunk], ivar[s : s + chunk], pad_to=chunk) for s in range(0, flux.shape[0], chunk)]
    params = np.concatenate([p["params"] for p in parts])
    errors = np.concatenate([p["params_err"] for p in parts])
    truth, names = ds["true_params"], list(model.param_names)
    out = {}
    for name in CONTINUUM:
        i = names.index(name)
        z = (params[:, i] - truth[:, i]) / errors[:, i]
        z = z[np.isfinite(z)]
        out[f"{name}_median_z"] = round(float(np.median(z)), 2)
        out[f"{name}_beyond_3sigma"] = round(float(np.mean(np.abs(z) > 3)), 3)
    broad = [names.index(n) for n in names if n.startswith("hbeta_broad") and n.endswith("_flux")]
    rel = params[:, broad].sum(axis=1) / truth[:, broad].sum(axis=1) - 1
    high = ds["snr"] >= 25
    out["broad_flux_median_rel_error_snr25"] = round(float(np.median(rel[high])), 3)
    out["broad_flux_within_10pct_snr25"] = round(float(np.mean(np.abs(rel[high]) <= 0.1)), 3)
    return out


def render_readme(records: list[dict]) -> str:
    """The README's paragraph: the first recorded line (the former windows) and the last."""

    def summary(rec, fit):
        r = rec[fit]
        z = ", ".join(f"{name.replace('_', ' ')} {r[f'{name}_median_z']:+.1f}σ" for name in CONTINUUM)
        return (f"median offsets {z}; beyond 3σ: {100 * max(r[f'{n}_beyond_3sigma'] for n in CONTINUUM):.1f}% at most; "
                f"broad Hβ flux at S/N ≥ 25 {100 * r['broad_flux_median_rel_error_snr25']:+.1f}% (median), "
                f"{100 * r['broad_flux_within_10pct_snr25']:.0f}% within 10%")

    def windows(rec):
        return " and ".join(f"{lo:.0f}–{hi:.0f}" for lo, hi in rec["windows"]) + " Å"

    first, last = records[0], records[-1]
    text = (f"Measured (`python benchmarks/bench_continuum.py --record`: {last['n_spectra']} spectra made by "
            f"`region(\"hbeta\", host=False)` itself, S/N 10–40; fit − truth in units of the fit's error): with the "
            f"windows {windows(last)} (HeII FWHM ≤ {last['heii_fwhm_max']:.0f} km/s), staged: {summary(last, 'staged')}; "
            f"joint: {summary(last, 'joint')}.")
    if first is not last and first["windows"] != last["windows"]:
        text += (f" With the former windows {windows(first)} (HeII FWHM ≤ {first['heii_fwhm_max']:.0f} km/s), staged: "
                 f"{summary(first, 'staged')}.")
    return text


def load(path: Path = RECORD) -> list[dict]:
    """The recorded lines, oldest first."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def readme_with_paragraph(readme: str) -> str:
    """``readme`` with its continuum-bias block rendered from the record."""
    from _common import replace_generated

    return replace_generated(readme, BEGIN, END, render_readme(load()))


def write_readme(path: Path = README) -> None:
    path.write_text(readme_with_paragraph(path.read_text()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--chunk", type=int, default=100)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--record", action="store_true", help="append the line to benchmarks/results/continuum.jsonl and render the README")
    ap.add_argument("--write-readme", action="store_true", help="only render the README's paragraph from the record")
    args = ap.parse_args()
    if not args.write_readme:
        import sheap_dask as sd

        staged = sd.models.region("hbeta", host=False)
        ds = sd.synthetic.synthetic_spectra_numpy(args.n, seed=args.seed, model=staged, masked_fraction=0.0, n_all_nan=0)
        record = {"benchmark": "continuum", "n_spectra": args.n, "seed": args.seed,
                  "windows": [list(w) for w in staged.continuum_stage.windows],
                  "heii_fwhm_max": float(staged.params["heii4686_fwhm"].max),
                  "staged": measure(staged, ds, args.chunk),
                  "joint": measure(sd.models.region("hbeta", host=False, continuum="joint"), ds, args.chunk)}
        from _common import emit

        emit(record)
        if args.record:
            with open(RECORD, "a") as out:
                out.write(json.dumps(record) + "\n")
    if args.record or args.write_readme:
        write_readme()


if __name__ == "__main__":
    main()
