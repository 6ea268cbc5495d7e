"""NLopt SLSQP with JAX gradients: the per-spectrum fallback of the batched solve.

Modelled on zfit's ``NLoptSLSQPV1`` interface: a minimizer object with a tolerance, a
verbosity, an evaluation budget, a *strategy* (what to do with NaN/inf losses, plus an optional
callback) and a *criterion* (when a minimum counts as converged: the estimated distance to the
minimum, EDM). The algorithm is NLopt's ``LD_SLSQP`` (Kraft's sequential least-squares
quadratic programming) with bounds handled natively by NLopt; gradients and the Hessian come
from JAX in float64, never from finite differences.

What it adds to a plain ``nlopt.opt`` call, and why:

* **Objective rescaling.** A spectrum's raw chi-square is ~1e5 with gradients ~1e6; LD_SLSQP
  gives up on that (``RoundoffLimited`` after a handful of evaluations). NLopt sees
  ``f(x) / max(1, |f(x0)|)`` in parameters divided by ``1 / sqrt(H_ii)`` (the Hessian diagonal
  at the start, or the user's ``step_size``), so the problem it solves is O(1) in value,
  gradient and curvature. ``fmin``, the EDM and the errors are reported on the *unscaled* loss.
* **EDM criterion with restarts.** NLopt stops on a small change of the loss; the result is
  accepted when ``EDM = g^T H^-1 g / 2 < errordef * tol``, otherwise SLSQP restarts from the
  best point with a tighter tolerance (a fresh quasi-Newton start), within ``maxiter``.
* **NaN strategy.** NLopt never raises on a NaN loss; it would silently walk on. A non-finite
  loss or gradient is replaced by a large finite value with a gradient pointing back to the best
  point seen, so the line search retreats; too many in a row stop the fit with a clear message.
* **Best point kept.** NLopt reports some failures as exceptions (``RoundoffLimited``,
  ``ForcedStop``); the best finite point evaluated is always what is returned.
* **One compilation per loss function.** The jit-compiled ``value_and_grad`` and Hessian are
  cached per loss object; data enter as ``args`` so refitting many spectra of the same shape
  does not recompile.

This module is the minimizer (its result, the parameter specification, the NLopt rounds);
the evaluator, the NaN strategy, the EDM criterion and the compiled-loss cache are in
:mod:`sheap_dask.slsqp_evaluator`.

Examples
--------
>>> import numpy as np, jax.numpy as jnp
>>> from sheap_dask.slsqp import SLSQP
>>> x = np.linspace(0.0, 1.0, 50); y = 2.0 * x + 1.0
>>> def chi2(p, x, y):
...     return jnp.sum((p[0] * x + p[1] - y) ** 2 / 0.1**2)
>>> chi2.errordef = 1.0
>>> res = SLSQP().minimize(chi2, {"value": [1.0, 0.0], "name": ["slope", "icpt"]}, args=(x, y))
>>> res.converged, round(res.params["slope"], 6)
(True, 2.0)
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import nlopt
import numpy as np

from .errors import OptionError, ParameterSpecError
from .slsqp_evaluator import (
    EDM,
    DefaultStrategy,
    LossEvaluator,
    PushbackStrategy,
    check_loss,
    prepare_args,
)
from .status import Status

__all__ = ["SLSQP", "FitResult", "EDM", "PushbackStrategy", "DefaultStrategy", "LossEvaluator", "NLOPT_MESSAGES"]

logger = logging.getLogger("sheap_dask.slsqp")

#: NLopt return codes and their meaning (``nlopt_code`` / ``message`` of a FitResult).
NLOPT_MESSAGES: dict[int, str] = {
    1: "success",
    2: "stopval reached",
    3: "ftol reached: the loss changed less than the tolerance between iterations",
    4: "xtol reached: the parameters changed less than the tolerance between iterations",
    5: "maxeval reached: the evaluation budget (maxiter) is spent",
    6: "maxtime reached",
    -1: "generic failure",
    -2: "invalid arguments",
    -3: "out of memory",
    -4: "roundoff limited: no further progress possible in floating point",
    -5: "forced stop",
}

_PARAM_KEYS = ("value", "name", "lower", "upper", "step_size")


# ----------------------------------------------------------------------------------------
# Result
# ----------------------------------------------------------------------------------------
@dataclass
class FitResult:
    """Outcome of :meth:`SLSQP.minimize`.

    Attributes
    ----------
    params : dict of str to float
        Best-fit value of each parameter, by name.
    values : ndarray (n_params,)
        The same values, in order of ``names``.
    names : list of str
        Parameter names (``p0, p1, ...`` unless given).
    fmin : float
        Loss at ``values`` (unscaled, as the loss function returns it).
    converged : bool
        True when the criterion passed (default: ``edm < errordef * tol``).
    edm : float
        Estimated distance to the minimum, ``g^T H^-1 g / 2`` of the unscaled loss over the
        free parameters not held at a bound; NaN when it cannot be computed.
    n_eval : int
        Number of loss evaluations: the start plus NLopt's calls (what ``maxiter`` counts).
    nlopt_code : int
        NLopt's return code of the last run (negative codes are failures; see
        :data:`NLOPT_MESSAGES`).
    message : str
        Human-readable outcome: NLopt's code meaning plus what the criterion and strategy said.
    errors : ndarray (n_params,)
        1-sigma errors, ``sqrt(diag(covariance))``; 0 for fixed parameters (``lower == upper``),
        NaN where the covariance is undefined.
    covariance : ndarray (n_params, n_params)
        ``2 * errordef * H^-1``: for a chi-square (errordef 1) ``2 H^-1``, the linear
        least-squares ``(J^T J)^-1``; for a negative log-likelihood (errordef 0.5) ``H^-1``.
        A pseudo-inverse is used when ``H`` is singular (then ``valid`` is False).
    info : dict
        Diagnostics: ``n_nonfinite`` (evaluations whose loss or gradient was NaN/inf),
        ``stopped_nonfinite``, ``n_computed`` (evaluations actually computed by NLopt: SLSQP
        asks twice for the points its line search accepts), ``moved_inside`` (name -> (given, used) start values moved into
        their bounds), ``scale`` (factor applied to the loss NLopt sees), ``x_scale``,
        ``rounds`` (NLopt runs), ``nlopt_codes``, ``edm_history``, ``at_bound`` (names of
        parameters held at a bound), ``hessian_singular``, ``hessian_posdef``, ``errordef``,
        ``tol``, ``maxiter``, ``time_s``.
    valid : bool
        Converged, finite, and the Hessian positive definite (errors are meaningful).
    lower, upper : ndarray (n_params,)
        Bounds used (-inf/+inf where none), so the result can seed another fit (``init=``).
    errordef : float
        The loss's ``errordef`` used for the criterion and the errors.
    """

    params: dict[str, float]
    values: np.ndarray
    names: list[str]
    fmin: float
    converged: bool
    edm: float
    n_eval: int
    nlopt_code: int
    message: str
    errors: np.ndarray
    covariance: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)
    valid: bool = False
    lower: np.ndarray | None = None
    upper: np.ndarray | None = None
    errordef: float = 1.0

    @property
    def status(self) -> Status:
        """The :class:`~sheap_dask.status.Status` code of this fit.

        ``CONVERGED`` when converged; ``NONFINITE`` when stopped by (or started at) NaN/inf
        losses; ``MAX_ITER`` when the evaluation budget ran out; else ``FAILED``. The chunk
        layer reports a converged fallback as ``CONVERGED_AFTER_FALLBACK``.
        """
        if self.converged:
            return Status.CONVERGED
        if self.info.get("stopped_nonfinite") or not np.isfinite(self.fmin):
            return Status.NONFINITE
        if self.nlopt_code == nlopt.MAXEVAL_REACHED:
            return Status.MAX_ITER
        return Status.FAILED

    def __repr__(self) -> str:
        vals = ", ".join(f"{n}={v:.6g}±{e:.2g}" for n, v, e in zip(self.names, self.values, self.errors))
        return (
            f"FitResult(converged={self.converged}, valid={self.valid}, fmin={self.fmin:.8g}, "
            f"edm={self.edm:.3g}, n_eval={self.n_eval}, nlopt_code={self.nlopt_code}, params: {vals})"
        )


# ----------------------------------------------------------------------------------------
# Parameter specification
# ----------------------------------------------------------------------------------------
@dataclass
class _ParamSpec:
    values: np.ndarray
    names: list[str]
    lower: np.ndarray
    upper: np.ndarray
    step_size: np.ndarray | None
    moved_inside: dict[str, tuple[float, float]]

    @property
    def free(self) -> np.ndarray:
        return self.lower < self.upper


def _as_vector(obj: Any, key: str, n: int | None, allow_none: float | None = None) -> np.ndarray:
    """Turn a sequence into a float64 vector, naming ``key`` in every error."""
    if allow_none is not None and not np.isscalar(obj) and obj is not None:
        obj = [allow_none if v is None else v for v in np.ravel(np.asarray(obj, dtype=object))]
    try:
        arr = np.asarray(obj, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ParameterSpecError(f"params[{key!r}] must be a sequence of numbers, got {obj!r} ({exc}).") from None
    if arr.ndim == 0:
        if n is None:
            arr = arr.reshape(1)
        else:
            arr = np.full(n, float(arr))  # a scalar bound applies to every parameter
    if arr.ndim != 1:
        raise ParameterSpecError(f"params[{key!r}] must be 1-D (one entry per parameter), got shape {arr.shape}.")
    if n is not None and arr.shape[0] != n:
        raise ParameterSpecError(
            f"params[{key!r}] has {arr.shape[0]} entries but params['value'] has {n}; give one entry per parameter."
        )
    return arr


def _parse_params(params: Any, init: FitResult | None) -> _ParamSpec:
    """Normalise ``params`` (array or dict) and ``init`` into one validated specification."""
    if params is None and init is None:
        raise ParameterSpecError(
            "minimize() needs starting values: pass params=array or params={'value': ...}, or init=a previous FitResult."
        )
    if init is not None and not isinstance(init, FitResult):
        raise ParameterSpecError(
            f"init must be a FitResult from a previous minimize() call, got {type(init).__name__}; "
            "pass starting values through params={'value': ...} instead."
        )
    names = lower = upper = step = None
    if params is None:
        values = np.asarray(init.values, dtype=np.float64)
        names = list(init.names)
        lower = init.lower
        upper = init.upper
    elif isinstance(params, Mapping):
        unknown = [k for k in params if k not in _PARAM_KEYS]
        if unknown:
            raise ParameterSpecError(
                f"params has unknown key(s) {unknown}; allowed keys are {list(_PARAM_KEYS)} ('value' required)."
            )
        if "value" not in params:
            raise ParameterSpecError(
                f"params dict needs a 'value' entry (the initial values), got keys {list(params)}."
            )
        values = _as_vector(params["value"], "value", None)
        n = values.shape[0]
        if params.get("name") is not None:
            names = params["name"]
            names = [names] if isinstance(names, str) else [str(s) for s in names]
            if len(names) != n:
                raise ParameterSpecError(
                    f"params['name'] has {len(names)} entries but params['value'] has {n}; give one name per parameter."
                )
        if params.get("lower") is not None:
            lower = _as_vector(params["lower"], "lower", n, allow_none=-np.inf)
        if params.get("upper") is not None:
            upper = _as_vector(params["upper"], "upper", n, allow_none=np.inf)
        if params.get("step_size") is not None:
            step = _as_vector(params["step_size"], "step_size", n)
    else:
        if callable(params) or isinstance(params, str):
            raise ParameterSpecError(
                f"params must be an array of initial values or a dict with 'value', got {type(params).__name__}."
            )
        values = _as_vector(params, "value", None)

    n = values.shape[0]
    if n == 0:
        raise ParameterSpecError("params['value'] is empty; give at least one parameter.")
    if names is None:
        names = list(init.names) if init is not None and len(init.names) == n else [f"p{i}" for i in range(n)]
    if len(set(names)) != n:
        dup = sorted({s for s in names if names.count(s) > 1})
        raise ParameterSpecError(f"params['name'] has duplicate names {dup}; names must be unique.")
    if init is not None and params is not None:
        # init's values are the start; the specification (bounds, names) comes from params
        start = np.asarray(init.values, dtype=np.float64)
        if start.shape != (n,):
            raise ParameterSpecError(
                f"init has {start.size} parameter values but params has {n}; chain fits of the same parameters."
            )
        values = start.copy()
    lower = np.full(n, -np.inf) if lower is None else np.array(lower, dtype=np.float64)
    upper = np.full(n, np.inf) if upper is None else np.array(upper, dtype=np.float64)

    for key, arr in (("value", values), ("lower", lower), ("upper", upper)):
        bad = np.isnan(arr) if key != "value" else ~np.isfinite(arr)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            fix = "use -inf/+inf (or None) for no bound" if key != "value" else "give finite initial values"
            raise ParameterSpecError(f"params[{key!r}] of {names[i]!r} is {arr[i]}; {fix}.")
    bad = lower > upper
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ParameterSpecError(
            f"params bounds of {names[i]!r} are inverted: lower={lower[i]} > upper={upper[i]}; swap them "
            "(lower == upper fixes the parameter)."
        )
    if step is not None:
        bad = ~(np.isfinite(step) & (step > 0))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ParameterSpecError(
                f"params['step_size'] of {names[i]!r} is {step[i]}; step sizes must be finite and > 0."
            )

    # A start outside its bounds is moved just inside (not onto the bound: losses are often
    # singular there, e.g. a zero line width) and reported, instead of NLopt's invalid_argument.
    values = values.copy()
    moved: dict[str, tuple[float, float]] = {}
    for i in np.flatnonzero((values < lower) | (values > upper)):
        lo, hi = lower[i], upper[i]
        width = hi - lo
        if np.isfinite(width) and width > 0:
            inset = 1e-3 * width
        else:
            bound = lo if values[i] < lo else hi
            inset = 1e-3 * max(1.0, abs(bound))
            if np.isfinite(width):
                inset = 0.0
        new = min(lo + inset, hi) if values[i] < lo else max(hi - inset, lo)
        moved[names[i]] = (float(values[i]), float(new))
        values[i] = new
    if moved:
        msg = "; ".join(f"{k}: {a:.6g} -> {b:.6g}" for k, (a, b) in moved.items())
        warnings.warn(f"SLSQP: initial value(s) outside their bounds moved inside: {msg}", UserWarning, stacklevel=3)
    return _ParamSpec(values, list(names), lower, upper, step, moved)


# ----------------------------------------------------------------------------------------
# The minimizer
# ----------------------------------------------------------------------------------------
class SLSQP:
    """NLopt's SLSQP (``LD_SLSQP``) with JAX gradients, an EDM criterion and a NaN strategy.

    Parameters
    ----------
    tol : float, optional
        Convergence tolerance, default ``1e-3``: converged when
        ``EDM = g^T H^-1 g / 2 < errordef * tol`` on the unscaled loss.
    verbosity : int, optional
        0 (default) silent; 1-5 an INFO summary per fit (5: also per NLopt round); 6-9 DEBUG
        details (criterion, non-finite evaluations); 10 every evaluation. Messages go to the
        ``logging`` logger ``"sheap_dask.slsqp"`` (configure logging to see them).
    maxiter : int, optional
        Budget of loss evaluations (value and gradient), shared by all NLopt rounds; default
        ``1000 + 100 * n_free``.
    strategy : PushbackStrategy, optional
        Handling of NaN/inf losses and the optional per-evaluation callback; default
        ``PushbackStrategy()``.
    criterion : type or callable, optional
        Factory ``criterion(tol=..., errordef=...)`` returning an object with
        ``calculate(x_free, g, h, lower, upper) -> float`` and ``converged(value) -> bool``;
        default :class:`EDM`.
    name : str, default "NLopt SLSQP"

    Notes
    -----
    The loss is ``loss(x, *args) -> scalar``, a pure ``jax.numpy`` function of the full
    parameter vector ``x`` (n_params,). Its ``errordef`` attribute says what one unit of loss
    means: 1 for a chi-square (the default when absent), 0.5 for a negative log-likelihood.
    Losses that are neither (a mean, a robust log-cosh) converge the same way, but their
    ``errors`` are then not 1-sigma errors.

    NLopt minimises ``scale * loss`` with ``scale = 1 / max(1, |loss(x0)|)`` over
    ``y = x_free / x_scale``, ``x_scale`` from ``step_size`` or ``1/sqrt(scale * H_ii)`` at the
    start (1 where the curvature is not positive); it stops a round when the scaled loss
    changes by less than ``0.1 * tol * errordef * scale``. If the EDM criterion then fails,
    SLSQP restarts from the best point with a 10 times tighter tolerance, up to 6 rounds or
    ``maxiter`` evaluations.

    Examples
    --------
    >>> import numpy as np, jax.numpy as jnp
    >>> from sheap_dask.slsqp import SLSQP
    >>> def nll(p):  # Gaussian negative log-likelihood of mean p[0], sigma 2
    ...     return 0.5 * jnp.sum(((jnp.array([1.0, 2.0, 3.0]) - p[0]) / 2.0) ** 2)
    >>> nll.errordef = 0.5
    >>> res = SLSQP(tol=1e-6).minimize(nll, {"value": [0.0], "lower": [-10], "upper": [10]})
    >>> round(float(res.values[0]), 6), round(float(res.errors[0]), 6)  # 2/sqrt(3)
    (2.0, 1.154701)
    """

    _max_rounds = 6

    def __init__(self, tol: float | None = None, verbosity: int | None = None, maxiter: int | None = None,
                 strategy: PushbackStrategy | None = None, criterion: Callable | None = None,
                 name: str = "NLopt SLSQP") -> None:
        tol = 1e-3 if tol is None else tol
        try:
            ok = float(tol) > 0 and math.isfinite(float(tol))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise OptionError(f"tol must be a finite number > 0 (default 1e-3), got {tol!r}.")
        verbosity = 0 if verbosity is None else verbosity
        if isinstance(verbosity, bool) or not isinstance(verbosity, int | np.integer) or not 0 <= verbosity <= 10:
            raise OptionError(f"verbosity must be an integer from 0 (silent) to 10 (every evaluation), got {verbosity!r}.")
        if maxiter is not None and (isinstance(maxiter, bool) or not isinstance(maxiter, int | np.integer) or maxiter < 1):
            raise OptionError(f"maxiter must be a positive integer (number of loss evaluations) or None, got {maxiter!r}.")
        if strategy is not None and not hasattr(strategy, "replace_nonfinite"):
            raise OptionError(
                f"strategy must be a PushbackStrategy (or provide replace_nonfinite/max_nonfinite/callback), got {type(strategy).__name__}."
            )
        if criterion is not None and not callable(criterion):
            raise OptionError(f"criterion must be a class or factory like EDM, got {type(criterion).__name__}.")
        self.tol = float(tol)
        self.verbosity = int(verbosity)
        self.maxiter = None if maxiter is None else int(maxiter)
        self.strategy = PushbackStrategy() if strategy is None else strategy
        self.criterion = EDM if criterion is None else criterion
        self.name = name

    def __repr__(self) -> str:
        return f"SLSQP(tol={self.tol}, verbosity={self.verbosity}, maxiter={self.maxiter}, name={self.name!r})"

    # -- factories (zfit interface) ---------------------------------------------------------
    def create_criterion(self, loss: Callable | None = None, params: Any = None):
        """The convergence criterion for ``loss`` (its ``errordef``; 1 when ``loss`` is None)."""
        errordef = 1.0 if loss is None else check_loss(loss)
        return self.criterion(tol=self.tol, errordef=errordef)

    def create_evaluator(self, loss: Callable | None = None, params: Any = None, strategy: PushbackStrategy | None = None,
                         args: tuple = ()) -> LossEvaluator:
        """A :class:`LossEvaluator` for ``loss`` at ``params`` (array or dict, as in :meth:`minimize`)."""
        if loss is None:
            raise OptionError("create_evaluator needs a loss: pass loss=f with f(x, *args) -> scalar.")
        check_loss(loss)
        spec = params if isinstance(params, _ParamSpec) else _parse_params(params, None)
        return LossEvaluator(loss, spec, self.strategy if strategy is None else strategy, prepare_args(args),
                             verbosity=self.verbosity)

    # -- the fit ---------------------------------------------------------------------------
    def minimize(self, loss: Callable, params: Any = None, init: FitResult | None = None, args: tuple = ()) -> FitResult:
        """Minimise ``loss(x, *args)`` from ``params`` (or from a previous result ``init``).

        Parameters
        ----------
        loss : callable
            ``loss(x, *args) -> scalar`` in ``jax.numpy``; optional attribute ``errordef``
            (default 1). Pass the *same* function object for many fits: its compilation is
            cached, and data given through ``args`` with the same shapes never recompile.
        params : array-like or dict, optional
            Initial values (n_params,), or a dict with ``value`` (required) and optional
            ``name``, ``lower``, ``upper``, ``step_size`` (sequences of length n_params; None
            or +-inf entries mean no bound; ``lower == upper`` fixes a parameter).
        init : FitResult, optional
            A previous result: its values are the start (bounds and names too when
            ``params`` is None).
        args : tuple of arrays, optional
            Extra arguments of the loss (the data of one spectrum).

        Returns
        -------
        FitResult
        """
        t0 = time.perf_counter()
        errordef = check_loss(loss)
        spec = _parse_params(params, init)
        args = prepare_args(args)
        evaluator = LossEvaluator(loss, spec, self.strategy, args, verbosity=self.verbosity)
        criterion = self.criterion(tol=self.tol, errordef=errordef)
        free_idx = evaluator.free_idx
        n_free = free_idx.size
        maxiter = self.maxiter if self.maxiter is not None else 1000 + 100 * n_free
        lower, upper = spec.lower[free_idx], spec.upper[free_idx]
        info: dict[str, Any] = {
            "n_nonfinite": 0, "stopped_nonfinite": False, "moved_inside": dict(spec.moved_inside), "scale": 1.0,
            "x_scale": None, "rounds": 0, "nlopt_codes": [], "edm_history": [], "at_bound": [],
            "hessian_singular": False, "hessian_posdef": False, "errordef": errordef, "tol": self.tol,
            "maxiter": maxiter,
        }

        def finish(x_full, f, code, message, edm=float("nan"), converged=False, h=None):
            info["n_nonfinite"] = evaluator.n_nonfinite
            info["n_computed"] = evaluator.n_computed
            info["stopped_nonfinite"] = evaluator.stopped_nonfinite
            info["time_s"] = time.perf_counter() - t0
            cov = np.full((spec.values.size, spec.values.size), np.nan)
            valid = False
            if h is not None and np.all(np.isfinite(h)):
                cov_free, posdef, singular = _covariance(h, errordef)
                info["hessian_posdef"], info["hessian_singular"] = posdef, singular or info["hessian_singular"]
                cov[np.ix_(free_idx, free_idx)] = cov_free
                valid = bool(converged and posdef and not singular and np.isfinite(f))
            fixed = np.flatnonzero(~spec.free)
            cov[fixed, :] = 0.0
            cov[:, fixed] = 0.0
            with np.errstate(invalid="ignore"):
                errors = np.sqrt(np.diag(cov))
            res = FitResult(
                params={n: float(v) for n, v in zip(spec.names, x_full)}, values=np.asarray(x_full, np.float64),
                names=list(spec.names), fmin=float(f), converged=bool(converged), edm=float(edm),
                n_eval=evaluator.n_eval, nlopt_code=int(code), message=message, errors=errors, covariance=cov,
                info=info, valid=valid, lower=spec.lower.copy(), upper=spec.upper.copy(), errordef=errordef,
            )
            if self.verbosity >= 1:
                logger.info("%s: %s; fmin=%.10g edm=%.3g n_eval=%d (%.3fs)", self.name, message, res.fmin, res.edm,
                            res.n_eval, info["time_s"])
            return res

        x_free = spec.values[free_idx].copy()
        if n_free == 0:  # everything fixed: evaluate once
            f, _ = evaluator.value_and_grad(x_free)
            evaluator.n_eval += 1
            ok = math.isfinite(f)
            return finish(spec.values, f, nlopt.SUCCESS, "all parameters fixed: nothing to minimize" if ok
                          else "all parameters fixed and the loss is not finite", 0.0 if ok else float("nan"), ok,
                          h=np.zeros((0, 0)))

        # Start: loss, gradient and curvature fix the scaling of what NLopt sees.
        f0, g0 = evaluator.value_and_grad(x_free)
        evaluator.n_eval += 1
        if not (math.isfinite(f0) and np.all(np.isfinite(g0))):
            evaluator.n_nonfinite += 1
            return finish(spec.values, f0, nlopt.FAILURE,
                          f"the loss or its gradient is not finite at the starting point (f={f0}); "
                          "give starting values where the loss is finite")
        evaluator.best_f, evaluator.best_x = f0, spec.values.copy()
        scale = 1.0 / max(1.0, abs(f0))
        h0 = evaluator.hessian(x_free)
        edm = criterion.calculate(x_free, g0, h0, lower, upper)
        info["edm_history"].append(edm)
        if criterion.converged(edm):  # e.g. chaining from a converged result: nothing to do
            info["at_bound"] = _at_bound(criterion, spec, free_idx)
            return finish(spec.values, f0, nlopt.SUCCESS,
                          f"converged at the starting point (edm {edm:.3g} < errordef*tol "
                          f"{getattr(criterion, 'threshold', float('nan')):.3g}); NLopt not run", edm, True, h0)
        if spec.step_size is not None:
            x_scale = spec.step_size[free_idx].copy()
        else:
            d = np.diag(h0) * scale
            ok = np.isfinite(d) & (d > 0)
            x_scale = np.ones(n_free)
            x_scale[ok] = 1.0 / np.sqrt(d[ok])
        evaluator.scale, evaluator.x_scale = scale, x_scale
        if self.verbosity >= 6:
            logger.debug("start: f=%.10g edm=%.3g scale=%.3g x_scale=%s", f0, edm, scale, np.array2string(x_scale, precision=3))
        evaluator._best_y = evaluator.to_y(x_free)
        info["scale"], info["x_scale"] = scale, x_scale.copy()
        ftol = 0.1 * self.tol * errordef * scale

        code, message, edm, converged, h = nlopt.FAILURE, "", float("nan"), False, None
        for rnd in range(self._max_rounds):
            remaining = maxiter - evaluator.n_eval
            if remaining <= 0:
                code = nlopt.MAXEVAL_REACHED
                break
            opt = nlopt.opt(nlopt.LD_SLSQP, n_free)
            evaluator._opt = opt
            try:
                opt.set_lower_bounds(evaluator.to_y(lower))
                opt.set_upper_bounds(evaluator.to_y(upper))
                opt.set_min_objective(evaluator.objective)
                opt.set_maxeval(int(remaining))
                opt.set_ftol_abs(ftol)
                y0 = np.clip(evaluator._best_y, evaluator.to_y(lower), evaluator.to_y(upper))
                f_before = evaluator.best_f
                opt.optimize(y0)
                code = opt.last_optimize_result()
            except nlopt.RoundoffLimited:
                code = nlopt.ROUNDOFF_LIMITED
            except nlopt.ForcedStop:
                code = nlopt.FORCED_STOP
            except (nlopt.invalid_argument, ValueError) as exc:
                code = nlopt.INVALID_ARGS
                message = f"NLopt rejected the problem ({exc})"
            except MemoryError:
                code = nlopt.OUT_OF_MEMORY
            except RuntimeError as exc:  # NLopt's generic failure
                code = nlopt.FAILURE
                message = f"NLopt failed ({exc})"
            finally:
                evaluator._opt = None
            info["rounds"] = rnd + 1
            info["nlopt_codes"].append(int(code))
            xb = evaluator.best_x[free_idx]
            _, g = evaluator.value_and_grad(xb)
            h = evaluator.hessian(xb)
            edm = criterion.calculate(xb, g, h, lower, upper)
            converged = criterion.converged(edm)
            info["edm_history"].append(edm)
            info["hessian_singular"] = bool(getattr(criterion, "info", {}).get("hessian_singular", False))
            info["at_bound"] = _at_bound(criterion, spec, free_idx)
            if self.verbosity >= 5:
                logger.info("round %d: nlopt code %d (%s), f=%.10g edm=%.3g, n_eval=%d", rnd + 1, code,
                            NLOPT_MESSAGES.get(code, "?"), evaluator.best_f, edm, evaluator.n_eval)
            if converged or evaluator.stopped_nonfinite or code in (nlopt.MAXEVAL_REACHED, nlopt.INVALID_ARGS):
                break
            if not evaluator.best_f < f_before - 0.1 * errordef * self.tol:
                break  # a round that made no real progress will not make progress on a restart
            ftol *= 0.1

        if not message:
            message = f"nlopt: {NLOPT_MESSAGES.get(code, 'unknown code')}"
        if evaluator.stopped_nonfinite:
            message = (f"stopped after {self.strategy.max_nonfinite} consecutive non-finite loss evaluations "
                       f"({evaluator.n_nonfinite} in all); best finite point returned")
        elif converged:
            message = f"converged (edm {edm:.3g} < errordef*tol {criterion.threshold:.3g}); {message}"
        else:
            message = f"not converged (edm {edm:.3g}, needs < {getattr(criterion, 'threshold', float('nan')):.3g}); {message}"
            if evaluator.n_nonfinite:
                message += (f"; the loss was non-finite in {evaluator.n_nonfinite} evaluations "
                            "(a NaN region next to the best point?)")
        return finish(evaluator.best_x, evaluator.best_f, code, message, edm, converged, h)


def _at_bound(criterion, spec: _ParamSpec, free_idx: np.ndarray) -> list[str]:
    active = getattr(criterion, "info", {}).get("active")
    return [spec.names[i] for i in free_idx[active]] if active is not None else []


def _covariance(h: np.ndarray, errordef: float) -> tuple[np.ndarray, bool, bool]:
    """``2 * errordef * H^-1`` (pseudo-inverse when singular), positive-definiteness, singularity."""
    if h.size == 0:
        return h.copy(), True, False
    hs = 0.5 * (h + h.T)
    try:
        eig = np.linalg.eigvalsh(hs)
    except np.linalg.LinAlgError:
        return np.full_like(h, np.nan), False, True
    top = np.max(np.abs(eig)) if eig.size else 0.0
    singular = bool(top == 0 or np.min(np.abs(eig)) <= 1e-14 * top)
    posdef = bool(np.all(eig > 0) and not singular)
    inv = np.linalg.pinv(hs, hermitian=True) if singular else np.linalg.inv(hs)
    return 2.0 * errordef * inv, posdef, singular
