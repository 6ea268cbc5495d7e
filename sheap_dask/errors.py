"""Exceptions: one class per failure mode, all subclasses of :class:`SheapDaskError`.

Input-validation errors also subclass ``ValueError`` (or ``KeyError``/``TypeError``) so code
that catches the builtin keeps working. Messages name the argument, the bad value and the fix.
"""

from __future__ import annotations


class SheapDaskError(Exception):
    """Base class of every error raised by sheap_dask."""


class ParameterSpecError(SheapDaskError, ValueError):
    """A parameter specification is invalid (bounds, ties, duplicates)."""


class InputDataError(SheapDaskError, ValueError):
    """The input Dataset/arrays do not follow the data conventions."""


class ModelError(SheapDaskError, ValueError):
    """A model is malformed or evaluated with incompatible arguments."""


class OptionError(SheapDaskError, ValueError):
    """An option has an invalid value."""


class ResumeMismatchError(SheapDaskError, ValueError):
    """An output store was written by a fit with a different model, options or input."""


class StoreExistsError(SheapDaskError, FileExistsError):
    """An output path holds data sheap_dask did not write (or the input): it is never overwritten."""


class StoreLockedError(SheapDaskError, RuntimeError):
    """Another process is writing the output store (or left a stale lock on it)."""


class NotAStoreError(SheapDaskError, ValueError):
    """A path given as a sheap_dask store is not one (missing, a file, or foreign data)."""


class MissingDependencyError(SheapDaskError, ImportError):
    """An optional dependency is needed for this feature and is not installed."""


class PartialStoreWarning(UserWarning):
    """A fit store opened for analysis is incomplete: some chunks were never fitted (status pending)."""


class ResumeWarning(UserWarning):
    """Resume found a chunk marked done whose data fail the check recorded with the marker; it is refitted."""


class NoDataWarning(UserWarning):
    """Every spectrum of a fit has status no_data; the message names the likely cause."""


class ClusterWarning(UserWarning):
    """The cluster is set up in a way that is likely to stall or slow a fit (e.g. small workers)."""
