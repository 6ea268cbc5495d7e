r"""``Minimizer``: one JIT-compiled, ``jax.vmap``-ed optimizer for a whole block of spectra.

The seed interface is kept::

    minimizer = Minimizer(func, non_optimize_in_axis=3, num_steps=1000, method="adam", ...)
    final_params, loss_history = minimizer(initial_params, flux, wavelength, errors, constraints)

and :meth:`Minimizer.run` returns a :class:`MinimizeResult` with a per-spectrum
:class:`~sheap_dask.status.Status`. Every spectrum is optimized in the unconstrained raw
space of a :class:`~sheap_dask.parameters.Parameters` (bounds through the logistic /
softplus map, ties and fixed values rebuilt exactly), so the result never leaves the bounds.

Convergence (per spectrum, checked every iteration)
---------------------------------------------------
* ``gtol``: :math:`\max_j |\partial L / \partial \mathrm{raw}_j| \le` ``gtol``;
* ``rtol`` over ``patience`` iterations: the best loss has not dropped by more than
  ``rtol * |L_ref|`` for ``patience`` consecutive iterations, where :math:`L_ref` is the best
  loss at the last such drop. For lbfgs (monotone line search) ``patience=1`` is the plain
  relative change per step; adam's loss oscillates near a minimum, so its test looks over a
  window. ``rtol`` is raised to ``4 * eps`` of the dtype (float32 fits would otherwise run
  on rounding noise).

A converged spectrum stops changing (its update is masked) and the ``lax.while_loop`` ends
when every spectrum has converged or ``num_steps`` is reached. The parameters returned are
those of the best (lowest) loss seen, so a spectrum whose loss or gradient turns NaN/inf
keeps its last finite parameters with status ``NONFINITE``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from .errors import InputDataError, ModelError, OptionError, ParameterSpecError
from .loss import LOSS_KINDS, build_loss_function, usable_mask, weighted_residuals
from .parameters import Parameters, parse_tie
from .status import Status

__all__ = ["Minimizer", "MinimizeResult", "SolveProblem", "SolveOutput", "register_solver", "DEFAULT_LEARNING_RATE"]

#: Adam step size used when ``learning_rate=None``.
DEFAULT_LEARNING_RATE = 1e-2

# Options every method understands, with per-method defaults (kwargs of Minimizer).
_COMMON_DEFAULTS = {
    "adam": {"rtol": 1e-6, "gtol": 1e-9, "patience": 20},
    "lbfgs": {"rtol": 1e-9, "gtol": 1e-9, "patience": 2},
}
_GENERIC_DEFAULTS = {"rtol": 1e-8, "gtol": 1e-9, "patience": 1, "robust_scale": 1.0}


class SolveProblem(NamedTuple):
    """What a per-spectrum solve function gets (static under ``jit``).

    Attributes
    ----------
    loss : callable
        ``loss(raw, args) -> scalar`` for one spectrum (raw: (n_free,)).
    residuals : callable
        ``residuals(raw, args) -> (n_pix,)`` weighted residuals ``(model - flux) / error``,
        masked pixels exactly 0 (for least-squares methods).
    num_steps : int
        Iteration budget; the loss history has this length.
    learning_rate : float or None
        As given to :class:`Minimizer` (``None``: the method's default).
    options : mapping
        Method options (``rtol``, ``gtol``, ``patience`` and the method's own).
    """

    loss: Callable
    residuals: Callable
    num_steps: int
    learning_rate: Any
    options: Mapping[str, Any]


class SolveOutput(NamedTuple):
    """What a per-spectrum solve function returns (one spectrum; batched by ``vmap``).

    ``raw`` (n_free,) best raw vector, ``loss`` its loss, ``history`` (num_steps,) loss per
    iteration padded with the final loss, ``n_iter`` int32, ``status`` int8
    (:class:`Status`), ``grad_norm`` max-abs raw gradient at ``raw``.
    """

    raw: Any
    loss: Any
    history: Any
    n_iter: Any
    status: Any
    grad_norm: Any


@dataclass(frozen=True)
class _Solver:
    solve: Callable  # solve(problem: SolveProblem, raw0, args) -> SolveOutput
    defaults: Mapping[str, Any]  # the method's own options (beyond rtol/gtol/patience)
    description: str


_SOLVERS: dict[str, _Solver] = {}


def register_solver(name: str, solve: Callable, *, defaults: Mapping[str, Any] | None = None, description: str = "") -> None:
    """Add a method to :class:`Minimizer` (``method=name``).

    Parameters
    ----------
    name : str
        Method name.
    solve : callable
        ``solve(problem: SolveProblem, raw0, args) -> SolveOutput`` for ONE spectrum, pure
        JAX (it is vmapped and jit-compiled). ``args`` is an opaque tuple to pass on to
        ``problem.loss`` / ``problem.residuals``.
    defaults : mapping, optional
        Method options and their defaults, accepted as ``Minimizer(**kwargs)`` (and may
        include ``rtol``/``gtol``/``patience`` to override the generic defaults).
    description : str
        One line for error messages and docs.
    """
    _SOLVERS[name] = _Solver(solve, dict(defaults or {}), description)


def _tolerance(rtol, dtype):
    import jax.numpy as jnp

    return jnp.maximum(jnp.asarray(rtol, dtype), 4 * jnp.finfo(dtype).eps)


def _iterate(problem: SolveProblem, raw0, args, init_fn, step_fn) -> SolveOutput:
    """Generic per-spectrum loop: best-loss tracking, convergence, status, loss history.

    ``init_fn(raw0) -> opt_state``; ``step_fn(raw, opt_state) -> (value, grad, new_raw,
    new_opt_state)`` where value/grad are at ``raw`` (before the step).
    """
    import jax
    import jax.numpy as jnp
    from jax import lax

    dtype = raw0.dtype
    opts = problem.options
    rtol = _tolerance(opts["rtol"], dtype)
    gtol = jnp.asarray(opts["gtol"], dtype)
    patience = int(opts["patience"])
    n = problem.num_steps
    inf = jnp.asarray(jnp.inf, dtype)

    class C(NamedTuple):
        raw: Any
        opt: Any
        best_raw: Any
        best_loss: Any
        best_gnorm: Any
        ref_loss: Any
        stall: Any
        step: Any
        status: Any  # -1 running
        history: Any

    def cond(c):
        return (c.status < 0) & (c.step < n)

    def body(c):
        value, grad, new_raw, new_opt = step_fn(c.raw, c.opt)
        gnorm = jnp.max(jnp.abs(grad)) if grad.size else jnp.zeros((), dtype)
        finite = jnp.isfinite(value) & jnp.isfinite(gnorm) & jnp.all(jnp.isfinite(new_raw))
        better = finite & (value < c.best_loss)
        best_raw = jnp.where(better, c.raw, c.best_raw)
        best_loss = jnp.where(better, value, c.best_loss)
        best_gnorm = jnp.where(better, gnorm, c.best_gnorm)
        # The first finite loss always counts as a decrease (ref_loss starts at +inf).
        significant = finite & (~jnp.isfinite(c.ref_loss) | (value < c.ref_loss - rtol * jnp.abs(c.ref_loss)))
        ref_loss = jnp.where(significant, value, c.ref_loss)
        stall = jnp.where(significant, 0, c.stall + 1)
        converged = finite & ((gnorm <= gtol) | (stall >= patience))
        status = jnp.where(
            ~finite, jnp.int8(Status.NONFINITE), jnp.where(converged, jnp.int8(Status.CONVERGED), jnp.int8(-1))
        )
        history = c.history.at[c.step].set(jnp.where(jnp.isfinite(value), value, inf))
        # Once stopped, the parameters are frozen: the next state keeps the current point.
        keep = status >= 0
        raw = jnp.where(keep, c.raw, new_raw)
        opt = jax.tree_util.tree_map(lambda a, b: jnp.where(keep, a, b), c.opt, new_opt)
        return C(raw, opt, best_raw, best_loss, best_gnorm, ref_loss, stall, c.step + 1, status, history)

    c0 = C(
        raw0,
        init_fn(raw0),
        raw0,
        inf,
        inf,
        inf,
        jnp.int32(0),
        jnp.int32(0),
        jnp.int8(-1),
        jnp.full((n,), jnp.nan, dtype),
    )
    c = lax.while_loop(cond, body, c0)
    status = jnp.where(c.status < 0, jnp.int8(Status.MAX_ITER), c.status)
    # No finite loss at all: report the start (still the best_raw) with a NaN loss.
    loss = jnp.where(jnp.isfinite(c.best_loss), c.best_loss, jnp.nan)
    history = jnp.where(jnp.arange(n) < c.step, c.history, loss)
    return SolveOutput(c.best_raw, loss, history, c.step, status, c.best_gnorm)


def _solve_adam(problem: SolveProblem, raw0, args) -> SolveOutput:
    import jax
    import optax

    lr = DEFAULT_LEARNING_RATE if problem.learning_rate is None else problem.learning_rate
    opt = optax.adam(lr, **problem.options.get("adam_options", {}))
    value_and_grad = jax.value_and_grad(lambda r: problem.loss(r, args))

    def step(raw, state):
        value, grad = value_and_grad(raw)
        updates, state = opt.update(grad, state, raw)
        return value, grad, optax.apply_updates(raw, updates), state

    return _iterate(problem, raw0, args, opt.init, step)


_LBFGS_KWARGS = tuple(inspect.signature(__import__("optax").lbfgs).parameters)


def _solve_lbfgs(problem: SolveProblem, raw0, args) -> SolveOutput:
    import optax

    fun = lambda r: problem.loss(r, args)  # noqa: E731
    opt = optax.lbfgs(**problem.options.get("lbfgs_kwargs", {}))
    # The zoom line search already evaluated value and gradient at the accepted point: reuse.
    value_and_grad = optax.value_and_grad_from_state(fun)

    def step(raw, state):
        value, grad = value_and_grad(raw, state=state)
        updates, state = opt.update(grad, state, raw, value=value, grad=grad, value_fn=fun)
        return value, grad, optax.apply_updates(raw, updates), state

    return _iterate(problem, raw0, args, opt.init, step)


def _solve_lm(problem: SolveProblem, raw0, args) -> SolveOutput:
    """Levenberg-Marquardt on the weighted residuals (robust IRLS for ``loss_kind="logcosh"``).

    It minimises the data term only (sum of squared, or log-cosh, residuals): the seed's
    curvature, smoothness, max and penalty terms need adam or lbfgs. ``num_steps`` is the
    iteration budget; the loss history holds the final cost after the last iteration.
    """
    from .lm import levenberg_marquardt

    opts = problem.options
    res = levenberg_marquardt(
        lambda r: problem.residuals(r, args),
        raw0,
        max_iter=problem.num_steps,
        ftol=opts["rtol"],
        xtol=opts["xtol"],
        gtol=opts["gtol"],
        robust="logcosh" if opts["loss_kind"] == "logcosh" else None,
        robust_scale=opts["robust_scale"],
    )
    return _lm_output(res, problem.num_steps)


def _lm_output(res, num_steps: int) -> SolveOutput:
    """One spectrum's :class:`~sheap_dask.lm.LMResult` as a SolveOutput (the history is the
    final cost: LM's budget is an iteration cap, not a fixed number of steps)."""
    import jax.numpy as jnp

    history = jnp.full((num_steps,), res.cost, dtype=res.cost.dtype)
    return SolveOutput(res.x, res.cost, history, res.n_iter.astype(jnp.int32), res.status.astype(jnp.int8), res.grad_norm)


def _finish(params: Parameters, out: SolveOutput, init, wl, flux, err, lo, hi) -> tuple:
    """One spectrum's outputs of the compiled solve: physical parameters, and NaN / 0 /
    ``NO_DATA`` where the spectrum has fewer usable pixels than free parameters."""
    import jax.numpy as jnp

    no_data = jnp.sum(usable_mask(wl, flux, err)) < max(params.n_free, 1)
    phys = params.raw_to_phys(out.raw, lo, hi, init)
    nan = jnp.asarray(jnp.nan, flux.dtype)
    return (
        jnp.where(no_data, nan, phys),
        jnp.where(no_data, nan, out.loss),
        jnp.where(no_data, nan, out.history),
        jnp.where(no_data, 0, out.n_iter).astype(jnp.int32),
        jnp.where(no_data, jnp.int8(Status.NO_DATA), out.status).astype(jnp.int8),
        jnp.where(no_data, nan, out.grad_norm),
        out.raw,
    )


register_solver("adam", _solve_adam, description="optax.adam, fixed learning rate (default 1e-2)")
register_solver("lbfgs", _solve_lbfgs, description="optax.lbfgs with its zoom line search")
register_solver(
    "lm",
    _solve_lm,
    defaults={"rtol": 1e-8, "gtol": 1e-10, "xtol": 1e-8, "robust_scale": 1.0, "slots": 0},
    description="batched Levenberg-Marquardt with exact JAX Jacobians (robust IRLS for log-cosh)",
)


@dataclass(frozen=True)
class MinimizeResult:
    """Per-spectrum outcome of :meth:`Minimizer.run` (numpy arrays, leading axis = spectrum).

    Attributes
    ----------
    params : (batch, n_params)
        Best physical parameters (ties and fixed values filled in, inside the bounds); NaN
        for ``NO_DATA`` spectra.
    loss : (batch,)
        Loss at ``params`` (NaN where no finite loss was ever found or no data).
    loss_history : (batch, num_steps)
        Loss per iteration, padded with ``loss`` after the spectrum stopped (NaN for
        ``NO_DATA``).
    n_iter : (batch,) int32
        Iterations run.
    status : (batch,) int8
        :class:`~sheap_dask.status.Status` codes: CONVERGED, MAX_ITER, NO_DATA (fewer usable
        pixels than free parameters), NONFINITE.
    grad_norm : (batch,)
        Max-abs gradient of the loss with respect to the raw parameters at ``params``.
    raw : (batch, n_free)
        The raw (optimizer-space) vectors of ``params``.
    names : list of str
        Parameter names (columns of ``params``).
    method : str
        The method that produced the result.
    """

    params: np.ndarray
    loss: np.ndarray
    loss_history: np.ndarray
    n_iter: np.ndarray
    status: np.ndarray
    grad_norm: np.ndarray
    raw: np.ndarray
    names: list = field(default_factory=list)
    method: str = ""

    @property
    def converged(self) -> np.ndarray:
        """Boolean mask of the spectra with status CONVERGED."""
        return self.status == Status.CONVERGED

    def status_counts(self) -> dict[str, int]:
        """``{status name: count}`` for a quick look."""
        vals, counts = np.unique(self.status, return_counts=True)
        return {Status(int(v)).meaning: int(c) for v, c in zip(vals, counts, strict=True)}


_AXIS_MODES = {3: "shared initial values and constraints", 4: "per-spectrum initial values, shared constraints", 5: "per-spectrum initial values and constraints"}


class Minimizer:
    """Fit a model to a batch of spectra at once: ``jit(vmap(solve))`` over the spectrum axis.

    Parameters
    ----------
    func : callable
        ``func(wavelength, phys_params) -> model flux`` (pure jnp).
    non_optimize_in_axis : {3, 4, 5}
        3: ``initial_params`` (n_params,) and ``constraints`` (n_params, 2) shared by all
        spectra; 4: ``initial_params`` (batch, n_params) per spectrum, shared constraints;
        5: both per spectrum (``constraints`` (batch, n_params, 2)).
    num_steps : int
        Iteration budget per spectrum (adam steps or lbfgs iterations); the loss history has
        this length. Overridden by ``lbfgs_options["maxiter"]`` for lbfgs.
    learning_rate : float or optax schedule, optional
        Adam step size; ``None`` means :data:`DEFAULT_LEARNING_RATE` (1e-2, in raw units:
        logistic-mapped parameters move by about 1% of their range per step at most).
        Ignored for lbfgs (its line search picks the step).
    list_dependencies : list of str or tuple
        Ties ``"target = source OP number"`` (op in ``* / + -``) added to the parameters.
        Names are those of ``param_converter`` when it is a Parameters, else ``p0, p1, ...``
        (positions in the parameter vector).
    weighted : bool
        Divide residuals by the errors (see :func:`~sheap_dask.loss.build_loss_function`).
    method : str
        ``"adam"`` or ``"lbfgs"`` (or a method added with :func:`register_solver`).
    lbfgs_options : dict, optional
        ``maxiter`` (replaces ``num_steps``), ``tolerance`` (replaces ``gtol``) and any
        keyword argument of ``optax.lbfgs`` (``memory_size``, ``scale_init_precond``,
        ``linesearch``, ``learning_rate``).
    penalty_function, penalty_weight, curvature_weight, smoothness_weight, max_weight
        Passed to :func:`~sheap_dask.loss.build_loss_function`.
    param_converter : Parameters, optional
        Defines the parameters (names, ties, fixed ones, default bounds and values). ``None``:
        an internal Parameters ``p0, p1, ...`` is built from ``constraints`` and
        ``list_dependencies``.
    **kwargs
        ``rtol`` (relative loss decrease; default 1e-6 for adam, 1e-9 for lbfgs), ``gtol``
        (max-abs raw-gradient tolerance, default 1e-9), ``patience`` (iterations without a
        relative decrease > ``rtol`` before convergence; default 20 for adam, 2 for lbfgs),
        ``loss_kind`` (``"logcosh"`` default or ``"chi2"``), ``robust_scale`` (the log-cosh
        scale in sigma, default 1: the seed's loss), and the options of other
        registered methods. ``adam_options`` (dict) goes to ``optax.adam`` (b1, b2, eps, ...).

    Notes
    -----
    ``constraints[i] = (lower, upper)``; use ``-inf``/``inf`` (or NaN) for no bound;
    ``lower == upper`` pins that parameter. They replace the bounds of ``param_converter``.
    Bounds of tied parameters are not enforced: their values follow the tie exactly.
    Fixed parameters of ``param_converter`` take their value from ``initial_params``.

    The compiled solve is cached: calls with the same shapes, dtypes and axis mode reuse it
    (:attr:`n_compilations` counts traces).

    Examples
    --------
    >>> import jax.numpy as jnp, numpy as np
    >>> from sheap_dask import Minimizer, Parameters
    >>> line = lambda x, p: p[0] + p[1] * x
    >>> x = np.linspace(0.0, 1.0, 20)
    >>> flux = np.stack([1.0 + 2.0 * x, -1.0 + 0.5 * x])
    >>> m = Minimizer(line, method="lbfgs", num_steps=100, loss_kind="chi2",
    ...               curvature_weight=0, smoothness_weight=0, max_weight=0)
    >>> params, history = m(np.array([0.0, 0.0]), flux, x, np.full_like(flux, 0.1),
    ...                     np.array([[-5.0, 5.0], [-np.inf, np.inf]]))
    >>> np.round(np.asarray(params), 3).tolist()
    [[1.0, 2.0], [-1.0, 0.5]]
    """

    def __init__(
        self,
        func: Callable,
        non_optimize_in_axis: int = 3,
        num_steps: int = 1000,
        learning_rate=None,
        list_dependencies=[],  # noqa: B006  (the seed's signature; never mutated)
        weighted: bool = True,
        method: str = "adam",
        lbfgs_options: dict | None = None,
        penalty_function: Callable | None = None,
        param_converter: Parameters | None = None,
        penalty_weight: float = 0.01,
        curvature_weight: float = 1e3,
        smoothness_weight: float = 1e5,
        max_weight: float = 0.1,
        **kwargs,
    ) -> None:
        if not callable(func):
            raise ModelError(f"Minimizer(func=...) must be callable f(wavelength, params) -> flux, got {type(func).__name__}.")
        if non_optimize_in_axis not in _AXIS_MODES:
            modes = "; ".join(f"{k}: {v}" for k, v in _AXIS_MODES.items())
            raise OptionError(f"non_optimize_in_axis={non_optimize_in_axis!r} is not valid; use {modes}.")
        if method not in _SOLVERS:
            raise OptionError(f"method={method!r} is not a known method; choose one of {', '.join(map(repr, _SOLVERS))}.")
        if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
            raise OptionError(f"num_steps={num_steps!r} must be an int >= 1.")
        if param_converter is not None and not isinstance(param_converter, Parameters):
            raise OptionError(
                f"param_converter={param_converter!r} must be a sheap_dask.Parameters or None (then parameters "
                "p0, p1, ... are built from the constraints)."
            )
        self.func = func
        self.non_optimize_in_axis = int(non_optimize_in_axis)
        self.method = method
        self.learning_rate = learning_rate
        self.weighted = bool(weighted)
        self.list_dependencies = list(list_dependencies or [])
        self.param_converter = param_converter
        self.penalty_function = penalty_function

        solver = _SOLVERS[method]
        options = {**_GENERIC_DEFAULTS, **_COMMON_DEFAULTS.get(method, {}), **solver.defaults, "loss_kind": "logcosh"}
        if method == "adam":
            options["adam_options"] = {}
        unknown = sorted(set(kwargs) - set(options))
        if unknown:
            raise OptionError(f"unknown option(s) {unknown} for method={method!r}; valid options: {sorted(options)}.")
        options.update(kwargs)
        num_steps = int(num_steps)
        if method == "lbfgs":
            lb = dict(lbfgs_options or {})
            if "maxiter" in lb:
                num_steps = int(lb.pop("maxiter"))
            if "tolerance" in lb:
                options["gtol"] = float(lb.pop("tolerance"))
            bad = sorted(set(lb) - set(_LBFGS_KWARGS))
            if bad:
                raise OptionError(
                    f"lbfgs_options has unknown key(s) {bad}; valid: ['maxiter', 'tolerance', "
                    f"{', '.join(map(repr, _LBFGS_KWARGS))}]."
                )
            options["lbfgs_kwargs"] = lb
            if num_steps < 1:
                raise OptionError(f"lbfgs_options['maxiter']={num_steps!r} must be an int >= 1.")
        if options["loss_kind"] not in LOSS_KINDS:
            raise OptionError(f"loss_kind={options['loss_kind']!r} is not a known loss; choose one of {', '.join(map(repr, LOSS_KINDS))}.")
        for key in ("rtol", "gtol"):
            if not (isinstance(options[key], (int, float)) and options[key] >= 0):
                raise OptionError(f"{key}={options[key]!r} must be a number >= 0 (0 disables that test).")
        if not (isinstance(options["patience"], (int, np.integer)) and options["patience"] >= 1):
            raise OptionError(f"patience={options['patience']!r} must be an int >= 1.")
        self.num_steps = num_steps
        self.options = options
        self.loss_options = dict(
            weighted=self.weighted,
            penalty_function=penalty_function,
            penalty_weight=penalty_weight,
            curvature_weight=curvature_weight,
            smoothness_weight=smoothness_weight,
            max_weight=max_weight,
            kind=options["loss_kind"],
            robust_scale=options["robust_scale"],
        )
        # Validate weights now rather than at the first call.
        build_loss_function(func, **self.loss_options)
        self._params_cache: dict[int, Parameters] = {}
        self._compiled: dict[tuple, Callable] = {}
        self.n_compilations = 0

    # -- parameters ----------------------------------------------------------------------
    def parameters(self, n_params: int | None = None) -> Parameters:
        """The Parameters that define the raw space (with ``list_dependencies`` applied)."""
        if self.param_converter is not None:
            if n_params is not None and n_params != self.param_converter.n_params:
                raise InputDataError(
                    f"initial_params has {n_params} parameters but param_converter has "
                    f"{self.param_converter.n_params} ({self.param_converter.names})."
                )
            n_params = self.param_converter.n_params
        if n_params not in self._params_cache:
            if self.param_converter is not None:
                p = self.param_converter.copy()
            else:
                # Bounds come at run time from `constraints`, so the spec itself is unbounded.
                p = Parameters()
                for i in range(n_params):
                    p.add(f"p{i}", 0.0)
            for dep in self.list_dependencies:
                tie = parse_tie(dep)
                if tie[0] in p and p[tie[0]].tie == tie:
                    continue  # already in param_converter
                p.tie(dep)
            self._params_cache[n_params] = p
        return self._params_cache[n_params]

    # -- the compiled batched solve ------------------------------------------------------
    def _build(self, params: Parameters, axes: tuple) -> Callable:
        import jax

        solver = _SOLVERS[self.method]
        func, loss_options, options, num_steps, lr = self.func, self.loss_options, self.options, self.num_steps, self.learning_rate

        def one(init, wl, flux, err, lo, hi):
            self.n_compilations += 1  # runs at trace time only: counts compilations
            raw0 = params.raw_init(init, lo, hi)
            convert = lambda r: params.raw_to_phys(r, lo, hi, init)  # noqa: E731
            loss = build_loss_function(func, param_converter=convert, **loss_options)
            problem = SolveProblem(
                loss=lambda r, a: loss(r, *a),
                residuals=lambda r, a: weighted_residuals(func, r, *a, param_converter=convert),
                num_steps=num_steps,
                learning_rate=lr,
                options=options,
            )
            out = solver.solve(problem, raw0, (wl, flux, err))
            return _finish(params, out, init, wl, flux, err, lo, hi)

        if self.method == "lm" and options.get("slots"):
            return self._build_lm_queue(params, axes)
        return jax.jit(jax.vmap(one, in_axes=axes))

    def _build_lm_queue(self, params: Parameters, axes: tuple) -> Callable:
        """``method="lm"`` with ``slots=B``: B lanes work through the batch as a queue
        (:func:`~sheap_dask.lm.levenberg_marquardt_queue`); per spectrum the same iterations
        and results as the vmapped solve, without lanes idling behind the slowest spectrum."""
        import jax

        from .lm import levenberg_marquardt_queue

        func, options, num_steps = self.func, self.options, self.num_steps
        init_ax, _, _, _, lo_ax, hi_ax = axes

        def residuals(raw, init, wl, flux, err, lo, hi):
            convert = lambda r: params.raw_to_phys(r, lo, hi, init)  # noqa: E731
            return weighted_residuals(func, raw, wl, flux, err, param_converter=convert)

        def solve(init, wl, flux, err, lo, hi, n_active):
            self.n_compilations += 1  # runs at trace time only: counts compilations
            batch = flux.shape[0]
            raw0 = jax.vmap(params.raw_init, in_axes=(init_ax, lo_ax, hi_ax), axis_size=batch)(init, lo, hi)
            res = levenberg_marquardt_queue(
                residuals, raw0, (init, wl, flux, err, lo, hi), in_axes=axes, slots=int(options["slots"]), n_active=n_active,
                max_iter=num_steps, ftol=options["rtol"], xtol=options["xtol"], gtol=options["gtol"],
                robust="logcosh" if options["loss_kind"] == "logcosh" else None, robust_scale=options["robust_scale"],
            )
            finish = lambda r, *a: _finish(params, _lm_output(r, num_steps), *a)  # noqa: E731
            return jax.vmap(finish, in_axes=(0, *axes))(res, init, wl, flux, err, lo, hi)

        compiled = jax.jit(solve)
        return lambda *arrays, n_active=None: compiled(*arrays, arrays[2].shape[0] if n_active is None else n_active)

    def _prepare(self, initial_params, flux, wavelength, errors, constraints):
        import jax.numpy as jnp

        flux = np.asarray(flux)
        squeeze = flux.ndim == 1
        if squeeze:
            flux = flux[None]
        if flux.ndim != 2:
            raise InputDataError(f"flux has shape {flux.shape}; expected (n_spectra, n_pix) (or (n_pix,) for one spectrum).")
        dtype = flux.dtype if np.issubdtype(flux.dtype, np.floating) else np.dtype(float)
        dtype = jnp.dtype(jnp.asarray(np.zeros(0, dtype)).dtype)  # float64 -> float32 when x64 is off
        batch, n_pix = flux.shape
        wl = np.asarray(wavelength, dtype=dtype)
        if wl.shape not in ((n_pix,), (batch, n_pix)) and not (squeeze and wl.shape == (1, n_pix)):
            raise InputDataError(f"wavelength has shape {wl.shape}; expected ({n_pix},) or ({batch}, {n_pix}) to match flux {flux.shape}.")
        if errors is None:
            err = np.ones((batch, n_pix), dtype)
        else:
            err = np.asarray(errors, dtype=dtype)
            if err.ndim == 1 and squeeze:
                err = err[None]
            if err.shape != (batch, n_pix):
                raise InputDataError(f"errors has shape {err.shape}; expected {(batch, n_pix)} like flux (1-sigma errors; inf or <= 0 masks a pixel).")

        mode = self.non_optimize_in_axis
        init = None if initial_params is None else np.asarray(initial_params, dtype=np.float64)
        n_params = self.param_converter.n_params if self.param_converter is not None else None
        if init is not None:
            want_ndim = 1 if mode == 3 else 2
            if squeeze and init.ndim == 1 and mode != 3:
                init = init[None]
            if init.ndim != want_ndim or (want_ndim == 2 and init.shape[0] != batch):
                shape = "(n_params,)" if mode == 3 else f"({batch}, n_params)"
                raise InputDataError(
                    f"initial_params has shape {init.shape}; non_optimize_in_axis={mode} ({_AXIS_MODES[mode]}) expects {shape}."
                )
            n_params = init.shape[-1]
        elif n_params is None:
            raise InputDataError("initial_params is None and there is no param_converter to take initial values from; pass initial_params.")
        params = self.parameters(n_params)
        if init is None:
            init = params.values if mode == 3 else np.tile(params.values, (batch, 1))

        if constraints is None:
            lo, hi = params.lower, params.upper
            if mode == 5:
                lo, hi = np.tile(lo, (batch, 1)), np.tile(hi, (batch, 1))
        else:
            c = np.asarray(constraints, dtype=np.float64)
            want = (n_params, 2) if mode in (3, 4) else (batch, n_params, 2)
            if squeeze and mode == 5 and c.shape == (n_params, 2):
                c = c[None]
            if c.shape != want:
                raise InputDataError(
                    f"constraints has shape {c.shape}; non_optimize_in_axis={mode} ({_AXIS_MODES[mode]}) expects "
                    f"{want}: one (lower, upper) row per parameter."
                )
            lo = np.where(np.isnan(c[..., 0]), -np.inf, c[..., 0])
            hi = np.where(np.isnan(c[..., 1]), np.inf, c[..., 1])
            bad = np.argwhere(lo > hi)
            if bad.size:
                where = tuple(int(i) for i in bad[0])
                name = params.names[where[-1]]
                raise ParameterSpecError(
                    f"constraints for parameter {name!r} (index {where}) have lower={float(lo[where])!r} > upper={float(hi[where])!r}; "
                    "each row must be (lower, upper) with lower <= upper."
                )
        if not np.all(np.isfinite(init)):
            raise InputDataError("initial_params contains NaN or inf; give finite starting values (they are clipped into the bounds).")
        arrays = (init.astype(dtype), wl, flux.astype(dtype), err, lo.astype(dtype), hi.astype(dtype))
        axes = (0 if mode in (4, 5) else None, 0 if wl.ndim == 2 else None, 0, 0, 0 if mode == 5 else None, 0 if mode == 5 else None)
        return params, arrays, axes, squeeze

    def run(self, initial_params, flux, wavelength, errors=None, constraints=None, *, n_active=None) -> MinimizeResult:
        """Fit every spectrum; returns a :class:`MinimizeResult`.

        Parameters
        ----------
        initial_params : array
            Physical starting values, (n_params,) for ``non_optimize_in_axis=3`` or
            (batch, n_params) for 4 and 5; clipped into the bounds. ``None`` uses
            ``param_converter.values``.
        flux : array, (batch, n_pix)
            Spectra (one spectrum (n_pix,) is accepted and the result keeps a batch of 1).
        wavelength : array, (n_pix,) or (batch, n_pix)
        errors : array, (batch, n_pix), optional
            1-sigma errors; NaN/inf/<= 0 masks a pixel (as does a NaN/inf flux).
        constraints : array, optional
            (n_params, 2) or, for ``non_optimize_in_axis=5``, (batch, n_params, 2) lower/upper
            bounds; ``None`` uses those of ``param_converter`` (unbounded otherwise).
        n_active : int, optional
            ``method="lm"`` with ``slots``: solve only the first ``n_active`` spectra (the rest
            pad the batch to its compiled shape and keep their starts); default all.
        """
        if n_active is not None and not (self.method == "lm" and self.options.get("slots")):
            raise OptionError("n_active is only for method='lm' with slots > 0.")
        params, arrays, axes, _ = self._prepare(initial_params, flux, wavelength, errors, constraints)
        key = (params.n_params, axes) + tuple((a.shape, str(a.dtype)) for a in arrays)
        fn = self._compiled.get(key)
        if fn is None:
            fn = self._compiled[key] = self._build(params, axes)
        extra = {} if n_active is None else {"n_active": int(n_active)}
        phys, loss, history, n_iter, status, gnorm, raw = (np.asarray(a) for a in fn(*arrays, **extra))
        return MinimizeResult(phys, loss, history, n_iter, status, gnorm, raw, params.names, self.method)

    def __call__(self, initial_params, flux, wavelength, errors=None, constraints=None):
        """The seed API: ``final_params, loss_history = minimizer(init, flux, wavelength, errors, constraints)``.

        Returns physical parameters (batch, n_params) and the loss history (batch, num_steps);
        :meth:`run` gives the full :class:`MinimizeResult`.
        """
        result = self.run(initial_params, flux, wavelength, errors, constraints)
        return result.params, result.loss_history

    def __getstate__(self) -> dict:
        # Compiled functions do not pickle (and are per process anyway): a Minimizer shipped
        # to a Dask worker compiles there on first use.
        state = dict(self.__dict__)
        state["_compiled"] = {}
        state["n_compilations"] = 0
        return state

    def __repr__(self) -> str:
        return f"Minimizer(method={self.method!r}, num_steps={self.num_steps}, non_optimize_in_axis={self.non_optimize_in_axis})"
