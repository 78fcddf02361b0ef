"""Command-line handlers of the forward views: ``cnnlens filters``, ``features`` and ``maximize``.

Wire them into :mod:`cnnlens.cli` with::

    from cnnlens.views.cli import VIEWS_COMMANDS, add_views_commands
    add_views_commands(sub)            # in _build_parser(), after the other sub-commands
    COMMANDS.update(VIEWS_COMMANDS)    # next to COMMANDS

Every command writes PNGs (grids and individual images) and a JSON manifest into ``--out`` and prints the
paths. Errors in what the user asked for are :class:`~cnnlens.errors.CnnlensError` (exit code 2 through
``cnnlens.cli.main``); a bad image file among several is reported at the end (exit code 1).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from cnnlens.data import ImageFailure, load_image
from cnnlens.errors import CnnlensError, LayerError
from cnnlens.explain import default_layer
from cnnlens.models import LoadedModel
from cnnlens.views.features import FeatureMaps, feature_maps
from cnnlens.views.filters import filters
from cnnlens.views.maximize import maximize, maximize_classes
from cnnlens.views.objectives import Objective, l2, total_variation
from cnnlens.views.parameterization import fourier, pixels
from cnnlens.viz.views import save_features, save_filters, save_maximized

__all__ = ["VIEWS_COMMANDS", "add_views_commands", "cmd_features", "cmd_filters", "cmd_maximize"]


def _base() -> Any:
    """:mod:`cnnlens.cli`, imported when a command runs (it imports this module to wire the commands)."""
    from cnnlens import cli

    return cli


def add_views_commands(subparsers: Any) -> None:
    """Add ``filters``, ``features`` and ``maximize`` to the ``cnnlens`` sub-command parsers.

    Args:
        subparsers: What ``parser.add_subparsers()`` returned in :func:`cnnlens.cli._build_parser`.
    """
    base = _base()
    fi = subparsers.add_parser(
        "filters",
        help="draw a conv layer's filters (weights) as a labelled grid",
        description="Draw the kernels of a conv layer: RGB tiles for the first conv, the mean over input channels "
        "(or input slices, or the 1x1 weight matrix) deeper, with a colour bar. Writes PNGs and prints their paths.",
    )
    base._add_model_options(fi)
    fi.add_argument("--layer", metavar="NAME", help="conv layer, dotted name (default: the first conv)")
    fi.add_argument(
        "--view",
        choices=["auto", "rgb", "mean", "slices", "matrix"],
        default="auto",
        help="rgb: colour tiles (3 inputs); mean: mean over input channels; slices: input slices of a few "
        "filters; matrix: 1x1 weights (default auto)",
    )
    fi.add_argument("--order", choices=["index", "norm"], default="index", help="sort by index or L2 norm (largest)")
    fi.add_argument("--channels", metavar="SPEC", help="only these filters, e.g. 0-15 or 3,7,10-12")
    fi.add_argument("--top-k", type=int, default=64, metavar="N", help="show the first N after sorting (0: all)")
    fi.add_argument(
        "--scale", choices=["shared", "per-tile"], default="shared", help="one colour scale or one per tile"
    )
    fi.add_argument("--max-inputs", type=int, default=8, metavar="N", help="slices view: input slices per filter")
    fi.add_argument("--out", default="cnnlens-filters", metavar="DIR", help="output folder (default cnnlens-filters)")

    fe = subparsers.add_parser(
        "features",
        help="draw the feature maps of one or several layers for an image",
        description="Run the model once on each image and draw the top-k channels of each layer, ranked by mean "
        "activation or by Grad-CAM weight for a class, with a shared colour scale. Writes PNGs and prints paths.",
    )
    fe.add_argument("inputs", nargs="+", metavar="IMAGE", help="image file(s)")
    base._add_model_options(fe)
    fe.add_argument("--layer", nargs="+", metavar="NAME", help="layer(s), dotted names (default: the model's)")
    fe.add_argument(
        "--rank",
        choices=["activation", "gradcam", "index"],
        default="activation",
        help="rank channels by mean activation (default), Grad-CAM weight for --class, or index",
    )
    fe.add_argument(
        "--class",
        dest="target_class",
        metavar="INDEX_OR_NAME",
        help="class for --rank gradcam (default: the top class)",
    )
    fe.add_argument("--top-k", type=int, default=16, metavar="N", help="channels per layer (default 16; 0: all)")
    fe.add_argument("--channels", metavar="SPEC", help="only consider these channels, e.g. 0-63")
    fe.add_argument("--scale", choices=["shared", "per-map"], default="shared", help="colour scale (default shared)")
    fe.add_argument("--no-individual", action="store_true", help="write the grids only, not one PNG per map")
    fe.add_argument("--out", default="cnnlens-features", metavar="DIR", help="output folder (default cnnlens-features)")

    mx = subparsers.add_parser(
        "maximize",
        help="optimise images that excite chosen channels (activation maximisation)",
        description="Optimise one image per channel (Fourier parameterisation, decorrelated colour, robustness "
        "transforms), all channels in one batch. Writes a labelled grid and each image, and prints their paths.",
    )
    base._add_model_options(mx)
    mx.add_argument("--layer", metavar="NAME", help="layer whose channels to excite (dotted name)")
    mx.add_argument("--channels", default="0-7", metavar="SPEC", help="channels, e.g. 0-15 or 3,7 (default 0-7)")
    mx.add_argument("--classes", metavar="SPEC", help="maximise these class logits instead of --layer channels")
    mx.add_argument("--neuron", action="store_true", help="excite the centre neuron instead of the channel mean")
    mx.add_argument("--steps", type=int, default=128, metavar="N", help="optimisation steps (default 128)")
    mx.add_argument("--lr", type=float, default=0.05, metavar="X", help="Adam learning rate (default 0.05)")
    mx.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    mx.add_argument("--size", type=int, default=128, metavar="PX", help="image size in pixels (default 128)")
    mx.add_argument("--tv", type=float, default=0.0, metavar="W", help="total-variation penalty weight (default 0)")
    mx.add_argument("--l2", type=float, default=0.0, metavar="W", help="L2 penalty weight (default 0)")
    mx.add_argument("--param", choices=["fourier", "pixels"], default="fourier", help="image parameterisation")
    mx.add_argument("--no-transforms", action="store_true", help="no jitter/scale/rotate robustness transforms")
    mx.add_argument("--max-batch", type=int, default=32, metavar="N", help="images per batch (default 32)")
    mx.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="torch intra-op threads while optimising (default: torch's); 1 is often faster on a busy machine",
    )
    mx.add_argument("--out", default="cnnlens-maximize", metavar="DIR", help="output folder (default cnnlens-maximize)")


def _write_manifest(out: Path, name: str, doc: Mapping[str, Any]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(doc, indent=2, default=str), encoding="utf-8")
    return path


def _print_paths(paths: Mapping[str, Path], limit: int = 12) -> None:
    console = _base().console
    shown = list(paths.values())
    for path in shown[:limit]:
        console.print(str(path), highlight=False)
    if len(shown) > limit:
        console.print(f"... and {len(shown) - limit} more PNG(s) in {shown[0].parent}", highlight=False)


def _rel(paths: Mapping[str, Path], out: Path) -> dict[str, str]:
    return {k: str(p.relative_to(out)) if p.is_relative_to(out) else str(p) for k, p in paths.items()}


def cmd_filters(args: argparse.Namespace) -> int:
    """``cnnlens filters``."""
    base = _base()
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
        f"{fs.layer}: {len(fs.indices)} filter(s), {fs.view} view, {'x'.join(map(str, fs.weight_shape))}, "
        f"groups={fs.groups}; wrote {len(paths)} file(s) to {out}/",
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


def cmd_features(args: argparse.Namespace) -> int:
    """``cnnlens features``."""
    base = _base()
    if args.target_class is not None and args.rank != "gradcam":
        raise LayerError("--class ranks channels by Grad-CAM weight: add --rank gradcam.")
    model: LoadedModel = base._load(args)
    target = base.resolve_class(args.target_class, model.class_names) if args.target_class is not None else None
    layers = args.layer or [default_layer(model)]
    out = Path(args.out)
    paths_in = [Path(p) for p in args.inputs]
    names = base._unique_names(paths_in)
    failures: list[ImageFailure] = []
    docs: dict[str, Any] = {}
    all_paths: dict[str, Path] = {}
    for name, path in zip(names, paths_in, strict=True):
        try:
            image = load_image(path)
        except CnnlensError as exc:
            failures.append(ImageFailure(str(path), str(exc)))
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
        )
        folder = out / name if len(paths_in) > 1 else out
        paths = save_features(fm, folder, individual=not args.no_individual)
        docs[name] = {"path": str(path), **_features_doc(fm), "files": _rel(paths, out)}
        all_paths.update({f"{name}:{k}": p for k, p in paths.items() if not k.startswith("map:")})
        for key, lf in fm.layers.items():
            top = ", ".join(f"#{k} {float(v):.3g}" for k, v in zip(lf.indices[:5], lf.values[:5], strict=True))
            base.console.print(f"{name} {key}: top channels {top}", highlight=False)
    manifest = {"command": "features", "model": model.manifest(), "argv": sys.argv[1:], "images": docs}
    all_paths["manifest"] = _write_manifest(out, "features", manifest)
    _print_paths(all_paths, limit=40)
    if failures:
        base.err_console.print(f"[bold red]{len(failures)} input(s) failed:[/]")
        for f in failures:
            base.err_console.print(f"  {f.path}: {f.reason}")
        return int(base.EXIT_FAILED_INPUTS)
    return int(base.EXIT_OK)


def _extra(args: argparse.Namespace) -> Objective | None:
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


def cmd_maximize(args: argparse.Namespace) -> int:
    """``cnnlens maximize``."""
    base = _base()
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


VIEWS_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "filters": cmd_filters,
    "features": cmd_features,
    "maximize": cmd_maximize,
}
"""Command name -> handler, to merge into :data:`cnnlens.cli.COMMANDS`."""
