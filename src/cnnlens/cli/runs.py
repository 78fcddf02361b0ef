"""``cnnlens run`` and ``cnnlens report``: explain a labelled dataset, resumably; report its mistakes.

Parsers: :func:`cnnlens.cli.parser_more.add_run_commands`; :data:`cnnlens.cli.COMMANDS` dispatches ``"run"`` to
:func:`cmd_run` and ``"report"`` to :func:`cmd_report`. Exit codes follow
``cnnlens.cli``: 0 all images explained, 1 some files could not be read (error rows), 2 a usage error (a
:class:`~cnnlens.errors.CnnlensError`, printed as one line by the caller). ``python -m cnnlens.runs`` runs the
two commands on their own.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rich.markup import escape
from rich.progress import (
    ProgressColumn,
    Task,
)
from rich.table import Table
from rich.text import Text

from cnnlens.cli import common

__all__ = ["cmd_report", "cmd_run"]

from cnnlens.cli.common import EXIT_FAILED_INPUTS, EXIT_OK
from cnnlens.errors import UsageError

if TYPE_CHECKING:
    from cnnlens.models import LoadedModel
    from cnnlens.runs.ray_engine import RayOptions
    from cnnlens.runs.runner import RunSummary


class _RateColumn(ProgressColumn):
    """Images per second, from rich's speed estimate."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("-- img/s" if speed is None else f"{speed:.1f} img/s", style="progress.data.speed")


def cmd_run(args: argparse.Namespace) -> int:
    """``cnnlens run DATASET --out RUN_DIR ...``; returns the exit code."""
    from cnnlens.cli.common import _check_model_args, _load, _parse_options
    from cnnlens.runs.batch import RunSettings
    from cnnlens.runs.dataset import read_dataset
    from cnnlens.runs.runner import DatasetRun

    err_console = common.err_console
    options = args.options if hasattr(args, "options") else _parse_options(args.option, args.method)
    _check_engine_flags(args)
    model = _load(args)  # the loader of every command: zoo, architecture or factory, preprocessing overrides
    _check_model_args(args, model)
    dataset = read_dataset(args.dataset, model.class_names, root=args.root, exclude=[args.out]).limit(args.limit)
    for note in dataset.notes:
        err_console.print(f"note: {escape(note)}", highlight=False)
    settings = RunSettings(
        methods=tuple(args.method),
        layers=tuple(args.layer or ()),
        options=options,
        top_k=args.top_k,
        average_drop=not args.no_average_drop,
        overlays=not args.no_overlays,
        cmap=args.cmap,
        overlay_format=args.overlay_format,
        layout=args.layout,
    )
    engine = getattr(args, "engine", "local")
    ray_options = _ray_options(args, model) if engine == "ray" else None
    with contextlib.ExitStack() as stack:
        if ray_options is not None:  # connect first: an address that does not answer leaves --out untouched
            from cnnlens.runs.ray_engine import check_cluster, ray_session

            stack.enter_context(ray_session(ray_options.address, timeout=ray_options.connect_timeout_s))
            check_cluster(ray_options)
        run = stack.enter_context(
            DatasetRun(
                args.out,
                dataset,
                model,
                settings,
                shard_size=args.shard_size,
                overwrite=args.overwrite,
                extra={"argv": sys.argv[1:]},
            )
        )
        if run.completed:
            err_console.print(
                escape(f"resuming {args.out}: {run.completed} of {run.total} image(s) already done"), highlight=False
            )
        progress = common._progress(_RateColumn())  # the common bar, with images per second
        with progress:
            task = progress.add_task("explaining", total=run.total, completed=run.completed)

            def update(done: int, total: int) -> None:
                progress.update(task, completed=done, total=total)

            if ray_options is not None:
                from cnnlens.runs.ray_engine import execute_ray

                summary = execute_ray(
                    run, ray_options, batch_size=args.batch_size, progress=update, max_pixels=args.max_pixels
                )
            else:
                summary = run.execute(
                    batch_size=args.batch_size, workers=args.workers, progress=update, max_pixels=args.max_pixels
                )
        engine_info = run.extra.get("engine")
    code = _print_summary(summary, args.out)
    if isinstance(engine_info, dict):
        _print_actors(engine_info)
    return code


@dataclass(frozen=True)
class _CliModelLoader:
    """Loads ``--model`` on a Ray worker with the driver's model options, on the worker's device (picklable)."""

    options: dict[str, Any]

    def __call__(self, device: str) -> LoadedModel:
        from cnnlens.cli.common import _load_quietly

        ns = argparse.Namespace(**{**self.options, "device": device})
        return _load_quietly(ns, random_weights=bool(ns.random_weights))


def _absolute(value: Any) -> Any:
    """An existing relative path made absolute (workers start in another folder); anything else unchanged."""
    if isinstance(value, str) and value and os.path.exists(value):
        return os.path.abspath(value)
    return value


def _check_engine_flags(args: argparse.Namespace) -> None:
    """Refuse a flag of the other engine (before the model loads): it would be silently ignored.

    Raises:
        UsageError: ``--address``/``--actors``/``--gpus-per-actor``/``--storage`` without ``--engine ray``, or
            ``--workers`` with it.
    """
    engine = getattr(args, "engine", "local")
    if engine == "ray":
        if getattr(args, "workers", None) is not None:
            raise UsageError(
                f"--workers {args.workers} sets the local engine's decoding processes; with --engine ray decoding "
                "runs in Ray's read stage: drop --workers (--actors sets the explaining actors)."
            )
        return
    given = [
        flag
        for flag, value in (
            ("--address", getattr(args, "address", None)),
            ("--actors", getattr(args, "actors", None)),
            ("--gpus-per-actor", getattr(args, "gpus_per_actor", 0.0) or None),
            ("--storage", getattr(args, "storage", None)),
        )
        if value is not None
    ]
    if given:
        raise UsageError(f"{', '.join(given)} apply to --engine ray: add --engine ray, or drop them for a local run.")


def _ray_options(args: argparse.Namespace, loaded: LoadedModel) -> RayOptions:
    """The Ray engine's options from the command line, checked before anything runs.

    The driver's model goes to the workers by value (Ray's object store): they need cnnlens and the libraries
    the model's classes come from, not the checkpoint or the factory file, and they start seconds sooner than
    by loading it again. A Keras model (its variables live in Keras, not in the module) is rebuilt on each
    worker from the same options instead.
    """
    from cnnlens.runs.model import is_entry_point
    from cnnlens.runs.ray_engine import RayOptions, ships_by_value

    keys: tuple[str, ...] = ("model", "weights", "random_weights", "download", "num_classes", "class_names")
    keys += ("input_size", "resize", "mean", "std", "preprocess")
    options = {key: getattr(args, key, None) for key in keys}
    model = str(options["model"])
    if is_entry_point(model) and ".py:" in model:  # file.py:factory: the file's absolute path
        path, _, factory = model.rpartition(":")
        options["model"] = f"{os.path.abspath(path)}:{factory}"
    for key in ("weights", "class_names"):
        options[key] = _absolute(options[key])
    ray_options = RayOptions(
        address=args.address,
        actors=args.actors,
        gpus_per_actor=args.gpus_per_actor,
        storage=args.storage,
        model_loader=None if ships_by_value(loaded) else _CliModelLoader(options),
    )
    ray_options.validate()
    return ray_options


def _print_actors(info: dict[str, Any]) -> None:
    """The Ray engine's throughput per actor and the driver's commit rate."""
    console = common.console
    table = Table(title="ray actors")
    for name in ("actor", "shards", "images", "compute s", "images/s", "after 1st shard"):
        table.add_column(name, justify="left" if name == "actor" else "right", overflow="fold")
    for item in info.get("throughput", []):
        rate, steady = item.get("images_per_s"), item.get("steady_images_per_s")
        table.add_row(
            escape(str(item["actor"])),
            str(item["shards"]),
            str(item["images"]),
            f"{item['seconds']:.1f}",
            "-" if rate is None else f"{rate:.1f}",
            "-" if steady is None else f"{steady:.1f}",
        )
    console.print(table)
    rate = info.get("driver_commits_per_s")
    console.print(
        escape(
            f"{info['actors']} actor(s) x {info['cpus_per_actor']:g} CPU, {info['gpus_per_actor']:g} GPU, "
            f"{info['threads_per_actor']} torch thread(s); driver commits "
            + ("-" if rate is None else f"{rate:.0f} images/s")
        ),
        highlight=False,
    )


def _print_summary(summary: RunSummary, out: str) -> int:
    """The run's table, its per-pair metric means and its unreadable files; returns the exit code."""
    from cnnlens.cli.common import _cli_hint

    console, err_console = common.console, common.err_console
    table = Table(title=escape(f"run {out}"))
    table.add_column("images", justify="right", overflow="fold")
    table.add_column("explained", justify="right", overflow="fold")
    table.add_column("errors", justify="right", overflow="fold")
    table.add_column("accuracy", justify="right", overflow="fold")
    table.add_column("time", justify="right", overflow="fold")
    table.add_column("images/s", justify="right", overflow="fold")
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
        console.print(escape(f"{key}: {_metric_line(values)}"), highlight=False)
    console.print(escape(f"results: {summary.results}; report: cnnlens report {out}"), highlight=False)
    if summary.errors:
        import pyarrow.parquet as pq

        rows = pq.read_table(summary.results, columns=["path", "status", "error"]).to_pylist()
        bad = [r for r in rows if r["status"] != "ok"]
        err_console.print(f"[bold red]{len(bad)} file(s) could not be read[/] (error rows in results.parquet):")
        for r in bad[:20]:
            err_console.print(escape(f"  {r['path']}: {_cli_hint(r['error'])}"), highlight=False)
        if len(bad) > 20:
            err_console.print(f"  ... and {len(bad) - 20} more")
        return EXIT_FAILED_INPUTS
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    """``cnnlens report RUN_DIR``; returns the exit code."""
    from cnnlens.report import render_run_report
    from cnnlens.runs.errors import RunError

    console = common.console
    if args.gallery < 0 or args.max_classes < 1:
        raise RunError("--gallery must be 0 or more and --max-classes at least 1.")
    index = render_run_report(
        args.run_dir, out=args.out, gallery=args.gallery, max_classes=args.max_classes, overwrite=args.overwrite
    )
    console.print(escape(_report_line(index)), highlight=False)
    console.print(escape(f"report: {index.resolve()}"), highlight=False)
    return EXIT_OK


_METRIC_LABELS = {
    "average_drop_pct": ("Average Drop", "%"),
    "increase_in_confidence_pct": ("Increase in Confidence", "%"),
    "degenerate_pred": ("degenerate maps", ""),
    "energy_in_box_correct": ("energy in box (correct)", "%"),
    "energy_in_box_wrong": ("energy in box (wrong)", "%"),
    "energy_in_box_true_class_wrong": ("energy in box (true class, wrong)", "%"),
    "pointing_accuracy": ("pointing accuracy", "%"),
}


def _metric_line(values: dict[str, float | int | None]) -> str:
    """A run's per-pair means in one unit: percentages as ``6.2 %`` (the studies' unit), counts as integers."""
    parts = []
    for key, value in values.items():
        if not isinstance(value, (int, float)):
            continue
        label, unit = _METRIC_LABELS.get(key, (key, ""))
        if unit and not key.endswith("_pct"):
            value = 100.0 * value  # a share in [0, 1], shown as a percentage like the others
        parts.append(f"{label} {value:.1f} %" if unit else f"{label} {value}")
    return ", ".join(parts)


def _report_line(index: object) -> str:
    """Accuracy and counts of the report next to ``index`` (its report.json)."""
    import json
    from pathlib import Path

    data = json.loads((Path(str(index)).parent / "report.json").read_text("utf-8"))
    accuracy = data.get("accuracy")
    shown = "-" if accuracy is None else f"{100 * accuracy:.2f} %"
    return (
        f"accuracy {shown} ({data['correct']} of {data['ok']} explained image(s) correct, "
        f"{data['ok'] - data['correct']} wrong); {data['total']} image(s), {data['errors']} unreadable"
    )
