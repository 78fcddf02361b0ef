"""Class-token tails: a ViT's last block computed only for the tokens its head reads.

A timm ``VisionTransformer`` with ``global_pool="token"`` (and ``VisionTransformerDistilled``) returns
``head(norm(x_L)[:, 0])`` (DeiT distilled: rows 0 and 1): after the last block's attention has mixed the tokens,
every other row of that block (the output projection, the residuals, ``norm2`` and the MLP for ``N - r`` rows),
of the final norm and the query rows ``r..N-1`` of its attention influence nothing the model returns. With the
usual target layer, ``blocks[-1].norm1`` (the norm before the last attention: the last block's patch tokens
get no gradient from a class-token head), a capture still has to run that block, with a graph, and
backpropagate through it: over all ``N`` rows, that is about 1/depth of a forward twice over.

:class:`TokenTail` runs the last block on the ``r`` rows only, with the block's own modules::

    h = norm1(x)                                  (all N rows: the recorded layer's output, hooks as usual)
    q = q_norm(h[:, :r] W_q + b_q); k, v = split(h W_kv + b_kv); k = k_norm(k)
    o = proj(norm(softmax(q k^T · scale) v))      (fused: scaled_dot_product_attention(q, k, v))
    y = x[:, :r] + ls1(o);  y = y + ls2(mlp(norm2(y)))      -> (B, r, C) instead of (B, N, C)

which is the same function of the input as far as the logits are concerned (rounding aside: smaller matrix
products), with the same gradient with respect to every earlier layer and to the input. ViT-Tiny at batch 1:
Grad-CAM at ``blocks.11.norm1`` went from 1.16x to 1.04x a forward (hand-written minimum, 2 threads).

It applies only where that is provably the model's function, checked on the module types, not on names:
the model's class is exactly ``timm.models.vision_transformer.VisionTransformer`` (``global_pool == "token"``)
or ``timm.models.deit.VisionTransformerDistilled``, no attention pool, no gradient checkpointing, the blocks an
``nn.Sequential`` whose last entry is exactly timm's ``Block`` with timm's ``Attention``; or exactly
torchvision's ``VisionTransformer`` (its head always reads row 0), whose last ``EncoderBlock`` runs
``nn.MultiheadAttention`` with the class token as the only query (``ln_1`` is then the layer before the tail).
Every recorded layer lies before the last block's attention (``blocks[-1].norm1``, ``...encoder_layer_11.ln_1``
or earlier); and, at each forward, no hook (module or global, forward or backward) and no patched ``forward``
sits on the last block or anything after it (a user's hook, or the attention recorder of rollout, would see the
shorter output): then the model runs as it is. ``Execution(token_tail=False)`` turns it off.

Example:
    >>> import timm, torch
    >>> vit = timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=8, embed_dim=16,
    ...                                                        depth=2, num_heads=2, num_classes=3).eval()
    >>> tail = token_tail(vit, [("blocks.1.norm1", vit.blocks[1].norm1)])
    >>> x = torch.randn(1, 3, 32, 32)
    >>> with torch.no_grad(), tail.applied():
    ...     short = vit(x)
    >>> bool(torch.allclose(short, vit(x).detach(), atol=1e-5))
    True
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["TokenTail", "tail_applied", "token_tail"]

_BEFORE = ("patch_embed", "pos_drop", "patch_drop", "norm_pre")
"""Modules of a timm ViT that run before the blocks."""


@dataclass(frozen=True)
class TokenTail:
    """The last block of a class-token ViT and the rows its head reads (see the module docstring).

    Attributes:
        block: The last transformer block (timm ``Block``).
        rows: The leading token rows the head reads (1: the class token; 2 for DeiT distilled).
        tail_modules: Every module whose input or output changes shape on the short path (the last block
            but its ``norm1``, the blocks container, the final norm and the head): a hook on one of them turns
            the short path off for that forward.
    """

    block: nn.Module = field(repr=False)
    rows: int
    tail_modules: tuple[nn.Module, ...] = field(repr=False)
    family: str = "timm"
    """``"timm"`` (timm ``Block``) or ``"torchvision"`` (torchvision ``EncoderBlock``)."""

    def usable(self) -> bool:
        """Whether nothing observes the tail right now: no hook on it, no global module hook, no patched forward."""
        from torch.nn.modules import module as module_globals

        if (
            module_globals._global_forward_hooks
            or module_globals._global_forward_pre_hooks
            or module_globals._global_backward_hooks
            or module_globals._global_backward_pre_hooks
        ):
            return False
        for m in self.tail_modules:
            if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks or _patched(m):
                return False
        return not self.block.training

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Run the short path for the forwards in the block when :meth:`usable`; restored in ``finally``."""
        if not self.usable():
            yield
            return
        block, rows = self.block, self.rows
        full = type(block).forward
        short = _short_block if self.family == "timm" else _short_encoder_block

        def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            # timm passes attn_mask/is_causal only when given: anything but a plain call runs the whole block.
            plain = not args and kwargs.get("attn_mask") is None and not kwargs.get("is_causal", False)
            if not plain or x.ndim != 3 or x.shape[1] <= rows:
                return full(block, x, *args, **kwargs)  # type: ignore[no-any-return]
            return short(block, x, rows)

        block.forward = forward  # an instance attribute: nn.Module.__call__ finds it first
        try:
            yield
        finally:
            del block.forward


def _patched(module: nn.Module) -> bool:
    """Whether ``module.forward`` is not its class's method (someone replaced it on the instance)."""
    return getattr(module.forward, "__func__", None) is not type(module).forward


def tail_applied(tail: TokenTail | None) -> contextlib.AbstractContextManager[None]:
    """``tail.applied()``, or nothing to do for None."""
    return contextlib.nullcontext() if tail is None else tail.applied()


def _short_block(block: Any, x: torch.Tensor, rows: int) -> torch.Tensor:
    """The ``Block.forward`` of timm (no mask) for the leading ``rows`` tokens of its output."""
    h = block.norm1(x)
    attn = block.attn
    batch, n, _ = h.shape
    heads, dim = attn.num_heads, attn.head_dim
    if type(attn.qkv) is nn.Linear:  # queries of the head's rows only: a third less of the largest product
        weight, bias = attn.qkv.weight, attn.qkv.bias
        split = heads * dim
        q = F.linear(h[:, :rows], weight[:split], None if bias is None else bias[:split])
        q = q.reshape(batch, rows, heads, dim).transpose(1, 2)
        kv = F.linear(h, weight[split:], None if bias is None else bias[split:])
        k, v = kv.reshape(batch, n, 2, heads, dim).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q, k, v = attn.qkv(h).reshape(batch, n, 3, heads, dim).permute(2, 0, 3, 1, 4).unbind(0)
        q = q[:, :, :rows]
    q, k = attn.q_norm(q), attn.k_norm(k)
    if attn.fused_attn:
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    else:
        weights = (q * attn.scale) @ k.transpose(-2, -1)
        o = attn.attn_drop(weights.softmax(dim=-1)) @ v
    o = o.transpose(1, 2).reshape(batch, rows, attn.attn_dim)
    o = attn.norm(o)
    gate = getattr(attn, "gate", None)
    if gate is not None:
        o = o * gate(h[:, :rows]).sigmoid()
    o = attn.proj_drop(attn.proj(o))
    y = x[:, :rows] + block.drop_path1(block.ls1(o))
    out: torch.Tensor = y + block.drop_path2(block.ls2(block.mlp(block.norm2(y))))
    return out


def _short_encoder_block(block: Any, x: torch.Tensor, rows: int) -> torch.Tensor:
    """The ``EncoderBlock.forward`` of torchvision, for the leading ``rows`` tokens of its output.

    ``nn.MultiheadAttention`` takes queries of another length than its keys: the head's rows query every token.
    """
    h = block.ln_1(x)
    attended, _ = block.self_attention(h[:, :rows], h, h, need_weights=False)
    y = block.dropout(attended) + x[:, :rows]
    out: torch.Tensor = y + block.mlp(block.ln_2(y))
    return out


def _timm_classes() -> tuple[type, type, type, type] | None:
    """(VisionTransformer, VisionTransformerDistilled, Block, Attention) of an imported timm, else None."""
    if "timm" not in sys.modules:
        return None  # a model built by timm has imported it; nothing to import here
    try:
        from timm.layers.attention import Attention
        from timm.models.deit import VisionTransformerDistilled
        from timm.models.vision_transformer import Block, VisionTransformer
    except ImportError:  # another timm layout: no short path
        return None
    return VisionTransformer, VisionTransformerDistilled, Block, Attention


_ATTN_FIELDS: tuple[str, ...] = ("qkv", "q_norm", "k_norm", "num_heads", "head_dim", "fused_attn", "scale")
_ATTN_FIELDS += ("attn_drop", "norm", "proj", "proj_drop", "attn_dim")
_BLOCK_FIELDS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")


def token_tail(model: nn.Module, layers: Sequence[tuple[str, nn.Module]]) -> TokenTail | None:
    """The :class:`TokenTail` of ``model`` when recording ``layers`` allows it, else None.

    Args:
        model: The network.
        layers: ``(dotted name, module)`` of every recorded layer.
    """
    if "torchvision" in sys.modules:
        tail = _torchvision_tail(model, layers)
        if tail is not None:
            return tail
    classes = _timm_classes()
    if classes is None:
        return None
    vit, distilled, block_cls, attn_cls = classes
    if type(model) is distilled:
        rows = 2
    elif type(model) is vit and getattr(model, "global_pool", None) == "token":
        rows = 1
    else:
        return None
    blocks = getattr(model, "blocks", None)
    if getattr(model, "attn_pool", None) is not None or getattr(model, "grad_checkpointing", True):
        return None
    if not isinstance(blocks, nn.Sequential) or len(blocks) == 0:
        return None
    block = blocks[-1]
    if type(block) is not block_cls or type(getattr(block, "attn", None)) is not attn_cls:
        return None
    if not all(hasattr(block, f) for f in _BLOCK_FIELDS) or not all(hasattr(block.attn, f) for f in _ATTN_FIELDS):
        return None
    after = [child for name, child in model.named_children() if name != "blocks" and name not in _BEFORE]
    modules = _tail_modules(layers, "blocks", blocks, "norm1", _BEFORE, containers=[blocks], after=after)
    return None if modules is None else TokenTail(block, rows, modules)


def _torchvision_tail(model: nn.Module, layers: Sequence[tuple[str, nn.Module]]) -> TokenTail | None:
    """The tail of a torchvision ``VisionTransformer`` (its head always reads row 0 of the encoder's output)."""
    try:
        from torchvision.models.vision_transformer import EncoderBlock, VisionTransformer
    except ImportError:
        return None
    if type(model) is not VisionTransformer:
        return None
    encoder = getattr(model, "encoder", None)
    blocks = getattr(encoder, "layers", None)
    final_norm = getattr(encoder, "ln", None)
    if not isinstance(encoder, nn.Module) or not isinstance(blocks, nn.Sequential) or len(blocks) == 0:
        return None
    block = blocks[-1]
    attention = getattr(block, "self_attention", None)
    if type(block) is not EncoderBlock or type(attention) is not nn.MultiheadAttention or not attention.batch_first:
        return None
    if not all(hasattr(block, f) for f in ("ln_1", "dropout", "ln_2", "mlp")) or not isinstance(final_norm, nn.Module):
        return None
    after = [child for name, child in model.named_children() if name not in ("conv_proj", "encoder")] + [final_norm]
    before = ("conv_proj", "encoder.dropout")
    modules = _tail_modules(layers, "encoder.layers", blocks, "ln_1", before, containers=[encoder, blocks], after=after)
    return None if modules is None else TokenTail(block, 1, modules, family="torchvision")


def _tail_modules(
    layers: Sequence[tuple[str, nn.Module]],
    prefix: str,
    blocks: nn.Sequential,
    kept: str,
    before: Sequence[str],
    *,
    containers: Sequence[nn.Module],
    after: Sequence[nn.Module],
) -> tuple[nn.Module, ...] | None:
    """Every module whose input or output the short path changes, or None when a recorded layer is one of them.

    A recorded layer must run before the tail by name (under ``before``, under an earlier block of ``blocks``,
    whose dotted path is ``prefix``, or under the last block's ``kept`` submodule) and by identity (a module
    shared with the tail is named once, under its first name). The tail: ``containers`` (holding the last block),
    the last block but its ``kept`` submodule, and ``after`` (what runs after the blocks), with submodules.
    """
    names = list(blocks._modules)
    allowed = [f"{prefix}.{n}" for n in names[:-1]] + [f"{prefix}.{names[-1]}.{kept}"]

    def under(name: str, path: str) -> bool:
        return name == path or name.startswith(path + ".")

    for name, _ in layers:
        if not any(under(name, path) for path in (*before, *allowed)):
            return None
    block = blocks[-1]
    keep = {id(m) for m in block.get_submodule(kept).modules()}
    tail: dict[int, nn.Module] = {id(m): m for m in containers}
    tail.update((id(m), m) for m in block.modules() if id(m) not in keep)
    for module in after:
        tail.update((id(m), m) for m in module.modules())
    if any(id(module) in tail for _, module in layers):
        return None
    return tuple(tail.values())
