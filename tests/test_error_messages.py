"""The wording of every bad-input error of parameters.py, loss.py and minimizer.py.

Each message names the offending argument or parameter, its value and how to fix it; these
tests pin that wording so it does not regress into a bare traceback.
"""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np
import pytest

from sheap_dask.errors import InputDataError, OptionError, ParameterSpecError
from sheap_dask.parameters import Parameters


def _raises(exc, text, fn, *args, **kwargs):
    with pytest.raises(exc, match=re.escape(text)) as info:
        fn(*args, **kwargs)
    assert isinstance(info.value, ValueError)
    return str(info.value)


# -- Parameters ----------------------------------------------------------------------------
def test_duplicate_name():
    p = Parameters().add("amp", 1.0)
    _raises(ParameterSpecError, "duplicate parameter name 'amp'; every parameter needs a unique name.", p.add, "amp", 2.0)


def test_invalid_name():
    _raises(ParameterSpecError, "parameter name '1x' is invalid", Parameters().add, "1x", 1.0)


def test_min_not_below_max():
    msg = _raises(ParameterSpecError, "parameter 'sigma': min=5.0 must be strictly less than max=5.0", Parameters().add, "sigma", 5.0, min=5, max=5)
    assert "fixed=True" in msg
    _raises(ParameterSpecError, "parameter 'sigma': min=6.0 must be strictly less than max=5.0", Parameters().add, "sigma", 5.0, min=6, max=5)


def test_value_outside_bounds():
    _raises(
        ParameterSpecError,
        "parameter 'amp': value -1.0 is outside its bounds [0.0, inf]; move the value inside or widen the bounds.",
        Parameters().add, "amp", -1.0, min=0.0,
    )


def test_nonfinite_value_and_nan_bound():
    _raises(ParameterSpecError, "parameter 'amp': value nan must be finite.", Parameters().add, "amp", float("nan"))
    _raises(ParameterSpecError, "parameter 'amp': min is NaN; use None for no bound.", Parameters().add, "amp", 1.0, min=float("nan"))


def test_tie_to_unknown_source():
    p = Parameters().add("a", 1.0)
    _raises(
        ParameterSpecError,
        "parameter 'b': tie 'b = zz * 2.0' refers to unknown parameter 'zz'; add the source before the parameter tied to it (known: a).",
        p.add, "b", 1.0, tie="b = zz * 2",
    )


def test_tie_to_tied_source():
    p = Parameters().add("a", 1.0).add("b", 1.0, tie="b = a * 2")
    _raises(
        ParameterSpecError,
        "parameter 'c': tie 'c = b * 3.0' refers to 'b', which is itself tied ('b = a * 2.0'); tie to its free source 'a' instead.",
        p.add, "c", 1.0, tie="c = b * 3",
    )


def test_tie_to_fixed_source():
    p = Parameters().add("a", 1.0, fixed=True)
    _raises(
        ParameterSpecError,
        "parameter 'b': tie 'b = a + 1.0' refers to fixed parameter 'a'; tie to a free parameter, or fix the target too.",
        p.add, "b", 1.0, tie=("a", "+", 1),
    )


def test_tie_cycle():
    _raises(ParameterSpecError, "parameter 'a': tie 'a = a * 2.0' is a tie cycle", Parameters().add, "a", 1.0, tie="a = a * 2")
    p = Parameters().add("a", 1.0).add("b", 1.0, tie="b = a * 2")
    _raises(ParameterSpecError, "tie 'a = b / 2' creates a tie cycle: 'b' is already tied to 'a'.", p.tie, "a = b / 2")


def test_tie_unknown_operator():
    p = Parameters().add("a", 1.0)
    _raises(ParameterSpecError, "tie 'b = a ^ 2' for parameter 'b' uses unknown operator '^'; use one of * / + -", p.add, "b", 1.0, tie="b = a ^ 2")
    _raises(ParameterSpecError, "uses unknown operator '%'; use one of * / + -.", p.add, "b", 1.0, tie=("a", "%", 2.0))


def test_tie_malformed_and_wrong_target():
    p = Parameters().add("a", 1.0)
    _raises(ParameterSpecError, "tie 'b == a' for parameter 'b' is malformed; write it as 'target = source OP number'", p.add, "b", 1.0, tie="b == a")
    _raises(ParameterSpecError, "tie 'c = a * 2' ties 'c' but was given for parameter 'b'", p.add, "b", 1.0, tie="c = a * 2")
    _raises(ParameterSpecError, "divides by zero", p.add, "b", 1.0, tie="b = a / 0")


def test_tied_and_fixed():
    p = Parameters().add("a", 1.0)
    _raises(ParameterSpecError, "parameter 'b' is both fixed and tied; use one or the other.", p.add, "b", 1.0, tie="b = a", fixed=True)


def test_tie_to_a_parameter_that_is_a_source():
    p = Parameters().add("a", 1.0).add("b", 1.0, tie="b = a * 2").add("c", 1.0)
    _raises(ParameterSpecError, "parameter 'a' is the source of the tie(s) of ['b']; a tie source must stay free", p.tie, "a = c * 2")


def test_raw_vector_shape():
    p = Parameters().add("a", 1.0).add("b", 2.0)
    _raises(ParameterSpecError, "raw vector has shape (3,); expected (n_free,) or (batch, n_free) with n_free=2", p.raw_to_phys, jnp.zeros(3))
    _raises(ParameterSpecError, "lower bounds have shape (3,); expected (n_params,) or (batch, n_params) with n_params=2", p.raw_to_phys, jnp.zeros(2), lower=np.zeros(3))


# -- loss ----------------------------------------------------------------------------------
def _line(x, p):
    return p[0] + p[1] * x


def test_loss_unknown_kind_and_bad_weight():
    from sheap_dask.loss import build_loss_function

    _raises(OptionError, "kind='l1' is not a known loss; choose one of 'logcosh', 'chi2'.", build_loss_function, _line, kind="l1")
    _raises(OptionError, "curvature_weight=-1.0 must be a finite number >= 0 (0 switches the term off).", build_loss_function, _line, curvature_weight=-1.0)
    _raises(OptionError, "param_converter=3 must be a sheap_dask.Parameters, a callable raw -> physical, or None", build_loss_function, _line, param_converter=3)


# -- Minimizer -----------------------------------------------------------------------------
X = np.linspace(0.0, 1.0, 8)
FLUX = np.stack([1.0 + X, 2.0 - X])
ERR = np.full_like(FLUX, 0.1)


def _minimizer(**kw):
    from sheap_dask.minimizer import Minimizer

    return Minimizer(_line, **kw)


def test_unknown_method():
    _raises(OptionError, "method='bfgs' is not a known method; choose one of 'adam', 'lbfgs'", _minimizer, method="bfgs")


def test_bad_axis_mode_and_options():
    _raises(OptionError, "non_optimize_in_axis=2 is not valid; use 3: shared initial values and constraints; 4: ", _minimizer, non_optimize_in_axis=2)
    _raises(OptionError, "unknown option(s) ['rtoll'] for method='adam'; valid options: ", _minimizer, rtoll=1e-3)
    _raises(OptionError, "lbfgs_options has unknown key(s) ['maxiterations']; valid: ['maxiter', 'tolerance', ", _minimizer, method="lbfgs", lbfgs_options={"maxiterations": 3})
    _raises(OptionError, "loss_kind='l2' is not a known loss; choose one of 'logcosh', 'chi2'.", _minimizer, loss_kind="l2")
    _raises(OptionError, "num_steps=0 must be an int >= 1.", _minimizer, num_steps=0)
    _raises(OptionError, "param_converter=<lambda> must be a sheap_dask.Parameters or None".replace("<lambda>", "'x'"), _minimizer, param_converter="x")


def test_bad_constraints_shape():
    m = _minimizer(num_steps=2)
    _raises(
        InputDataError,
        "constraints has shape (3, 2); non_optimize_in_axis=3 (shared initial values and constraints) expects (2, 2): one (lower, upper) row per parameter.",
        m.run, np.zeros(2), FLUX, X, ERR, np.zeros((3, 2)),
    )
    m5 = _minimizer(num_steps=2, non_optimize_in_axis=5)
    _raises(InputDataError, "constraints has shape (2, 2); non_optimize_in_axis=5 (per-spectrum initial values and constraints) expects (2, 2, 2)", m5.run, np.zeros((2, 2)), FLUX, X, ERR, np.zeros((2, 2)))


def test_constraints_lower_above_upper():
    m = _minimizer(num_steps=2)
    _raises(
        ParameterSpecError,
        "constraints for parameter 'p1' (index (1,)) have lower=3.0 > upper=1.0; each row must be (lower, upper) with lower <= upper.",
        m.run, np.zeros(2), FLUX, X, ERR, np.array([[0.0, 1.0], [3.0, 1.0]]),
    )


def test_bad_initial_params_and_data_shapes():
    m4 = _minimizer(num_steps=2, non_optimize_in_axis=4)
    _raises(InputDataError, "initial_params has shape (2,); non_optimize_in_axis=4 (per-spectrum initial values, shared constraints) expects (2, n_params).", m4.run, np.zeros(2), FLUX, X, ERR)
    m = _minimizer(num_steps=2)
    _raises(InputDataError, "wavelength has shape (7,); expected (8,) or (2, 8) to match flux (2, 8).", m.run, np.zeros(2), FLUX, X[:7], ERR)
    _raises(InputDataError, "errors has shape (2, 7); expected (2, 8) like flux", m.run, np.zeros(2), FLUX, X, ERR[:, :7])
    _raises(InputDataError, "initial_params contains NaN or inf", m.run, np.array([np.nan, 0.0]), FLUX, X, ERR)
    p = Parameters().add("a", 1.0).add("b", 2.0).add("c", 3.0)
    _raises(InputDataError, "initial_params has 2 parameters but param_converter has 3 (['a', 'b', 'c']).", _minimizer(param_converter=p).run, np.zeros(2), FLUX, X, ERR)


def test_dependency_with_unknown_name():
    m = _minimizer(num_steps=2, list_dependencies=["p1 = q0 * 2"])
    _raises(ParameterSpecError, "tie 'p1 = q0 * 2.0' refers to unknown parameter 'q0'", m.run, np.zeros(2), FLUX, X, ERR)
