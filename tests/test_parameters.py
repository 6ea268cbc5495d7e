"""Parameters: building, validation, serialization and the raw <-> physical map."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sheap_dask.errors import ParameterSpecError
from sheap_dask.parameters import Parameters, parse_tie


def _mixed() -> Parameters:
    return (
        Parameters()
        .add("a", 1.0, min=0.0, max=2.0)
        .add("b", 3.0, min=1.0)
        .add("c", -1.0, max=0.0)
        .add("d", 5.0)
        .add("e", 2.0, tie=("a", "*", 2.0))
        .add("f", 7.0, fixed=True)
    )


def test_names_bounds_and_indices():
    p = _mixed()
    assert p.names == ["a", "b", "c", "d", "e", "f"]
    assert p.free_names == ["a", "b", "c", "d"]
    assert p.n_params == 6 and p.n_free == 4
    np.testing.assert_array_equal(p.lower, [0, 1, -np.inf, -np.inf, -np.inf, -np.inf])
    np.testing.assert_array_equal(p.upper, [2, np.inf, 0, np.inf, np.inf, np.inf])
    np.testing.assert_array_equal(p.values, [1, 3, -1, 5, 2, 7])
    assert p.index("e") == 4
    assert p["e"].tie == ("e", "a", "*", 2.0) and not p["e"].free
    assert p["f"].fixed and p.fixed_names == ["f"] and p.tied_names == ["e"]
    with pytest.raises(KeyError, match="no parameter named 'zz'"):
        p.index("zz")


def test_tie_forms_are_equivalent():
    forms = ["y = x / 2.98", ("x", "/", 2.98), ("y", "x", "/", 2.98)]
    for form in forms:
        p = Parameters().add("x", 3.0).add("y", 1.0, tie=form)
        assert p["y"].tie == ("y", "x", "/", 2.98)
    p = Parameters().add("x", 3.0).add("y", 1.0).tie("y = x / 2.98")
    assert p["y"].tie == ("y", "x", "/", 2.98) and p.free_names == ["x"]
    assert parse_tie("a = b") == ("a", "b", "*", 1.0)
    assert parse_tie("a=b-1e-3") == ("a", "b", "-", 1e-3)
    assert parse_tie("a = b + -2") == ("a", "b", "+", -2.0)


def test_raw_to_phys_roundtrip_and_ties():
    p = _mixed()
    raw = p.raw_init()
    assert raw.shape == (4,)
    phys = p.raw_to_phys(raw)
    np.testing.assert_allclose(phys, [1, 3, -1, 5, 2, 7], rtol=1e-12)
    np.testing.assert_allclose(p.phys_to_raw(phys), raw, rtol=1e-12)
    # Ties are exact for any raw vector, fixed values untouched.
    phys = p.raw_to_phys(jnp.array([0.3, -1.0, 2.0, 4.0]))
    assert phys[4] == phys[0] * 2.0 and phys[5] == 7.0


@pytest.mark.parametrize("op,operand,expect", [("*", 3.0, 6.0), ("/", 4.0, 0.5), ("+", 1.5, 3.5), ("-", 0.5, 1.5)])
def test_tie_operators(op, operand, expect):
    p = Parameters().add("x", 2.0).add("y", 0.0, tie=("x", op, operand))
    assert float(p.raw_to_phys(p.raw_init())[1]) == expect


def test_batched_jit_vmap_and_per_spectrum_bounds():
    p = _mixed()
    raw = jnp.stack([p.raw_init(), p.raw_init() + 0.5, p.raw_init() - 0.5])
    batched = p.raw_to_phys(raw)
    assert batched.shape == (3, 6)
    vm = jax.jit(jax.vmap(p.raw_to_phys))(raw)
    np.testing.assert_allclose(vm, batched, rtol=1e-14)
    # Per-spectrum bounds and fixed values: each row uses its own.
    lower = np.tile(p.lower, (3, 1))
    upper = np.tile(p.upper, (3, 1))
    lower[1, 0], upper[1, 0] = 10.0, 20.0
    values = np.tile(p.values, (3, 1))
    values[2, 5] = -4.0
    phys = p.raw_to_phys(jnp.zeros((3, 4)), lower=lower, upper=upper, values=values)
    assert float(phys[0, 0]) == 1.0 and float(phys[1, 0]) == 15.0
    assert float(phys[2, 5]) == -4.0 and float(phys[0, 5]) == 7.0
    # A per-spectrum bound turned infinite switches that element to the matching map.
    lower[0, 0] = -np.inf
    phys = p.raw_to_phys(jnp.full((3, 4), 50.0), lower=lower, upper=upper)
    assert float(phys[0, 0]) == pytest.approx(2.0 - math.log1p(math.exp(-50.0)))
    # Inverse with per-spectrum bounds and per-spectrum initial values.
    init = np.tile(p.values, (3, 1))
    init[1, 0] = 12.0
    raw = p.raw_init(init, lower=lower, upper=upper)
    assert raw.shape == (3, 4)
    np.testing.assert_allclose(p.raw_to_phys(raw, lower=lower, upper=upper)[1, 0], 12.0, rtol=1e-12)


def test_raw_init_moves_off_bounds_and_clips():
    p = Parameters().add("amp", 0.0, min=0.0).add("w", 2.0, min=2.0, max=4.0).add("t", 1e-17, min=0.0)
    raw = p.raw_init()
    assert np.all(np.isfinite(raw))
    phys = p.raw_to_phys(raw)
    assert 0.0 < float(phys[0]) <= 1e-5 and 2.0 < float(phys[1]) < 2.0 + 1e-5
    assert float(phys[2]) == pytest.approx(1e-17, rel=1e-9)  # tiny positive values are kept
    # Out-of-bounds starting values are clipped in, never NaN.
    raw = p.raw_init(np.array([-5.0, 9.0, 1.0]))
    phys = p.raw_to_phys(raw)
    assert float(phys[0]) > 0 and float(phys[1]) < 4.0


def test_gradients_finite_everywhere():
    p = _mixed()
    grad = jax.jit(jax.grad(lambda r: jnp.sum(p.raw_to_phys(r))))
    for r in (jnp.full(4, -1e3), jnp.zeros(4), jnp.full(4, 1e3)):
        assert np.all(np.isfinite(grad(r)))
    phys = jnp.array([2.0, 1.0, 0.0, 1.0, 0.0, 7.0])  # every free value on its bound
    g = jax.jit(jax.jacobian(p.phys_to_raw))(phys)
    assert np.all(np.isfinite(g)) and np.all(np.isfinite(p.phys_to_raw(phys)))


def test_float32_in_float32_out():
    p = _mixed()
    raw = jnp.zeros(4, dtype=jnp.float32)
    assert p.raw_to_phys(raw).dtype == jnp.float32
    assert p.raw_init(np.asarray(p.values, dtype=np.float32)).dtype == jnp.float32
    phys32 = p.raw_to_phys(p.raw_init(jnp.asarray(p.values, dtype=jnp.float32)))
    np.testing.assert_allclose(phys32, p.values, rtol=1e-5)


def test_spec_roundtrip_is_json():
    p = _mixed().add("g", 0.5).tie("g = d + 1")
    spec = json.loads(json.dumps(p.spec()))
    q = Parameters.from_spec(spec)
    assert q == p and q.free_names == p.free_names
    # A tie written before its source in the spec order still rebuilds.
    p2 = Parameters().add("y", 1.0).add("x", 2.0).tie("y = x * 3")
    assert Parameters.from_spec(p2.spec()) == p2


def test_copy_is_independent():
    p = _mixed()
    q = p.copy().add("z", 0.0)
    assert "z" in q and "z" not in p and len(p) == 6


# -- property test -------------------------------------------------------------------------
_bound_kind = st.sampled_from(["both", "lower", "upper", "none"])
# XLA flushes subnormals to zero on CPU, so subnormal bounds are not meaningful.
_finite = st.floats(-1e3, 1e3, allow_nan=False, allow_subnormal=False)


@st.composite
def _params_and_raw(draw):
    n = draw(st.integers(1, 5))
    p = Parameters()
    for i in range(n):
        kind = draw(_bound_kind)
        a = draw(_finite)
        w = draw(st.floats(1e-3, 1e3))
        lo = a if kind in ("both", "lower") else None
        hi = (a + w if kind == "both" else a) if kind in ("both", "upper") else None
        value = a + w / 2 if kind == "both" else (a + 1 if kind == "lower" else a - 1)
        p.add(f"p{i}", value, min=lo, max=hi)
    raw = np.array(draw(st.lists(st.floats(-8, 8), min_size=n, max_size=n)))
    extreme = np.array(draw(st.lists(st.floats(-1e6, 1e6), min_size=n, max_size=n)))
    return p, raw, extreme


@settings(max_examples=100, deadline=None)
@given(_params_and_raw())
def test_property_inside_bounds_and_invertible(case):
    p, raw, extreme = case
    for r in (raw, extreme):
        phys = np.asarray(p.raw_to_phys(jnp.asarray(r)))
        assert np.all(np.isfinite(phys))
        assert np.all(phys >= p.lower) and np.all(phys <= p.upper)
    # Where the map is well conditioned (|raw| <= 8) the inverse recovers raw.
    back = np.asarray(p.phys_to_raw(p.raw_to_phys(jnp.asarray(raw))))
    span = np.where(np.isfinite(p.upper - p.lower), p.upper - p.lower, 1.0)
    scale = np.maximum(np.abs(np.where(np.isfinite(p.lower), p.lower, np.where(np.isfinite(p.upper), p.upper, 0))), span)
    # Precision lost when the bound offset dwarfs the softplus/logistic term.
    tol = 1e-9 + 1e-13 * scale * np.exp(np.abs(raw))
    np.testing.assert_allclose(back, raw, atol=float(np.max(tol)), rtol=1e-9)
