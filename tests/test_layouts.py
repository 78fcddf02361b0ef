"""Layer layouts (issue 11): token and channels-last outputs mapped to (B, C, h, w) in capture.

Exact oracles: a tiny CNN and its twins that carry the same numbers as tokens (with 0, 1 or 2 prefix tokens,
on a non-square 3x5 grid) or channels-last must give the same maps for every layer-scope method (float64,
1e-6). Then the detection on real architectures (timm ViT/DeiT/register ViT/Swin/ConvNeXt, torchvision ViT and
Swin; random weights, one forward each).
"""

from __future__ import annotations

import pytest
import torch
import torch.fx
from torch import nn

from cnnlens import explain
from cnnlens.capture import (
    Layout,
    capture,
    differentiable_capture,
    infer_layout,
    parse_layout,
    record,
    replay_path,
    token_geometry,
)
from cnnlens.errors import LayerError, LayoutError, OptionError
from cnnlens.methods import iter_methods

H, W, C, K = 6, 10, 4, 3  # input 6x10, patch 2 -> grid 3x5, C channels, K classes


class PatchEmbed(nn.Module):
    """A conv patch embedding that says its patch size (as timm's does)."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.proj = conv
        self.patch_size = (2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _conv(seed: int = 0) -> nn.Conv2d:
    torch.manual_seed(seed)
    conv = nn.Conv2d(3, C, kernel_size=2, stride=2).double()
    return conv


def _head(seed: int = 1) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(C, K).double()


class Cnn(nn.Module):
    """conv (patch 2) -> ReLU ("act") -> GAP -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(_conv())
        self.act = nn.ReLU()
        self.fc = _head()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.patch_embed(x)).mean(dim=(2, 3)))


class TokenTwin(nn.Module):
    """The same numbers as tokens: (B, P + 15, C); the head pools grid tokens only (prefix tokens do not count).

    The prefix tokens depend on the sample (a learned token plus the mean of the grid), so a replay that put
    back the wrong sample's prefix rows would be seen where the head uses them (``use_prefix``).
    """

    def __init__(self, prefix: int, *, say_geometry: bool = True, use_prefix: bool = False) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(_conv())
        if say_geometry:
            self.num_prefix_tokens = prefix
        self.prefix = prefix
        torch.manual_seed(2)
        self.tokens = nn.Parameter(torch.randn(1, max(prefix, 1), C, dtype=torch.float64))
        self.act = nn.ReLU()
        self.fc = _head()
        self.use_prefix = use_prefix
        torch.manual_seed(3)
        self.prefix_fc = nn.Linear(C, K).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, 15, C), row-major
        b = grid.shape[0]
        if self.prefix:
            pre = self.tokens[:, : self.prefix].expand(b, -1, -1) + grid.mean(1, keepdim=True)
            grid = torch.cat([pre, grid], dim=1)
        t = self.act(grid)
        out = self.fc(t[:, self.prefix :].mean(1))
        if self.use_prefix and self.prefix:
            out = out + self.prefix_fc(t[:, : self.prefix].mean(1))
        return out


class NhwcTwin(nn.Module):
    """The same numbers channels-last: (B, 3, 5, C)."""

    def __init__(self) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(_conv())
        self.act = nn.ReLU()
        self.fc = _head()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.patch_embed(x).permute(0, 2, 3, 1)).mean(dim=(1, 2)))


class Untraceable(TokenTwin):
    """A token twin torch.fx cannot trace (data-dependent branch): replays take the hook path."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x.sum()) > float("inf"):  # never true; fx cannot trace it
            return x
        return super().forward(x)


def _flagged(out: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
    return out if attn_mask is None and not is_causal else out * 0


torch.fx.wrap("_flagged")  # one call in the traced graph, its flag arguments saved from the head


class WithFlags(TokenTwin):
    """A forward with optional arguments (as timm's ViT: ``attn_mask=None``): the fx tail receives them."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        return _flagged(super().forward(x), attn_mask, is_causal)


def _x(batch: int = 2, seed: int = 5) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(batch, 3, H, W, dtype=torch.float64)


LAYER_METHODS = sorted(spec.id for spec in iter_methods() if spec.scope == "layer")


def _raw(model: nn.Module, method: str, **kw: object) -> torch.Tensor:
    torch.manual_seed(11)  # methods that draw noise draw the same for both twins
    result = explain(model, _x(), methods=method, layers=["act"], targets=[0, 2], **kw)  # type: ignore[arg-type]
    return result[method, "act"].raw


# -- the twins: exact oracles -------------------------------------------------------------------------------


@pytest.mark.parametrize("method", LAYER_METHODS)
@pytest.mark.parametrize("prefix", [0, 1, 2])
def test_every_layer_method_on_tokens_equals_the_cnn_twin(method: str, prefix: int) -> None:
    expected = _raw(Cnn(), method)
    got = _raw(TokenTwin(prefix), method)
    assert got.shape == expected.shape and tuple(got.shape[-2:]) in ((3, 5), (H, W))  # guided Grad-CAM: input size
    assert torch.allclose(got.double(), expected.double(), atol=1e-6, rtol=1e-6), (method, prefix)
    assert float(expected.abs().max()) > 0  # the oracle is not trivially zero


@pytest.mark.parametrize("method", LAYER_METHODS)
def test_every_layer_method_on_channels_last_equals_the_cnn_twin(method: str) -> None:
    expected = _raw(Cnn(), method)
    got = _raw(NhwcTwin(), method)
    assert torch.allclose(got.double(), expected.double(), atol=1e-6, rtol=1e-6), method


def test_recording_maps_activations_and_gradients_and_keeps_the_prefix_rows() -> None:
    x = _x()
    cnn = record(Cnn(), x, "act", targets=[1, 0])
    tok_model = TokenTwin(2)
    tok = record(tok_model, x, "act", targets=[1, 0])
    assert tok.layouts["act"] == Layout("tokens", prefix=2, grid=(3, 5), source=tok.layouts["act"].source)
    assert "num_prefix_tokens=2" in tok.layouts["act"].source
    assert torch.equal(tok.activations["act"], cnn.activations["act"])
    assert tok.activations["act"].is_contiguous()
    assert tok.gradients["act"].shape == (1, 2, C, 3, 5)
    assert torch.allclose(tok.gradients["act"], cnn.gradients["act"], atol=1e-12)
    with torch.no_grad():
        grid = tok_model.patch_embed(x).flatten(2).transpose(1, 2)
        pre = torch.relu(tok_model.tokens[:, :2] + grid.mean(1, keepdim=True))
    assert torch.allclose(tok.prefix_tokens["act"], pre)
    assert cnn.layouts["act"].kind == "nchw" and cnn.prefix_tokens == {}
    nhwc = record(NhwcTwin(), x, "act", targets=1)
    assert nhwc.layouts["act"].kind == "nhwc"
    assert torch.equal(nhwc.activations["act"], cnn.activations["act"])


@pytest.mark.parametrize("model_cls", [TokenTwin, WithFlags, Untraceable])
def test_replay_puts_back_each_samples_own_prefix_tokens(model_cls: type[TokenTwin]) -> None:
    model = model_cls(2, use_prefix=True)
    x = _x(3)
    with capture(model, "act") as cap:
        rec = cap.run(x, gradients=False)
        index = torch.tensor([2, 0, 1, 2])
        rows = rec.activations["act"][index]
        out = cap.replay("act", rows, index, inputs=x)
        zeroed = cap.replay("act", torch.zeros_like(rows[:1]), [1], inputs=x)
        path = replay_path(cap, "act")[0]
    assert path == ("hooks" if model_cls is Untraceable else "fx")
    assert torch.allclose(out, rec.logits[index], atol=1e-10)
    # zero grid tokens: the grid head gives its bias, the prefix head still sees sample 1's own prefix tokens
    expected = model.fc.bias + model.prefix_fc(rec.prefix_tokens["act"][1].mean(0))
    assert torch.allclose(zeroed[0], expected, atol=1e-10)


def test_differentiable_capture_gives_map_view_activations() -> None:
    theta = torch.zeros(1, 3, H, W, dtype=torch.float64, requires_grad=True)
    with differentiable_capture(TokenTwin(1), "act") as cap:
        rec = cap.run_graph(theta + _x(1))
    act = rec.activations["act"]
    assert act.shape == (1, C, 3, 5)
    (g,) = torch.autograd.grad(act.sum(), [theta])
    assert g.shape == theta.shape and float(g.abs().sum()) > 0


# -- detection, overrides, errors ---------------------------------------------------------------------------


def test_an_unknown_token_model_gets_a_named_guess() -> None:
    rec = record(TokenTwin(1, say_geometry=False), _x(), "act", gradients=False)
    layout = rec.layouts["act"]
    assert (layout.prefix, layout.grid) == (1, (3, 5))
    assert layout.source.startswith("guess")


def test_a_grid_that_does_not_match_raises_naming_what_was_inferred() -> None:
    model = TokenTwin(2)
    model.num_prefix_tokens = 1  # the model claims one prefix token but has two
    with pytest.raises(LayoutError) as err:
        record(model, _x(), "act", gradients=False)
    text = str(err.value)
    assert "N=17" in text and "1 prefix" in text and "3x5" in text and "tokens:P:HxW" in text
    assert isinstance(err.value, LayerError)
    with pytest.raises(LayoutError, match=r"2 prefix token\(s\) and a 3x4 grid"):
        record(TokenTwin(2), _x(), "act", gradients=False, layout="tokens:2:3x4")


def test_an_explicit_layout_wins_and_is_checked() -> None:
    x = _x()
    rec = record(TokenTwin(2, say_geometry=False), x, "act", gradients=False, layout={"act": "tokens:2:3x5"})
    assert rec.layouts["act"].source == "explicit"
    assert torch.equal(rec.activations["act"], record(Cnn(), x, "act", gradients=False).activations["act"])
    # "tokens:P": the grid is inferred with the given prefix
    rec = record(TokenTwin(2), x, "act", gradients=False, layout="tokens:2")
    assert rec.layouts["act"].grid == (3, 5)
    # an unknown model: the grid for the given prefix is guessed, or refused naming the counts
    rec = record(TokenTwin(2, say_geometry=False), x, "act", gradients=False, layout="tokens:2")
    assert rec.layouts["act"].grid == (3, 5) and "guessed" in rec.layouts["act"].source
    with pytest.raises(LayoutError, match="N=17 tokens; with 3 prefix"):
        record(TokenTwin(2, say_geometry=False), x, "act", gradients=False, layout="tokens:3")
    # an override that reads a channels-last output as nchw is obeyed (no mapping)
    rec = record(NhwcTwin(), x, "act", gradients=False, layout="nchw")
    assert rec.layouts["act"].kind == "nchw" and rec.activations["act"].shape == (2, 3, 5, C)
    with pytest.raises(LayoutError, match="rank"):
        record(Cnn(), x, "act", gradients=False, layout="tokens:0:3x5")


@pytest.mark.parametrize("spec", ["tokens:x", "nhcw", "tokens:1:3x", "tokens:1:0x5", 5])
def test_bad_layout_specs_are_refused_before_anything_runs(spec: object) -> None:
    model = Cnn()
    with pytest.raises(OptionError):
        capture(model, "act", layout=spec)  # type: ignore[arg-type]


def test_a_layout_for_a_layer_not_captured_is_refused() -> None:
    with pytest.raises(OptionError, match="not captured"):
        capture(Cnn(), "act", layout={"fc": "nchw"})


def test_parse_layout_round_trips_and_describes() -> None:
    for text in ("nchw", "nhwc", "ncdhw", "tokens:0", "tokens:2:14x20"):
        layout = parse_layout(text)
        assert layout is not None and layout.spec() == text
    assert parse_layout(None) is None and parse_layout("auto") is None
    assert parse_layout("tokens:1:14x14").describe() == "tokens: 1 prefix token + 14x14 grid (explicit)"  # type: ignore[union-attr]
    raw = torch.randn(2, 1 + 6, 4)
    lay = Layout("tokens", prefix=1, grid=(2, 3))
    assert torch.equal(lay.from_maps(lay.to_maps(raw), raw), raw)
    assert torch.equal(lay.to_maps(raw)[:, :, 1, 2], raw[:, 1 + 5])  # row-major: token 5 is (1, 2)
    assert Layout("tokens", prefix=1, grid=[2, 3]).grid == (2, 3)  # type: ignore[arg-type]
    with pytest.raises(OptionError):
        Layout("nhwc", prefix=1)
    with pytest.raises(OptionError):
        Layout("tokens", grid=(0, 3))
    with pytest.raises(LayoutError, match="prefix rows"):
        lay.from_maps(lay.to_maps(raw), None)


def test_volumes_and_flat_outputs() -> None:
    out = torch.zeros(1, 2, 3, 4, 5)
    assert infer_layout(nn.Identity(), nn.Identity(), out, (1, 1, 3, 8, 10), None).kind == "ncdhw"
    net = nn.Sequential(nn.Conv2d(3, 2, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 3))
    rec = record(net, torch.randn(1, 3, 4, 4), ["2", "3"], gradients=False)
    assert rec.layouts == {} and rec.activations["2"].shape == (1, 2)


def test_token_geometry_never_uses_sqrt_n() -> None:
    # 1 + 3x5 tokens at 48x80: sqrt(16) = 4 would be a 4x4 grid; the stride-16 grid is 3x5 after one prefix token
    assert token_geometry(nn.Identity(), (48, 80), 16)[:2] == (1, (3, 5))
    # 34 tokens at 64x64: no P in 0..8 leaves a square grid
    with pytest.raises(LayoutError, match="N=34"):
        token_geometry(nn.Identity(), (64, 64), 34)


# -- real architectures (random weights, one forward each) -------------------------------------------------


def _check_explain(model: nn.Module, size: tuple[int, int], layer: str | None) -> dict[str, str]:
    torch.manual_seed(0)
    result = explain(model, torch.randn(1, 3, *size), methods="gradcam", layers=None if layer is None else [layer])
    (expl,) = list(result)
    assert expl.maps.shape == (1, 1, *size)
    assert bool(torch.isfinite(expl.raw).all()) and float(expl.raw.std()) > 0
    layouts: dict[str, str] = result.manifest.get("layouts", {})
    return layouts


@pytest.mark.parametrize(
    ("kwargs", "size", "prefix", "grid"),
    [
        ({}, (224, 224), 1, (14, 14)),
        ({"img_size": 384}, (384, 384), 1, (24, 24)),
        ({"dynamic_img_size": True}, (224, 320), 1, (14, 20)),
    ],
)
def test_timm_vit_at_several_sizes(
    kwargs: dict[str, object], size: tuple[int, int], prefix: int, grid: tuple[int, int]
) -> None:
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs).eval()
    layouts = _check_explain(model, size, "blocks.11.norm1")
    assert layouts["blocks.11.norm1"].startswith(f"tokens: {prefix} prefix token + {grid[0]}x{grid[1]} grid")


def test_timm_vit_patch_embedding_has_no_prefix_tokens_yet() -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64).eval()
    rec = record(model, torch.randn(1, 3, 64, 64), ["patch_embed", "blocks.0"], targets=0)
    assert (rec.layouts["patch_embed"].prefix, rec.layouts["patch_embed"].grid) == (0, (4, 4))
    assert (rec.layouts["blocks.0"].prefix, rec.layouts["blocks.0"].grid) == (1, (4, 4))
    assert rec.gradients["patch_embed"].shape == (1, 1, 192, 4, 4)


def test_timm_deit_distilled_has_two_prefix_tokens() -> None:
    timm = pytest.importorskip("timm")
    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False).eval()
    layouts = _check_explain(model, (224, 224), "blocks.11.norm1")
    assert layouts["blocks.11.norm1"].startswith("tokens: 2 prefix tokens + 14x14 grid")


def test_timm_vit_with_register_tokens() -> None:
    pytest.importorskip("timm")
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2, reg_tokens=4).eval()
    layouts = _check_explain(model, (64, 64), "blocks.0.norm1")
    assert layouts["blocks.0.norm1"].startswith("tokens: 5 prefix tokens + 4x4 grid")


def test_timm_swin_is_channels_last_and_its_default_layer_works() -> None:
    timm = pytest.importorskip("timm")
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False).eval()
    layouts = _check_explain(model, (224, 224), None)
    assert next(iter(layouts.values())).startswith("nhwc")


def test_swin_window_attention_is_refused_not_mapped_per_window() -> None:
    timm = pytest.importorskip("timm")
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False).eval()
    with pytest.raises(LayoutError, match=r"outputs 64 rows .* for a batch of 1 input"):
        record(model, torch.randn(1, 3, 224, 224), "layers.0.blocks.0.attn", gradients=False)


def test_timm_convnext_inner_norm_is_channels_last_and_blocks_are_not() -> None:
    timm = pytest.importorskip("timm")
    model = timm.create_model("convnext_tiny", pretrained=False).eval()
    rec = record(model, torch.randn(1, 3, 64, 64), ["stages.3.blocks.2.norm", "stages.3"], targets=0)
    assert rec.layouts["stages.3.blocks.2.norm"].kind == "nhwc"
    assert rec.layouts["stages.3"].kind == "nchw"
    assert rec.activations["stages.3.blocks.2.norm"].shape == (1, 768, 2, 2)


def test_torchvision_vit_and_swin() -> None:
    torchvision = pytest.importorskip("torchvision")
    vit = torchvision.models.vit_b_16(weights=None).eval()
    rec = record(vit, torch.randn(1, 3, 224, 224), "encoder.layers.encoder_layer_10.ln_1", targets=0)
    layout = rec.layouts["encoder.layers.encoder_layer_10.ln_1"]
    assert (layout.kind, layout.prefix, layout.grid) == ("tokens", 1, (14, 14))
    assert "torchvision class token" in layout.source
    swin = torchvision.models.swin_t(weights=None).eval()
    layouts = _check_explain(swin, (224, 224), "features.7.1.norm1")
    assert layouts["features.7.1.norm1"].startswith("nhwc")
