"""Decoding in worker processes: files to model inputs, bad files to error entries, batches per shard.

:func:`make_loader` builds a ``torch.utils.data.DataLoader`` over the pending samples; with ``workers > 0``
the images are read, resized, cropped and normalised in that many worker processes while the model runs on
the previous batch (``prefetch_factor`` batches ahead per worker). A file that cannot be read becomes an
error entry of its batch, never an exception. Batches never straddle two shards, so a shard is complete as
soon as its last batch has been processed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Sampler
from torch.utils.data import Dataset as TorchDataset

from cnnlens.data import DEFAULT_MAX_PIXELS, load_image
from cnnlens.errors import CnnlensError
from cnnlens.models import Preprocessing
from cnnlens.runs.dataset import Box, Sample

__all__ = ["Batch", "Decoded", "box_to_input", "collate", "decode_sample", "make_loader", "shard_batches"]


@dataclass
class Decoded:
    """One sample after decoding: its model input, or why it failed.

    Attributes:
        sample: The dataset sample.
        tensor: ``(3, H, W)`` float32 model input, or None when the file is bad.
        box_input: The box in model-input pixels (clipped to the input), or None.
        error: Why the file could not be used, or None.
    """

    sample: Sample
    tensor: torch.Tensor | None
    box_input: Box | None
    error: str | None


@dataclass
class Batch:
    """A batch of samples: the decoded ones stacked, the failed ones with their reasons.

    Attributes:
        samples: Every sample of the batch, in dataset order.
        inputs: ``(m, 3, H, W)`` model inputs of the samples whose ``errors`` entry is None, in order.
        errors: Per sample: None, or why it failed.
        boxes: Per sample: its box in model-input pixels, or None.
    """

    samples: list[Sample]
    inputs: torch.Tensor
    errors: list[str | None]
    boxes: list[Box | None]

    @property
    def ok(self) -> list[int]:
        """Positions of the decoded samples (rows of ``inputs``)."""
        return [i for i, e in enumerate(self.errors) if e is None]

    def pin_memory(self) -> Batch:
        """Pinned copy of the inputs (called by the DataLoader's pin-memory thread)."""
        return Batch(self.samples, self.inputs.pin_memory(), self.errors, self.boxes)


def box_to_input(box: Box, image_hw: tuple[int, int], prep: Preprocessing) -> Box:
    """Map a box from original-image pixels to model-input pixels through ``prep``'s resize and center crop.

    The shorter side becomes ``prep.resize`` (the longer ``int(resize · long / short)``, as torchvision does),
    then the center ``input_size`` window is cut (offsets ``round((size − crop) / 2)``); the result is clipped
    to the input.

    Example:
        >>> p = Preprocessing((4, 4), 4, (0.5,) * 3, (0.5,) * 3)
        >>> box_to_input((0.0, 0.0, 4.0, 8.0), (8, 8), p)
        (0.0, 0.0, 2.0, 4.0)
    """
    h, w = image_hw
    short, long = (h, w) if h <= w else (w, h)
    new_short, new_long = prep.resize, int(prep.resize * long / short)
    new_h, new_w = (new_short, new_long) if h <= w else (new_long, new_short)
    crop_h, crop_w = prep.input_size
    top = round((new_h - crop_h) / 2.0)
    left = round((new_w - crop_w) / 2.0)
    sx, sy = new_w / w, new_h / h
    x0, y0, x1, y1 = box
    return (
        min(max(x0 * sx - left, 0.0), float(crop_w)),
        min(max(y0 * sy - top, 0.0), float(crop_h)),
        min(max(x1 * sx - left, 0.0), float(crop_w)),
        min(max(y1 * sy - top, 0.0), float(crop_h)),
    )


def decode_sample(sample: Sample, prep: Preprocessing, max_pixels: int = DEFAULT_MAX_PIXELS) -> Decoded:
    """Read and preprocess one sample; a bad file gives an error entry (its :class:`ImageReadError` text)."""
    try:
        image = load_image(sample.path, max_pixels=max_pixels)
        tensor = prep.to_tensor(image)
    except CnnlensError as exc:
        return Decoded(sample, None, None, str(exc))
    box = None if sample.box is None else box_to_input(sample.box, (int(image.shape[0]), int(image.shape[1])), prep)
    return Decoded(sample, tensor, box, None)


class _DecodeSet(TorchDataset[Decoded]):
    """Map-style dataset over samples; item ``i`` is :func:`decode_sample` of sample ``i``."""

    def __init__(self, samples: Sequence[Sample], prep: Preprocessing, max_pixels: int) -> None:
        self.samples = list(samples)
        self.prep = prep
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Decoded:
        return decode_sample(self.samples[i], self.prep, self.max_pixels)


def collate(items: list[Decoded]) -> Batch:
    """Stack the decoded samples of one batch; failed ones keep their reason."""
    tensors = [d.tensor for d in items if d.tensor is not None]
    inputs = torch.stack(tensors) if tensors else torch.zeros((0, 3, 1, 1), dtype=torch.float32)
    return Batch(
        samples=[d.sample for d in items],
        inputs=inputs,
        errors=[d.error for d in items],
        boxes=[d.box_input for d in items],
    )


def shard_batches(shards: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Cut each shard (a list of sample positions) into batches of at most ``batch_size``; never across shards.

    Example:
        >>> shard_batches([[0, 1, 2], [3, 4]], 2)
        [[0, 1], [2], [3, 4]]
    """
    out: list[list[int]] = []
    for shard in shards:
        items = list(shard)
        out.extend(items[i : i + batch_size] for i in range(0, len(items), batch_size))
    return out


class _ListSampler(Sampler[list[int]]):
    def __init__(self, batches: list[list[int]]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def make_loader(
    samples: Sequence[Sample],
    batches: list[list[int]],
    prep: Preprocessing,
    *,
    workers: int,
    pin_memory: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> DataLoader[Decoded]:
    """A DataLoader yielding one :class:`Batch` per entry of ``batches`` (positions into ``samples``), in order.

    Args:
        samples: All samples of the run.
        batches: The batches to decode (see :func:`shard_batches`).
        prep: The model's preprocessing.
        workers: Decoding processes (0: decode in this process, between batches).
        pin_memory: Pin batches for faster copies to a GPU.
        max_pixels: Largest accepted image (see :func:`cnnlens.data.load_image`).
    """
    return DataLoader(
        _DecodeSet(samples, prep, max_pixels),
        batch_sampler=_ListSampler(batches),
        num_workers=max(0, workers),
        collate_fn=collate,
        pin_memory=pin_memory,
        prefetch_factor=4 if workers > 0 else None,
        persistent_workers=False,
    )
