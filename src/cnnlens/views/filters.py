"""Filter weights as pictures: the first conv's RGB kernels, deeper kernels per output channel.

The data (:class:`FilterSet`: tiles of raw weights, indices, norms, colour limits) is computed here in
torch; drawing it is :func:`cnnlens.viz.views.filter_figure`'s job, so tests can check values.

Views (``view=``):

* ``"rgb"``: a conv whose filters see 3 input channels (the first conv): each filter is one colour tile,
  its three input slices as R, G and B (Zeiler & Fergus 2014, Krizhevsky et al. 2012, figure 3). A model
  that takes BGR input (Keras 'caffe' preprocessing: VGG16, ResNet50) has its slices reversed, so the tile
  is still R, G, B; :attr:`FilterSet.input_channels` says which input channel each slice came from.
* ``"mean"``: one grey-scale tile per output channel, the mean of the kernel over its input channels,
  ``T_k = (1 / C_in_g) sum_c W[k, c]``. For a depthwise conv (one input channel per filter) the mean is the
  kernel itself.
* ``"slices"``: for a few chosen filters, the kernel's first ``max_inputs`` input slices side by side (one
  row per filter), labelled with the model-wide input-channel index (groups accounted for).
* ``"matrix"``: for a 1x1 conv, the ``(filters, input channels)`` weight matrix as one heat map.
* ``"auto"``: ``rgb`` when the filters see exactly 3 input channels, ``matrix`` for 1x1 kernels, else
  ``mean``.

Colour scale (``scale=``): values are mapped symmetrically around zero, ``pixel = 0.5 + W / (2 m)``, so
zero is mid-grey (or white in a diverging colour map), with ``m = max |W|`` over all shown tiles
(``"shared"``: tiles are comparable) or over each tile alone (``"per_tile"``: shapes are readable even
when norms differ). The limits are returned in :attr:`FilterSet.limits` and drawn as a colour bar.

Keras models (:class:`cnnlens.models.keras.KerasModule`): a ``Conv2D`` kernel is stored HWIO
``(kh, kw, C_in, C_out)`` and shown as torch's OIHW ``W[k, c] = K[:, :, c, k]``
(:func:`cnnlens.models.keras.kernel_oihw`); a ``DepthwiseConv2D`` is a depthwise conv (``groups = C_in``).

Selection: ``channels=`` picks filters by index, ``order="index"`` keeps index order, ``order="norm"``
sorts by the L2 norm of the whole filter ``||W[k]||_2`` (largest first, ties by index), and ``top_k`` keeps
the first k after sorting.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from cnnlens.capture import resolve_layer
from cnnlens.errors import LayerError, LayerNotFoundError
from cnnlens.models import LoadedModel, Preprocessing
from cnnlens.views._common import parse_channels, unwrap

__all__ = ["FilterOrder", "FilterScale", "FilterSet", "FilterView", "filters", "first_conv"]

FilterView = Literal["auto", "rgb", "mean", "slices", "matrix"]
FilterOrder = Literal["index", "norm"]
FilterScale = Literal["shared", "per_tile"]

_VIEWS = ("auto", "rgb", "mean", "slices", "matrix")


@dataclass(frozen=True)
class FilterSet:
    """The filters of one conv, ready to draw.

    Attributes:
        layer: The conv's dotted name.
        weight_shape: ``(C_out, C_in / groups, kh, kw)``.
        groups: The conv's ``groups`` (``C_in`` for a depthwise conv).
        in_channels: The conv's ``C_in``.
        view: The view used (``"rgb"``, ``"mean"``, ``"slices"`` or ``"matrix"``; never ``"auto"``).
        indices: Output-channel index of each tile, in display order.
        norms: ``(N,)`` L2 norm of each shown filter over its whole kernel.
        tiles: Raw weights (float32, CPU) per tile. ``rgb``: ``(N, 3, kh, kw)``; ``mean``: ``(N, kh, kw)``;
            ``slices``: ``(N, S, kh, kw)``; ``matrix``: ``(N, C_in / groups)``.
        input_channels: For each tile, the model-wide input channels its values come from (``slices``: one
            per slice; ``rgb``/``mean``/``matrix``: all inputs the filter sees).
        scale: ``"shared"`` or ``"per_tile"``.
        limits: ``(N,)`` the symmetric limit ``m`` of each tile (all equal when shared); never zero.
        order: How the tiles were sorted (``"index"`` or ``"norm"``).
    """

    layer: str
    weight_shape: tuple[int, int, int, int]
    groups: int
    in_channels: int
    view: str
    indices: list[int]
    norms: torch.Tensor
    tiles: torch.Tensor
    input_channels: list[list[int]]
    scale: str
    limits: torch.Tensor
    order: str

    @property
    def depthwise(self) -> bool:
        """Whether every filter sees exactly one input channel of its own (``groups == C_in``)."""
        return self.groups == self.in_channels and self.weight_shape[1] == 1

    def display(self) -> torch.Tensor:
        """Tiles mapped to ``[0, 1]``: ``0.5 + W / (2 m)`` with each tile's limit ``m`` (see the module doc).

        Returns:
            A tensor shaped like :attr:`tiles`, values in ``[0, 1]``.

        Example:
            >>> conv = nn.Conv2d(3, 2, 1, bias=False)
            >>> _ = conv.weight.data.copy_(torch.tensor([1.0, -2.0, 0.0, 0.5, 0.5, 0.5]).view(2, 3, 1, 1))
            >>> filters(nn.Sequential(conv), "0").display()[0, :, 0, 0].tolist()
            [0.75, 0.0, 0.5]
        """
        shape = (-1,) + (1,) * (self.tiles.ndim - 1)
        return (0.5 + self.tiles / (2.0 * self.limits.view(shape))).clamp(0.0, 1.0)

    def labels(self) -> list[str]:
        """One label per tile: the filter index and its norm (e.g. ``"#12 |w|=0.83"``)."""
        return [f"#{k} |w|={float(n):.3g}" for k, n in zip(self.indices, self.norms, strict=True)]


def _keras_kernel(module: nn.Module) -> torch.Tensor | None:
    """A Keras convolution's kernel as OIHW (:func:`cnnlens.models.keras.kernel_oihw`), or None.

    The Keras adapter is only consulted when it was imported (a Keras model was loaded or wrapped).
    """
    adapter = sys.modules.get("cnnlens.models.keras")
    if adapter is None or isinstance(module, nn.Conv2d):
        return None
    kernel: torch.Tensor | None = adapter.kernel_oihw(module)
    return kernel


def _is_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) or _keras_kernel(module) is not None


def first_conv(model: nn.Module) -> str:
    """The dotted name of the first convolution in definition order (``nn.Conv2d``, or a Keras ``Conv2D``).

    Raises:
        LayerNotFoundError: The model has no convolution.
    """
    for name, module in model.named_modules():
        if _is_conv(module):
            return str(name)
    raise LayerNotFoundError(f"{type(model).__name__} has no nn.Conv2d; filters() shows convolution kernels.")


def _conv_weight(module: nn.Module, name: str) -> tuple[torch.Tensor, int, int]:
    """``(weight (C_out, C_in / groups, kh, kw), groups, C_in)`` of a torch or Keras convolution.

    A Keras ``Conv2D`` kernel is HWIO ``(kh, kw, C_in / groups, C_out)``; a ``DepthwiseConv2D`` (and the
    depthwise part of a ``SeparableConv2D``) kernel is ``(kh, kw, C_in, multiplier)``, i.e. ``C_in * multiplier``
    filters of one input channel each (``groups = C_in``).
    """
    if isinstance(module, nn.Conv2d):
        return module.weight, int(module.groups), int(module.in_channels)
    kernel = _keras_kernel(module)
    if kernel is not None:
        multiplier = getattr(module, "depth_multiplier", None)
        if isinstance(multiplier, int) and kernel.shape[1] == 1:  # depthwise: one input channel per filter
            channels = int(kernel.shape[0]) // multiplier
            return kernel, channels, channels
        groups = int(getattr(module, "groups", 1) or 1)
        return kernel, groups, int(kernel.shape[1]) * groups
    convs = [n for n, m in module.named_modules() if isinstance(m, nn.Conv2d)]
    hint = f" Convolutions inside it: {', '.join(repr(f'{name}.{c}') for c in convs[:5])}." if convs else ""
    raise LayerError(
        f"layer {name!r} is a {type(module).__name__}, not an nn.Conv2d (or a Keras Conv2D): filters() shows "
        f"convolution kernels.{hint}"
    )


def _channel_order(model: nn.Module | LoadedModel, module: nn.Module) -> str:
    """``"BGR"`` when the model takes its colour channels reversed (Keras 'caffe' preprocessing), else ``"RGB"``."""
    prep = model.spec.preprocessing if isinstance(model, LoadedModel) else getattr(module, "preprocessing", None)
    return "BGR" if isinstance(prep, Preprocessing) and prep.channel_order == "BGR" else "RGB"


def filters(
    model: nn.Module | LoadedModel,
    layer: str | nn.Module | None = None,
    *,
    view: FilterView = "auto",
    order: FilterOrder = "index",
    channels: str | Sequence[int] | None = None,
    top_k: int | None = 64,
    scale: FilterScale = "shared",
    max_inputs: int = 8,
) -> FilterSet:
    """The filters of a conv layer as tiles of weights, with indices, norms and colour limits.

    See the module docstring for the views, the colour-scale formula ``pixel = 0.5 + W / (2 m)`` and the
    selection rule. Grouped and depthwise convs are handled: a filter's input slices are its group's input
    channels, recorded in :attr:`FilterSet.input_channels`.

    Longer than 80 lines on purpose: argument checks, then one pass from the weight tensor to the tiles of the
    chosen view; each step feeds the next and none is used elsewhere.

    Args:
        model: The network (or a :class:`~cnnlens.models.LoadedModel`).
        layer: A conv's dotted name or module; default: the first ``nn.Conv2d``.
        view: ``"auto"``, ``"rgb"``, ``"mean"``, ``"slices"`` or ``"matrix"``.
        order: ``"index"`` or ``"norm"`` (L2 norm, largest first).
        channels: Output channels to consider (``"0-15"``, a list); default: all.
        top_k: Keep the first k after sorting (None: all). ``slices`` shows at most 16 filters.
        scale: ``"shared"`` (one limit for all tiles) or ``"per_tile"``.
        max_inputs: ``slices`` view: how many input slices per filter.

    Returns:
        The :class:`FilterSet`.

    Raises:
        LayerNotFoundError: Unknown layer name (with suggestions).
        LayerError: The layer is not a conv, or the view does not fit it (``rgb`` needs 3 inputs per filter,
            ``matrix`` a 1x1 kernel), or bad selection arguments.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8))
        >>> filters(net).tiles.shape  # first conv: RGB tiles
        torch.Size([8, 3, 3, 3])
        >>> fs = filters(net, "2", order="norm", top_k=4)  # depthwise: mean == the kernel
        >>> fs.view, fs.tiles.shape, fs.input_channels[0] == [fs.indices[0]]
        ('mean', torch.Size([4, 3, 3]), True)
    """
    module = unwrap(model)
    if view not in _VIEWS:
        raise LayerError(f"view must be one of {', '.join(_VIEWS)}; got {view!r}.")
    if order not in ("index", "norm"):
        raise LayerError(f"order must be 'index' or 'norm'; got {order!r}.")
    if scale not in ("shared", "per_tile"):
        raise LayerError(f"scale must be 'shared' or 'per_tile'; got {scale!r}.")
    if top_k is not None and top_k < 1:
        raise LayerError(f"top_k must be at least 1 (or None for all filters); got {top_k}.")
    if max_inputs < 1:
        raise LayerError(f"max_inputs must be at least 1; got {max_inputs}.")
    ref = resolve_layer(module, first_conv(module) if layer is None else layer)
    raw, groups, in_channels = _conv_weight(ref.module, ref.name)
    weight = raw.detach().to(device="cpu", dtype=torch.float32)
    if not bool(torch.isfinite(weight).all()):
        raise LayerError(f"the weights of {ref.name!r} hold NaN or inf values; the model is broken, nothing to show.")
    c_out, c_in_g, kh, kw = (int(s) for s in weight.shape)
    per_group_out = c_out // groups

    resolved = view
    if view == "auto":
        resolved = "rgb" if c_in_g == 3 else "matrix" if kh == kw == 1 else "mean"
    if resolved == "rgb" and c_in_g != 3:
        raise LayerError(
            f"view 'rgb' needs filters with 3 input channels, but {ref.name!r} has {c_in_g} per filter; use "
            "'mean', 'slices' or 'matrix'."
        )
    if resolved == "matrix" and not kh == kw == 1:
        raise LayerError(f"view 'matrix' is for 1x1 convs; {ref.name!r} has {kh}x{kw} kernels. Use 'mean' or 'slices'.")

    candidates = parse_channels(channels, c_out) if channels is not None else list(range(c_out))
    norms_all = weight.flatten(1).norm(dim=1)
    if order == "norm":
        candidates = sorted(candidates, key=lambda k: (-float(norms_all[k]), k))
    limit = top_k if resolved != "slices" else min(top_k or 16, 16)
    chosen = candidates[:limit] if limit is not None else candidates
    index = torch.tensor(chosen, dtype=torch.long)
    selected = weight[index]

    def group_inputs(k: int) -> list[int]:
        start = (k // per_group_out) * c_in_g
        return list(range(start, start + c_in_g))

    if resolved == "rgb" and _channel_order(model, module) == "BGR":  # tiles in R, G, B order for display
        tiles = selected.flip(1)
        inputs = [group_inputs(k)[::-1] for k in chosen]
    elif resolved == "rgb":
        tiles = selected
        inputs = [group_inputs(k) for k in chosen]
    elif resolved == "mean":
        tiles = selected.mean(dim=1)
        inputs = [group_inputs(k) for k in chosen]
    elif resolved == "slices":
        n_slices = min(c_in_g, max_inputs)
        tiles = selected[:, :n_slices]
        inputs = [group_inputs(k)[:n_slices] for k in chosen]
    else:  # matrix
        tiles = selected[:, :, 0, 0]
        inputs = [group_inputs(k) for k in chosen]

    peak = tiles.abs().flatten(1).max(dim=1).values
    if scale == "shared":
        peak = peak.max().expand(len(chosen)).clone()
    limits = torch.where(peak > 0, peak, torch.ones_like(peak))
    return FilterSet(
        layer=ref.name,
        weight_shape=(c_out, c_in_g, kh, kw),
        groups=groups,
        in_channels=in_channels,
        view=resolved,
        indices=chosen,
        norms=norms_all[index].clone(),
        tiles=tiles.clone(),
        input_channels=inputs,
        scale=scale,
        limits=limits,
        order=order,
    )
