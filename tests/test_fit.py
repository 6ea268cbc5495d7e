"""fit_dataset: the Dataset layer, on the synchronous scheduler (cluster tests: test_cluster.py)."""

from __future__ import annotations

import json

import dask
import numpy as np
import pytest
import xarray as xr
from datasets import FAST, gauss_dataset, gauss_model

import sheap_dask as sd
from sheap_dask.errors import ClusterWarning, InputDataError, OptionError, ResumeMismatchError
from sheap_dask.status import Status


pytestmark = pytest.mark.usefixtures("synchronous")


@pytest.fixture(scope="module")
def ds():
    return gauss_dataset(24, chunk=8)


def test_result_follows_the_design_table(ds):
    fits = sd.fit_dataset(ds, gauss_model(), **FAST)
    assert set(fits.data_vars) == {"params", "params_err", "loss", "chi2", "dof", "redchi2", "status", "method", "n_iter",
                                   "quality", "at_bound", "n_masked", "flux_scale", "params_cov"}
    assert fits.params.dims == ("spectrum", "param") and fits.params_err.dims == ("spectrum", "param")
    for name in ("loss", "chi2", "dof", "redchi2", "status", "method", "n_iter"):
        assert fits[name].dims == ("spectrum",)
    assert fits.status.dtype == np.int8
    assert list(fits.status.attrs["flag_meanings"].split()) == [s.meaning for s in Status]
    assert list(fits.param.values) == gauss_model().param_names
    assert "param_min" in fits.coords and "param_max" in fits.coords
    np.testing.assert_array_equal(fits.objid.values, ds.objid.values)  # per-spectrum coords carried
    assert fits.chunks["spectrum"] == ds.chunks["spectrum"]
    assert json.loads(fits.attrs["sheap_options"])["method"] == "lm"
    assert fits.attrs["sheap_version"] == sd.__version__
    assert json.loads(fits.attrs["sheap_model"])["name"] == "gauss_slope"
    counts = fits.status.to_series().value_counts()
    assert counts[int(Status.NO_DATA)] == 2
    ok = fits.status.isin([0, 1])
    assert int(ok.sum()) == 22
    truth = ds.true_params.values[ok.values]
    np.testing.assert_allclose(fits.params.values[ok.values], truth, rtol=0.25, atol=0.3)


def test_lazy_with_client_nothing_computed_early(ds):
    from distributed import Client, get_task_stream

    with Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=":0") as client:
        # every task a worker runs is in the task stream: none may run before compute()
        with get_task_stream(client) as early:
            fits = sd.fit_dataset(ds, gauss_model(), client=client, **FAST)
            assert fits.params.chunks is not None
        assert early.data == []
        with get_task_stream(client) as later:
            local = fits.compute()
        assert len(later.data) > 0  # the check sees tasks when there are some
    ref = sd.fit_dataset(ds, gauss_model(), **FAST)
    xr.testing.assert_allclose(local.params, ref.params)


def test_small_or_paused_workers_are_reported():
    from sheap_dask.cluster import worker_problems as _worker_problems

    gib = 2**30
    fine = {"tcp://a": {"name": "w0", "memory_limit": 4 * gib, "status": "running"},
            "tcp://b": {"name": "w1", "memory_limit": 0, "status": "running"}}  # 0: no limit
    assert _worker_problems(fine) == []
    small, paused = _worker_problems({**fine, "tcp://c": {"name": "w2", "memory_limit": gib, "status": "paused"}})
    assert "1 of 3 workers" in small and "w2: 1.00 GiB" in small and "--memory-limit 2GiB" in small
    assert "w2" in paused and "paused" in paused
    with dask.config.set({"sheap_dask.worker.min_memory": "512MiB"}):
        (only_paused,) = _worker_problems({"tcp://c": {"name": "w2", "memory_limit": gib, "status": "paused"}})
    assert "paused" in only_paused


def test_fit_dataset_warns_about_small_workers(ds):
    from distributed import Client

    # Lazy: the warning comes before anything runs (a 1 GiB in-process worker may pause at once).
    with Client(processes=False, n_workers=1, threads_per_worker=1, memory_limit="1GiB", dashboard_address=":0") as client:
        with dask.config.set(scheduler=None), pytest.warns(ClusterWarning, match="memory limit below 2.00 GiB"):
            sd.fit_dataset(ds, gauss_model(), client=client, **FAST)


def test_zarr_round_trip_is_identical(ds, tmp_path):
    fits = sd.fit_dataset(ds, gauss_model(), **FAST)
    fits.to_zarr(tmp_path / "fits.zarr")
    back = xr.open_zarr(tmp_path / "fits.zarr").compute()
    xr.testing.assert_identical(back, fits.compute())


def test_store_streams_and_resumes(ds, tmp_path):
    store = str(tmp_path / "out.zarr")
    first = sd.fit_dataset(ds, gauss_model(), store=store, **FAST)
    assert first.attrs["sheap_chunks_fitted"] == 3
    again = sd.fit_dataset(ds, gauss_model(), store=store, **FAST)
    assert again.attrs["sheap_chunks_fitted"] == 0  # everything already done
    xr.testing.assert_identical(again.params, first.params)

    # Simulate an interruption after chunk 0: chunks 1 and 2 are not recorded as done.
    import zarr

    done = zarr.open_array(store, path="sheap_progress/done", mode="r+")
    done[1:] = 0
    resumed = sd.fit_dataset(ds, gauss_model(), store=store, **FAST)
    assert resumed.attrs["sheap_chunks_fitted"] == 2
    in_memory = sd.fit_dataset(ds, gauss_model(), **FAST).compute()
    xr.testing.assert_allclose(resumed.params.compute(), in_memory.params, rtol=1e-10)
    np.testing.assert_array_equal(resumed.status.values, in_memory.status.values)


def test_resume_refuses_a_different_fit(ds, tmp_path):
    store = str(tmp_path / "out.zarr")
    sd.fit_dataset(ds, gauss_model(), store=store, **FAST)
    with pytest.raises(ResumeMismatchError, match=r"option num_steps: store has 100, this fit uses 50"):
        sd.fit_dataset(ds, gauss_model(), store=store, **{**FAST, "num_steps": 50})
    fresh = sd.fit_dataset(ds, gauss_model(), store=store, resume=False, **{**FAST, "num_steps": 50})
    assert fresh.attrs["sheap_chunks_fitted"] == 3


def test_path_input_and_flux_err(ds, tmp_path):
    path = tmp_path / "in.zarr"
    ds.to_zarr(path)
    from_path = sd.fit_dataset(str(path), gauss_model(), **FAST)
    assert from_path.attrs["sheap_input"] == str(path)
    with np.errstate(divide="ignore"):
        err_ds = ds.assign(err=ds.ivar**-0.5).drop_vars("ivar")
    from_err = sd.fit_dataset(err_ds, gauss_model(), ivar=None, flux_err="err", **FAST)
    np.testing.assert_allclose(from_err.params.values, from_path.params.values, rtol=1e-8, equal_nan=True)


def test_init_dict_and_dataarray(ds):
    model = gauss_model()
    truth = ds.true_params
    by_array = sd.fit_dataset(ds, model, init=truth, **FAST)
    by_dict = sd.fit_dataset(ds, model, init={"amp": 5.0, "center": truth.sel(param="center")}, **FAST)
    ok = by_array.status.isin([0, 1]).values
    np.testing.assert_allclose(by_array.params.values[ok], by_dict.params.values[ok], rtol=1e-3, atol=1e-3)
    with pytest.raises(InputDataError, match=r"init has unknown parameter names \['width'\]"):
        sd.fit_dataset(ds, model, init={"width": 3.0}, **FAST)


def test_unchunked_input_is_chunked_and_wavelength_chunks_warn(ds):
    fits = sd.fit_dataset(ds.compute(), gauss_model(), chunk_size=10, **FAST)
    assert fits.chunks["spectrum"] == (10, 10, 4)
    with pytest.warns(UserWarning, match=r"chunked along 'wavelength' \(2 chunks\).*rechunked to one chunk"):
        sd.fit_dataset(ds.chunk({"wavelength": 60}), gauss_model(), **FAST)


def test_return_history(ds):
    fits = sd.fit_dataset(ds.isel(spectrum=slice(0, 8)), gauss_model(), return_history=True, **{**FAST, "num_steps": 30})
    assert fits.loss_history.dims == ("spectrum", "step") and fits.sizes["step"] == 30


@pytest.mark.parametrize(
    "mutate, kwargs, message",
    [
        (lambda d: d.drop_vars("flux"), {}, r"flux='flux' is not a variable of the Dataset"),
        (lambda d: d.drop_vars("ivar"), {}, r"ivar='ivar' is not a variable of the Dataset .* or flux_err='<name>'"),
        (lambda d: d.isel(wavelength=0), {}, r"flux 'flux' has dims \('spectrum',\); expected 2 dims"),
        (lambda d: d.assign_coords(wavelength=d.wavelength[::-1].values * 0 + 5000.0), {}, r"wavelength 'wavelength' is not strictly monotonic"),
        (lambda d: d.compute().assign(ivar=-d.ivar.compute()), {}, r"ivar 'ivar' has \d+ negative values"),
        (lambda d: d, {"dim": "object"}, r"expected 2 dims \('object', wavelength\)"),
        (lambda d: d, {"chunk_size": 0}, None),
        (lambda d: d, {"fallback_options": {"tolerance": 1}}, r"fallback_options has unknown keys \['tolerance'\]"),
        (lambda d: d, {"method": "newton"}, r"method='newton' is not one of"),
    ],
)
def test_bad_input_errors(ds, mutate, kwargs, message):
    bad = mutate(ds)
    if kwargs.get("chunk_size") == 0:
        with pytest.raises(OptionError, match=r"chunk_size=0 must be a positive integer"):
            sd.fit_dataset(bad.compute(), gauss_model(), **{**FAST, **kwargs})
        return
    with pytest.raises((InputDataError, OptionError), match=message):
        sd.fit_dataset(bad, gauss_model(), **{**FAST, **kwargs})


def test_wavelength_length_mismatch_and_model_type(ds):
    bad = ds.drop_vars("wavelength").assign_coords(wl=("pix", np.arange(5.0)))
    with pytest.raises(InputDataError, match=r"wavelength='wavelength' is not a coordinate/variable"):
        sd.fit_dataset(bad, gauss_model(), **FAST)
    with pytest.raises(InputDataError, match=r"model must be a sheap_dask.Model, got function"):
        sd.fit_dataset(ds, lambda x, p: x, **FAST)


def test_2d_wavelength_grid(ds):
    wl2d = np.broadcast_to(ds.wavelength.values, ds.flux.shape)
    het = ds.drop_vars("wavelength").assign(wl=(("spectrum", "wavelength"), wl2d))
    fits = sd.fit_dataset(het, gauss_model(), wavelength="wl", **FAST)
    ref = sd.fit_dataset(ds, gauss_model(), **FAST)
    np.testing.assert_allclose(fits.params.values, ref.params.values, rtol=1e-8, equal_nan=True)
