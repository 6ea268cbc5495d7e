"""Flux-density units: the scale, in erg/s/cm²/Å, of the unit a spectrum's flux is given in.

Fits never depend on the flux unit (DESIGN.md, "Units"); luminosities do, so the derived
physics and ``ds.sheap`` read it from the input's ``flux.attrs["units"]`` (or a
``flux_unit=`` argument) through :func:`flux_unit_scale`.
"""

from __future__ import annotations

import math
import re

from .errors import InputDataError, OptionError

__all__ = ["DEFAULT_FLUX_UNIT", "flux_unit_scale", "parse_flux_unit"]

#: Flux-density unit assumed when the input does not say: SDSS's 1e-17 erg/s/cm²/Å.
DEFAULT_FLUX_UNIT = 1e-17

_ANGSTROM = {"a", "aa", "ang", "angstrom", "angstroms", "å", "angstroem"}
_UNIT_WORDS = {"erg", "ergs", "s", "sec", "cm", "m", "nm", "um", "w", "jy", "hz"}


def parse_flux_unit(units: str) -> float:
    """The scale (erg/s/cm²/Å) of a flux-density unit string such as ``"1e-17 erg/s/cm2/A"``.

    Understands SDSS-style strings (``"1E-17 erg/cm^2/s/Ang"``, ``"10^-17 erg s-1 cm-2 A-1"``,
    where ``A`` means Angstrom) and, when astropy is installed, anything
    ``astropy.units`` can convert to erg/s/cm²/Å.

    Raises
    ------
    InputDataError
        The string is not a flux density per unit wavelength.
    """
    text = str(units).strip()
    # a trailing remark such as "(nominal)" is not part of the unit
    remark = re.search(r"\(([^()]*)\)\s*$", text)
    if remark and not any(w in _UNIT_WORDS or w in _ANGSTROM for w in re.findall(r"[a-zå]+", remark.group(1).lower())):
        text = text[: remark.start()].strip()
    m = re.match(r"^\(?\s*(?:(10\s*(?:\^|\*\*)\s*\(?\s*([-+]?\d+)\s*\)?)|([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?))?\s*\)?\s*\*?\s*(.*)$", text)
    if m is not None and m.group(4):
        scale = 10.0 ** int(m.group(2)) if m.group(1) else float(m.group(3)) if m.group(3) else 1.0
        words = re.findall(r"([a-zå]+)\s*(?:\^|\*\*)?\s*\(?\s*([-+]?\d+)?", m.group(4).lower())
        bases = {}
        for word, power in words:
            base = "A" if word in _ANGSTROM else {"erg": "erg", "ergs": "erg", "s": "s", "sec": "s", "cm": "cm"}.get(word)
            if base is None:
                bases = None
                break
            bases[base] = abs(int(power)) if power else 1
        if bases == {"erg": 1, "s": 1, "cm": 2, "A": 1} and scale > 0:
            return float(scale)
    try:
        import astropy.units as u

        return float(u.Unit(text).to(u.erg / u.s / u.cm**2 / u.AA))
    except Exception:  # noqa: BLE001, S110 - astropy missing or the unit unknown to it: the error below
        pass
    raise InputDataError(
        f"cannot read flux unit {units!r} as a flux density per Angstrom; pass flux_unit=<scale in "
        "erg/s/cm2/A> (e.g. 1e-17 for SDSS) or set flux.attrs['units'] = '1e-17 erg/s/cm2/A'."
    )

def flux_unit_scale(flux_unit: float | str) -> float:
    """The scale (erg/s/cm²/Å) of ``flux_unit``: a positive number as is, a string parsed.

    Raises
    ------
    OptionError
        A number that is not finite and positive.
    InputDataError
        A string that is not a flux density per unit wavelength (see :func:`parse_flux_unit`).
    """
    if isinstance(flux_unit, str):
        return parse_flux_unit(flux_unit)
    value = float(flux_unit)
    if not (math.isfinite(value) and value > 0):
        raise OptionError(f"flux_unit={flux_unit!r} must be a positive scale in erg/s/cm2/A (e.g. 1e-17) or a unit string.")
    return value
