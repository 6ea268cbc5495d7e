"""AGN spectral models: components with named parameters, their composition, built-in regions.

A :class:`Component` is one additive part of a spectrum (a line profile, a continuum, an FeII
template) with a pure ``jax.numpy`` function and the specs of its local parameters.
:func:`compose` adds components into one :class:`~sheap_dask.model.Model` whose parameters are
called ``f"{component}_{quantity}"`` (``hbeta_broad1_fwhm``, ``oiii5007_flux``,
``powerlaw_index``), and :func:`region` builds the standard quasar regions (H-beta, H-alpha,
MgII, CIV) from them.

Units: wavelengths in Angstrom (rest frame, vacuum), line fluxes in the spectrum's flux
density unit times Angstrom, shifts and FWHM in km/s.

Examples
--------
>>> import sheap_dask as sd
>>> m = sd.models.compose(
...     sd.models.powerlaw(ref_wavelength=5100.0),
...     sd.models.line("oiii5007", 5008.24, fwhm=(400.0, 100.0, 1200.0), line_kind="narrow"),
...     sd.models.line("oiii4959", 4960.30, fwhm=(400.0, 100.0, 1200.0), line_kind="narrow"),
...     ties=["oiii4959_flux = oiii5007_flux / 2.98", "oiii4959_shift = oiii5007_shift * 1",
...           "oiii4959_fwhm = oiii5007_fwhm * 1"],
...     name="oiii")
>>> m.param_names[:4]
['powerlaw_norm', 'powerlaw_index', 'oiii5007_flux', 'oiii5007_shift']
>>> m.n_free
5
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ModelError
from . import continuum as _continuum
from . import feii as _feii
from . import host as _host
from . import profiles as _profiles
from .lines import LINES, NII_RATIO, OIII_RATIO, rest_wavelength
from .lines import rest_wavelength as _catalogue_rest

__all__ = [
    "ParamSpec",
    "Component",
    "line",
    "powerlaw",
    "polynomial",
    "balmer_continuum",
    "feii_component",
    "host_component",
    "compose",
    "region",
    "REGIONS",
    "covering_spectra",
    "LINES",
    "OIII_RATIO",
    "NII_RATIO",
    "rest_wavelength",
    "profiles",
    "continuum",
    "feii",
    "host",
]

profiles = _profiles
continuum = _continuum
feii = _feii  # the module (templates); the component factory is feii_component
host = _host  # host-galaxy templates; the component factory is host_component
host_component = _host.host_component


@dataclass(frozen=True)
class ParamSpec:
    """Specification of one local parameter of a component.

    ``name`` is the local quantity (``flux``, ``shift``, ``fwhm``, ``norm``, ...); the model
    parameter is ``f"{component}_{name}"``. ``min``/``max`` ``None`` means unbounded.
    """

    name: str
    value: float
    min: float | None = None
    max: float | None = None
    fixed: bool = False


@dataclass(frozen=True, eq=False)
class Component:
    """One additive model part.

    Attributes
    ----------
    name : str
        Component name, the prefix of its parameters (e.g. ``"hbeta_broad1"``).
    kind : str
        ``"gaussian"``, ``"lorentzian"``, ``"pseudo_voigt"``, ``"skewed_gaussian"`` (line
        profiles, vectorised together by :func:`compose`), ``"powerlaw"``, ``"polynomial"``,
        ``"balmer_continuum"``, ``"feii"`` or any other string for a custom component.
    func : callable
        ``func(wavelength, local_params) -> flux``, pure jnp; ``local_params`` is the vector
        of this component's parameters in the order of ``params``.
    params : tuple of ParamSpec
    line : str, optional
        Name of the physical line this component belongs to (``"hbeta_broad"`` for every
        broad H-beta Gaussian). Line components only.
    rest_wavelength : float, optional
        Rest wavelength of the line (vacuum Angstrom).
    line_kind : {"broad", "narrow"}, optional
    continuum : bool
        True for continuum components (listed in ``model.metadata["continuum"]``; host
        starlight, kind ``"host"``, in ``model.metadata["host"]`` instead).
    info : dict
        Extra JSON-serialisable description (template name, reference wavelength, ...).
    flux_params : tuple of str, optional
        Local parameters proportional to the flux unit (``flux``, ``norm``, ``amplitude``);
        ``None`` for a custom component: :func:`compose` then detects them on the model.
    resting_bounds : tuple of str
        Local parameters whose bounds are stationary points of the component (its derivative
        in the parameter vanishes there whatever the bound map, e.g. a dispersion added in
        quadrature, at 0): LM is not held there by the bound, the value is a result, and
        resting there does not make a spectrum a restart suspect. Listed per component in
        ``model.metadata["components"][name]["resting_bounds"]`` (full names).
    """

    name: str
    kind: str
    func: Callable
    params: tuple[ParamSpec, ...]
    line: str | None = None
    rest_wavelength: float | None = None
    line_kind: str | None = None
    continuum: bool = False
    info: dict = field(default_factory=dict)
    flux_params: tuple[str, ...] | None = None
    resting_bounds: tuple[str, ...] = ()

    @property
    def param_names(self) -> list[str]:
        """Full model parameter names of this component."""
        return [f"{self.name}_{p.name}" for p in self.params]


# -- factories -----------------------------------------------------------------------------
def _spec(name: str, arg, default: tuple) -> ParamSpec:
    """A ParamSpec from a number (value, default bounds) or a (value, min, max[, fixed]) tuple."""
    if isinstance(arg, ParamSpec):
        return ParamSpec(name, arg.value, arg.min, arg.max, arg.fixed)
    if arg is None:
        arg = default
    if isinstance(arg, (int, float, np.floating, np.integer)):
        return ParamSpec(name, float(arg), default[1], default[2])
    try:
        items = tuple(arg)
    except TypeError:
        raise ModelError(f"parameter {name!r}: {arg!r} must be a number or (value, min, max[, fixed]).") from None
    if len(items) not in (3, 4):
        raise ModelError(f"parameter {name!r}: {arg!r} must be a number or (value, min, max[, fixed]).")
    return ParamSpec(name, float(items[0]), items[1], items[2], bool(items[3]) if len(items) == 4 else False)


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not name.isidentifier():
        raise ModelError(f"component name {name!r} must be an identifier such as 'hbeta_broad1'.")
    return name


def line(
    name: str,
    rest_wavelength: float | str,
    *,
    profile: str = "gaussian",
    flux=(1.0, 0.0, None),
    shift=(0.0, -3000.0, 3000.0),
    fwhm=(3000.0, 1000.0, 20000.0),
    eta=(0.5, 0.0, 1.0),
    skew=(0.0, -10.0, 10.0),
    line_name: str | None = None,
    line_kind: str | None = None,
) -> Component:
    """An emission-line component with parameters ``flux``, ``shift``, ``fwhm`` (+ shape).

    Parameters
    ----------
    name : str
        Component name (parameter prefix).
    rest_wavelength : float or str
        Vacuum rest wavelength (Angstrom) or a key of :data:`LINES`.
    profile : {"gaussian", "lorentzian", "pseudo_voigt", "skewed_gaussian"}
    flux, shift, fwhm, eta, skew : float or (value, min, max[, fixed])
        Initial value and bounds of each parameter (a bare number keeps the default
        bounds). ``eta`` only for pseudo-Voigt, ``skew`` only for the skewed Gaussian.
    line_name : str, optional
        Physical line it belongs to (default ``name``); components with the same line name
        are one line in ``model.metadata["lines"]``.
    line_kind : {"broad", "narrow"}, optional
        Default: "narrow" if the FWHM upper bound is <= 2000 km/s, else "broad".
    """
    _check_name(name)
    if profile not in _profiles.PROFILES:
        raise ModelError(f"line {name!r}: profile={profile!r} unknown; use one of {sorted(_profiles.PROFILES)}.")
    rest = _catalogue_rest(rest_wavelength) if isinstance(rest_wavelength, str) else float(rest_wavelength)
    if not rest > 0:
        raise ModelError(f"line {name!r}: rest_wavelength={rest_wavelength!r} must be > 0 Angstrom.")
    fn, extras = _profiles.PROFILES[profile]
    specs = [_spec("flux", flux, (1.0, 0.0, None)), _spec("shift", shift, (0.0, -3000.0, 3000.0)),
             _spec("fwhm", fwhm, (3000.0, 1000.0, 20000.0))]
    if "eta" in extras:
        specs.append(_spec("eta", eta, (0.5, 0.0, 1.0)))
    if "skew" in extras:
        specs.append(_spec("skew", skew, (0.0, -10.0, 10.0)))
    if line_kind is None:
        hi = specs[2].max
        line_kind = "narrow" if hi is not None and hi <= 2000.0 else "broad"
    if line_kind not in ("broad", "narrow"):
        raise ModelError(f"line {name!r}: line_kind={line_kind!r} must be 'broad' or 'narrow'.")

    def func(wavelength, p, _fn=fn, _rest=rest):
        return _fn(wavelength, *[p[i] for i in range(p.shape[-1])], _rest)

    return Component(name, profile, func, tuple(specs), line=line_name or name, rest_wavelength=rest,
                     line_kind=line_kind, info={"profile": profile}, flux_params=("flux",))


def powerlaw(name: str = "powerlaw", *, ref_wavelength: float = 5100.0, norm=(1.0, 0.0, None), index=(-1.5, -6.0, 4.0)) -> Component:
    """Power-law continuum ``norm * (wavelength / ref_wavelength) ** index``.

    ``norm`` is the flux density at ``ref_wavelength`` (>= 0), ``index`` the slope
    alpha_lambda (default bounds -6..4; quasars typically -1.5 in F_lambda).
    """
    _check_name(name)
    ref = float(ref_wavelength)

    def func(wavelength, p, _ref=ref):
        return _continuum.powerlaw(wavelength, p[0], p[1], _ref)

    return Component(name, "powerlaw", func, (_spec("norm", norm, (1.0, 0.0, None)), _spec("index", index, (-1.5, -6.0, 4.0))),
                     continuum=True, info={"ref_wavelength": ref}, flux_params=("norm",))


def polynomial(name: str = "poly", *, degree: int = 1, ref_wavelength: float = 5100.0, coeffs: Sequence | None = None) -> Component:
    """Polynomial continuum ``sum_i c_i t^i``, ``t = wavelength / ref_wavelength - 1``.

    Parameters ``c0 ... c{degree}``, unbounded; ``coeffs`` gives initial values (default
    ``[1, 0, ...]``).
    """
    _check_name(name)
    degree = int(degree)
    if degree < 0 or degree > 10:
        raise ModelError(f"polynomial {name!r}: degree={degree} must be in 0..10.")
    coeffs = list(coeffs) if coeffs is not None else [1.0] + [0.0] * degree
    if len(coeffs) != degree + 1:
        raise ModelError(f"polynomial {name!r}: coeffs has {len(coeffs)} values, degree {degree} needs {degree + 1}.")
    ref = float(ref_wavelength)

    def func(wavelength, p, _ref=ref, _n=degree + 1):
        return _continuum.polynomial(wavelength, [p[i] for i in range(_n)], _ref)

    specs = tuple(ParamSpec(f"c{i}", float(c)) for i, c in enumerate(coeffs))
    return Component(name, "polynomial", func, specs, continuum=True, info={"ref_wavelength": ref, "degree": degree},
                     flux_params=tuple(s.name for s in specs))


def balmer_continuum(
    name: str = "balmer",
    *,
    amplitude=(1.0, 0.0, None),
    temperature=(15000.0, 5000.0, 50000.0, True),
    tau=(1.0, 0.01, 10.0, True),
) -> Component:
    """Balmer pseudo-continuum (Grandi 1982; Dietrich et al. 2002), see :func:`continuum.balmer_continuum`.

    Parameters ``amplitude`` (flux density at the 3646 A edge), ``temperature`` (K) and
    ``tau`` (optical depth at the edge); the last two fixed by default (15000 K, 1).
    """
    _check_name(name)

    def func(wavelength, p):
        return _continuum.balmer_continuum(wavelength, p[0], p[1], p[2])

    specs = (_spec("amplitude", amplitude, (1.0, 0.0, None)), _spec("temperature", temperature, (15000.0, 5000.0, 50000.0)),
             _spec("tau", tau, (1.0, 0.01, 10.0)))
    return Component(name, "balmer_continuum", func, specs, continuum=True, flux_params=("amplitude",))


def feii_component(
    name: str = "feii",
    *,
    template="optical",
    window: tuple[float, float] | None = None,
    norm_band: tuple[float, float] | None = None,
    amplitude=(1.0, 0.0, None),
    fwhm=(3000.0, 1000.0, 10000.0),
    shift=(0.0, -3000.0, 3000.0),
) -> Component:
    """FeII pseudo-continuum: a template broadened by a Gaussian in velocity.

    Parameters
    ----------
    template : {"optical", "uv"}, (wavelength, flux) arrays, path, or FeIITemplate
        See :func:`sheap_dask.models.feii.load_template`; the defaults are built from the
        line lists documented in :mod:`sheap_dask.models.feii`.
    window : (float, float), optional
        Wavelength range the model is evaluated on; restricts the template grid (faster).
    norm_band : (float, float), optional
        For user templates: band whose integrated flux ``amplitude`` is.
    amplitude, fwhm, shift : float or (value, min, max[, fixed])
        ``amplitude`` is the integrated FeII flux in the template's normalisation band;
        FWHM bounds 1000-10000 km/s by default (the FFT padding assumes FWHM <= 10000 and
        |shift| <= 3000 km/s).
    """
    _check_name(name)
    tmpl = _feii.load_template(template, norm_band=norm_band)
    if window is not None:
        tmpl = tmpl.restricted(float(window[0]), float(window[1]))

    def func(wavelength, p, _t=tmpl):
        return _t.evaluate(wavelength, p[0], p[1], p[2])

    specs = (_spec("amplitude", amplitude, (1.0, 0.0, None)), _spec("fwhm", fwhm, (3000.0, 1000.0, 10000.0)),
             _spec("shift", shift, (0.0, -3000.0, 3000.0)))
    for s, cap in ((specs[1], 10000.0), (specs[2], 3000.0)):
        bound = max(abs(s.min if s.min is not None else math.inf), abs(s.max if s.max is not None else math.inf))
        if bound > cap:
            raise ModelError(
                f"feii {name!r}: {s.name} bounds ({s.min}, {s.max}) exceed +-{cap:g} km/s, beyond which the "
                "template's FFT padding would wrap flux around; narrow the bounds."
            )
    return Component(name, "feii", func, specs, continuum=True,
                     info={"template": tmpl.name, "norm_band": list(tmpl.norm_band), "template_obj": tmpl}, flux_params=("amplitude",))


# -- composition ---------------------------------------------------------------------------
def compose(
    *components: Component,
    ties: Sequence[str | tuple] = (),
    name: str = "model",
    window: tuple[float, float] | None = None,
    initializer: Callable | None = None,
    metadata: dict[str, Any] | None = None,
    description: str | None = None,
):
    """Add components into one :class:`~sheap_dask.model.Model`.

    Parameters
    ----------
    *components : Component
        Their parameters are added in order as ``f"{component.name}_{local}"``.
    ties : sequence of str or tuple
        Ties in :meth:`Parameters.tie` form, e.g. ``"oiii4959_flux = oiii5007_flux / 2.98"``.
    name : str
        Model name.
    window : (float, float), optional
        Rest-frame range fitted (pixels outside get zero weight).
    initializer : callable, optional
        Data-driven initial values, see :class:`~sheap_dask.model.Model`.
    metadata : dict, optional
        Merged into the generated metadata.
    description : str, optional

    Returns
    -------
    Model
        ``model.func`` evaluates every line profile of a kind in one broadcast expression over
        ``(n_lines, n_pix)``; ``model.components`` maps component name -> ``f(wavelength,
        phys_params)``; ``model.metadata`` has ``"lines"`` (line name -> rest wavelength,
        component names, kind), ``"continuum"`` (component names) and ``"components"``
        (component name -> kind, parameter names, line).
    """
    from ..model import Model
    from ..parameters import Parameters

    if not components:
        raise ModelError("compose() needs at least one component.")
    seen: set[str] = set()
    for c in components:
        if not isinstance(c, Component):
            raise ModelError(f"compose(): {c!r} is not a Component; build one with sd.models.line/powerlaw/feii_component/...")
        if c.name in seen:
            raise ModelError(f"compose(): duplicate component name {c.name!r}; every component needs a unique name.")
        seen.add(c.name)

    params = Parameters()
    for c in components:
        for s in c.params:
            params.add(f"{c.name}_{s.name}", s.value, min=s.min, max=s.max, fixed=s.fixed)
    for t in ties:
        params.tie(t)
    pos = {n: i for i, n in enumerate(params.names)}
    comp_idx = {c.name: np.array([pos[n] for n in c.param_names], dtype=np.int32) for c in components}

    # Group line profiles by kind: one broadcast (n_lines, n_pix) evaluation per kind.
    groups: dict[str, dict[str, Any]] = {}
    others: list[tuple[Callable, np.ndarray]] = []
    for c in components:
        if c.kind in _profiles.PROFILES and c.rest_wavelength is not None:
            g = groups.setdefault(c.kind, {"idx": [], "rest": []})
            g["idx"].append(comp_idx[c.name])
            g["rest"].append(c.rest_wavelength)
        else:
            others.append((c.func, comp_idx[c.name]))
    group_list = [
        (_profiles.PROFILES[kind][0], np.stack(g["idx"], axis=1), np.asarray(g["rest"], dtype=np.float64)[:, None])
        for kind, g in groups.items()
    ]

    def model_func(wavelength, p):
        import jax.numpy as jnp

        wavelength = jnp.asarray(wavelength)
        total = jnp.zeros(wavelength.shape, jnp.result_type(wavelength, p, float))
        for fn, idx, rest in group_list:
            # idx: (n_local, n_lines); each row gathers one local parameter for all lines
            if fn is _profiles.gaussian and wavelength.ndim == 1:
                # analytic-JVP sum: cheap forward-mode Jacobians inside the solvers
                total = total + _profiles.gaussian_sum(wavelength, *[p[row] for row in idx], rest[:, 0])
                continue
            local = [p[row][:, None] for row in idx]
            total = total + jnp.sum(fn(wavelength[None, :], *local, rest.astype(total.dtype)), axis=0)
        for fn, idx in others:
            total = total + fn(wavelength, p[idx])
        return total

    model_func.__name__ = name
    comp_funcs = {c.name: _component_eval(c.func, comp_idx[c.name]) for c in components}

    lines_meta: dict[str, dict] = {}
    for c in components:
        if c.line is None:
            continue
        entry = lines_meta.setdefault(c.line, {"rest_wavelength": c.rest_wavelength, "components": [], "kind": c.line_kind})
        entry["components"].append(c.name)
    meta = {
        "param_units": {f"{c.name}_{sp.name}": _unit_template(c.kind, sp.name) for c in components for sp in c.params},
        "lines": lines_meta,
        # host starlight is continuum for the fit (and its continuum stage) but not AGN light:
        # luminosities and EWs default to metadata["continuum"], so it is listed apart
        "continuum": [c.name for c in components if c.continuum and c.kind != "host"],
        "host": [c.name for c in components if c.kind == "host"],
        "components": {
            c.name: {"kind": c.kind, "params": c.param_names, "line": c.line,
                     **({"resting_bounds": [f"{c.name}_{p}" for p in c.resting_bounds]} if c.resting_bounds else {}),
                     **{k: v for k, v in c.info.items() if k != "template_obj"}}
            for c in components
        },
        "region": None,
        "continuum_ref_wavelength": next((c.info["ref_wavelength"] for c in components if c.kind == "powerlaw"), None),
    }
    meta.update(metadata or {})
    # Built-in components declare their flux parameters and index their own slices of the
    # parameter vector: the model needs no evaluation check. A custom one is checked.
    declared = all(c.flux_params is not None for c in components)
    flux_params = [f"{c.name}_{p}" for c in components for p in (c.flux_params or ())] if declared else None
    model = Model(model_func, params, name=name, window=window, initializer=initializer, components=comp_funcs,
                  metadata=meta, description=description, flux_params=flux_params, check=not declared)
    model.component_objects = {c.name: c for c in components}
    return model


# Units of the built-in components' parameters; "{flux}" stands for the input's flux unit.
_UNITS = {"flux": "{flux} Angstrom", "shift": "km/s", "fwhm": "km/s", "sigma": "km/s", "eta": "1", "skew": "1", "norm": "{flux}",
          "index": "1", "temperature": "K", "tau": "1"}


def _unit_template(kind: str, local: str) -> str:
    if local == "amplitude":  # FeII: integrated flux in its band; Balmer: flux density at the edge
        return "{flux} Angstrom" if kind == "feii" else "{flux}"
    if kind == "polynomial" or (kind == "host" and local[:1] == "w"):
        return "{flux}"  # host weights: flux density at 5100 A
    return _UNITS.get(local, "")


def _component_eval(fn: Callable, idx: np.ndarray) -> Callable:
    def evaluate(wavelength, p):
        import jax.numpy as jnp

        return fn(jnp.asarray(wavelength), jnp.asarray(p)[..., idx])

    return evaluate


from .regions import REGIONS, covering_spectra, region  # noqa: E402  (regions builds on the factories above)
