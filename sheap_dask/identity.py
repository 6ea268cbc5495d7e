"""Content identity of Python objects: the same definition gives the same hash in every process.

A model's identity must survive pickling (cloudpickle ships ``__main__`` functions to Dask
workers by value), new processes and new sessions, and change whenever anything that changes
the model's output changes. :func:`token` hashes an object by content:

- numbers, strings, bytes, ``None``: by value (floats exactly, via ``float.hex``);
- numpy and JAX arrays: dtype, shape and the bytes of the data;
- lists, tuples, dicts, sets: element by element (dicts and sets in a canonical order);
- user functions (code outside installed packages, ``__main__`` included): the code object
  (bytecode, constants, names; never the file name or line numbers, which cloudpickle
  changes), closure values, defaults, and every global the code reads, recursively;
- functions of installed packages: module, qualified name and the package's version;
  for sheap_dask's own functions also their closures and defaults (they carry templates and
  line lists), since the code itself is pinned by the version;
- ``functools.partial``, bound methods, modules, classes; objects that define
  ``__sheap_identity__()`` hash what it returns; other objects by type and attributes.

What cannot be captured (an object whose only description is a memory address, data read
from a file or a database at call time, a C extension's hidden state) is listed in
:attr:`Tokenizer.uncaptured`; :class:`~sheap_dask.model.Model` warns about it and users
declare a ``version=`` for such models.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import importlib.metadata
import os
import struct
import sys
import sysconfig
import threading
import types
from collections.abc import Callable, Hashable, Mapping
from typing import Any

import numpy as np

__all__ = ["token", "Tokenizer", "LRUCache"]

_MAX_DEPTH = 40
# Code-object attributes that define behaviour; file names and line tables are left out
# (cloudpickle >= 3.1.3 rewrites co_filename to "<dynamic-code>").
_CODE_ATTRS = ("co_argcount", "co_posonlyargcount", "co_kwonlyargcount", "co_flags", "co_code", "co_names",
               "co_varnames", "co_freevars", "co_cellvars", "co_name")


def token(obj: Any) -> str:
    """Hex SHA-256 of ``obj``'s content (see the module docstring for the rules)."""
    return Tokenizer().token(obj)


class Tokenizer:
    """Hashes objects by content; :attr:`uncaptured` lists what had no stable description."""

    def __init__(self) -> None:
        self.uncaptured: list[str] = []
        self._active: dict[int, int] = {}

    def token(self, obj: Any) -> str:
        h = hashlib.sha256()
        self._feed(h, obj, 0)
        return h.hexdigest()

    # -- dispatch ----------------------------------------------------------------------------
    def _feed(self, h, obj: Any, depth: int) -> None:
        if depth > _MAX_DEPTH:
            self._uncaptured(h, obj, "nested too deeply")
            return
        if obj is None or isinstance(obj, (bool, int, str, bytes)):
            _put(h, type(obj).__name__, repr(obj))
            return
        if isinstance(obj, float):
            _put(h, "float", obj.hex())
            return
        if isinstance(obj, complex):
            _put(h, "complex", obj.real.hex(), obj.imag.hex())
            return
        if isinstance(obj, np.generic):
            _put(h, "npscalar", obj.dtype.str, obj.tobytes())
            return
        if isinstance(obj, np.ndarray) or _is_jax_array(obj):
            self._array(h, np.asarray(obj), depth)
            return
        key = id(obj)
        if key in self._active:  # a cycle (recursive function, self-referencing container)
            _put(h, "backref", str(self._active[key]))
            return
        self._active[key] = len(self._active)
        try:
            self._feed_compound(h, obj, depth + 1)
        finally:
            del self._active[key]

    def _feed_compound(self, h, obj: Any, depth: int) -> None:
        hook = getattr(type(obj), "__sheap_identity__", None)
        if hook is not None and not isinstance(obj, type):
            _put(h, "declared", _qualname(type(obj)))
            self._feed(h, obj.__sheap_identity__(), depth)
        elif isinstance(obj, (list, tuple)):
            _put(h, type(obj).__name__, str(len(obj)))
            for item in obj:
                self._feed(h, item, depth)
        elif isinstance(obj, Mapping):
            _put(h, "mapping", str(len(obj)))
            for k_token, k, v in sorted((self._sub(k, depth), k, v) for k, v in _items(obj)):
                _put(h, "key", k_token)
                self._feed(h, v, depth)
        elif isinstance(obj, (set, frozenset)):
            _put(h, "set", *sorted(self._sub(item, depth) for item in obj))
        elif isinstance(obj, functools.partial):
            _put(h, "partial")
            self._feed(h, (obj.func, obj.args, obj.keywords), depth)
        elif isinstance(obj, types.MethodType):
            _put(h, "method")
            self._feed(h, (obj.__func__, obj.__self__), depth)
        elif isinstance(obj, types.FunctionType):
            self._function(h, obj, depth)
        elif isinstance(obj, types.CodeType):
            self._code(h, obj, depth)
        elif isinstance(obj, types.ModuleType):
            _put(h, "module", obj.__name__, _package_version(obj.__name__))
        elif isinstance(obj, type):
            self._class(h, obj, depth)
        elif isinstance(obj, (types.BuiltinFunctionType, np.ufunc)) or _is_library_object(obj):
            # builtins, ufuncs and jitted library callables: named by module and version
            module = getattr(obj, "__module__", None) or type(obj).__module__
            _put(h, "libobj", str(module), _qualname(obj), _package_version(str(module)))
            wrapped = getattr(obj, "__wrapped__", None)
            if isinstance(wrapped, types.FunctionType):  # jax.jit(user_function)
                self._feed(h, wrapped, depth)
        elif hasattr(obj, "__dict__") or hasattr(type(obj), "__slots__"):
            _put(h, "object")
            self._class(h, type(obj), depth)
            self._feed(h, _attributes(obj), depth)
        else:
            self._uncaptured(h, obj, "no content to hash")

    def _sub(self, obj: Any, depth: int) -> str:
        sub = hashlib.sha256()
        self._feed(sub, obj, depth)
        return sub.hexdigest()

    # -- kinds ------------------------------------------------------------------------------
    def _array(self, h, arr: np.ndarray, depth: int) -> None:
        if arr.dtype == object:
            _put(h, "objarray", str(arr.shape))
            for item in arr.ravel():
                self._feed(h, item, depth + 1)
            return
        _put(h, "array", arr.dtype.str, str(arr.shape), hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest())

    def _function(self, h, fn: types.FunctionType, depth: int) -> None:
        module = getattr(fn, "__module__", None) or ""
        closure = [c.cell_contents if _cell_filled(c) else "<empty cell>" for c in (fn.__closure__ or ())]
        state = (closure, fn.__defaults__, fn.__kwdefaults__)
        if _is_installed(module):
            _put(h, "libfunc", module, _qualname(fn), _package_version(module))
            if module.split(".")[0] == "sheap_dask":
                self._feed(h, state, depth)  # templates, line lists, user functions in closures
            return
        _put(h, "function")
        self._code(h, fn.__code__, depth)
        self._feed(h, state, depth)
        # globals the code reads (attribute names that are not globals are skipped alike in
        # every process: cloudpickle ships exactly these names)
        names = sorted(_global_names(fn.__code__))
        scope = fn.__globals__
        for name in names:
            if name in scope:
                _put(h, "global", name)
                self._feed(h, scope[name], depth)

    def _code(self, h, code: types.CodeType, depth: int) -> None:
        _put(h, "code")
        for attr in _CODE_ATTRS:
            value = getattr(code, attr, None)
            _put(h, attr, value if isinstance(value, bytes) else repr(value))
        _put(h, "consts", str(len(code.co_consts)))
        for const in code.co_consts:
            self._feed(h, const, depth)

    def _class(self, h, cls: type, depth: int) -> None:
        module = getattr(cls, "__module__", "") or ""
        _put(h, "class", module, _qualname(cls), _package_version(module))
        if not _is_installed(module):  # a user class: its methods define the behaviour
            members = {k: v for k, v in vars(cls).items() if isinstance(v, (types.FunctionType, staticmethod, classmethod, property))}
            self._feed(h, {k: _unwrap_member(v) for k, v in members.items()}, depth)

    def _uncaptured(self, h, obj: Any, why: str) -> None:
        text = repr(obj)
        if " at 0x" not in text and len(text) < 10_000 and why == "no content to hash":
            _put(h, "repr", type(obj).__qualname__, text)
            return
        self.uncaptured.append(f"{type(obj).__qualname__} ({why})")
        _put(h, "uncaptured", type(obj).__qualname__)


# -- helpers ------------------------------------------------------------------------------------
def _put(h, *parts: Any) -> None:
    for part in parts:
        data = part if isinstance(part, bytes) else str(part).encode("utf-8", "surrogatepass")
        h.update(struct.pack("<Q", len(data)))
        h.update(data)


def _items(obj: Mapping):
    try:
        return list(obj.items())
    except Exception:  # noqa: BLE001 - a mapping whose items cannot be listed
        return []


def _attributes(obj: Any) -> dict:
    attrs = dict(getattr(obj, "__dict__", {}) or {})
    for cls in type(obj).__mro__:
        for slot in getattr(cls, "__slots__", ()) or ():
            if isinstance(slot, str) and slot not in ("__dict__", "__weakref__") and hasattr(obj, slot):
                attrs.setdefault(slot, getattr(obj, slot))
    return attrs


def _unwrap_member(member: Any) -> Any:
    if isinstance(member, (staticmethod, classmethod)):
        return member.__func__
    if isinstance(member, property):
        return (member.fget, member.fset)
    return member


def _cell_filled(cell) -> bool:
    try:
        cell.cell_contents  # noqa: B018
    except ValueError:
        return False
    return True


def _global_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


def _qualname(obj: Any) -> str:
    return str(getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None) or type(obj).__qualname__)


def _is_jax_array(obj: Any) -> bool:
    module = type(obj).__module__ or ""
    return module.startswith(("jax", "jaxlib")) and hasattr(obj, "__array__") and hasattr(obj, "shape")


def _is_library_object(obj: Any) -> bool:
    """Callables defined by installed packages (jitted functions, ufunc-likes)."""
    return callable(obj) and _is_installed(type(obj).__module__ or "") and not hasattr(obj, "__dict__")


@functools.lru_cache(maxsize=512)
def _is_installed(module: str) -> bool:
    """True for the standard library and installed packages; False for ``__main__`` and
    modules of the user's own source tree (their code is hashed, not their name)."""
    top = module.split(".")[0]
    if not top or top == "__main__":
        return False
    if top == "sheap_dask" or top in sys.builtin_module_names or top in getattr(sys, "stdlib_module_names", ()):
        return True
    mod = sys.modules.get(top)
    path = getattr(mod, "__file__", None) if mod is not None else None
    if not path:
        return False
    path = os.path.realpath(path)
    roots = {sysconfig.get_paths()[k] for k in ("purelib", "platlib", "stdlib", "platstdlib")}
    return any(path.startswith(os.path.realpath(root) + os.sep) for root in roots)


@functools.lru_cache(maxsize=512)
def _package_version(module: str) -> str:
    top = module.split(".")[0]
    if top == "sheap_dask":
        from ._version import __version__

        return __version__
    if top in sys.builtin_module_names or top in getattr(sys, "stdlib_module_names", ()):
        return f"python-{sys.version_info[0]}.{sys.version_info[1]}"
    try:
        dists = importlib.metadata.packages_distributions().get(top) or [top]
        return importlib.metadata.version(dists[0])
    except Exception:  # noqa: BLE001 - not an installed distribution (user module)
        return ""


class LRUCache:
    """A small thread-safe least-recently-used cache for compiled programs.

    Keys are built from content identities (:meth:`Model.identity`, :func:`token`) and
    options, never from ``id()``: a new object with the same definition hits, a changed one
    misses. ``on_evict(value)`` runs for each entry dropped to respect ``maxsize``.
    """

    def __init__(self, maxsize: int | Callable[[], int], on_evict: Callable[[Any], None] | None = None) -> None:
        self._maxsize = maxsize
        self._on_evict = on_evict
        self._data: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.RLock()

    @property
    def maxsize(self) -> int:
        size = self._maxsize() if callable(self._maxsize) else self._maxsize
        return max(1, int(size or 1))

    def get_or_build(self, key: Hashable, build: Callable[[], Any]) -> tuple[Any, bool]:
        """``(value, built)``: the cached value for ``key``, or ``build()`` stored under it."""
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                return self._data[key], False
            value = build()
            self._data[key] = value
            while len(self._data) > self.maxsize:
                _, evicted = self._data.popitem(last=False)
                if self._on_evict is not None:
                    self._on_evict(evicted)
            return value, True

    def values(self) -> list:
        with self._lock:
            return list(self._data.values())

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def __len__(self) -> int:
        return len(self._data)
