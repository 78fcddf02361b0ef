"""The caches of a server: recordings and computed maps.

:class:`RecordingCache` holds recordings (bounded LRU; each eviction counted, logged and shown by
``GET /api/cache``); :class:`MapStore` holds computed maps (bounded LRU) that the PNG/NPY endpoints serve.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from cnnlens.capture import Capture, Probe, Recording
from cnnlens.serve.config import not_found

__all__ = ["MapRecord", "MapStore", "Recorded", "RecordingCache"]

log = logging.getLogger("cnnlens.serve")


@dataclass
class Recorded:
    """One cached capture: a model on one image for one class, at a set of layers.

    Attributes:
        key: ``(model id, image id, class index)``.
        cap: The (closed) capture; re-opened under the model lock when a method needs more passes.
        rec: Its recording (activations and gradients of every layer in ``layers``).
        probe: The probe of extra passes (with its own caches: input gradients per ReLU rule...).
        layers: The recorded layer keys.
        images: ``(1, H, W, 3)`` uint8 display image.
        manifest: The explanation manifest (model, weights, preprocessing, versions).
    """

    key: tuple[str, str, int]
    cap: Capture
    rec: Recording
    probe: Probe
    layers: frozenset[str]
    images: torch.Tensor
    manifest: dict[str, Any]


class RecordingCache:
    """Bounded LRU of :class:`Recorded` entries; counts captures and evictions."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.evictions = 0
        self.captures = 0
        self.last_evicted: str | None = None
        self._entries: OrderedDict[tuple[str, str, int], Recorded] = OrderedDict()
        self._top: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def top_class(self, model_id: str, image_id: str) -> int | None:
        """The top class of an image under a model, when a capture or prediction has seen it."""
        with self._lock:
            return self._top.get((model_id, image_id))

    def set_top(self, model_id: str, image_id: str, index: int) -> None:
        """Remember the top class of an image under a model."""
        with self._lock:
            self._top[(model_id, image_id)] = index
            while len(self._top) > 16 * self.capacity:
                self._top.pop(next(iter(self._top)))

    def get(self, key: tuple[str, str, int], layer: str) -> Recorded | None:
        """The entry of ``key`` if it recorded ``layer`` (marked most recently used), else None."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or layer not in entry.layers:
                return None
            self._entries.move_to_end(key)
            return entry

    def peek(self, key: tuple[str, str, int]) -> Recorded | None:
        """The entry of ``key`` whatever its layers, not marked used."""
        with self._lock:
            return self._entries.get(key)

    def put(self, entry: Recorded) -> None:
        """Store ``entry`` (replacing one of the same key), evicting the least recently used past capacity."""
        with self._lock:
            self.captures += 1
            self._entries[entry.key] = entry
            self._entries.move_to_end(entry.key)
            while len(self._entries) > self.capacity:
                old, _ = self._entries.popitem(last=False)
                self.evictions += 1
                self.last_evicted = "/".join(str(k) for k in old)
                log.warning(
                    "recording cache full (%d entries): evicted %s (%d evictions so far)",
                    self.capacity,
                    self.last_evicted,
                    self.evictions,
                )

    def info(self) -> dict[str, Any]:
        """``GET /api/cache``: entries, capacity, evictions, last evicted key."""
        with self._lock:
            return {
                "entries": len(self._entries),
                "capacity": self.capacity,
                "evictions": self.evictions,
                "last_evicted": self.last_evicted,
                "captures": self.captures,
            }


@dataclass
class MapRecord:
    """One computed map, as the PNG/NPY/manifest endpoints serve it.

    Attributes:
        map01: ``(H, W)`` float32 display map in [0, 1] at input resolution.
        signed: ``(H, W)`` float32 raw signed map upsampled to input resolution (bilinear).
        image: ``(H, W, 3)`` uint8 the image as the model saw it.
    """

    id: str
    model: str
    image_id: str
    layer: str
    method: str
    variant: dict[str, Any]
    class_index: int
    class_name: str
    score: float
    map01: NDArray[np.float32]
    signed: NDArray[np.float32]
    image: NDArray[np.uint8]
    manifest: dict[str, Any]
    range: tuple[float, float]
    extra: dict[str, Any] = field(default_factory=dict)


class MapStore:
    """Computed maps by id (a hash of what they depend on), least recently used dropped past ``capacity``."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._maps: OrderedDict[str, MapRecord] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, record: MapRecord) -> None:
        """Store a map."""
        with self._lock:
            self._maps[record.id] = record
            self._maps.move_to_end(record.id)
            while len(self._maps) > self.capacity:
                self._maps.popitem(last=False)

    def find(self, map_id: str) -> MapRecord | None:
        """The map of ``map_id``, or None."""
        with self._lock:
            found = self._maps.get(map_id)
            if found is not None:
                self._maps.move_to_end(map_id)
            return found

    def get(self, map_id: str) -> MapRecord:
        """The map of ``map_id``.

        Raises:
            ApiError: Unknown or dropped id (404).
        """
        found = self.find(map_id)
        if found is None:
            raise not_found("map", map_id, "explain the image again (POST /api/explain) to get a new map id.")
        return found
