"""Host-galaxy starlight (issue 14): templates, the component, regions, derived quantities,
synthetic spectra; the real-data validation (leave-one-out on the SDSS GALAXY spectra, the
low-luminosity quasars) is marked slow."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import sheap_dask as sd
from sheap_dask.derived import host as dhost
from sheap_dask.derived import lines as dlines
from sheap_dask.errors import InputDataError, ModelError
from sheap_dask.models import host as mhost

REPO = Path(__file__).resolve().parents[1]


def _validate_host_script():
    """``scripts/validate_host.py`` as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("validate_host", REPO / "scripts" / "validate_host.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_readme_host_table_is_the_recorded_validation():
    """The README's before/after table is what scripts/validate_host.py renders from its record
    (benchmarks/results/host_validation.jsonl): rerun it with --record when the fits change."""
    script = _validate_host_script()
    rows = script.load()
    assert {(r["region"], r["host"]) for r in rows} == {(reg, h) for reg in script.REGIONS for h in (False, True)}
    spectra = {r["spectrum"] for r in rows}
    assert set(script.QUASARS) | set(script.GALAXIES) <= spectra
    epochs = [r for r in rows if r["spectrum"] not in set(script.QUASARS) | set(script.GALAXIES)]
    assert len(epochs) == 20 and {r["templates"] for r in epochs} == {"sdss", "sdss+ssp"}  # RM017: 10 epochs, 2 sets
    readme = (REPO / "README.md").read_text()
    block = readme.split(script.BEGIN)[1].split(script.END)[0]
    assert block.strip() == script.render_all().strip()
    bench = script.load(script.BENCH_RECORD)[-1]
    assert bench["benchmark"] == "host" and 0 < bench["cost_ratio"] < 10
    # per template set: the last default line, then the last line of each alternative
    recorded = script.load(script.BENCH_RECORD)
    default = [r for r in recorded if r.get("templates", "sdss") == mhost.DEFAULT_TEMPLATE and script.variant(r) == ("refined", True)][-1]
    joint = dict(default, continuum="joint", restarts=False, cost_ratio=1.01)
    older = dict(default, cost_ratio=9.99)
    text = script.render_all([older, joint, default])
    assert "9.99x" not in text and "**" + f"{default['cost_ratio']:.2f}x**" in text
    assert text.index("**" + f"{default['cost_ratio']:.2f}x**") < text.index("`continuum=\"joint\"` with the LM restarts off") < text.index("1.01x")
    assert "--continuum joint --no-restarts --record" in text and "mastar" not in text.split("\n\n", 1)[1]


# -- templates --------------------------------------------------------------------------------
def test_builtin_templates_provenance_and_normalisation():
    m = mhost.builtin_templates("mastar")  # the MaStar stellar populations
    assert m.name == "mastar" and m.k == 6 and mhost.load_host_template("mastar") is m
    assert mhost.load_host_template(None) is mhost.builtin_templates("sdss+ssp") is mhost.builtin_templates()  # the default
    assert mhost.sdss_templates() is mhost.builtin_templates("sdss")
    assert m.names[0] == "A00.100-Z+0.00" and m.names[-1] == "A14.000-Z-1.35"
    lo, hi = m.range
    assert lo < 3710 and hi > 8000
    assert m.sigma0 == pytest.approx(120.0) and m.sigma_inst == pytest.approx(60.9)
    assert "MaStar" in m.provenance and "BSD-3-Clause" in m.provenance and "licence" in m.provenance
    at = m.evaluate_numpy(np.linspace(5080, 5120, 41))
    np.testing.assert_allclose(at.mean(axis=1), 1.0, rtol=0.02)
    assert np.all(m.flux > 0)
    # older populations are redder: the 4000 A-side flux falls with age
    blue = m.evaluate_numpy([4200.0])[:, 0]
    assert np.all(np.diff(blue[:5]) < 0)
    with pytest.raises(ModelError, match="not a built-in set"):
        mhost.builtin_templates("miles")
    t = mhost.sdss_templates()
    assert t.k == 3 and t.names == ["spec_0266_51602_0013", "spec_0266_51602_0107", "spec_0295_51585_0596"]
    lo, hi = t.range
    assert lo < 3450 and hi > 8000
    assert t.sigma0 == pytest.approx(239.0, abs=1) and t.sigma_inst == pytest.approx(61, abs=3)
    assert "SDSS" in t.provenance and "licence" in t.provenance
    at = t.evaluate_numpy(np.linspace(5080, 5120, 41))
    np.testing.assert_allclose(at.mean(axis=1), 1.0, rtol=0.02)  # weight = flux density at 5100 A
    assert np.all(np.isfinite(t.density)) and np.all(t.flux[:, t.wavelength > 3600] > 0)  # noisy below 3600 A


def test_combined_templates_broaden_to_one_dispersion():
    """"sdss+ssp": the three SDSS galaxies and MaStar's 3 and 14 Gyr solar populations on one
    grid at the galaxies' dispersion; combine_templates is the public way to make such sets."""
    t = mhost.builtin_templates("sdss+ssp")
    assert mhost.load_host_template("sdss+ssp") is t and t.k == 5
    assert t.names == ["sdss:spec_0266_51602_0013", "sdss:spec_0266_51602_0107", "sdss:spec_0295_51585_0596",
                       "mastar:A03.000-Z+0.00", "mastar:A14.000-Z+0.00"]
    galaxies, populations = mhost.sdss_templates(), mhost.builtin_templates("mastar")
    assert t.sigma0 == galaxies.sigma0 and t.sigma_inst == galaxies.sigma_inst
    assert t.range[0] >= populations.range[0] and t.range[1] <= galaxies.range[1]
    assert "SDSS" in t.provenance and "MaStar" in t.provenance
    lam = np.linspace(4000.0, 7000.0, 3001)
    np.testing.assert_allclose(t.evaluate_numpy(np.linspace(5080, 5120, 41)).mean(axis=1), 1.0, rtol=0.02)
    # each column is its source template, broadened to sigma_0 = 239 km/s (the galaxies: not at
    # all), up to the normalisation at 5100 A
    extra = np.sqrt(t.sigma0**2 - populations.sigma0**2)
    for combined, source in [(t.evaluate_numpy(lam)[:3], galaxies.evaluate_numpy(lam)),
                             (t.evaluate_numpy(lam)[3:], populations.evaluate_numpy(lam, sigma_kms=extra)[[3, 4]])]:
        ratio = combined / source
        np.testing.assert_allclose(ratio, np.broadcast_to(ratio.mean(axis=1, keepdims=True), ratio.shape), rtol=2e-3)
    # unbroadened, the populations' Mg b trough would be deeper: the broadening is applied
    raw = populations.evaluate_numpy(lam)[[3, 4]]
    mgb = np.abs(lam - 5177.0) < 3
    assert np.all(raw[:, mgb].min(axis=1) < t.evaluate_numpy(lam)[3:, mgb].min(axis=1) - 0.005)
    assert sd.models.host_component(template="sdss+ssp").param_names[:5] == [f"host_w{k}" for k in range(1, 6)]
    assert sd.models.region("hbeta", host_template="sdss+ssp").n_free == 27
    assert sd.models.region("hbeta", host_template="sdss+ssp").identity() != sd.models.region("hbeta").identity()
    # your own combination; errors name the argument and the fix
    one = mhost.combine_templates(["sdss", "mastar"], select=[["spec_0266_51602_0107"], None], name="mine")
    assert one.k == 7 and one.name == "mine" and one.names[0] == "sdss:spec_0266_51602_0107"
    with pytest.raises(ModelError, match="select has 1 entries for 2 sets"):
        mhost.combine_templates(["sdss", "mastar"], select=[None])
    with pytest.raises(ModelError, match="no template 'A99'"):
        mhost.combine_templates(["sdss", "mastar"], select=[None, ["A99"]])
    far = mhost.load_host_template((np.linspace(6000.0, 7000.0, 500), np.ones(500)), norm_wavelength=6500.0)
    with pytest.raises(ModelError, match="misses the normalisation wavelength"):
        mhost.combine_templates(["sdss", far])


def test_user_templates_arrays_and_file(tmp_path):
    wl = np.linspace(4000.0, 6000.0, 800)
    one = 1.0 + 0.1 * np.sin(wl / 50.0)
    t1 = mhost.load_host_template((wl, one))
    assert t1.k == 1
    two = np.stack([one, 2.0 * np.ones_like(wl)])
    t2 = mhost.load_host_template((wl, two), names=["a", "b"], sigma0=150.0)
    assert t2.names == ["a", "b"] and t2.sigma0 == 150.0
    band = np.abs(wl - 5100.0) <= 20.0
    expected = (1.0 + 0.1 * np.sin(5100.0 / 50.0)) / one[band].mean()
    np.testing.assert_allclose(t2.evaluate_numpy([5100.0])[:, 0], [expected, 1.0], rtol=0.02)
    t3 = mhost.load_host_template((wl, two.T))  # (n, K) columns
    np.testing.assert_allclose(t3.density, t2.density)
    path = tmp_path / "tmpl.csv"
    with open(path, "w") as fh:
        fh.write("# my templates\n# sigma_0_kms = 180\nwavelength,young,old\n")
        for w, a, b in zip(wl, one, two[1]):
            fh.write(f"{w},{a},{b}\n")
    t4 = mhost.load_host_template(path)
    assert t4.names == ["young", "old"] and t4.sigma0 == 180.0
    np.testing.assert_allclose(t4.density, t2.density, rtol=1e-6)
    c = sd.models.host_component(template=str(path), window=(4500.0, 5500.0))
    assert c.param_names == ["host_w1", "host_w2", "host_sigma", "host_shift"]
    with pytest.raises(ModelError, match="not understood"):
        mhost.load_host_template(42)
    with pytest.raises(ModelError, match="strictly increasing"):
        mhost.load_host_template((wl[::-1], one))
    with pytest.raises(ModelError, match="normalisation wavelength"):
        mhost.load_host_template((np.linspace(6000, 7000, 100), np.ones(100)))
    with pytest.raises(ModelError, match="does not exist"):
        mhost.load_host_template(tmp_path / "missing.csv")


def test_component_values_and_jvp():
    import jax
    import jax.numpy as jnp

    c = sd.models.host_component(template="sdss", window=(4400.0, 5600.0))
    assert c.kind == "host" and c.continuum and c.flux_params == ("w1", "w2", "w3")
    tmpl = c.info["template_obj"]
    wl = np.linspace(4400.0, 5600.0, 400)
    p = np.array([1.0, 0.5, 0.3, 150.0, 100.0])
    with jax.enable_x64(True):
        f = lambda q: c.func(jnp.asarray(wl), q)  # noqa: E731
        np.testing.assert_allclose(np.asarray(f(jnp.asarray(p))), tmpl.evaluate_numpy(wl, 150.0, 100.0).T @ p[:3], rtol=1e-9, atol=1e-12)
        for j in range(5):
            t = np.zeros(5)
            t[j] = 1.0
            _, tan = jax.jvp(f, (jnp.asarray(p),), (jnp.asarray(t),))
            h = 1e-4 * max(1.0, abs(p[j]))
            fd = (f(jnp.asarray(p + h * t)) - f(jnp.asarray(p - h * t))) / (2 * h)
            np.testing.assert_allclose(np.asarray(tan), np.asarray(fd), atol=1e-8 * max(1.0, float(jnp.max(jnp.abs(fd)))))
    # shift moves the features: the Mg b trough follows a +300 km/s shift
    a = tmpl.evaluate_numpy(wl, 100.0, 0.0)[0]
    b = tmpl.evaluate_numpy(wl * (1 + 300 / 299792.458), 100.0, 300.0)[0]
    np.testing.assert_allclose(a[50:-50], b[50:-50], rtol=1e-2)


def test_component_bounds_and_coverage():
    with pytest.raises(ModelError, match="FFT padding"):
        sd.models.host_component(sigma=(100.0, 0.0, 2000.0))
    with pytest.raises(ModelError, match=">= 0 km/s"):
        sd.models.host_component(sigma=(100.0, -10.0, 300.0))
    with pytest.raises(ModelError, match="'sdss' covers 3400-8046 A"):
        sd.models.host_component(template="sdss", window=(2200.0, 3090.0))
    with pytest.raises(ModelError, match="'sdss\\+ssp' covers 3701-8045 A"):
        sd.models.host_component(window=(2200.0, 3090.0))  # the default
    with pytest.raises(ModelError, match="covers 3701-8046 A"):
        sd.models.host_component(template="mastar", window=(2200.0, 3090.0))


# -- regions -----------------------------------------------------------------------------------
def test_region_host_rule_and_metadata():
    hb, ha = sd.models.region("hbeta"), sd.models.region("halpha")
    assert hb.metadata["host"] == ["host"] and ha.metadata["host"] == ["host"]  # "auto": window >= 3500 A
    assert sd.models.region("mgii").metadata["host"] == [] and sd.models.region("civ").metadata["host"] == []
    assert "host" not in hb.metadata["continuum"]  # luminosities and EWs: AGN continuum only
    assert hb.n_free == 27 and sd.models.region("hbeta", host=False).n_free == 20  # 5 template weights, sigma, shift
    weights = {f"host_w{k}" for k in range(1, 6)}
    assert weights | {"host_sigma", "host_shift"} <= set(hb.continuum_stage.model.param_names)
    assert set(hb.flux_params) >= weights
    assert sd.models.region("hbeta", host_template="mastar").n_free == 28
    assert hb.metadata["region_spec"]["kwargs"]["host"] is True
    assert sd.models.region("hbeta", host=False).metadata["region_spec"]["kwargs"]["host"] is False
    assert hb.identity() != sd.models.region("hbeta", host=False).identity()
    assert hb.identity() == sd.models.region("hbeta", host="auto").identity()
    assert sd.models.region("hbeta", window=(3400.0, 5600.0)).metadata["host"] == []  # starts blueward of 3500 A
    # "auto" asks a built-in set to cover the window: the default starts at 3701 A, "sdss" at 3400 A
    assert sd.models.region("hbeta", window=(3600.0, 5600.0)).metadata["host"] == []
    assert sd.models.region("hbeta", window=(3600.0, 5600.0), host_template="sdss").metadata["host"] == ["host"]
    with pytest.raises(ModelError, match="'sdss\\+ssp' covers 3701-8045"):
        sd.models.region("hbeta", window=(3600.0, 5600.0), host=True)
    with pytest.raises(ModelError, match="covers 3701-8045"):
        sd.models.region("mgii", host=True)
    with pytest.raises(ModelError, match="True, False or 'auto'"):
        sd.models.region("hbeta", host="yes")
    user = sd.models.region("hbeta", host_template=(np.linspace(4000, 6000, 500), np.ones(500)))
    assert "region_spec" not in user.metadata and user.param_names.count("host_w1") == 1 and "host_w2" not in user.param_names


def test_initializer_starts_host_inside_bounds():
    ds = sd.synthetic.synthetic_spectra(6, seed=2, host=True, masked_fraction=0.0, n_all_nan=0)
    m = sd.models.region("hbeta")
    init = m.initial_values(ds.wavelength.values, ds.flux.values, ds.ivar.values)
    names = m.param_names
    weights = [n for n in names if n.startswith("host_w")]
    w = init[:, [names.index(n) for n in weights]]
    assert np.all(np.isfinite(init)) and np.all(w > 0)
    total = w.sum(1)
    true_total = ds.true_params.sel(param=weights).values.sum(1)
    assert np.corrcoef(total, true_total)[0, 1] > 0.5  # the linear solve sees the starlight


def test_host_dispersion_at_zero_is_not_a_restart_suspect(monkeypatch):
    """No extra dispersion (the kernel depends on sigma^2: a stationary bound) does not send a
    spectrum to the restarts; a template weight at 0 and a width at its bound do."""
    from sheap_dask import rescue
    from sheap_dask.batch import ChunkArrays
    from sheap_dask.compiled import get_compiled
    from sheap_dask.options import ChunkOptions

    model = sd.models.region("hbeta").continuum_stage.model
    options = ChunkOptions().resolved()
    compiled = get_compiled(model, options)
    names = list(compiled.names)
    assert [n for n, r in zip(names, compiled.resting_bound_mask) if r] == ["host_sigma"]
    assert model.metadata["components"]["host"]["resting_bounds"] == ["host_sigma"]
    n = 7
    lower, upper = np.tile(compiled.lower, (n, 1)), np.tile(compiled.upper, (n, 1))
    params = np.tile(np.asarray(model.params.values, dtype=float), (n, 1))
    params[4, names.index("host_sigma")] = 0.0  # above the median, dispersion unresolved
    params[5, names.index("feii_fwhm")] = lower[5, names.index("feii_fwhm")]  # above the median, a width pinned
    params[6, names.index("host_w2")] = 0.0  # above the median, a template unused
    out = {"params": params, "status": np.zeros(n, np.int8), "redchi2": np.array([1.0, 1.0, 1.0, 1.0, 1.01, 1.01, 1.01]),
           "dof": np.full(n, 1000), "loss": np.ones(n), "chi2": np.ones(n), "n_iter": np.zeros(n, np.int32)}
    chunk = ChunkArrays(wl=np.linspace(4400.0, 5600.0, 50), flux=np.ones((n, 50)), errors=np.ones((n, 50)), lower=lower, upper=upper,
                        start=params.copy(), good=np.ones(n, bool), batch=n, n_usable=np.full(n, 50), dtype=np.dtype("float64"))
    solved = []

    def no_better_fit(compiled, chunk, start, rows):
        solved.append(rows.size)
        k = rows.size
        return {"status": np.full(k, sd.Status.FAILED, np.int8), "loss": np.full(k, np.nan), "params": start[rows], "chi2": np.ones(k),
                "n_iter": np.zeros(k, np.int32), "jtwj": np.zeros((k, compiled.n_free, compiled.n_free))}

    monkeypatch.setattr(rescue, "solve", no_better_fit)
    jtwj = np.zeros((n, compiled.n_free, compiled.n_free))
    assert rescue.restart_suspects(out, jtwj, compiled, chunk, options) == 2  # spectra 5 and 6
    assert solved == [4]  # their two starts each


def test_unresolved_host_dispersion_error_is_nan_without_errors_undefined():
    """Towards host_sigma = 0 the model's derivative in sigma vanishes, so its error is NaN for
    small dispersions (rounding decides which): that NaN stays in params_err but does not raise
    errors_undefined; a NaN error of any other parameter still does."""
    from sheap_dask.chunk import fit_chunk

    model = sd.models.region("hbeta").continuum_stage.model
    names = model.param_names
    wl = np.linspace(4400.0, 5600.0, 900)
    sigmas = [0.0, 0.0, 0.5, 1.0, 2.0, 3.0, 5.0, 150.0]
    truth = np.tile(np.asarray(model.params.values, dtype=float), (len(sigmas), 1))
    truth[:, names.index("host_w1")] = 3.0
    truth[:, names.index("host_sigma")] = sigmas
    flux = model.evaluate(wl, truth)
    err = 0.02 * np.median(flux, axis=1, keepdims=True) * np.ones_like(flux)
    out = fit_chunk(model, wl, flux + np.random.default_rng(1).normal(size=flux.shape) * err, 1 / err**2)
    nan_err = np.isnan(out["params_err"])
    # FeII at zero flux leaves its width and shift undefined, which is not flagged either
    # (README, "Errors": an undetected component)
    idle = out["at_bound"][:, names.index("feii_amplitude")]
    nan_err[idle, names.index("feii_fwhm")] = nan_err[idle, names.index("feii_shift")] = False
    sigma_only = nan_err[:, names.index("host_sigma")] & (nan_err.sum(axis=1) == 1)
    assert sigma_only.any()  # the case this is about happens here
    flagged = (out["quality"] & sd.Quality.ERRORS_UNDEFINED) != 0
    others = np.delete(nan_err, names.index("host_sigma"), axis=1).any(axis=1)
    np.testing.assert_array_equal(flagged, others)


def test_restricted_host_grid_has_a_fast_fft_length():
    """The restricted template grid is widened (with the templates' own data) to a 2^a 3^b 5^c
    length, and the widening changes nothing inside the window."""
    from sheap_dask.models.host import builtin_templates

    full = builtin_templates("sdss")
    cut = full.restricted(4400.0, 5600.0)
    n = cut.n
    for p in (2, 3, 5):
        while n % p == 0:
            n //= p
    assert n == 1
    wl = np.linspace(4400.0, 5600.0, 400)
    np.testing.assert_allclose(cut.evaluate_numpy(wl, 150.0, 80.0), full.evaluate_numpy(wl, 150.0, 80.0), rtol=1e-6, atol=1e-9)


# -- derived ---------------------------------------------------------------------------------
def test_derived_host_fraction_dispersion_luminosity():
    m = sd.models.region("hbeta")
    p = np.array(m.params.values, dtype=float)
    names = m.param_names
    p[names.index("powerlaw_norm")] = 10.0
    p[names.index("powerlaw_index")] = -1.5
    weights = (3.0, 2.0, 5.0, 1.0, 4.0)
    for k, w in enumerate(weights, start=1):
        p[names.index(f"host_w{k}")] = w
    p[names.index("host_sigma")] = 0.0
    p[names.index("host_shift")] = 0.0
    tmpl = m.component_objects["host"].info["template_obj"].parent
    for lam in (4200.0, 5100.0):
        h = float(tmpl.evaluate_numpy([lam]).T[0] @ weights)
        c = 10.0 * (lam / 5100.0) ** -1.5
        v, e = dhost.host_fraction(m, lam, p)
        assert v == pytest.approx(h / (h + c), rel=1e-5)
    assert dhost.frac_host_5100(m, p)[0] == pytest.approx(dhost.host_fraction(m, 5100.0, p)[0])
    pe = np.zeros_like(p)
    pe[names.index("host_w1")] = 0.5
    v, e = dhost.frac_host_4200(m, np.stack([p, p]), np.stack([pe, pe]))
    assert v.shape == (2,) and np.all(e > 0)
    p[names.index("host_sigma")] = 200.0
    s, _ = dhost.stellar_dispersion(m, p)
    assert s == pytest.approx(np.sqrt(239.0**2 + 200.0**2 - 60.9**2), rel=1e-3)
    # AGN-only luminosity: the host never enters the default continuum
    assert dlines.continuum_names(m) == ["powerlaw"]
    agn, _ = dhost.agn_luminosity(m, 5100.0, p, redshift=0.1)
    plain, _ = sd.derived.luminosity.luminosity(m, 5100.0, p, redshift=0.1)
    both, _ = sd.derived.luminosity.luminosity(m, 5100.0, p, redshift=0.1, continuum=["powerlaw", "host"])
    star, _ = dhost.host_luminosity(m, 5100.0, p, redshift=0.1)
    assert agn == pytest.approx(plain) and both == pytest.approx(agn + star, rel=1e-6)
    with pytest.raises(ModelError, match="no host-galaxy component"):
        dhost.host_fraction(sd.models.region("mgii"), 3000.0, np.asarray(sd.models.region("mgii").params.values))


# -- synthetic -------------------------------------------------------------------------------------
def test_synthetic_host_option():
    plain = sd.synthetic.synthetic_spectra(5, seed=4)
    assert plain.true_params.sizes["param"] == 23 and "true_frac_host_5100" not in plain
    ds = sd.synthetic.synthetic_spectra(5, seed=4, host=True, host_fraction=(0.2, 0.6))
    assert ds.attrs["host"] == 1 and ds.true_params.sizes["param"] == 30
    f = ds.true_frac_host_5100.values
    assert np.all((f > 0.15) & (f < 0.65))  # broadening moves it a little off the drawn value
    assert np.all(ds.true_frac_host_4200.values < f)  # starlight is redder than a quasar
    # the AGN truth is drawn first: the same lines with and without a host
    np.testing.assert_array_equal(plain.true_params.sel(param="hbeta_broad1_fwhm"), ds.true_params.sel(param="hbeta_broad1_fwhm"))
    again = sd.synthetic.synthetic_spectra(5, seed=4, host=True, host_fraction=(0.2, 0.6))
    np.testing.assert_array_equal(again.flux.values, ds.flux.values)
    with pytest.raises(InputDataError, match="host_fraction"):
        sd.synthetic.synthetic_spectra(5, host=True, host_fraction=(0.5, 1.0))


def test_synthetic_recovery_and_accessor():
    """Host fraction within 0.1 and broad H-beta FWHM within 10% at S/N >= 10 (the issue's
    target, >= 90%, is measured on 3600 spectra by benchmarks/bench_host.py; 48 spectra here:
    one spectrum is 2% and the binomial error at the benchmark's ~88-91% is ~4.5%, so the bar
    is 80%, two such errors below)."""
    import dask

    ds = sd.synthetic.synthetic_spectra(48, seed=11, host=True, snr=(10.0, 40.0), masked_fraction=0.0, n_all_nan=0)
    model = sd.models.region("hbeta")
    with dask.config.set(scheduler="synchronous"):
        fits = sd.fit_dataset(ds, model, progress=False).compute()
    fits.sheap.use(model=model, spectra=ds)
    f51 = fits.sheap.frac_host_5100(errors=True).compute()
    assert f51.frac_host_5100.attrs["units"] == "1"
    err = np.abs(f51.frac_host_5100.values - ds.true_frac_host_5100.values)
    assert np.mean(err <= 0.1) >= 0.8, err
    true_fwhm = np.asarray(dlines.fwhm(model, "hbeta_broad", ds.true_params.values)[0])
    fw = np.asarray(dlines.fwhm(model, "hbeta_broad", fits.params.values)[0])
    assert np.mean(np.abs(fw / true_fwhm - 1) <= 0.1) >= 0.85
    f42 = fits.sheap.frac_host_4200().values
    assert np.mean(np.abs(f42 - ds.true_frac_host_4200.values) <= 0.1) >= 0.85
    sig = fits.sheap.stellar_dispersion().values
    assert np.all((sig > 200) & (sig < 600))


def test_refined_continuum_uses_the_whole_window():
    """continuum="refined" (the default with a host): the staged fit, then the continuum
    refined over the whole window with the lines held. The reported chi-square is the refined model's; the host fraction
    comes closer to the truth than the windows' fit on the same spectra, and its errors
    stay honest (the truth within one error for about 68% of spectra)."""
    from sheap_dask.chunk import ChunkOptions, fit_chunk

    windows = sd.models.region("hbeta", host=True, continuum="windows")
    refined = sd.models.region("hbeta", host=True)
    assert refined.identity() == sd.models.region("hbeta", host=True, continuum="refined").identity() != windows.identity()
    assert refined.continuum_stage.refine_steps == 2 and windows.continuum_stage.refine_steps == 0
    assert sd.models.region("hbeta", host=False).continuum_stage.refine_steps == 0
    ds = sd.synthetic.synthetic_spectra_numpy(96, seed=5, host=True, model=windows, masked_fraction=0.0, n_all_nan=0)
    wl, flux, ivar = ds["wavelength"], ds["flux"].astype(np.float64), ds["ivar"].astype(np.float64)
    opts = ChunkOptions(absorber_iterations=0)  # every pixel counts in the chi-square below
    outs = {name: fit_chunk(m, wl, flux, ivar, options=opts) for name, m in (("windows", windows), ("refined", refined))}
    out = outs["refined"]
    model_flux = refined.evaluate(wl, out["params"])
    inside = (wl >= refined.window[0]) & (wl <= refined.window[1])
    chi2 = np.sum(np.where(inside, ivar * (flux - model_flux) ** 2, 0.0), axis=1)
    # the lines' stage sums its chi-square in float32 (a 1e-6 relative round-off, whose
    # digits depend on the CPU's vector width); the unrefined fit's differs by 3e-3 (median)
    np.testing.assert_allclose(out["chi2"], chi2, rtol=1e-5)
    truth = ds["true_frac_host_5100"]
    errors = {}
    for name, o in outs.items():
        f51, f51_err = (np.asarray(a) for a in dhost.frac_host_5100(windows if name == "windows" else refined, o["params"], cov=o["params_cov"]))
        errors[name] = np.abs(f51 - truth)
        if name == "refined":
            pull = errors[name] / f51_err
            # the windows' errors, kept: honest or on the large side, never over-confident
            assert np.mean(pull <= 1) >= 0.6 and np.mean(pull <= 2) >= 0.9, (np.mean(pull <= 1), np.mean(pull <= 2))
    assert np.median(errors["refined"]) < np.median(errors["windows"]), {k: np.median(v) for k, v in errors.items()}
    with pytest.raises(ModelError, match="'refined'"):
        sd.models.region("hbeta", continuum="window")
    from sheap_dask.model import ContinuumStage

    stage = refined.continuum_stage
    with pytest.raises(ModelError, match="refine_steps=-1"):
        ContinuumStage(stage.model, stage.windows, lines=stage.lines, refine_steps=-1)
    with pytest.raises(ModelError, match="needs lines"):
        ContinuumStage(stage.model, stage.windows, refine_steps=1)


def test_joint_steps_polish_the_detected_lines_with_the_continuum():
    """continuum="refined" ends with Gauss-Newton steps of the continuum and the detected lines
    together: each spectrum's objective only goes down, the host fraction comes closer to the
    truth than without the steps, and a broad line the staged fit did not detect stays where
    the staged fit left it (the steps cannot switch on a broad line)."""
    from sheap_dask.chunk import ChunkOptions, fit_chunk
    from sheap_dask.model import ContinuumStage
    from sheap_dask.models.regions import JOINT_STEPS
    from sheap_dask.outcome import model_lines

    joint = sd.models.region("hbeta", host=True)
    stage = joint.continuum_stage
    assert stage.joint_steps == JOINT_STEPS > 0
    assert sd.models.region("hbeta", host=True, continuum="windows").continuum_stage.joint_steps == 0
    staged = sd.models.region("hbeta", host=True)
    staged.continuum_stage = ContinuumStage(stage.model, stage.windows, lines=stage.lines, refine_steps=stage.refine_steps)
    assert staged.identity() != joint.identity() and stage.spec()["joint_steps"] == JOINT_STEPS
    ds = sd.synthetic.synthetic_spectra_numpy(200, seed=11, host=True, model=joint, masked_fraction=0.0, n_all_nan=0)
    wl, ivar = ds["wavelength"], ds["ivar"].astype(np.float64)
    truth = ds["true_params"].copy()
    # the last 40 without broad H-beta: the staged fit finds none there
    no_broad = np.arange(len(truth)) >= 160
    truth[np.ix_(no_broad, [joint.param_names.index(n) for n in ("hbeta_broad1_flux", "hbeta_broad2_flux")])] = 0.0
    rng = np.random.default_rng(0)
    flux = joint.evaluate(wl, truth) + rng.normal(size=ivar.shape) / np.sqrt(ivar)
    opts = ChunkOptions(absorber_iterations=0)
    outs = {name: fit_chunk(m, wl, flux, ivar, options=opts) for name, m in (("staged", staged), ("joint", joint))}
    assert np.all(outs["joint"]["loss"] <= outs["staged"]["loss"] * (1 + 1e-6) + 1e-9)
    moved = np.any(outs["joint"]["params"] != outs["staged"]["params"], axis=1)
    assert moved[~no_broad].mean() > 0.5
    errors = {name: np.abs(np.asarray(dhost.frac_host_5100(joint, o["params"])[0]) - ds["true_frac_host_5100"])[~no_broad]
              for name, o in outs.items()}
    assert np.mean(errors["joint"]) < np.mean(errors["staged"]), {k: np.mean(v) for k, v in errors.items()}
    broad = [joint.param_names.index(n) for n in joint.param_names if n.startswith("hbeta_broad")]
    k = list(model_lines(joint)).index("hbeta_broad")
    undetected = ~outs["staged"]["line_detected"][:, k] & no_broad
    assert undetected.sum() >= 20
    np.testing.assert_array_equal(outs["joint"]["params"][undetected][:, broad], outs["staged"]["params"][undetected][:, broad])
    assert not outs["joint"]["line_detected"][undetected, k].any()
    with pytest.raises(ModelError, match="joint_steps=-1"):
        ContinuumStage(stage.model, stage.windows, lines=stage.lines, joint_steps=-1)
    with pytest.raises(ModelError, match="joint_steps=...\\) needs lines"):
        ContinuumStage(stage.model, stage.windows, joint_steps=2)


def test_refined_fit_leaves_out_the_absorbers_the_lines_masked():
    """A trough the lines' fit masks as an absorber stays out of the continuum's refinement
    and of the reported chi-square (which is the plain chi-square over the other pixels)."""
    from sheap_dask.chunk import REJECTED_PIXELS, ChunkOptions, _fit_any

    model = sd.models.region("hbeta", host=True)
    ds = sd.synthetic.synthetic_spectra_numpy(8, seed=7, host=True, model=model, masked_fraction=0.0, n_all_nan=0)
    wl, flux, ivar = ds["wavelength"], ds["flux"].astype(np.float64), ds["ivar"].astype(np.float64)
    trough = slice(int(np.searchsorted(wl, 4900.0)), int(np.searchsorted(wl, 4900.0)) + 4)
    flux[:, trough] -= 30.0 / np.sqrt(ivar[:, trough])  # 4 pixels, 30 sigma deep, under broad H-beta
    out = _fit_any(model, wl, flux, ivar, None, None, ChunkOptions().resolved(), None, None)
    rejected = out[REJECTED_PIXELS]
    assert rejected[:, trough].all() and np.array_equal(out["n_masked"], rejected.sum(axis=1))
    inside = (wl >= model.window[0]) & (wl <= model.window[1])
    chi2 = np.sum(np.where(inside & ~rejected, ivar * (flux - model.evaluate(wl, out["params"])) ** 2, 0.0), axis=1)
    np.testing.assert_allclose(out["chi2"], chi2, rtol=1e-5)  # the solver's data are rounded to 20 bits (5e-7)


# -- real spectra (slow) ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_leave_one_out_templates_fit_the_left_out_galaxy(shared_spectra, tmp_path):
    """Templates built without a GALAXY spectrum (the script's --leave-out) plus the populations
    of ``"sdss+ssp"`` fit it as host + narrow lines in H-beta: better than the quasar continuum
    alone, its starlight found (the early-type galaxy's near 1) and no broad H-beta in any of
    the three. The two SDSS galaxies alone (the default ``"sdss"``) leave the early-type galaxy
    a broad H-beta (README, "Host-galaxy starlight"; ``scripts/validate_host.py`` records both,
    and the narrow-line AGN spec-0295's broad H-alpha)."""
    pytest.importorskip("astropy")
    import dask

    script = _validate_host_script()
    galaxies = {name.removeprefix("spec-"): path for name, path in script.GALAXIES.items()}  # as --leave-out names them
    ds = sd.io.read_sdss_spectra([str(shared_spectra / f) for f in galaxies.values()])
    with dask.config.set(scheduler="synchronous"):  # without the host: one fit of all three
        plain = sd.fit_dataset(ds, sd.models.region("hbeta", oiii_wing=True, host=False), progress=False).compute()
    for i, name in enumerate(galaxies):
        out = tmp_path / f"without_{name}.csv"
        subprocess.run([sys.executable, str(REPO / "scripts" / "build_host_templates.py"), "--spectra", str(shared_spectra),
                        "--out", str(out), "--leave-out", name], check=True, capture_output=True)
        tmpl = script.with_populations(out)
        assert tmpl.k == 4 and not any(name.replace("-", "_") in n for n in tmpl.names)
        one = ds.isel(spectrum=[i])
        with dask.config.set(scheduler="synchronous"):
            with_host = sd.models.region("hbeta", oiii_wing=True, host_template=tmpl)
            fits = sd.fit_dataset(one, with_host, progress=False).compute()
        fits.sheap.use(model=with_host, spectra=one)
        li = list(fits.line.values).index("hbeta_broad")
        assert not bool(fits.line_detected.values[0, li]), name
        assert int(fits.quality.values[0]) & int(sd.quality.Quality.BROAD_LINE_UNDETECTED), name
        assert float(fits.redchi2.values[0]) < float(plain.redchi2.values[i]), name
        assert float(fits.sheap.frac_host_5100().values[0]) > (0.8 if name == "0266-51602-0013" else 0.4), name


@pytest.mark.slow
def test_low_luminosity_quasars_report_their_host(shared_spectra):
    """The three low-luminosity quasars under strong starlight: host fraction at 5100 A and the
    stellar dispersion reported, the fit no worse than without the host."""
    pytest.importorskip("astropy")
    import dask

    files = ["gelato_examples/spec-0280-51612-0117.fits", "gelato_examples/spec-1599-53089-0469.fits",
             "pyqsofit_examples/spec-0332-52367-0639.fits"]
    ds = sd.io.read_sdss_spectra([str(shared_spectra / f) for f in files])
    model = sd.models.region("hbeta", oiii_wing=True)
    with dask.config.set(scheduler="synchronous"):
        fits = sd.fit_dataset(ds, model, progress=False).compute()
        plain = sd.fit_dataset(ds, sd.models.region("hbeta", oiii_wing=True, host=False), progress=False).compute()
    fits.sheap.use(model=model, spectra=ds)
    f51 = fits.sheap.frac_host_5100(errors=True)
    assert np.all((f51.frac_host_5100.values > 0.3) & (f51.frac_host_5100.values < 1.0))
    assert np.all(np.isfinite(f51.frac_host_5100_err.values))
    assert np.all(np.isfinite(fits.sheap.stellar_dispersion().values))
    assert np.all(fits.redchi2.values < plain.redchi2.values * 1.02)
    # lambda L5100 is the AGN's: below the total continuum's
    agn = fits.sheap.luminosity(5100.0).values
    total = fits.sheap.luminosity(5100.0, continuum=["powerlaw", "host"]).values
    assert np.all(agn < total)


def test_a_restart_in_the_redshift_frame_leaves_a_blend_s_poorer_minimum(shared_spectra):
    """spec-0332's H-alpha: the initializer takes the narrow lines' shift from the peak of the
    narrow H-alpha + [NII] blend on the broad line, ~730 km/s off; from there LM ends with the
    narrow lines at their width bound, [NII] at 0 and a 2300 km/s "broad" Gaussian doing their
    work (reduced chi-square 1.27, broad FWHM ~3300 km/s). The restarts' start with every
    line's shift in the redshift's frame reaches the better minimum."""
    pytest.importorskip("astropy")
    import dask

    files = ["gelato_examples/spec-1599-53089-0469.fits", "pyqsofit_examples/spec-0332-52367-0639.fits"]
    ds = sd.io.read_sdss_spectra([str(shared_spectra / f) for f in files])
    model = sd.models.region("halpha")
    fits = {}
    for restarts in (False, True):
        with dask.config.set({"scheduler": "synchronous", "sheap_dask.fit.lm_restarts": restarts}):
            fits[restarts] = sd.fit_dataset(ds, model, progress=False).compute()
    assert float(fits[False].redchi2.values[1]) > 1.2  # the first fit's minimum is the poorer one
    assert float(fits[True].redchi2.values[1]) < 0.95
    fits[True].sheap.use(model=model, spectra=ds)
    assert 4000.0 < float(fits[True].sheap.fwhm("halpha_broad").values[1]) < 6000.0
    assert np.all(fits[True].redchi2.values <= fits[False].redchi2.values)


def test_ssp_template_broadening_reaches_one_dispersion():
    """scripts/build_ssp_templates.py broadens each pixel from the library's own resolution
    (c / 2.355 R, varying along the spectrum) to one constant sigma_0: an unresolved line
    seen at R = 1500 comes out with sigma_0, wherever it sits."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_ssp_templates", REPO / "scripts" / "build_ssp_templates.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    wave = 10.0 ** np.arange(np.log10(3700.0), np.log10(8000.0), 1e-4)
    sres = np.full(wave.size, 1500.0)
    sigma_lib = script.C_KMS / (2.0 * np.sqrt(2.0 * np.log(2.0)) * 1500.0)
    flux = np.zeros((2, wave.size))
    for row, centre in enumerate((4500.0, 6500.0)):
        x = np.log(wave / centre) * script.C_KMS
        flux[row] = 1.0 + np.exp(-0.5 * (x / sigma_lib) ** 2)
    out = script.broaden_to(wave, flux, sres, 120.0) - 1.0
    for row, centre in enumerate((4500.0, 6500.0)):
        v = np.log(wave / centre) * script.C_KMS
        width = np.sqrt(np.sum(out[row] * v**2) / np.sum(out[row]))
        assert width == pytest.approx(120.0, rel=0.03), (centre, width)
        assert np.sum(out[row]) == pytest.approx(np.sum(flux[row] - 1.0), rel=1e-3)  # flux conserved
    with pytest.raises(SystemExit, match="below the library"):
        script.broaden_to(wave, flux, np.full(wave.size, 1000.0), 120.0)
