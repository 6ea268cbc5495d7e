r"""Batched Levenberg-Marquardt least squares in pure JAX (``method="lm"``).

One problem per call, written so that ``jax.jit(jax.vmap(...))`` turns it into a solver for a
whole chunk of spectra: a ``lax.while_loop`` whose state is a few small arrays per problem,
an exact Jacobian from ``jax.jacfwd`` (forward mode: one pass per free parameter, cheap for
~20 parameters and ~1000 pixels), and a Cholesky solve of the damped normal equations.

Mathematics
-----------
For residuals :math:`r(x) \in \mathbb{R}^m` (already divided by the errors, masked pixels
exactly 0) and Jacobian :math:`J = \partial r / \partial x`, plain least squares minimises the
chi-square :math:`C(x) = \sum_i r_i^2`. Each iteration solves the damped Gauss-Newton system

.. math::  (J^T J + \lambda D)\,\delta = -J^T r, \qquad D = \mathrm{diag}(J^T J)

(Levenberg 1944; Marquardt 1963 for the diagonal scaling, which makes the step invariant to
the units of each parameter). ``D`` is the running maximum of the diagonal over the
iterations, as in MINPACK (Moré 1978). The system is solved in the Jacobi-scaled form
:math:`(S J^T J S + \lambda I)\,z = -S J^T r`, :math:`\delta = S z`, :math:`S = D^{-1/2}`,
whose matrix has a unit diagonal, so Cholesky stays accurate in float32; a floor of
``n * eps`` on the scaled diagonal keeps it positive definite for degenerate parameters.

The step is accepted when it lowers the cost. The damping follows Nielsen (1999): with the
gain ratio :math:`\rho = (C(x) - C(x+\delta)) / (L(0) - L(\delta))`, where :math:`L` is the
quadratic model :math:`\lVert r + J\delta \rVert^2`, an accepted step multiplies
:math:`\lambda` by :math:`\max(\lambda_\downarrow, 1 - (2\rho - 1)^3)` and a rejected one by
:math:`\lambda_\uparrow`. The Jacobian is recomputed only at accepted points (a
``lax.cond``; under ``vmap`` JAX evaluates both branches, which costs one extra residual
evaluation per iteration, a few percent for ~20 parameters).

Robust loss (``robust="logcosh"``): the cost becomes

.. math::  \rho_s(r) = 2 s^2 \sum_i \log\cosh(r_i / s),

scaled so that it equals the chi-square for :math:`|r| \ll s` and grows only linearly in
:math:`|r|` for outliers. It is minimised by iteratively reweighted least squares
(Holland & Welsch 1977): at each accepted point the residual rows and Jacobian rows are
multiplied by :math:`\sqrt{w_i}`, :math:`w_i = \tanh(u_i)/u_i`, :math:`u_i = r_i/s`
(:math:`w = 1` at :math:`r = 0`), so that :math:`J^T W r = \tfrac12 \nabla\rho_s` and the
Gauss-Newton step of the weighted problem is a descent step for :math:`\rho_s`; the step is
accepted or rejected on :math:`\rho_s` itself. The weighted quadratic majorises
:math:`\rho_s` (``log cosh`` of the square root is concave), so IRLS steps are safe.

Convergence (per problem; MINPACK-style, see ``scipy.optimize.least_squares``):

* ``ftol``: an accepted step with :math:`0 < C_{old} - C_{new} \le \mathrm{ftol}\, C_{old}`;
* ``xtol``: :math:`\lVert D^{1/2}\delta \rVert \le \mathrm{xtol}\,(\lVert D^{1/2} x \rVert +
  \mathrm{xtol})` (scaled norms, as MINPACK), on an accepted or a rejected step: once the
  damping has shrunk the step below the resolution of ``x`` nothing more can be gained;
* ``gtol``: :math:`\max_j |(J^T W r)_j| \le \mathrm{gtol}` at the current point.

Batches: ``jax.vmap(levenberg_marquardt)`` runs until the slowest problem stops, every
finished problem idling meanwhile; :func:`levenberg_marquardt_queue` runs a fixed number of
lanes instead and refills a lane from a queue of problems as soon as its problem stops, inside
the same compiled loop (each problem takes exactly the same iterations).

Tolerances below the resolution of the dtype are raised to ``10 * eps`` (about 1.2e-6 in
float32, 2.2e-15 in float64); otherwise float32 fits would spin until ``max_iter`` on
rounding noise.

References
----------
K. Levenberg, "A method for the solution of certain non-linear problems in least squares",
Quart. Appl. Math. 2, 164 (1944).
D. W. Marquardt, "An algorithm for least-squares estimation of nonlinear parameters",
J. SIAM 11, 431 (1963).
J. J. Moré, "The Levenberg-Marquardt algorithm: implementation and theory", Lecture Notes
in Mathematics 630, 105 (1978).
H. B. Nielsen, "Damping parameter in Marquardt's method", IMM-REP-1999-05, DTU (1999).
P. W. Holland & R. E. Welsch, "Robust regression using iteratively reweighted
least-squares", Comm. Statist. Theory Methods 6, 813 (1977).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.scipy.linalg import cho_factor, cho_solve

from .errors import OptionError
from .loss import irls_weight, robust_rho
from .status import Status

__all__ = ["LMResult", "levenberg_marquardt", "levenberg_marquardt_queue", "lm_covariance"]

# Internal status while a problem is still iterating (never returned).
_RUNNING = -1
_ROBUST_CHOICES = (None, "logcosh")
_JACOBIAN_CHOICES = ("fwd", "rev")


class LMResult(NamedTuple):
    """Result of :func:`levenberg_marquardt` for one problem (or a batch, under ``vmap``).

    Attributes
    ----------
    x : array (n_free,)
        Best point found (the last accepted one; the start when nothing was accepted).
    cost : scalar
        Objective at ``x``: the chi-square :math:`\\sum r^2` for ``robust=None``, the robust
        cost :math:`2 s^2 \\sum \\log\\cosh(r/s)` for ``robust="logcosh"``.
    chi2 : scalar
        Plain :math:`\\sum r^2` at ``x`` whatever the loss (equals ``cost`` when
        ``robust=None``).
    n_iter : int32
        Iterations, i.e. trial steps (accepted or rejected) = residual evaluations after the
        first.
    n_jac : int32
        Jacobian evaluations (1 + accepted steps).
    status : int8
        :class:`~sheap_dask.status.Status` code: ``CONVERGED`` (0), ``MAX_ITER`` (2),
        ``NONFINITE`` (4: the start, or the Jacobian at an accepted point, was NaN/inf, or no
        finite trial point could be found; ``x`` is then the last finite point), ``FAILED``
        (5: the damping reached its cap without an acceptable step).
    grad_norm : scalar
        :math:`\\max_j |(J^T W r)_j|` at ``x`` (half the gradient of ``cost``; ``W = I`` for
        plain least squares).
    jtj : array (n_free, n_free)
        Gauss-Newton matrix :math:`J^T W J` at ``x``, for :func:`lm_covariance`: the plain
        :math:`J^T J` for ``robust=None``; for ``robust="logcosh"`` the IRLS-weighted one, so
        that down-weighted outliers do not count as information in the errors (the usual
        final-iteration IRLS covariance).
    damping : scalar
        Final :math:`\\lambda` (relative to ``diag(J^T J)``); a large value at the end means
        the last steps were being rejected.
    """

    x: jax.Array
    cost: jax.Array
    chi2: jax.Array
    n_iter: jax.Array
    n_jac: jax.Array
    status: jax.Array
    grad_norm: jax.Array
    jtj: jax.Array
    damping: jax.Array


class _State(NamedTuple):
    x: jax.Array
    cost: jax.Array
    chi2: jax.Array
    jtwj: jax.Array  # J^T W J (W = I without robust weights)
    grad: jax.Array  # J^T W r
    diag: jax.Array  # running max of diag(J^T W J): Marquardt/MINPACK scaling
    lam: jax.Array
    n_iter: jax.Array
    n_jac: jax.Array
    status: jax.Array


def _check_options(max_iter, ftol, xtol, gtol, lambda_init, lambda_up, lambda_down, robust, robust_scale, jacobian):
    def concrete(v):
        # Options are normally Python numbers (static under jit); a traced value is accepted
        # unchecked rather than forcing a concretization error.
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if not (isinstance(max_iter, int) and not isinstance(max_iter, bool) and max_iter >= 0):
        raise OptionError(f"levenberg_marquardt(max_iter={max_iter!r}): must be an int >= 0; pass e.g. max_iter=100.")
    for name, v in (("ftol", ftol), ("xtol", xtol), ("gtol", gtol)):
        if concrete(v) and not v >= 0:
            raise OptionError(f"levenberg_marquardt({name}={v!r}): must be >= 0; pass 0 to disable this test or e.g. {name}=1e-8.")
    if concrete(lambda_init) and not lambda_init > 0:
        raise OptionError(f"levenberg_marquardt(lambda_init={lambda_init!r}): must be > 0; pass e.g. lambda_init=1e-3.")
    if concrete(lambda_up) and not lambda_up > 1:
        raise OptionError(f"levenberg_marquardt(lambda_up={lambda_up!r}): must be > 1 (the damping grows after a rejected step); pass e.g. lambda_up=10.0.")
    if concrete(lambda_down) and not 0 < lambda_down < 1:
        raise OptionError(f"levenberg_marquardt(lambda_down={lambda_down!r}): must be in (0, 1); pass e.g. lambda_down=0.3.")
    if robust not in _ROBUST_CHOICES:
        raise OptionError(f"levenberg_marquardt(robust={robust!r}): unknown robust loss; use one of {_ROBUST_CHOICES}.")
    if concrete(robust_scale) and not robust_scale > 0:
        raise OptionError(f"levenberg_marquardt(robust_scale={robust_scale!r}): must be > 0 (residuals are in units of sigma); pass e.g. robust_scale=1.0.")
    if jacobian not in _JACOBIAN_CHOICES:
        raise OptionError(f"levenberg_marquardt(jacobian={jacobian!r}): use 'fwd' (jax.jacfwd, best for few parameters) or 'rev' (jax.jacrev).")


def levenberg_marquardt(
    residual_fn: Callable,
    x0,
    args: tuple = (),
    *,
    max_iter: int = 100,
    ftol: float = 1e-8,
    xtol: float = 1e-8,
    gtol: float = 1e-10,
    lambda_init: float = 1e-3,
    lambda_up: float = 10.0,
    lambda_down: float = 0.3,
    robust: str | None = None,
    robust_scale: float = 1.0,
    jacobian: str = "fwd",
) -> LMResult:
    r"""Minimise :math:`\sum_i r_i(x)^2` (or a robust version) by Levenberg-Marquardt.

    Solves one problem; batch it with ``jax.vmap`` over ``x0`` and ``args`` and compile it
    with the options static (see the example). Never raises for a numerical failure: the
    outcome is in ``status``.

    Parameters
    ----------
    residual_fn : callable
        ``residual_fn(x, *args) -> (n_res,)`` residual vector, already weighted (e.g.
        ``(model - flux) * sqrt(ivar)``), masked entries exactly 0. ``x`` is the
        unconstrained raw vector: bounds belong to the caller's reparameterization. Must be
        a pure ``jax.numpy`` function (traceable, differentiable).
    x0 : array_like (n_free,)
        Starting point; its floating dtype (float32 or float64) is the compute dtype, and
        the residuals are cast to it.
    args : tuple, optional
        Extra arguments of ``residual_fn`` (data arrays); batched by the caller's ``vmap``.
    max_iter : int, default 100
        Maximum number of trial steps (accepted or rejected).
    ftol, xtol, gtol : float
        Convergence tolerances (see the module docstring): relative cost reduction of an
        accepted step, relative scaled step length, and max-norm of :math:`J^T W r`. 0
        disables a test; values below ``10 * eps`` of the dtype are raised to it.
    lambda_init : float, default 1e-3
        Initial damping, relative to ``diag(J^T J)``.
    lambda_up : float, default 10.0
        Factor applied to the damping after a rejected step (> 1).
    lambda_down : float, default 0.3
        Smallest factor applied after an accepted step (Nielsen's rule; in (0, 1)).
    robust : {None, "logcosh"}, default None
        ``None``: plain least squares, ``cost`` = chi-square. ``"logcosh"``: minimise
        :math:`2 s^2 \sum \log\cosh(r/s)` by iteratively reweighted Gauss-Newton.
    robust_scale : float, default 1.0
        :math:`s`, in units of the (weighted) residual: residuals much larger than ``s``
        count linearly, not quadratically.
    jacobian : {"fwd", "rev"}, default "fwd"
        ``jax.jacfwd`` (one forward pass per parameter; right for n_free << n_res) or
        ``jax.jacrev``.

    Returns
    -------
    LMResult
        ``x, cost, chi2, n_iter, n_jac, status, grad_norm, jtj, damping`` (see
        :class:`LMResult`).

    Raises
    ------
    OptionError
        An option is out of range or unknown (at trace time).
    ValueError
        ``x0`` is not 1-D or the residual is not a 1-D vector.

    Notes
    -----
    Arguments shared by the whole batch need not be copied per problem: give ``vmap`` their
    axes, e.g. ``jax.vmap(solve1, in_axes=(0, (None, 0, 0)))(x0, (wavelength, flux, w))``.
    Under ``vmap`` the loop runs until the slowest problem of the batch stops; finished
    problems keep their values. Cost per iteration is dominated by the Jacobian (n_free
    forward passes) and the :math:`J^T J` product (n_res * n_free**2 flops).

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> from functools import partial
    >>> from sheap_dask.lm import levenberg_marquardt
    >>> t = jnp.linspace(0.0, 4.0, 50)
    >>> def resid(x, t, y):
    ...     return x[0] * jnp.exp(-x[1] * t) - y
    >>> y = jnp.stack([2.0 * jnp.exp(-0.7 * t), 3.0 * jnp.exp(-1.3 * t)])
    >>> solve = jax.jit(jax.vmap(partial(levenberg_marquardt, resid, max_iter=50)))
    >>> res = solve(jnp.ones((2, 2)), (jnp.broadcast_to(t, (2, 50)), y))
    >>> [round(float(v), 4) for v in res.x.ravel()]
    [2.0, 0.7, 3.0, 1.3]
    >>> res.status.tolist()
    [0, 0]
    """
    options = dict(max_iter=max_iter, ftol=ftol, xtol=xtol, gtol=gtol, lambda_init=lambda_init, lambda_up=lambda_up,
                   lambda_down=lambda_down, robust=robust, robust_scale=robust_scale, jacobian=jacobian)
    _check_options(**options)
    if not callable(residual_fn):
        raise OptionError(f"levenberg_marquardt(residual_fn=...): must be callable, got {type(residual_fn).__name__}.")
    x0 = jnp.asarray(x0)
    if not jnp.issubdtype(x0.dtype, jnp.floating):
        x0 = x0.astype(jnp.result_type(float))
    if x0.ndim != 1:
        raise ValueError(
            f"levenberg_marquardt(x0=...): expected one problem, a 1-D (n_free,) vector, got shape {x0.shape}; "
            "for a batch use jax.vmap(partial(levenberg_marquardt, residual_fn, **options))(x0, args)."
        )
    args = tuple(args)
    r_shape = jax.eval_shape(lambda x: jnp.asarray(residual_fn(x, *args)), x0).shape
    if len(r_shape) != 1:
        raise ValueError(
            f"levenberg_marquardt(residual_fn=...): must return a 1-D residual vector for one problem, got shape {r_shape}; "
            "flatten it (e.g. return r.ravel())."
        )
    init, step = _lm_functions(residual_fn, x0.dtype, x0.shape[0], **options)
    st = lax.while_loop(lambda st: st.status == _RUNNING, lambda st: step(st, args, False, st.x), init(x0, args))
    return _result(st)


# The keyword options of levenberg_marquardt and their defaults: the queue solver takes the same.
_LM_DEFAULTS = {
    name: p.default for name, p in inspect.signature(levenberg_marquardt).parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY
}


def _result(st: _State) -> LMResult:
    return LMResult(
        x=st.x,
        cost=st.cost,
        chi2=st.chi2,
        n_iter=st.n_iter,
        n_jac=st.n_jac,
        status=st.status,
        grad_norm=jnp.max(jnp.abs(st.grad), initial=0.0, axis=-1),
        jtj=st.jtwj,
        damping=st.lam,
    )


def _lm_functions(residual_fn, dtype, n, *, max_iter, ftol, xtol, gtol, lambda_init, lambda_up, lambda_down, robust, robust_scale, jacobian):
    """``init(x0, args) -> state`` and ``step(state, args, fresh, x_fresh) -> state`` of one problem.

    ``step`` is one LM iteration; where ``fresh`` is true it instead starts a new problem at
    ``x_fresh`` (one residual and one Jacobian, like ``init``): the queue solver refills a
    finished slot this way at the cost of an ordinary iteration.
    """
    eps = jnp.finfo(dtype).eps
    tol_floor = 10.0 * float(eps)
    ftol_ = jnp.asarray(max(ftol, tol_floor) if ftol > 0 else 0.0, dtype) if isinstance(ftol, (int, float)) else jnp.asarray(ftol, dtype)
    xtol_ = jnp.asarray(max(xtol, tol_floor) if xtol > 0 else 0.0, dtype) if isinstance(xtol, (int, float)) else jnp.asarray(xtol, dtype)
    gtol_ = jnp.asarray(gtol, dtype)
    lam_min = jnp.asarray(float(eps), dtype)
    lam_max = jnp.asarray(1.0 / float(eps), dtype)
    lam_0 = jnp.asarray(lambda_init, dtype)
    jitter = jnp.asarray(n * float(eps), dtype)
    tiny = jnp.asarray(jnp.finfo(dtype).tiny, dtype)
    s = jnp.asarray(robust_scale, dtype)
    lam_up = jnp.asarray(lambda_up, dtype)
    lam_down = jnp.asarray(lambda_down, dtype)

    def resid(x, args):
        return jnp.asarray(residual_fn(x, *args)).astype(dtype)

    jac_fn = jax.jacfwd(resid) if jacobian == "fwd" else jax.jacrev(resid)

    def cost_of(r):
        if robust is None:
            return jnp.sum(r * r)
        return 2.0 * jnp.sum(robust_rho(r, s))

    def weights(r):
        if robust is None:
            return jnp.ones_like(r)
        return irls_weight(r / s)

    def linearize(x, r, args):
        """Normal-equation pieces at an accepted point (the only Jacobian evaluation)."""
        J = jac_fn(x, args)
        if robust is None:
            return J.T @ J, J.T @ r
        wj = J * weights(r)[:, None]
        return wj.T @ J, wj.T @ r

    def finite(*arrays):
        return jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in arrays]))

    def init(x0, args):
        # Start: one residual + one Jacobian evaluation.
        r0 = resid(x0, args)
        cost0 = cost_of(r0)
        jtwj0, grad0 = linearize(x0, r0, args)
        ok0 = finite(x0, r0, cost0, jtwj0, grad0)
        gnorm0 = jnp.max(jnp.abs(grad0), initial=0.0)
        status0 = jnp.where(
            ~ok0,
            Status.NONFINITE,
            jnp.where(gnorm0 <= gtol_, Status.CONVERGED, jnp.where(max_iter == 0, Status.MAX_ITER, _RUNNING)),
        ).astype(jnp.int8)
        return _State(
            x=x0,
            cost=cost0,
            chi2=jnp.sum(r0 * r0),
            jtwj=jtwj0,
            grad=grad0,
            diag=jnp.diagonal(jtwj0),
            lam=lam_0,
            n_iter=jnp.asarray(0, jnp.int32),
            n_jac=jnp.asarray(1, jnp.int32),
            status=status0,
        )

    def step(st, args, fresh, x_fresh):
        # Marquardt scaling with floors: a column with no effect (zero diagonal) gets a small
        # positive scale so the scaled system stays well defined (its step is 0 anyway).
        d = jnp.maximum(st.diag, jnp.maximum(eps * jnp.max(st.diag, initial=0.0), tiny))
        sc = 1.0 / jnp.sqrt(d)
        a = st.jtwj * sc[:, None] * sc[None, :]
        a = a + (st.lam + jitter) * jnp.eye(n, dtype=dtype)
        chol = cho_factor(a, lower=True)
        delta = sc * cho_solve(chol, -sc * st.grad)
        step_ok = finite(delta)
        delta = jnp.where(step_ok, delta, jnp.zeros_like(delta))

        x_t = jnp.where(fresh, x_fresh, st.x + delta)
        r_t = resid(x_t, args)
        cost_t = cost_of(r_t)
        trial_ok = (step_ok | fresh) & finite(x_t, r_t, cost_t)
        actred = jnp.where(trial_ok, st.cost - cost_t, -jnp.inf)
        # Reduction predicted by the (weighted) quadratic model ||r + J delta||^2.
        pred = -(2.0 * (st.grad @ delta) + delta @ (st.jtwj @ delta))
        accept = trial_ok & ((actred > 0) | fresh)

        # Only accepted points need a Jacobian (under vmap both branches run; see module doc).
        def new_point(_):
            return linearize(x_t, r_t, args)

        def old_point(_):
            return st.jtwj, st.grad

        jtwj_n, grad_n = lax.cond(accept | fresh, new_point, old_point, None)
        jac_ok = finite(jtwj_n, grad_n)
        moved = accept & jac_ok

        rho = actred / jnp.maximum(pred, tiny)
        down = jnp.maximum(lam_down, 1.0 - (2.0 * rho - 1.0) ** 3)
        lam_n = jnp.where(accept, st.lam * down, st.lam * lam_up)
        capped = ~fresh & ~accept & (st.lam >= lam_max)
        lam_n = jnp.where(fresh, lam_0, jnp.clip(lam_n, lam_min, lam_max))

        sqd = jnp.sqrt(d)
        small_step = ~fresh & (jnp.linalg.norm(sqd * delta) <= xtol_ * (jnp.linalg.norm(sqd * st.x) + xtol_))
        small_red = ~fresh & accept & (actred <= ftol_ * st.cost)
        gnorm_n = jnp.max(jnp.abs(grad_n), initial=0.0)
        small_grad = moved & (gnorm_n <= gtol_)
        n_iter = jnp.where(fresh, 0, st.n_iter + 1)

        status = jnp.select(
            [
                fresh & ~moved,  # a new start that is NaN/inf (as init)
                accept & ~jac_ok,  # finite residual but NaN/inf Jacobian: keep the last good point
                moved & (small_red | small_step | small_grad),
                ~accept & trial_ok & small_step,  # damping shrank the step below x's resolution
                ~trial_ok & small_step,  # even a negligible step gives NaN/inf
                capped,
                n_iter >= max_iter,
            ],
            [Status.NONFINITE, Status.NONFINITE, Status.CONVERGED, Status.CONVERGED, Status.NONFINITE, Status.FAILED, Status.MAX_ITER],
            default=_RUNNING,
        ).astype(jnp.int8)

        def pick(new, old):
            return jnp.where(moved | fresh, new, old)

        return _State(
            x=pick(x_t, st.x),
            cost=pick(cost_t, st.cost),
            chi2=pick(jnp.sum(r_t * r_t), st.chi2),
            jtwj=pick(jtwj_n, st.jtwj),
            grad=pick(grad_n, st.grad),
            diag=jnp.where(fresh, jnp.diagonal(jtwj_n), pick(jnp.maximum(st.diag, jnp.diagonal(jtwj_n)), st.diag)),
            lam=lam_n,
            n_iter=n_iter,
            n_jac=jnp.where(fresh, 1, st.n_jac + accept.astype(jnp.int32)),
            status=status,
        )

    return init, step


def levenberg_marquardt_queue(
    residual_fn: Callable,
    x0,
    args: tuple = (),
    *,
    in_axes: tuple | None = None,
    slots: int = 16,
    n_active=None,
    **options,
) -> LMResult:
    """Levenberg-Marquardt for a batch of problems through a queue of ``slots`` lanes.

    ``jax.vmap(levenberg_marquardt)`` runs every problem until the slowest stops, so most
    lanes idle once their problem has converged. Here a fixed number of lanes iterate; a
    lane whose problem stops writes its result and takes the next problem of the queue in
    the same compiled loop, so lanes idle only while the queue drains. Each problem follows
    exactly the iterations :func:`levenberg_marquardt` would take.

    Parameters
    ----------
    residual_fn
        As :func:`levenberg_marquardt`.
    x0 : array (n_problems, n_free)
        Starting points, one row per problem.
    args : tuple
        Extra arguments of ``residual_fn``; those with ``in_axes`` 0 have one row per problem.
    in_axes : tuple of {0, None}, optional
        Per argument: 0 batched along the problems, None shared (default: all 0).
    slots : int, default 16
        Lanes iterating at once (static).
    n_active : int, optional
        Only the first ``n_active`` problems are solved (the rest are padding: their result
        is the start, status ``MAX_ITER``, 0 iterations); may be traced. Default all.
    **options
        The keyword options of :func:`levenberg_marquardt` (``max_iter``, ``ftol``, ``xtol``,
        ``gtol``, ``lambda_init``, ``lambda_up``, ``lambda_down``, ``robust``, ``robust_scale``,
        ``jacobian``), with the same defaults.

    Returns
    -------
    LMResult
        Batched along the problems, as ``jax.vmap(levenberg_marquardt)`` would return.
    """
    unknown = sorted(set(options) - set(_LM_DEFAULTS))
    if unknown:
        raise OptionError(f"levenberg_marquardt_queue: unknown option(s) {unknown}; valid: {sorted(_LM_DEFAULTS)}.")
    options = {**_LM_DEFAULTS, **options}
    _check_options(**options)
    x0 = jnp.asarray(x0)
    if x0.ndim != 2:
        raise ValueError(f"levenberg_marquardt_queue(x0=...): expected (n_problems, n_free), got shape {x0.shape}.")
    if not (isinstance(slots, int) and slots >= 1):
        raise OptionError(f"levenberg_marquardt_queue(slots={slots!r}): must be an int >= 1.")
    args = tuple(args)
    in_axes = tuple(in_axes) if in_axes is not None else (0,) * len(args)
    n_prob, n = x0.shape
    dtype = x0.dtype
    n_active = n_prob if n_active is None else n_active
    init, step = _lm_functions(residual_fn, dtype, n, **options)
    lanes = min(slots, n_prob)

    def lane_args(idx):
        return tuple(a[idx] if ax == 0 else a for a, ax in zip(args, in_axes))

    vstep = jax.vmap(step, in_axes=(0, tuple(0 if ax == 0 else None for ax in in_axes), 0, 0))
    idx0 = jnp.arange(lanes)
    # Lanes start "fresh": the first step evaluates each lane's start (as init does).
    template = jax.eval_shape(init, x0[0], tuple(a[0] if ax == 0 else a for a, ax in zip(args, in_axes)))
    st0 = jax.tree_util.tree_map(lambda t: jnp.zeros((lanes,) + t.shape, t.dtype), template)
    st0 = st0._replace(status=jnp.full((lanes,), _RUNNING, jnp.int8))
    out0 = _result(jax.tree_util.tree_map(lambda t: jnp.zeros((n_prob,) + t.shape, t.dtype), template))
    out0 = out0._replace(x=x0, status=jnp.full((n_prob,), Status.MAX_ITER, jnp.int8))
    carry0 = (st0, idx0, idx0 < n_active, idx0 < n_active, jnp.asarray(lanes, jnp.int32), out0)

    def cond(c):
        return jnp.any(c[2])

    def body(c):
        st, idx, valid, fresh, nxt, out = c
        st = vstep(st, lane_args(idx), fresh, x0[idx])
        done = valid & (st.status != _RUNNING)
        # Finished lanes write their result (index n_prob is out of range: dropped).
        target = jnp.where(done, idx, n_prob)
        res = _result(st)
        out = jax.tree_util.tree_map(lambda o, v: o.at[target].set(v, mode="drop"), out, res)
        # ...and take the next problems of the queue, in lane order.
        new_idx = nxt + jnp.cumsum(done) - 1
        refill = done & (new_idx < n_active)
        idx = jnp.where(refill, new_idx, idx)
        valid = (valid & ~done) | refill
        return st, idx, valid, refill, nxt + jnp.sum(done, dtype=jnp.int32), out

    return lax.while_loop(cond, body, carry0)[5]


def lm_covariance(jtj, *, rcond: float | None = None) -> jax.Array:
    r"""Covariance :math:`(J^T J)^{-1}` of the fitted parameters, NaN where undetermined.

    For residuals :math:`r = (\mathrm{model} - \mathrm{data})/\sigma` with correct errors
    :math:`\sigma`, the covariance of the least-squares estimate is :math:`(J^T J)^{-1}`
    (``absolute_sigma=True`` in ``scipy.optimize.curve_fit``); multiply by the reduced
    chi-square :math:`\chi^2/(n_{res} - n_{free})` when the errors are only relative. The
    Jacobian is with respect to the raw vector ``x``: map to physical parameters with the
    Jacobian of the reparameterization, :math:`C_{phys} = G C G^T`.

    The inverse is a pseudo-inverse of the Jacobi-scaled matrix
    :math:`S J^T J S` (:math:`S = \mathrm{diag}(J^T J)^{-1/2}`, which removes the units of
    the parameters); eigenvalues below ``rcond`` times the largest are treated as zero, and
    every parameter with a non-negligible component (> 1e-3 of its squared norm) along such a
    null direction, or with a zero diagonal, gets NaN in its row and column: its error is
    undefined, while the others keep finite values (the pseudo-inverse, i.e. the errors with
    the degenerate combination held fixed).

    Parameters
    ----------
    jtj : array (..., n, n)
        :math:`J^T J` (e.g. ``LMResult.jtj``), batched over leading axes.
    rcond : float, optional
        Relative eigenvalue cutoff; default ``10 * n * eps`` of the dtype.

    Returns
    -------
    array (..., n, n)
        Covariance matrix; all NaN where ``jtj`` is not finite. A numpy input is computed
        with numpy (the chunk layer's float64 post-processing), anything else with JAX.
    """
    xp = np if isinstance(jtj, np.ndarray) else jnp  # numpy in, numpy out: no JAX dispatch on the host side
    jtj = xp.asarray(jtj)
    if jtj.ndim < 2 or jtj.shape[-1] != jtj.shape[-2]:
        raise ValueError(f"lm_covariance(jtj=...): expected square (..., n, n) matrices, got shape {jtj.shape}; pass LMResult.jtj.")
    if not xp.issubdtype(jtj.dtype, xp.floating):
        jtj = jtj.astype(np.float64 if xp is np else jnp.result_type(float))
    n = jtj.shape[-1]
    eps = float(xp.finfo(jtj.dtype).eps)
    cut = 10.0 * n * eps if rcond is None else float(rcond)

    ok = xp.all(xp.isfinite(jtj), axis=(-2, -1))
    a = xp.where(ok[..., None, None], jtj, xp.eye(n, dtype=jtj.dtype))
    a = 0.5 * (a + xp.swapaxes(a, -1, -2))
    diag = xp.diagonal(a, axis1=-2, axis2=-1)
    pos = diag > 0
    sc = xp.where(pos, 1.0 / xp.sqrt(xp.where(pos, diag, 1.0)), 0.0)
    c = a * sc[..., :, None] * sc[..., None, :]
    w, v = xp.linalg.eigh(c)
    wmax = xp.max(w, axis=-1, keepdims=True)
    good = w > cut * wmax
    inv_w = xp.where(good, 1.0 / xp.where(good, w, 1.0), 0.0)
    cinv = (v * inv_w[..., None, :]) @ xp.swapaxes(v, -1, -2)
    cov = cinv * sc[..., :, None] * sc[..., None, :]
    null_weight = xp.sum(xp.where(good[..., None, :], 0.0, v * v), axis=-1)
    bad = (null_weight > 1e-3) | ~pos | ~ok[..., None]
    return xp.where(bad[..., :, None] | bad[..., None, :], xp.nan, cov)
