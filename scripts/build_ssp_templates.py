"""Build the stellar-population host templates shipped in ``sheap_dask/models/data/host_templates_mastar.csv``.

Run from the repository root::

    python scripts/build_ssp_templates.py [--wheel sdss_mangadap-4.5.0-py3-none-any.whl] [--out FILE]

Without ``--wheel`` it fetches the wheel with ``pip download --no-deps sdss-mangadap==4.5.0``
(121 MB, PyPI) into a temporary folder. Nothing is installed: the FITS files are read from
the wheel (a zip file) in place.

Source: the MaStar simple stellar populations (SSPs) of Maraston et al. 2020 (MNRAS 496,
2962), built from SDSS-IV MaStar stellar spectra, in the version whose input stars had the
Milky Way's interstellar Ca II and Na D absorption removed, as distributed with the SDSS
MaNGA Data Analysis Pipeline (Westfall et al. 2019, AJ 158, 231) in
``mangadap/data/spectral_templates/mastar_ssp_noism_v1.0/``: Salpeter IMF, vacuum
wavelengths, log10 step 1e-4 (the SDSS grid), 3627-10316 A, no emission lines, the
resolving power of each pixel in the ``SRES`` extension (R ~ 1100-1600 over 3700-6600 A).

Licence: the sdss-mangadap package is BSD-3-Clause ("Copyright (c) 2018, SDSS", its
``LICENSE.md``); the spectra are SDSS data, free to use with acknowledgement. No file of a
GPL/AGPL package and no MILES-based library (whose licence restricts redistribution) is used.

What it does:

1. picks :data:`SSPS` (solar metallicity, ages 0.1-14 Gyr, and an old metal-poor one): the
   younger SSPs (< 0.1 Gyr) are left out on purpose: their hot-star continua are nearly
   featureless and blue, degenerate with a quasar's power law, and would let the host take
   AGN continuum;
2. broadens each to one constant dispersion ``sigma_0`` (:data:`SIGMA_0`, just above the
   library's worst instrumental dispersion c / (2.355 R) over 3700-8050 A, 114 km/s) with a Gaussian of
   ``sqrt(sigma_0^2 - sigma_lib(lambda)^2)`` varying along the spectrum, so one fitted
   dispersion describes every template at every wavelength;
3. keeps 3700-8050 A on the native grid and normalises each to a mean flux density of 1 over
   5080-5120 A (a template weight is then its flux density at 5100 A);
4. writes a CSV (first column the rest-frame vacuum wavelength, one column per SSP) whose
   header records the source, the licence, ``sigma_0_kms`` and ``sigma_inst_kms`` (SDSS's
   instrumental dispersion, subtracted for the stellar dispersion of SDSS spectra).
"""

from __future__ import annotations

import argparse
import gzip
import io
import math
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "sheap_dask" / "models" / "data" / "host_templates_mastar.csv"
PACKAGE = "sdss-mangadap==4.5.0"
LIBRARY = "mangadap/data/spectral_templates/mastar_ssp_noism_v1.0/"
C_KMS = 299792.458

#: (age in Gyr, [Z/H]) of the SSPs kept.
SSPS = ((0.1, 0.0), (0.2, 0.0), (1.0, 0.0), (3.0, 0.0), (14.0, 0.0), (14.0, -1.35))
#: Constant dispersion (km/s) every template is broadened to (the library's worst over GRID: 114 km/s).
SIGMA_0 = 120.0
#: SDSS's mean instrumental dispersion (km/s), subtracted for the stellar dispersion.
SIGMA_INST_SDSS = 60.9
GRID = (3700.0, 8050.0)
NORM = (5080.0, 5120.0)


def fetch_wheel(folder: Path) -> Path:
    """``pip download`` the wheel into ``folder`` (a clear error when offline)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d", str(folder), PACKAGE]
    run = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(folder.glob("sdss_mangadap-*.whl"))
    if run.returncode or not wheels:
        raise SystemExit(f"could not download {PACKAGE} from PyPI ({run.stderr.strip()[-300:]}); pass --wheel PATH to a copy of the wheel.")
    return wheels[-1]


def read_ssps(wheel: Path, ssps=SSPS):
    """wavelength (n,), flux (K, n) and resolving power (n,) of ``ssps`` from the wheel."""
    from astropy.io import fits

    wanted = {f"A{age:06.3f}-Z{z:+.2f}": (age, z) for age, z in ssps}
    found = {}
    wave = sres = None
    with zipfile.ZipFile(wheel) as zf:
        for member in sorted(m for m in zf.namelist() if m.startswith(LIBRARY) and ".fits" in m):
            key = re.search(r"A\d+\.\d+-Z[+-]\d+\.\d+", member).group(0)
            if key not in wanted:
                continue
            raw = zf.read(member)
            with fits.open(io.BytesIO(gzip.decompress(raw) if member.endswith(".gz") else raw)) as hdul:
                flux = np.asarray(hdul[0].data, dtype=np.float64)
                h = hdul[0].header
                loglam = h["CRVAL1"] + h["CDELT1"] * (np.arange(flux.size) + 1.0 - h.get("CRPIX1", 1.0))
                w = 10.0**loglam if "LOG" in str(h.get("CTYPE1", "")).upper() else loglam
                r = np.asarray(hdul["SRES"].data, dtype=np.float64)
            if wave is None:
                wave, sres = w, r
            elif w.shape != wave.shape or not np.allclose(w, wave, rtol=1e-9):
                raise SystemExit(f"{member}: its wavelength grid differs from the others")
            found[key] = (member.rsplit("/", 1)[1], flux)
    missing = sorted(set(wanted) - set(found))
    if missing:
        raise SystemExit(f"{wheel.name} has no SSP {missing} under {LIBRARY}")
    keys = list(wanted)
    return wave, np.stack([found[k][1] for k in keys]), sres, [found[k][0] for k in keys]


def broaden_to(wave, flux, sres, sigma0: float) -> np.ndarray:
    """Each row broadened from its dispersion c / (2.355 R) to ``sigma0`` (km/s), pixel by pixel."""
    step_kms = C_KMS * math.log(10.0) * float(np.median(np.diff(np.log10(wave))))
    sigma_lib = C_KMS / (2.0 * math.sqrt(2.0 * math.log(2.0)) * sres)
    if np.nanmax(sigma_lib[(wave >= GRID[0]) & (wave <= GRID[1])]) > sigma0:
        raise SystemExit(f"sigma_0 = {sigma0} km/s is below the library's own dispersion ({np.nanmax(sigma_lib):.0f} km/s)")
    extra = np.sqrt(np.clip(sigma0**2 - sigma_lib**2, 1e-6, None)) / step_kms  # in pixels, per output pixel
    half = int(math.ceil(5 * extra.max()))
    offsets = np.arange(-half, half + 1)
    kernel = np.exp(-0.5 * (offsets[None, :] / extra[:, None]) ** 2)
    kernel /= kernel.sum(axis=1, keepdims=True)
    idx = np.clip(np.arange(wave.size)[:, None] + offsets[None, :], 0, wave.size - 1)
    return np.einsum("pk,npk->np", kernel, flux[:, idx])


def build(wheel: Path, ssps=SSPS):
    wave, flux, sres, names = read_ssps(wheel, ssps)
    flux = broaden_to(wave, flux, sres, SIGMA_0)
    keep = (wave >= GRID[0]) & (wave <= GRID[1])
    wave, flux = wave[keep], flux[:, keep]
    norm = (wave > NORM[0]) & (wave < NORM[1])
    return wave, flux / flux[:, norm].mean(axis=1, keepdims=True), names


def write(path: Path, wave, flux, names, wheel_name: str) -> None:
    header = [
        "sheap_dask stellar-population host templates (built by scripts/build_ssp_templates.py)",
        "columns: rest-frame vacuum wavelength (Angstrom), then one simple stellar population (SSP) per column:",
        "  flux density (per Angstrom) normalised to a mean of 1 over 5080-5120 A",
        "source: MaStar SSPs of Maraston et al. 2020 (MNRAS 496, 2962), Milky-Way ISM absorption removed from the",
        f"  input stars (mastar_ssp_noism_v1.0), Salpeter IMF, as distributed in {wheel_name} ({PACKAGE}, BSD-3-Clause,",
        "  Copyright (c) 2018, SDSS; Westfall et al. 2019, AJ 158, 231); built from SDSS-IV MaStar stellar spectra",
        "licence: SDSS data are free to use with acknowledgement (https://www.sdss.org/collaboration/citing-sdss/);",
        "  this derived table is distributed under sheap_dask's BSD-3-Clause licence with that acknowledgement",
        "all broadened from the library's resolution (c / 2.355 R) to one constant dispersion:",
        f"sigma_0_kms = {SIGMA_0:.1f}",
        "SDSS instrumental dispersion (km/s), subtracted for the stellar dispersion of SDSS spectra:",
        f"sigma_inst_kms = {SIGMA_INST_SDSS:.1f}",
        "templates: " + ", ".join(names),
    ]
    labels = ["wavelength"] + [re.search(r"A\d+\.\d+-Z[+-]\d+\.\d+", n).group(0) for n in names]
    with open(path, "w") as out:
        out.write("".join(f"# {line}\n" for line in header))
        out.write(",".join(labels) + "\n")
        for i in range(wave.size):
            out.write(f"{wave[i]:.4f}," + ",".join(f"{v:.5g}" for v in flux[:, i]) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--wheel", type=Path, default=None, help="a local copy of sdss_mangadap-4.5.0-py3-none-any.whl")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--ssps", default=None, help="other SSPs than the shipped set: 'age:[Z/H],...' (Gyr), e.g. '1:0,14:0'")
    args = ap.parse_args(argv)
    ssps = SSPS if args.ssps is None else tuple(tuple(float(v) for v in item.split(":")) for item in args.ssps.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel or fetch_wheel(Path(tmp))
        wave, flux, names = build(wheel, ssps)
        write(args.out, wave, flux, names, wheel.name)
    print(f"{len(names)} SSPs, {wave.size} pixels {wave[0]:.1f}-{wave[-1]:.1f} A, sigma_0 {SIGMA_0} km/s -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
