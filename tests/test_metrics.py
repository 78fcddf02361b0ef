"""cnnlens.metrics: exact oracles, literal re-implementations of the papers' code, and peer checks.

Oracles:

* Average Drop / Increase in Confidence: E = I gives 0 and 0; a map of zeros gives O = f(baseline) in both
  spaces; hand-computed values; pytorch-grad-cam's ``CamMultImageConfidenceChange`` (normalised space).
* Deletion / insertion: a slow literal port of RISE's ``CausalMetric.single_run`` (one forward per step,
  numpy in-place pixel copies, ``np.flip(np.argsort(...))``), RISE's ``gkern`` from scipy; a toy "sum of the
  pixels in a box" model where the oracle map must give monotone curves and oracle < random < anti-oracle.
* ROAD: the noisy linear imputation of the ROAD authors (vendored in pytorch-grad-cam) with noise 0; exact
  reproduction of constants and linear ramps; MoRF < LeRF for the oracle map.
* Localisation: hand-made maps and boxes (tolerance, ties, flat maps, empty boxes).
* Similarity: scipy's ``rankdata``/``spearmanr`` and scikit-image's ``structural_similarity``.
* Randomisation: Grad-CAM on a seeded CNN changes and the metric reports it; the user's model, flags and RNG
  are untouched.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from tests.nets import hook_count, seeded
from torch import nn

import cnnlens
from cnnlens import metrics
from cnnlens.errors import InputShapeError, TargetError
from cnnlens.execution import Execution
from cnnlens.metrics import MetricError, MetricOptions
from cnnlens.models import LoadedModel, ModelSpec, Preprocessing

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
IMAGENET = MetricOptions(mean=MEAN, std=STD)
UNIT = MetricOptions(mean=0.0, std=1.0)


# -- toy models ---------------------------------------------------------------------------------------


class BoxSum(nn.Module):
    """Logits ``[w · Σ_{box, channels} x − offset, 0]``: class 0's evidence is the sum of the pixels in a box."""

    def __init__(self, box: tuple[int, int, int, int], weight: float, offset: float) -> None:
        super().__init__()
        self.box = box  # (y0, y1, x0, x1)
        self.weight = weight
        self.offset = offset
        self.bias = nn.Parameter(torch.zeros(2, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y0, y1, x0, x1 = self.box
        s = x[:, :, y0:y1, x0:x1].sum(dim=(1, 2, 3)) * self.weight - self.offset
        return torch.stack([s, torch.zeros_like(s)], dim=1) + self.bias


def tiny_cnn(classes: int = 5, seed: int = 0, dropout: bool = False) -> nn.Module:
    layers: list[nn.Module] = [
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    ]
    if dropout:
        layers.append(nn.Dropout(0.5))
    layers.append(nn.Linear(8, classes))
    return seeded(nn.Sequential(*layers), seed)


def box_setup(size: int = 16) -> tuple[BoxSum, torch.Tensor, torch.Tensor]:
    """A BoxSum model on a box covering a quarter of the image, an image that is positive only in the box."""
    box = (4, 12, 2, 10)
    gen = torch.Generator().manual_seed(3)
    x = torch.zeros(1, 3, size, size, dtype=torch.float64)
    x[:, :, 4:12, 2:10] = 0.5 + 0.5 * torch.rand(1, 3, 8, 8, generator=gen, dtype=torch.float64)
    total = float(x.sum())
    model = BoxSum(box, weight=6.0 / total, offset=3.0)
    oracle = torch.zeros(1, size, size, dtype=torch.float64)
    oracle[:, 4:12, 2:10] = 1.0
    return model, x, oracle


def loaded(module: nn.Module, mean: tuple[float, ...] = MEAN, std: tuple[float, ...] = STD) -> LoadedModel:
    pre = Preprocessing((16, 16), 16, mean, std)  # type: ignore[arg-type]
    spec = ModelSpec("toy", "custom", "torchvision", pre, 5, "4", {}, "a toy")
    return LoadedModel(module, spec, [str(i) for i in range(5)], "test", False)


def probs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.softmax(model(x).double(), dim=1)


# -- Average Drop, Increase in Confidence, Win % ------------------------------------------------------


@pytest.mark.parametrize("space", ["pixel", "normalized"])
def test_all_ones_map_gives_no_drop_and_no_increase(space: str) -> None:
    net = tiny_cnn()
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    r = metrics.average_drop(net, x, torch.ones(3, 16, 16), space=space, options=IMAGENET)  # type: ignore[arg-type]
    assert r.average_drop == 0.0 and r.increase_in_confidence == 0.0
    assert torch.equal(r.original, r.explained)
    assert r.drop.tolist() == [0.0, 0.0, 0.0]


def test_explanation_map_is_the_input_for_a_map_of_ones_in_pixel_space() -> None:
    x = torch.randn(2, 3, 8, 8)
    norm = metrics.Normalization(MEAN, STD)
    assert torch.equal(metrics.explanation_images(x, torch.ones(2, 8, 8), "pixel", norm), x)
    half = metrics.explanation_images(x, torch.full((2, 8, 8), 0.5), "pixel", norm)
    expected = norm.to_model(norm.to_pixel(x.double()) * 0.5).float()
    torch.testing.assert_close(half, expected)


def test_zero_map_gives_the_score_of_the_baseline() -> None:
    net = tiny_cnn()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    classes = torch.tensor([1, 3])
    zeros = torch.zeros(2, 16, 16)
    normalized = metrics.average_drop(net, x, zeros, classes, space="normalized")
    expected = probs(net, torch.zeros_like(x))[torch.arange(2), classes]
    torch.testing.assert_close(normalized.explained, expected, rtol=0, atol=1e-12)
    pixel = metrics.average_drop(net, x, zeros, classes, space="pixel", options=IMAGENET)
    black = (
        ((0 - torch.tensor(MEAN, dtype=torch.float64)) / torch.tensor(STD, dtype=torch.float64))
        .view(1, 3, 1, 1)
        .expand_as(x)
    )
    torch.testing.assert_close(pixel.explained, probs(net, black)[torch.arange(2), classes], rtol=0, atol=1e-12)
    torch.testing.assert_close(pixel.original, probs(net, x)[torch.arange(2), classes], rtol=0, atol=1e-12)


def test_average_drop_formula_by_hand() -> None:
    net = tiny_cnn(seed=4)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 16, 16, generator=gen, dtype=torch.float64)
    maps = torch.rand(4, 16, 16, generator=gen, dtype=torch.float64)
    r = metrics.average_drop(net, x, maps, space="normalized")
    p = probs(net, x)
    c = p.argmax(dim=1)
    y = p[torch.arange(4), c]
    o = probs(net, x * maps[:, None])[torch.arange(4), c]
    torch.testing.assert_close(r.original, y, rtol=0, atol=1e-12)
    torch.testing.assert_close(r.explained, o, rtol=0, atol=1e-12)
    drop = torch.clamp(y - o, min=0) / y
    assert r.average_drop == pytest.approx(100 * float(drop.mean()), abs=1e-10)
    assert r.increase_in_confidence == pytest.approx(100 * float((o > y).double().mean()))
    assert torch.equal(r.target_classes, c)
    one_by_one = metrics.average_drop(
        net,
        x,
        maps,
        space="normalized",
        options=MetricOptions(execution=Execution(chunk_size=1, memory_format="channels_last")),
    )
    torch.testing.assert_close(one_by_one.explained, r.explained, rtol=0, atol=1e-12)


def test_average_drop_matches_pytorch_grad_cam_in_normalised_space() -> None:
    from pytorch_grad_cam.metrics.cam_mult_image import CamMultImageConfidenceChange
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    net = tiny_cnn(seed=2).float()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 16, 16, generator=gen)
    maps = torch.rand(3, 16, 16, generator=gen)
    classes = [0, 2, 4]
    diff = CamMultImageConfidenceChange()(x, maps.numpy(), [ClassifierOutputSoftmaxTarget(c) for c in classes], net)
    r = metrics.average_drop(net, x, maps, classes, space="normalized")
    np.testing.assert_allclose((r.explained - r.original).numpy(), diff, atol=2e-6)


def test_average_drop_from_an_explanation_and_a_loaded_model() -> None:
    net = tiny_cnn(seed=5).float()
    model = loaded(net)
    x = torch.randn(2, 3, 16, 16)
    exp = cnnlens.explain(model, x, methods=["gradcam"], layers=["4"], targets=[1, 2])[0]
    r = metrics.average_drop(model, x, exp)  # pixel space, normalisation from the LoadedModel
    assert r.target_classes.tolist() == [1, 2] and r.space == "pixel"
    same = metrics.average_drop(net, x, exp.maps[:, 0], [1, 2], options=IMAGENET)
    torch.testing.assert_close(r.explained, same.explained)
    assert 0.0 <= r.average_drop <= 100.0


def test_average_drop_with_known_logits_runs_one_forward_fewer() -> None:
    net = tiny_cnn(seed=5)
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    maps = torch.rand(3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        logits = net(x)
    seen: list[int] = []
    handle = net.register_forward_pre_hook(lambda _m, args: seen.append(int(args[0].shape[0])))
    try:
        fresh = metrics.average_drop(net, x, maps, options=IMAGENET)
        forwards = sum(seen)
        seen.clear()
        known = metrics.average_drop(net, x, maps, options=IMAGENET, logits=logits)
    finally:
        handle.remove()
    assert sum(seen) == forwards - 3  # the 3 images themselves are not run again
    torch.testing.assert_close(known.original, fresh.original, rtol=0, atol=1e-12)
    torch.testing.assert_close(known.drop, fresh.drop, rtol=0, atol=1e-12)
    assert torch.equal(known.target_classes, logits.argmax(dim=1))
    with pytest.raises(MetricError, match="logits"):
        metrics.average_drop(net, x, maps, options=IMAGENET, logits=logits[:2])
    with pytest.raises(MetricError, match="NaN"):
        metrics.average_drop(net, x, maps, options=IMAGENET, logits=torch.full_like(logits, float("nan")))


def test_identity_normalisation_makes_pixel_space_the_normalised_space() -> None:
    net = tiny_cnn(seed=6)
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    maps = torch.rand(2, 16, 16, dtype=torch.float64)
    pixel = metrics.average_drop(net, x, maps, torch.tensor(2), options=UNIT)  # one value for all channels
    normalized = metrics.average_drop(net, x, maps, [2, 2], space="normalized")
    torch.testing.assert_close(pixel.explained, normalized.explained, rtol=0, atol=1e-12)
    assert pixel.target_classes.tolist() == [2, 2]


def test_metrics_layering_and_no_hooks_left() -> None:
    import ast
    from pathlib import Path

    allowed = (
        "cnnlens.capture",
        "cnnlens.explain",
        "cnnlens.explanation",
        "cnnlens.maps",
        "cnnlens.models",
        "cnnlens.targets",
        "cnnlens.batching",
        "cnnlens.errors",
        "cnnlens.execution",
        "cnnlens.outputs",
        "cnnlens.metrics",
    )
    folder = Path(metrics.__file__).parent
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                if name.startswith("cnnlens"):
                    assert name.startswith(allowed), f"{path.name} imports {name}"
    net = tiny_cnn()
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    metrics.deletion_insertion(net, x, torch.rand(1, 16, 16), step=64)
    assert hook_count(net) == 0


def test_average_drop_errors() -> None:
    net = tiny_cnn()
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    with pytest.raises(MetricError, match="normalised"):
        metrics.average_drop(net, x, torch.ones(1, 16, 16))  # pixel space, no mean/std
    with pytest.raises(MetricError, match=r"\[0, 1\]"):
        metrics.average_drop(net, x, torch.full((1, 16, 16), 2.0), space="normalized")
    with pytest.raises(MetricError, match="space"):
        metrics.average_drop(net, x, torch.ones(1, 16, 16), space="raw")  # type: ignore[arg-type]
    with pytest.raises(InputShapeError, match="NaN"):
        metrics.average_drop(net, x, torch.full((1, 16, 16), float("nan")), space="normalized")
    with pytest.raises(InputShapeError, match=r"\(B, H, W\)"):
        metrics.average_drop(net, x, torch.ones(2, 16, 16), space="normalized")
    with pytest.raises(TargetError, match="out of range"):
        metrics.average_drop(net, x, torch.ones(1, 16, 16), 7, space="normalized")


def _result(y: list[float], o: list[float]) -> metrics.AverageDropResult:
    yt, ot = torch.tensor(y, dtype=torch.float64), torch.tensor(o, dtype=torch.float64)
    return metrics.AverageDropResult(
        yt, ot, torch.clamp(yt - ot, min=0) / yt, ot > yt, torch.zeros(len(y), dtype=torch.long), "pixel", "probability"
    )


def test_win_percent_counts_ties_half_and_compares_signed_drops() -> None:
    y = [0.5, 0.5, 0.5, 0.5]
    a = _result(y, [0.4, 0.1, 0.6, 0.3])
    b = _result(y, [0.2, 0.3, 0.7, 0.3])
    w = metrics.win_percent(a, b)
    assert w.wins.tolist() == [1.0, 0.0, 0.0, 0.5] and w.ties == 1
    assert w.win_percent == pytest.approx(37.5) and w.loss_percent == pytest.approx(62.5)
    # clipped drops: both raised the confidence on image 2, a tie
    assert metrics.win_percent(a, b, clip=True).wins.tolist() == [1.0, 0.0, 0.5, 0.5]
    with pytest.raises(MetricError, match="same images"):
        metrics.win_percent(a, _result([0.9, 0.5, 0.5, 0.5], [0.1, 0.1, 0.1, 0.1]))


def test_metrics_restore_train_mode_and_match_eval() -> None:
    net = tiny_cnn(dropout=True)
    net.train()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    maps = torch.rand(2, 16, 16, dtype=torch.float64)
    r_train = metrics.average_drop(net, x, maps, space="normalized")
    assert net.training and all(m.training for m in net.modules())
    r_eval = metrics.average_drop(net.eval(), x, maps, space="normalized")
    torch.testing.assert_close(r_train.explained, r_eval.explained, rtol=0, atol=1e-12)


# -- deletion / insertion ------------------------------------------------------------------------------


def gkern(klen: int, nsig: float) -> torch.Tensor:
    """RISE ``evaluation.py``'s gkern, verbatim except that it stays float64."""
    inp = np.zeros((klen, klen))
    inp[klen // 2, klen // 2] = 1
    k = gaussian_filter(inp, nsig)
    kern = np.zeros((3, 3, klen, klen))
    kern[0, 0] = k
    kern[1, 1] = k
    kern[2, 2] = k
    return torch.from_numpy(kern)


class RiseCausalMetric:
    """RISE ``evaluation.py``'s ``CausalMetric.single_run``, ported literally (CPU, no plotting)."""

    def __init__(self, model: nn.Module, mode: str, step: int, substrate_fn: object, hw: int) -> None:
        self.model, self.mode, self.step, self.substrate_fn, self.hw = model, mode, step, substrate_fn, hw

    @torch.no_grad()
    def single_run(self, img_tensor: torch.Tensor, explanation: np.ndarray) -> np.ndarray:
        HW = self.hw
        pred = self.model(img_tensor)
        _top, c = torch.max(pred, 1)
        c = c.cpu().numpy()[0]
        n_steps = (HW + self.step - 1) // self.step
        if self.mode == "del":
            start = img_tensor.clone()
            finish = self.substrate_fn(img_tensor)  # type: ignore[operator]
        else:
            start = self.substrate_fn(img_tensor)  # type: ignore[operator]
            finish = img_tensor.clone()
        scores = np.empty(n_steps + 1)
        salient_order = np.flip(np.argsort(explanation.reshape(-1, HW), axis=1), axis=-1)
        for i in range(n_steps + 1):
            pred = self.model(start)
            scores[i] = pred[0, c]
            if i < n_steps:
                coords = salient_order[:, self.step * i : self.step * (i + 1)]
                start.cpu().numpy().reshape(1, 3, HW)[0, :, coords] = (
                    finish.cpu().numpy().reshape(1, 3, HW)[0, :, coords]
                )
        return scores


def rise_auc(arr: np.ndarray) -> float:
    return float((arr.sum() - arr[0] / 2 - arr[-1] / 2) / (arr.shape[0] - 1))


def test_blur_kernel_is_rise_gkern() -> None:
    ours = metrics.rise_blur_kernel(11, 5.0)
    torch.testing.assert_close(ours, gkern(11, 5)[0, 0], rtol=0, atol=1e-15)
    torch.testing.assert_close(metrics.rise_blur_kernel(7, 1.3), gkern(7, 1.3)[0, 0], rtol=0, atol=1e-15)


@pytest.mark.parametrize("step", [7, 16])
def test_deletion_and_insertion_match_a_literal_port_of_rise(step: int) -> None:
    net = tiny_cnn(seed=7)
    softmax_net = nn.Sequential(net, nn.Softmax(dim=1)).eval()
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 16, 16, generator=gen, dtype=torch.float64)
    maps = torch.rand(2, 16, 16, generator=gen, dtype=torch.float64)  # continuous: no ties
    kern = gkern(11, 5)

    def blur_fn(img: torch.Tensor) -> torch.Tensor:
        return nn.functional.conv2d(img, kern, padding=11 // 2)

    d, i = metrics.deletion_insertion(net, x, maps, step=step)
    for b in range(2):
        ref_d = RiseCausalMetric(softmax_net, "del", step, torch.zeros_like, 256).single_run(
            x[b : b + 1], maps[b].numpy()
        )
        ref_i = RiseCausalMetric(softmax_net, "ins", step, blur_fn, 256).single_run(x[b : b + 1], maps[b].numpy())
        np.testing.assert_allclose(d.scores[b].numpy(), ref_d, rtol=0, atol=1e-12)
        np.testing.assert_allclose(i.scores[b].numpy(), ref_i, rtol=0, atol=1e-12)
        assert float(d.auc[b]) == pytest.approx(rise_auc(ref_d), abs=1e-12)
        assert float(i.auc[b]) == pytest.approx(rise_auc(ref_i), abs=1e-12)
    n = (256 + step - 1) // step
    assert d.scores.shape == (2, n + 1) and d.fractions[-1] == 1.0 and d.fractions[1] == step / 256


def test_deletion_and_insertion_are_monotone_for_the_oracle_map() -> None:
    model, x, oracle = box_setup()
    d, i = metrics.deletion_insertion(model, x, oracle, 0, step=8)
    dd = d.scores[0].diff()
    ii = i.scores[0].diff()
    assert bool((dd <= 1e-15).all()) and bool((dd[:8] < 0).all())  # the box (64 px) goes in the first 8 steps
    assert bool((ii >= -1e-15).all()) and bool((ii[:8] > 0).all())
    assert float(d.scores[0, 8]) == pytest.approx(1 / (1 + math.exp(3.0)), abs=1e-12)


def test_deletion_auc_orders_oracle_random_anti_oracle() -> None:
    model, x, oracle = box_setup()
    gen = torch.Generator().manual_seed(0)
    random_map = torch.rand(1, 16, 16, generator=gen, dtype=torch.float64)
    aucs = [metrics.deletion(model, x, m, 0, step=8).mean_auc for m in (oracle, random_map, 1 - oracle)]
    assert aucs[0] < aucs[1] < aucs[2]
    ins = [metrics.insertion(model, x, m, 0, step=8).mean_auc for m in (oracle, random_map, 1 - oracle)]
    assert ins[0] > ins[1] > ins[2]


def test_ties_are_broken_in_raster_order() -> None:
    assert metrics.saliency_order(torch.tensor([[[1.0, 1.0], [2.0, 1.0]]])).tolist() == [[1, 2, 0, 3]]


def test_deletion_batching_invariance_and_explanation_input() -> None:
    net = tiny_cnn(seed=1)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 3, 16, 16, generator=gen, dtype=torch.float64)
    exp = cnnlens.explain(net, x, methods=["gradcam"], layers=["4"], targets=[0, 1, 2])[0]
    runs = [
        metrics.deletion_insertion(
            net, x, exp, step=11, options=MetricOptions(execution=Execution(chunk_size=size, memory_budget_mb=budget))
        )
        for size, budget in [(None, None), (1, None), (5, None), (None, 0.001), (64, None)]
    ]
    for d, i in runs[1:]:
        torch.testing.assert_close(d.scores, runs[0][0].scores, rtol=0, atol=1e-12)
        torch.testing.assert_close(i.scores, runs[0][1].scores, rtol=0, atol=1e-12)
    assert runs[0][0].target_classes.tolist() == [0, 1, 2]
    # per-image results do not depend on the other images of the batch
    alone = metrics.deletion(net, x[1:2], exp.maps[1:2, 0], [1], step=11)
    torch.testing.assert_close(alone.scores[0], runs[0][0].scores[1], rtol=0, atol=1e-12)


def test_deletion_baselines_and_errors() -> None:
    net = tiny_cnn()
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    maps = torch.rand(1, 16, 16, dtype=torch.float64)
    black = metrics.deletion(net, x, maps, step=256, baseline="black", options=IMAGENET)
    pixel_zero = (
        ((0 - torch.tensor(MEAN, dtype=torch.float64)) / torch.tensor(STD, dtype=torch.float64))
        .view(1, 3, 1, 1)
        .expand_as(x)
    )
    assert float(black.scores[0, -1]) == pytest.approx(float(probs(net, pixel_zero)[0, black.target_classes[0]]))
    tensor = metrics.deletion(net, x, maps, step=256, baseline=torch.full((3, 1, 1), 0.3, dtype=torch.float64))
    assert float(tensor.scores[0, -1]) == pytest.approx(
        float(probs(net, torch.full_like(x, 0.3))[0, tensor.target_classes[0]])
    )
    with pytest.raises(MetricError, match="normalised"):
        metrics.deletion(net, x, maps, baseline="black")
    with pytest.raises(MetricError, match="step"):
        metrics.deletion(net, x, maps, step=0)
    with pytest.raises(MetricError, match="baseline"):
        metrics.deletion(net, x, maps, baseline="noise")  # type: ignore[arg-type]


def test_auc_is_the_rise_trapezoid() -> None:
    a = torch.tensor([[0.9, 0.5, 0.2, 0.1]])
    assert float(metrics.auc(a)[0]) == pytest.approx((1.7 - 0.45 - 0.05) / 3)


# -- ROAD ---------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 warns inside the authors' code
def test_imputation_matches_the_road_authors_code() -> None:
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer

    gen = torch.Generator().manual_seed(0)
    img = torch.rand(3, 12, 10, generator=gen, dtype=torch.float64)
    removed = torch.rand(12, 10, generator=gen) < 0.6
    removed[0, :4] = True  # a corner and a border run
    reference = NoisyLinearImputer(noise=0.0)(img.float(), (~removed).float())
    ours = metrics.noisy_linear_imputation(img, removed, noise=0.0)
    torch.testing.assert_close(ours.float(), reference, rtol=0, atol=1e-6)
    assert torch.equal(ours[:, ~removed], img[:, ~removed])


def test_imputation_reproduces_constants_and_linear_ramps() -> None:
    rows, cols = torch.meshgrid(torch.arange(10.0), torch.arange(12.0), indexing="ij")
    ramp = torch.stack([2 * rows - 3 * cols + 1, rows + cols, 0.5 * rows]).double()
    hole = torch.zeros(10, 12, dtype=torch.bool)
    hole[2:8, 3:9] = True  # interior: the symmetric 8-neighbour mean of a linear function is the function
    torch.testing.assert_close(metrics.noisy_linear_imputation(ramp, hole, noise=0.0), ramp, rtol=0, atol=1e-10)
    constant = torch.full((3, 10, 12), 0.7, dtype=torch.float64)
    border = torch.zeros(10, 12, dtype=torch.bool)
    border[:5] = True  # touching three borders: renormalised weights still average a constant
    torch.testing.assert_close(metrics.noisy_linear_imputation(constant, border, noise=0.0), constant)
    with pytest.raises(MetricError, match="every pixel"):
        metrics.noisy_linear_imputation(constant, torch.ones(10, 12, dtype=torch.bool))


def test_imputation_noise_is_seeded_and_scaled() -> None:
    img = torch.zeros(3, 40, 40, dtype=torch.float64)
    removed = torch.ones(40, 40, dtype=torch.bool)
    removed[0, 0] = False
    sigma = torch.tensor([0.01, 0.02, 0.04], dtype=torch.float64)
    a = metrics.noisy_linear_imputation(img, removed, noise=sigma, generator=torch.Generator().manual_seed(1))
    b = metrics.noisy_linear_imputation(img, removed, noise=sigma, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    measured = a.flatten(1).std(dim=1)
    torch.testing.assert_close(measured, sigma, rtol=0.1, atol=0)


def test_road_morf_below_lerf_for_the_oracle_map() -> None:
    model, x, oracle = box_setup()
    r = metrics.road(model, x, oracle, 0, space="normalized")
    assert bool((r.morf_curve < r.lerf_curve).all())
    assert r.combined_score > 0.2 and -0.5 <= r.combined_score <= 0.5
    anti = metrics.road(model, x, 1 - oracle, 0, space="normalized")
    assert anti.combined_score < 0
    assert r.morf_accuracy[-1] == 0.0 and r.lerf_accuracy[0] == 1.0
    assert r.summary()["combined"] == pytest.approx(r.combined_score)


def test_road_is_seeded_and_independent_of_batching() -> None:
    net = tiny_cnn(seed=3)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 16, 16, generator=gen, dtype=torch.float64)
    maps = torch.rand(2, 16, 16, generator=gen, dtype=torch.float64)
    kw = {"percentages": [20, 60], "options": IMAGENET}
    one = IMAGENET.with_(execution=Execution(chunk_size=1))
    a = metrics.road(net, x, maps, **kw)  # type: ignore[arg-type]
    b = metrics.road(net, x, maps, percentages=[20, 60], options=one)
    c = metrics.road(
        net, x, maps, orders=["lerf"], percentages=[20, 60], options=one.with_(execution=Execution(chunk_size=3))
    )
    assert a.morf is not None and b.morf is not None and a.lerf is not None and c.lerf is not None
    torch.testing.assert_close(a.morf, b.morf, rtol=0, atol=1e-12)
    torch.testing.assert_close(a.lerf, c.lerf, rtol=0, atol=1e-12)
    assert c.morf is None
    with pytest.raises(MetricError, match="morf"):
        _ = c.combined
    other = metrics.road(net, x, maps, seed=1, **kw)  # type: ignore[arg-type]
    assert other.morf is not None and not torch.equal(other.morf, a.morf)


def test_road_removal_counts_and_errors() -> None:
    assert metrics.removal_count(10, 256) == 26 and metrics.removal_count(0, 256) == 0
    assert metrics.removal_count(99.9, 4) == 3  # at least one pixel stays
    net = tiny_cnn()
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    maps = torch.rand(1, 16, 16, dtype=torch.float64)
    with pytest.raises(MetricError, match=r"\[0, 100\)"):
        metrics.road(net, x, maps, percentages=[100], space="normalized")
    with pytest.raises(MetricError, match="normalised"):
        metrics.road(net, x, maps)  # pixel-space noise needs the std
    with pytest.raises(MetricError, match="orders"):
        metrics.road(net, x, maps, orders=["morf", "morf"], space="normalized")


# -- pointing game and energy in box -------------------------------------------------------------------


def test_boxes_to_masks_uses_pixel_centres() -> None:
    m = metrics.boxes_to_masks(torch.tensor([[1, 1, 3, 2]]), (3, 4))
    assert m.int().tolist() == [[[0, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0]]]
    frac = metrics.boxes_to_masks([[[0.6, 0, 1.4, 1]]], (1, 3))  # covers the centre 1.5? no: 0.5 no, 1.5 no
    assert frac.int().tolist() == [[[0, 0, 0]]]
    # half-open like the pixels: a centre on x0 is inside, a centre on x1 is not; zero width covers nothing
    edge = metrics.boxes_to_masks([[[0.5, 0, 1.5, 1]], [[1.5, 0, 1.5, 1]]], (1, 3))
    assert edge.int().tolist() == [[[1, 0, 0]], [[0, 0, 0]]]
    two = metrics.boxes_to_masks([[[0, 0, 1, 1], [2, 0, 3, 1]], []], (1, 3))
    assert two.int().tolist() == [[[1, 0, 1]], [[0, 0, 0]]]
    with pytest.raises(MetricError, match="x1 < x0"):
        metrics.boxes_to_masks([[3, 0, 1, 1]], (2, 2))


def test_pointing_game_hits_tolerance_ties_flat_and_empty() -> None:
    maps = torch.zeros(5, 10, 10)
    maps[0, 2, 2] = 1.0  # inside
    maps[1, 7, 7] = 1.0  # outside, 3 px right and below the box's last pixel (4, 4) on the diagonal
    maps[2, 8, 8] = 1.0  # tied maxima: one outside ...
    maps[2, 1, 1] = 1.0  # ... and one inside: a hit (any tied maximum counts)
    # maps[3] stays all zero: flat, every pixel ties -> a miss, flagged
    maps[4, 2, 2] = 1.0  # empty box -> not valid
    boxes = torch.tensor([[0, 0, 5, 5]] * 4 + [[3, 3, 3, 3]])
    r = metrics.pointing_game(maps, boxes=boxes)
    assert r.hit.tolist() == [True, False, True, False, False]
    assert r.flat.tolist() == [False, False, False, True, False]
    assert r.valid.tolist() == [True, True, True, True, False]
    assert r.n_valid == 4 and r.accuracy == 0.5
    # (7, 7) is sqrt(3^2 + 3^2) = 4.24 px from (4, 4)
    assert metrics.pointing_game(maps, boxes=boxes, tolerance=4).hit[1].item() is False
    assert metrics.pointing_game(maps, boxes=boxes, tolerance=4.25).hit[1].item() is True
    none = metrics.pointing_game(maps[4:], boxes=boxes[4:])
    assert none.accuracy == 0.0 and none.n_valid == 0


def test_pointing_game_with_masks_and_an_explanation() -> None:
    net = tiny_cnn()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    exp = cnnlens.explain(net, x, methods=["gradcam"], layers=["4"])[0]
    everything = torch.ones(2, 16, 16, dtype=torch.bool)
    r = metrics.pointing_game(exp, masks=everything)
    assert r.hit.tolist() == (~exp.degenerate[:, 0]).tolist()
    with pytest.raises(MetricError, match="exactly one"):
        metrics.pointing_game(exp)
    with pytest.raises(MetricError, match="bool"):
        metrics.pointing_game(exp, masks=everything.float() * 0.5)


def test_energy_in_box() -> None:
    maps = torch.zeros(3, 4, 4, dtype=torch.float64)
    maps[0] = 1.0
    maps[1, 0, 0] = 3.0
    maps[1, 3, 3] = 1.0
    boxes = torch.tensor([[0, 0, 2, 2], [0, 0, 1, 1], [0, 0, 2, 2]])
    r = metrics.energy_in_box(maps, boxes=boxes)
    torch.testing.assert_close(r.energy, torch.tensor([0.25, 0.75, 0.0], dtype=torch.float64))
    assert r.zero_mass.tolist() == [False, False, True] and r.mean == pytest.approx(1.0 / 3)
    empty = metrics.energy_in_box(maps, boxes=torch.tensor([[0, 0, 0, 0]] * 3))
    assert empty.n_valid == 0 and empty.mean == 0.0 and bool(torch.isfinite(empty.energy).all())
    with pytest.raises(MetricError, match="non-negative"):
        metrics.energy_in_box(-maps - 1, boxes=boxes)


# -- similarity ----------------------------------------------------------------------------------------


def test_rankdata_and_spearman_match_scipy() -> None:
    from scipy.stats import rankdata, spearmanr

    gen = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (3, 6, 7), generator=gen).double()  # many ties
    b = torch.randn(3, 6, 7, generator=gen, dtype=torch.float64)
    np.testing.assert_allclose(metrics.rankdata(a.flatten(1)).numpy(), rankdata(a.flatten(1).numpy(), axis=1))
    ours = metrics.spearman(a, b)
    for i in range(3):
        assert float(ours.value[i]) == pytest.approx(spearmanr(a[i].flatten(), b[i].flatten())[0], abs=1e-12)
        ref_abs = spearmanr(a[i].flatten().abs(), b[i].flatten().abs())[0]
        assert float(metrics.spearman(a, b, absolute=True).value[i]) == pytest.approx(ref_abs, abs=1e-12)
    flat = metrics.spearman(torch.zeros(1, 4, 4), b[:1, :4, :4])
    assert flat.value.tolist() == [0.0] and flat.undefined.tolist() == [True]


def test_ssim_matches_scikit_image() -> None:
    from skimage.metrics import structural_similarity

    gen = torch.Generator().manual_seed(0)
    a = torch.rand(2, 24, 20, generator=gen, dtype=torch.float64)
    b = (a + 0.2 * torch.rand(2, 24, 20, generator=gen, dtype=torch.float64)).clamp(0, 1)
    ours = metrics.ssim(a, b)
    for i in range(2):
        ref = structural_similarity(
            a[i].numpy(), b[i].numpy(), data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
        )
        assert float(ours[i]) == pytest.approx(ref, abs=1e-12)
    with pytest.raises(MetricError, match="11"):
        metrics.ssim(a[:, :8, :8], b[:, :8, :8])


# -- randomisation sanity check ------------------------------------------------------------------------


def test_cascade_layers_are_top_down() -> None:
    assert metrics.cascade_layers(tiny_cnn()) == ["8", "4", "2", "0"]


def test_cascading_randomisation_changes_gradcam_and_leaves_the_model_alone() -> None:
    net = tiny_cnn(classes=4, seed=11)
    net.train()
    before = copy.deepcopy(net.state_dict())
    flags = [m.training for m in net.modules()]
    grads = [p.requires_grad for p in net.parameters()]
    rng = torch.get_rng_state()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    r = metrics.cascading_randomisation(net, x, method="gradcam", layer="5", keep_maps=True)
    assert r.cascade == ["8", "4", "2", "0"] and r.spearman.shape == (4, 3) and r.ssim.shape == (4, 3)
    # the user's model is untouched: weights, flags, requires_grad, the global RNG
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [m.training for m in net.modules()] == flags
    assert [p.requires_grad for p in net.parameters()] == grads
    assert torch.equal(torch.get_rng_state(), rng)
    # the maps change, and the metric says so
    assert r.randomised_maps is not None
    assert float((r.randomised_maps[-1] - r.original.maps[:, 0]).abs().max()) > 0.3
    means = r.spearman.mean(dim=1)
    assert float(means[0]) < 0.95 and float(means[-1]) < 0.5 and float(means[-1]) < float(means[0])
    assert float(r.ssim.mean(dim=1)[-1]) < float(r.ssim.mean(dim=1)[0])
    assert bool(torch.isfinite(r.spearman).all() and torch.isfinite(r.spearman_abs).all())
    assert len(r.table()) == 4
    # the same seed gives the same numbers; the explained classes are the original model's
    again = metrics.cascading_randomisation(net, x, method="gradcam", layer="5")
    torch.testing.assert_close(again.spearman, r.spearman, rtol=0, atol=1e-12)
    assert torch.equal(r.target_classes, probs(net.eval(), x).argmax(dim=1))


def test_cascading_randomisation_custom_cascade_and_errors() -> None:
    net = tiny_cnn()
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    r = metrics.cascading_randomisation(net, x, layer="5", cascade=["8"])
    assert r.cascade == ["8"] and r.spearman.shape == (1, 1)
    with pytest.raises(MetricError, match="not modules"):
        metrics.cascading_randomisation(net, x, layer="5", cascade=["classifier"])
