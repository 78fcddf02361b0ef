"""Shared helpers for the benchmark scripts in ``bench/`` (timing, memory, inputs, machine, tables).

Nothing here downloads anything. Timings are wall-clock (``time.perf_counter``), with calls retaken when
other processes were using the CPU meanwhile; peak memory is the resident-set high-water mark of a fresh
process (``VmHWM``, resettable, or ``ru_maxrss``), because torch's CPU allocations are invisible to
``tracemalloc``.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from typing import Any

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SAMPLE_PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")
"""scikit-image photos shipped inside its wheel (no download) used as benchmark inputs."""

# glibc returns large blocks to the OS on free when they are mmap-ed; a fixed threshold keeps it from
# raising the threshold dynamically (and then keeping freed tensors in the heap), so the peak RSS of a
# worker follows the live tensor bytes closely.
MEMORY_WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


# -- machine ------------------------------------------------------------------------------------------
def cpu_model() -> str:
    """The CPU model name from ``/proc/cpuinfo`` (or ``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def versions(dists: Sequence[str]) -> dict[str, str]:
    """Installed versions of the given distributions ("-" when missing)."""
    out = {}
    for dist in dists:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "-"
    return out


def machine_info(dists: Sequence[str] = ("torch", "torchvision", "timm")) -> dict[str, Any]:
    """Where and when a benchmark ran: CPU, cores, threads, load, versions, local date."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "date": datetime.now(timezone.utc).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "loadavg_1_5_15": [round(v, 2) for v in load],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions(dists),
    }


def describe_machine(info: Mapping[str, Any]) -> str:
    """One paragraph of :func:`machine_info` for the console."""
    vers = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    return (
        f"{info['date']} | {info['cpu']} | {info['cores']} cores | torch threads {info['torch_threads']} "
        f"(interop {info['torch_interop_threads']}) | load avg {info['loadavg_1_5_15']} | "
        f"Python {info['python']} | {vers}"
    )


# -- inputs -------------------------------------------------------------------------------------------
def sample_batch(
    batch: int,
    size: tuple[int, int] = (224, 224),
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    seed: int = 0,
) -> torch.Tensor:
    """A normalised ``(batch, 3, H, W)`` float32 batch of real photos (cycled), resized to ``size``.

    Uses the scikit-image sample photos (in its wheel, never downloaded); falls back to seeded noise when
    scikit-image is missing. Real photos give trained models realistic gradient magnitudes.
    """
    try:
        from skimage import data as skdata
    except ImportError:
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(batch, 3, *size, generator=gen)
    images = []
    for i in range(batch):
        photo = torch.from_numpy(getattr(skdata, SAMPLE_PHOTOS[i % len(SAMPLE_PHOTOS)])().copy())
        img = photo.permute(2, 0, 1)[None].float() / 255.0
        img = torch.nn.functional.interpolate(img, size=size, mode="bilinear", antialias=True)
        images.append(img[0].clamp(0, 1))
    x = torch.stack(images)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return ((x - m) / s).contiguous()


# -- timing -------------------------------------------------------------------------------------------
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _busy_ticks() -> tuple[int, int] | None:
    """(CPU ticks spent busy by the whole machine incl. steal, ticks spent by this process), or None."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            fields = [int(v) for v in fh.readline().split()[1:]]
        with open("/proc/self/stat", encoding="ascii") as fh:
            own = fh.read().rsplit(")", 1)[1].split()
    except (OSError, ValueError, IndexError):
        return None
    # user nice system idle iowait irq softirq steal ...
    busy = fields[0] + fields[1] + fields[2] + fields[5] + fields[6] + (fields[7] if len(fields) > 7 else 0)
    return busy, int(own[11]) + int(own[12])  # utime + stime of all threads


class ContentionMonitor:
    """Measures how much CPU *other* processes (and the hypervisor, as steal) used during a call.

    On a shared machine an OpenMP forward whose threads get preempted can run 10x slower; a sample taken
    while someone else was busy is not a measurement of the code. Uses ``/proc/stat`` (10 ms ticks);
    on systems without it every call counts as clean.
    """

    def __init__(self, max_foreign_cores: float = 0.25, min_foreign_s: float = 0.03) -> None:
        self.max_foreign_cores = max_foreign_cores
        self.min_foreign_s = min_foreign_s
        self._start: tuple[int, int] | None = None

    def start(self) -> None:
        self._start = _busy_ticks()

    def foreign_seconds(self) -> float:
        end = _busy_ticks()
        if self._start is None or end is None:
            return 0.0
        return max(0, (end[0] - self._start[0]) - (end[1] - self._start[1])) / _TICK

    def contended(self, foreign_s: float, wall_s: float) -> bool:
        return foreign_s > max(self.min_foreign_s, self.max_foreign_cores * wall_s)


@dataclass
class Timing:
    """Seconds of repeated calls of one callable, and how many samples were retaken because of contention."""

    samples: list[float]
    retaken: int = 0
    contended_kept: int = 0

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def minimum(self) -> float:
        return min(self.samples)

    @property
    def iqr(self) -> float:
        """Inter-quartile range (0 with fewer than 4 samples)."""
        if len(self.samples) < 4:
            return 0.0
        q = statistics.quantiles(self.samples, n=4)
        return q[2] - q[0]

    def as_dict(self) -> dict[str, Any]:
        return {
            "median_s": self.median,
            "min_s": self.minimum,
            "iqr_s": self.iqr,
            "samples_s": self.samples,
            "retaken_for_contention": self.retaken,
            "contended_samples_kept": self.contended_kept,
        }


def wait_for_quiet(
    monitor: ContentionMonitor, max_wait: float, window: float = 0.2, max_foreign_cores: float = 0.15
) -> float:
    """Sleep until other processes leave the CPU nearly idle for ``window`` seconds; return seconds waited."""
    start = time.perf_counter()
    while time.perf_counter() - start < max_wait:
        monitor.start()
        time.sleep(window)
        if monitor.foreign_seconds() <= max_foreign_cores * window:
            break
    return time.perf_counter() - start


@dataclass
class WaitBudget:
    """Total seconds :func:`time_round_robin` may spend waiting for a quiet machine (shared by calls)."""

    seconds: float
    spent: float = 0.0

    @property
    def left(self) -> float:
        return max(0.0, self.seconds - self.spent)


def time_round_robin(
    calls: Mapping[str, Callable[[], object]],
    *,
    warmup: int,
    repeats: int,
    max_retakes: int = 6,
    budget: WaitBudget | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Timing]:
    """Time every callable ``repeats`` times, interleaved round by round, after ``warmup`` calls each.

    Interleaving spreads slow phases of the machine over all methods instead of penalising whichever method
    happened to run during them. A call during which other processes used more than a quarter of a core
    (see :class:`ContentionMonitor`) is retaken, at most ``max_retakes`` times, each time after waiting for
    the machine to be quiet (out of the shared ``budget`` of waiting time, 120 s if not given); when retakes
    or the budget run out the contended sample is kept and counted in ``contended_kept``.
    """
    budget = budget if budget is not None else WaitBudget(120.0)
    for name, fn in calls.items():
        if progress:
            progress(f"warm-up {name}")
        for _ in range(warmup):
            fn()
    monitor = ContentionMonitor()
    timings = {name: Timing([]) for name in calls}
    for r in range(repeats):
        if progress:
            progress(f"round {r + 1}/{repeats}")
        for name, fn in calls.items():
            timing = timings[name]
            for attempt in range(max_retakes + 1):
                monitor.start()
                start = time.perf_counter()
                fn()
                wall = time.perf_counter() - start
                if not monitor.contended(monitor.foreign_seconds(), wall):
                    break
                if attempt == max_retakes or budget.left <= 0:
                    timing.contended_kept += 1
                    break
                timing.retaken += 1
                budget.spent += wait_for_quiet(monitor, min(budget.left, 30.0))
            timing.samples.append(wall)
    return timings


# -- memory -------------------------------------------------------------------------------------------
def _status_mib(key: str) -> float | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset this process's resident-set high-water mark (Linux ``/proc/self/clear_refs``); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


def peak_rss_mib() -> float:
    """This process's resident-set high-water mark in MiB.

    Linux: ``VmHWM`` of ``/proc/self/status`` (resettable with :func:`reset_peak_rss`, and not inherited
    from the parent, unlike ``ru_maxrss`` which survives ``fork``/``exec``); elsewhere ``ru_maxrss``.
    """
    hwm = _status_mib("VmHWM")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def run_worker(argv: Sequence[str], *, timeout: float = 600.0) -> dict[str, Any]:
    """Run ``python argv...`` in a fresh process with :data:`MEMORY_WORKER_ENV`; parse its last stdout line.

    The worker must print one JSON object as its last line of output.
    """
    env = {**os.environ, **MEMORY_WORKER_ENV}
    proc = subprocess.run(
        [sys.executable, *argv], capture_output=True, text=True, env=env, timeout=timeout, check=False
    )
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"error": f"worker exited with {proc.returncode}: " + " | ".join(tail)}
    lines = [line for line in proc.stdout.strip().splitlines() if line.startswith("{")]
    if not lines:
        return {"error": "worker printed no JSON"}
    result: dict[str, Any] = json.loads(lines[-1])
    return result


# -- tables -------------------------------------------------------------------------------------------
def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None) -> str:
    """A Markdown table (readable as plain text too). ``align``: one of ``l``/``r`` per column."""
    align = align or "l" + "r" * (len(headers) - 1)
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows, strict=False)]

    def line(cells: Sequence[str]) -> str:
        out = []
        for cell, width, a in zip(cells, widths, align, strict=False):
            out.append(str(cell).ljust(width) if a == "l" else str(cell).rjust(width))
        return "| " + " | ".join(out) + " |"

    rule = (
        "|"
        + "|".join(("-" * (w + 1) + ":" if a == "r" else "-" * (w + 2)) for w, a in zip(widths, align, strict=False))
        + "|"
    )
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def fmt_seconds(seconds: float) -> str:
    """Seconds with three significant digits, in ms below one second."""
    if seconds != seconds:  # NaN
        return "-"
    return f"{seconds * 1000:.3g} ms" if seconds < 1 else f"{seconds:.3g} s"
