"""``ds.sheap``, under its documented import path: see :mod:`sheap_dask.explore`.

``sd.accessor.register_model(model)`` keeps a model alive so fit results find it by identity;
the accessor itself is :class:`sheap_dask.explore.accessor.SheapAccessor`.
"""

from __future__ import annotations

from .explore.accessor import SheapAccessor
from .explore.link import register_model, registered_model

__all__ = ["SheapAccessor", "register_model", "registered_model"]
