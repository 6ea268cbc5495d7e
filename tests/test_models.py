"""Tests of sheap_dask.models: profiles, continua, FeII templates, compose, regions, initializer."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sheap_dask as sd
from sheap_dask.errors import ModelError
from sheap_dask.models import continuum, feii, profiles
from sheap_dask.models.profiles import C_KMS
from sheap_dask.synthetic import sdss_grid, synthetic_spectra

REST = 4862.68
FINE = np.linspace(4000.0, 5800.0, 360001)  # 0.005 A steps


def _ev(template, x, amplitude, fwhm, shift):
    """Template evaluation, compiled once per (template, grid) (eager JAX is slow here)."""
    key = (id(template), x.shape, float(x[0]))
    if key not in _JIT:
        _JIT[key] = (template, jax.jit(lambda a, f, s: template.evaluate(jnp.asarray(x), a, f, s)))
    return np.asarray(_JIT[key][1](amplitude, fwhm, shift))


_JIT: dict = {}


def _fwhm_kms(x, y, centre):
    """Measured FWHM (km/s) of a single-peaked profile by interpolating the half-maximum."""
    y = np.asarray(y)
    half = y.max() / 2
    above = np.nonzero(y >= half)[0]
    i0, i1 = above[0], above[-1]
    left = np.interp(half, [y[i0 - 1], y[i0]], [x[i0 - 1], x[i0]])
    right = np.interp(half, [y[i1 + 1], y[i1]], [x[i1 + 1], x[i1]])
    return (right - left) / centre * C_KMS


# -- profiles ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "fn,extra",
    [(profiles.gaussian, ()), (profiles.lorentzian, ()), (profiles.pseudo_voigt, (0.4,)), (profiles.skewed_gaussian, (3.0,))],
)
def test_profile_integrates_to_flux(fn, extra):
    x = np.linspace(REST - 3000, REST + 3000, 600001) if fn is not profiles.gaussian else FINE
    y = np.asarray(fn(x, 7.5, 300.0, 2500.0, *extra, REST))
    total = np.trapezoid(y, x)
    if fn in (profiles.lorentzian, profiles.pseudo_voigt):
        # analytic Lorentzian flux outside +-L: (2/pi) * atan(gamma / L) of it is missing
        centre = REST * (1 + 300.0 / C_KMS)
        gamma = 0.5 * centre * 2500.0 / C_KMS
        inside = 1 - 2 / math.pi * math.atan(gamma / 3000.0)
        expect = 7.5 * (inside if fn is profiles.lorentzian else 0.4 * inside + 0.6)
        assert total == pytest.approx(expect, rel=1e-6)
    else:
        assert total == pytest.approx(7.5, rel=1e-8)


@pytest.mark.parametrize("fn,extra", [(profiles.gaussian, ()), (profiles.lorentzian, ()), (profiles.pseudo_voigt, (0.3,)),
                                      (profiles.skewed_gaussian, (0.0,))])
@pytest.mark.parametrize("fwhm", [150.0, 4000.0])
def test_profile_fwhm_and_shift(fn, extra, fwhm):
    shift = -700.0
    y = np.asarray(fn(FINE, 1.0, shift, fwhm, *extra, REST))
    centre = REST * (1 + shift / C_KMS)
    assert FINE[np.argmax(y)] == pytest.approx(centre, abs=0.01)
    assert _fwhm_kms(FINE, y, centre) == pytest.approx(fwhm, rel=2e-3)


def test_gaussian_centroid_moves_with_shift():
    for shift in (-2000.0, 0.0, 1500.0):
        y = np.asarray(profiles.gaussian(FINE, 1.0, shift, 3000.0, REST))
        centroid = np.trapezoid(FINE * y, FINE) / np.trapezoid(y, FINE)
        assert centroid == pytest.approx(REST * (1 + shift / C_KMS), abs=1e-6)


def test_skewed_gaussian_skew_moves_mass_red():
    y = np.asarray(profiles.skewed_gaussian(FINE, 1.0, 0.0, 3000.0, 4.0, REST))
    centroid = np.trapezoid(FINE * y, FINE) / np.trapezoid(y, FINE)
    assert centroid > REST + 5.0


def test_pseudo_voigt_limits():
    g = profiles.gaussian(FINE, 2.0, 100.0, 2000.0, REST)
    lor = profiles.lorentzian(FINE, 2.0, 100.0, 2000.0, REST)
    np.testing.assert_allclose(profiles.pseudo_voigt(FINE, 2.0, 100.0, 2000.0, 0.0, REST), g, rtol=1e-12)
    np.testing.assert_allclose(profiles.pseudo_voigt(FINE, 2.0, 100.0, 2000.0, 1.0, REST), lor, rtol=1e-12)


def test_profiles_safe_at_zero_width_and_float32():
    for fn, extra in [(profiles.gaussian, ()), (profiles.lorentzian, ()), (profiles.skewed_gaussian, (1.0,))]:
        g = jax.grad(lambda w: jnp.sum(fn(jnp.linspace(4800.0, 4900.0, 50), 1.0, 0.0, w, *extra, REST)))(0.0)
        assert np.isfinite(g)
    y32 = profiles.gaussian(np.linspace(4800, 4900, 50, dtype=np.float32), np.float32(1.0), np.float32(0.0), np.float32(2000.0), REST)
    assert y32.dtype == jnp.float32 and np.all(np.isfinite(y32))


# -- continua ------------------------------------------------------------------------------
def test_powerlaw_and_polynomial():
    x = np.array([2550.0, 5100.0, 10200.0])
    np.testing.assert_allclose(continuum.powerlaw(x, 3.0, -1.5, 5100.0), 3.0 * (x / 5100.0) ** -1.5)
    t = x / 5100.0 - 1
    np.testing.assert_allclose(continuum.polynomial(x, [1.0, 2.0, -0.5], 5100.0), 1 + 2 * t - 0.5 * t**2)


def test_balmer_continuum_edge_and_shape():
    x = np.array([3000.0, 3500.0, 3646.0, 3647.0, 4000.0])
    y = np.asarray(continuum.balmer_continuum(x, 2.0, 15000.0, 1.0))
    assert y[2] == pytest.approx(2.0)
    assert y[3] == 0.0 and y[4] == 0.0
    # independent evaluation of Grandi (1982): B_lambda(T) (1 - exp(-tau (lambda/edge)^3))
    hc_k = 6.62607015e-34 * 2.99792458e8 / 1.380649e-23 * 1e10  # Angstrom K

    def shape(lam):
        return lam**-5 / np.expm1(hc_k / (lam * 15000.0)) * -np.expm1(-((lam / 3646.0) ** 3))

    np.testing.assert_allclose(y[:2], 2.0 * shape(x[:2]) / shape(3646.0), rtol=1e-7)
    # optically thin limit: the shape follows the Planck function times tau (lambda/edge)^3
    thin = np.asarray(continuum.balmer_continuum(x[:2], 1.0, 15000.0, 1e-6))
    planck = x[:2] ** -5 / np.expm1(hc_k / (x[:2] * 15000.0))
    np.testing.assert_allclose(thin, planck * (x[:2] / 3646.0) ** 3 / (planck[0] * 0 + 3646.0**-5 / np.expm1(hc_k / (3646.0 * 15000.0))), rtol=1e-5)


# -- FeII ------------------------------------------------------------------------------------
def test_feii_broadening_conserves_flux_and_normalisation():
    t = feii.optical_template()
    x = np.arange(3900.0, 5900.0, 0.25)
    fluxes = [np.trapezoid(_ev(t, x, 1.0, fw, 0.0), x) for fw in (1000.0, 3000.0, 8000.0)]
    np.testing.assert_allclose(fluxes, fluxes[0], rtol=2e-3)
    y = _ev(t, x, 1.0, 1000.0, 0.0)
    band = (x >= 4434) & (x <= 4684)
    assert np.trapezoid(y[band], x[band]) == pytest.approx(1.0, rel=0.02)
    # amplitude is linear, shift moves the pattern
    np.testing.assert_allclose(_ev(t, x, 3.0, 2000.0, 0.0), 3.0 * _ev(t, x, 1.0, 2000.0, 0.0), rtol=1e-12)
    y0 = _ev(t, x, 1.0, 1500.0, 0.0)
    y1 = _ev(t, x, 1.0, 1500.0, 600.0)
    c0, c1 = (np.trapezoid(x * yy, x) / np.trapezoid(yy, x) for yy in (y0, y1))
    assert c1 - c0 == pytest.approx(c0 * 600.0 / C_KMS, rel=0.02)


def test_feii_fwhm_of_isolated_line_and_restricted_grid():
    t = feii.FeIITemplate.from_lines([5000.0], [1.0])
    x = np.arange(4900.0, 5100.0, 0.01)
    y = _ev(t, x, 1.0, 2000.0, 0.0)
    assert _fwhm_kms(x, y, 5000.0) == pytest.approx(2000.0, rel=0.01)
    opt = feii.optical_template()
    r = opt.restricted(4400.0, 5600.0)
    assert r.n < opt.n
    xs = np.arange(4400.0, 5600.0, 1.0)
    np.testing.assert_allclose(_ev(r, xs, 1.0, 9000.0, 2500.0), _ev(opt, xs, 1.0, 9000.0, 2500.0), atol=1e-9)


def test_default_templates_have_literature_lines():
    x = np.arange(4000.0, 5700.0, 0.5)
    y = _ev(feii.optical_template(), x, 1.0, 1000.0, 0.0)

    def peak_near(lam_vac, yy, xx, tol=3.0):
        sel = np.abs(xx - lam_vac) < 12
        return abs(xx[sel][np.argmax(yy[sel])] - lam_vac) < tol

    # multiplet 42 (air 4923.92, 5018.44, 5169.03 -> vacuum +1.37/1.40/1.44 A)
    for lam_air in (4923.92, 5018.44, 5169.03, 5316.61):
        assert peak_near(float(feii.air_to_vacuum(lam_air)), y, x)
    # the 4500-4680 blend is strong and the region around H-beta/[OIII] 4800-4900 is weak
    blend = y[(x > 4500) & (x < 4680)].mean()
    assert blend > 5 * y[(x > 4800) & (x < 4880)].mean()
    xu = np.arange(2200.0, 3100.0, 0.5)
    yu = _ev(feii.uv_template(), xu, 1.0, 1000.0, 0.0)
    assert peak_near(float(feii.air_to_vacuum(2599.40)), yu, xu) or peak_near(float(feii.air_to_vacuum(2585.88)), yu, xu)
    # no FeII flux in the MgII core itself is expected from the table
    assert yu[np.abs(xu - 2800.0) < 10].max() < 0.5 * yu.max()


def test_feii_jvp_matches_finite_differences():
    t = feii.optical_template().restricted(4400.0, 5600.0)
    x = jnp.linspace(4400.0, 5600.0, 500)
    f = lambda p: t.evaluate(x, p[0], p[1], p[2])  # noqa: E731
    p0 = jnp.array([2.0, 3000.0, 150.0])
    J = jax.jit(jax.jacfwd(f))(p0)
    Jr = jax.jit(jax.jacrev(f))(p0)
    f = jax.jit(f)
    np.testing.assert_allclose(J, Jr, atol=1e-12)
    for k, h in enumerate((1e-4, 1e-2, 1e-2)):
        e = jnp.zeros(3).at[k].set(h)
        fd = (f(p0 + e) - f(p0 - e)) / (2 * h)
        assert float(jnp.max(jnp.abs(J[:, k] - fd))) < 1e-6 * float(jnp.max(jnp.abs(fd)))


def test_user_template_from_arrays_and_file(tmp_path):
    wl = np.linspace(4300.0, 5700.0, 1401)
    fl = np.exp(-0.5 * ((wl - 4600) / 3) ** 2) + 0.5 * np.exp(-0.5 * ((wl - 5250) / 3) ** 2)
    t_arr = feii.load_template((wl, fl), norm_band=(4434.0, 4684.0))
    np.savetxt(tmp_path / "t.txt", np.c_[wl, fl], header="wavelength flux")
    np.savetxt(tmp_path / "t.csv", np.c_[wl, fl], delimiter=",", header="wavelength,flux", comments="")
    x = np.arange(4400.0, 5600.0, 1.0)
    ref = _ev(t_arr, x, 1.0, 2000.0, 0.0)
    for path in (tmp_path / "t.txt", str(tmp_path / "t.csv")):
        t_file = feii.load_template(path, norm_band=(4434.0, 4684.0))
        np.testing.assert_allclose(_ev(t_file, x, 1.0, 2000.0, 0.0), ref, rtol=1e-10, atol=1e-14)
    assert x[np.argmax(ref)] == pytest.approx(4600.0, abs=1.0)
    # a model with a user template
    m = sd.models.region("hbeta", feii_template=str(tmp_path / "t.txt"), host=False)
    assert m.n_free == 20
    with pytest.raises(ModelError, match="not a file"):
        feii.load_template(str(tmp_path / "missing.txt"))
    with pytest.raises(ModelError, match="strictly increasing"):
        feii.load_template((wl[::-1], fl))


# -- compose --------------------------------------------------------------------------------
def test_compose_names_ties_and_metadata():
    m = sd.models.compose(
        sd.models.powerlaw(ref_wavelength=5100.0),
        sd.models.line("oiii5007", "oiii5007", fwhm=(400.0, 100.0, 1200.0)),
        sd.models.line("oiii4959", "oiii4959", fwhm=(400.0, 100.0, 1200.0)),
        sd.models.line("broad_a", "hbeta", profile="lorentzian", line_name="hbeta_broad"),
        sd.models.line("broad_b", "hbeta", profile="pseudo_voigt", line_name="hbeta_broad"),
        ties=["oiii4959_flux = oiii5007_flux / 2.98", "oiii4959_shift = oiii5007_shift * 1", "oiii4959_fwhm = oiii5007_fwhm * 1"],
        name="test",
        window=(4700.0, 5100.0),
    )
    assert m.param_names[:5] == ["powerlaw_norm", "powerlaw_index", "oiii5007_flux", "oiii5007_shift", "oiii5007_fwhm"]
    assert "broad_b_eta" in m.param_names
    assert m.metadata["lines"]["hbeta_broad"]["components"] == ["broad_a", "broad_b"]
    assert m.metadata["lines"]["oiii5007"]["kind"] == "narrow" and m.metadata["lines"]["hbeta_broad"]["kind"] == "broad"
    assert m.metadata["continuum"] == ["powerlaw"]
    assert m.window == (4700.0, 5100.0)
    # physical vector from raw: tie exact, total = sum of components
    raw = m.params.raw_init()
    phys = np.asarray(m.params.raw_to_phys(raw))
    i5, i4 = m.params.index("oiii5007_flux"), m.params.index("oiii4959_flux")
    assert phys[i4] * 2.98 == pytest.approx(phys[i5], rel=1e-14)
    x = np.linspace(4700.0, 5100.0, 400)
    total = jax.jit(m.func)(x, phys)
    parts = jax.jit(lambda xx, pp: sum(f(xx, pp) for f in m.components.values()))(x, phys)
    np.testing.assert_allclose(parts, total, rtol=1e-12)
    with pytest.raises(ModelError, match="duplicate component"):
        sd.models.compose(sd.models.powerlaw(), sd.models.powerlaw())


# -- regions ------------------------------------------------------------------------------
def test_region_parameter_counts_and_catalogue():
    hb = sd.models.region("hbeta", host=False)  # the host's 5 parameters: tests/test_host.py
    assert hb.n_free == 20 and hb.window == (4400.0, 5600.0)
    assert set(hb.metadata["lines"]) == {"hbeta_broad", "hbeta_narrow", "oiii5007", "oiii4959", "heii4686"}
    assert hb.metadata["continuum"] == ["powerlaw", "feii"] and hb.metadata["region"] == "hbeta"
    assert hb.metadata["continuum_ref_wavelength"] == 5100.0
    assert hb.params["oiii4959_flux"].tie == ("oiii4959_flux", "oiii5007_flux", "/", 2.98)
    assert sd.models.region("hbeta", share_narrow=True, host=False).n_free == 18
    assert sd.models.region("hbeta", n_broad=3, feii=False, host=False).n_free == 20 - 3 + 3
    ha = sd.models.region("halpha", host=False)
    assert {"halpha_broad", "halpha_narrow", "nii6584", "nii6548", "sii6717", "sii6731", "oi6300", "oi6364"} == set(ha.metadata["lines"])
    assert ha.n_free == 2 + 6 + 3 + 1 + 2 + 1  # [OI] 6300 flux ([OI] 6364 = 6300 / 3; kinematics of narrow H-alpha)
    assert ha.params["oi6364_flux"].tie == ("oi6364_flux", "oi6300_flux", "/", 3.0)
    # the continuum is fitted first on the line-free windows, then the lines on top
    assert hb.continuum_stage.model.param_names == ["powerlaw_norm", "powerlaw_index", "feii_amplitude", "feii_fwhm", "feii_shift"]
    assert hb.continuum_stage.windows == ((4435.0, 4640.0), (5100.0, 5535.0))
    assert sd.models.region("hbeta", continuum="joint").continuum_stage is None
    assert set(sd.models.region("mgii").metadata["lines"]) == {"mgii_broad", "mgii_narrow"}
    assert set(sd.models.region("civ").metadata["lines"]) == {"civ_broad", "heii1640", "oiii1663"}
    assert sd.models.region("mgii", balmer=True).metadata["continuum"] == ["powerlaw", "balmer", "feii"]
    for p in hb.params:  # documented bounds
        if p.name.endswith("_fwhm") and p.name.startswith("hbeta_broad"):
            assert (p.min, p.max) == (1000.0, 20000.0)
        if p.name == "heii4686_fwhm":  # capped: wider, it fills the gap between the continuum window and H-beta
            assert (p.min, p.max) == (1000.0, 10000.0)
        if p.name.endswith("_fwhm") and p.name.startswith(("hbeta_narrow", "oiii")):
            assert (p.min, p.max) == (100.0, 1200.0)
        if p.name.endswith(("_flux", "_norm", "_amplitude")):
            assert p.min == 0.0
    with pytest.raises(ModelError, match="unknown"):
        sd.models.region("lyalpha")
    with pytest.raises(ModelError, match="n_broad"):
        sd.models.region("hbeta", n_broad=0)


def test_region_model_under_jit_vmap_and_jacobian():
    m = sd.models.region("hbeta")
    x = sdss_grid(4400.0, 5600.0)
    raw = jnp.tile(m.params.raw_init(), (3, 1)) + jnp.linspace(-0.1, 0.1, 3)[:, None]

    def resid(r):
        return m.func(jnp.asarray(x), m.params.raw_to_phys(r))

    y = jax.jit(jax.vmap(resid))(raw)
    J = jax.jit(jax.vmap(jax.jacfwd(resid)))(raw)
    assert y.shape == (3, x.size) and J.shape == (3, x.size, 27)  # 20 + the host's 5 weights, dispersion, shift
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(J))
    # float32 path
    y32 = jax.jit(m.func)(jnp.asarray(x, jnp.float32), jnp.asarray(m.params.values, jnp.float32))
    assert y32.dtype == jnp.float32 and np.all(np.isfinite(y32))
    np.testing.assert_allclose(y32, jax.jit(m.func)(jnp.asarray(x), jnp.asarray(m.params.values)), rtol=2e-4)


def test_initializer_close_to_truth_on_synthetic():
    ds = synthetic_spectra(60, seed=3, n_all_nan=2)
    m = sd.models.region("hbeta", host=False)  # quasar-only truth (the host's start: tests/test_host.py)
    init = m.initial_values(ds.wavelength.values, ds.flux.values, ds.ivar.values)
    assert init.shape == (60, m.n_params) and np.all(np.isfinite(init))
    lo, hi = m.params.lower, m.params.upper
    assert np.all((init >= lo) & (init <= hi))
    ok = ~ds.all_nan.values
    truth = ds.true_params.values[ok]
    got = init[ok]
    idx = m.params.index
    assert np.all(np.abs(got[:, idx("powerlaw_norm")] / truth[:, idx("powerlaw_norm")] - 1) < 0.10)
    broad = [idx("hbeta_broad1_flux"), idx("hbeta_broad2_flux")]
    r_broad = got[:, broad].sum(1) / truth[:, broad].sum(1)
    r_oiii = got[:, idx("oiii5007_flux")] / truth[:, idx("oiii5007_flux")]
    assert np.mean((r_broad > 0.5) & (r_broad < 2)) >= 0.95
    assert np.mean((r_oiii > 0.5) & (r_oiii < 2)) >= 0.95
    assert np.median(np.abs(got[:, idx("oiii5007_shift")] - truth[:, idx("oiii5007_shift")])) < 100.0
    # exact tie in the initial values; all-NaN spectra get the defaults
    np.testing.assert_allclose(init[:, idx("oiii4959_flux")] * 2.98, init[:, idx("oiii5007_flux")], rtol=1e-12)
    # per-spectrum (2-D) wavelength gives the same answer
    wl2 = np.broadcast_to(ds.wavelength.values, ds.flux.shape)
    np.testing.assert_allclose(m.initial_values(wl2, ds.flux.values, ds.ivar.values), init, rtol=1e-8)


def test_gaussian_sum_jvp_matches_autodiff():
    x = jnp.linspace(4700.0, 5100.0, 300)
    rest = jnp.array([4862.68, 5008.24, 4960.30])

    def summed(p):
        return profiles.gaussian_sum(x, p[0:3], p[3:6], p[6:9], rest)

    def plain(p):
        return jnp.sum(profiles.gaussian(x[None], p[0:3, None], p[3:6, None], p[6:9, None], rest[:, None]), axis=0)

    p0 = jnp.array([5.0, 2.0, 0.7, 300.0, -150.0, -150.0, 4000.0, 500.0, 500.0])
    np.testing.assert_allclose(jax.jit(summed)(p0), jax.jit(plain)(p0), rtol=1e-12)
    np.testing.assert_allclose(jax.jit(jax.jacfwd(summed))(p0), jax.jit(jax.jacfwd(plain))(p0), rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(jax.jit(jax.jacrev(summed))(p0), jax.jit(jax.jacfwd(plain))(p0), rtol=1e-9, atol=1e-15)
    # derivative with respect to wavelength too (used by nobody, but must be right)
    dx = jax.jit(jax.jacfwd(lambda xx: profiles.gaussian_sum(xx, p0[0:3], p0[3:6], p0[6:9], rest)))(x)
    dx_ref = jax.jit(jax.jacfwd(lambda xx: jnp.sum(profiles.gaussian(xx[None], p0[0:3, None], p0[3:6, None], p0[6:9, None], rest[:, None]), 0)))(x)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("name", ["halpha", "mgii", "civ"])
def test_other_region_initializers_finite_and_in_bounds(name):
    ds = synthetic_spectra(12, region=name, seed=1, masked_fraction=0.5)
    m = sd.models.region(name, host=False)  # quasar-only truth
    init = m.initial_values(ds.wavelength.values, ds.flux.values, ds.ivar.values)
    assert np.all(np.isfinite(init)) and np.all((init >= m.params.lower) & (init <= m.params.upper))
    i = m.params.index("powerlaw_norm")
    # MgII: the UV FeII pseudo-continuum covers the whole 250 A window, so the power law is
    # less well separated at the start (the fit separates them)
    np.testing.assert_allclose(init[:, i], ds.true_params.values[:, i], rtol=0.2 if name == "mgii" else 0.1)
    broad = [m.params.index(f"{c}_flux") for c in m.metadata["lines"][f"{name}_broad"]["components"]]
    ratio = init[:, broad].sum(1) / ds.true_params.values[:, broad].sum(1)
    assert np.all((ratio > 0.5) & (ratio < 2.0))
