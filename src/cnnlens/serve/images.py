"""Images the server holds: uploads and sample photos, decoded once, kept in a bounded LRU store.

An upload is checked like a file on the command line (:func:`cnnlens.data.images.load_image_bytes`: the same
pixel limit, checked from the header before decoding, and PIL's decompression-bomb guard), after the body
itself was limited to ``max_upload_bytes`` while it arrived (:func:`read_limited`).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray

from cnnlens.data.images import load_image_bytes
from cnnlens.data.samples import SAMPLE_NAMES, sample_image
from cnnlens.errors import ImageReadError
from cnnlens.models import LoadedModel
from cnnlens.serve.config import ApiError, not_found

__all__ = ["SAMPLES", "ImageStore", "StoredImage", "read_limited"]

SAMPLES: dict[str, str] = {
    "chelsea": "Chelsea (cat)",
    "coffee": "Coffee (cup)",
    "astronaut": "Astronaut",
    "rocket": "Rocket",
    "motorcycle_left": "Motorcycle",
    "hubble_deep_field": "Hubble deep field",
    "immunohistochemistry": "Immunohistochemistry",
    "retina": "Retina",
}
"""Sample photos offered by the page (scikit-image's bundled photos): id -> name."""
assert set(SAMPLES) <= set(SAMPLE_NAMES)


@dataclass
class StoredImage:
    """One decoded image: ``pixels`` is ``(H, W, 3)`` uint8 RGB."""

    id: str
    name: str
    pixels: NDArray[np.uint8]


async def read_limited(stream: AsyncIterator[bytes], limit: int) -> AsyncGenerator[bytes, None]:
    """Pass the chunks of ``stream`` on, stopping with a 413 as soon as more than ``limit`` bytes arrived.

    Raises:
        ApiError: ``upload_too_large`` (413), before the rest of the body is read.
    """
    seen = 0
    async for chunk in stream:
        seen += len(chunk)
        if seen > limit:
            raise too_large(limit, f"more than {seen:,}")
        yield chunk


def too_large(limit: int, size: str) -> ApiError:
    """The 413 error of an upload over ``limit`` bytes."""
    return ApiError(
        "upload_too_large",
        f"the upload is {size} bytes, over the limit of {limit:,} bytes.",
        "upload a smaller image, or restart the server with a larger --max-upload-mb.",
        status=413,
    )


def image_error(exc: ImageReadError) -> ApiError:
    """An undecodable or refused image as a JSON error: ``too_many_pixels`` or ``bad_image`` (both 400)."""
    text = str(exc)
    if "max_pixels" in text or "decompression-bomb" in text or "MAX_IMAGE_PIXELS" in text:
        return ApiError(
            "too_many_pixels",
            text,
            "downscale the image, or restart the server with a larger --max-pixels if you trust the file.",
        )
    return ApiError("bad_image", text, "upload a PNG, JPEG, BMP, GIF, TIFF or WebP image that opens in a viewer.")


class ImageStore:
    """Decoded images by id (a hash of their pixels), least recently used dropped past ``capacity``."""

    def __init__(self, capacity: int, max_pixels: int) -> None:
        self.capacity = capacity
        self.max_pixels = max_pixels
        self._images: OrderedDict[str, StoredImage] = OrderedDict()
        self._inputs: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def _put(self, name: str, pixels: NDArray[np.uint8]) -> StoredImage:
        digest = hashlib.sha256()
        digest.update(np.asarray(pixels.shape, dtype=np.int64).tobytes())
        digest.update(np.ascontiguousarray(pixels).tobytes())
        image = StoredImage(digest.hexdigest()[:24], name, pixels)
        with self._lock:
            self._images[image.id] = image
            self._images.move_to_end(image.id)
            while len(self._images) > self.capacity:
                old, _ = self._images.popitem(last=False)
                for key in [k for k in self._inputs if k[1] == old]:
                    del self._inputs[key]
        return image

    def add_bytes(self, data: bytes, name: str) -> StoredImage:
        """Decode an upload (same checks as the CLI) and store it.

        Raises:
            ApiError: ``bad_image`` or ``too_many_pixels``.
        """
        shown = (name or "upload")[:120]
        try:
            pixels = load_image_bytes(data, name=shown, max_pixels=self.max_pixels)
        except ImageReadError as exc:
            raise image_error(exc) from exc
        return self._put(shown, pixels)

    def add_sample(self, sample: str) -> StoredImage:
        """Store one of :data:`SAMPLES`.

        Raises:
            ApiError: Unknown sample (400 ``unknown_sample``).
        """
        if sample not in SAMPLES:
            raise ApiError(
                "unknown_sample", f"there is no sample photo {sample!r}.", f"use one of: {', '.join(SAMPLES)}."
            )
        return self._put(SAMPLES[sample], np.ascontiguousarray(sample_image(sample)))

    def get(self, image_id: str) -> StoredImage:
        """The image of ``image_id``.

        Raises:
            ApiError: Unknown (or dropped) id, 404.
        """
        with self._lock:
            image = self._images.get(image_id)
            if image is not None:
                self._images.move_to_end(image_id)
        if image is None:
            raise not_found("image", image_id, "upload the image again (POST /api/images).")
        return image

    def model_input(self, image_id: str, model_id: str, model: LoadedModel) -> torch.Tensor:
        """The preprocessed ``(1, C, H, W)`` input of an image for a model (computed once per pair)."""
        key = (model_id, image_id)
        with self._lock:
            cached = self._inputs.get(key)
        if cached is not None:
            return cached
        pixels = self.get(image_id).pixels
        x = model.spec.preprocessing.to_tensor(pixels).unsqueeze(0)
        device = next(iter(model.module.parameters()), torch.empty(0)).device
        x = x.to(device)
        with self._lock:
            self._inputs[key] = x
            while len(self._inputs) > 2 * self.capacity:
                self._inputs.popitem(last=False)
        return x
