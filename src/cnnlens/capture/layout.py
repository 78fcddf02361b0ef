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

import math
import re
from dataclasses import dataclass
from typing import Any, Literal, Union, get_args

import torch
from torch import nn

from cnnlens.errors import LayoutError, OptionError

__all__ = [
    "Layout",
    "LayoutKind",
    "LayoutSpec",
    "infer_layout",
    "parse_layout",
    "token_geometry",
]

LayoutKind = Literal["nchw", "nhwc", "tokens", "ncdhw"]
_KINDS: tuple[str, ...] = get_args(LayoutKind)
_RANK = {"nchw": 4, "nhwc": 4, "tokens": 3, "ncdhw": 5}
_MAX_GUESSED_PREFIX = 8
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
        if self.grid is not None and (len(self.grid) != 2 or not all(isinstance(g, int) and g > 0 for g in self.grid)):
            raise OptionError(f"layout grid must be two positive integers (h, w), got {self.grid!r}.")

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
                raise LayoutError(
                    f"{where} outputs {n} tokens, but the inferred layout has {self.prefix} prefix token(s) and a "
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


def _input_hw(input_shape: tuple[int, ...]) -> tuple[int, int]:
    if len(input_shape) < 2:
        raise LayoutError(f"cannot read an input size (H, W) from input shape {input_shape}.")
    return int(input_shape[-2]), int(input_shape[-1])


def _vit_like(model: nn.Module) -> tuple[nn.Module, str] | None:
    """The first module of ``model`` that says how many prefix tokens it has: (module, family)."""
    for module in model.modules():
        if hasattr(module, "num_prefix_tokens") and hasattr(module, "patch_embed"):
            return module, "timm"
        if hasattr(module, "class_token") and hasattr(module, "patch_size") and hasattr(module, "conv_proj"):
            return module, "torchvision"
    return None


def _pair(value: object) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        return int(value[0]), int(value[1])
    return int(value), int(value)  # type: ignore[call-overload]  # an int-like patch size


def _fits_stride(h: int, w: int, big_h: int, big_w: int) -> bool:
    """Whether an ``h x w`` grid is the input ``big_h x big_w`` downsampled by one integer stride."""
    for s in range(1, max(big_h, big_w) + 1):
        if h in (big_h // s, -(-big_h // s)) and w in (big_w // s, -(-big_w // s)):
            return True
    return False


def _guess_grid(m: int, big_h: int, big_w: int) -> tuple[int, int] | None:
    """An ``h x w = m`` grid that is the input downsampled by one stride, or None."""
    if m <= 0:
        return None
    for h in range(1, math.isqrt(m) + 1):
        if m % h:
            continue
        for gh, gw in ((h, m // h), (m // h, h)):
            if _fits_stride(gh, gw, big_h, big_w):
                return gh, gw
    return None


def token_geometry(
    model: nn.Module, input_hw: tuple[int, int], n_tokens: int | None = None
) -> tuple[int, tuple[int, int], str]:
    """The prefix-token count and patch grid of a token model at input size ``input_hw``.

    The model says where it can: timm's ``num_prefix_tokens`` (class, distillation and register tokens) and
    ``patch_embed.dynamic_feat_size((H, W))`` (or ``H // patch``); torchvision ``VisionTransformer``'s class
    token (1) and ``patch_size`` (``H // p, W // p``). The grid comes from the actual input size, never from
    ``sqrt(N)``. For other models, when ``n_tokens`` is given, the first ``P`` in 0..8 for which ``N - P``
    tokens form a grid that is the input downsampled by one integer stride is taken, and named as a guess.

    Args:
        model: The model.
        input_hw: The input's ``(H, W)``.
        n_tokens: The layer's token count ``N`` if known (checked against the geometry).

    Returns:
        ``(prefix, (h, w), source)``.

    Raises:
        LayoutError: The geometry does not fit ``n_tokens`` (the message names what was inferred), or nothing
            could be inferred.

    Example:
        >>> from torch import nn
        >>> token_geometry(nn.Identity(), (48, 80), n_tokens=16)  # 1 + 3x5 guessed (stride 16)
        (1, (3, 5), 'guess: 1 prefix token + 3x5 grid from N=16 at input 48x80 (the model does not say)')
    """
    big_h, big_w = int(input_hw[0]), int(input_hw[1])
    found = _vit_like(model)
    if found is not None:
        module, family = found
        if family == "timm":
            prefix = int(getattr(module, "num_prefix_tokens", 0))
            embed: Any = module.patch_embed
            if hasattr(embed, "dynamic_feat_size"):
                grid = tuple(int(g) for g in embed.dynamic_feat_size((big_h, big_w)))
                how = "patch_embed.dynamic_feat_size"
            else:
                ph, pw = _pair(getattr(embed, "patch_size", 16))
                grid = (big_h // ph, big_w // pw)
                how = f"patch_embed.patch_size {ph}x{pw}"
            source = f"timm num_prefix_tokens={prefix}; grid {grid[0]}x{grid[1]} from {how} at {big_h}x{big_w}"
        else:
            prefix = 1
            patch = int(getattr(module, "patch_size", 16))
            grid = (big_h // patch, big_w // patch)
            source = f"torchvision class token; grid {grid[0]}x{grid[1]} from patch_size {patch} at {big_h}x{big_w}"
        gh, gw = grid[0], grid[1]
        if n_tokens is not None and n_tokens - prefix != gh * gw:
            raise LayoutError(
                f"the layer outputs N={n_tokens} tokens, but the model says {prefix} prefix token(s) and a {gh}x{gw} "
                f"grid ({prefix} + {gh * gw} = {prefix + gh * gw}; {source}); the layer may not be on the patch "
                "grid (choose a layer of the transformer blocks) or pass layout='tokens:P:HxW'."
            )
        return prefix, (gh, gw), source
    if n_tokens is None:
        raise LayoutError(
            f"{type(model).__name__} does not say its prefix tokens or patch size, and no token count was given; "
            "pass layout='tokens:P:HxW'."
        )
    for prefix in range(min(_MAX_GUESSED_PREFIX, n_tokens) + 1):
        guess = _guess_grid(n_tokens - prefix, big_h, big_w)
        if guess is not None:
            source = (
                f"guess: {prefix} prefix token{'' if prefix == 1 else 's'} + {guess[0]}x{guess[1]} grid from "
                f"N={n_tokens} at input {big_h}x{big_w} (the model does not say)"
            )
            return prefix, guess, source
    raise LayoutError(
        f"cannot infer a token grid for N={n_tokens} tokens at input {big_h}x{big_w}: no P in 0..{_MAX_GUESSED_PREFIX} "
        f"leaves a grid with the input's aspect ratio, and {type(model).__name__} does not say its patch size; pass "
        "layout='tokens:P:HxW'."
    )


def _module_channels(module: nn.Module) -> int | None:
    """The channel count a leaf module produces, where it says so."""
    if isinstance(module, nn.LayerNorm):
        return int(module.normalized_shape[-1])
    if isinstance(module, nn.Linear):
        return int(module.out_features)
    for attr in ("out_channels", "num_features"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    return None


def _is_swin(model: nn.Module) -> bool:
    return any("swin" in type(m).__name__.lower() for m in (model, *list(model.children())[:1]))


def _ratio_fits(h: int, w: int, big_h: int, big_w: int) -> bool:
    """Whether spatial dims ``(h, w)`` have the input's aspect ratio (within downsampling rounding)."""
    if h <= 0 or w <= 0 or h > 4 * big_h or w > 4 * big_w:
        return False
    return abs(math.log((h / w) / (big_h / big_w))) <= math.log(1.25) or _fits_stride(h, w, big_h, big_w)


def _detect_4d(model: nn.Module, module: nn.Module, shape: tuple[int, ...], hw: tuple[int, int]) -> Layout:
    _, d1, d2, d3 = shape
    channels = _module_channels(module)
    if channels is not None and isinstance(module, (nn.LayerNorm, nn.Linear)):
        if channels == d3 and channels != d1:
            return Layout("nhwc", source=f"{type(module).__name__} acts on the last dim ({channels} channels)")
    elif channels is not None:
        if channels == d1 and channels != d3:
            return Layout("nchw", source=f"{type(module).__name__} has {channels} channels on dim 1")
        if channels == d3 and channels != d1 and _ratio_fits(d1, d2, *hw):
            return Layout("nhwc", source=f"{type(module).__name__} has {channels} channels on the last dim")
    nchw_fits = _ratio_fits(d2, d3, *hw)
    nhwc_fits = _ratio_fits(d1, d2, *hw)
    if nhwc_fits and _is_swin(model) and not (nchw_fits and d1 < d3):
        return Layout("nhwc", source=f"{type(model).__name__} stage output (B, H, W, C)")
    if nhwc_fits and not nchw_fits:
        return Layout(
            "nhwc", source=f"dims 1, 2 ({d1}x{d2}) have the input's aspect ratio ({hw[0]}x{hw[1]}), dims 2, 3 do not"
        )
    return Layout("nchw", source="4-D output")


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
    hw = _input_hw(input_shape)
    shape = tuple(int(s) for s in output.shape)
    where = f"layer {layer!r}" if layer else "the layer"
    if spec is not None:
        layout = spec
        if spec.kind == "tokens" and output.ndim == 3 and spec.grid is None:
            n = shape[1]
            if spec.source == _INFER_ALL:  # plain "tokens": prefix and grid inferred
                prefix, grid, how = token_geometry(model, hw, n)
            else:
                prefix = spec.prefix
                found = _vit_like(model)
                if found is not None:
                    _, grid, how = token_geometry(model, hw)
                    how = f"{how} (prefix {prefix} given)"
                else:
                    guess = _guess_grid(n - prefix, *hw)
                    if guess is None:
                        raise LayoutError(
                            f"{where} outputs N={n} tokens; with {prefix} prefix token(s) the other {n - prefix} do "
                            "not "
                            f" form a grid with the input's aspect ratio ({hw[0]}x{hw[1]}); pass layout='tokens:P:HxW'."
                        )
                    grid, how = guess, f"grid {guess[0]}x{guess[1]} guessed from N={n} at input {hw[0]}x{hw[1]}"
            layout = Layout("tokens", prefix=prefix, grid=grid, source=f"explicit tokens; {how}")
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
        return _detect_4d(model, module, shape, hw)
    raise LayoutError(
        f"{where} outputs shape {shape}; cnnlens maps 3-D tokens (B, N, C), 4-D (B, C, h, w) / (B, h, w, C) and 5-D "
        "(B, C, d, h, w) outputs only; choose a layer with a spatial output."
    )
