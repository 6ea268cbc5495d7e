"""Minimizer: known answers against scipy, adam vs lbfgs, bounds, ties, masks, axis modes,
statuses and the compile cache. Problems are tiny and shapes few, to keep compilations down."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from problems import PROBLEMS
from scipy.optimize import least_squares

from sheap_dask.errors import OptionError
from sheap_dask.minimizer import MinimizeResult, Minimizer
from sheap_dask.parameters import Parameters
from sheap_dask.status import Status

# Plain chi-square, no regularization: the problem scipy.optimize.least_squares solves.
CHI2 = dict(loss_kind="chi2", curvature_weight=0.0, smoothness_weight=0.0, max_weight=0.0, penalty_weight=0.0)
TIGHT = dict(rtol=1e-13, gtol=1e-11)
N_SPEC = 3


_JIT_MODELS: dict = {}


def _scipy_fit(prob, wl, flux, err, lower=None, upper=None):
    """Reference: scipy least_squares (trf, physical space, bounds) on the free parameters."""
    p = prob.params
    model = _JIT_MODELS.setdefault(prob.name, jax.jit(prob.func))
    free = [p.index(n) for n in p.free_names]
    lo = (p.lower if lower is None else lower)[free]
    hi = (p.upper if upper is None else upper)[free]
    ops = {"*": np.multiply, "/": np.divide, "+": np.add, "-": np.subtract}

    def phys_of(x):
        phys = p.values.copy()
        phys[free] = x
        for t, src, op, operand in p.ties:
            phys[p.index(t)] = ops[op](phys[p.index(src)], operand)
        return phys

    def resid(x):
        return (np.asarray(model(wl, phys_of(x))) - flux) / err

    span = np.where(np.isfinite(hi - lo), hi - lo, 0.0)
    x0 = np.clip(p.values[free], lo + 1e-6 * span, hi - 1e-6 * span)
    res = least_squares(resid, x0, bounds=(lo, hi), xtol=1e-15, ftol=1e-15, gtol=1e-15, method="trf")
    return phys_of(res.x)


_MINIMIZERS: dict = {}


def _minimizer(prob, method="lbfgs", mode=3, **kw):
    """Shared instances: the same options and shapes reuse one compiled solve across tests."""
    key = (prob.name, method, mode, tuple(sorted(kw.items())))
    if key not in _MINIMIZERS:
        opts = dict(CHI2, **(TIGHT if method == "lbfgs" else {}))
        opts.update(kw)
        _MINIMIZERS[key] = Minimizer(prob.func, non_optimize_in_axis=mode, method=method, param_converter=prob.params, **opts)
    return _MINIMIZERS[key]


@pytest.fixture(scope="module")
def gauss():
    prob = PROBLEMS["gauss_slope"]
    data = prob.sample(N_SPEC, seed=11, jitter=1.0)
    fits = {
        "lbfgs": _minimizer(prob, num_steps=300).run(prob.params.values, data.flux, data.wavelength, data.errors),
        "adam": _minimizer(prob, "adam", num_steps=1500, learning_rate=0.03, rtol=1e-10, patience=50).run(
            prob.params.values, data.flux, data.wavelength, data.errors
        ),
    }
    ref = np.stack([_scipy_fit(prob, data.wavelength, data.flux[i], data.errors[i]) for i in range(N_SPEC)])
    return prob, data, fits, ref


def test_lbfgs_matches_scipy_least_squares(gauss):
    prob, data, fits, ref = gauss
    r = fits["lbfgs"]
    assert isinstance(r, MinimizeResult) and r.params.shape == (N_SPEC, 5) and r.names == prob.params.names
    assert np.all(r.status == Status.CONVERGED), r.status
    np.testing.assert_allclose(r.params, ref, rtol=1e-7, atol=1e-8)
    # The loss reported is chi2 / n_pix at the returned parameters.
    chi2 = np.sum(((np.stack([prob.model(data.wavelength, q) for q in r.params]) - data.flux) / data.errors) ** 2, axis=1)
    np.testing.assert_allclose(r.loss, chi2 / data.wavelength.size, rtol=1e-10)
    # The answer is near the truth (within a few sigma of a 120-pixel fit).
    assert np.all(np.abs(r.params[:, 1] - data.truth[:, 1]) < 1.0)
    assert np.all(r.grad_norm <= 1e-6)


def test_adam_agrees_with_lbfgs_and_scipy(gauss):
    _, _, fits, ref = gauss
    a, b = fits["adam"], fits["lbfgs"]
    assert np.all(a.status == Status.CONVERGED), a.status
    np.testing.assert_allclose(a.params, b.params, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(a.params, ref, rtol=1e-4, atol=1e-4)
    assert np.all(a.loss >= b.loss - 1e-9)


def test_lm_lanes_match_vmapped_lm_and_scipy(gauss):
    """method="lm" with slots: the same result object and fits as the vmapped LM."""
    prob, data, _, ref = gauss
    kw = dict(non_optimize_in_axis=3, num_steps=100, method="lm", param_converter=prob.params, loss_kind="chi2")
    vmapped = Minimizer(prob.func, **kw).run(prob.params.values, data.flux, data.wavelength, data.errors)
    lanes_m = Minimizer(prob.func, slots=3, **kw)
    lanes = lanes_m.run(prob.params.values, data.flux, data.wavelength, data.errors)
    for field in ("params", "loss", "loss_history", "n_iter", "status"):
        np.testing.assert_allclose(getattr(lanes, field), getattr(vmapped, field), rtol=1e-9, atol=1e-12, err_msg=field)
    # |J^T r| at the optimum is a sum of cancelling terms: equal to rounding
    np.testing.assert_allclose(lanes.grad_norm, vmapped.grad_norm, rtol=1e-6)
    np.testing.assert_allclose(lanes.params, ref, rtol=1e-6, atol=1e-7)
    part = lanes_m.run(prob.params.values, data.flux, data.wavelength, data.errors, n_active=2)
    np.testing.assert_allclose(part.params[:2], vmapped.params[:2], rtol=1e-9)
    assert np.all(part.n_iter[2:] == 0)
    with pytest.raises(OptionError, match="n_active"):
        Minimizer(prob.func, **kw).run(prob.params.values, data.flux, data.wavelength, data.errors, n_active=2)


def test_history_padding_and_monotone_lbfgs(gauss):
    _, _, fits, _ = gauss
    r = fits["lbfgs"]
    assert r.loss_history.shape == (N_SPEC, 300)
    for i in range(N_SPEC):
        n = int(r.n_iter[i])
        assert 0 < n < 300
        h = r.loss_history[i]
        assert np.all(h[n:] == r.loss[i])  # padded with the final loss
        assert np.all(np.diff(h[:n]) <= 1e-12 * abs(h[0]))  # the line search only goes down
        assert h[0] > r.loss[i]


@pytest.mark.parametrize("name", ["tied_doublet", "two_gauss"])
def test_lbfgs_known_answer_ties_and_blend(name):
    prob = PROBLEMS[name]
    data = prob.sample(2, seed=4, jitter=0.5)
    r = _minimizer(prob, num_steps=300).run(prob.params.values, data.flux, data.wavelength, data.errors)
    assert np.all(r.status == Status.CONVERGED), r.status
    ref = np.stack([_scipy_fit(prob, data.wavelength, data.flux[i], data.errors[i]) for i in range(2)])
    np.testing.assert_allclose(r.params, ref, rtol=2e-6, atol=2e-6)
    if name == "tied_doublet":
        # Ties hold exactly, the fixed continuum is untouched.
        assert np.all(r.params[:, 3] == r.params[:, 0] / 2.98)
        assert np.all(r.params[:, 5] == r.params[:, 2])
        assert np.all(r.params[:, 6] == 0.5)


def test_bounds_hold_when_the_optimum_is_outside(gauss):
    """A constraint that excludes the unconstrained optimum: the fit stays on the bound."""
    prob, data, _, _ = gauss
    cons = np.stack([prob.params.lower, prob.params.upper], axis=1)
    cons[1] = [4980.0, 4999.0]  # true centre ~5002
    cons[0] = [0.0, 4.0]  # true amplitude ~5
    r = _minimizer(prob, num_steps=300).run(np.clip(prob.params.values, cons[:, 0], cons[:, 1]), data.flux, data.wavelength, data.errors, cons)
    assert np.all(r.params >= cons[:, 0]) and np.all(r.params <= cons[:, 1])
    assert np.all(r.params[:, 1] > 4998.9) and np.all(r.params[:, 0] > 3.99)
    ref = np.stack([_scipy_fit(prob, data.wavelength, data.flux[i], data.errors[i], cons[:, 0], cons[:, 1]) for i in range(N_SPEC)])
    np.testing.assert_allclose(r.params, ref, rtol=1e-3, atol=1e-3)


def test_masked_pixels_change_nothing(gauss):
    """NaN/inf flux and zero/inf/negative errors give the fit of the data without those pixels."""
    prob, data, _, _ = gauss
    flux, err = data.flux.copy(), data.errors.copy()
    flux[0, 3], flux[1, 40], flux[2, 41] = np.nan, np.inf, -np.inf
    err[0, 77], err[1, 110], err[2, 3] = 0.0, np.inf, -2.0
    r = _minimizer(prob, num_steps=300).run(prob.params.values, flux, data.wavelength, err)
    assert np.all(r.status == Status.CONVERGED) and np.all(np.isfinite(r.params))
    for i in range(N_SPEC):
        keep = np.isfinite(flux[i]) & np.isfinite(err[i]) & (err[i] > 0)
        assert keep.sum() == data.wavelength.size - 2 + (i == 2) * 0
        ref = _scipy_fit(prob, data.wavelength[keep], data.flux[i][keep], data.errors[i][keep])
        np.testing.assert_allclose(r.params[i], ref, rtol=1e-7, atol=1e-8)


def test_nonfinite_and_no_data_spectra_do_not_poison_the_batch(gauss):
    prob, data, fits, _ = gauss
    flux, err = data.flux.copy(), data.errors.copy()
    flux[1] = np.nan  # no usable pixel
    flux[2, 10], err[2, 10] = 1e300, 1e-300  # overflowing residual: the loss is inf
    r = _minimizer(prob, num_steps=300).run(prob.params.values, flux, data.wavelength, err)
    assert list(r.status) == [Status.CONVERGED, Status.NO_DATA, Status.NONFINITE]
    np.testing.assert_array_equal(r.params[0], fits["lbfgs"].params[0])
    assert np.all(np.isnan(r.params[1])) and np.isnan(r.loss[1]) and r.n_iter[1] == 0
    assert np.all(np.isfinite(r.params[2]))  # the start, the last finite point
    assert np.all(r.params[2] >= prob.params.lower) and np.all(r.params[2] <= prob.params.upper)
    assert r.status_counts() == {"converged": 1, "no_data": 1, "nonfinite": 1}


def test_axis_modes_4_and_5_and_per_spectrum_constraints(gauss):
    prob = PROBLEMS["line"]
    data = prob.sample(N_SPEC, seed=2, jitter=1.0)
    base = np.array([[-10.0, 10.0], [-np.inf, np.inf]])
    refs = np.stack([_scipy_fit(prob, data.wavelength, data.flux[i], data.errors[i]) for i in range(N_SPEC)])
    # 4: per-spectrum starts, shared constraints.
    r4 = _minimizer(prob, mode=4, num_steps=100).run(data.truth + 0.3, data.flux, data.wavelength, data.errors, base)
    np.testing.assert_allclose(r4.params, refs, rtol=1e-8, atol=1e-9)
    # 5: per-spectrum constraints and a per-spectrum 2-D wavelength; spectrum 1's intercept
    # is capped below its optimum, spectrum 2's slope is pinned (lower == upper).
    cons = np.tile(base, (N_SPEC, 1, 1))
    cons[1, 0] = [-10.0, refs[1, 0] - 0.5]
    cons[2, 1] = [-0.25, -0.25]
    m5 = _minimizer(prob, mode=5, num_steps=100)
    wl2 = np.tile(data.wavelength, (N_SPEC, 1))
    init = np.clip(data.truth, cons[..., 0], cons[..., 1])
    r5 = m5.run(init, data.flux, wl2, data.errors, cons)
    np.testing.assert_allclose(r5.params[0], refs[0], rtol=1e-8)
    assert refs[1, 0] - 0.5 - 1e-3 < r5.params[1, 0] <= refs[1, 0] - 0.5
    assert r5.params[2, 1] == -0.25
    ref2 = _scipy_fit(prob, data.wavelength, data.flux[2], data.errors[2], cons[2, :, 0] - [0, 1e-12], cons[2, :, 1] + [0, 1e-12])
    np.testing.assert_allclose(r5.params[2], ref2, rtol=1e-6)
    # __call__ is the seed API: (params, loss_history).
    params, history = m5(init, data.flux, wl2, data.errors, cons)
    np.testing.assert_array_equal(params, r5.params)
    assert history.shape == (N_SPEC, 100) and m5.n_compilations == 1


def test_internal_parameters_from_constraints_dependencies_and_lbfgs_options():
    """param_converter=None: p0, p1, ... from constraints; ties given by position names."""
    prob = PROBLEMS["line"]
    x = prob.wavelength
    truth = np.array([[1.0, 2.0], [-0.5, -1.0]])
    flux = np.stack([prob.model(x, t) for t in truth])
    m = Minimizer(prob.func, method="lbfgs", num_steps=5, learning_rate=123.0, list_dependencies=["p1 = p0 * 2"],
                  lbfgs_options={"maxiter": 80, "tolerance": 1e-11, "memory_size": 5, "scale_init_precond": True}, rtol=1e-13, **CHI2)
    assert m.num_steps == 80 and m.options["gtol"] == 1e-11 and m.options["lbfgs_kwargs"] == {"memory_size": 5, "scale_init_precond": True}
    r = m.run(np.array([0.5, 0.0]), flux, x, np.full_like(flux, 0.1), np.array([[-5.0, 5.0], [-100.0, 100.0]]))
    assert r.names == ["p0", "p1"] and r.loss_history.shape == (2, 80)
    assert np.all(r.status == Status.CONVERGED)
    np.testing.assert_allclose(r.params, truth, rtol=1e-8, atol=1e-10)
    assert np.all(r.params[:, 1] == r.params[:, 0] * 2)


def test_fixed_values_per_spectrum_max_iter_and_compile_once():
    prob = PROBLEMS["tied_doublet"]
    data = prob.sample(2, seed=9)
    init = np.tile(prob.params.values, (2, 1))
    init[1, 6] = 0.7  # the fixed continuum of spectrum 1
    m = Minimizer(prob.func, non_optimize_in_axis=4, method="adam", num_steps=5, param_converter=prob.params)
    r = m.run(init, data.flux, data.wavelength, data.errors)
    assert r.params[0, 6] == 0.5 and r.params[1, 6] == 0.7
    assert np.all(r.status == Status.MAX_ITER) and np.all(r.n_iter == 5)
    assert m.n_compilations == 1
    # Same shapes: no new trace, and every spectrum is independent of its neighbours.
    r2 = m.run(init[::-1].copy(), data.flux[::-1].copy(), data.wavelength, data.errors[::-1].copy())
    params, _ = m(init, data.flux, data.wavelength, data.errors)
    assert m.n_compilations == 1
    np.testing.assert_array_equal(r.params[::-1], r2.params)
    np.testing.assert_array_equal(params, r.params)
    m.run(init[:1], data.flux[:1], data.wavelength, data.errors[:1])
    assert m.n_compilations == 2  # a new batch size compiles once more


def test_float32_inputs():
    prob = PROBLEMS["gauss_slope"]
    data = prob.sample(2, seed=1, dtype=np.float32)
    m = Minimizer(prob.func, method="lbfgs", num_steps=200, param_converter=prob.params, **CHI2)
    r = m.run(prob.params.values.astype(np.float32), data.flux, data.wavelength, data.errors)
    assert r.params.dtype == np.float32 and r.loss.dtype == np.float32
    assert np.all(r.status == Status.CONVERGED), r.status
    np.testing.assert_allclose(r.params, data.truth, rtol=0.05, atol=0.2)


def test_pickles_without_compiled_functions(gauss):
    import pickle

    prob = gauss[0]
    m = _minimizer(prob, num_steps=300)
    assert m.n_compilations >= 1 and m._compiled
    m2 = pickle.loads(pickle.dumps(m))
    assert m2._compiled == {} and m2.n_compilations == 0
    assert m2.options == m.options and m2.num_steps == m.num_steps and m2.method == "lbfgs"
