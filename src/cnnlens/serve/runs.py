"""The run view: finished ``cnnlens run`` folders handed to the server at start, read, never recomputed.

A run is known by an id derived from its folder (a hash, never the path itself); a row by its dataset index
(digits only, checked against the run's table). The files served are only those the run's own table names
(``image_file``, the overlay columns, ``maps_file``), resolved inside the run folder and checked to stay in
it; maps the run did not store as pictures are drawn from its stored raw maps (the ``maps/`` array store),
never recomputed. Correct rows have no stored picture of the image: it is read from the dataset file the row
names when that file still exists (through the same decoder and pixel limit as uploads).
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from cnnlens.data.images import load_image
from cnnlens.errors import CnnlensError
from cnnlens.imaging import colorize, overlay
from cnnlens.runs.results import RunResults, open_results
from cnnlens.serve.config import ApiError, not_found

__all__ = ["RunCatalog", "ServedRun"]

_ROW_ID = re.compile(r"^[0-9]{1,12}$")


def _inside(root: Path, rel: str | None) -> Path | None:
    """``root / rel`` if it is a file inside ``root`` (no ``..``, no absolute path, no link out), else None."""
    if not rel or os.path.isabs(rel) or "\\" in rel or ".." in Path(rel).parts:
        return None
    path = (root / rel).resolve()
    try:
        path.relative_to(root.resolve())
    except ValueError:
        return None
    return path if path.is_file() else None


class ServedRun:
    """One run folder, opened at start (its table kept in memory as Python rows)."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.root = Path(folder).resolve()
        self.id = hashlib.sha256(str(self.root).encode()).hexdigest()[:12]
        self.name = self.root.name
        self.results: RunResults = open_results(self.root)
        self.rows: list[dict[str, Any]] = self.results.table.to_pylist()
        self.by_index = {int(r["index"]): k for k, r in enumerate(self.rows)}
        self._lock = threading.Lock()

    def summary(self) -> dict[str, Any]:
        """``GET /api/runs/{id}``: accuracy, confusion matrix, classes, pairs."""
        names = self.results.class_names
        k = len(names)
        confusion = [[0] * k for _ in range(k)]
        ok = [r for r in self.rows if r.get("status") == "ok"]
        labelled = [r for r in ok if r.get("label") is not None and 0 <= int(r["label"]) < k]
        for r in labelled:
            pred = r.get("prediction")
            if pred is not None and 0 <= int(pred) < k:
                confusion[int(r["label"])][int(pred)] += 1
        correct = sum(1 for r in labelled if r.get("correct"))
        model = self.results.config.get("model", {})
        return {
            "run_id": self.id,
            "name": self.name,
            "model": model.get("name", "") if isinstance(model, dict) else str(model),
            "accuracy": correct / len(labelled) if labelled else None,
            "n": len(self.rows),
            "errors": len(self.rows) - len(ok),
            "classes": list(names),
            "confusion": confusion,
            "methods": sorted({p.method for p in self.results.pairs}),
            "layers": sorted({p.layer for p in self.results.pairs}),
            "pairs": [{"key": p.key, "method": p.method, "layer": p.layer} for p in self.results.pairs],
        }

    def images(self, which: str, true: int | None, pred: int | None, offset: int, limit: int) -> dict[str, Any]:
        """``GET /api/runs/{id}/images``: filtered rows, one page.

        Raises:
            ApiError: Bad filter, offset or limit (400).
        """
        if which not in ("all", "correct", "incorrect"):
            raise ApiError("bad_filter", f"filter must be all, correct or incorrect, got {which!r}.", "use all.")
        if offset < 0 or not 1 <= limit <= 500:
            raise ApiError("bad_page", f"need offset >= 0 and limit in 1..500, got {offset}, {limit}.", "limit=50.")
        names = self.results.class_names
        rows = []
        for r in self.rows:
            if which != "all" and (r.get("status") != "ok" or bool(r.get("correct")) != (which == "correct")):
                continue
            if true is not None and r.get("label") != true:
                continue
            if pred is not None and r.get("prediction") != pred:
                continue
            rows.append(r)
        page = rows[offset : offset + limit]

        def name_of(index: Any) -> str | None:
            return names[int(index)] if index is not None and 0 <= int(index) < len(names) else None

        return {
            "total": len(rows),
            "rows": [
                {
                    "row_id": str(int(r["index"])),
                    "name": os.path.basename(str(r.get("path") or "")),
                    "true_index": r.get("label"),
                    "true_name": r.get("label_name") or name_of(r.get("label")),
                    "pred_index": r.get("prediction"),
                    "pred_name": r.get("prediction_name") or name_of(r.get("prediction")),
                    "score": r.get("prob_prediction"),
                    "correct": bool(r.get("correct")) if r.get("status") == "ok" else False,
                    "status": r.get("status"),
                    "error": r.get("error"),
                }
                for r in page
            ],
        }

    def row(self, row_id: str) -> dict[str, Any]:
        """The row of ``row_id`` (digits only, an index of this run).

        Raises:
            ApiError: Anything else (404): traversal attempts never reach the file system.
        """
        if not _ROW_ID.match(row_id) or int(row_id) not in self.by_index:
            raise not_found("row", row_id, "use a row_id from GET /api/runs/{run_id}/images.")
        return self.rows[self.by_index[int(row_id)]]

    def original(self, row_id: str, max_pixels: int) -> NDArray[np.uint8]:
        """The image of a row: the run's stored picture, else the dataset file the row names (if it still exists).

        Raises:
            ApiError: ``not_stored`` (404) when neither is available.
        """
        row = self.row(row_id)
        stored = _inside(self.root, row.get("image_file"))
        candidates: list[Path] = [stored] if stored is not None else []
        source = row.get("path")
        if source:
            base = Path(str(self.results.config.get("dataset_source", "")))
            near = self.root.parent
            for path in (Path(str(source)), near / str(source), near / base / str(source), base / str(source)):
                if path.is_file():
                    candidates.append(path)
                    break
        for path in candidates:
            try:
                return load_image(path, max_pixels=max_pixels)
            except CnnlensError:
                continue
        raise ApiError(
            "not_stored",
            f"row {row_id} of run {self.name!r} has no stored picture and its image file is gone.",
            "re-run `cnnlens run` with the dataset in place.",
            status=404,
        )

    def _pair(self, key: str | None) -> Any:
        pairs = self.results.pairs
        if key is None:
            return pairs[0] if pairs else None
        for pair in pairs:
            if pair.key == key:
                return pair
        raise not_found("method/layer pair", key, f"use one of: {', '.join(p.key for p in pairs)}.")

    def map_picture(self, row_id: str, which: str, pair_key: str | None, max_pixels: int) -> NDArray[np.uint8] | Path:
        """The stored overlay of a row's predicted- or true-class map (a file), else one drawn from its stored map.

        Raises:
            ApiError: ``not_stored`` (404) when the run stored neither.
        """
        if which not in ("pred", "true"):
            raise not_found("map", which, "use pred or true.")
        row = self.row(row_id)
        pair = self._pair(pair_key)
        if pair is None:
            raise ApiError("not_stored", "this run stored no maps.", "run `cnnlens run` with a method.", status=404)
        stored = _inside(self.root, row.get(pair.col(f"overlay_{which}")))
        if stored is not None:
            return stored
        with self._lock:  # np.load of a shared memory map
            try:
                pred_map, true_map = self.results.maps(self.by_index[int(row_id)], pair.method, pair.layer)
            except (OSError, ValueError, KeyError, IndexError):
                pred_map, true_map = None, None
        chosen = pred_map if which == "pred" or (true_map is None and row.get("correct")) else true_map
        if chosen is None:
            raise ApiError(
                "not_stored",
                f"run {self.name!r} stored no {which}-class map for row {row_id} ({pair.key}).",
                "error rows have no maps; pick another image.",
                status=404,
            )
        try:
            image = self.original(row_id, max_pixels)
        except ApiError:
            return colorize(chosen.astype(np.float32), "jet")
        if image.shape[:2] != chosen.shape[:2]:
            from PIL import Image

            image = np.asarray(Image.fromarray(image).resize((chosen.shape[1], chosen.shape[0])))
        return overlay(image, chosen.astype(np.float32), alpha=0.5, cmap="jet")


def is_run_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a finished ``cnnlens run`` (its ``run.json`` and ``results.parquet``)."""
    return (folder / "run.json").is_file() and (folder / "results.parquet").is_file()


class RunCatalog:
    """The run folders handed to the server at start, by id: each ``--run`` is a run folder or a folder of runs.

    A folder of runs (one that is not itself a run) offers every finished run directly inside it, so the page can
    open runs made there later (:meth:`rescan`) without the server ever taking a path from a request.
    """

    def __init__(self, folders: Sequence[str | os.PathLike[str]]) -> None:
        self.runs: dict[str, ServedRun] = {}
        self.roots: list[Path] = []
        self._lock = threading.RLock()
        for folder in folders:
            root = Path(folder).resolve()
            if is_run_folder(root) or not root.is_dir():
                self._open(root, strict=True)
                continue
            self.roots.append(root)
            found = self._scan(root)
            if not found and not (root / "run.json").is_file():
                raise ApiError(
                    "bad_config",
                    f"{str(folder)!r} is neither a finished cnnlens run folder nor a folder holding any.",
                    "pass the --out folder of a finished `cnnlens run`, or the folder that holds such folders.",
                )
            if not found:
                self._open(root, strict=True)  # a run.json without results: the run's own message says why

    def _open(self, folder: Path, *, strict: bool) -> ServedRun | None:
        try:
            run = ServedRun(folder)
        except CnnlensError as exc:
            if strict:
                raise ApiError("bad_config", str(exc), "pass the --out folder of a finished `cnnlens run`.") from exc
            return None
        self.runs.setdefault(run.id, run)
        return run

    def _scan(self, root: Path) -> list[ServedRun]:
        """The finished runs directly inside ``root`` (opened once; a broken one is skipped)."""
        known = {run.root for run in self.runs.values()}
        found: list[ServedRun] = []
        for child in sorted(root.iterdir()):
            if not child.is_dir() or child.is_symlink() or not is_run_folder(child):
                continue
            if child.resolve() in known:
                found.append(next(r for r in self.runs.values() if r.root == child.resolve()))
                continue
            run = self._open(child, strict=False)
            if run is not None:
                found.append(run)
        return found

    def rescan(self) -> list[dict[str, Any]]:
        """``POST /api/runs/rescan``: open the runs finished since start inside the folders of runs given."""
        with self._lock:
            for root in self.roots:
                if root.is_dir():
                    self._scan(root)
        return self.listing()

    def __getitem__(self, run_id: str) -> ServedRun:
        """The run of ``run_id``.

        Raises:
            ApiError: Unknown id (404).
        """
        run = self.runs.get(run_id)
        if run is None:
            raise not_found("run", run_id, "use a run id from GET /api/info (runs given with --run at start).")
        return run

    def listing(self) -> list[dict[str, Any]]:
        """``runs`` of ``GET /api/info``."""
        with self._lock:
            return [{"id": r.id, "name": r.name, "images": len(r.rows)} for r in self.runs.values()]
