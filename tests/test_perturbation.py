"""Score-CAM, Ablation-CAM, Capture.replay and the batching helper.

Oracles: hand-computed cases on a two-channel network whose numbers are written here; a slow literal
re-implementation of Score-CAM's definition (one full forward per channel); the float64 Ablation-CAM formula.
Peers: pytorch-grad-cam's ScoreCAM and AblationCAM on a seeded ResNet-18 (weights=None, 48x48: layer4 is 2x2),
compared after pytorch-grad-cam's own post-processing (``pgc_postprocess`` of tests/test_peers.py).

Documented differences with pytorch-grad-cam:

* ScoreCAM upsamples with ``UpsamplingBilinear2d`` (``align_corners=True``); cnnlens defaults to
  ``align_corners=False``, so the agreement test passes ``align_corners=True``. ScoreCAM also divides by
  ``max - min + 1e-8``: negligible at these activation ranges.
* Ablation-CAM's formula is the same, but on a float32 network ``y - y_k`` is a small difference of two
  float32 logits and ``sum_k w_k A_k`` cancels over 512 signed terms of a random ResNet, so the rounding of
  the logits (which depends on the batch sizes the kernels see) moves *either* library's normalised maps away
  from the float64 formula: measured up to 2e-5 at 64x64 (where the two libraries differed by 2e-5 with
  pytorch-grad-cam's default batch of 32 and by 6e-7 with 128), 2.4e-6 at the 48x48 used here, where the
  test holds both libraries to 1e-5 of each other and of the formula. It also checks cnnlens exactly (1e-9)
  against the formula on a float64 copy of the network, and the fx tail against the hook fallback.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torchvision
from tests.nets import GapHead, Residual, hook_count, seeded
from torch import nn

import cnnlens
from cnnlens.batching import (
    chunk_size,
    measure_peak_bytes,
    plan_chunk,
    resolve_budget,
    run_in_chunks,
    run_measured,
)
from cnnlens.capture import capture, replay_path
from cnnlens.errors import InputShapeError, LayerError, MethodError, OptionError
from cnnlens.execution import Execution
from cnnlens.methods.perturbation import channel_masks, select_channels

# -- tiny hand-weighted networks ----------------------------------------------------------------------


class TwoChannel(nn.Module):
    """1x1 conv (1 -> 2 channels, weights ``conv_w``, no bias) -> ReLU ("feat") -> GAP -> Linear (no bias)."""

    def __init__(self, conv_w: list[float], fc_w: list[list[float]]) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 1, bias=False)
        self.feat = nn.ReLU()
        self.fc = nn.Linear(2, len(fc_w), bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor(conv_w, dtype=torch.float64).view(2, 1, 1, 1))
            self.fc.weight.copy_(torch.tensor(fc_w, dtype=torch.float64))
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.feat(self.conv(x)).mean(dim=(2, 3)))


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, so replay takes the hook path."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x.abs().sum() >= 0):
            return self.inner(x)
        return -self.inner(x)


X_HAND = torch.tensor([[[[1.0, 2.0], [-1.0, 0.0]]]], dtype=torch.float64)


def test_hand_computed_scorecam() -> None:
    # A_1 = relu(x) = [[1, 2], [0, 0]] -> H_1 = [[.5, 1], [0, 0]];  A_2 = relu(-x) = [[0, 0], [1, 0]] = H_2.
    # x*H_1 = [[.5, 2], [0, 0]] -> features (0.625, 0) -> s_1 = 2 * 0.625 = 1.25
    # x*H_2 = [[0, 0], [-1, 0]] -> features (0, 0.25)  -> s_2 = -1 * 0.25 = -0.25
    # w = softmax(1.25, -0.25) = (sigmoid(1.5), 1 - sigmoid(1.5))
    net = TwoChannel([1.0, -1.0], [[2.0, -1.0]])
    res = cnnlens.explain(net, X_HAND, methods=["scorecam"], layers=["feat"], targets=0)["scorecam", "feat"]
    w1 = 1 / (1 + math.exp(-1.5))
    expected = torch.tensor([[w1 * 1, w1 * 2], [(1 - w1) * 1, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(res.raw[0, 0], expected, rtol=1e-12, atol=1e-12)
    assert res.extras["masked_inputs"].tolist() == [[2.0]]


def test_hand_computed_ablationcam() -> None:
    # y = 2 * mean(A_1) - mean(A_2) = 2 * 0.75 - 0.25 = 1.25
    # A_1 := 0 -> y_1 = -0.25 -> w_1 = (1.25 + 0.25) / 1.25 = 1.2
    # A_2 := 0 -> y_2 = 1.5   -> w_2 = (1.25 - 1.5) / 1.25 = -0.2
    net = TwoChannel([1.0, -1.0], [[2.0, -1.0]])
    res = cnnlens.explain(net, X_HAND, methods=["ablationcam"], layers=["feat"], targets=0)["ablationcam", "feat"]
    expected = torch.tensor([[1.2, 2.4], [-0.2, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(res.raw[0, 0], expected, rtol=1e-12, atol=1e-12)
    assert res.extras["score_near_zero"].tolist() == [[0.0]]
    assert res.extras["score_negative"].tolist() == [[0.0]]


def test_ablationcam_score_exactly_zero_is_finite_and_flagged() -> None:
    # conv weights (2, 1): A_1 = 2 A_2 exactly; fc (1, -2): y = 2m - 2m = 0 exactly.
    # y_1 = -2m, y_2 = 2m -> with the guard the weights are (2m/eps, -2m/eps): raw = (2m/eps) * A_2.
    net = TwoChannel([2.0, 1.0], [[1.0, -2.0]])
    res = cnnlens.explain(net, X_HAND, methods=["ablationcam"], layers=["feat"], targets=0)["ablationcam", "feat"]
    assert float(res.scores[0, 0]) == 0.0
    assert torch.isfinite(res.raw).all() and torch.isfinite(res.maps).all()
    assert res.extras["score_near_zero"].tolist() == [[1.0]]
    m = 0.75
    expected = (2 * m / 1e-6) * torch.tensor([[1.0, 2.0], [0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(res.raw[0, 0], expected, rtol=1e-9, atol=0)
    assert not res.degenerate.any()


def test_ablationcam_negative_score_is_flagged() -> None:
    net = TwoChannel([1.0, -1.0], [[-2.0, 1.0]])  # y = -1.25
    res = cnnlens.explain(net, X_HAND, methods=["ablationcam"], layers=["feat"], targets=0)["ablationcam", "feat"]
    assert res.extras["score_negative"].tolist() == [[1.0]]
    # the paper's formula divides by y itself: weights keep the sign of (y - y_k) / y
    expected = torch.tensor([[1.2, 2.4], [-0.2, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(res.raw[0, 0], expected, rtol=1e-12, atol=1e-12)


def test_channel_masks() -> None:
    chans = torch.tensor([[[0.0, 2.0]], [[3.0, 3.0]], [[0.0, 0.0]]], dtype=torch.float64)
    masks = channel_masks(chans, (1, 4))
    assert masks[0].tolist() == [[0.0, 0.25, 0.75, 1.0]]
    assert (masks[1:] == 0).all()  # flat channels: all-zero masks, no NaN
    aligned = channel_masks(chans, (1, 4), align_corners=True)
    torch.testing.assert_close(aligned[0], torch.tensor([[0.0, 1 / 3, 2 / 3, 1.0]], dtype=torch.float64))


def test_select_channels_by_spatial_mean() -> None:
    act = torch.tensor([[[[1.0, 1.0]], [[0.0, 4.0]], [[2.0, 2.0]], [[2.0, 2.0]]]])
    assert select_channels(act, 2).tolist() == [[False, True, True, False]]  # tie 2 vs 3: lower index
    assert select_channels(act, None).all() and select_channels(act, 9).all()


# -- Score-CAM against its literal definition ---------------------------------------------------------


def _net_with_duplicate_and_dead_channels() -> nn.Module:
    net = seeded(GapHead(channels=6, classes=5), seed=4, dtype=torch.float64)
    with torch.no_grad():
        conv = net.body[3]
        conv.weight[1] = conv.weight[0]  # channel 1 duplicates channel 0
        conv.bias[1] = conv.bias[0]
        conv.weight[4] = 0.0  # channel 4 is ReLU(-1) = 0 everywhere (flat)
        conv.bias[4] = -1.0
    return net


def _literal_scorecam(net: nn.Module, x: torch.Tensor, layer: str, classes: list[int]) -> torch.Tensor:
    """One full forward per (image, channel), straight from the paper's definition (float64)."""
    rec = cnnlens.record(net, x, layer, gradients=False)
    act = rec.activations[layer]
    out = []
    for b in range(x.shape[0]):
        scores = []
        for k in range(act.shape[1]):
            up = torch.nn.functional.interpolate(act[b : b + 1, k : k + 1], size=x.shape[-2:], mode="bilinear")[0, 0]
            span = up.max() - up.min()
            mask = (up - up.min()) / span if span > 0 else torch.zeros_like(up)
            with torch.no_grad():
                scores.append(net(x[b : b + 1] * mask)[0, classes[b]])
        w = torch.softmax(torch.stack(scores), dim=0)
        out.append(torch.einsum("c,chw->hw", w, act[b]))
    return torch.stack(out)


def test_scorecam_equals_literal_definition_skipping_duplicates() -> None:
    net = _net_with_duplicate_and_dead_channels()
    x = torch.randn(3, 3, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    classes = [0, 3, 4]
    res = cnnlens.explain(net, x, methods=["scorecam"], layers=["body.4"], targets=classes)["scorecam", "body.4"]
    torch.testing.assert_close(res.raw[:, 0], _literal_scorecam(net, x, "body.4", classes), rtol=1e-10, atol=1e-12)
    # 6 channels, one duplicate and one flat (whose all-zero input is shared): 5 distinct inputs per image
    assert res.extras["masked_inputs"][:, 0].tolist() == [5.0, 5.0, 5.0]


def test_scorecam_chunking_budget_and_layout_do_not_change_the_result() -> None:
    net = _net_with_duplicate_and_dead_channels().float()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    ref = cnnlens.explain(net, x, methods=["scorecam"], layers=["body.4"], targets=[1, 2])["scorecam", "body.4"]
    for ex in (
        Execution(memory_budget_mb=0.01),  # one masked input per chunk
        Execution(memory_budget_mb=4096),
        Execution(chunk_size=3),
        Execution(memory_format="channels_last"),
    ):
        got = cnnlens.explain(net, x, methods=["scorecam"], layers=["body.4"], targets=[1, 2], execution=ex)[
            "scorecam", "body.4"
        ]
        # chunk sizes and layouts select different kernels: equal up to float32 rounding of the map's scale
        assert float((got.raw - ref.raw).abs().max()) <= 1e-5 * float(ref.raw.abs().max()), ex


def test_scorecam_several_targets_share_one_set_of_forwards() -> None:
    net = seeded(GapHead(channels=6, classes=5), seed=1, dtype=torch.float32)
    calls = []
    handle = net.body.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    try:
        x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        cnnlens.explain(net, x, methods=["scorecam"], layers=["body.4"], top_k=1)
        one = sum(calls)
        calls.clear()
        res = cnnlens.explain(net, x, methods=["scorecam"], layers=["body.4"], top_k=3)
        assert sum(calls) == one
    finally:
        handle.remove()
    for t in range(3):
        alone = cnnlens.explain(
            net, x, methods=["scorecam"], layers=["body.4"], targets=res["scorecam", "body.4"].target_classes[:, t]
        )
        torch.testing.assert_close(res["scorecam", "body.4"].raw[:, t], alone["scorecam", "body.4"].raw[:, 0])


def test_scorecam_fast_mode() -> None:
    net = seeded(GapHead(channels=16, classes=5), seed=7, dtype=torch.float64)
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    exact = cnnlens.explain(net, x, methods=["scorecam"], layers=["body.4"])["scorecam", "body.4"]
    full = cnnlens.explain(net, x, methods=["scorecam"], layers=["body.4"], options={"scorecam": {"top_k": 16}})
    torch.testing.assert_close(full["scorecam", "body.4"].raw, exact.raw)
    fast = cnnlens.explain(net, x, methods=["scorecam"], layers=["body.4"], options={"scorecam": {"top_k": 12}})
    got = fast["scorecam", "body.4"]
    assert (got.extras["masked_inputs"] <= 12).all()
    for b in range(3):  # random weights spread the softmax over many channels: fidelity is measured in bench/
        corr = torch.corrcoef(torch.stack([got.maps[b, 0].flatten(), exact.maps[b, 0].flatten()]))[0, 1]
        assert corr > 0.95
    # the definition: softmax restricted to the selected channels, weight 0 elsewhere
    rec = cnnlens.record(net, x, "body.4", gradients=False)
    act = rec.activations["body.4"]
    chosen = select_channels(act, 12)
    for b in range(3):
        cls = int(rec.target_classes[b, 0])
        scores = []
        for k in chosen[b].nonzero().flatten().tolist():
            mask = channel_masks(act[b, k : k + 1], (16, 16))
            with torch.no_grad():
                scores.append(net(x[b : b + 1] * mask)[0, cls])
        w = torch.zeros(16, dtype=torch.float64)
        w[chosen[b]] = torch.softmax(torch.stack(scores), dim=0)
        torch.testing.assert_close(got.raw[b, 0], torch.einsum("c,chw->hw", w, act[b]), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("method", "options", "match"),
    [
        ("scorecam", {"top_k": 0}, "top_k"),
        ("ablationcam", {"eps": 0.0}, "eps"),
    ],
)
def test_invalid_options_raise_clear_errors(method: str, options: dict[str, object], match: str) -> None:
    net = seeded(GapHead(), dtype=torch.float32)
    with pytest.raises(OptionError, match=match):
        cnnlens.explain(net, torch.randn(1, 3, 8, 8), methods=[method], layers=["body.4"], options={method: options})
    assert hook_count(net) == 0


# -- replay: fx tail and hook fallback ----------------------------------------------------------------


@pytest.mark.parametrize("layer", ["bn2", "relu@1", "stem"])
def test_replay_fx_tail_equals_hook_fallback(layer: str) -> None:
    net = seeded(Residual(), seed=2, dtype=torch.float64)
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    wrapped = Untraceable(net)
    results = {}
    for name, model, key in (("fx", net, layer), ("hooks", wrapped, f"inner.{layer}")):
        with capture(model, [key]) as cap:
            rec = cap.run(x, gradients=False)
            act = rec.activations[key]
            rows = torch.cat([act * 0.5, act.flip(-1), torch.zeros_like(act[:1])])
            index = torch.tensor([0, 1, 2, 0, 1, 2, 1])
            results[name] = cap.replay(key, rows, index, inputs=x, logits=rec.logits, batch_budget_mb=0.001)
            assert replay_path(cap, key)[0] == name
            # unmodified rows reproduce the model's logits on both paths
            torch.testing.assert_close(cap.replay(key, act, [0, 1, 2], inputs=x), rec.logits)
        assert hook_count(model) == 0
    torch.testing.assert_close(results["fx"], results["hooks"], rtol=1e-12, atol=1e-12)
    # and the hook path's reason says why
    with capture(wrapped, [f"inner.{layer}"]) as cap:
        assert "torch.fx could not trace" in replay_path(cap, f"inner.{layer}")[1]


def test_replay_errors_leave_no_hooks() -> None:
    net = seeded(Residual(), seed=2, dtype=torch.float64)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    for model, key, path in ((net, "bn2", "fx"), (Untraceable(net), "inner.bn2", "hooks")):
        with capture(model, [key]) as cap:
            cap.run(x, gradients=False)
            with pytest.raises(LayerError, match="replacement activations"):
                cap.replay(key, torch.zeros(2, 5, 8, 8, dtype=torch.float64), [0, 1], inputs=x)
            with pytest.raises(InputShapeError, match="sample indices"):
                cap.replay(key, torch.zeros(2, 8, 8, 8, dtype=torch.float64), [0, 7], inputs=x)
            assert replay_path(cap, key)[0] == path  # a user error does not demote the fx tail
        assert hook_count(model) == 0
    with pytest.raises(LayerError, match="active capture"):
        capture(net, ["bn2"]).replay("bn2", torch.zeros(1, 8, 8, 8), [0], inputs=x)


def test_ablationcam_fallback_gives_the_same_maps() -> None:
    net = seeded(Residual(), seed=3, dtype=torch.float64)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    fx = cnnlens.explain(net, x, methods=["ablationcam"], layers=["bn2", "relu@1"])
    hooks = cnnlens.explain(Untraceable(net), x, methods=["ablationcam"], layers=["inner.bn2", "inner.relu@1"])
    for layer in ("bn2", "relu@1"):
        torch.testing.assert_close(fx["ablationcam", layer].raw, hooks["ablationcam", f"inner.{layer}"].raw)


# -- peers: pytorch-grad-cam ----------------------------------------------------------------------------

cv2 = pytest.importorskip("cv2")
pytest.importorskip("pytorch_grad_cam")
from pytorch_grad_cam import AblationCAM, ScoreCAM  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402
from tests.test_peers import pgc_postprocess  # noqa: E402


@pytest.fixture(scope="module")
def resnet18() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    return net, x


def test_scorecam_matches_pytorch_grad_cam(resnet18: tuple[nn.Module, torch.Tensor]) -> None:
    net, x = resnet18
    x = x[:1]
    with ScoreCAM(model=net, target_layers=[net.layer4]) as cam:
        cam.batch_size = 64
        theirs = cam(input_tensor=x, targets=[ClassifierOutputTarget(3)])
    ours = cnnlens.explain(
        net, x, methods=["scorecam"], layers=["layer4"], targets=3, options={"scorecam": {"align_corners": True}}
    )["scorecam", "layer4"]
    assert np.abs(pgc_postprocess(ours.raw[:, 0].numpy(), (48, 48)) - theirs).max() <= 1e-5


def test_ablationcam_matches_pytorch_grad_cam_and_the_float64_formula(
    resnet18: tuple[nn.Module, torch.Tensor],
) -> None:
    net, x = resnet18
    x, classes = x[1:], [7]
    with AblationCAM(model=net, target_layers=[net.layer4], batch_size=128) as cam:
        theirs = cam(input_tensor=x, targets=[ClassifierOutputTarget(c) for c in classes])
    ours = cnnlens.explain(net, x, methods=["ablationcam"], layers=["layer4"], targets=classes)
    mine = pgc_postprocess(ours["ablationcam", "layer4"].raw[:, 0].numpy(), (48, 48))
    assert np.abs(mine - theirs).max() <= 1e-5  # float32 rounding, amplified by cancellation (module docstring)
    # In float64 the fx tail and the formula agree to rounding. layer4 -> GAP -> fc is the whole tail, so
    # setting channel k to 0 removes exactly its term from the logit.
    net64, x64 = copy.deepcopy(net).double(), x.double()
    fx = cnnlens.explain(net64, x64, methods=["ablationcam"], layers=["layer4"], targets=classes)
    act = cnnlens.record(net64, x64, "layer4", gradients=False).activations["layer4"]
    with torch.no_grad():
        feats = act[0].mean(dim=(1, 2))
        y = feats @ net64.fc.weight[7] + net64.fc.bias[7]
        y_k = y - feats * net64.fc.weight[7]
        formula = torch.einsum("c,chw->hw", (y - y_k) / y, act[0])[None]
    torch.testing.assert_close(fx["ablationcam", "layer4"].raw[:, 0], formula, rtol=1e-9, atol=1e-9)
    # the hook fallback (full float64 forwards: slow, so 24 ablations) gives the fx tail's logits
    rows = act.repeat(24, 1, 1, 1)
    rows[torch.arange(24), torch.arange(0, 480, 20)] = 0
    logits = {}
    for name, model, key in (("fx", net64, "layer4"), ("hooks", Untraceable(net64), "inner.layer4")):
        with capture(model, [key]) as cap:
            cap.run(x64, gradients=False)
            logits[name] = cap.replay(key, rows, [0] * 24, inputs=x64)
            assert replay_path(cap, key)[0] == name
    torch.testing.assert_close(logits["fx"], logits["hooks"], rtol=1e-12, atol=1e-12)
    # both float32 results sit at the same distance from the float64 formula
    want = pgc_postprocess(formula.numpy(), (48, 48))
    assert np.abs(mine - want).max() <= 1e-5 and np.abs(theirs - want).max() <= 1e-5


# -- batching -----------------------------------------------------------------------------------------


def test_chunk_size_and_budget() -> None:
    assert chunk_size(100, 1000, factor=1.0) == 10
    assert chunk_size(100, 1000, factor=1.0, fixed_bytes=500) == 5
    assert chunk_size(10**9, 1000) == 1  # never zero
    assert chunk_size(1, 10**9, n_items=7) == 7
    assert resolve_budget(None, "cpu") == 512 * 2**20
    assert resolve_budget(1.5) == int(1.5 * 2**20)
    for bad in (0, -1, float("nan"), "1"):
        with pytest.raises(MethodError, match="batch_budget_mb"):
            resolve_budget(bad)  # type: ignore[arg-type]


def test_run_in_chunks_covers_every_item_once_in_order() -> None:
    seen: list[tuple[int, int]] = []

    def make(i: int, j: int) -> list[int]:
        seen.append((i, j))
        return list(range(i, j))

    out = run_in_chunks(lambda b: b, 11, make, max_chunk=4)
    assert [v for part in out for v in part] == list(range(11))
    assert seen == [(0, 4), (4, 8), (8, 11)]
    seen.clear()
    out = run_in_chunks(lambda b: b, 11, make, max_chunk=4, chunk=3, start=1)
    assert [v for part in out for v in part] == list(range(1, 11))
    assert seen == [(1, 4), (4, 7), (7, 10), (10, 11)]
    assert run_in_chunks(lambda b: b, 0, make, max_chunk=4) == []


def test_chunks_are_a_pure_function_of_the_budget_and_the_chunk_size() -> None:
    per_item = 10 * 2**20
    assert plan_chunk(per_item, Execution(memory_budget_mb=512)) == chunk_size(per_item, 512 * 2**20) == 34
    assert plan_chunk(per_item, None, "cpu") == 34  # the CPU default budget: 512 MiB
    assert plan_chunk(per_item, Execution(memory_budget_mb=512, chunk_size=8)) == 8
    assert plan_chunk(per_item, Execution(memory_budget_mb=512, chunk_size=100)) == 34  # still capped by the budget
    assert plan_chunk(per_item, Execution(memory_budget_mb=512), n_items=5) == 5
    with pytest.raises(OptionError, match="chunk_size"):
        Execution(chunk_size=0)
    # the first item is measured as real work (no extra call), the rest run in equal planned chunks
    calls: list[tuple[int, int]] = []

    def make(i: int, j: int) -> torch.Tensor:
        calls.append((i, j))
        return torch.ones(j - i, 1 << 16)  # 256 KiB per item

    def work(batch: torch.Tensor) -> torch.Tensor:
        return (batch * 2).sum(dim=1)

    for _ in range(2):  # nothing is remembered: the same call plans the same chunks
        calls.clear()
        parts = run_measured(work, 40, make, execution=Execution(memory_budget_mb=4), item_bytes=1 << 18)
        assert torch.equal(torch.cat(parts), torch.full((40,), 2.0 * (1 << 16)))
        # one item: 256 KiB (x * 2) + 4 B (sum) measured, plus 256 KiB held: 4 MiB // (1.5 * ~512 KiB) = 5
        assert calls == [(0, 1), (1, 6), (6, 11), (11, 16), (16, 21), (21, 26), (26, 31), (31, 36), (36, 40)]
    calls.clear()
    run_measured(work, 10, make, execution=Execution(chunk_size=4))
    assert calls == [(0, 1), (1, 5), (5, 9), (9, 10)]
    assert run_measured(work, 0, make, execution=None) == []


def test_no_process_wide_caches_remain() -> None:
    import cnnlens.batching as batching
    import cnnlens.methods.perturbation as perturbation
    import cnnlens.metrics._forward as forward

    for module in (batching, perturbation, forward):
        assert not hasattr(module, "_TUNERS") and not hasattr(module, "_FOOTPRINT"), module.__name__
    assert not hasattr(batching, "tuner_for") and not hasattr(batching, "ChunkTuner")  # no wall-clock tuning


def test_measure_peak_bytes_counts_live_intermediates() -> None:
    x = torch.ones(1 << 18)  # 1 MiB

    def work() -> torch.Tensor:
        a = x * 2  # 1 MiB
        b = a + 1  # 2 MiB live
        del a
        return b.sum()

    peak = measure_peak_bytes(work)
    assert 2 * 2**20 <= peak < 3 * 2**20
