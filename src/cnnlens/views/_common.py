"""Helpers shared by the forward views: unwrap a model, turn an image into a model input."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from cnnlens.errors import InputShapeError, LayerError, ModelConfigError, ModelTypeError
from cnnlens.models import LoadedModel, Preprocessing
from cnnlens.models.preprocessing import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "Normalization",
    "fixed_input_hw",
    "intra_op_threads",
    "model_device",
    "normalization_of",
    "parse_channels",
    "to_input",
    "unwrap",
]

Normalization = tuple[tuple[float, float, float], tuple[float, float, float]]
"""``(mean, std)`` of the model's input normalisation, per RGB channel."""


def unwrap(model: nn.Module | LoadedModel) -> nn.Module:
    """The ``nn.Module`` of a model or a :class:`~cnnlens.models.LoadedModel`.

    Raises:
        ModelConfigError: ``model`` is neither.
    """
    module = model.module if isinstance(model, LoadedModel) else model
    if not isinstance(module, nn.Module):
        raise ModelTypeError(f"model must be a torch.nn.Module or a LoadedModel, got {type(model).__name__}.")
    return module


def model_device(module: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def fixed_input_hw(module: nn.Module) -> tuple[int, int] | None:
    """The only input ``(H, W)`` a model accepts, or None when it takes any size.

    A Keras model (:class:`cnnlens.models.keras.KerasModule`) built for one input shape refuses any other
    (Keras checks its input spec), whatever its layers could compute; a torch model takes any size.

    Example:
        >>> fixed_input_hw(nn.Conv2d(3, 4, 3)) is None
        True
    """
    keras_model = getattr(module, "keras_model", None)
    try:
        shape = getattr(keras_model, "input_shape", None)
    except Exception:  # a subclassed Keras model may have no defined input shape; it then takes any size
        return None
    if not isinstance(shape, tuple) or len(shape) != 4:
        return None
    h, w = (shape[1], shape[2]) if getattr(module, "cnnlens_layout", "nhwc") == "nhwc" else (shape[2], shape[3])
    return (h, w) if isinstance(h, int) and isinstance(w, int) else None


def normalization_of(model: nn.Module | LoadedModel, normalization: Normalization | None = None) -> Normalization:
    """The input normalisation to apply: explicit, else a zoo model's, else ImageNet's (documented default)."""
    if normalization is not None:
        mean, std = normalization
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ModelConfigError(
                f"normalization must be ((m_r, m_g, m_b), (s_r, s_g, s_b)) with s > 0; received {normalization!r}."
            )
        return (tuple(float(m) for m in mean), tuple(float(s) for s in std))  # type: ignore[return-value]
    if isinstance(model, LoadedModel):
        prep = model.spec.preprocessing
        return prep.mean, prep.std
    return IMAGENET_MEAN, IMAGENET_STD


def to_input(
    model: nn.Module | LoadedModel,
    image: torch.Tensor | np.ndarray,
    preprocessing: Preprocessing | None = None,
) -> torch.Tensor:
    """One image as a model input ``(1, C, H, W)``.

    Args:
        model: The model; a :class:`~cnnlens.models.LoadedModel` brings its preprocessing.
        image: A preprocessed tensor ``(C, H, W)`` or ``(1, C, H, W)``, or a uint8 RGB array ``(H, W, 3)``
            (resized, cropped and normalised by ``preprocessing``, else by the zoo model's).
        preprocessing: Overrides the model's preprocessing for arrays.

    Raises:
        InputShapeError: A batch of several images, a wrong rank, or an array without a preprocessing.
    """
    if isinstance(image, np.ndarray):
        prep = preprocessing or (model.spec.preprocessing if isinstance(model, LoadedModel) else None)
        if prep is None:
            raise InputShapeError(
                "an image array needs a preprocessing to become a model input; pass a LoadedModel, "
                "preprocessing=Preprocessing(...), or a preprocessed tensor (C, H, W)."
            )
        return prep.to_tensor(image)[None]
    if not isinstance(image, torch.Tensor):
        raise InputShapeError(
            f"image must be a tensor (C, H, W) or a uint8 array (H, W, 3), got {type(image).__name__}."
        )
    x = image.unsqueeze(0) if image.ndim == 3 else image
    if x.ndim != 4 or x.shape[0] != 1:
        raise InputShapeError(
            f"one image is expected, as (C, H, W) or (1, C, H, W); got shape {tuple(image.shape)}. Call once per image."
        )
    return x.detach()


def parse_channels(spec: str | int | Sequence[int], limit: int | None = None) -> list[int]:
    """Parse a channel selection: ``"0-15"``, ``"3,7,10-12"``, an int or a list of ints.

    Args:
        spec: The selection; ranges are inclusive.
        limit: The number of channels, to check the indices against (None: not checked).

    Returns:
        The indices in the order given (duplicates removed).

    Raises:
        LayerError: An unparsable selection or an index out of range.

    Example:
        >>> parse_channels("0-3,7")
        [0, 1, 2, 3, 7]
    """
    out: list[int] = []
    if isinstance(spec, int):
        out = [spec]
    elif isinstance(spec, str):
        for part in spec.replace(" ", "").split(","):
            if not part:
                continue
            lo, sep, hi = part.partition("-")
            try:
                if sep:
                    first, last = int(lo), int(hi)
                    if last < first:
                        raise ValueError(part)
                    out.extend(range(first, last + 1))
                else:
                    out.append(int(part))
            except ValueError:
                raise LayerError(
                    f"cannot read channel selection {spec!r}: use indices and inclusive ranges such as '0-15' or "
                    "'3,7,10-12'."
                ) from None
    else:
        out = [int(c) for c in spec]
    out = list(dict.fromkeys(out))
    if not out:
        raise LayerError(f"the channel selection {spec!r} is empty; give at least one channel index.")
    if limit is not None:
        bad = [c for c in out if not 0 <= c < limit]
        if bad:
            raise LayerError(f"channel {bad[0]} is out of range: the layer has {limit} channels (0..{limit - 1}).")
    return out


@contextmanager
def intra_op_threads(threads: int | None) -> Iterator[None]:
    """Run a block with ``torch.set_num_threads(threads)``, restoring the previous count afterwards.

    ``None`` leaves torch's setting alone. One thread helps loops of many small CPU ops on a machine shared
    with other jobs, where every OpenMP barrier waits for preempted threads.

    Raises:
        LayerError: ``threads`` is not a positive integer.
    """
    if threads is None:
        yield
        return
    if not isinstance(threads, int) or threads < 1:
        raise LayerError(f"threads must be a positive integer (or None for torch's default); got {threads!r}.")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
