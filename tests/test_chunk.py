"""The chunk layer: numpy in, numpy out, no cluster."""

from __future__ import annotations

import numpy as np
import pytest
from datasets import gauss_dataset, gauss_model
from problems import gauss_slope
from scipy.optimize import curve_fit

from sheap_dask.chunk import ChunkOptions, compile_stats, fit_chunk
from sheap_dask.errors import InputDataError, OptionError
from sheap_dask.status import Status

LM = ChunkOptions(method="lm", num_steps=100, dtype="float64")


@pytest.fixture(scope="module")
def data():
    ds = gauss_dataset(16, chunk=None)
    return ds.wavelength.values, ds.flux.values, ds.ivar.values, ds.true_params.values


def test_fit_chunk_recovers_truth_and_flags_bad_spectra(data):
    wl, flux, ivar, truth = data
    out = fit_chunk(gauss_model(), wl, flux, ivar, options=LM)
    status = out["status"]
    assert status[1] == Status.NO_DATA and status[2] == Status.NO_DATA  # all-NaN, all-zero ivar
    good = np.setdiff1d(np.arange(16), [1, 2])
    assert np.all(np.isin(status[good], [Status.CONVERGED, Status.CONVERGED_AFTER_FALLBACK]))
    assert np.all(np.isnan(out["params"][[1, 2]])) and np.all(np.isnan(out["chi2"][[1, 2]]))
    # The spectrum with one infinite pixel is fitted without it.
    assert out["dof"][3] == wl.size - 1 - 5 and out["dof"][0] == wl.size - 5
    pulls = (out["params"][good] - truth[good]) / out["params_err"][good]
    assert np.all(np.abs(pulls) < 5)
    assert 0.6 < np.median(out["redchi2"][good]) < 1.5
    assert set(out["method"][good]) <= {"lm", "slsqp"}
    assert out["params"].dtype == np.float64 and out["status"].dtype == np.int8


def test_errors_match_curve_fit_covariance(data):
    wl, flux, ivar, _ = data
    out = fit_chunk(gauss_model(), wl, flux[:1], ivar[:1], options=ChunkOptions(method="lm", num_steps=100, loss_kind="chi2", dtype="float64"))
    prob = gauss_slope()
    f = lambda x, *p: np.asarray(prob.func(x, np.array(p)))  # noqa: E731
    popt, pcov = curve_fit(f, wl, flux[0], p0=out["params"][0], sigma=ivar[0] ** -0.5, absolute_sigma=True)
    np.testing.assert_allclose(out["params"][0], popt, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["params_err"][0], np.sqrt(np.diag(pcov)), rtol=1e-3)
    np.testing.assert_allclose(out["chi2"][0], np.sum((f(wl, *popt) - flux[0]) ** 2 * ivar[0]), rtol=1e-6)


def test_short_chunk_is_padded_not_recompiled(data):
    wl, flux, ivar, _ = data
    model = gauss_model()
    opts = LM
    fit_chunk(model, wl, flux[:8], ivar[:8], options=opts, pad_to=8)
    before = compile_stats()
    a = fit_chunk(model, wl, flux[8:16], ivar[8:16], options=opts, pad_to=8)
    b = fit_chunk(model, wl, flux[8:13], ivar[8:13], options=opts, pad_to=8)  # short last chunk
    after = compile_stats()
    assert (after["traces"], after["solver_builds"]) == (before["traces"], before["solver_builds"])
    assert after["chunks"] == before["chunks"] + 2 and after["compiling_chunks"] == before["compiling_chunks"]
    np.testing.assert_allclose(a["params"][:5], b["params"], rtol=1e-10)


@pytest.mark.parametrize("slots", [0, 3], ids=["two_stage", "lanes"])
def test_restarts_rescue_fits_stuck_at_a_bound(data, monkeypatch, slots):
    """A fit LM drove onto a bound (flux at 0, centre at its limit) is re-fitted from its
    initial values, in groups of the compiled shape even for a short last chunk."""
    from sheap_dask import chunk

    wl, flux, ivar, _ = data
    good = np.setdiff1d(np.arange(16), [1, 2, 3])
    flux, ivar = flux[good], ivar[good]
    model = gauss_model()
    opts = ChunkOptions(method="lm", num_steps=100, dtype="float64", fallback="none", restarts=True, slots=slots)
    reference = fit_chunk(model, wl, flux, ivar, options=opts, pad_to=13)
    assert np.all(reference["status"] == Status.CONVERGED)

    solve = chunk._batched_solve

    def stuck(*args, **kwargs):  # spectra end on bounds, as in a local minimum
        solved = solve(*args, **kwargs)
        solved["params"][[0, 2, 6], 0] = 1e-12  # amp at its lower bound 0
        solved["params"][[4, 5], :2] = [1e-12, 4980.0 + 1e-9]  # amp and centre on bounds
        return solved

    stuck_rows = [0, 2, 4, 5, 6]  # 10 restarts: more than one group of 8; a minority of the chunk
    assert len(flux) == 13
    monkeypatch.setattr(chunk, "_batched_solve", stuck)
    before = compile_stats()
    out = fit_chunk(model, wl, flux, ivar, options=opts, pad_to=13)
    short = fit_chunk(model, wl, flux[:11], ivar[:11], options=opts, pad_to=13)  # a short last chunk
    after = compile_stats()
    # every restart and post-processing shape was compiled with the first chunk
    assert (after["traces"], after["compiling_chunks"]) == (before["traces"], before["compiling_chunks"])
    np.testing.assert_allclose(out["chi2"], reference["chi2"], rtol=1e-6)
    np.testing.assert_allclose(out["params"], reference["params"], rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(out["params_err"], reference["params_err"], rtol=1e-4)
    np.testing.assert_allclose(short["chi2"], reference["chi2"][:11], rtol=1e-6)

    no_restarts = ChunkOptions(method="lm", num_steps=100, dtype="float64", fallback="none", restarts=False, slots=slots)
    without = fit_chunk(model, wl, flux, ivar, options=no_restarts, pad_to=13)
    assert np.all(without["chi2"][stuck_rows] > 10 * reference["chi2"][stuck_rows])
    assert np.all(out["n_iter"][stuck_rows] > without["n_iter"][stuck_rows])


def test_fallback_pinned_rule_flags_only_parameters_at_a_bound(data):
    """fallback pinned_fraction: a parameter with one finite bound (amp >= 0) counts as pinned
    only near that bound, not always."""
    from sheap_dask.chunk import _fallback_candidates, _get_compiled

    wl, flux, ivar, _ = data
    good = np.setdiff1d(np.arange(16), [1, 2, 3])
    opts = ChunkOptions(method="lm", num_steps=100, dtype="float64", fallback="none", pinned_fraction=0.01).resolved()
    out = fit_chunk(gauss_model(), wl, flux[good], ivar[good], options=opts)
    compiled = _get_compiled(gauss_model(), opts)
    ok = np.ones(good.size, dtype=bool)
    assert _fallback_candidates(out, ok, compiled, opts).size == 0
    out["params"][4, 0] = 1e-9  # amp on its bound 0
    out["params"][6, 2] = 29.99  # sigma within 1% of its range from 30
    np.testing.assert_array_equal(_fallback_candidates(out, ok, compiled, opts), [4, 6])


def test_lm_lanes_match_one_vmapped_loop(data):
    wl, flux, ivar, _ = data
    model = gauss_model()
    one_loop = fit_chunk(model, wl, flux, ivar, options=ChunkOptions(method="lm", num_steps=100, dtype="float64", slots=0, stage_iter=0), pad_to=16)
    lanes = fit_chunk(model, wl, flux, ivar, options=ChunkOptions(method="lm", num_steps=100, dtype="float64", slots=3), pad_to=16)
    np.testing.assert_allclose(lanes["params"], one_loop["params"], rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(lanes["status"], one_loop["status"])
    np.testing.assert_array_equal(lanes["n_iter"], one_loop["n_iter"])
    with pytest.raises(OptionError, match="slots=-1"):
        fit_chunk(model, wl, flux, ivar, options=ChunkOptions(slots=-1))


def test_fallback_rescues_unconverged_spectra(data):
    wl, flux, ivar, truth = data
    # Two LM iterations cannot converge: every spectrum goes to SLSQP.
    out = fit_chunk(gauss_model(), wl, flux[4:8], ivar[4:8], options=ChunkOptions(method="lm", num_steps=2))
    assert np.all(out["status"] == Status.CONVERGED_AFTER_FALLBACK)
    assert np.all(out["method"] == "slsqp")
    np.testing.assert_allclose(out["params"], truth[4:8], rtol=0.2, atol=0.2)
    no_fallback = fit_chunk(gauss_model(), wl, flux[4:8], ivar[4:8], options=ChunkOptions(method="lm", num_steps=2, fallback="none"))
    assert np.all(no_fallback["status"] == Status.MAX_ITER)


def test_redshift_fits_in_rest_frame(data):
    wl, flux, ivar, truth = data
    z = np.array([0.5, 1.0])
    # Observed frame: wavelength stretched, flux density diluted by (1 + z).
    wl_obs = wl[None, :] * (1 + z[:, None])
    out = fit_chunk(gauss_model(), wl_obs, flux[[0, 4]] / (1 + z[:, None]), ivar[[0, 4]] * (1 + z[:, None]) ** 2, redshift=z, options=LM)
    ref = fit_chunk(gauss_model(), wl, flux[[0, 4]], ivar[[0, 4]], options=LM)
    np.testing.assert_allclose(out["params"], ref["params"], rtol=1e-6)
    bad_z = fit_chunk(gauss_model(), wl, flux[[0, 4]], ivar[[0, 4]], redshift=np.array([np.nan, 0.0]), options=LM)
    assert bad_z["status"][0] == Status.NO_DATA and bad_z["status"][1] == Status.CONVERGED


def test_init_overrides_start_and_nan_falls_back(data):
    wl, flux, ivar, truth = data
    init = np.full((2, 5), np.nan)
    init[0] = truth[0]
    out = fit_chunk(gauss_model(), wl, flux[[0, 4]], ivar[[0, 4]], init=init, options=LM)
    assert np.all(out["status"] == Status.CONVERGED)
    with pytest.raises(InputDataError, match=r"init has shape \(3, 5\); expected \(n_spectra, n_params\) = \(2, 5\)"):
        fit_chunk(gauss_model(), wl, flux[[0, 4]], ivar[[0, 4]], init=np.zeros((3, 5)), options=LM)


@pytest.mark.parametrize("method", ["adam", "lbfgs"])
def test_optax_methods_run_through_the_chunk_layer(data, method):
    wl, flux, ivar, truth = data
    out = fit_chunk(gauss_model(), wl, flux[4:6], ivar[4:6], options=ChunkOptions(method=method, num_steps=300, loss_kind="chi2"))
    assert np.all(np.isin(out["status"], [Status.CONVERGED, Status.CONVERGED_AFTER_FALLBACK, Status.MAX_ITER]))
    assert np.all(np.isfinite(out["params"]))
    assert set(out["method"]) <= {method, "slsqp"}


def test_float32_inputs(data):
    wl, flux, ivar, truth = data
    out = fit_chunk(gauss_model(), wl.astype(np.float32), flux[4:8].astype(np.float32), ivar[4:8].astype(np.float32), options=ChunkOptions(method="lm", num_steps=100, dtype="float32"))
    assert np.all(out["status"] == Status.CONVERGED)
    np.testing.assert_allclose(out["params"], truth[4:8], rtol=0.2, atol=0.2)


def test_bad_options_and_shapes(data):
    wl, flux, ivar, _ = data
    with pytest.raises(OptionError, match=r"method='newton' is not one of 'lm', 'adam', 'lbfgs'"):
        fit_chunk(gauss_model(), wl, flux, ivar, options=ChunkOptions(method="newton"))
    with pytest.raises(InputDataError, match=r"wavelength shape \(7,\) matches neither"):
        fit_chunk(gauss_model(), wl[:7], flux, ivar, options=LM)
