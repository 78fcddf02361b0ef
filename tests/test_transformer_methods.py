"""Attention rollout and gradient-weighted attention against literal re-implementations of the papers' recursions.

The oracles compute every block's attention probabilities with their own forward (no hook, no cnnlens), in
float64, then apply the recursions with full ``(N, N)`` matrices in Python loops, sample by sample:
rollout (Abnar & Zuidema 2020, with the head fusion and discard of the common reference code) and Chefer et
al. 2021's ``R <- R + E_h[(dS/dA ⊙ A)^+] R``. cnnlens records the probabilities through hooks and computes
only the class token's row; the two must agree to float64 rounding.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from tests.nets import GapHead, hook_count, seeded
from timm.models.deit import VisionTransformerDistilled
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from torch import nn

import cnnlens
from cnnlens.capture.attention import AttentionRecorder, attention_sites
from cnnlens.errors import MethodError

KINDS = ["plain", "distilled", "registers"]
PREFIX = {"plain": 1, "distilled": 2, "registers": 5}


def _vit(kind: str, **extra: object) -> nn.Module:
    torch.manual_seed({"plain": 0, "distilled": 1, "registers": 2}[kind])
    args: dict[str, object] = dict(img_size=32, patch_size=8, embed_dim=16, depth=3, num_heads=2, num_classes=5)
    args.update(extra)
    if kind == "distilled":
        model: nn.Module = VisionTransformerDistilled(**args)
    elif kind == "registers":
        model = VisionTransformer(reg_tokens=4, **args)
    else:
        model = VisionTransformer(**args)
    with torch.no_grad():  # random tokens and positions, so attention is not nearly uniform
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return model.eval().double()


def _torchvision_vit() -> nn.Module:
    torch.manual_seed(3)
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=5
    )
    with torch.no_grad():
        nn.init.normal_(model.heads.head.weight)  # torchvision initialises the head to zero: constant logits
        model.class_token.normal_()
    return model.eval().double()


def _input(batch: int = 2, hw: tuple[int, int] = (32, 32)) -> torch.Tensor:
    return torch.randn(batch, 3, *hw, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


def _literal_timm(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits and every block's attention probabilities, by an explicit forward of a timm ViT (no hooks)."""
    t = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    attentions = []
    for blk in model.blocks:
        h = blk.norm1(t)
        at = blk.attn
        b, n, c = h.shape
        q, k, v = at.qkv(h).reshape(b, n, 3, at.num_heads, at.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = at.q_norm(q), at.k_norm(k)
        a = ((q * at.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        attentions.append(a)
        o = at.proj(at.norm((a @ v).transpose(1, 2).reshape(b, n, c)))
        t = t + blk.ls1(o)
        t = t + blk.ls2(blk.mlp(blk.norm2(t)))
    return model.forward_head(model.norm(t)), attentions


def _literal_torchvision(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    t = model._process_input(x)
    t = torch.cat([model.class_token.expand(t.shape[0], -1, -1), t], dim=1) + model.encoder.pos_embedding
    attentions = []
    for layer in model.encoder.layers:
        h = layer.ln_1(t)
        attentions.append(layer.self_attention(h, h, h, need_weights=True, average_attn_weights=False)[1])
        t = layer(t)
    return attentions


def _rollout_oracle(
    attentions: list[torch.Tensor], fusion: str, discard: float, prefix: int, grid: tuple[int, int], row: str
) -> torch.Tensor:
    """The paper's recursion with full matrices: R = Â_L ... Â_1, Â = rownorm(0.5 fuse(A) + 0.5 I)."""
    maps = []
    for b in range(attentions[0].shape[0]):
        n = attentions[0].shape[-1]
        eye = torch.eye(n, dtype=torch.float64)
        result = eye.clone()
        for a in attentions:
            heads = a[b].detach().double()
            fused = {"mean": heads.mean(0), "max": heads.max(0).values, "min": heads.min(0).values}[fusion]
            if discard > 0:
                flat = fused.flatten().clone()
                idx = flat.topk(int(flat.numel() * discard), largest=False).indices
                idx = idx[idx != 0]
                flat[idx] = 0
                fused = flat.view(n, n)
            step = (fused + eye) / 2
            step = step / step.sum(dim=-1, keepdim=True)
            result = step @ result
        r = result[0] if row == "class" else result[:prefix].mean(0)
        maps.append(r[prefix:].reshape(grid))
    return torch.stack(maps)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("discard", [0.0, 0.5])
def test_rollout_equals_the_literal_recursion(kind: str, fusion: str, discard: float) -> None:
    model = _vit(kind)
    x = _input()
    logits, attentions = _literal_timm(model, x)
    torch.testing.assert_close(logits, model(x))  # the oracle's own forward is the model's
    opts = {"rollout": {"head_fusion": fusion, "discard_ratio": discard}}
    res = cnnlens.explain(model, x, methods=["rollout"], layers=["blocks.0"], top_k=2, options=opts)
    e = res["rollout", None]
    assert e.layer == "network"
    expected = _rollout_oracle(attentions, fusion, discard, PREFIX[kind], (4, 4), "class")
    assert e.raw.shape == (2, 2, 4, 4)
    for t in range(2):  # class-agnostic: the same map for every target
        torch.testing.assert_close(e.raw[:, t], expected, rtol=1e-10, atol=1e-12)
    assert e.maps.shape == (2, 2, 32, 32)


def test_rollout_prefix_row_averages_class_and_distillation_rows() -> None:
    model = _vit("distilled")
    x = _input()
    _, attentions = _literal_timm(model, x)
    res = cnnlens.explain(model, x, methods=["rollout"], layers=["blocks.0"], options={"rollout": {"row": "prefix"}})
    expected = _rollout_oracle(attentions, "mean", 0.0, 2, (4, 4), "prefix")
    torch.testing.assert_close(res["rollout", None].raw[:, 0], expected, rtol=1e-10, atol=1e-12)
    cls = cnnlens.explain(model, x, methods=["rollout"], layers=["blocks.0"])["rollout", None].raw
    assert not torch.allclose(cls, res["rollout", None].raw)


def _attngrad_oracle(model: nn.Module, x: torch.Tensor, classes: torch.Tensor, prefix: int) -> torch.Tensor:
    """Chefer et al.: per block Ā = E_h[(dS/dA ⊙ A)^+], R <- R + Ā R from R = I; class-token row over the grid."""
    maps = []
    for b in range(x.shape[0]):
        logits, attentions = _literal_timm(model, x[b : b + 1])
        grads = torch.autograd.grad(logits[0, int(classes[b])], attentions)
        n = attentions[0].shape[-1]
        r = torch.eye(n, dtype=torch.float64)
        for a, g in zip(attentions, grads, strict=True):
            cam = (g[0] * a[0]).clamp(min=0).mean(0).detach()
            r = r + cam @ r
        maps.append(r[0, prefix:].reshape(4, 4))
    return torch.stack(maps)


@pytest.mark.parametrize("kind", KINDS)
def test_attngrad_equals_the_literal_recursion_per_target(kind: str) -> None:
    model = _vit(kind)
    x = _input()
    res = cnnlens.explain(model, x, methods=["attngrad"], layers=["blocks.0"], top_k=2)
    e = res["attngrad", None]
    assert e.layer == "network" and e.raw.shape == (2, 2, 4, 4)
    for t in range(2):
        expected = _attngrad_oracle(model, x, e.target_classes[:, t], PREFIX[kind])
        torch.testing.assert_close(e.raw[:, t], expected, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(e.raw[:, 0], e.raw[:, 1])  # class-specific
    assert all(p.grad is None for p in model.parameters())


def test_batch_equals_per_sample_and_layer_methods_unchanged() -> None:
    model = _vit("plain")
    x = _input(3)
    both = cnnlens.explain(model, x, methods=["rollout", "attngrad", "gradcam"], layers=["blocks.1.norm1"])
    ref = cnnlens.explain(model, x, methods=["gradcam"], layers=["blocks.1.norm1"])
    torch.testing.assert_close(both.logits, ref.logits)  # the unfused forward gives the same logits
    for i in range(3):
        alone = cnnlens.explain(model, x[i : i + 1], methods=["rollout", "attngrad"], layers=["blocks.0"])
        for method in ("rollout", "attngrad"):
            torch.testing.assert_close(alone[method, None].raw[0], both[method, None].raw[i], rtol=1e-10, atol=1e-13)


def test_non_square_input_uses_the_patch_grid() -> None:
    model = _vit("plain", dynamic_img_size=True)
    x = _input(1, (32, 48))
    _, attentions = _literal_timm(model, x)
    e = cnnlens.explain(model, x, methods=["rollout"], layers=["blocks.0"])["rollout", None]
    assert e.raw.shape == (1, 1, 4, 6) and e.maps.shape == (1, 1, 32, 48)
    torch.testing.assert_close(e.raw[:, 0], _rollout_oracle(attentions, "mean", 0.0, 1, (4, 6), "class"))


def _fused_flags(model: nn.Module) -> list[bool]:
    return [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")]


def _all_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


class _Boom(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom in the head")


@pytest.mark.parametrize("method", ["rollout", "attngrad"])
@pytest.mark.parametrize("fused", [True, False])
def test_fused_attn_restored_and_no_hook_left_also_on_error(method: str, fused: bool) -> None:
    model = _vit("plain")
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused
    model.train()
    cnnlens.explain(model, _input(), methods=[method], layers=["blocks.0"])
    assert _fused_flags(model) == [fused] * 3 and _all_hooks(model) == 0 and model.training
    with AttentionRecorder(model):  # inside: switched off, hooked, eval mode
        assert _fused_flags(model) == [False] * 3 and _all_hooks(model) == 3 and not model.training
    assert _fused_flags(model) == [fused] * 3 and _all_hooks(model) == 0
    model.head = _Boom()
    with pytest.raises(RuntimeError, match="boom in the head"):
        cnnlens.explain(model, _input(), methods=[method], layers=["blocks.0"])
    assert _fused_flags(model) == [fused] * 3 and _all_hooks(model) == 0 and model.training
    assert all(p.requires_grad for p in model.parameters())


def test_torchvision_vit_both_methods_and_need_weights_back() -> None:
    model = _torchvision_vit()
    x = _input()
    attentions = _literal_torchvision(model, x)
    res = cnnlens.explain(model, x, methods=["rollout", "attngrad"], layers=["encoder.layers.encoder_layer_0"], top_k=2)
    expected = _rollout_oracle(attentions, "mean", 0.0, 1, (4, 4), "class")
    torch.testing.assert_close(res["rollout", None].raw[:, 0], expected, rtol=1e-10, atol=1e-12)
    grad = res["attngrad", None]
    assert grad.raw.shape == (2, 2, 4, 4) and bool((grad.raw > 0).any())
    assert not torch.allclose(grad.raw[:, 0], grad.raw[:, 1])
    assert _all_hooks(model) == 0
    mha = model.encoder.layers[0].self_attention
    h = torch.randn(1, 17, 16, dtype=torch.float64)
    assert mha(h, h, h, need_weights=False)[1] is None  # the call's own arguments rule again
    assert mha(h, h, h)[1].shape == (1, 17, 17)  # averaged over heads, as by default


def test_torchvision_attngrad_matches_timm_twin() -> None:
    # The same weights in a timm ViT: torchvision's recomputed attention output gives the same gradients.
    tv = _torchvision_vit()
    timm_vit = VisionTransformer(
        img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=5, qkv_bias=True
    ).double()
    timm_vit.eval()
    sd = {
        "cls_token": tv.class_token,
        "pos_embed": tv.encoder.pos_embedding,
        "patch_embed.proj.weight": tv.conv_proj.weight,
        "patch_embed.proj.bias": tv.conv_proj.bias,
        "norm.weight": tv.encoder.ln.weight,
        "norm.bias": tv.encoder.ln.bias,
        "head.weight": tv.heads.head.weight,
        "head.bias": tv.heads.head.bias,
    }
    for i, layer in enumerate(tv.encoder.layers):
        p = f"blocks.{i}."
        sd |= {
            p + "norm1.weight": layer.ln_1.weight,
            p + "norm1.bias": layer.ln_1.bias,
            p + "attn.qkv.weight": layer.self_attention.in_proj_weight,
            p + "attn.qkv.bias": layer.self_attention.in_proj_bias,
            p + "attn.proj.weight": layer.self_attention.out_proj.weight,
            p + "attn.proj.bias": layer.self_attention.out_proj.bias,
            p + "norm2.weight": layer.ln_2.weight,
            p + "norm2.bias": layer.ln_2.bias,
            p + "mlp.fc1.weight": layer.mlp[0].weight,
            p + "mlp.fc1.bias": layer.mlp[0].bias,
            p + "mlp.fc2.weight": layer.mlp[3].weight,
            p + "mlp.fc2.bias": layer.mlp[3].bias,
        }
    timm_vit.load_state_dict({k: v.detach() for k, v in sd.items()})
    for blk in timm_vit.blocks:  # torchvision's LayerNorm eps is 1e-6, as timm's ViT
        assert blk.norm1.eps == tv.encoder.layers[0].ln_1.eps
    x = _input()
    torch.testing.assert_close(timm_vit(x), tv(x))
    kw = {"methods": ["attngrad", "rollout"], "top_k": 2}
    a = cnnlens.explain(tv, x, layers=["encoder.layers.encoder_layer_0"], **kw)
    b = cnnlens.explain(timm_vit, x, layers=["blocks.0"], **kw)
    for method in ("attngrad", "rollout"):
        torch.testing.assert_close(a[method, None].raw, b[method, None].raw, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method", ["rollout", "attngrad"])
def test_a_cnn_is_refused_clearly_before_any_forward(method: str) -> None:
    net = seeded(GapHead(), dtype=torch.float32)
    calls = []
    net.register_forward_pre_hook(lambda m, a: calls.append(1))
    with pytest.raises(MethodError, match=r"GapHead has no supported attention module.*Supported: timm"):
        cnnlens.explain(net, torch.randn(1, 3, 8, 8), methods=[method], layers=["body.4"])
    assert calls == [] and hook_count(net) == 1  # only the test's own hook


def test_swin_is_refused_as_windowed_attention() -> None:
    swin = SwinTransformer(
        img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 1), num_classes=5
    )
    with pytest.raises(MethodError, match=r"SwinTransformer uses windowed attention \(WindowAttention"):
        cnnlens.explain(swin, torch.randn(1, 3, 32, 32), methods=["rollout"], layers=["layers.0"])
    assert _fused_flags(swin) == _fused_flags(copy.deepcopy(swin)) and _all_hooks(swin) == 0
    tv_swin = torchvision.models.swin_t(weights=None)
    with pytest.raises(MethodError, match=r"SwinTransformer uses windowed attention \(ShiftedWindowAttention"):
        attention_sites(tv_swin, "attngrad")


def test_unknown_attention_is_named() -> None:
    class SelfAttention(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.scaled_dot_product_attention(x, x, x)

    net = nn.Sequential(nn.Flatten(2), SelfAttention())
    with pytest.raises(MethodError, match=r"cannot record: SelfAttention at '1'"):
        attention_sites(net, "rollout")


def test_other_methods_extra_forwards_do_not_overwrite_the_recorded_attention() -> None:
    # smoothgrad runs noisy forwards inside the same explain() call, while rollout's recorder is open
    model = _vit("plain")
    x = _input()
    alone = cnnlens.explain(model, x, methods=["rollout"], layers=["blocks.0"])["rollout", None].raw
    opts = {"smoothgrad": {"n": 3}}
    both = cnnlens.explain(model, x, methods=["smoothgrad", "rollout"], layers=["blocks.0"], options=opts)
    torch.testing.assert_close(both["rollout", None].raw, alone, rtol=0, atol=0)


def test_no_prefix_token_uses_the_mean_of_all_rows() -> None:
    model = _vit("plain", class_token=False, global_pool="avg")
    assert model.num_prefix_tokens == 0
    x = _input()
    _, attentions = _literal_timm(model, x)
    e = cnnlens.explain(model, x, methods=["rollout"], layers=["blocks.0"])["rollout", None]
    n = attentions[0].shape[-1]
    expected = []
    for b in range(x.shape[0]):
        eye = torch.eye(n, dtype=torch.float64)
        result = eye.clone()
        for a in attentions:
            step = (a[b].detach().mean(0) + eye) / 2
            result = (step / step.sum(-1, keepdim=True)) @ result
        expected.append(result.mean(0).reshape(4, 4))
    torch.testing.assert_close(e.raw[:, 0], torch.stack(expected), rtol=1e-10, atol=1e-12)
