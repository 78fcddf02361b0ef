"""Background jobs (activation maximisation) with progress and cancellation.

Jobs run one at a time on one worker thread, each on its own copy of the model (made once per model): the
optimisation holds hooks on its model for seconds, and the explain view keeps answering from the original
meanwhile. Cancelling sets a flag that the progress callback checks after every optimisation step, so a job
stops within one step; the capture's ``finally`` removes its hooks as for any other error.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cnnlens.errors import CnnlensError
from cnnlens.models import LoadedModel
from cnnlens.serve.config import ApiError, not_found
from cnnlens.serve.models import ModelHub, ServedModel
from cnnlens.serve.render import png
from cnnlens.viz.grids import mosaic

__all__ = ["Job", "JobManager"]

log = logging.getLogger("cnnlens.serve")

MAX_STEPS = 2048
MAX_CHANNELS = 64


class _CancelledError(Exception):
    """Raised from the progress callback to stop a cancelled job between two steps."""


@dataclass
class Job:
    """One background job and what the API reports of it."""

    id: str
    kind: str
    state: str = "queued"
    progress: float = 0.0
    message: str = "waiting for the worker"
    result: bytes | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    started: float = 0.0

    def body(self) -> dict[str, Any]:
        """``GET /api/jobs/{id}``."""
        return {
            "job_id": self.id,
            "kind": self.kind,
            "state": self.state,
            "progress": round(self.progress, 4),
            "message": self.message,
            "result_url": f"/api/jobs/{self.id}/result.png" if self.result is not None else None,
        }


class JobManager:
    """Queues jobs on one worker thread; keeps the last ``capacity`` jobs."""

    def __init__(self, hub: ModelHub, capacity: int = 32) -> None:
        self.hub = hub
        self.capacity = capacity
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._copies: dict[str, LoadedModel] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cnnlens-job")

    def shutdown(self) -> None:
        """Cancel every job and stop the worker."""
        with self._lock:
            for job in self._jobs.values():
                job.cancel.set()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def get(self, job_id: str) -> Job:
        """The job of ``job_id``.

        Raises:
            ApiError: Unknown id (404).
        """
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise not_found("job", job_id, "start a job with POST /api/jobs/maximize.")
        return job

    def cancel(self, job_id: str) -> Job:
        """Ask a job to stop; a queued job is cancelled at once, a running one after its current step."""
        job = self.get(job_id)
        job.cancel.set()
        if job.state == "queued":
            job.state, job.message = "cancelled", "cancelled before it started"
        return job

    def maximize(self, request: Mapping[str, Any]) -> Job:
        """``POST /api/jobs/maximize``: validate, queue, return the job.

        Raises:
            ApiError: Unknown model or layer, bad channels or steps (400/404).
        """
        served = self.hub[request.get("model")]
        layer = str(request.get("layer") or served.default_layer())
        names = {name for name, _ in served.get().module.named_modules() if name}
        if layer not in names:
            raise ApiError("unknown_layer", f"model {served.id!r} has no layer {layer!r}.", "use GET /api/layers.")
        channels = request.get("channels")
        channels = [0] if channels is None else channels
        if (
            not isinstance(channels, list)
            or not 1 <= len(channels) <= MAX_CHANNELS
            or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in channels)
        ):
            raise ApiError(
                "bad_channels",
                f"channels must be a list of 1..{MAX_CHANNELS} non-negative integers, got {channels!r}.",
                "send e.g. [0, 1, 2].",
            )
        steps = request.get("steps", 64)
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
            raise ApiError("bad_steps", f"steps must be an integer in 1..{MAX_STEPS}, got {steps!r}.", "send 64.")
        size = request.get("size", 128)
        if isinstance(size, bool) or not isinstance(size, int) or not 16 <= size <= 512:
            raise ApiError("bad_size", f"size must be an integer in 16..512, got {size!r}.", "send 128.")
        job = Job(uuid.uuid4().hex, "maximize")
        with self._lock:
            self._jobs[job.id] = job
            while len(self._jobs) > self.capacity:
                old_id, old = next(iter(self._jobs.items()))
                if old.state in ("queued", "running"):
                    break
                del self._jobs[old_id]
        self._pool.submit(self._run_maximize, job, served, layer, list(channels), steps, size)
        return job

    def _copy(self, served: ServedModel) -> LoadedModel:
        """A private copy of the model for jobs (the explain view keeps the original)."""
        if served.id not in self._copies:
            with served.lock:
                loaded = served.get()
                self._copies[served.id] = dataclasses.replace(loaded, module=copy.deepcopy(loaded.module))
        return self._copies[served.id]

    def _run_maximize(
        self, job: Job, served: ServedModel, layer: str, channels: list[int], steps: int, size: int
    ) -> None:
        from cnnlens.views import maximize

        if job.cancel.is_set():
            job.state, job.message = "cancelled", "cancelled before it started"
            return
        job.state, job.started, job.message = "running", time.perf_counter(), f"optimising {len(channels)} image(s)"

        def progress(done: int, total: int) -> None:
            job.progress = done / max(1, total)
            job.message = f"step {done} of {total}"
            if job.cancel.is_set():
                raise _CancelledError

        try:
            model = self._copy(served)
            result = maximize(model, layer, channels, steps=steps, size=size, progress=progress, max_batch=8)
            tiles = np.stack([result.uint8(i).numpy() for i in range(len(result.keys))])
            image, _ = mosaic(tiles, gap=2)
            job.result = png(image)
            job.state, job.progress = "done", 1.0
            job.message = f"done in {time.perf_counter() - job.started:.1f} s"
        except _CancelledError:
            job.state, job.message = "cancelled", f"cancelled at {job.progress:.0%}"
        except CnnlensError as exc:
            job.state, job.message = "error", str(exc)
        except Exception as exc:  # a job must end in a state, never kill the worker
            log.exception("job %s failed", job.id)
            job.state, job.message = "error", f"{type(exc).__name__}: {exc}"
