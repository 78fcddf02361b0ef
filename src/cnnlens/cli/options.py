"""Argument groups several commands share (model, preprocessing, --layout, --max-pixels, --show-top, -v)."""

from __future__ import annotations

import argparse
from typing import Any

from cnnlens._names import DEFAULT_MAX_PIXELS, DEFAULT_MODEL, ZOO_MODELS

KERAS_MODELS_HELP = (
    "or a Keras model (run on Keras's torch backend): keras:vgg16, keras:resnet50, keras:inception_v3, "
    "keras:inception_resnet_v2 (published weights from the Keras cache, or --random-weights, or --weights "
    "x.weights.h5), or a saved path/to/model.keras or .h5 file"
)
"""The ``--model`` help for Keras models, shared by every command that takes ``--model``."""


KERAS_PREPROCESS_MODES = ("caffe", "tf", "torch")
"""``--preprocess``: Keras ``preprocess_input`` modes (``cnnlens.models.preprocessing.PREPROCESSING_MODES``)."""


def _add_model_options(parser: argparse.ArgumentParser, *, preprocessing: bool = True) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"zoo name ({', '.join(ZOO_MODELS)}), a torchvision/timm architecture name for your own checkpoint "
        "(with --num-classes and --weights), your own factory: package.module:factory or "
        f"path/to/file.py:factory (called with no arguments, or num_classes=N), {KERAS_MODELS_HELP}. "
        f"Default: {DEFAULT_MODEL} (embedded weights, offline).",
    )
    group.add_argument(
        "--weights",
        metavar="PATH",
        help="checkpoint (state dict) to load, read with weights_only=True; for keras:ARCH a .weights.h5 file",
    )
    group.add_argument(
        "--random-weights", action="store_true", help="use an untrained, seeded model (every output says so)"
    )
    group.add_argument("--download", action="store_true", help="allow fetching published weights (needs network)")
    group.add_argument("--num-classes", type=int, metavar="N", help="number of classes of your own model")
    group.add_argument("--class-names", metavar="FILE", help="class names file (.txt one per line, or .json list)")
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps, or auto (default)")
    if preprocessing:
        _add_preprocessing_options(parser)


def _add_preprocessing_options(parser: argparse.ArgumentParser) -> None:
    prep = parser.add_argument_group("preprocessing (override the model's)")
    prep.add_argument("--input-size", type=int, nargs="+", metavar="PX", help="model input H [W], e.g. 32 for CIFAR")
    prep.add_argument("--resize", type=int, metavar="PX", help="shorter side before the center crop (default: input)")
    prep.add_argument("--mean", type=float, nargs="+", metavar="V", help="normalisation mean, 1 or 3 values")
    prep.add_argument("--std", type=float, nargs="+", metavar="V", help="normalisation std, 1 or 3 values")
    prep.add_argument(
        "--preprocess",
        choices=KERAS_PREPROCESS_MODES,
        help="Keras models: the preprocess_input mode (caffe: BGR minus the ImageNet mean, as vgg16/resnet50; tf: "
        "x/127.5-1, as inception_v3; torch: ImageNet mean/std). Default: the architecture's; tf for a .keras file",
    )


def _add_layout(parser: Any) -> None:
    parser.add_argument(
        "--layout",
        action="append",
        default=[],
        metavar="SPEC|LAYER=SPEC",
        help="how a layer's output maps to (C, h, w) maps: auto (default: inferred and printed), nchw, nhwc "
        "(channels last: Swin), tokens (ViT: prefix tokens and grid inferred), tokens:P (P prefix tokens), "
        "tokens:P:HxW (e.g. tokens:1:14x14), or ncdhw (volumes). One SPEC for every layer, or LAYER=SPEC "
        "(repeatable) for single layers",
    )


def _add_max_pixels(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        metavar="N",
        help=f"largest image accepted, width x height, checked before decoding (default {DEFAULT_MAX_PIXELS:,}; "
        "a 12000x9000 photo needs 108000000)",
    )


class _ShowTop(argparse.Action):
    """``--show-top N``; its deprecated alias ``--top-k`` also sets ``deprecated_top_k`` (a note is printed)."""

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: str | None = None
    ) -> None:
        setattr(namespace, self.dest, values)
        if option == "--top-k":
            namespace.deprecated_top_k = True


def _add_verbose(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: the sub-command's flag does not overwrite `cnnlens -v COMMAND` with False.
    parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log progress details")


_OVERWRITE_HELP = (
    "write into an --out folder cnnlens did not write (replacing only same-named files, deleting nothing); without "
    "it such a folder is refused. A folder cnnlens wrote for the same command is reused"
)


def _add_execution_options(parser: argparse.ArgumentParser) -> None:
    """How to run (:class:`cnnlens.Execution`): never part of a map's identity, only of its speed and memory."""
    run = parser.add_argument_group("execution (how to run; the maps' method variants do not change)")
    run.add_argument(
        "--memory-format",
        choices=["contiguous", "channels_last"],
        default="contiguous",
        help="layout of CPU forwards: contiguous (default, accurate) or channels_last (faster CPU convolutions, "
        "slightly less accurate gradients)",
    )
    run.add_argument("--memory-budget-mb", type=float, metavar="MB", help="memory of one chunk of extra forwards")
    run.add_argument("--chunk-size", type=int, metavar="N", help="samples per chunk of extra forwards (Score-CAM...)")
    run.add_argument("--threads", type=int, metavar="N", help="torch threads for the call (default: torch's)")
