"""The loss builder: each term against a hand computation, masking, converters, dtypes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from problems import PROBLEMS

from sheap_dask.loss import build_loss_function, usable_mask, weighted_residuals

PROB = PROBLEMS["gauss_slope"]
OFF = dict(curvature_weight=0.0, smoothness_weight=0.0, max_weight=0.0, penalty_weight=0.0)


@pytest.fixture(scope="module")
def data():
    d = PROB.sample(seed=3)
    return d.wavelength, d.flux, d.errors


def _manual(phys, wl, flux, err, *, kind, cw, sw, mw, weighted=True):
    """Numpy reference of the documented formula (inputs already free of masked pixels)."""
    model = PROB.model(wl, phys)
    d = model - flux
    r = d / err if weighted else d
    rho = np.log(np.cosh(r)) if kind == "logcosh" else r**2
    total = rho.mean() + mw * rho.max()
    total += sw * np.mean(np.diff(d) ** 2) + cw * np.mean((d[2:] - 2 * d[1:-1] + d[:-2]) ** 2)
    return total


@pytest.mark.parametrize("kind", ["logcosh", "chi2"])
@pytest.mark.parametrize("weighted", [True, False])
def test_value_matches_formula(data, kind, weighted):
    wl, flux, err = data
    phys = PROB.params.values
    loss = build_loss_function(PROB.func, weighted=weighted, kind=kind, curvature_weight=3.0, smoothness_weight=5.0, max_weight=0.2)
    expect = _manual(phys, wl, flux, err, kind=kind, cw=3.0, sw=5.0, mw=0.2, weighted=weighted)
    assert float(loss(jnp.asarray(phys), wl, flux, err)) == pytest.approx(expect, rel=1e-12)


def test_chi2_is_mean_square_of_weighted_residuals(data):
    wl, flux, err = data
    phys = jnp.asarray(PROB.true)
    loss = build_loss_function(PROB.func, kind="chi2", **OFF)
    r = weighted_residuals(PROB.func, phys, wl, flux, err)
    assert r.shape == wl.shape
    assert float(loss(phys, wl, flux, err)) == pytest.approx(float(jnp.sum(r**2)) / wl.size, rel=1e-13)


def test_logcosh_stable_for_huge_residuals(data):
    wl, flux, err = data
    loss = build_loss_function(PROB.func, **OFF)
    phys = jnp.asarray(PROB.params.values).at[0].set(1e12)
    val, grad = jax.value_and_grad(loss)(phys, wl, flux, err * 1e-6)
    assert np.isfinite(val) and np.all(np.isfinite(grad))


def test_penalty_term(data):
    wl, flux, err = data
    penalty = lambda x, p: jnp.sum(p**2)  # noqa: E731
    base = build_loss_function(PROB.func, **OFF)
    pen = build_loss_function(PROB.func, penalty_function=penalty, **{**OFF, "penalty_weight": 0.5})
    phys = jnp.asarray(PROB.params.values)
    assert float(pen(phys, wl, flux, err) - base(phys, wl, flux, err)) == pytest.approx(0.5 * float(jnp.sum(phys**2)), rel=1e-12)


def test_param_converter_parameters_and_callable(data):
    wl, flux, err = data
    p = PROB.params
    raw = p.raw_init() + 0.1
    direct = build_loss_function(PROB.func)(p.raw_to_phys(raw), wl, flux, err)
    via_params = build_loss_function(PROB.func, param_converter=p)(raw, wl, flux, err)
    via_callable = build_loss_function(PROB.func, param_converter=lambda r: p.raw_to_phys(r))(raw, wl, flux, err)
    assert float(via_params) == float(direct) == float(via_callable)


# -- masking -------------------------------------------------------------------------------
BAD = [(5, "flux", np.nan), (17, "flux", np.inf), (30, "flux", -np.inf), (44, "err", 0.0), (58, "err", -1.0), (71, "err", np.nan), (90, "err", np.inf)]


def _plant(wl, flux, err):
    flux, err = flux.copy(), err.copy()
    for i, which, v in BAD:
        (flux if which == "flux" else err)[i] = v
    return flux, err


@pytest.mark.parametrize("kind", ["logcosh", "chi2"])
def test_masked_pixels_change_nothing(data, kind):
    """NaN/inf/zero-error pixels: same value and gradient as the data without them."""
    wl, flux, err = data
    bad_flux, bad_err = _plant(wl, flux, err)
    keep = np.ones(wl.size, bool)
    keep[[i for i, _, _ in BAD]] = False
    p = PROB.params
    raw = p.raw_init() + 0.05
    loss = build_loss_function(PROB.func, param_converter=p, kind=kind, **{**OFF, "max_weight": 0.1})
    vg = jax.jit(jax.value_and_grad(loss))
    v_bad, g_bad = vg(raw, wl, bad_flux, bad_err)
    v_ref, g_ref = vg(raw, wl[keep], flux[keep], err[keep])
    assert np.isfinite(v_bad) and np.all(np.isfinite(g_bad))
    assert float(v_bad) == pytest.approx(float(v_ref), rel=1e-13)
    np.testing.assert_allclose(g_bad, g_ref, rtol=1e-11, atol=1e-14)


def test_masked_pixels_break_difference_terms(data):
    """Curvature/smoothness use only all-usable pairs/triples; value and gradient finite."""
    wl, flux, err = data
    bad_flux, bad_err = _plant(wl, flux, err)
    mask = np.asarray(usable_mask(wl, bad_flux, bad_err))
    assert mask.sum() == wl.size - len(BAD)
    phys = jnp.asarray(PROB.params.values)
    loss = build_loss_function(PROB.func, curvature_weight=2.0, smoothness_weight=3.0, max_weight=0.0)
    d = PROB.model(wl, phys) - np.where(mask, bad_flux, 0.0)
    pair = mask[1:] & mask[:-1]
    triple = mask[2:] & mask[1:-1] & mask[:-2]
    r = d[mask] / bad_err[mask]
    expect = np.mean(np.log(np.cosh(r))) + 3.0 * np.mean(np.diff(d)[pair] ** 2) + 2.0 * np.mean((d[2:] - 2 * d[1:-1] + d[:-2])[triple] ** 2)
    v, g = jax.value_and_grad(loss)(phys, wl, bad_flux, bad_err)
    assert float(v) == pytest.approx(expect, rel=1e-12)
    assert np.all(np.isfinite(g))
    # The stand-in values of masked pixels are irrelevant: other bad values, same loss.
    other_flux = np.where(mask, bad_flux, 1e30)
    assert float(loss(phys, wl, other_flux, np.where(mask, bad_err, 0.0))) == pytest.approx(float(v), rel=1e-14)


def test_nonfinite_wavelength_masks_and_stays_finite(data):
    wl, flux, err = data
    wl_bad = wl.copy()
    wl_bad[[0, 50]] = np.nan
    keep = np.isfinite(wl_bad)
    loss = build_loss_function(PROB.func, **OFF)
    phys = jnp.asarray(PROB.params.values)
    v, g = jax.value_and_grad(loss)(phys, wl_bad, flux, err)
    assert float(v) == pytest.approx(float(loss(phys, wl[keep], flux[keep], err[keep])), rel=1e-13)
    assert np.all(np.isfinite(g))


def test_all_pixels_masked_gives_zero_not_nan(data):
    wl, flux, err = data
    loss = build_loss_function(PROB.func)
    phys = jnp.asarray(PROB.params.values)
    v, g = jax.value_and_grad(loss)(phys, wl, np.full_like(flux, np.nan), err)
    assert float(v) == 0.0 and np.all(g == 0.0)


def test_weighted_residuals_masked_are_exactly_zero(data):
    wl, flux, err = data
    bad_flux, bad_err = _plant(wl, flux, err)
    r = np.asarray(weighted_residuals(PROB.func, PROB.params.raw_init(), wl, bad_flux, bad_err, param_converter=PROB.params))
    mask = np.asarray(usable_mask(wl, bad_flux, bad_err))
    assert np.all(r[~mask] == 0.0) and np.all(np.isfinite(r))
    phys = PROB.params.raw_to_phys(PROB.params.raw_init())
    np.testing.assert_allclose(r[mask], (PROB.model(wl, phys)[mask] - bad_flux[mask]) / bad_err[mask], rtol=1e-12)


def test_jit_vmap_and_float32(data):
    wl, flux, err = data
    loss = build_loss_function(PROB.func, param_converter=PROB.params)
    raw = jnp.stack([PROB.params.raw_init()] * 3)
    fl = np.stack([flux, flux * 1.1, flux])
    vals = jax.jit(jax.vmap(loss, in_axes=(0, None, 0, None)))(raw, wl, fl, err)
    assert vals.shape == (3,) and float(vals[0]) == pytest.approx(float(vals[2]), rel=1e-14)
    f32 = lambda a: jnp.asarray(a, dtype=jnp.float32)  # noqa: E731
    v32, g32 = jax.jit(jax.value_and_grad(loss))(f32(raw[0]), f32(wl), f32(flux), f32(err))
    assert v32.dtype == jnp.float32 and g32.dtype == jnp.float32
    assert float(v32) == pytest.approx(float(vals[0]), rel=1e-4)
