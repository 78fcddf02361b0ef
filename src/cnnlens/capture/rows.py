"""Replaying a tensor of rows: :func:`replay_tensor`, the engine of :meth:`cnnlens.capture.Capture.replay`.

Rows are in the layer's map view (as :attr:`cnnlens.capture.Recording.activations` holds it); see
:mod:`cnnlens.capture.replay` for the two replay paths and how rows are mapped back to the layer's layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from cnnlens.capture.layers import LayerSpec
from cnnlens.capture.replay import replay_rows
from cnnlens.errors import InputShapeError
from cnnlens.execution import Execution

if TYPE_CHECKING:
    from cnnlens.capture.core import Capture

__all__ = ["replay_tensor"]


def replay_tensor(
    cap: Capture,
    layer: LayerSpec,
    activations: torch.Tensor,
    sample_index: torch.Tensor | Sequence[int],
    *,
    inputs: Any,
    logits: torch.Tensor | None = None,
    batch_budget_mb: float | None = None,
    execution: Execution | None = None,
) -> torch.Tensor:
    """Logits of the model when ``layer``'s output is replaced by ``activations``.

    Row ``n`` of ``activations`` replaces the layer's output for original sample ``sample_index[n]`` of
    ``inputs``. Only the part of the network after the layer is re-executed where ``torch.fx`` can trace the
    model (the traced tail is checked once against the real logits and kept in :attr:`Capture.replayer`), else
    full forwards with a temporary hook that substitutes the rows; rows run in memory-bounded chunks under
    ``torch.inference_mode``. See :mod:`cnnlens.capture.replay` and :func:`~cnnlens.capture.replay_rows`.

    Args:
        cap: An active capture.
        layer: The layer whose output is replaced (a name, ``name@k`` or module).
        activations: ``(N, C, h, w)`` replacement outputs in the layer's map view (the shape of its recorded
            activation per sample; channels-last and token layers are mapped back to their layout, prefix
            tokens taken from the layer's real output for the sample).
        sample_index: ``(N,)`` which original sample each row belongs to.
        inputs: ``(B, ...)`` the original model inputs (e.g. ``Recording.inputs``), or several inputs
            (``Recording.model_inputs``): every input is indexed by sample.
        logits: ``(B, K)`` the model's logits on ``inputs`` if known (used to verify the traced tail;
            computed with one forward when omitted).
        batch_budget_mb: Memory budget of one chunk in MiB (default: ``execution``'s, else
            :mod:`cnnlens.batching`'s).
        execution: Memory budget and chunk size of the chunks (None: the capture's execution).

    Returns:
        ``(N, K)`` logits.

    Raises:
        LayerError: Outside an active capture, or when the rows do not fit the layer's output.

    Example:
        >>> from torch import nn
        >>> from cnnlens.capture import capture
        >>> net = nn.Sequential(nn.Conv2d(3, 2, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 3))
        >>> x = torch.randn(1, 3, 4, 4)
        >>> with capture(net, "0") as cap:
        ...     rec = cap.run(x, gradients=False)
        ...     out = replay_tensor(cap, "0", torch.zeros(2, 2, 4, 4), [0, 0], inputs=x)
        >>> torch.allclose(out, net[3].bias.expand(2, 3))
        True
    """
    if not isinstance(activations, torch.Tensor):
        raise InputShapeError(f"activations must be a tensor (N, C, h, w), got {type(activations).__name__}.")
    index = torch.as_tensor(sample_index, dtype=torch.long, device=activations.device).reshape(-1)
    if index.shape[0] != activations.shape[0]:
        raise InputShapeError(
            f"got {activations.shape[0]} replacement rows but {index.shape[0]} sample indices; give one "
            "original-sample index per row."
        )

    def make_rows(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        return activations[start:stop].clone(), index[start:stop]  # the model may modify rows in place

    return replay_rows(
        cap,
        layer,
        int(activations.shape[0]),
        make_rows,
        inputs=inputs,
        logits=logits,
        batch_budget_mb=batch_budget_mb,
        execution=execution,
    )
