"""Before/after of the host-galaxy component on the real SDSS spectra of issue 14.

Run from the repository root::

    python scripts/validate_host.py [--spectra DIR] [--json OUT.jsonl]

Fits, in one run with the same code, H-beta (with the [OIII] wing, as ``examples/real_sdss.py``)
and H-alpha of

* the three low-luminosity quasars under strong starlight (spec-0280-51612-0117,
  spec-1599-53089-0469, spec-0332-52367-0639) with ``host=False`` (before) and ``host=True``
  (after, the built-in templates, which none of them contributed to);
* the three SDSS GALAXY spectra with ``host=False`` and with ``host=True`` using templates
  built *without* that galaxy (``scripts/build_host_templates.py --leave-out``): never on
  the spectrum a template came from.

Prints one JSON line per (spectrum, region, host) with the broad line's FWHM and its error
(``fits.sheap.fwhm(..., errors=True)``), whether it is detected, the reduced chi-square, and
with the host the host fraction at 4200/5100 A, the stellar dispersion and log lambda L5100
of the AGN alone; then a Markdown summary.
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


def fit(ds, region: str, **kwargs) -> dict:
    """Fit ``ds`` (synchronous dask scheduler) and measure the broad line; one dict per spectrum."""
    import sheap_dask as sd

    opts, line = REGIONS[region]
    model = sd.models.region(region, **opts, **kwargs)
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
    args = ap.parse_args(argv)
    dask.config.set(scheduler="synchronous")
    rows = []
    qso = sd.io.read_sdss_spectra([str(args.spectra / f) for f in QUASARS.values()])
    for region in REGIONS:
        for host in (False, True):
            rows += fit(qso, region, host=host)
    gal = sd.io.read_sdss_spectra([str(args.spectra / f) for f in GALAXIES.values()])
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(GALAXIES):
            path = Path(tmp) / f"without_{name}.csv"
            bht.write(path, *bht.build(args.spectra, [name[5:]]))
            one = gal.isel(spectrum=[i])
            for region in REGIONS:
                rows += fit(one, region, host=False)
                rows += [dict(r, templates=f"leave-one-out (without {name})") for r in fit(one, region, host=True, host_template=str(path))]
    out = [json.dumps(r) for r in rows]
    print("\n".join(out))
    if args.json:
        args.json.write_text("\n".join(out) + "\n")
    print("\n| spectrum | region | FWHM before | FWHM after (host) | broad detected before/after | redchi2 before/after | f_host 5100 | f_host 4200 | sigma_* |")
    print("|---|---|---|---|---|---|---|---|---|")
    by = {(r["spectrum"], r["region"], r["host"]): r for r in rows}
    for (spec, region, host), r in by.items():
        if host:
            continue
        a = by[(spec, region, True)]
        print(f"| {spec} | {region} | {r['fwhm']:.0f} +- {r['fwhm_err']:.0f} | {a['fwhm']:.0f} +- {a['fwhm_err']:.0f} | "
              f"{r['broad_detected']}/{a['broad_detected']} | {r['redchi2']:.3f}/{a['redchi2']:.3f} | "
              f"{a['frac_host_5100']:.2f} +- {a['frac_host_5100_err']:.2f} | {a['frac_host_4200']:.2f} | {a['sigma_star']:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
