"""The chunk layer: numpy in, numpy out, no cluster."""

from __future__ import annotations

import numpy as np
import pytest
from datasets import gauss_dataset, gauss_model
from problems import gauss_slope
from scipy.optimize import curve_fit

import sheap_dask as sd
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


@pytest.mark.parametrize("slots", [0, 3], ids=["one_loop", "lanes"])
def test_restarts_rescue_fits_stuck_at_a_bound(data, monkeypatch, slots):
    """A fit LM drove onto a bound (flux at 0, centre at its limit) is re-fitted from its
    initial values, in groups of the compiled shape even for a short last chunk."""
    from sheap_dask import batch

    wl, flux, ivar, _ = data
    good = np.setdiff1d(np.arange(16), [1, 2, 3])
    flux, ivar = flux[good], ivar[good]
    model = gauss_model()
    opts = ChunkOptions(method="lm", num_steps=100, dtype="float64", fallback="none", restarts=True, slots=slots)
    reference = fit_chunk(model, wl, flux, ivar, options=opts, pad_to=13)
    assert np.all(reference["status"] == Status.CONVERGED)

    solve = batch.batched_solve

    def stuck(compiled, chunk_, start, take, n_active):  # spectra end on bounds, as in a local minimum
        solved = solve(compiled, chunk_, start, take, n_active)
        if n_active >= 11:  # the first solve of the whole chunk, not the restarts
            solved["params"][[0, 2, 6], 0] = 1e-12  # amp at its lower bound 0
            solved["params"][[4, 5], :2] = [1e-12, 4980.0 + 1e-9]  # amp and centre on bounds
        return solved

    stuck_rows = [0, 2, 4, 5, 6]  # 10 restarts: more than one group of 8; a minority of the chunk
    assert len(flux) == 13
    monkeypatch.setattr(batch, "batched_solve", stuck)
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
    from sheap_dask.batch import ChunkArrays as _Chunk
    from sheap_dask.rescue import fallback_candidates as _fallback_candidates
    from sheap_dask.compiled import get_compiled

    wl, flux, ivar, _ = data
    good = np.setdiff1d(np.arange(16), [1, 2, 3])
    opts = ChunkOptions(method="lm", num_steps=100, dtype="float64", fallback="none", pinned_fraction=0.01).resolved()
    out = fit_chunk(gauss_model(), wl, flux[good], ivar[good], options=opts)
    compiled = get_compiled(gauss_model(), opts)
    bounds = _Chunk(lower=np.tile(compiled.lower, (good.size, 1)), upper=np.tile(compiled.upper, (good.size, 1)))
    ok = np.ones(good.size, dtype=bool)
    assert _fallback_candidates(out, ok, compiled, bounds, opts).size == 0
    out["params"][4, 0] = 1e-9  # amp on its bound 0
    out["params"][6, 2] = 29.99  # sigma within 1% of its range from 30
    np.testing.assert_array_equal(_fallback_candidates(out, ok, compiled, bounds, opts), [4, 6])


def test_lm_lanes_match_one_vmapped_loop(data):
    wl, flux, ivar, _ = data
    model = gauss_model()
    one_loop = fit_chunk(model, wl, flux, ivar, options=ChunkOptions(method="lm", num_steps=100, dtype="float64", slots=0), pad_to=16)
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


def _troughs(flux, ivar, rows, depth=20.0, width=4, start=20):
    """Plant narrow absorption troughs ``depth`` sigma deep in the continuum of ``rows``."""
    flux = flux.copy()
    sigma = 1.0 / np.sqrt(ivar[rows, start : start + width])
    flux[rows, start : start + width] -= depth * sigma
    return flux


def test_absorbers_are_masked_and_the_fallback_keeps_the_robust_fit(data):
    from sheap_dask.loss import robust_rho
    from sheap_dask.quality import Quality

    wl, flux, ivar, _ = data
    good = np.setdiff1d(np.arange(16), [1, 2, 3])
    flux, ivar = flux[good], ivar[good]
    model = gauss_model()
    clean = fit_chunk(model, wl, flux, ivar, options=LM)
    planted = [0, 3, 7]
    dirty = _troughs(flux, ivar, planted)
    masked = fit_chunk(model, wl, dirty, ivar, options=LM)
    assert np.all(masked["n_masked"][planted] >= 4) and np.all(masked["n_masked"][np.setdiff1d(np.arange(13), planted)] == 0)
    assert np.all(masked["quality"][planted] & Quality.ABSORBERS_MASKED)
    within = np.abs(masked["params"] - clean["params"]) < 0.5 * clean["params_err"]
    assert within[planted].all()

    # without the rejection, the fallback (which the troughs' chi-square sends them to)
    # minimises the robust objective of the batch too: it keeps the robust fit, which the
    # troughs pull far less than a chi-square fit
    no_rejection = dict(method="lm", num_steps=100, dtype="float64", absorber_iterations=0)
    robust = fit_chunk(model, wl, dirty, ivar, options=ChunkOptions(fallback="none", **no_rejection))
    kept = fit_chunk(model, wl, dirty, ivar, options=ChunkOptions(fallback="slsqp", fallback_outliers=True, **no_rejection))
    least_squares = fit_chunk(model, wl, dirty, ivar, options=ChunkOptions(fallback="none", loss_kind="chi2", **no_rejection))
    assert np.all(kept["loss"] <= robust["loss"] * (1 + 1e-9))
    assert np.all(np.abs(kept["params"] - robust["params"]) < 0.1 * clean["params_err"])
    c0 = model.param_names.index("c0")
    pull = lambda fit: np.abs(fit["params"][planted, c0] - clean["params"][planted, c0])  # noqa: E731
    assert np.all(pull(kept) < 0.5 * pull(least_squares))
    # `loss` is the robust objective (log-cosh with its scale), not the chi-square
    r = (np.stack([np.asarray(model.func(wl, p)) for p in kept["params"]]) - dirty) * np.sqrt(ivar)
    objective = 2.0 * np.asarray(robust_rho(r, 3.0)).sum(axis=1)
    np.testing.assert_allclose(kept["loss"], objective, rtol=1e-4)  # the fit sees the data to 20 bits
    assert np.all(kept["chi2"][planted] > kept["loss"][planted])


def test_errors_use_irls_weights_and_a_degenerate_direction_nans_only_its_parameters(data):
    import jax
    import jax.numpy as jnp

    from sheap_dask.loss import irls_weight
    from sheap_dask.quality import Quality

    wl, flux, ivar, _ = data
    model = gauss_model()
    dirty = _troughs(flux[4:6], ivar[4:6], [0, 1], depth=6.0)
    out = fit_chunk(model, wl, dirty, ivar[4:6], options=ChunkOptions(method="lm", num_steps=100, dtype="float64", absorber_iterations=0))
    for i in range(2):
        err = 1.0 / np.sqrt(ivar[4 + i])
        resid = lambda p: (model.func(jnp.asarray(wl), p) - dirty[i]) / err  # noqa: E731
        p = jnp.asarray(out["params"][i])
        J = np.asarray(jax.jacfwd(resid)(p))
        w = np.asarray(irls_weight(resid(p) / 3.0))
        expected = np.sqrt(np.diag(np.linalg.inv((J * w[:, None]).T @ J)))
        np.testing.assert_allclose(out["params_err"][i], expected, rtol=1e-5)

    # a line whose flux is 0 (here fixed there): its centre and width are undetermined and get
    # NaN errors; the continuum keeps finite errors in the same row
    import sheap_dask as sd
    from problems import gauss_slope_func

    params = (sd.Parameters().add("amp", 0.0, fixed=True).add("center", 5000.0, min=4980.0, max=5020.0)
              .add("sigma", 6.0, min=1.0, max=30.0).add("c0", 0.5).add("c1", 0.0, min=-5.0, max=5.0))
    no_line = sd.Model(gauss_slope_func, params, name="no_line")
    continuum = 1.0 + 0.3 * (wl - 5000.0) / 100.0
    flat = continuum[None] + 0.1 * np.random.default_rng(5).standard_normal((2, wl.size))
    out = fit_chunk(no_line, wl, flat, np.full_like(flat, 100.0), options=ChunkOptions(method="lm", num_steps=100, dtype="float64", fallback="none"))
    err = dict(zip(no_line.param_names, out["params_err"][0]))
    assert np.isnan(err["center"]) and np.isnan(err["sigma"]) and err["amp"] == 0.0
    assert np.isfinite(err["c0"]) and np.isfinite(err["c1"]) and 0 < err["c0"] < 0.05
    assert np.all(out["quality"] & Quality.ERRORS_UNDEFINED)
    # a parameter ending on its bound is flagged, per parameter and in the bitmask
    line = fit_chunk(model, wl, flat, np.full_like(flat, 100.0), options=ChunkOptions(method="lm", num_steps=100, dtype="float64", fallback="none"))
    pinned = line["at_bound"].any(axis=1)
    np.testing.assert_array_equal(pinned, (line["quality"] & Quality.PARAM_AT_BOUND) > 0)
    # ... except a flux at a zero lower bound (an absent line): at_bound records it, the bit does not
    absent_params = (sd.Parameters().add("amp", 1.0, min=0.0).add("center", 5000.0, fixed=True)
                     .add("sigma", 6.0, fixed=True).add("c0", 0.5).add("c1", 0.0, min=-5.0, max=5.0))
    absent = sd.Model(gauss_slope_func, absent_params, name="absent_line", flux_params=("amp",))
    dip = flat - 0.3 * (np.abs(wl - 5000.0) < 15.0)  # the data pull the line's flux below zero
    out = fit_chunk(absent, wl, dip, np.full_like(flat, 100.0),
                    options=ChunkOptions(method="lm", num_steps=100, dtype="float64", fallback="none", absorber_iterations=0))
    assert out["at_bound"][:, 0].all() and not out["at_bound"][:, 3:].any()
    assert not np.any(out["quality"] & Quality.PARAM_AT_BOUND)


def test_absent_component_parameters_are_not_quality_caveats():
    """A component whose fluxes all rest at zero is absent: its shape parameters may sit at a
    bound or have undefined errors without raising a quality bit; a present one still does."""
    from types import SimpleNamespace

    from sheap_dask.outcome import absent_params

    names = ["host_w1", "host_w2", "host_sigma", "line_flux", "line_fwhm", "slope"]
    compiled = SimpleNamespace(
        names=names, flux_mask=np.array([True, True, False, True, False, False]),
        model=SimpleNamespace(metadata={"components": {"host": {"params": names[:3]}, "line": {"params": names[3:5]}}}),
    )
    lower = np.array([[0.0, 0.0, 0.0, 0.0, 100.0, -5.0]] * 3)
    upper = np.array([[1e3, 1e3, 500.0, 1e3, 2e4, 5.0]] * 3)
    params = np.array([
        [0.0, 0.0, 0.0, 0.0, 2e4, 0.0],     # host and line absent: everything of theirs is excused
        [5.0, 0.0, 0.0, 0.0, 100.0, 5.0],   # host present (sigma at 0 counts), line absent, slope at bound
        [0.0, 0.0, 500.0, 10.0, 2e4, 0.0],  # host absent, line present at its width bound
    ])
    at_bound = np.array([[1, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1], [1, 1, 1, 0, 1, 0]], dtype=bool)
    absent = absent_params(params, at_bound, compiled, SimpleNamespace(lower=lower, upper=upper))
    np.testing.assert_array_equal(absent, [[1, 1, 1, 1, 1, 0], [0, 1, 0, 1, 1, 0], [1, 1, 1, 0, 0, 0]])
    np.testing.assert_array_equal((at_bound & ~absent).any(axis=1), [False, True, True])


def test_unused_gaussian_of_a_line_is_held_out_of_the_errors():
    """A two-Gaussian line whose data need one Gaussian: the unused one rests at zero flux
    with its shape anywhere. The errors of the line are those of the Gaussian it uses (equal
    to a one-Gaussian fit's), not inflated by the unused one's free shape; the unused
    Gaussian's errors are NaN. A line with no flux at all keeps a finite flux error (its
    upper limit)."""
    m = sd.models
    wl = np.linspace(4700.0, 5000.0, 600)
    rng = np.random.default_rng(11)
    true = m.compose(m.powerlaw(ref_wavelength=4850.0), m.line("hb_broad1", 4862.68, line_name="hb_broad"))
    truth = np.array([10.0, -1.5, 400.0, 0.0, 4000.0])
    clean = np.asarray(true.func(wl, truth))
    # a dip where the second Gaussian may sit (-3000 to -2000 km/s) pulls its flux onto the zero bound
    flux = clean - 1.0 * np.exp(-0.5 * ((wl - 4822.0) / 15.0) ** 2) + 0.1 * rng.standard_normal((3, wl.size))
    ivar = np.full_like(flux, 100.0)
    opts = ChunkOptions(method="lm", num_steps=300, dtype="float64", fallback="none", absorber_iterations=0, restarts=False)
    two = m.compose(m.powerlaw(ref_wavelength=4850.0), m.line("hb_broad1", 4862.68, line_name="hb_broad"),
                    m.line("hb_broad2", 4862.68, line_name="hb_broad", shift=(-2500.0, -3000.0, -2000.0), fwhm=(2000.0, 1000.0, 3000.0)))
    start = np.tile([10.0, -1.5, 400.0, 0.0, 4000.0, 1.0, -2500.0, 2000.0], (3, 1))
    out = fit_chunk(two, wl, flux, ivar, init=start, options=opts)
    names = two.param_names
    assert out["at_bound"][:, names.index("hb_broad2_flux")].all(), out["params"]
    one = fit_chunk(true, wl, flux, ivar, init=start[:, :5], options=opts)
    for k, name in enumerate(true.param_names):
        np.testing.assert_allclose(out["params"][:, names.index(name)], one["params"][:, k], rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(out["params_err"][:, names.index(name)], one["params_err"][:, k], rtol=0.02)
    assert np.isnan(out["params_err"][:, names.index("hb_broad2_flux")]).all()
    np.testing.assert_allclose(out["line_flux_err"][:, 0], one["params_err"][:, names.index("hb_broad1_flux")], rtol=0.02)
    assert out["line_detected"][:, 0].all()
    # nothing there at all: undetected, with a finite flux error for its upper limit
    empty = fit_chunk(two, wl, np.tile(clean - np.asarray(true.func(wl, np.array([0.0, 0.0, 400.0, 0.0, 4000.0]))), (3, 1))
                      - 1.5 * np.exp(-0.5 * ((wl - 4862.0) / 30.0) ** 2) + 0.1 * rng.standard_normal((3, wl.size)),
                      ivar, init=start, options=opts)
    assert not empty["line_detected"][:, 0].any()
    assert np.isfinite(empty["line_flux_err"][:, 0]).all() and (empty["line_flux_err"][:, 0] > 0).all()


@pytest.mark.slow
def test_staged_line_errors_include_the_continuum_uncertainty(monkeypatch):
    """The lines of a staged fit are measured on a continuum that is itself uncertain: the
    reported broad H-beta flux error matches the scatter of the flux over 60 noise
    realizations of one spectrum (within 25%); without the continuum's share (the lines'
    covariance alone) it falls short by ~30%."""
    import sheap_dask.chunk as chunk_module

    ds = sd.synthetic.synthetic_spectra(1, seed=7, masked_fraction=0.0, n_all_nan=0)
    model = sd.models.region("hbeta", host=False)
    wl = ds.wavelength.values
    clean = np.asarray(model.func(wl, ds.true_params.values[0]))
    ivar = np.broadcast_to(ds.ivar.values[0], (60, wl.size)).copy()
    flux = clean[None] + np.random.default_rng(1).standard_normal(ivar.shape) / np.sqrt(ivar)
    k = list(model.metadata["lines"]).index("hbeta_broad")
    out = fit_chunk(model, wl, flux, ivar)
    scatter = np.std(out["line_flux"][:, k])
    reported = np.median(out["line_flux_err"][:, k])
    assert 0.75 < reported / scatter < 1.25, (reported, scatter)
    monkeypatch.setattr(chunk_module, "_finish_staged_fit", lambda *args, **kwargs: None)
    alone = np.median(fit_chunk(model, wl, flux, ivar)["line_flux_err"][:, k])
    assert alone < 0.85 * scatter, (alone, scatter)
