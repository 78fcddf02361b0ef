"""Contract tests generated from the method registry: every registered method must honour them."""

from __future__ import annotations

import copy

import pytest
import torch
from tests.nets import Exploding, GapHead, Residual, VggStyle, Wrapped, hook_count, seeded
from torch import nn

import cnnlens
from cnnlens.errors import LayerNotFoundError, MethodError
from cnnlens.methods import get_method, method_ids

# Methods defined on vision transformers' attention only (rollout, attngrad) refuse these CNNs (tested below);
# their contracts on token models are in tests/test_transformer_methods.py.
ATTENTION_METHODS = [m for m in method_ids() if "attention" in get_method(m).needs]
METHODS = [m for m in method_ids() if m not in ATTENTION_METHODS]


def _net() -> nn.Module:
    return seeded(GapHead(channels=6, classes=5), seed=3, dtype=torch.float32)


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def _close_to_scale(got: torch.Tensor, ref: torch.Tensor, rel: float) -> None:
    """``|got - ref| <= rel * max|ref|``: the error allowed scales with the map, not with each element."""
    scale = float(ref.abs().max())
    err = float((got - ref).abs().max())
    assert err <= rel * scale, f"max |diff| {err:.3g} > {rel:g} x the map's max |value| {scale:.3g}"


# A map's value never depends on which other images share its batch. In float64 that holds to the last few bits
# whatever convolution kernels the batch size selects. In float32 the batched and per-sample forwards may run
# different kernels, whose rounding differs; methods that subtract nearly equal logits (Ablation-CAM's
# (y - y_k) / y) lose relative precision in that difference, so the error is bounded relative to the map's scale
# (1e-4, about 800 float32 ulps; a map computed with another sample's weights is off by O(1)).
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("method", METHODS)
def test_batch_equals_per_sample(method: str, dtype: torch.dtype, batch: torch.Tensor) -> None:
    net = _net().to(dtype)
    x = batch.to(dtype)
    rel = 1e-12 if dtype == torch.float64 else 1e-4
    together = cnnlens.explain(net, x, methods=[method], layers=["body.2", "body.4"], targets=[0, 1, 2, 3])
    for i in range(x.shape[0]):
        alone = cnnlens.explain(net, x[i : i + 1], methods=[method], layers=["body.2", "body.4"], targets=i)
        for layer in ("body.2", "body.4"):
            a, b = together[method, layer], alone[method, layer]
            _close_to_scale(a.raw[i], b.raw[0], rel)
            _close_to_scale(a.maps[i], b.maps[0], rel)  # maps are normalised to [0, 1]: scale 1
            assert bool(a.degenerate[i, 0]) == bool(b.degenerate[0, 0])


@pytest.mark.parametrize("method", METHODS)
def test_batch_order_and_duplicates_do_not_change_maps(method: str, batch: torch.Tensor) -> None:
    # float64: batches of 4 and 5 may run different kernels; the contract must not depend on their rounding
    net = _net().double()
    x = batch.double()
    ref = cnnlens.explain(net, x, methods=[method], layers=["body.4"])[method, "body.4"]
    perm = torch.tensor([3, 0, 0, 2, 1])
    shuffled = cnnlens.explain(net, x[perm], methods=[method], layers=["body.4"])[method, "body.4"]
    torch.testing.assert_close(shuffled.maps, ref.maps[perm], rtol=0, atol=1e-12)
    assert torch.equal(shuffled.degenerate, ref.degenerate[perm])


@pytest.mark.parametrize("method", METHODS)
def test_no_hook_left_after_success_or_exception(method: str, batch: torch.Tensor) -> None:
    net = _net()
    before = hook_count(net)
    cnnlens.explain(net, batch, methods=[method], layers=["body.4"])
    assert hook_count(net) == before
    bad = Exploding()
    before = hook_count(bad)
    with pytest.raises(RuntimeError, match="boom inside forward"):
        cnnlens.explain(bad, batch[:1], methods=[method], layers=["conv"])
    assert hook_count(bad) == 0 == before
    # a layer-name error leaves nothing either
    with pytest.raises(LayerNotFoundError):
        cnnlens.explain(net, batch, methods=[method], layers=["body.44"])
    assert hook_count(net) == 0


@pytest.mark.parametrize("method", ATTENTION_METHODS)
def test_attention_methods_refuse_a_cnn_and_leave_nothing(method: str, batch: torch.Tensor) -> None:
    net = _net()
    with pytest.raises(MethodError, match="GapHead has no supported attention module"):
        cnnlens.explain(net, batch, methods=[method], layers=["body.4"])
    assert hook_count(net) == 0


@pytest.mark.parametrize("method", METHODS)
def test_model_state_restored_and_parameter_grads_untouched(method: str, batch: torch.Tensor) -> None:
    net = _net()
    net.train()
    net.body[1].eval()  # a mixed state must come back exactly
    net.fc.weight.requires_grad_(False)
    net.body[0].weight.grad = torch.full_like(net.body[0].weight, 7.0)
    flags = {name: m.training for name, m in net.named_modules()}
    req = {name: p.requires_grad for name, p in net.named_parameters()}
    stats = net.body[1].running_mean.clone()
    with torch.enable_grad():
        cnnlens.explain(net, batch, methods=[method], layers=["body.4"])
    assert {name: m.training for name, m in net.named_modules()} == flags
    assert {name: p.requires_grad for name, p in net.named_parameters()} == req
    assert torch.equal(net.body[1].running_mean, stats)  # ran in eval mode: BN statistics not updated
    assert torch.equal(net.body[0].weight.grad, torch.full_like(net.body[0].weight, 7.0))
    assert all(p.grad is None for name, p in net.named_parameters() if name != "body.0.weight")
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("method", METHODS)
def test_train_mode_model_gives_eval_result(method: str, batch: torch.Tensor) -> None:
    net = _net()
    ref = cnnlens.explain(net, batch, methods=[method], layers=["body.4"])[method, "body.4"]
    net.train()
    got = cnnlens.explain(net, batch, methods=[method], layers=["body.4"])[method, "body.4"]
    torch.testing.assert_close(got.maps, ref.maps)
    assert net.training


@pytest.mark.parametrize("method", METHODS)
def test_reversed_layer_lists_give_same_maps(method: str, batch: torch.Tensor) -> None:
    net = _net()
    layers = ["body.0", "body.2", "body.3", "body.4"]
    fwd = cnnlens.explain(net, batch, methods=[method], layers=layers)
    rev = cnnlens.explain(net, batch, methods=[method], layers=layers[::-1])
    scope = get_method(method).scope
    assert rev.layers == (layers[::-1] if scope == "layer" else [scope])
    assert len(rev) == (len(layers) if scope == "layer" else 1)  # one Explanation for input/network scope
    for layer in layers:
        torch.testing.assert_close(fwd[method, layer].raw, rev[method, layer].raw)
    single = cnnlens.explain(net, batch, methods=[method], layers=["body.2"])
    torch.testing.assert_close(single[method, "body.2"].raw, fwd[method, "body.2"].raw)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("seed", range(6))
def test_values_always_finite_and_in_range(method: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    net = seeded(GapHead(), seed=seed, dtype=torch.float32)
    scale = [1e-6, 1.0, 1e4][seed % 3]
    x = torch.randn(2, 3, 16, 16, generator=gen) * scale
    res = cnnlens.explain(net, x, methods=[method], layers=["body.0", "body.4"], top_k=2)
    for e in res:
        assert torch.isfinite(e.raw).all() and torch.isfinite(e.maps).all()
        assert e.maps.min() >= 0 and e.maps.max() <= 1
        nondeg = ~e.degenerate
        if nondeg.any():
            flat = e.maps[nondeg].flatten(1)
            assert torch.allclose(flat.max(1).values, torch.ones(flat.shape[0]))
        assert (e.maps[e.degenerate] == 0).all()


@pytest.mark.parametrize("method", METHODS)
def test_random_inputs_give_informative_maps(method: str, batch: torch.Tensor) -> None:
    # Guards against silently empty results (e.g. a capture that cuts the graph): most maps must carry signal.
    net = _net()
    res = cnnlens.explain(net, batch, methods=[method], layers=["body.2", "body.4"], top_k=2)
    for e in res:
        assert (~e.degenerate).float().mean() >= 0.5, f"{method} at {e.layer}: mostly degenerate maps"
        assert e.raw.abs().amax() > 0


@pytest.mark.parametrize("method", METHODS)
def test_zero_input_gives_degenerate_not_nan(method: str) -> None:
    if method == "deconvnet":
        pytest.skip("deconvnet has no forward mask: on a network without max-pooling its map does not vanish at x=0")
    net = seeded(GapHead(), dtype=torch.float32)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                m.bias.zero_()
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.zero_()
                m.bias.zero_()
    res = cnnlens.explain(net, torch.zeros(1, 3, 8, 8), methods=[method], layers=["body.4"])
    e = res[method, "body.4"]
    assert e.degenerate.all() and (e.maps == 0).all() and torch.isfinite(e.raw).all()


@pytest.mark.parametrize("method", METHODS)
def test_several_targets_equal_separate_calls(method: str, batch: torch.Tensor) -> None:
    net = _net()
    multi = cnnlens.explain(net, batch, methods=[method], layers=["body.4"], top_k=3)[method, "body.4"]
    order = net(batch).argsort(dim=1, descending=True)
    for t in range(3):
        one = cnnlens.explain(net, batch, methods=[method], layers=["body.4"], targets=order[:, t])[method, "body.4"]
        torch.testing.assert_close(multi.raw[:, t], one.raw[:, 0])
        assert torch.equal(multi.target_classes[:, t], order[:, t])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["tuple", "dict", "inception", "attr"])
def test_wrapped_outputs(method: str, kind: str, batch: torch.Tensor) -> None:
    inner = _net()
    ref = cnnlens.explain(inner, batch, methods=[method], layers=["body.4"])[method, "body.4"]
    got = cnnlens.explain(Wrapped(inner, kind), batch, methods=[method], layers=["inner.body.4"])[
        method, "inner.body.4"
    ]
    torch.testing.assert_close(got.raw, ref.raw)


@pytest.mark.parametrize("method", METHODS)
def test_inplace_relu_after_target_layer(method: str) -> None:
    inplace = seeded(VggStyle(inplace=True), seed=5, dtype=torch.float32)
    plain = copy.deepcopy(inplace)
    for m in plain.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    a = cnnlens.explain(inplace, x, methods=[method], layers=["features.3", "features.4"])
    b = cnnlens.explain(plain, x, methods=[method], layers=["features.3", "features.4"])
    for layer in ("features.3", "features.4"):
        torch.testing.assert_close(a[method, layer].raw, b[method, layer].raw)
    # the conv output (pre-ReLU) keeps its negative values: it was not modified by the in-place ReLU
    rec = cnnlens.record(inplace, x, ["features.3"], gradients=False)
    assert (rec.activations["features.3"] < 0).any()


@pytest.mark.parametrize("method", METHODS)
def test_residual_inplace_add(method: str) -> None:
    net = seeded(Residual(), seed=2, dtype=torch.float64)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    res = cnnlens.explain(net, x, methods=[method], layers=["bn2", "stem", "relu@1"])
    for e in res:
        assert torch.isfinite(e.raw).all()
    # bn2's recorded output is the value before `out += identity`
    rec = cnnlens.record(net, x, ["bn2", "conv2"], gradients=False)
    expected = net.bn2(rec.activations["conv2"])
    torch.testing.assert_close(rec.activations["bn2"], expected)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models(method: str, dtype: torch.dtype, batch: torch.Tensor) -> None:
    # A half-precision model must give the maps of the same (rounded) weights and input computed in float32, up
    # to the half type's working precision: the bound is in units of its epsilon (float16 9.8e-4, bfloat16
    # 7.8e-3), relative to the map's scale for the raw maps and absolute for the [0, 1] maps.
    half = copy.deepcopy(_net()).to(dtype)
    x = batch.to(dtype)
    got = cnnlens.explain(half, x, methods=[method], layers=["body.4"])[method, "body.4"]
    ref = cnnlens.explain(copy.deepcopy(half).float(), x.float(), methods=[method], layers=["body.4"])[method, "body.4"]
    assert torch.isfinite(got.maps).all() and torch.isfinite(got.raw).all()
    eps = torch.finfo(dtype).eps
    scale = ref.raw.abs().flatten(2).amax(-1)[..., None, None].clamp(min=torch.finfo(torch.float32).tiny)
    assert float(((got.raw.float() - ref.raw).abs() / scale).max()) <= 32 * eps
    assert float((got.maps.float() - ref.maps).abs().mean()) <= 4 * eps
    assert torch.equal(got.target_classes, ref.target_classes)
    # a float32 input into a half model is cast at the edge: the same result as casting it first
    edge = cnnlens.explain(half, batch, methods=[method], layers=["body.4"])[method, "body.4"]
    assert torch.equal(edge.raw, got.raw) and torch.equal(edge.maps, got.maps)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["gradcam", "gradcampp", "hirescam", "layercam"])
def test_cpu_and_cuda_maps_agree_on_conv_before_inplace_relu(method: str) -> None:
    net = seeded(VggStyle(inplace=True), seed=5, dtype=torch.float32)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    cpu = cnnlens.explain(net, x, methods=[method], layers=["features.3"])[method, "features.3"]
    gpu = cnnlens.explain(copy.deepcopy(net).cuda(), x.cuda(), methods=[method], layers=["features.3"])
    torch.testing.assert_close(gpu[method, "features.3"].raw.cpu(), cpu.raw, rtol=1e-4, atol=1e-5)
