"""Layer layouts: how a recorded layer output maps to the ``(B, C, h, w)`` view methods see.

A method sees feature maps ``(B, C, h, w)`` (or volumes ``(B, C, d, h, w)``); models produce other layouts:

* ``nchw``: convolutional networks (the identity map);
* ``nhwc``: channels last, ``(B, h, w, C)`` (timm and torchvision Swin stages, the permuted inner layers of
  ConvNeXt blocks);
* ``tokens``: ``(B, N, C)`` with ``P`` prefix tokens (class, distillation, register tokens) followed by the
  ``h x w`` patch grid in row-major order (ViT, DeiT); the prefix tokens are not on the grid and are left out
  of the map;
* ``ncdhw``: volumes ``(B, C, d, h, w)`` from ``Conv3d`` networks (the identity map).

A :class:`Layout` maps a raw output to the map view (:meth:`Layout.to_maps`) and back
(:meth:`Layout.from_maps`, for replays that substitute map-view rows). The capture applies the same map to
the layer's gradient, so a method written for ``(B, C, h, w)`` works on every layout unchanged.

The layout of a layer is inferred from its output, the model and the input size (:func:`infer_layout`), or
given explicitly (:func:`parse_layout`: ``"nhwc"``, ``"tokens:1"``, ``"tokens:1:14x14"``...). The token grid
comes from the model where it says so (timm ``patch_embed``, torchvision ``patch_size``) and the *actual*
input size, never from ``sqrt(N)``: :func:`token_geometry`.

Example:
    >>> import torch
    >>> lay = parse_layout("tokens:1:2x3")
    >>> raw = torch.arange(2 * 7 * 4, dtype=torch.float32).reshape(2, 7, 4)  # (B, 1 + 2*3 tokens, C)
    >>> maps = lay.to_maps(raw)
    >>> tuple(maps.shape), bool(torch.equal(lay.from_maps(maps, raw), raw))
    ((2, 4, 2, 3), True)
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, Union, get_args

import torch
from torch import nn

from cnnlens.capture.geometry import detect_4d, guess_grid, input_hw, token_geometry, vit_like
from cnnlens.capture.layers import LayerRef, resolve_layer
from cnnlens.errors import LayoutError, OptionError

__all__ = [
    "Layout",
    "LayoutKind",
    "LayoutResolver",
    "LayoutSpec",
    "infer_layout",
    "parse_layout",
    "token_geometry",
]

LayoutKind = Literal["nchw", "nhwc", "tokens", "ncdhw"]
_KINDS: tuple[str, ...] = get_args(LayoutKind)
_RANK = {"nchw": 4, "nhwc": 4, "tokens": 3, "ncdhw": 5}
_INFER_ALL = "explicit: tokens (prefix and grid inferred)"


@dataclass(frozen=True)
class Layout:
    """The layout of one layer's output and its map to the ``(B, C, h, w)`` view.

    Attributes:
        kind: ``"nchw"``, ``"nhwc"``, ``"tokens"`` or ``"ncdhw"``.
        prefix: Tokens only: how many leading tokens are not on the grid (class, distillation, registers).
        grid: Tokens only: the ``(h, w)`` patch grid (None in a spec whose grid is still to be inferred).
        source: How the layout was found (``"explicit"``, ``"timm num_prefix_tokens=2; grid 14x14 from
            patch_embed at 224x224"``...).
    """

    kind: LayoutKind
    prefix: int = 0
    grid: tuple[int, int] | None = None
    source: str = ""

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise OptionError(f"layout kind must be one of {', '.join(_KINDS)}; got {self.kind!r}.")
        if not isinstance(self.prefix, int) or self.prefix < 0:
            raise OptionError(f"layout prefix must be an integer >= 0, got {self.prefix!r}.")
        if self.kind != "tokens" and (self.prefix or self.grid is not None):
            raise OptionError(f"prefix and grid belong to the 'tokens' layout only, not to {self.kind!r}.")
        if self.grid is not None:
            grid = tuple(self.grid)
            if len(grid) != 2 or not all(isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in grid):
                raise OptionError(f"layout grid must be two positive integers (h, w), got {self.grid!r}.")
            object.__setattr__(self, "grid", grid)  # a list given by a caller becomes a (hashable) tuple

    @property
    def rank(self) -> int:
        """The rank of the raw output this layout describes (3 for tokens, 4 or 5 otherwise)."""
        return _RANK[self.kind]

    @property
    def is_identity(self) -> bool:
        """Whether the map view is the raw output itself (``nchw`` and ``ncdhw``)."""
        return self.kind in ("nchw", "ncdhw")

    def check(self, raw: torch.Tensor, layer: str = "") -> None:
        """Raise :class:`LayoutError` when ``raw`` (a layer output) does not fit this layout.

        Args:
            raw: The layer's output.
            layer: The layer's name, for the message.
        """
        where = f"layer {layer!r}" if layer else "the layer"
        if raw.ndim != self.rank:
            raise LayoutError(
                f"{where} outputs shape {tuple(raw.shape)} (rank {raw.ndim}), but layout {self.describe()!r} "
                f"expects rank {self.rank}; pass a layout that fits the output (nchw/nhwc: 4-D, tokens: 3-D "
                "(B, N, C), ncdhw: 5-D)."
            )
        if self.kind == "tokens":
            if self.grid is None:
                raise LayoutError(f"layout {self.describe()!r} of {where} has no grid; give one as 'tokens:P:HxW'.")
            n = int(raw.shape[1])
            h, w = self.grid
            if n - self.prefix != h * w:
                which = "given" if self.source == "explicit" else "inferred"
                raise LayoutError(
                    f"{where} outputs {n} tokens, but the {which} layout has {self.prefix} prefix token(s) and a "
                    f"{h}x{w} grid ({self.prefix} + {h * w} = {self.prefix + h * w} != N={n}; "
                    f"{self.source or 'no source'}); "
                    f"pass layout='tokens:P:HxW' with P + H*W = {n}."
                )

    def to_maps(self, t: torch.Tensor) -> torch.Tensor:
        """Map a raw layer output ``(B, ...)`` to ``(B, C, h, w)`` (``(B, C, d, h, w)`` for volumes).

        The result is a view where possible (``nchw``/``ncdhw``: ``t`` itself; ``nhwc``: a permutation);
        callers that need contiguous memory call ``.contiguous()``. Prefix tokens are left out.

        Example:
            >>> Layout("nhwc").to_maps(torch.zeros(1, 5, 6, 3)).shape
            torch.Size([1, 3, 5, 6])
        """
        if self.kind in ("nchw", "ncdhw"):
            return t
        if self.kind == "nhwc":
            return t.permute(0, 3, 1, 2)
        assert self.grid is not None  # checked against the output before use
        h, w = self.grid
        grid = t[:, self.prefix :, :] if self.prefix else t
        return grid.transpose(1, 2).reshape(t.shape[0], t.shape[2], h, w)

    def from_maps(self, maps: torch.Tensor, raw: torch.Tensor | None = None) -> torch.Tensor:
        """The inverse of :meth:`to_maps`: map-view rows ``(n, C, h, w)`` back to the layer's raw layout.

        Args:
            maps: ``(n, C, h, w)`` rows in the map view.
            raw: Tokens with prefix tokens only: the raw outputs ``(n, N, C)`` (or just their prefix rows
                ``(n, P, C)``) of the samples the rows belong to; their prefix rows are copied unchanged.

        Returns:
            ``(n, ...)`` contiguous rows in the layer's own layout.

        Raises:
            LayoutError: Prefix tokens are needed but ``raw`` is missing or has the wrong shape.
        """
        if self.kind in ("nchw", "ncdhw"):
            return maps
        if self.kind == "nhwc":
            return maps.permute(0, 2, 3, 1).contiguous()
        grid = maps.flatten(2).transpose(1, 2)
        if not self.prefix:
            return grid.contiguous()
        if raw is None or raw.ndim != 3 or raw.shape[0] != maps.shape[0] or raw.shape[1] < self.prefix:
            got = None if raw is None else tuple(raw.shape)
            raise LayoutError(
                f"mapping {maps.shape[0]} rows back to tokens needs the raw prefix rows (n, >= {self.prefix}, C) of "
                f"their samples; got {got}."
            )
        return torch.cat([raw[:, : self.prefix, :].to(dtype=maps.dtype), grid], dim=1)

    def describe(self) -> str:
        """A readable one-line description, e.g. ``"tokens: 1 prefix token + 14x14 grid (timm ...)"``."""
        text: str = self.kind
        if self.kind == "tokens":
            grid = "?x?" if self.grid is None else f"{self.grid[0]}x{self.grid[1]}"
            text = f"tokens: {self.prefix} prefix token{'' if self.prefix == 1 else 's'} + {grid} grid"
        return f"{text} ({self.source})" if self.source else text

    def spec(self) -> str:
        """The text that :func:`parse_layout` turns back into this layout (without its source)."""
        if self.kind != "tokens":
            return self.kind
        if self.grid is None:
            return f"tokens:{self.prefix}"
        return f"tokens:{self.prefix}:{self.grid[0]}x{self.grid[1]}"


LayoutSpec = Union[Layout, str, None]  # noqa: UP007 - a runtime alias, kept readable on Python 3.10
"""A layout as given by a user: a :class:`Layout`, its text (``"nhwc"``, ``"tokens:P"``, ``"tokens:P:HxW"``),
or None / ``"auto"`` to infer it."""

_TOKENS_RE = re.compile(r"^tokens(?::(\d+)(?::(\d+)x(\d+))?)?$")


def parse_layout(spec: LayoutSpec) -> Layout | None:
    """Turn a layout spec into a :class:`Layout`; None means "infer it".

    Args:
        spec: None or ``"auto"`` (infer), ``"nchw"``, ``"nhwc"``, ``"ncdhw"``, ``"tokens"`` (prefix and grid
            inferred), ``"tokens:P"`` (P prefix tokens, grid inferred), ``"tokens:P:HxW"``, or a :class:`Layout`.

    Returns:
        The layout (``source="explicit"`` for text), or None for auto.

    Raises:
        OptionError: ``spec`` is not one of the above.

    Example:
        >>> parse_layout("tokens:2:14x14")
        Layout(kind='tokens', prefix=2, grid=(14, 14), source='explicit')
    """
    if spec is None or isinstance(spec, Layout):
        return spec
    if not isinstance(spec, str):
        raise OptionError(
            f"layout must be a Layout, a string ('nchw', 'nhwc', 'ncdhw', 'tokens', 'tokens:P', 'tokens:P:HxW', "
            f"'auto') or None; got {type(spec).__name__}."
        )
    text = spec.strip().lower()
    if text in ("", "auto"):
        return None
    if text in ("nchw", "nhwc", "ncdhw"):
        return Layout(text, source="explicit")  # type: ignore[arg-type]  # checked just above
    match = _TOKENS_RE.match(text)
    if match is None:
        raise OptionError(
            f"unknown layout {spec!r}; use 'auto', 'nchw', 'nhwc', 'ncdhw', 'tokens', 'tokens:P' (P prefix tokens) "
            "or 'tokens:P:HxW' (e.g. 'tokens:1:14x14')."
        )
    prefix_text, h_text, w_text = match.groups()
    if prefix_text is None:
        return Layout("tokens", prefix=0, grid=None, source=_INFER_ALL)
    grid = (int(h_text), int(w_text)) if h_text is not None else None
    if grid is not None and min(grid) <= 0:
        raise OptionError(f"layout grid must be positive, got {spec!r}.")
    return Layout("tokens", prefix=int(prefix_text), grid=grid, source="explicit")


def _complete_tokens(model: nn.Module, spec: Layout, n: int, hw: tuple[int, int], where: str) -> Layout:
    """A ``"tokens"`` or ``"tokens:P"`` spec with its missing prefix and grid inferred for ``n`` tokens."""
    if spec.source == _INFER_ALL:  # plain "tokens": prefix and grid inferred
        prefix, grid, how = token_geometry(model, hw, n)
    elif vit_like(model) is not None:
        prefix = spec.prefix
        _, grid, how = token_geometry(model, hw)
        how = f"{how} (prefix {prefix} given)"
    else:
        prefix = spec.prefix
        guess = guess_grid(n - prefix, *hw)
        if guess is None:
            raise LayoutError(
                f"{where} outputs N={n} tokens; with {prefix} prefix token(s) the other {n - prefix} do not form a "
                f"grid with the input's aspect ratio ({hw[0]}x{hw[1]}); pass layout='tokens:P:HxW'."
            )
        grid, how = guess, f"grid {guess[0]}x{guess[1]} guessed from N={n} at input {hw[0]}x{hw[1]}"
    return Layout("tokens", prefix=prefix, grid=grid, source=f"explicit tokens; {how}")


def infer_layout(
    model: nn.Module,
    module: nn.Module,
    output: torch.Tensor,
    input_shape: tuple[int, ...],
    spec: Layout | None,
    *,
    layer: str = "",
) -> Layout:
    """The layout of ``module``'s ``output`` for an input of shape ``input_shape``, checked against the output.

    An explicit ``spec`` wins (its missing prefix or grid is inferred, and it is checked: a grid that does
    not fit raises). Otherwise: a 5-D output is ``ncdhw``; a 3-D output ``(B, N, C)`` is ``tokens`` with the
    geometry of :func:`token_geometry`; a 4-D output is ``nchw`` unless the layer is a ``LayerNorm``/``Linear``
    acting on the last dim, a Swin stage output, or dims 1 and 2 (not 2 and 3) have the input's aspect ratio.

    Args:
        model: The whole model (it may say its token geometry).
        module: The layer's module.
        output: The layer's output.
        input_shape: The model input's shape (its last two dims are ``H, W``).
        spec: An explicit layout (from :func:`parse_layout`), or None to infer.
        layer: The layer's name, for messages.

    Returns:
        The checked :class:`Layout`.

    Raises:
        LayoutError: The output does not fit the (given or inferred) layout, or no layout fits it.
    """
    hw = input_hw(input_shape)
    shape = tuple(int(s) for s in output.shape)
    where = f"layer {layer!r}" if layer else "the layer"
    if spec is not None:
        layout = spec
        if spec.kind == "tokens" and output.ndim == 3 and spec.grid is None:
            layout = _complete_tokens(model, spec, shape[1], hw, where)
        layout.check(output, layer)
        return layout
    if output.ndim == 5:
        return Layout("ncdhw", source="5-D output")
    if output.ndim == 3:
        prefix, grid, how = token_geometry(model, hw, shape[1])
        layout = Layout("tokens", prefix=prefix, grid=grid, source=how)
        layout.check(output, layer)
        return layout
    if output.ndim == 4:
        kind, why = detect_4d(model, module, shape, hw)
        return Layout(kind, source=why)
    raise LayoutError(
        f"{where} outputs shape {shape}; cnnlens maps 3-D tokens (B, N, C), 4-D (B, C, h, w) / (B, h, w, C) and 5-D "
        "(B, C, d, h, w) outputs only; choose a layer with a spatial output."
    )


class LayoutResolver:
    """The layouts of one capture's layers: parsed specs (checked up front) and inferred layouts, memoised.

    Args:
        model: The model.
        layout: One spec for every layer, or a mapping layer name -> spec (other layers: inferred).
        refs: The capture's resolved layers.
        modules: ``dict(model.named_modules())`` (one traversal shared with the capture).

    Raises:
        OptionError: A spec is invalid, or the mapping names a layer that is not captured.
    """

    def __init__(
        self,
        model: nn.Module,
        layout: LayoutSpec | Mapping[str, LayoutSpec],
        refs: list[LayerRef],
        modules: dict[str, nn.Module],
    ) -> None:
        self.model = model
        self.specs: dict[str, Layout | None] = {ref.key: None for ref in refs}
        self._memo: dict[tuple[object, ...], Layout] = {}
        if not isinstance(layout, Mapping):
            parsed = parse_layout(layout)
            self.specs = {ref.key: parsed for ref in refs}
            return
        for name, spec in layout.items():
            ref = resolve_layer(model, name, modules=modules)
            hits = [r.key for r in refs if r.key == ref.key or (ref.call is None and r.name == ref.name)]
            if not hits:
                raise OptionError(
                    f"layout= names layer {name!r}, which is not captured (layers: "
                    f"{', '.join(r.key for r in refs)}); give layouts for captured layers only."
                )
            for key in hits:
                self.specs[key] = parse_layout(spec)

    def of(self, ref: LayerRef, output: torch.Tensor, input_shape: tuple[int, ...]) -> Layout | None:
        """The layout of ``ref``'s ``output`` for an input of ``input_shape``: given or inferred, then checked.

        Inferred once per (layer, input size, output size). None when no layout was given for an output that is
        not spatial (rank 2, 6+) or is 3-D while the input is not an image batch: such outputs are recorded as
        they are.

        Raises:
            LayoutError: The output does not fit the given layout, or a token grid cannot be inferred.
        """
        spec = self.specs.get(ref.key)
        if spec is None and (output.ndim not in (3, 4, 5) or (output.ndim == 3 and len(input_shape) != 4)):
            return None  # not spatial, or a sequence of a model whose input is no image: recorded as it is
        if input_shape and output.ndim and output.shape[0] != input_shape[0]:
            if spec is None and output.ndim != 3:
                return None  # a 4-D/5-D output that is not one row per image: recorded as it is, as always
            raise LayoutError(
                f"layer {ref.key!r} outputs {int(output.shape[0])} rows ({tuple(output.shape)}) for a batch of "
                f"{input_shape[0]} input(s): windows, frames or a sequence-first layout folded into dim 0 (e.g. Swin "
                "window attention) cannot be mapped to one map per image; choose a layer with one row per image "
                "(a block, or its norm1/norm2)."
            )
        memo_key = (ref.key, input_shape[1:], tuple(output.shape[1:]))
        layout = self._memo.get(memo_key)
        if layout is None:
            layout = infer_layout(self.model, ref.module, output, input_shape, spec, layer=ref.key)
            self._memo[memo_key] = layout
        return layout

    def record(
        self, ref: LayerRef, output: torch.Tensor, input_shape: tuple[int, ...]
    ) -> tuple[torch.Tensor, torch.Tensor | None, Layout | None]:
        """What a capture records of ``output``: (map view, raw prefix rows or None, layout or None).

        The map view is detached and contiguous; that of an ``nchw`` output is the output itself made contiguous
        (no other copy).
        """
        layout = self.of(ref, output, input_shape)
        raw = output.detach()
        if layout is None or layout.is_identity:
            return raw.contiguous(), None, layout
        prefix = raw[:, : layout.prefix].clone() if layout.prefix else None
        return layout.to_maps(raw).contiguous(), prefix, layout
