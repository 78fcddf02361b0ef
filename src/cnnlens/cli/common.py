"""What every ``cnnlens`` command shares: the consoles, exit codes, model loading, argument checks, inputs, progress.

The consoles are module attributes that :func:`_make_consoles` replaces at each start (their width depends on
the terminal): other modules read them as ``common.console`` / ``common.err_console``, never by ``from`` import.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from cnnlens._names import DEFAULT_MAX_PIXELS, is_keras_name
from cnnlens.cli.args import (
    LineProgress,
    check_cmap,
    check_device,
    check_out_dir,
    check_range,
    parse_layout_args,
    parse_options,
    resolve_device,
    resolve_method_ids,
)
from cnnlens.errors import CnnlensError, UsageError

if TYPE_CHECKING:  # heavy modules load inside the commands, so --help and usage errors never import torch
    import numpy as np

    from cnnlens.data import ImageFailure
    from cnnlens.models import LoadedModel

EXIT_OK, EXIT_FAILED_INPUTS, EXIT_USAGE = 0, 1, 2

console = Console(soft_wrap=True, emoji=False)
err_console = Console(stderr=True, soft_wrap=True, emoji=False)


def _make_consoles() -> None:
    """(Re)create the consoles: a real terminal sets the width, a pipe or file gets ``$COLUMNS`` or 160."""
    global console, err_console
    columns = os.environ.get("COLUMNS", "")
    piped = int(columns) if columns.isdigit() and int(columns) > 0 else 160
    console = Console(width=None if sys.stdout.isatty() else piped, soft_wrap=True, emoji=False)
    err_console = Console(stderr=True, width=None if sys.stderr.isatty() else piped, soft_wrap=True, emoji=False)


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
    keras: dict[str, Any] = {}  # a keras: architecture is built at --input-size; --preprocess: Keras models only
    name = args.model.lower() if isinstance(args.model, str) else ""
    if getattr(args, "preprocess", None) is not None:
        if not is_keras_name(name):
            raise UsageError(
                f"--preprocess {args.preprocess}: the Keras preprocess_input mode applies to Keras models (keras:ARCH, "
                f".keras/.h5 files), not to {args.model!r}; set its normalisation with --mean/--std."
            )
        keras["preprocessing_mode"] = args.preprocess
    if name.startswith("keras:"):
        keras.update(prep)
    if is_entry_point(args.model):
        return load_run_model(args.model, **common, **prep)
    model = load_model(args.model, **common, **keras)
    if any(value is not None for value in prep.values()):
        new = override_preprocessing(model.spec.preprocessing, **prep)
        model = replace(model, spec=replace(model.spec, preprocessing=new))
        _fit_input_size(model)
    return model


def _fit_input_size(model: LoadedModel) -> None:
    """Give a timm token model with a fixed input size (ViT, DeiT, Swin) the ``--input-size`` asked for.

    timm's patch embedding refuses any other size (an assertion deep in its forward); ``set_input_size``
    resamples the position embeddings (and Swin's windows) to the new grid, as timm does for fine-tuning at
    another resolution. Said on stderr; nothing happens for models that take any size.
    """
    module = model.module
    _check_keras_input_size(model)
    embed = getattr(module, "patch_embed", None)
    fixed = getattr(embed, "img_size", None)
    setter = getattr(module, "set_input_size", None)
    size = tuple(model.spec.preprocessing.input_size)
    if fixed is None or not callable(setter) or getattr(embed, "dynamic_img_size", False) or tuple(fixed) == size:
        return
    setter(img_size=size)
    err_console.print(
        f"note: {escape(model.spec.name)} built for {fixed[0]}x{fixed[1]} inputs now takes {size[0]}x{size[1]} "
        "(timm set_input_size: position embeddings resampled to the new patch grid).",
        highlight=False,
    )


def _check_keras_input_size(model: LoadedModel) -> None:
    """Refuse ``--input-size`` on a Keras model built for another size (Keras checks its input shape).

    Raises:
        UsageError: The Keras model takes one input size and ``--input-size`` asked for another.
    """
    from cnnlens.views._common import fixed_input_hw

    fixed = fixed_input_hw(model.module)
    size = tuple(model.spec.preprocessing.input_size)
    if fixed is not None and fixed != size:
        raise UsageError(
            f"--input-size {size[0]} {size[1]}: the Keras model {model.spec.name} was built for {fixed[0]}x{fixed[1]} "
            "inputs and Keras refuses any other size. Drop --input-size, or build and save the model with "
            f"input_shape=({size[0]}, {size[1]}, 3) and pass the .keras file."
        )


def _load(args: argparse.Namespace) -> LoadedModel:
    """Load ``--model`` (zoo, architecture or factory, with preprocessing overrides); say so if weights are random."""
    model = _load_quietly(args, random_weights=args.random_weights)
    if model.random_weights:
        label, source = "RANDOM WEIGHTS", model.weights_source
        rest = f" {source[len(label) :].lstrip(' :')}" if source.startswith(label) else f": {source}"  # label once
        err_console.print(f"[bold red]{label}[/]{escape(rest)}. Outputs are marked as such.", highlight=False)
    return model


def _parse_options(items: Sequence[str], methods: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """``--option METHOD.KEY=VALUE`` items, typed and checked (see :func:`cnnlens.cli.args.parse_options`)."""
    return parse_options(items, methods)


_FLAG_NAMES = {"show_top": "--show-top (--top-k)"}


def _check_args(args: argparse.Namespace) -> None:
    """Check every argument that can be checked without a model, right after parsing.

    Methods, options (typed against each method's declared options), ``--layout`` texts, colour map, device,
    output folder and numeric ranges; the layer names and class-dependent ranges are checked right after the model loads
    (:func:`_check_model_args`), before any computation.

    Raises:
        UsageError: The first invalid argument (MethodNotFoundError/MethodError for methods and options).
    """
    a = vars(args)
    for flag in (
        "batch_size", "steps", "last_n", "max_pixels", "explain_top", "show_top", "num_classes", "chunk_size", "threads"
    ):  # fmt: skip
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
    if "memory_format" in a:  # how to run, checked by Execution itself (OptionError names the field)
        from cnnlens.execution import Execution

        args.execution = Execution(
            memory_format=a["memory_format"],
            memory_budget_mb=a.get("memory_budget_mb"),
            chunk_size=a.get("chunk_size"),
            threads=a.get("threads"),
        )
    if "layout" in a:  # layout texts only; whether they fit is checked on the first forward
        args.layout = parse_layout_args(a["layout"] or [])
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


def _print_layouts(manifest: Mapping[str, Any], layers: Sequence[str] = (), *, default: bool = False) -> None:
    """Say how each layer was read, e.g. ``layer blocks.11.norm1 (default layer): tokens: 1 prefix token + ...``.

    Args:
        manifest: A result's manifest; its ``"layouts"`` maps layer -> :meth:`cnnlens.capture.Layout.describe`
            for the layers that are not plain ``(B, C, h, w)`` outputs.
        layers: The explained layers.
        default: The layers are the model's default (no ``--layer``): said so, and a plain ``nchw`` default is
            named too, so every command run without ``--layer`` says which layer it explained and how.
    """
    layouts: Mapping[str, str] = manifest.get("layouts") or {}
    which = " (default layer)" if default else ""
    for layer in dict.fromkeys([*layers, *layouts]):
        if layer in layouts:
            console.print(escape(f"layer {layer}{which}: {layouts[layer]}"), highlight=False)
        elif default:
            console.print(escape(f"layer {layer}{which}: nchw (B, C, h, w) as the layer outputs it"), highlight=False)


def resolve_class(spec: str, class_names: Sequence[str]) -> int:
    """Turn ``--class`` (an index or a class name) into a class index.

    Names match case-insensitively, exactly first, then as a unique substring (the same rule as
    ``targets="tiger cat"`` in the API: :func:`cnnlens.targets.class_index`).

    Raises:
        TargetError: With close matches when nothing or several classes match.
    """
    from cnnlens.targets import class_index

    return class_index(spec, class_names, source="--class")


def _progress(*extra: ProgressColumn) -> Progress | LineProgress:
    """Counts, elapsed time and ETA: a rich bar in a terminal, one plain line per phase (stderr) otherwise.

    ``extra`` columns go after the counts (``cnnlens run`` adds its images per second).
    """
    if not err_console.is_terminal:
        return LineProgress(sys.stderr)
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *extra,
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


def _cli_hint(reason: str) -> str:
    """Library hints rephrased for the command line (flags instead of Python calls)."""
    return (
        reason.replace("expand recursively to include them", "add --recursive to include them")
        .replace("expand it with expand_paths()", "pass the folder itself (its images are read)")
        .replace("pass a larger max_pixels", "pass a larger --max-pixels")
        .replace("pass layers=[...] explicitly", "pass --layer NAME explicitly")
        .replace("add them to methods=.", "add them to --method.")
        .replace("layout='tokens:P:HxW'", "--layout tokens:P:HxW (or LAYER=tokens:P:HxW)")
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


def _into_out(command: Callable[[argparse.Namespace], int], kind: str) -> Callable[[argparse.Namespace], int]:
    """Run ``command`` with its ``--out`` folder claimed (see cnnlens.outputs_dir.writing_into)."""

    def run(args: argparse.Namespace) -> int:
        from cnnlens.outputs_dir import writing_into

        with writing_into(args.out, kind, overwrite=getattr(args, "overwrite", False)):
            return command(args)

    run.__name__ = run.__qualname__ = command.__name__.lstrip("_")
    run.__doc__ = command.__doc__
    return run
