"""Output folders cnnlens may write into, and the proof of what it wrote there.

The rule: cnnlens deletes or replaces only what it can prove it wrote. Every folder a command writes
(``explain``, ``run``, ``report``, ``ExplanationSet.save``) carries a marker file, :data:`MARKER`
(``.cnnlens-owned.json``), holding the tool, the kind of output, an id, and the exact list of files cnnlens
wrote there (plus, for dataset runs, the name patterns of its shard, map and overlay files). Claiming a folder:

* missing or empty (hidden entries aside): created and marked;
* marked by cnnlens with an accepted kind: reused; the files listed in its marker may be replaced or removed;
* anything else (a non-empty folder without a marker, or another kind of cnnlens output): refused with
  :class:`OutputFolderError`, which names ``--overwrite``.

``overwrite=True`` on a folder cnnlens does not own means "write into this folder": the files cnnlens writes
replace same-named files, and nothing else is touched. On a folder cnnlens owns it means "start over": the files
the marker lists are removed first. Never, in any case, is a file that the marker does not list deleted.

Names: :func:`safe_name` keeps unicode letters and digits (``猫.jpg`` stays readable) and :func:`unique_names`
gives every input its own output name, stable for the same inputs.

Example:
    >>> import tempfile
    >>> folder = claim_output_dir(tempfile.mkdtemp(), "explain")
    >>> folder.kind, folder.files
    ('explain', set())
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import threading
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cnnlens.errors import CnnlensError

__all__ = [
    "MARKER",
    "OutputFolderError",
    "OwnedFolder",
    "claim_output_dir",
    "is_cnnlens_output",
    "owned_paths",
    "read_marker",
    "safe_name",
    "unique_names",
    "writing_into",
]

MARKER = ".cnnlens-owned.json"
"""Name of the marker file in every folder cnnlens writes."""

_TOOL = "cnnlens"
_FORMAT = 1
_MARKER_TMP = re.compile(re.escape(MARKER) + r"\.tmp-\d+-\d+")


class OutputFolderError(CnnlensError, FileExistsError):
    """An output folder holds files cnnlens did not write (or another kind of output), or is a file."""


def read_marker(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The marker of ``folder`` when it is a valid cnnlens marker, else None."""
    path = Path(folder) / MARKER
    try:
        doc = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("tool") != _TOOL or not isinstance(doc.get("files", []), list):
        return None
    return doc


def is_cnnlens_output(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder`` carries a valid cnnlens marker."""
    return read_marker(folder) is not None


def owned_paths(folder: str | os.PathLike[str]) -> tuple[set[str], list[re.Pattern[str]]]:
    """The files (relative posix paths) and name patterns that the marker of ``folder`` lists."""
    doc = read_marker(folder)
    if doc is None:
        return set(), []
    files = {str(f) for f in doc.get("files", [])}
    patterns = [re.compile(str(p)) for p in doc.get("patterns", [])]
    return files, patterns


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


@dataclass
class OwnedFolder:
    """A folder cnnlens may write into, with the files its marker lists.

    Attributes:
        root: The folder.
        kind: The kind of output (``"explain"``, ``"run"``, ``"report"``...).
        id: The output's id (kept across reuses of the folder).
        files: Relative posix paths of the files cnnlens wrote here.
        patterns: Regular expressions (full match on relative posix paths) of files cnnlens writes here in bulk.
        previous: The marker found when the folder was claimed (None for a new or foreign folder).
        overwrite: Whether the folder was claimed with ``overwrite=True``.
        created: Whether claiming created the folder.
    """

    root: Path
    kind: str
    id: str
    files: set[str] = field(default_factory=set)
    patterns: list[str] = field(default_factory=list)
    previous: dict[str, Any] | None = None
    overwrite: bool = False
    created: bool = False

    @property
    def reused(self) -> bool:
        """Whether the folder already held cnnlens output of this kind."""
        return self.previous is not None and self.previous.get("kind") == self.kind

    def owns(self, rel: str) -> bool:
        """Whether the relative posix path ``rel`` is listed (or matches a listed pattern)."""
        return rel in self.files or any(re.fullmatch(p, rel) for p in self.patterns)

    def rel(self, path: str | os.PathLike[str]) -> str:
        """``path`` relative to the folder, in posix form."""
        p = Path(path)
        if p.is_absolute() or p.parts[: len(self.root.parts)] == self.root.parts:
            return Path(os.path.relpath(os.path.abspath(p), os.path.abspath(self.root))).as_posix()
        return p.as_posix()

    def record(self, paths: Iterable[str | os.PathLike[str]]) -> None:
        """Add written files (absolute, or relative to the folder) to the list of what cnnlens wrote."""
        for path in paths:
            self.files.add(self.rel(path))

    def remove_listed(self, keep: Iterable[str] = ()) -> list[str]:
        """Delete every listed file (and pattern match) except ``keep``; prune folders this leaves empty.

        Only regular files and symbolic links named by the marker are removed; folders are removed only when
        a removal left them empty. Returns the removed relative paths.
        """
        kept = set(keep)
        removed: list[str] = []
        targets = set(self.files)
        if self.patterns:
            for dirpath, dirnames, filenames in os.walk(self.root):
                dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
                for name in filenames:
                    rel = Path(dirpath, name).relative_to(self.root).as_posix()
                    if any(re.fullmatch(p, rel) for p in self.patterns):
                        targets.add(rel)
        for rel in sorted(targets - kept):
            if rel == MARKER or rel.startswith("../") or Path(rel).is_absolute():
                continue
            path = self.root / rel
            if path.is_symlink() or path.is_file():
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed.append(rel)
            self.files.discard(rel)
            self._prune(path.parent)
        return removed

    def _prune(self, folder: Path) -> None:
        root = self.root.resolve()
        while True:
            try:
                if folder.resolve() == root or root not in folder.resolve().parents:
                    return
                folder.rmdir()  # only succeeds when empty
            except OSError:
                return
            folder = folder.parent

    def save(self) -> Path:
        """Write the marker (atomically) with the current list of files."""
        doc: dict[str, Any] = {
            "tool": _TOOL,
            "format": _FORMAT,
            "kind": self.kind,
            "id": self.id,
            "created": (self.previous or {}).get("created", _now()) if self.reused else _now(),
            "updated": _now(),
            "note": "cnnlens wrote the files listed here; it deletes or replaces only these. Keep this file.",
            "files": sorted(self.files),
        }
        if self.patterns:
            doc["patterns"] = list(self.patterns)
        path = self.root / MARKER
        tmp = self.root / f"{MARKER}.tmp-{os.getpid()}-{threading.get_ident()}"
        try:
            tmp.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        return path


def claim_output_dir(
    directory: str | os.PathLike[str],
    kind: str,
    *,
    overwrite: bool = False,
    option: str = "--out",
    legacy: bool = False,
) -> OwnedFolder:
    """Claim a folder for writing cnnlens output of ``kind`` (see the module docstring for the rules).

    Args:
        directory: The output folder (created when missing).
        kind: The kind of output.
        overwrite: Write into a folder cnnlens does not own (replacing only same-named files it writes), or
            start over in one it owns (removing the files its marker lists).
        option: The option name shown in messages.
        legacy: Treat a non-empty folder without a marker as this kind's output from an older cnnlens (the
            caller has checked its own proof, e.g. a run's ``run.json``): reused, but nothing in it is listed.

    Returns:
        The :class:`OwnedFolder`; its marker is written already.

    Raises:
        OutputFolderError: ``directory`` is a file, holds files cnnlens did not write, or holds another kind
            of cnnlens output, and ``overwrite`` is False.
    """
    root = Path(directory)
    if root.exists() and not root.is_dir():
        raise OutputFolderError(
            f"{option} {str(root)!r} is a file, not a folder; give a new or empty folder (cnnlens never replaces "
            "a file it did not write)."
        )
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f"{MARKER}.tmp-*"):  # a marker write a killed process left unfinished
        if _MARKER_TMP.fullmatch(stale.name):
            with contextlib.suppress(OSError):
                stale.unlink()
    previous = read_marker(root)
    folder = OwnedFolder(root, kind, uuid.uuid4().hex, overwrite=overwrite, created=created)
    if previous is not None:
        folder.previous = previous
        folder.files = {str(f) for f in previous.get("files", [])}
        folder.patterns = [str(p) for p in previous.get("patterns", [])]
        if previous.get("kind") == kind:
            folder.id = str(previous.get("id") or folder.id)
        elif not overwrite:
            raise OutputFolderError(
                f"{option} {str(root)!r} holds cnnlens {previous.get('kind')!r} output, not {kind!r} output; "
                f"choose another folder, or pass --overwrite to write the {kind} into it (files of the other "
                "output are kept unless the new ones have the same names)."
            )
    elif not legacy:
        entries = _visible(root)
        if entries and not overwrite:
            shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
            raise OutputFolderError(
                f"{option} {str(root)!r} is not empty and was not written by cnnlens (it holds {shown}); choose a "
                "new or empty folder, or pass --overwrite to write into it anyway: cnnlens then replaces only the "
                "files of the same name it writes and deletes nothing."
            )
    folder.save()
    return folder


def _snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Relative path -> (inode, size, mtime_ns) of every regular file under ``root`` (links not followed)."""
    files: dict[str, tuple[int, int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
        for name in filenames:
            path = os.path.join(dirpath, name)
            with contextlib.suppress(OSError):
                st = os.lstat(path)
                files[Path(path).relative_to(root).as_posix()] = (st.st_ino, st.st_size, st.st_mtime_ns)
    return files


@contextlib.contextmanager
def writing_into(
    directory: str | os.PathLike[str], kind: str, *, overwrite: bool = False, option: str = "--out"
) -> Iterator[OwnedFolder]:
    """Claim ``directory`` (:func:`claim_output_dir`), run the block that writes into it, then list what it wrote.

    For writers that do not report their files (study reports, forward views, the demo): every file created or
    changed inside the block is added to the marker, so a later run may replace it; files that were there before
    and were not touched stay unlisted (and are never removed by cnnlens).

    Example:
        >>> import tempfile
        >>> with writing_into(tempfile.mkdtemp(), "demo") as folder:
        ...     _ = (folder.root / "index.html").write_text("<p>hi</p>")
        >>> sorted(folder.files)
        ['index.html']
    """
    folder = claim_output_dir(directory, kind, overwrite=overwrite, option=option)
    before = _snapshot(folder.root)
    try:
        yield folder
    finally:
        after = _snapshot(folder.root)
        folder.record(
            rel
            for rel, stamp in after.items()
            if before.get(rel) != stamp and rel != MARKER and not _MARKER_TMP.fullmatch(rel)
        )
        if folder.created and not folder.files:  # a command that wrote nothing (failed early) leaves no folder
            with contextlib.suppress(OSError):
                (folder.root / MARKER).unlink()
                folder.root.rmdir()
        else:
            folder.save()


_UNSAFE = re.compile(r"[^\w.@-]+")
_UNSAFE_KEEP_SPACES = re.compile(r"[^\w .@-]+")


def safe_name(text: str, *, limit: int = 80, spaces: bool = False) -> str:
    """A file-name-safe, readable version of ``text``: unicode letters and digits are kept.

    Runs of anything else (slashes, ``:*?"<>|#%``, control characters, and spaces unless ``spaces``) become
    ``_``; leading and trailing dots, spaces and underscores are stripped; the result is at most ``limit``
    characters (never empty).

    Example:
        >>> safe_name("猫.jpg"), safe_name("a b.jpg"), safe_name("a b.jpg", spaces=True), safe_name("../x")
        ('猫.jpg', 'a_b.jpg', 'a b.jpg', 'x')
    """
    slug = (_UNSAFE_KEEP_SPACES if spaces else _UNSAFE).sub("_", text).strip("._ ")
    return slug[:limit].strip("._ ") or "x"


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogateescape")).hexdigest()[:6]


def unique_names(
    paths: Sequence[str | os.PathLike[str]],
    *,
    taken: Mapping[str, str | None] | None = None,
) -> list[str]:
    """One distinct, readable output name per input file, stable for the same inputs.

    The name is the file's stem (``photo``, ``a b``, ``猫``: :func:`safe_name` with spaces kept); where stems
    clash (compared case-insensitively, as macOS and Windows file systems do) the suffix joins it (``cat_png``,
    ``cat_jpg``), and where that still clashes a short hash of the full path follows (``cat_png-1f3c2e``).
    ``taken`` maps names already used in the output folder to the source path they belong to: a path that had
    a name keeps it, and no other path gets it.

    Example:
        >>> unique_names(["a/cat.png", "b/cat.jpg", "c/dog.png"])
        ['cat_png', 'cat_jpg', 'dog']
    """
    taken = dict(taken or {})
    sources = [os.path.abspath(os.fspath(p)) for p in paths]
    by_source = {v: k for k, v in taken.items() if v is not None}
    used = {k.casefold() for k in taken}
    names: list[str | None] = [by_source.get(s) for s in sources]
    for name in names:
        if name is not None:
            used.add(name.casefold())
    # candidates in order of preference, per input
    levels: list[list[str]] = []
    for p, s in zip(paths, sources, strict=True):
        path = Path(p)
        stem = safe_name(path.stem if path.suffix else path.name, spaces=True)
        full = safe_name(path.name.replace(".", "_"), spaces=True) if path.suffix else stem
        levels.append([stem, full, f"{full[:72]}-{_digest(s)}"])
    for level in range(3):
        counts: dict[str, int] = {}
        for i, cands in enumerate(levels):
            if names[i] is None:
                key = cands[level].casefold()
                counts[key] = counts.get(key, 0) + 1
        for i, cands in enumerate(levels):
            if names[i] is not None:
                continue
            key = cands[level].casefold()
            if level == 2 or (counts[key] == 1 and key not in used):
                if level == 2:
                    base, n = cands[2], 2
                    while cands[2].casefold() in used:
                        cands[2] = f"{base}-{n}"
                        n += 1
                names[i] = cands[level]
                used.add(cands[level].casefold())
    return [n for n in names if n is not None]
