"""Benchmark activation maximisation: 16 channels as one batch versus 16 one-channel runs (CPU, one process).

Run ``python bench/bench_maximize.py`` (a few minutes on 2 cores), ``--quick`` for a smoke check.

Subject: the embedded ``efficientnet_lite0`` (``cnnlens.load_model``), channels 0-15 of ``--layer``
(default ``blocks.4``, stride 16) at ``--size`` 224, ``--steps`` Adam steps, the default parameterisation
(Fourier spectrum, decorrelated colour) and the standard robustness transforms.

Rows, interleaved round by round (:func:`_common.time_round_robin`, median of ``--repeats`` rounds, a round
retaken when other processes used the CPU meanwhile, within a waiting budget):

* ``batch of 16``: ``maximize(model, layer, range(16), steps=S, size=224, max_batch=None)``, one batch.
* ``16 x one channel``: ``maximize(model, layer, [c], steps=S, size=224)`` for c in 0..15, one after another.

Both compute the same images (up to float rounding, see ``cnnlens.views.maximize``). Reported: seconds per
channel (for S steps, and per step), the speed-up of the batch (target: >= 3x), and the machine. Each
``--threads`` value (default: torch's default, then 1) is measured separately: on a machine shared with
other jobs, one intra-op thread avoids OpenMP barriers waiting for preempted threads.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import WaitBudget, describe_machine, fmt_seconds, format_table, machine_info, time_round_robin


def run(threads: int, args: argparse.Namespace) -> dict[str, Any]:
    from cnnlens.models import load_model
    from cnnlens.views import maximize

    torch.set_num_threads(threads)
    lm = load_model("efficientnet_lite0")
    channels = list(range(args.channels))

    def batched() -> None:
        maximize(lm, args.layer, channels, steps=args.steps, size=args.size, max_batch=None)

    def sequential() -> None:
        for c in channels:
            maximize(lm, args.layer, [c], steps=args.steps, size=args.size)

    maximize(lm, args.layer, [0, 1], steps=1, size=args.size)  # warm-up (allocator, oneDNN kernels)
    timings = time_round_robin(
        {f"batch of {len(channels)}": batched, f"{len(channels)} x one channel": sequential},
        warmup=0,
        repeats=args.repeats,
        max_retakes=1,
        budget=WaitBudget(args.wait),
        progress=lambda msg: print(f"  [{threads} thread(s)] {msg}", file=sys.stderr, flush=True),
    )
    t_b, t_s = timings.values()
    n = len(channels)
    return {
        "threads": threads,
        "rows": {
            name: {
                **t.as_dict(),
                "seconds_per_channel": t.median / n,
                "seconds_per_channel_step": t.median / n / args.steps,
            }
            for name, t in timings.items()
        },
        "speedup": t_s.median / t_b.median,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layer", default="blocks.4")
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=None, help="default: torch's default, then 1")
    parser.add_argument("--wait", type=float, default=60.0, help="seconds allowed waiting for a quiet machine")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    parser.add_argument("--quick", action="store_true", help="smoke check: 4 channels, 2 steps, 96 px, 1 round")
    args = parser.parse_args(argv)
    if args.quick:
        args.channels, args.steps, args.size, args.repeats = 4, 2, 96, 1
    threads = args.threads or list(dict.fromkeys([torch.get_num_threads(), 1]))
    info = machine_info()
    print(describe_machine(info))
    started = time.perf_counter()
    results = [run(t, args) for t in threads]
    headers = ["threads", "row", "median", "IQR", "s/channel", "s/channel/step", "speed-up", "retaken/kept"]
    rows = []
    for res in results:
        for name, row in res["rows"].items():
            rows.append(
                [
                    str(res["threads"]),
                    name,
                    fmt_seconds(row["median_s"]),
                    fmt_seconds(row["iqr_s"]),
                    f"{row['seconds_per_channel']:.2f}",
                    f"{row['seconds_per_channel_step']:.3f}",
                    f"{res['speedup']:.2f}x" if name.startswith("batch") else "1.00x",
                    f"{row['retaken_for_contention']}/{row['contended_samples_kept']}",
                ]
            )
    print(
        f"\nefficientnet_lite0, {args.layer}, channels 0-{args.channels - 1}, {args.size}x{args.size}, "
        f"{args.steps} steps, {args.repeats} round(s)"
    )
    print(format_table(headers, rows))
    command = "python bench/bench_maximize.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"\nwall time {time.perf_counter() - started:.0f} s; command: {command.strip()}")
    if args.json:
        doc = {"machine": info, "settings": vars(args) | {"json": str(args.json)}, "results": results}
        args.json.write_text(json.dumps(doc, indent=2, default=str), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
