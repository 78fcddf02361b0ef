"""Execution apart from maths: how a call runs never changes what it returns, and nothing outlives a call.

The same call twice gives bitwise identical maps and scores even when the machine is busy in between and
during the second call (a thread competing for torch's intra-op pool and a process spinning a core): chunk
sizes are a pure function of shapes, budget and ``Execution.chunk_size`` (no wall-clock tuning, no
remembered measurements), so batched kernels see the same batches both times.
"""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest
import torch
from tests.nets import hook_count, seeded
from torch import nn

import cnnlens
from cnnlens import metrics
from cnnlens.execution import Execution
from cnnlens.metrics import MetricOptions


def _net() -> nn.Module:
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )
    return seeded(net, seed=3, dtype=torch.float32)


class _Busy:
    """A thread doing float32 matmuls through torch's thread pool, and a process spinning one core."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._process: subprocess.Popen[bytes] | None = None
        self.rounds = 0

    def _spin(self) -> None:
        a = torch.randn(256, 256)
        while not self._stop.is_set():
            a = torch.tanh(a @ a)
            self.rounds += 1

    def __enter__(self) -> _Busy:
        self._process = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        if self._process is not None:
            self._process.kill()
            self._process.wait(timeout=30)


def _call(net: nn.Module, x: torch.Tensor, sizes: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Score-CAM and Grad-CAM maps and the deletion scores of one fixed call; batch sizes seen are logged."""
    handle = net.register_forward_pre_hook(lambda _m, args: sizes.append(int(args[0].shape[0])))
    try:
        # a small budget forces several chunks, so chunk boundaries matter
        ex = Execution(memory_budget_mb=2)
        res = cnnlens.explain(net, x, methods=["scorecam", "gradcam"], layers=["3"], targets=[1, 4], execution=ex)
        maps = [e.raw for e in res] + [e.maps for e in res]
        curve = metrics.deletion(net, x, res["gradcam", "3"], step=16, options=MetricOptions(execution=ex))
        scores = [curve.scores, curve.auc] + [e.scores for e in res]
    finally:
        handle.remove()
    return maps, scores


@pytest.fixture
def inputs() -> torch.Tensor:
    return torch.randn(2, 3, 24, 24, generator=torch.Generator().manual_seed(11))


def test_same_call_twice_is_bitwise_identical_under_load(inputs: torch.Tensor) -> None:
    net = _net()
    first_sizes: list[int] = []
    first = _call(net, inputs, first_sizes)
    with _Busy() as busy:
        while busy.rounds < 3:  # busy before the second call starts, and during it
            threading.Event().wait(0.01)
        second_sizes: list[int] = []
        second = _call(net, inputs, second_sizes)
    assert busy.rounds >= 3
    assert len(set(first_sizes)) > 2, first_sizes  # several chunk sizes: the test exercises chunking
    assert second_sizes == first_sizes  # the same batches reached the model
    for a, b in zip(first[0] + first[1], second[0] + second[1], strict=True):
        assert torch.equal(a, b)
    assert hook_count(net) == 0


def test_execution_knobs_are_not_method_options(inputs: torch.Tensor) -> None:
    net = _net()
    res = cnnlens.explain(net, inputs, methods=["scorecam", "ablationcam"], layers=["3"])
    for exp in res:
        for knob in ("channels_last", "batch_budget_mb", "chunk_size", "batch_size"):
            assert knob not in exp.variant, (exp.method, exp.variant)
    for method, knob in (("scorecam", "chunk_size"), ("ablationcam", "batch_budget_mb")):
        with pytest.raises(ValueError, match=knob):
            cnnlens.explain(net, inputs, methods=[method], layers=["3"], options={method: {knob: 4}})
    assert hook_count(net) == 0


def test_chunk_size_and_layout_do_not_change_ablationcam_beyond_rounding(inputs: torch.Tensor) -> None:
    net = _net()
    ref = cnnlens.explain(net, inputs, methods=["ablationcam"], layers=["3"])["ablationcam", "3"]
    for ex in (Execution(chunk_size=1), Execution(memory_budget_mb=0.01), Execution(memory_format="channels_last")):
        got = cnnlens.explain(net, inputs, methods=["ablationcam"], layers=["3"], execution=ex)["ablationcam", "3"]
        assert float((got.raw - ref.raw).abs().max()) <= 1e-4 * float(ref.raw.abs().max()), ex
