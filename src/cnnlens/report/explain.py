"""The explain index: ``index.html`` of a folder written by ``ExplanationSet.save`` / ``cnnlens explain``."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cnnlens.display import CAM_CMAP, describe_preprocessing, method_traits, public_path, scrub_paths
from cnnlens.report._env import environment

__all__ = ["render_explain_report"]


def _shown_results(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The results of one image as shown, without repeats.

    An input-level map once per (method, target) rather than once per listed layer; a class-independent map
    once per (method, layer) rather than once per target.
    """
    shown: list[dict[str, Any]] = []
    seen: set[tuple[Any, ...]] = set()
    for r in results:
        traits = method_traits(str(r.get("method", "")))
        if r.get("input_level", traits.input_level):
            key: tuple[Any, ...] = ("input", r.get("method"), r.get("target"), repr(r.get("variant")))
        elif r.get("class_independent", traits.class_independent):
            key = ("class-free", r.get("method"), r.get("layer"), repr(r.get("variant")))
            r = {**r, "target": "any class (the map does not depend on it)"}
        else:
            shown.append(r)
            continue
        if key not in seen:
            seen.add(key)
            shown.append(r)
    return shown


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
    for image in images.values():
        image["results"] = _shown_results(image["results"])
    model = scrub_paths(doc.get("model", {}))  # no machine paths in a page that gets shared
    failures = [{**f, "path": public_path(str(f.get("path", "")))} for f in doc.get("failures", [])]
    methods = list(dict.fromkeys(_method_label(r) for r in results))
    html = (
        environment()
        .get_template("explain.html")
        .render(
            title=title,
            subtitle=subtitle,
            intro=intro,
            model=model,
            preprocessing=describe_preprocessing(model.get("preprocessing")),
            random_weights=bool(model.get("random_weights")),
            methods=methods,
            layers=list(dict.fromkeys(r["layer"] for r in results if not _input_level(r))),
            scales=_colour_scales(results),
            images=list(images.values()),
            failures=failures,
            versions=doc.get("versions", {}),
            created=doc.get("created", ""),
        )
    )
    path = root / filename
    path.write_text(html, encoding="utf-8")
    return path


def _input_level(result: Mapping[str, Any]) -> bool:
    return bool(result.get("input_level", method_traits(str(result.get("method", ""))).input_level))


def _method_label(result: Mapping[str, Any]) -> str:
    opts = ", ".join(f"{k}={v}" for k, v in (result.get("options") or {}).items())
    return f"{result['title']} ({opts})" if opts else str(result["title"])


def _colour_scales(results: list[dict[str, Any]]) -> list[dict[str, str]]:
    """One legend entry per (colour map, kind of map) used on the page."""
    seen: dict[tuple[str, bool], dict[str, str]] = {}
    for r in results:
        sparse = method_traits(str(r.get("method", ""))).sparse
        cmap = str(r.get("cmap", CAM_CMAP))
        if (cmap, sparse) in seen:
            continue
        if sparse:
            what = "pixel attributions, drawn over the photo with opacity rising with the value"
            high = "1 = the map's 99th percentile (brighter pixels clipped)"
        else:
            what = "class-activation maps"
            high = "1 = the map's maximum in its image"
        seen[(cmap, sparse)] = {"cmap": cmap, "high": high, "label": f"{what} ({cmap})"}
    return list(seen.values())
