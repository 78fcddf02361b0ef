"""Token models end to end (issue 11): default layers per family, transformer-block candidate roles.

Big models are built once per module (random weights, offline); most checks read the module tree only.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import timm
import torch
import torchvision
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torchvision.models.swin_transformer import SwinTransformer as SwinTransformerTV
from torchvision.models.vision_transformer import VisionTransformer as VisionTransformerTV

import cnnlens
from cnnlens.candidates import candidate_layers
from cnnlens.models.layers import default_target_layer, guess_layers, token_model_default, transformer_blocks
from cnnlens.studies.layers import select_layers

_BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "vit_tiny": lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False),
    "deit_distilled": lambda: timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False),
    "swin_tiny": lambda: timm.create_model("swin_tiny_patch4_window7_224", pretrained=False),
    "convnext_timm": lambda: timm.create_model("convnext_tiny", pretrained=False),
    "convnext_tv": lambda: torchvision.models.convnext_tiny(),
    # torchvision's vit_b_16 and swin_t classes, built small (same module names; vit_b_16 alone takes seconds)
    "tv_vit": lambda: VisionTransformerTV(
        image_size=224, patch_size=16, num_layers=12, num_heads=2, hidden_dim=32, mlp_dim=64
    ),
    "swin_t": lambda: SwinTransformerTV(
        patch_size=[4, 4], embed_dim=16, depths=[2, 2, 2, 2], num_heads=[1, 1, 1, 1], window_size=[7, 7]
    ),
}


@pytest.fixture(scope="module")
def models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {name: build().eval() for name, build in _BUILDERS.items()}


def _register_vit(depth: int = 2) -> VisionTransformer:
    """A small timm ViT with 4 register tokens and a class token (5 prefix tokens), 64x64 inputs (4x4 grid)."""
    torch.manual_seed(0)
    return VisionTransformer(
        img_size=64, patch_size=16, embed_dim=32, depth=depth, num_heads=2, reg_tokens=4, num_classes=5
    ).eval()


# --------------------------------------------------------------------------------------------------------
# default layers: one policy per family, from the module tree alone
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "expected"),
    [
        ("vit_tiny", "blocks.11.norm1"),
        ("deit_distilled", "blocks.11.norm1"),
        ("swin_tiny", "layers.3.blocks.1.norm1"),
        ("tv_vit", "encoder.layers.encoder_layer_11.ln_1"),
        ("swin_t", "features.7.1.norm1"),
        ("convnext_timm", "stages.3"),  # the last stage's output: NCHW, unchanged by issue 11
        ("convnext_tv", "features"),  # features' output is features.7's (the last stage), unchanged
    ],
)
def test_default_layer_per_family(models: dict[str, nn.Module], family: str, expected: str) -> None:
    module = models[family]
    assert default_target_layer(module) == expected
    assert cnnlens.default_layer(module) == expected  # one policy for the API and the CLI
    default, known = guess_layers(module)
    assert default == expected and known["final_spatial"] == expected
    if family.startswith("convnext"):
        assert token_model_default(module) is None and "last_block" not in known
    else:
        assert isinstance(module.get_submodule(expected), nn.LayerNorm)
        assert known["last_block"] == expected.rpartition(".")[0]


def test_register_vit_default_is_its_last_norm1() -> None:
    net = _register_vit(depth=3)
    assert net.num_prefix_tokens == 5
    assert default_target_layer(net) == "blocks.2.norm1"


def test_transformer_blocks_name_both_norms(models: dict[str, nn.Module]) -> None:
    blocks = transformer_blocks(models["vit_tiny"])
    assert [b.name for b in blocks] == [f"blocks.{i}" for i in range(12)]
    assert (blocks[-1].attention_norm, blocks[-1].attention, blocks[-1].mlp_norm) == (
        "blocks.11.norm1",
        "blocks.11.attn",
        "blocks.11.norm2",
    )
    tv = transformer_blocks(models["tv_vit"])[-1]
    assert (tv.attention_norm, tv.attention, tv.mlp_norm) == (
        "encoder.layers.encoder_layer_11.ln_1",
        "encoder.layers.encoder_layer_11.self_attention",
        "encoder.layers.encoder_layer_11.ln_2",
    )
    assert len(transformer_blocks(models["swin_tiny"])) == 2 + 2 + 6 + 2


class _Block(nn.Module):
    def __init__(self, first: nn.Module, dim: int = 8) -> None:
        super().__init__()
        self.norm1 = first
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)


def test_a_block_is_an_attention_right_after_a_layer_norm() -> None:
    assert [b.name for b in transformer_blocks(nn.Sequential(_Block(nn.LayerNorm(8))))] == ["0"]
    # attention after a conv or a batch norm (CNN attention: squeeze-excitation, bottleneck self-attention)
    assert transformer_blocks(nn.Sequential(_Block(nn.BatchNorm1d(8)), _Block(nn.Identity()))) == []
    for cnn in (
        torchvision.models.resnet18(),
        timm.create_model("seresnext26t_32x4d"),
        timm.create_model("botnet26t_256"),
    ):
        assert transformer_blocks(cnn) == []


def test_cnn_defaults_are_unchanged_and_hybrids_with_convs_last_keep_the_cnn_policy() -> None:
    assert default_target_layer(torchvision.models.resnet18()) == "layer4"
    assert default_target_layer(torchvision.models.vgg11()) == "features.19"
    # MobileViT: transformer blocks inside, convolutions after the last one -> the CNN policy, not a token layer
    mobilevit = timm.create_model("mobilevit_xxs")
    assert transformer_blocks(mobilevit) and token_model_default(mobilevit) is None
    assert default_target_layer(mobilevit) == "final_conv"


# --------------------------------------------------------------------------------------------------------
# why norm1: the last block's output gets no gradient on its patch tokens from a class-token head
# --------------------------------------------------------------------------------------------------------


def test_last_block_output_has_zero_patch_gradients_and_its_norm1_does_not() -> None:
    net = _register_vit()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    result = cnnlens.explain(net, x, methods=["gradcam"], layers=["blocks.1", "blocks.1.norm1"], targets=0)
    last, norm1 = result.get("gradcam", "blocks.1"), result.get("gradcam", "blocks.1.norm1")
    assert tuple(norm1.raw.shape[-2:]) == (4, 4)  # 5 prefix tokens dropped, 4x4 grid
    assert bool(last.degenerate.all())  # zero gradient on every patch token: an all-zero map
    assert not bool(norm1.degenerate.any()) and float(norm1.raw.abs().sum()) > 0
    assert "5 prefix tokens + 4x4 grid" in result.manifest["layouts"]["blocks.1.norm1"]


def test_default_explain_on_a_token_model_runs_without_layer_or_layout() -> None:
    net = _register_vit()
    result = cnnlens.explain(net, torch.randn(1, 3, 64, 64), methods=["gradcam", "layercam"])
    assert result.layers == ["blocks.1.norm1"]
    for exp in result:
        assert tuple(exp.raw.shape[-2:]) == (4, 4) and torch.isfinite(exp.raw).all()


# --------------------------------------------------------------------------------------------------------
# candidate layers: transformer-block roles, shapes in the map view with the layout named
# --------------------------------------------------------------------------------------------------------


def test_vit_candidates_list_both_norms_and_block_outputs_with_their_token_layout(
    models: dict[str, nn.Module],
) -> None:
    catalog = candidate_layers(models["vit_tiny"], (3, 224, 224))
    by_name = {c.name: c for c in catalog.layers}
    assert catalog.with_role("attention_norm") == [f"blocks.{i}.norm1" for i in range(12)]
    assert catalog.with_role("mlp_norm") == [f"blocks.{i}.norm2" for i in range(12)]
    assert catalog.with_role("block_output") == [f"blocks.{i}" for i in range(12)]
    assert catalog.first("final_spatial") == "blocks.11.norm1"
    for name in ("blocks.11.norm1", "blocks.11.norm2", "blocks.11"):
        layer = by_name[name]
        assert (layer.shape, layer.stride, layer.layout) == ((192, 14, 14), 16, "tokens:1:14x14")
    assert by_name["patch_embed.proj"].layout == "nchw"  # a conv stays as it is
    assert not any(c.name.startswith("blocks.11.attn.") for c in catalog.layers)  # attention internals: no role

    deit = {c.name: c for c in candidate_layers(models["deit_distilled"], (3, 224, 224)).layers}
    assert deit["blocks.11.norm1"].layout == "tokens:2:14x14"  # class + distillation token


def test_swin_candidates_are_channels_last_in_the_map_view(models: dict[str, nn.Module]) -> None:
    catalog = candidate_layers(models["swin_t"], (3, 224, 224))
    by_name = {c.name: c for c in catalog.layers}
    assert catalog.first("final_spatial") == "features.7.1.norm1"
    for name in ("features.7.1.norm1", "features.7.1.norm2"):
        assert (by_name[name].shape, by_name[name].stride, by_name[name].layout) == ((128, 7, 7), 32, "nhwc")
    assert {"attention_norm", "mlp_norm"} <= {r for c in catalog.layers for r in c.roles}
    # timm Swin runs its MLP norm on flattened tokens (B, h*w, C): no prefix, a 7x7 grid
    timm_swin = {c.name: c for c in candidate_layers(models["swin_tiny"], (3, 224, 224)).layers}
    assert timm_swin["layers.3.blocks.1.norm1"].layout == "nhwc"
    assert (timm_swin["layers.3.blocks.1.norm2"].layout, timm_swin["layers.3.blocks.1.norm2"].shape) == (
        "tokens:0:7x7",
        (768, 7, 7),
    )


def test_select_layers_keeps_the_last_n_of_each_per_block_role() -> None:
    catalog = candidate_layers(_register_vit(depth=3), (3, 64, 64))
    chosen = select_layers(catalog, ("attention_norm", "mlp_norm"), last_n=2)
    assert chosen == ["blocks.1.norm1", "blocks.1.norm2", "blocks.2.norm1", "blocks.2.norm2"]
    assert {c.layout for c in catalog.layers if c.name in chosen} == {"tokens:5:4x4"}


def test_cnn_candidates_are_unchanged_and_nchw() -> None:
    catalog = candidate_layers(torchvision.models.resnet18(), (3, 64, 64))
    assert catalog.first("final_spatial") == "layer4.1"
    assert catalog.with_role("attention_norm") == [] and {c.layout for c in catalog.layers} == {"nchw"}


def test_compare_layers_on_token_layers_measures_each() -> None:
    from cnnlens.studies import compare_layers

    net = _register_vit()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    study = compare_layers(net, x, methods=["gradcam"], roles=("attention_norm",), last_n=2, steps=2)
    assert [r.layer for r in study.rows] == ["blocks.0.norm1", "blocks.1.norm1"]
    assert all(r.shape == (32, 4, 4) and "attention_norm" in r.roles for r in study.rows)
    assert set(study.explanations.manifest["layouts"]) == {"blocks.0.norm1", "blocks.1.norm1"}


def test_the_documented_table_names_the_layers_the_policy_picks(models: dict[str, nn.Module]) -> None:
    from cnnlens.models.layers import FAMILY_DEFAULTS

    documented = " ".join(layer for _, layer, _ in FAMILY_DEFAULTS)
    for family in ("vit_tiny", "swin_tiny", "tv_vit", "swin_t"):
        block = transformer_blocks(models[family])[-1]
        last = block.name.rpartition(".")[2].rpartition("_")[2]  # "11", "1", "encoder_layer_11" -> "11"
        generic = default_target_layer(models[family]).replace(f".{last}.", ".<last>.").replace(f"_{last}.", "_<last>.")
        assert f"`{generic}`" in documented
    for family in ("convnext_timm", "convnext_tv"):
        assert f"`{default_target_layer(models[family])}`" in documented
