"""Host-galaxy starlight: a non-negative combination of galaxy templates, broadened and shifted.

In low-luminosity quasars the host galaxy's starlight is a large part of the continuum under
H-beta and H-alpha: its stellar absorption lines (H-beta, Mg b 5175, Fe 5270/5335, Na D) and
its 4000 A break distort the continuum the broad lines sit on. The host component is

    host(lambda) = sum_k w_k T_k(lambda) (x) G(sigma, v)

with ``T_k`` galaxy templates (each normalised to a flux density of 1 at 5100 A, so ``w_k``
is template ``k``'s flux density at 5100 A in the spectrum's unit, ``w_k >= 0``) convolved
with one Gaussian in velocity of dispersion ``sigma`` (km/s, added in quadrature to the
templates' own dispersion ``sigma_0``) and shifted by ``v`` (km/s). Parameters:
``{name}_w1 .. {name}_wK`` (flux parameters, >= 0), ``{name}_sigma`` (0-500 km/s) and
``{name}_shift`` (+-500 km/s).

Templates (:func:`load_host_template`):

* ``"mastar"``: six simple stellar populations (SSPs) built by
  ``scripts/build_ssp_templates.py`` from the MaStar SSPs of Maraston et al. 2020 (SDSS-IV
  MaStar stars; the version with the Milky Way's interstellar absorption removed, Salpeter
  IMF), as distributed in the BSD-3 ``sdss-mangadap`` package: solar metallicity at 0.1, 0.2,
  1, 3 and 14 Gyr and a metal-poor ([Z/H] = -1.35) 14 Gyr population, no emission lines, all
  broadened to one dispersion ``sigma_0`` = 120 km/s (the library's own resolution, no
  stellar motions), 3700-8050 A, shipped as ``sheap_dask/models/data/host_templates_mastar.csv``.
  None of them comes from a spectrum they are tested on.
* ``"sdss"``: three empirical templates built by ``scripts/build_host_templates.py``
  from public SDSS GALAXY spectra (spec-0266-51602-0013, an early-type galaxy;
  spec-0266-51602-0107, star-forming; spec-0295-51585-0596, a type-2 AGN host): rest frame,
  emission lines removed (stellar absorption kept), all broadened to one stellar dispersion
  ``sigma_0`` (239 km/s, SDSS instrumental resolution included), 3400-8050 A, shipped as
  ``sheap_dask/models/data/host_templates.csv`` with its provenance in the header. SDSS data
  are free to use with acknowledgement (see the README).
* ``"sdss+ssp"`` (default): the three SDSS galaxies and the 3 and 14 Gyr solar MaStar
  populations, broadened to the galaxies' ``sigma_0`` (:func:`combine_templates`,
  :data:`BUILTIN_COMBINED`), 3700-8050 A: with the two old populations no GALAXY spectrum gets
  a spurious broad H-beta, which two SDSS galaxies alone left in a third (leave-one-out,
  ``scripts/validate_host.py``), and hosts the three galaxies do not span are still
  recovered; the README says what it costs.
* your own: ``(wavelength, flux)`` arrays (``flux`` one template (n,) or several (K, n)), a
  text/CSV file (first column the wavelength, one column per template; a header line
  ``# sigma_0_kms = ...`` gives their dispersion), or a :class:`HostTemplate`.

Evaluation is the FeII pattern (:mod:`sheap_dask.models.feii`): the templates live on a
uniform ln(lambda) grid as flux per unit ln(lambda), a Gaussian in velocity is one FFT
product (one inverse FFT of the weighted sum), and a custom JVP gives every derivative from
K + 2 inverse FFTs computed once per call, whatever the number of tangent directions, so
forward-mode Jacobians stay cheap.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np

from ..errors import ModelError
from .profiles import C_KMS, LogLambdaTemplate

__all__ = ["HostTemplate", "load_host_template", "builtin_templates", "combine_templates", "combined_builtin", "sdss_templates", "host_component",
           "BUILTIN_TEMPLATE_FILES", "BUILTIN_COMBINED", "BUILTIN_NAMES", "DEFAULT_TEMPLATE"]

#: The built-in template sets by name and the script that builds each file.
BUILTIN_TEMPLATE_FILES = {
    "mastar": Path(__file__).with_name("data") / "host_templates_mastar.csv",  # scripts/build_ssp_templates.py
    "sdss": Path(__file__).with_name("data") / "host_templates.csv",  # scripts/build_host_templates.py
}
#: Built-in sets made of others: name -> ((set, templates or None for all), ...), combined by
#: :func:`combine_templates`. ``"sdss+ssp"``: the three SDSS galaxies and MaStar's old solar
#: populations (3 and 14 Gyr): with two galaxies alone, a third (early-type) galaxy was fitted
#: with a spurious broad H-beta (leave-one-out, ``scripts/validate_host.py``).
BUILTIN_COMBINED = {
    "sdss+ssp": (("sdss", None), ("mastar", ("A03.000-Z+0.00", "A14.000-Z+0.00"))),
}
BUILTIN_NAMES = [*BUILTIN_TEMPLATE_FILES, *BUILTIN_COMBINED]
#: The set a host component uses unless told otherwise (README "Which set").
DEFAULT_TEMPLATE = "sdss+ssp"
#: Templates are normalised to a flux density of 1 at this rest wavelength (mean over +-20 A).
NORM_WAVELENGTH = 5100.0
# Kernel reach allowed by the padding of a restricted grid: 5 sigma + |shift| <= _PAD_KMS.
_PAD_KMS = 6000.0
SIGMA_MAX = 1000.0
SHIFT_MAX = 1000.0


def _next_fast_len(n: int) -> int:
    from .feii import _next_fast_len as f

    return f(n)


class HostTemplate(LogLambdaTemplate):
    """Galaxy templates on one uniform ln(lambda) grid.

    Attributes
    ----------
    name : str
    names : list of str
        One name per template.
    loglam : ndarray (n,)
        Natural log of the grid wavelengths (rest-frame vacuum Angstrom).
    density : ndarray (K, n)
        Flux per unit ln(lambda) (``lambda * f_lambda``), each template normalised to
        ``f_lambda = 1`` at :data:`NORM_WAVELENGTH` (or at ``norm_wavelength``).
    sigma0 : float
        Stellar velocity dispersion the templates already have (km/s; instrumental included).
    sigma_inst : float
        Instrumental dispersion included in ``sigma0`` (km/s), for :func:`stellar_dispersion`.
    """

    def __init__(self, loglam, density, *, name: str, names, sigma0: float = 0.0, sigma_inst: float = 0.0,
                 norm_wavelength: float = NORM_WAVELENGTH, provenance: str = ""):
        self.name = str(name)
        self.loglam = np.asarray(loglam, dtype=np.float64)
        self.dlnlam = float(self.loglam[1] - self.loglam[0])
        self.density = np.atleast_2d(np.asarray(density, dtype=np.float64))
        self.names = [str(n) for n in names]
        self.sigma0 = float(sigma0)
        self.sigma_inst = float(sigma_inst)
        self.norm_wavelength = float(norm_wavelength)
        self.provenance = provenance
        self.n = self.loglam.size
        self._spectrum = np.fft.rfft(self.density, axis=-1)
        self._freq = np.fft.rfftfreq(self.n)

    def __repr__(self) -> str:
        lo, hi = np.exp(self.loglam[[0, -1]])
        return f"HostTemplate({self.name!r}, {len(self.names)} templates, {lo:.0f}-{hi:.0f} A, sigma_0={self.sigma0:.0f} km/s)"

    @property
    def k(self) -> int:
        """Number of templates."""
        return self.density.shape[0]

    @property
    def range(self) -> tuple[float, float]:
        lo, hi = np.exp(self.loglam[[0, -1]])
        return float(lo), float(hi)

    # -- constructors --------------------------------------------------------------------
    @classmethod
    def from_arrays(cls, wavelength, flux, *, name: str = "user", names=None, sigma0: float = 0.0, sigma_inst: float = 0.0,
                    norm_wavelength: float = NORM_WAVELENGTH, provenance: str = "") -> HostTemplate:
        """Templates from tabulated ``wavelength`` (n,) and ``flux`` per Angstrom ((n,) or (K, n)).

        Wavelengths: rest-frame vacuum Angstrom, strictly increasing. The table is resampled
        onto a uniform ln(lambda) grid with the table's median step, and each template is
        normalised to a mean flux density of 1 within +-20 A of ``norm_wavelength`` (default
        5100 A; it must lie inside the table).
        """
        wl = np.asarray(wavelength, dtype=np.float64)
        fl = np.asarray(flux, dtype=np.float64)
        if fl.ndim == 2 and fl.shape[0] == wl.size and fl.shape[1] != wl.size:
            fl = fl.T  # (n, K) columns
        fl = np.atleast_2d(fl)
        if wl.ndim != 1 or wl.size < 10 or fl.ndim != 2 or fl.shape[1] != wl.size:
            raise ModelError(
                f"host template: wavelength must be 1-D (n >= 10) and flux (n,) or (K, n); got shapes {wl.shape} and "
                f"{np.shape(flux)}."
            )
        cls.check_grid(wl, fl, "host template")
        norm_wavelength = float(norm_wavelength)
        if not wl[0] + 20 <= norm_wavelength <= wl[-1] - 20:
            raise ModelError(
                f"host template {name!r} covers {wl[0]:.0f}-{wl[-1]:.0f} A, not its normalisation wavelength "
                f"{norm_wavelength:g} A; pass norm_wavelength= inside the range."
            )
        dln = float(np.median(np.diff(np.log(wl))))
        n = int(math.floor((math.log(wl[-1]) - math.log(wl[0])) / dln)) + 1
        loglam = math.log(wl[0]) + dln * np.arange(n)
        lam = np.exp(loglam)
        f = np.stack([np.interp(lam, wl, row) for row in fl])
        band = np.abs(lam - norm_wavelength) <= 20.0
        level = f[:, band].mean(axis=1)
        if np.any(~(level > 0)):
            raise ModelError(f"host template {name!r}: a template has no positive flux near {norm_wavelength:g} A.")
        names = list(names) if names is not None else [f"t{k + 1}" for k in range(f.shape[0])]
        if len(names) != f.shape[0]:
            raise ModelError(f"host template {name!r}: {len(names)} names for {f.shape[0]} templates.")
        return cls(loglam, f / level[:, None] * lam, name=name, names=names, sigma0=sigma0, sigma_inst=sigma_inst,
                   norm_wavelength=norm_wavelength, provenance=provenance)

    def covers(self, low: float, high: float) -> bool:
        """Whether the templates cover ``[low, high]`` (rest frame, Angstrom)."""
        lo, hi = self.range
        return low >= lo - 1e-6 and high <= hi + 1e-6

    def restricted(self, low: float, high: float) -> HostTemplate:
        """The templates on a grid covering ``[low, high]`` plus 6000 km/s on each side.

        The FFT convolution is circular: the kernel (5 sigma + |shift| <= 6000 km/s) never
        reaches from the cut ends into ``[low, high]``. Raises when the templates do not
        cover ``[low, high]``.
        """
        if not self.covers(low, high):
            lo, hi = self.range
            raise ModelError(
                f"host template {self.name!r} covers {lo:.0f}-{hi:.0f} A (rest), not the window {low:g}-{high:g} A; pass "
                "templates that cover the window (template=(wavelength, flux) or a file), or host=False."
            )
        pad = math.log1p(_PAD_KMS / C_KMS)
        i0 = max(0, int(math.floor((math.log(low) - pad - self.loglam[0]) / self.dlnlam)))
        i1 = min(self.n, int(math.ceil((math.log(high) + pad - self.loglam[0]) / self.dlnlam)) + 1)
        # more of the templates' own data up to a 2^a 3^b 5^c length: XLA's FFT of a length
        # with a large prime factor is ~2x slower, and a wider pad changes nothing inside
        fast = _next_fast_len(i1 - i0)
        if fast <= self.n:
            i1 = min(self.n, i0 + fast)
            i0 = i1 - fast
        if i1 - i0 >= self.n:
            return self
        new = HostTemplate.__new__(HostTemplate)
        new.__dict__.update(self.__dict__)
        new.parent = getattr(self, "parent", None) or self  # the full set, for derived quantities outside the window
        new.loglam = self.loglam[i0:i1]
        new.density = self.density[:, i0:i1]
        new.n = i1 - i0
        new._spectrum = np.fft.rfft(new.density, axis=-1)
        new._freq = np.fft.rfftfreq(new.n)
        return new

    def __sheap_identity__(self) -> str:
        from ..identity import token

        parent = getattr(self, "parent", None)
        return token({"host_template": self.name, "names": self.names, "loglam": self.loglam, "density": self.density,
                      "sigma0": self.sigma0, "sigma_inst": self.sigma_inst, "norm": self.norm_wavelength,
                      "parent": None if parent is None else parent.__sheap_identity__()})

    # -- evaluation --------------------------------------------------------------------------
    def evaluate(self, wavelength, weights, sigma_kms, shift_kms):
        """``sum_k weights[k] T_k (x) G(sigma, shift)`` at ``wavelength`` (flux per Angstrom), pure jnp.

        Differentiable in all arguments (a custom JVP: K + 2 inverse FFTs for all
        derivatives). Zero outside the template grid.
        """
        import jax
        import jax.numpy as jnp

        wavelength = jnp.asarray(wavelength)
        weights = jnp.asarray(weights)
        dtype = jnp.result_type(wavelength, weights, sigma_kms, shift_kms, float)
        cdtype = jnp.complex64 if dtype == jnp.float32 else jnp.complex128
        n, dln = self.n, self.dlnlam
        spectrum = jnp.asarray(self._spectrum, cdtype)  # (K, nf)
        freq = jnp.asarray(self._freq, dtype)
        to_pix = 1.0 / (C_KMS * dln)
        wl = wavelength.astype(dtype)
        i, w, scale = self.pixel_weights(wl)

        sample = self.sample  # (..., n) -> (..., n_pix) flux per Angstrom

        def kernel(sigma, shift):
            s = jnp.asarray(sigma, dtype) * to_pix
            d = jnp.log1p(jnp.asarray(shift, dtype) / C_KMS) / dln
            damp = jnp.exp(-2.0 * (jnp.pi * freq * s) ** 2)
            phase = -2.0 * jnp.pi * freq * d
            k = (damp * jnp.cos(phase)).astype(cdtype) + 1j * (damp * jnp.sin(phase)).astype(cdtype)
            return k, s

        # The combination is linear, so the value is ONE inverse FFT of sum_k w_k S_k K; the
        # JVP needs each broadened template (K inverse FFTs, for the weights' tangents) and the
        # combination's derivatives in sigma and shift (2 more), computed once per call
        # whatever the number of tangent directions.
        @jax.custom_jvp
        def combo(wts, sigma, shift, i, w, scale):
            k, _ = kernel(sigma, shift)
            mixed = jnp.tensordot(wts.astype(cdtype), spectrum, axes=1) * k
            return sample(jnp.fft.irfft(mixed, n=n).astype(dtype), i, w, scale)

        @combo.defjvp
        def combo_jvp(primals, tangents):
            wts, sigma, shift, i, w, scale = primals
            t_w, t_sigma, t_shift = tangents[:3]
            k, s = kernel(sigma, shift)
            # dK/dsigma = -4 pi^2 f^2 s ds/dsigma K; dK/dshift = -2 pi i f dd/dshift K
            d_sigma = (-4.0 * jnp.pi**2 * freq**2 * s * to_pix).astype(cdtype)
            d_shift = (-2j * jnp.pi * freq / ((C_KMS + jnp.asarray(shift, dtype)) * dln)).astype(cdtype)
            sk = spectrum * k  # (K, nf)
            mixed = jnp.tensordot(wts.astype(cdtype), sk, axes=1)
            stack = jnp.concatenate([sk, (mixed * d_sigma)[None], (mixed * d_shift)[None]])  # (K + 2, nf)
            out = sample(jnp.fft.irfft(stack, n=n, axis=-1).astype(dtype), i, w, scale)
            units, g_sigma, g_shift = out[:-2], out[-2], out[-1]
            value = wts @ units
            tangent = t_w @ units + g_sigma * t_sigma + g_shift * t_shift
            return value, tangent

        return combo(weights, sigma_kms, shift_kms, i, w, scale)

    def evaluate_numpy(self, wavelength, sigma_kms: float = 0.0, shift_kms: float = 0.0) -> np.ndarray:
        """Each broadened template at ``wavelength`` (K, ...) with numpy (initial values, plots)."""
        lam = np.asarray(wavelength, dtype=np.float64)
        s = float(sigma_kms) / (C_KMS * self.dlnlam)
        d = math.log1p(float(shift_kms) / C_KMS) / self.dlnlam
        kern = np.exp(-2.0 * (np.pi * self._freq * s) ** 2 - 2j * np.pi * self._freq * d)
        broadened = np.fft.irfft(self._spectrum * kern, n=self.n, axis=-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            t = (np.log(lam) - self.loglam[0]) / self.dlnlam
        ok = np.isfinite(t) & (t >= 0) & (t <= self.n - 1)
        tt = np.where(ok, t, 0.0)
        i = np.clip(np.floor(tt).astype(int), 0, self.n - 2)
        w = tt - i
        vals = broadened[:, i] * (1 - w) + broadened[:, i + 1] * w
        return np.where(ok, vals / np.where(ok, lam, 1.0), 0.0)


_HEADER_VALUE = re.compile(r"^#\s*(sigma_0_kms|sigma_inst_kms)\s*=\s*([-+0-9.eE]+)")
_DEFAULTS: dict[str, HostTemplate] = {}


def read_template_file(path, *, name: str | None = None, norm_wavelength: float = NORM_WAVELENGTH) -> HostTemplate:
    """Templates from a text/CSV file: wavelength, then one column per template.

    ``#`` lines are comments; ``# sigma_0_kms = X`` and ``# sigma_inst_kms = Y`` set the
    templates' own and instrumental dispersions. A non-numeric first line names the columns.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelError(f"host template {path!r} is not a built-in set {BUILTIN_NAMES} and as a file it does not exist; pass one "
                         "of those names or a CSV/text file (wavelength, template columns...).")
    values = {"sigma_0_kms": 0.0, "sigma_inst_kms": 0.0}
    comments, rows, names = [], [], None
    with open(path) as fh:
        for line in fh:
            if line.startswith("#"):
                comments.append(line[1:].rstrip())
                m = _HEADER_VALUE.match(line)
                if m:
                    values[m.group(1)] = float(m.group(2))
            elif line.strip():
                rows.append(line.replace(",", " ").split())
    try:
        if rows and names is None:
            try:
                float(rows[0][0])
            except ValueError:
                names = rows.pop(0)[1:]
        data = np.array(rows, dtype=np.float64)
    except ValueError as exc:
        raise ModelError(f"host template file {path!r}: expected numeric columns (wavelength, templates...): {exc}") from None
    if data.ndim != 2 or data.shape[1] < 2:
        raise ModelError(f"host template file {path!r}: needs a wavelength column and at least one template column.")
    return HostTemplate.from_arrays(data[:, 0], data[:, 1:].T, name=name or os.path.basename(path), names=names,
                                    sigma0=values["sigma_0_kms"], sigma_inst=values["sigma_inst_kms"],
                                    norm_wavelength=norm_wavelength, provenance="\n".join(comments))


def builtin_templates(name: str = DEFAULT_TEMPLATE) -> HostTemplate:
    """A built-in template set by name (``"sdss"``, ``"mastar"``, ``"sdss+ssp"``; see the module docstring)."""
    if name not in BUILTIN_NAMES:
        raise ModelError(f"host template {name!r} is not a built-in set; use one of {BUILTIN_NAMES}, a file path, "
                         "(wavelength, flux) arrays or a HostTemplate.")
    if name not in _DEFAULTS:
        _DEFAULTS[name] = combined_builtin(name) if name in BUILTIN_COMBINED else read_template_file(BUILTIN_TEMPLATE_FILES[name], name=name)
    return _DEFAULTS[name]


def combined_builtin(name: str, replace: dict | None = None) -> HostTemplate:
    """A combined built-in set (:data:`BUILTIN_COMBINED`), each part the built-in set of its
    name unless ``replace`` maps that name to other templates (anything
    :func:`load_host_template` takes): e.g. ``combined_builtin("sdss+ssp", {"sdss": path})``
    puts a leave-one-out set of galaxies in place of the three."""
    replace = replace or {}
    parts = BUILTIN_COMBINED[name]
    return combine_templates([replace.get(part, part) for part, _ in parts], name=name, select=[names for _, names in parts])


def combine_templates(sets, *, name: str = "combined", select=None) -> HostTemplate:
    """One template set made of several, e.g. galaxy templates and stellar populations.

    Every template is broadened to the largest ``sigma_0`` of the sets (the Gaussian in
    quadrature with its own) and resampled onto the first set's ln(lambda) step over the range
    all sets cover, then normalised at the first set's normalisation wavelength as usual; the
    instrumental dispersion (for :func:`~sheap_dask.derived.host.stellar_dispersion`) is the
    first set's.

    Parameters
    ----------
    sets : sequence of HostTemplate (or anything :func:`load_host_template` takes)
    name : str
        Name of the combined set.
    select : sequence of (sequence of str or None), optional
        Per set, the names of the templates to keep (None: all).

    Returns
    -------
    HostTemplate
        Templates named ``"<set>:<template>"``; the provenance of each set in order.

    Examples
    --------
    >>> import sheap_dask as sd
    >>> t = sd.models.host.combine_templates(["sdss", "mastar"], select=[None, ["A14.000-Z+0.00"]])
    >>> t.k, t.names[-1]
    (4, 'mastar:A14.000-Z+0.00')
    """
    sets = [load_host_template(s) for s in sets]
    if not sets:
        raise ModelError("combine_templates: no sets given; pass at least one (a name, a file, arrays or a HostTemplate).")
    select = list(select) if select is not None else [None] * len(sets)
    if len(select) != len(sets):
        raise ModelError(f"combine_templates: select has {len(select)} entries for {len(sets)} sets; give one per set (None keeps all).")
    low = max(t.range[0] for t in sets)
    high = min(t.range[1] for t in sets)
    first = sets[0]
    if not low + 20 < first.norm_wavelength < high - 20:
        raise ModelError(f"combine_templates: the sets have {low:.0f}-{high:.0f} A in common, which misses the normalisation "
                         f"wavelength {first.norm_wavelength:g} A; combine sets that overlap there.")
    lam = np.exp(first.loglam)
    lam = lam[(lam >= low) & (lam <= high)]
    sigma0 = max(t.sigma0 for t in sets)
    fluxes, names, provenance = [], [], []
    for t, keep in zip(sets, select):
        missing = [n for n in keep or () if n not in t.names]
        if missing:
            raise ModelError(f"combine_templates: set {t.name!r} has no template {missing[0]!r}; its templates are {t.names}.")
        idx = list(range(t.k)) if keep is None else [t.names.index(n) for n in keep]
        fluxes.append(t.evaluate_numpy(lam, sigma_kms=math.sqrt(sigma0**2 - t.sigma0**2))[idx])
        names += [f"{t.name}:{t.names[i]}" for i in idx]
        provenance.append(f"set {t.name!r} (sigma_0 {t.sigma0:g} km/s):\n{t.provenance}")
    return HostTemplate.from_arrays(lam, np.concatenate(fluxes), name=name, names=names, sigma0=sigma0,
                                    sigma_inst=first.sigma_inst, norm_wavelength=first.norm_wavelength,
                                    provenance="\n".join(provenance))


def sdss_templates() -> HostTemplate:
    """The built-in empirical templates (three SDSS galaxies; see the module docstring)."""
    return builtin_templates("sdss")


def load_host_template(template=DEFAULT_TEMPLATE, *, sigma0: float | None = None, names=None, name: str | None = None,
                       norm_wavelength: float = NORM_WAVELENGTH) -> HostTemplate:
    """Normalise the ways of naming host templates into a :class:`HostTemplate`.

    Parameters
    ----------
    template : "sdss", "mastar", "sdss+ssp", HostTemplate, (wavelength, flux) arrays, or path
        A built-in set by name (None: :data:`DEFAULT_TEMPLATE`); ``flux`` (n,) for one
        template or (K, n) for several; a path names a text/CSV file (see
        :func:`read_template_file`).
    sigma0 : float, optional
        Stellar dispersion the user templates already have (km/s; default 0 or the file's).
    names : list of str, optional
        Names of user templates.
    """
    if isinstance(template, HostTemplate):
        return template
    if template is None:
        return builtin_templates()
    if isinstance(template, str) and template in BUILTIN_NAMES:
        return builtin_templates(template)
    if isinstance(template, (str, os.PathLike)):
        t = read_template_file(template, name=name, norm_wavelength=norm_wavelength)
        if sigma0 is not None:
            t.sigma0 = float(sigma0)
        return t
    if isinstance(template, (tuple, list)) and len(template) == 2:
        return HostTemplate.from_arrays(template[0], template[1], name=name or "user", names=names,
                                        sigma0=float(sigma0 or 0.0), norm_wavelength=norm_wavelength)
    raise ModelError(
        f"host template {template!r} not understood; use a built-in set {BUILTIN_NAMES}, a (wavelength, flux) pair of arrays (flux (n,) or (K, n)), "
        "a file path, or a HostTemplate."
    )


def host_component(
    name: str = "host",
    *,
    template=DEFAULT_TEMPLATE,
    window: tuple[float, float] | None = None,
    weights=(1.0, 0.0, None),
    sigma=(100.0, 0.0, 500.0),
    shift=(0.0, -500.0, 500.0),
    sigma0: float | None = None,
):
    """Host-galaxy starlight: non-negative weights of galaxy templates, one dispersion and shift.

    Parameters
    ----------
    name : str
        Component name; parameters ``{name}_w1 .. {name}_wK``, ``{name}_sigma``, ``{name}_shift``.
    template : "sdss", "mastar", "sdss+ssp", (wavelength, flux) arrays, path, or HostTemplate
        See :func:`load_host_template` (default :data:`DEFAULT_TEMPLATE`, the three SDSS galaxies
        and two old stellar populations).
    window : (float, float), optional
        Range the model is evaluated on: restricts the template grid (faster) and checks
        that the templates cover it.
    weights : float or (value, min, max[, fixed])
        Each template's flux density at 5100 A (flux unit); lower bound 0 (non-negative
        combination), so starlight can never be negative.
    sigma : float or (value, min, max[, fixed])
        Velocity dispersion (km/s) added in quadrature to the templates' ``sigma_0``
        (<= 1000 km/s: the FFT padding).
    shift : float or (value, min, max[, fixed])
        Velocity shift of the starlight (km/s; |shift| <= 1000).
    sigma0 : float, optional
        Dispersion the user templates already have (km/s).

    Returns
    -------
    Component
        ``kind="host"``, a continuum component (fitted in a region's continuum stage); its
        name is listed in ``model.metadata["host"]``, not in ``metadata["continuum"]``, so
        luminosities and equivalent widths use the AGN continuum alone.

    Examples
    --------
    >>> import sheap_dask as sd
    >>> c = sd.models.host_component(window=(4400.0, 5600.0))
    >>> c.param_names
    ['host_w1', 'host_w2', 'host_w3', 'host_sigma', 'host_shift']
    """
    from . import Component, _check_name, _spec

    _check_name(name)
    tmpl = load_host_template(template, sigma0=sigma0)
    if window is not None:
        tmpl = tmpl.restricted(float(window[0]), float(window[1]))
    k = tmpl.k
    specs = tuple(_spec(f"w{j + 1}", weights, (1.0, 0.0, None)) for j in range(k))
    specs += (_spec("sigma", sigma, (100.0, 0.0, 500.0)), _spec("shift", shift, (0.0, -500.0, 500.0)))
    for s, cap in ((specs[k], SIGMA_MAX), (specs[k + 1], SHIFT_MAX)):
        bound = max(abs(s.min if s.min is not None else math.inf), abs(s.max if s.max is not None else math.inf))
        if bound > cap:
            raise ModelError(
                f"host {name!r}: {s.name} bounds ({s.min}, {s.max}) exceed +-{cap:g} km/s, beyond which the template's "
                "FFT padding would wrap flux around; narrow the bounds."
            )
    if specs[k].min is None or specs[k].min < 0:
        raise ModelError(f"host {name!r}: sigma bounds ({specs[k].min}, {specs[k].max}) must start at >= 0 km/s.")

    def func(wavelength, p, _t=tmpl, _k=k):
        return _t.evaluate(wavelength, p[:_k], p[_k], p[_k + 1])

    weight_names = tuple(f"w{j + 1}" for j in range(k))
    # The kernel depends on sigma^2, so at sigma = 0 the model's derivative in sigma vanishes:
    # an unresolved dispersion (below the templates' own) is a result, not a fit held by the
    # bound. A template weight at 0 is not declared: a restart from a reset host can find a
    # lower minimum (tests/test_units.py's float32 spectra have one).
    return Component(name, "host", func, specs, continuum=True, flux_params=weight_names, resting_bounds=("sigma",),
                     info={"template": tmpl.name, "templates": list(tmpl.names), "sigma0": tmpl.sigma0,
                           "sigma_inst": tmpl.sigma_inst, "norm_wavelength": tmpl.norm_wavelength, "template_obj": tmpl})
