"""The :class:`Probe`: extra forwards and backwards with the targets fixed, for methods that need them.

Perturbation methods (Score-CAM, Ablation-CAM), guided backprop, Integrated Gradients and smoothing ask a probe
for more passes through the same open capture. Its caches (gradient passes per rule and target, the
:meth:`Probe.memo` of extra forwards) are plain attributes that live exactly as long as the probe.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypeVar

import torch

from cnnlens.capture.core import Capture
from cnnlens.capture.layers import LayerSpec
from cnnlens.capture.recording import Recording
from cnnlens.capture.rectifier import ReluBackward
from cnnlens.capture.replay import RowSource, replay_rows
from cnnlens.errors import TargetError
from cnnlens.execution import Execution
from cnnlens.targets import ClassTarget, FunctionTarget, Score, Target

__all__ = ["Probe"]

_T = TypeVar("_T")


class Probe:
    """Extra passes for methods that need more than the recorded forward and backward.

    A probe belongs to one active :class:`Capture` and one :class:`Recording`. Its targets are *fixed*: a
    class target explains, on any new input (noisy copies, interpolation steps, masked images), the class
    that was explained on the original input, never a re-ranked one. Results of gradient passes are cached
    per (rule, target), so guided backprop and guided Grad-CAM requested together cost one extra pass.
    """

    def __init__(self, cap: Capture, recording: Recording, targets: Sequence[Target]) -> None:
        self.cap = cap
        self.recording = recording
        self.targets = [_fix_target(t, recording, i) for i, t in enumerate(targets)]
        self._cache: dict[tuple[str, int, str | None], torch.Tensor] = {}
        self._memo: dict[Hashable, Any] = {}

    @property
    def inputs(self) -> Any:
        """The recorded model inputs: ``recording.model_inputs`` for several inputs, else the input tensor."""
        return self.recording.model_inputs if self.recording.model_inputs is not None else self.recording.inputs

    def logits(self, inputs: Any, *, execution: Execution | None = None) -> torch.Tensor:
        """Logits of ``inputs`` (no graph, eval mode, hooks silent); see :meth:`Capture.forward`."""
        return self.cap.forward(inputs, execution=execution)

    def scores(self, logits: torch.Tensor, t: int, sample_index: torch.Tensor) -> torch.Tensor:
        """Score of target ``t`` for rows of ``logits`` that are variants of samples ``sample_index``.

        Args:
            logits: ``(N, K)`` logits of N perturbed inputs.
            t: Which target.
            sample_index: ``(N,)`` the original sample each row derives from.

        Returns:
            ``(N,)`` scores, each of the class explained for its original sample.
        """
        target = self.targets[t]
        if isinstance(target, ClassTarget):
            classes = torch.as_tensor(
                target.classes
                if isinstance(target.classes, tuple)
                else [target.classes] * self.recording.inputs.shape[0],
                device=logits.device,
            )
            return ClassTarget(tuple(int(c) for c in classes[sample_index].tolist()), target.score)(logits)
        select = getattr(target, "select", None)
        if callable(select):
            return select(sample_index)(logits)  # type: ignore[no-any-return]
        return target(logits)

    def input_gradient(
        self, inputs: Any, t: int, *, relu_backward: ReluBackward = "normal", name: str | None = None
    ) -> torch.Tensor:
        """D score_t / d input on new ``inputs`` (same batch layout as the recording), with the given ReLU rule.

        With several inputs, ``name`` picks the input whose gradient is returned (None: the first).
        """
        rec = self.cap.run(
            inputs, [self.targets[t]], gradients=False, input_gradients=True, relu_backward=relu_backward
        )
        grad = rec.input_gradients if name is None else rec.input_gradients_by_input.get(name)
        if grad is None:
            raise TargetError(f"model input {name!r} has no gradient (it is not a floating-point explained input).")
        return grad[0]

    def cached_input_gradient(self, t: int, relu_backward: ReluBackward, name: str | None = None) -> torch.Tensor:
        """:meth:`input_gradient` on the recorded inputs, computed once per (rule, target, input).

        One gradient pass serves every input: the gradients of all inputs are cached together.
        """
        key = (relu_backward, t, name)
        rec = self.recording
        if key not in self._cache:
            if relu_backward == "normal" and name is None and rec.input_gradients is not None:
                self._cache[key] = rec.input_gradients[t]
            elif relu_backward == "normal" and name is not None and name in rec.input_gradients_by_input:
                self._cache[key] = rec.input_gradients_by_input[name][t]
            elif rec.model_inputs is None:
                self._cache[key] = self.input_gradient(rec.inputs, t, relu_backward=relu_backward)
            else:
                run = self.cap.run(
                    rec.model_inputs,
                    [self.targets[t]],
                    gradients=False,
                    input_gradients=True,
                    relu_backward=relu_backward,
                )
                for other, grad in run.input_gradients_by_input.items():
                    self._cache[(relu_backward, t, other)] = grad[0]
                if run.input_gradients is not None:
                    self._cache[(relu_backward, t, None)] = run.input_gradients[0]
                if key not in self._cache:
                    raise TargetError(f"model input {name!r} has no gradient (not a floating-point explained input).")
        return self._cache[key]

    def rerun(
        self,
        inputs: Any,
        *,
        gradients: bool = True,
        input_gradients: bool = False,
        relu_backward: ReluBackward = "normal",
    ) -> Recording:
        """Re-run the capture on new ``inputs`` (same batch layout) with the fixed targets."""
        return self.cap.run(
            inputs,
            list(self.targets),
            gradients=gradients,
            input_gradients=input_gradients,
            relu_backward=relu_backward,
        )

    def replay_rows(
        self,
        layer: LayerSpec,
        n_rows: int,
        make_rows: RowSource,
        *,
        batch_budget_mb: float | None = None,
        chunk_size: int | None = None,
        execution: Execution | None = None,
    ) -> torch.Tensor:
        """Logits with ``layer``'s output replaced, for rows built lazily (see :func:`replay_rows`).

        The original inputs and logits are the recording's, so only ``make_rows(start, stop) ->
        (activations, sample_index)`` is needed; at most one chunk of rows exists at a time. ``batch_budget_mb``
        and ``chunk_size``, where given, win over ``execution``'s.
        """
        return replay_rows(
            self.cap,
            layer,
            n_rows,
            make_rows,
            inputs=self.inputs,
            logits=self.recording.logits,
            reference=self.recording.activations,
            batch_budget_mb=batch_budget_mb,
            chunk_size=chunk_size,
            execution=execution,
        )

    def memo(self, key: Hashable, compute: Callable[[], _T]) -> _T:
        """``compute()`` once per ``key`` for the life of this probe (e.g. extra forwards shared by targets).

        Perturbation methods keep their extra forwards here, so explaining the top-3 classes of an image costs
        one set of masked or ablated forwards, not three.
        """
        if key not in self._memo:
            self._memo[key] = compute()
        value: _T = self._memo[key]
        return value


def _fix_target(target: Target, recording: Recording, t: int) -> Target:
    """Freeze a ranked target to the classes it picked on the recorded input.

    A target with ``freeze(logits)`` (a segmentation target's predicted region, a contrastive target's reference
    classes; see :mod:`cnnlens.targets`) freezes itself on the recorded (clean) output.
    """
    freeze = getattr(target, "freeze", None)
    if callable(freeze):
        frozen: Target = freeze(recording.logits)
        return frozen
    if isinstance(target, ClassTarget | FunctionTarget):
        return target
    assert recording.target_classes is not None  # set by Capture.run
    classes = recording.target_classes[:, t]
    score: Score = getattr(target, "score", "logit")
    if bool((classes < 0).any()):
        return target
    return ClassTarget(tuple(int(c) for c in classes.tolist()), score)
