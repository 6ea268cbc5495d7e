"""The command line's side of issue 11, in this process on the synchronous scheduler: refusals
that name CLI flags, `info` on partial and foreign stores, bad option values, the exit status
of an all-no_data fit, the demo's own store, ingestion's refusals and bad files. Real
processes (two writers, Ctrl-C, a killed client): test_store_processes.py."""

from __future__ import annotations

import json
import os
import shutil
import time

import dask
import pytest
import xarray as xr
from datasets import FAST, gauss_dataset, gauss_model

import sheap_dask as sd
from sheap_dask import chunk as chunk_mod
from sheap_dask.cli import EXIT_ALL_NO_DATA, main
from sheap_dask.stores import LOCK_NAME


pytestmark = pytest.mark.usefixtures("synchronous")


@pytest.fixture(scope="module")
def spectra(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "in.zarr"
    sd.io.synthetic_spectra(8, seed=4).chunk({"spectrum": 4}).to_zarr(path)
    return path


def test_fit_refuses_foreign_data_and_the_input(spectra, tmp_path, capsys):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep")
    assert main(["fit", str(spectra), str(precious), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: store '{precious}' already exists and is not a sheap_dask fit store") and "notes.txt" in err
    assert (precious / "notes.txt").read_text() == "keep"
    before = sorted(os.listdir(spectra))
    assert main(["fit", str(spectra), str(spectra), "--no-resume", "--no-progress"]) == 1
    assert f"error: store '{spectra}' is the input: writing there would destroy it" in capsys.readouterr().err
    assert sorted(os.listdir(spectra)) == before and "flux" in xr.open_zarr(spectra)
    afile = tmp_path / "out.txt"
    afile.write_text("x")
    assert main(["fit", str(spectra), str(afile), "--no-progress"]) == 1
    assert "is an existing file (1 bytes), not a directory" in capsys.readouterr().err


def test_messages_name_the_cli_flags(tmp_path, capsys):
    ds = gauss_dataset(24, chunk=8)
    out = str(tmp_path / "fits.zarr")
    sd.fit_dataset(ds, gauss_model(), store=out, **FAST)
    record = {"pid": 4242, "host": "elsewhere", "purpose": "sheap-dask fit into this store", "token": "x",
              "started": time.time() - 3600, "heartbeat": time.time() - 3600}
    (tmp_path / "fits.zarr" / LOCK_NAME).write_text(json.dumps(record))
    inp = tmp_path / "in.zarr"
    ds.to_zarr(inp)
    assert main(["fit", str(inp), out, "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "pid 4242 on host elsewhere" in err and "pass --force to break the lock" in err and "force=True" not in err
    (tmp_path / "fits.zarr" / LOCK_NAME).unlink()
    from sheap_dask.errors import ResumeMismatchError
    from sheap_dask.stores import cli_spelling

    with cli_spelling({"resume=False": "--no-resume"}), pytest.raises(ResumeMismatchError) as exc:
        sd.fit_dataset(ds, gauss_model(), store=out, **{**FAST, "num_steps": 7})
    assert "or --no-resume to overwrite that store" in str(exc.value) and "resume=False" not in str(exc.value)


def test_info_partial_store_and_not_a_store(spectra, tmp_path, monkeypatch, capsys):
    ds = gauss_dataset(24, chunk=8)
    path = str(tmp_path / "fits.zarr")
    real, calls = chunk_mod.fit_chunk, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(chunk_mod, "fit_chunk", flaky)
    with pytest.raises(KeyboardInterrupt):
        sd.fit_dataset(ds, gauss_model(), store=path, **FAST)
    assert main(["info", path]) == 0
    out = capsys.readouterr().out
    assert "PARTIAL: 1 of 3 chunks done; missing chunks 1-2 (spectra 8-23)" in out
    assert "pending                    16" in out and "converged" in out
    assert main(["info", str(spectra)]) == 1
    assert "is not a sheap_dask fit store: it is a zarr store that sheap_dask did not write" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "nope.zarr")]) == 1
    assert "is not a sheap_dask fit store: nothing is there" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["ingest", "a.fits", "out.zarr", "--ebv", "abc"], "argument --ebv: 'abc' is not a number, sfd or sf11"),
        (["fit", "in.zarr", "out.zarr", "--scheduler", "127.0.0.1:notaport"],
         "argument --scheduler: '127.0.0.1:notaport' is not a scheduler address (invalid literal for int() with base 10: 'notaport')"),
        (["demo", "--scheduler", "tcp://host:99999"], "argument --scheduler: 'tcp://host:99999' is not a scheduler address (port 99999 is out of range)"),
    ],
)
def test_bad_option_values_name_the_option(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_unreachable_scheduler_is_a_clean_error(spectra, tmp_path, capsys):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}):
        assert main(["fit", str(spectra), str(tmp_path / "o.zarr"), "--scheduler", f"tcp://127.0.0.1:{port}"]) == 1
    assert f"error: --scheduler tcp://127.0.0.1:{port}: cannot connect to a Dask scheduler there" in capsys.readouterr().err


def test_all_no_data_exits_non_zero_unless_allowed(tmp_path, capsys):
    ds = sd.io.synthetic_spectra(8, seed=1).chunk({"spectrum": 4})
    nm = tmp_path / "nm.zarr"
    ds.assign_coords(wavelength=ds.wavelength / 10).to_zarr(nm)  # nanometres, not Angstrom
    assert main(["fit", str(nm), str(tmp_path / "a.zarr"), "--no-progress"]) == EXIT_ALL_NO_DATA
    captured = capsys.readouterr()
    assert "warning: all 8 spectra have status no_data" in captured.err and "look like nanometres (multiply by 10)" in captured.err
    assert "pass --allow-no-data to exit 0" in captured.err and "no_data                    8" in captured.out
    assert main(["fit", str(nm), str(tmp_path / "b.zarr"), "--no-progress", "--allow-no-data"]) == 0
    # --model civ on spectra of the H-beta region
    rest = tmp_path / "rest.zarr"
    ds.assign_coords(redshift=("spectrum", [0.1] * 8)).to_zarr(rest)
    assert main(["fit", str(rest), str(tmp_path / "c.zarr"), "--model", "civ", "--no-progress"]) == EXIT_ALL_NO_DATA
    err = capsys.readouterr().err
    assert "i.e. rest frame" in err and "the model 'civ' needs rest frame 1445 to 1705 Angstrom" in err
    assert "at these redshifts the model's window lies outside the spectra" in err


@pytest.mark.slow
def test_demo_replaces_only_its_own_store(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["demo", "--n", "8", "--chunk", "4", "--no-progress"]
    assert main(argv) == 0  # the default store, in the current directory
    default = tmp_path / "sheap_dask_demo_fits.zarr"
    assert xr.open_zarr(default).attrs["sheap_demo"] == 1
    assert main(argv) == 0  # a previous demo store is replaced
    assert "fitted 8 spectra" in capsys.readouterr().out
    # a fit store the demo did not write, and foreign data, are refused
    other = tmp_path / "fits.zarr"
    sd.fit_dataset(gauss_dataset(8, chunk=4), gauss_model(), store=str(other), **FAST)
    assert main([*argv, "--store", str(other)]) == 1
    assert "is a fit store not written by sheap-dask demo" in capsys.readouterr().err
    shutil.rmtree(other)
    other.mkdir()
    (other / "a.txt").write_text("keep")
    assert main([*argv, "--store", str(other)]) == 1
    assert "already exists and is not a sheap_dask fit store" in capsys.readouterr().err


# ------------------------------------------------------------------------------ ingest
@pytest.fixture(scope="module")
def sdss_few(shared_spectra):
    pytest.importorskip("astropy.io.fits")
    return sorted((shared_spectra / "pyqsofit_rm017").glob("*.fits"))[:3]


def test_ingest_refusals_and_duplicates(sdss_few, tmp_path, capsys):
    files = [str(f) for f in sdss_few]
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep")
    for extra in ([], ["--overwrite"], ["--resume"]):
        assert main(["ingest", *files, str(precious), "--no-progress", *extra]) == 1
        assert "already exists and is not a sheap_dask spectra store" in capsys.readouterr().err
    assert (precious / "notes.txt").read_text() == "keep"
    # the output is an input file, or the folder holding them
    assert main(["ingest", *files, files[0], "--no-progress"]) == 1
    assert "is an input file" in capsys.readouterr().err
    assert main(["ingest", *files, str(sdss_few[0].parent), "--no-progress"]) == 1
    assert "contains an input file" in capsys.readouterr().err
    # the same file twice: warned, read once
    out = tmp_path / "out.zarr"
    assert main(["ingest", *files, files[0], str(out), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "warning: files: 1 of the 4 files given repeat another one" in captured.err
    assert f"{out}: 3 spectra" in captured.out
    # our own store: --overwrite replaces it; a fit store is not a spectra store
    assert main(["ingest", *files, str(out), "--no-progress"]) == 1
    assert "already exists (an ingested spectra store); pass --overwrite to replace it (or --resume" in capsys.readouterr().err
    assert main(["ingest", *files[:2], str(out), "--no-progress", "--overwrite"]) == 0
    assert xr.open_zarr(out).sizes["spectrum"] == 2


def test_ingest_bad_file_names_itself_and_skip_bad_lists_it(sdss_few, tmp_path, capsys):
    from astropy.io import fits

    good = [str(f) for f in sdss_few]
    cut = tmp_path / "spec-cut.fits"
    with fits.open(good[0]) as h:
        cut_at = h[1]._data_offset + 1000
    cut.write_bytes(open(good[0], "rb").read()[:cut_at])
    out = tmp_path / "out.zarr"
    assert main(["ingest", good[0], str(cut), good[1], str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "spec-cut.fits: the file is truncated" in err and "file 2 of 3" in err and "pass --skip-bad" in err
    assert not out.exists() or not os.listdir(out)
    assert main(["ingest", good[0], str(cut), good[1], str(out), "--no-progress", "--skip-bad"]) == 0
    captured = capsys.readouterr()
    assert "skipped 1 unreadable file(s)" in captured.out and "spec-cut.fits: the file is truncated" in captured.out
    assert "spec-cut.fits" in xr.open_zarr(out).attrs["skipped_files"]


def test_ingest_lock_and_verified_resume(sdss_few, tmp_path, capsys):
    import numpy as np
    import zarr

    from sheap_dask import io as sio
    from sheap_dask.errors import ResumeWarning, StoreLockedError

    files = [str(f) for f in sdss_few]
    store = tmp_path / "s.zarr"
    full = sio.ingest_sdss(files, store, chunk=1).compute()
    record = {"pid": 4242, "host": "elsewhere", "purpose": "an ingestion", "token": "x", "started": time.time(), "heartbeat": time.time()}
    (store / LOCK_NAME).write_text(json.dumps(record))
    with pytest.raises(StoreLockedError, match="is being written by an ingestion"):
        sio.ingest_sdss(files, store, chunk=1, overwrite=True)
    (store / LOCK_NAME).unlink()
    # a done chunk whose data were lost is written again
    group = zarr.open_group(str(store), mode="r+")
    group["flux"][1, :] = np.nan
    with pytest.warns(ResumeWarning, match=r"1 chunk\(s\) marked done do not match the checksum .*: 1 \(spectra 1-1\)"):
        resumed = sio.ingest_sdss(files, store, chunk=1, resume=True)
    xr.testing.assert_identical(resumed.compute(), full)
