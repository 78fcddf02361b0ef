"""Forward views: filter weights, feature maps and activation maximisation (issue 4).

Exact oracles on hand-set convs and small nets; activation maximisation on the embedded model at a small size
with few steps; the model's hooks and state checked before and after; the CLI handlers on the embedded model.
"""

from __future__ import annotations

import argparse
import doctest
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tests.nets import GapHead, hook_count
from torch import nn

from cnnlens.capture import differentiable_capture, record
from cnnlens.errors import CnnlensError, LayerError, LayerNotFoundError, OptionError, TargetError
from cnnlens.explain import explain
from cnnlens.imaging import save_png
from cnnlens.models import LoadedModel, load_model
from cnnlens.views import (
    BatchRandom,
    channel,
    class_logit,
    feature_maps,
    filters,
    fourier,
    image_seed,
    l2,
    maximize,
    maximize_classes,
    neuron,
    optimize,
    parse_channels,
    standard_transforms,
    total_variation,
)
from cnnlens.views.objectives import ObjectiveInputs
from cnnlens.viz.grids import colorize_limits, mosaic
from cnnlens.viz.views import filter_figure, filter_mosaic, save_features, save_filters, save_maximized

# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _hook_count(model: nn.Module) -> int:
    return hook_count(model) + sum(len(m._backward_pre_hooks) for m in model.modules())


def _state(model: nn.Module) -> tuple[list[bool], list[bool], int]:
    return (
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
        _hook_count(model),
    )


def _conv(c_in: int, c_out: int, k: int, groups: int = 1) -> nn.Conv2d:
    conv = nn.Conv2d(c_in, c_out, k, groups=groups, bias=False)
    values = torch.arange(conv.weight.numel(), dtype=torch.float32)
    with torch.no_grad():
        conv.weight.copy_((torch.sin(values * 1.7) * (1 + values % 5)).view_as(conv.weight))
    return conv


class Counting(nn.Module):
    """Counts its forwards (no hooks)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out: torch.Tensor = self.inner(x)
        return out


@pytest.fixture(scope="module")
def lite() -> LoadedModel:
    return load_model("efficientnet_lite0")


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """One intra-op thread: on a shared 2-core machine (pytest -n 2) the optimisation loop's hundreds of small
    ops run several times faster without thread synchronisation; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------------
# filters
# --------------------------------------------------------------------------------------------------


def test_rgb_tile_k_shows_kernel_k() -> None:
    conv = _conv(3, 5, 3)
    fs = filters(nn.Sequential(conv), "0")
    assert fs.view == "rgb" and fs.indices == [0, 1, 2, 3, 4]
    w = conv.weight.detach()
    m = w.abs().max()
    assert torch.equal(fs.tiles, w)
    assert torch.allclose(fs.limits, m.expand(5))
    assert torch.allclose(fs.display(), 0.5 + w / (2 * m))
    # The pixel-exact mosaic: tile i at its position shows kernel indices[i], channel c as colour c.
    zoom = 3
    image = filter_mosaic(fs, zoom=zoom)
    _, positions = mosaic(np.zeros((5, 3, 3, 3)), zoom=zoom)
    for i, k in enumerate(fs.indices):
        r, c = positions[i]
        tile = image[r : r + 3 * zoom : zoom, c : c + 3 * zoom : zoom]
        expected = np.clip((0.5 + w[k].numpy() / (2 * float(m))) * 255 + 0.5, 0, 255).astype(np.uint8)
        assert np.array_equal(tile, expected.transpose(1, 2, 0)), k


def test_order_by_norm_selection_and_per_tile_scale() -> None:
    conv = _conv(3, 8, 3)
    w = conv.weight.detach()
    norms = w.flatten(1).norm(dim=1)
    fs = filters(nn.Sequential(conv), "0", order="norm", top_k=3, scale="per_tile")
    assert fs.indices == torch.argsort(norms, descending=True)[:3].tolist()
    assert torch.allclose(fs.norms, norms[fs.indices])
    peaks = w[fs.indices].abs().flatten(1).max(dim=1).values
    assert torch.allclose(fs.limits, peaks)
    assert float(fs.display().max()) <= 1.0 and float(fs.display().min()) >= 0.0
    assert all(label.startswith(f"#{k} ") for label, k in zip(fs.labels(), fs.indices, strict=True))
    picked = filters(nn.Sequential(conv), "0", channels="5,1-2")
    assert picked.indices == [5, 1, 2]


def test_mean_view_grouped_depthwise_slices_and_matrix(tmp_path: Path) -> None:
    grouped = _conv(6, 9, 3, groups=3)  # weight (9, 2, 3, 3): filter k sees inputs 2*(k//3), 2*(k//3)+1
    net = nn.Sequential(grouped, _conv(4, 8, 3, groups=4), nn.Conv2d(6, 4, 1))
    fs = filters(net, "0")
    assert fs.view == "mean" and fs.tiles.shape == (9, 3, 3)
    assert torch.allclose(fs.tiles, grouped.weight.detach().mean(dim=1))
    assert fs.input_channels[4] == [2, 3] and fs.input_channels[8] == [4, 5]
    sl = filters(net, "0", view="slices", channels=[7, 0])
    assert sl.tiles.shape == (2, 2, 3, 3)
    assert torch.equal(sl.tiles[0], grouped.weight.detach()[7])
    assert sl.input_channels == [[4, 5], [0, 1]]

    dw = filters(net, "1", scale="per_tile")  # depthwise with multiplier 2: (8, 1, 3, 3)
    assert dw.depthwise and dw.groups == 4
    assert torch.equal(dw.tiles, net[1].weight.detach()[:, 0])
    assert dw.input_channels[5] == [2]

    mx = filters(net, "2")
    assert mx.view == "matrix" and mx.tiles.shape == (4, 6)
    assert torch.equal(mx.tiles, net[2].weight.detach()[:, :, 0, 0])

    for f in (fs, sl, dw, mx):
        paths = save_filters(f, tmp_path, name=f"f_{f.view}_{f.layer}")
        assert paths["grid"].stat().st_size > 0
        fig = filter_figure(f)
        assert any(ax.get_label() == "<colorbar>" for ax in fig.axes)  # drawn with a colour bar

    with pytest.raises(LayerError, match="rgb"):
        filters(net, "0", view="rgb")
    with pytest.raises(LayerError, match="1x1"):
        filters(net, "0", view="matrix")
    with pytest.raises(LayerError, match=r"not an nn\.Conv2d"):
        filters(nn.Sequential(nn.Sequential(nn.Conv2d(3, 2, 3))), "0")
    with pytest.raises(LayerNotFoundError, match="Did you mean"):
        filters(net, "00")
    with pytest.raises(LayerError, match="out of range"):
        filters(net, "0", channels="3-12")


# --------------------------------------------------------------------------------------------------
# feature maps
# --------------------------------------------------------------------------------------------------


def test_feature_grid_values_equal_captured_activations(tmp_path: Path) -> None:
    torch.manual_seed(0)
    inner = GapHead(channels=6).eval()
    net = Counting(inner)
    x = torch.randn(3, 16, 16)
    fm = feature_maps(net, x, ["inner.body.2", "inner.body.4"], top_k=4)
    assert net.calls == 1  # several layers, one forward
    rec = record(net, x, ["inner.body.2", "inner.body.4"], gradients=False)
    for key in ("inner.body.2", "inner.body.4"):
        lf = fm[key]
        act = rec.activations[key][0]
        means = act.double().mean(dim=(1, 2))
        assert lf.indices == torch.argsort(means, descending=True, stable=True)[:4].tolist()
        assert torch.allclose(lf.values, means[lf.indices])
        assert torch.equal(lf.maps, act[lf.indices])
        assert torch.equal(lf.activation, act)
        # shared scale: one (vmin, vmax) for all maps of the layer, covering them
        assert bool((lf.limits == lf.limits[0]).all())
        assert float(lf.limits[0, 0]) <= float(lf.maps.min()) and float(lf.limits[0, 1]) >= float(lf.maps.max())
    paths = save_features(fm, tmp_path)
    key = "inner.body.4"
    lf = fm[key]
    k = lf.indices[0]
    png = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(paths[f"map:{key}:{k}"]).convert("RGB"))
    factor = png.shape[0] // lf.maps.shape[1]
    expected = colorize_limits(lf.maps[0].numpy(), float(lf.limits[0, 0]), float(lf.limits[0, 1]), "viridis")
    assert np.array_equal(png[::factor, ::factor], expected)
    assert "rows" in paths and paths["rows"].stat().st_size > 0
    per = feature_maps(net, x, "inner.body.4", top_k=None, scale="per_map", rank="index")
    assert per["inner.body.4"].indices == list(range(6))
    assert not bool((per["inner.body.4"].limits == per["inner.body.4"].limits[0]).all())


def test_gradcam_ranking_matches_the_gradcam_method() -> None:
    torch.manual_seed(1)
    net = GapHead(channels=6, classes=5).eval()
    x = torch.randn(1, 3, 16, 16)
    layer = "body.3"  # pre-ReLU conv: signed activations
    fm = feature_maps(net, x, layer, rank="gradcam", target=2, top_k=None)
    lf = fm[layer]
    assert fm.target_class == 2
    rec = record(net, x, layer, targets=2)
    weights = rec.gradients[layer][0, 0].double().mean(dim=(1, 2))  # Grad-CAM: w_k = mean_ij dS/dA
    assert torch.allclose(lf.all_values, weights)
    assert lf.indices == torch.argsort(weights, descending=True, stable=True).tolist()
    # The weights are the gradcam method's: sum_k w_k A_k is its raw map.
    raw = explain(net, x, methods="gradcam", layers=layer, targets=2)["gradcam", layer].raw[0, 0]
    ours = torch.einsum("k,khw->hw", lf.all_values, lf.activation.double())
    assert torch.allclose(ours.float(), raw, atol=1e-6)
    assert lf.signed and float(lf.limits[0, 0]) == -float(lf.limits[0, 1])
    top = feature_maps(net, x, layer, rank="gradcam", top_k=1)
    assert top.target_class == int(net(x).argmax())
    with pytest.raises(TargetError, match="rank='gradcam'"):
        feature_maps(net, x, layer, target=2)
    with pytest.raises(LayerError, match="not a feature map"):
        feature_maps(net, x, "fc")


# --------------------------------------------------------------------------------------------------
# differentiable capture
# --------------------------------------------------------------------------------------------------


def test_differentiable_capture_keeps_the_graph_and_the_model_state() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.Conv2d(4, 2, 3), nn.Flatten(), nn.LazyLinear(3))
    net(torch.zeros(1, 3, 8, 8))
    net.train()
    net[2].weight.requires_grad_(False)
    before = _state(net)
    theta = torch.randn(2, 3, 8, 8, requires_grad=True)
    with differentiable_capture(net, ["0", "2"]) as cap:
        rec = cap.run_graph(torch.sigmoid(theta))
        assert all(not m.training for m in net.modules())
    assert rec.logits is not None and rec.logits.requires_grad
    (g,) = torch.autograd.grad(rec.activations["0"][:, 1].mean() + rec.logits[:, 0].sum(), [theta], retain_graph=True)
    assert g.shape == theta.shape and bool(g.abs().sum() > 0)
    # even a caller's .backward() cannot reach the weights
    rec.activations["2"].sum().backward()
    assert all(p.grad is None for p in net.parameters())
    assert _state(net) == before
    calls = Counting(net)
    with differentiable_capture(calls, "inner.0", stop_early=True) as cap:
        early = cap.run_graph(torch.zeros(1, 3, 8, 8))
    assert early.logits is None and set(early.activations) == {"inner.0"}
    twice = _Twice()
    with pytest.raises(LayerError, match="ran 2 times"), differentiable_capture(twice, "conv") as cap:
        cap.run_graph(torch.zeros(1, 3, 8, 8))
    assert _hook_count(twice) == 0 and all(p.requires_grad for p in twice.parameters())


class _Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.conv(x)).mean(dim=(2, 3))


# --------------------------------------------------------------------------------------------------
# objectives, parameterisation, transforms
# --------------------------------------------------------------------------------------------------


def test_objective_algebra() -> None:
    act = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2)
    logits = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    image = torch.full((2, 3, 4, 4), 0.5)
    image[1, :, :, 2:] = 1.0
    inputs = ObjectiveInputs({"L": act}, logits, image)
    ch = channel("L", [2, 0])
    assert torch.allclose(ch(inputs), torch.stack([act[0, 2].mean(), act[1, 0].mean()]))
    assert torch.allclose(channel("L", 1)(inputs), act[:, 1].mean(dim=(1, 2)))
    assert torch.equal(neuron("L", [0, 1], 1, 0)(inputs), torch.stack([act[0, 0, 1, 0], act[1, 1, 1, 0]]))
    assert torch.equal(neuron("L", 2)(inputs), act[:, 2, 1, 1])
    assert torch.equal(class_logit([2, 0])(inputs), torch.tensor([3.0, 4.0]))
    tv = total_variation()(inputs)
    assert float(tv[0]) == 0.0 and float(tv[1]) > 0
    assert torch.allclose(l2()(inputs), (image - 0.5).pow(2).flatten(1).mean(1))
    combo = 2 * ch - 0.5 * total_variation() + class_logit(1) / 4 - l2()
    expected = 2 * ch(inputs) - 0.5 * tv + logits[:, 1] / 4 - l2()(inputs)
    assert torch.allclose(combo(inputs), expected)
    assert combo.needs_logits and combo.layers == frozenset({"L"})
    assert torch.allclose((-ch)(inputs), -ch(inputs))
    assert torch.allclose(sum([ch, class_logit(0)])(inputs), ch(inputs) + logits[:, 0])  # type: ignore[operator]
    assert "total variation" in combo.name
    with pytest.raises(TargetError, match="one per image"):
        channel("L", [0, 1, 2])(inputs)
    with pytest.raises(LayerError, match="out of range"):
        channel("L", 3)(inputs)
    with pytest.raises(LayerError, match="not recorded"):
        channel("M", 0)(inputs)


def test_per_image_randomness_does_not_depend_on_the_batch() -> None:
    size = (32, 32)
    gens = lambda keys: [torch.Generator().manual_seed(image_seed(7, k)) for k in keys]  # noqa: E731
    batch = fourier()(gens([3, 9, 4]), size, torch.device("cpu"))
    alone = fourier()(gens([9]), size, torch.device("cpu"))
    assert torch.equal(batch.parameters[0][1], alone.parameters[0][0])
    t = standard_transforms(32)
    images = torch.rand(3, 3, 32, 32)
    out = t(images, BatchRandom(gens([3, 9, 4])))
    one = t(images[1:2], BatchRandom(gens([9])))
    assert torch.allclose(out[1], one[0], atol=1e-6)
    img = fourier()(gens([1]), size, torch.device("cpu"))()
    img = img.detach()
    assert img.shape == (1, 3, 32, 32) and float(img.min()) > 0 and float(img.max()) < 1
    assert parse_channels("0-3,7,2") == [0, 1, 2, 3, 7]
    with pytest.raises(LayerError):
        parse_channels("3-1")


# --------------------------------------------------------------------------------------------------
# activation maximisation on the embedded model
# --------------------------------------------------------------------------------------------------

LAYER, CHANNELS, SIZE, STEPS = "blocks.2", [3, 11, 20, 33], 64, 16


@pytest.fixture(scope="module")
def maximized(lite: LoadedModel) -> tuple[Any, Any, Any]:
    module = lite.module
    module.blocks[1].train()  # a non-default state that must come back exactly
    module.conv_stem.weight.requires_grad_(False)
    before = _state(module)
    result = maximize(lite, LAYER, CHANNELS, steps=STEPS, size=SIZE, seed=0)
    after = _state(module)
    grads = [p.grad for p in module.parameters()]
    module.eval()
    module.conv_stem.weight.requires_grad_(True)
    return result, (before, after), grads


def _channel_means(lite: LoadedModel, images: torch.Tensor) -> torch.Tensor:
    prep = lite.spec.preprocessing
    x = (images - torch.tensor(prep.mean).view(1, 3, 1, 1)) / torch.tensor(prep.std).view(1, 3, 1, 1)
    act = record(lite.module, x, LAYER, gradients=False).activations[LAYER]
    return act.mean(dim=(2, 3))[:, CHANNELS]  # rows: images, columns: channels


def test_maximize_excites_each_channel_selectively(lite: LoadedModel, maximized: tuple[Any, Any, Any]) -> None:
    result, (before, after), grads = maximized
    assert result.images.shape == (4, 3, SIZE, SIZE) and result.keys == CHANNELS
    assert bool(torch.isfinite(result.images).all()) and float(result.images.min()) >= 0
    assert after == before  # training flags, requires_grad, hook count
    assert all(g is None for g in grads)
    gens = [torch.Generator().manual_seed(image_seed(0, c)) for c in CHANNELS]
    start = fourier()(gens, (SIZE, SIZE), torch.device("cpu"))().detach()
    s0 = _channel_means(lite, start).diagonal()
    final = _channel_means(lite, result.images)
    own = final.diagonal()
    assert torch.allclose(own, result.scores, atol=1e-3)
    assert bool((own > s0 + 5.0).all()), (own, s0)  # far above the start
    assert bool((own > 3.0 * s0.clamp(min=0.5)).all()), (own, s0)
    for i in range(len(CHANNELS)):  # selectivity: channel i likes its own image best
        others = torch.cat([final[:i, i], final[i + 1 :, i]])
        assert float(own[i]) > float(others.max()), (i, final)
    assert result.history.shape == (STEPS, 4) and bool(torch.isfinite(result.history).all())


def test_batched_run_equals_one_channel_run(lite: LoadedModel, maximized: tuple[Any, Any, Any]) -> None:
    result, _, _ = maximized
    # Channel c's image depends on (seed, c) only, never on the other images in its batch. Pixels are compared at
    # a fixed batch shape: the CPU picks convolution kernels by batch size, and Adam's per-element normalisation
    # turns their rounding differences (gradients at rounding level) into visible pixel differences, in float64
    # too. Same batch shape, other companions, channel 20 in another row: the same image.
    other = maximize(lite, LAYER, [1, CHANNELS[2], 25, 39], steps=STEPS, size=SIZE, seed=0)
    torch.testing.assert_close(other.images[1], result.images[2], rtol=0, atol=1e-6)
    torch.testing.assert_close(other.history[:, 1], result.history[:, 2], rtol=1e-6, atol=1e-6)
    first = maximize(lite, LAYER, [CHANNELS[2], 2, 5, 7], steps=1, size=SIZE, seed=0)
    torch.testing.assert_close(first.images[0], maximize(lite, LAYER, CHANNELS, steps=1, size=SIZE, seed=0).images[2])
    # Alone (another batch shape): the same optimisation, so it reaches the same objective up to that drift
    # (0.2% to 2% measured on different kernel sets) and its image is still the one that excites channel 20 most.
    single = maximize(lite, LAYER, [CHANNELS[2]], steps=STEPS, size=SIZE, seed=0)
    assert abs(float(single.scores[0]) - float(result.scores[2])) < 0.1 * abs(float(result.scores[2]))
    means = _channel_means(lite, torch.cat([single.images, result.images[[0, 1, 3]]]))[:, 2]
    assert float(means[0]) > float(means[1:].max()), means
    again = maximize(lite, LAYER, [CHANNELS[2]], steps=STEPS, size=SIZE, seed=0)
    assert torch.equal(again.images, single.images)  # deterministic on CPU for a seed


def test_maximize_failures_leave_no_hooks(lite: LoadedModel) -> None:
    module = lite.module
    before = _state(module)
    with pytest.raises(LayerError, match="out of range"):
        maximize(lite, "blocks.2", [0, 999], steps=1, size=32)
    with pytest.raises(LayerNotFoundError):
        maximize(lite, "blocks.22", [0], steps=1, size=32)
    with pytest.raises(OptionError, match="learning rate"):
        maximize(lite, "blocks.2", [0], steps=1, size=32, lr=-1.0)
    assert _state(module) == before
    assert all(p.grad is None for p in module.parameters())


def test_neuron_class_and_penalty_objectives_small_net(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = GapHead(channels=6, classes=5).eval()
    res = maximize(net, "body.4", "0-2", objective="neuron", extra=-0.1 * total_variation(), steps=6, size=24)
    assert res.images.shape == (3, 3, 24, 24) and "total variation" in res.objective
    assert res.history[-1].mean() > res.history[0].mean()
    cls = maximize_classes(net, [1, 4], steps=6, size=24, max_batch=1, transforms=None)
    assert cls.keys == [1, 4] and cls.history.shape == (6, 2)
    own = optimize(net, class_logit([1, 4]), [1, 4], steps=6, size=24, transforms=None)
    assert torch.allclose(own.images, cls.images, atol=1e-5)  # chunks of 1 == one batch of 2
    ticks: list[tuple[int, int]] = []
    maximize(net, "body.4", [0, 1], steps=3, size=24, max_batch=1, progress=lambda d, t: ticks.append((d, t)))
    assert ticks[-1] == (6, 6) and len(ticks) == 6
    threads = torch.get_num_threads()
    maximize(net, "body.4", [0], steps=1, size=24, threads=threads + 1)
    assert torch.get_num_threads() == threads  # restored
    paths = save_maximized(res, tmp_path)
    assert paths["grid"].exists() and paths["image:0"].exists()


# --------------------------------------------------------------------------------------------------
# seed architectures (random weights) and the demo section
# --------------------------------------------------------------------------------------------------


def test_views_on_resnet50_random_weights() -> None:
    lm = load_model("resnet50", random_weights=True)
    fs = filters(lm)
    assert fs.layer == "conv1" and fs.tiles.shape == (64, 3, 7, 7)
    fm = feature_maps(lm.module, torch.randn(3, 64, 64), ["layer1", "layer4"], rank="gradcam", top_k=4)
    assert fm["layer4"].maps.shape == (4, 2, 2)
    res = maximize(lm, "layer2", [0, 5], steps=2, size=48)
    assert res.images.shape == (2, 3, 48, 48)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "stem", "layer"),
    [
        ("vgg16", "features.0", "features.28"),
        ("inception_v3", "Conv2d_1a_3x3.conv", "Mixed_6a"),
        ("inception_resnet_v2", "conv2d_1a.conv", "mixed_6a"),
    ],
)
def test_views_on_seed_architectures(name: str, stem: str, layer: str) -> None:
    lm = load_model(name, random_weights=True)
    fs = filters(lm)
    assert fs.layer == stem and fs.view == "rgb"
    fm = feature_maps(lm.module, torch.randn(3, 96, 96), layer, top_k=4)
    assert len(fm[layer].indices) == 4
    res = maximize(lm, layer, [0, 1], steps=1, size=96)
    assert bool(torch.isfinite(res.images).all())


def test_demo_section(lite: LoadedModel, tmp_path: Path) -> None:
    from cnnlens.data import sample_image
    from cnnlens.report.demo import demo_section

    section = demo_section(lite, sample_image("chelsea"), tmp_path, steps=2, size=48, channels=2)
    assert section["title"] and "<p>" in section["intro"]
    kinds = [f["kind"] for f in section["figures"]]
    assert kinds.count("filters") == 1 and "features" in kinds and "maximize" in kinds
    for fig in section["figures"]:
        assert (tmp_path / fig["path"]).is_file() and not Path(fig["path"]).is_absolute()
        assert fig["caption"] and "<" not in fig["alt"]
    assert all((tmp_path / p).is_file() for p in section["files"].values())


# --------------------------------------------------------------------------------------------------
# CLI handlers
# --------------------------------------------------------------------------------------------------


def _cli(argv: list[str]) -> int:
    from cnnlens.cli.parser_more import add_views_commands
    from cnnlens.cli.views import VIEWS_COMMANDS

    parser = argparse.ArgumentParser(prog="cnnlens")
    sub = parser.add_subparsers(dest="command", required=True)
    add_views_commands(sub)
    args = parser.parse_args(argv)
    try:
        return VIEWS_COMMANDS[args.command](args)
    except CnnlensError:
        return 2


def test_cli_commands(
    lite: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import cnnlens.cli.common

    monkeypatch.setattr(cnnlens.cli.common, "load_model", lambda *a, **k: lite)
    assert _cli(["filters", "--out", str(tmp_path / "f"), "--order", "norm", "--top-k", "8"]) == 0
    doc = json.loads((tmp_path / "f" / "filters.json").read_text())
    assert doc["layer"] == "conv_stem" and len(doc["filters"]) == 8
    assert (tmp_path / "f" / "filters_conv_stem.png").is_file()

    photo = tmp_path / "cat.png"
    from cnnlens.data import sample_image

    save_png(photo, sample_image("chelsea"))
    argv = "features {} --layer bn1 blocks.3 --rank gradcam --class 281 --top-k 4 --out {}"
    code = _cli(argv.format(photo, tmp_path / "fe").split())
    assert code == 0
    doc = json.loads((tmp_path / "fe" / "features.json").read_text())
    assert doc["images"]["cat"]["target_class"] == 281
    assert (tmp_path / "fe" / "features_rows.png").is_file()
    assert len(list((tmp_path / "fe" / "features_blocks.3").glob("c*.png"))) == 4

    argv = "maximize --layer blocks.1 --channels 0-1 --steps 2 --size 32 --tv 0.1 --out {}"
    code = _cli(argv.format(tmp_path / "mx").split())
    assert code == 0
    out = capsys.readouterr().out
    assert "maximize_blocks.1.png" in out
    assert (tmp_path / "mx" / "maximize_blocks.1" / "1.png").is_file()
    assert _cli(["maximize", "--out", str(tmp_path / "bad")]) == 2  # no --layer: a clear usage error
    assert _cli(["features", str(photo), "--class", "3", "--out", str(tmp_path / "bad")]) == 2


def test_docstring_examples() -> None:
    import importlib

    names = ["_common", "features", "filters", "maximize", "objectives", "parameterization", "transforms"]
    modules = [importlib.import_module(f"cnnlens.views.{n}") for n in names]
    modules.append(importlib.import_module("cnnlens.viz.grids"))
    modules.append(importlib.import_module("cnnlens.capture"))  # differentiable_capture's example
    for module in modules:
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0, module.__name__
