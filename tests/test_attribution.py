"""Gradient attributions, Integrated Gradients and smoothing: captum agreement, oracles and hygiene."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from captum.attr import (
    Deconvolution,
    GuidedBackprop,
    GuidedGradCam,
    InputXGradient,
    IntegratedGradients,
    Saliency,
)
from tests.nets import GapHead, VggStyle, hook_count, seeded
from torch import nn

import cnnlens
from cnnlens.capture import Capture
from cnnlens.errors import LayerError, MethodError, OptionError
from cnnlens.execution import Execution
from cnnlens.maps import normalize
from cnnlens.methods import get_method
from cnnlens.methods.integrated import quadrature
from cnnlens.methods.registry import apply_display, display_mode
from cnnlens.methods.smooth import noise, noisy_inputs, smooth

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:captum.*")

GRADIENT_METHODS = ["saliency", "input_x_gradient", "guided_backprop", "deconvnet"]


def _x(batch: int = 3, size: int = 8, dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _raw(
    net: nn.Module,
    x: torch.Tensor,
    method: str | Any,
    layer: str,
    targets: Any,
    execution: Execution | None = None,
    **opts: Any,
) -> torch.Tensor:
    spec_id = method if isinstance(method, str) else method.id
    options = {spec_id: opts} if opts else None
    return cnnlens.explain(
        net, x, methods=[method], layers=[layer], targets=targets, options=options, execution=execution
    )[spec_id, layer].raw


# -- captum agreement ------------------------------------------------------------------------------------------


def _captum(method: str, net: nn.Module, x: torch.Tensor, targets: list[int]) -> torch.Tensor:
    if method == "saliency":
        return Saliency(net).attribute(x, target=targets, abs=False)
    if method == "input_x_gradient":
        return InputXGradient(net).attribute(x, target=targets)
    if method == "guided_backprop":
        return GuidedBackprop(net).attribute(x, target=targets)
    return Deconvolution(net).attribute(x, target=targets)


@pytest.mark.parametrize("method", GRADIENT_METHODS)
@pytest.mark.parametrize("arch", ["gap", "vgg"])
def test_gradient_methods_match_captum_float64(method: str, arch: str) -> None:
    net = seeded(GapHead(), seed=1) if arch == "gap" else seeded(VggStyle(inplace=False), seed=1)
    layer = "body.4" if arch == "gap" else "features.4"
    x, targets = _x(), [0, 3, 1]
    ref = _captum(method, net, x, targets)
    assert ref.abs().max() > 1e-3  # a real map, not a trivially equal zero
    got = _raw(net, x, method, layer, targets)[:, 0]
    torch.testing.assert_close(got, ref.sum(dim=1), rtol=1e-9, atol=1e-12)
    for reduce, expected in (("abs_sum", ref.abs().sum(1)), ("max_abs", ref.abs().amax(1))):
        torch.testing.assert_close(_raw(net, x, method, layer, targets, reduce=reduce)[:, 0], expected)


@pytest.mark.parametrize("rule", ["gausslegendre", "riemann_left", "riemann_right", "riemann_middle"])
def test_integrated_gradients_matches_captum_float64(rule: str) -> None:
    net = seeded(VggStyle(inplace=False), seed=2)
    x, targets = _x(seed=1), [1, 0, 3]
    baseline = torch.randn(1, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    ig = IntegratedGradients(net)
    ref, ref_delta = ig.attribute(
        x, baselines=baseline, target=targets, n_steps=20, method=rule, return_convergence_delta=True
    )
    res = cnnlens.explain(
        net,
        x,
        methods=["integrated_gradients"],
        layers=["features.4"],
        targets=targets,
        options={"integrated_gradients": {"steps": 20, "rule": rule, "baseline": baseline}},
        execution=Execution(chunk_size=7),
    )["integrated_gradients", "features.4"]
    torch.testing.assert_close(res.raw[:, 0], ref.sum(dim=1), rtol=1e-6, atol=1e-10)
    torch.testing.assert_close(res.extras["convergence_delta"][:, 0], ref_delta, rtol=1e-5, atol=1e-9)


def test_trapezoid_rule_weights_sum_to_one_unlike_captum() -> None:
    # captum's riemann_trapezoid uses weights 1/n halved at the ends (sum 1 - 1/n); ours 1/(n-1) (sum 1).
    n = 10
    alphas, weights = quadrature(n, "riemann_trapezoid")
    assert weights.sum().item() == pytest.approx(1.0, abs=1e-15)
    torch.testing.assert_close(alphas, torch.linspace(0, 1, n, dtype=torch.float64))
    net = seeded(GapHead(), seed=4)
    x = _x(2)
    ref = IntegratedGradients(net).attribute(x, target=[1, 2], n_steps=n, method="riemann_trapezoid")
    got = _raw(net, x, "integrated_gradients", "body.4", [1, 2], steps=n, rule="riemann_trapezoid")[:, 0]
    torch.testing.assert_close(got, ref.sum(1) * n / (n - 1), rtol=1e-6, atol=1e-12)


def test_gauss_legendre_nodes_match_numpy() -> None:
    np = pytest.importorskip("numpy")
    for n in (1, 2, 7, 50):
        nodes, weights = np.polynomial.legendre.leggauss(n)
        alphas, sizes = quadrature(n)
        torch.testing.assert_close(alphas, torch.tensor((nodes + 1) / 2), rtol=0, atol=1e-13)
        torch.testing.assert_close(sizes, torch.tensor(weights / 2), rtol=0, atol=1e-13)


def test_guided_gradcam_matches_captum_bilinear() -> None:
    net = seeded(VggStyle(inplace=False), seed=3)
    x, targets = _x(), [2, 0, 1]
    ref = GuidedGradCam(net, net.features[3]).attribute(x, target=targets, interpolate_mode="bilinear")
    got = _raw(net, x, "guided_gradcam", "features.3", targets)[:, 0]
    assert ref.abs().max() > 0
    torch.testing.assert_close(got, ref.sum(1), rtol=1e-9, atol=1e-12)
    # the layer matters for guided Grad-CAM (unlike the other attributions)
    other = _raw(net, x, "guided_gradcam", "features.0", targets)[:, 0]
    assert not torch.allclose(got, other)


def test_resnet18_float32_matches_captum() -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None, num_classes=10).eval()  # in-place, reused ReLUs
    x, targets = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(3)), [1, 7]
    res = cnnlens.explain(
        net,
        x,
        methods=["saliency", "guided_backprop", "deconvnet", "integrated_gradients"],
        layers=["layer4"],
        targets=targets,
        options={"integrated_gradients": {"steps": 6}},
        # the default memory format feeds the input as given, as captum does
    )
    refs = {
        "saliency": Saliency(net).attribute(x, target=targets, abs=False),
        "guided_backprop": GuidedBackprop(net).attribute(x, target=targets),
        "deconvnet": Deconvolution(net).attribute(x, target=targets),
        "integrated_gradients": IntegratedGradients(net).attribute(x, target=targets, n_steps=6),
    }
    for method, ref in refs.items():
        expected = ref.sum(1)
        got = res[method, "layer4"].raw[:, 0]
        assert (got - expected).abs().max() <= 1e-4 * expected.abs().max(), method


def test_channels_last_option_computes_the_same_maps_with_contiguous_results() -> None:
    # Execution(memory_format="channels_last") runs CPU forwards channels-last (faster). Its convolution backward is less accurate
    # (tests/test_accuracy.py), so this is no rounding-level check: the same maps within the option's documented
    # error (input gradients up to a few 1e-2 of their maximum on ResNet-50), where a layout bug is off by O(1).
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(3))
    methods = ["gradcam", "gradcampp", "layercam", "saliency", "integrated_gradients"]
    kwargs: dict[str, Any] = {"methods": methods, "layers": ["layer3", "layer4"], "targets": [1, 7]}
    fast = cnnlens.explain(net, x, execution=Execution(memory_format="channels_last"), **kwargs)
    plain = cnnlens.explain(net, x, execution=Execution(memory_format="contiguous"), **kwargs)
    for a, b in zip(fast, plain, strict=True):
        assert a.raw.is_contiguous() and a.maps.is_contiguous()
        tol = 0.1 if a.method in ("saliency", "integrated_gradients") else 1e-3
        assert (a.raw - b.raw).abs().max() <= tol * b.raw.abs().max(), (a.method, a.layer)
    with cnnlens.capture(net, ["layer4"], execution=Execution(memory_format="channels_last")) as cap:
        rec = cap.run(x, targets=1, input_gradients=True)
    assert rec.activations["layer4"].is_contiguous() and rec.gradients["layer4"].is_contiguous()
    assert rec.input_gradients is not None and rec.input_gradients.is_contiguous()


class ViewHead(nn.Module):
    """A model that only works on contiguous feature maps (``.view`` of a conv output), like many old nets."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).view(x.shape[0], -1))


def test_model_that_rejects_channels_last_raises_a_clear_error_once_and_leaves_no_state() -> None:
    # Channels-last is explicit: a model that cannot run it fails with an OptionError naming the fix and keeping
    # the model's own error as the cause; nothing is retried and nothing is remembered (the next call, contiguous
    # by default, works and a second channels-last call fails the same way).
    net = ViewHead().eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(RuntimeError) as premise:
        net(x.contiguous(memory_format=torch.channels_last))  # the premise: channels-last breaks this model
    calls: list[int] = []
    net.register_forward_pre_hook(lambda mod, args: calls.append(1))
    channels_last = Execution(memory_format="channels_last")
    for _ in range(2):
        calls.clear()
        with pytest.raises(OptionError, match=r"channels-last.*Execution\(memory_format='contiguous'\)") as err:
            cnnlens.explain(net, x, methods=["gradcam"], layers=["conv"], targets=0, execution=channels_last)
        assert isinstance(err.value.__cause__, RuntimeError)
        assert str(err.value.__cause__) == str(premise.value)
        assert calls == [1]  # one forward, no hidden retry
        assert hook_count(net) == 1  # only the test's own pre-hook: the capture's hooks are gone
    with cnnlens.capture(net, ["conv"]) as cap, pytest.raises(OptionError, match="channels-last"):
        cap.forward(x, execution=channels_last)
    ref = cnnlens.explain(net, x, methods=["gradcam"], layers=["conv"], targets=0)
    assert ref["gradcam", "conv"].raw.abs().max() > 0


# -- Integrated Gradients: completeness and the reported delta ---------------------------------------------------


class TinyRelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.conv(x)).flatten(1))


@pytest.mark.parametrize("rule", ["gausslegendre", "riemann_trapezoid"])
def test_integrated_gradients_completeness_and_reported_delta(rule: str) -> None:
    net = seeded(TinyRelu(), seed=7)
    x = _x(2, size=6, seed=3)
    baseline = torch.full((3, 6, 6), 0.25, dtype=torch.float64)
    targets = [0, 2]
    deltas = []
    for steps in (8, 1000):
        e = cnnlens.explain(
            net,
            x,
            methods=["integrated_gradients"],
            layers=["conv"],
            targets=targets,
            options={"integrated_gradients": {"steps": steps, "rule": rule, "baseline": baseline}},
        )["integrated_gradients", "conv"]
        gap = net(x)[[0, 1], targets] - net(baseline[None].expand_as(x))[[0, 1], targets]
        actual = e.raw[:, 0].sum(dim=(1, 2)) - gap.detach()
        torch.testing.assert_close(e.extras["convergence_delta"][:, 0], actual, rtol=0, atol=1e-12)
        deltas.append(actual.abs().max().item() / gap.abs().max().item())
    assert deltas[1] < 2e-3  # completeness within tolerance for enough steps
    assert deltas[1] < deltas[0]


def test_integrated_gradients_batching_and_custom_targets() -> None:
    net = seeded(GapHead(), seed=5)
    x = _x(3)
    ref = _raw(net, x, "integrated_gradients", "body.4", [1, 2, 3], Execution(chunk_size=1), steps=9)
    big = _raw(net, x, "integrated_gradients", "body.4", [1, 2, 3], Execution(chunk_size=1000), steps=9)
    torch.testing.assert_close(big, ref)
    # a custom target cannot be re-laid out per row: whole copies of the batch are run instead
    classes = torch.tensor([1, 2, 3])

    def custom(logits: torch.Tensor) -> torch.Tensor:
        return logits.gather(1, classes.view(-1, 1))[:, 0]

    got = _raw(net, x, "integrated_gradients", "body.4", custom, Execution(chunk_size=4), steps=9)
    torch.testing.assert_close(got, ref)


def test_integrated_gradients_rejects_bad_options() -> None:
    net, x = seeded(GapHead()), _x(1)
    with pytest.raises(OptionError, match="rule must be one of"):
        _raw(net, x, "integrated_gradients", "body.4", 0, rule="simpson")
    with pytest.raises(OptionError, match="steps must be an integer"):
        _raw(net, x, "integrated_gradients", "body.4", 0, steps=0)
    with pytest.raises(OptionError, match="baseline must be a number or a tensor"):
        _raw(net, x, "integrated_gradients", "body.4", 0, baseline=torch.zeros(2, 5, 5))


# -- guided backprop / deconvnet: hygiene, in-place, functional, ReLU6 ----------------------------------------------


def _snapshot(model: nn.Module) -> list[Any]:
    state = []
    for name, m in model.named_modules():
        hooks = tuple(
            len(getattr(m, attr, {}))
            for attr in (
                "_forward_hooks",
                "_forward_pre_hooks",
                "_backward_hooks",
                "_backward_pre_hooks",
                "_forward_hooks_with_kwargs",
                "_state_dict_hooks",
            )
        )
        state.append((name, type(m), id(m), m.training, hooks, getattr(m, "inplace", None), "forward" in vars(m)))
    state.append({k: v.clone() for k, v in model.state_dict().items()})
    state.append([p.requires_grad for p in model.parameters()])
    return state


def _same(a: list[Any], b: list[Any]) -> bool:
    if a[:-2] != b[:-2] or a[-1] != b[-1]:
        return False
    return all(torch.equal(a[-2][k], b[-2][k]) for k in a[-2])


def _function_modes() -> int:
    return int(torch._C._len_torch_function_stack())


class FailsOnCall(nn.Module):
    """Raises inside its forward on the given call (the guided pass is the second)."""

    def __init__(self, fail_on: int) -> None:
        super().__init__()
        self.net = seeded(GapHead(inplace=True), seed=2)
        self.fail_on = fail_on
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("boom inside the guided forward")
        return self.net(x)


@pytest.mark.parametrize("method", ["guided_backprop", "deconvnet", "guided_gradcam"])
def test_guided_passes_leave_model_exactly_as_it_was(method: str) -> None:
    model = FailsOnCall(fail_on=2)
    model.net.body[1].train()
    before = _snapshot(model)
    globals_before = (
        len(nn.modules.module._global_forward_hooks),
        len(nn.modules.module._global_backward_hooks),
    )
    with pytest.raises(RuntimeError, match="boom inside the guided forward"):
        cnnlens.explain(model, _x(2), methods=[method], layers=["net.body.4"])
    assert model.calls == 2  # the main capture ran, then the guided pass raised
    assert _same(_snapshot(model), before)
    assert hook_count(model) == 0 and _function_modes() == 0
    assert globals_before == (
        len(nn.modules.module._global_forward_hooks),
        len(nn.modules.module._global_backward_hooks),
    )
    # success leaves everything as it was too, and autograd's own ReLU rule is back afterwards
    cnnlens.explain(model, _x(2), methods=[method], layers=["net.body.4"])
    assert _same(_snapshot(model), before)
    x = _x(2).requires_grad_(True)
    model.eval()
    (grad,) = torch.autograd.grad(model(x)[:, 1].sum(), x)
    torch.testing.assert_close(_raw(model, x.detach(), "saliency", "net.body.4", 1)[:, 0], grad.sum(1))


class Functional(nn.Module):
    """GapHead's computation with functional, tensor-method and in-place ReLUs instead of modules."""

    def __init__(self, ref: GapHead) -> None:
        super().__init__()
        self.ref = copy.deepcopy(ref)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        body = self.ref.body
        h = F.relu(body[1](body[0](x)), inplace=True)
        h = torch.relu(body[3](h))
        return self.ref.fc(self.ref.pool(h).flatten(1))


@pytest.mark.parametrize("method", ["guided_backprop", "deconvnet"])
def test_inplace_and_functional_relus(method: str) -> None:
    plain = seeded(GapHead(inplace=False), seed=6)
    inplace = copy.deepcopy(plain)
    for m in inplace.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = True
    x, targets = _x(), [0, 1, 4]
    ref = _raw(plain, x, method, "body.3", targets)
    torch.testing.assert_close(_raw(inplace, x, method, "body.3", targets), ref, rtol=0, atol=0)
    torch.testing.assert_close(_raw(Functional(plain), x, method, "ref.body.3", targets), ref, rtol=0, atol=0)
    assert ref.abs().max() > 0


class _GuidedRelu6(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, guided: bool) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.guided = guided
        return x.clamp(0, 6)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (x,) = ctx.saved_tensors
        out = grad.clamp(min=0)
        if ctx.guided:
            out = out * ((x > 0) & (x < 6))
        return out, None


class Relu6Net(nn.Module):
    def __init__(self, literal: bool | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 5, 3, padding=1)
        self.conv2 = nn.Conv2d(5, 4, 3, padding=1)
        self.act = nn.ReLU6()
        self.fc = nn.Linear(4, 3)
        self.literal = literal

    def _act(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x) if self.literal is None else _GuidedRelu6.apply(x, self.literal)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self._act(self.conv2(self._act(self.conv1(x) * 4)))
        return self.fc(h.mean(dim=(2, 3)))


@pytest.mark.parametrize(("method", "guided"), [("guided_backprop", True), ("deconvnet", False)])
def test_relu6_uses_the_rule_on_both_sides(method: str, guided: bool) -> None:
    net = seeded(Relu6Net(), seed=8)
    x = _x() * 3
    h = net.conv1(x) * 4
    assert (h > 6).any() and (h < 0).any()  # both clamps are active
    literal = copy.deepcopy(net)
    literal.literal = guided
    xr = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(literal(xr)[:, 2].sum(), xr)
    torch.testing.assert_close(_raw(net, x, method, "conv2", 2)[:, 0], expected.sum(1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["guided_backprop", "deconvnet", "guided_gradcam"])
def test_model_without_relu_gives_a_clear_error(method: str) -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)).double().eval()
    with pytest.raises(LayerError, match="found no ReLU or ReLU6"):
        cnnlens.explain(net, _x(1), methods=[method], layers=["0"])
    assert hook_count(net) == 0 and _function_modes() == 0


def test_invalid_relu_backward_is_refused_before_the_capture_records() -> None:
    # Capture.run validated relu_backward after switching recording on: the error left the capture recording,
    # and the next plain forward in the block went through the recording hook, which turns grad mode on.
    net = seeded(GapHead(), seed=2)
    x = _x(2)
    with cnnlens.capture(net, ["body.4"]) as cap, torch.no_grad():
        with pytest.raises(OptionError, match="relu_backward must be"):
            cap.run(x, relu_backward="bogus")  # type: ignore[arg-type]
        out = net(x)
        assert not torch.is_grad_enabled() and not out.requires_grad
        rec = cap.run(x, targets=0, relu_backward="guided")  # the capture still works afterwards
    assert rec.gradients["body.4"].shape == (1, *rec.activations["body.4"].shape)
    assert hook_count(net) == 0


def test_deconvnet_ignores_the_forward_mask() -> None:
    # Without max-pooling the deconvnet signal never looks at the input: a zero image gets the same map as
    # any image (this is why deconvnet is exempt from the contracts' "zero input gives a degenerate map").
    net = seeded(GapHead(), seed=3)
    zero = _raw(net, torch.zeros(1, 3, 8, 8, dtype=torch.float64), "deconvnet", "body.4", 1)
    some = _raw(net, _x(1), "deconvnet", "body.4", 1)
    torch.testing.assert_close(zero, some)
    assert zero.abs().max() > 0
    guided = _raw(net, torch.zeros(1, 3, 8, 8, dtype=torch.float64), "guided_backprop", "body.4", 1)
    assert (guided == 0).all()


# -- cost: the layer is ignored, passes are shared ------------------------------------------------------------------


def _count_runs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    original = Capture.run

    def counting(self: Capture, inputs: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        calls.append(int(inputs.shape[0]))
        return original(self, inputs, *args, **kwargs)

    monkeypatch.setattr(Capture, "run", counting)
    return calls


def test_layer_is_ignored_and_passes_are_shared(monkeypatch: pytest.MonkeyPatch) -> None:
    net = seeded(GapHead(), seed=1)
    x = _x(2)
    layers = ["body.0", "body.2", "body.4"]
    calls = _count_runs(monkeypatch)
    res = cnnlens.explain(
        net,
        x,
        methods=["saliency", "guided_backprop", "guided_gradcam", "integrated_gradients", "smoothgrad"],
        layers=layers,
        top_k=2,
        options={"integrated_gradients": {"steps": 8}, "smoothgrad": {"n": 6}},
        execution=Execution(chunk_size=4),
    )
    # main capture + one guided pass per target (shared by guided_backprop and guided_gradcam) + 16/4 IG
    # chunks + ceil(12/4) smoothing chunks (both targets in each), whatever the number of layers
    assert len(calls) == 1 + 2 + 4 + 3
    for method in ("saliency", "guided_backprop", "integrated_gradients", "smoothgrad"):
        for layer in layers[1:]:
            torch.testing.assert_close(res[method, layer].raw, res[method, layers[0]].raw, rtol=0, atol=0)


# -- display ------------------------------------------------------------------------------------------------------


def test_display_modes() -> None:
    assert get_method("saliency").variant() == {"reduce": "sum", "display": "abs"}
    assert get_method("gradcam").variant() == {"relu": True}
    assert display_mode({"relu": False}) == "signed"
    assert display_mode({"relu": True}) == "relu"
    assert display_mode({"display": "abs", "relu": True}) == "abs"
    with pytest.raises(OptionError, match="display must be one of"):
        get_method("saliency").variant({"display": "square"})
    with pytest.raises(OptionError, match="has no option 'display'"):
        get_method("gradcam").variant({"display": "abs"})
    net, x = seeded(GapHead(), seed=2), _x(2)
    for display in ("abs", "signed", "relu"):
        e = cnnlens.explain(
            net, x, methods=["input_x_gradient"], layers=["body.4"], options={"input_x_gradient": {"display": display}}
        )["input_x_gradient", "body.4"]
        expected, _ = normalize(apply_display(e.raw.double(), display))
        torch.testing.assert_close(e.maps.double(), expected, rtol=0, atol=1e-6)
        assert e.variant["display"] == display


# -- smoothing ----------------------------------------------------------------------------------------------------


def test_noise_is_per_copy_scaled_and_independent_of_the_batch() -> None:
    x = _x(3, size=16)
    noisy = noisy_inputs(x, 4, 0.2, seed=11)
    for i in range(3):
        torch.testing.assert_close(noisy_inputs(x[i : i + 1], 4, 0.2, seed=11)[:, 0], noisy[:, i], rtol=0, atol=0)
        span = float(x[i].max() - x[i].min())
        torch.testing.assert_close(noisy[2, i] - x[i], 0.2 * span * noise(11, 2, (3, 16, 16)).double())
    assert not torch.equal(noisy, noisy_inputs(x, 4, 0.2, seed=12))
    assert torch.equal(noisy_inputs(x, 2, 0.0)[1], x)


@pytest.mark.parametrize("base", ["saliency", "gradcampp", "guided_backprop", "integrated_gradients"])
def test_smooth_with_one_noiseless_copy_is_the_base_method(base: str) -> None:
    net, x = seeded(GapHead(), seed=4), _x(3)
    spec = smooth(base, n=1, sigma=0.0)
    assert spec.id == f"smooth_{base}"
    res = cnnlens.explain(net, x, methods=[base, spec], layers=["body.4"], top_k=2)
    torch.testing.assert_close(res[spec.id, "body.4"].raw, res[base, "body.4"].raw, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(res[spec.id, "body.4"].maps, res[base, "body.4"].maps)
    assert res[spec.id, "body.4"].extras.keys() == res[base, "body.4"].extras.keys()


def test_smooth_is_deterministic_batch_invariant_and_records_its_variant() -> None:
    net, x = seeded(GapHead(), seed=5, dtype=torch.float32), _x(4, dtype=torch.float32)
    spec = smooth("gradcampp", n=5, sigma=0.2, seed=3)
    rows3 = Execution(chunk_size=3)
    first = cnnlens.explain(net, x, methods=[spec], layers=["body.4"], execution=rows3)["smooth_gradcampp", "body.4"]
    again = cnnlens.explain(net, x, methods=[spec], layers=["body.4"], execution=rows3)["smooth_gradcampp", "body.4"]
    torch.testing.assert_close(first.raw, again.raw, rtol=0, atol=0)
    assert first.variant == {"alpha_normalize": False, "n": 5, "sigma": 0.2, "seed": 3, "relu": True}
    other = cnnlens.explain(net, x, methods=[spec], layers=["body.4"], options={"smooth_gradcampp": {"seed": 4}})
    assert not torch.allclose(other["smooth_gradcampp", "body.4"].raw, first.raw)
    plain = cnnlens.explain(net, x, methods=["gradcampp"], layers=["body.4"])["gradcampp", "body.4"]
    assert not torch.allclose(plain.raw, first.raw)
    # other batch shapes may select other float32 kernels: equal up to rounding relative to the map's scale
    for i in range(4):
        alone = cnnlens.explain(net, x[i : i + 1], methods=[spec], layers=["body.4"])["smooth_gradcampp", "body.4"]
        assert float((alone.raw[0] - first.raw[i]).abs().max()) <= 1e-5 * float(first.raw[i].abs().max())
    rows64 = Execution(chunk_size=64)
    chunked = cnnlens.explain(net, x, methods=[spec], layers=["body.4"], execution=rows64)["smooth_gradcampp", "body.4"]
    assert float((chunked.raw - first.raw).abs().max()) <= 1e-5 * float(first.raw.abs().max())


def test_smooth_averages_the_base_maps_of_the_noisy_copies() -> None:
    net, x = seeded(GapHead(), seed=6), _x(2)
    n, sigma, seed = 4, 0.3, 2
    classes = net(x).argmax(1)  # the targets stay fixed to the clean input's classes
    noisy = noisy_inputs(x, n, sigma, seed)
    expected = torch.stack([_raw(net, noisy[j], "gradcampp", "body.4", classes) for j in range(n)]).mean(0)
    got = _raw(net, x, smooth("gradcampp", n=n, sigma=sigma, seed=seed), "body.4", None)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_smooth_rejects_bad_parameters() -> None:
    with pytest.raises(OptionError, match="sigma must be a number >= 0"):
        smooth("saliency", sigma=-0.1)
    with pytest.raises(OptionError, match="n must be an integer >= 1"):
        smooth("saliency", n=0)
    with pytest.raises(MethodError, match="already has the option"):
        smooth("smoothgrad")


def _literal_smooth_gradcampp(
    net: nn.Module, layer: nn.Module, x: torch.Tensor, classes: torch.Tensor, n: int, sigma: float, seed: int
) -> torch.Tensor:
    """Omeiza et al.'s formula written out: D1..D3 over the noisy copies, A and sum(A) from the clean input."""
    store: dict[str, torch.Tensor] = {}
    handle = layer.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    try:
        grads = []
        for xj in noisy_inputs(x, n, sigma, seed):
            out = net(xj)
            (g,) = torch.autograd.grad(out[torch.arange(len(classes)), classes].sum(), store["a"])
            grads.append(g)
        with torch.no_grad():
            net(x)
        acts = store["a"].detach()
    finally:
        handle.remove()
    g = torch.stack(grads)
    d1, d2, d3 = g.mean(0), (g**2).mean(0), (g**3).mean(0)
    out = torch.zeros(acts.shape[0], *acts.shape[2:], dtype=acts.dtype)
    for b in range(acts.shape[0]):
        for k in range(acts.shape[1]):
            s = acts[b, k].sum()
            w = 0.0
            for i in range(acts.shape[2]):
                for j in range(acts.shape[3]):
                    denom = 2 * d2[b, k, i, j] + s * d3[b, k, i, j]
                    if d2[b, k, i, j] != 0 and denom != 0:
                        w += d2[b, k, i, j] / denom * max(float(d1[b, k, i, j]), 0.0)
            out[b] += w * acts[b, k]
    return out


def test_smoothgradcampp_matches_the_literal_formula() -> None:
    net, x = seeded(GapHead(), seed=9), _x(2)
    classes = net(x).argmax(1)
    expected = _literal_smooth_gradcampp(net, net.body[4], x, classes, n=5, sigma=0.25, seed=7)
    got = _raw(net, x, "smoothgradcampp", "body.4", None, Execution(chunk_size=3), n=5, sigma=0.25, seed=7)[:, 0]
    assert expected.abs().max() > 0
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    # one noiseless copy is Grad-CAM++ itself
    one = _raw(net, x, "smoothgradcampp", "body.4", None, n=1, sigma=0.0)
    torch.testing.assert_close(one, _raw(net, x, "gradcampp", "body.4", None), rtol=1e-10, atol=1e-12)
