"""Before/after of the host-galaxy component on the real SDSS spectra of issue 14.

Run from the repository root::

    python scripts/validate_host.py [--spectra DIR] [--json OUT.jsonl] [--record]
    python scripts/validate_host.py --write-readme   # re-render the README from the record
    python scripts/validate_host.py --figure         # docs/host_broad_profiles.png
    python scripts/validate_host.py --continuum joint --no-restarts --json OUT.jsonl  # an alternative's fits

Fits, in one run with the same code, H-beta (with the [OIII] wing, as ``examples/real_sdss.py``)
and H-alpha of

* the three low-luminosity quasars under strong starlight (spec-0280-51612-0117,
  spec-1599-53089-0469, spec-0332-52367-0639) and
* the three SDSS GALAXY spectra (spec-0266-51602-0013, spec-0266-51602-0107,
  spec-0295-51585-0596)

four times: ``host=False`` (before); with the default ``"sdss+ssp"`` (galaxies and two
populations) and with the ``"sdss"`` galaxies alone (for a GALAXY spectrum the galaxies
*without* it, ``scripts/build_host_templates.py --leave-out``, and for ``"sdss+ssp"`` the two
populations added, :func:`with_populations`: never on the spectrum a template came from); and with the
``"mastar"`` stellar populations, none of which comes from these spectra. Then H-beta of the
ten SDSS epochs of RM017 (one quasar, whose broad H-beta width is not expected to double from
one epoch to another) with ``"sdss"`` and ``"sdss+ssp"``: how stable each set's broad width is.

Prints one JSON line per (spectrum, region, host) with the broad line's FWHM and its error
(``fits.sheap.fwhm(..., errors=True)``), whether it is detected, the reduced chi-square, and
with the host the host fraction at 4200/5100 A, the stellar dispersion and log lambda L5100
of the AGN alone; then a Markdown summary. ``--record`` keeps the lines in
``benchmarks/results/host_validation.jsonl`` and renders the README's before/after table
(between ``<!-- generated:host-table -->`` markers) from them; ``tests/test_host.py`` checks
that the README holds exactly that rendering. ``--figure`` draws, for the three quasars, the
broad H-beta and H-alpha of the default fits in velocity (``FIGURE``): the data minus every
other component beside the fitted broad line, so the two Balmer lines' profiles can be compared.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

QUASARS = {
    "spec-0280-51612-0117": "gelato_examples/spec-0280-51612-0117.fits",
    "spec-1599-53089-0469": "gelato_examples/spec-1599-53089-0469.fits",
    "spec-0332-52367-0639": "pyqsofit_examples/spec-0332-52367-0639.fits",
}
GALAXIES = {
    "spec-0266-51602-0013": "pyqsofit_examples/spec-0266-51602-0013.fits",
    "spec-0266-51602-0107": "pyqsofit_examples/spec-0266-51602-0107.fits",
    "spec-0295-51585-0596": "gelato_examples/spec-0295-51585-0596.fits",
}
REGIONS = {"hbeta": ({"oiii_wing": True}, "hbeta_broad"), "halpha": ({}, "halpha_broad")}


def fit(ds, region: str, restarts: bool = True, **kwargs) -> dict:
    """Fit ``ds`` (synchronous dask scheduler) and measure the broad line; one dict per spectrum."""
    import dask

    import sheap_dask as sd

    opts, line = REGIONS[region]
    model = sd.models.region(region, **opts, **kwargs)
    with dask.config.set({"sheap_dask.fit.lm_restarts": restarts}):
        fits = sd.fit_dataset(ds, model, progress=False).compute()
    fits.sheap.use(spectra=ds, model=model)
    fw = fits.sheap.fwhm(line, errors=True).compute()
    li = list(np.asarray(fits.line.values)).index(line)
    rows = []
    host = "host_w1" in model.param_names
    if host:
        f42 = fits.sheap.frac_host_4200(errors=True).compute()
        f51 = fits.sheap.frac_host_5100(errors=True).compute()
        sig = fits.sheap.stellar_dispersion(errors=True).compute()
    lum = fits.sheap.luminosity(5100.0, log=True).compute()
    for i in range(fits.sizes["spectrum"]):
        row = {
            "spectrum": str(ds.specname.values[i]) if "specname" in ds.coords else i,
            # the SDSS pipeline's own call (SUBCLASS "BROADLINE": a broad line it detected)
            "sdss_class": f"{ds.objclass.values[i]} {ds.subclass.values[i]}".strip() if "subclass" in ds.coords else "",
            "region": region,
            "host": host,
            "fwhm": float(fw[f"fwhm_{line}"].values[i]),
            "fwhm_err": float(fw[f"fwhm_{line}_err"].values[i]),
            "broad_detected": bool(fits.line_detected.values[i, li]),
            "redchi2": float(fits.redchi2.values[i]),
            "log_l5100_agn": float(lum.values[i]),
            "quality": sd.quality.decode_quality(int(fits.quality.values[i])),
        }
        if host:
            row.update({"frac_host_4200": float(f42["frac_host_4200"].values[i]), "frac_host_4200_err": float(f42["frac_host_4200_err"].values[i]),
                        "frac_host_5100": float(f51["frac_host_5100"].values[i]), "frac_host_5100_err": float(f51["frac_host_5100_err"].values[i]),
                        "sigma_star": float(sig["sigma_star"].values[i])})
        rows.append(row)
    return rows


def main(argv=None) -> int:
    import dask

    import build_host_templates as bht
    import sheap_dask as sd

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spectra", type=Path, default=bht.DEFAULT_SPECTRA)
    ap.add_argument("--json", type=Path, default=None, help="also write the JSON lines here")
    ap.add_argument("--record", action="store_true", help="record the lines and re-render the README's table")
    ap.add_argument("--write-readme", action="store_true", help="only re-render the README's table from the record")
    ap.add_argument("--figure", action="store_true", help=f"only draw {FIGURE.relative_to(REPO)}")
    ap.add_argument("--continuum", default=None, choices=("windows", "refined", "joint"),
                    help="the host fits' continuum mode (to compare; the README's table is the default's)")
    ap.add_argument("--no-restarts", action="store_true", help="the host fits without LM restarts (to compare)")
    args = ap.parse_args(argv)
    if args.record and (args.continuum or args.no_restarts):
        ap.error("--record keeps the default fits; drop --continuum/--no-restarts (or write them with --json)")
    if args.write_readme:
        write_readme()
        return 0
    dask.config.set(scheduler="synchronous")
    qso = sd.io.read_sdss_spectra([str(args.spectra / f) for f in QUASARS.values()])
    if args.figure:
        profile_figure(qso).savefig(FIGURE, dpi=90)
        print(f"wrote {FIGURE}")
        return 0
    host_variant = {**({"continuum": args.continuum} if args.continuum else {}), **({"restarts": False} if args.no_restarts else {})}
    rows = []
    gal = sd.io.read_sdss_spectra([str(args.spectra / f) for f in GALAXIES.values()])
    for region in REGIONS:
        for data in (qso, gal):
            rows += fit(data, region, host=False)
            rows += [dict(r, templates="mastar") for r in fit(data, region, host=True, host_template="mastar", **host_variant)]
        for t in ("sdss", "sdss+ssp"):
            rows += [dict(r, templates=t) for r in fit(qso, region, host=True, host_template=t, **host_variant)]
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(GALAXIES):
            path = Path(tmp) / f"without_{name}.csv"
            bht.write(path, *bht.build(args.spectra, [name[5:]]))
            for t, template in (("sdss", str(path)), ("sdss+ssp", with_populations(path))):
                for region in REGIONS:
                    rows += [dict(r, templates=t) for r in fit(gal.isel(spectrum=[i]), region, host=True, host_template=template, **host_variant)]
    epochs = sd.io.read_sdss_spectra([str(f) for f in epoch_files(args.spectra)])
    for t in ("sdss", "sdss+ssp"):
        rows += [dict(r, templates=t) for r in fit(epochs, "hbeta", host=True, host_template=t, **host_variant)]
    out = [json.dumps(r) for r in rows]
    print("\n".join(out))
    if args.json:
        args.json.write_text("\n".join(out) + "\n")
    if args.record:
        RECORD.write_text("\n".join(out) + "\n")
        write_readme()
    print()
    print(render(rows))
    return 0


def with_populations(galaxy_templates):
    """``galaxy_templates`` (a leave-one-out set) with the stellar populations the built-in
    ``"sdss+ssp"`` adds to the SDSS galaxies."""
    from sheap_dask.models import host as mhost

    return mhost.combined_builtin("sdss+ssp", {"sdss": str(galaxy_templates)})


RECORD = REPO / "benchmarks" / "results" / "host_validation.jsonl"
FIGURE = REPO / "docs" / "host_broad_profiles.png"
BENCH_RECORD = REPO / "benchmarks" / "results" / "host.jsonl"  # benchmarks/bench_host.py --record
README = REPO / "README.md"
BEGIN, END = "<!-- generated:host-table -->", "<!-- /generated:host-table -->"
LINE_NAMES = {"hbeta": "Hβ", "halpha": "Hα"}
#: The template sets of the table and the synthetic paragraphs, in order (the default first).
TEMPLATE_SETS = ("sdss+ssp", "sdss", "mastar")
#: The multi-epoch quasar: its SDSS spectra (folder under the spectra directory).
EPOCHS = "pyqsofit_rm017"


def epoch_files(spectra: Path) -> list[Path]:
    """RM017's SDSS spectra (SDSS J141324.27+530527.0, z = 0.456), by file name."""
    return sorted(p for p in (spectra / EPOCHS).glob("spec-*.fits"))


def profile_figure(qso):
    """One panel per quasar: broad H-beta and H-alpha of the default fits (host, default
    templates) in velocity, each normalised to its fitted broad line's peak; thin: the data
    minus every other fitted component (continuum, host, FeII, narrow lines, HeII), smoothed
    over 7 pixels; thick: the fitted broad line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import sheap_dask as sd
    from sheap_dask.models import host as mhost
    from sheap_dask.models.lines import LINES
    from sheap_dask.models.profiles import C_KMS

    fig, axes = plt.subplots(1, len(QUASARS), figsize=(4.2 * len(QUASARS), 3.6), sharey=True)
    colours = {"hbeta": "tab:blue", "halpha": "tab:red"}
    for region, (opts, line) in REGIONS.items():
        model = sd.models.region(region, **opts)
        fits = sd.fit_dataset(qso, model, progress=False).compute()
        fits.sheap.use(spectra=qso, model=model)
        comps = fits.sheap.components(frame="rest").compute()
        names = [str(n) for n in comps.component.values]
        broad = [names.index(n) for n in model.metadata["lines"][line]["components"]]
        others = [k for k in range(len(names)) if k not in broad]
        fw = fits.sheap.fwhm(line, errors=True).compute()
        for i, ax in enumerate(np.atleast_1d(axes)):
            z = float(qso.redshift.values[i])
            velocity = (qso.wavelength.values / (1 + z) / LINES[region] - 1) * C_KMS
            values = comps.values[i]
            residual = qso.flux.values[i] * (1 + z) - values[:, others].sum(axis=1)
            profile = values[:, broad].sum(axis=1)
            near = np.abs(velocity) < 15000
            peak = np.nanmax(profile[near])
            smooth = np.convolve(np.nan_to_num(residual), np.ones(7) / 7, mode="same")
            value = fw[f"fwhm_{line}"].values[i]
            detected = np.isfinite(value)  # fits.sheap.fwhm is NaN for an undetected line: drawn dashed
            width = f"FWHM {value:.0f} ± {fw[f'fwhm_{line}_err'].values[i]:.0f} km/s" if detected else "undetected (fit dashed)"
            ax.plot(velocity[near] / 1000, smooth[near] / peak, color=colours[region], lw=0.6, alpha=0.7)
            ax.plot(velocity[near] / 1000, profile[near] / peak, color=colours[region], lw=2, ls="-" if detected else "--",
                    label=f"{LINE_NAMES[region]} broad, {width}")
            ax.axhline(0, color="k", lw=0.5)
            ax.set_title(list(QUASARS)[i], fontsize=10)
            ax.set_xlabel("velocity from the line [1000 km/s]")
            ax.legend(fontsize=7, loc="upper left")
    np.atleast_1d(axes)[0].set_ylabel("flux / fitted broad peak")
    np.atleast_1d(axes)[0].set_ylim(-0.6, 1.9)
    fig.suptitle(f"Broad Balmer lines of the low-luminosity quasars (host on, {mhost.DEFAULT_TEMPLATE} templates): data minus every other "
                 "component (thin) and the fitted broad line (thick)", fontsize=9)
    fig.tight_layout()
    return fig


def load(path: Path = RECORD) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def render(rows: list[dict]) -> str:
    """The before (``host=False``) / after (host) Markdown table of the recorded rows."""

    def width(r):
        if not r["broad_detected"]:
            return "undetected"
        return f"{r['fwhm']:.0f} ± {r['fwhm_err']:.0f}"

    def fraction(r):
        value, error = r.get("frac_host_5100", float("nan")), r.get("frac_host_5100_err", float("nan"))
        if not np.isfinite(value):
            return "–"
        return f"{value:.2f} ± {error:.2f}" if np.isfinite(error) else f"{value:.2f}"

    sets = [t for t in TEMPLATE_SETS if any(r.get("templates") == t for r in rows)]
    names = " / ".join(f"`{t}`" for t in sets)
    lines = ["| spectrum | SDSS class | line | FWHM without host | " + " | ".join(f"FWHM, `{t}` templates" for t in sets)
             + f" | χ²ν without → {names} | f_host(5100) {names} |", "|---|---|---|" + "---|" * (len(sets) + 3)]
    by = {(r["spectrum"], r["region"], r.get("templates") if r["host"] else None): r for r in rows}
    for (spec, region, templates), before in by.items():
        if templates is not None or (spec not in QUASARS and spec not in GALAXIES):  # the epochs: render_epochs
            continue
        fits = [by[(spec, region, t)] for t in sets]
        label = spec if spec in QUASARS else f"{spec} ({', '.join(f'`{t}`' for t in sets if t.startswith('sdss'))} leave-one-out)"
        lines.append(f"| {label} | {before.get('sdss_class') or '–'} | {LINE_NAMES[region]} | {width(before)} | "
                     + " | ".join(width(f) for f in fits)
                     + f" | {before['redchi2']:.2f} → " + " / ".join(f"{f['redchi2']:.2f}" for f in fits) + " | "
                     + " / ".join(fraction(f) for f in fits) + " |")
    return "\n".join(lines)


def render_bench(rec: dict) -> str:
    """One paragraph of a synthetic benchmark's recorded line."""
    templates = rec.get("templates", "sdss")

    def pct(key):  # with its binomial standard error where the record has one
        se = rec.get(f"{key}_se")
        return f"{100 * rec[key]:.1f}%" + (f" ± {100 * se:.1f}" if se is not None else "")

    scored = f"the {rec['n_scored']} spectra" if "n_scored" in rec else "the spectra"
    return (f"Synthetic quasar + host spectra, `{templates}` templates (`python benchmarks/bench_host.py --template {templates} "
            f"--record`: {rec['n_spectra']} spectra, chunks of {rec['chunk']}, f_host(5100) 0–0.8, S/N 10–40; {scored} with "
            f"S/N ≥ 10; ± the binomial standard error): host fraction within 0.1 of the truth for "
            f"{pct('frac_host_5100_within_0.1')} (median error {rec['frac_host_5100_median_abs_error']:.3f}); broad Hβ FWHM within "
            f"10% for {pct('fwhm_within_10pct_host_on')} with the host and {pct('fwhm_within_10pct_host_off')} "
            f"without; throughput {rec['spectra_per_s_host_on']:.1f} vs {rec['spectra_per_s_host_off']:.1f} spectra/s warm "
            f"(one process, the two models taking turns chunk by chunk): the host costs **{rec['cost_ratio']:.2f}x** (targets: ≥ 90% "
            f"each, ≤ 1.5x).{calibration_sentence(rec)}")


def calibration_sentence(rec: dict) -> str:
    """How honest the fits' own errors were in the synthetic benchmark (when it recorded it)."""
    if "frac_host_5100_within_1_error" not in rec:
        return ""
    return (f" The fits' own errors: the true host fraction lies within one reported error for "
            f"{100 * rec['frac_host_5100_within_1_error']:.0f}% and within two for {100 * rec['frac_host_5100_within_2_errors']:.0f}% "
            f"(68% and 95% for honest Gaussian errors), and an unbiased fit with exactly these errors would bring "
            f"{100 * rec['frac_host_5100_expected_from_errors']:.1f}% within 0.1; for the FWHM "
            f"{100 * rec['fwhm_within_1_error']:.0f}% / {100 * rec['fwhm_within_2_errors']:.0f}% and "
            f"{100 * rec['fwhm_expected_from_errors']:.1f}% within 10%.")


def write_readme(path: Path = README) -> None:
    """Replace the README's host block with the rendering of the records."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from _common import replace_generated  # the benchmarks' README-block helper

    path.write_text(replace_generated(path.read_text(), BEGIN, END, render_all()))


def variant(rec: dict) -> tuple[str, bool]:
    """A synthetic record's host-model variant: (continuum mode, LM restarts); lines recorded
    before the benchmark wrote them are of the default of their day, the last of which is
    ``("refined", True)``."""
    return rec.get("continuum", "refined"), rec.get("restarts", True)


def render_variant(rec: dict) -> str:
    """One sentence of a recorded alternative (``bench_host.py --continuum ... --no-restarts``)."""
    continuum, restarts = variant(rec)
    flags = f" --continuum {continuum}" + ("" if restarts else " --no-restarts")
    return (f"The alternative `continuum=\"{continuum}\"`{'' if restarts else ' with the LM restarts off'} on the same spectra "
            f"(`python benchmarks/bench_host.py --template {rec['templates']}{flags} --record`): host fraction within 0.1 for "
            f"{100 * rec['frac_host_5100_within_0.1']:.1f}% ± {100 * rec['frac_host_5100_within_0.1_se']:.1f}, broad Hβ FWHM within 10% "
            f"for {100 * rec['fwhm_within_10pct_host_on']:.1f}% ± {100 * rec['fwhm_within_10pct_host_on_se']:.1f}, cost "
            f"{rec['cost_ratio']:.2f}x.")


def render_all(bench: list[dict] | None = None) -> str:
    """The README's block: the real-spectra table, then per template set the last default
    synthetic record (``bench``, default the recorded lines) and the last of each alternative."""
    last = {}
    for rec in load(BENCH_RECORD) if bench is None else bench:
        last[(rec.get("templates", "sdss"), variant(rec))] = rec  # lines without "templates" predate the other sets
    default = ("refined", True)
    paragraphs = []
    for t in TEMPLATE_SETS:
        if (t, default) in last:
            others = [render_variant(r) for (tt, v), r in last.items() if tt == t and v != default]
            paragraphs.append(" ".join([render_bench(last[(t, default)]), *others]))
    rows = load()
    return "\n\n".join(p for p in [render(rows), render_epochs(rows), *paragraphs] if p)


def render_epochs(rows: list[dict]) -> str:
    """One sentence on RM017's epochs, per template set: how many detect its broad H-beta, the
    median FWHM and the range over the epochs, the median host fraction ("" without epochs)."""
    epochs = [r for r in rows if r["spectrum"] not in QUASARS and r["spectrum"] not in GALAXIES]
    parts = []
    for t in TEMPLATE_SETS:
        mine = [r for r in epochs if r.get("templates") == t]
        if not mine:
            continue
        fw = np.array([r["fwhm"] for r in mine if r["broad_detected"]])
        widths = f", FWHM median {np.median(fw):.0f} km/s, {fw.min():.0f}–{fw.max():.0f} km/s over the epochs" if fw.size else ""
        parts.append(f"with `{t}` the broad Hβ is detected in {fw.size} of {len(mine)} epochs{widths}, median f_host(5100) "
                     f"{np.median([r['frac_host_5100'] for r in mine]):.2f}")
    if not parts:
        return ""
    return (f"RM017's {len({r['spectrum'] for r in epochs})} SDSS epochs (SDSS J141324.27+530527.0, z = 0.456; one quasar, "
            "whose broad Hβ width is not expected to double from one epoch to another; Hβ with the [OIII] wing, same run): "
            + "; ".join(parts) + ".")


if __name__ == "__main__":
    raise SystemExit(main())
