"""Perturbation CAMs: channel weights from extra forward passes instead of gradients.

* **Score-CAM** masks the *input* with each channel of the layer and weights the channel by the target
  score of the masked input (softmax over channels).
* **Ablation-CAM** sets each channel of the layer to zero and weights it by the relative drop of the target
  score; only the part of the network after the layer is re-run where ``torch.fx`` can trace the model
  (:meth:`cnnlens.capture.Capture.replay`).

Both run on images and on volumes (inputs ``(B, C, D, H, W)``, layers ``(B, C, d, h, w)``: Score-CAM's
masks are then upsampled trilinearly).

Both return the raw, signed map ``sum_k w_k A_k`` at layer resolution (ReLU, upsampling and normalisation
are applied by :func:`cnnlens.explain.explain`), compute weights in float64, run their extra forwards under
``torch.inference_mode`` in memory-bounded chunks (:mod:`cnnlens.batching`), and keep them in the probe so
that several targets (e.g. the top-3 classes) share one set of forwards. Targets are fixed by the probe: a
perturbed copy of sample ``b`` is scored for the class explained for sample ``b``.

How the extra forwards run (memory layout, memory budget, chunk size) comes from ``view.execution`` (the
:class:`cnnlens.Execution` given to :func:`cnnlens.explain`), never from method options: it is not part of
a method's variant. Nothing is remembered between calls: the footprint of one masked forward is measured on
the first chunk of every call, which is real work (its logits are kept).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cnnlens.batching import run_measured
from cnnlens.capture import Probe
from cnnlens.errors import MethodError, OptionError
from cnnlens.maps import precise_dtype
from cnnlens.methods.cam import weighted_sum
from cnnlens.methods.registry import LayerView, MethodOutput, check_count, register

__all__ = ["ablationcam", "channel_masks", "scorecam", "select_channels"]


def _check_feature_map(view: LayerView, method: str) -> None:
    act = view.require_feature_map(method)
    if view.inputs.ndim != act.ndim:
        raise MethodError(
            f"{method} masks or re-runs inputs with as many spatial dimensions as the layer: image inputs "
            f"(B, C, H, W) for (B, C, h, w) layers, volumes (B, C, D, H, W) for (B, C, d, h, w) layers; got inputs "
            f"of shape {tuple(view.inputs.shape)} and layer {view.layer!r} of shape {tuple(act.shape)}."
        )


def _scores(probe: Probe, logits: torch.Tensor, t: int, sample_index: torch.Tensor, method: str) -> torch.Tensor:
    scores = probe.scores(logits, t, sample_index)
    if scores.shape != sample_index.shape:
        raise MethodError(
            f"{method} scores perturbed copies of each image: the target must give one score per row of logits "
            f"(got shape {tuple(scores.shape)} for {sample_index.shape[0]} rows). Use a class index target, or a "
            "callable that works row by row (e.g. lambda logits: logits[:, 3])."
        )
    return scores.to(torch.float64)


# -- Score-CAM -----------------------------------------------------------------------------------------
def channel_masks(activation: torch.Tensor, size: tuple[int, ...], *, align_corners: bool = False) -> torch.Tensor:
    """Score-CAM masks: each channel upsampled bilinearly to ``size`` and min-max normalised to [0, 1].

    Volumes ``(N, d, h, w)`` with a 3-element ``size`` are upsampled trilinearly (same ``align_corners``).

    Formula: ``H_k = (up(A_k) - min up(A_k)) / (max up(A_k) - min up(A_k))``; a channel that is flat at
    layer resolution (``max A_k == min A_k``, e.g. all zero) gives the all-zero mask (no NaN).

    Args:
        activation: ``(N, h, w)`` channels, or ``(N, d, h, w)`` (any float dtype; computed in that dtype).
        size: ``(H, W)`` of the input, or ``(D, H, W)``.
        align_corners: Passed to ``F.interpolate``; False (pixel-centre aligned) by default.

    Returns:
        ``(N, H, W)`` (``(N, D, H, W)``) masks.

    Example:
        >>> channel_masks(torch.tensor([[[0.0, 2.0]], [[3.0, 3.0]]]), (1, 4)).tolist()
        [[[0.0, 0.25, 0.75, 1.0]], [[0.0, 0.0, 0.0, 0.0]]]
    """
    if activation.ndim != len(size) + 1 or len(size) not in (2, 3):
        raise MethodError(
            f"channel_masks takes channels (N, h, w) with an (H, W) size or (N, d, h, w) with a (D, H, W) size; "
            f"got shape {tuple(activation.shape)} and size {tuple(size)}."
        )
    flat = activation.flatten(1)
    constant = flat.amax(dim=1) == flat.amin(dim=1)
    mode = "bilinear" if len(size) == 2 else "trilinear"
    up = F.interpolate(activation[:, None], size=tuple(size), mode=mode, align_corners=align_corners)[:, 0]
    per_map = (-1, *([1] * len(size)))
    lo = up.flatten(1).amin(dim=1).view(per_map)
    hi = up.flatten(1).amax(dim=1).view(per_map)
    span = hi - lo
    ok = (span > 0) & ~constant.view(per_map)
    return torch.where(ok, (up - lo) / torch.where(ok, span, torch.ones_like(span)), torch.zeros_like(up))


def select_channels(activation: torch.Tensor, top_k: int | None) -> torch.Tensor:
    """The channels fast Score-CAM scores: the ``top_k`` largest by spatial mean activation, per sample.

    Args:
        activation: ``(B, C, h, w)`` (or ``(B, C, d, h, w)``: the mean runs over every spatial dimension).
        top_k: How many channels (None or ``>= C``: all).

    Returns:
        ``(B, C)`` bool, True for selected channels (ties broken towards the lower channel index).

    Example:
        >>> select_channels(torch.tensor([[[[1.0]], [[3.0]], [[2.0]]]]), 2).tolist()
        [[False, True, True]]
    """
    batch, channels = activation.shape[:2]
    if top_k is None or top_k >= channels:
        return torch.ones(batch, channels, dtype=torch.bool, device=activation.device)
    mean = activation.to(precise_dtype(activation)).mean(dim=tuple(range(2, activation.ndim)))
    # stable descending order: equal means keep channel order
    order = torch.sort(mean, dim=1, descending=True, stable=True).indices[:, :top_k]
    chosen = torch.zeros(batch, channels, dtype=torch.bool, device=activation.device)
    chosen.scatter_(1, order, True)
    return chosen


@dataclass(frozen=True)
class _MaskedLogits:
    """Logits of the distinct masked inputs of a batch, and which row serves each (sample, channel)."""

    row_of: torch.Tensor  # (B, C) long: logits row of each scored (sample, channel); -1 = not scored
    logits: torch.Tensor  # (R, K)
    distinct: torch.Tensor  # (B,) distinct masked inputs of each sample (the shared all-zero one included)


def _masked_logits(view: LayerView, probe: Probe, *, top_k: int | None, align_corners: bool) -> _MaskedLogits:
    act = view.activation.detach()
    inputs = view.inputs.detach()
    batch, channels = act.shape[:2]
    size = tuple(int(s) for s in inputs.shape[2:])
    device = inputs.device
    mask_dtype = inputs.dtype if inputs.dtype in (torch.float32, torch.float64) else torch.float32
    chosen = select_channels(act, top_k)
    flat = act.flatten(2)
    constant = flat.amax(dim=2) == flat.amin(dim=2)

    # Distinct masked inputs: a flat channel masks every image to zeros (one shared row for the batch);
    # channels with identical values give identical masks (scored once per sample).
    row_of = torch.full((batch, channels), -1, dtype=torch.long, device=act.device)
    row_sample: list[torch.Tensor] = []
    row_channel: list[torch.Tensor] = []
    count = 0
    zero_row = -1
    if bool((chosen & constant).any()):
        zero_row = 0
        row_sample.append(torch.zeros(1, dtype=torch.long, device=act.device))
        row_channel.append(torch.full((1,), -1, dtype=torch.long, device=act.device))
        count = 1
        row_of[chosen & constant] = zero_row
    for b in range(batch):
        live = (chosen[b] & ~constant[b]).nonzero().flatten()
        if live.numel() == 0:
            continue
        uniq, first, inverse = _unique_rows(flat[b, live])
        row_sample.append(torch.full((uniq,), b, dtype=torch.long, device=act.device))
        row_channel.append(live[first])
        row_of[b, live] = count + inverse
        count += uniq
    samples = torch.cat(row_sample) if row_sample else torch.zeros(0, dtype=torch.long, device=act.device)
    chans = torch.cat(row_channel) if row_channel else torch.zeros(0, dtype=torch.long, device=act.device)

    def make_batch(start: int, stop: int) -> torch.Tensor:
        s, k = samples[start:stop], chans[start:stop]
        real = k >= 0
        masks = torch.zeros(stop - start, *size, dtype=mask_dtype, device=device)
        if bool(real.any()):
            masks[real] = channel_masks(
                act[s[real], k[real]].to(device=device, dtype=mask_dtype), size, align_corners=align_corners
            )
        masked = (inputs.index_select(0, s.to(device)).to(mask_dtype) * masks[:, None]).to(inputs.dtype)
        multi = probe.recording.model_inputs  # several model inputs: the first is masked, the others hold their values
        return masked if multi is None else multi.with_rows(multi.names[0], masked, s.to(device))  # type: ignore[return-value]

    distinct = torch.tensor(
        [float(torch.unique(row_of[b][row_of[b] >= 0]).numel()) for b in range(batch)], device=act.device
    )
    if count == 0:
        return _MaskedLogits(row_of, torch.zeros(0, 0, device=device), distinct)
    execution = view.execution
    item_bytes = inputs[:1].nelement() * inputs.element_size() * 2 + math.prod(size) * 8

    def forward(x: torch.Tensor) -> torch.Tensor:
        return probe.logits(x, execution=execution)

    with torch.no_grad():
        parts = run_measured(forward, count, make_batch, execution=execution, device=device, item_bytes=item_bytes)
    return _MaskedLogits(row_of, torch.cat(parts), distinct)


def _unique_rows(values: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Distinct rows of ``values`` (N, D): (count, index of each distinct row's first occurrence, inverse)."""
    _, inverse = torch.unique(values, dim=0, return_inverse=True)
    uniq = int(inverse.max()) + 1 if inverse.numel() else 0
    positions = torch.arange(values.shape[0], device=values.device)
    first = torch.full((uniq,), values.shape[0], dtype=torch.long, device=values.device)
    first = first.scatter_reduce(0, inverse, positions, reduce="amin")
    # renumber distinct rows by first occurrence so that rows follow channel order
    order = torch.argsort(first)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(uniq, device=values.device)
    return uniq, first[order], rank[inverse]


@register(
    "scorecam",
    title="Score-CAM",
    needs={"activations", "probe"},
    defaults={"top_k": None, "align_corners": False},
    volumes=True,
    paper="Wang et al., Score-CAM: Score-Weighted Visual Explanations for Convolutional Neural Networks, "
    "CVPR Workshops 2020 (arXiv:1910.01279)",
    formula="H_k = norm(up(A_k)) ;  w = softmax_k(S(X ⊙ H_k)) ;  L = ReLU(sum_k w_k A_k)",
    summary="Channels weighted by the softmax of the target score of the input masked by each channel.",
)
def scorecam(view: LayerView, top_k: int | None = None, align_corners: bool = False) -> MethodOutput:
    """Score-CAM (Wang et al., CVPRW 2020, arXiv:1910.01279).

    Formula: each channel ``A_k`` is upsampled bilinearly to the input size and min-max normalised,
    ``H_k = (up(A_k) - min) / (max - min)``; it masks the input, ``X ⊙ H_k``; the weights are the softmax over
    channels of the target scores of the masked inputs, ``w = softmax_k(S(X ⊙ H_k))``; and the map is
    ``L = ReLU(sum_k w_k A_k)`` (this function returns the signed sum; the ReLU is applied when rendering).

    Variant choices:

    * **Baseline**: the mask multiplies the *normalised* input tensor the model receives, so a masked-out
      pixel is 0 in normalised space (the dataset mean colour for ImageNet preprocessing), not black. The
      weights are the softmax of the masked scores themselves (arXiv v1 and pytorch-grad-cam), not of the
      increase over a baseline score (v2's CIC); with one shared baseline score the two are the same softmax.
    * **Scores** are the probe's target scores: logits by default.
    * **Upsampling** uses ``align_corners=False`` (pixel-centre aligned, like every cnnlens upsampling);
      pytorch-grad-cam uses ``torch.nn.UpsamplingBilinear2d``, i.e. ``align_corners=True``: pass
      ``align_corners=True`` to reproduce it exactly.
    * A channel that is **flat** at layer resolution gives the all-zero mask (the definition's 0/0); such
      masked inputs are all zeros and are scored once per batch. pytorch-grad-cam divides by
      ``max - min + 1e-8`` instead (same masks up to that epsilon).

    Exact mode (``top_k=None``) scores every channel, but runs each distinct masked input once (flat and
    duplicate channels share a forward); the maps equal the definition. Masked inputs are built chunk by
    chunk (never all at once), sized to the memory budget of ``view.execution`` from the measured footprint
    of the first masked forward (:mod:`cnnlens.batching`); ``Execution(chunk_size=)`` fixes the size instead,
    and ``Execution(memory_format="channels_last")`` feeds the masked inputs in channels-last memory format
    (faster convolutions on CPU; same values up to float32 rounding).

    Fast mode (``top_k=k``): only the ``k`` channels with the largest spatial mean activation of each image
    are scored (:func:`select_channels`), and the softmax is taken over those ``k`` scores only; the other
    channels get weight 0. This is the exact softmax renormalised to the selected set, so the map differs
    from the exact one only by the softmax mass of the unselected channels. Cost: ``k`` forwards instead of
    ``C``.

    Args:
        view: The captured activation of one layer for one target, with its probe.
        top_k: Score only this many channels per image (None: all, exact).
        align_corners: Bilinear upsampling convention of the masks.

    Returns:
        :class:`MethodOutput` with the ``(B, h, w)`` raw map (float64) and the per-sample extra
        ``masked_inputs``: how many distinct masked inputs were scored for the image (the all-zero input of
        flat channels, shared by the batch, counts once).

    Example:
        >>> import torch, cnnlens
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
        ...                           torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 2))
        >>> res = cnnlens.explain(net, torch.randn(1, 3, 8, 8), methods=["scorecam"], layers=["1"])
        >>> res["scorecam", "1"].raw.shape
        torch.Size([1, 1, 8, 8])
    """
    _check_feature_map(view, "scorecam")
    if top_k is not None:
        check_count("scorecam", "top_k", top_k)
    probe = view.require_probe("scorecam")
    key = ("scorecam", view.layer, top_k, bool(align_corners))
    masked = probe.memo(key, lambda: _masked_logits(view, probe, top_k=top_k, align_corners=bool(align_corners)))
    act = view.activation
    dtype = precise_dtype(act)
    batch, channels = act.shape[:2]
    scored = masked.row_of >= 0
    scores = torch.full((batch, channels), -torch.inf, dtype=dtype, device=act.device)
    if bool(scored.any()):
        pair_b, pair_k = scored.nonzero(as_tuple=True)
        rows = masked.row_of[pair_b, pair_k]
        values = _scores(probe, masked.logits[rows.to(masked.logits.device)], view.target, pair_b, "scorecam")
        scores[pair_b, pair_k] = values.to(device=act.device, dtype=dtype)
    scores = torch.nan_to_num(scores, nan=-torch.inf, posinf=torch.finfo(dtype).max)
    has_any = torch.isfinite(scores).any(dim=1, keepdim=True)
    weights = torch.where(has_any, torch.softmax(torch.where(has_any, scores, 0.0), dim=1), 0.0)
    weights = torch.where(scored, weights, 0.0)
    raw = weighted_sum(weights, act)
    return MethodOutput(raw, {"masked_inputs": masked.distinct})


# -- Ablation-CAM --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _AblatedLogits:
    pair_b: torch.Tensor  # (P,) sample of each ablation
    pair_k: torch.Tensor  # (P,) ablated channel
    logits: torch.Tensor  # (P, K)


def _ablated_logits(view: LayerView, probe: Probe) -> _AblatedLogits:
    act = view.activation.detach()
    # Zeroing a channel that is already all zero changes nothing: y_k = y and w_k = 0, no forward needed.
    live = act.flatten(2).ne(0).any(dim=2)
    pair_b, pair_k = live.nonzero(as_tuple=True)

    buffer: list[torch.Tensor] = []  # one allocation reused by every chunk (the replay owns each chunk)

    def make_rows(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        b, k = pair_b[start:stop], pair_k[start:stop]
        n = stop - start
        if not buffer or buffer[0].shape[0] < n:
            buffer[:] = [torch.empty((n, *act.shape[1:]), dtype=act.dtype, device=act.device)]
        rows = buffer[0][:n]
        # pairs are ordered by sample: copy each sample's run of rows with one broadcast (no gather)
        samples, counts = torch.unique_consecutive(b, return_counts=True)
        offset = 0
        for sample, count in zip(samples.tolist(), counts.tolist(), strict=True):
            rows[offset : offset + count].copy_(act[sample].expand(count, *act.shape[1:]))
            offset += count
        rows[torch.arange(n, device=rows.device), k] = 0
        return rows, b

    logits = probe.replay_rows(view.layer, int(pair_b.numel()), make_rows, execution=view.execution)
    return _AblatedLogits(pair_b, pair_k, logits)


@register(
    "ablationcam",
    title="Ablation-CAM",
    needs={"activations", "probe"},
    defaults={"eps": 1e-6},
    volumes=True,
    paper="Desai & Ramaswamy, Ablation-CAM: Visual Explanations for Deep Convolutional Network via "
    "Gradient-free Localization, WACV 2020",
    formula="w_k = (y - y_k) / y  (y_k: score with channel k set to 0) ;  L = ReLU(sum_k w_k A_k)",
    summary="Channels weighted by the relative drop of the target score when each is set to zero.",
)
def ablationcam(view: LayerView, eps: float = 1e-6) -> MethodOutput:
    """Ablation-CAM (Desai & Ramaswamy, WACV 2020).

    Formula: ``w_k = (y - y_k) / y`` where ``y`` is the target score and ``y_k`` the score with channel ``k``
    of the layer set to 0; ``L = ReLU(sum_k w_k A_k)`` (this function returns the signed sum).

    Variant choices:

    * **Ablation value 0**, as in the paper. pytorch-grad-cam also uses 0 when the activation's minimum is 0
      (post-ReLU layers); on layers with negative values it writes ``min(A) - 1e7`` instead (its
      ``AblationLayer``), which is a different perturbation: compare with it on post-ReLU layers only.
    * **Denominator guard**: ``y`` is replaced by ``sign(y) * max(|y|, eps)`` (``sign(0) = +1``), so the
      weights stay finite; samples with ``|y| < eps`` are flagged in the extra ``score_near_zero`` (their
      map's scale and sign are not meaningful). A negative ``y`` flips the sign of every weight, as in the
      paper and pytorch-grad-cam; it is reported in ``score_negative``.
    * Channels that are all zero are not ablated (their weight would multiply a zero channel).

    The ablations only re-run the part of the network after the layer where ``torch.fx`` can trace the model
    (:meth:`cnnlens.capture.Capture.replay`), else full forwards with a temporary hook; both in
    memory-bounded chunks sized by ``view.execution`` (its memory budget and chunk size; see
    :mod:`cnnlens.batching`).

    Args:
        view: The captured activation of one layer for one target, with its probe.
        eps: Smallest ``|y|`` used as denominator.

    Returns:
        :class:`MethodOutput` with the ``(B, h, w)`` raw map (float64) and per-sample extras
        ``score_near_zero`` and ``score_negative`` (1.0 or 0.0).

    Example:
        >>> import torch, cnnlens
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
        ...                           torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 2))
        >>> res = cnnlens.explain(net, torch.randn(1, 3, 8, 8), methods=["ablationcam"], layers=["1"])
        >>> res["ablationcam", "1"].extras["score_near_zero"].shape
        torch.Size([1, 1])
    """
    _check_feature_map(view, "ablationcam")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise OptionError(f"ablationcam: option eps must be a positive number, got {eps!r}.")
    probe = view.require_probe("ablationcam")
    ablated = probe.memo(("ablationcam", view.layer), lambda: _ablated_logits(view, probe))
    act = view.activation
    dtype = precise_dtype(act)
    batch, channels = act.shape[:2]
    y = view.score.detach().to(device=act.device, dtype=dtype)
    drop = torch.zeros(batch, channels, dtype=dtype, device=act.device)
    if ablated.pair_b.numel():
        y_k = _scores(probe, ablated.logits, view.target, ablated.pair_b, "ablationcam").to(act.device)
        drop[ablated.pair_b, ablated.pair_k] = y[ablated.pair_b] - y_k
    sign = torch.where(y < 0, -1.0, 1.0).to(dtype)
    denom = sign * y.abs().clamp(min=float(eps))
    weights = drop / denom[:, None]
    raw = weighted_sum(weights, act)
    extras = {
        "score_near_zero": (y.abs() < eps).to(torch.float32),
        "score_negative": (y < 0).to(torch.float32),
    }
    return MethodOutput(raw, extras)
