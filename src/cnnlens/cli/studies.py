"""``cnnlens compare-layers`` and ``compare-models``: the studies, measured, with their report."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rich.markup import escape
from rich.table import Table

from cnnlens._names import is_keras_name
from cnnlens.cli import common
from cnnlens.cli.common import (
    EXIT_FAILED_INPUTS,
    _check_model_args,
    _into_out,
    _load,
    _load_inputs,
    _phase,
    _print_layouts,
    _report_failures,
)
from cnnlens.errors import UsageError

if TYPE_CHECKING:  # heavy modules load inside the commands, so --help and usage errors never import torch
    import numpy as np

    from cnnlens.models import LoadedModel


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
    common.console.print(table)


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
            progress=update, execution=args.execution, layout=args.layout,
        )  # fmt: skip
    _print_layouts(study.explanations.manifest, study.explanations.layers)
    _print_layer_table(study)
    report = render_study_report(
        args.out,
        title=f"cnnlens compare-layers: {model.spec.name}",
        layer_studies={model.spec.name: study},
        manifest={"command": "compare-layers", "model": model.manifest(), "images": names},
        random_weights=model.random_weights,
    )
    common.console.print(escape(f"report: {report.resolve()}"), highlight=False)
    return _report_failures(failures)


def _pairs(items: Sequence[str], what: str, example: str = "resnet50=ckpt.pt") -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise UsageError(f"{what} {item!r} is not MODEL=VALUE, e.g. {what} {example}.")
        if key in out:
            raise UsageError(f"{what} gives {key!r} twice ({out[key]!r} and {value!r}); give it once.")
        out[key] = value
    return out


def _layouts(items: Sequence[str]) -> dict[str, str]:
    """``--layout MODEL=SPEC`` items of compare-models, each SPEC checked before any model loads."""
    from cnnlens.capture.layout import parse_layout
    from cnnlens.errors import OptionError

    out = _pairs(items, "--layout", "vit_tiny_patch16_224=tokens:1:14x14")
    for key, text in out.items():
        try:
            parse_layout(text)
        except OptionError as exc:
            raise UsageError(f"--layout {key}={text}: {exc}") from None
    return out


cmd_compare_layers = _into_out(_cmd_compare_layers, "compare-layers")


def _input_sizes(items: Sequence[str]) -> dict[str, list[int]]:
    """``--input-size MODEL=PX`` or ``MODEL=HxW`` items of compare-models, as ``[H]`` or ``[H, W]``."""
    out: dict[str, list[int]] = {}
    for key, text in _pairs(items, "--input-size", "keras:inception_v3=299").items():
        parts = text.lower().split("x")
        if len(parts) > 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise UsageError(
                f"--input-size {key}={text}: give a size in pixels, PX or HxW, e.g. {key}=224 or {key}=224x160."
            )
        out[key] = [int(p) for p in parts]
    return out


def _preprocess_modes(items: Sequence[str]) -> dict[str, str]:
    """``--preprocess MODEL=MODE`` items of compare-models, each for a Keras model and a known mode."""
    from cnnlens.cli.options import KERAS_PREPROCESS_MODES

    out = _pairs(items, "--preprocess", "keras:resnet50=caffe")
    for key, mode in out.items():
        if mode not in KERAS_PREPROCESS_MODES:
            raise UsageError(f"--preprocess {key}={mode}: the mode is one of {', '.join(KERAS_PREPROCESS_MODES)}.")
        if not is_keras_name(key):
            raise UsageError(
                f"--preprocess {key}={mode}: the Keras preprocess_input mode applies to Keras models (keras:ARCH, "
                ".keras/.h5 files); a torch model's normalisation comes with it."
            )
    return out


def _brings_own_weights(name: str) -> bool:
    """Whether ``--random-weights`` is not for this model: a saved Keras model (``.keras``/``.h5``) or a factory.

    Both build their own weights, so ``compare-models a.keras keras:vgg16 --random-weights`` loads the file as
    saved and builds only the architecture with random weights.
    """
    from cnnlens.models.custom import is_entry_point

    lowered = name.lower()
    if lowered.startswith("keras:"):
        return False
    return lowered.endswith((".keras", ".h5")) or is_entry_point(name)


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
    layers = _pairs(args.layers, "--layers", "resnet50=layer4")
    layouts = _layouts(args.layouts)
    sizes = _input_sizes(args.input_sizes)
    modes = _preprocess_modes(args.preprocess_modes)
    for key in [*weights, *layers, *layouts, *sizes, *modes]:
        if key not in args.models:
            raise UsageError(f"{key!r} is not one of --models ({', '.join(args.models)}).")
    names, images, failures = _load_inputs(args.inputs, max_pixels=args.max_pixels)
    if not images:
        return _report_failures(failures) or EXIT_FAILED_INPUTS
    models = []
    with _phase("loading models", total=len(args.models)) as update:
        for i, name in enumerate(args.models):
            options = argparse.Namespace(
                model=name, weights=weights.get(name), download=args.download, num_classes=None, class_names=None,
                device=args.device, input_size=sizes.get(name), resize=None, mean=None, std=None,
                preprocess=modes.get(name),
            )  # fmt: skip
            random = args.random_weights and name not in weights and not _brings_own_weights(name)
            models.append(common._load_quietly(options, random_weights=random))
            update(i + 1, len(args.models))
    for m in models:
        if m.random_weights:
            common.err_console.print(f"[bold red]RANDOM WEIGHTS[/]: {escape(m.spec.name)}. Its rows are marked.")
    study = _compare_models_with_progress(
        models, images, methods=args.method, layers=layers, image_names=names, steps=args.steps, last_n=args.last_n,
        execution=args.execution, layouts=layouts,
    )  # fmt: skip
    table = Table(title="models, each at its layer")
    for col in ("model", "method", "layer", "AD %", "IC %", "del AUC", "ins AUC"):
        table.add_column(col, overflow="fold")
    for r in study.rows:
        table.add_row(
            escape(r.model + (" (RANDOM)" if r.random_weights else "")), escape(r.method), escape(r.layer),
            f"{r.average_drop:.1f}", f"{r.increase:.1f}", f"{r.deletion_auc:.3f}", f"{r.insertion_auc:.3f}",
        )  # fmt: skip
    common.console.print(table)
    report = render_study_report(
        args.out,
        title="cnnlens compare-models",
        model_study=study,
        layer_studies=study.layer_studies,
        manifest={"command": "compare-models", "models": [m.manifest() for m in models], "images": names},
    )
    common.console.print(escape(f"report: {report.resolve()}"), highlight=False)
    return _report_failures(failures)


cmd_compare_models = _into_out(_cmd_compare_models, "compare-models")
