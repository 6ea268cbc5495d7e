"""Issue 11 with real processes: `sheap-dask fit` subprocesses, each on its own LocalCluster.

Two writers on one store (the second is refused, naming the first); Ctrl-C (one message, no
worker tracebacks, the lock released); SIGTERM (the same); a client killed with SIGKILL (its lock is broken by
the next run on this host); the resumed store is identical to an uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import xarray as xr
import zarr

import sheap_dask as sd
from sheap_dask.cli import INTERRUPTED
from sheap_dask.stores import LOCK_NAME

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

BIN = Path(sys.executable).parent
# one worker per run: the machine's cores are shared by the runs a test starts at once
ENV = {**os.environ, "DASK_SHEAP_DASK__CLUSTER__N_WORKERS": "1"}


def _fit(*args, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "sheap-dask"), "fit", *map(str, args), "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, start_new_session=True, **kwargs,
    )


def _done(store) -> int:
    try:
        return int(zarr.open_array(str(store), path="sheap_progress/done", mode="r")[:].sum())
    except Exception:  # not created yet
        return 0


def _wait(predicate, proc, timeout=300) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the fit ended early (rc {proc.returncode}):\n{out}\n{err}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail("timed out")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def spectra(tmp_path_factory):
    path = tmp_path_factory.mktemp("proc") / "in.zarr"
    sd.io.synthetic_spectra(96, seed=11).chunk({"spectrum": 8}).to_zarr(path)
    return path


@pytest.fixture(scope="module")
def two_writers(spectra):
    """A fits ``out.zarr``; while it runs, B (other options, --no-resume) and C (the same
    command as A) start on the same store."""
    out = spectra.parent / "uninterrupted.zarr"
    a = _fit(spectra, out)
    try:
        _wait(lambda: (out / LOCK_NAME).exists(), a)
        b = _fit(spectra, out, "--no-resume", "--num-steps", "30")
        c = _fit(spectra, out)
        results = {name: (p.wait(timeout=300), *p.communicate()) for name, p in (("b", b), ("c", c))}
        results["a"] = (a.wait(timeout=600), *a.communicate())
    finally:
        for p in (a,):
            if p.poll() is None:
                p.kill()
    return out, a.pid, results


def test_a_second_writer_is_refused_naming_the_first(two_writers):
    out, pid_a, results = two_writers
    rc_a, out_a, err_a = results["a"]
    assert rc_a == 0, err_a
    assert "12 chunks fitted in this run" in out_a
    for name in ("b", "c"):
        rc, _, err = results[name]
        assert rc == 1, err
        assert f"store '{out}' is being written by sheap-dask fit into this store (pid {pid_a} on host " in err, err
    fits = xr.open_zarr(out)
    assert json.loads(fits.attrs["sheap_options"])["num_steps"] != 30  # A's options, not B's
    assert sd.store.store_progress(out).complete and not (out / LOCK_NAME).exists()


def test_ctrl_c_kill_and_resume_give_the_uninterrupted_store(spectra, two_writers, tmp_path):
    reference = xr.open_zarr(two_writers[0]).compute()
    out = tmp_path / "fits.zarr"
    # Ctrl-C in a terminal: SIGINT to the whole process group (client, nannies' workers)
    first = _fit(spectra, out)
    _wait(lambda: _done(out) >= 1, first)
    os.killpg(first.pid, signal.SIGINT)
    stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 130, stderr
    assert stderr.strip() == INTERRUPTED, stderr  # the one documented message, nothing else
    assert not (out / LOCK_NAME).exists()
    done_after_interrupt = _done(out)
    assert 1 <= done_after_interrupt < 12
    # SIGTERM to the client alone (kill, a deleted Kubernetes pod): the same clean stop
    terminated = _fit(spectra, out)
    _wait(lambda: _done(out) >= done_after_interrupt + 1, terminated)
    terminated.send_signal(signal.SIGTERM)
    stdout, stderr = terminated.communicate(timeout=120)
    assert terminated.returncode == 130 and stderr.strip() == INTERRUPTED, stderr
    assert not (out / LOCK_NAME).exists()
    done_after_term = _done(out)
    # the client killed outright: its lock stays behind
    second = _fit(spectra, out)
    _wait(lambda: _done(out) >= done_after_term + 1, second)
    second.send_signal(signal.SIGKILL)
    second.wait(timeout=60)
    assert (out / LOCK_NAME).exists()
    # the next run on this host breaks the dead process's lock and finishes the store
    third = _fit(spectra, out)
    stdout, stderr = third.communicate(timeout=600)
    assert third.returncode == 0, stderr
    assert f"pid {second.pid} on host" in stderr and "no longer running on this host" in stderr
    assert "chunks fitted in this run" in stdout and "Traceback" not in stderr
    xr.testing.assert_identical(xr.open_zarr(out).compute(), reference)
