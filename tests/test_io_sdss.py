"""Tests of sheap_dask.io.sdss: SDSS ingestion on real spectra, pixel masks, file errors."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import xarray as xr
from sdss_data import _coadd, _manifest, fits, ingested, sdss_files  # noqa: F401 (fixtures)

from sheap_dask import io as sio
from sheap_dask.errors import InputDataError, MissingDependencyError, OptionError, ResumeMismatchError
from sheap_dask.io import sdss_masks


def test_ingest_grid_is_exact(sdss_files, ingested):
    _, ds = ingested
    assert ds.sizes["spectrum"] == len(sdss_files)
    loglam = ds["loglam"].values
    np.testing.assert_allclose(np.diff(loglam), 1e-4, rtol=1e-9)
    np.testing.assert_allclose(ds["wavelength"].values, 10.0**loglam, rtol=1e-15)
    assert ds["wavelength"].attrs["units"] == "Angstrom"
    flux = ds.flux.values
    for s, path in enumerate(sdss_files):
        d, _ = _coadd(path)
        # every pixel of the file sits at the grid point of its own loglam, with its own flux
        j = np.searchsorted(loglam, d["loglam"].astype(np.float64) - 5e-6)
        np.testing.assert_allclose(loglam[j], d["loglam"], atol=2e-6)
        np.testing.assert_allclose(ds["wavelength"].values[j], 10.0 ** d["loglam"].astype(np.float64), rtol=5e-6)
        np.testing.assert_array_equal(flux[s, j], d["flux"].astype(np.float32))
        assert np.all(np.diff(j) == 1)


def test_ingest_metadata_matches_files_and_manifest(shared_spectra, sdss_files, ingested):
    _, ds = ingested
    manifest = {str(shared_spectra / r["file"]): r["redshift"] for r in _manifest(shared_spectra)}
    for s, path in enumerate(sdss_files):
        _, meta = _coadd(path)
        assert ds.redshift.values[s] == pytest.approx(float(meta["Z"]), abs=0)
        assert ds.plate.values[s] == meta["PLATE"]
        assert ds.mjd.values[s] == meta["MJD"]
        assert ds.fiberid.values[s] == meta["FIBERID"]
        assert ds.filename.values[s] == path.split("/")[-1]
        # the pipeline's classification, its own broad-line call included
        assert (ds.objclass.values[s], ds.subclass.values[s]) == (meta["CLASS"].strip(), meta["SUBCLASS"].strip())
        assert ds.specname.values[s] == f"spec-{meta['PLATE']:04d}-{meta['MJD']:05d}-{meta['FIBERID']:04d}"
        if manifest[path]:
            assert ds.redshift.values[s] == pytest.approx(float(manifest[path]), abs=1.5e-3)


def test_pipeline_subclass_is_read(shared_spectra):
    ds = sio.read_sdss_spectra([shared_spectra / "gelato_examples" / f for f in ("spec-0295-51585-0596.fits", "spec-0280-51612-0117.fits")])
    assert list(ds.objclass.values) == ["GALAXY", "QSO"]
    assert list(ds.subclass.values) == ["AGN", "AGN BROADLINE"]
    assert "SUBCLASS" in ds.subclass.attrs["long_name"]


def test_ingest_masks_outside_coverage_and_mask_bits(sdss_files, ingested):
    _, ds = ingested
    loglam = ds["loglam"].values
    ivar, flux = ds.ivar.values, ds.flux.values
    default = sio.mask_value("default")
    n_masked_by_bits = 0
    for s, path in enumerate(sdss_files):
        d, _ = _coadd(path)
        j = np.searchsorted(loglam, d["loglam"].astype(np.float64) - 5e-6)
        outside = np.ones(loglam.size, bool)
        outside[j] = False
        assert np.all(ivar[s, outside] == 0)
        assert np.all(np.isnan(flux[s, outside]))
        masked = (d["and_mask"].astype(np.int64) & default) != 0
        n_masked_by_bits += int(np.sum(masked & (d["ivar"] > 0)))
        assert np.all(ivar[s, j[masked]] == 0)
        np.testing.assert_array_equal(ivar[s, j[~masked]], d["ivar"][~masked].astype(np.float32))
        # bits outside the default (e.g. MANYBADCOLUMNS, BADFLAT) leave the pixel usable
        other = ((d["and_mask"].astype(np.int64) & ~default) != 0) & ~masked & (d["ivar"] > 0)
        assert np.all(ivar[s, j[other]] > 0)
    assert n_masked_by_bits > 1000  # BRIGHTSKY alone flags thousands of pixels here


def test_mask_bits_option_changes_masking(sdss_files):
    path = [f for f in sdss_files if "spec-1325" in f]
    d, _ = _coadd(path[0])
    bright = (d["and_mask"].astype(np.int64) >> 23 & 1).astype(bool) & (d["ivar"] > 0)
    assert bright.sum() > 100
    none = sio.read_sdss_spectra(path, mask_bits=None)
    only_sky = sio.read_sdss_spectra(path, mask_bits=["BRIGHTSKY"])
    k0 = int(round(float(none.loglam[0]) / 1e-4))
    j = np.rint(d["loglam"].astype(np.float64) / 1e-4).astype(int) - k0
    assert np.all(none.ivar.values[0, j[bright]] > 0)
    assert np.all(only_sky.ivar.values[0, j[bright]] == 0)
    assert only_sky.attrs["mask_bit_names"] == "BRIGHTSKY"


def test_process_pool_gives_the_same_result(sdss_files):
    few = sdss_files[:3]
    threads = sio.read_sdss_spectra(few, n_jobs=2)
    procs = sio.read_sdss_spectra(few, n_jobs=1, parallel="processes")  # one spawned worker
    xr.testing.assert_identical(threads, procs)
    with pytest.raises(OptionError, match="parallel"):
        sio.read_sdss_spectra(few, parallel="gpu")


def test_ingest_refuses_existing_store(sdss_files, ingested):
    store, _ = ingested
    with pytest.raises(OptionError, match="already exists"):
        sio.ingest_sdss(sdss_files[:2], store)
    with pytest.raises(OptionError, match="unknown option"):
        sio.ingest_sdss(sdss_files[:2], store, overwrite=True, mask=3)


def test_wavelength_range_crops_to_a_fixed_grid(sdss_files):
    ds = sio.read_sdss_spectra(sdss_files[:3], wavelength_range=(4000.0, 5000.0))
    assert ds.wavelength.values[0] >= 4000.0 and ds.wavelength.values[-1] <= 5000.0
    assert ds.wavelength.values[0] < 4000.0 * 10**1e-4
    full = sio.read_sdss_spectra(sdss_files[:3])
    sub = full.sel(wavelength=slice(4000.0, 5000.0))
    np.testing.assert_array_equal(ds.flux.values, sub.flux.values)


def test_sdss_dereddening_from_extinction_column(sdss_files):
    boss = [f for f in sdss_files if "_lite" in f and "spec-1325" not in f][:2]
    plain = sio.read_sdss_spectra(boss)
    red = sio.read_sdss_spectra(boss, ebv="sfd")
    with fits.open(boss[0]) as h:
        ext = h[2].data["EXTINCTION"][0]
    # the pipeline's EXTINCTION is E(B-V)_SFD times the Schlafly & Finkbeiner (2011) coefficients
    ebv = ext / np.array([4.239, 3.303, 2.285, 1.698, 1.263])
    np.testing.assert_allclose(ebv, ebv[2], rtol=1e-4)
    assert red.ebv.values[0] == pytest.approx(ebv[2], rel=1e-6)
    sf11 = sio.read_sdss_spectra(boss[:1], ebv="sf11")
    assert sf11.ebv.values[0] == pytest.approx(0.86 * ebv[2], rel=1e-6)
    a = red.ebv.values[:, None] * 3.1 * sio.extinction_curve(plain.wavelength.values)
    ok = np.isfinite(plain.flux.values)
    np.testing.assert_allclose(red.flux.values[ok], (plain.flux.values * 10 ** (0.4 * a))[ok], rtol=1e-5)
    np.testing.assert_allclose(red.ivar.values, plain.ivar.values * 10 ** (-0.8 * a), rtol=1e-5)
    assert red.attrs["dereddening"] == "ccm89"
    dr7 = [f for f in sdss_files if "spec-0332" in f]
    with pytest.raises(InputDataError, match="spec-0332-52367-0639.fits.*EXTINCTION"):
        sio.read_sdss_spectra(dr7, ebv="sfd")
    with pytest.raises(OptionError, match="one value per file"):
        sio.read_sdss_spectra(boss, ebv=[0.1, 0.2, 0.3])


def test_missing_file_error_names_the_file(tmp_path):
    missing = tmp_path / "spec-9999-99999-9999.fits"
    with pytest.raises(FileNotFoundError, match="spec-9999-99999-9999.fits"):
        sio.read_sdss_spectra([missing])
    with pytest.raises(FileNotFoundError, match="matches no file"):
        sio.ingest_sdss(str(tmp_path / "nothing-*.fits"), tmp_path / "x.zarr")


def test_non_sdss_files_are_rejected_with_the_fix(shared_spectra, tmp_path):
    op = shared_spectra / "dr16q_wushen2022" / "op-5808-56325-0560.fits"
    with pytest.raises(InputDataError, match="op-5808-56325-0560.fits.*read_rest_frame_fits"):
        sio.read_sdss_spectra([op])
    junk = tmp_path / "junk.fits"
    junk.write_text("not a fits file at all")
    with pytest.raises(InputDataError, match="junk.fits"):
        sio.read_sdss_spectra([junk])


def test_missing_astropy_raises_install_hint(monkeypatch, sdss_files):
    monkeypatch.setitem(sys.modules, "astropy.io.fits", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'sheap-dask\[sdss\]'"):
        sio.read_sdss_spectra(sdss_files[:1])
    with pytest.raises(ImportError):  # MissingDependencyError is an ImportError too
        sio.read_rest_frame_fits(sdss_files[0])


def test_mask_value_options():
    assert sio.mask_value(None) == 0 == sio.mask_value("none")
    assert sio.mask_value(["NOSKY", 23]) == (1 << 22) | (1 << 23)
    assert sio.mask_value("all") >> 30 & 1 == 0  # EMLINE is never masked by "all"
    assert set(sio.DEFAULT_MASK_BITS) == set(sdss_masks._mask_names(sio.mask_value("default")))
    with pytest.raises(OptionError, match="NOTABIT"):
        sio.mask_value(["NOTABIT"])
    with pytest.raises(OptionError, match="mask_bits"):
        sio.mask_value("sometimes")


def test_truncated_file_named_and_skip_bad(sdss_files, tmp_path):
    good = sdss_files[0]
    cut = tmp_path / "spec-truncated.fits"
    data = open(good, "rb").read()
    with fits.open(good) as h:  # cut inside the COADD table (HDU1); later HDUs are not read
        cut_at = h[1]._data_offset + 1000
    cut.write_bytes(data[:cut_at])
    with pytest.raises(InputDataError, match="spec-truncated.fits: the file is truncated"):
        sio.read_sdss_spectra([good, cut])
    junk = tmp_path / "junk.fits"
    junk.write_text("not a fits file at all")
    with pytest.warns(UserWarning, match="left out 2 of 3 files"):
        ds = sio.read_sdss_spectra([good, cut, junk], skip_bad=True)
    xr.testing.assert_identical(ds.drop_attrs(), sio.read_sdss_spectra([good]).drop_attrs())
    assert "spec-truncated.fits" in ds.attrs["skipped_files"] and "junk.fits" in ds.attrs["skipped_files"]


def test_ingest_resume_writes_only_missing_chunks(sdss_files, tmp_path):
    import zarr

    store = tmp_path / "resume.zarr"
    full = sio.ingest_sdss(sdss_files[:6], store, chunk=2).compute()
    group = zarr.open_group(str(store), mode="r+")
    group["sheap_ingest_progress/done"][:] = np.array([1, 1, 0], dtype="int8")
    group["flux"][4:, :] = 0.0
    resumed = sio.ingest_sdss(sdss_files[:6], store, chunk=2, resume=True)
    xr.testing.assert_identical(resumed.compute(), full)
    with pytest.raises(ResumeMismatchError, match="n_files: store has 6"):
        sio.ingest_sdss(sdss_files[:5], store, chunk=2, resume=True)
