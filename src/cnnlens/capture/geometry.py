"""Token geometry and channels-last detection: how :mod:`cnnlens.capture.layout` infers a layer's layout.

The prefix-token count and patch grid of a token model come from the model where it says so (timm
``num_prefix_tokens`` and ``patch_embed``, torchvision ``VisionTransformer``) and the actual input size, never
from ``sqrt(N)`` (:func:`token_geometry`); a 4-D output is told channels-first or channels-last from the layer
type, the model family (Swin) and the aspect ratio of its dims (:func:`detect_4d`).
"""

from __future__ import annotations

import math
from typing import Any, Literal

from torch import nn

from cnnlens.errors import LayoutError

__all__ = ["detect_4d", "guess_grid", "input_hw", "token_geometry", "vit_like"]

MAX_GUESSED_PREFIX = 8


def input_hw(input_shape: tuple[int, ...]) -> tuple[int, int]:
    """The ``(H, W)`` of an input shape (its last two dims)."""
    if len(input_shape) < 2:
        raise LayoutError(f"cannot read an input size (H, W) from input shape {input_shape}.")
    return int(input_shape[-2]), int(input_shape[-1])


def vit_like(model: nn.Module) -> tuple[nn.Module, str] | None:
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
    """Whether an ``h x w`` grid is the input ``big_h x big_w`` downsampled by one stride, rounded alike."""
    for s in range(1, max(big_h, big_w) + 1):
        if (h, w) in ((big_h // s, big_w // s), (-(-big_h // s), -(-big_w // s))):
            return True
    return False


def guess_grid(m: int, big_h: int, big_w: int) -> tuple[int, int] | None:
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
    found = vit_like(model)
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
        if n_tokens is not None and prefix and n_tokens == gh * gw:
            # a layer before the prefix tokens are added (the patch embedding itself): the grid only
            return 0, (gh, gw), f"{source}; N={n_tokens} is the grid alone: no prefix tokens at this layer"
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
    for prefix in range(min(MAX_GUESSED_PREFIX, n_tokens) + 1):
        guess = guess_grid(n_tokens - prefix, big_h, big_w)
        if guess is not None:
            source = (
                f"guess: {prefix} prefix token{'' if prefix == 1 else 's'} + {guess[0]}x{guess[1]} grid from "
                f"N={n_tokens} at input {big_h}x{big_w} (the model does not say)"
            )
            return prefix, guess, source
    raise LayoutError(
        f"cannot infer a token grid for N={n_tokens} tokens at input {big_h}x{big_w}: no P in 0..{MAX_GUESSED_PREFIX} "
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


def detect_4d(
    model: nn.Module, module: nn.Module, shape: tuple[int, ...], hw: tuple[int, int]
) -> tuple[Literal["nchw", "nhwc"], str]:
    """Whether a 4-D output ``shape`` is ``nchw`` or ``nhwc`` (channels last), and why.

    A root model that declares ``cnnlens_layout = "nhwc"`` or ``"nchw"`` (a Keras model wrapped by
    :class:`cnnlens.models.keras.KerasModule`: every 4-D layer output is channels-last) is authoritative.
    """
    declared = getattr(model, "cnnlens_layout", None)
    if declared in ("nchw", "nhwc"):
        return declared, f"{type(model).__name__} declares its 4-D layer outputs {declared}"
    _, d1, d2, d3 = shape
    channels = _module_channels(module)
    if channels is not None and isinstance(module, (nn.LayerNorm, nn.Linear)):
        if channels == d3 and channels != d1:
            return "nhwc", f"{type(module).__name__} acts on the last dim ({channels} channels)"
    elif channels is not None:
        if channels == d1 and channels != d3:
            return "nchw", f"{type(module).__name__} has {channels} channels on dim 1"
        if channels == d3 and channels != d1 and _ratio_fits(d1, d2, *hw):
            return "nhwc", f"{type(module).__name__} has {channels} channels on the last dim"
    nchw_fits = _ratio_fits(d2, d3, *hw)
    nhwc_fits = _ratio_fits(d1, d2, *hw)
    if nhwc_fits and _is_swin(model) and not (nchw_fits and d1 < d3):
        return "nhwc", f"{type(model).__name__} stage output (B, H, W, C)"
    if nhwc_fits and not nchw_fits:
        return "nhwc", f"dims 1, 2 ({d1}x{d2}) have the input's aspect ratio ({hw[0]}x{hw[1]}), dims 2, 3 do not"
    return "nchw", "4-D output"
