"""Smoothing by noisy copies of the input: the :func:`smooth` wrapper, SmoothGrad and Smooth Grad-CAM++.

Smoothing wraps a method rather than being a flag on every method: ``smooth("gradcampp", n=8, sigma=0.15)``
returns a :class:`~cnnlens.methods.registry.MethodSpec` (id ``"smooth_gradcampp"``) that
:func:`cnnlens.explain.explain` accepts like any registered id.

**Noise.** Copy ``j`` of sample ``i`` is ``x_i + sigma · (max x_i - min x_i) · eps_j`` with
``eps_j ~ N(0, I)`` of the shape of one sample, in the model's input space: ``sigma`` is a fraction of the
sample's value range, as in SmoothGrad (Smilkov et al. recommend 10-20 %). A constant sample gets no noise.
``eps_j`` is drawn from a CPU generator seeded by ``(seed, j)`` alone, in float32, then cast to the model's
dtype and device: the same seed gives the same maps on every run, device and dtype, and the noise of a
sample never depends on its position in the batch, on the other samples, or on how the copies are chunked
(copies of different samples share ``eps_j``: common random numbers, which keep every map a function of its
own image only). Noisy copies run in chunks of at most ``Execution.chunk_size`` rows (default 32; an
execution knob, not part of the variant) through the probe, with the
targets fixed to the classes explained on the clean input (a noisy copy never re-ranks its top class).

**Cost.** The noisy passes record every requested layer at once: one explain call costs ``n`` forwards and
``n·T`` backwards (``T`` targets) per smoothed method, whatever the number of layers.

**Several inputs** (:mod:`cnnlens.inputs`): an input-scope method (SmoothGrad) is smoothed per image input,
with noise on that input alone and the others held at their values (``n`` passes per input; the convention
of :mod:`cnnlens.methods.attribution`); a layer-scope method (Smooth Grad-CAM++, ``smooth("gradcam")``) adds
noise to every floating-point explained input at once, each with its own noise (input ``"0"``'s is the
noise a lone input would get; input ``name``'s is seeded by ``(seed, copy, name)``).
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from cnnlens.capture import Probe, Recording
from cnnlens.errors import CnnlensWarning, MethodError, OptionError
from cnnlens.inputs import ModelInputs
from cnnlens.maps import precise_dtype
from cnnlens.methods.attribution import (
    _accumulate,
    _options_key,
    _row_passes,
    explained_inputs,
    input_view,
    rows_per_pass,
)
from cnnlens.methods.cam import weighted_sum
from cnnlens.methods.registry import LayerView, MethodOutput, MethodSpec, Scope, check_count, get_method, register

__all__ = ["SMOOTH_OPTIONS", "noise", "noisy_inputs", "smooth", "smoothgradcampp"]

SMOOTH_OPTIONS = ("n", "sigma", "seed")
"""The options every smoothed method adds to its variant."""


def _copy_seed(seed: int, copy: int, stream: str | None = None) -> int:
    text = f"cnnlens-smooth:{seed}:{copy}" if stream is None else f"cnnlens-smooth:{seed}:{copy}:{stream}"
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def noise(seed: int, copy: int, shape: tuple[int, ...], stream: str | None = None) -> torch.Tensor:
    """The standard normal noise ``eps_copy`` of one sample shape, float32 on the CPU.

    ``stream`` separates the noise of several model inputs (None: the first input's, a lone input's).

    Example:
        >>> torch.equal(noise(0, 3, (3, 4, 4)), noise(0, 3, (3, 4, 4)))
        True
    """
    gen = torch.Generator().manual_seed(_copy_seed(int(seed), int(copy), stream))
    return torch.randn(shape, generator=gen, dtype=torch.float32)


def _noisy_rows(
    inputs: torch.Tensor,
    sigma: float,
    seed: int,
    copy_index: torch.Tensor,
    sample_index: torch.Tensor,
    stream: str | None = None,
) -> torch.Tensor:
    flat = inputs.detach().flatten(1)
    scale = float(sigma) * (flat.amax(dim=1) - flat.amin(dim=1)).float()
    shape = tuple(int(v) for v in inputs.shape[1:])
    copies = copy_index.tolist()
    eps = {j: noise(seed, j, shape, stream) for j in sorted(set(copies))}
    stacked = torch.stack([eps[j] for j in copies]).to(inputs.device)
    delta = scale[sample_index].view(-1, *([1] * len(shape))) * stacked
    return inputs[sample_index] + delta.to(inputs.dtype)


def noisy_inputs(inputs: torch.Tensor, n: int, sigma: float, seed: int = 0) -> torch.Tensor:
    """The ``n`` noisy copies of a batch that smoothing runs, ``(n, B, C, H, W)`` (see the module docstring).

    Example:
        >>> x = torch.rand(2, 3, 4, 4)
        >>> noisy_inputs(x, 5, 0.0).shape, torch.equal(noisy_inputs(x, 1, 0.0)[0], x)
        (torch.Size([5, 2, 3, 4, 4]), True)
    """
    batch = int(inputs.shape[0])
    rows = torch.arange(n * batch)
    copy_index, sample_index = rows // batch, rows % batch
    out = _noisy_rows(inputs, sigma, seed, copy_index.to(inputs.device), sample_index.to(inputs.device))
    return out.view(n, *inputs.shape)


def _check_smooth(n: Any, sigma: Any, seed: Any, method: str = "smooth") -> None:
    check_count(method, "n", n)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise OptionError(f"{method}: option seed must be an integer; got {seed!r}.")
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma >= 0:
        raise OptionError(
            f"{method}: option sigma must be a number >= 0 (a fraction of each input's value range); got {sigma!r}."
        )


def _stream(multi: ModelInputs, name: str) -> str | None:
    return None if name == multi.names[0] else name


def _noisy_passes(
    probe: Probe,
    n: int,
    sigma: float,
    seed: int,
    batch_size: int,
    *,
    gradients: bool,
    input_gradients: bool,
    vary: str | None = None,
) -> Iterator[tuple[torch.Tensor, Recording, Probe]]:
    """Noisy passes of the lone input; with several inputs, of input ``vary`` alone, or of every input.

    "Every input" (``vary`` None) means every floating-point explained input, each with its own noise.
    """
    multi = probe.recording.model_inputs

    def make_rows(copy_index: torch.Tensor, sample_index: torch.Tensor) -> torch.Tensor | ModelInputs:
        if multi is None:
            return _noisy_rows(probe.recording.inputs, sigma, seed, copy_index, sample_index)
        if vary is not None:
            return _noisy_rows(multi.tensor(vary), sigma, seed, copy_index, sample_index, _stream(multi, vary))
        rows = multi.rows(sample_index)
        for name, x in zip(multi.names, multi.tensors, strict=True):
            if x.is_floating_point():
                rows = rows.replace(name, _noisy_rows(x, sigma, seed, copy_index, sample_index, _stream(multi, name)))
        return rows

    for _, sample_index, rec, chunk_probe in _row_passes(
        probe, make_rows, n, batch_size, gradients=gradients, input_gradients=input_gradients, vary=vary
    ):
        yield sample_index, rec, chunk_probe


def _views(rec: Recording, probe: Probe, scope: Scope) -> Iterator[LayerView]:
    """One view per (layer, target): every recorded layer for a layer-scope method, else the one input view."""
    for layer in rec.layers if scope == "layer" else [scope]:
        for t in range(rec.num_targets):
            yield LayerView.of(rec, layer, t, probe=probe, execution=probe.cap.execution)


_Averages = dict[tuple[str, int], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def _average_maps(
    probe: Probe, base: MethodSpec, base_options: dict[str, Any], n: int, sigma: float, seed: int, batch_size: int
) -> _Averages:
    """Mean of the wrapped method's raw maps (and extras) over the noisy copies, for every layer and target.

    With several inputs an input-scope method is smoothed per input: noise on that input alone.
    """
    sums: dict[tuple[str, int], torch.Tensor] = {}
    extra_sums: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
    per_input = base.scope == "input" and probe.recording.model_inputs is not None
    groups = [(key, name) for key, name, _ in explained_inputs(probe.recording)] if per_input else [("", None)]
    for key_of_input, name in groups:
        _smooth_group(probe, base, base_options, n, sigma, seed, batch_size, key_of_input, name, sums, extra_sums)
    return {key: (total / n, {k: v / n for k, v in extra_sums[key].items()}) for key, total in sums.items()}


def _smooth_group(
    probe: Probe,
    base: MethodSpec,
    base_options: dict[str, Any],
    n: int,
    sigma: float,
    seed: int,
    batch_size: int,
    input_key: str,
    name: str | None,
    sums: dict[tuple[str, int], torch.Tensor],
    extra_sums: dict[tuple[str, int], dict[str, torch.Tensor]],
) -> None:
    """Accumulate the wrapped method's maps over noisy copies of one input (``name``) or of every input."""
    batch = int(probe.recording.inputs.shape[0])
    for sample_index, rec, chunk_probe in _noisy_passes(
        probe,
        n,
        sigma,
        seed,
        batch_size,
        gradients="gradients" in base.needs,
        input_gradients="input_gradients" in base.needs,
        vary=name,
    ):
        views = (
            _views(rec, chunk_probe, base.scope)
            if name is None
            else (
                input_view(rec, input_key, name, t, probe=chunk_probe, execution=probe.cap.execution)
                for t in range(rec.num_targets)
            )
        )
        for view in views:
            out = base.compute(view, base_options)
            key = (view.layer, view.target)
            raw = out.raw.to(precise_dtype(out.raw))
            if key not in sums:
                sums[key] = torch.zeros((batch, *raw.shape[1:]), dtype=raw.dtype, device=raw.device)
                extra_sums[key] = {}
            _accumulate(sums[key], 0, sample_index, raw)
            for extra, value in out.extras.items():
                value = value.detach().to(raw.dtype)
                acc = extra_sums[key].setdefault(extra, torch.zeros(batch, dtype=raw.dtype, device=raw.device))
                _accumulate(acc, 0, sample_index, value)


@dataclass(frozen=True)
class _Smoothed:
    """The method function of ``smooth(base)``: equal for equal bases, so equal specs de-duplicate."""

    base: MethodSpec

    def __call__(self, view: LayerView, *, n: int, sigma: float, seed: int, **base_options: Any) -> MethodOutput:
        base = self.base
        probe = view.require_probe(f"smooth({base.id})")
        _check_smooth(n, sigma, seed, f"smooth({base.id})")
        batch_size = rows_per_pass(view)  # the wrapped method's own passes read the same execution
        options = {"n": n, "sigma": sigma, "seed": seed, **base_options}
        key = ("smooth", base.id, base.fn, _options_key(options))
        averages, _ = probe.memo(
            key,
            lambda: (_average_maps(probe, base, base_options, n, sigma, seed, batch_size), options),
        )
        if (view.layer, view.target) not in averages:
            raise MethodError(
                f"smooth({base.id}) has no result for layer {view.layer!r}, target {view.target}: the layer is "
                "not part of the probe's capture."
            )
        raw, extras = averages[(view.layer, view.target)]
        return MethodOutput(raw, dict(extras))


def smooth(
    method: str | MethodSpec,
    n: int = 50,
    sigma: float = 0.15,
    seed: int = 0,
    *,
    id: str | None = None,
    title: str | None = None,
) -> MethodSpec:
    """Wrap any method so that its raw map is averaged over ``n`` noisy copies of the input (SmoothGrad).

    Paper: Smilkov, Thorat, Kim, Viégas & Wattenberg, SmoothGrad: removing noise by adding noise,
    arXiv:1706.03825 (2017). Formula: ``M_smooth(x) = (1/n) sum_j M(x + N(0, s^2))`` with
    ``s = sigma · (max x - min x)`` per sample (see the module docstring for how the noise is drawn).

    The wrapped method runs unchanged on each noisy copy (its own activations and gradients at that copy)
    and its **raw maps** are averaged (extras such as IG's convergence delta are averaged too); the display
    rule of the wrapped method is then applied to the average. This is SmoothGrad's definition for any
    method, and differs from ``smoothgradcampp``, which averages the gradient moments of Grad-CAM++ and
    applies the formula once to the clean activations.

    Args:
        method: A registered id or a spec (e.g. ``"saliency"``, ``"gradcampp"``, ``"guided_backprop"``).
        n: Number of noisy copies (``n=1, sigma=0`` reproduces the wrapped method).
        sigma: Noise standard deviation as a fraction of each sample's value range.
        seed: Noise seed; the same seed gives the same maps.
        id: The spec's id; default ``"smooth_<method id>"``.
        title: Display name; default ``"Smooth <method title>"``.

    Returns:
        A spec usable in ``explain(methods=[...])``; its variant holds the wrapped method's options plus
        ``n``, ``sigma`` and ``seed``, all overridable through ``options={id: {...}}``.

    Raises:
        MethodError: Invalid parameters, or a wrapped method that already has one of these options.

    Example:
        >>> import cnnlens
        >>> spec = smooth("gradcampp", n=8, sigma=0.15)
        >>> spec.id, spec.variant()["n"]
        ('smooth_gradcampp', 8)
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
        ...                           torch.nn.Linear(144, 2))
        >>> r = cnnlens.explain(net, torch.randn(1, 3, 8, 8), methods=[spec], layers=["1"])
        >>> r["smooth_gradcampp", "1"].raw.shape
        torch.Size([1, 1, 6, 6])
    """
    base = method if isinstance(method, MethodSpec) else get_method(method)
    _check_smooth(n, sigma, seed)
    if base.scope == "network":
        raise MethodError(f"cannot smooth {base.id!r}: network-scope methods are not supported by smooth().")
    clash = [key for key in SMOOTH_OPTIONS if key in base.defaults]
    if clash:
        raise MethodError(f"cannot smooth {base.id!r}: it already has the option(s) {clash} (is it smoothed already?).")
    defaults = {**base.defaults, "n": n, "sigma": sigma, "seed": seed}
    return MethodSpec(
        id=id or f"smooth_{base.id}",
        title=title or f"Smooth {base.title}",
        fn=_Smoothed(base),
        needs=frozenset({"probe"}),
        scope=base.scope,
        relu=base.relu,
        display=base.display,
        defaults=defaults,
        paper="Smilkov et al., SmoothGrad: removing noise by adding noise, arXiv:1706.03825 (2017); wrapped: "
        + base.paper,
        formula=f"mean over n noisy copies x + N(0, (sigma·range)^2) of [{base.formula}]",
        summary=f"{base.title} averaged over noisy copies of the input.",
    )


_smoothgrad = smooth("saliency", id="smoothgrad", title="SmoothGrad")
register(
    _smoothgrad.id,
    title=_smoothgrad.title,
    needs=_smoothgrad.needs,
    scope=_smoothgrad.scope,
    relu=_smoothgrad.relu,
    display=_smoothgrad.display,
    defaults=_smoothgrad.defaults,
    paper="Smilkov, Thorat, Kim, Viégas & Wattenberg, SmoothGrad: removing noise by adding noise, "
    "arXiv:1706.03825 (2017)",
    formula="raw = (1/n) sum_j sum_c dS/dx_c (x + N(0, (sigma·(max x - min x))^2)) ;  shown = |raw|",
    summary="Vanilla gradient averaged over noisy copies of the input (one map per call).",
)(_smoothgrad.fn)


def _moments(
    probe: Probe, n: int, sigma: float, seed: int, batch_size: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per layer, the means over the noisy copies of g, g² and g³, each ``(T, B, C, h, w)``."""
    batch = int(probe.recording.inputs.shape[0])
    sums: dict[str, list[torch.Tensor]] = {}
    for sample_index, rec, _ in _noisy_passes(probe, n, sigma, seed, batch_size, gradients=True, input_gradients=False):
        for layer, grad in rec.gradients.items():
            g = grad.to(precise_dtype(grad))
            if layer not in sums:
                shape = (g.shape[0], batch, *g.shape[2:])
                sums[layer] = [torch.zeros(shape, dtype=g.dtype, device=g.device) for _ in range(3)]
            g2 = g * g
            for acc, power in zip(sums[layer], (g, g2, g2 * g), strict=True):
                _accumulate(acc, 1, sample_index, power)
    return {layer: (d1 / n, d2 / n, d3 / n) for layer, (d1, d2, d3) in sums.items()}


@register(
    "smoothgradcampp",
    title="Smooth Grad-CAM++",
    needs={"probe"},
    defaults={"n": 8, "sigma": 0.15, "seed": 0},
    paper="Omeiza, Speakman, Cintas & Weldemariam, Smooth Grad-CAM++: An Enhanced Inference Level "
    "Visualization Technique for Deep Convolutional Neural Network Models, arXiv:1908.01224 (2019)",
    formula="D_p = mean_j g_j^p ;  alpha = D2 / (2 D2 + sum_ab(A_k) D3) ;  w_k = sum_ij alpha relu(D1) ;  "
    "L = ReLU(sum_k w_k A_k)",
    summary="Grad-CAM++ with gradient moments averaged over noisy copies of the input.",
)
def smoothgradcampp(view: LayerView, n: int = 8, sigma: float = 0.15, seed: int = 0) -> torch.Tensor:
    """Smooth Grad-CAM++ (Omeiza et al., 2019).

    Formula: over ``n`` noisy copies (noise as in :func:`smooth`), the gradient moments at the layer
    ``D1 = mean g``, ``D2 = mean g²``, ``D3 = mean g³``; then ``alpha = D2 / (2 D2 + sum_ab(A_k) D3)``
    (``alpha = 0`` where ``D2 = 0`` or the denominator vanishes), ``w_k = sum_ij alpha_ij relu(D1_ij)`` and
    the raw map ``sum_k w_k A_k``, where ``A`` and ``sum_ab A`` are the **clean** input's activations.

    Variant choices: the numerator is ``D2`` (the paper's Eq. writes ``D1``; torch-cam also uses ``D2``,
    the form that reduces to Grad-CAM++ for ``n = 1``), and ``relu(·)`` takes the **mean** ``D1``, unlike
    torch-cam, which uses the last noisy sample's gradient. With ``n=1, sigma=0`` this equals ``gradcampp``.
    Unlike ``smooth("gradcampp")``, which averages whole Grad-CAM++ maps computed on the noisy copies, the
    moments are averaged and the formula applied once.

    Args:
        view: One layer and target; needs the probe.
        n: Number of noisy copies.
        sigma: Noise standard deviation as a fraction of each sample's value range.
        seed: Noise seed.

    Returns:
        ``(B, h, w)`` raw map in float64 (float32 on MPS).

    Example:
        >>> import cnnlens
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
        ...                           torch.nn.Linear(144, 2))
        >>> r = cnnlens.explain(net, torch.randn(2, 3, 8, 8), methods=["smoothgradcampp"], layers=["1"])
        >>> r["smoothgradcampp", "1"].variant
        {'n': 8, 'sigma': 0.15, 'seed': 0, 'relu': True}
    """
    view.require_feature_map("smoothgradcampp")
    probe = view.require_probe("smoothgradcampp")
    _check_smooth(n, sigma, seed, "smoothgradcampp")
    batch_size = rows_per_pass(view)
    key = ("smoothgradcampp", _options_key({"n": n, "sigma": sigma, "seed": seed}))
    moments = probe.memo(key, lambda: _moments(probe, n, sigma, seed, batch_size))
    if view.layer not in moments:
        raise MethodError(f"smoothgradcampp has no gradients for layer {view.layer!r} in the probe's capture.")
    d1, d2, d3 = (m[view.target] for m in moments[view.layer])
    dtype = d1.dtype
    act = view.activation.to(dtype)
    if bool((act < 0).any()):
        warnings.warn(
            f"Smooth Grad-CAM++ on layer {view.layer!r} whose activations take negative values: alpha has a "
            "pole at D3/D2 = -2/sum(A) and can blow up the weights. Prefer a post-ReLU layer.",
            CnnlensWarning,
            stacklevel=3,
        )
    sum_a = act.sum(dim=(2, 3), keepdim=True)
    denom = 2 * d2 + sum_a * d3
    ok = (d2 != 0) & (denom.abs() > torch.finfo(dtype).tiny)
    alpha = torch.where(ok, d2 / torch.where(ok, denom, torch.ones_like(denom)), torch.zeros_like(d2))
    weights = (alpha * torch.relu(d1)).sum(dim=(2, 3))
    return weighted_sum(weights, act)
