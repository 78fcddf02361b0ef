"""The network view: a conv layer's filters, and a layer's feature maps for one image, as PNG mosaics.

Feature maps are ranked as in ``cnnlens features`` (mean activation), each coloured with the layer's limits.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np

from cnnlens.errors import CnnlensError
from cnnlens.serve.config import ApiError, not_found
from cnnlens.serve.images import ImageStore
from cnnlens.serve.models import ModelHub
from cnnlens.serve.render import png
from cnnlens.viz.grids import colorize_limits, mosaic
from cnnlens.viz.views import feature_cmap, filter_mosaic

__all__ = ["NetworkViews"]

MAX_TILES = 256


def _count(value: Any, name: str, default: int) -> int:
    if value is None:
        return default
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if isinstance(value, bool) or not 1 <= number <= MAX_TILES:
        raise ApiError("bad_request", f"{name} must be an integer in 1..{MAX_TILES}, got {value!r}.", f"{name}=16.")
    return number


class NetworkViews:
    """Filters and feature maps; feature mosaics kept (bounded) for ``GET /api/features/{id}.png``."""

    def __init__(self, hub: ModelHub, images: ImageStore, capacity: int = 64) -> None:
        self.hub = hub
        self.images = images
        self.capacity = capacity
        self._pictures: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def filters_png(self, model_id: str | None, layer: str | None, count: Any) -> bytes:
        """``GET /api/filters.png``: the first ``max`` filters of a conv layer (RGB, or mean over inputs).

        Raises:
            ApiError: Not a conv layer, unknown layer/model (400/404).
        """
        from cnnlens.views import filters

        served = self.hub[model_id]
        top = _count(count, "max", 64)
        try:
            fs = filters(served.get(), layer or None, top_k=top)
            if fs.view not in ("rgb", "mean"):
                fs = filters(served.get(), layer or None, top_k=top, view="mean")
        except CnnlensError as exc:
            raise ApiError("bad_layer", str(exc), "pick a convolution from GET /api/layers.") from exc
        return png(filter_mosaic(fs, zoom=max(1, 48 // max(1, int(fs.tiles.shape[-1])))))

    def features(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """``POST /api/features``: the top channels of a layer for an image, ranked by mean activation.

        Raises:
            ApiError: Unknown model/image/layer, a layer that is not a feature map (400/404).
        """
        from cnnlens.views import feature_maps

        served = self.hub[request.get("model")]
        loaded = served.get()
        image_id = str(request.get("image_id") or "")
        layer = str(request.get("layer") or served.default_layer())
        top = _count(request.get("top"), "top", 16)
        x = self.images.model_input(image_id, served.id, loaded)
        try:
            with served.lock:
                fm = feature_maps(loaded, x, [layer], top_k=top)
        except CnnlensError as exc:
            raise ApiError("bad_layer", str(exc), "pick a layer from GET /api/layers.") from exc
        lf = fm[layer]
        maps = lf.maps.detach().cpu().numpy()
        limits = lf.limits.detach().cpu().numpy()
        tiles = np.stack(
            [
                colorize_limits(maps[i], float(limits[i, 0]), float(limits[i, 1]), feature_cmap(lf))
                for i in range(len(lf.indices))
            ]
        )
        zoom = max(1, 56 // max(1, int(maps.shape[-1])))
        image, _ = mosaic(tiles, zoom=zoom, gap=2)
        feat_id = hashlib.sha256(f"{served.id}/{image_id}/{layer}/{top}".encode()).hexdigest()[:24]
        with self._lock:
            self._pictures[feat_id] = png(image)
            while len(self._pictures) > self.capacity:
                self._pictures.popitem(last=False)
        return {
            "channels": [{"index": int(k), "score": float(v)} for k, v in zip(lf.indices, lf.values, strict=True)],
            "url": f"/api/features/{feat_id}.png",
            "layer": layer,
            "shape": [int(s) for s in lf.activation.shape],
        }

    def picture(self, feat_id: str) -> bytes:
        """``GET /api/features/{id}.png``.

        Raises:
            ApiError: Unknown id (404).
        """
        with self._lock:
            found = self._pictures.get(feat_id)
        if found is None:
            raise not_found("feature picture", feat_id, "ask for the feature maps again (POST /api/features).")
        return found
