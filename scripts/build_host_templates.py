"""Build the empirical host-galaxy templates shipped in ``sheap_dask/models/data/host_templates.csv``.

Run from the repository root (SDSS spec files of the three GALAXY spectra needed)::

    python scripts/build_host_templates.py [--spectra DIR] [--out FILE] [--leave-out NAME ...]

What it does, per galaxy (SDSS DR7-era spec files, run2d 26, public SDSS data):

1. reads ``COADD`` (``loglam``, ``flux``, ``ivar``, ``and_mask``, ``wdisp``) and ``SPECOBJ``
   (``Z``, ``VDISP``: the pipeline's stellar velocity dispersion); masks the pixels with the
   package's default ``and_mask`` bits or ``ivar = 0``;
   also the sky-line residuals of :data:`SKY_LINES`;
2. moves it to the rest frame (``lambda / (1 + z)``);
3. removes the emission lines: each group of nearby lines of :data:`EMISSION_LINES` is fitted
   in a +-2500 km/s window with a quadratic baseline, Gaussian emission lines (one shift and
   one width per group) and, for the Balmer lines and Na D, a broader Gaussian *absorption*
   trough; only the emission Gaussians are subtracted, so the stellar absorption under the
   lines (H-beta, H-alpha, Na D) stays in the template;
4. broadens it to a common stellar dispersion ``sigma_0`` (the largest ``sqrt(VDISP^2 +
   sigma_inst^2)`` of the galaxies used, ``sigma_inst = wdisp x 69 km/s``), so one fitted
   dispersion describes every template;
5. resamples it onto the common rest-frame grid (log10 step 1e-4, 3400-8050 A, the range all
   three cover) and normalises it to unit mean flux density over 5080-5120 A (so a template
   weight is that template's flux density at 5100 A); masked pixels are interpolated.

``--leave-out NAME`` (a substring of the file name, e.g. ``0266-51602-0013``) builds the set
without that galaxy: the validation fits a galaxy only with templates it did not contribute
to (``tests/test_host.py``).

Licence and provenance: SDSS data are free to use with acknowledgement ("Funding for the SDSS
and SDSS-II has been provided by the Alfred P. Sloan Foundation, ..."; see
https://www.sdss.org/collaboration/citing-sdss/). The spectra were taken from the public SDSS
archive; the copies used here came with the example folders of PyQSOFit (GPL-3.0, code only)
and GELATO (GPL-3.0, code only), whose code is not used. The derived file is distributed
under the package's BSD-3-Clause licence with that acknowledgement.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SPECTRA = REPO.parent / "shared" / "data" / "spectra"
DEFAULT_OUT = REPO / "sheap_dask" / "models" / "data" / "host_templates.csv"
C_KMS = 299792.458

#: The SDSS GALAXY spectra the templates are built from (path under the spectra folder).
GALAXIES = (
    "pyqsofit_examples/spec-0266-51602-0013.fits",  # early-type (absorption only)
    "pyqsofit_examples/spec-0266-51602-0107.fits",  # star-forming
    "gelato_examples/spec-0295-51585-0596.fits",  # narrow-line (type-2) AGN host
)

#: Rest-frame grid and normalisation band of the templates.
GRID = (3400.0, 8050.0)
LOG10_STEP = 1e-4
NORM_BAND = (5080.0, 5120.0)

#: Observed-frame (vacuum) sky-line residuals masked: [OI] 5577, Na D 5890/5896, [OI] 6300/6364.
SKY_LINES = ((5574.0, 5584.0), (5889.0, 5900.0), (6298.0, 6308.0), (6362.0, 6370.0))

#: Groups of emission lines (vacuum Angstrom) fitted together; ``absorb`` adds a stellar
#: absorption trough at the first wavelength (Balmer lines, Na D under HeI 5876).
EMISSION_LINES = [
    ({"neV3426": 3426.85}, None),
    ({"oii3726": 3727.09, "oii3729": 3729.88}, None),
    ({"neiii3869": 3869.86}, None),
    ({"h8": 3890.17, "hei3889": 3889.75}, 3890.17),
    ({"neiii3968": 3968.59, "heps": 3971.20}, 3971.20),
    ({"sii4069": 4069.75, "sii4077": 4077.50}, None),
    ({"hdelta": 4102.89}, 4102.89),
    ({"hgamma": 4341.68, "oiii4363": 4364.44}, 4341.68),
    ({"heii4686": 4687.02}, None),
    ({"hbeta": 4862.68}, 4862.68),
    ({"oiii4959": 4960.30, "oiii5007": 5008.24}, None),
    ({"ni5198": 5199.35, "ni5200": 5201.71}, None),
    ({"fevii5721": 5722.30}, None),
    ({"nii5755": 5756.19}, None),
    ({"hei5876": 5877.25}, 5891.58),  # Na D (5891.58, 5897.56) absorption
    ({"fevii6087": 6087.98}, None),
    ({"oi6300": 6302.05, "siii6312": 6313.80, "oi6364": 6365.54}, None),
    ({"nii6548": 6549.86, "halpha": 6564.61, "nii6584": 6585.27}, 6564.61),
    ({"hei6678": 6680.00}, None),
    ({"sii6717": 6718.29, "sii6731": 6732.67}, None),
    ({"hei7065": 7067.14}, None),
    ({"ariii7135": 7137.77}, None),
    ({"oii7320": 7321.94, "oii7330": 7332.21}, None),
]


def read_galaxy(path: Path) -> dict:
    """Rest-frame arrays and metadata of one SDSS spec file."""
    from astropy.io import fits

    sys.path.insert(0, str(REPO))
    from sheap_dask.io.sdss_masks import mask_value

    with fits.open(path) as h:
        d, t = h[1].data, h[2].data
        loglam = np.asarray(d["loglam"], dtype=np.float64)
        flux = np.asarray(d["flux"], dtype=np.float64)
        ivar = np.asarray(d["ivar"], dtype=np.float64)
        bad = (np.asarray(d["and_mask"]).astype(np.int64) & mask_value("default")) != 0
        wdisp = np.asarray(d["wdisp"], dtype=np.float64)
        meta = {k: t[k][0] for k in ("Z", "VDISP", "PLATE", "MJD", "FIBERID", "CLASS")}
    z = float(meta["Z"])
    obs = 10.0**loglam
    sky = np.zeros(obs.shape, dtype=bool)
    for lo, hi in SKY_LINES:
        sky |= (obs >= lo) & (obs <= hi)
    good = (ivar > 0) & ~bad & ~sky & np.isfinite(flux)
    sigma_inst = float(np.median(wdisp[good])) * LOG10_STEP * math.log(10) * C_KMS
    return {
        "name": f"spec-{int(meta['PLATE']):04d}-{int(meta['MJD']):05d}-{int(meta['FIBERID']):04d}",
        "z": z,
        "vdisp": float(meta["VDISP"]),
        "sigma_inst": sigma_inst,
        "class": str(meta["CLASS"]).strip(),
        "wave": 10.0**loglam / (1.0 + z),
        "flux": flux * (1.0 + z),
        "ivar": np.where(good, ivar / (1.0 + z) ** 2, 0.0),
    }


def _gauss(x, centre, sigma):
    return np.exp(-0.5 * ((x - centre) / sigma) ** 2)


def remove_emission(wave, flux, ivar) -> tuple[np.ndarray, list[dict]]:
    """Flux with the emission lines of :data:`EMISSION_LINES` removed (absorption kept).

    Each line is a narrow core plus a broader wing Gaussian (one shift and width per group
    for each); a stellar absorption trough (sigma >= 400 km/s) sits under the Balmer lines and
    Na D (equivalent width <= 6 A). Outside the line cores the emission Gaussians are subtracted; inside +-(3 sigma_core
    + 50 km/s), where an emission profile that is not quite Gaussian would leave spikes, the
    flux is replaced by the fitted baseline and absorption.
    """
    from scipy.optimize import least_squares

    out = flux.copy()
    report = []
    for lines, absorb in EMISSION_LINES:
        centres = np.array(list(lines.values()))
        lo, hi = centres.min() * (1 - 2500 / C_KMS), centres.max() * (1 + 2500 / C_KMS)
        sel = (wave >= lo) & (wave <= hi) & (ivar > 0)
        if sel.sum() < 20:
            continue
        x, y, w = wave[sel], flux[sel], np.sqrt(ivar[sel])
        mid = 0.5 * (lo + hi)
        n_l = len(centres)
        na_d = absorb is not None and 5880 < absorb < 5900

        def parts(p, x, centres=centres, mid=mid, n_l=n_l, absorb=absorb, na_d=na_d):
            base = p[4] + p[5] * (x / mid - 1) + p[6] * (x / mid - 1) ** 2
            core = sum(p[7 + k] * _gauss(x, c * (1 + p[0] / C_KMS), c * p[1] / C_KMS) for k, c in enumerate(centres))
            wing = sum(p[7 + n_l + k] * _gauss(x, c * (1 + p[2] / C_KMS), c * p[3] / C_KMS) for k, c in enumerate(centres))
            ab = 0.0
            if absorb is not None:  # equivalent width (A, positive), sigma (km/s), shift
                ew, sig, sh = p[7 + 2 * n_l : 10 + 2 * n_l]
                for c in (absorb, 5897.56) if na_d else (absorb,):
                    s_l = c * sig / C_KMS
                    ab = ab - p[4] * ew / (math.sqrt(2 * math.pi) * s_l) * _gauss(x, c * (1 + sh / C_KMS), s_l)
            return base + ab, core, wing

        level = float(np.median(y))
        p0 = [0.0, 100.0, 0.0, 400.0, level, 0.0, 0.0] + [0.1 * abs(level)] * n_l + [0.01 * abs(level)] * n_l
        lb = [-400.0, 30.0, -800.0, 250.0, -np.inf, -np.inf, -np.inf] + [0.0] * (2 * n_l)
        ub = [400.0, 250.0, 400.0, 600.0, np.inf, np.inf, np.inf] + [np.inf] * (2 * n_l)
        if absorb is not None:
            # stellar troughs: equivalent width at most 6 A (Balmer lines of old and
            # intermediate populations; 4 A per Na D line, 20 A for Ca II H + H-epsilon), broader
            # than any emission wing, so emission and absorption cannot cancel each other
            ew_max = 20.0 if absorb < 4000 else (4.0 if na_d else 6.0)
            p0 += [1.0, 200.0 if na_d else 900.0, 0.0]
            lb += [0.0, 100.0 if na_d else 600.0, -300.0]
            ub += [ew_max, 600.0 if na_d else 2500.0, 300.0]
        fit = least_squares(lambda p: (sum(parts(p, x)) - y) * w, p0, bounds=(lb, ub), x_scale="jac")
        near = (wave >= lo) & (wave <= hi)
        stellar, core, wing = parts(fit.x, wave[near])
        cleaned = out[near] - core - wing
        v = np.min(np.abs(wave[near][:, None] / (centres[None, :] * (1 + fit.x[0] / C_KMS)) - 1), axis=1) * C_KMS
        in_core = (v < 3 * fit.x[1] + 50.0) & (np.max(fit.x[7 : 7 + n_l]) > 0)
        cleaned[in_core] = stellar[in_core]
        out[near] = cleaned
        report.append({"lines": list(lines), "shift": round(float(fit.x[0]), 1), "sigma": round(float(fit.x[1]), 1)})
    return out, report


def broaden(wave, flux, sigma_kms: float) -> np.ndarray:
    """Gaussian broadening in velocity on a log-uniform grid (SDSS pixels)."""
    if sigma_kms <= 0:
        return flux
    dv = np.median(np.diff(np.log(wave))) * C_KMS
    s = sigma_kms / dv
    half = int(math.ceil(5 * s))
    k = np.exp(-0.5 * (np.arange(-half, half + 1) / s) ** 2)
    k /= k.sum()
    padded = np.concatenate([np.full(half, flux[0]), flux, np.full(half, flux[-1])])
    return np.convolve(padded, k, mode="valid")


def build(spectra: Path, leave_out: list[str] = ()) -> tuple[np.ndarray, list[np.ndarray], list[dict], float]:
    """(wavelength, [template flux], [per-galaxy provenance], sigma_0)."""
    files = [spectra / g for g in GALAXIES if not any(s in g for s in leave_out)]
    if not files:
        raise SystemExit("--leave-out removed every galaxy; keep at least one.")
    gals = [read_galaxy(f) for f in files]
    sigma0 = max(math.hypot(g["vdisp"], g["sigma_inst"]) for g in gals)
    grid = 10.0 ** (np.arange(math.ceil(math.log10(GRID[0]) / LOG10_STEP), math.floor(math.log10(GRID[1]) / LOG10_STEP) + 1) * LOG10_STEP)
    templates, info = [], []
    for g, f in zip(gals, files):
        clean, report = remove_emission(g["wave"], g["flux"], g["ivar"])
        good = g["ivar"] > 0
        # masked pixels: linear interpolation over the good ones, on the native grid
        filled = np.interp(g["wave"], g["wave"][good], clean[good])
        extra = math.sqrt(max(sigma0**2 - g["vdisp"] ** 2 - g["sigma_inst"] ** 2, 0.0))
        smooth = broaden(g["wave"], filled, extra)
        t = np.interp(grid, g["wave"], smooth)
        band = (grid >= NORM_BAND[0]) & (grid <= NORM_BAND[1])
        t = t / np.mean(t[band])
        templates.append(t)
        info.append({"name": g["name"], "file": str(f.relative_to(spectra)), "class": g["class"], "z": g["z"], "vdisp": g["vdisp"],
                     "sigma_inst": g["sigma_inst"], "extra_broadening": extra, "lines_removed": report})
    return grid, templates, info, sigma0


def write(path: Path, grid, templates, info, sigma0: float) -> None:
    header = [
        "sheap_dask empirical host-galaxy templates (built by scripts/build_host_templates.py)",
        "columns: rest-frame vacuum wavelength (Angstrom), then one template per galaxy: flux density",
        f"  (per Angstrom) normalised to a mean of 1 over {NORM_BAND[0]:g}-{NORM_BAND[1]:g} A",
        "emission lines removed (stellar absorption kept); all broadened to one stellar dispersion:",
        f"sigma_0_kms = {sigma0:.1f}",
        "mean SDSS instrumental dispersion included in sigma_0 (km/s):",
        f"sigma_inst_kms = {np.mean([g['sigma_inst'] for g in info]):.1f}",
        "sources: public SDSS spectra (SPECOBJ Z, VDISP; COADD flux, ivar, and_mask, wdisp):",
    ]
    for g in info:
        header.append(f"  {g['name']} class={g['class']} z={g['z']:.5f} vdisp={g['vdisp']:.1f} km/s "
                      f"sigma_inst={g['sigma_inst']:.1f} km/s broadened_by={g['extra_broadening']:.1f} km/s")
    header += [
        "licence: SDSS data are free to use with acknowledgement (https://www.sdss.org/collaboration/citing-sdss/);",
        "  this derived table is distributed under sheap_dask's BSD-3-Clause licence with that acknowledgement.",
        "Funding for the Sloan Digital Sky Survey (SDSS) has been provided by the Alfred P. Sloan Foundation,",
        "  the Participating Institutions, NASA, NSF, the U.S. Department of Energy, the Japanese Monbukagakusho,",
        "  and the Max Planck Society.",
    ]
    cols = ["wavelength"] + [g["name"].replace("-", "_") for g in info]
    data = np.column_stack([grid] + templates)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for line in header:
            fh.write(f"# {line}\n")
        fh.write(",".join(cols) + "\n")
        for row in data:
            fh.write(f"{row[0]:.3f}," + ",".join(f"{v:.5g}" for v in row[1:]) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spectra", type=Path, default=DEFAULT_SPECTRA, help="folder of the SDSS spectra (MANIFEST.csv)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output CSV")
    ap.add_argument("--leave-out", nargs="*", default=[], help="galaxies (file-name substrings) to leave out")
    args = ap.parse_args(argv)
    grid, templates, info, sigma0 = build(args.spectra, args.leave_out)
    write(args.out, grid, templates, info, sigma0)
    print(f"wrote {args.out}: {len(templates)} templates, {grid.size} pixels, sigma_0 = {sigma0:.1f} km/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
