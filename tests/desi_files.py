"""Real DESI-format files for the tests, written with DESI's own ``desispec`` (a test-only
dependency) from spectra the package synthesises: the truth is known pixel by pixel.

:func:`write_coadd` splits synthetic H-beta spectra at a redshift onto the three arms' grids
(B 3600-5800, R 5760-7620, Z 7520-9824 A, 0.8 A pixels as in the pipeline), adds independent
noise per arm (different S/N per arm, so the overlap weighting matters), masks a few pixels
with ``*_MASK != 0``, and stores Gaussian resolution kernels of a known width per arm.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

import sheap_dask as sd

pytest.importorskip("desispec")
from astropy.io import fits  # noqa: E402
from astropy.table import Table  # noqa: E402
from desispec.io import write_spectra  # noqa: E402
from desispec.spectra import Spectra  # noqa: E402

STEP = 0.8
ARM_RANGES = {"b": (3600.0, 5800.0), "r": (5760.0, 7620.0), "z": (7520.0, 9824.0)}
ARM_SNR = {"b": 25.0, "r": 12.0, "z": 8.0}  # per pixel, at the continuum
ARM_SIGMA_PIX = {"b": 1.1, "r": 0.95, "z": 0.85}  # resolution kernel sigma, pixels
GRID = 3600.0 + STEP * np.arange(7781)
N_DIAG = 11


def arm_wave(arm: str, offset: float = 0.0) -> np.ndarray:
    lo, hi = ARM_RANGES[arm]
    return lo + offset + STEP * np.arange(int(round((hi - lo) / STEP)) + 1)


def gaussian_resolution(n_spec: int, n_pix: int, sigma_pix: float) -> np.ndarray:
    """DESI's (n_spec, n_diag, n_pix) band storage of a Gaussian resolution matrix."""
    offsets = N_DIAG // 2 - np.arange(N_DIAG)
    kernel = np.exp(-0.5 * (offsets / sigma_pix) ** 2)
    kernel /= kernel.sum()
    return np.broadcast_to(kernel[None, :, None], (n_spec, N_DIAG, n_pix)).astype(np.float32).copy()


def kernel_sigma_pix(sigma_pix: float) -> float:
    """Second-moment sigma of the sampled, truncated Gaussian kernel (what the reader measures)."""
    offsets = N_DIAG // 2 - np.arange(N_DIAG)
    k = np.exp(-0.5 * (offsets / sigma_pix) ** 2)
    return float(np.sqrt(np.sum(k * offsets**2) / np.sum(k)))


@dataclass
class DesiTruth:
    path: str
    targetid: np.ndarray
    redshift: float
    clean: np.ndarray  # (n, GRID) noiseless flux on the common grid
    true_params: np.ndarray
    param_names: list
    arms: dict = field(default_factory=dict)  # arm -> dict(wave, flux, ivar, mask)


def write_coadd(path, n_spec: int, *, seed: int, redshift: float = 0.2, first_targetid: int = 39627000000000000,
                bands=("b", "r", "z"), offsets=None, hpx: int = 10032) -> DesiTruth:
    """A healpix coadd file of ``n_spec`` synthetic quasars; returns what was written."""
    truth = sd.io.synthetic_spectra(
        n_spec, seed=seed, redshift=redshift, wavelength=GRID, snr=1e8, masked_fraction=0.0, n_all_nan=0, dtype="float64"
    )
    clean = np.asarray(truth.flux.values, dtype=np.float64)
    rest = GRID / (1 + redshift)
    level = np.median(clean[:, (rest > 5050) & (rest < 5150)], axis=1)  # continuum near 5100 A
    rng = np.random.default_rng(seed + 1000)
    offsets = offsets or {}
    wave, flux, ivar, mask, res = {}, {}, {}, {}, {}
    out = DesiTruth(str(path), first_targetid + np.arange(n_spec), redshift, clean, truth.true_params.values, list(truth.param.values))
    for arm in bands:
        w = arm_wave(arm, offsets.get(arm, 0.0))
        sigma = level / ARM_SNR[arm]
        model = np.stack([np.interp(w, GRID, c) for c in clean])
        f = (model + rng.normal(size=model.shape) * sigma[:, None]).astype(np.float32)
        iv = np.broadcast_to((1.0 / sigma**2)[:, None], f.shape).astype(np.float32).copy()
        m = np.zeros(f.shape, dtype=np.int32)
        m[:, rng.choice(w.size, 12, replace=False)] = 1  # a few bad pixels per spectrum and arm
        if arm in ("b", "r"):  # and some in the B/R overlap, one arm at a time
            in_overlap = np.nonzero((w >= 5760) & (w <= 5800))[0]
            m[0, in_overlap[3 if arm == "b" else 7]] = 2
        wave[arm], flux[arm], ivar[arm], mask[arm] = w, f, iv, m
        res[arm] = gaussian_resolution(n_spec, w.size, ARM_SIGMA_PIX[arm])
        out.arms[arm] = {"wave": w, "flux": f, "ivar": iv, "mask": m}
    fibermap = Table(
        {
            "TARGETID": out.targetid,
            "COADD_FIBERSTATUS": np.zeros(n_spec, dtype=np.int32),
            "TARGET_RA": np.linspace(150.0, 151.0, n_spec),
            "TARGET_DEC": np.linspace(2.0, 2.5, n_spec),
            "OBJTYPE": np.array(["TGT"] * n_spec),
            "DESI_TARGET": np.full(n_spec, 4, dtype=np.int64),  # the QSO bit
            "EBV": np.full(n_spec, 0.02, dtype=np.float32),
        }
    )
    meta = {"SURVEY": "main", "PROGRAM": "dark", "SPGRP": "healpix", "SPGRPVAL": hpx, "HPXPIXEL": hpx, "HPXNSIDE": 64}
    spectra = Spectra(bands=list(bands), wave=wave, flux=flux, ivar=ivar, mask=mask, resolution_data=res, fibermap=fibermap, meta=meta)
    write_spectra(str(path), spectra)
    return out


def write_redrock(path, targetid, z, *, spectype=None, zwarn=None) -> str:
    """A redrock-format redshift file: an empty primary HDU and the REDSHIFTS table."""
    n = len(targetid)
    table = Table(
        {
            "TARGETID": np.asarray(targetid, dtype=np.int64),
            "Z": np.asarray(z, dtype=np.float64),
            "ZERR": np.full(n, 1e-4),
            "ZWARN": np.zeros(n, dtype=np.int64) if zwarn is None else np.asarray(zwarn, dtype=np.int64),
            "SPECTYPE": np.array(["QSO"] * n if spectype is None else spectype),
            "CHI2": np.ones(n),
        }
    )
    fits.HDUList([fits.PrimaryHDU(), fits.table_to_hdu(table)]).writeto(path, overwrite=True)
    with fits.open(path, mode="update") as h:
        h[1].name = "REDSHIFTS"
    return str(path)
