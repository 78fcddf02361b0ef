"""Replay: re-run the network after a layer with replaced activations (Ablation-CAM, faithfulness metrics).

Two paths, chosen per (capture, layer) and kept in the capture's :class:`Replayer`
(:attr:`cnnlens.capture.Capture.replayer`, an explicit attribute that lives as long as the capture):

* "fx": the model is traced with torch.fx (the target module kept as one leaf call); the graph is cut at
  the target's node. The *head* (everything up to the target, plus later nodes that do not depend on it
  when no in-place op makes moving them unsafe) runs once on the original inputs and yields the values
  the *tail* needs; the tail runs on the replacement rows, with those values indexed by sample_index.
  On first use for an input batch the tail is run on the unmodified activations and must reproduce the
  real logits (max abs diff <= 1e-4 * (1 + max |logit|) in float32/64, 1e-2 * (...) in half precision),
  otherwise the layer switches to the hook path for good.
* "hooks": full forwards of the original inputs indexed by sample_index, with a temporary forward hook
  on the layer that returns the replacement rows (a :class:`~cnnlens.capture.ModelScope`, removed in finally).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from cnnlens.capture.layers import LayerRef, LayerSpec, resolve_layer
from cnnlens.capture.scope import ModelScope
from cnnlens.errors import InputShapeError, LayerError
from cnnlens.execution import Execution, as_execution
from cnnlens.outputs import OutputSelector, to_logits

if TYPE_CHECKING:
    from cnnlens.capture.core import Capture

__all__ = ["Replayer", "RowSource", "replay_path", "replay_rows"]

log = logging.getLogger(__name__)

RowSource = Callable[[int, int], "tuple[torch.Tensor, torch.Tensor]"]
"""``make_rows(start, stop) -> (activations (n, C, h, w), sample_index (n,))`` for rows start..stop-1.

The rows belong to the replay from then on: the model may modify them in place (``ReLU(inplace=True)``,
``out += identity`` after the layer), and a source may reuse one buffer for successive chunks.
"""

_INPLACE_FUNCTIONS = {
    "iadd",
    "isub",
    "imul",
    "itruediv",
    "ifloordiv",
    "imod",
    "ipow",
    "iand",
    "ior",
    "ixor",
    "ilshift",
    "irshift",
    "imatmul",
    "setitem",
}


@dataclass
class _TailPlan:
    """How one layer is replayed in one capture."""

    kind: Literal["fx", "hooks"]
    reason: str = ""
    head: Any = None  # torch.fx.GraphModule: inputs -> (*saved, target value)
    tail: Any = None  # torch.fx.GraphModule: (activation, *saved) -> model output
    inputs: tuple[Any, ...] | None = None  # key of the inputs the saved values belong to
    saved: list[torch.Tensor] = field(default_factory=list)
    per_row_bytes: int = 0
    measured_for: tuple[Any, ...] | None = None  # key of the inputs per_row_bytes was measured with
    held: torch.Tensor | None = None  # keeps those inputs' storage alive, so their key stays unique
    act_shape: tuple[int, ...] = ()  # the layer's output shape per sample (fx path)
    n_saved: int = 0  # how many values from before the layer the tail needs (fx path)


class _LeafTracer:
    """Builds an fx tracer that keeps one named module as a single call (imported lazily)."""

    @staticmethod
    def trace(model: nn.Module, leaf: str) -> Any:
        import torch.fx

        class Tracer(torch.fx.Tracer):
            def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
                return module_qualified_name == leaf or super().is_leaf_module(m, module_qualified_name)

        graph = Tracer().trace(model)
        return torch.fx.GraphModule(model, graph)


def _mutates(node: Any, modules: dict[str, nn.Module]) -> bool:
    """Whether an fx node modifies its first argument in place."""
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return bool(
            name in _INPLACE_FUNCTIONS
            or node.kwargs.get("inplace", False)
            or (name.endswith("_") and not name.startswith("_"))
        )
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.startswith("_")
    if node.op == "call_module":
        return bool(getattr(modules.get(str(node.target)), "inplace", False))
    return False


def _split_graph(gm: Any, ref: LayerRef) -> tuple[Any, Any, list[Any]] | str:
    """Cut a traced model at ``ref``'s node: (head module, tail module, saved head nodes) or why not."""
    import torch.fx

    graph = gm.graph
    nodes = list(graph.nodes)
    hits = [n for n in nodes if n.op == "call_module" and n.target == ref.name]
    wanted = ref.call if ref.call is not None else 0
    if not hits:
        return f"the traced graph has no call of {ref.name!r} (it is inlined or inside a library leaf module)"
    if (ref.call is None and len(hits) > 1) or wanted >= len(hits):
        return f"{ref.name!r} is called {len(hits)} times in the traced graph"
    target = hits[wanted]
    pos = nodes.index(target)
    before = nodes[: pos + 1]
    after = [n for n in nodes[pos + 1 :] if n.op != "output"]
    output = next(n for n in nodes if n.op == "output")
    modules = dict(gm.named_modules())
    depends = {target}
    for node in after:
        if any(a in depends for a in node.all_input_nodes):
            depends.add(node)
    movable = [n for n in after if n not in depends and n.op not in ("placeholder", "output")]
    # Moving independent nodes into the head is unsafe when an in-place op mutates a value read on both
    # sides of the cut (the order of the read and the write would change).
    for node in after:
        if _mutates(node, modules) and node.args and isinstance(node.args[0], torch.fx.Node):
            readers = set(node.args[0].users) | {node}
            sides = {r in depends for r in readers if r in after or r is target}
            if len(sides) > 1:
                movable = []
                break
    head_set = set(before) | set(movable)
    tail_nodes = [n for n in after if n not in head_set]
    needed: list[Any] = []
    for node in [*tail_nodes, output]:
        for arg in node.all_input_nodes:
            if arg in head_set and arg is not target and arg not in needed:
                needed.append(arg)
    saved = [n for n in needed if n.op != "get_attr"]
    consts = [n for n in needed if n.op == "get_attr"]

    head = torch.fx.Graph()
    env: dict[Any, Any] = {}
    for node in nodes:
        if node in head_set:
            env[node] = head.node_copy(node, lambda a: env[a])
    head.output((*[env[n] for n in saved], env[target]))

    tail = torch.fx.Graph()
    tenv: dict[Any, Any] = {target: tail.placeholder("replaced_activation")}
    for i, node in enumerate(saved):
        tenv[node] = tail.placeholder(f"saved_{i}")
    for node in consts:
        tenv[node] = tail.node_copy(node, lambda a: tenv[a])
    for node in tail_nodes:
        tenv[node] = tail.node_copy(node, lambda a: tenv[a])
    tail.output(torch.fx.node.map_arg(output.args[0], lambda a: tenv[a]))
    return torch.fx.GraphModule(gm, head), torch.fx.GraphModule(gm, tail), saved


def _input_key(x: torch.Tensor) -> tuple[Any, ...]:
    """Identifies an input batch (same storage, shape, dtype and no in-place change since)."""
    return (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype, str(x.device), x._version)


def _tolerance(reference: torch.Tensor) -> float:
    scale = 1.0 + float(reference.detach().abs().max()) if reference.numel() else 1.0
    return (1e-4 if reference.element_size() >= 4 else 1e-2) * scale


class Replayer:
    """Per-capture replay state: one :class:`_TailPlan` per layer key (held by :attr:`Capture.replayer`).

    It holds the model and the output selector, not the capture (no reference cycle).
    """

    def __init__(self, model: nn.Module, output_selector: OutputSelector | None) -> None:
        self.model = model
        self.output_selector = output_selector
        self.plans: dict[str, _TailPlan] = {}

    def plan(self, ref: LayerRef) -> _TailPlan:
        """The replay plan of ``ref`` (traced on first use, then kept)."""
        plan = self.plans.get(ref.key)
        if plan is None:
            plan = self._trace(ref)
            self.plans[ref.key] = plan
        return plan

    def _trace(self, ref: LayerRef) -> _TailPlan:
        try:
            gm = _LeafTracer.trace(self.model, ref.name)
            split = _split_graph(gm, ref)
        except Exception as exc:  # any tracing failure means: use the hook path (reason kept)
            return _TailPlan("hooks", reason=f"torch.fx could not trace the model: {type(exc).__name__}: {exc}")
        if isinstance(split, str):
            return _TailPlan("hooks", reason=split)
        head, tail, saved = split
        return _TailPlan("fx", head=head, tail=tail, n_saved=len(saved))

    def _fallback(self, plan: _TailPlan, reason: str) -> None:
        log.debug("replay falls back to full forwards: %s", reason)
        plan.kind, plan.reason, plan.head, plan.tail, plan.saved = "hooks", reason, None, None, []
        plan.inputs, plan.per_row_bytes, plan.measured_for = None, 0, None

    def prepare(
        self,
        ref: LayerRef,
        inputs: torch.Tensor,
        logits: torch.Tensor | None,
        reference: torch.Tensor | None,
        example: tuple[torch.Tensor, torch.Tensor],
        forward: Callable[[torch.Tensor], torch.Tensor],
    ) -> _TailPlan:
        """Compute the saved head values for ``inputs`` (once), check the tail, measure one row's footprint."""
        from cnnlens.batching import measure_peak_bytes

        plan = self.plan(ref)
        device = inputs.device
        row, row_index = example
        key = _input_key(inputs)
        if plan.kind == "fx" and plan.inputs != key:
            problem = self._check_tail(plan, inputs, logits, reference, forward)
            if problem:
                self._fallback(plan, problem)
            else:
                plan.inputs = key
        if plan.measured_for != key:
            run = lambda: self.run(ref, plan, inputs, row.clone(), row_index)  # noqa: E731
            with torch.inference_mode():
                try:
                    peak = measure_peak_bytes(run, device)
                except LayerError:
                    raise
                except Exception as exc:
                    if plan.kind != "fx":
                        raise
                    self._fallback(plan, f"the traced tail failed on a replacement row: {type(exc).__name__}: {exc}")
                    peak = measure_peak_bytes(run, device)
            extra = sum(v[:1].nelement() * v.element_size() for v in plan.saved)
            if plan.kind == "hooks":
                extra += inputs[:1].nelement() * inputs.element_size()
            plan.per_row_bytes = max(1, peak + 2 * row[:1].nelement() * row.element_size() + extra)
            plan.measured_for = key
        plan.held = inputs
        return plan

    def _check_tail(
        self,
        plan: _TailPlan,
        inputs: torch.Tensor,
        logits: torch.Tensor | None,
        reference: torch.Tensor | None,
        forward: Callable[[torch.Tensor], torch.Tensor],
    ) -> str:
        """Run the head on ``inputs`` and check the tail on the unmodified activations; '' when all is well."""
        try:
            if plan.n_saved == 0 and reference is not None:
                values: list[Any] = [reference]  # the tail needs nothing else: no head run
            else:
                with torch.inference_mode():
                    out = plan.head(inputs)
                values = list(out) if isinstance(out, tuple) else [out]
            saved, head_act = values[:-1], values[-1]
            batch = int(inputs.shape[0])
            if not all(isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == batch for v in saved):
                return "the tail needs values from before the layer that are not per-sample tensors"
            if not isinstance(head_act, torch.Tensor):
                return "the traced layer output is not a tensor"
            if reference is not None and (
                reference.shape != head_act.shape or float((reference - head_act).abs().max()) > _tolerance(reference)
            ):
                return "the traced head does not reproduce the recorded activation"
            real = logits if logits is not None else forward(inputs)
            idx = torch.arange(batch, device=inputs.device)
            with torch.inference_mode():
                got = to_logits(
                    plan.tail(head_act.clone(), *[v.index_select(0, idx) for v in saved]), self.output_selector
                )
            if got.shape != real.shape or float((got - real).abs().max()) > _tolerance(real):
                return "the traced tail does not reproduce the model's logits"
        except Exception as exc:  # a traced graph that cannot run here: use the hook path (reason kept)
            return f"the traced graph failed to run: {type(exc).__name__}: {exc}"
        plan.saved = saved
        plan.act_shape = tuple(head_act.shape[1:])
        return ""

    def hooked(self, ref: LayerRef, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Full forward of ``x`` with ``ref``'s output replaced by ``rows`` (hook removed in finally)."""
        state = {"call": 0}
        wanted = ref.call if ref.call is not None else 0

        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            call = state["call"]
            state["call"] = call + 1
            if call != wanted:
                return None
            if not isinstance(output, torch.Tensor) or tuple(output.shape) != tuple(rows.shape):
                got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
                raise LayerError(
                    f"replacement activations for layer {ref.key!r} have shape {tuple(rows.shape)}, but the "
                    f"layer outputs {got} for these inputs; give rows shaped like the layer's output."
                )
            return rows.to(dtype=output.dtype)

        with ModelScope(self.model, eval_mode=False) as scope:
            scope.add_forward_hook(ref.module, hook)
            with torch.inference_mode():
                return to_logits(self.model(x), self.output_selector)

    def run(
        self, ref: LayerRef, plan: _TailPlan, inputs: torch.Tensor, rows: torch.Tensor, index: torch.Tensor
    ) -> torch.Tensor:
        """Logits for one chunk of rows (which the model may modify in place: pass rows you own)."""
        if plan.kind == "fx":
            if tuple(rows.shape[1:]) != plan.act_shape:
                raise LayerError(
                    f"replacement activations for layer {ref.key!r} have shape {tuple(rows.shape)}, but the "
                    f"layer outputs {(rows.shape[0], *plan.act_shape)} for these inputs; give rows shaped like "
                    "the layer's output."
                )
            with torch.inference_mode():
                out = plan.tail(rows, *[v.index_select(0, index) for v in plan.saved])
            return to_logits(out, self.output_selector)
        return self.hooked(ref, inputs.index_select(0, index), rows)


def replay_path(cap: Capture, layer: LayerSpec) -> tuple[str, str]:
    """Which replay path ``cap`` uses for ``layer`` and why: ``("fx", "")`` or ``("hooks", reason)``.

    The path may change from "fx" to "hooks" on first use if the traced tail fails its check.
    """
    plan = cap.replayer.plan(resolve_layer(cap.model, layer))
    return plan.kind, plan.reason


def replay_rows(
    cap: Capture,
    layer: LayerSpec,
    n_rows: int,
    make_rows: RowSource,
    *,
    inputs: torch.Tensor,
    logits: torch.Tensor | None = None,
    reference: dict[str, torch.Tensor] | torch.Tensor | None = None,
    batch_budget_mb: float | None = None,
    chunk_size: int | None = None,
    execution: Execution | None = None,
) -> torch.Tensor:
    """Logits with ``layer``'s output replaced, for ``n_rows`` rows built lazily by ``make_rows``.

    The engine behind :meth:`Capture.replay` and :meth:`Probe.replay_rows` (see the module docstring for the
    two paths). Rows are built and run one chunk at a time; the chunk size is the largest that fits the budget
    given the measured per-row footprint (:mod:`cnnlens.batching`), or the fixed chunk size: a pure function
    of the shapes, the model's operators and the options, never of timings.

    Args:
        cap: An active capture.
        layer: The layer whose output is replaced.
        n_rows: How many rows.
        make_rows: ``make_rows(start, stop) -> (activations, sample_index)``.
        inputs: The original inputs ``(B, ...)``.
        logits: The model's logits on ``inputs`` if known.
        reference: The recorded activations (a dict by layer key, or the layer's tensor) if known.
        batch_budget_mb: Memory budget of one chunk in MiB (None: ``execution``'s, else the device default).
        chunk_size: A fixed chunk size, still capped by the budget (None: ``execution``'s, else the largest
            that fits).
        execution: Memory budget and chunk size when the two above are None (None: the defaults).

    Returns:
        ``(n_rows, K)`` logits (an empty ``(0, 0)`` tensor when ``n_rows`` is 0).

    Raises:
        LayerError: Outside an active capture, or when rows do not fit the layer.
        InputShapeError: When a sample index is out of range.
    """
    from cnnlens.batching import chunk_size as fit_chunk
    from cnnlens.batching import resolve_budget, run_in_chunks

    ex = as_execution(execution)
    if not cap.active:
        raise LayerError("replay needs an active capture: use `with capture(model, layers) as cap:`.")
    ref = resolve_layer(cap.model, layer)
    x = cap._prepare_input(inputs)
    if n_rows <= 0:
        return torch.zeros(0, 0, device=x.device)
    act_ref = reference.get(ref.key) if isinstance(reference, dict) else reference
    replayer = cap.replayer
    batch = int(x.shape[0])
    budget = resolve_budget(batch_budget_mb if batch_budget_mb is not None else ex.memory_budget_mb, x.device)

    def make(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows, index = make_rows(start, stop)
        index = torch.as_tensor(index, dtype=torch.long, device=x.device).reshape(-1)
        if index.shape[0] != rows.shape[0]:
            raise InputShapeError(f"make_rows gave {rows.shape[0]} rows but {index.shape[0]} sample indices.")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= batch):
            raise InputShapeError(
                f"sample indices must lie in 0..{batch - 1} (the original batch), got "
                f"{int(index.min())}..{int(index.max())}."
            )
        return rows.to(device=x.device), index

    plan = replayer.prepare(ref, x, logits, act_ref, make(0, 1), cap.forward)

    def work(chunk: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return replayer.run(ref, plan, x, chunk[0], chunk[1])

    max_chunk = fit_chunk(plan.per_row_bytes, budget, n_items=n_rows)
    chunk = chunk_size if chunk_size is not None else ex.chunk_size
    parts = run_in_chunks(work, n_rows, make, max_chunk=max_chunk, chunk=chunk)
    return torch.cat(parts, dim=0)
