"""Figures and HTML for the layer and model studies (matplotlib + jinja2), opening from disk."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize

from cnnlens.display import CAM_CMAP, SPARSE_CMAP, method_traits, scrub_paths
from cnnlens.explanation import environment_versions
from cnnlens.imaging import clip_percentile, overlay, overlay_weighted
from cnnlens.jsonfile import dumps_strict
from cnnlens.outputs_dir import safe_name
from cnnlens.report._env import environment
from cnnlens.studies import LayerStudy, ModelStudy

__all__ = [
    "INPUT_LEVEL",
    "curves_figure",
    "layer_grid",
    "models_summary",
    "render_study_report",
    "shown_aliases",
    "study_section",
]


_LABEL_PT = 11  # at _DPI = 100 a point is 1.39 px: 11 pt labels are 15 px, 9 pt legends 12.5 px
_DPI = 100


def _colorbar(fig: Any, axes: Any, cmap: str, label: str) -> None:
    """A vertical colour bar of ``cmap`` over [0, 1] beside ``axes`` (maps are normalised per image)."""
    mappable = ScalarMappable(norm=Normalize(0.0, 1.0), cmap=cmap)
    bar = fig.colorbar(mappable, ax=axes, fraction=0.04, pad=0.02, shrink=min(1.0, 0.9))
    bar.set_label(label, fontsize=_LABEL_PT - 1)
    bar.ax.tick_params(labelsize=_LABEL_PT - 2)


def _save_grid(fig: Any, axes: Any, cmap: str, path: Path) -> Path:
    """Lay out a grid of maps, add its colour bar, write it to ``path`` and close the figure."""
    fig.tight_layout()
    _colorbar(fig, axes, cmap, "map value (1 = max in its image)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _picture(images: np.ndarray | None, index: int, map01: np.ndarray, method: str) -> tuple[np.ndarray, str]:
    """The overlay of one map as the explain files draw it, and the colour map used."""
    traits = method_traits(method)
    cmap = SPARSE_CMAP if traits.sparse else CAM_CMAP
    if images is None:
        return (clip_percentile(map01) if traits.sparse else map01), cmap
    if traits.sparse:
        return overlay_weighted(images[index], map01, cmap=cmap), cmap
    return overlay(images[index], map01, cmap=cmap), cmap


def _mark_degenerate(ax: Any) -> None:
    ax.text(
        0.5,
        0.5,
        "degenerate\n(all zero)",
        color="#b00020",
        fontsize=_LABEL_PT + 1,
        fontweight="bold",
        ha="center",
        va="center",
        transform=ax.transAxes,
        bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "#b00020", "boxstyle": "round,pad=0.3"},
    )


INPUT_LEVEL = "input gradients (no layer)"
"""How a pixel attribution's layer is shown: it is computed at the input, whatever layer it was listed under."""


def shown_aliases(study: LayerStudy, layer: str) -> list[str]:
    """The other names of ``layer``'s tensor worth showing: the containers that return it, not its own parts."""
    aliases = next((c.aliases for c in study.catalog.layers if c.name == layer), ())
    return [a for a in aliases if not a.startswith(layer + ".")]


def _layer_label(study: LayerStudy, layer: str) -> str:
    aliases = shown_aliases(study, layer)
    return layer + (f"\n(= {', '.join(aliases)})" if aliases else "")


def layer_grid(study: LayerStudy, method: str, path: Path, *, max_images: int = 6) -> Path:
    """Rows = layers, columns = images: the method's overlays, the recommended layer starred, a colour bar.

    Labels are 11 pt at 100 dpi (15 px); degenerate maps carry a boxed red mark; a pixel attribution (which
    does not use the layer) is drawn once, as "input gradients", with the sparse colour map.
    """
    exps = [e for e in study.explanations if e.method == method]
    if not exps:
        raise KeyError(f"the study has no maps for method {method!r}.")
    if method_traits(method).input_level:
        exps = exps[:1]
    n_img = min(max_images, exps[0].batch_size)
    fig, axes = plt.subplots(len(exps), n_img, figsize=(2.2 * n_img + 3.2, 2.2 * len(exps) + 0.4), squeeze=False)
    cmap = CAM_CMAP
    for r, exp in enumerate(exps):
        images = exp.images.numpy() if exp.images is not None else None
        for c in range(n_img):
            ax = axes[r, c]
            picture, cmap = _picture(images, c, exp.maps[c, 0].float().numpy(), method)
            ax.imshow(picture, cmap=cmap if images is None else None)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0 and exp.image_names:
                ax.set_title(exp.image_names[c], fontsize=_LABEL_PT)
            if bool(exp.degenerate[c, 0]):
                _mark_degenerate(ax)
        if method_traits(method).input_level:
            label = "input gradients\n(no layer)"
        else:
            label = _layer_label(study, exp.layer) + (" ★" if study.recommended.get(method) == exp.layer else "")
        axes[r, 0].set_ylabel(label, fontsize=_LABEL_PT, rotation=0, ha="right", va="center")
    return _save_grid(fig, axes, cmap, path)


def curves_figure(study: LayerStudy, method: str, path: Path) -> Path:
    """Mean deletion and insertion curves of each layer for one method, each panel with its legend."""
    fig, (ax_d, ax_i) = plt.subplots(1, 2, figsize=(11, 4.2))
    input_level = method_traits(method).input_level
    for (m, layer), curve in study.curves.items():
        if m != method:
            continue
        best = study.recommended.get(method) == layer and not input_level
        label = INPUT_LEVEL if input_level else layer + (" ★" if best else "")
        width = 2.5 if best else 1.2
        ax_d.plot(curve["fractions"], curve["deletion"], label=label, linewidth=width)
        ax_i.plot(curve["fractions"], curve["insertion"], label=label, linewidth=width)
        if input_level:
            break  # the same map at every listed layer
    ax_d.set_title(f"{method}: deletion (lower is better)", fontsize=_LABEL_PT + 1)
    ax_i.set_title(f"{method}: insertion (higher is better)", fontsize=_LABEL_PT + 1)
    for ax, where in ((ax_d, "upper right"), (ax_i, "lower right")):
        ax.set_xlabel("fraction of pixels", fontsize=_LABEL_PT)
        ax.set_ylabel("class probability", fontsize=_LABEL_PT)
        ax.tick_params(labelsize=_LABEL_PT - 2)
        ax.legend(fontsize=_LABEL_PT - 2, loc=where, title="layer (★ recommended)", title_fontsize=_LABEL_PT - 2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI, bbox_inches="tight")
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
    aliases = {c.name: shown_aliases(study, c.name) for c in study.catalog.layers}
    rows: list[dict[str, Any]] = []
    shown_input: set[str] = set()
    for row in study.table():  # a pixel attribution is one row: it does not depend on the layer
        if method_traits(row["method"]).input_level:
            if row["method"] in shown_input:
                continue
            shown_input.add(row["method"])
            row = {**row, "layer": INPUT_LEVEL, "roles": [], "shape": [], "stride": None}
        rows.append(row)
    recommended = {m: INPUT_LEVEL if method_traits(m).input_level else layer for m, layer in study.recommended.items()}
    return {
        "rows": rows,
        "recommended": recommended,
        "rule": study.rule,
        "figures": figures,
        "notes": study.notes,
        "step": study.step,
        "merge_method": study.catalog.merge_method,
        "aliases": aliases,
    }


def models_summary(study: ModelStudy) -> list[str]:
    """The answer of a model comparison in a few sentences, for the top of its report.

    Per method: which model has the best deletion AUC, insertion AUC and Average Drop (each at its layer), and
    whether the models agree on each image's top-1 class.
    """
    lines: list[str] = []
    methods = list(dict.fromkeys(r.method for r in study.rows))
    for method in methods:
        rows = [r for r in study.rows if r.method == method]
        if not rows:
            continue
        best_del = min(rows, key=lambda r: r.deletion_auc)
        best_ins = max(rows, key=lambda r: r.insertion_auc)
        best_drop = min(rows, key=lambda r: r.average_drop)
        winners = {best_del.model, best_ins.model, best_drop.model}
        head = (
            f"{method}: {best_ins.model} is best on all three measures"
            if len(winners) == 1
            else f"{method}: no model is best on every measure"
        )
        lines.append(
            f"{head}: lowest deletion AUC {best_del.deletion_auc:.3f} ({best_del.model} at {best_del.layer}), "
            f"highest insertion AUC {best_ins.insertion_auc:.3f} ({best_ins.model} at {best_ins.layer}), "
            f"lowest Average Drop {best_drop.average_drop:.1f}% ({best_drop.model} at {best_drop.layer})."
        )
    firsts: dict[str, list[str]] = {}
    for r in study.rows:
        firsts.setdefault(r.model, r.top1)
    if len(firsts) > 1:
        disagree = [
            name
            for i, name in enumerate(study.image_names)
            if len({tops[i] for tops in firsts.values() if i < len(tops)}) > 1
        ]
        lines.append(
            "The models agree on the top-1 class of every image."
            if not disagree
            else f"The models' top-1 classes differ on {len(disagree)} of {len(study.image_names)} image(s): "
            f"{', '.join(disagree)}; their maps then explain different classes."
        )
    if any(r.random_weights for r in study.rows):
        lines.append("At least one model has RANDOM WEIGHTS: its rows show the method, not a trained decision.")
    return lines


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
        manifest: Provenance written into ``study.json`` (absolute paths made public: :func:`scrub_paths`).
        random_weights: Show the random-weights banner.

    With a model comparison, its answer comes first: a summary box (:func:`models_summary`), the table and the
    maps; the layer studies that chose each model's layer follow, folded.

    Returns:
        The HTML path.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    sections = []
    for name, study in (layer_studies or {}).items():
        # a file-safe prefix: "keras:vgg16" or a .keras path must not put ':' or '/' in file names
        sections.append({"name": name, **study_section(study, out, f"layers_{safe_name(name)}")})
    models_ctx: dict[str, Any] | None = None
    if model_study is not None:
        grid = _models_grid(model_study, out / "models_grid.png")
        models_ctx = {
            "rows": model_study.table(),
            "grid": grid.relative_to(out).as_posix(),
            "summary": models_summary(model_study),
        }
    doc = {
        **scrub_paths(dict(manifest or {})),  # the report folder gets shared: no machine paths in it
        "versions": environment_versions(),
        "layer_studies": {
            n: {"rows": s.table(), "recommended": s.recommended, "rule": s.rule, "step": s.step}
            for n, s in (layer_studies or {}).items()
        },
        "model_study": model_study.table() if model_study is not None else None,
    }
    (out / "study.json").write_text(dumps_strict(doc, indent=2, default=str) + "\n", encoding="utf-8")
    html = (
        environment()
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
    """Rows = (model, method) at the compared layer, columns = images; 11 pt labels and a colour bar."""
    cells = []
    for row in study.rows:
        exp = study.layer_studies[row.model].explanations.get(row.method, row.layer)
        cells.append((row, exp))
    n_img = len(study.image_names)
    fig, axes = plt.subplots(len(cells), n_img, figsize=(2.2 * n_img + 4.0, 2.2 * len(cells) + 0.4), squeeze=False)
    cmap = CAM_CMAP
    for r, (row, exp) in enumerate(cells):
        images = exp.images.numpy() if exp.images is not None else None
        for c in range(n_img):
            ax = axes[r, c]
            picture, cmap = _picture(images, c, exp.maps[c, 0].float().numpy(), row.method)
            ax.imshow(picture, cmap=cmap if images is None else None)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(study.image_names[c], fontsize=_LABEL_PT)
            if bool(exp.degenerate[c, 0]):
                _mark_degenerate(ax)
        label = f"{row.model}\n{row.method} @ {row.layer}" + ("\nRANDOM WEIGHTS" if row.random_weights else "")
        axes[r, 0].set_ylabel(label, fontsize=_LABEL_PT, rotation=0, ha="right", va="center")
    return _save_grid(fig, axes, cmap, path)
