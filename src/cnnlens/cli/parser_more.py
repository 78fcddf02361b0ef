"""The parsers of the ``filters``/``features``/``maximize`` and ``run``/``report`` sub-commands.

Their handlers are in :mod:`cnnlens.cli.views` and :mod:`cnnlens.cli.runs`, found through
:data:`cnnlens.cli.COMMANDS` like every other command's.
"""

from __future__ import annotations

from typing import Any

from cnnlens._names import DEFAULT_METHODS, DEFAULT_MODEL, METHOD_IDS, ZOO_MODELS
from cnnlens.cli.options import (
    KERAS_MODELS_HELP,
    _add_layout,
    _add_max_pixels,
    _add_model_options,
    _add_preprocessing_options,
)

__all__ = ["add_run_commands", "add_views_commands"]


_OVERWRITE_HELP = "write into an --out folder cnnlens did not write (replacing only same-named files, deleting nothing)"


def add_views_commands(subparsers: Any) -> None:
    """Add ``filters``, ``features`` and ``maximize`` to the ``cnnlens`` sub-command parsers.

    Longer than 80 lines on purpose: a flat list of ``add_argument`` declarations, one per option, read as the
    commands' reference; splitting it would only scatter one command's options.

    Args:
        subparsers: What ``parser.add_subparsers()`` returned in :func:`cnnlens.cli.parser._build_parser`.
    """
    fi = subparsers.add_parser(
        "filters",
        help="draw a conv layer's filters (weights) as a labelled grid",
        description="Draw the kernels of a conv layer: RGB tiles for the first conv, the mean over input channels "
        "(or input slices, or the 1x1 weight matrix) deeper, with a colour bar. Writes PNGs and prints their paths.",
    )
    _add_model_options(fi, preprocessing=False)
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
    fi.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)

    fe = subparsers.add_parser(
        "features",
        help="draw the feature maps of one or several layers for an image",
        description="Run the model once on each image and draw the top-k channels of each layer, ranked by mean "
        "activation or by Grad-CAM weight for a class, with a shared colour scale. Writes PNGs and prints paths.",
    )
    fe.add_argument("inputs", nargs="+", metavar="IMAGE", help="image file(s)")
    _add_model_options(fe)
    fe.add_argument("--layer", nargs="+", metavar="NAME", help="layer(s), dotted names (default: the model's)")
    _add_layout(fe)
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
    fe.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)
    _add_max_pixels(fe)

    mx = subparsers.add_parser(
        "maximize",
        help="optimise images that excite chosen channels (activation maximisation)",
        description="Optimise one image per channel (Fourier parameterisation, decorrelated colour, robustness "
        "transforms), all channels in one batch. Writes a labelled grid and each image, and prints their paths.",
    )
    _add_model_options(mx, preprocessing=False)
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
    mx.add_argument("--overwrite", action="store_true", help=_OVERWRITE_HELP)


def add_run_commands(subparsers: Any) -> None:
    """Add the ``run`` and ``report`` subcommands to an ``argparse`` subparsers object.

    Longer than 80 lines on purpose: a flat list of ``add_argument`` declarations (see :func:`add_views_commands`).
    """
    run = subparsers.add_parser(
        "run",
        help="explain every image of a labelled dataset (resumable) and write results.parquet",
        description=(
            "Predict and explain every image of a labelled dataset: an image-folder tree (one subfolder per class) "
            "or a CSV/Parquet table with columns path,label[,x0,y0,x1,y1]. Maps for the predicted class and, when "
            "it differs, the true class. Work is committed in shards: run the same command again to continue an "
            "interrupted run."
        ),
    )
    run.add_argument("dataset", metavar="DATASET", help="image-folder tree, or a .csv/.parquet table")
    run.add_argument("--out", required=True, metavar="RUN_DIR", help="run folder (created; reused to resume)")
    group = run.add_argument_group("model")
    group.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"zoo name ({', '.join(ZOO_MODELS)}), a torchvision/timm architecture with --num-classes and "
        "--weights, your own factory: package.module:factory or path/to/file.py:factory (called with no "
        f"arguments, or num_classes=N), {KERAS_MODELS_HELP}. Default: {DEFAULT_MODEL}.",
    )
    group.add_argument("--weights", metavar="PATH", help="checkpoint (state dict) to load, read with weights_only=True")
    group.add_argument("--random-weights", action="store_true", help="an untrained, seeded model (outputs say so)")
    group.add_argument("--download", action="store_true", help="allow fetching published weights (needs network)")
    group.add_argument("--num-classes", type=int, metavar="N", help="number of classes of your own model")
    group.add_argument(
        "--class-names",
        metavar="FILE",
        help="class names in output order (.txt one per line, or .json list); dataset labels are matched to them",
    )
    group.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps, or auto (default)")
    _add_preprocessing_options(run)
    work = run.add_argument_group("what to compute")
    work.add_argument(
        "--method",
        nargs="+",
        default=list(DEFAULT_METHODS),
        metavar="ID",
        help=f"one or more of: {', '.join(METHOD_IDS)}, or 'all' (default: {' '.join(DEFAULT_METHODS)})",
    )
    work.add_argument("--layer", nargs="+", metavar="NAME", help="target layer(s), dotted names (default: the model's)")
    _add_layout(work)
    work.add_argument(
        "--option", action="append", default=[], metavar="METHOD.KEY=VALUE", help="method option (repeatable)"
    )
    work.add_argument("--top-k", type=int, default=5, metavar="N", help="top classes stored per image (default 5)")
    work.add_argument("--no-average-drop", action="store_true", help="skip Average Drop (saves one forward per map)")
    work.add_argument("--no-overlays", action="store_true", help="write no overlay pictures of misclassified images")
    work.add_argument("--cmap", default="jet", help="colour map of overlays (default jet)")
    work.add_argument(
        "--overlay-format", choices=["jpeg", "png"], default="jpeg", help="overlay pictures (default jpeg, quality 90)"
    )
    run_opts = run.add_argument_group("running")
    run_opts.add_argument("--batch-size", type=int, default=16, metavar="N", help="images per forward (default 16)")
    run_opts.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="decoding processes (default: cores the model's threads leave free, at most 4; 0: inline)",
    )
    run_opts.add_argument("--limit", type=int, metavar="N", help="only the first N images of the dataset")
    run_opts.add_argument(
        "--shard-size", type=int, default=256, metavar="N", help="images per committed shard (default 256)"
    )
    run_opts.add_argument(
        "--root", metavar="DIR", help="folder that relative table paths start from (default: table's)"
    )
    ray_opts = run.add_argument_group("distributed (--engine ray; see docs/scale.md)")
    ray_opts.add_argument(
        "--engine",
        choices=["local", "ray"],
        default="local",
        help="local: this process (default); ray: Ray Data on a cluster, same run folder (needs cnnlens[ray])",
    )
    ray_opts.add_argument(
        "--address",
        metavar="ADDR",
        help="Ray cluster: auto, HOST:PORT or ray://HOST:10001 (default: RAY_ADDRESS, else a local cluster)",
    )
    ray_opts.add_argument(
        "--actors", type=int, metavar="N", help="explaining actors (default: GPUs / --gpus-per-actor, or CPUs - 1)"
    )
    ray_opts.add_argument(
        "--gpus-per-actor", type=float, default=0.0, metavar="G", help="GPUs per actor (default 0: CPU actors)"
    )
    ray_opts.add_argument(
        "--storage",
        metavar="URI",
        help="where workers stage maps and overlays when they cannot see --out: s3://, gs://, file:///shared/...",
    )
    run_opts.add_argument(
        "--overwrite",
        action="store_true",
        help="start over: remove the files a previous cnnlens run in RUN_DIR wrote (only those its marker lists, and "
        "its report's), or write into a folder cnnlens did not write (replacing only same-named files). A file "
        "cnnlens did not write is never deleted; without --overwrite such a folder is refused",
    )

    _add_max_pixels(run_opts)

    rep = subparsers.add_parser(
        "report",
        help="write the HTML error-analysis report of a run",
        description="Accuracy, confusion matrix, per-class accuracy, most confused pairs, a gallery of mistakes with "
        "predicted- and true-class maps, per-class mean maps and box energy. Writes RUN_DIR/report/index.html.",
    )
    rep.add_argument("run_dir", metavar="RUN_DIR", help="the --out folder of `cnnlens run`")
    rep.add_argument("--out", metavar="DIR", help="report folder (default RUN_DIR/report)")
    rep.add_argument("--gallery", type=int, default=48, metavar="N", help="misclassified images shown (default 48)")
    rep.add_argument("--max-classes", type=int, default=40, metavar="N", help="classes in tables/maps (default 40)")
    rep.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a report folder cnnlens did not write (replacing only same-named files, deleting nothing); "
        "a previous cnnlens report there is replaced without it (only the files its marker lists)",
    )
