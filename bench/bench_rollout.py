"""Benchmark cnnlens attention rollout (and gradient-weighted attention) on a ViT (CPU, one process run).

Run ``python bench/bench_rollout.py`` (about a minute on 2 cores), ``--quick`` for a smoke check.

Subject: timm ``vit_tiny_patch16_224`` (``pretrained=False``, seeded, eval), 224x224, batch 1 and 8; inputs are
scikit-image sample photos (shipped in its wheel) normalised with the ImageNet statistics.

Rows (targets = the top class of each image):

* ``inference forward, attention recorded``: ``model(x)`` under ``torch.inference_mode()`` inside
  ``cnnlens.capture.attention.AttentionRecorder(model)`` (timm's ``fused_attn`` switched off, every block's
  probabilities kept): the baseline the ratios refer to, what any rollout implementation must at least run.
* ``inference forward (fused attention)``: the plain forward with timm's default fused attention (context: what
  unfused attention costs).
* ``cnnlens rollout``: ``cnnlens.explain(model, x, methods=["rollout"])`` (default layer; raw maps, ReLU,
  normalised maps upsampled to the input, display images). Its probabilities are recorded during explain()'s
  own forward, so the rollout adds only its ``O(L N^2)`` row recursion and explain()'s bookkeeping.
* ``forward + full backward`` and ``cnnlens attngrad`` (context): gradient-weighted attention runs one more
  forward with attention recorded and one gradient pass per target.

Calls are interleaved round by round after a warm-up; the median of ``--repeats`` rounds is reported with the
inter-quartile range, and calls during which other processes used the CPU are retaken (``bench/_common.py``).
``torch.set_num_threads`` is left at its default and reported.

Target the project sets (checked and printed): rollout <= 1.3x an inference forward with attention recorded.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cnnlens
from _common import (
    WaitBudget,
    describe_machine,
    fmt_seconds,
    format_table,
    machine_info,
    sample_batch,
    time_round_robin,
)
from cnnlens.capture.attention import AttentionRecorder

MODEL = "vit_tiny_patch16_224"
SEED = 0
MAX_RATIO = 1.3

ROWS: dict[str, str] = {
    "forward_att": "inference forward, attention recorded",
    "forward": "inference forward (fused attention)",
    "rollout": "cnnlens rollout",
    "forward_backward": "forward + full backward",
    "attngrad": "cnnlens attngrad",
}


def make_calls(model: torch.nn.Module, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    """The callable of every row."""

    def forward_att() -> object:
        with AttentionRecorder(model) as rec, torch.inference_mode():
            model(x)
        return rec.probabilities

    def forward() -> object:
        with torch.inference_mode():
            return model(x)

    def rollout() -> object:
        return cnnlens.explain(model, x, methods=["rollout"])

    def forward_backward() -> object:
        out = model(x)
        out.gather(1, out.argmax(dim=1, keepdim=True)).sum().backward()
        model.zero_grad(set_to_none=True)
        return out.detach()

    def attngrad() -> object:
        return cnnlens.explain(model, x, methods=["attngrad"])

    calls = {"forward_att": forward_att, "forward": forward, "rollout": rollout}
    calls |= {"forward_backward": forward_backward, "attngrad": attngrad}
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--max-wait", type=float, default=120.0, help="seconds of waiting for a quiet CPU per run")
    parser.add_argument("--quick", action="store_true", help="1 warm-up, 2 rounds, batch 1 only")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.warmup, args.batches = 2, 1, [1]

    import timm

    info = machine_info()
    print(describe_machine(info))
    torch.manual_seed(SEED)
    model = timm.create_model(MODEL, pretrained=False).eval()
    budget = WaitBudget(args.max_wait)
    results: dict[str, dict[str, object]] = {}
    table = []
    failed = []
    for batch in args.batches:
        x = sample_batch(batch, (224, 224), seed=SEED)
        timings = time_round_robin(make_calls(model, x), warmup=args.warmup, repeats=args.repeats, budget=budget)
        base = timings["forward_att"].median
        results[f"b{batch}"] = {row: t.as_dict() for row, t in timings.items()}
        for row, label in ROWS.items():
            t = timings[row]
            table.append(
                [
                    f"{MODEL} b={batch}",
                    label,
                    fmt_seconds(t.median),
                    fmt_seconds(t.iqr),
                    f"{t.median / base:.2f}x",
                    str(t.retaken),
                ]
            )
        ratio = timings["rollout"].median / base
        if ratio > MAX_RATIO:
            failed.append(f"b={batch}: rollout {ratio:.2f}x > {MAX_RATIO}x")
    headers = ["subject", "row", "median", "IQR", "x forward w/ attention", "retaken"]
    print(format_table(headers, table, "llrrrr"))
    print(f"target: cnnlens rollout <= {MAX_RATIO}x an inference forward with attention recorded")
    print("FAILED: " + "; ".join(failed) if failed else "target met")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "results": results}, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
