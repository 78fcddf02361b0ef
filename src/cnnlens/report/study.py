"""Figures and HTML for the layer and model studies (matplotlib + jinja2), opening from disk."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from cnnlens.explanation import environment_versions
from cnnlens.imaging import overlay
from cnnlens.report import _env
from cnnlens.studies import LayerStudy, ModelStudy

__all__ = ["curves_figure", "layer_grid", "render_study_report", "study_section"]


def layer_grid(study: LayerStudy, method: str, path: Path, *, max_images: int = 6) -> Path:
    """Rows = layers, columns = images: the method's overlays, with the recommended layer marked."""
    exps = [e for e in study.explanations if e.method == method]
    if not exps:
        raise KeyError(f"the study has no maps for method {method!r}.")
    n_img = min(max_images, exps[0].batch_size)
    fig, axes = plt.subplots(len(exps), n_img, figsize=(2.0 * n_img + 1.8, 2.0 * len(exps)), squeeze=False)
    for r, exp in enumerate(exps):
        images = exp.images.numpy() if exp.images is not None else None
        for c in range(n_img):
            ax = axes[r, c]
            m = exp.maps[c, 0].float().numpy()
            ax.imshow(overlay(images[c], m) if images is not None else m, cmap=None if images is not None else "jet")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0 and exp.image_names:
                ax.set_title(exp.image_names[c], fontsize=8)
            if bool(exp.degenerate[c, 0]):
                ax.text(0.5, 0.5, "degenerate", color="red", ha="center", transform=ax.transAxes, fontsize=8)
        mark = " ★" if study.recommended.get(method) == exp.layer else ""
        axes[r, 0].set_ylabel(f"{exp.layer}{mark}", fontsize=8, rotation=0, ha="right", va="center")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=60)
    plt.close(fig)
    return path


def curves_figure(study: LayerStudy, method: str, path: Path) -> Path:
    """Mean deletion and insertion curves of each layer for one method."""
    fig, (ax_d, ax_i) = plt.subplots(1, 2, figsize=(10, 3.6))
    for (m, layer), curve in study.curves.items():
        if m != method:
            continue
        width = 2.5 if study.recommended.get(method) == layer else 1.0
        ax_d.plot(curve["fractions"], curve["deletion"], label=layer, linewidth=width)
        ax_i.plot(curve["fractions"], curve["insertion"], label=layer, linewidth=width)
    ax_d.set_title(f"{method}: deletion (lower is better)")
    ax_i.set_title(f"{method}: insertion (higher is better)")
    for ax in (ax_d, ax_i):
        ax.set_xlabel("fraction of pixels")
        ax.set_ylabel("class probability")
    ax_i.legend(fontsize=6, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=70)
    plt.close(fig)
    return path


def study_section(study: LayerStudy, out: Path, prefix: str) -> dict[str, Any]:
    """Write a layer study's figures under ``out`` and return the template context for one section."""
    methods = list(dict.fromkeys(r.method for r in study.rows))
    figures = []
    for method in methods:
        grid = layer_grid(study, method, out / f"{prefix}_{method}_grid.png")
        curves = curves_figure(study, method, out / f"{prefix}_{method}_curves.png")
        figures.append(
            {
                "method": method,
                "grid": grid.relative_to(out).as_posix(),
                "curves": curves.relative_to(out).as_posix(),
            }
        )
    return {
        "rows": study.table(),
        "recommended": study.recommended,
        "rule": study.rule,
        "figures": figures,
        "notes": study.notes,
        "step": study.step,
        "merge_method": study.catalog.merge_method,
    }


def render_study_report(
    directory: str | os.PathLike[str],
    *,
    title: str,
    intro: str = "",
    layer_studies: Mapping[str, LayerStudy] | None = None,
    model_study: ModelStudy | None = None,
    extra_sections: Sequence[Mapping[str, Any]] = (),
    manifest: Mapping[str, Any] | None = None,
    random_weights: bool = False,
) -> Path:
    """Render ``index.html`` for a study (and ``study.json`` with every number) into ``directory``.

    Args:
        directory: Output folder; figures are written there too.
        title: Page title.
        intro: Trusted HTML above the results.
        layer_studies: Section name (e.g. the model name) -> layer study.
        model_study: A model comparison.
        extra_sections: Pre-rendered sections: dicts with ``title``, ``html`` (trusted) for e.g. forward views.
        manifest: Provenance written into ``study.json``.
        random_weights: Show the random-weights banner.

    Returns:
        The HTML path.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    sections = []
    for name, study in (layer_studies or {}).items():
        sections.append({"name": name, **study_section(study, out, f"layers_{name}")})
    models_ctx: dict[str, Any] | None = None
    if model_study is not None:
        grid = _models_grid(model_study, out / "models_grid.png")
        models_ctx = {"rows": model_study.table(), "grid": grid.relative_to(out).as_posix()}
    doc = {
        **(manifest or {}),
        "versions": environment_versions(),
        "layer_studies": {
            n: {"rows": s.table(), "recommended": s.recommended, "rule": s.rule, "step": s.step}
            for n, s in (layer_studies or {}).items()
        },
        "model_study": model_study.table() if model_study is not None else None,
    }
    (out / "study.json").write_text(json.dumps(doc, indent=2, default=str) + "\n", encoding="utf-8")
    html = (
        _env()
        .get_template("study.html")
        .render(
            title=title,
            intro=intro,
            sections=sections,
            models=models_ctx,
            extra_sections=list(extra_sections),
            random_weights=random_weights or bool(model_study and any(r.random_weights for r in model_study.rows)),
            versions=doc["versions"],
        )
    )
    path = out / "index.html"
    path.write_text(html, encoding="utf-8")
    return path


def _models_grid(study: ModelStudy, path: Path) -> Path:
    """Rows = (model, method) at the compared layer, columns = images."""
    cells = []
    for row in study.rows:
        exp = study.layer_studies[row.model].explanations.get(row.method, row.layer)
        cells.append((row, exp))
    n_img = len(study.image_names)
    fig, axes = plt.subplots(len(cells), n_img, figsize=(2.0 * n_img + 2.2, 2.0 * len(cells)), squeeze=False)
    for r, (row, exp) in enumerate(cells):
        images = exp.images.numpy() if exp.images is not None else None
        for c in range(n_img):
            ax = axes[r, c]
            m = exp.maps[c, 0].float().numpy()
            ax.imshow(overlay(images[c], m) if images is not None else np.asarray(m))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(study.image_names[c], fontsize=8)
        label = f"{row.model}\n{row.method} @ {row.layer}" + ("\nRANDOM WEIGHTS" if row.random_weights else "")
        axes[r, 0].set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=60)
    plt.close(fig)
    return path
