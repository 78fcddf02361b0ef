"""Image input: read files into RGB ``uint8`` arrays, expand directories, offline sample photos."""

from cnnlens.data.folders import ImageFailure, expand_paths
from cnnlens.data.images import DEFAULT_MAX_PIXELS, iter_images, load_image, load_image_bytes
from cnnlens.data.pixels import IMAGE_EXTENSIONS
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
