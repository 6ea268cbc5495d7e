"""Tests of sheap_dask.io.desi on real DESI-format files written with desispec (test-only)."""

from __future__ import annotations

import shutil
import warnings

import dask
import numpy as np
import pytest
import xarray as xr
from desi_files import ARM_SIGMA_PIX, GRID, STEP, arm_wave, kernel_sigma_pix, write_coadd, write_redrock

import sheap_dask as sd
from sheap_dask import astro, cli
from sheap_dask.errors import InputDataError, OptionError, ResumeMismatchError

fits = pytest.importorskip("astropy.io.fits")
Z = 0.2  # H-beta's window (4400-5600 A rest) spans the B/R overlap at 5760-5800 A


@pytest.fixture(scope="module")
def desi(tmp_path_factory):
    root = tmp_path_factory.mktemp("desi")
    a = write_coadd(root / "coadd-main-dark-10032.fits", 6, seed=1, redshift=Z)
    b = write_coadd(root / "coadd-main-dark-10033.fits", 5, seed=2, redshift=Z, first_targetid=39627000000001000, hpx=10033)
    tid = np.concatenate([a.targetid, b.targetid])
    redrock = write_redrock(root / "redrock-main-dark.fits", tid, np.full(tid.size, Z))
    ds = sd.io.read_desi_spectra([a.path, b.path], redshifts=redrock, n_jobs=2)
    return {"truth": [a, b], "redrock": redrock, "ds": ds, "root": root}


def _on_grid(arm_wave_values):
    return np.rint((arm_wave_values - GRID[0]) / STEP).astype(int)


def test_grid_is_desi_linear_grid(desi):
    ds = desi["ds"]
    w = ds.wavelength.values
    assert w.size == 7781 and w[0] == 3600.0 and w[-1] == pytest.approx(9824.0, abs=1e-9)
    np.testing.assert_allclose(np.diff(w), 0.8, rtol=1e-9)
    assert ds.flux.dims == ("spectrum", "wavelength") and ds.flux.dtype == np.float32
    assert ds.sizes["spectrum"] == 11
    assert ds.flux.attrs["units"] == "1e-17 erg / (s cm2 Angstrom)"
    assert "10**-17" in ds.attrs["flux_units_in_files"]


def test_flux_and_ivar_reproduced_and_overlaps_ivar_weighted(desi):
    ds = desi["ds"]
    flux, ivar = ds.flux.values, ds.ivar.values
    s0 = 0
    n_overlap_checked = n_single_masked = 0
    for truth in desi["truth"]:
        n = truth.targetid.size
        arms = {a: truth.arms[a] for a in "brz"}
        cover = np.zeros(GRID.size, int)
        placed = {}
        for a, d in arms.items():
            j = _on_grid(d["wave"])
            cover[j] += 1
            placed[a] = j
        for i in range(n):
            s = s0 + i
            exp_f = np.zeros(GRID.size)
            exp_w = np.zeros(GRID.size)
            for a, d in arms.items():
                j = placed[a]
                iv = np.where(d["mask"][i] != 0, 0.0, d["ivar"][i].astype(np.float64))
                exp_w[j] += iv
                exp_f[j] += iv * d["flux"][i]
            single = cover == 1
            for a, d in arms.items():
                j = placed[a]
                one = single[j]
                ok = d["mask"][i] == 0
                # a pixel one arm sees: exactly that arm's flux and ivar (masked: ivar 0, flux kept)
                np.testing.assert_array_equal(flux[s, j[one]], d["flux"][i][one])
                np.testing.assert_array_equal(ivar[s, j[one & ok]], d["ivar"][i][one & ok])
                assert np.all(ivar[s, j[one & ~ok]] == 0)
            two = cover == 2
            good = two & (exp_w > 0)
            # a pixel two arms see: the ivar-weighted mean and the summed ivar
            np.testing.assert_allclose(flux[s, good], (exp_f[good] / exp_w[good]).astype(np.float32), rtol=2e-6)
            np.testing.assert_allclose(ivar[s, two], exp_w[two].astype(np.float32), rtol=1e-6)
            n_overlap_checked += int(good.sum())
            b, r = arms["b"], arms["r"]
            jb = placed["b"]
            masked_b = (b["mask"][i] != 0) & two[jb]
            for k in np.nonzero(masked_b)[0]:  # masked in B only: R alone
                kr = np.nonzero(placed["r"] == jb[k])[0][0]
                if r["mask"][i][kr] == 0:
                    assert flux[s, jb[k]] == r["flux"][i][kr] and ivar[s, jb[k]] == r["ivar"][i][kr]
                    n_single_masked += 1
        s0 += n
    assert n_overlap_checked > 11 * 150  # both overlaps of every spectrum
    assert n_single_masked >= 1
    # the arms have different S/N (25 and 12 per pixel): the summed ivar is B's times 1 + (12/25)^2
    j = np.nonzero((GRID > 5765) & (GRID < 5795))[0]
    b = desi["truth"][0].arms["b"]
    assert np.median(ds.ivar.values[1, j]) == pytest.approx(b["ivar"][1][0] * (1 + (12 / 25) ** 2), rel=1e-5)


def test_metadata_from_fibermap_header_and_redrock(desi):
    ds = desi["ds"]
    a, b = desi["truth"]
    np.testing.assert_array_equal(ds.targetid.values, np.concatenate([a.targetid, b.targetid]))
    assert ds.targetid.dtype == np.int64
    assert list(ds.healpix.values) == [10032] * 6 + [10033] * 5
    assert set(ds.survey.values) == {"main"} and set(ds.program.values) == {"dark"}
    np.testing.assert_allclose(ds.ra.values[:6], np.linspace(150.0, 151.0, 6))
    assert list(ds.fiberstatus.values) == [0] * 11 and set(ds.objtype.values) == {"TGT"}
    np.testing.assert_array_equal(ds.redshift.values, Z)
    assert set(ds.objclass.values) == {"QSO"} and np.all(ds.zwarning.values == 0)
    assert list(ds.filename.values[[0, 6]]) == ["coadd-main-dark-10032.fits", "coadd-main-dark-10033.fits"]
    assert ds.attrs["redshifts"] == "11 of 11 spectra matched on TARGETID"
    picked = ds.set_xindex("targetid").sel(targetid=b.targetid[2])
    np.testing.assert_array_equal(picked.flux.values, ds.flux.values[8])


def test_instrumental_fwhm_from_resolution_matrix(desi):
    ds = desi["ds"]
    inst = ds.inst_fwhm.values[0]
    assert ds.inst_fwhm.attrs["units"] == "km/s"
    for arm, (lo, hi) in {"b": (3700, 5700), "r": (5900, 7400), "z": (7700, 9700)}.items():
        j = (GRID > lo) & (GRID < hi)
        expected = 2.3548200450309493 * kernel_sigma_pix(ARM_SIGMA_PIX[arm]) * STEP / GRID[j] * 299792.458
        np.testing.assert_allclose(inst[j], expected, rtol=1e-5)
    # DESI's R ~ 2000-5000: tens to ~200 km/s
    assert 40 < np.nanmin(inst) and np.nanmax(inst) < 250
    # where B and R overlap, the ivar-weighted variance of the two kernels
    j = np.nonzero((GRID > 5770) & (GRID < 5790))[0][0]
    w = ds.ivar.values[0, j]
    assert kernel_sigma_pix(ARM_SIGMA_PIX["r"]) < inst[j] / (2.3548200450309493 * STEP / GRID[j] * 299792.458) < kernel_sigma_pix(ARM_SIGMA_PIX["b"])
    assert w > 0
    no_res = sd.io.read_desi_spectra(desi["truth"][0].path, resolution=False)
    assert np.all(np.isnan(no_res.inst_fwhm.values))
    np.testing.assert_array_equal(no_res.flux.values, ds.flux.values[:6])


def test_redshift_table_forms_missing_and_qso_only(desi, tmp_path):
    a, b = desi["truth"]
    files = [a.path, b.path]
    tid = np.concatenate([a.targetid, b.targetid])
    # a mapping TARGETID -> z, one target missing: kept with NaN, and a warning names it
    partial = {int(t): 0.2 for t in tid[1:]}
    with pytest.warns(UserWarning, match=f"1 of 11 spectra have no redshift.*{tid[0]}"):
        ds = sd.io.read_desi_spectra(files, redshifts=partial)
    assert np.isnan(ds.redshift.values[0]) and ds.zwarning.values[0] == -1 and ds.sizes["spectrum"] == 11
    assert "1 without a redshift kept" in ds.attrs["redshifts"]
    with pytest.warns(UserWarning, match="left out"):
        dropped = sd.io.read_desi_spectra(files, redshifts=partial, missing_redshift="drop")
    np.testing.assert_array_equal(dropped.targetid.values, tid[1:])
    with pytest.raises(InputDataError, match=f"1 of 11 spectra have no row.*{tid[0]}"):
        sd.io.read_desi_spectra(files, redshifts=partial, missing_redshift="raise")
    # an astropy Table with a STAR and a ZWARN != 0: qso_only leaves them out
    from astropy.table import Table

    spectype = ["QSO"] * 11
    spectype[2] = "STAR"
    zwarn = np.zeros(11, int)
    zwarn[7] = 4
    table = Table({"TARGETID": tid, "Z": np.full(11, Z), "ZWARN": zwarn, "SPECTYPE": spectype})
    qso = sd.io.read_desi_spectra(files, redshifts=table, qso_only=True)
    np.testing.assert_array_equal(qso.targetid.values, np.delete(tid, [2, 7]))
    np.testing.assert_array_equal(qso.flux.values, desi["ds"].flux.values[np.delete(np.arange(11), [2, 7])])
    assert "2 not QSO or ZWARN != 0 left out" in qso.attrs["redshifts"]
    # a zcatalog listing targets twice: matched on SURVEY/PROGRAM, or its ZCAT_PRIMARY rows
    twice = Table(
        {
            "TARGETID": np.concatenate([tid, tid]),
            "Z": np.concatenate([np.full(11, Z), np.full(11, 1.5)]),
            "SURVEY": ["main"] * 11 + ["sv3"] * 11,
            "PROGRAM": ["dark"] * 22,
            "ZCAT_PRIMARY": np.r_[np.ones(11, bool), np.zeros(11, bool)],
        }
    )
    zcat = tmp_path / "zpix-main-dark.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.table_to_hdu(twice)]).writeto(zcat)
    with fits.open(zcat, mode="update") as h:
        h[1].name = "ZCATALOG"
    np.testing.assert_array_equal(sd.io.read_desi_spectra(files, redshifts=zcat).redshift.values, Z)
    twice.remove_column("SURVEY")
    np.testing.assert_array_equal(sd.io.read_desi_spectra(files, redshifts=twice).redshift.values, Z)
    twice.remove_column("ZCAT_PRIMARY")
    with pytest.raises(InputDataError, match="more than once"):
        sd.io.read_desi_spectra(files, redshifts=twice)
    with pytest.raises(InputDataError, match="no Z column"):
        sd.io.read_desi_spectra(files, redshifts={"TARGETID": tid})
    with pytest.raises(OptionError, match="qso_only=True needs redshifts"):
        sd.io.read_desi_spectra(files, qso_only=True)


def test_ingest_equals_read_and_resumes(desi, tmp_path):
    files = [t.path for t in desi["truth"]]
    store = tmp_path / "desi.zarr"
    ds = sd.io.ingest_desi(files, store, chunk=4, redshifts=desi["redrock"], n_jobs=2)
    eager = desi["ds"]
    xr.testing.assert_identical(ds.compute(), eager)
    assert ds.flux.chunks == ((4, 4, 3), (7781,)) and ds.chunks["spectrum"] == (4, 4, 3)
    lazy = sd.io.read_desi_spectra(files, redshifts=desi["redrock"], chunk=5)
    xr.testing.assert_identical(lazy.compute(), eager)
    with pytest.raises(OptionError, match="already exists"):
        sd.io.ingest_desi(files, store, redshifts=desi["redrock"])
    # an interruption after the first chunk: chunks 1 and 2 unwritten, the store says it is partial
    import zarr

    group = zarr.open_group(str(store), mode="r+")
    group["sheap_ingest_progress/done"][:] = np.array([1, 0, 0], dtype="int8")
    group["flux"][4:, :] = np.nan
    group.attrs["sheap_ingest_complete"] = 0
    zarr.consolidate_metadata(str(store))
    with pytest.warns(UserWarning, match="partial ingestion"):
        sd.io.open_spectra(store)
    with pytest.raises(ResumeMismatchError, match="reader"):
        sd.io.ingest_desi(files, store, chunk=4, redshifts=desi["redrock"], resolution=False, resume=True)
    with pytest.raises(ResumeMismatchError, match="chunk: store has 4"):
        sd.io.ingest_desi(files, store, chunk=5, redshifts=desi["redrock"], resume=True)
    resumed = sd.io.ingest_desi(files, store, chunk=4, redshifts=desi["redrock"], resume=True)
    xr.testing.assert_identical(resumed.compute(), eager)


def test_bad_files_name_themselves(desi, tmp_path, shared_spectra):
    good = desi["truth"][0].path
    sdss = next((shared_spectra / "sdss_sheap").glob("*.fits"))
    with pytest.raises(InputDataError, match=f"{sdss.name}: not a DESI coadd.*read_sdss_spectra"):
        sd.io.read_desi_spectra([good, sdss])
    two_arms = write_coadd(tmp_path / "coadd-no-z.fits", 2, seed=3, bands=("b", "r"))
    with pytest.raises(InputDataError, match="coadd-no-z.fits: the Z arm is missing"):
        sd.io.read_desi_spectra([good, two_arms.path])
    cut = tmp_path / "coadd-truncated.fits"
    data = open(good, "rb").read()
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(InputDataError, match="coadd-truncated.fits: the file is truncated"):
        sd.io.read_desi_spectra([good, cut])
    with pytest.raises(InputDataError, match="coadd-truncated.fits: the file is truncated"):
        sd.io.ingest_desi([good, cut], tmp_path / "x.zarr")
    assert not (tmp_path / "x.zarr").exists()
    # skip_bad: the good file is read, the bad ones are listed
    with pytest.warns(UserWarning, match="left out 3 of 4 files"):
        ds = sd.io.read_desi_spectra([good, sdss, two_arms.path, cut], skip_bad=True)
    assert ds.sizes["spectrum"] == 6
    assert len(ds.attrs["skipped_files"].splitlines()) == 3 and "truncated" in ds.attrs["skipped_files"]
    with pytest.raises(FileNotFoundError, match="nope.fits"):
        sd.io.read_desi_spectra([good, tmp_path / "nope.fits"])


def test_resampled_arm_conserves_flux_and_propagates_ivar(desi, tmp_path):
    # an R arm half a pixel off the common grid is resampled by pixel overlap
    shifted = write_coadd(tmp_path / "coadd-shifted.fits", 2, seed=4, offsets={"r": 0.4})
    ds = sd.io.read_desi_spectra(shifted.path, resolution=False)
    r = shifted.arms["r"]
    j = np.nonzero((GRID > 5850) & (GRID < 7500))[0]  # R alone
    # each grid pixel is half of two R pixels: their mean, and ivar = 1 / (var/4 + var/4)
    k = np.searchsorted(r["wave"], GRID[j]) - 1
    both_good = (r["mask"][0][k] == 0) & (r["mask"][0][k + 1] == 0)
    expected = 0.5 * (r["flux"][0][k].astype(np.float64) + r["flux"][0][k + 1])
    np.testing.assert_allclose(ds.flux.values[0, j], expected.astype(np.float32), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ds.ivar.values[0, j[both_good]], 2 * r["ivar"][0][k[both_good]], rtol=1e-5)
    assert np.all(ds.ivar.values[0, j[~both_good]] == 0)
    assert np.sum(ds.flux.values[0, j]) == pytest.approx(np.sum(expected), rel=1e-6)
    assert arm_wave("r", 0.4)[0] == pytest.approx(5760.4)


def test_fit_of_ingested_store_recovers_truth(desi, tmp_path):
    files = [t.path for t in desi["truth"]]
    store = sd.io.ingest_desi(files, tmp_path / "fit.zarr", chunk=4, redshifts=desi["redrock"], n_jobs=2)
    # the generator's own model (no host, one joint fit): this checks ingestion, not the default
    # line-free continuum stage, which biases broad fluxes a little on such data (README)
    model = sd.models.region("hbeta", host=False, continuum="joint")
    with dask.config.set(scheduler="synchronous"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fits_ds = sd.fit_dataset(store.isel(spectrum=slice(0, 4)), model, client=None).compute()
    truth = desi["truth"][0]
    names = list(fits_ds.param.values)
    assert set(fits_ds.status.values) <= {0, 1}  # converged (after fallback)
    assert np.all(fits_ds.redchi2.values < 1.5)
    p, t = fits_ds.params.values, truth.true_params[:4]

    def fitted(*params):  # the fitted model has a host the generator lacks: match columns by name
        return p[:, [names.index(n) for n in params]].sum(1)

    def true(*params):
        return t[:, [truth.param_names.index(n) for n in params]].sum(1)

    # the quantities a user reads: continuum, [OIII], total broad H-beta flux
    np.testing.assert_allclose(fitted("powerlaw_norm"), true("powerlaw_norm"), rtol=0.05)
    np.testing.assert_allclose(fitted("oiii5007_flux"), true("oiii5007_flux"), rtol=0.1)
    broad = ("hbeta_broad1_flux", "hbeta_broad2_flux")
    np.testing.assert_allclose(fitted(*broad), true(*broad), rtol=0.1)
    np.testing.assert_array_equal(fits_ds.targetid.values, truth.targetid[:4])


def test_cli_ingest_recognises_desi_files(desi, tmp_path, capsys):
    files = [t.path for t in desi["truth"]]
    out = tmp_path / "cli.zarr"
    assert cli.main(["ingest", *files, str(out), "--redshifts", desi["redrock"], "--no-progress"]) == 0
    assert "11 spectra x 7781 pixels" in capsys.readouterr().out
    xr.testing.assert_identical(sd.io.open_spectra(out).compute(), desi["ds"])
    assert cli.main(["ingest", *files, str(tmp_path / "qso.zarr"), "--redshifts", desi["redrock"], "--qso-only", "--no-progress"]) == 0
    shutil.rmtree(out)


def test_narrow_line_width_correction(desi):
    ds = desi["ds"]
    inst = sd.io.instrumental_fwhm_at(ds, 4862.68)  # H-beta at z = 0.2: 5835 A, the R arm alone
    expected = 2.3548200450309493 * kernel_sigma_pix(ARM_SIGMA_PIX["r"]) * STEP / (4862.68 * 1.2) * 299792.458
    np.testing.assert_allclose(inst.values, expected, rtol=1e-4)
    assert inst.dims == ("spectrum",) and inst.attrs["units"] == "km/s"
    measured = xr.DataArray([500.0, 100.0], dims="spectrum")
    corrected = astro.subtract_instrumental(measured, xr.DataArray([120.0, 120.0], dims="spectrum"))
    np.testing.assert_allclose(corrected.values, [np.sqrt(500.0**2 - 120.0**2), np.nan])
    with pytest.raises(InputDataError, match="inst_fwhm"):
        sd.io.instrumental_fwhm_at(ds.drop_vars("inst_fwhm"), 5008.24)
