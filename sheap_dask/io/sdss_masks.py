"""SDSS spectroscopic pixel-mask bits (``and_mask``) and the ``mask_bits`` option."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import OptionError

__all__ = ["SDSS_PIXMASK_BITS", "DEFAULT_MASK_BITS", "mask_value"]

#: SDSS spectroscopic pixel mask bits (``SPPIXMASK``, the ``and_mask``/``or_mask`` columns).
#: Bits 0-15 are per-fibre conditions propagated to every pixel, 16-31 per-pixel conditions.
#: Source: SDSS bitmask documentation (idlspec2d ``sdssMaskbits.par``).
SDSS_PIXMASK_BITS: dict[str, int] = {
    "NOPLUG": 0,          # fibre not listed in the plug map
    "BADTRACE": 1,        # bad trace
    "BADFLAT": 2,         # low counts in the fibre flat
    "BADARC": 3,          # bad arc solution
    "MANYBADCOLUMNS": 4,  # more than 10% of the pixels are bad columns
    "MANYREJECTED": 5,    # more than 10% of the pixels rejected in extraction
    "LARGESHIFT": 6,      # large spatial shift between flat and object
    "BADSKYFIBER": 7,     # sky fibre shows extreme residuals
    "NEARWHOPPER": 8,     # within 2 fibres of a whopping fibre
    "WHOPPER": 9,         # whopping fibre (very bright source)
    "SMEARIMAGE": 10,     # smear available for red and blue cameras
    "SMEARHIGHSN": 11,    # S/N sufficient for the full smear fit
    "SMEARMEDSN": 12,     # S/N only sufficient for the scaled median fit
    "NEARBADPIXEL": 16,   # bad pixel within 3 pixels of the trace
    "LOWFLAT": 17,        # flat field less than 0.5
    "FULLREJECT": 18,     # pixel fully rejected in extraction
    "PARTIALREJECT": 19,  # some pixels rejected in extraction
    "SCATTEREDLIGHT": 20, # scattered light significant
    "CROSSTALK": 21,      # cross-talk significant
    "NOSKY": 22,          # sky level unknown at this wavelength
    "BRIGHTSKY": 23,      # sky level > flux + 10 * flux error
    "NODATA": 24,         # no data available in the combine B-spline
    "COMBINEREJ": 25,     # rejected in the combine B-spline
    "BADFLUXFACTOR": 26,  # low flux-calibration or flux-correction factor
    "BADSKYCHI": 27,      # relative chi^2 > 3 in the sky residuals at this wavelength
    "REDMONSTER": 28,     # contiguous region of bad chi^2 in the sky residuals
    "EMLINE": 30,         # emission line detected here (a real line: never a reason to mask)
}

#: Bits masked by ``mask_bits="default"``: pixels whose flux is missing or dominated by sky
#: or calibration failures. Deliberately *not* masked: MANYBADCOLUMNS, BADFLAT, NEARBADPIXEL,
#: PARTIALREJECT, LOWFLAT, SCATTEREDLIGHT, CROSSTALK (set in the ``and_mask`` over long stretches
#: of usable data: MANYBADCOLUMNS covers 46% of spec-0266-51602-0013 and BADFLAT 33% of
#: eBOSS 8222-57431-0561, whose fluxes and ivar are fine) and EMLINE (marks real lines).
DEFAULT_MASK_BITS: tuple[str, ...] = (
    "FULLREJECT",
    "NOSKY",
    "BRIGHTSKY",
    "NODATA",
    "COMBINEREJ",
    "BADFLUXFACTOR",
    "BADSKYCHI",
    "REDMONSTER",
)


def mask_value(mask_bits: Any = "default") -> int:
    """Turn a ``mask_bits`` option into the integer bit mask it stands for.

    Parameters
    ----------
    mask_bits : "default", "all", "none", None, int, or iterable of str/int
        ``"default"``: :data:`DEFAULT_MASK_BITS`. ``"all"``: every bit except EMLINE.
        ``"none"``/``None``/``0``: no bit masks (only ``ivar == 0`` and non-finite values do).
        An ``int`` is used as the bit mask itself; an iterable lists bit names
        (:data:`SDSS_PIXMASK_BITS`) or bit numbers.

    Returns
    -------
    int
        The mask: a pixel is masked when ``and_mask & value != 0``.

    Examples
    --------
    >>> mask_value(["NOSKY", "BRIGHTSKY"]) == (1 << 22) | (1 << 23)
    True
    """
    if mask_bits is None or (isinstance(mask_bits, str) and mask_bits.lower() == "none"):
        return 0
    if isinstance(mask_bits, str):
        key = mask_bits.lower()
        if key == "default":
            return mask_value(DEFAULT_MASK_BITS)
        if key == "all":
            return sum(1 << b for n, b in SDSS_PIXMASK_BITS.items() if n != "EMLINE")
        if mask_bits.upper() in SDSS_PIXMASK_BITS:
            return 1 << SDSS_PIXMASK_BITS[mask_bits.upper()]
        raise OptionError(
            f"mask_bits={mask_bits!r} is not understood; use 'default', 'all', 'none', an int, "
            f"or a list of bit names from {sorted(SDSS_PIXMASK_BITS)}"
        )
    if isinstance(mask_bits, (int, np.integer)) and not isinstance(mask_bits, bool):
        if mask_bits < 0 or mask_bits >= 1 << 32:
            raise OptionError(f"mask_bits={mask_bits!r} must be a 32-bit unsigned bit mask")
        return int(mask_bits)
    value = 0
    for bit in mask_bits:
        if isinstance(bit, str):
            if bit.upper() not in SDSS_PIXMASK_BITS:
                raise OptionError(
                    f"mask_bits: unknown SDSS pixel-mask bit {bit!r}; known bits: {sorted(SDSS_PIXMASK_BITS)}"
                )
            value |= 1 << SDSS_PIXMASK_BITS[bit.upper()]
        elif isinstance(bit, (int, np.integer)) and 0 <= bit < 32:
            value |= 1 << int(bit)
        else:
            raise OptionError(f"mask_bits: {bit!r} is neither a bit name nor a bit number 0-31")
    return value


def _mask_names(value: int) -> list[str]:
    lookup = {b: n for n, b in SDSS_PIXMASK_BITS.items()}
    return [lookup.get(b, f"BIT{b}") for b in range(32) if value >> b & 1]
