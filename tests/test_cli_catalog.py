"""``sheap-dask catalog`` and the coverage selection and region options of ``sheap-dask fit``,
on the mixed-redshift synthetic spectra of tests/test_catalog.py (H-beta quasars at z ~ 0.2,
MgII quasars at z ~ 1)."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import xarray as xr
from test_catalog import mixed_spectra

import sheap_dask as sd
from sheap_dask.cli import main


@pytest.fixture(scope="module")
def spectra_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("in") / "mixed.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mixed_spectra().chunk({"spectrum": 3}).to_zarr(path)
    return path


@pytest.mark.slow
@pytest.mark.cluster
def test_catalog_command_on_a_local_cluster(spectra_store, tmp_path, capsys):
    """Both regions in flight on one LocalCluster (--workers; one worker, so each region's
    program is compiled once while the suite runs beside it on the other core), written as
    parquet with the catalogue store behind it; a second run resumes (nothing refitted) and
    gives the same file."""
    pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "cat.parquet"
    args = ["catalog", str(spectra_store), str(out), "--regions", "hbeta,mgii", "--format", "parquet", "--workers", "1",
            "--num-steps", "30", "--n-samples", "32", "--oiii-wing"]
    assert main(args) == 0
    text = capsys.readouterr()
    assert "catalogue of 6 spectra" in text.out and re.search(r"hbeta +3 spectra covered", text.out)
    assert re.search(r"mgii +3 spectra covered", text.out) and f"written: {out} (parquet)" in text.out
    store = tmp_path / "cat.parquet.store"
    cat = sd.open_catalog(store).load()
    table = pq.read_table(out)
    for name in ("hbeta_broad_fwhm", "mgii_broad_fwhm", "log_mbh", "hbeta_status", "flags"):
        np.testing.assert_array_equal(table[name].to_numpy(), cat[name].values)
    assert list(cat["hbeta_covered"].values) == [True] * 3 + [False] * 3
    assert "oiii5007_wing" in sd.models.region("hbeta", oiii_wing=True).metadata["lines"]["oiii5007"]["components"]
    assert '"oiii_wing": true' in cat.attrs["sheap_regions"]  # the flag reached the hbeta region only
    # the file exists: refused without --overwrite, resumed with it (nothing refitted: same values)
    assert main(args) == 1 and "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    again = pq.read_table(out)
    assert again.to_pandas().equals(table.to_pandas())  # NaN where NaN
    assert again.schema.equals(table.schema, check_metadata=True)


def test_catalog_arguments_are_checked(spectra_store, tmp_path, capsys):
    base = ["catalog", str(spectra_store), str(tmp_path / "c")]
    for extra, message in ((["--regions", "hbta"], "argument --regions: 'hbta': unknown region 'hbta'"),
                           (["--workers", "0"], "argument --workers: '0' is not an integer >= 1"),
                           (["--n-broad", "9"], "argument --n-broad: '9': the broad line has 1 to 4 Gaussians"),
                           (["--format", "xls"], "argument --format: invalid choice: 'xls'"),
                           (["--fiducial", "hb"], "argument --fiducial: 'hb': use 'dr16q', a region (hbeta, halpha, mgii, civ)"),
                           (["--workers", "2", "--scheduler", "tcp://127.0.0.1:8786"], "not allowed with argument")):
        with pytest.raises(SystemExit) as exc:
            main(base + extra)
        assert exc.value.code == 2
        assert message in capsys.readouterr().err, extra
    assert main([*base, "--store", str(tmp_path / "s")]) == 1
    assert "with --format zarr OUTPUT is the catalogue store: drop --store" in capsys.readouterr().err
    assert not (tmp_path / "c").exists() and not (tmp_path / "s").exists()


def test_fit_selects_the_covering_spectra(spectra_store, tmp_path, synchronous, capsys):
    out = tmp_path / "mgii.zarr"
    assert main(["fit", str(spectra_store), str(out), "--model", "mgii", "--num-steps", "20", "--no-progress"]) == 0
    assert "3 of 6 spectra cover the mgii region: fitting those (--no-coverage fits all 6)" in capsys.readouterr().out
    fits = xr.open_zarr(out)
    assert list(fits.spectrum.values) == [103, 104, 105] and set(fits.status.values) <= {0, 1, 2}
    every = tmp_path / "all.zarr"
    assert main(["fit", str(spectra_store), str(every), "--model", "mgii", "--num-steps", "20", "--no-coverage", "--no-progress"]) == 0
    fits_all = xr.open_zarr(every)
    assert fits_all.sizes["spectrum"] == 6 and (fits_all.status.values[:3] == sd.Status.NO_DATA).all()
    np.testing.assert_allclose(fits_all.params.values[3:], fits.params.values)


def test_fit_region_options(spectra_store, tmp_path, capsys):
    assert main(["fit", str(spectra_store), str(tmp_path / "o"), "--model", "mgii", "--oiii-wing"]) == 1
    assert "--oiii-wing applies to the hbeta region only, not --model mgii" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["fit", str(spectra_store), str(tmp_path / "o"), "--model", "hbta"])
    assert "argument --model: 'hbta' is not a built-in region; use one of hbeta" in capsys.readouterr().err
    # the host's templates: a built-in set by name or a file; a typo names the sets
    assert main(["fit", str(spectra_store), str(tmp_path / "o"), "--model", "hbeta", "--host-template", "sdss_ssp"]) == 1
    err = capsys.readouterr().err
    assert "host template 'sdss_ssp' is not a built-in set ['mastar', 'sdss', 'sdss+ssp'] and as a file it does not exist" in err
    assert main(["fit", str(spectra_store), str(tmp_path / "o"), "--model", "hbeta", "--host", "off", "--host-template", "sdss+ssp"]) == 1
    assert "--host off leaves the host out" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    from sheap_dask.cli import _parser, _region_model, _region_options

    args = _parser().parse_args(["catalog", "in.zarr", "out", "--host-template", "sdss+ssp"])
    assert _region_options(args, "halpha", strict=False)["host_template"] == "sdss+ssp"
    assert sd.models.region("mgii", **_region_options(args, "mgii", strict=False)).metadata["host"] == []  # no host there
    model = _region_model(_parser().parse_args(["fit", "in.zarr", "out", "--model", "hbeta", "--host-template", "sdss+ssp"]))
    assert model.metadata["region_spec"]["kwargs"]["host_template"] == "sdss+ssp" and "host_w5" in model.param_names


def test_catalog_straight_from_sdss_files(shared_spectra, tmp_path, synchronous, capsys):
    """One command from spec files to a catalogue file: the files are ingested first (into
    OUT's spectra store, reused by a second run)."""
    files = sorted(str(p) for p in (shared_spectra / "gelato_examples").glob("spec-*.fits"))
    out = tmp_path / "cat.csv"
    args = ["catalog", *files, str(out), "--regions", "hbeta", "--format", "csv", "--num-steps", "30", "--n-samples", "32",
            "--no-progress"]
    assert main(args) == 0
    text = capsys.readouterr().out
    spectra = f"{out}.store.spectra.zarr"
    assert f"{spectra}: {len(files)} spectra ingested from {len(files)} files" in text and f"written: {out} (csv)" in text
    cat = sd.open_catalog(f"{out}.store")
    assert cat.sizes["spectrum"] == len(files) and set(cat["specname"].values) == {p.split("/")[-1][:-5] for p in files}
    assert cat.attrs["sheap_input"] == spectra
    assert main([*args, "--overwrite"]) == 0  # resumed: the ingested store and the catalogue are reused
    assert main(["catalog", files[0], "notes.txt", str(tmp_path / "x")]) == 1
    assert "are not FITS files" in capsys.readouterr().err
