"""Benchmark cnnlens Grad-CAM / Grad-CAM++ against pytorch-grad-cam and torchcam (CPU, one process run).

Run ``python bench/bench_cam.py`` (about 3-5 minutes on 2 cores), ``--quick`` for a smoke check.

Subjects: torchvision ``resnet50`` (``weights=None``, seeded, eval, layer ``layer4``) and the embedded
``efficientnet_lite0`` of ``cnnlens.load_model`` (its ``spec.default_layer``), at batch 1 and 8, 224x224.
Inputs are scikit-image sample photos (shipped in its wheel) normalised like each model expects.

Rows, each called exactly the way its library documents (targets = the top class of each image):

* ``inference forward``: ``model(x)`` under ``torch.inference_mode()``: the baseline every ratio refers to.
* ``forward + full backward``: ``model(x)``, then ``.backward()`` of the summed top logits (parameter
  gradients included), then ``zero_grad``: what a naive hook-and-backward implementation pays.
* ``cnnlens ...``: ``cnnlens.explain(model, x, methods=[...], layers=[layer])``: raw maps, ReLU,
  normalised maps upsampled to the input, display images; ``cnnlens both`` computes both methods from one
  forward/backward.
* ``pytorch-grad-cam ...``: ``GradCAM(model=..., target_layers=[...])`` constructed once, called with
  ``targets=None``: maps upsampled to the input (cv2) and normalised.
* ``torchcam ...``: extractor constructed once (its hooks stay on), then per call ``scores = model(x)``
  with grad enabled and ``extractor(class_idx, scores)``: normalised maps at layer resolution (torchcam
  does not upsample, so it does slightly less work than the two others).
* Context rows (timed, no memory probe): ``inference forward, channels-last input`` (the same forward with
  ``x.contiguous(memory_format=torch.channels_last)``) and
  ``cnnlens Grad-CAM, Execution(memory_format='channels_last')`` (explain with its optional channels-last CPU
  forward). cnnlens' default keeps the input's contiguous layout, the accurate path (channels-last convolution
  backward on the CPU is measurably less accurate, see ``docs/benchmarks.md``); these two rows show what the
  speed option buys (channels-last option vs the channels-last forward, default vs the contiguous forward).

Peers get their own ``copy.deepcopy`` of the model so their hooks never run inside another row; calls are
interleaved round by round (warm-up first) and the median of ``--repeats`` rounds is reported, with the
inter-quartile range. ``torch.set_num_threads`` is left at its default and reported. On a shared machine an
OpenMP forward whose threads get preempted runs several times slower, so a call during which other processes
used more than a quarter of a core (``/proc/stat`` minus this process) is retaken after waiting for a quiet
moment (at most 6 times per call, ``--max-wait`` seconds of waiting per run); the table counts retaken calls
and contended samples that had to be kept.

Extra peak memory: every (model, batch, row) runs in a fresh subprocess of this script (``--_memory-worker``)
that imports every library, builds the model and input, warms autograd and runs two inference forwards.
It then resets the resident-set high-water mark (``/proc/self/clear_refs``), runs one more inference
forward and reads the mark (``VmHWM``): the baseline, model + inference forward. It constructs the method,
resets the mark, calls the method once and reads the mark (first call), resets it again, calls a second
time and reads it (repeat call, extractor reused). Extra = peak - baseline, the memory a row needs beyond
what the model and an inference forward already take; the table shows ``first / repeat``. Repeat calls
matter: pytorch-grad-cam keeps ``self.outputs`` (and the graph, ``backward(retain_graph=True)``) and
torchcam keeps the hooked layer output (and the graph behind it) until the next call, so a reused
extractor holds two graphs at its peak. ``tracemalloc`` cannot see torch's CPU allocations, hence RSS.
``getrusage(RUSAGE_SELF).ru_maxrss`` is only a fallback where the mark cannot be reset: it survives
``exec`` (a worker would start at its parent's RSS) and a transient peak while loading the model could
hide a row's extra memory. Workers run with ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_``
fixed at 128 KiB so glibc returns freed tensors to the OS instead of keeping them in its heap, which makes
RSS follow live tensor bytes. Resolution: about 1 MiB (pages, allocator granularity).

Agreement (same run, same inputs, one extra call each, not timed):

* cnnlens vs pytorch-grad-cam, both methods: (a) at layer resolution, max |difference| of the raw signed
  maps relative to max |cnnlens raw| (pytorch-grad-cam's raw map from its own ``get_cam_image`` on its own
  captured activations/gradients); (b) at layer resolution, max |difference| after the same ReLU and
  per-map min-max normalisation; (c) at input resolution, max |difference| of pytorch-grad-cam's final maps
  and cnnlens' raw maps put through pytorch-grad-cam's own post-processing (ReLU, ``(m-min)/(max+1e-7)``,
  ``cv2.resize``, again ReLU and normalise); (d) max |difference| of the two libraries' own final maps
  (cnnlens ``.maps``, float64 bilinear in torch, vs pytorch-grad-cam, float32 cv2).
* pytorch-grad-cam's Grad-CAM++ adds ``eps = 1e-6`` to the alpha denominator (cnnlens adds none), which
  dominates ``2 g^2`` when ``|g| < ~1e-3``. Reported: the median |gradient| at the layer, and (e) the
  difference between cnnlens and pytorch-grad-cam's formula evaluated without eps on pytorch-grad-cam's own
  captured tensors (shows the whole Grad-CAM++ difference is that eps).
* cnnlens vs torchcam Grad-CAM: max |difference| of the normalised layer-resolution maps. torchcam's
  Grad-CAM++ is not a valid numerical reference (its alpha division ``alpha[mask].div_()`` writes into a
  copy, so alpha stays ``g^2``): timing only.

Targets the project sets (checked and printed): cnnlens <= 1.15x an inference forward, at least as fast as
torchcam, >= 2.5x faster than pytorch-grad-cam, no more extra memory than torchcam.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Timing,
    WaitBudget,
    describe_machine,
    fmt_seconds,
    format_table,
    machine_info,
    peak_rss_mib,
    reset_peak_rss,
    run_worker,
    sample_batch,
    time_round_robin,
)

MODELS = ("resnet50", "efficientnet_lite0")
SEED = 0

# Row id -> label. Order = table order = order within a timing round.
ROWS: dict[str, str] = {
    "forward": "inference forward",
    "forward_backward": "forward + full backward",
    "cnnlens_gradcam": "cnnlens Grad-CAM",
    "pgc_gradcam": "pytorch-grad-cam GradCAM",
    "torchcam_gradcam": "torchcam GradCAM",
    "cnnlens_gradcampp": "cnnlens Grad-CAM++",
    "pgc_gradcampp": "pytorch-grad-cam GradCAMPlusPlus",
    "torchcam_gradcampp": "torchcam GradCAMpp",
    "cnnlens_both": "cnnlens Grad-CAM + Grad-CAM++ (one call)",
    "forward_cl": "inference forward, channels-last input",
    "cnnlens_gradcam_auto": "cnnlens Grad-CAM, Execution(memory_format='channels_last') option",
}
# Context rows: timed, not memory-measured. cnnlens runs CPU forwards contiguous by default (accurate
# gradients); these two rows show what its optional channels-last forward buys.
CONTEXT_ROWS = ("forward_cl", "cnnlens_gradcam_auto")
METHODS = ("gradcam", "gradcampp")
METHOD_TITLES = {"gradcam": "Grad-CAM", "gradcampp": "Grad-CAM++"}

# Project targets.
MAX_RATIO_TO_FORWARD = 1.15
MIN_SPEEDUP_VS_PGC = 2.5


# -- subjects -----------------------------------------------------------------------------------------
@dataclass
class Subject:
    """A network to benchmark and how cnnlens and the peers are pointed at it."""

    name: str
    module: nn.Module
    explain_model: Any  # what cnnlens.explain() gets: the module, or the LoadedModel
    layer: str
    input_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    weights: str


def load_subject(name: str) -> Subject:
    """Build one benchmark subject (never downloads)."""
    if name == "resnet50":
        import torchvision

        torch.manual_seed(SEED)
        net = torchvision.models.resnet50(weights=None).eval()
        return Subject(name, net, net, "layer4", (224, 224), IMAGENET_MEAN, IMAGENET_STD, f"random (seed {SEED})")
    if name == "efficientnet_lite0":
        import cnnlens

        loaded = cnnlens.load_model("efficientnet_lite0")
        pre = loaded.spec.preprocessing
        size = tuple(int(s) for s in pre.input_size)
        return Subject(
            name,
            loaded.module.eval(),
            loaded,
            loaded.spec.default_layer,
            (size[0], size[1]),
            tuple(getattr(pre, "mean", IMAGENET_MEAN)),
            tuple(getattr(pre, "std", IMAGENET_STD)),
            "embedded (cnnlens.load_model)",
        )
    raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


def make_input(subject: Subject, batch: int) -> torch.Tensor:
    return sample_batch(batch, subject.input_size, subject.mean, subject.std, seed=SEED)


def top_classes(logits: torch.Tensor) -> list[int]:
    return [int(c) for c in logits.argmax(dim=1)]


# -- rows ---------------------------------------------------------------------------------------------
@dataclass
class Row:
    """One benchmarked callable and how to release what it holds (hooks)."""

    call: Callable[[], object]
    close: Callable[[], None] = lambda: None


def make_row(row: str, subject: Subject, x: torch.Tensor, *, own_copy: bool) -> Row:
    """The callable of one row. Peers hook a private copy of the model when ``own_copy``."""
    module = subject.module
    if own_copy and row.startswith(("pgc_", "torchcam_")):
        module = copy.deepcopy(module)
    layer_module = dict(module.named_modules())[subject.layer]

    if row == "forward":

        def forward() -> object:
            with torch.inference_mode():
                return module(x)

        return Row(forward)

    if row == "forward_backward":

        def forward_backward() -> object:
            out = module(x)
            out.gather(1, out.argmax(dim=1, keepdim=True)).sum().backward()
            module.zero_grad(set_to_none=True)
            return out.detach()

        return Row(forward_backward)

    if row == "forward_cl":
        x_cl = x.contiguous(memory_format=torch.channels_last)

        def forward_cl() -> object:
            with torch.inference_mode():
                return module(x_cl)

        return Row(forward_cl)

    if row.startswith("cnnlens_"):
        import cnnlens

        channels_last = row.endswith("_auto")
        name = row.removeprefix("cnnlens_").removesuffix("_auto")
        methods = list(METHODS) if name == "both" else [name]
        layout = cnnlens.Execution(memory_format="channels_last" if channels_last else "contiguous")

        def explain() -> object:
            return cnnlens.explain(subject.explain_model, x, methods=methods, layers=[subject.layer], execution=layout)

        return Row(explain)

    if row.startswith("pgc_"):
        from pytorch_grad_cam import GradCAM, GradCAMPlusPlus

        cls = GradCAM if row == "pgc_gradcam" else GradCAMPlusPlus
        cam = cls(model=module, target_layers=[layer_module])
        return Row(lambda: cam(input_tensor=x, targets=None), cam.activations_and_grads.release)

    if row.startswith("torchcam_"):
        from torchcam.methods import GradCAM as TcGradCAM
        from torchcam.methods import GradCAMpp as TcGradCAMpp

        tc_cls = TcGradCAM if row == "torchcam_gradcam" else TcGradCAMpp
        extractor = tc_cls(module, subject.layer, input_shape=(3, *subject.input_size))

        def torchcam_call() -> object:
            with torch.enable_grad():
                scores = module(x)
            return extractor(top_classes(scores), scores)

        return Row(torchcam_call, extractor.remove_hooks)

    raise ValueError(row)


# -- memory worker ------------------------------------------------------------------------------------
def memory_worker(model: str, batch: int, row: str) -> dict[str, Any]:
    """Run in a fresh process: extra peak RSS of ``row`` beyond the model plus an inference forward."""
    import cv2  # noqa: F401  (imported by pytorch-grad-cam; import it in every worker alike)
    import pytorch_grad_cam  # noqa: F401
    import torchcam.methods  # noqa: F401

    import cnnlens  # noqa: F401

    subject = load_subject(model)
    x = make_input(subject, batch)
    # Warm the autograd engine (threads, buffers) so no row pays for first-use setup.
    probe = torch.ones(4, requires_grad=True)
    (probe * 2).sum().backward()
    with torch.inference_mode():
        for _ in range(2):
            subject.module(x)
    # Baseline: the high-water mark of the built model running an inference forward. With a resettable
    # high-water mark, transient peaks of loading the model do not hide what the row needs.
    resettable = reset_peak_rss()
    with torch.inference_mode():
        subject.module(x)
    baseline = peak_rss_mib()
    bench_row = make_row(row, subject, x, own_copy=False)
    peaks = []
    for _ in range(2):
        if resettable:
            reset_peak_rss()
        bench_row.call()
        peaks.append(peak_rss_mib())
    bench_row.close()
    return {
        "baseline_mib": baseline,
        "peak_first_mib": peaks[0],
        "peak_repeat_mib": peaks[1],
        "extra_first_mib": peaks[0] - baseline,
        "extra_repeat_mib": peaks[1] - baseline,
        "extra_mib": max(peaks) - baseline,
        "probe": "VmHWM reset" if resettable else "ru_maxrss (not reset)",
    }


def measure_memory(
    configs: Sequence[tuple[str, int]], rows: Sequence[str], jobs: int, log: Callable[[str], None]
) -> dict[tuple[str, int, str], dict[str, Any]]:
    """Extra peak memory of every (model, batch, row), each in its own fresh process."""
    script = str(Path(__file__).resolve())
    tasks = [(m, b, r) for m, b in configs for r in rows]
    results: dict[tuple[str, int, str], dict[str, Any]] = {}

    def one(task: tuple[str, int, str]) -> dict[str, Any]:
        m, b, r = task
        return run_worker([script, "--_memory-worker", m, str(b), r])

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for task, result in zip(tasks, pool.map(one, tasks), strict=True):
            results[task] = result
            if "extra_mib" in result:
                text = f"+{_mib(result['extra_first_mib'])} / +{_mib(result['extra_repeat_mib'])} MiB"
            else:
                text = result.get("error", "?")
            log(f"  memory {task[0]} b{task[1]} {task[2]}: {text}")
    log(f"  memory: {len(tasks)} workers in {time.perf_counter() - start:.0f} s")
    return results


# -- agreement ----------------------------------------------------------------------------------------
def _minmax(maps: np.ndarray) -> np.ndarray:
    """ReLU then per-map ``(m - min) / (max - min)`` (zeros for a flat map)."""
    maps = np.maximum(maps.astype(np.float64), 0)
    lo = maps.min(axis=(-2, -1), keepdims=True)
    span = maps.max(axis=(-2, -1), keepdims=True) - lo
    return np.where(span > 0, (maps - lo) / np.where(span > 0, span, 1), 0)


def _pgc_postprocess(raw: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """pytorch-grad-cam's post-processing of raw layer maps ``(B, h, w)``, reproduced exactly."""
    import cv2

    def scale(m: np.ndarray) -> np.ndarray:
        m = np.maximum(m, 0)
        m = m - m.min()
        return m / (1e-7 + m.max())

    return np.stack([scale(cv2.resize(np.float32(scale(m)), (size[1], size[0]))) for m in raw])


def _gradcampp_raw(acts: np.ndarray, grads: np.ndarray, eps: float) -> np.ndarray:
    """pytorch-grad-cam's Grad-CAM++ raw map in float64 with a chosen ``eps``."""
    a = acts.astype(np.float64)
    g = grads.astype(np.float64)
    g2 = g * g
    denom = 2 * g2 + a.sum(axis=(2, 3), keepdims=True) * g2 * g + eps
    with np.errstate(divide="ignore", invalid="ignore"):
        alpha = np.where((g != 0) & (denom != 0), g2 / np.where(denom != 0, denom, 1), 0)
    weights = (np.maximum(g, 0) * alpha).sum(axis=(2, 3))
    return np.einsum("bc,bchw->bhw", weights, a)


def agreement(subject: Subject, x: torch.Tensor) -> dict[str, Any]:
    """Numerical agreement of cnnlens with pytorch-grad-cam and torchcam on the same input (see docstring)."""
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
    from torchcam.methods import GradCAM as TcGradCAM

    import cnnlens

    size = (int(x.shape[-2]), int(x.shape[-1]))
    ours = cnnlens.explain(subject.explain_model, x, methods=list(METHODS), layers=[subject.layer])
    out: dict[str, Any] = {"top_class": {"cnnlens": ours[METHODS[0], subject.layer].target_classes[:, 0].tolist()}}
    for method, cls in (("gradcam", GradCAM), ("gradcampp", GradCAMPlusPlus)):
        result = ours[method, subject.layer]
        raw = result.raw[:, 0].double().numpy()
        net = copy.deepcopy(subject.module)
        layer_module = dict(net.named_modules())[subject.layer]
        with cls(model=net, target_layers=[layer_module]) as cam:
            final = cam(input_tensor=x, targets=None)
            out["top_class"]["pytorch-grad-cam"] = top_classes(cam.outputs.detach())
            acts = cam.activations_and_grads.activations[0].numpy()
            grads = cam.activations_and_grads.gradients[0].numpy()
            theirs_raw = np.asarray(cam.get_cam_image(x, layer_module, None, acts, grads), dtype=np.float64)
        scale = max(float(np.abs(raw).max()), 1e-300)
        entry = {
            "raw_rel": float(np.abs(raw - theirs_raw).max() / scale),
            "layer_norm": float(np.abs(_minmax(raw) - _minmax(theirs_raw)).max()),
            "final_same_post": float(np.abs(_pgc_postprocess(raw, size) - final).max()),
            "final_own_post": float(np.abs(result.maps[:, 0].double().numpy() - final).max()),
        }
        if method == "gradcampp":
            no_eps = _gradcampp_raw(acts, grads, eps=0.0)
            entry["raw_rel_pgc_formula_eps0"] = float(np.abs(raw - no_eps).max() / scale)
            entry["layer_norm_pgc_formula_eps0"] = float(np.abs(_minmax(raw) - _minmax(no_eps)).max())
            nonzero = np.abs(grads[grads != 0])
            entry["median_abs_grad"] = float(np.median(nonzero)) if nonzero.size else 0.0
            entry["frac_grad_below_1e-3"] = float((nonzero < 1e-3).mean()) if nonzero.size else 0.0
        out[f"pgc_{method}"] = entry
    net = copy.deepcopy(subject.module)
    with TcGradCAM(net, subject.layer, input_shape=(3, *size)) as extractor:
        scores = net(x)
        classes = top_classes(scores)
        tc_map = extractor(classes, scores)[0].detach().double().numpy()
    out["top_class"]["torchcam"] = classes
    raw = ours["gradcam", subject.layer].raw[:, 0].double().numpy()
    out["torchcam_gradcam"] = {"layer_norm": float(np.abs(_minmax(raw) - tc_map).max())}
    return out


# -- breakdown ----------------------------------------------------------------------------------------
def breakdown_calls(subject: Subject, x: torch.Tensor) -> tuple[dict[str, Callable[[], object]], Callable[[], None]]:
    """The pieces of one ``cnnlens.explain`` call, timed on their own (``--breakdown``).

    Uses cnnlens internals (``capture``, ``display_images``, ``maps``) so that a change to them shows up here.
    """
    import cnnlens
    from cnnlens.capture import capture
    from cnnlens.explain import display_images
    from cnnlens.maps import normalize, upsample

    net, layer, batch = subject.module, subject.layer, int(x.shape[0])
    cap = capture(net, [layer])
    cap.__enter__()
    rec = cap.run(x)
    raw = torch.rand(batch, 1, *rec.activations[layer].shape[-2:], generator=torch.Generator().manual_seed(SEED))
    size = (int(x.shape[-2]), int(x.shape[-1]))
    loaded = subject.explain_model if subject.explain_model is not subject.module else None

    def inference() -> object:
        with torch.inference_mode():
            return net(x)

    def no_grad() -> object:
        with torch.no_grad():
            return net(x)

    def setup_teardown() -> None:
        with capture(net, [layer]):
            pass

    calls: dict[str, Callable[[], object]] = {
        "inference forward": inference,
        "no_grad forward": no_grad,
        "capture() + enter + exit, no forward": setup_teardown,
        "cap.run(x, gradients=False) in an open capture": lambda: cap.run(x, gradients=False),
        "cap.run(x) in an open capture": lambda: cap.run(x),
        "cnnlens.record(...)": lambda: cnnlens.record(net, x, layer),
        "explain(gradcam)": lambda: cnnlens.explain(subject.explain_model, x, methods=["gradcam"], layers=[layer]),
        "explain(gradcampp)": lambda: cnnlens.explain(subject.explain_model, x, methods=["gradcampp"], layers=[layer]),
        "upsample + normalize, float64, .float()": lambda: normalize(upsample(raw.double(), size))[0].float(),
        "upsample + normalize, float32": lambda: normalize(upsample(raw, size)),
        "display_images (uint8 overlays)": lambda: display_images(rec.inputs, loaded),
    }
    return calls, lambda: cap.__exit__(None, None, None)


def run_breakdown(
    subjects: dict[str, Subject],
    configs: Sequence[tuple[str, int]],
    warmup: int,
    repeats: int,
    budget: WaitBudget,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Time the pieces of ``cnnlens.explain`` for every (model, batch) and print one table each."""
    out: dict[str, Any] = {}
    for model, batch in configs:
        subject = subjects[model]
        x = make_input(subject, batch)
        log(f"breakdown {model} batch {batch}")
        calls, close = breakdown_calls(subject, x)
        try:
            timings = time_round_robin(calls, warmup=warmup, repeats=repeats, budget=budget, progress=log)
        finally:
            close()
        base = timings["inference forward"].median
        rows = [
            [
                name,
                fmt_seconds(t.median),
                fmt_seconds(t.minimum),
                _ratio(t.median, base),
                f"{t.retaken} / {t.contended_kept}",
            ]
            for name, t in timings.items()
        ]
        print(f"## Breakdown: {model} (layer `{subject.layer}`), batch {batch}\n")
        print(format_table(["piece", "median", "min", "x inference fwd", "retaken / contended kept"], rows))
        print()
        out[f"{model}/b{batch}"] = {name: t.as_dict() for name, t in timings.items()}
    return out


# -- report -------------------------------------------------------------------------------------------
def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "-"


def _mib(value: float) -> str:
    """Whole MiB; a rounding-level negative (the method needed less than the forward's transients) shows as 0."""
    return str(max(0, round(value)))


def _mem(memory: dict[tuple[str, int, str], dict[str, Any]] | None, key: tuple[str, int, str]) -> str:
    if memory is None:
        return "-"
    result = memory.get(key)
    if result is None:
        return "-"
    if "extra_mib" not in result:
        return "err"
    return f"{_mib(result['extra_first_mib'])} / {_mib(result['extra_repeat_mib'])}"


def config_table(
    model: str,
    batch: int,
    timings: dict[str, Timing],
    memory: dict[tuple[str, int, str], dict[str, Any]] | None,
) -> str:
    base = timings["forward"].median
    rows = []
    for row, timing in timings.items():
        rows.append(
            [
                ROWS[row],
                fmt_seconds(timing.median),
                fmt_seconds(timing.median / batch),
                _ratio(timing.median, base),
                f"{100 * timing.iqr / timing.median:.0f}%",
                f"{timing.retaken} / {timing.contended_kept}",
                _mem(memory, (model, batch, row)),
            ]
        )
    headers = [
        "row",
        "s/call (median)",
        "s/image",
        "x inference fwd",
        "IQR/median",
        "retaken / contended kept",
        "extra peak MiB (first / repeat)",
    ]
    return format_table(headers, rows)


def speedup_table(timings: dict[str, Timing]) -> str:
    rows = []
    for method in METHODS:
        ours = timings.get(f"cnnlens_{method}")
        if ours is None:
            continue
        cells = [f"cnnlens {METHOD_TITLES[method]}"]
        for peer in ("pgc", "torchcam"):
            theirs = timings.get(f"{peer}_{method}")
            cells.append(_ratio(theirs.median, ours.median) if theirs else "-")
        rows.append(cells)
    return format_table(["speedup of", "vs pytorch-grad-cam", "vs torchcam"], rows)


def check_targets(
    model: str,
    batch: int,
    timings: dict[str, Timing],
    memory: dict[tuple[str, int, str], dict[str, Any]] | None,
) -> list[dict[str, Any]]:
    """The project's four targets for both methods of one (model, batch)."""
    base = timings["forward"].median
    checks = []
    for method in METHODS:
        ours = timings[f"cnnlens_{method}"].median
        pgc = timings[f"pgc_{method}"].median
        tc = timings[f"torchcam_{method}"].median
        check: dict[str, Any] = {
            "model": model,
            "batch": batch,
            "method": method,
            "ratio_to_forward": ours / base,
            "ratio_ok": ours / base <= MAX_RATIO_TO_FORWARD,
            "speedup_vs_torchcam": tc / ours,
            "torchcam_ok": ours <= tc,
            "speedup_vs_pgc": pgc / ours,
            "pgc_ok": pgc / ours >= MIN_SPEEDUP_VS_PGC,
        }
        if memory is not None:
            mine = memory.get((model, batch, f"cnnlens_{method}"), {}).get("extra_first_mib")
            theirs = memory.get((model, batch, f"torchcam_{method}"), {}).get("extra_first_mib")
            check["extra_mib"] = mine
            check["torchcam_extra_mib"] = theirs
            check["memory_ok"] = None if mine is None or theirs is None else mine <= theirs
        checks.append(check)
    return checks


def targets_table(checks: Sequence[dict[str, Any]]) -> str:
    def mark(ok: bool | None, text: str) -> str:
        return f"{'-' if ok is None else ('yes' if ok else 'NO')} ({text})"

    rows = []
    for c in checks:
        mem = "-"
        if c.get("extra_mib") is not None and c.get("torchcam_extra_mib") is not None:
            mem = mark(c["memory_ok"], f"{_mib(c['extra_mib'])} vs {_mib(c['torchcam_extra_mib'])} MiB")
        rows.append(
            [
                f"{c['model']} b{c['batch']} {METHOD_TITLES[c['method']]}",
                mark(c["ratio_ok"], f"{c['ratio_to_forward']:.2f}x"),
                mark(c["torchcam_ok"], f"{c['speedup_vs_torchcam']:.2f}x"),
                mark(c["pgc_ok"], f"{c['speedup_vs_pgc']:.2f}x"),
                mem,
            ]
        )
    headers = [
        "cnnlens",
        f"<= {MAX_RATIO_TO_FORWARD}x inference fwd",
        ">= torchcam speed",
        f">= {MIN_SPEEDUP_VS_PGC}x vs pytorch-grad-cam",
        "extra mem <= torchcam (first call)",
    ]
    return format_table(headers, rows, align="lllll")


def agreement_table(results: dict[tuple[str, int], dict[str, Any]]) -> str:
    rows = []
    for (model, batch), res in results.items():
        if "error" in res:
            rows.append([f"{model} b{batch}", res["error"], "", "", "", "", ""])
            continue
        tops = res["top_class"]
        same = "yes" if len({tuple(v) for v in tops.values()}) == 1 else f"NO {tops}"
        for method in METHODS:
            e = res[f"pgc_{method}"]
            extra = ""
            if method == "gradcampp":
                extra = (
                    f"median abs g {e['median_abs_grad']:.1e} ({100 * e['frac_grad_below_1e-3']:.0f}% below 1e-3); "
                    f"vs pgc formula without eps: raw {e['raw_rel_pgc_formula_eps0']:.1e}, "
                    f"norm {e['layer_norm_pgc_formula_eps0']:.1e}"
                )
            rows.append(
                [
                    f"{model} b{batch} {METHOD_TITLES[method]} vs pytorch-grad-cam",
                    f"{e['raw_rel']:.1e}",
                    f"{e['layer_norm']:.1e}",
                    f"{e['final_same_post']:.1e}",
                    f"{e['final_own_post']:.1e}",
                    same,
                    extra,
                ]
            )
        rows.append(
            [
                f"{model} b{batch} Grad-CAM vs torchcam",
                "-",
                f"{res['torchcam_gradcam']['layer_norm']:.1e}",
                "-",
                "-",
                same,
                "",
            ]
        )
    headers = [
        "comparison",
        "(a) raw, rel.",
        "(b) layer-res normalised",
        "(c) final, same post-proc.",
        "(d) final, own post-proc.",
        "same top class",
        "notes",
    ]
    return format_table(headers, rows, align="lrrrrll")


# -- main ---------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: resnet50,efficientnet_lite0")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes (default 1,8)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per config (default 5, quick 2)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up calls per row (default 1, breakdown 2)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="2 rounds, memory at the smallest batch only: a smoke check, not a measurement",
    )
    parser.add_argument(
        "--max-wait",
        type=float,
        default=None,
        help="seconds the whole run may wait for other processes to leave the CPU (default 120, quick 20)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the per-row memory subprocesses")
    parser.add_argument("--memory-jobs", type=int, default=2, help="memory subprocesses run at once (default 2)")
    parser.add_argument("--no-both", action="store_true", help="skip the 'cnnlens both methods' row")
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="instead of the comparison, time the pieces of one cnnlens.explain call (15 rounds, quick 3)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write all numbers to this JSON file")
    parser.add_argument("--_memory-worker", nargs=3, metavar=("MODEL", "BATCH", "ROW"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args._memory_worker:
        model, batch, row = args._memory_worker
        print(json.dumps(memory_worker(model, int(batch), row)))
        return 0

    import cv2  # noqa: F401
    import pytorch_grad_cam  # noqa: F401
    import torchcam.methods  # noqa: F401

    import cnnlens  # noqa: F401

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    if args.breakdown:
        repeats = args.repeats if args.repeats is not None else (3 if args.quick else 15)
        warmup = args.warmup if args.warmup is not None else 2
    else:
        repeats = args.repeats if args.repeats is not None else (2 if args.quick else 5)
        warmup = args.warmup if args.warmup is not None else 1
    rows = [r for r in ROWS if not (args.no_both and r == "cnnlens_both")]
    budget = WaitBudget(args.max_wait if args.max_wait is not None else (20.0 if args.quick else 120.0))
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    info = machine_info(("torch", "torchvision", "timm", "grad-cam", "torchcam", "cnnlens", "numpy"))
    command = "python bench/bench_cam.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"# cnnlens CAM benchmark\n\n{describe_machine(info)}\ncommand: {command.strip()}")
    print(f"timing: {warmup} warm-up calls per row, then median of {repeats} interleaved rounds\n")

    subjects = {m: load_subject(m) for m in models}
    configs = [(m, b) for m in models for b in batches]
    if args.breakdown:
        pieces = run_breakdown(subjects, configs, warmup, repeats, budget, log)
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(
                json.dumps({"machine": info, "command": command.strip(), "breakdown": pieces}, indent=2)
            )
        return 0
    all_timings: dict[tuple[str, int], dict[str, Timing]] = {}
    agree: dict[tuple[str, int], dict[str, Any]] = {}
    for model, batch in configs:
        subject = subjects[model]
        x = make_input(subject, batch)
        log(f"{model} batch {batch}: layer {subject.layer}, weights {subject.weights}")
        bench_rows = {row: make_row(row, subject, x, own_copy=True) for row in rows}
        try:
            all_timings[model, batch] = time_round_robin(
                {row: r.call for row, r in bench_rows.items()},
                warmup=warmup,
                repeats=repeats,
                budget=budget,
                progress=log,
            )
        finally:
            for r in bench_rows.values():
                r.close()
        try:
            agree[model, batch] = agreement(subject, x)
        except Exception as exc:  # report, do not lose the timings
            agree[model, batch] = {"error": f"{type(exc).__name__}: {exc}"}

    memory = None
    if not args.no_memory:
        log("memory: one fresh process per (model, batch, row)")
        smallest = min(batches)
        mem_configs = [(m, b) for m, b in configs if b == smallest] if args.quick else configs
        memory = measure_memory(mem_configs, [r for r in rows if r not in CONTEXT_ROWS], args.memory_jobs, log)

    checks: list[dict[str, Any]] = []
    for model, batch in configs:
        timings = all_timings[model, batch]
        subject = subjects[model]
        print(
            f"## {model} (layer `{subject.layer}`, weights {subject.weights}), batch {batch}, "
            f"{subject.input_size[0]}x{subject.input_size[1]}\n"
        )
        print(config_table(model, batch, timings, memory))
        print()
        print(speedup_table(timings))
        print()
        checks.extend(check_targets(model, batch, timings, memory))

    print("## Targets\n")
    print(targets_table(checks))
    print()
    print("## Agreement of the maps (max abs difference; see the script docstring for (a)-(d))\n")
    print(agreement_table(agree))
    print()
    info["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    print(
        f"load average at the end: {info['loadavg_end']}; waited {budget.spent:.0f} s of {budget.seconds:.0f} s "
        f"for other processes to leave the CPU; total {time.perf_counter() - started:.0f} s"
    )

    if args.json is not None:
        payload = {
            "machine": info,
            "command": command.strip(),
            "repeats": repeats,
            "warmup": warmup,
            "waited_for_quiet_s": budget.spent,
            "timings": {f"{m}/b{b}": {row: t.as_dict() for row, t in ts.items()} for (m, b), ts in all_timings.items()},
            "memory_mib": None if memory is None else {f"{m}/b{b}/{r}": v for (m, b, r), v in memory.items()},
            "targets": checks,
            "agreement": {f"{m}/b{b}": v for (m, b), v in agree.items()},
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2))
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
