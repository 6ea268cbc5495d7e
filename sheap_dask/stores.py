"""Output stores that never lose or mix data, shared by fit stores and ingestion.

- :func:`describe_path` says what is at an output path: nothing, an empty directory, a file,
  one of our stores (``fit`` from ``fit_dataset``, ``spectra`` from ``ingest_*``, ``catalog`` from ``fit_catalog``), a zarr
  store sheap_dask did not write, or some other directory.
- :func:`refuse_foreign` and :func:`refuse_input_overlap` refuse to write where that would
  destroy data that is not ours, or the input; :func:`clear_store` deletes the contents of
  one of our stores (and nothing else), keeping the lock.
- :class:`StoreLock` is one writer at a time: a lock file ``<store>/sheap_lock.json`` with the
  owner's pid, host and a heartbeat, stale once the heartbeat stops.

Messages name the Python keyword (``resume=False``, ``force=True``); the command line runs
inside :func:`cli_spelling` so the same messages name its flags (``--no-resume``, ``--force``).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Self

from . import config
from .errors import StoreExistsError, StoreLockedError

logger = logging.getLogger("sheap_dask.stores")

__all__ = ["PathInfo", "StoreLock", "clear_store", "cli_spelling", "describe_path", "refuse_foreign", "refuse_input_overlap", "spell"]

LOCK_NAME = "sheap_lock.json"
#: root attribute naming the kind of one of our stores: "fit" or "spectra"
KIND_ATTR = "sheap_store"
KIND_NAMES = {"fit": "fit store (written by fit_dataset / sheap-dask fit)", "spectra": "spectra store (written by sheap-dask ingest)",
              "catalog": "catalogue store (written by fit_catalog / sheap-dask catalog)"}
#: the record that marks a directory as a catalogue store (sheap_dask.catalog)
CATALOG_RECORD = "sheap_catalog.json"

# --------------------------------------------------------------------------------------
# Python keywords or CLI flags in messages
# --------------------------------------------------------------------------------------
_SPELLING: contextvars.ContextVar[Mapping[str, str] | None] = contextvars.ContextVar("sheap_dask_spelling", default=None)
_STORE_ATTRS: contextvars.ContextVar[Mapping[str, Any] | None] = contextvars.ContextVar("sheap_dask_store_attrs", default=None)


def spell(keyword: str) -> str:
    """``keyword`` (e.g. ``"resume=False"``) as the caller knows it: the Python keyword, or the
    command-line flag inside :func:`cli_spelling`."""
    mapping = _SPELLING.get()
    return mapping.get(keyword, keyword) if mapping else keyword


@contextlib.contextmanager
def cli_spelling(flags: Mapping[str, str], store_attrs: Mapping[str, Any] | None = None) -> Iterator[None]:
    """Messages raised inside name ``flags[keyword]`` instead of the keyword; stores created
    inside get ``store_attrs`` too (the demo marks its store as its own)."""
    token = _SPELLING.set(dict(flags))
    token2 = _STORE_ATTRS.set(dict(store_attrs) if store_attrs else None)
    try:
        yield
    finally:
        _SPELLING.reset(token)
        _STORE_ATTRS.reset(token2)


def extra_store_attrs() -> dict[str, Any]:
    return dict(_STORE_ATTRS.get() or {})


# --------------------------------------------------------------------------------------
# What is at a path
# --------------------------------------------------------------------------------------
def filesystem(store: Any, storage_options: Mapping[str, Any] | None = None):
    """``(fsspec filesystem, path)`` of a local path or URL."""
    from fsspec.core import url_to_fs

    return url_to_fs(os.fspath(store), **dict(storage_options or {}))


def is_local(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return "file" in protocol or "local" in protocol


@dataclass(frozen=True)
class PathInfo:
    """What :func:`describe_path` found at ``store``.

    ``kind``: ``missing``, ``empty`` (a directory with nothing in it but our lock), ``file``,
    ``fit``, ``spectra``, ``catalog``, ``zarr`` (a zarr store sheap_dask did not write) or ``directory``
    (anything else). ``what`` says it in words for messages; ``attrs`` are a zarr store's root
    attributes.
    """

    store: str
    kind: str
    what: str
    attrs: Mapping[str, Any]

    @property
    def ours(self) -> bool:
        return self.kind in KIND_NAMES


def _root_attrs(fs, path: str, names: set[str]) -> dict[str, Any]:
    for meta, key in (("zarr.json", "attributes"), (".zattrs", None)):
        if meta in names:
            try:
                doc = json.loads(fs.cat_file(f"{path}/{meta}"))
            except (OSError, ValueError):
                return {}
            return dict(doc.get(key, {}) if key else doc) if isinstance(doc, dict) else {}
    return {}


def _listing(names: Iterable[str], limit: int = 4) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit]) + (f", ... ({len(names)} entries)" if len(names) > limit else "")
    return shown


def describe_path(store: Any, storage_options: Mapping[str, Any] | None = None) -> PathInfo:
    """What is at ``store`` (a local path or fsspec URL), without changing anything."""
    label = os.fspath(store)
    fs, path = filesystem(store, storage_options)
    path = path.rstrip("/")
    if not fs.exists(path):
        return PathInfo(label, "missing", "nothing", {})
    if not fs.isdir(path):
        size = fs.size(path)
        return PathInfo(label, "file", f"an existing file ({size} bytes), not a directory", {})
    names = {p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)}
    names.discard("")
    if not names - {LOCK_NAME}:
        return PathInfo(label, "empty", "an empty directory", {})
    if CATALOG_RECORD in names:  # a directory of fit stores and the assembled catalogue
        return PathInfo(label, "catalog", "a sheap_dask catalogue store", {})
    is_zarr = bool(names & {"zarr.json", ".zgroup", ".zattrs", ".zmetadata", ".zarray"})
    attrs = _root_attrs(fs, path, names) if is_zarr else {}
    kind = attrs.get(KIND_ATTR)
    if kind == "fit" or "sheap_fit_fingerprint" in attrs or "sheap_progress" in names:
        return PathInfo(label, "fit", "a sheap_dask fit store", attrs)
    if kind == "spectra" or "sheap_ingest_identity" in attrs or "sheap_ingest_progress" in names:
        return PathInfo(label, "spectra", "a spectra store written by sheap-dask ingest", attrs)
    content = names - {"zarr.json", ".zgroup", ".zattrs", ".zmetadata", LOCK_NAME}
    if is_zarr:
        return PathInfo(label, "zarr", f"a zarr store that sheap_dask did not write (arrays/groups: {_listing(content) or 'none'})", attrs)
    return PathInfo(label, "directory", f"a directory that is not a zarr store, holding {_listing(names - {LOCK_NAME})}", {})


def refuse_foreign(info: PathInfo, kind: str, *, argument: str = "store") -> None:
    """Raise unless ``info`` is free to write a ``kind`` store into: nothing there, an empty
    directory, or a store of that kind (whether it may be overwritten is the caller's rule)."""
    if info.kind in ("missing", "empty", kind):
        return
    if info.kind == "file":
        raise StoreExistsError(
            f"{argument} {info.store!r} is {info.what}; a store is a directory (or an object-store prefix). "
            "Pass a new path; sheap_dask does not replace files."
        )
    raise StoreExistsError(
        f"{argument} {info.store!r} already exists and is not a sheap_dask {KIND_NAMES[kind]}: it is {info.what}. "
        "sheap_dask only ever overwrites its own stores of that kind, so nothing was changed: choose a new path "
        "(or remove that one yourself if its contents are no longer needed)."
    )


def _norm(p: Any, storage_options) -> str:
    fs, path = filesystem(p, storage_options)
    path = path.rstrip("/")
    if is_local(fs):
        return os.path.realpath(path)
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    return f"{protocol}://{path}"


def refuse_input_overlap(store: Any, inputs: Iterable[Any], *, argument: str = "store", storage_options=None, what: str = "the input") -> None:
    """Raise when ``store`` is an input, contains one, or lies inside one (writing there would
    destroy or mix with the input)."""
    out = _norm(store, storage_options)
    for inp in inputs:
        if inp is None:
            continue
        try:
            src = _norm(inp, storage_options)
        except (ValueError, ImportError, OSError):  # pragma: no cover - an unparsable input path
            continue
        if src == out:
            relation = f"is {what}"
        elif src.startswith(out.rstrip("/") + "/"):
            relation = f"contains {what} {os.fspath(inp)!r}"
        elif out.startswith(src.rstrip("/") + "/"):
            relation = f"lies inside {what} {os.fspath(inp)!r}"
        else:
            continue
        raise StoreExistsError(
            f"{argument} {os.fspath(store)!r} {relation}: writing there would destroy it. Pass a different output path."
        )


def preflight(store: Any, kind: str, inputs: Iterable[Any] = (), *, storage_options=None, force: bool = False, what: str = "the input") -> PathInfo:
    """Every refusal that can be known before any work starts: the input, foreign data, a
    lock held by another writer. Returns what is at ``store``."""
    refuse_input_overlap(store, inputs, storage_options=storage_options, what=what)
    info = describe_path(store, storage_options)
    refuse_foreign(info, kind)
    if info.kind != "missing":
        StoreLock(store, storage_options, force=force).probe()
    return info


def clear_store(store: Any, info: PathInfo, storage_options=None) -> None:
    """Delete the contents of one of our stores (``info.ours``), keeping the lock file."""
    if not info.ours:  # pragma: no cover - the callers check first; a last line of defence
        raise StoreExistsError(f"refusing to delete {info.store!r}: it is {info.what}")
    fs, path = filesystem(store, storage_options)
    path = path.rstrip("/")
    for entry in fs.ls(path, detail=False):
        if entry.rstrip("/").rsplit("/", 1)[-1] != LOCK_NAME:
            fs.rm(entry, recursive=True)


# --------------------------------------------------------------------------------------
# One writer at a time
# --------------------------------------------------------------------------------------
def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


class StoreLock:
    """The lock file ``<store>/sheap_lock.json``: one writer at a time.

    The holder rewrites its heartbeat every ``sheap_dask.store.lock_heartbeat`` seconds from
    a background thread. Another writer is refused with a message naming the holder; a lock
    whose heartbeat is older than ``sheap_dask.store.lock_stale_after`` seconds is *stale*
    (its writer was killed) and ``force=True`` breaks it; a lock left by a process of this
    host that is no longer running is broken at once, with a warning.

    On a local (or NFS) disk the lock file is created atomically (``O_EXCL``). On an fsspec
    object store there is no atomic create-if-absent: the lock is written, read back after a
    short pause and kept only if it is still ours, which catches all but writers that start
    within that pause of each other.

    Parameters
    ----------
    store : str or path
        The store (a local path or fsspec URL); created as an empty directory if missing.
    storage_options : mapping, optional
        fsspec options of a URL.
    force : bool
        Break a stale lock.
    purpose : str
        What the holder does, recorded in the lock (e.g. ``"sheap-dask fit"``).
    """

    def __init__(self, store: Any, storage_options: Mapping[str, Any] | None = None, *, force: bool = False, purpose: str = "fit_dataset"):
        self.store = os.fspath(store)
        self.fs, root = filesystem(store, storage_options)
        self.root = root.rstrip("/")
        self.path = f"{self.root}/{LOCK_NAME}"
        self.force = bool(force)
        self.purpose = purpose
        self.heartbeat = float(config.get("store.lock_heartbeat"))
        self.stale_after = float(config.get("store.lock_stale_after"))
        self.token = uuid.uuid4().hex
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._held = False

    # -- the record -------------------------------------------------------------------
    def _record(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "purpose": self.purpose,
            "token": self.token,
            "started": getattr(self, "_started", time.time()),
            "heartbeat": time.time(),
        }

    def _read(self) -> dict[str, Any] | None:
        try:
            record = json.loads(self.fs.cat_file(self.path))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {"token": None, "corrupt": True, "heartbeat": self._mtime()}
        return record if isinstance(record, dict) else {"token": None, "corrupt": True, "heartbeat": self._mtime()}

    def _mtime(self) -> float:
        try:
            info = self.fs.info(self.path)
        except OSError:
            return 0.0
        value = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or info.get("created") or 0.0
        return value.timestamp() if hasattr(value, "timestamp") else float(value)

    def _write(self, record: Mapping[str, Any]) -> None:
        data = json.dumps(record).encode()
        if is_local(self.fs):
            tmp = f"{self.path}.{self.token}.tmp"
            with open(tmp, "wb") as fh:
                fh.write(data)
            os.replace(tmp, self.path)  # readers never see a half-written lock
        else:
            self.fs.pipe_file(self.path, data)

    def _create(self) -> bool:
        """Create the lock file if absent; True if it is now ours."""
        self._started = time.time()
        data = json.dumps(self._record()).encode()
        if is_local(self.fs):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            return True
        if self.fs.exists(self.path):
            return False
        self.fs.pipe_file(self.path, data)
        time.sleep(float(config.get("store.lock_settle")))
        current = self._read()
        return current is not None and current.get("token") == self.token

    # -- describing a holder ------------------------------------------------------------
    @staticmethod
    def describe(record: Mapping[str, Any]) -> str:
        if record.get("corrupt"):
            return "an unreadable lock file"
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(record.get("started", 0))))
        return f"{record.get('purpose', '?')} (pid {record.get('pid', '?')} on host {record.get('host', '?')}, started {started})"

    def _verdict(self, record: Mapping[str, Any]) -> tuple[str, float]:
        """``("dead" | "stale" | "live", seconds since its heartbeat)``."""
        age = max(0.0, time.time() - float(record.get("heartbeat") or 0.0))
        if record.get("host") == socket.gethostname() and isinstance(record.get("pid"), int) and not _pid_running(record["pid"]):
            return "dead", age
        return ("stale" if age > self.stale_after else "live"), age

    def _judge(self, record: Mapping[str, Any]) -> tuple[str, float]:
        """The verdict on another process's lock: raise unless it may be broken (a dead
        holder of this host, or a stale lock with ``force``)."""
        verdict, age = self._verdict(record)
        holder = self.describe(record)
        if verdict == "stale" and not self.force:
            raise StoreLockedError(
                f"store {self.store!r} is locked by {holder}, whose last heartbeat was {age:.0f} s ago (a lock is stale "
                f"after {self.stale_after:.0f} s without one): that writer was probably killed. If no other process is "
                f"writing this store, pass {spell('force=True')} to break the lock."
            )
        if verdict == "live":
            raise StoreLockedError(
                f"store {self.store!r} is being written by {holder} (last heartbeat {age:.0f} s ago); a second writer "
                f"would mix its results with that one's. Wait for it to finish, or stop it first; if it was killed, its "
                f"lock goes stale {self.stale_after:.0f} s after its last heartbeat and {spell('force=True')} breaks it."
            )
        return verdict, age

    def probe(self) -> None:
        """Raise now if :meth:`acquire` would be refused (before a cluster is started, say);
        takes nothing."""
        if self.fs.exists(self.path):
            record = self._read()
            if record is not None:
                self._judge(record)

    # -- acquire / release --------------------------------------------------------------
    def acquire(self) -> Self:
        self.fs.makedirs(self.root, exist_ok=True)
        for _ in range(5):
            if self._create():
                break
            record = self._read()
            if record is None:  # released between our attempt and the read: try again
                continue
            verdict, age = self._judge(record)
            holder = self.describe(record)
            if verdict == "dead":
                warnings.warn(
                    f"store {self.store!r}: breaking the lock of {holder}: that process is no longer running on this host.",
                    UserWarning,
                    stacklevel=3,
                )
            else:  # stale, and force=True
                warnings.warn(
                    f"store {self.store!r}: breaking the stale lock of {holder} (last heartbeat {age:.0f} s ago), as asked by "
                    f"{spell('force=True')}.",
                    UserWarning,
                    stacklevel=3,
                )
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self.path)
        else:  # pragma: no cover - five lost races in a row
            raise StoreLockedError(f"store {self.store!r}: could not take its lock (other writers keep taking it)")
        self._held = True
        self._thread = threading.Thread(target=self._beat, name=f"sheap-dask lock {self.store}", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            try:
                current = self._read()
                if current is not None and current.get("corrupt"):
                    continue  # being rewritten this instant: judge it at the next beat
                if current is None or current.get("token") != self.token:
                    self.lost = "the lock file was removed" if current is None else f"the lock was taken by {self.describe(current)}"
                    logger.warning("store %s: %s while this process was writing it", self.store, self.lost)
                    return
                self._write(self._record())
            except Exception as exc:  # noqa: BLE001 - a failed heartbeat must not kill the fit
                logger.warning("store %s: lock heartbeat failed (%s)", self.store, exc)

    def check(self) -> None:
        """Raise if the lock was broken by another process while held."""
        if self.lost:
            raise StoreLockedError(
                f"store {self.store!r}: {self.lost} while this process was writing it; stopped so the two runs do not mix. "
                "Resume once the other writer has finished (resume verifies every chunk)."
            )

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._held:
            self._held = False
            with contextlib.suppress(OSError):
                current = self._read()
                if current is not None and current.get("token") == self.token:
                    self.fs.rm_file(self.path)

    def __enter__(self) -> Self:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
