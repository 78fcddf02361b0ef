"""Background warm-up: after the first explanation of an image, extend its recording to every offered layer.

The first request captures only the requested layer and the offered layers after it, so that it costs what
:func:`cnnlens.explain` costs. Clicking an *earlier* layer would then need a new capture; the warm-up does that
capture in the background, once the server has been idle for ``idle_s`` seconds (no explain request started
meanwhile), so it does not compete with what a person is waiting for. Afterwards every offered layer, and
every method, is answered from the recording. A request that arrives while the warm-up runs waits for it (at
most one capture) and is then answered from the completed recording.

Only the newest ``max_pending`` recordings are queued; the others are dropped (a recording evicted meanwhile
is skipped).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

__all__ = ["Prefetcher"]

log = logging.getLogger("cnnlens.serve")

Key = tuple[str, str, int]


class Prefetcher:
    """One daemon thread that completes recordings when the server is idle.

    Args:
        complete: ``complete(model_id, image_id, class_index) -> bool``, run on the thread
            (:meth:`cnnlens.serve.engine.Engine.complete`).
        idle_s: Seconds without a new request before a warm-up starts.
        max_pending: Recordings queued at most (the newest kept).
    """

    def __init__(self, complete: Callable[[str, str, int], bool], idle_s: float = 0.4, max_pending: int = 2) -> None:
        self._complete = complete
        self.idle_s = idle_s
        self.max_pending = max_pending
        self.completed = 0
        self._pending: OrderedDict[Key, None] = OrderedDict()
        self._last = time.monotonic()
        self._running = False
        self._stop = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="cnnlens-warmup", daemon=True)
        self._thread.start()

    def touch(self) -> None:
        """Note that a request started now (the warm-up waits for ``idle_s`` of quiet)."""
        with self._cond:
            self._last = time.monotonic()

    def schedule(self, model_id: str, image_id: str, class_index: int) -> None:
        """Queue a recording for completion (the newest first)."""
        with self._cond:
            key = (model_id, image_id, class_index)
            self._pending.pop(key, None)
            self._pending[key] = None
            while len(self._pending) > self.max_pending:
                self._pending.popitem(last=False)
            self._cond.notify_all()

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Block until nothing is queued or running (for tests and benchmarks); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending or self._running:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))
        return True

    def stop(self) -> None:
        """Stop the thread (queued work is dropped)."""
        with self._cond:
            self._stop = True
            self._pending.clear()
            self._cond.notify_all()
        self._thread.join(timeout=5)

    def _next(self) -> Key | None:
        """The newest queued key once the server has been quiet for ``idle_s``; None when stopping."""
        with self._cond:
            while not self._stop:
                if self._pending:
                    quiet = time.monotonic() - self._last
                    if quiet >= self.idle_s:
                        key, _ = self._pending.popitem(last=True)
                        self._running = True
                        return key
                    self._cond.wait(self.idle_s - quiet)
                else:
                    self._cond.wait()
            return None

    def _loop(self) -> None:
        while True:
            key = self._next()
            if key is None:
                return
            try:
                if self._complete(*key):
                    self.completed += 1
            except Exception:  # a warm-up must never kill its thread
                log.exception("warm-up of %s failed", "/".join(map(str, key)))
            finally:
                with self._cond:
                    self._running = False
                    self._cond.notify_all()
