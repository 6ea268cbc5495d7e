"""The compiled programs of one (model, options) pair, and the per-process cache of them.

A worker compiles the batched solve of a model once and reuses it for every chunk: the cache
is keyed by the model's content identity (:meth:`~sheap_dask.model.Model.identity`), the
options that change compiled code and the penalty function's identity, bounded (least
recently used evicted), and never keyed by ``id()``.

Every program works on spectra scaled to order unity (see :mod:`sheap_dask.chunk`): the
batched solve (per-spectrum bounds, so flux parameters scale with their spectrum), and the
float64 post-processing that gives the objective, the plain chi-square and
:math:`J^T W J` (IRLS weights for the robust loss) at the optimum.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Mapping

import numpy as np

from . import config
from .identity import LRUCache, token
from .options import ChunkOptions

logger = logging.getLogger("sheap_dask.chunk")

__all__ = ["CompiledModel", "compile_stats", "get_compiled"]

_STATS = {"solver_builds": 0, "traces": 0, "chunks": 0, "compiling_chunks": 0, "compiling_seconds": 0.0, "warm_seconds": 0.0,
          "spectra": 0, "restarted": 0, "restart_seconds": 0.0, "absorber_refits": 0, "absorber_seconds": 0.0,
          "fallback": 0, "fallback_seconds": 0.0}


def _traces(compiled: CompiledModel) -> int:
    return compiled.minimizer.n_compilations


def _count_evicted(compiled: CompiledModel) -> None:
    _STATS["traces"] += _traces(compiled)  # compile_stats keeps counting evicted programs


_CACHE = LRUCache(lambda: config.get("worker.compiled_cache_size"), on_evict=_count_evicted)


def compile_stats() -> dict:
    """Compile and timing counters of this process (for tests and benchmarks).

    ``traces`` counts JAX traces of the batched solves and the post-processing (it stays
    constant once every shape of a fit has been compiled); ``compiling_chunks`` counts the
    chunks during which something was compiled and ``compiling_seconds`` their wall time,
    ``warm_seconds`` the wall time of the other chunks. ``spectra`` counts the spectra
    fitted; ``restarted``, ``absorber_refits`` and ``fallback`` those that left the batched
    solve for a restart, an absorber re-solve or the SLSQP fallback, with the seconds spent
    there.
    """
    stats = dict(_STATS)
    stats["traces"] += sum(_traces(c) for c in _CACHE.values())
    return stats


def get_compiled(model, options: ChunkOptions, penalty_function=None) -> CompiledModel:
    """The compiled programs of (model, options), from the per-process LRU cache.

    Keyed by the model's content identity, the options that change compiled code and the
    penalty function's identity: a new model with the same definition (a task's unpickled
    copy) reuses the program and a changed one never does.
    """
    config.enable_compilation_cache()
    compile_options = options.compile_key()
    key = (model.identity(), compile_options, token(penalty_function) if penalty_function is not None else None)
    compiled, built = _CACHE.get_or_build(key, lambda: CompiledModel(model, compile_options, penalty_function))
    if built:
        _STATS["solver_builds"] += 1
    return compiled


class CompiledModel:
    """The jitted programs of one (model, options) pair, reused for every chunk."""

    def __init__(self, model, options: ChunkOptions, penalty_function=None):
        import jax
        import jax.numpy as jnp

        from .loss import (
            build_loss_function,
            irls_weight,
            robust_rho,
            usable_mask,
            weighted_residuals,
        )
        from .minimizer import Minimizer

        self.model = model
        self.options = options
        params = model.params
        self.names = list(params.names)
        self.n_params = len(self.names)
        self.lower = np.asarray(params.lower, dtype=np.float64)
        self.upper = np.asarray(params.upper, dtype=np.float64)
        self.free_index = np.array([self.names.index(n) for n in params.free_names], dtype=int)
        self.n_free = len(self.free_index)
        self.embed_matrix, self.embed_fixed_mask = params.embedding()
        # Per-parameter flag: scales with the spectrum's flux unit (see chunk._flux_scale).
        self.flux_mask = np.isin(self.names, list(getattr(model, "flux_params", ()) or ()))
        # Parameters that belong together (one line's flux, shift, width): reset together.
        components = model.metadata.get("components", {}) if isinstance(model.metadata, Mapping) else {}
        self.component_groups = [
            [self.names.index(p) for p in info.get("params", []) if p in self.names]
            for info in components.values()
            if isinstance(info, Mapping)
        ]
        # Parameters whose bound is a stationary point of the model (a host dispersion at 0): no restart.
        self.resting_bound_mask = np.isin(self.names, [p for info in components.values() if isinstance(info, Mapping)
                                                       for p in info.get("resting_bounds", [])])
        # The lines' shifts (not a host's or FeII's): a restart also starts them in the redshift's frame.
        self.line_shift_mask = np.isin(self.names, [p for info in components.values() if isinstance(info, Mapping) and info.get("line")
                                                    for p in info.get("params", []) if p.endswith("_shift")])
        # LM through a queue of lanes (see lm_slots in sheap_dask.yaml); restarts reuse it.
        self.slots = int(options.slots or 0) if options.method == "lm" else 0
        extra = {"rtol": options.rtol, "gtol": options.gtol, "loss_kind": options.loss_kind, "robust_scale": float(options.robust_scale)}
        if options.method == "lm":
            extra["slots"] = self.slots
        self.minimizer = Minimizer(
            model.func,
            non_optimize_in_axis=5,  # per-spectrum bounds: flux parameters scale with their spectrum
            num_steps=int(options.num_steps),
            learning_rate=options.learning_rate,
            weighted=bool(options.weighted),
            method=options.method,
            lbfgs_options=dict(options.lbfgs_options) or None,
            penalty_function=penalty_function,
            param_converter=params,
            penalty_weight=options.penalty_weight,
            curvature_weight=options.curvature_weight,
            smoothness_weight=options.smoothness_weight,
            max_weight=options.max_weight,
            **extra,
        )

        func = model.func
        embed = jnp.asarray(self.embed_matrix)
        robust = options.loss_kind == "logcosh"
        scale = float(options.robust_scale)
        lm = options.method == "lm"
        # The objective of the batched solve, per spectrum: LM's cost (the chi-square for
        # small residuals), or the mean loss of adam/lbfgs. Restarts and the fallback compare
        # and minimise exactly this.
        mean_loss = None if lm else build_loss_function(
            func, weighted=bool(options.weighted), penalty_function=penalty_function, penalty_weight=options.penalty_weight,
            curvature_weight=options.curvature_weight, smoothness_weight=options.smoothness_weight,
            max_weight=options.max_weight, kind=options.loss_kind, robust_scale=scale,
        )

        def residuals(phys, wavelength, flux, errors):
            return weighted_residuals(func, phys, wavelength, flux, errors)

        def objective(phys, wavelength, flux, errors):
            if mean_loss is not None:
                return mean_loss(phys, wavelength, flux, errors)
            r = residuals(phys, wavelength, flux, errors)
            return 2.0 * jnp.sum(robust_rho(r, scale)) if robust else jnp.sum(r * r)

        def post_one(phys, wavelength, flux, errors):
            _STATS["traces"] += 1  # runs at trace time only
            r = residuals(phys, wavelength, flux, errors)
            jac_full = jax.jacfwd(residuals)(phys, wavelength, flux, errors)  # (n_pix, n_params)
            jac_free = jac_full @ embed.astype(jac_full.dtype)  # ties/fixed folded in
            weighted_jac = jac_free * (irls_weight(r / scale) if robust else jnp.ones_like(r))[:, None]
            return jnp.sum(r * r), objective(phys, wavelength, flux, errors), weighted_jac.T @ jac_free

        self.post_one = post_one  # one spectrum (benchmarks/profile_models.py times its batchings)
        if jax.default_backend() == "cpu":
            # One row after another on a CPU: a vmapped forward-mode Jacobian of a generic model
            # holds (rows, params, ...) tangents that leave the cache; a user's 20-parameter jnp
            # model is ~1.7x faster in sequence, the built-in regions (custom JVPs; a tenth of
            # their chunk) even to 1.5x slower (post_ms_per_spectrum of
            # benchmarks/profile_models.py). Batched on accelerators.
            def post_rows(phys, wavelength, flux, errors):
                return jax.lax.map(lambda row: post_one(row[0], wavelength, row[1], row[2]), (phys, flux, errors))

            def post_rows_2d(phys, wavelength, flux, errors):
                return jax.lax.map(lambda row: post_one(*row), (phys, wavelength, flux, errors))

            self._post, self._post_2d = jax.jit(post_rows), jax.jit(post_rows_2d)
        else:
            self._post = jax.jit(jax.vmap(post_one, in_axes=(0, None, 0, 0)))
            self._post_2d = jax.jit(jax.vmap(post_one, in_axes=(0, 0, 0, 0)))

        def evaluate_one(phys, wavelength):
            _STATS["traces"] += 1  # runs at trace time only
            return func(wavelength, phys)

        self._evaluate = jax.jit(jax.vmap(evaluate_one, in_axes=(0, None)))
        self._evaluate_2d = jax.jit(jax.vmap(evaluate_one, in_axes=(0, 0)))

        def objective_free(x_free, offsets, wavelength, flux, errors):
            # SLSQP's objective: the batched objective in free physical parameters, times the
            # number of usable pixels for a mean loss (same minimum, chi-square-like scale).
            phys = offsets + embed.astype(x_free.dtype) @ x_free
            value = objective(phys, wavelength, flux, errors)
            if mean_loss is not None:
                value = value * jnp.sum(usable_mask(wavelength, flux, errors))
            return value

        objective_free.errordef = 1.0
        self.objective_free = objective_free  # one function object: SLSQP caches its compiled gradient
        self.objective_is_mean = mean_loss is not None
        self._slsqp: dict = {}
        self._warm: set = set()

    def constraints(self, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
        """(n, n_params, 2) per-spectrum bounds for the batched solve."""
        return np.stack([lower, upper], axis=-1)

    def post(self, phys, wavelength, flux, errors):
        """``(chi2, objective, J^T W J)`` in float64: the covariance needs the precision even
        when the solve ran in float32."""
        import jax

        fn = self._post_2d if np.ndim(wavelength) == 2 else self._post
        f64 = lambda a: np.asarray(a, dtype=np.float64)
        with jax.enable_x64(True):
            return tuple(np.asarray(a, dtype=np.float64) for a in fn(f64(phys), f64(wavelength), f64(flux), f64(errors)))

    def post_rows(self, phys, wavelength, flux, errors, n_rows: int, group: int):
        """:meth:`post` of the first ``n_rows`` rows in groups of ``group`` (the last padded):
        the padding of a batch is not worth a float64 Jacobian."""
        n, k = len(phys), self.n_free
        out = (np.full(n, np.nan), np.full(n, np.nan), np.full((n, k, k), np.nan))
        for first in range(0, n_rows, group):  # one compiled shape: (group, ...)
            take = np.minimum(np.arange(first, first + group), n_rows - 1)
            wl = wavelength[take] if np.ndim(wavelength) == 2 else wavelength
            m = min(group, n_rows - first)
            for target, value in zip(out, self.post(phys[take], wl, flux[take], errors[take])):
                target[first : first + m] = value[:m]
        return out

    def evaluate_rows(self, wavelength, phys, group: int) -> np.ndarray:
        """The model (float64) for each row of ``phys``, in groups of ``group`` rows (one
        compiled shape whatever the number of rows)."""
        import jax

        n = len(phys)
        out = np.full((n, np.shape(wavelength)[-1]), np.nan)
        fn = self._evaluate_2d if np.ndim(wavelength) == 2 else self._evaluate
        with jax.enable_x64(True):
            for first in range(0, n, group):
                take = np.minimum(np.arange(first, first + group), n - 1)
                wl = np.asarray(wavelength, dtype=np.float64)
                wl = wl[take] if wl.ndim == 2 else wl
                k = min(group, n - first)
                out[first : first + k] = np.asarray(fn(np.asarray(phys[take], dtype=np.float64), wl))[:k]
        return out

    def warm_up(self, options: ChunkOptions, start, flux, wavelength, errors, lower, upper, group: int) -> None:
        """Compile, during a worker's first chunk, every program a later chunk may need.

        The post-processing of restart and rejection groups, the model evaluation of the
        absorber rejection and the SLSQP fallback are only needed when some spectrum is
        stuck; compiled lazily, a worker would stop to compile them in the middle of a run,
        whenever such a spectrum first turns up. ``start``, ``flux``, ``wavelength`` (1-D or
        one row), ``errors`` and the bounds describe one (scaled) spectrum. What ``options``
        need is compiled once per program (they may differ from call to call: fallback,
        rejection and restarts are not part of the cache key).
        """
        needed = {"post"}
        if options.absorber_iterations:
            needed.add("evaluate")
        if options.fallback == "slsqp":
            needed.add(("slsqp", options.fallback_tol, options.fallback_maxiter))
        todo = needed - self._warm
        if not todo:
            return
        self._warm |= todo
        rep = lambda a: np.repeat(np.asarray(a)[None], group, axis=0)
        wl_g = wavelength if np.ndim(wavelength) == 1 else rep(wavelength)
        if "post" in todo:
            self.post(rep(start), wl_g, rep(flux), rep(errors))
        if "evaluate" in todo:
            self.evaluate_rows(wl_g, rep(start), group)
        if any(isinstance(t, tuple) for t in todo):
            free = self.free_index
            offsets = self.model.params.expand_free(np.zeros(len(free)), start)
            from .slsqp import SLSQP

            with warnings.catch_warnings(), contextlib.suppress(Exception):  # compiling is the point, not the result
                warnings.simplefilter("ignore")
                SLSQP(tol=options.fallback_tol, maxiter=3).minimize(
                    self.objective_free,
                    params={"value": np.asarray(start, dtype=np.float64)[free], "lower": lower[free], "upper": upper[free]},
                    args=(offsets, np.asarray(wavelength, dtype=np.float64), np.asarray(flux, dtype=np.float64), np.asarray(errors, dtype=np.float64)),
                )

    def slsqp(self, options: ChunkOptions):
        """The fallback's SLSQP minimizer for these options (its compiled gradient and
        Hessian are cached per objective function, shared by every tolerance)."""
        key = (options.fallback_tol, options.fallback_maxiter)
        if key not in self._slsqp:
            from .slsqp import SLSQP

            self._slsqp[key] = SLSQP(tol=options.fallback_tol, maxiter=options.fallback_maxiter)
        return self._slsqp[key]
