"""The Monte Carlo error engine shared by every derived quantity.

A measurement is a per-spectrum function ``f(p, x) -> {name: scalar}`` of the physical
parameter vector ``p`` (and one per-spectrum scalar ``x``, e.g. log10 of a luminosity
factor), made by a module-level *builder* ``build(model, key) -> f``. :func:`run` evaluates it
at the best fit and, with ``params_err``, on Monte Carlo draws around it, compiled once per
(model identity, builder, key, draws, batch) and kept in an LRU cache (``_COMPILED``).

Error propagation
-----------------
For each spectrum, ``n_samples`` (default 200) parameter vectors are drawn around the best
fit, in order of preference:

- ``draws``: the fit's own resampling realizations (``params_mc``, ``fit_dataset(n_mc=25)``:
  refits of the spectrum plus noise drawn from its ivar), used as they are;
- ``cov``: the full parameter covariance (``params_cov``): correlated Gaussian draws, so a
  line made of two anti-correlated Gaussians gets the error of its sum, not of each part;
  parameters whose covariance is undefined (NaN: a degenerate direction) are held at their
  best value, and a quantity that depends on any of them gets a NaN error;
- ``params_err``: independent Gaussian draws (when nothing better is available).

Draws are clipped into the parameter bounds and tied parameters are recomputed from their
drawn sources, so the ties hold in every draw. The quantity is recomputed for each draw and
its error is the half-width of the central 68% of the finite results ((p84 - p16) / 2, robust
to a few wild draws; NaN if fewer than half are finite). Random draws come from
``jax.random`` keyed by ``seed`` and by each spectrum's global index, so results are
reproducible and do not depend on how the spectra are chunked. Zero errors give exactly
zero; without any uncertainty the errors are NaN. Black-hole mass errors are measurement
errors only: the recipes' intrinsic scatter (``RECIPES[name].scatter_dex``) is not added.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from ..errors import InputDataError, OptionError
from ..identity import LRUCache, token
from ..parameters import _apply_op

__all__ = ["DEFAULT_N_SAMPLES", "as_params", "mc_options", "run"]

DEFAULT_N_SAMPLES = 200

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

    from ..config import enable_compilation_cache

    enable_compilation_cache()  # a process that only derives quantities (no fit) loads these from disk too

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

    def spread(params, s, extra, sensitive):
        out = batched(s.reshape(-1, m_params), jnp.repeat(extra, s.shape[1]))
        res = {}
        for name, val in out.items():
            val = val.reshape(s.shape[0], s.shape[1])
            fin = jnp.isfinite(val)
            lo, hi = jnp.nanpercentile(jnp.where(fin, val, jnp.nan), jnp.array([16.0, 84.0]), axis=1)
            # identical draws give exactly zero, not rounding
            half = jnp.where(jnp.all(val == val[:, :1], axis=1), 0.0, 0.5 * (hi - lo))
            ok = (2 * jnp.sum(fin, axis=1) >= s.shape[1]) & ~sensitive[name]
            res[name] = jnp.where(ok, half, jnp.nan)
        return res

    def tied(s):
        for t, src, op, operand in ties:
            s = s.at[..., t].set(_apply_op(s[..., src], op, operand))
        return s

    def undefined_sensitivity(params, extra, undefined):
        # Does the quantity move when the undefined parameters move by 0.1%? Then its error is
        # undefined too (a line's FWHM with its width undetermined); a quantity that moves by
        # less than 1e-6 of itself (a line flux, up to the truncation of its velocity grid) not.
        tangent = jnp.where(undefined, 1e-3 * jnp.maximum(jnp.abs(params), 1.0), 0.0).astype(params.dtype)
        out, dout = jax.vmap(lambda p, t, x: jax.jvp(lambda q: f(q, x), (p,), (t,)))(params, tangent, extra)
        return {k: jnp.any(undefined, axis=1) & ~(jnp.abs(dout[k]) <= 1e-6 * jnp.abs(v)) for k, v in out.items()}

    def errors(params, err, lower, upper, index, extra, seed):
        n, m = params.shape
        dtype = params.dtype
        base = jax.random.PRNGKey(seed)
        keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(index)
        z = jax.vmap(lambda k: jax.random.normal(k, (n_samples, m), dtype))(keys)  # (n, N, m)
        # only free parameters are perturbed; where() keeps NaN errors of fixed/tied ones out
        scale = jnp.where(jnp.asarray(free), err, 0.0)
        s = params[:, None, :] + scale[:, None, :] * z
        s = tied(jnp.where(jnp.asarray(free), jnp.clip(s, lower, upper), s))
        return spread(params, s, extra, {k: jnp.zeros(n, bool) for k in f(params[0], extra[0])})

    def errors_cov(params, root, undefined, lower, upper, index, extra, seed):
        n, m = params.shape
        base = jax.random.PRNGKey(seed)
        keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(index)
        z = jax.vmap(lambda k: jax.random.normal(k, (n_samples, m), params.dtype))(keys)
        s = params[:, None, :] + jnp.einsum("nij,nkj->nki", root, z)  # correlated: root root^T = cov
        s = tied(jnp.where(jnp.asarray(free), jnp.clip(s, lower, upper), s))
        return spread(params, s, extra, undefined_sensitivity(params, extra, undefined))

    def errors_draws(params, draws, lower, upper, extra):
        s = tied(jnp.where(jnp.asarray(free), jnp.clip(draws, lower, upper), draws))
        ok = jnp.all(jnp.isfinite(draws), axis=2, keepdims=True)
        s = jnp.where(ok, s, jnp.nan)  # a realization that did not converge counts as not finite
        return spread(params, s, extra, {k: jnp.zeros(params.shape[0], bool) for k in f(params[0], extra[0])})

    m_params = len(names)
    return jax.jit(values), jax.jit(errors), jax.jit(errors_cov), jax.jit(errors_draws)


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


def run(model, build: Builder, key: tuple, params, params_err, extra, *, n_samples, seed, index, lower, upper, batch_size,
        cov=None, draws=None):
    """Values and Monte Carlo errors of every output of a measurement: dict name -> (value, error).

    ``build(model, key)`` makes the measurement (see the module docstring); ``extra`` is its
    per-spectrum scalar ``x``; the keywords are those of :func:`mc_options`: ``draws``
    (n, K, n_params) resampling realizations or ``cov`` (n, n_params, n_params) take
    precedence over ``params_err``.
    """
    import jax.numpy as jnp

    p, one = as_params(model, params)
    n = p.shape[0]
    n_samples = int(n_samples)
    if n_samples < 2:
        raise OptionError(f"n_samples={n_samples!r} must be >= 2 (Monte Carlo draws per spectrum).")
    values_fn, errors_fn, cov_fn, draws_fn = _compiled(model, build, key, n_samples, int(batch_size))
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
    lo = model.params.lower if lower is None else np.asarray(lower, dtype=np.float64)
    hi = model.params.upper if upper is None else np.asarray(upper, dtype=np.float64)
    if draws is not None:
        d = np.asarray(draws, dtype=np.float64)
        if d.ndim == 2:
            d = d[None]
        out = draws_fn(pj, jnp.asarray(d[rows], dtype), jnp.asarray(lo, dtype), jnp.asarray(hi, dtype), x)
        errs = {k: np.asarray(v, dtype=np.float64)[:n] for k, v in out.items()}
    elif cov is not None:
        root, undefined = _root(np.asarray(cov, dtype=np.float64).reshape(-1, model.n_params, model.n_params))
        idx = np.arange(n) if index is None else np.asarray(index)
        out = cov_fn(pj, jnp.asarray(root[rows], dtype), jnp.asarray(undefined[rows]), jnp.asarray(lo, dtype), jnp.asarray(hi, dtype),
                     jnp.asarray(idx[rows], jnp.uint32), x, jnp.uint32(seed))
        errs = {k: np.asarray(v, dtype=np.float64)[:n] for k, v in out.items()}
    elif params_err is None:
        errs = {k: np.full(n, np.nan) for k in vals}
    else:
        e, _ = as_params(model, params_err, "params_err")
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


def _root(cov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(R, undefined)`` per spectrum: R R^T = cov over the defined parameters (a symmetric
    square root, zero for the undefined ones, i.e. those with NaN in the covariance)."""
    undefined = np.isnan(np.einsum("nii->ni", cov)) | np.isnan(cov).all(axis=2)
    c = np.where(undefined[:, :, None] | undefined[:, None, :], 0.0, np.nan_to_num(cov))
    c = 0.5 * (c + np.swapaxes(c, 1, 2))
    # the square root of the correlation matrix, scaled back: one parameter with a 1e50 error
    # (a line off the data's edge) must not swamp the precision of everyone else's draws
    d = np.sqrt(np.clip(np.einsum("nii->ni", c), 0.0, None))
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d > 0)
    w, v = np.linalg.eigh(c * inv[:, :, None] * inv[:, None, :])
    return d[:, :, None] * v * np.sqrt(np.clip(w, 0.0, None))[:, None, :], undefined


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
        "cov": kw.pop("cov", None),
        "draws": kw.pop("draws", None),
    }
    if kw:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(kw)}")
    return opts


def log_value_error(value, error):
    """``log10`` of a value and its error as half the log width of [value - error, value +
    error]: bounded, and NaN when that interval reaches 0 (the value is then consistent with
    nothing, and only an upper limit means something); a zero error stays zero."""
    with np.errstate(divide="ignore", invalid="ignore"):
        v = np.where(value > 0, np.log10(np.where(value > 0, value, 1.0)), np.nan)
        low = value - error
        e = np.where(low > 0, 0.5 * (np.log10(value + error) - np.log10(np.where(low > 0, low, 1.0))), np.nan)
        e = np.where(error == 0, 0.0, e)
    return v, e


def log_upper_limit(value, error, sigma: float = 3.0):
    """log10 of a ``sigma`` upper limit: max(value, 0) + sigma * error."""
    with np.errstate(divide="ignore", invalid="ignore"):
        bound = np.maximum(value, 0.0) + sigma * error
        return np.where(bound > 0, np.log10(bound), np.nan)
