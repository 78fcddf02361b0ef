"""Errors of dataset runs; all are :class:`cnnlens.errors.CnnlensError` (and ``ValueError``)."""

from __future__ import annotations

from cnnlens.errors import CnnlensError

__all__ = ["DatasetError", "RunConfigError", "RunError"]


class RunError(CnnlensError, ValueError):
    """A dataset run cannot start or continue as asked."""


class DatasetError(RunError):
    """A dataset (image-folder tree or CSV/Parquet table) cannot be read: columns, labels, boxes."""


class RunConfigError(RunError):
    """A run folder does not fit the request: a changed configuration, a foreign folder, a run in progress."""
