"""FullGrad: exact completeness oracles (without BN, with BN folded) and agreement with pytorch-grad-cam."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import cnnlens
from cnnlens.capture import capture
from cnnlens.explain import _ran
from cnnlens.methods import get_method
from cnnlens.methods.fullgrad import bias_modules, effective_bias, fullgrad_decomposition
from cnnlens.methods.registry import LayerView, NetworkRecord


def _relu_net(seed: int = 0) -> nn.Module:
    """conv -> ReLU -> maxpool -> conv -> ReLU -> GAP -> linear, every layer with a bias, no BN."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 5, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(5, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )
    for p in net.parameters():  # biases of the same order as the weights' contributions
        nn.init.uniform_(p, -0.5, 0.5)
    return net.double().eval()


def _bn_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 5, 3, padding=1),
        nn.BatchNorm2d(5),
        nn.ReLU(),
        nn.Conv2d(5, 4, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )
    bn = net[1]
    assert isinstance(bn, nn.BatchNorm2d)
    assert bn.running_mean is not None and bn.running_var is not None
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return net.double().eval()


def _fold(net: nn.Sequential) -> nn.Sequential:
    """The same function with the BN folded into the conv before it: W' = W g/s, b' = g (b - mu)/s + beta."""
    conv, bn = net[0], net[1]
    assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and conv.bias is not None
    assert bn.running_var is not None and bn.running_mean is not None
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    folded = nn.Conv2d(3, 5, 3, padding=1).double()
    assert folded.bias is not None
    with torch.no_grad():
        folded.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
        folded.bias.copy_(scale * (conv.bias - bn.running_mean) + bn.bias)
    return nn.Sequential(folded, *list(net)[2:]).eval()


def _decompose(
    net: nn.Module, x: torch.Tensor, target: int, keys: list[str] | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    names = keys if keys is not None else bias_modules(net)
    with capture(net, names) as cap:
        rec = cap.run(x, target, gradients=True, input_gradients=True)
    modules = dict(net.named_modules())
    picked = {n: modules[n.split("@")[0]] for n in names}
    network = NetworkRecord(picked, rec.activations, {k: v[0] for k, v in rec.gradients.items()})
    view = LayerView.of(rec, "network", 0, network=network)
    input_term, bias_terms = fullgrad_decomposition(view)
    assert rec.scores is not None
    return input_term, bias_terms, rec.scores[:, 0]


def _total(input_term: torch.Tensor, bias_terms: dict[str, torch.Tensor]) -> torch.Tensor:
    return input_term.flatten(1).sum(1) + sum(t.flatten(1).sum(1) for t in bias_terms.values())


@pytest.mark.parametrize("target", [0, 2])
def test_completeness_without_bn_is_exact(target: int) -> None:
    net = _relu_net()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    input_term, bias_terms, score = _decompose(net, x, target)
    assert set(bias_terms) == {"0", "3", "7"}  # both convs and the classifier
    torch.testing.assert_close(_total(input_term, bias_terms), score, rtol=1e-12, atol=1e-12)
    assert float(sum(t.abs().sum() for t in bias_terms.values())) > 1e-3  # biases matter: the check can fail
    # Without the bias terms the decomposition is not complete (the oracle can fail).
    assert not torch.allclose(input_term.flatten(1).sum(1), score, atol=1e-6)


def test_completeness_with_bn_and_folded_bn_agree() -> None:
    net = _bn_net()
    folded = _fold(net)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(net(x), folded(x), rtol=1e-12, atol=1e-12)
    in_u, bias_u, score_u = _decompose(net, x, 1)
    in_f, bias_f, score_f = _decompose(folded, x, 1)
    torch.testing.assert_close(_total(in_u, bias_u), score_u, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(_total(in_f, bias_f), score_f, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(in_u, in_f, rtol=1e-10, atol=1e-12)
    # The folded conv's bias term is the unfolded conv's plus the BN's, position by position.
    torch.testing.assert_close(bias_f["0"], bias_u["0"] + bias_u["1"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(bias_f["2"], bias_u["3"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(bias_f["6"], bias_u["7"], rtol=1e-10, atol=1e-12)


def test_effective_bias_of_bn_is_its_eval_intercept() -> None:
    bn = _bn_net()[1]
    zero = torch.zeros(1, 5, 1, 1, dtype=torch.float64)
    torch.testing.assert_close(effective_bias(bn), bn(zero).flatten())


def test_registered_network_scope_one_explanation() -> None:
    spec = get_method("fullgrad")
    assert spec.scope == "network" and spec.records is bias_modules and "NeurIPS 2019" in spec.paper
    net = _relu_net().float()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    res = cnnlens.explain(net, x, methods=["fullgrad", "gradcam"], layers=["0", "3"])
    assert [(e.method, e.layer) for e in res] == [("fullgrad", "network"), ("gradcam", "0"), ("gradcam", "3")]
    e = res["fullgrad", None]
    assert e.raw.shape == (2, 1, 8, 8) and bool((e.raw >= 0).all())
    assert res["fullgrad", "3"] is e  # any layer name: the map does not depend on it


def _pgc_term(term: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """pytorch-grad-cam's per-term post-processing: |.|, min-max per channel (1e-7), cv2 resize, channel sum."""
    cv2 = pytest.importorskip("cv2")
    out = np.zeros((term.shape[0], *size), dtype=np.float32)
    for b in range(term.shape[0]):
        for c in range(term.shape[1]):
            m = np.abs(term[b, c])
            m = m - m.min()
            m = m / (1e-7 + m.max())
            out[b] += cv2.resize(np.float32(m), (size[1], size[0]))
    return out


def test_decomposition_matches_pytorch_grad_cam_fullgrad() -> None:
    """Same terms, then pgc's own post-processing applied to ours: equal to their FullGrad output."""
    pytest.importorskip("cv2")
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # type: ignore[import-untyped]

    net = _bn_net().float()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    with pgc.FullGrad(model=net, target_layers=[]) as cam:
        theirs = cam(input_tensor=x, targets=[ClassifierOutputTarget(1), ClassifierOutputTarget(1)])
    input_term, bias_terms, _ = _decompose(net, x, 1)
    total = _pgc_term(input_term.numpy(), (16, 16))
    for name in ("0", "1", "3"):  # Conv2d and BatchNorm2d only (pgc ignores the Linear)
        total += _pgc_term(bias_terms[name].numpy(), (16, 16))
    total = total - total.min(axis=(1, 2), keepdims=True)
    total = total / (1e-7 + total.max(axis=(1, 2), keepdims=True))
    assert np.abs(total - theirs).max() <= 1e-4


def test_single_channel_maps_match_pytorch_grad_cam() -> None:
    """Where the formulas coincide (one channel per term, every term at input resolution) the maps agree."""
    pytest.importorskip("cv2")
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(5)
    net = nn.Sequential(
        nn.Conv2d(1, 1, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(1, 1, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(1, 2),
    ).eval()
    with torch.no_grad():
        for m in (net[0], net[2]):
            assert isinstance(m, nn.Conv2d) and m.bias is not None
            m.bias.fill_(0.3)
    x = torch.rand(2, 1, 12, 12, generator=torch.Generator().manual_seed(6))
    with pgc.FullGrad(model=net, target_layers=[]) as cam:
        theirs = cam(input_tensor=x, targets=[ClassifierOutputTarget(0), ClassifierOutputTarget(0)])
    ours = cnnlens.explain(net, x, methods=["fullgrad"], targets=0)["fullgrad", None]
    assert not bool(ours.degenerate.any())
    assert np.abs(ours.maps[:, 0].numpy() - theirs).max() <= 1e-4


class _SharedAndUnused(nn.Module):
    """A conv applied twice (shared) and an auxiliary conv that never runs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.aux = nn.Conv2d(3, 3, 1)
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x))
        x = torch.relu(self.conv(x))
        return self.fc(x.mean((2, 3)))  # type: ignore[no-any-return]


def test_shared_modules_count_every_call_and_unused_ones_are_skipped() -> None:
    torch.manual_seed(7)
    net = _SharedAndUnused().double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    keys = _ran(net, bias_modules(net), x)
    assert keys == ["conv@0", "conv@1", "fc"]
    input_term, bias_terms, score = _decompose(net, x, 1, keys)
    torch.testing.assert_close(_total(input_term, bias_terms), score, rtol=1e-12, atol=1e-12)
    # one call only would miss a term: the check can fail
    partial = {k: v for k, v in bias_terms.items() if k != "conv@1"}
    assert not torch.allclose(_total(input_term, partial), score, atol=1e-6)
    res = cnnlens.explain(net.float(), x.float(), methods=["fullgrad"], layers=["conv@1"])
    assert res["fullgrad", None].raw.shape == (2, 1, 8, 8)
