"""``cnnlens demo``: the seed study on the embedded models and the bundled sample photos."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import TYPE_CHECKING

from rich.markup import escape

from cnnlens.cli import common
from cnnlens.cli.common import (
    EXIT_OK,
    _device,
    _into_out,
    _phase,
)
from cnnlens.cli.explain import _run_explain
from cnnlens.cli.studies import _compare_models_with_progress, _print_layer_table

if TYPE_CHECKING:  # heavy modules load inside the commands, so --help and usage errors never import torch
    pass


def _cmd_demo(args: argparse.Namespace) -> int:
    """``cnnlens demo``: the seed study on the embedded models and the bundled sample photos."""
    import torch

    from cnnlens.capture import probe_layers
    from cnnlens.data import sample_images
    from cnnlens.explanation import write_manifest
    from cnnlens.report import render_explain_report
    from cnnlens.report._env import environment
    from cnnlens.report.demo import demo_predictions_html, demo_section
    from cnnlens.report.study import render_study_report
    from cnnlens.studies import compare_layers

    started = time.perf_counter()
    device = _device(args.device)
    model = common.load_model(args.model, device=device)
    photos = sample_images()
    items = list(photos.items())[: 3 if args.quick else None]
    out = Path(args.out)
    # Part 1: every photo explained at two layers, plus the forward views of one photo.
    c, (h, w) = 3, model.spec.preprocessing.input_size
    infos = {i.name: i for i in probe_layers(model.module, (c, h, w))}
    layer = model.spec.default_layer
    known = model.spec.known_layers
    early = known.get("mid_activation", known.get("mid_block", layer))
    layers = list(dict.fromkeys([layer, early]))
    entries, predictions = _run_explain(
        model, items, out=out / "explain", methods=["gradcam", "gradcampp"], layers=layers, targets=None,
        explain_top=1, options={}, batch_size=8, top_k=3, cmap="jet",
    )  # fmt: skip
    write_manifest(out / "explain", entries, {"command": "demo", "model": model.manifest()}, predictions=predictions)
    render_explain_report(out / "explain", title="cnnlens demo: every photo", subtitle=model.spec.name)
    with _phase("part 1: forward views (filters, feature maps, activation maximisation steps)") as update:
        if args.quick:
            section = demo_section(model, photos["chelsea"], out, steps=6, size=64, channels=2, progress=update)
        else:
            section = demo_section(model, photos["chelsea"], out, steps=60, progress=update)
    part1 = demo_predictions_html(
        model=model.spec.name, weights=model.weights_source, layers=layers,
        strides={ly: getattr(infos.get(ly), "stride", "?") for ly in layers}, photos=[name for name, _ in items],
        entries=entries, predictions=predictions, views=section,
    )  # fmt: skip
    # Part 2.1: target layers of the default model; part 2.2: the embedded models compared.
    study_names = ["chelsea", "coffee"] if args.quick else ["chelsea", "coffee", "astronaut", "rocket"]
    study_images = [photos[n] for n in study_names]
    steps = 4 if args.quick else 16
    x = torch.stack([model.spec.preprocessing.to_tensor(img) for img in study_images])
    with _phase(f"part 2.1: target layers of {model.spec.name}, maps measured ({len(study_names)} photos)") as update:
        layer_study = compare_layers(
            model, x, last_n=1 if args.quick else 3, steps=steps, image_names=study_names, progress=update
        )
    _print_layer_table(layer_study)
    others = [m for m in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")]
    if args.quick:
        others = others[:2]
    models = []
    with _phase("part 2.2: loading models", total=len(others)) as update:
        for i, n in enumerate(others):
            models.append(model if n == model.spec.name else common.load_model(n, device=device))
            update(i + 1, len(others))
    given = {m.spec.name: m.spec.default_layer for m in models} if args.quick else None
    model_study = _compare_models_with_progress(
        models, study_images, layers=given, image_names=study_names, steps=steps, last_n=2
    )
    report = render_study_report(
        out,
        title="cnnlens demo: the seed study on the embedded models",
        intro=environment().get_template("demo_intro.html").render(models=", ".join(others)),
        layer_studies={model.spec.name: layer_study},
        model_study=model_study,
        extra_sections=[{"title": "Part 1: how the network sees", "html": part1}],
        manifest={"command": "demo", "model": model.manifest(), "images": study_names},
    )
    common.err_console.print(f"demo finished in {time.perf_counter() - started:.1f} s")
    common.console.print(escape(f"report: {report.resolve()}"), highlight=False)
    return EXIT_OK


cmd_demo = _into_out(_cmd_demo, "demo")
