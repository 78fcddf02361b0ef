"""Turn files and folders into a flat list of image paths, never reading cnnlens output back as input.

Example:
    >>> paths, failures = expand_paths(["photos/"], recursive=True)  # doctest: +SKIP
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cnnlens.data.pixels import IMAGE_EXTENSIONS
from cnnlens.outputs_dir import MARKER, owned_paths

__all__ = ["ImageFailure", "expand_paths"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageFailure:
    """An input that could not be turned into an image.

    Attributes:
        path: The path as given (or as found while expanding a directory).
        reason: A readable explanation, including what to do about it.
    """

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def expand_paths(
    inputs: Sequence[str | os.PathLike[str]],
    *,
    recursive: bool = False,
    exclude: Sequence[str | os.PathLike[str]] = (),
    notes: list[str] | None = None,
) -> tuple[list[Path], list[ImageFailure]]:
    """Turn files and directories into a flat list of image paths.

    Files are kept as given, whatever their extension (a non-image fails later, in :func:`load_image`,
    with a clear message). A directory expands to the files in it whose suffix is in
    :data:`IMAGE_EXTENSIONS` (case-insensitive), sorted by name (case-insensitively); with ``recursive``
    its subdirectories are walked too (sorted by relative path; symlinked directories are not
    followed). Hidden files and directories (name starting with ``.``) found while expanding are
    skipped. Duplicates (same resolved path) are removed, keeping the first occurrence.

    cnnlens output is never read back as input: a folder in ``exclude`` (e.g. the ``--out`` folder) or
    carrying a cnnlens marker (:data:`cnnlens.outputs_dir.MARKER`) found inside a given directory is skipped
    whole; in a given directory that is itself cnnlens output, the files its marker lists are skipped. Entries
    that cannot be used (a symbolic-link loop, a broken link, a symbolic link to a folder, which is not
    followed, a file of another type such as ``.svg``) are skipped too, each with a note.

    Args:
        inputs: Files and directories.
        recursive: Also walk subdirectories of the given directories.
        exclude: Folders whose contents are never listed (output folders).
        notes: When given, one line per kind of skipped entry is appended to it (what, how many, examples).

    Returns:
        ``(paths, failures)``: the image paths in order, and an :class:`ImageFailure` for each input
        that does not exist, cannot be listed, or is a directory with no image file in it.
    """
    paths: list[Path] = []
    failures: list[ImageFailure] = []
    seen: set[Path] = set()
    skipped = _Skipped()
    excluded = {_resolved(Path(e)) for e in exclude}
    for item in inputs:
        found = _expand_one(item, recursive=recursive, excluded=excluded, skipped=skipped)
        if isinstance(found, ImageFailure):
            failures.append(found)
            continue
        for candidate in found:
            key = _resolved(candidate)
            if key not in seen:
                seen.add(key)
                paths.append(candidate)
    if notes is not None:
        notes.extend(skipped.lines())
    for line in skipped.lines():
        logger.info("%s", line)
    return paths, failures


def _expand_one(
    item: str | os.PathLike[str], *, recursive: bool, excluded: set[Path], skipped: _Skipped
) -> list[Path] | ImageFailure:
    """One input of :func:`expand_paths`: itself (a file), its image files (a folder), or why neither."""
    given = Path(item)
    label = os.fspath(item)
    try:
        exists = given.exists()
    except OSError as exc:
        return ImageFailure(label, f"cannot access the path ({exc.strerror or exc})")
    if not exists:
        broken = given.is_symlink()
        return ImageFailure(
            label,
            "is a broken symbolic link; fix or remove the link"
            if broken
            else "no such file or directory; check the path",
        )
    if not given.is_dir():
        return [given]
    try:
        found, has_subdirs = _list_directory(given, recursive=recursive, excluded=excluded, skipped=skipped)
    except OSError as exc:
        return ImageFailure(label, f"cannot list the directory ({exc.strerror or exc}); check permissions")
    if not found:
        reason = f"directory contains no image files (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})"
        if has_subdirs and not recursive:
            reason += "; it has subdirectories: expand recursively to include them"
        return ImageFailure(label, reason)
    return found


class _Skipped:
    """Entries skipped while listing folders, grouped by reason, for one note per reason."""

    def __init__(self) -> None:
        self.by_reason: dict[str, list[str]] = {}

    def add(self, reason: str, path: Path) -> None:
        self.by_reason.setdefault(reason, []).append(os.fspath(path))

    def lines(self) -> list[str]:
        out = []
        for reason, items in self.by_reason.items():
            shown = ", ".join(repr(p) for p in items[:3]) + (f" and {len(items) - 3} more" if len(items) > 3 else "")
            out.append(f"skipped {len(items)} {reason}: {shown}")
        return out


def _not_images_reason(names: Sequence[str]) -> str:
    return "file(s) that are not images cnnlens reads (" + ", ".join(sorted(set(names))) + ")"


def _resolved(path: Path) -> Path:
    """Return a canonical form of ``path`` for duplicate detection."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # symlink loops and the like
        return Path(os.path.abspath(path))


def _entry_kind(path: Path) -> str:
    """``"dir"``, ``"file"``, ``"dirlink"`` (a symbolic link to a folder), ``"loop"``, ``"broken"`` or ``"other"``."""
    try:
        st = os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "loop"
        return "broken" if os.path.islink(path) else "other"
    if stat.S_ISDIR(st.st_mode):
        return "dirlink" if os.path.islink(path) else "dir"
    return "file" if stat.S_ISREG(st.st_mode) else "other"


_SKIP_REASONS = {
    "loop": "symbolic link loop(s)",
    "broken": "broken symbolic link(s)",
    "dirlink": "symbolic link(s) to folders (not followed)",
    "other": "entries that are not regular files (devices, pipes, sockets)",
}


def _list_directory(
    directory: Path,
    *,
    recursive: bool,
    excluded: set[Path] | None = None,
    skipped: _Skipped | None = None,
) -> tuple[list[Path], bool]:
    """List the non-hidden image files of ``directory`` sorted by relative path; say if it has subdirs.

    Skipped entries (see :func:`expand_paths`) are recorded in ``skipped``; cnnlens output is left out.
    """
    found: list[tuple[tuple[tuple[str, str], ...], Path]] = []
    has_subdirs = False
    excluded = excluded or set()
    skipped = skipped if skipped is not None else _Skipped()
    own_files, own_patterns = owned_paths(directory)
    top_is_output = bool(own_files or own_patterns) or _resolved(directory) in excluded

    def own(rel: Path) -> bool:
        text = rel.as_posix()
        return text in own_files or any(p.fullmatch(text) for p in own_patterns)

    def output_folder(folder: Path) -> bool:
        return (folder / MARKER).is_file() or _resolved(folder) in excluded

    other: list[str] = []
    other_paths: list[Path] = []

    def consider(candidate: Path, name: str, rel: Path) -> str:
        """Record an image file in ``found``; returns the entry's kind."""
        kind = _entry_kind(candidate)
        if kind == "file":
            if top_is_output and own(rel):
                return kind
            if _is_image_name(name):
                found.append((_sort_key(rel.parts), candidate))
            else:
                other.append(os.path.splitext(name)[1].lower() or "no suffix")
                other_paths.append(candidate)
        elif kind in _SKIP_REASONS and not (kind == "dirlink" and not recursive):
            skipped.add(_SKIP_REASONS[kind], candidate)
        return kind

    if recursive:
        has_subdirs = _walk(directory, consider, output_folder, skipped)
    else:
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                candidate = directory / entry.name
                kind = consider(candidate, entry.name, Path(entry.name))
                if kind in {"dir", "dirlink"}:
                    has_subdirs = True
    if other:
        for p in other_paths:
            skipped.add(_not_images_reason(other), p)
    found.sort(key=lambda pair: pair[0])
    return [p for _, p in found], has_subdirs


def _walk(
    directory: Path,
    consider: Callable[[Path, str, Path], str],
    output_folder: Callable[[Path], bool],
    skipped: _Skipped,
) -> bool:
    """The recursive listing of :func:`_list_directory`: ``consider`` each entry; say if there are subfolders."""
    has_subdirs = False
    errors: list[OSError] = []
    for root, dirnames, filenames in os.walk(directory, onerror=errors.append):
        root_path = Path(root)
        kept = []
        for d in sorted(dirnames):
            sub = root_path / d
            if d.startswith("."):
                continue
            if os.path.islink(sub):
                consider(sub, d, sub.relative_to(directory))
            elif output_folder(sub):
                skipped.add("cnnlens output folder(s)", sub)
            else:
                kept.append(d)
        dirnames[:] = kept
        has_subdirs = has_subdirs or bool(kept)
        for filename in filenames:
            if filename.startswith("."):
                continue
            candidate = root_path / filename
            consider(candidate, filename, candidate.relative_to(directory))
    if errors and Path(errors[0].filename or "") == directory:
        raise errors[0]
    for error in errors:
        skipped.add(f"folder(s) that cannot be listed ({error.strerror or error})", Path(error.filename or "?"))
    return has_subdirs


def _sort_key(parts: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """Sort key for a relative path: case-insensitive by component, ties broken case-sensitively."""
    return tuple((part.casefold(), part) for part in parts)


def _is_image_name(filename: str) -> bool:
    """Tell whether a directory entry should be picked up as an image."""
    return not filename.startswith(".") and os.path.splitext(filename)[1].lower() in IMAGE_EXTENSIONS
