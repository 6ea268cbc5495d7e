"""Tests of the NLopt SLSQP fallback (sheap_dask/slsqp.py).

Known-answer problems (line, Gaussian on a slope, two-Gaussian blend, tied doublet) checked
against linear least squares and scipy (SLSQP, least_squares); errors against the analytic
covariance; bounds, rescaling of large chi-squares, chaining, verbosity, one compilation for
many spectra, and the wording of every bad-input error. The NaN strategy, the criterion and the
compiled-loss cache: test_slsqp_evaluator.py.
"""

from __future__ import annotations

import logging
import warnings

import jax
import jax.numpy as jnp
import nlopt
import numpy as np
import pytest
from scipy import optimize

from sheap_dask.errors import OptionError, ParameterSpecError
from sheap_dask.slsqp import SLSQP, FitResult, PushbackStrategy
from sheap_dask.status import Status

# ----------------------------------------------------------------------------------------
# Problems with a known answer (kept here: small, fixed seeds)
# ----------------------------------------------------------------------------------------
WAVE = np.linspace(4700.0, 5000.0, 300)
SIGMA = 0.5  # flux error of the small problems
BIG_SIGMA = 0.05  # raw chi-square ~1e7 at the start, gradients ~1e6: a real high-S/N spectrum


def gauss(x, amp, center, sigma):
    return amp * jnp.exp(-0.5 * ((x - center) / sigma) ** 2)


def gauss_slope(x, p):
    return gauss(x, p[0], p[1], p[2]) + p[3] + p[4] * (x - 4850.0) / 100.0


def blend(x, p):
    return gauss(x, p[0], p[1], p[2]) + gauss(x, p[3], p[4], p[5]) + p[6]


OIII_RATIO = 4958.911 / 5006.843


def doublet(x, p):
    """[OIII] 4959/5007: the 4959 line tied to 5007 (flux/2.98, same velocity width)."""
    return (gauss(x, p[0], p[1], p[2]) + gauss(x, p[0] / 2.98, p[1] * OIII_RATIO, p[2] * OIII_RATIO) + p[3])


def make_data(model, p_true, x, sigma=SIGMA, seed=0):
    rng = np.random.default_rng(seed)
    y = np.asarray(model(x, jnp.asarray(p_true))) + rng.normal(0.0, sigma, x.size)
    return y, np.full(x.size, sigma)


def chi2_loss(model):
    def loss(p, x, y, err):
        return jnp.sum(((model(x, p) - y) / err) ** 2)

    loss.errordef = 1.0
    return loss


GS_LOSS = chi2_loss(gauss_slope)
BLEND_LOSS = chi2_loss(blend)
DOUBLET_LOSS = chi2_loss(doublet)
GS_TRUE = np.array([50.0, 4861.0, 15.0, 20.0, -3.0])
GS_START = np.array([30.0, 4855.0, 25.0, 15.0, 0.0])


_LSQ_CACHE: dict = {}


def least_squares_ref(model, x, y, err, p0, lower=None, upper=None):
    """scipy least_squares to full precision, the reference minimum of the chi-square."""
    if model not in _LSQ_CACHE:  # compiled once per model: data are arguments
        resid = lambda p, x, y, err: (model(x, p) - y) / err  # noqa: E731
        _LSQ_CACHE[model] = (jax.jit(resid), jax.jit(jax.jacfwd(resid)))
    resid, jac = _LSQ_CACHE[model]
    res_fn = lambda p: np.asarray(resid(jnp.asarray(p), x, y, err))  # noqa: E731
    lo = -np.inf if lower is None else lower
    hi = np.inf if upper is None else upper
    r = optimize.least_squares(res_fn, p0, jac=lambda p: np.asarray(jac(jnp.asarray(p), x, y, err)), bounds=(lo, hi),
                               method="trf", x_scale="jac", xtol=1e-15, ftol=1e-15, gtol=1e-15, max_nfev=2000)
    assert r.success
    return r.x, np.linalg.inv(r.jac.T @ r.jac)


# ----------------------------------------------------------------------------------------
# Known answers
# ----------------------------------------------------------------------------------------
def test_line_matches_linear_least_squares_values_and_covariance():
    rng = np.random.default_rng(1)
    x = np.linspace(0.0, 10.0, 40)
    err = 0.3 + 0.1 * rng.random(x.size)
    y = 1.7 * x - 4.0 + rng.normal(0.0, err)
    A = np.stack([x, np.ones_like(x)], axis=1) / err[:, None]
    cov_ls = np.linalg.inv(A.T @ A)
    p_ls = cov_ls @ A.T @ (y / err)

    def chi2(p, x, y, err):
        return jnp.sum(((p[0] * x + p[1] - y) / err) ** 2)

    chi2.errordef = 1.0
    res = SLSQP(tol=1e-10).minimize(chi2, {"value": [0.0, 0.0], "name": ["slope", "intercept"]}, args=(x, y, err))
    assert res.converged and res.valid, res.message
    assert res.edm < 1e-10
    np.testing.assert_allclose(res.values, p_ls, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(res.covariance, cov_ls, rtol=1e-8)
    np.testing.assert_allclose(res.errors, np.sqrt(np.diag(cov_ls)), rtol=1e-8)
    assert res.params == {"slope": res.values[0], "intercept": res.values[1]}
    assert res.status is Status.CONVERGED

    # A negative log-likelihood (chi2 / 2, errordef 0.5) has the same covariance: cov = 2*errordef*H^-1.
    def nll(p, x, y, err):
        return 0.5 * chi2(p, x, y, err)

    nll.errordef = 0.5
    res_nll = SLSQP(tol=1e-10).minimize(nll, [0.0, 0.0], args=(x, y, err))
    np.testing.assert_allclose(res_nll.covariance, cov_ls, rtol=1e-8)
    np.testing.assert_allclose(res_nll.values, p_ls, rtol=1e-9, atol=1e-9)

    # Without errordef the loss counts as a chi-square (errordef 1).
    def plain(p, x, y, err):
        return chi2(p, x, y, err)

    res_plain = SLSQP(tol=1e-10).minimize(plain, [0.0, 0.0], args=(x, y, err))
    assert res_plain.errordef == 1.0
    np.testing.assert_allclose(res_plain.covariance, cov_ls, rtol=1e-8)


def test_gaussian_on_slope_large_chi2_matches_least_squares_and_scipy_slsqp():
    y, err = make_data(gauss_slope, GS_TRUE, WAVE, sigma=BIG_SIGMA)
    f0, g0 = SLSQP().create_evaluator(GS_LOSS, GS_START, args=(WAVE, y, err)).value_and_grad(GS_START)  # jitted, cached
    assert f0 > 1e5 and np.abs(g0).max() > 1e6  # the scale at which raw LD_SLSQP gives up
    lower = np.array([0.0, 4800.0, 2.0, -100.0, -100.0])
    upper = np.array([1e3, 4900.0, 100.0, 100.0, 100.0])
    res = SLSQP(tol=1e-8).minimize(GS_LOSS, {"value": GS_START, "lower": lower, "upper": upper}, args=(WAVE, y, err))
    assert res.converged and res.valid, res.message
    assert res.info["scale"] == pytest.approx(1.0 / f0)
    p_ref, cov_ref = least_squares_ref(gauss_slope, WAVE, y, err, GS_START)
    err_ref = np.sqrt(np.diag(cov_ref))
    np.testing.assert_allclose(res.values, p_ref, atol=1e-4 * err_ref.min() * 10, rtol=0)
    # errors come from the full Hessian; Gauss-Newton (J^T J) differs by the residual-curvature term
    np.testing.assert_allclose(res.errors, err_ref, rtol=1e-3)
    assert np.all(np.abs(res.values - GS_TRUE) < 5 * err_ref)  # and the truth is recovered

    # scipy's SLSQP on the same (rescaled, so that it too can run) objective and bounds
    s = 1.0 / f0
    fun = jax.jit(jax.value_and_grad(lambda p: s * GS_LOSS(p, WAVE, y, err)))
    sp = optimize.minimize(lambda p: tuple(np.asarray(v, float) for v in fun(jnp.asarray(p))), GS_START, jac=True,
                           method="SLSQP", bounds=list(zip(lower, upper)), options={"ftol": 1e-15, "maxiter": 2000})
    np.testing.assert_allclose(res.values, sp.x, atol=1e-3 * err_ref.min())
    assert res.fmin <= sp.fun / s * (1 + 1e-10)


def test_raw_nlopt_gives_up_on_the_unscaled_chi2_but_slsqp_converges():
    """Documents why the objective is rescaled: plain LD_SLSQP stops early on a raw spectrum chi2."""
    y, err = make_data(gauss_slope, GS_TRUE, WAVE, sigma=0.02)
    vg = jax.jit(jax.value_and_grad(GS_LOSS))
    n = [0]

    def raw(x, grad):
        n[0] += 1
        f, g = vg(jnp.asarray(x), WAVE, y, err)
        if grad.size:  # SLSQP's line search asks for values only
            grad[:] = np.asarray(g)
        return float(f)

    opt = nlopt.opt(nlopt.LD_SLSQP, 5)
    opt.set_lower_bounds([0.0, 4800.0, 2.0, -100.0, -100.0])
    opt.set_upper_bounds([1e3, 4900.0, 100.0, 100.0, 100.0])
    opt.set_min_objective(raw)
    opt.set_maxeval(2000)
    opt.set_ftol_rel(1e-10)
    try:
        x_raw = opt.optimize(GS_START)
    except nlopt.RoundoffLimited:
        x_raw = None
    p_ref, _ = least_squares_ref(gauss_slope, WAVE, y, err, GS_START)
    raw_ok = x_raw is not None and np.allclose(x_raw, p_ref, rtol=1e-4)
    res = SLSQP(tol=1e-6).minimize(GS_LOSS, {"value": GS_START, "lower": [0.0, 4800.0, 2.0, -100.0, -100.0],
                                     "upper": [1e3, 4900.0, 100.0, 100.0, 100.0]}, args=(WAVE, y, err))
    assert res.converged, res.message
    np.testing.assert_allclose(res.values, p_ref, rtol=1e-6)
    assert not raw_ok  # here (f0 ~ 5e7) raw NLopt stops after a few evaluations far from the minimum


def test_two_gaussian_blend():
    p_true = np.array([30.0, 4861.0, 5.0, 20.0, 4870.0, 40.0, 10.0])
    y, err = make_data(blend, p_true, WAVE, seed=2)
    start = np.array([20.0, 4858.0, 8.0, 15.0, 4865.0, 30.0, 8.0])
    lower = [0.0, 4840, 1.0, 0.0, 4840, 10.0, -50]
    upper = [200, 4880, 20.0, 200, 4900, 100.0, 50]
    res = SLSQP(tol=1e-8).minimize(BLEND_LOSS, {"value": start, "lower": lower, "upper": upper}, args=(WAVE, y, err))
    assert res.converged and res.valid, res.message
    p_ref, cov_ref = least_squares_ref(blend, WAVE, y, err, start)
    err_ref = np.sqrt(np.diag(cov_ref))
    np.testing.assert_allclose(res.values, p_ref, atol=1e-3 * err_ref.min())
    np.testing.assert_allclose(res.errors, err_ref, rtol=2e-2)  # full Hessian vs Gauss-Newton


def test_tied_doublet_through_a_function():
    x = np.linspace(4900.0, 5060.0, 240)
    p_true = np.array([40.0, 5006.843, 3.0, 5.0])
    y, err = make_data(doublet, p_true, x, seed=3)
    res = SLSQP(tol=1e-8).minimize(DOUBLET_LOSS, {"value": [20.0, 5005.0, 5.0, 0.0], "name": ["amp", "center", "sigma", "cont"],
                                                  "lower": [0, 4990, 0.5, -20], "upper": [500, 5020, 20, 20]},
                                   args=(x, y, err))
    assert res.converged, res.message
    p_ref, cov_ref = least_squares_ref(doublet, x, y, err, np.array([20.0, 5005.0, 5.0, 0.0]))
    np.testing.assert_allclose(res.values, p_ref, atol=1e-3 * np.sqrt(np.diag(cov_ref)).min())
    assert abs(res.params["center"] - 5006.843) < 5 * res.errors[1]


def _doublet_full(x):
    """Free (amp5007, center5007, sigma5007, cont) -> the 7 physical parameters of tied_doublet."""
    from problems import OIII_RATIO as R, OIII_SEPARATION as SEP

    return jnp.stack([x[0], x[1], x[2], x[0] / R, x[1] - SEP, x[2], x[3]])


@pytest.mark.parametrize("name", ["line", "gauss_slope", "two_gauss", "tied_doublet"])
def test_shared_problems_match_least_squares(name):
    """The core's known-answer problems (tests/problems.py), bounds from their Parameters."""
    from problems import PROBLEMS

    prob = PROBLEMS[name]
    d = prob.sample(seed=4)
    p = prob.params
    if name == "tied_doublet":  # ties through a function; cont fixed with lower == upper
        func = lambda wl, x: prob.func(wl, _doublet_full(x))  # noqa: E731
        idx = [0, 1, 2, 6]
        lower, upper = p.lower[idx].copy(), p.upper[idx].copy()
        lower[3] = upper[3] = p.values[6]
        spec = {"value": p.values[idx], "name": [p.names[i] for i in idx], "lower": lower, "upper": upper}
        truth = d.truth[idx]
    else:
        func = prob.func
        spec = {"value": p.values, "name": p.names, "lower": p.lower, "upper": p.upper}
        truth = d.truth
    res = SLSQP(tol=1e-8).minimize(chi2_loss(func), spec, args=(d.wavelength, d.flux, d.errors))
    assert res.converged, res.message
    free = spec["lower"] < spec["upper"]
    if free.all():
        ref_func, p0 = func, np.asarray(spec["value"])
    else:  # fixed entries held at their value (a fresh function: compiled for this test only)
        ref_func = lambda wl, x: func(wl, jnp.asarray(res.values).at[np.flatnonzero(free)].set(x))  # noqa: E731
        p0 = np.asarray(spec["value"])[free]
    p_ref, cov_ref = least_squares_ref(ref_func, d.wavelength, d.flux, d.errors, p0, spec["lower"][free],
                                       spec["upper"][free])
    err_ref = np.sqrt(np.diag(cov_ref))
    np.testing.assert_allclose(res.values[free], p_ref, atol=1e-3 * err_ref.min())
    assert np.all(np.abs(res.values[free] - truth[free]) < 5 * err_ref)
    assert np.all(res.values >= spec["lower"]) and np.all(res.values <= spec["upper"])


# ----------------------------------------------------------------------------------------
# Bounds
# ----------------------------------------------------------------------------------------
def test_bounds_honoured_and_active_bound_counts_as_converged():
    y, err = make_data(gauss_slope, GS_TRUE, WAVE)
    upper = np.array([40.0, 4900.0, 100.0, 100.0, 100.0])  # amplitude capped below its best value
    res = SLSQP(tol=1e-6).minimize(GS_LOSS, {"value": GS_START, "lower": [0, 4800, 2, -100, -100], "upper": upper,
                                             "name": ["amp", "center", "sigma", "c0", "c1"]}, args=(WAVE, y, err))
    assert res.values[0] == pytest.approx(40.0, abs=1e-9)
    assert np.all(res.values <= upper) and np.all(res.values >= [0, 4800, 2, -100, -100])
    assert res.info["at_bound"] == ["amp"]
    assert res.converged, res.message  # the gradient pushing out of the box does not count in the EDM
    p_ref, _ = least_squares_ref(gauss_slope, WAVE, y, err, GS_START, lower=[0, 4800, 2, -100, -100], upper=upper)
    np.testing.assert_allclose(res.values, p_ref, rtol=1e-5)


def test_start_outside_bounds_moved_inside_and_reported():
    y, err = make_data(gauss_slope, GS_TRUE, WAVE)
    spec = {"value": [5000.0, 4700.0, 25.0, 15.0, 0.0], "lower": [0, 4800, 2, -100, -100],
            "upper": [1e3, 4900, 100, 100, 100], "name": ["amp", "center", "sigma", "c0", "c1"]}
    with pytest.warns(UserWarning, match=r"initial value\(s\) outside their bounds moved inside: amp: 5000 -> 999; "
                                         r"center: 4700 -> 4800\.1"):
        res = SLSQP().minimize(GS_LOSS, spec, args=(WAVE, y, err))
    assert res.info["moved_inside"] == {"amp": (5000.0, 999.0), "center": (4700.0, pytest.approx(4800.1))}
    assert res.nlopt_code != nlopt.INVALID_ARGS and np.isfinite(res.fmin)
    assert np.all(res.values >= spec["lower"]) and np.all(res.values <= spec["upper"])


def test_fixed_parameter_with_equal_bounds():
    y, err = make_data(gauss_slope, GS_TRUE, WAVE)
    res = SLSQP(tol=1e-6).minimize(GS_LOSS, {"value": [30, 4861.0, 25, 15, 0], "lower": [0, 4861.0, 2, -100, -100],
                                             "upper": [1e3, 4861.0, 100, 100, 100]}, args=(WAVE, y, err))
    assert res.converged and res.values[1] == 4861.0
    assert res.errors[1] == 0.0 and np.all(res.errors[[0, 2, 3, 4]] > 0)


# ----------------------------------------------------------------------------------------
# Chaining, verbosity, one compilation for many spectra
# ----------------------------------------------------------------------------------------
def test_init_chains_a_previous_result():
    y, err = make_data(gauss_slope, GS_TRUE, WAVE)
    spec = {"value": GS_START, "lower": [0, 4800, 2, -100, -100], "upper": [1e3, 4900, 100, 100, 100]}
    rough = SLSQP(maxiter=4).minimize(GS_LOSS, spec, args=(WAVE, y, err))
    assert not rough.converged and rough.status is Status.MAX_ITER and rough.n_eval <= 4
    assert rough.fmin < SLSQP().create_evaluator(GS_LOSS, GS_START, args=(WAVE, y, err)).value_and_grad(GS_START)[0]
    polished = SLSQP(tol=1e-8).minimize(GS_LOSS, init=rough, args=(WAVE, y, err))  # bounds come from init
    assert polished.converged
    np.testing.assert_array_equal(polished.lower, spec["lower"])
    direct = SLSQP(tol=1e-8).minimize(GS_LOSS, spec, args=(WAVE, y, err))
    np.testing.assert_allclose(polished.values, direct.values, atol=1e-3 * direct.errors.min())
    # init with params: params gives the specification, init the start
    again = SLSQP(tol=1e-8).minimize(GS_LOSS, spec, init=polished, args=(WAVE, y, err))
    assert again.converged and again.n_eval == 1 and again.message.startswith("converged at the starting point")


def test_verbosity_levels(caplog):
    def loss(p):
        return jnp.sum((p - jnp.array([1.0, 2.0])) ** 2)

    caplog.set_level(logging.DEBUG, logger="sheap_dask.slsqp")
    SLSQP(verbosity=0).minimize(loss, [0.0, 0.0])
    assert caplog.records == []
    SLSQP(verbosity=1).minimize(loss, [0.0, 0.0])
    assert [r.levelno for r in caplog.records] == [logging.INFO] and "converged" in caplog.records[0].getMessage()
    caplog.clear()
    res = SLSQP(verbosity=5).minimize(loss, [0.0, 0.0])
    assert sum("round 1" in r.getMessage() for r in caplog.records) == 1
    caplog.clear()
    res = SLSQP(verbosity=10).minimize(loss, [0.0, 0.0])
    evals = [r for r in caplog.records if r.getMessage().startswith("eval ")]
    assert len(evals) == res.n_eval - 1 and all(r.levelno == logging.DEBUG for r in evals)


def test_compilation_cached_across_spectra():
    traces = []

    def loss(p, x, y, err):
        traces.append(1)  # runs only while JAX traces
        return jnp.sum(((gauss_slope(x, p) - y) / err) ** 2)

    loss.errordef = 1.0
    fitter = SLSQP(tol=1e-5)
    spec = {"value": GS_START, "lower": [0, 4800, 2, -100, -100], "upper": [1e3, 4900, 100, 100, 100]}
    counts = []
    for seed in range(4):
        y, err = make_data(gauss_slope, GS_TRUE + [5.0 * seed, seed, 0, 0, 0], WAVE, seed=seed)
        res = SLSQP(tol=1e-5).minimize(loss, spec, args=(WAVE, y, err)) if seed == 3 else fitter.minimize(
            loss, spec, args=(WAVE, list(y), err))
        assert res.converged, res.message
        counts.append(len(traces))
    assert counts[0] > 0 and counts[1:] == [counts[0]] * 3, counts


# ----------------------------------------------------------------------------------------
# Bad inputs: the wording is pinned here
# ----------------------------------------------------------------------------------------
def _loss(p):
    return jnp.sum(p**2)


@pytest.mark.parametrize(
    "params, exc, match",
    [
        ({"value": [1.0], "min": [0.0]}, ParameterSpecError,
         r"params has unknown key\(s\) \['min'\]; allowed keys are \['value', 'name', 'lower', 'upper', 'step_size'\] "
         r"\('value' required\)\."),
        ({"lower": [0.0]}, ParameterSpecError, r"params dict needs a 'value' entry \(the initial values\), got keys \['lower'\]\."),
        ({"value": [1.0, 2.0], "lower": [0.0]}, ParameterSpecError,
         r"params\['lower'\] has 1 entries but params\['value'\] has 2; give one entry per parameter\."),
        ({"value": [1.0, 2.0], "name": ["a"]}, ParameterSpecError,
         r"params\['name'\] has 1 entries but params\['value'\] has 2; give one name per parameter\."),
        ({"value": [1.0, 2.0], "name": ["a", "a"]}, ParameterSpecError, r"params\['name'\] has duplicate names \['a'\]"),
        ({"value": [1.0, 2.0], "name": ["a", "b"], "lower": [0, 5], "upper": [2, 3]}, ParameterSpecError,
         r"params bounds of 'b' are inverted: lower=5\.0 > upper=3\.0; swap them \(lower == upper fixes the parameter\)\."),
        ({"value": [np.nan]}, ParameterSpecError, r"params\['value'\] of 'p0' is nan; give finite initial values\."),
        ({"value": [1.0], "upper": [np.nan]}, ParameterSpecError,
         r"params\['upper'\] of 'p0' is nan; use -inf/\+inf \(or None\) for no bound\."),
        ({"value": [1.0], "step_size": [0.0]}, ParameterSpecError,
         r"params\['step_size'\] of 'p0' is 0\.0; step sizes must be finite and > 0\."),
        ({"value": [[1.0, 2.0]]}, ParameterSpecError, r"params\['value'\] must be 1-D \(one entry per parameter\), got shape \(1, 2\)\."),
        ({"value": ["a"]}, ParameterSpecError, r"params\['value'\] must be a sequence of numbers"),
        (None, ParameterSpecError, r"minimize\(\) needs starting values: pass params=array or params=\{'value': \.\.\.\}, "
                                   r"or init=a previous FitResult\."),
    ],
)
def test_bad_params_errors(params, exc, match):
    with pytest.raises(exc, match=match):
        SLSQP().minimize(_loss, params)


def test_bad_loss_and_options_errors():
    with pytest.raises(OptionError, match=r"loss must be callable as loss\(x, \*args\) -> scalar, got ndarray"):
        SLSQP().minimize(np.zeros(3), [1.0])
    bad = lambda p: jnp.sum(p**2)  # noqa: E731
    bad.errordef = -1
    with pytest.raises(OptionError, match=r"loss\.errordef must be a positive number \(1 for a chi-square, 0\.5 for a "
                                          r"negative log-likelihood\), got -1\."):
        SLSQP().minimize(bad, [1.0])
    with pytest.raises(ParameterSpecError, match=r"init must be a FitResult from a previous minimize\(\) call, got dict"):
        SLSQP().minimize(_loss, init={"value": [1.0]})
    with pytest.raises(OptionError, match=r"tol must be a finite number > 0 \(default 1e-3\), got -1"):
        SLSQP(tol=-1)
    with pytest.raises(OptionError, match=r"verbosity must be an integer from 0 \(silent\) to 10 \(every evaluation\), got 11\."):
        SLSQP(verbosity=11)
    with pytest.raises(OptionError, match=r"maxiter must be a positive integer \(number of loss evaluations\) or None, got 0\."):
        SLSQP(maxiter=0)
    with pytest.raises(OptionError, match=r"strategy must be a PushbackStrategy"):
        SLSQP(strategy="pushback")
    with pytest.raises(OptionError, match=r"max_nonfinite must be an integer >= 1, got 0\."):
        PushbackStrategy(max_nonfinite=0)
    with pytest.raises(OptionError, match=r"args must be a tuple of arrays passed as loss\(x, \*args\), got ndarray\."):
        SLSQP().minimize(_loss, [1.0], args=np.zeros(3))
    with pytest.raises(OptionError, match=r"loss must return a scalar, got an array of shape \(2,\); sum or average the "
                                          r"per-pixel terms inside the loss\."):
        SLSQP().minimize(lambda p: p**2, [1.0, 2.0])
    assert issubclass(ParameterSpecError, ValueError) and issubclass(OptionError, ValueError)


def test_fitresult_repr_and_fields():
    res = SLSQP().minimize(_loss, {"value": [1.0, -1.0], "name": ["a", "b"]})
    assert isinstance(res, FitResult)
    assert repr(res).startswith("FitResult(converged=True, valid=True, fmin=")
    assert res.nlopt_code > 0 and res.message.startswith("converged (edm ")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a start inside the bounds warns nothing
        SLSQP().minimize(_loss, {"value": [1.0], "lower": [0.0], "upper": [2.0]})


def test_readme_example_runs():
    """The README's `slsqp` section example runs and converges."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("<!-- section:slsqp -->", 1)[1].split("<!-- /section:slsqp -->", 1)[0]
    code = section.split("```python", 1)[1].split("```", 1)[0]
    ns: dict = {}
    exec(compile(code, "README.md:slsqp", "exec"), ns)
    assert ns["res"].converged and ns["polished"].converged
    np.testing.assert_allclose(ns["polished"].values, ns["true"], atol=5 * ns["polished"].errors.max())
