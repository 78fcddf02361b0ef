"""Image preprocessing for the model zoo: resize, center crop, normalise, and the inverse for overlays.

A :class:`Preprocessing` describes the classic ImageNet evaluation pipeline: the shorter side of the image is
resized (antialiased) to ``resize`` pixels, the center ``input_size`` window is cropped, and the pixels are
scaled to ``[0, 1]`` and normalised per channel, ``x' = (x - mean) / std``.

Three arithmetic ``mode`` s reproduce the preprocessing of the frameworks bit for bit (the same affine map,
each framework rounding its own way); ``mean``/``std`` are always per *model input channel* on ``[0, 1]``
pixels, so metrics invert every mode with the same formula (:meth:`Preprocessing.denormalize` and overlays also
turn BGR back into RGB, see :attr:`Preprocessing.channel_order`):

* ``"torch"`` (default, torchvision/timm): ``x' = (p / 255 - mean) / std`` with ``p`` the 0..255 pixel.
* ``"caffe"`` (Keras VGG16/ResNet50, ``keras.applications.imagenet_utils.preprocess_input(mode="caffe")``):
  the channels are reversed (RGB -> BGR) and ``x' = (p - 255 mean) / (255 std)``; with
  :data:`CAFFE_MEAN`/:data:`CAFFE_STD` that is ``p - [103.939, 116.779, 123.68]``, no scaling.
* ``"tf"`` (Keras InceptionV3/InceptionResNetV2/Xception): ``x' = p / (255 std) - mean / std``; with
  ``mean = std = 0.5`` that is ``p / 127.5 - 1``.

:meth:`Preprocessing.display_image` applies the same geometry without normalising, so a heat map
computed on the model input lines up pixel for pixel with the image it is drawn over;
:meth:`Preprocessing.to_tensor` is exactly ``normalise(display_image(image) / 255)``, so
``denormalize(to_tensor(x)) == display_image(x) / 255`` up to float rounding.

Example:
    >>> import numpy as np
    >>> p = Preprocessing(input_size=(224, 224), resize=256, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    >>> p.to_tensor(np.zeros((300, 400, 3), dtype=np.uint8)).shape
    torch.Size([3, 224, 224])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cnnlens.errors import InputShapeError, ModelConfigError

__all__ = [
    "CAFFE_MEAN",
    "CAFFE_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "INCEPTION_MEAN",
    "INCEPTION_STD",
    "KERAS_CAFFE_224",
    "KERAS_TF_299",
    "PREPROCESSING_MODES",
    "Preprocessing",
    "override_preprocessing",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
"""Per-channel RGB mean of ImageNet, used by torchvision's published weights."""
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
"""Per-channel RGB standard deviation of ImageNet, used by torchvision's published weights."""
INCEPTION_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
"""The TensorFlow "inception" normalisation, ``x / 127.5 - 1``, written as a mean."""
INCEPTION_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)
"""The TensorFlow "inception" normalisation, ``x / 127.5 - 1``, written as a standard deviation."""

CAFFE_MEAN: tuple[float, float, float] = (103.939 / 255, 116.779 / 255, 123.68 / 255)
"""Keras's "caffe" mean, ``[103.939, 116.779, 123.68]`` per BGR channel, on ``[0, 1]`` pixels (model channel order)."""
CAFFE_STD: tuple[float, float, float] = (1 / 255, 1 / 255, 1 / 255)
"""Keras's "caffe" mode does not scale: a std of one 0..255 pixel step."""

PREPROCESSING_MODES = ("torch", "caffe", "tf")
"""The arithmetic modes of :class:`Preprocessing` (named as in ``keras.applications`` ``preprocess_input``)."""

_INTERPOLATIONS = ("bilinear", "bicubic")
"""The interpolation names accepted (torchvision's ``InterpolationMode`` values, imported when resizing)."""


@dataclass(frozen=True)
class Preprocessing:
    """How an RGB image becomes a model input: resize, center crop, normalise.

    Attributes:
        input_size: ``(H, W)`` of the tensor fed to the model.
        resize: the shorter image side is resized (antialiased) to this many pixels before the center crop;
            it must be at least ``max(input_size)`` so the crop never needs padding.
        mean: per-channel RGB mean subtracted after scaling pixels to ``[0, 1]``.
        std: per-channel RGB standard deviation divided by after subtracting the mean.
        interpolation: ``"bilinear"`` or ``"bicubic"``.
        mode: how the normalisation is computed (see the module docstring): ``"torch"``
            ``(p / 255 - mean) / std``; ``"caffe"`` RGB -> BGR then ``(p - 255 mean) / (255 std)``; ``"tf"``
            ``p / (255 std) - mean / std``. ``mean`` and ``std`` are in the model's channel order (BGR for
            ``"caffe"``).

    Example:
        >>> p = Preprocessing((224, 224), 256, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        >>> p.as_dict()["input_size"]
        [224, 224]
        >>> import numpy as np
        >>> caffe = Preprocessing((1, 1), 1, CAFFE_MEAN, CAFFE_STD, mode="caffe")
        >>> caffe.to_tensor(np.array([[[255, 0, 0]]], dtype=np.uint8)).flatten().tolist()  # B, G, R
        [-103.93900299072266, -116.77899932861328, 131.32000732421875]
    """

    input_size: tuple[int, int]
    resize: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"
    mode: str = "torch"

    def __post_init__(self) -> None:
        if (
            len(self.input_size) != 2
            or not all(isinstance(s, int) and s > 0 for s in self.input_size)
            or not isinstance(self.resize, int)
        ):
            raise ModelConfigError(
                f"Preprocessing.input_size must be two positive ints (H, W) and resize an int; received "
                f"input_size={self.input_size!r}, resize={self.resize!r}. Pass e.g. input_size=(224, 224), "
                "resize=256."
            )
        if self.resize < max(self.input_size):
            raise ModelConfigError(
                f"Preprocessing.resize must be at least max(input_size) so the center crop never pads; "
                f"received resize={self.resize} with input_size={self.input_size}. Use resize >= "
                f"{max(self.input_size)} (ImageNet evaluation usually uses input_size / 0.875)."
            )
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise ModelConfigError(
                "Preprocessing.mean and std must be three floats each, std > 0; received "
                f"mean={self.mean!r}, std={self.std!r}. Use RGB statistics such as "
                "mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)."
            )
        if self.interpolation not in _INTERPOLATIONS:
            raise ModelConfigError(
                f"Preprocessing.interpolation must be one of {sorted(_INTERPOLATIONS)}; received "
                f"{self.interpolation!r}."
            )
        if self.mode not in PREPROCESSING_MODES:
            raise ModelConfigError(
                f"Preprocessing.mode must be one of {list(PREPROCESSING_MODES)}; received {self.mode!r}. Use "
                "'torch' for torchvision/timm models, 'caffe' for Keras VGG16/ResNet50, 'tf' for Keras "
                "InceptionV3/InceptionResNetV2."
            )

    @property
    def channel_order(self) -> str:
        """``"BGR"`` when the model takes its channels reversed (``mode="caffe"``), else ``"RGB"``."""
        return "BGR" if self.mode == "caffe" else "RGB"

    def _as_chw_uint8(self, image: np.ndarray) -> torch.Tensor:
        """Validate a uint8 ``HxWx3`` RGB array (``HxW``, ``HxWx1``, ``HxWx4`` accepted); return CHW."""
        if not isinstance(image, np.ndarray):
            raise InputShapeError(
                f"Preprocessing expects a numpy array of shape (H, W, 3) and dtype uint8; received "
                f"{type(image).__name__}. Convert it with np.asarray(pil_image.convert('RGB'))."
            )
        if image.dtype != np.uint8:
            raise InputShapeError(
                f"Preprocessing expects a uint8 RGB image (values 0..255); received dtype {image.dtype}. "
                "Convert it first, e.g. (np.clip(img, 0, 1) * 255).round().astype(np.uint8) for a float "
                "image in [0, 1]."
            )
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
            raise InputShapeError(
                f"Preprocessing expects an image of shape (H, W, 3) (RGB, channels last); received shape "
                f"{image.shape}. Convert greyscale/RGBA/CHW arrays to HxWx3 RGB first."
            )
        if image.shape[0] < 1 or image.shape[1] < 1:
            raise InputShapeError(f"Preprocessing received an empty image of shape {image.shape}.")
        if image.shape[2] == 1:
            image = np.repeat(image, 3, axis=2)
        elif image.shape[2] == 4:
            image = image[:, :, :3]
        image = np.ascontiguousarray(image)
        if not image.flags.writeable:  # np.asarray(PIL image) is read-only; torch.from_numpy would warn
            image = image.copy()
        return torch.from_numpy(image).permute(2, 0, 1).contiguous()

    def _geometry(self, image: np.ndarray) -> torch.Tensor:
        """Resize the shorter side to ``resize`` (antialiased) and center crop; uint8 ``(3, H, W)``."""
        chw = self._as_chw_uint8(image)
        from torchvision.transforms.v2 import functional as TF  # imported when an image is resized, not with cnnlens

        mode = TF.InterpolationMode(self.interpolation)
        resized = TF.resize(chw, [self.resize], interpolation=mode, antialias=True)
        cropped: torch.Tensor = TF.center_crop(resized, list(self.input_size))
        return cropped

    def to_tensor(self, image: np.ndarray) -> torch.Tensor:
        """Turn an RGB image into a normalised model input.

        Args:
            image: uint8 array of shape ``(H, W, 3)`` (RGB). ``(H, W)``, ``(H, W, 1)`` and ``(H, W, 4)``
                (alpha dropped) are accepted too.

        Returns:
            float32 tensor of shape ``(3, *input_size)`` on the CPU, ``(display_image / 255 - mean) / std``
            (channels reversed for ``mode="caffe"``), computed the way the mode's framework computes it.

        Raises:
            InputShapeError: the array is not a uint8 image of a supported shape.
        """
        pixels = self._geometry(image).to(torch.float32)
        if self.mode == "caffe":
            pixels = pixels.flip(0)  # RGB -> BGR
            shift = torch.tensor([255.0 * m for m in self.mean], dtype=torch.float32).view(3, 1, 1)
            scale = torch.tensor([255.0 * s for s in self.std], dtype=torch.float32).view(3, 1, 1)
            return (pixels - shift) / scale
        if self.mode == "tf":
            scale = torch.tensor([255.0 * s for s in self.std], dtype=torch.float32).view(3, 1, 1)
            shift = torch.tensor([m / s for m, s in zip(self.mean, self.std, strict=True)], dtype=torch.float32)
            return pixels / scale - shift.view(3, 1, 1)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        return (pixels.div_(255.0) - mean) / std

    def display_image(self, image: np.ndarray) -> np.ndarray:
        """Apply the geometry of :meth:`to_tensor` without normalising: what a heat map aligns with.

        Args:
            image: uint8 array of shape ``(H, W, 3)`` (RGB), as for :meth:`to_tensor`.

        Returns:
            uint8 array of shape ``(*input_size, 3)``.
        """
        out: np.ndarray = self._geometry(image).permute(1, 2, 0).contiguous().numpy()
        return out

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Undo the normalisation: ``clamp(x * std + mean, 0, 1)``, channels back to RGB for ``mode="caffe"``.

        Args:
            x: normalised tensor of shape ``(B, 3, H, W)`` or ``(3, H, W)``.

        Returns:
            an RGB tensor of the same shape, device and (floating) dtype with values in ``[0, 1]``.

        Raises:
            InputShapeError: ``x`` does not have 3 channels in the right position.
        """
        if x.ndim not in (3, 4) or x.shape[-3] != 3:
            raise InputShapeError(
                f"denormalize expects a tensor of shape (B, 3, H, W) or (3, H, W); received shape {tuple(x.shape)}."
            )
        dtype = x.dtype if x.is_floating_point() else torch.float32
        mean = torch.tensor(self.mean, dtype=dtype, device=x.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=dtype, device=x.device).view(3, 1, 1)
        rgb = (x.to(dtype) * std + mean).clamp(0.0, 1.0)
        return rgb.flip(-3) if self.channel_order == "BGR" else rgb

    def as_dict(self) -> dict[str, object]:
        """Return a JSON-serialisable description for manifests (``mode`` only when it is not ``"torch"``)."""
        out: dict[str, object] = {
            "input_size": [int(self.input_size[0]), int(self.input_size[1])],
            "resize": int(self.resize),
            "mean": [float(m) for m in self.mean],
            "std": [float(s) for s in self.std],
            "interpolation": self.interpolation,
            "crop": "center",
        }
        if self.mode != "torch":
            out["mode"] = self.mode
        return out


IMAGENET_224 = Preprocessing((224, 224), 256, IMAGENET_MEAN, IMAGENET_STD, "bilinear")
"""The classic ImageNet evaluation pipeline: resize 256, center crop 224, ImageNet statistics."""
IMAGENET_224_V2 = Preprocessing((224, 224), 232, IMAGENET_MEAN, IMAGENET_STD, "bilinear")
"""torchvision's ``IMAGENET1K_V2`` recipes: resize 232, center crop 224."""
INCEPTION_V3_299 = Preprocessing((299, 299), 342, IMAGENET_MEAN, IMAGENET_STD, "bilinear")
"""torchvision's InceptionV3: resize 342, center crop 299, ImageNet statistics."""
INCEPTION_RESNET_V2_299 = Preprocessing((299, 299), math.floor(299 / 0.8975), INCEPTION_MEAN, INCEPTION_STD, "bicubic")
"""timm's ``inception_resnet_v2.tf_in1k``: bicubic, crop_pct 0.8975, the TensorFlow "inception" statistics."""
KERAS_CAFFE_224 = Preprocessing((224, 224), 256, CAFFE_MEAN, CAFFE_STD, "bilinear", mode="caffe")
"""Keras VGG16/ResNet50 (``keras.applications`` ``preprocess_input``, mode "caffe") after resize 256, crop 224."""
KERAS_TF_299 = Preprocessing((299, 299), 342, INCEPTION_MEAN, INCEPTION_STD, "bilinear", mode="tf")
"""Keras InceptionV3/InceptionResNetV2 (mode "tf", ``x / 127.5 - 1``) after resize 342, crop 299."""


def override_preprocessing(
    base: Preprocessing | None,
    *,
    input_size: Sequence[int] | None = None,
    resize: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Preprocessing:
    """``base`` with the given fields replaced (``resize`` defaults to the larger input side when changed).

    Args:
        base: The model's own preprocessing, or None (a factory's bare module).
        input_size: ``(H, W)`` or ``(S,)``.
        resize: Shorter side before the center crop.
        mean: Per-channel mean, 1 or 3 values (default: the base's, else ImageNet's).
        std: Per-channel std, 1 or 3 values (default: the base's, else ImageNet's).

    Returns:
        The new :class:`Preprocessing`.

    Raises:
        ModelConfigError: No base and no ``input_size``; malformed sizes or statistics.

    Example:
        >>> override_preprocessing(None, input_size=[32], mean=[0.5] * 3, std=[0.5] * 3).resize
        32
    """
    if input_size is not None:
        sizes = [int(s) for s in input_size]
        if len(sizes) not in (1, 2) or min(sizes) < 1:
            raise ModelConfigError(f"--input-size takes one or two positive ints (H [W]); got {list(input_size)}.")
        size = (sizes[0], sizes[-1])
    elif base is not None:
        size = base.input_size
    else:
        raise ModelConfigError(
            "a model from a factory needs its input size: pass --input-size H [W] (and --mean/--std if it was "
            "not trained with ImageNet statistics), or return a cnnlens LoadedModel from the factory."
        )
    if resize is None:
        resize = base.resize if base is not None and input_size is None else max(size)
    triples: list[tuple[float, float, float]] = []
    for label, given, default in (
        ("mean", mean, base.mean if base else IMAGENET_MEAN),
        ("std", std, base.std if base else IMAGENET_STD),
    ):
        values = [float(v) for v in given] if given is not None else list(default)
        if len(values) == 1:
            values = values * 3
        if len(values) != 3:
            raise ModelConfigError(f"--{label} takes one or three numbers (R G B); got {values}.")
        triples.append((values[0], values[1], values[2]))
    return Preprocessing(
        input_size=size,
        resize=int(resize),
        mean=triples[0],
        std=triples[1],
        interpolation=base.interpolation if base is not None else "bilinear",
        mode=base.mode if base is not None else "torch",
    )
