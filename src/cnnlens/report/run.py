"""The error-analysis report of a run: ``RUN_DIR/report/index.html`` and ``report.json``.

Contents: accuracy and the confusion matrix, per-class accuracy, the most confused (true → predicted) pairs,
a gallery of misclassified images with the predicted-class and true-class maps side by side (most confident
mistakes first), per-class mean maps (the true-class map of every image of the class, averaged), and, when
the dataset has boxes, the share of map energy inside the box and the pointing accuracy for correct versus
wrong predictions. Error rows are listed with their reasons. The mean maps carry the colour bar of the other
reports (:func:`cnnlens.report.colorbar_html`).

The report folder is self-contained: the pictures it shows are copied into it, so it opens from disk (and can
be zipped and sent) on its own; it links only files that exist. ``report.json`` holds the same numbers for
programs. The folder carries a cnnlens marker listing the files it holds: a later report replaces exactly those
(see :mod:`cnnlens.outputs_dir`); a folder cnnlens did not write is refused unless ``overwrite=True``.

Labels drawn with matplotlib (class names in the confusion matrix) are plain text: dollar signs and backslashes in a
class name are shown as they are, never parsed as math text.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnnlens.imaging import colorize, save_png
from cnnlens.outputs_dir import claim_output_dir, read_marker
from cnnlens.report._env import environment
from cnnlens.runs.batch import Pair
from cnnlens.runs.errors import RunConfigError
from cnnlens.runs.store import atomic_write, derive_maps

__all__ = ["confusion", "render_run_report"]


def confusion(labels: Sequence[int], predictions: Sequence[int], classes: Sequence[int]) -> np.ndarray:
    """Confusion counts ``(len(classes), len(classes))``: row = true class, column = predicted class.

    Pairs whose classes are not in ``classes`` are left out.

    Example:
        >>> confusion([0, 0, 1], [0, 1, 1], [0, 1]).tolist()
        [[1, 1], [0, 1]]
    """
    pos = {c: i for i, c in enumerate(classes)}
    matrix = np.zeros((len(classes), len(classes)), dtype=np.int64)
    for t, p in zip(labels, predictions, strict=True):
        if t in pos and p in pos:
            matrix[pos[t], pos[p]] += 1
    return matrix


def _load(run_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    import pyarrow.parquet as pq

    run_json, results = run_dir / "run.json", run_dir / "results.parquet"
    if not run_json.is_file():
        raise RunConfigError(
            f"{str(run_dir)!r} is not a cnnlens run folder (no run.json); give the --out of `cnnlens run`."
        )
    if not results.is_file():
        raise RunConfigError(
            f"{str(run_dir)!r} has no results.parquet yet: the run has not finished. Run the same `cnnlens run` "
            "command again to complete it."
        )
    meta = json.loads(run_json.read_text("utf-8"))
    rows: list[dict[str, Any]] = pq.read_table(results).to_pylist()
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text("utf-8")) if summary_path.is_file() else {}
    return meta, rows, summary


def _confusion_png(matrix: np.ndarray, names: Sequence[str], path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(names)
    size = min(16.0, max(4.0, 0.35 * n + 2.0))
    fig = Figure(figsize=(size, size), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    rows = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, np.where(rows > 0, rows, 1), dtype=np.float64)
    ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    ticks = list(range(n))
    labels = [s if len(s) <= 18 else s[:17] + "…" for s in names]
    # Class names are data, not markup: no math text, so "$\\frac{a}{$" is drawn as typed instead of failing.
    ax.set_xticks(ticks, labels, rotation=90, fontsize=7 if n > 20 else 9, parse_math=False)
    ax.set_yticks(ticks, labels, fontsize=7 if n > 20 else 9, parse_math=False)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if n <= 25:
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if share[i, j] > 0.5 else "black")  # fmt: skip
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as fh:
        fig.savefig(fh, format="png")
    return path


_REPORT_ENTRIES = frozenset({"classes", "confusion.png", "gallery", "index.html", "report.json"})


def _legacy_report(folder: Path) -> bool:
    """A report of a cnnlens without markers: only a report's entries, and a report.json with a report's keys.

    Such a folder is reused (its same-named files replaced) but nothing in it is removed.
    """
    if not folder.is_dir() or read_marker(folder) is not None:
        return False
    entries = {p.name for p in folder.iterdir() if not p.name.startswith(".")}
    if not entries or not entries <= _REPORT_ENTRIES:
        return False
    try:
        doc = json.loads((folder / "report.json").read_text("utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and {"run_dir", "confusion", "gallery", "accuracy"} <= set(doc)


def _mean_of(values: Sequence[Any]) -> float | None:
    present = [float(v) for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _copy(run_dir: Path, rel: str | None, out: Path, sub: str) -> str | None:
    """Copy ``run_dir/rel`` into ``out/sub/`` and return its path relative to ``out`` (None if missing)."""
    if not rel:
        return None
    src = run_dir / rel
    if not src.is_file():
        return None
    dest = out / sub / rel.replace("/", "_")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    return dest.relative_to(out).as_posix()


def _mean_maps(
    run_dir: Path,
    rows: Sequence[Mapping[str, Any]],
    pairs: Sequence[Pair],
    classes: Sequence[int],
    size: tuple[int, int],
) -> dict[str, dict[int, tuple[np.ndarray, int]]]:
    """Per pair and class: the mean true-class map (slot 0 where right, slot 1 where wrong) and the count."""
    wanted = set(classes)
    by_shard: dict[int, list[Mapping[str, Any]]] = defaultdict(list)
    for row in rows:
        if row["status"] == "ok" and row["label"] in wanted:
            by_shard[int(row["shard"])].append(row)
    out: dict[str, dict[int, tuple[np.ndarray, int]]] = {}
    for pair in pairs:
        sums: dict[int, np.ndarray] = {}
        counts: Counter[int] = Counter()
        for _shard, members in sorted(by_shard.items()):
            rel = members[0].get(pair.col("maps_file"))
            if not rel or not (run_dir / rel).is_file():
                continue
            raw = np.load(run_dir / rel, allow_pickle=False)
            pick = np.stack([raw[int(r["maps_row"]), 0 if r["correct"] else 1] for r in members])
            maps, _ = derive_maps(torch.from_numpy(pick), pair.variant, size)
            arr = maps.numpy().astype(np.float64)
            for r, m in zip(members, arr, strict=True):
                label = int(r["label"])
                if label in sums:
                    sums[label] += m
                else:
                    sums[label] = m.copy()
                counts[label] += 1
        out[pair.key] = {c: (sums[c] / counts[c], counts[c]) for c in sums}
    return out


def _per_class(
    ok: Sequence[Mapping[str, Any]], shown_classes: Sequence[int], name: Callable[[int], str]
) -> list[dict[str, Any]]:
    """Per shown class: images, correct, accuracy and the class it is most often mistaken for."""
    per_class = []
    for c in shown_classes:
        members = [r for r in ok if int(r["label"]) == c]
        mistakes = Counter(int(r["prediction"]) for r in members if not r["correct"])
        top_wrong = mistakes.most_common(1)
        per_class.append(
            {
                "class": c,
                "name": name(c),
                "n": len(members),
                "correct": sum(1 for r in members if r["correct"]),
                "accuracy": sum(1 for r in members if r["correct"]) / len(members),
                "most_confused_with": name(top_wrong[0][0]) if top_wrong else None,
                "most_confused_count": top_wrong[0][1] if top_wrong else 0,
            }
        )

    return per_class


def _confused_pairs(
    wrong: Sequence[Mapping[str, Any]], label_counts: Mapping[int, int], name: Callable[[int], str]
) -> list[dict[str, Any]]:
    """The 15 most frequent (true -> predicted) mistakes with their share of the true class."""
    pair_counts = Counter((int(r["label"]), int(r["prediction"])) for r in wrong)
    return [
        {
            "true": t,
            "true_name": name(t),
            "predicted": p,
            "predicted_name": name(p),
            "count": n,
            "share_of_true": n / label_counts[t] if label_counts[t] else 0.0,
        }
        for (t, p), n in sorted(pair_counts.items(), key=lambda kv: (-kv[1], kv[0]))[:15]
    ]


def _gallery(
    root: Path, target: Path, wrong: Sequence[Mapping[str, Any]], pairs: Sequence[Pair], gallery: int
) -> list[dict[str, Any]]:
    """The most confident mistakes, their pictures copied into the report folder."""
    gallery_rows = sorted(wrong, key=lambda r: (-float(r["prob_prediction"] or 0.0), int(r["index"])))[
        : max(0, gallery)
    ]
    gallery_items = []
    for r in gallery_rows:
        maps = []
        for pair in pairs:
            maps.append(
                {
                    "method": pair.method,
                    "layer": pair.layer,
                    "pred": _copy(root, r.get(pair.col("overlay_pred")), target, "gallery"),
                    "true": _copy(root, r.get(pair.col("overlay_true")), target, "gallery"),
                    "avg_drop_pred": r.get(pair.col("avg_drop_pred")),
                    "avg_drop_true": r.get(pair.col("avg_drop_true")),
                    "energy_pred": r.get(pair.col("energy_in_box_pred")),
                    "energy_true": r.get(pair.col("energy_in_box_true")),
                }
            )
        gallery_items.append(
            {
                "index": int(r["index"]),
                "path": r["path"],
                "label_name": r["label_name"],
                "prediction_name": r["prediction_name"],
                "prob_prediction": float(r["prob_prediction"]),
                "prob_label": float(r["prob_label"]),
                "image": _copy(root, r.get("image_file"), target, "gallery"),
                "maps": maps,
            }
        )

    return gallery_items


def _class_maps(
    root: Path,
    target: Path,
    rows: Sequence[Mapping[str, Any]],
    pairs: Sequence[Pair],
    shown_classes: Sequence[int],
    size: tuple[int, int],
    cmap: str,
    name: Callable[[int], str],
) -> tuple[list[dict[str, Any]], list[str]]:
    """Per pair: the per-class mean maps written as PNGs; returns (template groups, written files)."""
    mean_maps = _mean_maps(root, rows, pairs, shown_classes, size)
    class_maps = []
    class_files: list[str] = []
    for pair in pairs:
        cells = []
        for c in shown_classes:
            if c not in mean_maps.get(pair.key, {}):
                continue
            mean, count = mean_maps[pair.key][c]
            rel = f"classes/{pair.key}/class-{c:05d}.png"
            save_png(target / rel, colorize(np.clip(mean, 0.0, 1.0), cmap))
            class_files.append(rel)
            cells.append({"class": c, "name": name(c), "count": count, "file": rel})
        class_maps.append({"method": pair.method, "layer": pair.layer, "cells": cells})

    return class_maps, class_files


def _box_rows(
    ok: Sequence[Mapping[str, Any]], wrong: Sequence[Mapping[str, Any]], pairs: Sequence[Pair]
) -> list[dict[str, Any]]:
    """Per pair: box energy and pointing accuracy, correct versus wrong predictions (when the data has boxes)."""
    box_rows = []
    if any(r.get("box") is not None for r in ok):
        for pair in pairs:
            right = [r for r in ok if r["correct"]]
            box_rows.append(
                {
                    "method": pair.method,
                    "layer": pair.layer,
                    "n_correct": sum(1 for r in right if r.get(pair.col("energy_in_box_pred")) is not None),
                    "n_wrong": sum(1 for r in wrong if r.get(pair.col("energy_in_box_pred")) is not None),
                    "energy_correct": _mean_of([r.get(pair.col("energy_in_box_pred")) for r in right]),
                    "energy_wrong_pred": _mean_of([r.get(pair.col("energy_in_box_pred")) for r in wrong]),
                    "energy_wrong_true": _mean_of([r.get(pair.col("energy_in_box_true")) for r in wrong]),
                    "pointing_correct": _mean_of([r.get(pair.col("pointing_pred")) for r in right]),
                    "pointing_wrong_pred": _mean_of([r.get(pair.col("pointing_pred")) for r in wrong]),
                }
            )

    return box_rows


def _shown_classes(
    ok: Sequence[Mapping[str, Any]], label_counts: Mapping[int, int], max_classes: int
) -> tuple[list[int], list[int]]:
    """The classes of the tables and mean maps (the most frequent labels), and of the matrix (plus predictions)."""
    frequent = [c for c, _ in sorted(label_counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    predicted = Counter(int(r["prediction"]) for r in ok)
    shown_classes = sorted(frequent[:max_classes])
    extra_pred = [c for c, _ in predicted.most_common() if c not in shown_classes]
    return shown_classes, sorted(shown_classes + extra_pred[: max(0, max_classes - len(shown_classes))])


def _gallery_files(gallery_items: Sequence[Mapping[str, Any]]) -> list[str]:
    """The files the gallery copied into the report folder, in gallery order."""
    written: list[str] = []
    for item in gallery_items:
        written += [item["image"]] if item["image"] else []
        written += [m[k] for m in item["maps"] for k in ("pred", "true") if m[k]]
    return written


def render_run_report(
    run_dir: str | os.PathLike[str],
    *,
    out: str | os.PathLike[str] | None = None,
    gallery: int = 48,
    max_classes: int = 40,
    cmap: str = "jet",
    overwrite: bool = False,
) -> Path:
    """Write the error-analysis report of a finished run.

    Args:
        run_dir: The run folder (``cnnlens run --out``).
        out: Where the report goes (default ``RUN_DIR/report``). A previous report there (its cnnlens marker
            lists its files) is replaced file by file: only the files it lists are removed. A non-empty folder
            without a marker, or with another kind of cnnlens output, is refused.
        gallery: How many misclassified images to show (most confident mistakes first).
        max_classes: Classes shown in the per-class tables, mean maps and the matrix (the most frequent ones).
        cmap: Colour map of the mean maps.
        overwrite: Write into a folder cnnlens did not write (replacing only same-named files, deleting nothing).

    Returns:
        The path of ``index.html``.

    Raises:
        RunConfigError: Not a run folder, or the run has not finished.
        OutputFolderError: ``out`` holds files cnnlens did not write (and ``overwrite`` is False).
    """
    root = Path(run_dir)
    meta, rows, summary = _load(root)
    names: list[str] = list(meta.get("class_names", []))
    pairs = [Pair(p["method"], p["layer"], p.get("variant", {}), p["key"]) for p in meta.get("pairs", [])]
    size = tuple(int(v) for v in meta.get("input_size", [224, 224]))
    target = Path(out) if out is not None else root / "report"
    owned = claim_output_dir(target, "report", overwrite=overwrite, legacy=_legacy_report(target))
    if owned.reused:
        owned.remove_listed()  # the previous report's files, exactly those its marker lists
        owned.save()

    def name(c: int) -> str:
        return names[c] if 0 <= c < len(names) else str(c)

    ok = [r for r in rows if r["status"] == "ok"]
    wrong = [r for r in ok if not r["correct"]]
    errors = [r for r in rows if r["status"] != "ok"]
    accuracy = (len(ok) - len(wrong)) / len(ok) if ok else None

    label_counts = Counter(int(r["label"]) for r in ok)
    shown_classes, matrix_classes = _shown_classes(ok, label_counts, max_classes)
    matrix = confusion([int(r["label"]) for r in ok], [int(r["prediction"]) for r in ok], matrix_classes)
    confusion_png = None
    if matrix_classes:
        confusion_png = _confusion_png(matrix, [name(c) for c in matrix_classes], target / "confusion.png")

    gallery_items = _gallery(root, target, wrong, pairs, gallery)
    class_maps, class_files = _class_maps(root, target, rows, pairs, shown_classes, (size[0], size[-1]), cmap, name)
    data = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run_dir": str(root),
        "total": len(rows),
        "ok": len(ok),
        "errors": len(errors),
        "correct": len(ok) - len(wrong),
        "accuracy": accuracy,
        "confusion": {"classes": matrix_classes, "names": [name(c) for c in matrix_classes], "matrix": matrix.tolist()},
        "per_class": _per_class(ok, shown_classes, name),
        "confused_pairs": _confused_pairs(wrong, label_counts, name),
        "box_energy": _box_rows(ok, wrong, pairs),
        "gallery": gallery_items,
        "error_rows": [{"path": r["path"], "reason": r["error"]} for r in errors],
        "pairs": [{"method": p.method, "layer": p.layer} for p in pairs],
    }
    with atomic_write(target / "report.json", "w") as fh:
        fh.write(json.dumps(data, indent=2, allow_nan=False) + "\n")
    written = ["report.json", *(["confusion.png"] if confusion_png is not None else []), *_gallery_files(gallery_items)]
    written += class_files

    model = meta.get("model", {})
    html = (
        environment()
        .get_template("run_report.html")
        .render(
            data=data,
            model=model,
            random_weights=bool(model.get("random_weights")),
            summary=summary,
            source=meta.get("dataset_source", ""),
            confusion_png="confusion.png" if confusion_png is not None else None,
            matrix_table=len(matrix_classes) <= 20,
            class_maps=class_maps,
            cmap=cmap,
            total_wrong=len(wrong),
            small=max(size) < 96,
        )
    )
    index = target / "index.html"
    with atomic_write(index, "w") as fh:
        fh.write(html)
    owned.record([*written, "index.html"])
    owned.save()
    return index
