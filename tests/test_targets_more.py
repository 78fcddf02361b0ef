"""Targets on raw model outputs (issue 11): segmentation, region, multi-label, contrastive, HF-style outputs."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import cnnlens
from cnnlens.errors import TargetError
from cnnlens.execution import Execution
from cnnlens.methods.smooth import noisy_inputs
from cnnlens.outputs import to_logits
from cnnlens.targets import (
    ContrastiveTarget,
    FunctionTarget,
    LabelTarget,
    MultiLabelTarget,
    RegionTarget,
    SegmentationTarget,
)

# -- segmentation ---------------------------------------------------------------------------------------------


class TinySeg(nn.Module):
    """A tiny encoder-decoder: stride-2 conv encoder, a 1x1 classifier, bilinear upsampling to the input."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1))
        self.act = nn.ReLU()
        self.cls = nn.Conv2d(8, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cls(self.act(self.enc(x)))
        return nn.functional.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)


def _seg() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    net = TinySeg().eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    return net, x


def test_segmentation_target_matches_pytorch_grad_cam() -> None:
    cv2 = pytest.importorskip("cv2")
    pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

    net, x = _seg()
    category = 1
    region = (net(x).argmax(dim=1) == category).float()
    assert 0 < float(region.sum()) < region.numel()  # a real region, not all or nothing
    with GradCAM(model=net, target_layers=[net.act]) as cam:
        theirs = cam(
            input_tensor=x, targets=[SemanticSegmentationTarget(category, region[b].numpy()) for b in range(2)]
        )
    ours = cnnlens.explain(net, x, layers=["act"], targets=SegmentationTarget(category))["gradcam", "act"]

    def scale(m: np.ndarray) -> np.ndarray:
        m = np.maximum(m, 0)
        m = m - m.min()
        return m / (1e-7 + m.max())

    mine = np.stack([scale(cv2.resize(np.float32(scale(m)), (16, 16))) for m in ours.raw[:, 0].numpy()])
    assert float(np.abs(theirs).max()) > 0.5
    assert np.abs(mine - theirs).max() <= 1e-5
    # the score is the masked sum of the class logits
    torch.testing.assert_close(ours.scores[:, 0], (net(x)[:, category] * region).sum(dim=(1, 2)).detach())


@pytest.mark.parametrize("method", ["smoothgrad", "integrated_gradients", "scorecam"])
def test_segmentation_region_is_frozen_on_the_clean_output(method: str) -> None:
    net, x = _seg()
    region = (net(x).argmax(dim=1) == 2).float()
    opts = {"smoothgrad": {"n": 4, "sigma": 0.5}, "integrated_gradients": {"steps": 4}}.get(method)
    options = {method: opts} if opts else None

    def run(target: Any) -> torch.Tensor:
        res = cnnlens.explain(
            net, x, methods=[method], layers=["act"], targets=target, options=options, execution=Execution(chunk_size=3)
        )
        return res[method, "act"].raw

    predicted, given = run(SegmentationTarget(2)), run(SegmentationTarget(2, mask=region))
    assert predicted.abs().max() > 0
    torch.testing.assert_close(predicted, given)


def test_fcn_resnet50_one_forward() -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = torchvision.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None, num_classes=3).eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    res = cnnlens.explain(net, x, layers=["backbone.layer4"], targets=SegmentationTarget(1))  # dict {"out": ...}
    e = res["gradcam", "backbone.layer4"]
    assert e.maps.shape == (1, 1, 64, 64) and bool(torch.isfinite(e.maps).all())


def test_segmentation_target_errors() -> None:
    with pytest.raises(TargetError, match=r"dense output \(batch, channels, H, W\)"):
        SegmentationTarget(0)(torch.zeros(2, 5))
    with pytest.raises(TargetError, match="channel 4 is out of range"):
        SegmentationTarget(4)(torch.zeros(1, 3, 2, 2))
    with pytest.raises(TargetError, match=r"mask has shape \(3, 3\)"):
        SegmentationTarget(0, mask=torch.ones(3, 3))(torch.zeros(1, 3, 2, 2))


# -- region regression ----------------------------------------------------------------------------------------


def test_region_target_saliency_is_the_box_average_of_the_pixel_weights() -> None:
    net = nn.Conv2d(3, 2, 1, bias=False).double()
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 4.0]]).view(2, 3, 1, 1))
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    box = (1, 2, 4, 5)  # rows 1..3, columns 2..4: 9 pixels
    res = cnnlens.explain(net, x, methods=["saliency"], layers=[net], targets=RegionTarget(1, box))
    expected = torch.zeros(5, 6, dtype=torch.float64)
    expected[1:4, 2:5] = (-1.0 + 0.5 + 4.0) / 9
    torch.testing.assert_close(res["saliency", None].raw[:, 0], expected.expand(2, 5, 6))
    torch.testing.assert_close(res["saliency", None].scores[:, 0], net(x)[:, 1, 1:4, 2:5].mean(dim=(1, 2)).float())
    mask = torch.zeros(5, 6)
    mask[1:4, 2:5] = 1
    as_mask = cnnlens.explain(net, x, methods=["saliency"], layers=[net], targets=RegionTarget(1, mask))
    torch.testing.assert_close(as_mask["saliency", None].raw, res["saliency", None].raw)
    summed = cnnlens.explain(net, x, methods=["saliency"], layers=[net], targets=RegionTarget(1, box, reduce="sum"))
    torch.testing.assert_close(summed["saliency", None].raw, 9 * res["saliency", None].raw)


def test_region_target_errors() -> None:
    with pytest.raises(TargetError, match="box"):
        RegionTarget(0, (3, 0, 1, 2))
    with pytest.raises(TargetError, match="does not lie inside"):
        RegionTarget(0, (0, 0, 9, 2))(torch.zeros(1, 1, 4, 4))
    with pytest.raises(TargetError, match="reduce"):
        RegionTarget(0, (0, 0, 1, 1), reduce="max")  # type: ignore[arg-type]


# -- multi-label ----------------------------------------------------------------------------------------------

W = torch.tensor([[2.0, 0.0, 0.0, 1.0], [0.0, 3.0, -1.0, 0.0], [1.0, 1.0, 1.0, 2.0]], dtype=torch.float64)
BIAS = torch.tensor([0.0, -1.0, -0.5], dtype=torch.float64)


def _sigmoid_head() -> nn.Module:
    lin = nn.Linear(4, 3).double()
    with torch.no_grad():
        lin.weight.copy_(W)
        lin.bias.copy_(BIAS)
    return nn.Sequential(nn.Identity(), nn.Flatten(), lin)


# sample 0: logits (2.5, -1.5, 2) -> labels 0 (p .92) and 2 (p .88); sample 1: (-1.5, 2, -2.5) -> label 1 only
X_ML = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]], [[[0.0, 1.0], [0.0, -1.5]]]], dtype=torch.float64)


def test_multilabel_explains_every_label_above_threshold_exact() -> None:
    net = _sigmoid_head()
    logits = net(X_ML).detach()
    torch.testing.assert_close(logits, torch.tensor([[2.5, -1.5, 2.0], [-1.5, 2.0, -2.5]], dtype=torch.float64))
    res = cnnlens.explain(net, X_ML, methods=["saliency"], layers=["0"], targets=MultiLabelTarget())
    e = res["saliency", None]
    # T = 2 (the most labels any sample has); sample 1 has one label: slot 1 is empty (-1, score 0, zero map)
    assert e.target_classes.tolist() == [[0, 2], [1, -1]]
    torch.testing.assert_close(e.scores.double(), torch.tensor([[2.5, 2.0], [2.0, 0.0]], dtype=torch.float64))
    for b, labels in enumerate(([0, 2], [1, None])):
        for t, label in enumerate(labels):
            expected = torch.zeros(2, 2, dtype=torch.float64) if label is None else W[label].view(2, 2)
            torch.testing.assert_close(e.raw[b, t], expected)
    assert e.degenerate.tolist() == [[False, False], [False, True]]
    probs = cnnlens.explain(
        net, X_ML, methods=["saliency"], layers=["0"], targets=MultiLabelTarget(threshold=0.9, score="probability")
    )["saliency", None]
    assert probs.target_classes.tolist() == [[0], [-1]]  # p = 0.92 for label 0 of sample 0; 0.88 is below 0.9
    torch.testing.assert_close(
        probs.scores[:, 0].double(), torch.tensor([torch.sigmoid(torch.tensor(2.5)), 0.0]).double()
    )
    assert probs.degenerate.tolist() == [[False], [True]]


def test_multilabel_given_labels_and_smoothing_keep_the_labels() -> None:
    net = _sigmoid_head()
    given = cnnlens.explain(net, X_ML, methods=["saliency"], layers=["0"], targets=MultiLabelTarget(labels=[1, 0]))
    e = given["saliency", None]
    assert e.target_classes.tolist() == [[1, 0], [1, 0]]
    torch.testing.assert_close(e.raw[0, 0], W[1].view(2, 2))
    # a linear head has a constant gradient: SmoothGrad with the labels frozen equals saliency, row layout and all
    smoothed = cnnlens.explain(
        net,
        X_ML,
        methods=["saliency", "smoothgrad"],
        layers=["0"],
        targets=MultiLabelTarget(),
        options={"smoothgrad": {"n": 5, "sigma": 2.0}},
        execution=Execution(chunk_size=3),
    )
    torch.testing.assert_close(smoothed["smoothgrad", None].raw, smoothed["saliency", None].raw)


def test_multilabel_argument_checks() -> None:
    with pytest.raises(TargetError, match="threshold"):
        MultiLabelTarget(threshold=1.5)
    with pytest.raises(TargetError, match="labels"):
        MultiLabelTarget(labels=[])
    with pytest.raises(TargetError, match="out of range"):
        LabelTarget(7)(torch.zeros(1, 3))


# -- contrastive (Finer-CAM) ----------------------------------------------------------------------------------


def _flip_net() -> nn.Module:
    """Logits: l0 = 10 + sum(x), l1 = 5 + 2 x00, l2 = 5 - 2 x00; the class nearest to l0 is 1 iff x00 > 0."""
    lin = nn.Linear(16, 3).double()
    w = torch.zeros(3, 16, dtype=torch.float64)
    w[0] = 1.0
    w[1, 0], w[2, 0] = 2.0, -2.0
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(torch.tensor([10.0, 5.0, 5.0]))
    return nn.Sequential(nn.Identity(), nn.Flatten(), lin)


def test_contrastive_reference_is_frozen_under_smoothgrad() -> None:
    net = _flip_net()
    x = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    x[0, 0, 0, 0] = 0.01
    x[0, 0, 3, 3] = 1.0  # value range 1: sigma is a fraction of it
    w = net[2].weight.detach()
    n, sigma = 16, 0.5
    # re-picking on the noisy copies would change the reference class: the ranking flips under this noise
    noisy = noisy_inputs(x, n, sigma)
    repicked = [1 if float(c[0, 0, 0, 0]) > 0 else 2 for c in noisy]
    assert 0 < repicked.count(2) < n
    res = cnnlens.explain(
        net,
        x,
        methods=["smoothgrad", "integrated_gradients"],
        layers=["0"],
        targets=ContrastiveTarget(0, against=1),
        options={"smoothgrad": {"n": n, "sigma": sigma}, "integrated_gradients": {"steps": 3}},
    )
    frozen = (w[0] - w[1]).view(4, 4)  # the clean reference, class 1, on every noisy copy
    torch.testing.assert_close(res["smoothgrad", None].raw[0, 0], frozen)
    unfrozen = (w[0] - w[torch.tensor(repicked)].mean(0)).view(4, 4)
    assert not torch.allclose(unfrozen, frozen)
    assert res["smoothgrad", None].target_names == ["class 0 vs 1 nearest"]
    torch.testing.assert_close(res["integrated_gradients", None].raw[0, 0], frozen * x[0, 0])


def test_contrastive_target_with_gradcam_and_each() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)).double()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    logits = net(x).detach()
    target = ContrastiveTarget(None, against=2)
    classes, refs = target.pick(logits)
    assert classes.tolist() == logits.argmax(1).tolist()
    for b in range(2):  # the references are the two other classes nearest in logit
        others = [k for k in range(5) if k != int(classes[b])]
        nearest = sorted(others, key=lambda k: abs(float(logits[b, k] - logits[b, classes[b]])))[:2]
        assert refs[b].tolist() == nearest

    res = cnnlens.explain(net, x, methods=["gradcam", "scorecam"], layers=["1"], targets=target)
    for b in range(2):  # oracle: a custom target with sample b's classes written out, one sample at a time

        def explicit(out: torch.Tensor, b: int = b) -> torch.Tensor:
            return out[:, int(classes[b])] - out[:, refs[b]].mean(1)

        ref = cnnlens.explain(
            net, x[b : b + 1], methods=["gradcam", "scorecam"], layers=["1"], targets=FunctionTarget(explicit)
        )
        for method in ("gradcam", "scorecam"):
            torch.testing.assert_close(res[method, "1"].raw[b], ref[method, "1"].raw[0])
    each = cnnlens.explain(net, x, methods=["gradcam"], layers=["1"], targets=ContrastiveTarget(None, 2, "each"))
    assert each["gradcam", "1"].raw.shape[1] == 2
    with pytest.raises(TargetError, match="against"):
        ContrastiveTarget(0, against=0)


# -- HF-style outputs -----------------------------------------------------------------------------------------


class FakeModelOutput(OrderedDict):  # type: ignore[type-arg]
    """Like transformers' ModelOutput: an ordered dict whose keys are also attributes."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class HfStyle(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, pixel_values: torch.Tensor) -> FakeModelOutput:
        logits = self.inner(pixel_values)
        return FakeModelOutput(loss=None, logits=logits, hidden_states=(pixel_values,))


def test_hf_style_model_output_goes_through_the_adapter() -> None:
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    x = torch.randn(2, 3, 8, 8)
    out = HfStyle(inner)(x)
    assert to_logits(out) is out.logits
    wrapped = cnnlens.explain(HfStyle(inner), x, methods=["gradcam", "saliency"], layers=["inner.1"], targets=[2, 0])
    plain = cnnlens.explain(inner, x, methods=["gradcam", "saliency"], layers=["1"], targets=[2, 0])
    torch.testing.assert_close(wrapped["gradcam", "inner.1"].raw, plain["gradcam", "1"].raw)
    torch.testing.assert_close(wrapped["saliency", None].raw, plain["saliency", None].raw)
    torch.testing.assert_close(wrapped.logits, plain.logits)


def test_a_class_target_on_a_dense_output_points_to_the_dense_targets() -> None:
    net, x = _seg()
    with pytest.raises(TargetError, match=r"shape \(2, 3, 16, 16\); for a dense output .* cnnlens.SegmentationTarget"):
        cnnlens.explain(net, x, layers=["act"])  # the default target is the top class: undefined per pixel
