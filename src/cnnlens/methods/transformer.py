"""Transformer methods: attention rollout and gradient-weighted attention, from recorded attention probabilities.

Both are network-scope methods (one map per call, under the layer key ``"network"``, like FullGrad) on the
patch grid ``(h, w)`` of a vision transformer; :func:`cnnlens.explain` upsamples it to the input like every
other map. The probabilities ``A_l`` ``(B, heads, N, N)`` of every self-attention block are recorded inside
capture (:mod:`cnnlens.capture.attention`: timm ``fused_attn`` switched off for the call only, torchvision's
``nn.MultiheadAttention`` asked for its per-head weights); the prefix-token count ``P`` (class, distillation,
register tokens) and the grid come from :func:`cnnlens.capture.layout.token_geometry`, never from ``sqrt(N)``.

* ``rollout`` needs no gradient: its probabilities are recorded during explain()'s own forward (which then runs
  with unfused attention), so it costs the rollout arithmetic on top of that forward.
* ``attngrad`` records the probabilities and their gradients in one extra forward and one gradient pass per
  target (the classes of the main capture, frozen).

A model without supported attention (a CNN, Swin's windowed attention, an attention module that calls
``F.scaled_dot_product_attention`` with no switch) is refused with a :class:`~cnnlens.errors.MethodError`
before any forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn

from cnnlens.capture import Probe, Recording
from cnnlens.capture.attention import AttentionRecorder, attention_sites, check_recorded, record_attention
from cnnlens.capture.layout import token_geometry
from cnnlens.errors import MethodError
from cnnlens.maps import precise_dtype
from cnnlens.methods.registry import LayerView, MethodSpec, NetworkRecord, register
from cnnlens.outputs import OutputSelector

__all__ = [
    "attention_grid",
    "attention_recorder",
    "attention_sites_of",
    "attention_views",
    "attngrad",
    "fuse_heads",
    "rollout",
    "token_row",
]

_FUSIONS = ("mean", "max", "min")
_ROWS = ("class", "prefix")


def attention_sites_of(model: nn.Module) -> list[str]:
    """The attention modules the transformer methods record (their ``records=``); refuses other models.

    Raises:
        MethodError: The model has no supported self-attention (a CNN) or windowed attention (Swin).
    """
    return [site.name for site in attention_sites(model, "rollout/attngrad")]


def _needs_attention(spec: MethodSpec) -> bool:
    return "attention" in spec.needs


def attention_recorder(
    model: nn.Module, specs: Sequence[MethodSpec]
) -> AbstractContextManager[AttentionRecorder | None]:
    """The recorder explain() opens around its main forward: attention on the side for ``rollout``.

    Validates first (before any forward): a requested attention method on a model without supported attention
    raises here. Returns a no-op context when no requested method reads attention from the main forward.

    Raises:
        MethodError: An attention method was requested for a model without supported attention.
    """
    wanted = [spec for spec in specs if _needs_attention(spec)]
    if not wanted:
        return nullcontext()
    sites = attention_sites(model, " and ".join(spec.id for spec in wanted))
    if all("attention_gradients" in spec.needs for spec in wanted):
        return nullcontext()  # attngrad records in its own forward with gradients
    return AttentionRecorder(model, sites, gradients=False)


def attention_views(
    spec: MethodSpec,
    model: nn.Module,
    rec: Recording,
    probe: Probe,
    output_selector: OutputSelector | None,
    recorder: AttentionRecorder | None,
) -> list[LayerView]:
    """One view per target for an attention method, its :class:`NetworkRecord` holding the probabilities.

    ``modules`` maps ``""`` to the model (for the token geometry) and each site to its module; ``activations``
    holds ``(B, heads, N, N)`` probabilities in forward order; ``gradients`` the target's ``d score / d A``
    (empty for rollout). Rollout reads ``recorder`` (filled by the main forward); the gradient method runs
    :func:`~cnnlens.capture.attention.record_attention` with the main capture's frozen targets.
    """
    modules: dict[str, Any] = {"": model}
    if "attention_gradients" in spec.needs:
        if getattr(rec, "model_inputs", None) is not None:
            raise MethodError(
                f"{spec.id} runs its own forward with one input tensor; this model was called with several inputs or "
                "extra arguments. Use rollout (it reads explain()'s own forward) or a CAM on a block's norm layer."
            )
        att = record_attention(model, rec.inputs, list(probe.targets), output_selector=output_selector)
        modules.update({site.name: site.module for site in att.sites})
        probs, grads = att.probabilities, att.gradients
    else:
        if recorder is None:
            raise MethodError(f"{spec.id} reads the attention of explain()'s forward; call it through explain().")
        check_recorded(recorder, int(rec.inputs.shape[0]))
        modules.update({site.name: site.module for site in recorder.sites})
        probs, grads = dict(recorder.probabilities), {}
    return [
        LayerView.of(
            rec,
            spec.scope,
            t,
            probe=probe,
            execution=probe.cap.execution,
            network=NetworkRecord(modules, probs, {k: v[t] for k, v in grads.items()}),
        )
        for t in range(rec.num_targets)
    ]


def fuse_heads(attention: torch.Tensor, fusion: str) -> torch.Tensor:
    """``(B, heads, N, N) -> (B, N, N)``: the mean, max or min over heads.

    Example:
        >>> fuse_heads(torch.tensor([[[[1.0]], [[3.0]]]]), "max").tolist()
        [[[3.0]]]
    """
    if fusion == "mean":
        return attention.mean(dim=1)
    if fusion == "max":
        return attention.amax(dim=1)
    if fusion == "min":
        return attention.amin(dim=1)
    raise MethodError(f"head_fusion must be one of {', '.join(map(repr, _FUSIONS))}; got {fusion!r}.")


def _discard(fused: torch.Tensor, ratio: float) -> torch.Tensor:
    """Zero the ``int(N^2 ratio)`` smallest entries of each sample's ``(N, N)``, except entry ``(0, 0)``."""
    flat = fused.flatten(1)
    k = int(flat.shape[1] * ratio)
    if k == 0:
        return fused
    index = flat.topk(k, dim=1, largest=False).indices
    drop = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, index, True)
    drop[:, 0] = False  # the reference code never drops the class token's attention to itself
    return flat.masked_fill(drop, 0.0).view_as(fused)


def token_row(batch: int, n: int, prefix: int, row: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The row selector ``(B, N)``: token 0 (``"class"``) or the mean of the ``P`` prefix rows (``"prefix"``).

    Without prefix tokens (``P = 0``, a global-average-pooled ViT) both are the mean of all ``N`` rows.

    Example:
        >>> token_row(1, 4, 2, "prefix", torch.float64, torch.device("cpu")).tolist()
        [[0.5, 0.5, 0.0, 0.0]]
    """
    if row not in _ROWS:
        raise MethodError(f"row must be one of {', '.join(map(repr, _ROWS))}; got {row!r}.")
    sel = torch.zeros(batch, n, dtype=dtype, device=device)
    if prefix == 0:
        sel.fill_(1.0 / n)
    elif row == "class":
        sel[:, 0] = 1.0
    else:
        sel[:, :prefix] = 1.0 / prefix
    return sel


def attention_grid(view: LayerView, method: str) -> tuple[NetworkRecord, list[torch.Tensor], int, tuple[int, int]]:
    """The record, the probabilities in forward order, the prefix count ``P`` and the grid ``(h, w)``.

    Raises:
        MethodError: Called outside explain(), or the tokens do not fit the model's patch grid.
    """
    network = view.require_network(method)
    probs = list(network.activations.values())
    if not probs:
        raise MethodError(f"{method} found no attention probabilities in the record; call it through explain().")
    n = int(probs[0].shape[-1])
    hw = (int(view.inputs.shape[-2]), int(view.inputs.shape[-1]))
    prefix, grid, _ = token_geometry(network.modules[""], hw, n_tokens=n)
    return network, probs, prefix, grid


@register(
    "rollout",
    title="Attention rollout",
    needs={"attention"},
    scope="network",
    records=attention_sites_of,
    defaults={"head_fusion": "mean", "discard_ratio": 0.0, "row": "class"},
    paper="Abnar & Zuidema, Quantifying Attention Flow in Transformers, ACL 2020 (arXiv:2005.00928)",
    formula="Â_l = rownorm(0.5 fuse_h(A_l) + 0.5 I) ;  R = Â_L ... Â_1 ;  map = R[cls, P:] as (h, w)",
    summary="Attention of the class token to each patch, propagated through every block (class-agnostic).",
)
def rollout(view: LayerView, head_fusion: str = "mean", discard_ratio: float = 0.0, row: str = "class") -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema, ACL 2020) on the patch grid of a vision transformer.

    Formula: per block ``l`` (in forward order, ``L`` blocks) the heads are fused, ``A_l = mean_h A_l^h``
    (``head_fusion="max"``/``"min"``: the max/min over heads), optionally the ``int(N^2 discard_ratio)``
    smallest entries of each sample's ``A_l`` are set to 0 (never entry ``(0, 0)``; as in the widely used
    reference code, github.com/jacobgil/vit-explain), the residual connection is added and the rows
    renormalised, ``Â_l = rownorm(0.5 A_l + 0.5 I)``, and ``R = Â_L Â_{L-1} ... Â_1``. The map is the class
    token's row of ``R`` over the grid tokens, ``R[0, P:]`` reshaped to ``(h, w)`` (``row="prefix"``: the mean
    of the ``P`` prefix rows, e.g. class and distillation tokens; without prefix tokens: the mean of all rows).
    Only that row is computed (``r <- r Â_l`` from ``l = L`` down to 1: the same product, ``O(L N^2)``), in
    float64 (float32 on MPS); the heads are fused in the model's precision (float32 for half models).

    The map is class-agnostic: attention does not depend on the target, so every target of a call gets the
    same map. Difference from the reference code: it divides ``Â`` by its row sums with broadcasting over the
    wrong axis (``a / a.sum(dim=-1)``, columns scaled by row sums), and applies the discard to the first
    sample of a batch only; here rows are renormalised as in the paper, and every sample is treated alike.

    Example:
        >>> import cnnlens, timm
        >>> vit = timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=8, embed_dim=16,
        ...                                                        depth=2, num_heads=2, num_classes=3)
        >>> r = cnnlens.explain(vit, torch.randn(1, 3, 32, 32), methods=["rollout"], layers=["blocks.0"])
        >>> r["rollout", None].layer, tuple(r["rollout", None].raw.shape)
        ('network', (1, 1, 4, 4))
    """
    if not 0.0 <= float(discard_ratio) < 1.0:
        raise MethodError(f"discard_ratio must be in [0, 1), got {discard_ratio!r}.")
    fuse_heads(torch.zeros(1, 1, 1, 1), head_fusion)  # validate before work
    token_row(1, 1, 0, row, torch.float64, torch.device("cpu"))
    _, probs, prefix, (h, w) = attention_grid(view, "rollout")
    if view.probe is None:
        return _rollout(probs, prefix, (h, w), head_fusion, float(discard_ratio), row)
    # class-agnostic: computed once per call and shared by every target
    key = ("rollout", head_fusion, float(discard_ratio), row)
    return view.probe.memo(key, lambda: _rollout(probs, prefix, (h, w), head_fusion, float(discard_ratio), row))


def _rollout(
    probs: list[torch.Tensor], prefix: int, grid: tuple[int, int], head_fusion: str, discard_ratio: float, row: str
) -> torch.Tensor:
    """The class token's row of ``R = Â_L ... Â_1`` over the grid tokens, ``(B, h, w)`` (see :func:`rollout`)."""
    h, w = grid
    dtype = precise_dtype(probs[0])
    batch, n = int(probs[0].shape[0]), int(probs[0].shape[-1])
    r = token_row(batch, n, prefix, row, dtype, probs[0].device).unsqueeze(1)  # (B, 1, N)
    for attention in reversed(probs):
        # heads fused in the model's precision (at least float32), the product in float64: a 12x smaller upcast
        wide = attention if attention.dtype in (torch.float32, torch.float64) else attention.float()
        fused = _discard(fuse_heads(wide, head_fusion).to(dtype), discard_ratio)
        # r Â with Â = (0.5 F + 0.5 I) / s (row sums s = 0.5 F 1 + 0.5), without forming Â: u = r / s^T,
        # r Â = 0.5 u F + 0.5 u (one pass over F for s, one product)
        u = r / (0.5 * fused.sum(dim=-1) + 0.5).unsqueeze(1)
        r = torch.baddbmm(u, u, fused, beta=0.5, alpha=0.5)
    return r[:, 0, prefix:].reshape(batch, h, w)


@register(
    "attngrad",
    title="Gradient-weighted attention (Chefer 2021)",
    needs={"attention", "attention_gradients"},
    scope="network",
    records=attention_sites_of,
    defaults={"row": "class"},
    paper="Chefer, Gur & Wolf, Generic Attention-model Explainability for Interpreting Bi-Modal and "
    "Encoder-Decoder Transformers, ICCV 2021 (arXiv:2103.15679)",
    formula="Ā_l = mean_h (dS/dA_l ⊙ A_l)^+ ;  R_0 = I, R_l = R_{l-1} + Ā_l R_{l-1} ;  map = R_L[cls, P:] as (h, w)",
    summary="Attention weighted by its positive gradient, accumulated over blocks (class-specific).",
)
def attngrad(view: LayerView, row: str = "class") -> torch.Tensor:
    """Gradient-weighted attention relevance (Chefer, Gur & Wolf, ICCV 2021), without LRP.

    Formula: per block ``l`` (forward order), ``Ā_l = E_h[(∇_{A_l} S ⊙ A_l)^+]`` (the gradient of the target's
    score ``S`` with respect to the attention probabilities, times them, clamped at 0, averaged over heads);
    ``R_0 = I`` and ``R_l = R_{l-1} + Ā_l R_{l-1}`` (the paper's self-attention rule, Eq. 6, with the
    gradient-weighted attention of its hook-based ViT code in place of LRP relevance). The map is the class
    token's row over the grid tokens, ``R_L[0, P:]`` reshaped to ``(h, w)`` (``row="prefix"``: the mean of the
    prefix rows). Only that row is computed (``r <- r (I + Ā_l)`` from ``l = L`` down to 1), in float64 (float32
    on MPS). Class-specific: each target has its own gradients, so its own map.

    Cost: one extra forward with unfused attention and one gradient pass per target.

    Example:
        >>> import cnnlens, timm
        >>> vit = timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=8, embed_dim=16,
        ...                                                        depth=2, num_heads=2, num_classes=3)
        >>> r = cnnlens.explain(vit, torch.randn(2, 3, 32, 32), methods=["attngrad"], layers=["blocks.0"],
        ...                     top_k=2)
        >>> tuple(r["attngrad", None].raw.shape)
        (2, 2, 4, 4)
    """
    network, probs, prefix, (h, w) = attention_grid(view, "attngrad")
    dtype = precise_dtype(probs[0])
    batch, n = int(probs[0].shape[0]), int(probs[0].shape[-1])
    r = token_row(batch, n, prefix, row, dtype, probs[0].device).unsqueeze(1)  # (B, 1, N)
    names = list(network.activations)
    for name in reversed(names):
        attention = network.activations[name].to(dtype)
        weighted = (network.gradients[name].to(dtype) * attention).clamp(min=0).mean(dim=1)
        r = r + r @ weighted
    return r[:, 0, prefix:].reshape(batch, h, w)
