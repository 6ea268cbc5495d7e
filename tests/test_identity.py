"""Model identity: stable across processes and pickling, different whenever the output can differ;
compiled-program caches keyed by it (issue: a stale compiled program was reused)."""

from __future__ import annotations

import functools
import multiprocessing
import textwrap

import cloudpickle
import dask
import jax.numpy as jnp
import numpy as np
import pytest
import xarray as xr

import sheap_dask as sd
from sheap_dask import chunk as chunk_layer
from sheap_dask import compiled as compiled_layer
from sheap_dask.errors import ModelError, ResumeMismatchError
from sheap_dask.identity import token
from sheap_dask.models import feii

# Defined as a user would in a script: functions of a module named __main__, so cloudpickle
# ships them by value (co_filename "<dynamic-code>" on the other side, no source to read).
MAIN_SOURCE = textwrap.dedent(
    """
    import jax.numpy as jnp
    import sheap_dask as sd

    REFERENCE = 5000.0

    def shape(x, index):
        return (x / REFERENCE) ** index

    def make(k):
        params = sd.Parameters().add("norm", 1.0, min=0.0).add("index", -1.5, min=-5.0, max=5.0)
        return sd.Model(lambda x, p: p[0] * shape(x, p[1]) * k, params, name="scaled_powerlaw")
    """
)


def main_namespace(source: str = MAIN_SOURCE) -> dict:
    namespace = {"__name__": "__main__"}
    exec(compile(source, "<user script>", "exec"), namespace)  # noqa: S102 - the test's own code
    return namespace


def _fingerprint_in_child(blob: bytes):
    import cloudpickle
    import jax
    import numpy as np

    jax.config.update("jax_enable_x64", True)  # as in the parent (conftest)
    model = cloudpickle.loads(blob)
    x = np.linspace(4500.0, 5500.0, 16)
    return model.identity(), np.asarray(model.evaluate(x, model.params.values))


def _fresh_identities(_=None) -> dict:
    """Identities of models built from scratch in a new process (a new session)."""
    import functools

    import sheap_dask as sd

    ns = main_namespace()
    return {
        "hbeta": sd.models.region("hbeta").identity(),
        "closure": ns["make"](2.0).identity(),
        "partial": sd.Model(functools.partial(_partial_model, k=2.0), sd.Parameters().add("a", 1.0)).identity(),
    }


def _partial_model(x, p, k):
    return p[0] * (x / 5000.0) * k


@pytest.fixture(scope="module")
def spawn_pool():
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        yield pool


def test_identity_survives_cloudpickle_in_a_fresh_spawned_process(spawn_pool):
    ns = main_namespace()
    models = [sd.models.region("hbeta"), ns["make"](2.0), sd.Model(functools.partial(_partial_model, k=2.0), sd.Parameters().add("a", 1.0))]
    x = np.linspace(4500.0, 5500.0, 16)
    for model in models:
        identity, values = spawn_pool.apply(_fingerprint_in_child, (cloudpickle.dumps(model),))
        assert identity == model.identity()
        np.testing.assert_allclose(values, model.evaluate(x, model.params.values), rtol=1e-12)
    assert models[0].identity() != sd.models.region("hbeta", n_broad=3).identity()


def test_identity_is_the_same_in_a_new_session(spawn_pool):
    here = _fresh_identities()
    assert spawn_pool.apply(_fresh_identities, (None,)) == here


def test_identity_changes_with_everything_that_changes_the_output():
    ns = main_namespace()
    assert ns["make"](1.0).identity() != ns["make"](2.0).identity()  # a captured constant
    assert ns["make"](1.0).identity() == ns["make"](1.0).identity()
    edited = main_namespace(MAIN_SOURCE.replace("REFERENCE = 5000.0", "REFERENCE = 5100.0"))
    assert edited["make"](1.0).identity() != ns["make"](1.0).identity()  # a global the code reads
    helper = main_namespace(MAIN_SOURCE.replace("(x / REFERENCE) ** index", "(x / REFERENCE) ** (index + 0)"))
    assert helper["make"](1.0).identity() != ns["make"](1.0).identity()  # a function the model calls
    one = sd.Parameters().add("a", 1.0)
    assert sd.Model(functools.partial(_partial_model, k=2.0), one).identity() != sd.Model(functools.partial(_partial_model, k=3.0), one).identity()
    # parameters: bounds, ties, fixed values
    base = ns["make"](1.0)
    bounded = sd.Model(base.func, sd.Parameters().add("norm", 1.0, min=0.0, max=10.0).add("index", -1.5, min=-5.0, max=5.0))
    tied = sd.Model(base.func, sd.Parameters().add("norm", 1.0, min=0.0).add("index", -1.5, tie="index = norm * -1.5"))
    assert len({base.identity(), bounded.identity(), tied.identity(), sd.Model(base.func, base.params).identity()}) == 3
    # a declared version
    assert sd.Model(base.func, base.params, version="2").identity() != sd.Model(base.func, base.params).identity()
    # template arrays by content
    t = feii.optical_template()
    a = sd.models.region("hbeta", feii_template=(t.wavelength, t.flux))
    b = sd.models.region("hbeta", feii_template=(t.wavelength, t.flux * (1.0 + 0.1 * np.sin(t.wavelength))))
    assert a.identity() != b.identity()
    assert a.identity() == sd.models.region("hbeta", feii_template=(t.wavelength, t.flux.copy())).identity()


def test_token_is_content_based():
    assert token(np.arange(3.0)) == token(np.arange(3.0)) != token(np.arange(3.0) + 1e-12)
    assert token({"b": 1, "a": 2}) == token({"a": 2, "b": 1})
    assert token(frozenset({"x", "y", "z"})) == token(frozenset({"z", "y", "x"}))
    assert token(0.1) != token(0.1 + 1e-17) or 0.1 == 0.1 + 1e-17


def powerlaw_dataset(n: int = 16) -> tuple[xr.Dataset, np.ndarray]:
    rng = np.random.default_rng(0)
    wavelength = np.linspace(4000.0, 6000.0, 200)
    norm = rng.uniform(1.0, 3.0, n)
    flux = norm[:, None] * (wavelength / 5000.0) ** -1.2
    err = np.full_like(flux, 0.01)
    flux = flux + err * rng.normal(size=flux.shape)
    ds = xr.Dataset(
        {"flux": (("spectrum", "wavelength"), flux), "ivar": (("spectrum", "wavelength"), 1.0 / err**2)},
        coords={"wavelength": wavelength},
    )
    return ds.chunk({"spectrum": 8}), norm


FAST = dict(num_steps=100, progress=False, dtype="float64")


def _two_closure_fits(client=None):
    ns = main_namespace()
    ds, norm = powerlaw_dataset()
    first = sd.fit_dataset(ds, ns["make"](1.0), client=client, **FAST).compute()
    second = sd.fit_dataset(ds, ns["make"](2.0), client=client, **FAST).compute()
    return first.params.sel(param="norm").values, second.params.sel(param="norm").values, norm


def test_two_closures_on_the_synchronous_scheduler_get_both_answers():
    with dask.config.set(scheduler="synchronous"):
        first, second, truth = _two_closure_fits()
    np.testing.assert_allclose(first, truth, rtol=2e-3)
    np.testing.assert_allclose(second / first, 0.5, rtol=1e-6)


@pytest.mark.cluster
@pytest.mark.slow
def test_two_closures_on_a_spawned_local_cluster_get_both_answers():
    from distributed import Client

    with sd.start_local_cluster(2) as cluster, Client(cluster) as client:
        first, second, truth = _two_closure_fits(client)
    np.testing.assert_allclose(first, truth, rtol=2e-3)
    np.testing.assert_allclose(second / first, 0.5, rtol=1e-6)


def test_two_feii_templates_are_two_compiled_programs():
    t = feii.optical_template()
    models = [sd.models.region("hbeta", feii_template=(t.wavelength, t.flux * (1.0 + 0.3 * s * np.sin(t.wavelength / 40.0)))) for s in (0.0, 1.0)]
    wavelength = sd.io.synthetic_spectra(1, seed=0).wavelength.values
    truth = models[1].params.values.copy()
    truth[models[1].param_names.index("feii_amplitude")] = 40.0
    flux = models[1].evaluate(wavelength, truth)[None]
    ivar = np.full_like(flux, 100.0)
    builds = chunk_layer.compile_stats()["solver_builds"]
    results = [chunk_layer.fit_chunk(m, wavelength, flux, ivar, options=chunk_layer.ChunkOptions(fallback="none", restarts=False)) for m in models]
    assert chunk_layer.compile_stats()["solver_builds"] == builds + 4  # per model: its continuum stage and its lines
    # each fit is that template's own: the same as in a process that never saw the other one
    assert not np.allclose(results[0]["params"], results[1]["params"])
    compiled_layer._CACHE.clear()
    alone = chunk_layer.fit_chunk(models[1], wavelength, flux, ivar, options=chunk_layer.ChunkOptions(fallback="none", restarts=False))
    np.testing.assert_array_equal(alone["params"], results[1]["params"])


def test_compiled_cache_is_bounded_and_keyed_without_id(monkeypatch):
    ds, _ = powerlaw_dataset(8)
    wavelength = ds.wavelength.values
    flux, ivar = ds.flux.values, ds.ivar.values
    ns = main_namespace()
    options = chunk_layer.ChunkOptions(num_steps=50, fallback="none", method="adam", learning_rate=0.05)
    with dask.config.set({"sheap_dask.worker.compiled_cache_size": 2}):
        for k in (1.0, 2.0, 3.0):
            chunk_layer.fit_chunk(ns["make"](k), wavelength, flux, ivar, options=options)
        assert len(compiled_layer._CACHE) <= 2
    # an unpickled copy of the same model and penalty (a new object per task) is a cache hit
    model = ns["make"](5.0)
    penalty = main_namespace("def penalty(wavelength, p):\n    return (p[1] + 1.2) ** 2\n")["penalty"]
    builds = chunk_layer.compile_stats()["solver_builds"]
    for _ in range(2):
        copy_model, copy_penalty = cloudpickle.loads(cloudpickle.dumps((model, penalty)))
        chunk_layer.fit_chunk(copy_model, wavelength, flux, ivar, options=options, penalty_function=copy_penalty)
    assert chunk_layer.compile_stats()["solver_builds"] == builds + 1


def test_resume_refuses_a_changed_closure_constant_or_template(tmp_path):
    ns = main_namespace()
    ds, _ = powerlaw_dataset(8)
    store = tmp_path / "fits.zarr"
    with dask.config.set(scheduler="synchronous"):
        sd.fit_dataset(ds, ns["make"](1.0), store=store, **FAST)
        sd.fit_dataset(ds, ns["make"](1.0), store=store, **FAST)  # same model: resumes
        with pytest.raises(ResumeMismatchError, match="code, constants or templates differ"):
            sd.fit_dataset(ds, ns["make"](2.0), store=store, **FAST)


def test_out_of_range_parameter_index_is_caught_when_the_model_is_built():
    with pytest.raises(ModelError, match=r"'line'.*reads a parameter that does not exist"):
        sd.Model(lambda x, p: p[0] * x + p[1], sd.Parameters().add("slope", 1.0), name="line")


def test_a_model_that_cannot_be_vmapped_fails_when_built():
    def branchy(x, p):
        if p[0] > 0:  # Python branch on a value: not traceable
            return x * p[0]
        return x

    with pytest.raises(ModelError, match="branchy.*not branch on values"):
        sd.Model(branchy, sd.Parameters().add("a", 1.0))


def test_flux_parameters_are_detected_or_declared():
    ns = main_namespace()
    assert ns["make"](1.0).flux_params == ("norm",)
    gauss = sd.Model(
        lambda x, p: p[0] * jnp.exp(-0.5 * ((x - p[1]) / p[2]) ** 2) + p[3],
        sd.Parameters().add("amp", 1.0, min=0).add("centre", 5000.0).add("sigma", 5.0, min=0.1).add("offset", 0.0),
    )
    assert gauss.flux_params == ("amp", "offset")
    # a constant that does not scale: nothing is proportional to the flux unit
    fixed = sd.Model(lambda x, p: p[0] * x / 5000.0 + 3.0, sd.Parameters().add("a", 1.0))
    assert fixed.flux_params == ()
    assert set(sd.models.region("hbeta").flux_params) >= {"powerlaw_norm", "feii_amplitude", "oiii5007_flux", "oiii4959_flux"}
