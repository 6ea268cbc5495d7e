"""Spectra in a zarr store -> fits streamed into another store (resumable) -> read back.

Run:  python examples/zarr_round_trip.py OUTDIR
Re-running resumes: only chunks not yet recorded as done are fitted.
"""

import sys
from pathlib import Path

import xarray as xr

import sheap_dask as sd


def main(outdir: str = "sheap_example") -> None:
    out = Path(outdir)
    out.mkdir(exist_ok=True)
    spectra = out / "spectra.zarr"
    if not spectra.exists():
        sd.io.synthetic_spectra(300, seed=2).chunk({"spectrum": 100}).to_zarr(spectra)

    # A path works as input; results are written chunk by chunk as they finish.
    fits = sd.fit_dataset(str(spectra), sd.models.region("hbeta"), store=str(out / "fits.zarr"))
    print("chunks fitted in this run:", fits.attrs["sheap_chunks_fitted"])

    again = xr.open_zarr(out / "fits.zarr")
    print(again)
    print(again.status.to_series().value_counts())


if __name__ == "__main__":
    main(*sys.argv[1:2])
