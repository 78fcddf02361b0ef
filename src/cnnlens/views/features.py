"""Feature maps: the channels a layer produces for one image, ranked and ready to draw.

All layers come from one :func:`cnnlens.capture.record` call (one forward, and one backward only when the
ranking needs gradients); this module registers no hooks. Drawing is
:func:`cnnlens.viz.views.feature_figure`'s job.

Ranking (``rank=``):

* ``"activation"``: by the channel's mean activation over positions, ``v_k = (1 / hw) sum_ij A_k,ij``
  (largest first): what the layer "sees most" in this image.
* ``"gradcam"``: by the channel's Grad-CAM weight for a class ``c`` (Selvaraju et al., ICCV 2017),
  ``w_k = (1 / hw) sum_ij dS_c / dA_k,ij`` with ``S_c`` the class logit (largest first): the channels
  whose increase raises the class score most. This is exactly the weight of the ``gradcam`` method.
* ``"index"``: channel order; the value shown is the mean activation.

Colour scale (``scale=``): ``"shared"`` (default) uses one range for all shown maps of a layer, so channels
are comparable; ``"per_map"`` gives each its own range. A range that contains negative values is made
symmetric, ``[-m, m]`` with ``m = max |A|``, and drawn with a diverging colour map; a non-negative one is
``[0, max A]``. A flat range (all zeros) is widened to ``[v, v + 1]`` so nothing divides by zero.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import nn

from cnnlens.capture import LayerSpec, record
from cnnlens.capture.layout import LayoutSpec
from cnnlens.errors import LayerError, TargetError
from cnnlens.explain import display_images
from cnnlens.models import LoadedModel, Preprocessing
from cnnlens.outputs import OutputSelector
from cnnlens.views._common import parse_channels, to_input, unwrap

__all__ = ["FeatureMaps", "FeatureRank", "FeatureScale", "LayerFeatures", "color_limits", "feature_maps"]

FeatureRank = Literal["activation", "gradcam", "index"]
FeatureScale = Literal["shared", "per_map"]


def color_limits(maps: torch.Tensor, scale: FeatureScale) -> tuple[torch.Tensor, bool]:
    """Colour limits ``(N, 2)`` for maps ``(N, h, w)`` and whether they are signed (see the module doc).

    Example:
        >>> lim, signed = color_limits(torch.tensor([[[-1.0, 2.0]], [[0.0, 0.5]]]), "shared")
        >>> lim.tolist(), signed
        ([[-2.0, 2.0], [-2.0, 2.0]], True)
    """
    if maps.numel() == 0:
        return torch.zeros(0, 2), False
    flat = torch.nan_to_num(maps.detach().double().flatten(1), nan=0.0, posinf=0.0, neginf=0.0)
    lo = flat.min(dim=1).values
    hi = flat.max(dim=1).values
    if scale == "shared":
        lo = lo.min().expand_as(lo)
        hi = hi.max().expand_as(hi)
    signed = bool((lo < 0).any())
    if signed:
        m = torch.maximum(lo.abs(), hi.abs())
        lo, hi = -m, m
    else:
        lo = torch.zeros_like(lo)
    flat_range = hi <= lo
    hi = torch.where(flat_range, lo + 1.0, hi)
    return torch.stack([lo, hi], dim=1).float(), signed


@dataclass(frozen=True)
class LayerFeatures:
    """One layer's feature maps for one image.

    Attributes:
        layer: The layer key.
        activation: ``(C, h, w)`` the whole captured activation (float32, CPU).
        indices: The shown channels, best first.
        values: ``(k,)`` the ranking value of each shown channel (float64): mean activation, or Grad-CAM
            weight for ``rank="gradcam"``.
        maps: ``(k, h, w)`` ``activation[indices]``.
        rank: How channels were ranked.
        scale: ``"shared"`` or ``"per_map"``.
        limits: ``(k, 2)`` colour range ``(vmin, vmax)`` of each map.
        signed: Whether the range is symmetric around zero (diverging colour map).
        all_values: ``(C,)`` the ranking value of every channel.
    """

    layer: str
    activation: torch.Tensor
    indices: list[int]
    values: torch.Tensor
    maps: torch.Tensor
    rank: str
    scale: str
    limits: torch.Tensor
    signed: bool
    all_values: torch.Tensor

    def labels(self) -> list[str]:
        """One label per map: channel index and ranking value (e.g. ``"#12 1.83"``)."""
        return [f"#{k} {float(v):.3g}" for k, v in zip(self.indices, self.values, strict=True)]


@dataclass(frozen=True)
class FeatureMaps:
    """Feature maps of several layers for one image, from one forward.

    Attributes:
        layers: Layer key -> :class:`LayerFeatures`, in the order requested.
        image: ``(H, W, 3)`` uint8 the image as the model saw it (for display).
        logits: ``(K,)`` the model's logits for the image.
        target_class: The class the Grad-CAM ranking explains (None for other rankings).
        class_name: Its name when known.
    """

    layers: dict[str, LayerFeatures]
    image: torch.Tensor
    logits: torch.Tensor
    target_class: int | None = None
    class_name: str | None = None
    meta: dict[str, object] = field(default_factory=dict)

    def __getitem__(self, layer: str) -> LayerFeatures:
        """The features of one layer."""
        try:
            return self.layers[layer]
        except KeyError:
            raise LayerError(f"no feature maps for layer {layer!r}; recorded: {', '.join(self.layers)}.") from None


def feature_maps(
    model: nn.Module | LoadedModel,
    image: torch.Tensor | np.ndarray,
    layers: LayerSpec | Sequence[LayerSpec],
    *,
    rank: FeatureRank = "activation",
    target: int | None = None,
    top_k: int | None = 16,
    channels: str | Sequence[int] | None = None,
    scale: FeatureScale = "shared",
    preprocessing: Preprocessing | None = None,
    output_selector: OutputSelector | None = None,
    layout: LayoutSpec | Mapping[str, LayoutSpec] = None,
) -> FeatureMaps:
    """The channels of one or several layers for one image, ranked, top-k, with colour limits.

    One forward records every layer (plus one backward for ``rank="gradcam"``); see the module docstring
    for the rankings, ``v_k = mean_ij A_k,ij`` or ``w_k = mean_ij dS_c/dA_k,ij``, and the colour scales.

    Args:
        model: The network (or a :class:`~cnnlens.models.LoadedModel`).
        image: A preprocessed tensor ``(C, H, W)``/``(1, C, H, W)`` or a uint8 RGB array ``(H, W, 3)``.
        layers: One layer or several (dotted names or modules); each must output ``(B, C, h, w)``.
        rank: ``"activation"``, ``"gradcam"`` or ``"index"``.
        target: The class for ``rank="gradcam"`` (None: the top predicted class).
        top_k: How many channels to keep per layer (None: all).
        channels: Only consider these channels (``"0-15"``, a list), same for every layer.
        scale: ``"shared"`` or ``"per_map"``.
        preprocessing: Preprocessing for an image array when ``model`` is a plain module.
        output_selector: Picks the logits from unusual model outputs.
        layout: How each layer's output maps to ``(C, h, w)`` maps (``layout=`` of :func:`cnnlens.explain`):
            None infers it (a ViT block's tokens become ``(C, 14, 14)`` maps of the patch grid, a channels-last
            Swin stage is permuted); one layout text for every layer or ``{layer: text}``.

    Returns:
        The :class:`FeatureMaps`.

    Raises:
        LayerNotFoundError: Unknown layer.
        LayerError: A layer's output is not a feature map, or bad selection arguments.
        TargetError: ``target`` out of range, or ``target`` given without ``rank="gradcam"``.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        ...                     nn.Linear(4, 2))
        >>> fm = feature_maps(net, torch.randn(3, 8, 8), ["0", "1"], top_k=2)
        >>> fm["1"].maps.shape, len(fm["1"].indices)
        (torch.Size([2, 6, 6]), 2)
    """
    module = unwrap(model)
    if rank not in ("activation", "gradcam", "index"):
        raise LayerError(f"rank must be 'activation', 'gradcam' or 'index'; got {rank!r}.")
    if scale not in ("shared", "per_map"):
        raise LayerError(f"scale must be 'shared' or 'per_map'; got {scale!r}.")
    if top_k is not None and top_k < 1:
        raise LayerError(f"top_k must be at least 1 (or None for all channels); got {top_k}.")
    if target is not None and rank != "gradcam":
        raise TargetError(f"a target class ranks channels by Grad-CAM weight: pass rank='gradcam' (got {rank!r}).")
    x = to_input(model, image, preprocessing)
    layer_list: list[LayerSpec] = [layers] if isinstance(layers, (str, nn.Module)) else list(layers)
    gradcam = rank == "gradcam"
    rec = record(
        module, x, layer_list, targets=target, gradients=gradcam, output_selector=output_selector, layout=layout
    )
    klass: int | None = None
    if gradcam:
        assert rec.target_classes is not None  # set by Capture.run
        klass = int(rec.target_classes[0, 0])
    out: dict[str, LayerFeatures] = {}
    for key in rec.layers:
        act = rec.activations[key]
        if act.ndim != 4:
            raise LayerError(
                f"layer {key!r} outputs shape {tuple(act.shape)}, not a feature map (B, C, h, w); choose a "
                "convolutional layer or block (see `cnnlens layers`)."
            )
        a = torch.nan_to_num(act[0].detach().float().cpu(), nan=0.0, posinf=0.0, neginf=0.0)
        if gradcam:
            grad = torch.nan_to_num(rec.gradients[key][0, 0].detach().cpu(), nan=0.0, posinf=0.0, neginf=0.0)
            values_all = grad.double().mean(dim=(1, 2))  # Grad-CAM: w_k = mean_ij dS/dA_k,ij
        else:
            values_all = a.double().mean(dim=(1, 2))
        values_all = torch.nan_to_num(values_all, nan=0.0, posinf=0.0, neginf=0.0)
        n_channels = int(a.shape[0])
        candidates = parse_channels(channels, n_channels) if channels is not None else list(range(n_channels))
        if rank != "index":
            candidates = sorted(candidates, key=lambda k: (-float(values_all[k]), k))
        chosen = candidates[:top_k] if top_k is not None else candidates
        index = torch.tensor(chosen, dtype=torch.long)
        maps = a[index]
        limits, signed = color_limits(maps, scale)
        out[key] = LayerFeatures(
            layer=key,
            activation=a,
            indices=chosen,
            values=values_all[index].clone(),
            maps=maps,
            rank=rank,
            scale=scale,
            limits=limits,
            signed=signed,
            all_values=values_all,
        )
    loaded = model if isinstance(model, LoadedModel) else None
    name = loaded.class_names[klass] if loaded is not None and klass is not None else None
    return FeatureMaps(
        layers=out,
        image=display_images(rec.inputs, loaded)[0],
        logits=rec.logits[0].detach().cpu(),
        target_class=klass,
        class_name=name,
    )
