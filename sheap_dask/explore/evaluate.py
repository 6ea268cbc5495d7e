"""Model curves on a fit result: the model, its components and the normalised residuals.

Evaluated chunk by chunk with ``xr.apply_ufunc(..., dask="parallelized")`` by one jitted,
vmapped function per (model identity, components), kept in an LRU cache (``_EVALUATORS``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xarray as xr

from ..errors import InputDataError, ModelError, OptionError
from ..identity import LRUCache
from .link import Link

__all__ = ["components", "evaluate", "grid", "model_curve", "residuals"]

_EVALUATORS = LRUCache(16)


def grid(link: Link, wavelength, spectra: xr.Dataset | None):
    """(wavelength DataArray, wl dim, explicit?) — the input grid or an explicit rest grid."""
    if wavelength is not None:
        wl = np.asarray(wavelength, dtype=np.float64)
        if wl.ndim != 1 or wl.size == 0 or not np.all(np.isfinite(wl)):
            raise OptionError(
                f"wavelength must be a 1-D array of finite rest-frame wavelengths (Angstrom), got shape {wl.shape}."
            )
        return xr.DataArray(wl, dims=("wavelength",), coords={"wavelength": wl}), "wavelength", True
    spectra = link.get_spectra(spectra)
    dim = link.dim
    flux = spectra["flux"]
    wl_dim = next(d for d in flux.dims if d != dim)
    wl_name = "wavelength" if "wavelength" in spectra.variables else wl_dim
    if wl_name not in spectra.variables:
        raise InputDataError(f"spectra has no wavelength coordinate ({wl_dim!r}); add one in Angstrom.")
    wl = spectra[wl_name].astype(np.float64)
    if wl.ndim == 2:
        wl = wl.transpose(dim, wl_dim)
        if wl.chunks:
            wl = wl.chunk({wl_dim: -1})
    return wl, wl_dim, False


def evaluate(link: Link, names, wavelength, spectra: xr.Dataset | None, frame: str | None) -> xr.DataArray:
    """Sum (names None) or stack of components on the grid; (spectrum, wl[, component])."""
    model = link.get_model()
    if names is not None:
        unknown = [c for c in names if c not in model.components]
        if unknown:
            raise ModelError(
                f"unknown component(s) {unknown} of model {model.name!r}; its components are: "
                f"{', '.join(model.components) or 'none'}."
            )
        if not names:
            raise ModelError(f"model {model.name!r} has no components to evaluate.")
    wl, wl_dim, explicit = grid(link, wavelength, spectra)
    if frame is None:
        frame = "rest" if explicit else "observed"
    if frame not in ("rest", "observed"):
        raise OptionError(f"frame={frame!r} must be 'rest' or 'observed'.")
    params, _ = link.params(False)
    z = link.frame_redshift(None if explicit else link.get_spectra(spectra))
    if params.chunks:
        z = z.chunk({link.dim: params.chunksizes[link.dim]})
    fn = _evaluator(model, tuple(names) if names is not None else None)
    wl_core = [wl_dim]

    def block(p, w, zz):
        opz = 1.0 + np.asarray(zz, dtype=np.float64)
        w = np.asarray(w, dtype=np.float64)
        if explicit:
            rest = np.broadcast_to(w, (p.shape[0], w.shape[-1]))
        elif w.ndim == 2:
            rest = w / opz[:, None]
        else:
            rest = w[None, :] / opz[:, None]
        out = np.asarray(fn(rest, p), dtype=np.float64)
        if frame == "observed":
            out = out / opz.reshape((-1,) + (1,) * (out.ndim - 1))
        return out

    out_core = [wl_dim] + (["component"] if names is not None else [])
    sizes = {"component": len(names)} if names is not None else {}
    out = xr.apply_ufunc(
        block,
        params,
        wl,
        z,
        input_core_dims=[["param"], wl_core, []],
        output_core_dims=[out_core],
        dask="parallelized",
        output_dtypes=[np.float64],
        dask_gufunc_kwargs={"output_sizes": sizes} if sizes else {},
    )
    if names is not None:
        out = out.assign_coords(component=list(names))
    out.attrs.update({"frame": frame, "model": model.name})
    return out


def model_curve(link: Link, wavelength=None, *, spectra: xr.Dataset | None = None, frame: str | None = None) -> xr.DataArray:
    """The fitted model, (spectrum, wavelength) (see ``SheapAccessor.model``)."""
    return evaluate(link, None, wavelength, spectra, frame).rename("model")


def components(
    link: Link, wavelength=None, *, spectra: xr.Dataset | None = None, frame: str | None = None, names: Sequence[str] | None = None
) -> xr.DataArray:
    """Each model component, (spectrum, wavelength, component) (see ``SheapAccessor.components``)."""
    model = link.get_model()
    names = list(model.components) if names is None else list(names)
    return evaluate(link, names, wavelength, spectra, frame).rename("components")


def residuals(link: Link, spectra: xr.Dataset | None = None) -> xr.DataArray:
    """Normalised residuals ``(flux - model) * sqrt(ivar)``; NaN where masked or outside the window."""
    spectra = link.get_spectra(spectra)
    model = link.get_model()
    dim = link.dim
    flux = spectra["flux"]
    wl_dim = next(d for d in flux.dims if d != dim)
    flux = flux.transpose(dim, wl_dim)
    if "ivar" in spectra:
        ivar = spectra["ivar"].transpose(dim, wl_dim)
    elif "flux_err" in spectra:
        err = spectra["flux_err"].transpose(dim, wl_dim)
        ivar = xr.where(np.isfinite(err) & (err > 0), 1.0 / err**2, 0.0)
    else:
        raise InputDataError(
            f"spectra has neither 'ivar' nor 'flux_err' (variables: {sorted(map(str, spectra.data_vars))})."
        )
    if flux.chunks:
        flux = flux.chunk({wl_dim: -1})
    if ivar.chunks:
        ivar = ivar.chunk({wl_dim: -1})
    fitted = model_curve(link, spectra=spectra, frame="observed")
    wl, _, _ = grid(link, None, spectra)
    z = link.frame_redshift(spectra)
    window = model.window

    def block(f, iv, m, w, zz):
        w = np.asarray(w, dtype=np.float64)
        rest = (w if w.ndim == 2 else w[None, :]) / (1.0 + np.asarray(zz, dtype=np.float64))[:, None]
        good = np.isfinite(f) & np.isfinite(iv) & (iv > 0)
        if window is not None:
            good &= (rest >= window[0]) & (rest <= window[1])
        with np.errstate(invalid="ignore"):
            r = (f - m) * np.sqrt(np.where(good, iv, 0.0))
        return np.where(good, r, np.nan)

    out = xr.apply_ufunc(
        block,
        flux,
        ivar,
        fitted,
        wl,
        z,
        input_core_dims=[[wl_dim], [wl_dim], [wl_dim], [wl_dim], []],
        output_core_dims=[[wl_dim]],
        dask="parallelized",
        output_dtypes=[np.float64],
    )
    return out.rename("residuals").assign_attrs(long_name="(data - model) / sigma", units="1")


def _evaluator(model, names: tuple[str, ...] | None):
    """Jitted ``f(rest_wavelength (n, n_pix), params (n, n_params))`` -> model or stacked components."""
    return _EVALUATORS.get_or_build((model.identity(), names), lambda: _build_evaluator(model, names))[0]


def _build_evaluator(model, names: tuple[str, ...] | None):
    import jax
    import jax.numpy as jnp

    from ..config import enable_compilation_cache

    enable_compilation_cache()  # a process that only plots or evaluates (no fit) loads it from disk too

    if names is None:
        one = model.func
    else:
        funcs = [model.components[c] for c in names]

        def one(w, p):
            return jnp.stack([f(w, p) for f in funcs], axis=-1)

    jitted = jax.jit(jax.vmap(one, in_axes=(0, 0)))

    def run(rest, params):
        params = jnp.asarray(params)
        return jitted(jnp.asarray(rest, dtype=params.dtype), params)

    return run
