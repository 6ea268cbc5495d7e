"""Options of a fit: one frozen, validated record shared by the Dataset and chunk layers.

:class:`ChunkOptions` holds every option of the chunk layer; ``None`` fields take their
default from ``dask.config`` (``sheap_dask.*``, see ``sheap_dask.yaml``). ``resolved()``
fills and validates them on the client, before anything is submitted, so a bad value fails
there with a message naming the option, its value and the allowed range; options the chosen
method would ignore are refused with the reason.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping

import numpy as np

from . import config
from .errors import OptionError

__all__ = ["ChunkOptions", "check_penalty", "METHODS", "FALLBACKS", "LOSS_KINDS", "ERROR_SCALES"]

METHODS = ("lm", "adam", "lbfgs")
FALLBACKS = ("slsqp", "none")
LOSS_KINDS = ("logcosh", "chi2")
ERROR_SCALES = ("absolute", "redchi2")


@dataclasses.dataclass(frozen=True)
class ChunkOptions:
    """Every option of the chunk layer; ``None`` fields are filled from ``dask.config``.

    Frozen and hashable: it is part of the compile-cache key and is stored in result attrs.
    See ``sheap_dask.yaml`` for the meaning and default of each field.
    """

    method: str | None = None
    num_steps: int | None = None
    learning_rate: float | None = None
    lbfgs_options: tuple | None = None
    loss_kind: str | None = None
    robust_scale: float | None = None
    weighted: bool | None = None
    penalty_weight: float | None = None
    curvature_weight: float | None = None
    smoothness_weight: float | None = None
    max_weight: float | None = None
    rtol: float | None = None
    gtol: float | None = None
    fallback: str | None = None
    fallback_tol: float | None = None
    fallback_maxiter: int | None = None
    fallback_redchi2_sigma: float | None = None
    fallback_outliers: bool | None = None
    pinned_fraction: float | None = None
    error_scale: str | None = None
    min_extra_pixels: int | None = None
    return_history: bool | None = None
    dtype: str | None = None
    slots: int | None = None
    restarts: bool | None = None
    redchi2_sigma: float | None = None
    pinned_tolerance: float | None = None
    absorber_iterations: int | None = None
    absorber_sigma: float | None = None
    absorber_grow: int | None = None
    absorber_max_width: int | None = None
    absorber_max_fraction: float | None = None
    coverage_min: float | None = None
    coverage_flag: float | None = None
    coverage_line: float | None = None
    coverage_continuum: float | None = None
    detection_sigma: float | None = None
    n_mc: int | None = None

    _CONFIG_KEYS = {
        "method": "fit.method",
        "learning_rate": "fit.learning_rate",
        "lbfgs_options": "fit.lbfgs_options",
        "loss_kind": "loss.kind",
        "robust_scale": "loss.robust_scale",
        "weighted": "loss.weighted",
        "penalty_weight": "loss.penalty_weight",
        "curvature_weight": "loss.curvature_weight",
        "smoothness_weight": "loss.smoothness_weight",
        "max_weight": "loss.max_weight",
        "rtol": "convergence.rtol",
        "gtol": "convergence.gtol",
        "fallback": "fallback.method",
        "fallback_tol": "fallback.tol",
        "fallback_maxiter": "fallback.maxiter",
        "fallback_redchi2_sigma": "fallback.redchi2_sigma",
        "fallback_outliers": "fallback.outliers",
        "pinned_fraction": "fallback.pinned_fraction",
        "error_scale": "errors.scale",
        "min_extra_pixels": "screen.min_extra_pixels",
        "return_history": "fit.return_history",
        "dtype": "fit.dtype",
        "slots": "fit.lm_slots",
        "restarts": "fit.lm_restarts",
        "redchi2_sigma": "fit.restart_redchi2_sigma",
        "pinned_tolerance": "fit.restart_pinned_tolerance",
        "absorber_iterations": "absorbers.iterations",
        "absorber_sigma": "absorbers.sigma",
        "absorber_grow": "absorbers.grow",
        "absorber_max_width": "absorbers.max_width",
        "absorber_max_fraction": "absorbers.max_fraction",
        "coverage_min": "coverage.min",
        "coverage_flag": "coverage.flag",
        "coverage_line": "coverage.line",
        "coverage_continuum": "coverage.continuum",
        "detection_sigma": "lines.detection_sigma",
        "n_mc": "fit.n_mc",
    }

    def resolved(self) -> ChunkOptions:
        """A copy with every ``None`` replaced by its configured default, validated."""
        values = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None and field.name in self._CONFIG_KEYS:
                value = config.get(self._CONFIG_KEYS[field.name])
            values[field.name] = value
        method = values["method"]
        if values["num_steps"] is None:
            values["num_steps"] = config.get("fit.lm_max_iter") if method == "lm" else config.get("fit.num_steps")
        if isinstance(values["lbfgs_options"], Mapping):
            values["lbfgs_options"] = tuple(sorted(values["lbfgs_options"].items()))
        values["lbfgs_options"] = tuple(values["lbfgs_options"] or ())
        if values["fallback"] is None or values["fallback"] is False:
            values["fallback"] = "none"
        out = ChunkOptions(**values)
        out.validate()
        return out

    def validate(self) -> None:
        """Check every field's type and range, and that the method uses each option given.

        Raises :class:`OptionError` naming the option (the ``fit_dataset`` argument and its
        ``sheap_dask.*`` config key), its value and the allowed range. Runs on the client
        before anything is submitted.
        """
        for name, choices in (("method", METHODS), ("fallback", FALLBACKS), ("loss_kind", LOSS_KINDS),
                              ("error_scale", ERROR_SCALES), ("dtype", ("float32", "float64"))):
            if getattr(self, name) not in choices:
                raise OptionError(f"{self._label(name, getattr(self, name))} is not one of {', '.join(map(repr, choices))}; pick one of those{self._where(name)}.")
        for name, low, strict, high, kind in _RANGES:
            self._check_range(name, low, strict, high, kind)
        for name in ("weighted", "return_history", "restarts", "fallback_outliers"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise OptionError(f"{self._label(name, getattr(self, name))} must be True or False{self._where(name)}.")
        if self.lbfgs_options:
            from .minimizer import _LBFGS_KWARGS

            allowed = {"maxiter", "tolerance", *_LBFGS_KWARGS}
            unknown = {k for k, _ in self.lbfgs_options} - allowed
            if unknown:
                raise OptionError(f"lbfgs_options has unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}.")
        # options the chosen method would ignore: refused, with the reason
        ignored = []
        if self.method == "lm":
            if not self.weighted:
                ignored.append("weighted=False (LM fits the residuals weighted by 1/error; adam and lbfgs can fit unweighted)")
            for name in ("curvature_weight", "smoothness_weight", "max_weight"):
                if getattr(self, name):
                    ignored.append(f"{name}={getattr(self, name)!r} (LM minimises the data term only; adam and lbfgs add this term)")
        if self.method != "adam" and self.learning_rate is not None:
            ignored.append(f"learning_rate={self.learning_rate!r} (only method='adam' takes a step size)")
        if self.method != "lbfgs" and self.lbfgs_options:
            ignored.append(f"lbfgs_options={dict(self.lbfgs_options)!r} (only method='lbfgs' uses them)")
        if ignored:
            raise OptionError(
                f"method={self.method!r} ignores " + "; ".join(ignored) + ". Remove the option(s), or choose a method that uses them."
            )

    @classmethod
    def _label(cls, name: str, value) -> str:
        """``argument=value``: the option as a user passes it."""
        return f"{_ARGUMENTS.get(name, name)}={value!r}"

    @classmethod
    def _where(cls, name: str) -> str:
        """Where the default comes from, for the end of a message."""
        key = cls._CONFIG_KEYS.get(name)
        return f" (default from sheap_dask.{key})" if key else ""

    def _check_range(self, name: str, low: float, strict: bool, high: float, kind: type) -> None:
        value = getattr(self, name)
        if value is None and name == "learning_rate":
            return
        if kind is int:
            ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
        else:
            ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) and np.isfinite(value)
        if ok:
            ok = (value > low if strict else value >= low) and value <= high
        if not ok:
            bound = f"{'>' if strict else '>='} {low:g}" + (f" and <= {high:g}" if np.isfinite(high) else "")
            raise OptionError(f"{self._label(name, value)} must be {'an integer' if kind is int else 'a finite number'} {bound}{self._where(name)}.")

    # Fields that do not change any compiled program (they steer the numpy side of a chunk).
    _RUNTIME_ONLY = ("fallback", "fallback_tol", "fallback_maxiter", "fallback_redchi2_sigma", "fallback_outliers", "pinned_fraction", "error_scale",
                     "min_extra_pixels", "return_history", "restarts", "redchi2_sigma", "pinned_tolerance", "absorber_iterations",
                     "absorber_sigma", "absorber_grow", "absorber_max_width", "absorber_max_fraction", "coverage_min", "coverage_flag",
                     "coverage_line", "coverage_continuum", "detection_sigma", "n_mc")

    def compile_key(self) -> ChunkOptions:
        """These options with the fields that do not change compiled code cleared: the part
        of the compile-cache key that options contribute."""
        return dataclasses.replace(self, **{name: None for name in self._RUNTIME_ONLY})

    def to_dict(self) -> dict:
        """JSON-serializable options (stored in result attrs and compared on resume)."""
        d = dataclasses.asdict(self)
        d["lbfgs_options"] = dict(self.lbfgs_options)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, default=str)


# (field, low, strictly above low, high, type) of every numeric option
_RANGES = (
    ("num_steps", 0, True, np.inf, int),
    ("learning_rate", 0, True, np.inf, float),
    ("robust_scale", 0, True, np.inf, float),
    ("penalty_weight", 0, False, np.inf, float),
    ("curvature_weight", 0, False, np.inf, float),
    ("smoothness_weight", 0, False, np.inf, float),
    ("max_weight", 0, False, np.inf, float),
    ("rtol", 0, False, 1.0, float),
    ("gtol", 0, False, np.inf, float),
    ("fallback_tol", 0, True, np.inf, float),
    ("fallback_maxiter", 0, True, np.inf, int),
    ("fallback_redchi2_sigma", 0, True, np.inf, float),
    ("pinned_fraction", 0, False, 0.5, float),
    ("min_extra_pixels", 0, False, np.inf, int),
    ("slots", 0, False, np.inf, int),
    ("redchi2_sigma", 0, True, np.inf, float),
    ("pinned_tolerance", 0, False, 0.5, float),
    ("absorber_iterations", 0, False, 10, int),
    ("absorber_sigma", 0, True, np.inf, float),
    ("absorber_grow", 0, False, 20, int),
    ("absorber_max_width", 1, False, 1000, int),
    ("absorber_max_fraction", 0, False, 1.0, float),
    ("coverage_min", 0, False, 1.0, float),
    ("coverage_flag", 0, False, 1.0, float),
    ("coverage_line", 0, False, 1.0, float),
    ("coverage_continuum", 0, False, 1.0, float),
    ("detection_sigma", 0, False, np.inf, float),
    ("n_mc", 0, False, 10000, int),
)
# field -> how a user passes it to fit_dataset
_ARGUMENTS = {
    "fallback_tol": "fallback_options['tol']",
    "fallback_maxiter": "fallback_options['maxiter']",
    "fallback_redchi2_sigma": "fallback_options['redchi2_sigma']",
    "fallback_outliers": "fallback_options['outliers']",
    "pinned_fraction": "fallback_options['pinned_fraction']",
    "slots": "lm_slots",
    "restarts": "lm_restarts",
    "redchi2_sigma": "restart_redchi2_sigma",
    "pinned_tolerance": "restart_pinned_tolerance",
}


def check_penalty(options: ChunkOptions, penalty_function, penalty_weight=None) -> None:
    """Refuse a penalty the method would ignore, and a weight without a penalty."""
    if penalty_function is None:
        if penalty_weight is not None:
            raise OptionError(
                f"penalty_weight={penalty_weight!r} has no effect without penalty_function=...; pass the penalty "
                "f(wavelength, phys_params) -> scalar too, or drop penalty_weight."
            )
        return
    if not callable(penalty_function):
        raise OptionError(f"penalty_function={penalty_function!r} must be a callable f(wavelength, phys_params) -> scalar, or None.")
    if options.method == "lm":
        raise OptionError(
            "method='lm' ignores penalty_function (LM minimises the weighted residuals only); use method='adam' "
            "or method='lbfgs' to add a penalty term."
        )

