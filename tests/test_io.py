"""Tests of sheap_dask.io: SDSS ingestion on real spectra, table/op readers, dereddening."""

from __future__ import annotations

import csv
import functools
import sys
import types

import numpy as np
import pytest
import xarray as xr

from sheap_dask import io as sio
from sheap_dask.errors import InputDataError, MissingDependencyError, OptionError

fits = pytest.importorskip("astropy.io.fits")

SDSS_FOLDERS = ("sdss_sheap", "pyqsofit_examples", "pyqsofit_rm017", "gelato_examples", "qsfit_example")
CHUNK = 8


def _manifest(shared):
    with open(shared / "MANIFEST.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def sdss_files(shared_spectra):
    rows = _manifest(shared_spectra)
    files = [
        shared_spectra / r["file"]
        for r in rows
        if r["file"].split("/")[0] in SDSS_FOLDERS and r["file"].endswith(".fits")
    ]
    assert len(files) == 19, files
    return [str(f) for f in files]


@pytest.fixture(scope="module")
def ingested(sdss_files, tmp_path_factory):
    store = tmp_path_factory.mktemp("io") / "sdss.zarr"
    ds = sio.ingest_sdss(sdss_files, store, chunk=CHUNK, n_jobs=4)
    return store, ds


@functools.lru_cache(maxsize=None)
def _coadd(path):
    # astropy's full parse of HDU2 (~240 columns) is the slow part: read each file once
    with fits.open(path) as h:
        d = h[1].data
        t = h[2].data
        return (
            {k: np.asarray(d[k]) for k in ("flux", "loglam", "ivar", "and_mask")},
            {k: t[k][0] for k in ("Z", "PLATE", "MJD", "FIBERID")},
        )


# ----------------------------------------------------------------------------- SDSS ingestion


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
        assert ds.specname.values[s] == f"spec-{meta['PLATE']:04d}-{meta['MJD']:05d}-{meta['FIBERID']:04d}"
        if manifest[path]:
            assert ds.redshift.values[s] == pytest.approx(float(manifest[path]), abs=1.5e-3)


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


def test_ingest_chunks_along_spectrum_only(sdss_files, ingested):
    _, ds = ingested
    n, nw = ds.sizes["spectrum"], ds.sizes["wavelength"]
    assert ds.flux.chunks == ((CHUNK, CHUNK, n - 2 * CHUNK), (nw,))
    assert ds.ivar.chunks == ds.flux.chunks
    # coordinates are chunked like the data, so the Dataset has one set of chunks
    assert ds.chunks["spectrum"] == ds.flux.chunks[0]
    assert ds.flux.dtype == np.float32 and ds.ivar.dtype == np.float32
    assert ds.flux.dims == ("spectrum", "wavelength")


def test_zarr_round_trip_identical(sdss_files, ingested, tmp_path):
    store, ds = ingested
    eager = sio.read_sdss_spectra(sdss_files)
    xr.testing.assert_identical(ds.compute(), eager)
    lazy = sio.read_sdss_spectra(sdss_files, chunk=5)
    assert lazy.flux.chunks[0] == (5, 5, 5, 4)
    xr.testing.assert_identical(lazy.compute(), eager)
    again = sio.write_zarr(ds, tmp_path / "copy.zarr")
    xr.testing.assert_identical(again.compute(), eager)
    assert again.flux.chunks == ds.flux.chunks


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


# ----------------------------------------------------------------------------- errors


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
    assert set(sio.DEFAULT_MASK_BITS) == set(sio._mask_names(sio.mask_value("default")))
    with pytest.raises(OptionError, match="NOTABIT"):
        sio.mask_value(["NOTABIT"])
    with pytest.raises(OptionError, match="mask_bits"):
        sio.mask_value("sometimes")


# ----------------------------------------------------------------------------- tables, op files


def test_table_reader_on_csv(shared_spectra):
    path = next((shared_spectra / "qsofitmore_example").glob("*.csv"))
    raw = np.loadtxt(path, delimiter=",", skiprows=1)
    ds = sio.read_table_spectrum(path, redshift=0.1684)
    assert ds.flux.dims == ("spectrum", "wavelength") and ds.sizes["spectrum"] == 1
    assert ds.sizes["wavelength"] == raw.shape[0]
    np.testing.assert_allclose(ds.wavelength.values, raw[:, 0])
    np.testing.assert_allclose(ds.flux.values[0], raw[:, 1].astype(np.float32))
    np.testing.assert_allclose(ds.ivar.values[0], (1.0 / raw[:, 2] ** 2).astype(np.float32), rtol=1e-6)
    assert float(ds.redshift[0]) == 0.1684
    scaled = sio.read_table_spectrum(path, flux_scale=1e-17, flux_units="1e-17 erg/s/cm2/A")
    assert "redshift" not in scaled.coords
    np.testing.assert_allclose(scaled.flux.values[0], raw[:, 1] / 1e-17, rtol=1e-6)
    np.testing.assert_allclose(scaled.ivar.values[0], 1e-34 / raw[:, 2] ** 2, rtol=1e-5)
    explicit = sio.read_table_spectrum(path, columns=["lam", "flux", "err"])
    np.testing.assert_array_equal(explicit.flux.values, ds.flux.values)


def test_table_reader_whitespace_and_bad_errors(tmp_path):
    p = tmp_path / "spec.txt"
    p.write_text("# a comment\n5002.0 1.0 0.5\n5000.0 2.0 0.1\n5004.0 3.0 -1\n5006.0 nan 0.2\n5008.0 1.0 inf\n")
    ds = sio.read_table_spectrum(p)
    np.testing.assert_array_equal(ds.wavelength.values, [5000.0, 5002.0, 5004.0, 5006.0, 5008.0])
    np.testing.assert_allclose(ds.ivar.values[0], [100.0, 4.0, 0.0, 0.0, 0.0], rtol=1e-6)
    vac = sio.read_table_spectrum(p, air=True)
    assert np.all(vac.wavelength.values - ds.wavelength.values > 1.3)
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        sio.read_table_spectrum(tmp_path / "nope.csv")
    with pytest.raises(OptionError, match="columns"):
        sio.read_table_spectrum(p, columns=[0, 1])


def test_rest_frame_reader(shared_spectra):
    path = shared_spectra / "dr16q_wushen2022" / "op-5808-56325-0560.fits"
    ds = sio.read_rest_frame_fits(path)
    assert "redshift" not in ds.coords
    assert ds.attrs["frame"] == "rest"
    assert float(ds.catalog_redshift[0]) == pytest.approx(2.119)
    assert int(ds.plate[0]) == 5808 and int(ds.mjd[0]) == 56325 and int(ds.fiberid[0]) == 560
    with fits.open(path) as h:
        t = h[3].data
        np.testing.assert_allclose(ds.wavelength.values, t["wave_prereduced"])
        np.testing.assert_allclose(ds.flux.values[0], t["flux_prereduced"].astype(np.float32))
        np.testing.assert_allclose(ds.ivar.values[0], (1 / t["err_prereduced"] ** 2).astype(np.float32), rtol=1e-6)
    assert 1150 < ds.wavelength.values[0] < ds.wavelength.values[-1] < 3400
    dr19 = sio.read_rest_frame_fits(shared_spectra / "dr19q_vac" / "op_102359-60089-27021598149616104.fits")
    assert float(dr19.catalog_redshift[0]) == pytest.approx(0.2584, abs=1e-4)
    assert "redshift" not in dr19.coords


# ----------------------------------------------------------------------------- extinction


def test_ccm89_published_values():
    # A(V)/A(V) = 1 at y = x - 1.82 = 0 by construction; A(B)/A(V) = 1 + 1/R_V for the
    # B - V colour excess the law is normalised to (CCM89 section III).
    assert sio.extinction_curve(1e4 / 1.82) == pytest.approx(1.0, abs=1e-12)
    assert sio.extinction_curve(1e4 / 1.82, law="odonnell94") == pytest.approx(1.0, abs=1e-12)
    assert sio.extinction_curve(4400.0) == pytest.approx(1.0 + 1.0 / 3.1, abs=0.005)
    assert sio.extinction_curve(4400.0, r_v=5.0) == pytest.approx(1.2, abs=0.01)
    # the 2175 A bump is the UV maximum of the mid-UV range, above 3 A(V) for R_V = 3.1
    x = np.linspace(3.4, 5.8, 500)
    curve = sio.extinction_curve(1e4 / x)
    assert 4.5 < x[np.argmax(curve)] < 4.7 and curve.max() > 3.0
    # the piecewise segments meet (continuity at x = 1.1 and 3.3 to the few-% level)
    for edge in (1.1, 3.3):
        lo, hi = sio.extinction_curve(1e4 / np.array([edge - 1e-6, edge + 1e-6]))
        assert abs(hi - lo) / lo < 0.03


def test_f99_table3_anchor_points():
    # Fitzpatrick (1999) Table 3, R_V = 3.1: A(lambda)/E(B-V) at the spline anchor points.
    wave = [26500, 12200, 6000, 5470, 4670, 4110, 2700, 2600]
    table3 = [0.265, 0.829, 2.688, 3.055, 3.806, 4.315, 6.265, 6.591]
    k = sio.extinction_curve(wave, law="f99") * 3.1
    np.testing.assert_allclose(k, table3, atol=6e-4)
    # the spline joins the UV curve smoothly at 2700 A
    left, right = sio.extinction_curve([2700.01, 2699.99], law="f99")
    assert right == pytest.approx(left, rel=1e-4)
    # F99 and CCM89 agree within 5% in the blue-optical and drift apart to ~9% at 8000 A
    w = np.linspace(4000, 6000, 20)
    np.testing.assert_allclose(sio.extinction_curve(w, law="f99"), sio.extinction_curve(w), rtol=0.05)


def test_extinction_matches_independent_implementation():
    # A(lambda)/A(V) quoted in the documentation of the independent `extinction` package
    # (K. Barbary, MIT licence) for R_V = 3.1.
    np.testing.assert_allclose(sio.extinction_curve([2000.0, 4000.0, 8000.0]), [2.84252644, 1.4645557, 0.59748901], rtol=1e-7)
    np.testing.assert_allclose(
        sio.extinction_curve([2000.0, 3000.0, 4000.0], law="f99"), [2.76225609, 1.79674653, 1.42325373], rtol=1e-7
    )


def test_dered_vectorised_with_per_spectrum_ebv():
    wave = np.linspace(3800.0, 9200.0, 50)
    flux = np.ones((3, 50), np.float32)
    ivar = np.full((3, 50), 4.0, np.float32)
    ivar[1, 10] = 0.0
    ebv = np.array([0.0, 0.05, 0.2])
    f0, iv0 = sio.dered(wave, flux, ivar, ebv)
    assert f0.dtype == np.float32 and iv0.dtype == np.float32
    np.testing.assert_allclose(f0[0], 1.0)
    a = 0.2 * 3.1 * sio.extinction_curve(wave)
    np.testing.assert_allclose(f0[2], 10 ** (0.4 * a), rtol=1e-6)
    np.testing.assert_allclose(iv0[2], 4.0 * 10 ** (-0.8 * a), rtol=1e-6)
    assert iv0[1, 10] == 0.0
    assert np.all(f0[2, :-1] > f0[2, 1:])  # bluer pixels are corrected more
    with pytest.raises(OptionError, match="one value per spectrum"):
        sio.dered(wave, flux, ivar, [0.1, 0.2])
    with pytest.raises(OptionError, match="law"):
        sio.dered(wave, flux, ivar, 0.1, law="smc")
    with pytest.raises(InputDataError, match="wavelength"):
        sio.dered([500.0, 600.0], [1.0, 1.0], None, 0.1)


def test_air_vacuum_conversion():
    # H-alpha: 6562.80 A in air is 6564.61 A in vacuum; [OIII] 5006.84 -> 5008.24.
    np.testing.assert_allclose(sio.air_to_vacuum([6562.80, 5006.84]), [6564.61, 5008.24], atol=0.01)
    w = np.linspace(3000, 10000, 7)
    np.testing.assert_allclose(sio.vacuum_to_air(sio.air_to_vacuum(w)), w, atol=1e-8)


# ----------------------------------------------------------------------------- helpers


def test_open_spectra_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.zarr"):
        sio.open_spectra(tmp_path / "absent.zarr")
    with pytest.raises(OptionError, match="nosuchprotocol"):
        sio.open_spectra("nosuchprotocol://bucket/store.zarr")
    try:
        import s3fs  # noqa: F401
    except ImportError:
        with pytest.raises(MissingDependencyError, match="s3"):
            sio.open_spectra("s3://bucket/store.zarr")


def test_synthetic_spectra_is_a_lazy_reexport(monkeypatch):
    fake = types.ModuleType("sheap_dask.synthetic")
    fake.synthetic_spectra = lambda *a, **k: ("called", a, k)
    monkeypatch.setitem(sys.modules, "sheap_dask.synthetic", fake)
    assert sio.synthetic_spectra(3, seed=1) == ("called", (3,), {"seed": 1})
