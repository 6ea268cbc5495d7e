r"""The fit objective: a robust data term plus optional regularization, mask-safe.

:func:`build_loss_function` returns ``loss(params, wavelength, flux, errors) -> scalar``, a
pure ``jax.numpy`` function that the optimizers differentiate, jit-compile and vmap over
spectra. :func:`weighted_residuals` gives the per-pixel residual vector used by the
least-squares methods and the chunk layer.

Masking
-------
A pixel is *usable* when its flux, its error and its wavelength are finite and its error is
positive (an SDSS ``ivar == 0`` pixel arrives here as an infinite error). Unusable pixels
are replaced by harmless numbers *before* any arithmetic and then given zero weight (the
"double where" trick), so they contribute exactly nothing to the value and their NaN/inf
never reaches the gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from .errors import ModelError, OptionError

__all__ = ["build_loss_function", "weighted_residuals", "usable_mask", "robust_rho", "irls_weight", "LOSS_KINDS"]

#: Data terms :func:`build_loss_function` knows.
LOSS_KINDS = ("logcosh", "chi2")


def usable_mask(wavelength, flux, errors):
    """Boolean mask of the pixels that enter a fit.

    A pixel is usable when wavelength, flux and error are finite and the error is > 0.
    ``errors=None`` means every finite-flux pixel is usable. Shapes broadcast.
    """
    import jax.numpy as jnp

    flux = jnp.asarray(flux)
    mask = jnp.isfinite(flux) & jnp.isfinite(jnp.asarray(wavelength))
    if errors is not None:
        errors = jnp.asarray(errors)
        mask = mask & jnp.isfinite(errors) & (errors > 0)
    return mask


def _converter(param_converter) -> Callable:
    """raw -> physical function from a Parameters, a callable, or None (identity)."""
    if param_converter is None:
        return lambda p: p
    if hasattr(param_converter, "raw_to_phys"):
        return param_converter.raw_to_phys
    if callable(param_converter):
        return param_converter
    raise OptionError(
        f"param_converter={param_converter!r} must be a sheap_dask.Parameters, a callable raw -> "
        "physical, or None (params are already physical)."
    )


def _sanitize(wavelength, flux, errors):
    """Usable mask and inputs with every unusable entry replaced by a finite stand-in."""
    import jax.numpy as jnp

    flux = jnp.asarray(flux)
    dtype = flux.dtype if jnp.issubdtype(flux.dtype, jnp.floating) else jnp.result_type(float)
    flux = flux.astype(dtype)
    wavelength = jnp.broadcast_to(jnp.asarray(wavelength, dtype=dtype), flux.shape)
    errors = jnp.ones_like(flux) if errors is None else jnp.broadcast_to(jnp.asarray(errors, dtype=dtype), flux.shape)
    mask = usable_mask(wavelength, flux, errors)
    wl_ok = jnp.isfinite(wavelength)
    # A non-finite wavelength is replaced by the mean finite one, so the model stays finite
    # there and its (zero-weighted) value cannot turn the gradient into NaN.
    n_wl = jnp.maximum(jnp.sum(wl_ok), 1)
    wl_fill = jnp.sum(jnp.where(wl_ok, wavelength, 0.0)) / n_wl
    wavelength = jnp.where(wl_ok, wavelength, wl_fill)
    flux = jnp.where(mask, flux, 0.0)
    errors = jnp.where(mask, errors, 1.0)
    return mask, wavelength, flux, errors


def weighted_residuals(func: Callable, params, wavelength, flux, errors, param_converter=None):
    """Per-pixel weighted residuals ``(model - flux) / error``, exactly 0 on masked pixels.

    Parameters
    ----------
    func : callable
        ``func(wavelength, phys_params) -> model flux`` (pure jnp).
    params : array, (n_params,) or (n_free,)
        Physical parameters, or raw ones when ``param_converter`` is given.
    wavelength, flux, errors : array, (n_pix,)
        One spectrum; ``errors`` are 1-sigma (``None``: all 1). Masked pixels as in
        :func:`usable_mask`.
    param_converter : Parameters or callable, optional
        raw -> physical map (``Parameters.raw_to_phys``), or ``None`` for physical params.

    Returns
    -------
    jax.Array, (n_pix,)
        ``sum(r**2)`` is the chi-square over the usable pixels.
    """
    import jax.numpy as jnp

    convert = _converter(param_converter)
    mask, wl, f, e = _sanitize(wavelength, flux, errors)
    model = func(wl, convert(params))
    return jnp.where(mask, (model - f) / e, 0.0)


def _logcosh(r):
    """log cosh r = |r| + log1p(exp(-2|r|)) - log 2 (no overflow for large |r|); numpy in
    numpy's precision for a numpy array (the chunk layer's float64 sums on the host),
    jax.numpy otherwise (traced, in the solve's dtype)."""
    if isinstance(r, np.ndarray | np.generic):
        a = np.abs(r)
        return a + np.log1p(np.exp(-2.0 * a)) - np.log(2.0)
    import jax.numpy as jnp

    a = jnp.abs(r)
    return a + jnp.log1p(jnp.exp(-2.0 * a)) - jnp.log(2.0).astype(a.dtype)


def robust_rho(r, robust_scale=1.0):
    r"""Per-pixel robust data term :math:`s^2 \log\cosh(r/s)`: :math:`r^2/2` for
    :math:`|r| \ll s`, :math:`s|r|` for :math:`|r| \gg s` (``s`` = ``robust_scale`` in sigma).

    The objective of every method is built from it: ``build_loss_function`` averages it
    over usable pixels, Levenberg-Marquardt minimises twice its sum (so that the cost is
    the chi-square for small residuals), and the fallback minimises the same sum.
    """
    s = robust_scale
    return s * s * _logcosh(r / s)


def irls_weight(u):
    r"""The IRLS weight of :func:`robust_rho` at ``u = r/s``: :math:`\rho'(r)/r = \tanh(u)/u`,
    with its limit :math:`1 - u^2/3` near 0 (the series' error is O(u^4) <= 1e-16); numpy for
    a numpy array, jax.numpy otherwise (as :func:`robust_rho`)."""
    if isinstance(u, np.ndarray | np.generic):
        with np.errstate(all="ignore"):
            return np.where(np.abs(u) < 1e-4, 1.0 - u * u / 3.0, np.tanh(u) / np.where(u == 0, 1.0, u))
    import jax.numpy as jnp

    small = jnp.abs(u) < 1e-4
    safe = jnp.where(small, jnp.ones_like(u), u)
    return jnp.where(small, 1.0 - u * u / 3.0, jnp.tanh(safe) / safe)


def build_loss_function(
    func: Callable,
    weighted: bool = True,
    penalty_function: Callable | None = None,
    penalty_weight: float = 0.01,
    param_converter=None,
    curvature_weight: float = 1e3,
    smoothness_weight: float = 1e5,
    max_weight: float = 0.1,
    kind: str = "logcosh",
    robust_scale: float = 1.0,
) -> Callable:
    r"""Build ``loss(params, wavelength, flux, errors) -> scalar`` for one spectrum.

    With :math:`m_i` the model flux, :math:`y_i` the flux, :math:`\sigma_i` the error and
    :math:`U` the set of usable pixels (finite flux, wavelength and error, :math:`\sigma_i >
    0`), the residual is :math:`r_i = (m_i - y_i)/\sigma_i` (``weighted=True``) or
    :math:`r_i = m_i - y_i` (``weighted=False``), and

    .. math::

        L = \underbrace{\langle \rho(r_i) \rangle_U + \alpha \max_U \rho(r_i)}_{\text{data}}
            + \beta\, P(\lambda, \theta)
            + \gamma \langle (\Delta^2 d)_i^2 \rangle_{U_3}
            + \delta \langle (\Delta d)_i^2 \rangle_{U_2}

    where :math:`\rho(r) = s^2 \log\cosh (r/s)` (``kind="logcosh"``, quadratic for small
    residuals, linear for outliers: robust; :math:`s` = ``robust_scale``, 1 by default) or :math:`\rho(r) = r^2` (``kind="chi2"``: with all other
    weights 0, :math:`L = \chi^2 / N_U`, the least-squares objective);
    :math:`\langle\cdot\rangle_U` is the mean over usable pixels; :math:`\alpha` =
    ``max_weight`` (worst-pixel term); :math:`\beta` = ``penalty_weight`` and :math:`P` =
    ``penalty_function(wavelength, phys_params)``; :math:`d_i = m_i - y_i` (flux units), so
    :math:`\Delta^2 d = m'' - y''` (curvature matching, :math:`\gamma` = ``curvature_weight``)
    and :math:`\Delta d = (m - y)'` (residual smoothness, :math:`\delta` =
    ``smoothness_weight``). Derivatives are finite differences along the pixel axis
    (:math:`(\Delta d)_i = d_{i+1} - d_i`, :math:`(\Delta^2 d)_i = d_{i+1} - 2 d_i + d_{i-1}`),
    i.e. :math:`d/d\lambda` in units of the pixel step, as in sheap; they are averaged only
    over pixel pairs :math:`U_2` / triples :math:`U_3` that are entirely usable, so a masked
    pixel breaks the difference chain instead of bridging it. Any mean over an empty set is 0.

    Parameters
    ----------
    func : callable
        ``func(wavelength, phys_params) -> model flux`` (pure jnp, same shape as wavelength).
    weighted : bool
        Divide residuals by the errors (default). Errors still mask when False.
    penalty_function : callable, optional
        ``penalty_function(wavelength, phys_params) -> scalar``, added times
        ``penalty_weight``.
    penalty_weight : float
        Weight :math:`\beta` of the penalty (ignored without ``penalty_function``).
    param_converter : Parameters or callable, optional
        When a :class:`~sheap_dask.parameters.Parameters`, ``params`` are raw and mapped with
        its ``raw_to_phys``; any callable raw -> physical works the same; ``None``: ``params``
        are physical.
    curvature_weight, smoothness_weight, max_weight : float
        :math:`\gamma`, :math:`\delta`, :math:`\alpha` above (>= 0; 0 switches a term off
        and removes it from the computation).
    kind : {"logcosh", "chi2"}
        The data term :math:`\rho`.
    robust_scale : float
        :math:`s`, the residual (in sigma) where log-cosh turns from quadratic to linear.

    Returns
    -------
    callable
        ``loss(params, wavelength, flux, errors) -> scalar`` in the dtype of ``flux``.
        ``errors=None`` means unit errors. The function is pure: ``jax.jit``,
        ``jax.grad`` and ``jax.vmap`` apply.

    Raises
    ------
    OptionError
        Unknown ``kind``, negative or non-finite weight, bad ``param_converter``.
    ModelError
        ``func`` or ``penalty_function`` not callable.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> from sheap_dask.loss import build_loss_function
    >>> line = lambda x, p: p[0] + p[1] * x
    >>> loss = build_loss_function(line, kind="chi2", curvature_weight=0, smoothness_weight=0, max_weight=0)
    >>> x = jnp.linspace(0.0, 1.0, 5); y = 1.0 + 2.0 * x
    >>> float(loss(jnp.array([1.0, 2.0]), x, y, jnp.full(5, 0.1)))
    0.0
    >>> y = y.at[2].set(jnp.nan)                 # a masked pixel changes nothing
    >>> bool(jnp.isfinite(jax.grad(loss)(jnp.array([0.0, 0.0]), x, y, jnp.full(5, 0.1))).all())
    True
    """
    import jax.numpy as jnp

    if not callable(func):
        raise ModelError(f"build_loss_function(func=...) must be callable f(wavelength, params) -> flux, got {type(func).__name__}.")
    if penalty_function is not None and not callable(penalty_function):
        raise ModelError(
            f"penalty_function={penalty_function!r} must be a callable f(wavelength, phys_params) -> scalar, or None."
        )
    if kind not in LOSS_KINDS:
        raise OptionError(f"kind={kind!r} is not a known loss; choose one of {', '.join(map(repr, LOSS_KINDS))}.")
    weights = {
        "penalty_weight": penalty_weight,
        "curvature_weight": curvature_weight,
        "smoothness_weight": smoothness_weight,
        "max_weight": max_weight,
    }
    for name, w in weights.items():
        try:
            ok = float(w) >= 0 and float(w) != float("inf")
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise OptionError(f"{name}={w!r} must be a finite number >= 0 (0 switches the term off).")
    penalty_weight, curvature_weight, smoothness_weight, max_weight = (float(w) for w in weights.values())
    convert = _converter(param_converter)
    if not (isinstance(robust_scale, (int, float)) and math.isfinite(robust_scale) and robust_scale > 0):
        raise OptionError(f"robust_scale={robust_scale!r} must be a finite number > 0 (in units of sigma, e.g. 3).")
    scale = float(robust_scale)
    rho = (lambda r: robust_rho(r, scale)) if kind == "logcosh" else jnp.square

    def _mean(values, mask):
        n = jnp.sum(mask)
        return jnp.sum(jnp.where(mask, values, 0.0)) / jnp.maximum(n, 1)

    def loss(params, wavelength, flux, errors):
        mask, wl, f, e = _sanitize(wavelength, flux, errors)
        phys = convert(params)
        model = func(wl, phys)
        d = model - f
        r = d / e if weighted else d
        per_pixel = jnp.where(mask, rho(jnp.where(mask, r, 0.0)), 0.0)
        total = _mean(per_pixel, mask)
        if max_weight:
            total = total + max_weight * jnp.max(per_pixel, axis=-1)
        if penalty_function is not None and penalty_weight:
            total = total + penalty_weight * penalty_function(wl, phys)
        if smoothness_weight or curvature_weight:
            d = jnp.where(mask, d, 0.0)
            if smoothness_weight:
                pair = mask[..., 1:] & mask[..., :-1]
                total = total + smoothness_weight * _mean(jnp.square(d[..., 1:] - d[..., :-1]), pair)
            if curvature_weight:
                triple = mask[..., 2:] & mask[..., 1:-1] & mask[..., :-2]
                total = total + curvature_weight * _mean(jnp.square(d[..., 2:] - 2.0 * d[..., 1:-1] + d[..., :-2]), triple)
        return total

    return loss
