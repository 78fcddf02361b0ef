"""Labelled datasets for runs: an image-folder tree or a CSV/Parquet table, with optional boxes.

Two layouts are read:

* **Image-folder tree**: ``DATASET/<class>/**/<image>``; every immediate subfolder is a class, its images
  are found recursively (by suffix, see :data:`cnnlens.data.IMAGE_EXTENSIONS`). A folder name is a class
  name of the model (exact, then case-insensitive), or a class index (``"3"``).
* **Table** (``.csv``, ``.parquet``/``.pq``): columns ``path`` and ``label``, optionally ``x0, y0, x1, y1``
  (a box in the original image's pixel coordinates, ``x`` to the right, ``y`` down, ``x1``/``y1`` exclusive;
  all four empty means no box for that row). Relative paths are relative to ``root`` (default: the table's
  folder). A label is a class name of the model or a class index.

The class-index order is the model's (its class-names file, or the names given with ``class_names``):
datasets never invent an order. Samples keep the dataset order (folders and files sorted by name, tables in
row order), so a run's shards are the same every time the same dataset is read.

Example:
    >>> ds = read_dataset("cifar_test/", ["airplane", "automobile", "bird"])  # doctest: +SKIP
    >>> ds.samples[0].label  # doctest: +SKIP
    0
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cnnlens.data import expand_paths
from cnnlens.outputs_dir import read_marker
from cnnlens.runs.errors import DatasetError

__all__ = ["Box", "Dataset", "Sample", "read_dataset", "resolve_label"]

Box = tuple[float, float, float, float]
"""``(x0, y0, x1, y1)`` in pixels, ``x1``/``y1`` exclusive."""

_TABLE_SUFFIXES: dict[str, Literal["csv", "parquet"]] = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
_BOX_COLUMNS = ("x0", "y0", "x1", "y1")
_SHOW = 5


@dataclass(frozen=True)
class Sample:
    """One labelled image of a dataset.

    Attributes:
        index: Position in the dataset (0-based); rows, shards and maps are keyed by it.
        path: The image file, as listed (joined with the tree or table root).
        label: The class index in the model's class order.
        box: An object box in original-image pixels, or None.
    """

    index: int
    path: str
    label: int
    box: Box | None = None


@dataclass(frozen=True)
class Dataset:
    """The samples of a dataset, in order, with where they came from.

    Attributes:
        kind: ``"folder"``, ``"csv"`` or ``"parquet"``.
        source: The dataset path as given.
        samples: The samples, in dataset order.
        class_names: The model's class names the labels index into.
        notes: Things worth telling the user (skipped files, empty class folders...).
    """

    kind: Literal["folder", "csv", "parquet"]
    source: str
    samples: list[Sample]
    class_names: list[str]
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)

    def limit(self, n: int | None) -> Dataset:
        """The first ``n`` samples (all of them for None)."""
        if n is None or n >= len(self.samples):
            return self
        if n < 1:
            raise DatasetError(f"--limit must be at least 1, got {n}.")
        return Dataset(self.kind, self.source, self.samples[:n], self.class_names, list(self.notes))

    def fingerprint(self) -> str:
        """A sha256 of the sample list (paths, labels, boxes): changes whenever the dataset does."""
        digest = hashlib.sha256()
        for s in self.samples:
            digest.update(json.dumps([s.path, s.label, list(s.box) if s.box else None]).encode("utf-8"))
            digest.update(b"\n")
        return digest.hexdigest()


def _class_lookup(class_names: Sequence[str]) -> tuple[dict[str, int], dict[str, int]]:
    exact: dict[str, int] = {}
    folded: dict[str, int] = {}
    for i, name in enumerate(class_names):
        exact.setdefault(name, i)
        folded.setdefault(name.casefold(), i)
    return exact, folded


def resolve_label(value: object, class_names: Sequence[str], *, where: str = "") -> int:
    """Turn a label (a class name or an index) into a class index of the model.

    Names are matched exactly first, then case-insensitively; otherwise a whole number (``3``, ``"3"``,
    ``3.0``) is an index. Booleans, NaN and empty values are refused.

    Args:
        value: The label as read (str, int or integral float).
        class_names: The model's class names, in index order.
        where: Where the label was read, for the error message (``"row 12 of labels.csv"``).

    Returns:
        The class index.

    Raises:
        DatasetError: Unknown name (with close matches) or index out of range.

    Example:
        >>> resolve_label("cat", ["dog", "cat"]), resolve_label(0, ["dog", "cat"]), resolve_label("1", ["a", "b"])
        (1, 0, 1)
    """
    at = f" ({where})" if where else ""
    n = len(class_names)
    if isinstance(value, bool) or value is None:
        raise DatasetError(f"label {value!r}{at} is not a class name or index; give one of the {n} classes.")
    if isinstance(value, str):
        text = value.strip()
        exact, folded = _class_lookup(class_names)
        if text in exact:
            return exact[text]
        if text.casefold() in folded:
            return folded[text.casefold()]
        if text.lstrip("+-").isdigit():
            value = int(text)
        else:
            close = difflib.get_close_matches(text, list(class_names), n=3, cutoff=0.6)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            shown = ", ".join(map(repr, class_names[:8])) + (", ..." if n > 8 else "")
            raise DatasetError(
                f"label {text!r}{at} is not a class name of the model.{hint} The model's classes are {shown}; "
                "pass --class-names FILE (one name per line, in the model's output order) if they are not the "
                "names your dataset uses."
            )
    if isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise DatasetError(f"label {value!r}{at} is not a class index (a whole number 0..{n - 1}).")
        value = int(value)
    if isinstance(value, int):
        if not 0 <= value < n:
            raise DatasetError(f"label index {value}{at} is out of range: the model has {n} classes (0..{n - 1}).")
        return value
    raise DatasetError(f"label {value!r}{at} has type {type(value).__name__}; give a class name or an index.")


def read_dataset(
    source: str | os.PathLike[str],
    class_names: Sequence[str],
    *,
    root: str | os.PathLike[str] | None = None,
    exclude: Sequence[str | os.PathLike[str]] = (),
) -> Dataset:
    """Read an image-folder tree or a CSV/Parquet table into a :class:`Dataset`.

    In a tree, cnnlens output is never read as images: folders in ``exclude`` (the run's own folder) and
    folders carrying a cnnlens marker are skipped, and so are symbolic-link loops and files of other types;
    each kind of skipped entry gets a line in :attr:`Dataset.notes`.

    Args:
        source: A folder (one subfolder per class) or a ``.csv``/``.parquet`` table (see the module docstring).
        class_names: The model's class names in index order; labels are resolved against them.
        root: For tables: the folder relative paths start from (default: the table's folder).
        exclude: Folders never read as part of a tree (e.g. the run folder when it lies inside the dataset).

    Returns:
        The dataset, samples in order.

    Raises:
        DatasetError: Missing source, unknown format, missing columns, bad labels or boxes, no images.
    """
    path = Path(source)
    if not path.exists():
        raise DatasetError(
            f"dataset {os.fspath(source)!r} does not exist; give a folder (one subfolder per class) or a "
            ".csv/.parquet table with columns path,label[,x0,y0,x1,y1]."
        )
    names = list(class_names)
    if path.is_dir():
        if root is not None:
            raise DatasetError("--root applies to tables only; an image-folder tree is read from its own folder.")
        return _read_tree(path, names, exclude)
    kind: Literal["csv", "parquet"] | None = _TABLE_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DatasetError(
            f"dataset {os.fspath(source)!r} is a file with suffix {path.suffix!r}; give a folder, a .csv or a "
            ".parquet table."
        )
    base = Path(root) if root is not None else path.parent
    records = _read_csv(path) if kind == "csv" else _read_parquet(path)
    return _from_records(records, kind, os.fspath(source), base, names)


def _read_tree(folder: Path, class_names: list[str], exclude: Sequence[str | os.PathLike[str]] = ()) -> Dataset:
    notes: list[str] = []
    try:
        entries = sorted(folder.iterdir(), key=lambda p: (p.name.casefold(), p.name))
    except OSError as exc:
        raise DatasetError(f"cannot list the dataset folder {str(folder)!r}: {exc.strerror or exc}.") from exc
    visible = [p for p in entries if not p.name.startswith(".")]
    excluded = {os.path.realpath(e) for e in exclude}
    root_marker = read_marker(folder)
    run_entries = (
        {"shards", "maps", "overlays", "report"} if root_marker and root_marker.get("kind") == "run" else set()
    )

    def is_output(p: Path) -> bool:
        """The run's folder, a run's own subfolders, or a marked folder whose name is not a class."""
        if os.path.realpath(p) in excluded or p.name in run_entries:
            return True
        if read_marker(p) is None:
            return False
        try:  # a class folder that also holds cnnlens output stays a class (its outputs are skipped inside)
            resolve_label(p.name, class_names)
        except DatasetError:
            return True
        return False

    outputs = [p for p in visible if p.is_dir() and is_output(p)]
    if outputs:
        notes.append(f"skipped {len(outputs)} cnnlens output folder(s): {', '.join(repr(p.name) for p in outputs)}")
    class_dirs = [p for p in visible if p.is_dir() and p not in outputs]
    loose = [p for p in visible if p.is_file()]
    unusable = [p for p in visible if not p.is_dir() and not p.is_file()]
    if loose:
        notes.append(f"{len(loose)} file(s) directly in {str(folder)!r} ignored: images must be in class subfolders")
    if unusable:
        notes.append(
            f"skipped {len(unusable)} entr(ies) that are neither folders nor files (symbolic-link loops, broken "
            f"links): {', '.join(repr(p.name) for p in unusable[:5])}"
        )
    if not class_dirs:
        raise DatasetError(
            f"dataset folder {str(folder)!r} has no class subfolders; put each class's images in a subfolder named "
            "after the class (DATASET/<class>/<image>), or give a .csv/.parquet table."
        )
    labels: dict[Path, int] = {}
    bad: list[str] = []
    for d in class_dirs:
        try:
            labels[d] = resolve_label(d.name, class_names, where=f"folder {d.name!r}")
        except DatasetError as exc:
            bad.append(str(exc))
    if bad:
        more = f" (and {len(bad) - _SHOW} more)" if len(bad) > _SHOW else ""
        raise DatasetError("\n".join(bad[:_SHOW]) + more)
    samples: list[Sample] = []
    for d in class_dirs:
        skipped: list[str] = []
        paths, _failures = expand_paths([d], recursive=True, exclude=exclude, notes=skipped)
        notes += [f"class folder {d.name!r}: {line}" for line in skipped]
        if not paths:
            notes.append(f"class folder {d.name!r} holds no image files")
        for p in paths:
            samples.append(Sample(len(samples), os.fspath(p), labels[d]))
    if not samples:
        raise DatasetError(f"dataset folder {str(folder)!r} holds no image files in its class subfolders.")
    return Dataset("folder", os.fspath(folder), samples, class_names, notes)


def _read_csv(path: Path) -> list[dict[str, Any]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            if reader.fieldnames is None:
                raise DatasetError(f"table {str(path)!r} is empty; it needs a header line path,label[,x0,y0,x1,y1].")
            return [dict(row) for row in reader]
    except UnicodeDecodeError as exc:
        raise DatasetError(f"table {str(path)!r} is not UTF-8 text ({exc}); save it as UTF-8 CSV.") from exc
    except csv.Error as exc:
        raise DatasetError(f"table {str(path)!r} is not valid CSV: {exc}.") from exc
    except OSError as exc:
        raise DatasetError(f"cannot read table {str(path)!r}: {exc.strerror or exc}.") from exc


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError...: all mean "not a readable table"
        raise DatasetError(f"cannot read Parquet table {str(path)!r}: {exc}.") from exc
    rows: list[dict[str, Any]] = table.to_pylist()
    return rows


def _number(value: object, where: str, column: str) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise DatasetError(f"{column} {value!r} ({where}) is not a number.")
    try:
        number = float(value) if isinstance(value, (int, float, str)) else math.nan
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise DatasetError(f"{column} {value!r} ({where}) is not a finite number; box coordinates are pixels.")
    return number


def _box(record: Mapping[str, Any], where: str) -> Box | None:
    values = [_number(record.get(c), where, c) for c in _BOX_COLUMNS]
    if all(v is None for v in values):
        return None
    if any(v is None for v in values):
        raise DatasetError(f"box ({where}) has only some of x0,y0,x1,y1; give all four or leave all four empty.")
    x0, y0, x1, y1 = (float(v) for v in values if v is not None)
    if not (x1 > x0 and y1 > y0):
        raise DatasetError(
            f"box ({where}) is empty: x0={x0:g}, y0={y0:g}, x1={x1:g}, y1={y1:g}; it needs x1 > x0 and y1 > y0 "
            "(pixels, x1/y1 exclusive)."
        )
    return (x0, y0, x1, y1)


def _from_records(
    records: list[dict[str, Any]], kind: Literal["csv", "parquet"], source: str, base: Path, class_names: list[str]
) -> Dataset:
    columns = set(records[0]) if records else set()
    if records:
        missing = [c for c in ("path", "label") if c not in columns]
        if missing:
            raise DatasetError(
                f"table {source!r} lacks column(s) {', '.join(missing)}; it has "
                f"{', '.join(sorted(columns)) or 'none'}. Needed: path,label; optional box: x0,y0,x1,y1."
            )
        partial = [c for c in _BOX_COLUMNS if c in columns]
        if partial and len(partial) != 4:
            raise DatasetError(f"table {source!r} has box column(s) {', '.join(partial)} but not all of x0,y0,x1,y1.")
    samples: list[Sample] = []
    problems: dict[str, list[str]] = {}  # message -> rows, so one bad label on many rows is reported once
    for i, record in enumerate(records):
        row = str(i + 2 if kind == "csv" else i)
        raw_path = record.get("path")
        if raw_path is None or not str(raw_path).strip():
            problems.setdefault("empty path", []).append(row)
            continue
        p = Path(str(raw_path).strip())
        full = p if p.is_absolute() else base / p
        try:
            label = resolve_label(record.get("label"), class_names)
            box = _box(record, f"row {row}")
        except DatasetError as exc:
            problems.setdefault(str(exc), []).append(row)
            continue
        samples.append(Sample(len(samples), os.fspath(full), label, box))
    if problems:
        lines = []
        for message, rows in list(problems.items())[:_SHOW]:
            shown = ", ".join(rows[:8]) + (f" and {len(rows) - 8} more" if len(rows) > 8 else "")
            lines.append(f"{message} [{'row' if len(rows) == 1 else 'rows'} {shown} of {Path(source).name}]")
        more = f"\n(and {len(problems) - _SHOW} more kinds of problem)" if len(problems) > _SHOW else ""
        raise DatasetError("\n".join(lines) + more)
    if not samples:
        raise DatasetError(f"table {source!r} has no rows; list one image per row (path,label).")
    seen: dict[str, int] = {}
    for s in samples:
        if s.path in seen:
            raise DatasetError(
                f"table {source!r} lists {s.path!r} twice (entries {seen[s.path]} and {s.index}); list each image once."
            )
        seen[s.path] = s.index
    return Dataset(kind, source, samples, class_names)
