"""Per-spectrum quality bits: what a converged fit still needs a reader to know.

A fit can converge and still be doubtful: a parameter ended at a bound, the spectrum covers
only part of the model's window, absorbers were masked, its chi-square is an outlier of its
chunk, the fallback finished it, a broad line is not detected. Each is one bit of the
``quality`` variable (CF ``flag_masks``/``flag_meanings``); 0 means none of them.
"""

from __future__ import annotations

import enum

import numpy as np

__all__ = ["Quality", "quality_attrs", "decode_quality"]


class Quality(enum.IntFlag):
    """Bits of the ``quality`` bitmask (stored as int32)."""

    PARAM_AT_BOUND = 1
    WINDOW_INCOMPLETE = 2
    ABSORBERS_MASKED = 4
    CHI2_OUTLIER = 8
    FALLBACK_USED = 16
    ERRORS_UNDEFINED = 32
    BROAD_LINE_UNDETECTED = 64
    NARROW_LINE_UNDETECTED = 128

    @property
    def meaning(self) -> str:
        return str(self.name).lower()

    @property
    def message(self) -> str:
        return _MESSAGES[self]


_MESSAGES = {
    Quality.PARAM_AT_BOUND: ("a free parameter ended within restart_pinned_tolerance of its range from a bound (see at_bound);"
                             " a flux or template weight at its zero lower bound and the shape of an absent component (all its fluxes at zero) do not count"),
    Quality.WINDOW_INCOMPLETE: "the usable pixels cover less than sheap_dask.coverage.flag of the model's window",
    Quality.ABSORBERS_MASKED: "narrow absorption troughs (or sky residuals) far below the model were masked and the fit repeated (see n_masked)",
    Quality.CHI2_OUTLIER: "reduced chi-square above median * (1 + redchi2_sigma * sqrt(2/dof)) of its chunk",
    Quality.FALLBACK_USED: "the SLSQP fallback produced the final parameters",
    Quality.ERRORS_UNDEFINED: ("some parameter errors are NaN: a degenerate direction of the covariance"
                               " (those of an absent component's shape and of a resting-bound parameter, a host"
                               " dispersion near 0, do not count)"),
    Quality.BROAD_LINE_UNDETECTED: "a broad line's flux is below its detection threshold (flux / error)",
    Quality.NARROW_LINE_UNDETECTED: "a narrow line's flux is below its detection threshold (flux / error)",
}


def quality_attrs() -> dict:
    """CF flag attributes of a ``quality`` variable."""
    return {
        "flag_masks": np.array([q.value for q in Quality], dtype=np.int32),
        "flag_meanings": " ".join(q.meaning for q in Quality),
        "long_name": "fit quality bitmask (0: no caveat)",
    }


def decode_quality(value: int) -> list[str]:
    """The meanings of the bits set in ``value``."""
    return [q.meaning for q in Quality if int(value) & q.value]
