"""The run folder on disk: atomic files, shards, the map store, assembly into ``results.parquet``.

Layout of ``RUN_DIR``::

    run.json                          configuration and its fingerprint (written once, before any work)
    shards/rows-000012.parquet        the rows of shard 12: its commit marker (written last, atomically)
    maps/<method>@<layer>/shard-000012.npy
                                      float32 (n, 2, h, w): raw signed maps at layer resolution of the n rows of
                                      shard 12 ([:, 0] predicted class, [:, 1] true class where wrong, else 0)
    overlays/000012/0000345.image.jpg the model-input image of a misclassified row (index 345)
    overlays/000012/0000345.<method>@<layer>.pred.jpg / .true.jpg
                                      predicted-class and true-class map over it (JPEG quality 90 by
                                      default: 20x faster to encode and 8x smaller than PNG; .png with
                                      overlay_format="png")
    results.parquet                   every row, sorted by index (assembled from the shards at the end)
    summary.json, manifest.json       totals; provenance, versions, columns and files
    .lock                             locked (lockf) while a process works on the folder

Every file is written to a temporary name in its folder, flushed and renamed over its final name
(``os.replace``), so a reader (or a restarted run) sees either the old file or the new one, never half of one;
rows, maps and the run's JSON files are also fsync-ed before the rename (overlay pictures are not: the report
shows a picture only when it exists). A shard counts as done only when its rows file exists with the expected
number of rows; its maps and overlays are written *before* it, under deterministic names, so a shard redone
after a crash simply overwrites whatever the crash left. Maps are stored raw (what
:class:`cnnlens.Explanation` keeps as ``raw``); :func:`derive_maps` turns them into the displayed ``[0, 1]``
maps exactly as :func:`cnnlens.explain` does (display rule, bilinear upsampling, per-map min-max), so nothing
is stored twice.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from cnnlens.maps import finite_or_zero, upsample_normalize
from cnnlens.methods.registry import apply_display, display_mode
from cnnlens.runs.batch import PAIR_METRICS, BatchResult, Pair, Picture, row_columns
from cnnlens.runs.errors import RunConfigError

__all__ = [
    "OWNED_ENTRIES",
    "RUN_FILES",
    "RUN_PATTERNS",
    "RunLock",
    "RunStore",
    "atomic_write",
    "atomic_write_json",
    "derive_maps",
    "results_schema",
]

OWNED_ENTRIES = (
    "run.json",
    "shards",
    "maps",
    "overlays",
    "results.parquet",
    "summary.json",
    "manifest.json",
    "report",
)
"""The top-level names a run writes in its folder (files and folders)."""

RUN_FILES = ("run.json", "results.parquet", "summary.json", "manifest.json")
"""The run's own files at the top of its folder (listed in the folder's marker once written)."""

RUN_PATTERNS = (
    r"shards/rows-\d{6,}\.parquet",
    r"maps/[^/]+@[^/]+/shard-\d{6,}\.npy",
    r"overlays/\d{6,}/\d{7,}\.[^/]+\.(?:jpg|png)",
    r"(?:.+/)?\.[^/]+\.tmp-\d+-\d+",
)
"""Full-match patterns (relative posix paths) of the files a run writes in bulk; with :data:`RUN_FILES` they are
all that ``--overwrite`` removes from a run folder (see :mod:`cnnlens.outputs_dir`): a user's file elsewhere,
even in ``maps/``, is never touched."""

_SHARD_RE = re.compile(r"^rows-(\d{6,})\.parquet$")
_TMP_MARK = ".tmp-"
_TMP_RE = re.compile(r"^\..+\.tmp-\d+-\d+$")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "wb", *, durable: bool = True) -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path``; on success flush (and fsync) it and rename it over ``path``.

    On an exception the temporary file is removed and ``path`` is untouched. A process killed inside the
    block leaves only a ``.<name>.tmp-<pid>-<thread>`` file, which :meth:`RunStore.clean_temporary` removes.
    ``durable=False`` skips the fsync: the rename is still atomic for readers and survives the process being
    killed, only not a power cut (used for overlay pictures, which the report shows only when present).
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}{_TMP_MARK}{os.getpid()}-{threading.get_ident()}"
    try:
        with open(tmp, mode) as fh:
            yield fh
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def atomic_write_json(path: str | os.PathLike[str], doc: Mapping[str, Any]) -> Path:
    """Write ``doc`` as indented JSON, atomically."""
    with atomic_write(path, "w") as fh:
        fh.write(json.dumps(doc, indent=2, default=str, allow_nan=False) + "\n")
    return Path(path)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _save_picture(path: Path, picture: Picture, source: str) -> None:
    """Write an overlay picture atomically; the source image path goes into its comment/text metadata.

    ``.jpg``: JPEG quality 90 (about 0.3 ms and 10 KB at 224x224); otherwise PNG at zlib level 1 (about 6 ms and
    80 KB; the default level 6 takes 20 ms).
    """
    image = Image.fromarray(np.ascontiguousarray(picture.render(), dtype=np.uint8))
    with atomic_write(path, durable=False) as fh:
        if path.suffix == ".jpg":
            image.save(fh, format="JPEG", quality=90, comment=f"cnnlens overlay of {source}".encode())
        else:
            info = PngInfo()
            info.add_text("Software", "cnnlens")
            info.add_text("cnnlens:source", source)
            image.save(fh, format="PNG", pnginfo=info, compress_level=1)


class RunLock:
    """An exclusive POSIX record lock (``lockf``) on ``RUN_DIR/.lock``: one process per run folder.

    The kernel releases it when the process dies (SIGKILL included), so a killed run never leaves a stale lock.
    A POSIX lock belongs to the process, not to the file descriptor: forked decoding workers, which can outlive
    a killed parent by a few seconds, do not hold it (an ``flock`` would stay held through their inherited
    descriptors). Where ``fcntl`` is missing (Windows) the lock is a no-op.
    """

    def __init__(self, folder: Path) -> None:
        self.path = folder / ".lock"
        self._fh: IO[str] | None = None

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            self._fh = fh
            return self
        try:
            fcntl.lockf(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            fh.close()
            raise RunConfigError(
                f"another cnnlens process is working on {str(self.path.parent)!r}; wait for it to finish or stop "
                "it, then run again (a killed run releases the folder by itself)."
            ) from exc
        self._fh = fh
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._fh is not None:
            self._fh.close()  # closing the (only) descriptor releases the lock
            self._fh = None


def results_schema(pairs: Sequence[Pair]) -> Any:
    """The pyarrow schema of the rows (every shard and ``results.parquet`` share it)."""
    types: dict[str, Any] = {
        "index": pa.int64(),
        "path": pa.string(),
        "label": pa.int64(),
        "label_name": pa.string(),
        "status": pa.string(),
        "error": pa.string(),
        "prediction": pa.int64(),
        "prediction_name": pa.string(),
        "correct": pa.bool_(),
        "prob_prediction": pa.float64(),
        "prob_label": pa.float64(),
        "top_k_classes": pa.list_(pa.int64()),
        "top_k_names": pa.list_(pa.string()),
        "top_k_probs": pa.list_(pa.float64()),
        "box": pa.list_(pa.float64()),
        "box_input": pa.list_(pa.float64()),
    }
    metric_types = dict(
        zip(
            PAIR_METRICS,
            (pa.float64(), pa.bool_(), pa.float64(), pa.bool_(), pa.float64(), pa.bool_()),
            strict=True,
        )
    )
    fields = []
    for name in row_columns(list(pairs)):
        if name in types:
            fields.append(pa.field(name, types[name]))
        else:
            metric = name.rsplit("/", 1)[1].rsplit("_", 1)[0]
            fields.append(pa.field(name, metric_types[metric]))
    fields += [pa.field("shard", pa.int64()), pa.field("maps_row", pa.int64()), pa.field("image_file", pa.string())]
    for pair in pairs:
        fields += [pa.field(pair.col(c), pa.string()) for c in ("maps_file", "overlay_pred", "overlay_true")]
    return pa.schema(fields)


def derive_maps(
    raw: torch.Tensor, variant: Mapping[str, Any], size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The displayed ``[0, 1]`` maps of stored raw maps, exactly as :func:`cnnlens.explain` computes them.

    Formula: ``normalize(upsample(display(raw), size))`` with the method variant's display rule (ReLU, abs or
    signed), bilinear upsampling and per-map min-max normalisation, through the same
    :func:`cnnlens.maps.upsample_normalize` that :func:`cnnlens.explain` uses.

    Args:
        raw: ``(..., h, w)`` raw maps.
        variant: The method variant (from ``run.json``), for its display rule.
        size: ``(H, W)`` of the model input.

    Returns:
        ``(maps, degenerate)``: float32 ``(..., H, W)`` and bool ``(...)``.
    """
    clean, bad = finite_or_zero(raw.float())
    shown = apply_display(clean, display_mode(variant))
    ((maps, degenerate),) = upsample_normalize([shown], size, dtype=torch.float32, assume_finite=True)
    return maps, degenerate | bad


class RunStore:
    """Reads and writes the files of one run folder (see the module docstring for the layout).

    Args:
        root: The run folder.
        pairs: The run's (method, layer) pairs.
        shard_size: Rows per shard (the last shard may be shorter).
        total: Number of samples of the run.
        overlay_format: ``"jpeg"`` (default) or ``"png"`` for the overlay pictures.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        pairs: Sequence[Pair],
        shard_size: int,
        total: int,
        *,
        overlay_format: str = "jpeg",
    ) -> None:
        self.root = Path(root)
        self.picture_suffix = "png" if overlay_format == "png" else "jpg"
        self.pairs = list(pairs)
        self.shard_size = int(shard_size)
        self.total = int(total)
        self.schema = results_schema(self.pairs)

    # -- naming ------------------------------------------------------------------------------------
    @property
    def num_shards(self) -> int:
        """How many shards the run has."""
        return (self.total + self.shard_size - 1) // self.shard_size

    def shard_range(self, shard: int) -> range:
        """Sample indices of ``shard``."""
        return range(shard * self.shard_size, min(self.total, (shard + 1) * self.shard_size))

    def rows_path(self, shard: int) -> Path:
        """The rows file (commit marker) of ``shard``."""
        return self.root / "shards" / f"rows-{shard:06d}.parquet"

    def maps_rel(self, pair: Pair, shard: int) -> str:
        """The maps file of ``pair`` in ``shard``, relative to the run folder."""
        return f"maps/{pair.key}/shard-{shard:06d}.npy"

    def overlay_rel(self, shard: int, index: int, pair: Pair | None, which: str) -> str:
        """An overlay picture's path relative to the run folder."""
        stem = f"overlays/{shard:06d}/{index:07d}"
        return (
            f"{stem}.image.{self.picture_suffix}"
            if pair is None
            else f"{stem}.{pair.key}.{which}.{self.picture_suffix}"
        )

    # -- state ---------------------------------------------------------------------------------------
    def clean_temporary(self) -> int:
        """Remove temporary files a killed process left behind; returns how many."""
        removed = 0
        if not self.root.is_dir():
            return 0
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                if _TMP_RE.match(name):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(dirpath, name))
                        removed += 1
        return removed

    def committed(self) -> set[int]:
        """Shards whose rows file exists and holds the expected number of rows."""
        done: set[int] = set()
        folder = self.root / "shards"
        if not folder.is_dir():
            return done
        for entry in folder.iterdir():
            match = _SHARD_RE.match(entry.name)
            if not match:
                continue
            shard = int(match.group(1))
            if shard >= self.num_shards:
                continue
            try:
                rows = pq.read_metadata(entry).num_rows
            except Exception:  # an unreadable file (disk trouble): redo the shard
                continue
            if rows == len(self.shard_range(shard)):
                done.add(shard)
        return done

    # -- writing ---------------------------------------------------------------------------------------
    def stage_pictures(
        self,
        shard: int,
        result: BatchResult,
        submit: Callable[..., Future[None]] | None = None,
    ) -> list[Future[None]]:
        """Name the overlay pictures of a batch of ``shard``, record the names in its rows, and write them.

        With ``submit`` (e.g. a thread pool's ``submit``) the writes run in the background and their futures are
        returned: the caller must wait for them before :meth:`commit` of the shard (pictures are written before
        the rows that name them). Without it they are written here.
        """
        futures: list[Future[None]] = []
        for picture in result.pictures:
            row = result.rows[picture.row]
            owner = None if picture.pair is None else self.pairs[picture.pair]
            rel = self.overlay_rel(shard, int(row["index"]), owner, picture.which)
            if owner is None:
                row["image_file"] = rel
            else:
                row[owner.col(f"overlay_{picture.which}")] = rel
            if submit is None:
                _save_picture(self.root / rel, picture, str(row["path"]))
            else:
                futures.append(submit(_save_picture, self.root / rel, picture, str(row["path"])))
        result.staged = True
        return futures

    def commit(self, shard: int, results: Sequence[BatchResult], seconds: float) -> list[dict[str, Any]]:
        """Write one finished shard: maps, overlays, then the rows file (the commit). Returns the rows.

        Args:
            shard: The shard number.
            results: The batch results covering exactly the shard's samples, in order.
            seconds: Compute time spent on the shard (stored in the rows file's metadata).
        """
        rows = self.write_outputs(shard, results)
        self.write_rows(shard, rows, seconds)
        return rows

    def write_outputs(self, shard: int, results: Sequence[BatchResult]) -> list[dict[str, Any]]:
        """Write a shard's overlays and maps files (not its rows file); returns its rows, file columns filled.

        The first half of :meth:`commit`: a distributed worker writes a shard's outputs with it and hands the
        rows to the driver, which commits them with :meth:`write_rows`.
        """
        for result in results:
            if not result.staged:
                self.stage_pictures(shard, result)
        rows = [dict(row) for result in results for row in result.rows]
        expected = list(self.shard_range(shard))
        if [r["index"] for r in rows] != expected:
            raise RunConfigError(
                f"shard {shard} got rows {[r['index'] for r in rows][:5]}..., expected {expected[:5]}..."
            )
        for position, row in enumerate(rows):
            row["shard"] = shard
            row["maps_row"] = position
        for p, pair in enumerate(self.pairs):
            parts = [result.maps[p] for result in results]
            shape = next((a.shape[2:] for a in parts if a is not None), None)
            if shape is None:
                continue  # no image of this shard could be decoded: no maps file
            stacked = np.concatenate(
                [
                    a if a is not None else np.zeros((len(result.rows), 2, *shape), np.float32)
                    for a, result in zip(parts, results, strict=True)
                ]
            )
            rel = self.maps_rel(pair, shard)
            with atomic_write(self.root / rel) as fh:
                np.save(fh, stacked, allow_pickle=False)
            for row in rows:
                if row["status"] == "ok":
                    row[pair.col("maps_file")] = rel
        return rows

    def write_rows(self, shard: int, rows: Sequence[Mapping[str, Any]], seconds: float) -> None:
        """Write a shard's rows file, the commit marker (atomic, fsync-ed); its maps and overlays are on disk.

        Raises:
            RunConfigError: The rows are not exactly the shard's samples, in order.
        """
        indices = [int(r["index"]) for r in rows]
        if indices != list(self.shard_range(shard)):
            raise RunConfigError(
                f"shard {shard} got rows {indices[:5]}..., expected {list(self.shard_range(shard))[:5]}..."
            )
        table = pa.Table.from_pylist(list(rows), schema=self.schema)
        table = table.replace_schema_metadata({"cnnlens.shard": str(shard), "cnnlens.seconds": f"{seconds:.6f}"})
        with atomic_write(self.rows_path(shard)) as fh:
            pq.write_table(table, fh)
        _fsync_dir(self.rows_path(shard).parent)

    def shard_seconds(self) -> float:
        """Compute seconds recorded in the committed shards (all sessions of the run)."""
        total = 0.0
        for shard in self.committed():
            meta = pq.read_metadata(self.rows_path(shard)).metadata or {}
            with contextlib.suppress(KeyError, ValueError):
                total += float(meta[b"cnnlens.seconds"])
        return total

    def assemble(self, metadata: Mapping[str, str] | None = None) -> Path:
        """Concatenate every shard into ``results.parquet`` (sorted by index), checking each index is there once.

        Raises:
            RunConfigError: A shard is missing or an index is missing or repeated.
        """
        done = self.committed()
        missing = sorted(set(range(self.num_shards)) - done)
        if missing:
            raise RunConfigError(f"cannot assemble results: shard(s) {missing[:10]} are not finished; run again.")
        tables = [pq.read_table(self.rows_path(s), schema=self.schema) for s in range(self.num_shards)]
        table = pa.concat_tables(tables) if tables else self.schema.empty_table()
        table = table.sort_by("index")
        indices = table.column("index").to_pylist()
        if indices != list(range(self.total)):
            raise RunConfigError("the shards do not hold every image exactly once; run again with --overwrite.")
        table = table.replace_schema_metadata({k: str(v) for k, v in (metadata or {}).items()})
        path = self.root / "results.parquet"
        with atomic_write(path) as fh:
            pq.write_table(table, fh)
        return path
