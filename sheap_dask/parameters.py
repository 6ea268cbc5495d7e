"""Named fit parameters: bounds, ties, fixed values and the raw <-> physical map.

An optimizer works on an unconstrained *raw* vector holding only the free parameters. The
physical vector (all parameters, in the order they were added) is rebuilt from it by
:meth:`Parameters.raw_to_phys`, a pure ``jax.numpy`` function (jit- and vmap-able):

* free parameter with two finite bounds ``lo < hi``: ``phys = lo + (hi - lo) * sigmoid(raw)``;
* free parameter with only a lower bound: ``phys = lo + softplus(raw)``;
* free parameter with only an upper bound: ``phys = hi - softplus(-raw)``;
* free parameter without bounds: ``phys = raw``;
* fixed parameter: its value (or a per-spectrum value passed as ``values``);
* tied parameter ``target = source OP operand``: rebuilt from its (free) source.

The transform of each parameter is chosen at run time from the finiteness of the bounds in
use, so per-spectrum bounds ``lower``/``upper`` of shape (batch, n_params) work with the same
compiled function. Bounds of a *tied* parameter are informative only: its value follows its
source exactly.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ParameterSpecError

__all__ = ["Parameter", "Parameters", "parse_tie"]

#: Operators a tie may use: ``target = source OP operand``.
TIE_OPERATORS = ("*", "/", "+", "-")

# Starting points are kept this fraction of the span away from a finite bound: at the bound
# itself the logistic/softplus map has zero slope and a gradient optimizer would never move.
_INIT_MARGIN = 1e-6

_NAME_RE = r"[A-Za-z_][A-Za-z0-9_.]*"
_NUMBER_RE = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"


@dataclass(frozen=True)
class Parameter:
    """One parameter: name, (initial or fixed) value, bounds, tie and fixed flag.

    ``tie`` is ``None`` or the 4-tuple ``(target, source, op, operand)`` with ``target ==
    name``; ``min``/``max`` are ``-inf``/``+inf`` when unbounded.
    """

    name: str
    value: float
    min: float = -math.inf
    max: float = math.inf
    tie: tuple[str, str, str, float] | None = None
    fixed: bool = False

    @property
    def free(self) -> bool:
        """True when the optimizer varies this parameter (neither fixed nor tied)."""
        return not self.fixed and self.tie is None

    @property
    def tie_string(self) -> str | None:
        """The tie as ``"target = source OP operand"`` (``None`` when untied)."""
        if self.tie is None:
            return None
        target, source, op, operand = self.tie
        return f"{target} = {source} {op} {operand!r}"


def parse_tie(tie: str | Sequence, target: str | None = None) -> tuple[str, str, str, float]:
    """Normalise a tie to ``(target, source, op, operand)``.

    Parameters
    ----------
    tie : str or tuple
        ``"target = source OP number"`` (``"target = source"`` means ``* 1``), a 4-tuple
        ``(target, source, op, operand)`` or, when ``target`` is given, the short 3-tuple
        ``(source, op, operand)``. ``op`` is one of ``* / + -``.
    target : str, optional
        The parameter being tied (the name passed to :meth:`Parameters.add`). When given, a
        tie naming another target is an error.

    Returns
    -------
    tuple
        ``(target, source, op, operand)`` with ``operand`` a float.

    Raises
    ------
    ParameterSpecError
        Malformed tie, unknown operator, non-finite operand or division by zero.
    """
    where = f" for parameter {target!r}" if target else ""
    if isinstance(tie, str):
        m = re.fullmatch(rf"\s*({_NAME_RE})\s*=\s*({_NAME_RE})\s*(.*?)\s*", tie)
        if m is None:
            raise ParameterSpecError(
                f"tie {tie!r}{where} is malformed; write it as 'target = source OP number', "
                "e.g. 'oiii4959_flux = oiii5007_flux / 2.98'."
            )
        tgt, source, rest = m.group(1), m.group(2), m.group(3)
        if rest == "":
            op, operand = "*", 1.0
        else:
            m2 = re.fullmatch(rf"(.+?)\s*({_NUMBER_RE})", rest)
            if m2 is None:
                if rest[:1] in TIE_OPERATORS:
                    raise ParameterSpecError(
                        f"tie {tie!r}{where}: the operand after {rest[:1]!r} must be a number; "
                        "write 'target = source OP number'."
                    )
                raise ParameterSpecError(
                    f"tie {tie!r}{where} uses unknown operator {rest.split()[0]!r}; "
                    f"use one of {' '.join(TIE_OPERATORS)} ('target = source OP number')."
                )
            op, operand = m2.group(1), float(m2.group(2))
    elif isinstance(tie, (tuple, list)) and len(tie) in (3, 4):
        if len(tie) == 3:
            if target is None:
                raise ParameterSpecError(
                    f"tie {tuple(tie)!r} has no target; use (target, source, op, operand) or "
                    "the string form 'target = source OP number'."
                )
            tgt, (source, op, operand) = target, tie
        else:
            tgt, source, op, operand = tie
        try:
            operand = float(operand)
        except (TypeError, ValueError):
            raise ParameterSpecError(
                f"tie {tuple(tie)!r}{where}: operand {operand!r} is not a number."
            ) from None
    else:
        raise ParameterSpecError(
            f"tie {tie!r}{where} must be a string 'target = source OP number' or a tuple "
            "(target, source, op, operand) / (source, op, operand)."
        )
    if op not in TIE_OPERATORS:
        raise ParameterSpecError(
            f"tie {tie!r}{where} uses unknown operator {op!r}; use one of {' '.join(TIE_OPERATORS)}."
        )
    if not math.isfinite(operand):
        raise ParameterSpecError(f"tie {tie!r}{where}: operand {operand!r} must be finite.")
    if op == "/" and operand == 0.0:
        raise ParameterSpecError(f"tie {tie!r}{where} divides by zero; use a non-zero operand.")
    if target is not None and tgt != target:
        raise ParameterSpecError(
            f"tie {tie!r} ties {tgt!r} but was given for parameter {target!r}; the target of a "
            f"tie passed to add() must be the parameter itself ('{target} = source OP number')."
        )
    return str(tgt), str(source), op, operand


class Parameters:
    """An ordered collection of named parameters with bounds, ties and fixed values.

    Build it with chained :meth:`add` calls; the order of addition is the order of the
    physical parameter vector that model functions receive.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from sheap_dask import Parameters
    >>> p = (Parameters()
    ...      .add("oiii5007_flux", 10.0, min=0.0)
    ...      .add("oiii4959_flux", 3.3, tie="oiii4959_flux = oiii5007_flux / 2.98")
    ...      .add("center", 5007.0, min=5000.0, max=5015.0)
    ...      .add("slope", 0.0, fixed=True))
    >>> p.free_names
    ['oiii5007_flux', 'center']
    >>> raw = p.raw_init()
    >>> phys = p.raw_to_phys(raw)
    >>> [round(float(v), 4) for v in phys]
    [10.0, 3.3557, 5007.0, 0.0]
    """

    def __init__(self) -> None:
        self._params: dict[str, Parameter] = {}
        self._cache: dict[str, Any] = {}

    # -- building ------------------------------------------------------------------------
    def add(
        self,
        name: str,
        value: float,
        *,
        min: float | None = None,
        max: float | None = None,
        tie: str | Sequence | None = None,
        fixed: bool = False,
    ) -> Parameters:
        """Add a parameter; returns ``self`` so calls chain.

        Parameters
        ----------
        name : str
            Unique name (letters, digits, ``_`` and ``.``; must not start with a digit).
        value : float
            Initial value (the value itself for a fixed parameter). Must lie within bounds.
        min, max : float, optional
            Bounds; ``None`` (or an infinite value) means unbounded on that side. A fit never
            leaves them. ``min`` must be strictly below ``max``.
        tie : str or tuple, optional
            ``"name = source OP number"``, ``(source, op, operand)`` or
            ``(name, source, op, operand)``; op in ``* / + -``. The source must already be
            added, be free (not fixed, not tied itself).
        fixed : bool
            Keep the parameter at ``value`` (or at a per-spectrum value, see
            :meth:`raw_to_phys`).

        Raises
        ------
        ParameterSpecError
            Duplicate or invalid name, non-finite value, ``min >= max``, value outside the
            bounds, a tie that is malformed or points to an unknown, fixed or tied source,
            a tied parameter that is also fixed.
        """
        if not isinstance(name, str) or re.fullmatch(_NAME_RE, name) is None:
            raise ParameterSpecError(
                f"parameter name {name!r} is invalid; use letters, digits, '_' and '.', not "
                "starting with a digit (e.g. 'hbeta_broad_fwhm')."
            )
        if name in self._params:
            raise ParameterSpecError(
                f"duplicate parameter name {name!r}; every parameter needs a unique name."
            )
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ParameterSpecError(f"parameter {name!r}: value {value!r} is not a number.") from None
        if not math.isfinite(value):
            raise ParameterSpecError(f"parameter {name!r}: value {value!r} must be finite.")
        lo = _bound(name, "min", min, -math.inf)
        hi = _bound(name, "max", max, math.inf)
        if not lo < hi:
            raise ParameterSpecError(
                f"parameter {name!r}: min={lo!r} must be strictly less than max={hi!r}; "
                "use fixed=True to hold a parameter at one value."
            )
        if not lo <= value <= hi:
            raise ParameterSpecError(
                f"parameter {name!r}: value {value!r} is outside its bounds [{lo!r}, {hi!r}]; "
                "move the value inside or widen the bounds."
            )
        tie_t = None
        if tie is not None:
            if fixed:
                raise ParameterSpecError(
                    f"parameter {name!r} is both fixed and tied; use one or the other."
                )
            tie_t = parse_tie(tie, target=name)
            self._check_source(name, tie_t)
        self._params[name] = Parameter(name, value, lo, hi, tie_t, bool(fixed))
        self._cache.clear()
        return self

    def tie(self, tie: str | Sequence) -> Parameters:
        """Tie an existing parameter to another: ``p.tie("a = b * 2")``; returns ``self``.

        Raises
        ------
        ParameterSpecError
            Unknown target or source, fixed target, fixed or tied source, a tie cycle, or a
            target that other parameters are tied to.
        """
        target, source, op, operand = parse_tie(tie)
        if target not in self._params:
            raise ParameterSpecError(
                f"tie {tie!r}: unknown parameter {target!r}; add it first (known: {self._known()})."
            )
        old = self._params[target]
        if old.fixed:
            raise ParameterSpecError(
                f"tie {tie!r}: parameter {target!r} is fixed; a fixed parameter cannot be tied."
            )
        dependants = [p.name for p in self._params.values() if p.tie is not None and p.tie[1] == target]
        if dependants and source != target:
            # Tying a source would chain ties; detect the cycle case for a clearer message.
            if source in dependants:
                raise ParameterSpecError(
                    f"tie {tie!r} creates a tie cycle: {source!r} is already tied to {target!r}."
                )
            raise ParameterSpecError(
                f"tie {tie!r}: parameter {target!r} is the source of the tie(s) of {dependants}; "
                "a tie source must stay free, so tie those to a free parameter instead."
            )
        self._check_source(target, (target, source, op, operand))
        self._params[target] = Parameter(target, old.value, old.min, old.max, (target, source, op, operand), False)
        self._cache.clear()
        return self

    def _check_source(self, target: str, tie_t: tuple[str, str, str, float]) -> None:
        source = tie_t[1]
        text = f"{tie_t[0]} = {tie_t[1]} {tie_t[2]} {tie_t[3]!r}"
        if source == target:
            raise ParameterSpecError(
                f"parameter {target!r}: tie {text!r} is a tie cycle (the parameter is tied to itself)."
            )
        if source not in self._params:
            raise ParameterSpecError(
                f"parameter {target!r}: tie {text!r} refers to unknown parameter {source!r}; "
                f"add the source before the parameter tied to it (known: {self._known()})."
            )
        src = self._params[source]
        if src.fixed:
            raise ParameterSpecError(
                f"parameter {target!r}: tie {text!r} refers to fixed parameter {source!r}; "
                "tie to a free parameter, or fix the target too."
            )
        if src.tie is not None:
            if src.tie[1] == target:
                raise ParameterSpecError(
                    f"parameter {target!r}: tie {text!r} creates a tie cycle: {source!r} is "
                    f"already tied to {target!r}."
                )
            raise ParameterSpecError(
                f"parameter {target!r}: tie {text!r} refers to {source!r}, which is itself tied "
                f"({src.tie_string!r}); tie to its free source {src.tie[1]!r} instead."
            )

    def _known(self) -> str:
        names = list(self._params)
        return ", ".join(names) if names else "none yet"

    def copy(self) -> Parameters:
        """An independent copy."""
        new = Parameters()
        new._params = dict(self._params)
        return new

    def fix(self, names) -> Parameters:
        """Fix the free parameters ``names`` at their values; returns ``self``.

        Raises ParameterSpecError for an unknown name, a tied parameter, or a parameter that
        other parameters are tied to (a tie needs a free source).
        """
        for name in names:
            p = self[name]
            if p.tie is not None:
                raise ParameterSpecError(f"cannot fix {name!r}: it is tied ({p.tie_string}); fix its source instead.")
            sources = [q.name for q in self._params.values() if q.tie is not None and q.tie[1] == name]
            if sources:
                raise ParameterSpecError(f"cannot fix {name!r}: {sources} are tied to it.")
            self._params[name] = dataclasses.replace(p, fixed=True)
        self._cache.clear()
        return self

    # -- introspection -------------------------------------------------------------------
    def __getitem__(self, name: str) -> Parameter:
        try:
            return self._params[name]
        except KeyError:
            raise KeyError(f"no parameter named {name!r}; known: {self._known()}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._params

    def __iter__(self) -> Iterator[Parameter]:
        return iter(self._params.values())

    def __len__(self) -> int:
        return len(self._params)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Parameters) and list(self._params.values()) == list(other._params.values())

    def __repr__(self) -> str:
        lines = [f"Parameters(n_params={self.n_params}, n_free={self.n_free})"]
        for p in self._params.values():
            kind = "fixed" if p.fixed else (f"tie: {p.tie_string}" if p.tie else "free")
            lines.append(f"  {p.name:<24} {p.value:<12.6g} [{p.min:.6g}, {p.max:.6g}]  {kind}")
        return "\n".join(lines)

    @property
    def names(self) -> list[str]:
        """All parameter names, in the order of the physical vector."""
        return list(self._params)

    @property
    def free_names(self) -> list[str]:
        """Names of the free parameters, in the order of the raw vector."""
        return [p.name for p in self._params.values() if p.free]

    @property
    def n_params(self) -> int:
        return len(self._params)

    @property
    def n_free(self) -> int:
        return len(self.free_names)

    @property
    def values(self) -> np.ndarray:
        """Initial (or fixed) values, (n_params,) float64."""
        return np.array([p.value for p in self._params.values()], dtype=np.float64)

    @property
    def lower(self) -> np.ndarray:
        """Lower bounds, (n_params,) float64, ``-inf`` where unbounded."""
        return np.array([p.min for p in self._params.values()], dtype=np.float64)

    @property
    def upper(self) -> np.ndarray:
        """Upper bounds, (n_params,) float64, ``+inf`` where unbounded."""
        return np.array([p.max for p in self._params.values()], dtype=np.float64)

    @property
    def fixed_names(self) -> list[str]:
        return [p.name for p in self._params.values() if p.fixed]

    @property
    def tied_names(self) -> list[str]:
        return [p.name for p in self._params.values() if p.tie is not None]

    @property
    def ties(self) -> list[tuple[str, str, str, float]]:
        """All ties as ``(target, source, op, operand)``."""
        return [p.tie for p in self._params.values() if p.tie is not None]

    def index(self, name: str) -> int:
        """Position of ``name`` in the physical vector."""
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"no parameter named {name!r}; known: {self._known()}") from None

    # -- the linear algebra of free -> physical ------------------------------------------
    def embedding(self) -> tuple[np.ndarray, np.ndarray]:
        """``(E, fixed_mask)``: the linear map from free to all physical parameters.

        Ties are affine in their source (``target = source OP c``) and fixed values are
        constants, so ``phys = offsets + E @ free`` with ``E`` (n_params, n_free);
        ``fixed_mask`` marks the parameters no free one moves. Used for the covariance of
        tied parameters and by the SLSQP fallback, which works in physical units.
        """
        names = self.names
        free = self.free_names
        E = np.zeros((len(names), len(free)))
        for j, name in enumerate(free):
            E[names.index(name), j] = 1.0
        for target, source, op, operand in self.ties:
            factor = operand if op == "*" else 1.0 / operand if op == "/" else 1.0
            E[names.index(target)] = E[names.index(source)] * factor
        return E, ~np.any(E != 0, axis=1)

    def expand_free(self, free, reference) -> np.ndarray:
        """All physical parameters from the free ones: ``offsets + E @ free`` (float64).

        Tied values are rebuilt exactly from their sources; fixed values come from
        ``reference``, the additive offsets of ``+``/``-`` ties from the ties. ``free`` is
        (n_free,) or (n, n_free), ``reference`` (n_params,) or (n, n_params); ``free = 0``
        gives the offsets alone.
        """
        E, fixed_mask = self.embedding()
        names = self.names
        offsets = np.where(fixed_mask, np.asarray(reference, dtype=np.float64), 0.0)
        for target, _source, op, operand in self.ties:
            if op in "+-":
                offsets[..., names.index(target)] = operand if op == "+" else -operand
        return offsets + np.asarray(free, dtype=np.float64) @ E.T

    # -- serialization -------------------------------------------------------------------
    def spec(self) -> list[dict]:
        """JSON-serializable description: one dict per parameter (``None`` for no bound)."""
        return [
            {
                "name": p.name,
                "value": p.value,
                "min": p.min if math.isfinite(p.min) else None,
                "max": p.max if math.isfinite(p.max) else None,
                "tie": p.tie_string,
                "fixed": p.fixed,
            }
            for p in self._params.values()
        ]

    @classmethod
    def from_spec(cls, spec: Iterable[dict]) -> Parameters:
        """Rebuild from :meth:`spec` output (ties are applied after all parameters exist)."""
        p = cls()
        ties = []
        for d in spec:
            d = dict(d)
            if "name" not in d or "value" not in d:
                raise ParameterSpecError(f"parameter spec {d!r} needs at least 'name' and 'value'.")
            p.add(d["name"], d["value"], min=d.get("min"), max=d.get("max"), fixed=bool(d.get("fixed", False)))
            if d.get("tie"):
                ties.append(d["tie"])
        for t in ties:
            p.tie(t)
        return p

    # -- the raw <-> physical map (pure jax.numpy) -----------------------------------------
    def _indices(self) -> dict[str, Any]:
        if "idx" not in self._cache:
            names = self.names
            pos = {n: i for i, n in enumerate(names)}
            free = [pos[n] for n in self.free_names]
            fixed = [pos[n] for n in self.fixed_names]
            ties = [(pos[t], pos[s], op, operand) for t, s, op, operand in self.ties]
            self._cache["idx"] = {"free": np.array(free, dtype=np.int32), "fixed": np.array(fixed, dtype=np.int32), "ties": ties}
        return self._cache["idx"]

    def _bounds(self, lower, upper, dtype, name="bounds"):
        import jax.numpy as jnp

        lo = self.lower if lower is None else lower
        hi = self.upper if upper is None else upper
        lo = jnp.asarray(lo, dtype=dtype)
        hi = jnp.asarray(hi, dtype=dtype)
        for arr, what in ((lo, "lower"), (hi, "upper")):
            if arr.ndim == 0 or arr.shape[-1] != self.n_params:
                raise ParameterSpecError(
                    f"{what} bounds have shape {tuple(arr.shape)}; expected (n_params,) or "
                    f"(batch, n_params) with n_params={self.n_params}."
                )
        return lo, hi

    def raw_to_phys(self, raw, lower=None, upper=None, values=None):
        """Map raw (optimizer) vectors to physical parameter vectors.

        Parameters
        ----------
        raw : array, (n_free,) or (batch, n_free)
            Unconstrained values of the free parameters.
        lower, upper : array, (n_params,) or (batch, n_params), optional
            Bounds to use instead of ``self.lower``/``self.upper`` (e.g. per spectrum);
            ``-inf``/``+inf`` means unbounded. Only the entries of free parameters matter.
        values : array, (n_params,) or (batch, n_params), optional
            Values for the fixed parameters (default ``self.values``); other entries ignored.

        Returns
        -------
        jax.Array, (n_params,) or (batch, n_params)
            Physical values in the dtype of ``raw``: free ones inside their bounds, fixed
            ones inserted, tied ones rebuilt exactly from their sources.
        """
        import jax.numpy as jnp

        raw = jnp.asarray(raw)
        if not jnp.issubdtype(raw.dtype, jnp.floating):
            raw = raw.astype(jnp.result_type(float))
        dtype = raw.dtype
        if raw.ndim == 0 or raw.shape[-1] != self.n_free:
            raise ParameterSpecError(
                f"raw vector has shape {tuple(raw.shape)}; expected (n_free,) or (batch, n_free) "
                f"with n_free={self.n_free} (free parameters: {self.free_names})."
            )
        idx = self._indices()
        lo, hi = self._bounds(lower, upper, dtype)
        vals = jnp.asarray(self.values if values is None else values, dtype=dtype)
        batch = jnp.broadcast_shapes(raw.shape[:-1], lo.shape[:-1], hi.shape[:-1], vals.shape[:-1])
        phys_free = _forward(raw, lo[..., idx["free"]], hi[..., idx["free"]])
        out = jnp.zeros(batch + (self.n_params,), dtype=dtype)
        out = out.at[..., idx["free"]].set(jnp.broadcast_to(phys_free, batch + (len(idx["free"]),)))
        if len(idx["fixed"]):
            out = out.at[..., idx["fixed"]].set(jnp.broadcast_to(vals[..., idx["fixed"]], batch + (len(idx["fixed"]),)))
        for t, s, op, operand in idx["ties"]:
            out = out.at[..., t].set(_apply_op(out[..., s], op, operand))
        return out

    def phys_to_raw(self, phys, lower=None, upper=None):
        """Inverse of :meth:`raw_to_phys` for the free parameters.

        Values on or beyond a bound are clipped just inside it (the map cannot reach the
        bound itself), so the result is always finite.

        Parameters
        ----------
        phys : array, (n_params,) or (batch, n_params)
            Physical values (entries of fixed and tied parameters are ignored).
        lower, upper : array, (n_params,) or (batch, n_params), optional
            Bounds, as in :meth:`raw_to_phys`.

        Returns
        -------
        jax.Array, (n_free,) or (batch, n_free)
        """
        import jax.numpy as jnp

        phys = jnp.asarray(phys)
        if not jnp.issubdtype(phys.dtype, jnp.floating):
            phys = phys.astype(jnp.result_type(float))
        if phys.ndim == 0 or phys.shape[-1] != self.n_params:
            raise ParameterSpecError(
                f"physical vector has shape {tuple(phys.shape)}; expected (n_params,) or "
                f"(batch, n_params) with n_params={self.n_params} ({self.names})."
            )
        idx = self._indices()
        lo, hi = self._bounds(lower, upper, phys.dtype)
        return _inverse(phys[..., idx["free"]], lo[..., idx["free"]], hi[..., idx["free"]])

    def raw_init(self, values=None, lower=None, upper=None):
        """Raw starting vector(s) from physical values.

        Parameters
        ----------
        values : array, (n_params,) or (batch, n_params), optional
            Physical starting values (default ``self.values``); per-spectrum values allowed.
            Values outside the bounds are clipped in, and values within a tiny margin of a
            finite bound are moved that margin inside, where the map's slope is not zero.
        lower, upper : array, optional
            Bounds, as in :meth:`raw_to_phys`.

        Returns
        -------
        jax.Array, (n_free,) or (batch, n_free)
            In the dtype of ``values`` (float64 default values follow JAX's x64 setting).
        """
        import jax.numpy as jnp

        vals = jnp.asarray(self.values if values is None else values)
        if not jnp.issubdtype(vals.dtype, jnp.floating):
            vals = vals.astype(jnp.result_type(float))
        lo, hi = self._bounds(lower, upper, vals.dtype)
        both, low, up, lo_s, hi_s = _masks(lo, hi)
        # Two bounds: keep a fraction of the span away from each. One bound: only values on or
        # beyond it move (by a fraction of |bound|, at least of 1), so tiny positive values of
        # a min=0 parameter (fluxes in cgs units) are kept as they are.
        margin = _INIT_MARGIN * jnp.where(both, hi_s - lo_s, jnp.maximum(jnp.abs(jnp.where(low, lo_s, hi_s)), 1.0))
        floor = jnp.where(both, lo_s + margin, jnp.where(low, lo_s, -jnp.inf))
        ceil = jnp.where(both, hi_s - margin, jnp.where(up, hi_s, jnp.inf))
        vals = jnp.clip(vals, floor, ceil)
        vals = jnp.where(low & (vals <= lo_s), lo_s + margin, vals)
        vals = jnp.where(up & (vals >= hi_s), hi_s - margin, vals)
        return self.phys_to_raw(vals, lo, hi)


def _bound(name: str, which: str, v, default: float) -> float:
    if v is None:
        return default
    try:
        v = float(v)
    except (TypeError, ValueError):
        raise ParameterSpecError(f"parameter {name!r}: {which}={v!r} is not a number.") from None
    if math.isnan(v):
        raise ParameterSpecError(f"parameter {name!r}: {which} is NaN; use None for no bound.")
    if which == "min" and v == math.inf or which == "max" and v == -math.inf:
        raise ParameterSpecError(f"parameter {name!r}: {which}={v!r} leaves no admissible value.")
    return v


def _apply_op(x, op: str, operand: float):
    if op == "*":
        return x * operand
    if op == "/":
        return x / operand
    if op == "+":
        return x + operand
    return x - operand


def _masks(lo, hi):
    import jax.numpy as jnp

    lo_f, hi_f = jnp.isfinite(lo), jnp.isfinite(hi)
    # Infinite bounds are replaced by harmless finite numbers before any arithmetic, so the
    # branches not selected stay finite and so do their gradients (the double-where trick).
    return lo_f & hi_f, lo_f & ~hi_f, ~lo_f & hi_f, jnp.where(lo_f, lo, 0.0), jnp.where(hi_f, hi, 1.0)


def _forward(raw, lo, hi):
    import jax
    import jax.numpy as jnp

    both, low, up, lo_s, hi_s = _masks(lo, hi)
    logistic = lo_s + (hi_s - lo_s) * jax.nn.sigmoid(raw)
    lower_only = lo_s + jax.nn.softplus(raw)
    upper_only = hi_s - jax.nn.softplus(-raw)
    out = jnp.where(both, logistic, jnp.where(low, lower_only, jnp.where(up, upper_only, raw)))
    # Rounding can land a hair outside [lo, hi] for huge |raw|; never return outside.
    return jnp.clip(out, jnp.where(both | low, lo_s, -jnp.inf), jnp.where(both | up, hi_s, jnp.inf))


def _inv_softplus(y):
    """log(expm1(y)) for y > 0 in a form that neither overflows nor cancels."""
    import jax.numpy as jnp

    return y + jnp.log(-jnp.expm1(-y))


def _inverse(phys, lo, hi):
    import jax.numpy as jnp

    both, low, up, lo_s, hi_s = _masks(lo, hi)
    dtype = phys.dtype
    eps = jnp.finfo(dtype).eps
    tiny = jnp.finfo(dtype).tiny
    # lo == hi (a bound pair that pins the value, e.g. from Minimizer constraints) maps to 0.
    open_ = both & (hi_s > lo_s)
    span = jnp.where(open_, hi_s - lo_s, 1.0)
    u = jnp.clip(jnp.where(open_, (phys - lo_s) / span, 0.5), eps, 1.0 - eps)
    logit = jnp.log(u) - jnp.log1p(-u)
    y_low = jnp.maximum(jnp.where(low, phys - lo_s, 1.0), tiny)
    y_up = jnp.maximum(jnp.where(up, hi_s - phys, 1.0), tiny)
    return jnp.where(both, logit, jnp.where(low, _inv_softplus(y_low), jnp.where(up, -_inv_softplus(y_up), phys)))
