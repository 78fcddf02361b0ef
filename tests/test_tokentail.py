"""The class-token tail (:mod:`cnnlens.capture.tokentail`): same logits and gradients, and used only where it is safe."""

from __future__ import annotations

from typing import Any

import pytest
import torch

timm = pytest.importorskip("timm")

import cnnlens  # noqa: E402
from cnnlens import Execution  # noqa: E402
from cnnlens.capture import (  # noqa: E402
    capture,
    record,
    tokentail,
)
from cnnlens.errors import OptionError  # noqa: E402

VisionTransformer = timm.models.vision_transformer.VisionTransformer
FULL = Execution(token_tail=False)


def _vit(**kwargs: Any) -> torch.nn.Module:
    torch.manual_seed(0)
    config = {"img_size": 32, "patch_size": 8, "embed_dim": 24, "depth": 3, "num_heads": 3, "num_classes": 7}
    config.update(kwargs)
    return VisionTransformer(**config).eval()


def _deit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.models.deit.VisionTransformerDistilled(
        img_size=32, patch_size=8, embed_dim=24, depth=3, num_heads=3, num_classes=7
    ).eval()


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """Input shapes of every short-path call (so a test fails when the short path silently stops running)."""
    calls: list[tuple[int, ...]] = []

    def counting(real: Any) -> Any:
        def short(block: Any, x: torch.Tensor, rows: int) -> torch.Tensor:
            calls.append((*x.shape, rows))
            out: torch.Tensor = real(block, x, rows)
            return out

        return short

    monkeypatch.setattr(tokentail, "_short_block", counting(tokentail._short_block))
    monkeypatch.setattr(tokentail, "_short_encoder_block", counting(tokentail._short_encoder_block))
    return calls


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    scale = float(b.abs().max()) or 1.0
    assert float((a - b).abs().max()) <= rel * scale


@pytest.mark.parametrize(
    ("make", "rows"),
    [
        (_vit, 1),
        (lambda: _vit(reg_tokens=4, no_embed_class=True), 1),  # register tokens: the head still reads row 0
        (_deit, 2),  # DeiT distilled: the head reads rows 0 and 1
    ],
)
def test_same_logits_and_gradients(make: Any, rows: int, spy: list[tuple[int, ...]]) -> None:
    model = make()
    layer = "blocks.2.norm1"
    x = torch.randn(3, 3, 32, 32)
    short = record(model, x, [layer], top_k=2)
    assert spy and spy[-1][-1] == rows and spy[-1][0] == 3
    full = record(model, x, [layer], top_k=2, execution=FULL)
    assert len(spy) == 1  # the full run did not take the short path
    _close(short.logits, full.logits)
    _close(short.gradients[layer], full.gradients[layer])
    torch.testing.assert_close(short.activations[layer], full.activations[layer], rtol=0, atol=0)
    assert not tokentail._patched(model.blocks[2])


def test_unfused_attention_path(spy: list[tuple[int, ...]]) -> None:
    model = _vit()
    for block in model.blocks:
        block.attn.fused_attn = False
    x = torch.randn(2, 3, 32, 32)
    short = record(model, x, ["blocks.2.norm1", "blocks.0"], targets=[3, 5])
    full = record(model, x, ["blocks.2.norm1", "blocks.0"], targets=[3, 5], execution=FULL)
    assert len(spy) == 1
    for layer in ("blocks.2.norm1", "blocks.0"):
        _close(short.gradients[layer], full.gradients[layer])


def test_a_qkv_that_is_not_a_plain_linear_runs_through_the_module(spy: list[tuple[int, ...]]) -> None:
    model = _vit()
    model.blocks[2].attn.qkv = torch.nn.Sequential(model.blocks[2].attn.qkv)  # not nn.Linear: no weight split
    x = torch.randn(2, 3, 32, 32)
    short = record(model, x, ["blocks.2.norm1"], targets=[1, 2])
    full = record(model, x, ["blocks.2.norm1"], targets=[1, 2], execution=FULL)
    assert len(spy) == 1
    _close(short.logits, full.logits)
    _close(short.gradients["blocks.2.norm1"], full.gradients["blocks.2.norm1"])


def test_input_gradients_and_explain_maps_agree(spy: list[tuple[int, ...]]) -> None:
    model = _vit()
    x = torch.randn(2, 3, 32, 32)
    short = cnnlens.explain(model, x, methods=["gradcam", "saliency"], layers=["blocks.2.norm1"])
    full = cnnlens.explain(model, x, methods=["gradcam", "saliency"], layers=["blocks.2.norm1"], execution=FULL)
    assert len(spy) == 1
    for method in ("gradcam", "saliency"):
        _close(short[method, "blocks.2.norm1"].raw, full[method, "blocks.2.norm1"].raw, rel=1e-4)
    _close(short.logits, full.logits)


def test_default_layer_of_a_vit_takes_the_short_path(spy: list[tuple[int, ...]]) -> None:
    model = _vit()
    result = cnnlens.explain(model, torch.randn(1, 3, 32, 32))  # no layer: blocks[-1].norm1
    assert result.layers == ["blocks.2.norm1"]
    assert len(spy) == 1


@pytest.mark.parametrize(
    ("make", "layer"),
    [
        (lambda: _vit(global_pool="avg"), "blocks.2.norm1"),  # the head reads every token
        (_vit, "blocks.2.mlp.fc1"),  # a recorded layer inside the shortened block
        (_vit, "blocks.2"),
        (_vit, "norm"),
    ],
)
def test_not_used_where_other_rows_matter(make: Any, layer: str, spy: list[tuple[int, ...]]) -> None:
    model = make()
    x = torch.randn(2, 3, 32, 32)
    rec = record(model, x, [layer], gradients=True)
    assert spy == []
    full = model(x)
    _close(rec.logits, full.detach())


def test_a_hook_on_the_tail_sees_the_full_block(spy: list[tuple[int, ...]]) -> None:
    model = _vit()
    seen: list[tuple[int, ...]] = []
    handle = model.blocks[2].mlp.register_forward_hook(lambda m, a, out: seen.append(tuple(out.shape)))
    try:
        record(model, torch.randn(2, 3, 32, 32), ["blocks.2.norm1"])
    finally:
        handle.remove()
    assert spy == [] and seen == [(2, 17, 24)]
    record(model, torch.randn(2, 3, 32, 32), ["blocks.2.norm1"])  # hook gone: the short path again
    assert len(spy) == 1


def test_attention_methods_record_every_query_row(spy: list[tuple[int, ...]]) -> None:
    model = _vit()
    result = cnnlens.explain(model, torch.randn(1, 3, 32, 32), methods=["gradcam", "rollout"])
    assert spy == []  # the attention recorder hooks the last block: the model runs whole
    assert result["rollout", None].maps.shape[-2:] == (32, 32)


def test_restored_when_the_forward_raises() -> None:
    model = _vit()

    def boom(module: Any, args: Any, output: Any) -> None:
        raise RuntimeError("boom")

    with capture(model, ["blocks.2.norm1"]) as cap:
        handle = model.blocks[2].norm1.register_forward_hook(boom)
        try:
            with pytest.raises(RuntimeError, match="boom"):
                cap.run(torch.randn(1, 3, 32, 32))
        finally:
            handle.remove()
    assert not tokentail._patched(model.blocks[2])
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert model.blocks[2](model.blocks[1](torch.randn(1, 17, 24))).shape == (1, 17, 24)
        assert model(x).shape == (1, 7)


def test_execution_flag_is_checked() -> None:
    with pytest.raises(OptionError, match="token_tail"):
        Execution(token_tail="yes")  # type: ignore[arg-type]


def _torchvision_vit() -> torch.nn.Module:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.vision_transformer.VisionTransformer(
        image_size=32, patch_size=8, num_layers=3, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=5
    )
    torch.nn.init.normal_(model.heads.head.weight, std=0.5)  # torchvision starts the head at zero
    return model.eval()


def test_torchvision_vit_same_logits_and_gradients(spy: list[tuple[int, ...]]) -> None:
    model = _torchvision_vit()
    layer = "encoder.layers.encoder_layer_2.ln_1"
    x = torch.randn(3, 3, 32, 32)
    short = record(model, x, [layer, "encoder.layers.encoder_layer_0"], top_k=2)
    assert spy == [(3, 17, 16, 1)]
    full = record(model, x, [layer, "encoder.layers.encoder_layer_0"], top_k=2, execution=FULL)
    assert len(spy) == 1
    _close(short.logits, full.logits)
    for key in (layer, "encoder.layers.encoder_layer_0"):
        _close(short.gradients[key], full.gradients[key])
    assert not tokentail._patched(model.encoder.layers[2])
    result = cnnlens.explain(model, x)  # the default layer of a torchvision ViT is that ln_1
    assert result.layers == [layer] and len(spy) == 2


@pytest.mark.parametrize("layer", ["encoder.layers.encoder_layer_2.mlp", "encoder.ln", "encoder.layers"])
def test_torchvision_vit_tail_layers_run_the_whole_block(layer: str, spy: list[tuple[int, ...]]) -> None:
    model = _torchvision_vit()
    x = torch.randn(2, 3, 32, 32)
    rec = record(model, x, [layer])
    assert spy == []
    _close(rec.logits, model(x).detach())


def test_torchvision_vit_rollout_sees_every_query(spy: list[tuple[int, ...]]) -> None:
    model = _torchvision_vit()
    result = cnnlens.explain(model, torch.randn(1, 3, 32, 32), methods=["gradcam", "rollout"])
    assert spy == [] and result["rollout", None].maps.shape[-2:] == (32, 32)
