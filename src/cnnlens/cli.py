"""The ``cnnlens`` command line: ``explain``, ``layers``, ``models``, ``methods`` and ``demo``.

Every command has ``--help``. Errors in what the user asked for print one clear line and exit with code 2;
a bad input file never stops the others: it is reported at the end and the exit code is 1.
"""

from __future__ import annotations

import argparse
import difflib
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

__all__ = ["main"]

EXIT_OK, EXIT_FAILED_INPUTS, EXIT_USAGE = 0, 1, 2

console = Console()
err_console = Console(stderr=True)


def _make_consoles() -> None:
    """(Re)create the consoles: a real terminal sets the width, a pipe or file gets a wide fixed one."""
    global console, err_console
    console = Console(width=None if sys.stdout.isatty() else 160)
    err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


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

    demo = sub.add_parser("demo", help="run the embedded model on sample photos and write an HTML report")
    demo.add_argument("--out", default="cnnlens-demo", metavar="DIR", help="output folder (default cnnlens-demo)")
    demo.add_argument("--model", default=DEFAULT_MODEL, help=f"embedded model to use (default {DEFAULT_MODEL})")
    demo.add_argument("--device", default="auto", help="cpu, cuda, mps or auto")
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

    Names match case-insensitively, exactly first, then as a unique substring.

    Raises:
        TargetError: With close matches when nothing or several classes match.
    """
    text = spec.strip()
    if text.lstrip("-").isdigit():
        index = int(text)
        if not 0 <= index < len(class_names):
            raise TargetError(f"--class {index} is out of range: the model has {len(class_names)} classes.")
        return index
    low = text.lower()
    exact = [i for i, n in enumerate(class_names) if n.lower() == low]
    if exact:
        return exact[0]
    partial = [i for i, n in enumerate(class_names) if low in n.lower()]
    if len(partial) == 1:
        return partial[0]
    if partial:
        shown = ", ".join(f"{i} {class_names[i]!r}" for i in partial[:8])
        raise TargetError(f"--class {text!r} matches several classes: {shown}; give the index or the full name.")
    close = difflib.get_close_matches(low, [n.lower() for n in class_names], n=5, cutoff=0.6)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise TargetError(f"no class named {text!r}.{hint}")


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


DEMO_INTRO = """
<p>The embedded default model, <strong>{model}</strong> ({weights}), classified the sample photos that ship with
scikit-image. For each photo, the table lists its five most probable ImageNet classes, and the pictures show
where the evidence for the top class lies according to <strong>Grad-CAM</strong> (channels weighted by their
mean gradient) and <strong>Grad-CAM++</strong> (per-pixel weights from the closed form under the
exponential-output assumption), at the model's default target layer <code>{layer}</code> (stride {stride}) and
at an earlier, post-activation layer <code>{early}</code> (finer, stride {early_stride}): the expanded,
ReLU6-activated features that enter the last stage. Deeper layers give coarser, class-level evidence; the
earlier layer localises parts (eyes, edges).</p>
<p>Scores are logits; maps are ReLU(sum of weighted channels), upsampled bilinearly and min-max normalised per
image. Regenerate with <code>make demo</code> or <code>cnnlens demo --out DIR</code>.</p>
"""


def cmd_demo(args: argparse.Namespace) -> int:
    """``cnnlens demo``: the embedded model on the bundled sample photos, with an HTML report."""
    started = time.perf_counter()
    model = load_model(args.model, device=_device(args.device))
    if model.random_weights:  # pragma: no cover - the embedded models always have weights
        raise CnnlensError("the demo needs a model with real weights.")
    photos = sample_images()
    items = list(photos.items())
    c, (h, w) = 3, model.spec.preprocessing.input_size
    infos = {i.name: i for i in probe_layers(model.module, (c, h, w))}
    layer = model.spec.default_layer
    known = model.spec.known_layers
    early = known.get("mid_activation", known.get("mid_block", layer))
    layers = list(dict.fromkeys([layer, early]))
    out = Path(args.out)
    entries, predictions = _run_explain(
        model,
        items,
        out=out,
        methods=["gradcam", "gradcampp"],
        layers=layers,
        targets=None,
        explain_top=1,
        options={},
        batch_size=8,
        top_k=5,
        cmap="jet",
    )
    manifest = {"command": "demo", "model": model.manifest()}
    write_manifest(out, entries, manifest, predictions=predictions)
    intro = DEMO_INTRO.format(
        model=model.spec.name,
        weights=model.weights_source,
        layer=layer,
        stride=getattr(infos.get(layer), "stride", "?"),
        early=early,
        early_stride=getattr(infos.get(early), "stride", "?"),
    )
    report = render_explain_report(
        out,
        title="cnnlens demo",
        subtitle=f"{len(items)} sample photos, {model.spec.name}, Grad-CAM and Grad-CAM++",
        intro=intro,
    )
    err_console.print(f"demo finished in {time.perf_counter() - started:.1f} s")
    console.print(f"report: {report.resolve()}")
    return EXIT_OK


COMMANDS = {
    "explain": cmd_explain,
    "layers": cmd_layers,
    "models": cmd_models,
    "methods": cmd_methods,
    "demo": cmd_demo,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cnnlens`` command; returns the exit code."""
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
