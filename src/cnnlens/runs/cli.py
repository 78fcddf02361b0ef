"""``cnnlens run`` and ``cnnlens report``: explain a labelled dataset, resumably; report its mistakes.

Wire into the main parser with :func:`add_run_commands` and dispatch ``"run"`` to :func:`cmd_run` and
``"report"`` to :func:`cmd_report` (each subparser also carries ``handler=`` in its defaults). Exit codes follow
``cnnlens.cli``: 0 all images explained, 1 some files could not be read (error rows), 2 a usage error (a
:class:`~cnnlens.errors.CnnlensError`, printed as one line by the caller). ``python -m cnnlens.runs`` runs the
two commands on their own.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from cnnlens.methods import method_ids
from cnnlens.models import DEFAULT_MODEL, available_models

__all__ = ["add_run_commands", "cmd_report", "cmd_run"]

EXIT_OK, EXIT_FAILED_INPUTS, EXIT_USAGE = 0, 1, 2


def _consoles() -> tuple[Console, Console]:
    return (
        Console(width=None if sys.stdout.isatty() else 160),
        Console(stderr=True, width=None if sys.stderr.isatty() else 160),
    )


class _RateColumn(ProgressColumn):
    """Images per second, from rich's speed estimate."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("-- img/s" if speed is None else f"{speed:.1f} img/s", style="progress.data.speed")


def add_run_commands(subparsers: Any) -> None:
    """Add the ``run`` and ``report`` subcommands to an ``argparse`` subparsers object."""
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
        help=f"zoo name ({', '.join(available_models())}), a torchvision/timm architecture with --num-classes and "
        "--weights, or your own factory: package.module:factory or path/to/file.py:factory (called with no "
        f"arguments, or num_classes=N). Default: {DEFAULT_MODEL}.",
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
    prep = run.add_argument_group("preprocessing (override the model's)")
    prep.add_argument("--input-size", type=int, nargs="+", metavar="PX", help="model input H [W], e.g. 32 for CIFAR")
    prep.add_argument("--resize", type=int, metavar="PX", help="shorter side before the center crop (default: input)")
    prep.add_argument("--mean", type=float, nargs="+", metavar="V", help="normalisation mean, 1 or 3 values")
    prep.add_argument("--std", type=float, nargs="+", metavar="V", help="normalisation std, 1 or 3 values")
    work = run.add_argument_group("what to compute")
    work.add_argument(
        "--method",
        nargs="+",
        default=["gradcam"],
        metavar="ID",
        help=f"one or more of: {', '.join(method_ids())} (default: gradcam)",
    )
    work.add_argument("--layer", nargs="+", metavar="NAME", help="target layer(s), dotted names (default: the model's)")
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
    run_opts.add_argument("--overwrite", action="store_true", help="delete a previous run in RUN_DIR and start over")
    run.set_defaults(handler=cmd_run)

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
    rep.set_defaults(handler=cmd_report)


def cmd_run(args: argparse.Namespace) -> int:
    """``cnnlens run DATASET --out RUN_DIR ...``; returns the exit code."""
    from cnnlens.cli import _device, _parse_options
    from cnnlens.runs.batch import RunSettings
    from cnnlens.runs.dataset import read_dataset
    from cnnlens.runs.model import load_run_model
    from cnnlens.runs.runner import DatasetRun

    console, err_console = _consoles()
    options = _parse_options(args.option)
    model = load_run_model(
        args.model,
        weights=args.weights,
        random_weights=args.random_weights,
        download=args.download,
        num_classes=args.num_classes,
        class_names=args.class_names,
        device=_device(args.device),
        input_size=args.input_size,
        resize=args.resize,
        mean=args.mean,
        std=args.std,
    )
    if model.random_weights:
        err_console.print(f"[bold red]RANDOM WEIGHTS[/]: {model.weights_source}. Outputs are marked as such.")
    dataset = read_dataset(args.dataset, model.class_names, root=args.root).limit(args.limit)
    for note in dataset.notes:
        err_console.print(f"note: {note}", highlight=False)
    settings = RunSettings(
        methods=tuple(args.method),
        layers=tuple(args.layer or ()),
        options=options,
        top_k=args.top_k,
        average_drop=not args.no_average_drop,
        overlays=not args.no_overlays,
        cmap=args.cmap,
        overlay_format=args.overlay_format,
    )
    with DatasetRun(
        args.out,
        dataset,
        model,
        settings,
        shard_size=args.shard_size,
        overwrite=args.overwrite,
        extra={"argv": sys.argv[1:]},
    ) as run:
        if run.completed:
            err_console.print(f"resuming {args.out}: {run.completed} of {run.total} image(s) already done")
        progress = Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            _RateColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=err_console,
            transient=False,
        )
        with progress:
            task = progress.add_task("explaining", total=run.total, completed=run.completed)

            def update(done: int, total: int) -> None:
                progress.update(task, completed=done, total=total)

            summary = run.execute(batch_size=args.batch_size, workers=args.workers, progress=update)
    table = Table(title=f"run {args.out}")
    table.add_column("images", justify="right")
    table.add_column("explained", justify="right")
    table.add_column("errors", justify="right")
    table.add_column("accuracy", justify="right")
    table.add_column("time", justify="right")
    table.add_column("images/s", justify="right")
    table.add_row(
        str(summary.total),
        str(summary.ok),
        str(summary.errors),
        "-" if summary.accuracy is None else f"{100 * summary.accuracy:.2f} %",
        f"{summary.elapsed_s:.1f} s" + (f" (+{summary.skipped} done before)" if summary.skipped else ""),
        "-" if summary.images_per_s is None else f"{summary.images_per_s:.1f}",
    )
    console.print(table)
    for key, values in summary.metrics.items():
        shown = ", ".join(f"{k} {v:.3g}" for k, v in values.items() if isinstance(v, (int, float)))
        console.print(f"{key}: {shown}", highlight=False)
    console.print(f"results: {summary.results}; report: cnnlens report {args.out}", highlight=False)
    if summary.errors:
        import pyarrow.parquet as pq

        rows = pq.read_table(summary.results, columns=["path", "status", "error"]).to_pylist()
        bad = [r for r in rows if r["status"] != "ok"]
        err_console.print(f"[bold red]{len(bad)} file(s) could not be read[/] (error rows in results.parquet):")
        for r in bad[:20]:
            err_console.print(f"  {r['path']}: {r['error']}", highlight=False)
        if len(bad) > 20:
            err_console.print(f"  ... and {len(bad) - 20} more")
        return EXIT_FAILED_INPUTS
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    """``cnnlens report RUN_DIR``; returns the exit code."""
    from cnnlens.runs.errors import RunError
    from cnnlens.runs.report import render_run_report

    console, _ = _consoles()
    if args.gallery < 0 or args.max_classes < 1:
        raise RunError("--gallery must be 0 or more and --max-classes at least 1.")
    index = render_run_report(args.run_dir, out=args.out, gallery=args.gallery, max_classes=args.max_classes)
    console.print(f"report: {index.resolve()}", highlight=False)
    return EXIT_OK
