"""The SLSQP evaluator machinery (sheap_dask/slsqp_evaluator.py) through the minimizer: the NaN
strategy, the EDM criterion and its factories, the compiled-loss cache and float64 inside."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest

from sheap_dask.slsqp import SLSQP
from sheap_dask.slsqp_evaluator import EDM, PushbackStrategy
from sheap_dask.status import Status


# ----------------------------------------------------------------------------------------
# Strategy: non-finite losses
# ----------------------------------------------------------------------------------------
def test_nan_on_the_way_is_pushed_back_and_counted():
    def loss(p):  # NaN for p0 < 0, where SLSQP's first steps from p0 = 100 land
        return (jnp.log(p[0]) - jnp.log(3.0)) ** 2 + (p[1] - 1.0) ** 2

    res = SLSQP(tol=1e-8).minimize(loss, [100.0, 0.0])
    assert res.info["n_nonfinite"] > 0 and not res.info["stopped_nonfinite"]
    assert res.converged, res.message
    np.testing.assert_allclose(res.values, [3.0, 1.0], rtol=1e-3)


def test_nan_region_next_to_the_best_point_does_not_burn_maxiter():
    def loss(p):  # the minimum at (3, 1) lies inside a NaN region that starts at p0 = 1.5
        return jnp.where(p[0] > 1.5, jnp.nan, (p[0] - 3.0) ** 2 + (p[1] - 1.0) ** 2)

    res = SLSQP(maxiter=5000).minimize(loss, [0.0, 0.0])
    assert res.info["n_nonfinite"] > 0
    assert res.n_eval < 300  # restarts stop when they stop improving: not 5000
    assert res.info["n_computed"] < res.n_eval  # re-requests of accepted points are not recomputed
    assert np.isfinite(res.fmin) and 1.4 < res.values[0] <= 1.5
    assert not res.converged and res.status is Status.FAILED
    assert f"the loss was non-finite in {res.info['n_nonfinite']} evaluations" in res.message


def test_loss_nan_everywhere_but_the_start_stops_with_nonfinite_status():
    calls = []
    strategy = PushbackStrategy(max_nonfinite=7, callback=lambda x, f, g: calls.append((x.copy(), f)))

    def loss(p):
        return jnp.where(jnp.all(p == 0.5), jnp.sum(p**2), jnp.nan)

    res = SLSQP(maxiter=10_000, strategy=strategy).minimize(loss, [0.5, 0.5])
    assert res.status is Status.NONFINITE and res.info["stopped_nonfinite"]
    assert res.message.startswith("stopped after 7 consecutive non-finite loss evaluations")
    assert res.n_eval <= 10 and res.info["n_nonfinite"] == 7
    np.testing.assert_array_equal(res.values, [0.5, 0.5])
    # the callback sees every NLopt evaluation with the raw values: the start, then NaNs
    assert len(calls) == res.n_eval - 1 and calls[0][1] == 0.5 and all(np.isnan(f) for _, f in calls[1:])


def test_nonfinite_start_gives_a_clear_message():
    res = SLSQP().minimize(lambda p: jnp.log(p[0]), [-1.0])
    assert not res.converged and res.status is Status.NONFINITE
    assert "not finite at the starting point" in res.message and res.n_eval == 1


# ----------------------------------------------------------------------------------------
# Compiled losses: cache and precision
# ----------------------------------------------------------------------------------------
def test_compilation_cache_does_not_keep_the_loss_alive():
    import gc
    import weakref

    def loss(p):
        return jnp.sum((p - 1.0) ** 2)

    assert SLSQP().minimize(loss, [0.0]).converged
    ref = weakref.ref(loss)
    del loss
    gc.collect()
    assert ref() is None


def test_float64_inside_without_global_x64():
    """In a fresh process with x64 off: float32 data, float64 gradients, the flag left untouched."""
    code = textwrap.dedent(
        """
        import os
        os.environ["JAX_PLATFORMS"] = "cpu"
        import jax, jax.numpy as jnp, numpy as np
        from sheap_dask.slsqp import SLSQP
        x = np.linspace(0, 1, 30, dtype=np.float32); y = (3 * x + 1).astype(np.float32)
        def chi2(p, x, y):
            return jnp.sum((p[0] * x + p[1] - y) ** 2 / 1e-4)
        res = SLSQP(tol=1e-10).minimize(chi2, [0.0, 0.0], args=(x, y))
        assert not jax.config.jax_enable_x64 and jnp.ones(1).dtype == jnp.float32
        A = np.stack([x, np.ones_like(x)], 1).astype(np.float64)
        ref = np.linalg.lstsq(A, y.astype(np.float64), rcond=None)[0]
        assert res.converged and res.values.dtype == np.float64, res
        assert np.allclose(res.values, ref, rtol=1e-10, atol=1e-10), (res.values, ref)
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


# ----------------------------------------------------------------------------------------
# Criterion and the evaluator factories
# ----------------------------------------------------------------------------------------
def test_create_criterion_and_evaluator():
    def nll(p):
        return 0.5 * jnp.sum(p**2)

    nll.errordef = 0.5
    fitter = SLSQP(tol=1e-4)
    crit = fitter.create_criterion(nll)
    assert isinstance(crit, EDM) and crit.threshold == pytest.approx(0.5e-4)
    ev = fitter.create_evaluator(nll, {"value": [1.0, 2.0]})
    f, g = ev.value_and_grad(np.array([1.0, 2.0]))
    assert f == pytest.approx(2.5) and np.allclose(g, [1.0, 2.0])
    edm = crit.calculate(np.array([1.0, 2.0]), g, ev.hessian(np.array([1.0, 2.0])), np.full(2, -np.inf), np.full(2, np.inf))
    assert edm == pytest.approx(2.5) and not crit.converged(edm) and crit.converged(1e-5)


def test_custom_criterion_is_used():
    class Never(EDM):
        def converged(self, value=None):
            return False

    res = SLSQP(criterion=Never, maxiter=300).minimize(lambda p: jnp.sum(p**2), [1.0, 1.0])
    assert not res.converged and res.status is Status.FAILED
    assert res.info["rounds"] == 2  # a restart that makes no progress ends the fit
    assert res.edm < 1e-12 and res.message.startswith("not converged (edm ")  # only the criterion refused it


def test_singular_hessian_reported():
    def loss(p):  # only p0 + p1 is determined
        return (p[0] + p[1] - 2.0) ** 2

    res = SLSQP().minimize(loss, [0.0, 0.0])
    assert res.values.sum() == pytest.approx(2.0, abs=1e-6)
    assert res.info["hessian_singular"] and not res.valid
