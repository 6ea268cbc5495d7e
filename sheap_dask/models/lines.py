"""Rest wavelengths (vacuum, Angstrom) of the emission lines the built-in regions use.

Sources: the SDSS spectroscopic line list (vacuum wavelengths; classic.sdss.org
``dr7/algorithms/linestable``), which follows the NIST Atomic Spectra Database (Kramida et
al., NIST ASD v5); UV lines as in the quasar composite of Vanden Berk et al. (2001, AJ 122,
549, table 2). Doublets fitted as one line (MgII 2796/2803, CIV 1548/1551) use the
gf-weighted (2:1, optically thin) vacuum mean of the NIST components.

SDSS spectra and sheap_dask models use vacuum wavelengths throughout.
"""

from __future__ import annotations

__all__ = ["LINES", "OIII_RATIO", "NII_RATIO", "OI_RATIO", "rest_wavelength"]

#: line key -> vacuum rest wavelength (Angstrom)
LINES: dict[str, float] = {
    # optical
    "hbeta": 4862.68,
    "halpha": 6564.61,
    "hgamma": 4341.68,
    "oiii5007": 5008.24,
    "oiii4959": 4960.30,
    "heii4686": 4687.02,
    "nii6584": 6585.27,
    "nii6548": 6549.86,
    "sii6717": 6718.29,
    "sii6731": 6732.67,
    "oi6300": 6302.05,
    "oi6364": 6365.54,
    # UV
    "mgii": (2 * 2796.352 + 2803.531) / 3.0,  # 2798.745
    "civ": (2 * 1548.187 + 1550.772) / 3.0,  # 1549.049
    "heii1640": 1640.42,
    "oiii1663": 1663.48,
}

#: [OIII] 5007/4959 photon-flux ratio from the transition probabilities (Storey & Zeippen
#: 2000, MNRAS 312, 813): 2.98. Energy-flux ratio differs by 4960/5008 (< 1%); the usual
#: convention (and ours) applies 2.98 to the line fluxes.
OIII_RATIO = 2.98
#: [NII] 6584/6548 flux ratio: both lines come from the same upper level (1D2), so the ratio
#: is fixed by the ratio of transition probabilities, ~3 (Osterbrock & Ferland 2006, AGN^2;
#: Storey & Zeippen 2000 give 2.9-3.0); 3.0 is the value conventionally adopted in quasar
#: fits (e.g. Greene & Ho 2005, ApJ 630, 122).
NII_RATIO = 3.0
#: [OI] 6300/6364 flux ratio: the same upper level (1D2) again, ~3 (Storey & Zeippen 2000
#: give 3.1; Osterbrock & Ferland 2006); 3.0 as for [NII].
OI_RATIO = 3.0


def rest_wavelength(line: str) -> float:
    """Vacuum rest wavelength (Angstrom) of a catalogue line; KeyError names the known ones."""
    try:
        return LINES[line]
    except KeyError:
        raise KeyError(f"unknown line {line!r}; known lines: {', '.join(LINES)}") from None
