"""Command-line handlers of the forward views: ``cnnlens filters``, ``features`` and ``maximize``.

Their parsers are in :mod:`cnnlens.cli.parser_more`; :data:`cnnlens.cli.COMMANDS` names these handlers.

Every command writes PNGs (grids and individual images) and a JSON manifest into ``--out`` and prints the
paths. Errors in what the user asked for are :class:`~cnnlens.errors.CnnlensError` (exit code 2 through
``cnnlens.cli.main``); a bad image file among several is reported at the end (exit code 1).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from rich.markup import escape

from cnnlens.cli import common as base
from cnnlens.cli.args import parse_layout_args
from cnnlens.cli.parser_more import add_views_commands
from cnnlens.errors import CnnlensError, LayerError
from cnnlens.jsonfile import dumps_strict

if TYPE_CHECKING:  # the views import torch: they load when a command runs, not for --help
    from cnnlens.models import LoadedModel
    from cnnlens.views.features import FeatureMaps
    from cnnlens.views.objectives import Objective

__all__ = ["VIEWS_COMMANDS", "add_views_commands", "cmd_features", "cmd_filters", "cmd_maximize"]


def _write_manifest(out: Path, name: str, doc: Mapping[str, Any]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(dumps_strict(doc, indent=2, default=str), encoding="utf-8")
    return path


def _print_paths(paths: Mapping[str, Path], limit: int = 12) -> None:
    console = base.console
    shown = list(paths.values())
    for path in shown[:limit]:
        console.print(escape(str(path)), highlight=False)
    if len(shown) > limit:
        console.print(escape(f"... and {len(shown) - limit} more PNG(s) in {shown[0].parent}"), highlight=False)


def _rel(paths: Mapping[str, Path], out: Path) -> dict[str, str]:
    return {k: str(p.relative_to(out)) if p.is_relative_to(out) else str(p) for k, p in paths.items()}


def _cmd_filters(args: argparse.Namespace) -> int:
    """``cnnlens filters``."""
    from cnnlens.views.filters import filters
    from cnnlens.viz.views import save_filters

    model: LoadedModel = base._load(args)
    fs = filters(
        model,
        args.layer,
        view=args.view,
        order=args.order,
        channels=args.channels,
        top_k=None if args.top_k == 0 else args.top_k,
        scale="per_tile" if args.scale == "per-tile" else "shared",
        max_inputs=args.max_inputs,
    )
    out = Path(args.out)
    paths = save_filters(fs, out)
    manifest = {
        "command": "filters",
        "model": model.manifest(),
        "argv": sys.argv[1:],
        "layer": fs.layer,
        "view": fs.view,
        "weight_shape": list(fs.weight_shape),
        "groups": fs.groups,
        "order": fs.order,
        "scale": fs.scale,
        "filters": [
            {"index": k, "l2_norm": float(n), "limit": float(m), "input_channels": ins}
            for k, n, m, ins in zip(fs.indices, fs.norms, fs.limits, fs.input_channels, strict=True)
        ],
        "files": _rel(paths, out),
    }
    paths["manifest"] = _write_manifest(out, "filters", manifest)
    _print_paths(paths)
    base.console.print(
        escape(
            f"{fs.layer}: {len(fs.indices)} filter(s), {fs.view} view, {'x'.join(map(str, fs.weight_shape))}, "
            f"groups={fs.groups}; wrote {len(paths)} file(s) to {out}/"
        ),
        highlight=False,
    )
    return int(base.EXIT_OK)


def _features_doc(fm: FeatureMaps) -> dict[str, Any]:
    return {
        "target_class": fm.target_class,
        "class_name": fm.class_name,
        "layers": {
            key: {
                "shape": list(lf.activation.shape),
                "rank": lf.rank,
                "scale": lf.scale,
                "channels": [{"index": k, "value": float(v)} for k, v in zip(lf.indices, lf.values, strict=True)],
                "limits": [float(lf.limits[0, 0]), float(lf.limits[0, 1])] if len(lf.indices) else None,
            }
            for key, lf in fm.layers.items()
        },
    }


def _cmd_features(args: argparse.Namespace) -> int:
    """``cnnlens features``."""
    from cnnlens.data import ImageFailure, load_image
    from cnnlens.explain import default_layer
    from cnnlens.views.features import feature_maps
    from cnnlens.viz.views import save_features

    if args.target_class is not None and args.rank != "gradcam":
        raise LayerError("--class ranks channels by Grad-CAM weight: add --rank gradcam.")
    paths_in, failures = base._expand_inputs(args.inputs)
    if not paths_in:
        return int(base._report_failures(failures) or base.EXIT_FAILED_INPUTS)
    model: LoadedModel = base._load(args)
    target = base._check_model_args(args, model)
    layers = args.layer or [default_layer(model)]
    out = Path(args.out)
    names = base._unique_names(paths_in)
    docs: dict[str, Any] = {}
    all_paths: dict[str, Path] = {}
    for name, path in zip(names, paths_in, strict=True):
        try:
            image = load_image(path, max_pixels=args.max_pixels)
        except CnnlensError as exc:
            failures.append(ImageFailure(str(path), base._cli_hint(str(exc))))
            continue
        fm = feature_maps(
            model,
            image,
            layers,
            rank=args.rank,
            target=target,
            top_k=None if args.top_k == 0 else args.top_k,
            channels=args.channels,
            scale="per_map" if args.scale == "per-map" else "shared",
            layout=parse_layout_args(args.layout) if isinstance(args.layout, list) else args.layout,
        )
        folder = out / name if len(paths_in) > 1 else out
        paths = save_features(fm, folder, individual=not args.no_individual)
        docs[name] = {"path": str(path), **_features_doc(fm), "files": _rel(paths, out)}
        all_paths.update({f"{name}:{k}": p for k, p in paths.items() if not k.startswith("map:")})
        for key, lf in fm.layers.items():
            top = ", ".join(f"#{k} {float(v):.3g}" for k, v in zip(lf.indices[:5], lf.values[:5], strict=True))
            base.console.print(escape(f"{name} {key}: top channels {top}"), highlight=False)
    manifest = {"command": "features", "model": model.manifest(), "argv": sys.argv[1:], "images": docs}
    all_paths["manifest"] = _write_manifest(out, "features", manifest)
    _print_paths(all_paths, limit=40)
    return int(base._report_failures(failures))


def _extra(args: argparse.Namespace) -> Objective | None:
    from cnnlens.views.objectives import l2, total_variation

    terms: list[Objective] = []
    if args.tv < 0 or args.l2 < 0:
        raise LayerError(f"--tv and --l2 are penalty weights, >= 0; got {args.tv} and {args.l2}.")
    if args.tv > 0:
        terms.append(-args.tv * total_variation())
    if args.l2 > 0:
        terms.append(-args.l2 * l2())
    if not terms:
        return None
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


def _cmd_maximize(args: argparse.Namespace) -> int:
    """``cnnlens maximize``."""
    from cnnlens.views.maximize import maximize, maximize_classes
    from cnnlens.views.parameterization import fourier, pixels
    from cnnlens.viz.views import save_maximized

    if args.classes is None and args.layer is None:
        raise LayerError("name a layer with --layer NAME (see `cnnlens layers`), or class logits with --classes.")
    if args.classes is not None and args.layer is not None:
        raise LayerError("give either --layer (with --channels) or --classes, not both.")
    model: LoadedModel = base._load(args)
    common: dict[str, Any] = {
        "extra": _extra(args),
        "size": args.size,
        "steps": args.steps,
        "lr": args.lr,
        "seed": args.seed,
        "param": fourier() if args.param == "fourier" else pixels(),
        "transforms": None if args.no_transforms else "standard",
        "max_batch": args.max_batch,
        "threads": args.threads,
    }
    with base._progress() as bar:
        task = bar.add_task("optimising", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        if args.classes is not None:
            result = maximize_classes(model, args.classes, progress=progress, **common)
        else:
            kind: Literal["channel", "neuron"] = "neuron" if args.neuron else "channel"
            result = maximize(model, args.layer, args.channels, objective=kind, progress=progress, **common)
    out = Path(args.out)
    paths = save_maximized(result, out)
    manifest = {
        "command": "maximize",
        "model": model.manifest(),
        "argv": sys.argv[1:],
        "objective": result.objective,
        "layer": result.layer,
        "settings": result.settings,
        "seconds": result.seconds,
        "images": [
            {"key": k, "label": label, "score": float(s)}
            for k, label, s in zip(result.keys, result.labels, result.scores, strict=True)
        ],
        "files": _rel(paths, out),
    }
    paths["manifest"] = _write_manifest(out, "maximize", manifest)
    _print_paths(paths, limit=40)
    per = result.seconds / max(1, len(result.keys))
    base.err_console.print(
        f"{len(result.keys)} image(s) in {result.seconds:.1f} s ({per:.2f} s per image), {args.steps} steps",
        highlight=False,
    )
    return int(base.EXIT_OK)


cmd_filters = base._into_out(_cmd_filters, "filters")  # each --out folder claimed like every command's
cmd_features = base._into_out(_cmd_features, "features")
cmd_maximize = base._into_out(_cmd_maximize, "maximize")

VIEWS_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "filters": cmd_filters,
    "features": cmd_features,
    "maximize": cmd_maximize,
}
"""Command name -> handler (the same functions :data:`cnnlens.cli.COMMANDS` names)."""
