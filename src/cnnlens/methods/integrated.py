"""Integrated Gradients (Sundararajan et al., ICML 2017) and its quadrature rules.

Input scope: computed once per :func:`cnnlens.explain.explain` call for every target at once (kept in the
call's :meth:`cnnlens.capture.Probe.memo`), whatever the requested layers. See
:mod:`cnnlens.methods.attribution` for the channel reductions and display rules shared with the other
gradient attributions.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, Literal

import torch

from cnnlens.capture import Probe
from cnnlens.errors import OptionError
from cnnlens.maps import precise_dtype
from cnnlens.methods.attribution import (
    _REDUCES,
    _accumulate,
    _options_key,
    _row_passes,
    chunk_input_gradients,
    reduce_channels,
    rows_per_pass,
    varied_input,
    view_input_name,
)
from cnnlens.methods.registry import LayerView, MethodOutput, check_count, register

__all__ = ["QuadratureRule", "integrated_gradients", "quadrature"]

QuadratureRule = Literal["gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_right", "riemann_middle"]
"""The rule that approximates Integrated Gradients' path integral; see :func:`quadrature`."""

_RULES: tuple[QuadratureRule, ...] = (
    "gausslegendre",
    "riemann_trapezoid",
    "riemann_left",
    "riemann_right",
    "riemann_middle",
)


@functools.lru_cache(maxsize=64)
def _quadrature(steps: int, rule: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    n = steps
    if rule == "gausslegendre":
        # Golub-Welsch: nodes are the eigenvalues of the Jacobi matrix of the Legendre polynomials.
        k = torch.arange(1, n, dtype=torch.float64)
        beta = k / torch.sqrt(4 * k * k - 1)
        jacobi = torch.diag(beta, 1) + torch.diag(beta, -1)
        nodes, vectors = torch.linalg.eigh(jacobi)
        weights = 2 * vectors[0] ** 2
        alphas, sizes = (nodes + 1) / 2, weights / 2
    elif rule == "riemann_trapezoid":
        alphas = torch.linspace(0, 1, n, dtype=torch.float64)
        sizes = torch.full((n,), 1 / (n - 1), dtype=torch.float64)
        sizes[0] /= 2
        sizes[-1] /= 2
    else:
        sizes = torch.full((n,), 1 / n, dtype=torch.float64)
        start = {"riemann_left": 0.0, "riemann_right": 1.0, "riemann_middle": 0.5}[rule]
        alphas = (torch.arange(n, dtype=torch.float64) + start) / n
    return tuple(alphas.tolist()), tuple(sizes.tolist())


def quadrature(steps: int, rule: str = "gausslegendre") -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes ``alpha`` in [0, 1] and weights of the rule approximating ``integral_0^1 f(alpha) d alpha``.

    Rules: ``"gausslegendre"`` (exact for polynomials of degree < 2·steps; nodes from the eigenvalues of
    the Jacobi matrix, as numpy's ``leggauss`` up to ~1e-15), ``"riemann_trapezoid"`` (``steps`` equally
    spaced nodes including both ends, weights ``1/(steps-1)`` halved at the ends; they sum to 1. captum's
    "riemann_trapezoid" uses weights ``1/steps`` halved at the ends, which sum to ``1 - 1/steps``, so its
    results are smaller by about that factor), ``"riemann_left"``, ``"riemann_right"``, ``"riemann_middle"``
    (weights ``1/steps``, as captum).

    Returns:
        ``(alphas, weights)``, float64 tensors of shape ``(steps,)``.

    Example:
        >>> a, w = quadrature(2)
        >>> [round(v, 6) for v in a.tolist()], [round(v, 12) for v in w.tolist()]
        ([0.211325, 0.788675], [0.5, 0.5])
    """
    if rule not in _RULES:
        raise OptionError(
            f"integrated_gradients: option rule must be one of {', '.join(map(repr, _RULES))}; got {rule!r}."
        )
    check_count("integrated_gradients", "steps", steps, 2 if rule == "riemann_trapezoid" else 1)
    alphas, sizes = _quadrature(steps, rule)
    return torch.tensor(alphas, dtype=torch.float64), torch.tensor(sizes, dtype=torch.float64)


def _baseline_like(baseline: Any, x: torch.Tensor, name: str | None = None) -> torch.Tensor:
    if isinstance(baseline, Mapping):
        if name is None or name not in baseline:
            raise OptionError(
                f"the Integrated Gradients baselines are given per input ({sorted(map(str, baseline))}) but input "
                f"{name!r} has none; give one baseline per input name, or one number for all."
            )
        baseline = baseline[name]
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        return torch.full_like(x, float(baseline))
    if isinstance(baseline, torch.Tensor):
        b = baseline.detach().to(device=x.device, dtype=x.dtype)
        try:
            return torch.broadcast_to(b, x.shape).clone()
        except RuntimeError:
            pass
    shape = tuple(baseline.shape) if isinstance(baseline, torch.Tensor) else type(baseline).__name__
    raise OptionError(
        f"the Integrated Gradients baseline must be a number or a tensor broadcastable to the input "
        f"{tuple(x.shape)} (e.g. (C, H, W) or (1, C, H, W)) in the model's input space; got {shape}."
    )


def _integrated_gradients_all(
    probe: Probe, baseline: Any, steps: int, rule: str, batch_size: int, name: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """IG attributions ``(T, B, C, H, W)`` and convergence deltas ``(T, B)`` for every target at once.

    With several inputs, the path runs over input ``name`` (None: the first) with the others held fixed.
    """
    rec = probe.recording
    name, x = varied_input(probe, name)
    base = _baseline_like(baseline, x, name)
    alphas, weights = quadrature(steps, rule)
    dtype = precise_dtype(x)
    diff = x - base
    node = alphas.to(device=x.device, dtype=x.dtype)
    weight = weights.to(device=x.device, dtype=dtype)
    num_targets = len(probe.targets)
    total = torch.zeros((num_targets, *x.shape), dtype=dtype, device=x.device)

    def make_rows(copy_index: torch.Tensor, sample_index: torch.Tensor) -> torch.Tensor:
        return base[sample_index] + node[copy_index].view(-1, 1, 1, 1) * diff[sample_index]

    passes = _row_passes(probe, make_rows, steps, batch_size, gradients=False, input_gradients=True, vary=name)
    for copy_index, sample_index, chunk, _ in passes:
        grads = chunk_input_gradients(chunk, name)
        scaled = grads.to(dtype) * weight[copy_index].view(1, -1, *([1] * (grads.ndim - 2)))
        _accumulate(total, 1, sample_index, scaled)
    attributions = total * diff.to(dtype)
    assert rec.scores is not None  # set by Capture.run
    base_logits = probe.logits(
        base if rec.model_inputs is None or name is None else rec.model_inputs.replace(name, base)
    )
    rows = torch.arange(x.shape[0], device=x.device)
    base_scores = torch.stack([probe.scores(base_logits, t, rows) for t in range(num_targets)])
    gap = rec.scores.T.to(dtype) - base_scores.to(dtype)
    delta = attributions.flatten(2).sum(dim=2) - gap
    return attributions, delta


@register(
    "integrated_gradients",
    scope="input",
    title="Integrated Gradients",
    needs={"probe"},
    paper="Sundararajan, Taly & Yan, Axiomatic Attribution for Deep Networks, ICML 2017 (arXiv:1703.01365)",
    formula="a = (x - x') ⊙ sum_s w_s dS/dx(x' + alpha_s (x - x')) ;  raw = sum_c a_c ;  sum(raw) ≈ S(x) - S(x')",
    summary="Gradients integrated along the straight path from a baseline to the input (one map per call).",
    display="abs",
    defaults={"baseline": 0.0, "steps": 50, "rule": "gausslegendre", "reduce": "sum"},
)
def integrated_gradients(
    view: LayerView,
    baseline: float | torch.Tensor = 0.0,
    steps: int = 50,
    rule: str = "gausslegendre",
    reduce: str = "sum",
) -> MethodOutput:
    """Integrated Gradients (Sundararajan et al., ICML 2017).

    Formula: ``a = (x - x') ⊙ ∫_0^1 dS/dx(x' + α (x - x')) dα``, the integral approximated by a quadrature
    rule with ``steps`` nodes (:func:`quadrature`; Gauss-Legendre by default, as captum). Completeness:
    ``sum(a) = S(x) - S(x')``; the per-sample error ``sum(a) - (S(x) - S(x'))`` is reported as
    ``extras["convergence_delta"]`` (captum's definition); increase ``steps`` when it is large relative to
    the score gap. With the default ``reduce="sum"`` the raw map sums to ``sum(a)``.

    The baseline ``x'`` lives in the **model's input space** (the preprocessed tensor): the default ``0.0``
    is the all-zero tensor, i.e. the mean colour for ImageNet-normalised inputs, not a black image. Pass a
    number or a tensor broadcastable to the input (``(C, H, W)``, ``(1, C, H, W)`` or per sample
    ``(B, C, H, W)``, which then depends on the batch layout).

    Several inputs (``explain(model, (x_rgb, x_depth))``): one map per image input, each integrated along the
    path of that input alone, from its own baseline, with the other inputs held at their values (captum's
    ``IntegratedGradients`` called on that input with the others in ``additional_forward_args``; completeness
    then holds per input: ``sum(a_i) = S(.., x_i, ..) - S(.., x_i', ..)``). ``baseline`` may be a mapping
    ``{input name: number or tensor}``. This costs ``steps`` passes per input.

    The ``steps × B`` interpolated inputs are run in chunks of at most ``Execution.chunk_size`` rows (32 by
    default; an execution knob, not an option: chunking changes nothing beyond float rounding), several
    interpolation points per forward/backward, with every target of the call in the same forward. Input
    scope: one result per explain call, whatever the layers.

    Args:
        view: One target's view; needs the probe.
        baseline: ``x'``, a number or a tensor in the model's input space.
        steps: Number of quadrature nodes.
        rule: ``"gausslegendre"``, ``"riemann_trapezoid"``, ``"riemann_left"``, ``"riemann_right"`` or
            ``"riemann_middle"``.
        reduce: Channel reduction, see :func:`reduce_channels`.

    Returns:
        The raw map ``(B, H, W)`` and ``extras["convergence_delta"]`` ``(B,)``.

    Example:
        >>> import cnnlens
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
        ...                           torch.nn.Linear(144, 2))
        >>> r = cnnlens.explain(net, torch.randn(1, 3, 8, 8), methods=["integrated_gradients"],
        ...                     layers=["0"], options={"integrated_gradients": {"steps": 64}})
        >>> r["integrated_gradients", "0"].extras["convergence_delta"].shape
        torch.Size([1, 1])
    """
    probe = view.require_probe("integrated_gradients")
    quadrature(steps, rule)  # validates steps and rule before any pass
    batch_size = rows_per_pass(view)
    if reduce not in _REDUCES:
        reduce_channels(torch.zeros(1, 1, 1, 1), reduce)  # raises the standard message
    options = {"baseline": baseline, "steps": steps, "rule": rule}
    name = view_input_name(view)
    key = ("integrated_gradients", name, _options_key(options))
    # The memo entry keeps ``options`` alive: a tensor baseline is keyed by identity.
    attributions, delta, _ = probe.memo(
        key, lambda: (*_integrated_gradients_all(probe, baseline, steps, rule, batch_size, name), options)
    )
    return MethodOutput(reduce_channels(attributions[view.target], reduce), {"convergence_delta": delta[view.target]})
