"""Built-in quasar regions (H-beta, H-alpha, MgII, CIV) and their data-driven initial values.

``region(name, ...)`` returns an :class:`~sheap_dask.model.Model` built with
:func:`sheap_dask.models.compose`. Default bounds (documented in the README, section
``models``):

=================  ======================  ==========================================
quantity           bounds                  why
=================  ======================  ==========================================
broad FWHM         1000 - 20000 km/s       broad-line region widths (narrow-line
                                           Seyfert 1s start near 1000-2000 km/s)
broad shift        +-3000 km/s             (CIV: +-5000, its blueshifts reach that)
narrow FWHM        100 - 1200 km/s         narrow-line region; 100 ~ SDSS resolution
narrow shift       +-1000 km/s
[OIII] wing        FWHM 500 - 2500 km/s,   outflow wings (``oiii_wing=True``): broader
                   shift -2000 .. +500     than the core and mostly blueshifted
FeII FWHM / shift  1000 - 10000 / +-3000   FeII is emitted in the broad-line region
fluxes, norm       >= 0
power-law index    -6 .. 4                 alpha_lambda, quasars ~ -1.5
=================  ======================  ==========================================

The initializer works on a block of spectra at once (no Python loop over spectra), see
:func:`make_initializer`.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .._version import __version__
from ..errors import ModelError
from .lines import LINES, NII_RATIO, OI_RATIO, OIII_RATIO
from .profiles import C_KMS

__all__ = ["region", "REGIONS", "RegionSpec", "make_initializer", "covering_spectra", "AUTO_HOST_MIN_WAVELENGTH", "host_default"]

BROAD_FWHM = (1000.0, 20000.0)
NARROW_FWHM = (100.0, 1200.0)
BROAD_SHIFT = 3000.0
NARROW_SHIFT = 1000.0
WING_FWHM = (500.0, 2500.0)
WING_SHIFT = (-2000.0, 500.0)
#: HeII 4686's FWHM cap (km/s): wider, the line fills the gap between H-beta's blue continuum
#: window (<= 4640 A) and H-beta and cannot be told from the continuum and H-beta's wing
HEII4686_FWHM_MAX = 10000.0
#: ``host="auto"`` puts the host galaxy in regions whose window starts at or redward of this
#: rest wavelength (A): there the stellar features (4000 A break, H-beta, Mg b, Fe, Na D
#: absorption) fall and the starlight of low-luminosity quasars is a large part of the
#: continuum (H-beta, H-alpha); blueward of it (MgII, CIV) a quasar's host is negligible.
AUTO_HOST_MIN_WAVELENGTH = 3500.0
#: ``continuum="refined"``: Gauss-Newton steps of the continuum over the whole window after the
#: staged fit (on the synthetic host benchmark two reach what a converged whole-window refit of
#: the continuum reaches; a third changed nothing)
REFINE_STEPS = 2
#: ``continuum="refined"``: then Gauss-Newton steps of the continuum and the detected lines
#: together (``ContinuumStage(joint_steps=...)``). On the synthetic host benchmark, 3600 spectra:
#: host fraction within 0.1 89.1% -> 90.6%, the cost 1.07x -> 1.21x; eight steps 90.6% at 1.30x,
#: six with the Jacobian recomputed after three 90.9% at 1.40x
JOINT_STEPS = 4


@dataclass(frozen=True)
class RegionSpec:
    """Description of a built-in region (see :data:`REGIONS`)."""

    name: str
    window: tuple[float, float]
    ref_wavelength: float
    continuum_windows: tuple[tuple[float, float], ...]  # line-free: the continuum stage fits these
    anchor: str | None  # narrow component whose peak gives the narrow-line shift
    build: Callable
    description: str
    line_windows: tuple[tuple[float, float], ...] = ()  # must be covered for a fit (coverage.line)
    main_lines: tuple[str, ...] = ()  # lines whose non-detection sets a quality bit


def _broad_widths(n_broad: int) -> list[float]:
    # geometric spread from a core to a wing component, e.g. 2500 and 7000 km/s for two
    if n_broad == 1:
        return [4000.0]
    return list(np.geomspace(2500.0, 7000.0 if n_broad == 2 else 9000.0, n_broad).round(0))


def _broad(prefix: str, rest: float, n_broad: int, shift_bound: float = BROAD_SHIFT):
    from . import line

    if n_broad == 1:
        names = [f"{prefix}_broad"]
    else:
        names = [f"{prefix}_broad{k + 1}" for k in range(n_broad)]
    return [
        line(n, rest, fwhm=(w, *BROAD_FWHM), shift=(0.0, -shift_bound, shift_bound), line_name=f"{prefix}_broad", line_kind="broad")
        for n, w in zip(names, _broad_widths(n_broad))
    ]


def _narrow(name: str, rest: float, line_name: str | None = None):
    from . import line

    return line(name, rest, fwhm=(400.0, *NARROW_FWHM), shift=(0.0, -NARROW_SHIFT, NARROW_SHIFT), line_name=line_name or name,
                line_kind="narrow")


def _same_kinematics(target: str, source: str) -> list[str]:
    return [f"{target}_shift = {source}_shift * 1", f"{target}_fwhm = {source}_fwhm * 1"]


def _build_hbeta(spec, n_broad, feii, share_narrow, balmer, feii_template, window, oiii_wing=False):
    from . import feii_component as feii_c
    from . import line, powerlaw

    comps = [powerlaw(ref_wavelength=spec.ref_wavelength)]
    if feii:
        comps.append(feii_c(template=feii_template or "optical", window=window))
    comps += _broad("hbeta", LINES["hbeta"], n_broad)
    comps += [
        _narrow("hbeta_narrow", LINES["hbeta"]),
        _narrow("oiii5007", LINES["oiii5007"]),
        _narrow("oiii4959", LINES["oiii4959"]),
        # HeII 4686 in quasars is mostly broad (BLR); own kinematics, width capped
        line("heii4686", LINES["heii4686"], fwhm=(3000.0, BROAD_FWHM[0], HEII4686_FWHM_MAX), shift=(0.0, -BROAD_SHIFT, BROAD_SHIFT), line_kind="broad"),
    ]
    ties = [f"oiii4959_flux = oiii5007_flux / {OIII_RATIO}", *_same_kinematics("oiii4959", "oiii5007")]
    if share_narrow:
        ties += _same_kinematics("hbeta_narrow", "oiii5007")
    if oiii_wing:
        # Outflow wing of the doublet: one more Gaussian per line, part of the same line (so
        # flux("oiii5007") is core + wing), same 2.98 ratio and shared wing kinematics.
        for nm in ("oiii5007", "oiii4959"):
            comps.append(line(f"{nm}_wing", LINES[nm], fwhm=(1200.0, *WING_FWHM), shift=(-300.0, *WING_SHIFT),
                              line_name=nm, line_kind="narrow"))
        ties += [f"oiii4959_wing_flux = oiii5007_wing_flux / {OIII_RATIO}", *_same_kinematics("oiii4959_wing", "oiii5007_wing")]
    return comps, ties


def _build_halpha(spec, n_broad, feii, share_narrow, balmer, feii_template, window, oiii_wing=False):
    from . import powerlaw

    comps = [powerlaw(ref_wavelength=spec.ref_wavelength)]
    comps += _broad("halpha", LINES["halpha"], n_broad)
    comps += [_narrow("halpha_narrow", LINES["halpha"]), _narrow("nii6584", LINES["nii6584"]), _narrow("nii6548", LINES["nii6548"]),
              _narrow("sii6717", LINES["sii6717"]), _narrow("sii6731", LINES["sii6731"])]
    if window[0] <= LINES["oi6300"] and LINES["oi6364"] <= window[1]:
        comps += [_narrow("oi6300", LINES["oi6300"]), _narrow("oi6364", LINES["oi6364"])]
    names = {c.name for c in comps}
    ties = [f"nii6548_flux = nii6584_flux / {NII_RATIO}"]
    if "oi6300" in names:
        ties.append(f"oi6364_flux = oi6300_flux / {OI_RATIO}")
    if share_narrow:
        for n in ("nii6584", "nii6548", "sii6717", "sii6731", "oi6300", "oi6364"):
            if n in names:
                ties += _same_kinematics(n, "halpha_narrow")
    else:  # doublets still share kinematics
        ties += _same_kinematics("nii6548", "nii6584") + _same_kinematics("sii6731", "sii6717")
        if "oi6300" in names:
            ties += _same_kinematics("oi6364", "oi6300")
    return comps, ties


def _build_mgii(spec, n_broad, feii, share_narrow, balmer, feii_template, window, oiii_wing=False):
    from . import balmer_continuum, powerlaw
    from . import feii_component as feii_c

    comps = [powerlaw(ref_wavelength=spec.ref_wavelength)]
    if balmer:
        comps.append(balmer_continuum())
    if feii:
        comps.append(feii_c(template=feii_template or "uv", window=window))
    comps += _broad("mgii", LINES["mgii"], n_broad)
    comps.append(_narrow("mgii_narrow", LINES["mgii"]))
    return comps, []


def _build_civ(spec, n_broad, feii, share_narrow, balmer, feii_template, window, oiii_wing=False):
    from . import line, powerlaw

    comps = [powerlaw(ref_wavelength=spec.ref_wavelength)]
    comps += _broad("civ", LINES["civ"], n_broad, shift_bound=5000.0)
    comps += [
        line("heii1640", LINES["heii1640"], fwhm=(3000.0, *BROAD_FWHM), shift=(0.0, -BROAD_SHIFT, BROAD_SHIFT), line_kind="broad"),
        line("oiii1663", LINES["oiii1663"], fwhm=(3000.0, *BROAD_FWHM), shift=(0.0, -BROAD_SHIFT, BROAD_SHIFT), line_kind="broad"),
    ]
    return comps, []


#: name -> RegionSpec of the built-in regions. Line-free continuum windows as in Shen et al.
#: (2011, ApJS 194, 45, sect. 3) and Wu & Shen (2022, ApJS 263, 42), used by PyQSOFit and the
#: DR7/DR16Q catalogues. H-beta's blue window stops at 4640 A, PyQSOFit's default: HeII 4686
#: and the blue wing of broad H-beta reach 4640-4700 A, and a continuum fitted there absorbs
#: them (on synthetic spectra the power law and FeII came out 3-4 sigma off their truth).
REGIONS: dict[str, RegionSpec] = {
    "hbeta": RegionSpec("hbeta", (4400.0, 5600.0), 5100.0, ((4435.0, 4640.0), (5100.0, 5535.0)), "oiii5007",
                        _build_hbeta, "H-beta region: power law, optical FeII, broad+narrow H-beta, [OIII] 4959/5007, HeII 4686",
                        line_windows=((4780.0, 5030.0),), main_lines=("hbeta_broad", "oiii5007")),
    "halpha": RegionSpec("halpha", (6000.0, 7000.0), 6500.0, ((6000.0, 6250.0), (6800.0, 7000.0)), "halpha_narrow",
                         _build_halpha,
                         "H-alpha region: power law, broad+narrow H-alpha, [NII] 6548/6584, [SII] 6717/6731, [OI] 6300/6364",
                         line_windows=((6450.0, 6650.0),), main_lines=("halpha_broad", "halpha_narrow")),
    "mgii": RegionSpec("mgii", (2200.0, 3090.0), 3000.0, ((2200.0, 2700.0), (2900.0, 3090.0)), "mgii_narrow",
                       _build_mgii, "MgII region: power law, UV FeII, broad+narrow MgII",
                       line_windows=((2750.0, 2850.0),), main_lines=("mgii_broad",)),
    "civ": RegionSpec("civ", (1445.0, 1705.0), 1450.0, ((1445.0, 1465.0), (1700.0, 1705.0)), None,
                      _build_civ, "CIV region: power law, broad CIV, HeII 1640, OIII] 1663",
                      line_windows=((1500.0, 1600.0),), main_lines=("civ_broad",)),
}


def region(
    name: str,
    *,
    n_broad: int = 2,
    feii: bool = True,
    window: tuple[float, float] | None = None,
    share_narrow: bool | None = None,
    balmer: bool = False,
    feii_template=None,
    oiii_wing: bool = False,
    continuum: str | None = None,
    host: bool | str = "auto",
    host_template=None,
):
    """A built-in quasar region model.

    Parameters
    ----------
    name : {"hbeta", "halpha", "mgii", "civ"}
    n_broad : int
        Number of Gaussians of the broad line (1-4). With one, the component is called
        ``{line}_broad``; with more, ``{line}_broad1``, ``{line}_broad2``, ...; they form the
        one line ``{line}_broad`` in ``model.metadata["lines"]``.
    feii : bool
        Include the FeII template (optical for hbeta, UV for mgii; ignored elsewhere).
    window : (float, float), optional
        Rest-frame range fitted; default the region's (hbeta 4400-5600, halpha 6200-6900,
        mgii 2700-2950, civ 1450-1700 A).
    share_narrow : bool, optional
        Tie the kinematics (shift, FWHM) of the narrow lines to one line. Default: True
        for halpha (all narrow lines follow narrow H-alpha) and False for hbeta, where
        [OIII] (often blueshifted and broadened by outflows) keeps its own kinematics
        apart from narrow H-beta; the [OIII] doublet always shares them.
    balmer : bool
        Add a Balmer continuum (mgii only; amplitude free, T_e and tau fixed).
    feii_template : optional
        Own FeII template: (wavelength, flux) arrays or a file path (see
        :func:`sheap_dask.models.feii.load_template`).
    oiii_wing : bool
        hbeta only: add a second Gaussian to each [OIII] line for the blueshifted outflow
        wing common in quasars (``oiii5007_wing``, ``oiii4959_wing``: FWHM 500-2500 km/s,
        shift -2000..+500 km/s; 4959 wing = 5007 wing / 2.98 with the same kinematics; +3
        free parameters). The wing belongs to the line: ``fits.sheap.flux("oiii5007")`` is
        core + wing. Without it a strong wing leaves a residual of many sigma on the blue
        side of both [OIII] lines (e.g. SDSS spec-0280-51612-0117).

    continuum : {"windows", "refined", "joint"}, optional
        Default ``"refined"`` with a host, ``"windows"`` without.
        ``"windows"``: the continuum (power law, FeII, Balmer continuum) is fitted
        first on the region's line-free windows, then the lines on top of it (Shen et al.
        2011; Wu & Shen 2022): a broad Gaussian cannot trade flux with a power law fitted
        on a short window. ``"refined"``: the same, then the continuum alone refined over the
        whole window on the spectrum minus the lines found (:data:`REFINE_STEPS` projected
        Gauss-Newton steps, lines held, each kept only where it lowers the objective; the
        errors stay the staged fit's): with a host, the window between the line-free ones
        constrains the starlight/power-law split the windows leave loose; then
        :data:`JOINT_STEPS` such steps of the continuum and the detected lines together (lines
        the staged fit did not detect held). ``"joint"``: everything in one fit over the window.
    host : {"auto", True, False}
        Host-galaxy starlight (:func:`sheap_dask.models.host_component`: non-negative
        weights of galaxy templates, a stellar dispersion and shift; parameters
        ``host_w1..host_wK``, ``host_sigma``, ``host_shift``). ``"auto"`` (default): on for
        regions whose window starts at >= :data:`AUTO_HOST_MIN_WAVELENGTH` (3500 A; hbeta and
        halpha) and, for a built-in set, lies within its templates (:func:`host_default`), off
        for mgii and civ; the non-negative weights then decide per spectrum how much
        starlight there is (zero for a luminous quasar). The host is part of the
        continuum stage: its weights are fitted on the line-free windows with the power law
        and FeII and held fixed while the lines are fitted, so it cannot absorb broad-line
        flux; then (``continuum="refined"``, the default with a host) the continuum is
        refined over the whole window with the lines held; its shape is fixed by the
        templates (stellar absorption, no emission).
    host_template : optional
        Own host templates: ``(wavelength, flux)`` arrays (flux (n,) or (K, n)), a file path
        or a :class:`~sheap_dask.models.host.HostTemplate`, or a built-in set by name
        (default ``"sdss+ssp"``: the three SDSS galaxies and the 3 and 14 Gyr solar MaStar
        populations, 3700-8050 A; ``"sdss"``: the three galaxies alone, 3400-8050 A;
        ``"mastar"``: six MaStar stellar populations, 3700-8050 A).

    Returns
    -------
    Model
        With ``metadata["region"]``, the line catalogue, a data-driven ``initializer`` and
        ``metadata["region_spec"]`` = ``{"name": name, "kwargs": {...}}``, the JSON-serializable
        arguments that rebuild it (``fit_dataset`` stores it as ``attrs["sheap_region"]``);
        omitted when ``feii_template`` is given as arrays.
        ``region("hbeta", host=False)`` has 20 free parameters: powerlaw norm, index (2); feii
        amplitude, fwhm, shift (3); hbeta_broad1/2 flux, shift, fwhm (6); hbeta_narrow flux,
        shift, fwhm (3); oiii5007 flux, shift, fwhm (3; oiii4959 tied: flux = 5007/2.98,
        same shift and fwhm); heii4686 flux, shift, fwhm (3). The default (``host="auto"``)
        adds the host's 3 template weights, dispersion and shift (25).

    Examples
    --------
    >>> import sheap_dask as sd
    >>> m = sd.models.region("hbeta")
    >>> m.n_free, m.window
    (25, (4400.0, 5600.0))
    >>> sd.models.region("hbeta", host=False).n_free
    20
    """
    from . import compose

    if name not in REGIONS:
        raise ModelError(f"region {name!r} unknown; choose one of {sorted(REGIONS)}.")
    if not isinstance(n_broad, (int, np.integer)) or not 1 <= n_broad <= 4:
        raise ModelError(f"region({name!r}, n_broad={n_broad!r}): n_broad must be an integer from 1 to 4.")
    if balmer and name != "mgii":
        raise ModelError(f"region({name!r}, balmer=True): the Balmer continuum (< 3646 A) only applies to the 'mgii' region.")
    if oiii_wing and name != "hbeta":
        raise ModelError(f"region({name!r}, oiii_wing=True): the [OIII] 4959/5007 wing only applies to the 'hbeta' region.")
    spec = REGIONS[name]
    win = spec.window if window is None else (float(window[0]), float(window[1]))
    if not win[0] < win[1]:
        raise ModelError(f"region({name!r}, window={window!r}): window must be (low, high) in Angstrom with low < high.")
    with_host = host_default(win, host_template) if isinstance(host, str) and host == "auto" else host
    if not isinstance(with_host, (bool, np.bool_)):
        raise ModelError(f"region({name!r}, host={host!r}): choose True, False or 'auto' (on for windows from "
                         f"{AUTO_HOST_MIN_WAVELENGTH:g} A redward).")
    with_host = bool(with_host)
    if continuum is None:
        continuum = "refined" if with_host else "windows"
    if continuum not in ("windows", "refined", "joint"):
        raise ModelError(f"region({name!r}, continuum={continuum!r}): choose 'windows' (continuum on line-free windows first), "
                         "'refined' (then refined over the whole window, lines held) or 'joint'.")
    if share_narrow is None:
        share_narrow = name == "halpha"
    comps, ties = spec.build(spec, int(n_broad), bool(feii), bool(share_narrow), bool(balmer), feii_template, win, bool(oiii_wing))
    if with_host:
        from .host import host_component

        comps.insert(1, host_component(template=host_template, window=win))  # after the power law
    metadata = {"region": name, "continuum_ref_wavelength": spec.ref_wavelength, "n_broad": int(n_broad), "references": _REFERENCES,
                "main_lines": list(spec.main_lines),
                "coverage": {"line": [list(w) for w in spec.line_windows],
                             "continuum": [list(w) for w in _inside(spec.continuum_windows, win)]}}
    def _named(t):
        return t is None or isinstance(t, (str, bytes)) or hasattr(t, "__fspath__")

    if _named(feii_template) and (_named(host_template) or not with_host):
        # How to rebuild this model (fit_dataset stores it as attrs["sheap_region"]); a
        # user-passed template array is not JSON-serializable, so such models carry none.
        kwargs = {"n_broad": int(n_broad), "feii": bool(feii), "window": [win[0], win[1]], "share_narrow": bool(share_narrow),
                  "balmer": bool(balmer)}
        if feii_template is not None:
            kwargs["feii_template"] = str(feii_template if not isinstance(feii_template, bytes) else feii_template.decode())
        if oiii_wing:
            kwargs["oiii_wing"] = True
        kwargs["host"] = with_host
        if with_host and host_template is not None:
            kwargs["host_template"] = str(host_template if not isinstance(host_template, bytes) else host_template.decode())
        if continuum != "windows":
            kwargs["continuum"] = continuum
        metadata["region_spec"] = {"name": name, "kwargs": kwargs}
    model = compose(
        *comps,
        ties=ties,
        name=name,
        window=win,
        metadata=metadata,
        description=f"sheap_dask {spec.description} ({int(n_broad)} broad Gaussians)",
    )
    model.initializer = make_initializer(model, spec, win)
    if continuum in ("windows", "refined"):
        refined = continuum == "refined"
        model.continuum_stage = _continuum_stage(model, comps, spec, win, refine_steps=REFINE_STEPS if refined else 0,
                                                 joint_steps=JOINT_STEPS if refined else 0)
    # A built-in region is what its arguments and the package version say it is; templates
    # count by content (two template arrays give two identities).
    model.declared_identity = {
        "region": name,
        "arguments": {"n_broad": int(n_broad), "feii": bool(feii), "window": list(win), "share_narrow": bool(share_narrow),
                      "balmer": bool(balmer), "oiii_wing": bool(oiii_wing), "continuum": continuum, "host": with_host},
        "templates": [c.info["template_obj"] for c in comps if "template_obj" in c.info],
        "package_version": __version__,
    }
    return model


def host_default(window: tuple[float, float], template=None) -> bool:
    """The ``host="auto"`` rule: on when the window starts at >= :data:`AUTO_HOST_MIN_WAVELENGTH`
    and, for a built-in template set (``template`` None: the default), the set covers it (the
    default starts at 3701 A: a window from 3500-3700 A gets no host rather than an error)."""
    if float(window[0]) < AUTO_HOST_MIN_WAVELENGTH:
        return False
    from .host import BUILTIN_NAMES, DEFAULT_TEMPLATE, builtin_templates

    name = DEFAULT_TEMPLATE if template is None else template
    if not (isinstance(name, str) and name in BUILTIN_NAMES):
        return True  # the user's own templates: host_component says if they fall short
    return builtin_templates(name).covers(float(window[0]), float(window[1]))


def _inside(windows, win):
    """The parts of ``windows`` inside the region's window ``win``."""
    return [(max(lo, win[0]), min(hi, win[1])) for lo, hi in windows if min(hi, win[1]) > max(lo, win[0])]


def _continuum_stage(model, comps, spec: RegionSpec, win, refine_steps: int = 0, joint_steps: int = 0):
    """The region's continuum (power law, host, FeII, Balmer continuum) alone, fitted first on the
    line-free windows; its initial values are the region initializer's."""
    from ..model import ContinuumStage
    from . import compose

    parts = [c for c in comps if c.continuum]
    windows = _inside(spec.continuum_windows, win)
    cont = compose(*parts, name=f"{model.name}_continuum", window=windows,
                   metadata={"continuum_ref_wavelength": spec.ref_wavelength, "coverage": {"continuum": [list(w) for w in windows]}},
                   description=f"continuum of the {spec.name} region on its line-free windows")
    # the lines alone, fitted on the spectrum minus that continuum: the continuum (FeII's FFT,
    # the host templates) is not evaluated again in every iteration of the line fit
    line_parts = [c for c in comps if not c.continuum]
    line_names = {n for c in line_parts for n in c.param_names}
    line_ties = [p.tie_string for p in model.params if p.tie is not None and p.name in line_names]
    meta = {k: model.metadata[k] for k in ("region", "coverage", "main_lines", "n_broad") if k in model.metadata}
    lines = compose(*line_parts, ties=line_ties, name=f"{model.name}_lines", window=list(model.windows), metadata=meta,
                    description=f"lines of the {spec.name} region on its continuum-subtracted window")
    full_initializer = model.initializer
    for part in (cont, lines):
        idx = np.array([model.param_names.index(n) for n in part.param_names])
        part.initializer = _columns_of(full_initializer, idx)
    return ContinuumStage(cont, windows, lines=lines, refine_steps=refine_steps, joint_steps=joint_steps)


def _columns_of(initializer, idx):
    """An initializer giving the columns ``idx`` of the full region initializer's values (from
    the full spectrum: its continuum estimate sets the lines' starting fluxes)."""

    def columns(wavelength, flux, ivar):
        return initializer(wavelength, flux, ivar)[:, idx]

    return columns


_REFERENCES = [
    "Storey & Zeippen 2000, MNRAS 312, 813 ([OIII] 5007/4959 = 2.98)",
    "Kovacevic, Popovic & Dimitrijevic 2010, ApJS 189, 15 (optical FeII multiplets)",
    "Veron-Cetty, Joly & Veron 2004, A&A 417, 515 (FeII in I Zw 1)",
    "Popovic et al. 2019, MNRAS 484, 3180 (UV FeII around MgII)",
    "Vanden Berk et al. 2001, AJ 122, 549; NIST ASD (rest wavelengths)",
]


# -- initial values --------------------------------------------------------------------------
def _np_profile(kind: str, wl, flux, shift, fwhm, rest):
    centre = rest * (1.0 + shift / C_KMS)
    fw = np.maximum(fwhm, 1e-3) * centre / C_KMS
    if kind == "lorentzian":
        g = 0.5 * fw
        return flux / np.pi * g / ((wl - centre) ** 2 + g * g)
    sigma = fw / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    return flux / (math.sqrt(2.0 * math.pi) * sigma) * np.exp(-0.5 * ((wl - centre) / sigma) ** 2)


def _solve_normal(A, w, y, nonneg):
    """Weighted linear least squares per spectrum; A (1|n, k, p), w and y (n, p).

    Columns are the middle axis so each one is a contiguous row (stacking and the normal
    matrix are several times faster than with columns last). Columns flagged ``nonneg``
    whose coefficient comes out negative are dropped and the system solved again (two passes
    approximate NNLS well for these near-orthogonal bases).
    """
    n, p = y.shape
    k = A.shape[1]
    if A.shape[0] == 1:
        a = A[0]
        M = (w @ (a[:, None, :] * a[None, :, :]).reshape(k * k, p).T).reshape(n, k, k)
        b = (w * y) @ a.T
    else:
        M = (A * w[:, None, :]) @ A.transpose(0, 2, 1)
        b = (A @ (w * y)[:, :, None])[:, :, 0]
    diag = np.einsum("nkk->nk", M)
    # A column with (almost) no usable pixels under it (a line in a masked stretch) gets no
    # coefficient: judged relative to its own size and the spectrum's weights, so the choice
    # does not depend on the flux unit.
    total = np.einsum("nkp,nkp->nk", A, A) if A.shape[0] > 1 else np.einsum("kp,kp->k", A[0], A[0])[None]
    support = diag / np.maximum(np.max(w, axis=1, keepdims=True) * total, 1e-300)
    scale = np.where(diag > 0, diag, 1.0)
    active = support > 1e-8
    x = np.zeros((n, k))
    for _ in range(3):
        # Jacobi scaling + a tiny ridge keeps singular systems (masked spectra) solvable.
        Ms = M / (np.sqrt(scale)[:, :, None] * np.sqrt(scale)[:, None, :])
        Ms = np.where(active[:, :, None] & active[:, None, :], Ms, 0.0)
        Ms = Ms + np.eye(k)[None] * (1e-10 + (~active)[:, :, None])
        bs = np.where(active, b / np.sqrt(scale), 0.0)
        x = np.linalg.solve(Ms, bs[..., None])[..., 0] / np.sqrt(scale)
        neg = nonneg[None, :] & (x < 0) & active
        if not neg.any():
            break
        active &= ~neg
    x = np.where(active, x, 0.0)
    r = y - (x @ A[0] if A.shape[0] == 1 else (x[:, None, :] @ A)[:, 0, :])
    return x, np.sum(w * r * r, axis=1)


def make_initializer(model, spec: RegionSpec, window: tuple[float, float]) -> Callable:
    """Build ``initializer(wavelength, flux, ivar) -> (n_spectra, n_params)`` for a region model.

    Steps, all vectorised over spectra:

    1. power-law slope and level from a weighted log-log fit in the line-free windows (host
       templates, when present, enter the linear solves below as one column each);
    2. the shift of the region's anchor narrow line (e.g. [OIII] 5007) from its peak above
       the continuum, used for every narrow line;
    3. 9 trials of broad x narrow widths; for each, weighted linear least squares for all
       amplitudes (power-law norm and a linearised slope correction, FeII amplitude, line
       fluxes; tied flux ratios folded into one column); the best chi-square wins;
    4. at the best widths, the main broad line gets its shift from the centroid of its
       residual, and each other free narrow line (e.g. narrow H-beta) its own shift from the
       peak of the high-passed residual without it; the amplitudes are solved again.

    Fluxes are floored at 2% of the continuum under the line (FeII at 1% of the continuum
    over its band) so no parameter starts on its bound, where its derivative through the
    bound transform vanishes.
    """
    params = model.params
    names = params.names
    comps = model.component_objects
    tie_of = {p.name: p.tie for p in params}  # name -> (target, source, op, operand) or None
    ref = spec.ref_wavelength

    def value_spec(name):
        p = params[name]
        return p.value, p.min, p.max

    def kin_source(c):  # component whose shift/fwhm this line follows
        t = tie_of[f"{c.name}_fwhm"]
        return comps[t[1].rsplit("_", 1)[0]] if t else c

    lines = [c for c in comps.values() if c.rest_wavelength is not None]
    broad = [c for c in lines if c.line_kind == "broad" and tie_of[f"{c.name}_fwhm"] is None]
    narrow = [c for c in lines if c.line_kind == "narrow" and tie_of[f"{c.name}_fwhm"] is None]
    feii_c = [c for c in comps.values() if c.kind == "feii"]
    balmer_c = [c for c in comps.values() if c.kind == "balmer_continuum"]
    host_c = [c for c in comps.values() if c.kind == "host"]
    # trial width factors: broad x narrow (9 trials)
    trials = list(itertools.product((0.55, 1.0, 1.8), (0.6, 1.0, 1.6)))

    def initializer(wavelength, flux, ivar):
        flux = np.asarray(flux, dtype=np.float64)
        if flux.ndim == 1:
            flux = flux[None]
        ivar = np.asarray(ivar, dtype=np.float64).reshape(flux.shape)
        wl = np.asarray(wavelength, dtype=np.float64)
        wl2 = wl[None] if wl.ndim == 1 else wl  # (1|n, p)
        n = flux.shape[0]
        inwin = (wl2 >= window[0]) & (wl2 <= window[1])
        good = inwin & np.isfinite(flux) & np.isfinite(ivar) & (ivar > 0) & np.isfinite(wl2)
        w = np.where(good, ivar, 0.0)
        y = np.where(good, flux, 0.0)
        safe_wl = np.where(np.isfinite(wl2) & (wl2 > 0), wl2, ref)
        lnx = np.log(safe_wl / ref)

        # 1. power law from the line-free windows: weighted fit of ln f = ln norm + index ln x
        cw = np.zeros_like(good)
        for lo, hi in spec.continuum_windows:
            cw |= (wl2 >= lo) & (wl2 <= hi)
        pos = good & cw & (y > 0)
        lw = np.where(pos, w * y * y, 0.0)  # var(ln f) = 1 / (ivar f^2)
        lnf = np.log(np.where(pos, y, 1.0))
        s0, s1, s2 = lw.sum(1), (lw * lnx).sum(1), (lw * lnx * lnx).sum(1)
        t0, t1 = (lw * lnf).sum(1), (lw * lnx * lnf).sum(1)
        det = s0 * s2 - s1 * s1
        ok = (pos.sum(1) >= 3) & (det > 1e-12 * np.maximum(s0 * s2, 1e-300))
        index = np.where(ok, (s0 * t1 - s1 * t0) / np.where(ok, det, 1.0), -1.5)
        index = np.clip(index, -4.0, 3.0)
        cont_level = np.where(s0 > 0, np.exp((t0 - index * s1) / np.where(s0 > 0, s0, 1.0)), np.nan)
        with warnings.catch_warnings():  # all-masked spectra give all-NaN rows
            warnings.simplefilter("ignore", RuntimeWarning)
            fallback = np.nanmedian(np.where(good, y, np.nan), axis=1)
        cont_level = np.where(np.isfinite(cont_level), cont_level, fallback)
        cont_level = np.where(np.isfinite(cont_level) & (cont_level > 0), cont_level, 1.0)
        pl = np.exp(index[:, None] * lnx)  # (n, p) unit-norm power law

        def peak_shift(resid, rest, halfwidth=0.8 * NARROW_SHIFT, highpass=False):
            """Velocity of the highest residual pixel within +-halfwidth km/s of ``rest``.

            ``highpass`` first subtracts a running mean over +-12 pixels (~ +-800 km/s on
            SDSS pixels), so a narrow peak is found on top of broad-line residuals.
            """
            if highpass:
                g = good.astype(float)
                cs = np.cumsum(np.pad(np.where(good, resid, 0.0), ((0, 0), (1, 0))), axis=1)
                cg = np.cumsum(np.pad(g, ((0, 0), (1, 0))), axis=1)
                h, p_ = 12, resid.shape[1]
                lo_i = np.clip(np.arange(p_) - h, 0, p_)
                hi_i = np.clip(np.arange(p_) + h + 1, 0, p_)
                mean = (cs[:, hi_i] - cs[:, lo_i]) / np.maximum(cg[:, hi_i] - cg[:, lo_i], 1.0)
                resid = resid - mean
            near = good & (np.abs(wl2 / rest - 1.0) * C_KMS < halfwidth)
            j = np.argmax(np.where(near, resid, -np.inf), axis=1)
            peak_wl = np.take_along_axis(np.broadcast_to(wl2, y.shape), j[:, None], 1)[:, 0]
            return np.where(near.any(1), (peak_wl / rest - 1.0) * C_KMS, 0.0)

        # 2. narrow-line shift from the peak of the anchor line above the continuum
        nshift = np.zeros(n)
        if spec.anchor is not None and spec.anchor in comps:
            nshift = peak_shift(y - cont_level[:, None] * pl, comps[spec.anchor].rest_wavelength)

        profiles = {}  # the 9 width trials share most profiles: evaluate each once
        # host templates at the starting dispersion, no shift: (K, n|1, p) per component
        host_cols = {c.name: c.info["template_obj"].evaluate_numpy(safe_wl, params[f"{c.name}_sigma"].value) for c in host_c}

        def profile(c, shift, fwhm):
            # scalars by value, per-spectrum arrays by identity (tagged: a value never equals an id)
            key = tuple(("value", v) if isinstance(v, float) else ("array", id(v)) for v in (shift, fwhm)) + (c.name,)
            if key not in profiles:  # the arrays are kept with the profile: their ids stay unique
                profiles[key] = (shift, fwhm, _np_profile(c.kind, wl2, 1.0, shift, fwhm, c.rest_wavelength))
            return profiles[key][2]

        def columns(fwhm, shift, feii_fwhm):
            """Design matrix (n|1, k, p) and column keys; fwhm/shift: component -> scalar or (n, 1)."""
            cols = [pl, pl * lnx]  # norm, and d/d index (linearised slope correction)
            keys = [("powerlaw", "norm"), ("powerlaw", "dindex")]
            for c in host_c:
                for k, col in enumerate(host_cols[c.name]):
                    cols.append(col)
                    keys.append((c.name, f"w{k + 1}"))
            for c in feii_c:
                tmpl = c.info["template_obj"]
                values = np.unique(feii_fwhm)
                col = 0.0
                for v in values:  # few distinct widths (one per trial)
                    col = col + np.where(np.reshape(feii_fwhm, (-1, 1)) == v, tmpl.evaluate_numpy(safe_wl, float(v)), 0.0)
                cols.append(col)
                keys.append((c.name, "amplitude"))
            for c in balmer_c:
                pv = np.array([1.0, params[f"{c.name}_temperature"].value, params[f"{c.name}_tau"].value])
                cols.append(np.asarray(c.func(safe_wl, pv)))
                keys.append((c.name, "amplitude"))
            where = {}
            for c in lines:
                src = kin_source(c)
                prof = profile(c, shift[src.name], fwhm[src.name])
                tie = tie_of[f"{c.name}_flux"]
                owner, factor = c.name, 1.0
                if tie is not None and tie[2] in "*/":
                    owner = tie[1].rsplit("_", 1)[0]
                    factor = tie[3] if tie[2] == "*" else 1.0 / tie[3]
                if owner in where:
                    cols[where[owner]] = cols[where[owner]] + factor * prof
                else:
                    where[owner] = len(cols)
                    cols.append(factor * prof)
                    keys.append((owner, "flux"))
            shape = (max(np.shape(col)[0] if np.ndim(col) == 2 else 1 for col in cols), y.shape[1])
            A = np.stack([np.broadcast_to(col, shape) for col in cols], axis=1)
            return A, keys

        def solve(A, keys):
            nonneg = np.array([q != "dindex" for _, q in keys])
            return _solve_normal(A, w, y, nonneg)

        # 3. trial widths
        # narrow lines start at the anchor's shift plus their own default offset (an [OIII]
        # outflow wing starts blueward of its core), kept 5% of the range inside the bounds
        def narrow_start(c):
            _, lo, hi = value_spec(f"{c.name}_shift")
            margin = 0.05 * (hi - lo)
            return np.clip(nshift + params[f"{c.name}_shift"].value, lo + margin, hi - margin)[:, None]

        shift = {c.name: (narrow_start(c) if c.line_kind == "narrow" else 0.0) for c in broad + narrow}
        best_chi2 = np.full(n, np.inf)
        best_fwhm = {c.name: np.zeros(n) for c in broad + narrow}
        best_feii = np.zeros(n)
        for fb, fn in trials:
            fwhm = {}
            for c, f in [(c, fb) for c in broad] + [(c, fn) for c in narrow]:
                v, lo, hi = value_spec(f"{c.name}_fwhm")
                fwhm[c.name] = float(np.clip(v * f, lo, hi))
            feii_fwhm = 0.0
            for c in feii_c:
                # FeII comes from the broad-line region: start at the broad core's width
                v, lo, hi = value_spec(f"{c.name}_fwhm")
                feii_fwhm = float(np.clip(fwhm[broad[0].name] if broad else v, lo, hi))
            A, keys = columns(fwhm, shift, np.full(n, feii_fwhm))
            x, chi2 = solve(A, keys)
            # a trial must win clearly: near-ties (lines masked, e.g. in the continuum stage)
            # must not be broken by rounding, or a spectrum in another unit starts elsewhere
            better = chi2 < best_chi2 * (1.0 - 1e-9)
            best_chi2 = np.where(better, chi2, best_chi2)
            for k, v in fwhm.items():
                best_fwhm[k] = np.where(better, v, best_fwhm[k])
            best_feii = np.where(better, feii_fwhm, best_feii)

        # 4. refine at the best widths: the main broad line's shift from the centroid of its
        # residual, the other free narrow lines' shifts from their own residual peaks
        fwhm_cols = {k: v[:, None] for k, v in best_fwhm.items()}
        A, keys = columns(fwhm_cols, shift, best_feii)
        x, _ = solve(A, keys)
        col_of = {k: i for i, k in enumerate(keys)}
        full = np.broadcast_to(A, (y.shape[0], A.shape[1], y.shape[1]))

        def residual_without(names_):
            idx = [col_of[(nm, "flux")] for nm in names_ if (nm, "flux") in col_of]
            keep = np.ones(len(keys), dtype=bool)
            keep[idx] = False
            return y - np.einsum("nkp,nk->np", full, np.where(keep, x, 0.0))

        main = [c for c in broad if c.line == f"{spec.name}_broad" and tie_of[f"{c.name}_shift"] is None]
        if main:
            rest = main[0].rest_wavelength
            r = residual_without([c.name for c in main])
            v = (wl2 / rest - 1.0) * C_KMS
            sel = good & (np.abs(v) < 6000.0) & (r > 0)
            wsum = np.where(sel, r, 0.0)
            centroid = (wsum * v).sum(1) / np.maximum(wsum.sum(1), 1e-300)
            centroid = np.clip(np.where(wsum.sum(1) > 0, centroid, 0.0), -0.5 * BROAD_SHIFT, 0.5 * BROAD_SHIFT)
            for c in main:
                shift[c.name] = centroid[:, None]
        others = [c for c in narrow if c.line != spec.anchor and tie_of[f"{c.name}_shift"] is None]
        if main or others:
            A, keys = columns(fwhm_cols, shift, best_feii)
            x, _ = solve(A, keys)
            col_of = {k: i for i, k in enumerate(keys)}
            full = np.broadcast_to(A, (y.shape[0], A.shape[1], y.shape[1]))
        if others:
            for c in others:
                shift[c.name] = peak_shift(residual_without([]) + (full[:, col_of[(c.name, "flux")], :] * x[:, col_of[(c.name, "flux")], None]
                                           if (c.name, "flux") in col_of else 0.0), c.rest_wavelength, 0.5 * NARROW_SHIFT,
                                           highpass=True)[:, None]
            A, keys = columns(fwhm_cols, shift, best_feii)
            x, _ = solve(A, keys)

        out = np.tile(np.asarray(params.values, dtype=np.float64), (n, 1))
        pos_of = {nm: i for i, nm in enumerate(names)}
        peak = np.max(np.where(good, np.abs(y), 0.0), axis=1)
        coef = {cn: x[:, i] for i, cn in enumerate(keys)}
        norm = np.maximum(coef[("powerlaw", "norm")], 1e-3 * cont_level)
        dindex = coef[("powerlaw", "dindex")] / np.where(norm > 0, norm, 1.0)
        out[:, pos_of["powerlaw_norm"]] = norm
        out[:, pos_of["powerlaw_index"]] = np.clip(index + np.clip(dindex, -1.0, 1.0), -5.5, 3.5)
        for c in feii_c:
            out[:, pos_of[f"{c.name}_amplitude"]] = np.maximum(coef[(c.name, "amplitude")], 2.5 * norm)
            out[:, pos_of[f"{c.name}_fwhm"]] = best_feii
            out[:, pos_of[f"{c.name}_shift"]] = 0.0
        for c in balmer_c:
            out[:, pos_of[f"{c.name}_amplitude"]] = np.maximum(coef[(c.name, "amplitude")], 0.01 * norm)
        for c in host_c:
            # templates are 1 at 5100 A: a weight is that template's flux density there; start
            # every one above 1% of the continuum level so none starts on its bound
            for k in range(c.info["template_obj"].k):
                out[:, pos_of[f"{c.name}_w{k + 1}"]] = np.maximum(coef[(c.name, f"w{k + 1}")], 0.01 * cont_level)
        for c in lines:
            if (c.name, "flux") in coef:
                fw = best_fwhm.get(kin_source(c).name, np.full(n, params[f"{c.name}_fwhm"].value))
                floor = 0.02 * norm * fw / C_KMS * c.rest_wavelength  # 2% of the continuum under the line
                # a line barely covered by usable pixels can get any amplitude from the linear
                # solve: cap it at 10x the brightest pixel over twice its width
                cap = 10.0 * peak * 2.0 * fw / C_KMS * c.rest_wavelength
                out[:, pos_of[f"{c.name}_flux"]] = np.minimum(np.maximum(coef[(c.name, "flux")], floor), np.maximum(cap, floor))
            if c.name in best_fwhm:
                out[:, pos_of[f"{c.name}_fwhm"]] = best_fwhm[c.name]
                out[:, pos_of[f"{c.name}_shift"]] = np.broadcast_to(shift[c.name], (n, 1))[:, 0]
        bad = ~good.any(axis=1)  # spectra without data keep the defaults
        out[bad] = np.asarray(params.values)[None].repeat(bad.sum(), 0)
        # tied parameters follow their sources
        for t, s, op, operand in params.ties:
            v = out[:, pos_of[s]]
            out[:, pos_of[t]] = {"*": v * operand, "/": v / operand, "+": v + operand, "-": v - operand}[op]
        return out

    return initializer


def covering_spectra(ds, window, *, min_fraction: float = 0.7, redshift: str = "redshift") -> np.ndarray:
    """Indices of the spectra of ``ds`` a model can fit (or that cover a rest-frame window).

    ``window`` a :class:`~sheap_dask.Model`: the coverage rule of the chunk layer
    (:mod:`sheap_dask.coverage`: a region's line window covered, at least one of its continuum
    windows), so ``ds.isel(spectrum=covering_spectra(ds, model))`` selects exactly the
    spectra the fit will not set to ``no_data``. ``window`` a ``(low, high)`` range: usable
    pixels (``ivar > 0``) must span at least ``min_fraction`` of its pixels and reach both
    ends (within 5% of its width). Without a ``redshift`` coordinate the wavelengths are
    taken as rest frame.
    """
    if hasattr(window, "params"):
        from ..coverage import covering

        return covering(ds, window, redshift=redshift)
    wl = np.asarray(ds.wavelength.values, dtype=np.float64)
    z = np.asarray(ds[redshift].values, dtype=np.float64) if redshift in ds.variables else np.zeros(ds.sizes["spectrum"])
    rest = (wl if wl.ndim == 2 else wl[None, :]) / (1.0 + z[:, None])
    lo, hi = window
    inwin = (rest >= lo) & (rest <= hi)
    good = inwin & (np.asarray(ds.ivar.values) > 0)
    frac = good.sum(1) / np.maximum(inwin.sum(1), 1)
    edge = 0.05 * (hi - lo)
    ends = (good & (rest < lo + edge)).any(1) & (good & (rest > hi - edge)).any(1)
    return np.flatnonzero((frac >= min_fraction) & ends)
