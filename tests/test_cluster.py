"""fit_dataset on real Dask clusters: LocalCluster, the `dask scheduler`/`dask worker` commands,
a worker killed mid-fit, and a client interrupted and resumed."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import dask
import numpy as np
import pytest
import xarray as xr
import zarr
from datasets import FAST, gauss_dataset, gauss_model

import sheap_dask as sd
from sheap_dask.chunk import compile_stats
from sheap_dask.status import Status

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

TESTS = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def ds():
    return gauss_dataset(32, chunk=8)


@pytest.fixture(scope="module")
def reference(ds):
    with dask.config.set(scheduler="synchronous"):
        return sd.fit_dataset(ds, gauss_model(), **FAST).compute()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def test_local_cluster_matches_synchronous(ds, reference):
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") as cluster, Client(cluster) as client:
        fits = sd.fit_dataset(ds, gauss_model(), client=client, **FAST).compute()
        # One program per worker (no straggler/restart/fallback shapes): after the first
        # chunk on a worker, fitting more spectra compiles nothing.
        single = dict(method="lm", num_steps=100, progress=False, fallback="none")
        with dask.config.set({"sheap_dask.fit.lm_slots": 0, "sheap_dask.fit.lm_restarts": False}):
            sd.fit_dataset(ds, gauss_model(), client=client, **single).compute()
            stats = client.run(compile_stats)
            sd.fit_dataset(gauss_dataset(64, chunk=8, seed=9), gauss_model(), client=client, **single).compute()
            again = client.run(compile_stats)
    xr.testing.assert_allclose(fits.params, reference.params, rtol=1e-9)
    np.testing.assert_array_equal(fits.status.values, reference.status.values)
    for worker, worker_stats in stats.items():
        assert worker_stats["solver_builds"] <= 2  # the default options and `single`
        assert again[worker]["traces"] == worker_stats["traces"]
        assert again[worker]["compiling_chunks"] == worker_stats["compiling_chunks"]
        assert again[worker]["chunks"] > worker_stats["chunks"] or worker_stats["chunks"] == 0


def test_dask_scheduler_and_worker_commands(ds, reference, tmp_path):
    from distributed import Client

    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    # The workers unpickle the test model, defined in tests/: as a user's workers import theirs.
    env = {**os.environ, "DASK_DISTRIBUTED__WORKER__DAEMON": "False", "PYTHONPATH": str(TESTS)}
    procs = [
        subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port), "--dashboard-address", ":0"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ]
    try:
        procs += [
            subprocess.Popen([str(BIN / "dask"), "worker", address, "--nthreads", "1", "--name", f"w{i}", "--local-directory", str(tmp_path / f"w{i}")], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for i in range(2)
        ]
        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
            # Same store flow as `sheap-dask fit`: stream into zarr, then read back.
            fits = sd.fit_dataset(ds, gauss_model(), client=client, store=str(tmp_path / "fits.zarr"), **FAST).compute()
    finally:
        _stop(procs)
    xr.testing.assert_allclose(fits.params, reference.params, rtol=1e-9)
    np.testing.assert_array_equal(fits.status.values, reference.status.values)


def test_worker_killed_mid_fit_loses_nothing(tmp_path):
    from distributed import Client, LocalCluster

    ds = gauss_dataset(96, chunk=8, seed=3)
    slow = dict(method="adam", num_steps=1500, progress=False, fallback="none")  # ~1 s per chunk
    store = str(tmp_path / "fits.zarr")
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") as cluster, Client(cluster) as client:
        pids = list(client.run(os.getpid).values())
        errors = []

        def run():
            try:
                sd.fit_dataset(ds, gauss_model(), client=client, store=store, **slow)
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)

        thread = threading.Thread(target=run)
        thread.start()
        deadline = time.time() + 240
        while time.time() < deadline:
            try:
                if zarr.open_array(store, path="sheap_progress/done", mode="r")[:].sum() >= 2:
                    break
            except Exception:
                pass
            time.sleep(0.2)
        os.kill(pids[0], signal.SIGKILL)  # the nanny restarts it; its tasks are rescheduled
        thread.join(timeout=600)
        assert not errors, errors
    done = zarr.open_array(store, path="sheap_progress/done", mode="r")[:]
    assert done.all()
    fits = xr.open_zarr(store).compute()
    with dask.config.set(scheduler="synchronous"):
        ref = sd.fit_dataset(ds, gauss_model(), **slow).compute()
    np.testing.assert_array_equal(fits.status.values, ref.status.values)
    xr.testing.assert_allclose(fits.params, ref.params, rtol=1e-7)
    assert fits.sizes["spectrum"] == 96 and np.all(np.isfinite(fits.params.values[fits.status.isin([0, 1]).values]))


def test_interrupted_client_resumes(tmp_path, ds):
    """Ctrl-C on the client after a few chunks; the re-run fits only the missing chunks."""
    big = gauss_dataset(64, chunk=8, seed=5)
    inp = tmp_path / "in.zarr"
    big.to_zarr(inp)
    store = tmp_path / "fits.zarr"
    script = textwrap.dedent(
        f"""
        import sys, time, dask
        sys.path.insert(0, {str(TESTS)!r})
        from datasets import gauss_model
        import sheap_dask as sd
        import sheap_dask.chunk
        fit_chunk = sheap_dask.chunk.fit_chunk

        def slow_fit_chunk(*args, **kwargs):  # a chunk outlasts the test's 0.1 s poll: the interrupt lands mid-run
            out = fit_chunk(*args, **kwargs)
            time.sleep(1.0)
            return out

        sheap_dask.chunk.fit_chunk = slow_fit_chunk  # the store's task imports it from there
        with dask.config.set(scheduler="synchronous"):
            sd.fit_dataset({str(inp)!r}, gauss_model(), store={str(store)!r}, method="adam", num_steps=1500, fallback="none", progress=False)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            try:
                if zarr.open_array(str(store), path="sheap_progress/done", mode="r")[:].sum() >= 2:
                    break
            except Exception:
                pass
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    done_before = int(zarr.open_array(str(store), path="sheap_progress/done", mode="r")[:].sum())
    assert 2 <= done_before < 8
    with dask.config.set(scheduler="synchronous"):
        resumed = sd.fit_dataset(str(inp), gauss_model(), store=str(store), method="adam", num_steps=1500, fallback="none", progress=False)
        assert resumed.attrs["sheap_chunks_fitted"] == 8 - done_before
        ref = sd.fit_dataset(big, gauss_model(), method="adam", num_steps=1500, fallback="none", progress=False).compute()
    resumed = resumed.compute()
    np.testing.assert_array_equal(resumed.status.values, ref.status.values)
    xr.testing.assert_allclose(resumed.params, ref.params, rtol=1e-9)
    assert int((resumed.status == Status.NO_DATA).sum()) == 2
