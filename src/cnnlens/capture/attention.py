"""Attention probabilities of a vision transformer, recorded inside a capture (and their gradients).

Attention rollout and gradient-weighted attention (:mod:`cnnlens.methods.transformer`) need the softmax
probabilities ``A_l`` ``(B, heads, N, N)`` of every self-attention block, and for the latter the gradient of
each target's score with respect to them. This module finds the attention modules of a model
(:func:`attention_sites`) and records them for one forward (:class:`AttentionRecorder`, through a
:class:`~cnnlens.capture.ModelScope`, so every hook is removed and every switched flag restored in ``finally``,
also when the model raises).

Supported:

* timm attention modules that compute ``softmax(q k^T) -> attn_drop -> @ v`` and have a ``fused_attn`` flag
  (``timm.layers.Attention`` of ViT, DeiT (distilled), ViTs with register tokens, EVA's ``AttentionRope``...).
  Fused attention (``F.scaled_dot_product_attention``) never materialises the probabilities, so ``fused_attn``
  is switched off for the call only and restored afterwards; the probabilities are the output of ``attn_drop``
  (an identity in eval mode).
* torchvision ``VisionTransformer``: its ``EncoderBlock`` calls ``nn.MultiheadAttention`` with
  ``need_weights=False``; a forward pre-hook asks ``need_weights=True, average_attn_weights=False`` and a
  forward hook records the per-head weights. For gradients the hook recomputes the attention output from the
  recorded weights (``out_proj(A V)``, the same function), so that ``d score / d A`` exists.

Refused with a :class:`~cnnlens.errors.MethodError` naming the model class: models without such modules
(CNNs, attention that calls ``F.scaled_dot_product_attention`` directly with no switch), and windowed attention
(Swin), whose ``(windows, heads, w^2, w^2)`` probabilities have no global token-to-token meaning.

Example:
    >>> import timm, torch
    >>> vit = timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=8, embed_dim=16,
    ...                                                        depth=2, num_heads=2, num_classes=3)
    >>> with AttentionRecorder(vit) as rec:
    ...     _ = vit(torch.randn(1, 3, 32, 32))
    >>> [tuple(a.shape) for a in rec.probabilities.values()]
    [(1, 2, 17, 17), (1, 2, 17, 17)]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from cnnlens.capture.recording import _grad
from cnnlens.capture.scope import ModelScope
from cnnlens.errors import LayerError, MethodError
from cnnlens.outputs import OutputSelector, to_logits
from cnnlens.targets import Target

__all__ = ["AttentionRecorder", "AttentionRecording", "AttentionSite", "attention_sites", "record_attention"]

SUPPORTED = (
    "timm attention modules with a `fused_attn` switch and an `attn_drop` dropout (ViT, DeiT, ViTs with "
    "register tokens, EVA) and torchvision's VisionTransformer (nn.MultiheadAttention)"
)
"""What :func:`attention_sites` can record, for error messages."""

SiteKind = Literal["timm", "mha"]


@dataclass(frozen=True)
class AttentionSite:
    """One self-attention module whose probabilities can be recorded.

    Attributes:
        name: Its ``named_modules()`` name (``blocks.3.attn``, ``encoder.layers.encoder_layer_0.self_attention``).
        module: The attention module.
        kind: ``"timm"`` (``fused_attn`` + ``attn_drop``) or ``"mha"`` (``nn.MultiheadAttention``).
    """

    name: str
    module: nn.Module
    kind: SiteKind


def _is_windowed(module: nn.Module) -> bool:
    """Swin-style window attention (timm/torchvision ``WindowAttention``, ``ShiftedWindowAttention``).

    A relative position bias alone is not windowing: BEiT's attention has one over the whole image.
    """
    return "window" in type(module).__name__.lower()


def attention_sites(model: nn.Module, method: str = "attention recording") -> list[AttentionSite]:
    """The self-attention modules of ``model`` whose probabilities can be recorded, in ``named_modules()`` order.

    Args:
        model: The network.
        method: The method asking, for error messages.

    Raises:
        MethodError: No supported attention module (a CNN, an unknown attention implementation) or windowed
            attention (Swin); the message names the model class and what is supported.

    Example:
        >>> attention_sites(nn.Sequential(nn.Conv2d(3, 4, 3)), "rollout")
        Traceback (most recent call last):
        ...
        cnnlens.errors.MethodError: rollout needs the attention probabilities of a vision transformer, ...
    """
    sites: list[AttentionSite] = []
    unknown: list[str] = []
    for name, module in model.named_modules():
        if _is_windowed(module) and (hasattr(module, "fused_attn") or "attention" in type(module).__name__.lower()):
            raise MethodError(
                f"{method} is defined for global self-attention, but {type(model).__name__} uses windowed attention "
                f"({type(module).__name__} at {name!r}, e.g. Swin): its probabilities relate tokens within a window, "
                "not the class token to the patch grid. Use a CAM method (gradcam) on a block's norm layer instead."
            )
        if isinstance(module, nn.MultiheadAttention):
            sites.append(AttentionSite(name, module, "mha"))
        elif hasattr(module, "fused_attn") and isinstance(getattr(module, "attn_drop", None), nn.Module):
            sites.append(AttentionSite(name, module, "timm"))
        elif "attention" in type(module).__name__.lower() and not any(name.startswith(s.name + ".") for s in sites):
            unknown.append(f"{type(module).__name__} at {name!r}")
    if not sites:
        seen = f" It has attention modules cnnlens cannot record: {', '.join(unknown[:3])}." if unknown else ""
        raise MethodError(
            f"{method} needs the attention probabilities of a vision transformer, but {type(model).__name__} has no "
            f"supported attention module.{seen} Supported: {SUPPORTED}. For a CNN use a CAM method (gradcam)."
        )
    return sites


class AttentionRecorder:
    """Record the attention probabilities of every site during the forwards run inside the block.

    Enter it around any forward of the model (also around another capture's forward, which then records the
    attention on the side). On entry: eval mode and hooks through a :class:`ModelScope`, timm's ``fused_attn``
    switched off; on exit (also on error) all of it is undone and every ``fused_attn`` gets its own value back.

    Only the first forward inside the block is recorded: later forwards (the extra passes of other methods in
    the same explain() call, a shape probe) run with the attention unfused but leave the record alone.

    Args:
        model: The network.
        sites: The attention modules (default: :func:`attention_sites`).
        gradients: Make each recorded probability tensor a node of the autograd graph (the model continues on
            it), so that :func:`torch.autograd.grad` can differentiate a score with respect to it; parameters
            are frozen for the block so no graph is built before the first attention block.

    Attributes:
        probabilities: Site name -> ``(B, heads, N, N)`` of the first forward (graph nodes with
            ``gradients=True``, detached otherwise).
    """

    def __init__(self, model: nn.Module, sites: Sequence[AttentionSite] | None = None, *, gradients: bool = False):
        if not isinstance(gradients, bool):
            raise MethodError(f"gradients must be True or False, got {gradients!r}.")
        self.model = model
        self.sites = list(sites) if sites is not None else attention_sites(model)
        self.gradients = gradients
        self.probabilities: dict[str, torch.Tensor] = {}
        self._scope: ModelScope | None = None
        self._fused: dict[nn.Module, Any] = {}

    def __enter__(self) -> AttentionRecorder:
        if self._scope is not None:
            raise LayerError("this attention recorder is already active; open a new one instead of re-entering it.")
        scope = ModelScope(self.model, freeze_parameters=self.gradients)
        scope.__enter__()
        self._scope = scope
        try:
            for site in self.sites:
                if site.kind == "timm":
                    self._fused[site.module] = site.module.fused_attn
                    setattr(site.module, "fused_attn", False)  # noqa: B010 (a Final attribute for mypy)
                    drop = site.module.attn_drop
                    assert isinstance(drop, nn.Module)  # attention_sites() checked it
                    scope.add_forward_hook(drop, self._timm_hook(site.name))
                else:
                    scope.add_forward_pre_hook(site.module, _ask_for_weights, with_kwargs=True)
                    scope.add_forward_hook(site.module, self._mha_hook(site), with_kwargs=True)
        except BaseException:
            self._restore()
            raise
        self.probabilities = {}
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._restore()

    def _restore(self) -> None:
        try:
            if self._scope is not None:
                self._scope.restore()
        finally:
            for module, flag in self._fused.items():
                setattr(module, "fused_attn", flag)  # noqa: B010
            self._fused = {}
            self._scope = None

    def _node(self, name: str, probs: torch.Tensor) -> torch.Tensor | None:
        """Record ``probs`` under ``name``; with gradients, return the graph node the model must continue on.

        None when ``name`` was recorded by an earlier forward (nothing to record, the output stays as it is).
        """
        if name in self.probabilities:
            return None
        if not self.gradients:
            self.probabilities[name] = probs.detach()
            return probs
        node = probs if probs.requires_grad else probs.detach().requires_grad_(True)
        self.probabilities[name] = node
        return node

    def _timm_hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            if not isinstance(output, torch.Tensor) or output.ndim != 4:
                raise MethodError(
                    f"the attention dropout of {name!r} returned {type(output).__name__} "
                    f"{tuple(getattr(output, 'shape', ()))}, not probabilities (B, heads, N, N); "
                    f"supported: {SUPPORTED}."
                )
            node = self._node(name, output)
            return node.clone() if self.gradients and node is not None else None

        return hook

    def _mha_hook(self, site: AttentionSite) -> Any:
        def hook(module: nn.MultiheadAttention, args: Any, kwargs: dict[str, Any], output: Any) -> Any:
            weights = output[1]
            if weights is None or weights.ndim != 4:
                raise MethodError(
                    f"{site.name!r} ({type(module).__name__}) did not return per-head attention weights "
                    f"(got {None if weights is None else tuple(weights.shape)}); supported: {SUPPORTED}."
                )
            node = self._node(site.name, weights)
            if not self.gradients or node is None:
                return None
            value = args[2] if len(args) > 2 else kwargs["value"]
            return _mha_output(module, node, value, site.name), node

        return hook

    def scores_and_gradients(
        self, logits: torch.Tensor, targets: Sequence[Target]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Scores ``(B, T)`` and, per site, ``(T, B, heads, N, N)`` gradients of each target's score.

        One :func:`torch.autograd.grad` per target with respect to every recorded probability tensor.
        """
        names = list(self.probabilities)
        wrt = [self.probabilities[n] for n in names]
        scores = [target(logits) for target in targets]
        grads: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        for t, score in enumerate(scores):
            for n, g in zip(names, _grad(score, wrt, retain=t < len(scores) - 1), strict=True):
                grads[n].append(g.detach())
        stacked = torch.stack([s.detach() for s in scores], dim=1)
        return stacked, {n: torch.stack(g) for n, g in grads.items()}


def _ask_for_weights(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Forward pre-hook of ``nn.MultiheadAttention``: return per-head weights for this call."""
    return args, {**kwargs, "need_weights": True, "average_attn_weights": False}


def _mha_output(module: nn.MultiheadAttention, weights: torch.Tensor, value: torch.Tensor, name: str) -> torch.Tensor:
    """``out_proj(A V)``: the attention output recomputed from the recorded weights, so ``d out / d A`` exists.

    Only the plain configuration torchvision's ViT uses (batch first, one in-projection, no extra key/value
    biases, no zero attention).
    """
    if not (module.batch_first and module._qkv_same_embed_dim and module.bias_k is None and not module.add_zero_attn):
        raise MethodError(
            f"{name!r}: gradients of nn.MultiheadAttention weights are supported for batch_first=True with one "
            "in-projection and no bias_k/add_zero_attn (torchvision's VisionTransformer); this one differs."
        )
    assert module.in_proj_weight is not None
    embed = module.embed_dim
    bias = None if module.in_proj_bias is None else module.in_proj_bias[2 * embed :]
    v = F.linear(value, module.in_proj_weight[2 * embed :], bias)
    b, s, _ = v.shape
    heads = module.num_heads
    v = v.view(b, s, heads, embed // heads).transpose(1, 2)
    out = (weights @ v).transpose(1, 2).reshape(b, weights.shape[2], embed)
    return F.linear(out, module.out_proj.weight, module.out_proj.bias)


@dataclass(frozen=True)
class AttentionRecording:
    """Attention probabilities of one forward and, optionally, their gradients for each target.

    Attributes:
        sites: The attention sites, in forward order.
        probabilities: Site name -> ``(B, heads, N, N)`` (detached).
        gradients: Site name -> ``(T, B, heads, N, N)`` d score / d probabilities; empty without gradients.
        logits: ``(B, K)``.
        scores: ``(B, T)``.
    """

    sites: list[AttentionSite]
    probabilities: dict[str, torch.Tensor]
    gradients: dict[str, torch.Tensor]
    logits: torch.Tensor
    scores: torch.Tensor


def record_attention(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: Sequence[Target],
    *,
    gradients: bool = True,
    output_selector: OutputSelector | None = None,
    sites: Sequence[AttentionSite] | None = None,
) -> AttentionRecording:
    """One forward recording every attention site, and one gradient pass per target if asked.

    Args:
        model: A supported vision transformer (see :func:`attention_sites`).
        inputs: ``(B, C, H, W)`` on the model's device and dtype.
        targets: What to differentiate (e.g. a :class:`~cnnlens.capture.Probe`'s fixed targets).
        gradients: Compute ``d score / d A_l`` for every target.
        output_selector: Picks the logits from unusual model outputs.
        sites: The attention sites (default: :func:`attention_sites`).

    Returns:
        The :class:`AttentionRecording`; sites that did not run are refused.

    Raises:
        MethodError: No supported attention, or a site that did not run or gave inconsistent shapes.
    """
    recorder = AttentionRecorder(model, sites, gradients=gradients)
    x = inputs.detach()
    with recorder, torch.set_grad_enabled(gradients):
        logits = to_logits(model(x), output_selector)
        check_recorded(recorder, int(x.shape[0]))
        if gradients:
            scores, grads = recorder.scores_and_gradients(logits, targets)
        else:
            scores, grads = torch.stack([t(logits) for t in targets], dim=1), {}
    probs = {name: p.detach() for name, p in recorder.probabilities.items()}
    return AttentionRecording(recorder.sites, probs, grads, logits.detach(), scores.detach())


def check_recorded(recorder: AttentionRecorder, batch: int) -> None:
    """Every site ran once with probabilities ``(batch, heads, N, N)`` of one token count ``N``.

    Raises:
        MethodError: A site did not run, or the shapes disagree (e.g. windowed or pooled attention).
    """
    missing = [s.name for s in recorder.sites if s.name not in recorder.probabilities]
    if missing:
        raise MethodError(
            f"attention module(s) {missing[:3]} of {type(recorder.model).__name__} did not run in the forward; "
            f"the attention methods need every block's probabilities (supported: {SUPPORTED})."
        )
    shapes = {name: tuple(p.shape) for name, p in recorder.probabilities.items()}
    n = next(iter(shapes.values()))[-1]
    for name, shape in shapes.items():
        if len(shape) != 4 or shape[0] != batch or shape[2] != shape[3] or shape[3] != n:
            raise MethodError(
                f"attention of {name!r} has shape {shape}, expected (B={batch}, heads, N={n}, N={n}) like the other "
                "blocks; rollout needs global self-attention over the same tokens in every block."
            )
