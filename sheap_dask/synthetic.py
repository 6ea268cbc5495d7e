"""Synthetic quasar spectra with known truth, for tests, the demo and the benchmarks.

:func:`synthetic_spectra` draws physically plausible parameters of a built-in region model
(:func:`sheap_dask.models.region`), evaluates the model on the SDSS pixel grid (uniform in
log10 wavelength with step 1e-4), adds Gaussian noise with a per-spectrum S/N, masks a few
runs of pixels (``ivar = 0``) and blanks a few spectra entirely (all NaN), and returns an
``xarray.Dataset`` in the package's data conventions with the truth alongside.

Truth distributions (H-beta region; the others use the same recipe for their lines):

============================  ===================================================
continuum                     norm at 5100 A log-uniform 5-50; index U(-2.5, -0.5)
broad H-beta                  rest EW U(40, 120) A, split between two Gaussians:
                              core FWHM U(1500, 4000), shift U(-500, 500);
                              wing FWHM U(4500, 10000), shift U(-1500, 1500);
                              core fraction U(0.3, 0.7)
FeII (optical)                R_FeII = F(4434-4684) / F(H-beta broad) U(0.2, 1.0);
                              FWHM U(1500, 5000), shift U(-300, 300)
narrow H-beta                 EW U(1, 5) A, FWHM U(250, 700), shift U(-150, 150)
[OIII] 5007 (4959 = 5007/2.98) EW U(5, 40) A, FWHM U(300, 900), shift U(-300, 100)
HeII 4686                     EW U(1, 6) A, FWHM U(2000, 6000), shift U(-500, 500)
============================  ===================================================

Noise: ``sigma = continuum(5100 A) / snr`` with ``snr`` uniform in the ``snr`` range per
spectrum, constant across the spectrum (``ivar = 1 / sigma^2``).

Host galaxy (``host=True``): the model is ``region(region, host=True)`` and, drawn after
everything above (so the AGN truth is the same as without a host for one seed), the host
fraction at 5100 A ``f`` uniform in ``host_fraction`` (default 0-0.8), split between the
templates with Dirichlet(1, ..., 1) weights, extra stellar dispersion U(0, 200) km/s and
shift U(-100, 100) km/s. The continuum of the noise is then the total (AGN + host) at the
reference wavelength, and the output has ``true_frac_host_5100`` and ``true_frac_host_4200``
(host / (host + AGN continuum), evaluated from the model like
:func:`sheap_dask.derived.host.host_fraction`).
"""

from __future__ import annotations

import numpy as np

from .errors import InputDataError

__all__ = ["synthetic_spectra", "synthetic_spectra_numpy", "sdss_grid"]

_C_KMS = 299792.458


def sdss_grid(low: float = 4400.0, high: float = 5600.0) -> np.ndarray:
    """SDSS pixel grid (vacuum Angstrom) covering ``[low, high]``: log10 step 1e-4, on the
    integer multiples of 1e-4 in log10(lambda) that SDSS uses."""
    start = np.ceil(np.log10(low) / 1e-4 - 1e-9)
    stop = np.floor(np.log10(high) / 1e-4 + 1e-9)
    return 10.0 ** (np.arange(start, stop + 1) * 1e-4)


def _draw_host(model, out: np.ndarray, n: int, rng: np.random.Generator, fraction: tuple[float, float]) -> None:
    """Host weights, dispersion and shift for a drawn AGN truth ``out`` (in place)."""
    pos = {nm: i for i, nm in enumerate(model.param_names)}
    ref = model.metadata["continuum_ref_wavelength"]
    for name in model.metadata.get("host") or []:
        comp = model.component_objects[name]
        tmpl = comp.info["template_obj"]
        agn = out[:, pos["powerlaw_norm"]] * (5100.0 / ref) ** out[:, pos["powerlaw_index"]]
        f = rng.uniform(fraction[0], fraction[1], n)
        total = f / (1.0 - f) * agn  # host flux density at 5100 A (templates are 1 there)
        w = rng.dirichlet(np.ones(tmpl.k), n) * total[:, None]
        for k in range(tmpl.k):
            out[:, pos[f"{name}_w{k + 1}"]] = w[:, k]
        out[:, pos[f"{name}_sigma"]] = rng.uniform(0.0, 200.0, n)
        out[:, pos[f"{name}_shift"]] = rng.uniform(-100.0, 100.0, n)


def _draw_truth(model, region: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Physically plausible parameters (n, n_params) of a region model."""
    names = model.param_names
    pos = {nm: i for i, nm in enumerate(names)}
    out = np.tile(np.asarray(model.params.values, dtype=np.float64), (n, 1))
    meta = model.metadata
    ref = meta["continuum_ref_wavelength"]
    u = rng.uniform

    norm = np.exp(u(np.log(5.0), np.log(50.0), n))
    index = u(-2.5, -0.5, n)
    out[:, pos["powerlaw_norm"]] = norm
    out[:, pos["powerlaw_index"]] = index

    def cont_at(lam):
        return norm * (lam / ref) ** index

    def put(comp, flux, shift, fwhm):
        out[:, pos[f"{comp}_flux"]] = flux
        out[:, pos[f"{comp}_shift"]] = shift
        out[:, pos[f"{comp}_fwhm"]] = fwhm

    lines = meta["lines"]
    broad_line = f"{region}_broad"
    broad_comps = lines[broad_line]["components"]
    rest = lines[broad_line]["rest_wavelength"]
    broad_flux = u(40.0, 120.0, n) * cont_at(rest)
    nb = len(broad_comps)
    if nb == 1:
        put(broad_comps[0], broad_flux, u(-500, 500, n), u(2000, 8000, n))
    else:
        frac = u(0.3, 0.7, n)
        rest_frac = (1 - frac) / (nb - 1)
        put(broad_comps[0], broad_flux * frac, u(-500, 500, n), u(1500, 4000, n))
        for k, comp in enumerate(broad_comps[1:]):
            put(comp, broad_flux * rest_frac, u(-1500, 1500, n), u(4500, 10000, n) * (1 + 0.3 * k))
    if "feii" in meta["components"]:
        band = meta["components"]["feii"]["norm_band"]
        out[:, pos["feii_amplitude"]] = u(0.2, 1.0, n) * broad_flux if region == "hbeta" else u(20.0, 80.0, n) * cont_at(0.5 * sum(band))
        out[:, pos["feii_fwhm"]] = u(1500, 5000, n)
        out[:, pos["feii_shift"]] = u(-300, 300, n)

    narrow_shift = u(-150, 150, n)
    ties = {t: (s, op, v) for t, s, op, v in model.params.ties}
    for line_name, info in lines.items():
        if line_name == broad_line:
            continue
        for comp in info["components"]:
            if f"{comp}_flux" in ties and f"{comp}_fwhm" in ties:
                continue  # fully tied (e.g. [OIII] 4959), filled below
            lam = info["rest_wavelength"]
            if comp.startswith("oiii5007"):
                ew, fwhm, shift = u(5, 40, n), u(300, 900, n), u(-300, 100, n)
            elif info["kind"] == "narrow":
                ew, fwhm, shift = u(1, 5, n), u(250, 700, n), narrow_shift
            else:  # secondary broad lines (HeII, OIII] 1663)
                ew, fwhm, shift = u(1, 6, n), u(2000, 6000, n), u(-500, 500, n)
            out[:, pos[f"{comp}_flux"]] = ew * cont_at(lam)
            if f"{comp}_fwhm" not in ties:
                out[:, pos[f"{comp}_fwhm"]] = fwhm
                out[:, pos[f"{comp}_shift"]] = shift
    for t, (s, op, v) in ties.items():
        src = out[:, pos[s]]
        out[:, pos[t]] = {"*": src * v, "/": src / v, "+": src + v, "-": src - v}[op]
    lo, hi = model.params.lower, model.params.upper
    return np.clip(out, lo, hi)


def _mismatched(model):
    """A model that differs from ``model`` the way real spectra do, with the same parameters:
    broad lines as Lorentzians (extended wings) instead of Gaussians, and an FeII template
    whose multiplet ratios differ (the default template modulated by +-40% over ~300 A)."""
    from . import models
    from .models import feii as feii_module

    parts = []
    for comp in model.component_objects.values():
        if comp.line_kind == "broad" and comp.kind == "gaussian":
            values = {p.name: (p.value, p.min, p.max) for p in comp.params}
            parts.append(models.line(comp.name, comp.rest_wavelength, profile="lorentzian", flux=values["flux"],
                                     shift=values["shift"], fwhm=values["fwhm"], line_name=comp.line, line_kind="broad"))
        elif comp.kind == "feii":
            tmpl = comp.info["template_obj"]
            modulated = tmpl.flux * (1.0 + 0.4 * np.sin(2.0 * np.pi * tmpl.wavelength / 300.0))
            other = feii_module.FeIITemplate.from_arrays(tmpl.wavelength, modulated, name="mismatched", norm_band=tmpl.norm_band)
            values = {p.name: (p.value, p.min, p.max) for p in comp.params}
            parts.append(models.feii_component(comp.name, template=other, amplitude=values["amplitude"], fwhm=values["fwhm"],
                                               shift=values["shift"]))
        else:
            parts.append(comp)
    ties = [p.tie_string for p in model.params if p.tie is not None]
    return models.compose(*parts, ties=ties, name=f"{model.name}_mismatched", window=list(model.windows) or None,
                          metadata={k: v for k, v in model.metadata.items() if k in ("region", "continuum_ref_wavelength", "host")})


def synthetic_spectra_numpy(
    n_spectra: int = 400,
    *,
    region: str = "hbeta",
    seed: int = 0,
    snr: tuple[float, float] = (10.0, 40.0),
    wavelength=None,
    redshift=None,
    masked_fraction: float = 0.3,
    n_all_nan: int | None = None,
    dtype="float32",
    model=None,
    host: bool = False,
    host_fraction: tuple[float, float] = (0.0, 0.8),
    mismatch: bool = False,
) -> dict:
    """Synthetic spectra as plain numpy arrays.

    Same arguments as :func:`synthetic_spectra` (which wraps this). Returns a dict with
    ``wavelength`` (n_pix,), ``flux``, ``ivar`` (n_spectra, n_pix), ``true_params``
    (n_spectra, n_params; NaN for the all-NaN spectra), ``param_names``, ``snr``,
    ``redshift`` (n_spectra,) or None, ``all_nan`` (bool, n_spectra) and ``model``; with
    ``host``, ``true_frac_host_5100`` and ``true_frac_host_4200`` (n_spectra,).
    """
    from . import models

    n = int(n_spectra)
    if n < 1:
        raise InputDataError(f"synthetic_spectra(n_spectra={n_spectra!r}): need at least 1 spectrum.")
    try:
        lo_snr, hi_snr = (float(snr), float(snr)) if np.isscalar(snr) else (float(snr[0]), float(snr[1]))
    except (TypeError, ValueError, IndexError):
        raise InputDataError(f"synthetic_spectra(snr={snr!r}): give a number or a (low, high) range, e.g. (10, 40).") from None
    if not 0 < lo_snr <= hi_snr:
        raise InputDataError(f"synthetic_spectra(snr={snr!r}): need 0 < low <= high.")
    if not 0.0 <= masked_fraction <= 1.0:
        raise InputDataError(f"synthetic_spectra(masked_fraction={masked_fraction!r}): must be within [0, 1].")
    try:
        f_lo, f_hi = (float(host_fraction[0]), float(host_fraction[1]))
    except (TypeError, ValueError, IndexError):
        raise InputDataError(f"synthetic_spectra(host_fraction={host_fraction!r}): give a (low, high) range within [0, 1).") from None
    if not 0.0 <= f_lo <= f_hi < 1.0:
        raise InputDataError(f"synthetic_spectra(host_fraction={host_fraction!r}): need 0 <= low <= high < 1.")
    rng = np.random.default_rng(seed)
    model = model if model is not None else models.region(region, host=bool(host))
    host = bool(model.metadata.get("host"))
    win = model.window

    z = None
    if redshift is not None:
        if np.isscalar(redshift):
            z = np.full(n, float(redshift))
        elif isinstance(redshift, tuple) and len(redshift) == 2:
            z = rng.uniform(float(redshift[0]), float(redshift[1]), n)
        else:
            z = np.asarray(redshift, dtype=np.float64).reshape(-1)
            if z.size != n:
                raise InputDataError(f"synthetic_spectra(redshift=...): {z.size} values for {n} spectra; give one per spectrum.")
        if np.any(~np.isfinite(z)) or np.any(z <= -1):
            raise InputDataError("synthetic_spectra(redshift=...): redshifts must be finite and > -1.")

    if wavelength is None:
        if z is None:
            wl = sdss_grid(*win)
        else:
            wl = sdss_grid(win[0] * (1 + z.min()), win[1] * (1 + z.max()))
    else:
        wl = np.asarray(wavelength, dtype=np.float64)
        if wl.ndim != 1 or wl.size < 10 or np.any(np.diff(wl) <= 0):
            raise InputDataError("synthetic_spectra(wavelength=...): need a 1-D increasing grid of >= 10 Angstrom values.")

    truth = _draw_truth(model, model.metadata.get("region") or region, n, rng)
    if host:
        _draw_host(model, truth, n, rng, (f_lo, f_hi))
    rest = wl[None, :] / (1.0 + z[:, None]) if z is not None else wl
    import jax
    import jax.numpy as jnp

    truth_model = _mismatched(model) if mismatch else model
    # one compiled evaluation for all spectra (eager vmap would dispatch op by op)
    evaluate = jax.jit(jax.vmap(truth_model.func, in_axes=(0 if np.ndim(rest) == 2 else None, 0)))
    clean = np.asarray(evaluate(jnp.asarray(rest), jnp.asarray(truth)), dtype=np.float64)  # rest-frame flux density
    if z is not None:
        clean = clean / (1.0 + z[:, None])  # observed-frame flux density
    level = truth[:, model.params.index("powerlaw_norm")] / (1.0 + (z if z is not None else 0.0))
    frac = {}
    if host:  # noise relative to the total continuum (AGN + host) at the reference wavelength
        ref = model.metadata["continuum_ref_wavelength"]
        parts = model.evaluate_components(np.array([4200.0, 5100.0, ref]), truth)
        agn = sum(parts[c] for c in model.metadata["continuum"] if model.metadata["components"][c]["kind"] != "feii")
        from .derived.host import _host_fn

        hfn = jax.jit(jax.vmap(_host_fn(model, model.metadata["host"]), in_axes=(None, 0)))
        h = np.asarray(hfn(jnp.asarray([4200.0, 5100.0, ref]), jnp.asarray(truth)), dtype=np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            frac = {"true_frac_host_4200": h[:, 0] / (h[:, 0] + agn[:, 0]), "true_frac_host_5100": h[:, 1] / (h[:, 1] + agn[:, 1])}
        level = (agn[:, 2] + h[:, 2]) / (1.0 + (z if z is not None else 0.0))
    s2n = rng.uniform(lo_snr, hi_snr, n)
    sigma = level / s2n
    flux = clean + rng.normal(size=clean.shape) * sigma[:, None]
    ivar = np.broadcast_to((1.0 / sigma**2)[:, None], flux.shape).copy()
    if z is not None:  # observed pixels that fall outside a spectrum's rest window carry no data
        outside = (rest < win[0]) | (rest > win[1])
        ivar[outside] = 0.0
        flux[outside] = 0.0

    # masked pixel runs: 1-3 runs of 3-25 pixels in a fraction of the spectra (bad columns, sky)
    n_pix = wl.size
    masked = rng.random(n) < masked_fraction
    for i in np.nonzero(masked)[0]:
        for _ in range(rng.integers(1, 4)):
            length = int(rng.integers(3, 26))
            start = int(rng.integers(0, max(1, n_pix - length)))
            ivar[i, start : start + length] = 0.0
            if rng.random() < 0.5:
                flux[i, start : start + length] = np.nan  # some masked runs are NaN too
    if n_all_nan is None:
        n_all_nan = max(1, n // 100) if n >= 100 else 0
    n_all_nan = int(n_all_nan)
    if not 0 <= n_all_nan <= n:
        raise InputDataError(f"synthetic_spectra(n_all_nan={n_all_nan}): must be between 0 and n_spectra={n}.")
    all_nan = np.zeros(n, dtype=bool)
    all_nan[rng.choice(n, size=n_all_nan, replace=False)] = True
    flux[all_nan] = np.nan
    ivar[all_nan] = 0.0
    truth = truth.copy()
    truth[all_nan] = np.nan
    for v in frac.values():
        v[all_nan] = np.nan
    if mismatch:  # the generated broad line is not the fitted model's: its true FWHM, measured
        from .derived.lines import fwhm

        broad = f"{model.metadata.get('region') or region}_broad"
        ok = ~all_nan
        true_fwhm = np.full(n, np.nan)
        true_fwhm[ok] = fwhm(truth_model, broad, truth[ok])[0]
        frac["true_fwhm_broad"] = true_fwhm
    return {
        **frac,
        "wavelength": wl,
        "flux": flux.astype(dtype),
        "ivar": ivar.astype(dtype),
        "true_params": truth,
        "param_names": model.param_names,
        "snr": s2n,
        "redshift": z,
        "all_nan": all_nan,
        "model": model,
    }


def synthetic_spectra(
    n_spectra: int = 400,
    *,
    region: str = "hbeta",
    seed: int = 0,
    snr: tuple[float, float] = (10.0, 40.0),
    wavelength=None,
    redshift=None,
    masked_fraction: float = 0.3,
    n_all_nan: int | None = None,
    chunk: int | None = None,
    dtype="float32",
    host: bool = False,
    host_fraction: tuple[float, float] = (0.0, 0.8),
    mismatch: bool = False,
):
    """Synthetic quasar spectra of a built-in region with known truth, as an xarray Dataset.

    Parameters
    ----------
    n_spectra : int
        Number of spectra.
    region : {"hbeta", "halpha", "mgii", "civ"}
        Region model (default parameters: ``sd.models.region(region)``) used to draw and
        evaluate the truth; ``"hbeta"`` is the performance reference problem (20 free
        parameters).
    seed : int
        Random seed; the same seed gives identical output.
    snr : (float, float) or float
        Per-spectrum S/N per pixel at the continuum reference wavelength, drawn uniformly.
    wavelength : array, optional
        Own 1-D wavelength grid (Angstrom). Default: the SDSS grid over the region window
        (H-beta: 4400-5600 A rest frame, 1047 pixels).
    redshift : float, (low, high) or array, optional
        Put the spectra in the observed frame: a ``redshift`` coordinate is added, the grid
        covers every spectrum's window (pixels outside a spectrum's rest window get
        ``ivar = 0``) and fluxes are divided by ``1 + z``.
    masked_fraction : float
        Fraction of spectra with 1-3 masked runs of 3-25 pixels (``ivar = 0``, half of the
        runs with NaN flux).
    n_all_nan : int, optional
        Number of spectra that are entirely NaN (``ivar = 0``); default 1% when
        ``n_spectra >= 100``, else 0. Their ``true_params`` are NaN.
    chunk : int, optional
        Chunk the result along ``spectrum`` (dask).
    dtype : str
        dtype of ``flux`` and ``ivar`` (default float32, as SDSS files).
    host : bool
        Add host-galaxy starlight (the built-in templates; model ``region(region,
        host=True)``), see the module docstring. Default False: the plain quasar spectra.
    host_fraction : (float, float)
        Range of the true host fraction at 5100 A (uniform).
    mismatch : bool
        Draw the spectra from a model the region does not match exactly, as real spectra
        are never matched: broad lines as Lorentzians and an FeII template with other
        multiplet ratios (same parameters; ``true_fwhm_broad`` holds the generated broad
        line's FWHM, measured). For benchmarks on imperfect models.

    Returns
    -------
    xarray.Dataset
        dims ``(spectrum, wavelength)``; ``flux``, ``ivar``; ``true_params`` (spectrum,
        param) float64 with coordinate ``param`` (the model's parameter names); ``snr`` and
        ``all_nan`` (spectrum); coords ``wavelength``, ``spectrum`` (0..n-1) and optionally
        ``redshift``; with ``host``, ``true_frac_host_5100`` and ``true_frac_host_4200``
        (spectrum). ``attrs``: region, seed, host, description.

    Examples
    --------
    >>> import sheap_dask as sd
    >>> ds = sd.synthetic.synthetic_spectra(8, seed=1)
    >>> ds.flux.shape, ds.true_params.sizes["param"]
    ((8, 1047), 23)
    """
    import xarray as xr

    d = synthetic_spectra_numpy(n_spectra, region=region, seed=seed, snr=snr, wavelength=wavelength, redshift=redshift,
                                masked_fraction=masked_fraction, n_all_nan=n_all_nan, dtype=dtype, host=host,
                                host_fraction=host_fraction, mismatch=mismatch)
    n = d["flux"].shape[0]
    coords = {"spectrum": np.arange(n), "wavelength": d["wavelength"], "param": d["param_names"]}
    if d["redshift"] is not None:
        coords["redshift"] = ("spectrum", d["redshift"])
    ds = xr.Dataset(
        {
            "flux": (("spectrum", "wavelength"), d["flux"], {"units": "1e-17 erg/s/cm2/A (nominal)"}),
            "ivar": (("spectrum", "wavelength"), d["ivar"], {"long_name": "inverse variance; 0 masks a pixel"}),
            "true_params": (("spectrum", "param"), d["true_params"], {"long_name": "parameters the spectra were drawn from"}),
            "snr": ("spectrum", d["snr"], {"long_name": "S/N per pixel at the continuum reference wavelength"}),
            "all_nan": ("spectrum", d["all_nan"], {"long_name": "spectrum blanked (all NaN)"}),
            **{k: ("spectrum", d[k], {"long_name": f"true host fraction at {k[-4:]} A: host / (host + AGN continuum)", "units": "1"})
               for k in ("true_frac_host_4200", "true_frac_host_5100") if k in d},
            **({"true_fwhm_broad": ("spectrum", d["true_fwhm_broad"], {"long_name": "FWHM of the generated broad line", "units": "km/s"})}
               if "true_fwhm_broad" in d else {}),
        },
        coords=coords,
        attrs={
            "title": f"sheap_dask synthetic {region} spectra",
            "region": region,
            "seed": int(seed),
            "host": int(bool(host)),
            "mismatch": int(bool(mismatch)),
            "frame": "observed" if d["redshift"] is not None else "rest",
            "description": "sheap_dask.synthetic.synthetic_spectra: model spectra with Gaussian noise, masked runs and all-NaN spectra",
        },
    )
    ds["wavelength"].attrs.update({"units": "Angstrom", "long_name": "vacuum wavelength"})
    if chunk is not None:
        ds = ds.chunk({"spectrum": int(chunk)})
    return ds
