"""Benchmark cnnlens Grad-CAM on Keras 3 models (torch backend) against the Keras forward (CPU, one process run).

Run ``python bench/bench_keras.py`` (about 2-3 minutes on 2 cores), ``--quick`` for a smoke check.

Subjects (issue 12): ``cnnlens.load_model("keras:vgg16" | "keras:resnet50", random_weights=True)`` (Keras 3,
``KERAS_BACKEND=torch``, ``keras.applications`` architectures with Keras's random initialisation), at their
layers ``block5_conv3`` and ``conv5_block3_out``, batch 1 (``--batches`` for more), 224x224 scikit-image sample
photos through the models' own 'caffe' preprocessing. torchvision's ``vgg16``/``resnet50`` (``weights=None``,
eval) give the context row.

Rows (targets = the top class of each image):

* ``Keras forward``: ``keras_model(x_nhwc, training=False)`` under ``torch.no_grad()``, the Keras model called
  the way Keras documents it, on the same backend: the baseline every ratio refers to.
* ``cnnlens Grad-CAM``: ``cnnlens.explain(model, x, methods="gradcam", layers=[layer])`` on the
  :class:`~cnnlens.models.keras.KerasModule` (NCHW in, logits out): forward with the layer recorded, backward
  to the layer, raw maps, normalised maps upsampled to the input, display images.
* ``torchvision forward`` (context): the torchvision model of the same architecture under
  ``torch.inference_mode()``; the ``Keras / torchvision forward`` row is the price of the Keras layers
  themselves (NHWC tensors permuted around torch's NCHW kernels), not of cnnlens.

Calls are interleaved round by round (warm-up first) and the median of ``--repeats`` rounds is reported with the
inter-quartile range; a call during which other processes used more than a quarter of a core is retaken (see
``_common.time_round_robin``).

Target the issue sets (checked and printed): cnnlens Grad-CAM <= 1.3x the Keras forward.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    WaitBudget,
    describe_machine,
    fmt_seconds,
    format_table,
    machine_info,
    time_round_robin,
)

SUBJECTS = {"vgg16": "block5_conv3", "resnet50": "conv5_block3_out"}
ROWS = {
    "keras": "Keras forward",
    "cnnlens": "cnnlens Grad-CAM",
    "torchvision": "torchvision forward",
}
TARGET = 1.3


def photos(prep: Any, batch: int) -> torch.Tensor:
    """``batch`` scikit-image sample photos (shipped in its wheel) through the model's preprocessing."""
    from skimage import data

    names = ("chelsea", "coffee", "astronaut", "rocket")
    return torch.stack([prep.to_tensor(getattr(data, names[i % len(names)])()) for i in range(batch)])


def rows_for(name: str, batch: int) -> dict[str, Callable[[], object]]:
    import torchvision

    import cnnlens

    torch.manual_seed(0)
    loaded = cnnlens.load_model(f"keras:{name}", random_weights=True)
    keras_model = loaded.module.keras_model
    tv = getattr(torchvision.models, name)(weights=None).eval()
    layer = SUBJECTS[name]
    x = photos(loaded.spec.preprocessing, batch)
    x_nhwc = x.permute(0, 2, 3, 1).contiguous()

    def keras_forward() -> object:
        with torch.no_grad():
            return keras_model(x_nhwc, training=False)

    def torchvision_forward() -> object:
        with torch.inference_mode():
            return tv(x)

    def ours() -> object:
        return cnnlens.explain(loaded, x, methods="gradcam", layers=[layer])

    return {"keras": keras_forward, "cnnlens": ours, "torchvision": torchvision_forward}


def run(args: argparse.Namespace) -> int:
    info = machine_info(("torch", "torchvision", "keras"))
    print(describe_machine(info))
    budget = WaitBudget(args.max_wait)
    table: list[list[str]] = []
    failures: list[str] = []
    for name in args.models.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            rows = rows_for(name, batch)
            timings = time_round_robin(rows, warmup=args.warmup, repeats=args.repeats, budget=budget)
            base = timings["keras"].median
            for row, label in ROWS.items():
                t = timings[row]
                table.append(
                    [
                        f"keras:{name}",
                        str(batch),
                        label,
                        fmt_seconds(t.median),
                        fmt_seconds(t.iqr),
                        f"{t.median / base:.2f}x",
                        f"{t.retaken}/{t.contended_kept}",
                    ]
                )
            ratio = timings["cnnlens"].median / base
            context = base / timings["torchvision"].median
            table.append([f"keras:{name}", str(batch), "Keras / torchvision forward", "", "", f"{context:.2f}x", ""])
            if ratio > TARGET:
                failures.append(f"keras:{name} b={batch}: Grad-CAM {ratio:.2f}x the Keras forward (target <= {TARGET})")
    headers = ["model", "batch", "row", "median", "IQR", "x Keras forward", "retaken/kept"]
    print(format_table(headers, table))
    for line in failures:
        print(f"TARGET MISSED: {line}")
    if not failures:
        print(f"target met: cnnlens Grad-CAM <= {TARGET}x the Keras forward")
    return 0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(SUBJECTS), help="comma-separated: vgg16, resnet50")
    parser.add_argument("--batches", default="1", help="comma-separated batch sizes (default 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per config (default 7, quick 2)")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up calls per row (default 1)")
    parser.add_argument("--max-wait", type=float, default=120.0, help="seconds of waiting for a quiet machine")
    parser.add_argument("--quick", action="store_true", help="2 rounds")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 2 if args.quick else 7
    return args


if __name__ == "__main__":
    sys.exit(run(parse_args()))
