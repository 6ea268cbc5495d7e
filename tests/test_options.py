"""Options and configuration: every option validated on the client, options a method would
ignore refused, every key of sheap_dask.yaml read, unknown keys warned about."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import warnings

import dask
import numpy as np
import pytest
from datasets import gauss_dataset, gauss_model

import sheap_dask as sd
from sheap_dask import config
from sheap_dask.errors import InputDataError, ModelError, OptionError
from sheap_dask.options import ChunkOptions

PACKAGE = pathlib.Path(sd.__file__).parent


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_steps=0), r"num_steps=0 must be an integer > 0"),
        (dict(num_steps=2.5), r"num_steps=2.5 must be an integer"),
        (dict(robust_scale=-1.0), r"robust_scale=-1.0 must be a finite number > 0.*sheap_dask.loss.robust_scale"),
        (dict(robust_scale=float("nan")), r"robust_scale=nan"),
        (dict(rtol=2.0), r"rtol=2.0 must be a finite number >= 0 and <= 1"),
        (dict(fallback_tol=0.0), r"fallback_options\['tol'\]=0.0 must be a finite number > 0"),
        (dict(fallback_maxiter=0), r"fallback_options\['maxiter'\]=0"),
        (dict(fallback_redchi2_sigma=-2.0), r"fallback_options\['redchi2_sigma'\]=-2.0"),
        (dict(pinned_fraction=0.7), r"fallback_options\['pinned_fraction'\]=0.7 must be .* <= 0.5"),
        (dict(min_extra_pixels=-1), r"min_extra_pixels=-1 must be an integer >= 0"),
        (dict(redchi2_sigma=0.0), r"restart_redchi2_sigma=0.0"),
        (dict(pinned_tolerance=0.9), r"restart_pinned_tolerance=0.9"),
        (dict(slots=-1), r"lm_slots=-1"),
        (dict(absorber_sigma=0.0), r"absorber_sigma=0.0"),
        (dict(coverage_min=1.5), r"coverage_min=1.5"),
        (dict(weighted="yes", method="adam"), r"weighted='yes' must be True or False"),
        (dict(dtype="float16"), r"dtype='float16' is not one of"),
        (dict(error_scale="relative"), r"error_scale='relative' is not one of"),
        (dict(method="adam", lbfgs_options=(("memory", 5),)), r"lbfgs_options has unknown keys \['memory'\]"),
    ],
)
def test_every_option_is_validated_with_its_range(kwargs, message):
    with pytest.raises(OptionError, match=message):
        ChunkOptions(**kwargs).resolved()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(method="lm", curvature_weight=10.0), r"method='lm' ignores curvature_weight=10.0"),
        (dict(method="lm", smoothness_weight=1.0), r"method='lm' ignores smoothness_weight"),
        (dict(method="lm", max_weight=0.1), r"method='lm' ignores max_weight"),
        (dict(method="lm", weighted=False), r"method='lm' ignores weighted=False"),
        (dict(method="lbfgs", learning_rate=0.1), r"method='lbfgs' ignores learning_rate=0.1"),
        (dict(method="adam", lbfgs_options=(("memory_size", 5),)), r"method='adam' ignores lbfgs_options"),
    ],
)
def test_options_the_method_ignores_are_refused(kwargs, message):
    with pytest.raises(OptionError, match=message):
        ChunkOptions(**kwargs).resolved()


def test_bad_options_fail_on_the_client_before_anything_runs():
    from distributed import Client, get_task_stream

    ds = gauss_dataset(8, chunk=4)
    with Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=":0") as client:
        with get_task_stream(client) as stream:
            for kwargs in (dict(num_steps=-3), dict(fallback_options={"maxiter": 0}), dict(method="lm", penalty_function=lambda w, p: 0.0),
                           dict(penalty_weight=1.0), dict(robust_scale=0.0)):
                with pytest.raises(OptionError):
                    sd.fit_dataset(ds, gauss_model(), client=client, progress=False, **kwargs)
        assert stream.data == []


def test_penalty_and_robust_scale_reach_adam_and_lbfgs():
    ds = gauss_dataset(4, chunk=4, bad=False)
    base = dict(num_steps=300, progress=False, fallback="none", dtype="float64")
    with dask.config.set(scheduler="synchronous"):
        fits = {
            scale: sd.fit_dataset(ds, gauss_model(), method="lbfgs", robust_scale=scale, **base).compute() for scale in (0.5, 50.0)
        }
        penalised = sd.fit_dataset(
            ds, gauss_model(), method="adam", learning_rate=0.05, penalty_function=lambda w, p: (p[2] - 30.0) ** 2, penalty_weight=10.0, **base
        ).compute()
        plain = sd.fit_dataset(ds, gauss_model(), method="adam", learning_rate=0.05, **base).compute()
    # robust_scale changes the objective adam/lbfgs minimise (it used to be ignored)
    assert not np.allclose(fits[0.5].loss.values, fits[50.0].loss.values)
    sigma = list(gauss_model().param_names).index("sigma")
    assert np.all(np.abs(penalised.params.values[:, sigma] - 30.0) < np.abs(plain.params.values[:, sigma] - 30.0))


def test_every_config_key_is_read_somewhere():
    source = "\n".join(p.read_text() for p in PACKAGE.rglob("*.py"))
    unread = [key for key in config.known_keys() if f'"{key}"' not in source]
    assert unread == [], f"keys of sheap_dask.yaml that no code reads: {unread}"


def test_unknown_key_warns_once_with_the_closest_key():
    config._WARNED.clear()
    with dask.config.set({"sheap_dask.fallback.tol_": 1.0, "sheap_dask.fit.metod": "adam"}):
        with pytest.warns(UserWarning) as record:
            config.warn_unknown_keys()
        messages = " ".join(str(w.message) for w in record)
        assert "sheap_dask.fit.metod" in messages and "did you mean sheap_dask.fit.method" in messages
        assert "sheap_dask.fallback.tol_" in messages
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            config.warn_unknown_keys()  # once per key
    with dask.config.set({"sheap_dask.fit.lbfgs_options": {"memory_size": 5}}):  # free-form mapping
        assert config.unknown_keys() == []


def test_defaults_are_registered_by_a_bare_import():
    code = "import dask, sheap_dask; print(dask.config.get('sheap_dask.fit.method'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "lm"
    env_code = "import sheap_dask"
    env = {**__import__("os").environ, "DASK_SHEAP_DASK__FALLBACK__TOLL": "1"}
    warned = subprocess.run([sys.executable, "-W", "always", "-c", env_code], capture_output=True, text=True, env=env, check=True)
    assert "sheap_dask.fallback.toll" in warned.stderr and "did you mean sheap_dask.fallback.tol" in warned.stderr


def test_numeric_input_faults_are_refused_or_handled():
    ds = gauss_dataset(8, chunk=None, bad=False)
    model = gauss_model()
    with dask.config.set(scheduler="synchronous"):
        with pytest.raises(InputDataError, match=r"flux='flux' is complex"):
            sd.fit_dataset(ds.assign(flux=ds.flux.astype(np.complex128)), model, progress=False)
        with pytest.raises(InputDataError, match=r"flux='flux' is non-numeric"):
            sd.fit_dataset(ds.assign(flux=ds.flux.astype(str)), model, progress=False)
        # float32 errors of 1e-19: their inverse square (1e38) overflows float32, not float64
        small = ds.assign(flux=(ds.flux * 1e-19).astype(np.float32), err=(1e-19 / np.sqrt(ds.ivar)).astype(np.float32))
        fits = sd.fit_dataset(small, model, ivar=None, flux_err="err", progress=False, num_steps=100)
        assert (fits.status.values == 0).all()
    with pytest.raises(ModelError, match="reads a parameter that does not exist"):
        sd.Model(lambda x, p: p[0] * x + p[1], sd.Parameters().add("a", 1.0))


def test_compilation_cache_keeps_small_programs(tmp_path):
    """The package's persistent cache writes every compiled program (JAX's default leaves out
    those under 1 s: the errors' and derived quantities' small programs, compiled again by
    every worker), unless the environment sets JAX's threshold; a bad value is named."""
    script = (
        "import dask, jax, sheap_dask.config as c\n"
        "import sys\n"
        f"with dask.config.set({{'sheap_dask.worker.compilation_cache': {str(tmp_path)!r}, "
        "'sheap_dask.worker.compilation_cache_min_seconds': sys.argv[1]}):\n"
        "    try:\n"
        "        c.enable_compilation_cache()\n"
        "    except ValueError as e:\n"
        "        print('error', e); raise SystemExit\n"
        "print(jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)\n"
        "import jax.numpy as jnp, os\n"
        "jax.jit(lambda x: x * 2 + 1)(jnp.arange(3.0)).block_until_ready()\n"
        "print(len(os.listdir(jax.config.jax_compilation_cache_dir)))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_PERSISTENT_CACHE") and k != "JAX_COMPILATION_CACHE_DIR"}

    def run(value, **extra):
        done = subprocess.run([sys.executable, "-c", script, value], capture_output=True, text=True, env={**env, **extra}, check=True)
        return done.stdout.split()

    directory, minimum, n_files = run("0")
    assert (directory, float(minimum)) == (str(tmp_path), 0.0) and int(n_files) >= 1  # a tiny program is cached
    assert float(run("0", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="5")[1]) == 5.0  # the environment's own choice stays
    out = " ".join(run("-1"))
    assert out.startswith("error") and "compilation_cache_min_seconds='-1'" in out and ">= 0" in out


def test_a_process_that_only_derives_quantities_uses_the_compilation_cache(tmp_path):
    """Derived quantities with errors compile their own programs (model evaluations for plots
    too); a process that fits nothing (reading a catalogue) keeps them in the cache too."""
    script = (
        "import dask, jax, numpy as np, os, sheap_dask as sd\n"
        "from sheap_dask.derived import lines\n"
        f"with dask.config.set({{'sheap_dask.worker.compilation_cache': {str(tmp_path)!r}}}):\n"
        "    m = sd.models.region('hbeta', host=False)\n"
        "    p = np.asarray(m.params.values, dtype=float)[None]\n"
        "    lines.fwhm(m, 'hbeta_broad', p, cov=np.diag(np.full(p.shape[1], 1e-4))[None])\n"
        "print(jax.config.jax_compilation_cache_dir, len(os.listdir(jax.config.jax_compilation_cache_dir)))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_PERSISTENT_CACHE") and k != "JAX_COMPILATION_CACHE_DIR"}
    directory, n_files = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True).stdout.split()
    assert directory == str(tmp_path) and int(n_files) >= 1
