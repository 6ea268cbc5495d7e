"""Tests of the batched Levenberg-Marquardt solver (sheap_dask/lm.py).

Known answers come from scipy.optimize.least_squares run to tight tolerances on the same
residuals; x64 is on for the suite (conftest), float32 is tested explicitly.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import curve_fit, least_squares

from sheap_dask.errors import OptionError
from sheap_dask.lm import LMResult, levenberg_marquardt, levenberg_marquardt_queue, lm_covariance
from sheap_dask.status import Status

TIGHT = dict(ftol=1e-14, xtol=1e-14, gtol=1e-12, max_iter=200)
_CACHE: dict = {}


def solver(residual_fn, batched=False, **opts):
    """One jitted solver per (residual, options): reused across tests to keep compilations few."""
    key = (residual_fn, batched, tuple(sorted(opts.items())))
    if key not in _CACHE:
        f = partial(levenberg_marquardt, residual_fn, **opts)
        _CACHE[key] = jax.jit(jax.vmap(f) if batched else f)
    return _CACHE[key]


def scipy_fit(residual_fn, x0, args, method="lm"):
    """scipy.optimize.least_squares on the same residuals, exact Jacobian, tight tolerances."""
    key = ("scipy", residual_fn)
    if key not in _CACHE:
        _CACHE[key] = (jax.jit(residual_fn), jax.jit(jax.jacfwd(residual_fn)))
    f, jf = _CACHE[key]
    fun = lambda x: np.asarray(f(jnp.asarray(x), *args))  # noqa: E731
    jac = lambda x: np.asarray(jf(jnp.asarray(x), *args))  # noqa: E731
    tol = dict(ftol=1e-15, xtol=1e-15, gtol=1e-15) if method == "lm" else dict(ftol=1e-14, xtol=1e-14, gtol=1e-14)
    out = least_squares(fun, np.asarray(x0, float), jac=jac, method=method, max_nfev=10000, **tol)
    return out.x


# ---------------------------------------------------------------- residual functions


def exp_decay(x, t, y, sig):
    return (x[0] * jnp.exp(-x[1] * t) + x[2] - y) / sig


def gauss_slope_model(x, t):
    return x[0] * jnp.exp(-0.5 * ((t - x[1]) / x[2]) ** 2) + x[3] + x[4] * t


def gauss_slope(x, t, y, sig):
    return (gauss_slope_model(x, t) - y) / sig


def gauss_slope_masked(x, t, y, ivar):
    # The caller's convention: masked pixels give exactly 0, whatever garbage y holds there.
    good = ivar > 0
    r = (gauss_slope_model(x, t) - jnp.where(good, y, 0.0)) * jnp.sqrt(ivar)
    return jnp.where(good, r, 0.0)


def blend(x, t, y, sig):
    g1 = x[0] * jnp.exp(-0.5 * ((t - x[1]) / x[2]) ** 2)
    g2 = x[3] * jnp.exp(-0.5 * ((t - x[4]) / x[5]) ** 2)
    return (g1 + g2 + x[6] - y) / sig


def rosenbrock(x):
    return jnp.stack([10.0 * (x[1] - x[0] ** 2), 1.0 - x[0]])


def log_target(x):
    return jnp.log(x) - jnp.log(2.0)


# ---------------------------------------------------------------- data


def gauss_slope_data(rng, truth, n=200, noise=0.05):
    t = np.linspace(-10.0, 10.0, n)
    y = np.asarray(gauss_slope_model(jnp.asarray(truth), jnp.asarray(t))) + noise * rng.standard_normal(n)
    return t, y, np.full(n, noise)


@pytest.fixture
def rng():
    # fresh per test, so a test's data do not depend on which tests ran before it
    return np.random.default_rng(12345)


# ---------------------------------------------------------------- known answers


def test_exponential_decay_matches_scipy(rng):
    t = np.linspace(0.0, 5.0, 80)
    sig = np.full_like(t, 0.02)
    y = 2.5 * np.exp(-1.3 * t) + 0.4 + sig * rng.standard_normal(t.size)
    args = tuple(map(jnp.asarray, (t, y, sig)))
    x0 = jnp.array([1.0, 0.5, 0.0])
    res = solver(exp_decay, **TIGHT)(x0, args)
    assert isinstance(res, LMResult)
    assert int(res.status) == Status.CONVERGED
    ref = scipy_fit(exp_decay, x0, args, "lm")
    np.testing.assert_allclose(res.x, ref, rtol=1e-8, atol=1e-10)
    # cost is the plain chi-square, and so is chi2 for robust=None
    chi2 = float(jnp.sum(exp_decay(res.x, *args) ** 2))
    np.testing.assert_allclose([float(res.cost), float(res.chi2)], [chi2, chi2], rtol=1e-12)
    assert int(res.n_jac) <= int(res.n_iter) + 1


def test_gaussian_on_slope_matches_scipy_lm_and_trf(rng):
    t, y, sig = gauss_slope_data(rng, [3.0, 1.2, 1.5, 0.5, 0.03])
    args = tuple(map(jnp.asarray, (t, y, sig)))
    x0 = jnp.array([2.0, 0.0, 2.5, 0.0, 0.0])
    res = solver(gauss_slope, **TIGHT)(x0, args)
    assert int(res.status) == Status.CONVERGED
    for method in ("lm", "trf"):
        np.testing.assert_allclose(res.x, scipy_fit(gauss_slope, x0, args, method), rtol=1e-7, atol=1e-9)
    assert float(res.grad_norm) < 1e-6


def test_two_gaussian_blend_matches_scipy(rng):
    t = np.linspace(0.0, 20.0, 300)
    truth = np.array([4.0, 8.0, 1.2, 2.5, 11.0, 2.0, 0.3])
    sig = np.full_like(t, 0.05)
    y = np.asarray(blend(jnp.asarray(truth), jnp.asarray(t), 0.0, 1.0)) + sig * rng.standard_normal(t.size)
    args = tuple(map(jnp.asarray, (t, y, sig)))
    x0 = jnp.array([3.0, 7.5, 1.0, 2.0, 11.5, 1.5, 0.0])
    res = solver(blend, **TIGHT)(x0, args)
    assert int(res.status) == Status.CONVERGED
    np.testing.assert_allclose(res.x, scipy_fit(blend, x0, args, "lm"), rtol=1e-7, atol=1e-9)
    err = np.sqrt(np.diag(np.asarray(lm_covariance(res.jtj))))
    np.testing.assert_array_less(np.abs(np.asarray(res.x) - truth) / err, 5.0)  # the truth, within noise


def test_rosenbrock_and_max_iter():
    x0 = jnp.array([-1.2, 1.0])
    res = solver(rosenbrock, **TIGHT)(x0)
    assert int(res.status) == Status.CONVERGED
    np.testing.assert_allclose(res.x, [1.0, 1.0], atol=1e-10)
    np.testing.assert_allclose(res.x, scipy_fit(rosenbrock, x0, (), "lm"), atol=1e-10)
    assert float(res.cost) < 1e-20
    assert res.status.dtype == jnp.int8

    capped = solver(rosenbrock, max_iter=3)(x0)
    assert int(capped.status) == Status.MAX_ITER
    assert int(capped.n_iter) == 3
    assert float(capped.cost) < float(jnp.sum(rosenbrock(x0) ** 2))  # it still made progress

    zero = solver(rosenbrock, max_iter=0)(x0)
    assert int(zero.status) == Status.MAX_ITER and int(zero.n_iter) == 0
    np.testing.assert_array_equal(zero.x, x0)


# ---------------------------------------------------------------- batches


def test_vmap_batch_of_64_agrees_with_scipy(rng):
    b, n = 64, 200
    t = np.linspace(-10.0, 10.0, n)
    truths = np.column_stack(
        [rng.uniform(1.0, 5.0, b), rng.uniform(-3.0, 3.0, b), rng.uniform(0.8, 2.5, b), rng.uniform(-1.0, 1.0, b), rng.uniform(-0.05, 0.05, b)]
    )
    sig = np.full((b, n), 0.05)
    y = np.stack([np.asarray(gauss_slope_model(jnp.asarray(tr), jnp.asarray(t))) for tr in truths]) + sig * rng.standard_normal((b, n))
    # A crude, data-driven start: peak height and position, fixed width, flat continuum.
    x0 = np.column_stack([y.max(1) - np.median(y, 1), t[y.argmax(1)], np.full(b, 1.5), np.median(y, 1), np.zeros(b)])
    args = (jnp.broadcast_to(jnp.asarray(t), (b, n)), jnp.asarray(y), jnp.asarray(sig))
    res = solver(gauss_slope, batched=True, **TIGHT)(jnp.asarray(x0), args)
    assert res.x.shape == (b, 5) and res.jtj.shape == (b, 5, 5) and res.status.shape == (b,)
    np.testing.assert_array_equal(np.asarray(res.status), Status.CONVERGED)
    for i in range(b):
        ref = scipy_fit(gauss_slope, x0[i], (args[0][i], args[1][i], args[2][i]), "lm")
        np.testing.assert_allclose(res.x[i], ref, rtol=1e-6, atol=1e-8, err_msg=f"problem {i}")
    # reduced chi-square near 1: these are the right minima, not just scipy's
    np.testing.assert_array_less(np.asarray(res.chi2) / (n - 5), 1.5)


@pytest.mark.parametrize("slots", [1, 5, 64])
def test_queue_of_lanes_gives_each_problem_its_vmapped_result(rng, slots):
    """Lanes refilled from a queue: every problem (a NaN one and a far start included)
    follows the same iterations as under vmap; padding beyond n_active is never solved."""
    b, n = 23, 60
    t = np.linspace(0.0, 4.0, n)
    a, k = rng.uniform(1.0, 3.0, b), rng.uniform(0.3, 2.0, b)
    y = a[:, None] * np.exp(-k[:, None] * t) + 0.01 * rng.standard_normal((b, n))
    y[4] = np.nan
    x0 = np.tile([1.0, 1.0, 0.0], (b, 1))
    x0[7] = [50.0, -3.0, 0.0]
    sig = np.full((b, n), 0.01)
    opts = dict(max_iter=60, robust="logcosh", robust_scale=3.0)
    args = (jnp.asarray(t), jnp.asarray(y), jnp.asarray(sig))
    ref = jax.jit(jax.vmap(partial(levenberg_marquardt, exp_decay, **opts), in_axes=(0, (None, 0, 0))))(jnp.asarray(x0), args)
    queue = jax.jit(partial(levenberg_marquardt_queue, exp_decay, in_axes=(None, 0, 0), slots=slots, **opts))
    res = queue(jnp.asarray(x0), args)
    for name in LMResult._fields:
        np.testing.assert_allclose(np.asarray(getattr(res, name)), np.asarray(getattr(ref, name)), rtol=1e-10, err_msg=name)
    assert int(res.status[4]) == Status.NONFINITE and np.all(np.delete(np.asarray(res.n_iter), 4) > 0)
    part = queue(jnp.asarray(x0), args, n_active=10)
    np.testing.assert_allclose(np.asarray(part.x[:10]), np.asarray(ref.x[:10]), rtol=1e-10)
    np.testing.assert_array_equal(np.asarray(part.x[10:]), x0[10:])
    assert np.all(np.asarray(part.n_iter[10:]) == 0) and np.all(np.asarray(part.status[10:]) == Status.MAX_ITER)
    with pytest.raises(OptionError, match="slots=0"):
        levenberg_marquardt_queue(exp_decay, jnp.asarray(x0), args, in_axes=(None, 0, 0), slots=0)


# ---------------------------------------------------------------- robust loss


def test_logcosh_rejects_outliers_where_plain_ls_is_biased(rng):
    truth = np.array([3.0, 1.0, 1.5, 0.5, 0.03])
    t, y, sig = gauss_slope_data(rng, truth, noise=0.05)
    bad = y.copy()
    idx = np.array([95, 100, 103, 106, 150, 20])  # mostly on the line, like sky residuals
    bad[idx] += np.array([-5.0, -4.0, -6.0, 5.0, 8.0, -7.0])  # 80-160 sigma
    x0 = jnp.array([2.0, 0.0, 2.0, 0.0, 0.0])
    clean_args = tuple(map(jnp.asarray, (t, y, sig)))
    bad_args = tuple(map(jnp.asarray, (t, bad, sig)))
    ref = solver(gauss_slope, **TIGHT)(x0, clean_args).x
    plain = solver(gauss_slope, **TIGHT)(x0, bad_args)
    robust = solver(gauss_slope, robust="logcosh", robust_scale=1.0, **TIGHT)(x0, bad_args)
    assert int(robust.status) == Status.CONVERGED
    # parameter errors on the clean data, to measure bias in sigmas
    err = np.sqrt(np.diag(np.asarray(lm_covariance(solver(gauss_slope, **TIGHT)(x0, clean_args).jtj))))
    plain_bias = np.abs(np.asarray(plain.x) - np.asarray(ref)) / err
    robust_bias = np.abs(np.asarray(robust.x) - np.asarray(ref)) / err
    assert plain_bias.max() > 10.0, plain_bias
    # log-cosh has bounded (not redescending) influence: each outlier still pulls like a ~1 sigma
    # residual, so allow a small bias, far below the plain fit's
    assert robust_bias.max() < 2.0 and robust_bias.max() < plain_bias.max() / 10.0, (plain_bias, robust_bias)
    # the reported cost is the robust cost; chi2 is the plain one at the same point
    r = gauss_slope(robust.x, *bad_args)
    u = np.asarray(r)
    np.testing.assert_allclose(float(robust.cost), 2.0 * np.sum(np.log(np.cosh(u))), rtol=1e-10)
    np.testing.assert_allclose(float(robust.chi2), np.sum(u**2), rtol=1e-10)
    assert float(robust.cost) < float(robust.chi2)


def test_logcosh_reduces_to_least_squares_for_large_scale(rng):
    t, y, sig = gauss_slope_data(rng, [3.0, 1.0, 1.5, 0.5, 0.03])
    args = tuple(map(jnp.asarray, (t, y, sig)))
    x0 = jnp.array([2.0, 0.0, 2.0, 0.0, 0.0])
    plain = solver(gauss_slope, **TIGHT)(x0, args)
    wide = solver(gauss_slope, robust="logcosh", robust_scale=1e4, **TIGHT)(x0, args)
    np.testing.assert_allclose(wide.x, plain.x, rtol=1e-7)
    np.testing.assert_allclose(float(wide.cost), float(plain.cost), rtol=1e-7)


# ---------------------------------------------------------------- masks and failures


def test_masked_residuals_change_nothing(rng):
    truth = [3.0, 1.0, 1.5, 0.5, 0.03]
    t, y, sig = gauss_slope_data(rng, truth, n=200)
    ivar = 1.0 / sig**2
    keep = np.ones(t.size, bool)
    keep[[5, 6, 7, 60, 61, 140]] = False
    y_bad = y.copy()
    y_bad[~keep] = [np.nan, np.inf, 1e6, -1e6, np.nan, 3.0]  # garbage behind the mask
    ivar_m = np.where(keep, ivar, 0.0)
    x0 = jnp.array([2.0, 0.0, 2.0, 0.0, 0.0])
    masked = solver(gauss_slope_masked, **TIGHT)(x0, (jnp.asarray(t), jnp.asarray(y_bad), jnp.asarray(ivar_m)))
    subset = solver(gauss_slope_masked, **TIGHT)(x0, (jnp.asarray(t[keep]), jnp.asarray(y[keep]), jnp.asarray(ivar[keep])))
    assert int(masked.status) == int(subset.status) == Status.CONVERGED
    np.testing.assert_allclose(masked.x, subset.x, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(float(masked.cost), float(subset.cost), rtol=1e-10)
    np.testing.assert_allclose(masked.jtj, subset.jtj, rtol=1e-10)
    # a fully masked problem: zero gradient, nothing to do, nothing NaN (the caller flags no_data)
    empty = solver(gauss_slope_masked, **TIGHT)(x0, (jnp.asarray(t), jnp.asarray(y_bad), jnp.zeros_like(jnp.asarray(ivar))))
    assert int(empty.status) == Status.CONVERGED and int(empty.n_iter) == 0
    np.testing.assert_array_equal(empty.x, x0)
    assert float(empty.cost) == 0.0


def test_nonfinite_start_gives_status_not_exception():
    t = jnp.linspace(0.0, 5.0, 80)
    args = (t, 2.0 * jnp.exp(-t), jnp.ones_like(t))
    res = solver(exp_decay, **TIGHT)(jnp.array([jnp.nan, 1.0, 0.0]), args)
    assert int(res.status) == Status.NONFINITE and int(res.n_iter) == 0
    # NaN in the data (an unmasked bad pixel) is caught the same way
    y_nan = args[1].at[10].set(jnp.nan)
    res = solver(exp_decay, **TIGHT)(jnp.array([1.0, 1.0, 0.0]), (t, y_nan, args[2]))
    assert int(res.status) == Status.NONFINITE and int(res.n_iter) == 0
    np.testing.assert_array_equal(res.x, [1.0, 1.0, 0.0])
    # batched: one bad problem does not poison the others
    x0 = jnp.array([[1.0, 1.0, 0.0], [jnp.inf, 1.0, 0.0]])
    batch_args = tuple(jnp.stack([a, a]) for a in args)
    res = solver(exp_decay, batched=True, **TIGHT)(x0, batch_args)
    assert res.status.tolist() == [Status.CONVERGED, Status.NONFINITE]
    np.testing.assert_allclose(res.x[0], [2.0, 1.0, 0.0], atol=1e-8)


def test_nonfinite_trial_steps_are_rejected_not_fatal():
    # From x=10 the Gauss-Newton step of log(x) - log(2) lands at x<0 (NaN): the solver
    # must reject it, raise the damping and still converge.
    res = solver(log_target, **TIGHT)(jnp.array([10.0]))
    assert int(res.status) == Status.CONVERGED
    np.testing.assert_allclose(res.x, [2.0], rtol=1e-12)
    assert int(res.n_iter) > int(res.n_jac) - 1  # at least one rejected step


def test_float32():
    t = jnp.linspace(-10.0, 10.0, 200, dtype=jnp.float32)
    truth = jnp.array([3.0, 1.0, 1.5, 0.5, 0.03], jnp.float32)
    key = jax.random.PRNGKey(0)
    sig = jnp.full_like(t, 0.05)
    y = gauss_slope_model(truth, t) + sig * jax.random.normal(key, t.shape, jnp.float32)
    x0 = jnp.array([2.0, 0.0, 2.0, 0.0, 0.0], jnp.float32)
    res = solver(gauss_slope)(x0, (t, y, sig))  # default tolerances, floored for float32
    assert res.x.dtype == jnp.float32 and res.cost.dtype == jnp.float32 and res.jtj.dtype == jnp.float32
    assert int(res.status) == Status.CONVERGED
    assert int(res.n_iter) < 50
    ref = solver(gauss_slope, **TIGHT)(x0.astype(jnp.float64), tuple(a.astype(jnp.float64) for a in (t, y, sig)))
    err = np.sqrt(np.diag(np.asarray(lm_covariance(ref.jtj))))
    np.testing.assert_array_less(np.abs(np.asarray(res.x, float) - np.asarray(ref.x)) / err, 1e-2)
    robust = solver(gauss_slope, robust="logcosh")(x0, (t, y, sig))
    assert int(robust.status) == Status.CONVERGED and robust.x.dtype == jnp.float32


# ---------------------------------------------------------------- compilation


def test_jitted_vmapped_solver_traces_once(rng):
    traces = []

    def counting(x, t, y, sig):
        traces.append(1)  # runs only while JAX traces
        return gauss_slope(x, t, y, sig)

    solve = jax.jit(jax.vmap(partial(levenberg_marquardt, counting, max_iter=50)))
    b, n = 8, 100
    t = jnp.broadcast_to(jnp.linspace(-10.0, 10.0, n), (b, n))
    x0 = jnp.tile(jnp.array([2.0, 0.0, 2.0, 0.0, 0.0]), (b, 1))
    sig = jnp.full((b, n), 0.05)
    for seed in (1, 2):
        y = jax.vmap(gauss_slope_model, (None, 0))(jnp.array([3.0, 1.0, 1.5, 0.5, 0.03]), t)
        y = y + sig * jax.random.normal(jax.random.PRNGKey(seed), (b, n))
        res = solve(x0, (t, y, sig))
        res.x.block_until_ready()
        if seed == 1:
            first = len(traces)
            assert first > 0
    assert len(traces) == first, "second call with the same shapes re-traced"
    np.testing.assert_array_equal(np.asarray(res.status), Status.CONVERGED)


# ---------------------------------------------------------------- covariance


def test_lm_covariance_matches_curve_fit(rng):
    t, y, sig = gauss_slope_data(rng, [3.0, 1.0, 1.5, 0.5, 0.03])
    args = tuple(map(jnp.asarray, (t, y, sig)))
    res = solver(gauss_slope, **TIGHT)(jnp.array([2.0, 0.0, 2.0, 0.0, 0.0]), args)
    cov = np.asarray(lm_covariance(res.jtj))
    f = lambda tt, *p: np.asarray(gauss_slope_model(jnp.asarray(p), jnp.asarray(tt)))  # noqa: E731
    popt, pcov = curve_fit(f, t, y, p0=np.asarray(res.x), sigma=sig, absolute_sigma=True)
    np.testing.assert_allclose(res.x, popt, rtol=1e-6)
    np.testing.assert_allclose(cov, pcov, rtol=1e-4, atol=1e-12)
    np.testing.assert_allclose(cov, np.linalg.inv(np.asarray(res.jtj)), rtol=1e-8, atol=1e-14)


def test_lm_covariance_nan_where_degenerate():
    # parameters 0 and 1 enter only as their sum; parameter 3 has no effect at all
    j = np.column_stack([np.ones(50), np.ones(50), np.linspace(0, 1, 50), np.zeros(50)])
    jtj = j.T @ j
    cov = np.asarray(lm_covariance(jnp.asarray(jtj)))
    assert np.isnan(cov[[0, 1, 3], :]).all() and np.isnan(cov[:, [0, 1, 3]]).all()
    assert np.isfinite(cov[2, 2]) and cov[2, 2] > 0
    # batched, with a non-finite matrix in the batch
    good = np.array([[2.0, 0.5], [0.5, 1.0]])
    out = np.asarray(lm_covariance(jnp.stack([jnp.asarray(good), jnp.full((2, 2), jnp.nan)])))
    np.testing.assert_allclose(out[0], np.linalg.inv(good), rtol=1e-12)
    assert np.isnan(out[1]).all()


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "opts, word",
    [
        (dict(robust="huber"), "robust"),
        (dict(lambda_up=0.5), "lambda_up"),
        (dict(lambda_down=1.5), "lambda_down"),
        (dict(max_iter=-1), "max_iter"),
        (dict(ftol=-1.0), "ftol"),
        (dict(robust_scale=0.0), "robust_scale"),
        (dict(jacobian="central"), "jacobian"),
    ],
)
def test_bad_options_raise_option_error(opts, word):
    with pytest.raises(OptionError, match=word):
        levenberg_marquardt(rosenbrock, jnp.array([0.0, 0.0]), **opts)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="x0"):
        levenberg_marquardt(rosenbrock, jnp.zeros((3, 2)))
    with pytest.raises(ValueError, match="1-D residual"):
        levenberg_marquardt(lambda x: jnp.outer(x, x), jnp.zeros(2))
    with pytest.raises(ValueError, match="jtj"):
        lm_covariance(jnp.zeros(3))
