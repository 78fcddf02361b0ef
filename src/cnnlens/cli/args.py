"""Checking ``cnnlens`` arguments right after parsing, before any model is loaded or anything computed.

Everything here is cheap: the checks that need torch (the device) or matplotlib (the colour map) import
them on use, and nothing loads a model. Every failure is a :class:`~cnnlens.errors.UsageError` (or the
registry's own ``MethodNotFoundError``/``MethodError``) whose message names the flag, what was received and
the valid values.

Example:
    >>> parse_options(["gradcampp.alpha_normalize=yes"], ["gradcampp"])
    {'gradcampp': {'alpha_normalize': True}}
"""

from __future__ import annotations

import difflib
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from rich.progress import TaskID

from cnnlens.errors import UsageError

__all__ = [
    "LineProgress",
    "check_cmap",
    "check_device",
    "check_out_dir",
    "check_range",
    "parse_bool",
    "parse_layout_args",
    "parse_options",
    "resolve_device",
    "resolve_method_ids",
]

_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})
_DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def parse_bool(text: str, *, what: str) -> bool:
    """``true/false/1/0/yes/no/on/off`` (any case) as a bool; anything else is refused.

    Example:
        >>> parse_bool("No", what="x")
        False
    """
    low = text.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise UsageError(f"{what} is a boolean option; received {text!r}. Use true or false (also 1/0, yes/no, on/off).")


def _typed(text: str, default: Any, *, what: str) -> Any:
    """Parse ``text`` as the type of the option's declared ``default``."""
    if isinstance(default, bool):
        return parse_bool(text, what=what)
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            raise UsageError(f"{what} takes an integer (default {default}); received {text!r}.") from None
    if isinstance(default, float):
        try:
            value = float(text)
        except ValueError:
            raise UsageError(f"{what} takes a number (default {default}); received {text!r}.") from None
        if not math.isfinite(value):
            raise UsageError(f"{what} takes a finite number (default {default}); received {text!r}.")
        return value
    if default is None:
        if text.strip().lower() in {"none", "null", ""}:
            return None
        for cast in (int, float):
            try:
                number = cast(text)
            except ValueError:
                continue
            if isinstance(number, float) and not math.isfinite(number):
                break
            return number
        raise UsageError(f"{what} takes a number or none (default none); received {text!r}.")
    return text


def resolve_method_ids(methods: Sequence[str]) -> list[str]:
    """The registered ids of ``--method`` values (``all`` expands), with "did you mean" for unknown ones.

    Raises:
        MethodNotFoundError: An unknown method id.
    """
    from cnnlens.methods.registry import resolve_methods

    return [spec.id for spec in resolve_methods(list(methods))]


def parse_options(items: Sequence[str], methods: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    """Parse ``--option METHOD.KEY=VALUE`` items, each typed and checked against the method's declared options.

    A value is parsed as the type of the option's default: booleans strictly (``true/false/1/0/yes/no``),
    integers, finite numbers, ``none`` or a number for options that default to none, text otherwise. Display
    rules (``display=abs|signed|relu``) are checked by the method's own rule.

    Args:
        items: The ``--option`` values.
        methods: The requested method ids (registered ids); an option for another method is refused.
            None skips that check.

    Returns:
        ``{method_id: {key: value}}``.

    Raises:
        UsageError: Malformed item, wrong type, or an option for a method not requested.
        MethodNotFoundError: Unknown method.
        MethodError: Unknown option name (the message lists the method's options) or invalid display rule.
    """
    from cnnlens.methods.registry import get_method

    options: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        method, dot, name = key.partition(".")
        if not sep or not dot or not method or not name:
            raise UsageError(
                f"--option {item!r} is not METHOD.KEY=VALUE; e.g. --option gradcampp.alpha_normalize=true "
                "(`cnnlens methods` lists each method's options)."
            )
        spec = get_method(method.strip())
        defaults = spec.variant()
        if name not in defaults:
            spec.variant({name: None})  # raises MethodError listing the method's options
        options.setdefault(spec.id, {})[name] = _typed(value, defaults[name], what=f"--option {spec.id}.{name}")
    for method_id, opts in options.items():
        get_method(method_id).variant(opts)  # the method's own checks (display rules)
    if methods is not None:
        extra = sorted(set(options) - set(methods))
        if extra:
            raise UsageError(
                f"--option was given for {', '.join(extra)}, which --method does not request "
                f"(requested: {', '.join(methods)}); add it to --method or drop the option."
            )
    return options


def parse_layout_args(items: Sequence[str]) -> str | dict[str, str] | None:
    """Check ``--layout`` items: one ``SPEC`` for every explained layer, or ``LAYER=SPEC`` items, one per layer.

    A ``SPEC`` is a layout text of :func:`cnnlens.capture.layout.parse_layout`: ``auto``, ``nchw``, ``nhwc``,
    ``ncdhw``, ``tokens``, ``tokens:P`` (P prefix tokens, grid inferred) or ``tokens:P:HxW``. Only the texts
    are checked here (before the model loads); whether a layout fits a layer's output is checked on the first
    forward, and the layer names of ``LAYER=SPEC`` with the model (layers that are not explained are refused).

    Args:
        items: The ``--layout`` values, in order.

    Returns:
        None (no ``--layout``: every layout inferred), the one ``SPEC`` text, or ``{layer: SPEC}``.

    Raises:
        UsageError: A malformed spec or item, two layouts for one layer, or a plain ``SPEC`` mixed with
            ``LAYER=SPEC`` items or given twice.

    Example:
        >>> parse_layout_args(["blocks.11.norm1=tokens:1:14x14"])
        {'blocks.11.norm1': 'tokens:1:14x14'}
    """
    from cnnlens.capture.layout import parse_layout
    from cnnlens.errors import OptionError

    plain: list[str] = []
    per_layer: dict[str, str] = {}
    for item in items:
        layer, sep, spec = item.partition("=")
        layer, spec = layer.strip(), spec.strip()
        if sep and (not layer or not spec):
            raise UsageError(f"--layout {item!r} is not LAYER=SPEC; e.g. --layout blocks.11.norm1=tokens:1:14x14.")
        text = spec if sep else layer
        try:
            parse_layout(text)
        except OptionError as exc:
            raise UsageError(f"--layout {item!r}: {exc}") from None
        if not sep:
            plain.append(text)
        elif layer in per_layer and per_layer[layer] != spec:
            raise UsageError(
                f"--layout gives layer {layer!r} two layouts ({per_layer[layer]!r} and {spec!r}); give one."
            )
        else:
            per_layer[layer] = spec
    if plain and (per_layer or len(plain) > 1):
        raise UsageError(
            f"--layout takes either one SPEC for every layer or LAYER=SPEC items; received {list(items)}. Use "
            "LAYER=SPEC for each layer whose layout you give (the others are inferred)."
        )
    if plain:
        return plain[0]
    return per_layer or None


def check_range(value: int | None, flag: str, low: int, high: int | None = None, *, why: str = "") -> None:
    """Refuse an int argument outside ``[low, high]`` with a message naming the valid range.

    Example:
        >>> check_range(0, "--show-top", 1, 1000)
        Traceback (most recent call last):
        ...
        cnnlens.errors.UsageError: --show-top must be between 1 and 1000; received 0.
    """
    if value is None:
        return
    if value < low or (high is not None and value > high):
        valid = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise UsageError(f"{flag} must be {valid}{why}; received {value}.")


def check_device(name: str) -> None:
    """Refuse a device string that is malformed or not present on this machine (imports torch).

    Raises:
        UsageError: ``cuda`` without a usable GPU, a GPU index out of range, ``mps`` without Metal, or a
            name that is none of ``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``.
    """
    text = name.strip().lower()
    if not _DEVICE_RE.match(text):
        raise UsageError(f"--device {name!r} is not a device; use auto, cpu, cuda, cuda:N or mps.")
    if text in {"auto", "cpu"}:
        return
    import torch

    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(
                f"--device {name} was asked but torch sees no usable CUDA GPU here (torch {torch.__version__}, "
                f"built with CUDA {torch.version.cuda or 'none'}); use --device cpu or auto."
            )
        count = torch.cuda.device_count()
        index = int(text.partition(":")[2] or 0)
        if index >= count:
            raise UsageError(f"--device {name}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}.")
    elif not torch.backends.mps.is_available():
        raise UsageError(f"--device {name} was asked but Metal (MPS) is not available here; use --device cpu or auto.")


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is usable, else ``cpu``; any other (checked) name unchanged."""
    if name.strip().lower() != "auto":
        return name.strip().lower()
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_cmap(name: str, flag: str = "--cmap") -> None:
    """Refuse a colour map matplotlib does not know, with close matches.

    Raises:
        UsageError: Unknown colour map name.
    """
    import matplotlib

    known = list(matplotlib.colormaps)
    if name in known:
        return
    close = difflib.get_close_matches(name, known, n=4, cutoff=0.6)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise UsageError(
        f"{flag} {name!r} is not a matplotlib colour map.{hint} Common ones: jet, viridis, inferno, magma, turbo."
    )


def check_out_dir(path: str, flag: str = "--out") -> None:
    """Refuse an output folder that is an existing file, sits under a file, or cannot be created/written.

    Raises:
        UsageError: What is in the way and what to do instead.
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UsageError(
            f"{flag} {path!r} is an existing file, not a folder; name a folder (it is created if missing)."
        )
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise UsageError(f"{flag} {path!r} cannot be created: {str(probe)!r} is a file, not a folder.")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path!r}: no permission to write in {str(probe)!r}; choose another folder.")


class LineProgress:
    """Progress as plain lines on a stream that is not a terminal (a log file, CI, a pipe).

    It has the subset of :class:`rich.progress.Progress` the commands use (``add_task``, ``advance``,
    ``update``, context manager). Each task prints a line when it starts, a line with counts, percentage,
    elapsed time and ETA at most every ``every`` seconds, and a line when it completes.
    """

    def __init__(self, stream: IO[str] | None = None, *, every: float = 10.0) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.every = every
        self._tasks: dict[TaskID, dict[str, Any]] = {}
        self._next = 0

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        for task_id in list(self._tasks):
            self._finish(task_id)

    def _say(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **_: Any) -> TaskID:
        """Start a phase: prints ``description: started (N to do)``."""
        task_id = TaskID(self._next)
        self._next += 1
        now = time.perf_counter()
        self._tasks[task_id] = {"d": description, "total": total, "done": completed, "t0": now, "last": now}
        todo = f" ({int(total)} to do)" if total is not None else ""
        self._say(f"{description}: started{todo}")
        return task_id

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        """Count ``advance`` more units done."""
        task = self._tasks.get(task_id)
        if task is not None:
            self.update(task_id, completed=task["done"] + advance)

    def update(
        self,
        task_id: TaskID,
        *,
        completed: float | None = None,
        total: float | None = None,
        description: str | None = None,
        **_: Any,
    ) -> None:
        """Set the counts (and the description); prints a line when the phase completes or every ``every`` s."""
        task = self._tasks.get(task_id)
        if task is None:  # already reported done
            return
        if description is not None:
            task["d"] = description
        if total is not None:
            task["total"] = total
        if completed is not None:
            task["done"] = completed
        now = time.perf_counter()
        if task["total"] is not None and task["done"] >= task["total"]:
            self._finish(task_id)
        elif now - task["last"] >= self.every:
            task["last"] = now
            self._say(self._line(task, now))

    def _line(self, task: dict[str, Any], now: float) -> str:
        elapsed = now - task["t0"]
        done, total = task["done"], task["total"]
        if total:
            eta = f", ETA {elapsed / done * (total - done):.0f} s" if done else ""
            return f"{task['d']}: {int(done)}/{int(total)} ({100 * done / total:.0f}%), {elapsed:.0f} s{eta}"
        return f"{task['d']}: {int(done)} done, {elapsed:.0f} s"

    def _finish(self, task_id: TaskID) -> None:
        task = self._tasks.pop(task_id, None)
        if task is None:
            return
        elapsed = time.perf_counter() - task["t0"]
        count = f" {int(task['done'])}/{int(task['total'])}" if task["total"] is not None else ""
        self._say(f"{task['d']}: done{count} in {elapsed:.1f} s")
