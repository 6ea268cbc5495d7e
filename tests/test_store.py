"""Fit stores that never lose or mix data (issue 11), in one process on the synchronous
scheduler: foreign paths and the input refused, pending rows, verified resume, the input
checked, the lock, no_data causes, init errors. Two processes and kills: test_store_processes.py."""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import warnings

import dask
import numpy as np
import pytest
import xarray as xr
import zarr
from datasets import FAST, gauss_dataset, gauss_model

import sheap_dask as sd
from sheap_dask import chunk as chunk_mod
from sheap_dask.errors import (
    InputDataError,
    NoDataWarning,
    NotAStoreError,
    PartialStoreWarning,
    ResumeMismatchError,
    ResumeWarning,
    StoreExistsError,
    StoreLockedError,
)
from sheap_dask.status import Status
from sheap_dask.stores import LOCK_NAME, StoreLock, describe_path


pytestmark = pytest.mark.usefixtures("synchronous")


@pytest.fixture(scope="module")
def ds():
    return gauss_dataset(24, chunk=8)


@pytest.fixture(scope="module")
def complete(ds, tmp_path_factory):
    """An uninterrupted fit store of ``ds`` and its values."""
    path = str(tmp_path_factory.mktemp("complete") / "fits.zarr")
    with dask.config.set(scheduler="synchronous"):
        sd.fit_dataset(ds, gauss_model(), store=path, **FAST)
    return path, xr.open_zarr(path).compute()


def _interrupted(ds, path, monkeypatch, fail_at: int):
    """A store whose fit stopped after ``fail_at`` chunks (the next chunk's task raised)."""
    real = chunk_mod.fit_chunk
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) > fail_at:
            raise KeyboardInterrupt  # what Ctrl-C does to the loop over chunks
        return real(*args, **kwargs)

    monkeypatch.setattr(chunk_mod, "fit_chunk", flaky)
    with pytest.raises(KeyboardInterrupt):
        sd.fit_dataset(ds, gauss_model(), store=path, **FAST)
    monkeypatch.setattr(chunk_mod, "fit_chunk", real)


# ---------------------------------------------------------------------------- case 1
def test_existing_foreign_directory_is_never_overwritten(ds, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep")
    with pytest.raises(StoreExistsError, match=r"'.*precious' already exists and is not a sheap_dask fit store.*holding notes.txt"):
        sd.fit_dataset(ds, gauss_model(), store=str(precious), **FAST)
    with pytest.raises(StoreExistsError):
        sd.fit_dataset(ds, gauss_model(), store=str(precious), resume=False, **FAST)
    assert sorted(os.listdir(precious)) == ["notes.txt"] and (precious / "notes.txt").read_text() == "keep"
    # a zarr store sheap_dask did not write (here: spectra) is refused the same way
    other = tmp_path / "spectra.zarr"
    ds.to_zarr(other)
    with pytest.raises(StoreExistsError, match=r"a zarr store that sheap_dask did not write \(arrays/groups: flux, ivar"):
        sd.fit_dataset(ds, gauss_model(), store=str(other), resume=False, **FAST)
    assert "flux" in xr.open_zarr(other)
    # an existing file
    afile = tmp_path / "fits.txt"
    afile.write_text("x")
    with pytest.raises(StoreExistsError, match=r"is an existing file \(1 bytes\), not a directory"):
        sd.fit_dataset(ds, gauss_model(), store=str(afile), **FAST)
    # an empty directory is fine
    empty = tmp_path / "empty"
    empty.mkdir()
    assert sd.fit_dataset(ds, gauss_model(), store=str(empty), **FAST).attrs["sheap_chunks_fitted"] == 3


# ---------------------------------------------------------------------------- case 2
def test_output_equal_to_or_containing_the_input_is_refused(ds, tmp_path):
    inp = tmp_path / "in.zarr"
    ds.to_zarr(inp)
    before = sorted(os.listdir(inp))
    for kwargs in ({}, {"resume": False}):
        with pytest.raises(StoreExistsError, match=r"store '.*in.zarr' is the input: writing there would destroy it"):
            sd.fit_dataset(str(inp), gauss_model(), store=str(inp), **kwargs, **FAST)
    # the input as an opened Dataset (its encoding names the path); a folder holding it
    with pytest.raises(StoreExistsError, match="is the input"):
        sd.fit_dataset(xr.open_zarr(inp), gauss_model(), store=str(inp), resume=False, **FAST)
    with pytest.raises(StoreExistsError, match=r"contains the input '.*in.zarr'"):
        sd.fit_dataset(str(inp), gauss_model(), store=str(tmp_path), resume=False, **FAST)
    with pytest.raises(StoreExistsError, match=r"lies inside the input"):
        sd.fit_dataset(str(inp), gauss_model(), store=str(inp / "fits"), **FAST)
    assert sorted(os.listdir(inp)) == before and "flux" in xr.open_zarr(inp)


def test_a_fit_store_used_as_input_is_not_overwritten(ds, complete, tmp_path):
    # our own fit store is replaced only with resume=False, and never when it is the input
    path = tmp_path / "fits.zarr"
    shutil.copytree(complete[0], path)
    fitted = xr.open_zarr(path).assign(flux=ds.flux, ivar=ds.ivar).drop_vars("params")  # a store holding spectra and fits
    with pytest.raises(StoreExistsError, match="is the input"):
        sd.fit_dataset(fitted.assign_coords(wavelength=ds.wavelength), gauss_model(), store=str(path), resume=False, **FAST)
    assert describe_path(path).kind == "fit"


# ---------------------------------------------------------------------------- case 3
def test_unfitted_rows_read_pending_and_the_store_says_it_is_partial(ds, complete, tmp_path, monkeypatch):
    path = str(tmp_path / "fits.zarr")
    _interrupted(ds, path, monkeypatch, fail_at=1)
    assert not os.path.exists(os.path.join(path, LOCK_NAME))  # released on the way out
    raw = xr.open_zarr(path)
    status = raw.status.values
    assert (status[8:] == Status.PENDING).all() and not (status[:8] == Status.PENDING).any()
    assert np.isnan(raw.params.values[8:]).all()
    assert "pending" in raw.status.attrs["flag_meanings"] and -1 in list(raw.status.attrs["flag_values"])
    progress = sd.store.store_progress(path)
    assert (progress.n_done, progress.n_chunks, progress.missing) == (1, 3, [1, 2])
    assert progress.describe() == "1 of 3 chunks done; missing chunks 1-2 (spectra 8-23)"
    with pytest.warns(PartialStoreWarning, match=r"partial fit store: 1 of 3 chunks done; missing chunks 1-2 \(spectra 8-23\)"):
        sd.open_fits(path)
    with pytest.warns(PartialStoreWarning, match=r"partial fit store: 1 of 3 chunks done; missing chunks 1-2"):
        table = xr.open_zarr(path).sheap.summary()
    assert table.loc["pending", "count"] == 16 and table.attrs["progress"] == "1 of 3 chunks done; missing chunks 1-2 (spectra 8-23)"
    assert table.attrs["missing_chunks"] == [1, 2]
    with pytest.warns(PartialStoreWarning, match="this fit result is a partial fit store: 1 of 3"):  # no path: from the statuses
        loaded = raw.compute()
        loaded.encoding = {}
        loaded.sheap.summary()
    # resume: the rest, and the store equals an uninterrupted run, bit for bit
    resumed = sd.fit_dataset(ds, gauss_model(), store=path, **FAST)
    assert resumed.attrs["sheap_chunks_fitted"] == 2
    xr.testing.assert_identical(xr.open_zarr(path).compute(), complete[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error", PartialStoreWarning)
        sd.open_fits(path)
        assert sd.open_fits(path).sheap.summary().attrs["progress"] == "3 of 3 chunks done"
    with pytest.raises(NotAStoreError, match="is not a sheap_dask fit store: nothing is there"):
        sd.open_fits(tmp_path / "nope.zarr")


def test_in_memory_fits_never_carry_pending(ds):
    fits = sd.fit_dataset(ds, gauss_model(), **FAST)
    assert not (fits.status.values == Status.PENDING).any()
    assert not Status.PENDING.ok


def test_a_done_marker_counts_only_with_its_data(ds, complete, tmp_path):
    path = tmp_path / "fits.zarr"
    shutil.copytree(complete[0], path)
    shutil.rmtree(path / "params" / "c" / "1")  # chunk 1's parameters deleted, its done marker kept
    (path / "status" / "c" / "2").unlink()  # chunk 2's status deleted: its rows read pending
    with pytest.warns(ResumeWarning, match=r"2 chunk\(s\) marked done failed their check and are refitted: chunk 1 \(spectra 8-15\): "
                      r"its data differ from the checksum .*chunk 2 \(spectra 16-23\): 0 of its 8 fitted rows are in the store"):
        again = sd.fit_dataset(ds, gauss_model(), store=str(path), **FAST)
    assert again.attrs["sheap_chunks_fitted"] == 2 and again.attrs["sheap_chunks_refitted"] == 2
    xr.testing.assert_identical(xr.open_zarr(path).compute(), complete[1])


def test_a_store_whose_creation_was_interrupted_is_made_again(ds, complete, tmp_path):
    path = tmp_path / "fits.zarr"
    shutil.copytree(complete[0], path)
    shutil.rmtree(path / "sheap_progress")  # killed after the metadata, before the progress arrays:
    for name in complete[1].data_vars:  # no result written yet
        shutil.rmtree(path / name / "c", ignore_errors=True)
    again = sd.fit_dataset(ds, gauss_model(), store=str(path), **FAST)
    assert again.attrs["sheap_chunks_fitted"] == 3
    xr.testing.assert_identical(xr.open_zarr(path).compute(), complete[1])


# ---------------------------------------------------------------------------- case 4
def test_resume_refuses_a_different_input_and_accepts_it_moved(ds, complete, tmp_path, monkeypatch):
    inp = tmp_path / "in.zarr"
    ds.to_zarr(inp)
    path = str(tmp_path / "fits.zarr")
    _interrupted(str(inp), path, monkeypatch, fail_at=1)
    # the same path rewritten with other spectra (same shapes, ids and grid)
    shutil.rmtree(inp)
    gauss_dataset(24, chunk=8, seed=7).to_zarr(inp)
    with pytest.raises(ResumeMismatchError) as err:
        sd.fit_dataset(str(inp), gauss_model(), store=path, **FAST)
    assert "input chunk 0 (spectra 0-7): flux, ivar differ from the ones fitted (content digest)" in str(err.value)
    assert "definitions differ" not in str(err.value)
    # another input: each difference on its own line
    with pytest.raises(ResumeMismatchError) as err:
        sd.fit_dataset(gauss_dataset(32, chunk=8), gauss_model(), store=path, **{**FAST, "num_steps": 30})
    lines = str(err.value).splitlines()
    assert "  - option num_steps: store has 100, this fit uses 30" in lines
    assert "  - input spectra: store has 24, this input has 32" in lines
    # the original input at a new path: accepted, and the store names the new path
    moved = tmp_path / "moved.zarr"
    ds.to_zarr(moved)
    sd.fit_dataset(str(moved), gauss_model(), store=path, **FAST)
    final = xr.open_zarr(path)
    assert final.attrs["sheap_input"] == str(moved)
    assert json.loads(final.attrs["sheap_input_identity"])["path"] == str(moved)
    np.testing.assert_array_equal(final.params.values, complete[1].params.values)


def test_resume_checks_init_and_sample_mode(ds, complete, tmp_path):
    path = tmp_path / "fits.zarr"
    shutil.copytree(complete[0], path)
    with pytest.raises(ResumeMismatchError, match=r"input chunk 0 \(spectra 0-7\): init differ"):
        sd.fit_dataset(ds, gauss_model(), store=str(path), init={"amp": 3.0}, **FAST)
    with dask.config.set({"sheap_dask.store.verify_input": "none"}):  # only shapes and coordinates compared
        assert sd.fit_dataset(ds, gauss_model(), store=str(path), **FAST).attrs["sheap_chunks_fitted"] == 0


# ---------------------------------------------------------------------------- case 5
def _foreign_lock(path, *, pid, host, age):
    os.makedirs(path, exist_ok=True)
    record = {"pid": pid, "host": host, "purpose": "sheap-dask fit into this store", "token": "x", "started": time.time() - age,
              "heartbeat": time.time() - age}
    tmp = os.path.join(path, "lock.tmp")
    with open(tmp, "w") as fh:
        json.dump(record, fh)
    os.replace(tmp, os.path.join(path, LOCK_NAME))  # as StoreLock writes it: never half-written


def test_a_second_writer_is_refused_and_a_stale_lock_needs_force(ds, complete, tmp_path):
    path = tmp_path / "fits.zarr"
    shutil.copytree(complete[0], path)
    _foreign_lock(path, pid=4242, host="elsewhere", age=2)
    with pytest.raises(StoreLockedError, match=r"is being written by sheap-dask fit into this store \(pid 4242 on host elsewhere"):
        sd.fit_dataset(ds, gauss_model(), store=str(path), resume=False, **FAST)
    with pytest.raises(StoreLockedError, match="is being written"):  # force breaks only a stale lock
        sd.fit_dataset(ds, gauss_model(), store=str(path), force=True, **FAST)
    _foreign_lock(path, pid=4242, host="elsewhere", age=3600)
    with pytest.raises(StoreLockedError, match=r"last heartbeat was 3600 s ago.*pass force=True to break the lock"):
        sd.fit_dataset(ds, gauss_model(), store=str(path), **FAST)
    with pytest.warns(UserWarning, match="breaking the stale lock of .*pid 4242"):
        sd.fit_dataset(ds, gauss_model(), store=str(path), force=True, **FAST)
    assert not (path / LOCK_NAME).exists()
    # a lock left by a process of this host that is gone is broken at once
    dead = 2**22 + 12345
    _foreign_lock(path, pid=dead, host=socket.gethostname(), age=1)
    with pytest.warns(UserWarning, match=f"pid {dead} on host .*no longer running on this host"):
        sd.fit_dataset(ds, gauss_model(), store=str(path), **FAST)
    xr.testing.assert_identical(xr.open_zarr(path).compute(), complete[1])


def test_lock_heartbeat_release_and_a_broken_lock(tmp_path):
    path = tmp_path / "s"
    with dask.config.set({"sheap_dask.store.lock_heartbeat": 0.05}):
        with StoreLock(path, purpose="test") as lock:
            first = json.loads((path / LOCK_NAME).read_text())
            assert first["pid"] == os.getpid() and first["host"] == socket.gethostname()
            # polled, not slept: on a loaded machine the heartbeat thread may wait its turn
            deadline = time.monotonic() + 20
            while json.loads((path / LOCK_NAME).read_text())["heartbeat"] <= first["heartbeat"] and time.monotonic() < deadline:
                time.sleep(0.05)
            assert json.loads((path / LOCK_NAME).read_text())["heartbeat"] > first["heartbeat"]
            with pytest.raises(StoreLockedError, match=f"pid {os.getpid()}"):
                StoreLock(path).acquire()  # one writer, even in the same process
            # somebody broke our lock. A heartbeat that read the file just before overwrites it just
            # after (a lock is only broken once its heartbeats have stopped, so a live holder does
            # not meet this): write it again until the holder has noticed
            while not lock.lost and time.monotonic() < deadline:
                _foreign_lock(path, pid=1, host="other", age=0)
                time.sleep(0.3)
            with pytest.raises(StoreLockedError, match="the lock was taken by .*pid 1 on host other"):
                lock.check()
        assert (path / LOCK_NAME).exists()  # not ours any more: left alone
        (path / LOCK_NAME).unlink()
        with StoreLock(path):
            pass
        assert not (path / LOCK_NAME).exists()


def test_lock_on_an_fsspec_object_store():
    fsspec = pytest.importorskip("fsspec")
    url = f"memory://sheap-lock-test-{os.getpid()}/fits.zarr"
    fs = fsspec.filesystem("memory")
    with dask.config.set({"sheap_dask.store.lock_settle": 0.01}):
        with StoreLock(url, purpose="test"):
            assert fs.exists(url.removeprefix("memory://") + "/" + LOCK_NAME)
            with pytest.raises(StoreLockedError, match="is being written by test"):
                StoreLock(url).acquire()
        assert not fs.exists(url.removeprefix("memory://") + "/" + LOCK_NAME)


# ---------------------------------------------------------------------------- no_data
@pytest.mark.parametrize(
    "mutate, cause",
    [
        (lambda d: d.assign_coords(wavelength=d.wavelength / 10), r"look like nanometres \(multiply by 10\)"),
        (lambda d: d.assign_coords(wavelength=d.wavelength - 2 * float(d.wavelength.max())), "zero or negative values"),
        (lambda d: d.assign_coords(redshift=("spectrum", np.full(d.sizes["spectrum"], 3.0))),
         r"at these redshifts the model's window lies outside the spectra"),
    ],
)
def test_all_no_data_warns_with_the_likely_cause(ds, mutate, cause):
    base = gauss_model()
    model = sd.Model(base.func, base.params, name="gauss_window", window=(4940.0, 5060.0))  # the rest frame it needs
    with pytest.warns(NoDataWarning, match=r"all 24 spectra have status no_data .*observed wavelengths span .*"
                      r"needs rest frame 4940 to 5060 Angstrom. Likely cause: .*" + cause):
        fits = sd.fit_dataset(mutate(ds), model, **FAST)
    assert (fits.status.values == Status.NO_DATA).all()


# ---------------------------------------------------------------------------- init
def test_init_errors_name_init_and_numpy_arrays_work(ds):
    model = gauss_model()
    names = model.param_names
    n = ds.sizes["spectrum"]
    with pytest.raises(InputDataError, match=rf"init has shape \(3,\); expected \({len(names)},\) .* or \({n}, {len(names)}\)"):
        sd.fit_dataset(ds, model, init=np.ones(3), **FAST)
    with pytest.raises(InputDataError, match=rf"init\['amp'\] has shape \(5,\); expected a scalar or \({n},\)"):
        sd.fit_dataset(ds, model, init={"amp": np.ones(5)}, **FAST)
    truth = ds.true_params
    with pytest.raises(InputDataError, match=rf"init has 10 values along 'spectrum'; the input has {n} spectra"):
        sd.fit_dataset(ds, model, init=truth.isel(spectrum=slice(0, 10)), **FAST)
    with pytest.raises(InputDataError, match=r"init labels along 'spectrum' do not match the input's: position 0 is 23"):
        sd.fit_dataset(ds, model, init=truth.isel(spectrum=slice(None, None, -1)), **FAST)
    with pytest.raises(InputDataError, match=r"init has unknown parameter names \['width'\]"):
        sd.fit_dataset(ds, model, init=truth.assign_coords(param=["width", *names[1:]]), **FAST)
    by_numpy = sd.fit_dataset(ds, model, init=truth.values, **FAST)
    by_array = sd.fit_dataset(ds, model, init=truth, **FAST)
    np.testing.assert_array_equal(by_numpy.params.values, by_array.params.values)
    one_row = sd.fit_dataset(ds, model, init=truth.values[0], **FAST)
    assert one_row.sizes["spectrum"] == n


# ---------------------------------------------------------------------------- other writers
def test_write_zarr_replaces_only_spectra_stores_and_never_its_source(ds, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep")
    with pytest.raises(StoreExistsError, match="is not a sheap_dask spectra store"):
        sd.io.write_zarr(ds, precious, overwrite=True)
    assert (precious / "notes.txt").read_text() == "keep"
    path = tmp_path / "spectra.zarr"
    opened = sd.io.write_zarr(ds, path)
    with pytest.raises(StoreExistsError, match="is the input"):
        sd.io.write_zarr(opened, path, overwrite=True)
    again = sd.io.write_zarr(ds.isel(spectrum=slice(0, 8)), path, overwrite=True)
    assert again.sizes["spectrum"] == 8


def test_a_copy_of_a_fit_result_is_refused_not_deleted(ds, complete, tmp_path):
    copy = tmp_path / "copy.zarr"
    xr.open_zarr(complete[0]).to_zarr(copy)  # results without the progress record
    with pytest.raises(ResumeMismatchError, match="cannot be verified"):
        sd.fit_dataset(ds, gauss_model(), store=str(copy), **FAST)
    xr.testing.assert_identical(xr.open_zarr(copy).compute(), complete[1])


def test_fit_store_on_an_fsspec_url(ds, complete):
    fsspec = pytest.importorskip("fsspec")
    url = f"memory://sheap-test-{os.getpid()}/fits.zarr"
    with dask.config.set({"sheap_dask.store.lock_settle": 0.01}):
        assert sd.fit_dataset(ds, gauss_model(), store=url, **FAST).attrs["sheap_chunks_fitted"] == 3
        assert sd.fit_dataset(ds, gauss_model(), store=url, **FAST).attrs["sheap_chunks_fitted"] == 0
        assert sd.fit_dataset(ds, gauss_model(), store=url, resume=False, **FAST).attrs["sheap_chunks_fitted"] == 3
        xr.testing.assert_identical(xr.open_zarr(url).compute().drop_attrs(), complete[1].drop_attrs())
        fsspec.filesystem("memory").pipe(f"/sheap-test-{os.getpid()}/other/a.txt", b"x")
        with pytest.raises(StoreExistsError, match="holding a.txt"):
            sd.fit_dataset(ds, gauss_model(), store=url.replace("fits.zarr", "other"), **FAST)
