"""The capture package: its public names, the one scope object, arguments checked before any state, no hidden
state (replayer and memo are explicit attributes), and the explicit channels-last layout."""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.nets import GapHead, Residual, hook_count, seeded
from torch import nn

import cnnlens
from cnnlens.capture import (
    ModelScope,
    Probe,
    capture,
    differentiable_capture,
    forward_only,
    probe_layers,
    record,
    replay_path,
)
from cnnlens.errors import InputShapeError, LayerError, LayerNotFoundError, ModelTypeError, OptionError
from cnnlens.execution import Execution

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "cnnlens" / "capture"
SRC = PACKAGE.parent


def _x(n: int = 2, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(5), dtype=dtype)


def _state(model: nn.Module) -> tuple[list[bool], list[bool], int]:
    return [m.training for m in model.modules()], [p.requires_grad for p in model.parameters()], hook_count(model)


def _mixed(model: nn.Module) -> nn.Module:
    """Training mode with one module in eval mode and one frozen parameter: a state that must come back as is."""
    model.train()
    next(iter(model.children())).eval()
    next(model.parameters()).requires_grad_(False)
    return model


# -- the package's names ---------------------------------------------------------------------------------------


def test_all_is_complete_and_every_name_imported_from_the_capture_resolves() -> None:
    module = sys.modules["cnnlens.capture"]
    exported = set(module.__all__)
    assert {"forward_only", "differentiable_capture", "ModelScope", "Probe", "replay_rows"} <= exported
    assert all(hasattr(module, name) for name in exported)
    public = {n for n, v in vars(module).items() if not n.startswith("_") and getattr(v, "__module__", "") != ""}
    defined_here = {n for n in public if getattr(getattr(module, n), "__module__", "").startswith("cnnlens.capture")}
    assert defined_here <= exported, defined_here - exported
    # every `from cnnlens.capture import ...` in the code base, the tests and the benchmarks still works
    imported: set[str] = set()
    root = SRC.parents[1]
    for folder in ("src", "tests", "bench"):
        for path in (root / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ImportFrom) and node.module == "cnnlens.capture":
                    imported |= {alias.name for alias in node.names}
    assert imported, "the scan found no import (wrong root?)"
    assert all(hasattr(module, name) for name in imported), sorted(n for n in imported if not hasattr(module, n))


def test_modules_and_functions_stay_small() -> None:
    for path in PACKAGE.glob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert len(text.splitlines()) <= 450, path.name
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                assert node.end_lineno is not None
                assert node.end_lineno - node.lineno + 1 <= 80, (path.name, node.name)


def test_no_state_is_stashed_through_dunder_dict_and_no_process_wide_cache() -> None:
    for path in PACKAGE.glob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert "__dict__" not in text, path.name
        assert "WeakKeyDictionary" not in text and "WeakSet" not in text, path.name
        assert "_NO_CHANNELS_LAST" not in text, path.name


# -- ModelScope ------------------------------------------------------------------------------------------------


def test_model_scope_restores_every_flag_and_handle_also_when_the_block_raises() -> None:
    net = _mixed(GapHead())
    before = _state(net)
    seen: list[bool] = []
    inside: list[tuple[list[bool], list[bool], int]] = []

    def block() -> None:
        with ModelScope(net, freeze_parameters=True) as scope:
            scope.add_forward_hook(
                net.get_submodule("body.0"), lambda module, args, output: seen.append(module.training)
            )
            net(_x(1, torch.float32))
            inside.append(_state(net))
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        block()
    assert seen == [False]
    assert not any(inside[0][0]) and not any(inside[0][1]) and inside[0][2] == 1
    assert _state(net) == before


def test_model_scope_checks_its_arguments_and_refuses_reentry() -> None:
    net = GapHead().train()
    with pytest.raises(ModelTypeError, match=r"torch\.nn\.Module"):
        ModelScope("resnet")  # type: ignore[arg-type]
    with pytest.raises(OptionError, match="freeze_parameters"):
        ModelScope(net, freeze_parameters="yes")  # type: ignore[arg-type]
    scope = ModelScope(net)
    with pytest.raises(LayerError, match="active scope"):
        scope.add_forward_hook(net.fc, lambda module, args, output: None)
    with scope, pytest.raises(LayerError, match="already active"):
        scope.__enter__()
    assert net.training and hook_count(net) == 0


def test_an_eval_mode_model_is_not_rewritten() -> None:
    # The scope snapshots and switches only a model with a module in training mode (eval() costs ~1 ms on big
    # models): an eval-mode model's flags are never written.
    net = GapHead().eval()
    writes: list[str] = []
    original = nn.Module.__setattr__

    def spy(self: nn.Module, name: str, value: Any) -> None:
        if name == "training":
            writes.append(type(self).__name__)
        original(self, name, value)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(nn.Module, "__setattr__", spy)
        with capture(net, ["body.4"]) as cap:
            cap.run(_x(1, torch.float32), targets=0)
    assert writes == []


@pytest.mark.parametrize("kind", ["capture", "differentiable", "forward_only", "probe_layers"])
def test_every_entry_point_restores_the_model_after_a_failing_forward(kind: str) -> None:
    net = _mixed(GapHead())
    before = _state(net)
    bad = torch.randn(1, 5, 8, 8)  # 5 channels: the first conv raises

    def attempt() -> None:
        if kind == "capture":
            with capture(net, ["body.4"]) as cap:
                cap.run(bad)
        elif kind == "differentiable":
            with differentiable_capture(net, ["body.4"]) as dcap:
                dcap.run_graph(bad)
        elif kind == "forward_only":
            with forward_only(net) as fcap:
                fcap.forward(bad)
        else:
            probe_layers(net, (5, 8, 8))

    with pytest.raises(RuntimeError, match="channels"):
        attempt()
    assert _state(net) == before


# -- arguments checked before any state --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda net: capture(net, ["body.9"]), LayerNotFoundError, "Did you mean"),
        (lambda net: capture(net, []), LayerNotFoundError, "no layer given"),
        (lambda net: capture(net, 3), LayerNotFoundError, "sequence"),  # type: ignore[arg-type]
        (lambda net: capture(net, ["body.4"], execution="channels_last"), OptionError, r"cnnlens\.Execution"),  # type: ignore[arg-type]
        (lambda net: capture(net, ["body.4"], output_selector="logits"), OptionError, "output_selector"),  # type: ignore[arg-type]
        (lambda net: capture("net", ["body.4"]), ModelTypeError, r"torch\.nn\.Module"),  # type: ignore[arg-type]
        (lambda net: forward_only(net, execution=Execution).__enter__(), OptionError, r"cnnlens\.Execution"),  # type: ignore[arg-type]
        (lambda net: differentiable_capture(net, ["body.4"], stop_early="yes"), OptionError, "stop_early"),  # type: ignore[arg-type]
        (lambda net: probe_layers(net, (3, "a", 8)), InputShapeError, "input_size"),  # type: ignore[arg-type]
        (lambda net: probe_layers(net, (3, 8)), InputShapeError, "input_size"),
        (lambda net: probe_layers(object(), (3, 8, 8)), ModelTypeError, r"torch\.nn\.Module"),  # type: ignore[arg-type]
    ],
)
def test_bad_arguments_are_refused_before_the_model_is_touched(call: Any, error: type, match: str) -> None:
    net = _mixed(GapHead())
    before = _state(net)
    with pytest.raises(error, match=match):
        call(net)
    assert _state(net) == before


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"relu_backward": "bogus"}, "relu_backward"),
        ({"gradients": "yes"}, "gradients"),
        ({"input_gradients": 1}, "input_gradients"),
    ],
)
def test_run_refuses_bad_options_before_recording(kwargs: dict[str, Any], match: str) -> None:
    net = seeded(GapHead(), seed=1)
    calls: list[int] = []
    net.register_forward_pre_hook(lambda module, args: calls.append(1))
    with capture(net, ["body.4"]) as cap:
        with pytest.raises(OptionError, match=match):
            cap.run(_x(), **kwargs)
        assert calls == [] and not cap._recording
        with pytest.raises(OptionError, match=r"cnnlens\.Execution"):
            cap.forward(_x(), execution="contiguous")  # type: ignore[arg-type]
        assert calls == []


# -- explicit state: the replayer and the probe's memo -------------------------------------------------------------


def test_the_replayer_is_an_explicit_attribute_of_the_capture_and_holds_no_capture() -> None:
    net = seeded(Residual(), seed=3)
    x = _x(2)
    with capture(net, ["bn1"]) as cap:
        rec = cap.run(x, gradients=False)
        attributes = set(vars(cap))
        assert cap._replayer is None  # created on first use only
        act = rec.activations["bn1"]
        out = cap.replay("bn1", act, [0, 1], inputs=x, logits=rec.logits)
        replayer = cap.replayer
        assert set(vars(cap)) == attributes  # nothing added behind the class's back
        assert replay_path(cap, "bn1")[0] in ("fx", "hooks") and "bn1" in replayer.plans
        cap.replay("bn1", act, [0, 1], inputs=x)
        assert cap.replayer is replayer  # the same plans for the life of the capture
        assert all(v is not cap for v in vars(replayer).values())  # no reference cycle through the replayer
    torch.testing.assert_close(out, rec.logits)


def test_the_probe_memo_is_an_explicit_attribute_computed_once_per_key() -> None:
    net = seeded(GapHead(), seed=4)
    with capture(net, ["body.4"]) as cap:
        rec = cap.run(_x(), targets=0)
        probe = Probe(cap, rec, rec.targets)
        attributes = set(vars(probe))
        calls: list[int] = []

        def compute() -> int:
            calls.append(1)
            return 40 + len(calls)

        first = probe.memo("k", compute)
        again = probe.memo("k", compute)
        other = probe.memo("other", compute)
        assert (first, again, other, calls) == (41, 41, 42, [1, 1])
        assert set(vars(probe)) == attributes


# -- explicit memory layout ------------------------------------------------------------------------------------------


class _Records(nn.Module):
    """Records whether each input it sees is channels-last."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)
        self.channels_last: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.channels_last.append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
        return self.fc(self.conv(x).mean((2, 3)))


def test_the_layout_is_what_the_execution_says_and_forward_overrides_it_per_call() -> None:
    net = _Records()
    x = _x(2, torch.float32)
    fast = Execution(memory_format="channels_last")
    with capture(net, ["conv"], execution=fast) as cap:
        rec = cap.run(x, targets=0)
        cap.forward(x)
        cap.forward(x, execution=Execution())
    with forward_only(net) as plain:
        plain.forward(x)
        plain.forward(x, execution=fast)
    record(net, x, "conv", execution=fast)
    assert net.channels_last == [True, True, False, False, True, True]
    assert rec.activations["conv"].is_contiguous() and rec.gradients["conv"].is_contiguous()


class _TupleLayer(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, x


class _TupleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pair = _TupleLayer()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pair(self.conv(x))[0].mean((2, 3)))


def test_cnnlens_errors_inside_a_channels_last_forward_are_not_rewrapped() -> None:
    # The hook raises its own LayerError inside the channels-last forward: it passes through as it is, not as
    # the OptionError that stands for the model's own failure in channels-last format.
    net = _TupleNet()
    with (
        capture(net, ["pair"], execution=Execution(memory_format="channels_last")) as cap,
        pytest.raises(LayerError, match="not a tensor") as err,
    ):
        cap.run(_x(2, torch.float32))
    assert not isinstance(err.value, OptionError) and err.value.__cause__ is None
    assert hook_count(net) == 0
    assert cnnlens.capture is capture
