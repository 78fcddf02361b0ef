"""``cnnlens explain``: maps for images, written with an index page."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.markup import escape
from rich.table import Table

from cnnlens.cli import common
from cnnlens.cli.common import (
    EXIT_FAILED_INPUTS,
    _check_model_args,
    _cli_hint,
    _expand_inputs,
    _load,
    _print_layouts,
    _progress,
    _report_failures,
    _unique_names,
)
from cnnlens.errors import CnnlensError

if TYPE_CHECKING:  # heavy modules load inside the commands, so --help and usage errors never import torch
    import numpy as np

    from cnnlens.execution import Execution
    from cnnlens.explanation import ExplanationSet
    from cnnlens.models import LoadedModel


def _print_predictions(result: ExplanationSet, names: Sequence[str], k: int) -> None:
    table = Table(title=None, show_lines=False)
    table.add_column("image", overflow="fold")
    table.add_column("rank", justify="right")
    table.add_column("class", overflow="fold")
    table.add_column("probability", justify="right")
    for name, row in zip(names, result.top_k(k), strict=True):
        for rank, (idx, label, prob) in enumerate(row, start=1):
            table.add_row(escape(name) if rank == 1 else "", str(rank), escape(f"{idx} {label}"), f"{prob:.4f}")
    common.console.print(table)


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
    execution: Execution | None = None,
    layout: str | dict[str, str] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Explain pre-loaded images in batches; returns (result entries, predictions); files go into ``written``.

    The layouts of non-``nchw`` layers (given by ``layout`` or inferred) are printed after the first batch, and
    the default layer's (nchw too) when no layer was named.
    """
    import torch

    from cnnlens.explain import default_layer, explain

    prep = model.spec.preprocessing
    explained = list(layers) if layers else [default_layer(model)]
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
                    execution=execution,
                    layout=layout,
                )
                batch_written, batch_entries = result.write_files(out, cmap=cmap)
                if written is not None:
                    written.extend(batch_written)
                entries.extend(batch_entries)
                if g == 0 and start == 0:
                    _print_layouts(result.manifest, explained, default=not layers)
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
            execution=args.execution,
            layout=args.layout,
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
    common.console.print(
        escape(f"wrote {len(entries)} map(s) for {len(items)} image(s) to {out}/ ; index: {index}"), highlight=False
    )
    return _report_failures(failures)
