"""What ``cnnlens serve`` is started with (:class:`ServeConfig`) and the one error type its API answers with.

Nothing here reads a path from a request: the only paths the server ever opens are the ones in the config
(``model``/``weights`` and ``runs``), handed over at start.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cnnlens._names import DEFAULT_MAX_PIXELS
from cnnlens.errors import CnnlensError

if TYPE_CHECKING:
    from cnnlens.models import LoadedModel

__all__ = ["ApiError", "ServeConfig"]

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
"""Hosts that only this machine can reach; any other host gets a warning at start."""


@dataclass
class ServeConfig:
    """How the server runs: the models and run folders it may use, its limits and its address.

    Attributes:
        model: A model to offer besides the zoo (as ``cnnlens explain --model`` takes it), or None. It becomes
            the default model.
        weights: Its checkpoint (``--weights``), or None.
        random_weights: Offer the zoo models without offline weights too, with seeded random weights (each is
            labelled "random weights"); also allowed for ``model``.
        runs: ``cnnlens run`` output folders to show in the run view; nothing else is ever listed.
        host: Interface to bind (default ``127.0.0.1``: this machine only).
        port: TCP port (0: any free port; the CLI prints the real one).
        cache_size: How many recordings (one capture of a model on an image for one class) stay in memory.
        max_upload_bytes: Largest upload accepted; a bigger body is refused with HTTP 413 before it is read.
        max_pixels: Largest image accepted, width x height, checked before decoding (as the CLI's ``--max-pixels``).
        device: Where models run (``cpu``, ``cuda``...).
        models: Models already loaded (Python use and tests): id -> LoadedModel, offered first; the first is the
            default unless ``model`` is given.
        zoo: Whether to offer the zoo models (those whose weights load offline, or all with ``random_weights``).
        max_images: How many uploaded or sample images stay in memory (least recently used dropped first).
        max_maps: How many computed maps stay in memory for the PNG/NPY endpoints.
        warmup: After the first explanation of an image, extend its recording to every offered layer in the
            background once the server is idle (:mod:`cnnlens.serve.prefetch`), so that clicking an earlier layer
            needs no new capture.
    """

    model: str | None = None
    weights: str | None = None
    random_weights: bool = False
    runs: Sequence[str | os.PathLike[str]] = ()
    host: str = "127.0.0.1"
    port: int = 8765
    cache_size: int = 8
    max_upload_bytes: int = 20 * 1024 * 1024
    max_pixels: int = DEFAULT_MAX_PIXELS
    device: str = "cpu"
    models: Mapping[str, LoadedModel] = field(default_factory=dict)
    zoo: bool = True
    max_images: int = 64
    max_maps: int = 128
    warmup: bool = True

    def check(self) -> None:
        """Refuse impossible settings before anything is loaded.

        Raises:
            ApiError: A limit below 1, a port out of range, or a run folder that does not exist.
        """
        for name in ("cache_size", "max_upload_bytes", "max_pixels", "max_images", "max_maps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ApiError("bad_config", f"{name} must be a positive integer, got {value!r}.", f"give {name} >= 1.")
        if not 0 <= int(self.port) <= 65535:
            raise ApiError("bad_config", f"port must be in 0..65535, got {self.port}.", "0 picks a free port.")
        for run in self.runs:
            if not os.path.isdir(run):
                raise ApiError(
                    "bad_config",
                    f"run folder {os.fspath(run)!r} does not exist or is not a folder.",
                    "pass the --out folder of a finished `cnnlens run`.",
                )

    @property
    def loopback(self) -> bool:
        """Whether the server binds an address only this machine can reach."""
        return self.host in LOOPBACK_HOSTS or self.host.startswith("127.")


class ApiError(CnnlensError):
    """An error the API answers as ``{"error": {"code", "message", "hint"}}`` with an HTTP status.

    Args:
        code: snake_case error code (``bad_image``, ``upload_too_large``, ``not_found``...).
        message: What was wrong, with what was received.
        hint: How to fix it.
        status: The HTTP status (400 by default).
    """

    def __init__(self, code: str, message: str, hint: str = "", status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.hint = hint
        self.status = status

    def body(self) -> dict[str, dict[str, str]]:
        """The JSON body of the error."""
        return {"error": {"code": self.code, "message": self.message, "hint": self.hint}}


def not_found(what: str, key: str, hint: str) -> ApiError:
    """A 404 for an unknown id (the id is echoed shortened, never interpreted as a path)."""
    shown = key if len(key) <= 80 else key[:77] + "..."
    return ApiError("not_found", f"unknown {what} {shown!r}.", hint, status=404)
