"""Benchmark cnnlens.metrics deletion + insertion (RISE, 224 steps) on the embedded EfficientNet-Lite0.

Run ``python bench/bench_metrics.py`` (a few minutes on 2 busy cores), ``--quick`` for one round.

Subject: ``cnnlens.load_model("efficientnet_lite0")`` (embedded ImageNet weights, offline), one 224x224
scikit-image sample photo (``chelsea``) normalised with the model's preprocessing, and its Grad-CAM map at
the model's default layer (computed once, not timed). Target: the top class.

Rows (wall-clock, median of ``--repeats`` interleaved rounds after ``--warmup``; calls during which other
processes used the CPU are retaken, see ``bench/_common.py``):

* ``cnnlens deletion + insertion``: ``metrics.deletion_insertion(model, x, exp, step=224)``: 224 deletion
  steps (zero baseline) and 224 insertion steps (RISE blur canvas), 448 perturbed forwards plus one of the
  image, built lazily and run in memory-bounded chunks sized from the budget (contiguous, the default).
  The issue's target: under 2 s.
* ``floor: 449 batched forwards``: the same number of inference forwards of ready-made images in chunks of
  16, channels-last, in a layer-less capture: what the model alone costs. ``overhead`` = cnnlens / floor
  is what the metric adds (building masks and images, softmax, bookkeeping).
* ``RISE loop (extrapolated)``: RISE's reference protocol, one batch-1 forward per step with numpy in-place
  pixel copies (a literal port of ``CausalMetric.single_run``), timed over the first ``--naive-steps``
  deletion steps and scaled to 449 forwards: what a per-step implementation would pay here.

Two extra cnnlens calls at a coarse step (8 steps per game), channels-last and contiguous, check that both
layouts give the same AUCs (not timed).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import cnnlens
from cnnlens import metrics
from cnnlens.capture import forward_only

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    describe_machine,
    fmt_seconds,
    format_table,
    machine_info,
    sample_batch,
    time_round_robin,
)

TARGET_S = 2.0


def rise_loop(model: nn.Module, x: torch.Tensor, saliency: np.ndarray, step: int, n_forwards: int) -> float:
    """Seconds for ``n_forwards`` steps of RISE's per-step deletion loop (batch-1 forwards, softmax)."""
    hw = int(x.shape[-1] * x.shape[-2])
    softmax = nn.Sequential(model, nn.Softmax(dim=1)).eval()
    start = x.clone()
    finish = torch.zeros_like(x)
    order = np.flip(np.argsort(saliency.reshape(-1, hw), axis=1), axis=-1)
    began = time.perf_counter()
    with torch.inference_mode():
        c = int(softmax(x).argmax(1))
        for i in range(n_forwards):
            _ = float(softmax(start)[0, c])
            coords = order[:, step * i : step * (i + 1)]
            start.numpy().reshape(1, 3, hw)[0, :, coords] = finish.numpy().reshape(1, 3, hw)[0, :, coords]
    return time.perf_counter() - began


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--step", type=int, default=224, help="pixels per step (default 224: 224 steps)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 3, quick 1)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up calls per row (default 1, quick 0)")
    parser.add_argument("--naive-steps", type=int, default=24, help="RISE-loop forwards actually timed (default 24)")
    parser.add_argument(
        "--max-retakes", type=int, default=2, help="retakes of a call during which other processes used the CPU"
    )
    parser.add_argument("--quick", action="store_true", help="one round, no warm-up: a smoke check")
    parser.add_argument("--json", type=Path, default=None, help="also write all numbers to this JSON file")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    warmup = args.warmup if args.warmup is not None else (0 if args.quick else 1)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    info = machine_info()
    log(describe_machine(info))
    loaded = cnnlens.load_model("efficientnet_lite0")
    pre = loaded.spec.preprocessing
    x = sample_batch(1, pre.input_size, pre.mean, pre.std)
    exp = cnnlens.explain(loaded, x, methods=["gradcam"])[0]
    pixels = int(x.shape[-1] * x.shape[-2])
    n_steps = (pixels + args.step - 1) // args.step
    n_forwards = 2 * n_steps + 1
    ready = x.repeat(16, 1, 1, 1).contiguous(memory_format=torch.channels_last)

    def floor() -> None:
        with forward_only(loaded.module) as cap:
            done = 0
            while done < n_forwards:
                n = min(16, n_forwards - done)
                cap.forward(ready[:n])
                done += n

    results: dict[str, Any] = {}

    def ours() -> None:
        results["curves"] = metrics.deletion_insertion(loaded, x, exp, step=args.step)

    timings = time_round_robin(
        {"cnnlens deletion + insertion": ours, f"floor: {n_forwards} batched forwards": floor},
        warmup=warmup,
        repeats=repeats,
        max_retakes=args.max_retakes,
        progress=log,
    )
    log("RISE loop")
    naive_steps = max(1, min(args.naive_steps, n_forwards))
    naive_s = rise_loop(loaded.module, x, exp.maps[0, 0].double().numpy(), args.step, naive_steps)
    naive_total = naive_s * n_forwards / naive_steps
    d, i = results["curves"]
    log("layout check")
    coarse = max(args.step, pixels // 8)
    layouts = [
        metrics.MetricOptions(execution=cnnlens.Execution(memory_format="channels_last")),
        metrics.MetricOptions(execution=cnnlens.Execution(memory_format="contiguous")),
    ]
    pair = [metrics.deletion_insertion(loaded, x, exp, step=coarse, options=opts) for opts in layouts]
    layout_diff = max(float((a.auc - b.auc).abs().max()) for a, b in zip(pair[0], pair[1], strict=True))

    ours_name, floor_name = "cnnlens deletion + insertion", f"floor: {n_forwards} batched forwards"
    ours_s = timings[ours_name].median
    floor_s = timings[floor_name].median
    rows = [
        [
            name,
            fmt_seconds(t.median),
            fmt_seconds(t.iqr),
            f"{t.median / floor_s:.2f}x",
            f"{t.retaken}/{t.contended_kept}",
        ]
        for name, t in ((ours_name, timings[ours_name]), (floor_name, timings[floor_name]))
    ]
    rows.append(
        [
            f"RISE loop, batch-1 forwards (extrapolated from {naive_steps})",
            fmt_seconds(naive_total),
            "-",
            f"{naive_total / floor_s:.2f}x",
            "-",
        ]
    )
    table = format_table(["row", "median", "IQR", "vs floor", "retaken/contended kept"], rows)
    print(table)
    verdict = "meets" if ours_s < TARGET_S else "misses"
    print(
        f"\nefficientnet_lite0, 1 image 224x224, step {args.step} ({n_steps} steps per game, {n_forwards} forwards): "
        f"cnnlens {fmt_seconds(ours_s)} ({verdict} the {TARGET_S:g} s target), {ours_s / floor_s:.2f}x the batched "
        f"forward floor, {naive_total / ours_s:.1f}x faster than RISE's per-step loop (extrapolated). "
        f"Deletion AUC {d.mean_auc:.4f}, insertion AUC {i.mean_auc:.4f}; channels-last vs contiguous AUC "
        f"difference {layout_diff:.1e}."
    )
    if args.json is not None:
        payload = {
            "machine": info,
            "step": args.step,
            "steps": n_steps,
            "forwards": n_forwards,
            "timings": {k: v.as_dict() for k, v in timings.items()},
            "rise_loop_extrapolated_s": naive_total,
            "rise_loop_timed_forwards": naive_steps,
            "deletion_auc": d.mean_auc,
            "insertion_auc": i.mean_auc,
            "layout_auc_difference": layout_diff,
            "target_s": TARGET_S,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2))
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
