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

Replacement rows come in the layer's *map view* ``(n, C, h, w)``, as :attr:`Recording.activations` holds it;
before the tail or the hook substitutes them they are mapped back to the layer's own layout
(:meth:`~cnnlens.capture.Layout.from_maps`: channels-last permuted back; tokens flattened, with the prefix
tokens of their samples copied from the layer's real output on the original inputs).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from cnnlens.capture.fxsplit import LeafTracer, split_graph
from cnnlens.capture.layers import LayerRef, LayerSpec, resolve_layer
from cnnlens.capture.layout import Layout, infer_layout
from cnnlens.capture.scope import ModelScope
from cnnlens.errors import InputShapeError, LayerError
from cnnlens.execution import Execution, as_execution
from cnnlens.inputs import ModelInputs
from cnnlens.outputs import OutputSelector, to_logits

if TYPE_CHECKING:
    from cnnlens.capture.core import Capture

__all__ = ["Replayer", "RowSource", "replay_path", "replay_rows"]

log = logging.getLogger(__name__)

RowSource = Callable[[int, int], "tuple[torch.Tensor, torch.Tensor]"]
"""``make_rows(start, stop) -> (activations (n, C, h, w), sample_index (n,))`` for rows start..stop-1.

Activations are in the layer's map view (its layout's ``(n, C, h, w)``, as recorded), whatever its raw layout.

The rows belong to the replay from then on: the model may modify them in place (``ReLU(inplace=True)``,
``out += identity`` after the layer), and a source may reuse one buffer for successive chunks.
"""

LayoutOf = Callable[[LayerRef, torch.Tensor, "tuple[int, ...]"], "Layout | None"]
"""``layout_of(ref, raw_output, input_shape)``: the layout of a layer's output (:meth:`Capture.layout_of`)."""


def input_shape_of(x: Any) -> tuple[int, ...]:
    """The shape of the (first explained) model input: what a layer's layout is inferred against."""
    primary = getattr(x, "primary", x)
    return tuple(int(d) for d in primary.shape) if isinstance(primary, torch.Tensor) else ()


@dataclass
class _TailPlan:
    """How one layer is replayed in one capture."""

    kind: Literal["fx", "hooks"]
    reason: str = ""
    head: Any = None  # torch.fx.GraphModule: inputs -> (*saved, target value)
    tail: Any = None  # torch.fx.GraphModule: (activation, *saved) -> model output
    inputs: tuple[Any, ...] | None = None  # key of the inputs the saved values belong to
    saved: list[Any] = field(default_factory=list)  # per-sample tensors, or None/bool flags (passed unchanged)
    per_row_bytes: int = 0
    measured_for: tuple[Any, ...] | None = None  # key of the inputs per_row_bytes was measured with
    held: torch.Tensor | None = None  # keeps those inputs' storage alive, so their key stays unique
    act_shape: tuple[int, ...] = ()  # the layer's output shape per sample, in the map view (fx path)
    layout: Layout | None = None  # the layer's layout for the saved inputs (fx path; None: rows are raw)
    prefix: torch.Tensor | None = None  # (B, P, C) raw prefix tokens of the saved inputs (token layers, fx path)
    n_saved: int = 0  # how many values from before the layer the tail needs (fx path)


def _input_key(x: torch.Tensor | ModelInputs) -> tuple[Any, ...]:
    """Identifies an input batch (same storage, shape, dtype and no in-place change since)."""
    if isinstance(x, ModelInputs):
        return x.key()
    return (x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.dtype, str(x.device), x._version)


def _apply(fn: Callable[..., Any], x: torch.Tensor | ModelInputs) -> Any:
    """``fn(x)``, or ``fn`` called with every model input (several inputs: every input indexed alike)."""
    return x.call(fn) if isinstance(x, ModelInputs) else fn(x)


def _batch_of(x: torch.Tensor | ModelInputs) -> int:
    return x.batch if isinstance(x, ModelInputs) else int(x.shape[0])


def _take(x: torch.Tensor | ModelInputs, index: torch.Tensor) -> torch.Tensor | ModelInputs:
    """Rows ``index`` of the inputs (of every input and per-sample extra argument)."""
    return x.rows(index) if isinstance(x, ModelInputs) else x.index_select(0, index)


def _row_bytes(x: torch.Tensor | ModelInputs) -> int:
    return x.row_bytes() if isinstance(x, ModelInputs) else x[:1].nelement() * x.element_size()


def _per_sample(value: Any, batch: int) -> bool:
    """Whether a saved head value can follow the rows: a per-sample tensor, or a None/bool flag.

    Flags (a forward's ``attn_mask=None``, ``is_causal=False``) are the same for every row; numbers are not
    allowed, as one may be the batch size.
    """
    if isinstance(value, torch.Tensor):
        return bool(value.ndim) and value.shape[0] == batch
    return value is None or isinstance(value, bool)


def _rows_of(saved: list[Any], index: torch.Tensor) -> list[Any]:
    """The saved head values for rows ``index``: tensors indexed by sample, flags unchanged."""
    return [v.index_select(0, index) if isinstance(v, torch.Tensor) else v for v in saved]


def _tolerance(reference: torch.Tensor) -> float:
    scale = 1.0 + float(reference.detach().abs().max()) if reference.numel() else 1.0
    return (1e-4 if reference.element_size() >= 4 else 1e-2) * scale


class Replayer:
    """Per-capture replay state: one :class:`_TailPlan` per layer key (held by :attr:`Capture.replayer`).

    It holds the model and the output selector, not the capture (no reference cycle).
    """

    def __init__(
        self, model: nn.Module, output_selector: OutputSelector | None, *, layout_of: LayoutOf | None = None
    ) -> None:
        self.model = model
        self.output_selector = output_selector
        self.plans: dict[str, _TailPlan] = {}
        self.layout_of: LayoutOf = layout_of if layout_of is not None else self._infer

    def _infer(self, ref: LayerRef, output: torch.Tensor, input_shape: tuple[int, ...]) -> Layout | None:
        """Inferred layout (no explicit spec) for a replayer made without a capture's ``layout_of``."""
        if output.ndim not in (3, 4, 5) or (output.ndim == 3 and len(input_shape) != 4):
            return None
        return infer_layout(self.model, ref.module, output, input_shape, None, layer=ref.key)

    def plan(self, ref: LayerRef) -> _TailPlan:
        """The replay plan of ``ref`` (traced on first use, then kept)."""
        plan = self.plans.get(ref.key)
        if plan is None:
            plan = self._trace(ref)
            self.plans[ref.key] = plan
        return plan

    def _trace(self, ref: LayerRef) -> _TailPlan:
        try:
            gm = LeafTracer.trace(self.model, ref.name)
            split = split_graph(gm, ref)
        except Exception as exc:  # any tracing failure means: use the hook path (reason kept)
            return _TailPlan("hooks", reason=f"torch.fx could not trace the model: {type(exc).__name__}: {exc}")
        if isinstance(split, str):
            return _TailPlan("hooks", reason=split)
        head, tail, saved = split
        return _TailPlan("fx", head=head, tail=tail, n_saved=len(saved))

    def _fallback(self, plan: _TailPlan, reason: str) -> None:
        log.debug("replay falls back to full forwards: %s", reason)
        plan.kind, plan.reason, plan.head, plan.tail, plan.saved = "hooks", reason, None, None, []
        plan.layout, plan.prefix = None, None
        plan.inputs, plan.per_row_bytes, plan.measured_for = None, 0, None

    def prepare(
        self,
        ref: LayerRef,
        inputs: torch.Tensor,
        logits: torch.Tensor | None,
        reference: torch.Tensor | None,
        example: tuple[torch.Tensor, torch.Tensor],
        forward: Callable[[torch.Tensor], torch.Tensor],
        known: Layout | None = None,
    ) -> _TailPlan:
        """Compute the saved head values for ``inputs`` (once), check the tail, measure one row's footprint.

        ``reference`` is the recorded activation in the map view and ``known`` the layout it was recorded with
        (when both are given and the raw output can be rebuilt from the reference alone, the head is not run).
        """
        from cnnlens.batching import measure_peak_bytes

        plan = self.plan(ref)
        device = inputs.device
        row, row_index = example
        key = _input_key(inputs)
        if plan.kind == "fx" and plan.inputs != key:
            problem = self._check_tail(plan, ref, inputs, logits, reference, forward, known)
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
            extra = sum(v[:1].nelement() * v.element_size() for v in plan.saved if isinstance(v, torch.Tensor))
            if plan.kind == "hooks":
                extra += _row_bytes(inputs)
            plan.per_row_bytes = max(1, peak + 2 * row[:1].nelement() * row.element_size() + extra)
            plan.measured_for = key
        plan.held = inputs
        return plan

    def _check_tail(
        self,
        plan: _TailPlan,
        ref: LayerRef,
        inputs: torch.Tensor,
        logits: torch.Tensor | None,
        reference: torch.Tensor | None,
        forward: Callable[[torch.Tensor], torch.Tensor],
        known: Layout | None = None,
    ) -> str:
        """Run the head on ``inputs`` and check the tail on the unmodified activations; '' when all is well."""
        rebuildable = known is None or known.is_identity or known.prefix == 0
        try:
            if plan.n_saved == 0 and reference is not None and rebuildable:
                # The tail needs nothing else: no head run (the raw output rebuilt from the map view).
                values: list[Any] = [reference if known is None else known.from_maps(reference)]
            else:
                with torch.inference_mode():
                    out = _apply(plan.head, inputs)
                values = list(out) if isinstance(out, tuple) else [out]
            saved, head_act = values[:-1], values[-1]
            batch = _batch_of(inputs)
            if not all(_per_sample(v, batch) for v in saved):
                return "the tail needs values from before the layer that are not per-sample tensors"
            if not isinstance(head_act, torch.Tensor):
                return "the traced layer output is not a tensor"
            layout = self.layout_of(ref, head_act, input_shape_of(inputs))
            mapped = head_act if layout is None or layout.is_identity else layout.to_maps(head_act)
            if reference is not None and (
                reference.shape != mapped.shape or float((reference - mapped).abs().max()) > _tolerance(reference)
            ):
                return "the traced head does not reproduce the recorded activation"
            real = logits if logits is not None else forward(inputs)
            idx = torch.arange(batch, device=inputs.device)
            with torch.inference_mode():
                got = to_logits(plan.tail(head_act.clone(), *_rows_of(saved, idx)), self.output_selector)
            if got.shape != real.shape or float((got - real).abs().max()) > _tolerance(real):
                return "the traced tail does not reproduce the model's logits"
        except Exception as exc:  # a traced graph that cannot run here: use the hook path (reason kept)
            return f"the traced graph failed to run: {type(exc).__name__}: {exc}"
        plan.saved = saved
        plan.act_shape = tuple(mapped.shape[1:])
        plan.layout = layout
        plan.prefix = head_act[:, : layout.prefix].detach().clone() if layout is not None and layout.prefix else None
        return ""

    def hooked(self, ref: LayerRef, x: torch.Tensor | ModelInputs, rows: torch.Tensor) -> torch.Tensor:
        """Full forward of ``x`` with ``ref``'s output replaced by ``rows`` (hook removed in finally)."""
        state = {"call": 0}
        wanted = ref.call if ref.call is not None else 0

        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            call = state["call"]
            state["call"] = call + 1
            if call != wanted:
                return None
            layout = self.layout_of(ref, output, input_shape_of(x)) if isinstance(output, torch.Tensor) else None
            mapped = output if layout is None or layout.is_identity else layout.to_maps(output)
            if not isinstance(mapped, torch.Tensor) or tuple(mapped.shape) != tuple(rows.shape):
                got = tuple(mapped.shape) if isinstance(mapped, torch.Tensor) else type(output).__name__
                raise LayerError(
                    f"replacement activations for layer {ref.key!r} have shape {tuple(rows.shape)}, but the "
                    f"layer outputs {got} for these inputs (in its map view); give rows shaped like the "
                    "recorded activation."
                )
            if layout is not None and not layout.is_identity:
                return layout.from_maps(rows.to(dtype=output.dtype), output)
            return rows.to(dtype=output.dtype)

        with ModelScope(self.model, eval_mode=False) as scope:
            scope.add_forward_hook(ref.module, hook)
            with torch.inference_mode():
                return to_logits(_apply(self.model, x), self.output_selector)

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
            layout = plan.layout
            if layout is not None and not layout.is_identity:
                prefix = plan.prefix.index_select(0, index) if plan.prefix is not None else None
                rows = layout.from_maps(rows, prefix)
            with torch.inference_mode():
                out = plan.tail(rows, *_rows_of(plan.saved, index))
            return to_logits(out, self.output_selector)
        return self.hooked(ref, _take(inputs, index), rows)


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
        make_rows: ``make_rows(start, stop) -> (activations, sample_index)``; activations in the layer's map
            view ``(n, C, h, w)`` (mapped back to its layout before they replace its output).
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
    batch = _batch_of(x)
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

    plan = replayer.prepare(ref, x, logits, act_ref, make(0, 1), cap.forward, known=cap.layouts.get(ref.key))

    def work(chunk: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return replayer.run(ref, plan, x, chunk[0], chunk[1])

    max_chunk = fit_chunk(plan.per_row_bytes, budget, n_items=n_rows)
    chunk = chunk_size if chunk_size is not None else ex.chunk_size
    parts = run_in_chunks(work, n_rows, make, max_chunk=max_chunk, chunk=chunk)
    return torch.cat(parts, dim=0)
