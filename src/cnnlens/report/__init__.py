"""HTML reports (jinja2). Reports link only to files that exist next to them and open from disk."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape

__all__ = ["render_explain_report"]


def _env() -> Environment:
    """The jinja2 environment over the package templates (autoescaped HTML)."""
    return Environment(loader=PackageLoader("cnnlens.report", "templates"), autoescape=select_autoescape(["html"]))


def render_explain_report(
    directory: str | os.PathLike[str],
    *,
    title: str = "cnnlens explanations",
    subtitle: str = "",
    intro: str = "",
    manifest: Mapping[str, Any] | None = None,
    filename: str = "index.html",
) -> Path:
    """Render ``index.html`` for a folder written by ``ExplanationSet.save`` / ``cnnlens explain``.

    Args:
        directory: The output folder holding ``manifest.json`` and the images.
        title: Page title.
        subtitle: One line under the title.
        intro: Trusted HTML shown above the results (used by the demo).
        manifest: The manifest document; read from ``manifest.json`` when omitted.
        filename: Name of the HTML file.

    Returns:
        The path of the written HTML file.
    """
    root = Path(directory)
    doc = dict(manifest) if manifest is not None else json.loads((root / "manifest.json").read_text("utf-8"))
    results = doc.get("results", [])
    for r in results:  # link only what exists
        r["files"] = {k: v for k, v in r.get("files", {}).items() if (root / v).is_file()}
    top = {p["image"]: p.get("top", []) for p in doc.get("predictions", [])}
    images: dict[str, dict[str, Any]] = {}
    for r in results:
        images.setdefault(r["image"], {"name": r["image"], "top": top.get(r["image"], []), "results": []})
        images[r["image"]]["results"].append(r)
    for name, row in top.items():
        images.setdefault(name, {"name": name, "top": row, "results": []})
    model = doc.get("model", {})
    html = (
        _env()
        .get_template("explain.html")
        .render(
            title=title,
            subtitle=subtitle,
            intro=intro,
            model=model,
            random_weights=bool(model.get("random_weights")),
            methods=list(dict.fromkeys(r["title"] for r in results)),
            layers=list(dict.fromkeys(r["layer"] for r in results)),
            images=list(images.values()),
            failures=doc.get("failures", []),
            versions=doc.get("versions", {}),
            created=doc.get("created", ""),
        )
    )
    path = root / filename
    path.write_text(html, encoding="utf-8")
    return path
