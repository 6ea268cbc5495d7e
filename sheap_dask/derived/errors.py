"""The Monte Carlo error engine shared by every derived quantity.

A measurement is a per-spectrum function ``f(p, x) -> {name: scalar}`` of the physical
parameter vector ``p`` (and one per-spectrum scalar ``x``, e.g. log10 of a luminosity
factor), made by a module-level *builder* ``build(model, key) -> f``. :func:`run` evaluates it
at the best fit and, with ``params_err``, on Monte Carlo draws around it, compiled once per
(model identity, builder, key, draws, batch) and kept in an LRU cache (``_COMPILED``).

Error propagation
-----------------
For each spectrum, ``n_samples`` (default 100) parameter vectors are drawn: every *free*
parameter from an independent Gaussian centred on its best-fit value with standard deviation
``params_err``; draws are clipped into the parameter bounds; fixed parameters keep their
fitted values and tied parameters are recomputed from their drawn sources, so the ties hold in
every draw. The quantity is recomputed for each draw and the error is the sample standard
deviation (ddof=1) of the finite results (NaN if fewer than half are finite, e.g. because a
used parameter has a NaN error). The draws come from ``jax.random`` keyed by ``seed`` and by
each spectrum's global index, so results are reproducible and do not depend on how the
spectra are chunked, and every quantity of one spectrum uses the same draws. Zero errors give
exactly zero; without ``params_err`` the errors are NaN. Correlations between parameters are
ignored (the fit reports only marginal errors). Black-hole mass errors are measurement errors
only: the recipes' intrinsic scatter (``RECIPES[name].scatter_dex``) is not added.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from ..errors import InputDataError, OptionError
from ..identity import LRUCache, token
from ..parameters import _apply_op

__all__ = ["DEFAULT_N_SAMPLES", "as_params", "mc_options", "run"]

DEFAULT_N_SAMPLES = 100

_COMPILED = LRUCache(64)

#: ``build(model, key) -> f(p, x) -> dict of scalars``: one kind of measurement.
Builder = Callable[[object, tuple], Callable]


def _compiled(model, build: Builder, key: tuple, n_samples: int, batch_size: int):
    """Jitted ``values(params, extra)`` and ``errors(params, err, lower, upper, index, extra, seed)``.

    ``build``/``key`` select the per-spectrum function ``f(p, x) -> dict of scalars`` (``x`` a
    per-spectrum scalar such as log10 of the luminosity factor). Cached by the model's
    identity (LRU), so a second chunk of the same shape does not recompile and a changed
    model never reuses a stale program.
    """
    kind = f"{build.__module__}.{build.__qualname__}"
    cache_key = (model.identity(), kind, token(key), n_samples, batch_size)
    return _COMPILED.get_or_build(cache_key, lambda: _build_compiled(model, build, key, n_samples, batch_size))[0]


def _build_compiled(model, build: Builder, key: tuple, n_samples: int, batch_size: int):
    import jax
    import jax.numpy as jnp

    f = build(model, key)
    params_spec = model.params
    names = list(params_spec.names)
    free = np.array([params_spec[nm].free for nm in names], dtype=bool)
    ties = [(names.index(t), names.index(s), op, operand) for t, s, op, operand in params_spec.ties]

    vf = jax.vmap(f)

    def batched(flat_p, flat_x):
        # Pad to whole batches so every row takes the same (vmapped) code path: lax.map's own
        # remainder path rounds differently, which would make identical draws differ.
        n = flat_p.shape[0]
        b = max(1, min(batch_size, n))
        nb = -(-n // b)
        pad = nb * b - n
        if pad:
            flat_p = jnp.concatenate([flat_p, jnp.broadcast_to(flat_p[-1:], (pad,) + flat_p.shape[1:])])
            flat_x = jnp.concatenate([flat_x, jnp.broadcast_to(flat_x[-1:], (pad,))])
        out = jax.lax.map(lambda a: vf(a[0], a[1]), (flat_p.reshape(nb, b, -1), flat_x.reshape(nb, b)))
        return {k: v.reshape(nb * b)[:n] for k, v in out.items()}

    def values(params, extra):
        return batched(params, extra)

    def errors(params, err, lower, upper, index, extra, seed):
        n, m = params.shape
        dtype = params.dtype
        base = jax.random.PRNGKey(seed)
        keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(index)
        z = jax.vmap(lambda k: jax.random.normal(k, (n_samples, m), dtype))(keys)  # (n, N, m)
        # only free parameters are perturbed; where() keeps NaN errors of fixed/tied ones out
        scale = jnp.where(jnp.asarray(free), err, 0.0)
        s = params[:, None, :] + scale[:, None, :] * z
        s = jnp.where(jnp.asarray(free), jnp.clip(s, lower, upper), s)
        for t, src, op, operand in ties:
            s = s.at[..., t].set(_apply_op(s[..., src], op, operand))
        out = batched(s.reshape(n * n_samples, m), jnp.repeat(extra, n_samples))
        res = {}
        for name, val in out.items():
            val = val.reshape(n, n_samples)
            fin = jnp.isfinite(val)
            cnt = jnp.sum(fin, axis=1)
            # deviations from one finite draw: identical draws give exactly zero, not rounding
            ref = jnp.max(jnp.where(fin, val, -jnp.inf), axis=1, keepdims=True)
            d = jnp.where(fin, val - ref, 0.0)
            mean = jnp.sum(d, axis=1) / jnp.maximum(cnt, 1)
            var = jnp.sum(jnp.where(fin, (d - mean[:, None]) ** 2, 0.0), axis=1) / jnp.maximum(cnt - 1, 1)
            res[name] = jnp.where(2 * cnt >= n_samples, jnp.sqrt(var), jnp.nan)
        return res

    return jax.jit(values), jax.jit(errors)


def as_params(model, params, name: str = "params") -> tuple[np.ndarray, bool]:
    """``params`` as a float (n_spectra, n_params) array, and whether one vector was given."""
    arr = np.asarray(params)
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
    one = arr.ndim == 1
    arr = np.atleast_2d(arr)
    if arr.ndim != 2 or arr.shape[1] != model.n_params:
        raise InputDataError(
            f"{name} has shape {np.shape(params)}; expected (n_spectra, n_params) or (n_params,) with "
            f"n_params={model.n_params} in the order of model.param_names."
        )
    return arr, one


def run(model, build: Builder, key: tuple, params, params_err, extra, *, n_samples, seed, index, lower, upper, batch_size):
    """Values and Monte Carlo errors of every output of a measurement: dict name -> (value, error).

    ``build(model, key)`` makes the measurement (see the module docstring); ``extra`` is its
    per-spectrum scalar ``x``; the keywords are those of :func:`mc_options`.
    """
    import jax.numpy as jnp

    p, one = as_params(model, params)
    n = p.shape[0]
    n_samples = int(n_samples)
    if n_samples < 2:
        raise OptionError(f"n_samples={n_samples!r} must be >= 2 (Monte Carlo draws per spectrum).")
    values_fn, errors_fn = _compiled(model, build, key, n_samples, int(batch_size))
    # Pad the rows to a few bucket sizes so chunks of slightly different lengths (the last
    # one, a subset) reuse the compiled functions; the copies of row 0 are dropped at the end.
    m = _bucket(n)
    rows = np.concatenate([np.arange(n), np.zeros(m - n, dtype=int)]) if n else np.zeros(0, dtype=int)
    pj = jnp.asarray(p[rows])
    dtype = pj.dtype
    x = jnp.asarray(np.broadcast_to(np.asarray(extra, dtype=np.float64), (n,))[rows], dtype=dtype)
    if n == 0:  # an empty chunk: shapes only (evaluate one dummy row for the output names)
        names = values_fn(jnp.asarray(model.params.values, dtype)[None], jnp.zeros((1,), dtype)).keys()
        return {k: (np.zeros(0), np.zeros(0)) for k in names}
    vals = {k: np.asarray(v, dtype=np.float64)[:n] for k, v in values_fn(pj, x).items()}
    if params_err is None:
        errs = {k: np.full(n, np.nan) for k in vals}
    else:
        e, _ = as_params(model, params_err, "params_err")
        lo = model.params.lower if lower is None else np.asarray(lower, dtype=np.float64)
        hi = model.params.upper if upper is None else np.asarray(upper, dtype=np.float64)
        idx = np.arange(n) if index is None else np.asarray(index)
        if idx.shape != (n,):
            raise OptionError(f"index has shape {idx.shape}; expected ({n},), one global position per spectrum.")
        with np.errstate(over="ignore"):  # huge errors in float32: inf, then clipped into the bounds
            e32, lo32, hi32 = (np.asarray(a, dtype=dtype) for a in (e[rows], lo, hi))
        out = errors_fn(
            pj, jnp.asarray(e32), jnp.asarray(lo32), jnp.asarray(hi32),
            jnp.asarray(idx[rows], jnp.uint32), x, jnp.uint32(seed),
        )  # fmt: skip
        errs = {k: np.asarray(v, dtype=np.float64)[:n] for k, v in out.items()}
    res = {k: (vals[k], errs[k]) for k in vals}
    if one:
        res = {k: (v[0], e[0]) for k, (v, e) in res.items()}
    return res


def _bucket(n: int) -> int:
    """Smallest allowed row count >= n: at least 8, then multiples of 1/8 of the power of two below."""
    if n <= 8:
        return 8
    q = 2 ** (int(math.log2(n)) - 3)
    return -(-n // q) * q


def mc_options(kw: dict) -> dict:
    """Pop the Monte Carlo options of :func:`run` from ``kw``; anything left is refused."""
    opts = {
        "n_samples": kw.pop("n_samples", DEFAULT_N_SAMPLES),
        "seed": kw.pop("seed", 0),
        "index": kw.pop("index", None),
        "lower": kw.pop("lower", None),
        "upper": kw.pop("upper", None),
        "batch_size": kw.pop("batch_size", 256),
    }
    if kw:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(kw)}")
    return opts

