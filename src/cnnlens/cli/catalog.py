"""``cnnlens layers``, ``models`` and ``methods``: what can be explained, and with what."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from rich.markup import escape
from rich.table import Table

from cnnlens.cli import common
from cnnlens.cli.common import (
    EXIT_OK,
    _load,
    _load_quietly,
)

if TYPE_CHECKING:  # heavy modules load inside the commands, so --help and usage errors never import torch
    pass


def cmd_layers(args: argparse.Namespace) -> int:
    """``cnnlens layers``: every feature-map layer with type, shape, stride and its roles.

    A token model's candidate layers (ViT tokens, channels-last Swin outputs) get a ``layout`` column: the
    ``--layout`` text of how their output maps to ``(C, h, w)`` maps, and that map view's shape.

    Listing needs no trained weights: without ``--weights`` and without published weights here, the
    architecture is built with untrained weights (said on stderr) just to list its layers.
    """
    from cnnlens.candidates import candidate_layers
    from cnnlens.capture import probe_layers
    from cnnlens.errors import WeightsUnavailableError

    try:
        model = _load(args)
    except WeightsUnavailableError:
        if args.weights is not None:
            raise
        model = _load_quietly(args, random_weights=True)
        common.err_console.print(
            f"note: no weights for {escape(args.model)} here; listing the architecture (layer names and shapes do "
            "not depend on weights).",
            highlight=False,
        )
    c = 3
    h, w = model.spec.preprocessing.input_size
    infos = probe_layers(model.module, (c, h, w))
    catalog = candidate_layers(model.module, (c, h, w), infos=infos)
    roles = {layer.name: list(layer.roles) for layer in catalog.layers}
    mapped = {layer.name: layer for layer in catalog.layers if layer.layout != "nchw"}
    for role, name in model.spec.known_layers.items():
        if role not in roles.setdefault(name, []):
            roles[name].append(role)
    params = _keras_params(model.module)
    default = model.spec.default_layer
    table = Table(title=escape(f"{model.spec.name}: layers for input {c}x{h}x{w} (* = default target: {default})"))
    layout_column = ("layout (map shape)",) if mapped else ()
    columns = ("layer", "type", "output shape", *layout_column, "stride", "params", "roles")
    for col in columns:
        table.add_column(col, justify="right" if col in {"stride", "params"} else "left", overflow="fold")
    for info in infos:
        feature_map = info.shape is not None and len(info.shape) == 3
        if not args.all and not feature_map and info.name not in roles:
            continue
        shape = "x".join(map(str, info.shape)) if info.shape is not None else ("not run" if info.calls == 0 else "-")
        if info.calls > 1:
            shape += f" (x{info.calls} calls)"
        cand = mapped.get(info.name)
        layout = [f"{cand.layout} ({'x'.join(map(str, cand.shape))})" if cand is not None else ""] if mapped else []
        table.add_row(
            escape(info.name + (" *" if info.name == default else "")),
            escape(info.type),
            shape,
            *layout,
            str((cand.stride if cand is not None else info.stride) or ""),
            f"{params.get(info.name, info.params):,}" if params.get(info.name, info.params) else "",
            escape(", ".join(r for r in roles.get(info.name, []) if r != "conv")),
        )
    common.console.print(table)
    if catalog.notes:
        for note in catalog.notes:
            common.err_console.print(f"note: {escape(note)}", highlight=False)
    return EXIT_OK


def _keras_params(module: Any) -> dict[str, int]:
    """Parameters of each layer of a Keras model (``count_params``), which Keras keeps outside the layer modules.

    Empty for a torch model (its ``LayerInfo.params`` are right) and for nested models (listed as containers).
    """
    adapter = sys.modules.get("cnnlens.models.keras")
    if adapter is None or not isinstance(module, adapter.KerasModule):
        return {}
    counts: dict[str, int] = {}
    for path, layer in adapter.keras_layers(module):
        if not hasattr(layer, "layers"):
            counts[path] = int(layer.count_params()) if layer.built else 0
    return counts


def cmd_models(args: argparse.Namespace) -> int:
    """``cnnlens models``: the zoo, then the Keras architectures (``keras:vgg16``...)."""
    from cnnlens.models import available_models, get_spec, weights_status

    table = Table(title="cnnlens model zoo")
    for col in ("model", "family", "input", "default layer"):
        table.add_column(col, overflow="fold")
    table.add_column("weights here", overflow="fold")
    for name in available_models():
        spec = get_spec(name)
        ok, why = weights_status(name)
        h, w = spec.preprocessing.input_size
        table.add_row(
            escape(name),
            escape(spec.family),
            f"{h}x{w}",
            escape(spec.default_layer),
            ("[green]yes[/] " if ok else "[red]no[/] ") + escape(why),
        )
    _add_keras_rows(table)
    common.console.print(table)
    return EXIT_OK


def _add_keras_rows(table: Table) -> None:
    """The ``keras:`` architectures (run on Keras's torch backend; Keras itself is not imported to list them)."""
    from cnnlens.models.keras.apps import KERAS_APPS, cached_weights, keras_cache_dir

    for app in KERAS_APPS.values():
        found = cached_weights(app.weights_file)
        why = (
            f"Keras published weights in {found}"
            if found is not None
            else f"{app.weights_file} not in {keras_cache_dir()}; --download, --weights PATH or --random-weights"
        )
        table.add_row(
            escape(f"keras:{app.name}"),
            escape(app.family),
            f"{app.size}x{app.size}",
            escape(app.default_layer),
            ("[green]yes[/] " if found is not None else "[red]no[/] ") + escape(why),
        )


def cmd_methods(args: argparse.Namespace) -> int:
    """``cnnlens methods``."""
    from cnnlens.methods import iter_methods

    if args.markdown:
        from cnnlens.report.methods_doc import methods_markdown

        sys.stdout.write(methods_markdown())
        return EXIT_OK
    table = Table(title="cnnlens methods")
    for col in ("id", "name", "formula", "options"):
        table.add_column(col, overflow="fold", max_width=24 if col == "name" else None)  # long titles wrap
    for spec in iter_methods():
        opts = ", ".join(f"{k}={v}" for k, v in spec.variant().items())
        table.add_row(escape(spec.id), escape(spec.title), escape(spec.formula), escape(opts))
    common.console.print(table)
    return EXIT_OK
