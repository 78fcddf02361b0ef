"""Methods on volumes (issue 11): Conv3d networks, inputs (B, C, D, H, W), maps (B, T, D, H, W).

Exact oracles (float64) against literal re-implementations of the papers' formulas in 3-D, the 2-D/3-D
consistency of a depth-1 Conv3d network with its Conv2d twin, the upsampling to the input's (D, H, W), the
files save() writes, and the methods refused on volumes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tests.nets import hook_count, seeded
from torch import nn

import cnnlens
from cnnlens import metrics
from cnnlens.errors import InputShapeError, MethodError
from cnnlens.imaging import colorize
from cnnlens.maps import finite_or_zero, normalize, upsample, upsample_normalize
from cnnlens.methods.registry import LayerView, check_volumes, get_method, volume_method_ids

VOLUME_METHODS = ["gradcam", "gradcampp", "xgradcam", "hirescam", "gradcam_elementwise", "layercam"]
VOLUME_METHODS += ["eigencam", "eigengradcam", "scorecam", "ablationcam"]


class Volume3d(nn.Module):
    """Conv3d -> ReLU -> Conv3d -> ReLU ("features") -> "head": Flatten -> Linear -> ReLU -> Linear.

    No global pooling: the gradient differs from voxel to voxel, so Grad-CAM, Grad-CAM++, Layer-CAM and
    HiResCAM all give different maps.
    """

    def __init__(self, size: tuple[int, int, int] = (4, 6, 6), classes: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv3d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv3d(3, 4, 3, padding=1, stride=2), nn.ReLU()
        )
        cells = 4 * int(np.prod([(s + 1) // 2 for s in size]))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(cells, 8), nn.ReLU(), nn.Linear(8, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class GapVolume(nn.Module):
    """The issue's network for (1, 1, 16, 32, 32) volumes: two Conv3d blocks, global pooling, a linear head."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv3d(1, 4, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool3d(2),
            nn.Conv3d(4, 6, 3, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(6, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class SmoothHead3d(nn.Module):
    """features -> (1x1x1 conv, ReLU, GAP, Linear): exp(score) has the derivatives Grad-CAM++ is built on."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.Conv3d(2, 3, 1), nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _activation_and_gradient(net: nn.Module, x: torch.Tensor, cls: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The "features" output and d logit_cls / d features, by plain autograd (no cnnlens involved)."""
    acts = net.features(x).detach().requires_grad_(True)
    score = net.head(acts)[:, cls].sum()
    (grad,) = torch.autograd.grad(score, acts)
    return acts.detach(), grad


def _net_and_volume(seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    net = seeded(Volume3d(), seed=seed)
    return net, torch.randn(2, 1, 4, 6, 6, dtype=torch.float64)


def _raw(net: nn.Module, x: torch.Tensor, method: str, cls: int, **options: object) -> torch.Tensor:
    result = cnnlens.explain(net, x, methods=[get_method(method).bind(**options)], layers=["features"], targets=cls)
    e = result[method, "features"]
    assert e.raw.shape == (x.shape[0], 1, 2, 3, 3)
    assert e.maps.shape == (x.shape[0], 1, *x.shape[2:])
    return e.raw[:, 0]


# -- exact oracles (float64) -------------------------------------------------------------------------------


def test_gradcam_on_a_volume_equals_the_papers_formula() -> None:
    net, x = _net_and_volume()
    acts, grad = _activation_and_gradient(net, x, 1)
    b, c, d, h, w = acts.shape
    expected = torch.zeros(b, d, h, w, dtype=torch.float64)
    for k in range(c):  # w_k = (1/Z) sum_{lij} dS/dA_k,lij with Z = d*h*w ; L = sum_k w_k A_k
        weight = grad[:, k].sum(dim=(1, 2, 3)) / (d * h * w)
        expected += weight[:, None, None, None] * acts[:, k]
    got = _raw(net, x, "gradcam", 1)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    assert expected.abs().max() > 1e-3


def test_layercam_and_hirescam_on_a_volume_equal_their_formulas() -> None:
    net, x = _net_and_volume(1)
    acts, grad = _activation_and_gradient(net, x, 2)
    torch.testing.assert_close(_raw(net, x, "layercam", 2), (torch.relu(grad) * acts).sum(1), rtol=0, atol=1e-10)
    torch.testing.assert_close(_raw(net, x, "hirescam", 2), (grad * acts).sum(1), rtol=0, atol=1e-10)
    elementwise = torch.relu(grad * acts).sum(1)
    torch.testing.assert_close(_raw(net, x, "gradcam_elementwise", 2), elementwise, rtol=0, atol=1e-10)
    # XGrad-CAM: w_k = sum_v A_k,v g_k,v / sum_v A_k,v
    total = acts.sum(dim=(2, 3, 4))
    weights = torch.where(total != 0, (acts * grad).sum(dim=(2, 3, 4)) / total.where(total != 0, 1.0), 0.0)
    xgrad = torch.einsum("bc,bcdhw->bdhw", weights, acts)
    torch.testing.assert_close(_raw(net, x, "xgradcam", 2), xgrad, rtol=0, atol=1e-10)
    assert not torch.allclose(_raw(net, x, "layercam", 2), _raw(net, x, "gradcam", 2))


@pytest.mark.parametrize("alpha_normalize", [False, True])
def test_gradcampp_on_a_volume_equals_the_closed_form_over_every_voxel(alpha_normalize: bool) -> None:
    net, x = _net_and_volume(2)
    acts, grad = _activation_and_gradient(net, x, 0)
    expected = torch.zeros(acts.shape[0], *acts.shape[2:], dtype=torch.float64)
    for b in range(acts.shape[0]):
        for k in range(acts.shape[1]):
            a, g = acts[b, k], grad[b, k]
            sum_a = a.sum()  # sum over every voxel (a, b, c) of channel k
            denom = 2 * g**2 + sum_a * g**3
            alpha = torch.where((g != 0) & (denom != 0), g**2 / denom.where(denom != 0, 1.0), 0.0)
            if alpha_normalize:
                norm = (alpha * (g > 0)).sum()
                alpha = alpha / norm if norm != 0 else alpha
            expected[b] += (alpha * torch.relu(g)).sum() * a
    got = _raw(net, x, "gradcampp", 0, alpha_normalize=alpha_normalize)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
    assert expected.abs().max() > 1e-3


def test_gradcampp_on_a_volume_matches_autograd_derivatives_of_exp_score() -> None:
    """The paper's general form: alpha = d2 / (2 d2 + sum(A) d3) with derivatives of Y = exp(S)."""
    torch.manual_seed(3)
    net = seeded(SmoothHead3d(), seed=3)
    x = torch.randn(1, 1, 2, 3, 3, dtype=torch.float64)
    cls = int(net(x).argmax())
    acts = net.features(x).detach()[0]  # (C, d, h, w)
    flat = acts.reshape(-1)

    def y_flat(v: torch.Tensor) -> torch.Tensor:
        return torch.exp(net.head(v.reshape(1, *acts.shape))[0, cls])

    first = torch.func.grad(y_flat)
    second = torch.func.jacrev(first)
    third = torch.func.jacfwd(second)
    idx = torch.arange(flat.numel())
    d1 = first(flat).reshape(acts.shape)
    d2 = torch.diagonal(second(flat)).reshape(acts.shape)
    d3 = third(flat)[idx, idx, idx].reshape(acts.shape)
    sum_a = acts.sum(dim=(1, 2, 3), keepdim=True)
    denom = 2 * d2 + sum_a * d3
    alpha = torch.where(denom != 0, d2 / denom.where(denom != 0, 1.0), 0.0)
    weights = (alpha * torch.relu(d1)).sum(dim=(1, 2, 3))  # = exp(S) * w_closed
    expected = torch.einsum("c,cdhw->dhw", weights, acts) / torch.exp(net(x)[0, cls])
    got = cnnlens.explain(net, x, methods=["gradcampp"], layers=["features"], targets=cls)["gradcampp", "features"]
    assert expected.abs().max() > 0
    torch.testing.assert_close(got.raw[0, 0], expected.detach(), rtol=0, atol=1e-10)


def _first_component(matrix: np.ndarray) -> np.ndarray:
    """Eigen-CAM by the book with numpy: centre (P, C) over positions, project on v_1, sign by channel sum."""
    centred = matrix - matrix.mean(axis=0, keepdims=True)
    _, _, vh = np.linalg.svd(centred, full_matrices=False)
    proj = centred @ vh[0]
    total = matrix.sum(axis=1)
    return proj if float(proj @ (total - total.mean())) >= 0 else -proj


@pytest.mark.parametrize("method", ["eigencam", "eigengradcam"])
def test_eigencam_on_a_volume_is_the_first_principal_component(method: str) -> None:
    net, x = _net_and_volume(4)
    acts, grad = _activation_and_gradient(net, x, 1)
    features = acts if method == "eigencam" else acts * grad
    got = _raw(net, x, method, 1)
    for b in range(x.shape[0]):
        matrix = features[b].reshape(features.shape[1], -1).T.numpy()  # (d*h*w, C)
        expected = torch.from_numpy(_first_component(matrix)).reshape(got.shape[1:])
        torch.testing.assert_close(got[b], expected, rtol=0, atol=1e-10)


def test_scorecam_on_a_volume_masks_with_trilinear_upsampling() -> None:
    net, x = _net_and_volume(5)
    acts, _ = _activation_and_gradient(net, x, 2)
    size = tuple(x.shape[2:])
    expected = torch.zeros(x.shape[0], *acts.shape[2:], dtype=torch.float64)
    for b in range(x.shape[0]):
        scores = []
        for k in range(acts.shape[1]):
            up = F.interpolate(acts[b, k][None, None], size=size, mode="trilinear", align_corners=False)[0, 0]
            span = up.max() - up.min()
            mask = (up - up.min()) / span if span > 0 and acts[b, k].max() > acts[b, k].min() else 0 * up
            with torch.no_grad():
                scores.append(net(x[b : b + 1] * mask)[0, 2])
        weights = torch.softmax(torch.stack(scores), dim=0)
        expected[b] = torch.einsum("c,cdhw->dhw", weights, acts[b])
    torch.testing.assert_close(_raw(net, x, "scorecam", 2), expected, rtol=0, atol=1e-10)


def test_ablationcam_on_a_volume_zeroes_each_channel() -> None:
    net, x = _net_and_volume(6)
    acts, _ = _activation_and_gradient(net, x, 0)
    with torch.no_grad():
        y = net.head(acts)[:, 0]
        weights = torch.zeros(acts.shape[:2], dtype=torch.float64)
        for k in range(acts.shape[1]):
            ablated = acts.clone()
            ablated[:, k] = 0
            weights[:, k] = (y - net.head(ablated)[:, 0]) / y
    expected = torch.einsum("bc,bcdhw->bdhw", weights, acts)
    torch.testing.assert_close(_raw(net, x, "ablationcam", 0), expected, rtol=0, atol=1e-10)


# -- 2-D / 3-D consistency ---------------------------------------------------------------------------------


def _twins(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    """A Conv2d network and its Conv3d twin with (1, k, k) kernels: equal on depth-1 inputs."""
    twin2 = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3, padding=1, stride=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(5 * 4 * 4, 3),
    )  # fmt: skip
    twin3 = nn.Sequential(
        nn.Conv3d(2, 4, (1, 3, 3), padding=(0, 1, 1)), nn.ReLU(),
        nn.Conv3d(4, 5, (1, 3, 3), padding=(0, 1, 1), stride=(1, 2, 2)), nn.ReLU(),
        nn.Flatten(), nn.Linear(5 * 4 * 4, 3),
    )  # fmt: skip
    seeded(twin2, seed=seed)
    with torch.no_grad():
        for p2, p3 in zip(twin2.parameters(), twin3.parameters(), strict=True):
            p3.copy_(p2.reshape(p3.shape))
    return twin2, twin3.double().eval()


@pytest.mark.parametrize("method", VOLUME_METHODS)
def test_depth_one_conv3d_gives_the_conv2d_twins_maps(method: str) -> None:
    twin2, twin3 = _twins()
    x2 = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    x3 = x2.unsqueeze(2)  # (B, C, 1, H, W)
    torch.testing.assert_close(twin3(x3), twin2(x2), rtol=0, atol=1e-12)
    r2 = cnnlens.explain(twin2, x2, methods=[method], layers=["3"], targets=[0, 2])[method, "3"]
    r3 = cnnlens.explain(twin3, x3, methods=[method], layers=["3"], targets=[0, 2])[method, "3"]
    assert r3.raw.shape == (2, 1, 1, 4, 4) and r3.maps.shape == (2, 1, 1, 8, 8)
    torch.testing.assert_close(r3.raw[:, :, 0], r2.raw, rtol=0, atol=1e-10)
    torch.testing.assert_close(r3.maps[:, :, 0], r2.maps, rtol=0, atol=1e-6)
    assert torch.equal(r3.degenerate, r2.degenerate)


# -- the (1, 1, 16, 32, 32) volume through explain() -------------------------------------------------


def test_explain_a_16x32x32_volume_returns_volumes_at_input_size() -> None:
    torch.manual_seed(0)
    net = seeded(GapVolume(), seed=0, dtype=torch.float32)
    x = torch.randn(1, 1, 16, 32, 32)
    methods = ["gradcam", "gradcampp", "layercam", "eigencam"]
    result = cnnlens.explain(net, x, methods=methods, layers=["features.4", "features.1"], top_k=2)
    assert hook_count(net) == 0
    for e in result:
        assert e.is_volume and e.depth_slice == 8
        assert e.maps.shape == (1, 2, 16, 32, 32)
        expected_raw = (1, 2, 8, 16, 16) if e.layer == "features.4" else (1, 2, 16, 32, 32)
        assert tuple(e.raw.shape) == expected_raw
        assert bool(torch.isfinite(e.maps).all()) and float(e.maps.min()) >= 0 and float(e.maps.max()) <= 1
        assert e.images is not None and e.images.shape == (1, 32, 32, 3)  # the middle depth slice
        assert not bool(e.degenerate.any())
    # the normalised volume is normalise(ReLU(raw)) upsampled trilinearly to the input's (D, H, W)
    e = result["gradcam", "features.4"]
    expected, _ = normalize(upsample(torch.relu(e.raw.double()), (16, 32, 32)), spatial_dims=3)
    torch.testing.assert_close(e.maps.double(), expected, rtol=0, atol=1e-6)


def test_a_volume_network_gets_a_default_layer_like_a_cnn() -> None:
    """The default-layer policy counts Conv3d: the activation after the last convolution (through a norm)."""
    net = seeded(GapVolume(), seed=4)
    x = torch.randn(1, 1, 4, 8, 8, dtype=torch.float64)
    assert cnnlens.default_layer(net) == "features"  # the block whose last child is the ReLU after features.3
    result = cnnlens.explain(net, x, methods=["gradcam"])
    assert result.layers == ["features"] and result["gradcam", "features"].maps.shape == (1, 1, 4, 8, 8)
    normed = nn.Sequential(nn.Conv3d(1, 2, 3), nn.BatchNorm3d(2), nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten())
    assert cnnlens.default_layer(normed) == "2"


def test_volume_maps_are_per_sample_and_independent_of_the_batch() -> None:
    net = seeded(GapVolume(), seed=1)
    x = torch.randn(3, 1, 8, 12, 12, dtype=torch.float64)
    batch = cnnlens.explain(net, x, methods=["gradcampp"], layers=["features.4"])["gradcampp", "features.4"]
    for b in range(3):
        one = cnnlens.explain(net, x[b : b + 1], methods=["gradcampp"], layers=["features.4"])
        torch.testing.assert_close(one["gradcampp", "features.4"].maps, batch.maps[b : b + 1], rtol=0, atol=1e-6)


def test_saving_a_volume_writes_the_arrays_and_the_middle_slice(tmp_path: Path) -> None:
    net = seeded(GapVolume(), seed=2, dtype=torch.float32)
    x = torch.randn(1, 1, 8, 16, 16)
    result = cnnlens.explain(net, x, methods=["gradcam"], layers=["features.4"], image_names=["scan"])
    written = result.save(tmp_path / "out")
    e = result["gradcam", "features.4"]
    folder = tmp_path / "out" / "scan"
    stem = "gradcam__features.4__1"
    kinds = ("overlay.png", "heatmap.png", "raw.npy", "map.npy")
    assert [p.name for p in written if p.parent == folder] == [f"{stem}.{kind}" for kind in kinds]
    np.testing.assert_array_equal(np.load(folder / f"{stem}.raw.npy"), e.raw[0, 0].numpy())  # (4, 8, 8)
    full = np.load(folder / f"{stem}.map.npy")
    assert full.shape == (8, 16, 16)
    np.testing.assert_array_equal(full, e.maps[0, 0].numpy())
    # the heatmap PNG draws the middle depth slice D // 2 = 4
    heatmap = np.asarray(Image.open(folder / f"{stem}.heatmap.png").convert("RGB"))
    np.testing.assert_array_equal(heatmap, colorize(e.maps[0, 0, 4].numpy(), "jet"))
    assert not np.array_equal(heatmap, colorize(e.maps[0, 0, 0].numpy(), "jet"))
    (entry,) = json.loads((tmp_path / "out" / "manifest.json").read_text())["results"]
    assert entry["depth_slice"] == 4 and entry["raw_shape"] == [4, 8, 8]
    assert entry["files"]["map"] == f"scan/{stem}.map.npy"
    assert e.describe()["depth_slice"] == 4


def test_2d_consumers_refuse_a_volume_with_a_clear_message() -> None:
    net = seeded(GapVolume(), seed=3)
    x = torch.randn(1, 1, 4, 8, 8, dtype=torch.float64)
    e = cnnlens.explain(net, x, methods=["gradcam"], layers=["features.4"])["gradcam", "features.4"]
    with pytest.raises(InputShapeError, match=r"2-D maps \(B, T, H, W\) only for deletion: .*maps\[:, :, 2\]"):
        e.require_images("deletion")
    with pytest.raises(InputShapeError, match=r"only for localisation metrics .* holds volumes \(1, 1, 4, 8, 8\)"):
        metrics.pointing_game(e, boxes=[(0, 0, 4, 4)])
    with pytest.raises(InputShapeError, match=r"\(B, C, H, W\).*got shape \(1, 1, 4, 8, 8\)"):
        metrics.average_drop(net, x, e)


# -- refused methods -----------------------------------------------------------------------------------------


class _Counting(GapVolume):
    calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        type(self).calls += 1
        return super().forward(x)


REFUSED = ["saliency", "guided_backprop", "integrated_gradients", "fullgrad", "guided_gradcam"]


@pytest.mark.parametrize("method", REFUSED)
def test_methods_without_a_3d_definition_are_refused_before_any_forward(method: str) -> None:
    net = seeded(_Counting(), seed=0)
    _Counting.calls = 0
    x = torch.randn(1, 1, 4, 8, 8, dtype=torch.float64)
    with pytest.raises(MethodError) as err:
        cnnlens.explain(net, x, methods=["gradcam", method], layers=["features.4"])
    message = str(err.value)
    assert message.startswith(f"{method} does not run on volumes")
    assert "(1, 1, 4, 8, 8)" in message and "gradcam, gradcampp" in message
    assert _Counting.calls == 0 and hook_count(net) == 0


def test_volume_support_is_declared_in_the_registry() -> None:
    assert set(VOLUME_METHODS) <= set(volume_method_ids())
    assert not set(REFUSED) & set(volume_method_ids())
    check_volumes([get_method("gradcam")], torch.zeros(1, 1, 2, 2, 2))  # a volume method passes
    check_volumes([get_method("saliency")], torch.zeros(1, 1, 2, 2))  # an image passes
    # a method called on a volume view directly (outside explain) is refused by the registry too
    view = LayerView("v", torch.zeros(1, 2, 2, 2, 2), None, torch.zeros(1, 1, 2, 2, 2), None, torch.zeros(1),
                     torch.zeros(1, dtype=torch.long))  # fmt: skip
    with pytest.raises(MethodError, match="saliency does not run on volumes"):
        get_method("saliency").compute(view, {})


@pytest.mark.parametrize(
    ("shape", "hint"),
    [((2, 5, 8), r"tokens \(B, N, C\).*layout"), ((2, 8), "vector per sample"), ((2, 1, 1, 1, 1, 1), "convolutional")],
)
def test_feature_map_check_says_what_it_got(shape: tuple[int, ...], hint: str) -> None:
    view = LayerView("blk", torch.zeros(shape), None, torch.zeros(2, 3, 4, 4), None, torch.zeros(2),
                     torch.zeros(2, dtype=torch.long))  # fmt: skip
    with pytest.raises(MethodError, match=rf"gradcam needs .* layer 'blk' gives shape {re.escape(str(shape))}.*{hint}"):
        get_method("gradcam").fn(view)


# -- map arithmetic on volumes ---------------------------------------------------------------------------------


def test_upsample_normalize_on_volumes_equals_trilinear_then_per_volume_min_max() -> None:
    torch.manual_seed(0)
    small = torch.rand(2, 3, 2, 3, 3, dtype=torch.float64)
    small[1, 2] = 5.0  # a flat volume: degenerate, zeros
    other = torch.rand(1, 1, 4, 6, 6, dtype=torch.float64)
    (maps, degenerate), (maps2, degenerate2) = upsample_normalize([small, other], (4, 6, 6), dtype=torch.float64)
    up = F.interpolate(small.reshape(6, 1, 2, 3, 3), size=(4, 6, 6), mode="trilinear", align_corners=False)
    up = up.reshape(2, 3, 4, 6, 6)
    lo = up.flatten(2).amin(-1)[..., None, None, None]
    hi = up.flatten(2).amax(-1)[..., None, None, None]
    expected = torch.where(hi > lo, (up - lo) / (hi - lo).where(hi > lo, 1.0), 0.0)
    torch.testing.assert_close(maps, expected, rtol=0, atol=1e-12)
    assert degenerate.tolist() == [[False, False, False], [False, False, True]]
    assert maps2.shape == (1, 1, 4, 6, 6) and degenerate2.tolist() == [[False]]
    # float32 maps agree with the float64 computation
    ((maps32, _),) = upsample_normalize([small.float()], (4, 6, 6))
    torch.testing.assert_close(maps32.double(), expected, rtol=0, atol=1e-6)


def test_non_finite_volumes_become_zeros_and_are_flagged() -> None:
    vol = torch.rand(2, 1, 2, 3, 3)
    vol[1, 0, 1, 2, 2] = float("nan")
    clean, bad = finite_or_zero(vol, spatial_dims=3)
    assert bad.tolist() == [[False], [True]] and bool(torch.isfinite(clean).all())
    ((maps, degenerate),) = upsample_normalize([vol], (4, 6, 6))
    assert degenerate.tolist() == [[False], [True]] and float(maps[1].abs().max()) == 0.0
    assert bool(torch.isfinite(maps).all())
