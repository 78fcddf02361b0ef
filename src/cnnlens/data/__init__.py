"""Image input: read files into RGB ``uint8`` arrays, expand directories, offline sample photos."""

from cnnlens.data.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    ImageFailure,
    expand_paths,
    iter_images,
    load_image,
    load_image_bytes,
)
from cnnlens.data.samples import SAMPLE_NAMES, sample_image, sample_images, write_sample_images

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "SAMPLE_NAMES",
    "ImageFailure",
    "expand_paths",
    "iter_images",
    "load_image",
    "load_image_bytes",
    "sample_image",
    "sample_images",
    "write_sample_images",
]
