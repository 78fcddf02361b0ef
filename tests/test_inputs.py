"""Models with several inputs (issue 11): captum agreement, keyword inputs, replays, extra arguments, errors."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from captum.attr import IntegratedGradients, LayerGradCam, Saliency
from torch import nn

import cnnlens
from cnnlens.capture import capture, record, replay_path
from cnnlens.errors import InputShapeError
from cnnlens.execution import Execution
from cnnlens.inputs import ModelInputs, as_model_inputs

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:captum.*")


class RgbDepth(nn.Module):
    """Two conv branches (RGB, depth) fused by concatenation, then a fused conv, GAP and a linear head."""

    def __init__(self, traceable: bool = True) -> None:
        super().__init__()
        self.rgb = nn.Conv2d(3, 4, 3, padding=1)
        self.depth = nn.Conv2d(1, 2, 3, padding=1)
        self.fuse = nn.Conv2d(6, 5, 3, padding=1)
        self.relu = nn.ReLU()
        self.head = nn.Linear(5, 4)
        self.traceable = traceable

    def forward(self, rgb: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
        if not self.traceable and bool(rgb.sum() > -1e30):  # data-dependent branch: torch.fx cannot trace it
            rgb = rgb * 1.0
        h = torch.cat([self.relu(self.rgb(rgb)), self.relu(self.depth(depth))], dim=1)
        return self.head(self.relu(self.fuse(h)).mean(dim=(2, 3)))


class Scaled(nn.Module):
    """One explained input and extra arguments: a per-sample gain (B,) and a constant offset."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, gain: torch.Tensor, offset: float = 0.0) -> torch.Tensor:
        h = torch.tanh(self.conv(x * gain.view(-1, 1, 1, 1)))
        return self.head(h.mean(dim=(2, 3))) + offset


def _net(traceable: bool = True) -> RgbDepth:
    torch.manual_seed(0)
    return RgbDepth(traceable).double().eval()


def _data(batch: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, 8, 8, generator=gen, dtype=torch.float64)
    d = torch.rand(batch, 1, 8, 8, generator=gen, dtype=torch.float64)
    return x, d


TARGETS = [1, 3, 0]


def test_gradcam_equals_captum_layergradcam_with_additional_forward_args() -> None:
    net, (x, d) = _net(), _data()
    ref = LayerGradCam(net, net.fuse).attribute(x, target=TARGETS, additional_forward_args=(d,))
    assert ref.abs().max() > 1e-4
    for inputs, extra in (((x, d), None), (x, (d,))):
        got = cnnlens.explain(net, inputs, layers=["fuse"], targets=TARGETS, additional_forward_args=extra)
        torch.testing.assert_close(got["gradcam", "fuse"].raw[:, 0], ref[:, 0], rtol=1e-9, atol=1e-12)


def test_saliency_per_input_equals_captum_saliency_with_a_tuple() -> None:
    net, (x, d) = _net(), _data()
    ref_x, ref_d = Saliency(net).attribute((x, d), target=TARGETS, abs=False)
    res = cnnlens.explain(net, (x, d), methods=["saliency", "input_x_gradient"], layers=["fuse"], targets=TARGETS)
    assert {e.layer for e in res} == {"input:0", "input:1"}
    torch.testing.assert_close(res["saliency", "input:0"].raw[:, 0], ref_x.sum(1), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(res["saliency", "input:1"].raw[:, 0], ref_d.sum(1), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(res["input_x_gradient", "input:1"].raw[:, 0], (d * ref_d).sum(1))
    # each map has its own input's picture (the depth image is stretched on its own)
    assert res["saliency", "input:1"].images.shape == (3, 8, 8, 3)


def test_integrated_gradients_per_input_path_equals_captum_per_input() -> None:
    net, (x, d) = _net(), _data()
    base_x = torch.full((1, 3, 8, 8), 0.25, dtype=torch.float64)

    def depth_first(dd: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
        return net(xx, dd)

    ref_x, delta_x = IntegratedGradients(net).attribute(
        x, baselines=base_x, target=TARGETS, additional_forward_args=(d,), n_steps=12, return_convergence_delta=True
    )
    ref_d = IntegratedGradients(depth_first).attribute(
        d, baselines=0.0, target=TARGETS, additional_forward_args=(x,), n_steps=12
    )
    res = cnnlens.explain(
        net,
        (x, d),
        methods=["integrated_gradients"],
        layers=["fuse"],
        targets=TARGETS,
        options={"integrated_gradients": {"steps": 12, "baseline": {"0": base_x, "1": 0.0}}},
        execution=Execution(chunk_size=5),  # chunks cut through samples: the held input must follow the rows
    )
    got_x, got_d = res["integrated_gradients", "input:0"], res["integrated_gradients", "input:1"]
    torch.testing.assert_close(got_x.raw[:, 0], ref_x.sum(1), rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(got_d.raw[:, 0], ref_d.sum(1), rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(got_x.extras["convergence_delta"][:, 0], delta_x, rtol=1e-5, atol=1e-9)
    # the two paths are different: the depth map is not the RGB map's shadow
    assert not torch.allclose(got_d.raw[:, 0], ref_x.sum(1)[:, :, :])


def test_keyword_inputs_give_the_same_maps_as_positional() -> None:
    net, (x, d) = _net(), _data()
    methods = ["gradcam", "saliency", "guided_backprop", "integrated_gradients"]
    opts = {"integrated_gradients": {"steps": 4}}
    pos = cnnlens.explain(net, (x, d), methods=methods, layers=["fuse"], targets=TARGETS, options=opts)
    kw = cnnlens.explain(net, {"rgb": x, "depth": d}, methods=methods, layers=["fuse"], targets=TARGETS, options=opts)
    assert {e.layer for e in kw} == {"fuse", "input:rgb", "input:depth"}
    torch.testing.assert_close(kw["gradcam", "fuse"].raw, pos["gradcam", "fuse"].raw)
    for method in methods[1:]:
        torch.testing.assert_close(kw[method, "input:rgb"].raw, pos[method, "input:0"].raw)
        torch.testing.assert_close(kw[method, "input:depth"].raw, pos[method, "input:1"].raw)


def test_smoothgrad_noises_one_input_and_holds_the_other() -> None:
    net, (x, d) = _net(), _data(2)
    res = cnnlens.explain(
        net,
        (x, d),
        methods=["smoothgrad"],
        layers=["fuse"],
        targets=[0, 2],
        options={"smoothgrad": {"n": 3, "sigma": 0.2}},
    )
    # the RGB map equals SmoothGrad of the one-input function x -> net(x, d) (depth held), same noise
    with_depth = _Held(net, d)
    single = cnnlens.explain(
        with_depth,
        x,
        methods=["smoothgrad"],
        layers=["inner.fuse"],
        targets=[0, 2],
        options={"smoothgrad": {"n": 3, "sigma": 0.2}},
        execution=Execution(chunk_size=2),
    )  # one copy of the batch per pass: depth rows align
    torch.testing.assert_close(res["smoothgrad", "input:0"].raw, single["smoothgrad", "inner.fuse"].raw)
    assert res["smoothgrad", "input:1"].raw.abs().max() > 0


class _Held(nn.Module):
    """``x -> inner(x, depth)`` with the depth batch fixed (for batch-aligned one-input oracles)."""

    def __init__(self, inner: nn.Module, depth: torch.Tensor) -> None:
        super().__init__()
        self.inner = inner
        self.register_buffer("depth", depth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        depth = self.depth.expand(x.shape[0], -1, -1, -1) if self.depth.shape[0] == 1 else self.depth
        return self.inner(x, depth)


@pytest.mark.parametrize("traceable", [True, False])
@pytest.mark.parametrize("method", ["ablationcam", "scorecam"])
def test_replays_on_two_inputs_index_every_input_by_sample(method: str, traceable: bool) -> None:
    net, (x, d) = _net(traceable), _data()
    res = cnnlens.explain(net, (x, d), methods=[method], layers=["fuse"], targets=TARGETS)[method, "fuse"]
    with capture(net, "fuse") as cap:
        cap.run((x, d), gradients=False)
        path, _ = replay_path(cap, "fuse")
    if method == "ablationcam":
        assert path == ("fx" if traceable else "hooks")
    for b in range(3):  # oracle: the one-input model with sample b's depth held, one sample at a time
        one = cnnlens.explain(
            _Held(net, d[b : b + 1]), x[b : b + 1], methods=[method], layers=["inner.fuse"], targets=TARGETS[b]
        )[method, "inner.fuse"]
        torch.testing.assert_close(res.raw[b], one.raw[0], rtol=1e-7, atol=1e-10)


def test_capture_replay_takes_several_inputs() -> None:
    net, (x, d) = _net(), _data()
    rec = record(net, (x, d), "fuse", targets=TARGETS, input_gradients=True)
    assert isinstance(rec.model_inputs, ModelInputs) and rec.model_inputs.names == ("0", "1")
    assert torch.equal(rec.inputs, x)
    assert set(rec.input_gradients_by_input) == {"0", "1"}
    assert rec.input_gradients is not None
    torch.testing.assert_close(rec.input_gradients, rec.input_gradients_by_input["0"])
    assert rec.input_gradients_by_input["1"].shape == (1, 3, 1, 8, 8)
    zeros = torch.zeros_like(rec.activations["fuse"][[2, 0]])
    with capture(net, "fuse") as cap:
        out = cap.replay("fuse", zeros, [2, 0], inputs=rec.model_inputs)
    expected = net.head(torch.zeros(2, 5, dtype=torch.float64))
    torch.testing.assert_close(out, expected)


def test_a_lone_tensor_gets_no_wrapper() -> None:
    net = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten(), nn.Linear(72, 2))
    rec = record(net, torch.randn(1, 3, 8, 8), "0", input_gradients=True)
    assert rec.model_inputs is None and rec.input_gradients_by_input == {}


def test_additional_forward_args_follow_the_rows_and_match_captum() -> None:
    torch.manual_seed(3)
    net = Scaled().double().eval()
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 3, 6, 6, generator=gen, dtype=torch.float64)
    gain = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    ref = IntegratedGradients(net).attribute(x, target=[0, 1, 2], additional_forward_args=(gain, 0.5), n_steps=7)
    res = cnnlens.explain(
        net,
        x,
        methods=["integrated_gradients", "gradcam"],
        layers=["conv"],
        targets=[0, 1, 2],
        additional_forward_args=(gain, 0.5),
        options={"integrated_gradients": {"steps": 7}},
        execution=Execution(chunk_size=4),
    )
    assert {e.layer for e in res} == {"input", "conv"}  # one explained input: the key stays "input"
    torch.testing.assert_close(res["integrated_gradients", "input"].raw[:, 0], ref.sum(1), rtol=1e-7, atol=1e-10)
    ref_cam = LayerGradCam(net, net.conv).attribute(x, target=[0, 1, 2], additional_forward_args=(gain, 0.5))
    torch.testing.assert_close(res["gradcam", "conv"].raw[:, 0], ref_cam[:, 0], rtol=1e-9, atol=1e-12)
    # keyword extra arguments reach the model as keywords
    kw = cnnlens.explain(
        net, x, layers=["conv"], targets=[0, 1, 2], additional_forward_args={"gain": gain, "offset": 0.5}
    )
    torch.testing.assert_close(kw["gradcam", "conv"].raw, res["gradcam", "conv"].raw)


@pytest.mark.parametrize(
    ("inputs", "needle"),
    [
        (lambda x, d: (x, d[:2]), "'1' (2, 1, 8, 8)"),
        (lambda x, d: {"rgb": x, "depth": d[:1]}, "'depth' (1, 1, 8, 8)"),
        (lambda x, d: (x, [1.0, 2.0]), "model input '1' must be a tensor, got list"),
        (lambda x, d: {"rgb": x, "depth": None}, "model input 'depth' must be a tensor, got NoneType"),
        (lambda x, d: (), "empty sequence"),
    ],
)
def test_bad_inputs_raise_input_shape_error_naming_the_input(inputs: Any, needle: str) -> None:
    net, (x, d) = _net(), _data()
    with pytest.raises(InputShapeError) as err:
        cnnlens.explain(net, inputs(x, d), layers=["fuse"])
    assert needle in str(err.value)


def test_as_model_inputs_rows_and_extras() -> None:
    x, d = _data()
    gain = torch.arange(3.0)
    inp = as_model_inputs((x, d), additional_forward_args=(gain, 2.0, torch.ones(5)))
    rows = inp.rows(torch.tensor([2, 2, 0]))
    assert rows.tensors[0].shape[0] == 3 and torch.equal(rows.extra_args[0], gain[[2, 2, 0]])
    assert rows.extra_args[1] == 2.0 and rows.extra_args[2].shape == (5,)  # not per-sample: unchanged
    assert inp.spatial_names() == ("0", "1")
    seen: list[Any] = []
    inp.call(lambda *a, **k: seen.append((len(a), sorted(k))))
    assert seen == [(5, [])]


def test_guided_backprop_per_input_equals_captum_with_a_tuple() -> None:
    from captum.attr import GuidedBackprop

    net, (x, d) = _net(), _data()
    ref_x, ref_d = GuidedBackprop(net).attribute((x, d), target=TARGETS)
    res = cnnlens.explain(net, (x, d), methods=["guided_backprop"], layers=["fuse"], targets=TARGETS)
    torch.testing.assert_close(res["guided_backprop", "input:0"].raw[:, 0], ref_x.sum(1), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(res["guided_backprop", "input:1"].raw[:, 0], ref_d.sum(1), rtol=1e-9, atol=1e-12)


def test_layer_smoothing_noises_every_input_with_its_own_noise() -> None:
    from cnnlens.methods.smooth import noise, smooth

    net, (x, d) = _net(), _data(2)
    n, sigma, targets = 2, 0.3, [2, 1]
    got = cnnlens.explain(net, (x, d), methods=[smooth("gradcam", n=n, sigma=sigma)], layers=["fuse"], targets=targets)

    def noisy(t: torch.Tensor, j: int, stream: str | None) -> torch.Tensor:
        span = (t.flatten(1).amax(1) - t.flatten(1).amin(1)).view(-1, 1, 1, 1)
        return t + sigma * span * noise(0, j, tuple(t.shape[1:]), stream).double()

    maps = [
        cnnlens.explain(net, (noisy(x, j, None), noisy(d, j, "1")), layers=["fuse"], targets=targets)["gradcam", "fuse"]
        for j in range(n)
    ]
    expected = sum(m.raw for m in maps) / n
    torch.testing.assert_close(got["smooth_gradcam", "fuse"].raw, expected)


class ImageAndClassId(nn.Module):
    """An image and an integer condition (an embedding index): only the image is a spatial input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.embed = nn.Embedding(5, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)) * self.embed(cond).view(-1, 4, 1, 1)
        return self.head(h.mean(dim=(2, 3)))


def test_integer_inputs_get_no_map_and_are_held_through_passes() -> None:
    torch.manual_seed(5)
    net = ImageAndClassId().double().eval()
    x, cond = _data(2)[0], torch.tensor([3, 1])
    res = cnnlens.explain(
        net,
        (x, cond),
        methods=["saliency", "integrated_gradients", "gradcam"],
        layers=["conv"],
        targets=[0, 2],
        options={"integrated_gradients": {"steps": 5}},
        execution=Execution(chunk_size=3),
    )
    assert {e.layer for e in res} == {"conv", "input:0"}
    ref = IntegratedGradients(net).attribute(x, target=[0, 2], additional_forward_args=(cond,), n_steps=5)
    torch.testing.assert_close(res["integrated_gradients", "input:0"].raw[:, 0], ref.sum(1), rtol=1e-7, atol=1e-10)
    with capture(net, "conv") as cap:
        torch.testing.assert_close(cap.forward((x, cond)), net(x, cond).detach())


def test_non_finite_input_is_named_and_network_scope_is_refused() -> None:
    from cnnlens.errors import MethodError, NonFiniteInputError

    net, (x, d) = _net(), _data()
    broken = d.clone()
    broken[1, 0, 2, 2] = float("nan")
    with pytest.raises(NonFiniteInputError, match=r"the input 'depth' holds NaN .* image\(s\) \[1\]"):
        cnnlens.explain(net, {"rgb": x, "depth": broken}, layers=["fuse"])
    with pytest.raises(MethodError, match=r"fullgrad \(network scope\) supports models called with one input"):
        cnnlens.explain(net, (x, d), methods=["fullgrad"], layers=["fuse"])


def test_channels_last_runs_every_image_input() -> None:
    net, (x, d) = _net(), _data()
    net, x, d = net.float(), x.float(), d.float()
    opts = {"methods": ["gradcam", "saliency"], "layers": ["fuse"], "targets": TARGETS}
    fast = cnnlens.explain(net, (x, d), execution=Execution(memory_format="channels_last"), **opts)
    plain = cnnlens.explain(net, (x, d), **opts)
    for method, layer in (("gradcam", "fuse"), ("saliency", "input:0"), ("saliency", "input:1")):
        torch.testing.assert_close(fast[method, layer].raw, plain[method, layer].raw, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_inputs_and_per_sample_extras_move_to_the_model_device() -> None:
    torch.manual_seed(3)
    net = Scaled().double().eval()
    x, gain = _data(2)[0][:, :3, :6, :6], torch.tensor([0.5, 2.0], dtype=torch.float64)
    opts = {"methods": ["gradcam", "integrated_gradients"], "layers": ["conv"], "targets": [0, 1]}
    cpu = cnnlens.explain(net, x, additional_forward_args=(gain,), **opts)
    gpu = cnnlens.explain(net.cuda(), x, additional_forward_args=(gain,), execution=Execution(chunk_size=3), **opts)
    for method, layer in (("gradcam", "conv"), ("integrated_gradients", "input")):
        torch.testing.assert_close(gpu[method, layer].raw.cpu(), cpu[method, layer].raw, rtol=1e-6, atol=1e-9)


class Biased(nn.Module):
    """An extra argument that is not per sample: a channel bias (C,), moved like the model's parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, channel_bias: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x) + channel_bias.view(1, -1, 1, 1))
        return self.head(h.mean(dim=(2, 3)))


def test_constant_extra_tensors_take_the_model_dtype_and_are_not_indexed() -> None:
    torch.manual_seed(6)
    net = Biased().eval()  # float32
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(7))
    bias = torch.tensor([0.1, -0.2, 0.3, 0.0], dtype=torch.float64)  # float64, 4 != batch 2: not per sample
    res = cnnlens.explain(
        net, x, methods=["gradcam", "ablationcam"], layers=["conv"], targets=[0, 2], additional_forward_args=(bias,)
    )
    ref = LayerGradCam(net, net.conv).attribute(x, target=[0, 2], additional_forward_args=(bias.float(),))
    torch.testing.assert_close(res["gradcam", "conv"].raw[:, 0], ref[:, 0], rtol=1e-5, atol=1e-6)
    assert bool(torch.isfinite(res["ablationcam", "conv"].raw).all())
