"""The whole ``cnnlens`` parser, built without importing torch (names come from :mod:`cnnlens._names`)."""

from __future__ import annotations

import argparse
from typing import Any

from cnnlens._names import DEFAULT_METHODS, DEFAULT_MODEL, METHOD_IDS, __version__
from cnnlens.cli.options import (
    _OVERWRITE_HELP,
    _add_execution_options,
    _add_layout,
    _add_max_pixels,
    _add_model_options,
    _add_verbose,
    _ShowTop,
)
from cnnlens.cli.parser_more import add_run_commands, add_views_commands
from cnnlens.cli.parser_serve import add_serve_command


def _add_explain(sub: Any, methods_help: str) -> None:
    """``cnnlens explain``: its options are declared in one place, one call each (a long list, not long logic)."""
    ex = sub.add_parser(
        "explain",
        help="explain predictions on images with CAM methods",
        description="Predict each image, then write overlays, heatmaps, raw maps, a manifest and an HTML index. "
        "Every argument is checked before the model is loaded.",
    )
    ex.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files and/or folders of images")
    _add_model_options(ex)
    ex.add_argument(
        "--method",
        nargs="+",
        default=list(DEFAULT_METHODS),
        metavar="ID",
        help=f"{methods_help} (default: {' '.join(DEFAULT_METHODS)}, as in the API and `cnnlens run`)",
    )
    ex.add_argument("--layer", nargs="+", metavar="NAME", help="target layer(s), dotted names (default: the model's)")
    _add_layout(ex)
    ex.add_argument(
        "--class",
        dest="target_class",
        metavar="INDEX_OR_NAME",
        help="explain this class (default: the top class)",
    )
    ex.add_argument(
        "--show-top",
        "--top-k",
        dest="show_top",
        type=int,
        action=_ShowTop,
        metavar="N",
        help="print the N best predictions per image (default 5, or every class of a model with fewer). --top-k "
        "is a deprecated alias (in the Python API top_k= means --explain-top)",
    )
    ex.add_argument(
        "--explain-top",
        type=int,
        default=1,
        metavar="N",
        help="explain each of the N best classes (default 1; the API's top_k=N)",
    )
    ex.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="METHOD.KEY=VALUE",
        help="method option, e.g. gradcampp.alpha_normalize=true or gradcam.relu=false (repeatable; booleans take "
        "true/false, 1/0 or yes/no; `cnnlens methods` lists each method's options)",
    )
    ex.add_argument("--out", default="cnnlens-out", metavar="DIR", help="output folder (default cnnlens-out)")
    ex.add_argument("--batch-size", type=int, default=8, metavar="N", help="images per forward (default 8)")
    ex.add_argument("--recursive", action="store_true", help="descend into sub-folders")
    ex.add_argument(
        "--overwrite",
        action="store_true",
        help="write into an --out folder cnnlens did not write (replacing only same-named files, deleting nothing), "
        "or start over in one it did (removing only the files its marker lists). Without it such a folder is "
        "refused, and a folder of earlier explanations of the same model is merged: its images stay in the index",
    )
    ex.add_argument("--cmap", default="jet", help="matplotlib colour map for heatmaps (default jet)")
    _add_execution_options(ex)
    _add_max_pixels(ex)


def _add_catalog(sub: Any, methods_help: str) -> None:
    """``cnnlens layers``, ``models`` and ``methods``."""
    ly = sub.add_parser(
        "layers",
        help="list a model's layers with type, output shape and stride",
        description="List the layers of a model (no weights needed: without them the architecture is built with "
        "untrained weights just to list it).",
    )
    _add_model_options(ly)
    ly.add_argument("--all", action="store_true", help="also list modules without parameters or 4-D output")

    sub.add_parser("models", help="list the model zoo and whether each model's weights are available here")
    me = sub.add_parser("methods", help="list the registered explanation methods")
    me.add_argument("--markdown", action="store_true", help="print the formula cards as Markdown (docs/methods.md)")


def _add_studies(sub: Any, methods_help: str) -> None:
    """``cnnlens compare-layers`` and ``compare-models``."""
    cl = sub.add_parser(
        "compare-layers",
        help="which target layer gives the most faithful maps: every candidate layer measured",
        description="Explain the images at every candidate layer (roles: highest-numbered conv, deepest conv, "
        "last conv of each branch of the final block, merges, block outputs, final spatial) with each method from "
        "one capture, measure every map (Average Drop, Increase in Confidence, deletion/insertion AUC), "
        "recommend a layer and write an HTML report.",
    )
    cl.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    _add_model_options(cl)
    cl.add_argument(
        "--method", nargs="+", default=["gradcam", "gradcampp"], metavar="ID", help=f"{methods_help} (default: "
        "gradcam gradcampp)"
    )  # fmt: skip
    cl.add_argument("--layer", nargs="+", metavar="NAME", help="explicit layers instead of the candidates")
    _add_layout(cl)
    cl.add_argument("--last-n", type=int, default=4, help="keep the last N merges/block outputs (default 4)")
    cl.add_argument("--steps", type=int, default=16, help="deletion/insertion steps (default 16)")
    cl.add_argument("--out", default="cnnlens-layers", metavar="DIR")
    cl.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
    _add_execution_options(cl)
    _add_max_pixels(cl)

    cm = sub.add_parser(
        "compare-models",
        help="compare architectures on the same images, each at its recommended layer",
    )
    cm.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    cm.add_argument(
        "--models",
        nargs="+",
        default=["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"],
        metavar="MODEL",
        help="models to compare, torch and Keras mixed (each as --model takes it: a zoo name, an architecture, a "
        "factory, keras:vgg16, keras:resnet50, keras:inception_v3, keras:inception_resnet_v2, a .keras/.h5 file)",
    )
    cm.add_argument("--weights", nargs="+", metavar="MODEL=PATH", default=[], help="checkpoint per model")
    cm.add_argument("--layers", nargs="+", metavar="MODEL=LAYER", default=[], help="layer per model")
    cm.add_argument(
        "--input-size",
        dest="input_sizes",
        nargs="+",
        metavar="MODEL=PX",
        default=[],
        help="input size per model, MODEL=PX or MODEL=HxW (a keras: architecture is built at it; any other model is "
        "fed images of that size), e.g. keras:inception_v3=299",
    )
    cm.add_argument(
        "--preprocess",
        dest="preprocess_modes",
        nargs="+",
        metavar="MODEL=MODE",
        default=[],
        help="Keras models: the preprocess_input mode per model, caffe, tf or torch (default: the architecture's; "
        "tf for a .keras file), e.g. transfer.keras=caffe",
    )
    cm.add_argument(
        "--layout",
        dest="layouts",
        action="append",
        default=[],
        metavar="MODEL=SPEC",
        help="how one model's layer outputs map to (C, h, w) maps, a --layout SPEC of `cnnlens explain` for all its "
        "layers, e.g. vit_tiny_patch16_224=tokens:1:14x14 (repeatable; default: inferred for every model)",
    )
    cm.add_argument("--random-weights", action="store_true", help="allow untrained models (marked everywhere)")
    cm.add_argument("--download", action="store_true", help="allow fetching published weights (needs network)")
    cm.add_argument(
        "--method", nargs="+", default=["gradcam", "gradcampp"], metavar="ID", help=f"{methods_help} (default: "
        "gradcam gradcampp)"
    )  # fmt: skip
    cm.add_argument("--steps", type=int, default=16, help="deletion/insertion steps (default 16)")
    cm.add_argument("--last-n", type=int, default=3, help="keep the last N merges/block outputs (default 3)")
    cm.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps, or auto (default)")
    cm.add_argument("--out", default="cnnlens-models", metavar="DIR")
    cm.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
    _add_execution_options(cm)
    _add_max_pixels(cm)


def _add_demo(sub: Any, methods_help: str) -> None:
    """``cnnlens demo``."""
    demo = sub.add_parser("demo", help="run the seed study on the embedded models and sample photos (HTML report)")
    demo.add_argument("--out", default="cnnlens-demo", metavar="DIR", help="output folder (default cnnlens-demo)")
    demo.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
    demo.add_argument("--model", default=DEFAULT_MODEL, help=f"embedded model to use (default {DEFAULT_MODEL})")
    demo.add_argument("--device", default="auto", help="cpu, cuda, mps or auto")
    demo.add_argument("--quick", action="store_true", help="fewer images and steps (for tests)")


def _build_parser() -> argparse.ArgumentParser:
    """The whole ``cnnlens`` parser, built without importing torch (names come from :mod:`cnnlens._names`)."""
    parser = argparse.ArgumentParser(
        prog="cnnlens",
        description="See how a convolutional network works and why it decided what it decided.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details (also after COMMAND)")
    parser.add_argument("--version", action="version", version=f"cnnlens {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    methods_help = f"one or more of: {', '.join(METHOD_IDS)}, or 'all'"

    _add_explain(sub, methods_help)
    _add_catalog(sub, methods_help)
    _add_studies(sub, methods_help)
    add_views_commands(sub)
    add_run_commands(sub)
    _add_demo(sub, methods_help)
    add_serve_command(sub)
    for command_parser in sub.choices.values():
        _add_verbose(command_parser)
    return parser
