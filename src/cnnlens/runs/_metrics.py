"""Per-sample metrics of a run: Average Drop terms, energy in a box, pointing-game hits.

Private on purpose: these are the per-row terms a run stores, computed on tensors the run already holds
(the batch's logits, its normalised maps). They follow the definitions of :mod:`cnnlens.metrics`
(Average Drop in pixel space with softmax probabilities, as the Grad-CAM++ authors did; energy-based
pointing game as in Score-CAM), so they can be swapped for that package's functions without changing a
number.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from cnnlens.models import Preprocessing
from cnnlens.outputs import OutputSelector, to_logits

__all__ = ["average_drop_terms", "box_mask", "box_metrics", "explanation_inputs", "probabilities"]

Box = tuple[float, float, float, float]


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Softmax in float64; non-finite logits give zeros instead of NaN.

    Example:
        >>> probabilities(torch.tensor([[0.0, 0.0]])).tolist()
        [[0.5, 0.5]]
    """
    probs = torch.softmax(logits.detach().double(), dim=1)
    return torch.nan_to_num(probs, nan=0.0, posinf=1.0, neginf=0.0)


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    flags = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, flag in flags.items():
            m.training = flag


def explanation_inputs(inputs: torch.Tensor, maps: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """The explanation map ``E = I ∘ L`` as a model input, in pixel space.

    Formula: ``p = x · std + mean`` (the ``[0, 1]`` image, unclamped), ``E = (p · L − mean) / std``, so a map
    value of 0 gives black and 1 leaves the pixel unchanged.

    Args:
        inputs: ``(n, 3, H, W)`` model inputs.
        maps: ``(n, H, W)`` maps in ``[0, 1]``.
        prep: The model's preprocessing (its mean and std).
    """
    x = inputs.double()
    mean = torch.tensor(prep.mean, dtype=torch.float64, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(prep.std, dtype=torch.float64, device=x.device).view(1, 3, 1, 1)
    out = ((x * std + mean) * maps.double().to(x.device)[:, None] - mean) / std
    return out.to(inputs.dtype)


def average_drop_terms(
    module: nn.Module,
    inputs: torch.Tensor,
    maps: torch.Tensor,
    classes: torch.Tensor,
    original: torch.Tensor,
    prep: Preprocessing,
    *,
    chunk: int,
    output_selector: OutputSelector | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample Average Drop and Increase-in-Confidence terms.

    Paper: Chattopadhay et al., "Grad-CAM++", WACV 2018, §6.1.

    Formula: ``Y`` = softmax probability of the class on the image, ``O`` = the same on
    ``E = I ∘ L`` (:func:`explanation_inputs`); drop = ``max(0, Y − O) / Y`` (0 where ``Y == 0``),
    increase = ``O > Y``. Average Drop % of a set is ``100 · mean(drop)``.

    Args:
        module: The network (run in eval mode, no graph; its flags are restored).
        inputs: ``(n, 3, H, W)`` model inputs.
        maps: ``(n, H, W)`` normalised maps in ``[0, 1]``.
        classes: ``(n,)`` the explained class per map.
        original: ``(n,)`` float64 ``Y``, from the logits already computed on ``inputs``.
        prep: The model's preprocessing.
        chunk: Images per forward.
        output_selector: Picks the logits from unusual model outputs.

    Returns:
        ``(drop, increase)``: float64 ``(n,)`` in ``[0, 1]`` and bool ``(n,)``.
    """
    n = int(inputs.shape[0])
    explained = torch.zeros(n, dtype=torch.float64)
    param = next(module.parameters(), None)
    device = param.device if param is not None else inputs.device
    with _eval_mode(module), torch.inference_mode():
        for start in range(0, n, max(1, chunk)):
            stop = min(n, start + max(1, chunk))
            e = explanation_inputs(inputs[start:stop].to(device), maps[start:stop].to(device), prep)
            probs = probabilities(to_logits(module(e), output_selector))
            idx = classes[start:stop].to(probs.device).view(-1, 1)
            explained[start:stop] = probs.gather(1, idx).squeeze(1).cpu()
    y = original.double().cpu()
    safe = torch.where(y > 0, y, torch.ones_like(y))
    drop = torch.where(y > 0, (y - explained).clamp(min=0.0) / safe, torch.zeros_like(y)).clamp(0.0, 1.0)
    return drop, explained > y


def box_mask(box: Box, height: int, width: int) -> torch.Tensor:
    """Bool ``(H, W)`` mask of the pixels whose centres lie in ``box`` (``x0 <= c + 0.5 < x1``).

    Example:
        >>> box_mask((1.0, 0.0, 3.0, 1.0), 2, 4).int().tolist()
        [[0, 1, 1, 0], [0, 0, 0, 0]]
    """
    x0, y0, x1, y1 = box
    cols = torch.arange(width, dtype=torch.float64) + 0.5
    rows = torch.arange(height, dtype=torch.float64) + 0.5
    return ((rows >= y0) & (rows < y1))[:, None] & ((cols >= x0) & (cols < x1))[None, :]


def box_metrics(maps: torch.Tensor, boxes: Sequence[Box]) -> tuple[torch.Tensor, torch.Tensor]:
    """Energy in the box and pointing-game hit for each map.

    Papers: energy-based pointing game, Wang et al., "Score-CAM", CVPRW 2020; pointing game, Zhang et al.,
    "Top-down Neural Attention by Excitation Backprop", ECCV 2016 (here without tolerance margin).

    Formula: energy = ``Σ_{(i,j) ∈ box} L_ij / Σ_ij L_ij`` (0 for an all-zero map); hit = the map's maximum
    (first in row-major order) lies in the box; an all-zero (degenerate) map never hits.

    Args:
        maps: ``(n, H, W)`` normalised maps in ``[0, 1]``.
        boxes: One box per map, in model-input pixels.

    Returns:
        ``(energy, hit)``: float64 ``(n,)`` in ``[0, 1]`` and bool ``(n,)``.
    """
    n, height, width = (int(s) for s in maps.shape)
    energy = torch.zeros(n, dtype=torch.float64)
    hit = torch.zeros(n, dtype=torch.bool)
    if n == 0:
        return energy, hit
    flat = maps.detach().double().cpu().reshape(n, -1)
    for i, box in enumerate(boxes):
        mask = box_mask(box, height, width).reshape(-1)
        total = float(flat[i].sum())
        if total > 0:
            energy[i] = min(1.0, max(0.0, float(flat[i][mask].sum()) / total))
            hit[i] = bool(mask[int(flat[i].argmax())])
    return energy, hit
