"""Resumable dataset runs: configuration fingerprint, shard scheduling, worker decoding, summary.

A run explains every image of a labelled dataset and writes the results into a run folder (layout in
:mod:`cnnlens.runs.store`). Work is committed a shard (``shard_size`` consecutive images) at a time; a
run killed at any moment (SIGKILL included) and started again with the same configuration skips the
committed shards and redoes the rest, so the finished ``results.parquet`` holds every image exactly once.

The configuration (dataset sample list, model weights and preprocessing, methods, layers, options,
metrics, shard size) is hashed into a fingerprint kept in ``run.json``. Starting a run in a folder whose
fingerprint differs is refused with the list of what changed; ``overwrite=True`` starts over. Runtime knobs
(batch size, workers, device, the :class:`cnnlens.Execution`) are not part of it.

Example:
    >>> model = load_run_model("efficientnet_lite0")  # doctest: +SKIP
    >>> dataset = read_dataset("photos/", model.class_names)  # doctest: +SKIP
    >>> summary = run_dataset("runs/photos", dataset, model, RunSettings(methods=("gradcam",)))  # doctest: +SKIP
    >>> summary.accuracy  # doctest: +SKIP
    0.83

``DatasetRun.execute`` runs past ~80 lines only through its docstring (its code: 67 lines).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import torch

from cnnlens.data.images import DEFAULT_MAX_PIXELS
from cnnlens.execution import Execution, as_execution
from cnnlens.explanation import environment_versions
from cnnlens.models import LoadedModel
from cnnlens.outputs_dir import OwnedFolder, claim_output_dir, read_marker
from cnnlens.runs.batch import BatchResult, RunSettings, process_batch, row_columns
from cnnlens.runs.dataset import Dataset
from cnnlens.runs.decode import make_loader, shard_batches
from cnnlens.runs.errors import RunConfigError, RunError
from cnnlens.runs.fingerprint import describe_changes, model_fingerprint
from cnnlens.runs.store import RUN_FILES, RUN_PATTERNS, RunLock, RunStore, atomic_write_json
from cnnlens.runs.summary import RunSummary, pair_metrics

if TYPE_CHECKING:
    from cnnlens.runs.ray_engine import RayOptions

__all__ = [
    "FORMAT_VERSION",
    "DatasetRun",
    "RunSummary",
    "default_workers",
    "model_fingerprint",
    "run_dataset",
]

FORMAT_VERSION = 1
"""Version of the run-folder layout, stored in ``run.json``."""

ProgressFn = Callable[[int, int], None]
"""``progress(completed, total)``: called once at the start and after every batch."""


def default_workers(device: str = "cpu") -> int:
    """Decoding processes by default: one per core the model leaves free, at most 4.

    On a GPU the model leaves all but one core free. On the CPU torch's intra-op threads
    (``torch.get_num_threads()``) already occupy the cores: a decoding process on top of them slows the
    forward more than it saves (measured on 2 cores, EfficientNet-Lite0, 300 photos: 8.8 s with one worker,
    7.9 s decoding in the main process), so only cores beyond torch's threads are used.

    Args:
        device: The model's device type (``"cpu"``, ``"cuda"``, ``"mps"``...).
    """
    cores = os.cpu_count() or 1
    busy = 1 if device != "cpu" else torch.get_num_threads()
    return max(0, min(4, cores - busy))


class DatasetRun:
    """One run folder, opened for work: holds the folder lock, knows what is done, runs what is not.

    Use it as a context manager (the lock is held inside); :func:`run_dataset` does it all in one call.

    Args:
        run_dir: The run folder (created if missing).
        dataset: The samples (see :func:`cnnlens.runs.read_dataset`), already limited if wanted.
        model: The model.
        settings: Methods, layers, metrics (resolved against the model here).
        shard_size: Images per committed shard (part of the configuration).
        overwrite: Start over: remove the files a previous run in the folder wrote (the run's own files, listed
            in the folder's cnnlens marker, and its report's), or write into a folder cnnlens does not own
            (replacing only same-named files). A user's file is never deleted.
        extra: JSON-serialisable notes stored in ``run.json`` and the manifest (e.g. the command line); not
            part of the fingerprint.

    Raises:
        RunConfigError: The folder holds a run with another configuration, or is in use.
        OutputFolderError: The folder is not empty and holds no cnnlens run (and ``overwrite`` is False).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        dataset: Dataset,
        model: LoadedModel,
        settings: RunSettings | None = None,
        *,
        shard_size: int = 256,
        overwrite: bool = False,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        if shard_size < 1:
            raise RunError(f"--shard-size must be at least 1, got {shard_size}.")
        if len(dataset) == 0:
            raise RunError("the dataset has no samples.")
        self.root = Path(run_dir)
        self.dataset = dataset
        self.model = model
        self.settings = (settings or RunSettings()).resolve(model)
        self.pairs = self.settings.pairs()
        self.shard_size = int(shard_size)
        self.overwrite = overwrite
        self.extra = dict(extra or {})
        self.store = RunStore(
            self.root, self.pairs, self.shard_size, len(dataset), overlay_format=self.settings.overlay_format
        )
        self.config = self._config()
        self.fingerprint = hashlib.sha256(json.dumps(self.config, sort_keys=True).encode("utf-8")).hexdigest()
        self._lock = RunLock(self.root)
        self._done: set[int] = set()
        self._entered = False
        self.owned: OwnedFolder | None = None

    def _config(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "dataset": {
                "kind": self.dataset.kind,
                "samples": len(self.dataset),
                "samples_sha256": self.dataset.fingerprint(),
            },
            "model": model_fingerprint(self.model),
            "settings": self.settings.as_dict(),
            "shard_size": self.shard_size,
        }

    # -- opening ---------------------------------------------------------------------------------------
    def __enter__(self) -> DatasetRun:
        if self.root.exists() and not self.root.is_dir():
            raise RunConfigError(f"--out {str(self.root)!r} is a file; give a folder for the run.")
        self.root.mkdir(parents=True, exist_ok=True)
        new_lock = not self._lock.path.exists()
        self._lock.__enter__()
        try:
            self._prepare()
        except BaseException:
            self._lock.__exit__(None, None, None)
            if new_lock and self.owned is None:  # refused before claiming the folder: leave no trace in it
                with contextlib.suppress(OSError):
                    self._lock.path.unlink()
            raise
        self._entered = True
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._entered = False
        self._lock.__exit__(exc_type, exc, tb)

    def _legacy_run(self) -> bool:
        """A run folder of a cnnlens without markers: it has a run.json with a fingerprint and a config."""
        try:
            doc = json.loads((self.root / "run.json").read_text("utf-8"))
        except (OSError, ValueError):
            return False
        return isinstance(doc, dict) and "fingerprint" in doc and "config" in doc

    def _prepare(self) -> None:
        run_json = self.root / "run.json"
        legacy = read_marker(self.root) is None and self._legacy_run()
        owned = claim_output_dir(self.root, "run", overwrite=self.overwrite, legacy=legacy)
        self.owned = owned
        if legacy:
            owned.files |= {name for name in RUN_FILES if (self.root / name).is_file()}
        if owned.reused or legacy:
            owned.patterns = list(RUN_PATTERNS)
        if self.overwrite:
            if owned.previous is not None or legacy:  # start over: remove what cnnlens listed there
                self._remove_report()
                owned.remove_listed()
            owned.patterns = list(RUN_PATTERNS)
            with contextlib.suppress(FileNotFoundError):
                run_json.unlink()  # ours, or a foreign file of the name the run writes: replaced, as documented
        elif run_json.is_file():
            try:
                old = json.loads(run_json.read_text("utf-8"))
            except (OSError, ValueError) as exc:
                raise RunConfigError(f"{str(run_json)!r} cannot be read ({exc}); start over with --overwrite.") from exc
            if old.get("fingerprint") != self.fingerprint:
                raise RunConfigError(
                    f"{str(self.root)!r} holds a run with a different configuration:\n"
                    f"{describe_changes(old.get('config', {}), self.config)}\n"
                    "Run the same command as before to continue it, pass --overwrite to start over, or choose "
                    "another --out folder."
                )
        else:
            owned.patterns = list(RUN_PATTERNS)
            owned.remove_listed()  # a run claimed but never started (no run.json): only its own leftovers
        owned.save()
        self.store.clean_temporary()
        if not run_json.is_file():
            atomic_write_json(
                run_json,
                {
                    "fingerprint": self.fingerprint,
                    "config": self.config,
                    "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "dataset_source": self.dataset.source,
                    "class_names": list(self.model.class_names),
                    "input_size": list(self.model.spec.preprocessing.input_size),
                    "pairs": [
                        {"method": p.method, "layer": p.layer, "variant": dict(p.variant), "key": p.key}
                        for p in self.pairs
                    ],
                    "model": self.model.manifest(),
                    "extra": self.extra,
                },
            )
            owned.record(["run.json"])
            owned.save()
        self._done = self.store.committed()

    def _remove_report(self) -> None:
        """Remove the files of the run's default report (``report/``), when its marker proves cnnlens wrote them."""
        folder = self.root / "report"
        marker = read_marker(folder)
        if marker is None or marker.get("kind") != "report":
            return
        report = OwnedFolder(folder, "report", str(marker.get("id", "")), files={str(f) for f in marker["files"]})
        report.remove_listed()
        report.previous = marker
        report.save()

    # -- state -------------------------------------------------------------------------------------------
    @property
    def total(self) -> int:
        """Images in the run."""
        return len(self.dataset)

    @property
    def completed(self) -> int:
        """Images in shards committed before this session's work."""
        return sum(len(self.store.shard_range(s)) for s in self._done)

    def pending_shards(self) -> list[int]:
        """Shards not committed before this session, in order."""
        return [s for s in range(self.store.num_shards) if s not in self._done]

    # -- work ----------------------------------------------------------------------------------------------
    def execute(
        self,
        *,
        batch_size: int = 16,
        workers: int | None = None,
        progress: ProgressFn | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        execution: Execution | None = None,
    ) -> RunSummary:
        """Process every shard not yet committed, then assemble ``results.parquet`` and write the summary.

        Args:
            batch_size: Images per forward/backward.
            workers: Decoding processes (default :func:`default_workers`; 0 decodes in this process).
            progress: ``progress(completed, total)`` after every batch.
            max_pixels: Largest image decoded (width x height, see :func:`cnnlens.data.load_image`); larger ones
                become error rows.
            execution: How each batch runs (memory layout, budget and chunks of the Average Drop forwards,
                threads; :class:`cnnlens.Execution`). Not part of the fingerprint: it never changes a row.

        Returns:
            The :class:`RunSummary`.
        """
        if not self._entered:
            raise RunError("DatasetRun.execute() needs the run opened: use `with DatasetRun(...) as run:`.")
        if batch_size < 1:
            raise RunError(f"--batch-size must be at least 1, got {batch_size}.")
        execution = as_execution(execution)
        param = next(self.model.module.parameters(), None)
        device = param.device.type if param is not None else "cpu"
        workers = default_workers(device) if workers is None else workers
        if workers < 0:
            raise RunError(f"--workers must be 0 or more, got {workers}.")
        pending = [s for s in range(self.store.num_shards) if s not in self._done]
        done_before = self.completed
        completed = done_before
        if progress is not None:
            progress(completed, self.total)
        started = time.perf_counter()
        processed = 0
        if pending:
            batches = shard_batches([self.store.shard_range(s) for s in pending], batch_size)
            cuda = device == "cuda"
            loader = make_loader(
                self.dataset.samples,
                batches,
                self.model.spec.preprocessing,
                workers=workers,
                pin_memory=cuda,
                max_pixels=max_pixels,
            )
            parts: list[BatchResult] = []
            writes: list[Future[None]] = []
            count = 0
            mark = time.perf_counter()
            # Overlay PNGs are encoded and written by one background thread (zlib releases the GIL) while the
            # model works on the next batch; a shard's rows are committed only after its pictures are on disk.
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cnnlens-overlays") as pool:
                try:
                    for batch in loader:
                        shard = batch.samples[0].index // self.shard_size
                        with execution.threads_applied():
                            result = process_batch(self.model, batch, self.settings, execution=execution)
                        writes += self.store.stage_pictures(shard, result, pool.submit)
                        parts.append(result)
                        count += len(batch.samples)
                        if count == len(self.store.shard_range(shard)):
                            for future in writes:
                                future.result()
                            self.store.commit(shard, parts, time.perf_counter() - mark)
                            mark = time.perf_counter()
                            parts, writes, count = [], [], 0
                        processed += len(batch.samples)
                        completed += len(batch.samples)
                        if progress is not None:
                            progress(completed, self.total)
                finally:
                    for future in writes:
                        future.cancel()
        elapsed = time.perf_counter() - started
        return self._finish(processed, done_before, elapsed)

    def finish(self, processed: int, skipped: int, elapsed: float) -> RunSummary:
        """Assemble ``results.parquet``, write the summary and the manifest (every shard must be committed).

        Called by :meth:`execute` and by other engines (:func:`cnnlens.runs.ray_engine.execute_ray`) once their
        shards are committed.

        Args:
            processed: Images processed in this session.
            skipped: Images committed before it.
            elapsed: Seconds of this session's work.
        """
        return self._finish(processed, skipped, elapsed)

    def _finish(self, processed: int, skipped: int, elapsed: float) -> RunSummary:
        import pyarrow.parquet as pq

        path = self.store.assemble({"cnnlens.fingerprint": self.fingerprint, "cnnlens.format": str(FORMAT_VERSION)})
        table = pq.read_table(path)
        status = table.column("status").to_pylist()
        correct = table.column("correct").to_pylist()
        ok = sum(1 for s in status if s == "ok")
        right = sum(1 for c in correct if c is True)
        summary = RunSummary(
            run_dir=str(self.root),
            total=self.total,
            ok=ok,
            errors=self.total - ok,
            correct=right,
            accuracy=right / ok if ok else None,
            processed=processed,
            skipped=skipped,
            elapsed_s=elapsed,
            images_per_s=processed / elapsed if processed and elapsed > 0 else None,
            compute_s=self.store.shard_seconds(),
            results=str(path),
            metrics=pair_metrics(table, self.pairs),
        )
        atomic_write_json(self.root / "summary.json", summary.as_dict())
        self._write_manifest(summary)
        if self.owned is not None:
            self.owned.record(["results.parquet", "summary.json", "manifest.json"])
            self.owned.save()
        return summary

    def _write_manifest(self, summary: RunSummary) -> None:
        columns = [*row_columns(self.pairs), "shard", "maps_row", "image_file"]
        for pair in self.pairs:
            columns += [pair.col(c) for c in ("maps_file", "overlay_pred", "overlay_true")]
        doc = {
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": "run",
            "fingerprint": self.fingerprint,
            "format": FORMAT_VERSION,
            "model": self.model.manifest(),
            "dataset": {"source": self.dataset.source, "kind": self.dataset.kind, "samples": len(self.dataset)},
            "settings": self.settings.as_dict(),
            "shard_size": self.shard_size,
            "pairs": [
                {"method": p.method, "layer": p.layer, "variant": dict(p.variant), "key": p.key} for p in self.pairs
            ],
            "files": {
                "results": "results.parquet",
                "summary": "summary.json",
                "config": "run.json",
                "maps": "maps/<method>@<layer>/shard-NNNNNN.npy: float32 (rows, 2, h, w) raw maps; row = maps_row",
                "overlays": f"overlays/NNNNNN/<index>.image.{self.store.picture_suffix}, "
                f"<index>.<method>@<layer>.pred.{self.store.picture_suffix} / .true.{self.store.picture_suffix}",
            },
            "columns": columns,
            "summary": summary.as_dict(),
            "versions": environment_versions(),
            "extra": self.extra,
        }
        atomic_write_json(self.root / "manifest.json", doc)


def run_dataset(
    run_dir: str | os.PathLike[str],
    dataset: Dataset,
    model: LoadedModel,
    settings: RunSettings | None = None,
    *,
    shard_size: int = 256,
    batch_size: int = 16,
    workers: int | None = None,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
    extra: Mapping[str, Any] | None = None,
    execution: Execution | None = None,
    engine: str = "local",
    ray: RayOptions | None = None,
) -> RunSummary:
    """Run (or continue) a dataset run in ``run_dir``; see :class:`DatasetRun` for the arguments.

    Args:
        run_dir: The run folder.
        dataset: The samples.
        model: The model.
        settings: What to compute.
        shard_size: Images per committed shard.
        batch_size: Images per forward/backward.
        workers: Decoding processes of the local engine.
        overwrite: Start over (see :class:`DatasetRun`).
        progress: ``progress(completed, total)`` callback.
        extra: Notes stored in ``run.json`` and the manifest.
        execution: How each batch runs (:class:`cnnlens.Execution`).
        engine: ``"local"`` (this process, decoding in ``workers`` processes) or ``"ray"`` (Ray Data on a
            cluster, see :mod:`cnnlens.runs.ray_engine`): the same run folder and fingerprint either way, so a run
            started with one engine can be finished with the other.
        ray: The Ray engine's options (address, actors, GPUs, storage, model loader).

    Returns:
        The :class:`RunSummary`, also written to ``run_dir/summary.json``.
    """
    if engine not in ("local", "ray"):
        raise RunError(f"--engine must be 'local' or 'ray', got {engine!r}.")
    if engine == "local" and ray is not None:
        raise RunError("ray= options apply to engine='ray': pass engine='ray', or drop ray= for a local run.")
    if engine == "ray" and workers is not None:
        raise RunError(
            "workers= sets the local engine's decoding processes; with engine='ray' decoding runs in Ray's "
            "read stage: drop workers= (RayOptions(actors=...) sets the explaining actors)."
        )
    if engine == "ray":
        from cnnlens.runs.ray_engine import RayOptions, check_cluster, execute_ray, ray_session

        options = ray or RayOptions()
        options.validate()
        with ray_session(options.address, timeout=options.connect_timeout_s):
            check_cluster(options)  # before the run folder is touched
            with DatasetRun(
                run_dir, dataset, model, settings, shard_size=shard_size, overwrite=overwrite, extra=extra
            ) as run:
                return execute_ray(run, options, batch_size=batch_size, progress=progress, execution=execution)
    with DatasetRun(run_dir, dataset, model, settings, shard_size=shard_size, overwrite=overwrite, extra=extra) as run:
        return run.execute(batch_size=batch_size, workers=workers, progress=progress, execution=execution)
