"""Benchmark ``cnnlens run`` (dataset runs) against the model's own forward + backward-to-layer throughput.

Run ``python bench/bench_runs.py`` (a few minutes on 2 cores), ``--quick`` for a smoke check,
``--append-doc docs/benchmarks.md`` to append the figures there.

Data: a folder tree of ``--images`` JPEG photos (default 300) made from the scikit-image sample photos
(shipped in its wheel, never downloaded) with random augmentations: a random crop of 45-100 % of the area at
aspect 3/4..4/3, a horizontal flip half of the time, brightness and contrast jitter of ±20 %, the longer side
scaled to 320-480 px, JPEG quality 90. Each photo's label is the embedded model's top class on the original
photo (folders named by class index), so the run has a realistic mix of right and wrong predictions.

Subject: the embedded default model (``efficientnet_lite0``, ImageNet weights, its ``spec.default_layer``),
batch ``--batch-size`` (default 16), on the CPU with torch's default thread count. Like the ``cnnlens`` command,
the script first calls :func:`cnnlens.allocator.keep_freed_memory` (glibc keeps freed memory for reuse), which
applies to every row; ``--default-malloc`` skips it.

Rows (interleaved round by round, median of ``--repeats`` rounds; each round processes every image once):

Each row reports its median wall time, its median CPU time (user + system, this process and the decoding
workers) and every round's wall time, so a round disturbed by other processes on a shared machine shows.

* ``inference forward``: ``model(x)`` under ``torch.inference_mode()`` on pre-decoded tensors (context only).
* ``forward + backward-to-layer`` (the **baseline**): on pre-decoded, preprocessed tensors, per batch:
  ``model(x)`` with a forward hook keeping the layer's output, then
  ``torch.autograd.grad(top-class logits.sum(), layer output)``: what the model itself needs for Grad-CAM's
  gradients, with no decoding, no maps, nothing written.
* ``cnnlens run, Grad-CAM``: ``cnnlens.runs.run_dataset`` end to end on the folder (a fresh run folder each
  round): dataset listing, model fingerprint, decoding in ``--workers`` worker processes (default: spare cores),
  two targets per image (predicted and true class), Grad-CAM maps, box-free metrics, overlays of the
  misclassified images, sharded atomic writes, ``results.parquet``, summary and manifest; Average Drop off
  (``--no-average-drop``), because it is a separate metric that costs one more forward per map.
* ``cnnlens run, Grad-CAM + Average Drop``: the same with the default Average Drop metric (for information:
  its extra forward per map bounds it near 0.5x).

The target the project sets: ``cnnlens run, Grad-CAM`` >= 0.85x the baseline's images/s.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageEnhance

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import describe_machine, format_table, machine_info

TARGET = 0.85


def make_photos(folder: Path, count: int, model: Any, seed: int = 0) -> list[tuple[Path, int]]:
    """Write ``count`` augmented JPEG photos into ``folder/<class index>/``; returns (path, label) pairs."""
    from cnnlens.data import SAMPLE_NAMES, sample_image

    rng = np.random.default_rng(seed)
    prep = model.spec.preprocessing
    originals = {name: sample_image(name) for name in SAMPLE_NAMES}
    labels: dict[str, int] = {}
    with torch.inference_mode():
        for name, image in originals.items():
            labels[name] = int(model.module(prep.to_tensor(image)[None]).argmax(1))
    written: list[tuple[Path, int]] = []
    names = list(originals)
    for i in range(count):
        name = names[i % len(names)]
        image = Image.fromarray(originals[name])
        w, h = image.size
        area = rng.uniform(0.45, 1.0) * w * h
        aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
        cw = int(min(w, max(16, round(np.sqrt(area * aspect)))))
        ch = int(min(h, max(16, round(np.sqrt(area / aspect)))))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = image.crop((x0, y0, x0 + cw, y0 + ch))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        crop = ImageEnhance.Brightness(crop).enhance(rng.uniform(0.8, 1.2))
        crop = ImageEnhance.Contrast(crop).enhance(rng.uniform(0.8, 1.2))
        side = int(rng.integers(320, 481))
        scale = side / max(crop.size)
        crop = crop.resize((max(1, round(crop.size[0] * scale)), max(1, round(crop.size[1] * scale))), Image.BILINEAR)
        path = folder / str(labels[name]) / f"{name}_{i:04d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        crop.save(path, format="JPEG", quality=90)
        written.append((path, labels[name]))
    return written


def baseline_calls(model: Any, tensors: torch.Tensor, batch: int) -> dict[str, Callable[[], object]]:
    """The two pre-decoded-tensor rows: inference forward, and forward + backward-to-layer."""
    module = model.module.eval()
    layer = dict(module.named_modules())[model.spec.default_layer]
    kept: dict[str, torch.Tensor] = {}

    def hook(_m: torch.nn.Module, _i: Any, out: torch.Tensor) -> None:
        kept["act"] = out

    def inference() -> object:
        with torch.inference_mode():
            for start in range(0, len(tensors), batch):
                module(tensors[start : start + batch])
        return None

    def forward_backward() -> object:
        handle = layer.register_forward_hook(hook)
        try:
            for start in range(0, len(tensors), batch):
                logits = module(tensors[start : start + batch])
                score = logits.gather(1, logits.detach().argmax(1, keepdim=True)).sum()
                torch.autograd.grad(score, kept["act"])
        finally:
            handle.remove()
            kept.clear()
        return None

    return {"inference forward": inference, "forward + backward-to-layer": forward_backward}


def run_call(
    dataset: Any, model: Any, work: Path, batch: int, workers: int, average_drop: bool
) -> Callable[[], object]:
    from cnnlens.runs import RunSettings, run_dataset

    settings = RunSettings(methods=("gradcam",), average_drop=average_drop)

    def call() -> object:
        out = work / f"run-{'ad' if average_drop else 'cam'}"
        if out.exists():
            shutil.rmtree(out)
        return run_dataset(out, dataset, model, settings, batch_size=batch, workers=workers)

    return call


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children (the decoding workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=300, help="photos in the folder (default 300)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=None, help="decoding processes (default: cnnlens')")
    parser.add_argument("--repeats", type=int, default=3, help="rounds (median reported; default 3)")
    parser.add_argument("--quick", action="store_true", help="40 images, 1 round, no Average Drop row")
    parser.add_argument("--keep", metavar="DIR", help="write the photos and runs here and keep them")
    parser.add_argument("--append-doc", metavar="MD", help="append the results as a section to this Markdown file")
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="do not call cnnlens.allocator.keep_freed_memory() first (the cnnlens command does; see its docs)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.default_malloc:
        from cnnlens.allocator import keep_freed_memory

        # What `cnnlens run` does at start; it applies to every row of this process alike.
        print(f"glibc allocator keeps freed memory: {keep_freed_memory()}", flush=True)
    from cnnlens.models import DEFAULT_MODEL, load_model
    from cnnlens.runs import read_dataset
    from cnnlens.runs.runner import default_workers

    images = 40 if args.quick else args.images
    repeats = 1 if args.quick else args.repeats
    workers = default_workers() if args.workers is None else args.workers
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="cnnlens-bench-runs-"))
    work.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    print(describe_machine(info), flush=True)
    model = load_model(DEFAULT_MODEL)
    photos = work / "photos"
    if photos.exists():
        shutil.rmtree(photos)
    started = time.perf_counter()
    make_photos(photos, images, model)
    print(f"wrote {images} photos to {photos} in {time.perf_counter() - started:.1f} s; workers {workers}", flush=True)
    dataset = read_dataset(photos, model.class_names)
    from cnnlens.data import load_image

    prep = model.spec.preprocessing
    tensors = torch.stack([prep.to_tensor(load_image(s.path)) for s in dataset.samples])
    calls = baseline_calls(model, tensors, args.batch_size)
    calls["cnnlens run, Grad-CAM"] = run_call(dataset, model, work, args.batch_size, workers, average_drop=False)
    if not args.quick:
        calls["cnnlens run, Grad-CAM + Average Drop"] = run_call(
            dataset, model, work, args.batch_size, workers, average_drop=True
        )
    for fn in baseline_calls(model, tensors[: args.batch_size], args.batch_size).values():
        fn()  # warm-up: one batch of each pre-decoded row (allocator, kernels)
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    cpu: dict[str, list[float]] = {name: [] for name in calls}
    accuracy = None
    for r in range(repeats):
        for name, fn in calls.items():
            c0 = cpu_seconds()
            t0 = time.perf_counter()
            result = fn()
            seconds[name].append(time.perf_counter() - t0)
            cpu[name].append(cpu_seconds() - c0)
            if hasattr(result, "accuracy"):
                accuracy = result.accuracy
            print(f"round {r + 1}/{repeats} {name}: {seconds[name][-1]:.2f} s (CPU {cpu[name][-1]:.2f} s)", flush=True)
    median = {name: statistics.median(v) for name, v in seconds.items()}
    median_cpu = {name: statistics.median(v) for name, v in cpu.items()}
    rate = {name: images / s for name, s in median.items()}
    base = rate["forward + backward-to-layer"]
    rows = [
        [
            name,
            f"{median[name]:.2f} s",
            f"{median_cpu[name]:.2f} s",
            f"{rate[name]:.1f}",
            f"{rate[name] / base:.2f}x",
            " ".join(f"{v:.2f}" for v in seconds[name]),
        ]
        for name in calls
    ]
    table = format_table(["row", "median time", "median CPU", "images/s", "vs baseline", "all rounds (s)"], rows)
    ratio = rate["cnnlens run, Grad-CAM"] / base
    met = "met" if ratio >= TARGET else "NOT met"
    verdict = f"cnnlens run, Grad-CAM: {ratio:.2f}x the baseline (target >= {TARGET}x): {met}"
    print(table)
    print(verdict)
    command = "python bench/bench_runs.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.append_doc:
        doc = Path(args.append_doc)
        doc.parent.mkdir(parents=True, exist_ok=True)
        load = info["loadavg_1_5_15"]
        text = (
            f"\n## Dataset runs (`cnnlens run`): {info['date']}\n\n"
            f"Command: `{command.strip()}`. Machine: {info['cpu']}, {info['cores']} cores, torch threads "
            f"{info['torch_threads']}, load average {load} at start (a shared machine), Python {info['python']}, "
            + ", ".join(f"{k} {v}" for k, v in info["versions"].items())
            + f". {images} augmented sample photos (JPEG, 320-480 px), embedded `{DEFAULT_MODEL}` at "
            f"`{model.spec.default_layer}`, batch {args.batch_size}, {workers} decoding worker(s), median of "
            f"{repeats} round(s); accuracy of the run {accuracy if accuracy is None else f'{100 * accuracy:.1f} %'}."
            "\n\n" + table + "\n\n" + verdict + ".\n"
        )
        with open(doc, "a", encoding="utf-8") as fh:
            fh.write(text)
        print(f"appended to {doc}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
