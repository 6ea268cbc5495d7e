"""The ``sheap-dask`` command line: demo, fit (with resume), info, ingest, errors."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import xarray as xr

import sheap_dask as sd
from sheap_dask import cli
from sheap_dask.cli import main

BIN = Path(sys.executable).parent


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert sd.__version__ in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.cluster
def test_demo_runs_on_a_fresh_local_cluster(tmp_path):
    """The README's first command, as a user runs it (console script, own LocalCluster)."""
    proc = subprocess.run(
        [str(BIN / "sheap-dask"), "demo", "--n", "24", "--chunk", "12", "--store", str(tmp_path / "demo.zarr"), "--no-progress"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "fitted 24 spectra" in out and "spectra/s" in out
    assert "status counts:" in out and "converged" in out
    assert "median reduced chi-square" in out and "oiii5007_flux" in out
    fits = xr.open_zarr(tmp_path / "demo.zarr")
    assert fits.sizes["spectrum"] == 24 and int(fits.status.isin([0, 1]).sum()) >= 23


def test_fit_resume_and_info(tmp_path, synchronous, capsys):
    inp = tmp_path / "in.zarr"
    sd.io.synthetic_spectra(16, seed=4).chunk({"spectrum": 8}).to_zarr(inp)
    out = tmp_path / "out.zarr"
    assert main(["fit", str(inp), str(out), "--model", "hbeta", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "16 spectra, 2 chunks fitted in this run" in text
    assert main(["fit", str(inp), str(out), "--model", "hbeta", "--no-progress"]) == 0
    assert "0 chunks fitted in this run" in capsys.readouterr().out
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "16 spectra" in info and "model: hbeta" in info and "converged" in info and "method=lm" in info
    # A different option cannot resume into the same store.
    assert main(["fit", str(inp), str(out), "--model", "hbeta", "--num-steps", "7", "--no-progress"]) == 1
    assert "cannot resume into store" in capsys.readouterr().err


def test_fit_missing_input_is_a_clean_error(tmp_path, synchronous, capsys):
    assert main(["fit", str(tmp_path / "nope.zarr"), str(tmp_path / "out.zarr")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ds=") and "no zarr store there" in err


def test_ingest(tmp_path, shared_spectra, capsys):
    files = sorted((shared_spectra / "pyqsofit_rm017").glob("*.fits"))[:3]
    out = tmp_path / "rm017.zarr"
    assert main(["ingest", *map(str, files), str(out), "--chunk", "2", "--no-progress"]) == 0
    assert f"{out}: 3 spectra" in capsys.readouterr().out
    ds = xr.open_zarr(out)
    assert ds.sizes["spectrum"] == 3 and "redshift" in ds.coords


def test_an_interrupt_quiets_the_cluster_loggers_before_distributed_sees_it(caplog):
    # distributed's sync() cancels its call on the event loop thread as the interrupt passes; when
    # the interrupt lands before the call started, that cancel logs a NameError traceback
    # (distributed 2026.8) before the CLI's except clause runs: the handler must quiet it first
    logging.getLogger("tornado.application").setLevel(logging.ERROR)  # as distributed's logging config sets it
    loggers = [logging.getLogger(name) for name in ["distributed", "tornado", "asyncio", *logging.root.manager.loggerDict]
               if name.split(".")[0] in ("distributed", "tornado", "asyncio")]
    levels = [logger.level for logger in loggers]
    previous = cli._interrupt_quietly()
    try:
        assert set(previous) >= {signal.SIGTERM}
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)
        logging.getLogger("tornado.application").error("Exception in callback functools.partial(<function sync.<locals>.cancel>)")
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
    assert not [r for r in caplog.records if r.name.startswith("tornado")]
    assert signal.getsignal(signal.SIGTERM) is previous[signal.SIGTERM]
