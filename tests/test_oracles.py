"""Exact oracles for Grad-CAM and Grad-CAM++ on hand-weighted and tiny networks (float64)."""

from __future__ import annotations

import pytest
import torch
from tests.nets import GapHead, LinearOnMap, VggStyle, seeded
from torch import nn

import cnnlens
from cnnlens.capture import record
from cnnlens.maps import normalize, upsample


def test_gradcam_equals_cam_over_area_on_gap_linear_head() -> None:
    torch.manual_seed(0)
    net = seeded(GapHead(channels=6, classes=5))
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    result = cnnlens.explain(net, x, methods=["gradcam"], layers=["body.4"], targets=[0, 3, 4])
    rec = record(net, x, "body.4", targets=[0, 3, 4], gradients=False)
    acts = rec.activations["body.4"]
    h, w = acts.shape[-2:]
    weight = net.fc.weight[[0, 3, 4]]  # (B, C)
    cam = torch.einsum("bc,bchw->bhw", weight, acts) / (h * w)
    raw = result["gradcam", "body.4"].raw[:, 0]
    assert raw.dtype == torch.float64  # a float64 model keeps float64 raw maps
    torch.testing.assert_close(raw, cam, rtol=1e-12, atol=1e-12)
    # and the normalised map equals the normalised ReLU(CAM)
    maps, degen = normalize(upsample(torch.relu(cam), (16, 16)))
    torch.testing.assert_close(result["gradcam", "body.4"].maps[:, 0].double(), maps, rtol=0, atol=1e-6)
    assert not degen.any()


def test_gradcam_raw_in_float64_is_exact() -> None:
    net = seeded(GapHead())
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    rec = record(net, x, "body.4", targets=1)
    from cnnlens.methods import get_method
    from cnnlens.methods.registry import LayerView

    view = LayerView(
        "body.4",
        rec.activations["body.4"],
        rec.gradients["body.4"][0],
        x,
        None,
        rec.scores[:, 0],
        rec.target_classes[:, 0],
    )
    raw = get_method("gradcam").compute(view, {}).raw
    acts = rec.activations["body.4"]
    cam = torch.einsum("c,bchw->bhw", net.fc.weight[1], acts) / acts[0, 0].numel()
    torch.testing.assert_close(raw, cam, rtol=1e-12, atol=1e-12)


def _paper_alpha_map(net: nn.Module, x: torch.Tensor, layer: str, cls: int) -> torch.Tensor:
    """Grad-CAM++ from the paper's general form with autograd 2nd/3rd derivatives of Y = exp(S)."""
    rec = record(net, x, layer, gradients=False)
    acts = rec.activations[layer][0]  # (C, h, w)
    head = dict(net.named_children())

    def score(a: torch.Tensor) -> torch.Tensor:
        out = head["head"](a.unsqueeze(0))
        return torch.exp(out[0, cls])

    flat = acts.reshape(-1)

    def y_flat(v: torch.Tensor) -> torch.Tensor:
        return score(v.reshape(acts.shape))

    first = torch.func.grad(y_flat)
    second = torch.func.jacrev(first)
    third = torch.func.jacfwd(second)
    d1 = first(flat)
    d2 = torch.diagonal(second(flat))
    idx = torch.arange(flat.numel())
    d3 = third(flat)[idx, idx, idx]
    c, h, w = acts.shape
    d1, d2, d3 = (d.reshape(c, h, w) for d in (d1, d2, d3))
    sum_a = acts.sum(dim=(1, 2), keepdim=True)
    denom = 2 * d2 + sum_a * d3
    alpha = torch.where(denom != 0, d2 / torch.where(denom != 0, denom, torch.ones_like(denom)), torch.zeros_like(d2))
    weights = (alpha * torch.relu(d1)).sum(dim=(1, 2))  # = e^S * w_closed
    return torch.einsum("c,chw->hw", weights, acts) / torch.exp(rec.logits[0, cls])


class SmoothHead(nn.Module):
    """features -> (1x1 conv, ReLU, GAP, Linear): smooth exp(score), piecewise-linear score."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 3, stride=2, padding=1), nn.ReLU()
        )
        self.head = nn.Sequential(nn.Conv2d(2, 4, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradcampp_closed_form_matches_autograd_derivatives_of_exp_score(seed: int) -> None:
    torch.manual_seed(seed)
    net = seeded(SmoothHead(), seed=seed)
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    cls = int(net(x).argmax())
    expected = _paper_alpha_map(net, x, "features", cls)
    result = cnnlens.explain(net, x, methods=["gradcampp"], layers=["features"], targets=cls)
    got = result["gradcampp", "features"].raw[0, 0].double()
    assert expected.abs().max() > 0
    torch.testing.assert_close(got, expected, rtol=2e-6, atol=1e-7)


# Hand-computed 2x2 case: activation A = [[1, 2], [3, 4]], score S = sum(w * A), w = [[1, -1], [0.5, 2]].
A = [[1.0, 2.0], [3.0, 4.0]]
W = [1.0, -1.0, 0.5, 2.0]


def _hand_net() -> tuple[nn.Module, torch.Tensor]:
    net = LinearOnMap(W).double().eval()
    return net, torch.tensor([[A]], dtype=torch.float64)


def test_hand_computed_gradcam() -> None:
    net, x = _hand_net()
    e = cnnlens.explain(net, x, methods=["gradcam"], layers=["feat"], targets=0)["gradcam", "feat"]
    # w = mean(g) = (1 - 1 + 0.5 + 2) / 4 = 0.625
    assert e.raw[0, 0].tolist() == [[0.625, 1.25], [1.875, 2.5]]
    # map = normalise(ReLU(raw)) at the same size: (raw - 0.625) / 1.875
    torch.testing.assert_close(e.maps[0, 0], torch.tensor([[0.0, 1 / 3], [2 / 3, 1.0]]), atol=1e-7, rtol=0)
    assert e.scores[0, 0].item() == pytest.approx(1 - 2 + 1.5 + 8)


def test_hand_computed_gradcampp_both_variants() -> None:
    net, x = _hand_net()
    res = cnnlens.explain(net, x, methods=["gradcampp"], layers=["feat"], targets=0)
    # sum(A) = 10; alpha = 1 / (2 + 10 g): g=1 -> 1/12, g=-1 -> -1/8 (relu(g) = 0), g=0.5 -> 1/7, g=2 -> 1/22
    # w = 1/12 * 1 + 1/7 * 0.5 + 1/22 * 2 = 227/924
    w = 227 / 924
    torch.testing.assert_close(
        res["gradcampp", "feat"].raw[0, 0].double(),
        w * torch.tensor(A, dtype=torch.float64),
        rtol=1e-7,
        atol=0,
    )
    res_n = cnnlens.explain(
        net,
        x,
        methods=["gradcampp"],
        layers=["feat"],
        targets=0,
        options={"gradcampp": {"alpha_normalize": True}},
    )
    # authors' variant: alpha / sum(alpha where g > 0) = alpha / (1/12 + 1/7 + 1/22) = alpha * 924/251
    w_n = 227 / 251
    torch.testing.assert_close(
        res_n["gradcampp", "feat"].raw[0, 0].double(),
        w_n * torch.tensor(A, dtype=torch.float64),
        rtol=1e-7,
        atol=0,
    )
    assert res_n["gradcampp", "feat"].variant == {"alpha_normalize": True, "relu": True}


def test_gradcampp_zero_gradient_gives_zero_alpha_not_nan() -> None:
    net = LinearOnMap([0.0, 0.0, 0.0, 0.0]).double().eval()
    x = torch.tensor([[A]], dtype=torch.float64)
    res = cnnlens.explain(net, x, methods=["gradcam", "gradcampp"], layers=["feat"], targets=0)
    for e in res:
        assert torch.isfinite(e.raw).all() and torch.isfinite(e.maps).all()
        assert e.degenerate.all()
        assert (e.maps == 0).all()


def test_gradcampp_vanishing_denominator_is_guarded() -> None:
    # sum(A) = -2 and g = 1 -> 2g^2 + sum(A) g^3 = 0: alpha must be 0 there, not inf.
    net = LinearOnMap([1.0, 1.0, 1.0, 1.0]).double().eval()
    x = torch.tensor([[[[1.0, -1.0], [-1.0, -1.0]]]], dtype=torch.float64)
    with pytest.warns(cnnlens.CnnlensWarning, match="negative"):
        res = cnnlens.explain(net, x, methods=["gradcampp"], layers=["feat"], targets=0)
    e = res["gradcampp", "feat"]
    assert torch.isfinite(e.raw).all()
    assert (e.raw == 0).all() and e.degenerate.all()


def test_vgg_style_fc_head_gradcam_differs_from_cam_identity() -> None:
    # Guard against a trivial pass: without GAP, Grad-CAM is not the sum of gradient * activation.
    net = seeded(VggStyle(inplace=False))
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    rec = record(net, x, "features.3", targets=0)
    g, a = rec.gradients["features.3"][0], rec.activations["features.3"]
    hires = (g * a).sum(1)
    e = cnnlens.explain(net, x, methods=["gradcam"], layers=["features.3"], targets=0)["gradcam", "features.3"]
    assert not torch.allclose(e.raw[:, 0].double(), hires, atol=1e-4)


def _gradcampp_powers(act: torch.Tensor, g: torch.Tensor, alpha_normalize: bool) -> torch.Tensor:
    """The paper's closed form with explicit powers of g (reference for the pole-free evaluation)."""
    sum_a = act.sum(dim=(2, 3), keepdim=True)
    denom = 2 * g**2 + sum_a * g**3
    alpha = torch.where(g != 0, g**2 / torch.where(g != 0, denom, torch.ones_like(denom)), torch.zeros_like(g))
    if alpha_normalize:
        alpha = alpha / (alpha * (g > 0)).sum(dim=(2, 3), keepdim=True)
    weights = (alpha * torch.relu(g)).sum(dim=(2, 3))
    return torch.einsum("bc,bchw->bhw", weights, act)


@pytest.mark.parametrize("alpha_normalize", [False, True])
def test_gradcampp_pole_free_form_equals_powers_form_on_non_negative_activations(alpha_normalize: bool) -> None:
    from cnnlens.methods.cam import gradcampp
    from cnnlens.methods.registry import LayerView

    gen = torch.Generator().manual_seed(3)
    act = torch.relu(torch.randn(2, 5, 4, 4, dtype=torch.float64, generator=gen))
    g = torch.randn(2, 5, 4, 4, dtype=torch.float64, generator=gen) * 10.0 ** torch.randint(-4, 2, (2, 5, 1, 1))
    g[0, 0, 0, :] = 0.0  # zero gradients get alpha 0
    view = LayerView("x", act, g, act, None, torch.zeros(2), torch.zeros(2, dtype=torch.long))
    got = gradcampp(view, alpha_normalize=alpha_normalize)
    torch.testing.assert_close(got, _gradcampp_powers(act, g, alpha_normalize), rtol=1e-12, atol=1e-300)


def test_gradcampp_tiny_gradients_do_not_underflow_to_zero() -> None:
    # g = 1e-170: g^2 and g^3 underflow in float64, yet alpha * relu(g) = g / (2 + sum(A) g) ~ g / 2.
    from cnnlens.methods.cam import gradcampp
    from cnnlens.methods.registry import LayerView

    act = torch.ones(1, 1, 2, 2, dtype=torch.float64)
    g = torch.full((1, 1, 2, 2), 1e-170, dtype=torch.float64)
    view = LayerView("x", act, g, act, None, torch.zeros(1), torch.zeros(1, dtype=torch.long))
    got = gradcampp(view)
    torch.testing.assert_close(got, torch.full((1, 2, 2), 4 * 1e-170 / 2, dtype=torch.float64), rtol=1e-12, atol=0)


def test_upsample_normalize_matches_float64_one_map_at_a_time() -> None:
    from cnnlens.maps import upsample_normalize

    gen = torch.Generator().manual_seed(5)
    maps = [
        torch.relu(torch.randn(2, 3, 7, 7, generator=gen)),  # typical ReLU'd maps
        torch.randn(1, 2, 14, 14, generator=gen),  # signed
        1000.0 + 1e-2 * torch.rand(1, 1, 7, 7, generator=gen),  # large offset: float32 would cancel
        torch.full((1, 1, 7, 7), 3.0),  # flat: degenerate
    ]
    got = upsample_normalize(maps, (28, 28), max_elements=28 * 28 * 3)  # forces several chunks
    for m, (norm, degenerate) in zip(maps, got, strict=True):
        ref, ref_degenerate = normalize(upsample(m.double(), (28, 28)))
        assert norm.dtype == torch.float32 and norm.shape == (*m.shape[:-2], 28, 28)
        assert torch.equal(degenerate, ref_degenerate)
        torch.testing.assert_close(norm.double(), ref, rtol=0, atol=2e-6)
    assert got[3][1].all() and not got[2][1].any()
