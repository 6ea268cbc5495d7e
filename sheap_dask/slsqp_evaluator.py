"""The loss as NLopt sees it, for :class:`sheap_dask.slsqp.SLSQP`: what evaluates, what judges.

* :class:`LossEvaluator` calls the loss and its gradient (JAX, float64), in the rescaled
  variables NLopt works in, counts evaluations and keeps the best finite point;
* :class:`PushbackStrategy` says what a NaN/inf evaluation becomes (a finite value with a
  gradient pointing back to the best point) and carries the per-evaluation callback;
* :class:`EDM` is the convergence criterion, ``g^T H^-1 g / 2 < errordef * tol``;
* the jit-compiled value-and-gradient and Hessian of each loss are cached per loss object
  (weakly where it can be), so refitting many spectra of one shape never recompiles.

Messages go to the ``"sheap_dask.slsqp"`` logger, like the minimizer's.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import nlopt
import numpy as np

from .errors import OptionError

__all__ = ["EDM", "DefaultStrategy", "LossEvaluator", "PushbackStrategy"]

logger = logging.getLogger("sheap_dask.slsqp")


# ----------------------------------------------------------------------------------------
# Compiled loss functions, cached per loss object
# ----------------------------------------------------------------------------------------
class _Compiled:
    """jit-compiled value_and_grad and Hessian of one loss over the free parameters.

    Signature of both: ``(x_free, base, free_idx, *args)``; ``base`` is the full parameter
    vector into which ``x_free`` is scattered at ``free_idx``, so fixed parameters and data
    changes are arguments, not constants, and never trigger a recompilation.
    """

    def __init__(self, loss: Callable) -> None:
        import jax
        import jax.numpy as jnp

        # A weak reference: the cache entry must not keep its own key (the loss) alive.
        try:
            ref = weakref.ref(loss)
        except TypeError:
            ref = lambda: loss  # noqa: E731  (not weak-referenceable: held by the LRU cache)

        def full_loss(x_free, base, free_idx, *args):
            x = base.at[free_idx].set(x_free)
            out = jnp.asarray(ref()(x, *args))
            if out.size != 1:  # checked while tracing, so once per compilation
                raise OptionError(
                    f"loss must return a scalar, got an array of shape {out.shape}; sum or average the "
                    "per-pixel terms inside the loss."
                )
            return out.reshape(())

        self.value_and_grad = jax.jit(jax.value_and_grad(full_loss))
        self.hessian = jax.jit(jax.hessian(full_loss))


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_STRONG_CACHE: OrderedDict = OrderedDict()  # for hashable losses that cannot be weak-referenced
_STRONG_CACHE_SIZE = 32


def _compiled_for(loss: Callable) -> _Compiled:
    try:
        comp = _CACHE.get(loss)
        if comp is None:
            comp = _CACHE[loss] = _Compiled(loss)
        return comp
    except TypeError:
        pass
    try:
        comp = _STRONG_CACHE.pop(loss, None)
    except TypeError:  # unhashable and not weak-referenceable: compiled per call
        return _Compiled(loss)
    if comp is None:
        comp = _Compiled(loss)
    _STRONG_CACHE[loss] = comp
    while len(_STRONG_CACHE) > _STRONG_CACHE_SIZE:
        _STRONG_CACHE.popitem(last=False)
    return comp


def _x64():
    import jax

    # Gradients in float64 without flipping the user's global flag.
    return jax.enable_x64(True)


def check_loss(loss: Any) -> float:
    if not callable(loss):
        raise OptionError(
            f"loss must be callable as loss(x, *args) -> scalar, got {type(loss).__name__} ({loss!r:.60}); "
            "pass a function of the parameter array."
        )
    errordef = getattr(loss, "errordef", None)
    if errordef is None:
        return 1.0
    try:
        errordef = float(errordef)
    except (TypeError, ValueError):
        errordef = float("nan")
    if not (np.isfinite(errordef) and errordef > 0):
        raise OptionError(
            f"loss.errordef must be a positive number (1 for a chi-square, 0.5 for a negative "
            f"log-likelihood), got {getattr(loss, 'errordef')!r}."
        )
    return errordef


def prepare_args(args: Any) -> tuple:
    if not isinstance(args, tuple | list):
        raise OptionError(f"args must be a tuple of arrays passed as loss(x, *args), got {type(args).__name__}.")
    out = []
    for a in args:
        arr = np.asarray(a)
        # float64 arrays (not Python scalars: weak types) keep one compiled signature per shape
        if arr.dtype.kind in "fc":
            arr = arr.astype(np.complex128 if arr.dtype.kind == "c" else np.float64)
        out.append(arr)
    return tuple(out)


# ----------------------------------------------------------------------------------------
# Strategy: non-finite losses and callbacks
# ----------------------------------------------------------------------------------------
class PushbackStrategy:
    """What to do when the loss or its gradient is NaN/inf, plus an optional callback.

    A non-finite evaluation is replaced (in the objective NLopt sees) by
    ``f_best + nan_penalty * k * max(1, |f_best|)`` where ``k`` counts consecutive non-finite
    evaluations, with a gradient pointing away from the best point seen, so SLSQP's line
    search retreats towards the finite region. After ``max_nonfinite`` consecutive non-finite
    evaluations the fit stops (``info["stopped_nonfinite"]``, status NONFINITE) instead of
    spending ``maxiter`` on NaNs.

    Parameters
    ----------
    nan_penalty : float, default 100
        Height of the replacement value, in units of ``max(1, |f_best|)`` of the scaled loss.
    max_nonfinite : int, default 20
        Consecutive non-finite evaluations tolerated before stopping.
    callback : callable, optional
        ``callback(x, f, g)`` after every evaluation with the full parameter vector and the
        loss value and gradient (over the free parameters) *as the loss returned them*
        (possibly non-finite). Its return value is ignored.
    """

    def __init__(self, nan_penalty: float = 100.0, max_nonfinite: int = 20, callback: Callable | None = None) -> None:
        if not (np.isfinite(nan_penalty) and nan_penalty > 0):
            raise OptionError(f"nan_penalty must be a finite number > 0, got {nan_penalty!r}.")
        if int(max_nonfinite) != max_nonfinite or max_nonfinite < 1:
            raise OptionError(f"max_nonfinite must be an integer >= 1, got {max_nonfinite!r}.")
        if callback is not None and not callable(callback):
            raise OptionError(f"callback must be callable as callback(x, f, g), got {type(callback).__name__}.")
        self.nan_penalty = float(nan_penalty)
        self.max_nonfinite = int(max_nonfinite)
        self.callback = callback

    def replace_nonfinite(self, y: np.ndarray, best_y: np.ndarray | None, best_f: float, n_consecutive: int):
        """Finite stand-in ``(f, g)`` (scaled objective, NLopt's variables) for a non-finite evaluation."""
        if best_y is None:  # nothing finite seen yet: a flat, high plateau
            return 1e10 * n_consecutive, np.zeros_like(y)
        height = self.nan_penalty * n_consecutive * max(1.0, abs(best_f))
        d = y - best_y
        dd = float(d @ d)
        # gradient of height * |d|^2 / |d0|^2 at d0: points away from the best point
        g = 2.0 * height * d / dd if dd > 0 else np.zeros_like(y)
        return best_f + height, g

    def __repr__(self) -> str:
        return f"PushbackStrategy(nan_penalty={self.nan_penalty}, max_nonfinite={self.max_nonfinite}, callback={self.callback!r})"


DefaultStrategy = PushbackStrategy


# ----------------------------------------------------------------------------------------
# Evaluator: loss calls as NLopt sees them
# ----------------------------------------------------------------------------------------
class LossEvaluator:
    """Evaluates the loss and gradient, applies the strategy, counts and tracks the best point.

    NLopt works on ``y = x_free / x_scale`` and minimises ``scale * loss``; the evaluator
    converts both ways. Create it with :meth:`SLSQP.create_evaluator`; ``spec`` is the parsed
    parameter specification of :meth:`SLSQP.minimize` (start ``values`` and the ``free`` mask).

    Attributes
    ----------
    n_eval, n_nonfinite : int
        Evaluations so far, and how many of them were NaN/inf.
    best_x : ndarray or None
        Full parameter vector with the lowest finite loss seen; ``best_f`` its loss (unscaled).
    """

    def __init__(self, loss: Callable, spec, strategy: PushbackStrategy, args: tuple = (),
                 verbosity: int = 0, compiled: _Compiled | None = None) -> None:
        self.loss = loss
        self.spec = spec
        self.strategy = strategy
        self.args = args
        self.verbosity = verbosity
        self.compiled = compiled if compiled is not None else _compiled_for(loss)
        self.free_idx = np.flatnonzero(spec.free)
        self.base = spec.values.copy()
        self.scale = 1.0
        self.x_scale = np.ones(self.free_idx.size)
        self.n_eval = 0
        self.n_nonfinite = 0
        self.n_consecutive = 0
        self.stopped_nonfinite = False
        self.best_x: np.ndarray | None = None
        self.best_f = np.inf
        self._best_y: np.ndarray | None = None
        self._opt: nlopt.opt | None = None
        self._last: tuple | None = None  # (y, f, g) of the last computation
        self.n_computed = 0

    # -- raw JAX calls (float64, unscaled) -------------------------------------------------
    def full(self, x_free: np.ndarray) -> np.ndarray:
        """Full parameter vector with the free entries set to ``x_free``."""
        x = self.base.copy()
        x[self.free_idx] = x_free
        return x

    def value_and_grad(self, x_free: np.ndarray) -> tuple[float, np.ndarray]:
        """Unscaled loss and gradient over the free parameters (no strategy, not counted)."""
        with _x64():
            f, g = self.compiled.value_and_grad(np.asarray(x_free, np.float64), self.base, self.free_idx, *self.args)
        return float(f), np.asarray(g, dtype=np.float64)

    def hessian(self, x_free: np.ndarray) -> np.ndarray:
        """Unscaled Hessian over the free parameters."""
        with _x64():
            h = self.compiled.hessian(np.asarray(x_free, np.float64), self.base, self.free_idx, *self.args)
        return np.asarray(h, dtype=np.float64)

    # -- what NLopt calls --------------------------------------------------------------------
    def to_y(self, x_free: np.ndarray) -> np.ndarray:
        return np.asarray(x_free, np.float64) / self.x_scale

    def to_x(self, y: np.ndarray) -> np.ndarray:
        return np.asarray(y, np.float64) * self.x_scale

    def objective(self, y: np.ndarray, grad: np.ndarray) -> float:
        """NLopt objective: scaled loss at ``y``; fills ``grad`` in place when NLopt asks."""
        y = np.array(y, dtype=np.float64)
        x_free = self.to_x(y)
        if self._last is not None and np.array_equal(y, self._last[0]):
            # SLSQP asks again, with the gradient, for the point its line search accepted
            f, g = self._last[1], self._last[2]
        else:
            f, g = self.value_and_grad(x_free)
            self.n_computed += 1
            self._last = (y, f, g)
        self.n_eval += 1
        if self.strategy.callback is not None:
            self.strategy.callback(self.full(x_free), f, g)
        if self.verbosity >= 10:
            logger.debug("eval %d: f=%.10g |g|=%.3g x=%s", self.n_eval, f, float(np.linalg.norm(g)), np.array2string(x_free, precision=8))
        if math.isfinite(f) and np.all(np.isfinite(g)):
            self.n_consecutive = 0
            fs = f * self.scale
            gs = g * self.scale * self.x_scale
            if f < self.best_f:
                self.best_f, self.best_x, self._best_y = f, self.full(x_free), y
        else:
            self.n_nonfinite += 1
            self.n_consecutive += 1
            best_fs = self.best_f * self.scale if self._best_y is not None else np.inf
            fs, gs = self.strategy.replace_nonfinite(y, self._best_y, best_fs, self.n_consecutive)
            if self.verbosity >= 7:
                logger.debug("eval %d: non-finite loss (%d in a row), replaced by %.6g", self.n_eval, self.n_consecutive, fs)
            if self.n_consecutive >= self.strategy.max_nonfinite and self._opt is not None:
                self.stopped_nonfinite = True
                self._opt.force_stop()
        if grad.size > 0:
            grad[:] = gs
        return float(fs)


# ----------------------------------------------------------------------------------------
# Criterion
# ----------------------------------------------------------------------------------------
class EDM:
    """Estimated distance to the minimum: ``EDM = g^T H^-1 g / 2``; converged when ``< errordef * tol``.

    Computed on the unscaled loss, over the free parameters that are not held at a bound (a
    parameter sitting on its bound with the gradient pushing outwards is at a constrained
    minimum: its gradient does not count). A singular Hessian is handled with a least-squares
    solve (``info["hessian_singular"]``).

    Parameters
    ----------
    tol : float
        Tolerance; the threshold is ``errordef * tol``.
    errordef : float
        The loss's ``errordef`` (1 chi-square, 0.5 negative log-likelihood).
    """

    name = "edm"

    def __init__(self, tol: float, errordef: float = 1.0) -> None:
        self.tol = float(tol)
        self.errordef = float(errordef)
        self.last_value = float("nan")
        self.info: dict[str, Any] = {}

    @property
    def threshold(self) -> float:
        return self.errordef * self.tol

    def calculate(self, x_free: np.ndarray, g: np.ndarray, h: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> float:
        """EDM at ``x_free`` from the (unscaled) gradient ``g`` and Hessian ``h``."""
        span = np.maximum(1.0, np.abs(x_free)) * 1e-9
        at_lower = (x_free - lower <= span) & (g > 0)
        at_upper = (upper - x_free <= span) & (g < 0)
        active = at_lower | at_upper
        keep = ~active
        self.info = {"active": active, "hessian_singular": False}
        if not (np.all(np.isfinite(g)) and np.all(np.isfinite(h))):
            self.last_value = float("nan")
            return self.last_value
        gk = g[keep]
        if gk.size == 0:
            self.last_value = 0.0
            return 0.0
        hk = h[np.ix_(keep, keep)]
        try:
            cond = np.linalg.cond(hk)
        except np.linalg.LinAlgError:
            cond = np.inf
        if not np.isfinite(cond) or cond > 1e14:
            self.info["hessian_singular"] = True
            step = np.linalg.lstsq(hk, gk, rcond=None)[0]
        else:
            step = np.linalg.solve(hk, gk)
        self.last_value = float(abs(gk @ step) / 2.0)
        return self.last_value

    def converged(self, value: float | None = None) -> bool:
        """True when the EDM (``value`` or the last one computed) is below ``errordef * tol``."""
        value = self.last_value if value is None else value
        return bool(np.isfinite(value) and value < self.threshold)

    def __repr__(self) -> str:
        return f"EDM(tol={self.tol}, errordef={self.errordef}, last_value={self.last_value:.3g})"
