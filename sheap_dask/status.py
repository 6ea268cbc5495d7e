"""Per-spectrum fit status: an int8 code whose members carry their message.

A batched solve never raises for the batch: every spectrum gets one of these codes, stored
in the result Dataset's ``status`` variable with CF ``flag_values``/``flag_meanings`` attrs.

``PENDING`` is never the outcome of a fit: it is the fill value of a fit store's ``status``
array, so the rows of a chunk that was never written read as "not fitted yet", not as
``converged`` (0).
"""

from __future__ import annotations

import enum

import numpy as np

__all__ = ["Status", "status_attrs"]


class Status(enum.IntEnum):
    """Outcome of one spectrum's fit (stored as int8)."""

    CONVERGED = 0
    CONVERGED_AFTER_FALLBACK = 1
    MAX_ITER = 2
    NO_DATA = 3
    NONFINITE = 4
    FAILED = 5
    PENDING = -1

    @property
    def message(self) -> str:
        return _MESSAGES[self]

    @property
    def meaning(self) -> str:
        """Lower-case CF flag meaning, e.g. ``converged_after_fallback``."""
        return self.name.lower()

    @property
    def ok(self) -> bool:
        """True for the statuses whose parameters can be trusted."""
        return self in (Status.CONVERGED, Status.CONVERGED_AFTER_FALLBACK)


_MESSAGES = {
    Status.CONVERGED: "converged: the convergence test passed",
    Status.CONVERGED_AFTER_FALLBACK: "converged after the batched solve failed, by the SLSQP fallback",
    Status.MAX_ITER: "stopped at the iteration limit before the convergence test passed",
    Status.NO_DATA: "no usable pixel (or fewer than the free parameters): not fitted",
    Status.NONFINITE: "the loss or the parameters became NaN or infinite",
    Status.FAILED: "the fit failed (and the fallback, if any, did not recover it)",
    Status.PENDING: "not fitted yet: this row's chunk was never written into the store (an interrupted or running fit)",
}


def status_attrs() -> dict:
    """CF flag attributes for a ``status`` variable."""
    return {
        "flag_values": np.array([s.value for s in Status], dtype=np.int8),
        "flag_meanings": " ".join(s.meaning for s in Status),
        "long_name": "fit status",
    }
