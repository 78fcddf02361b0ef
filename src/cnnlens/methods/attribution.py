"""Gradient attributions at input resolution: saliency, guided backprop, Integrated Gradients and kin.

Registered here: ``saliency``, ``input_x_gradient``, ``guided_backprop``, ``deconvnet`` and
``guided_gradcam``; ``integrated_gradients`` is in :mod:`cnnlens.methods.integrated` (same conventions).

Every method here first builds a per-pixel, per-channel attribution ``(B, C, H, W)`` in the model's input
space (the preprocessed tensor the model receives), then reduces the channels to the raw map ``(B, H, W)``:

* ``reduce="sum"`` (default): the channel **sum of the signed attribution**. The raw map stays signed and
  linear in the attribution, so Integrated Gradients' completeness holds on the map itself
  (``sum(raw) = S(x) - S(baseline)`` up to the quadrature error).
* ``reduce="abs_sum"``: ``sum_c |a_c|`` (the IG authors' and TensorFlow tutorials' display).
* ``reduce="max_abs"``: ``max_c |a_c|`` (Simonyan et al.'s saliency display).

The displayed map then follows the ``display`` option, applied by :func:`cnnlens.explain.explain` before
upsampling and normalisation: every method here defaults to ``"abs"`` (the magnitude of the raw map; the
sign of a gradient says in which direction to change a pixel, not whether it is evidence), and accepts
``"signed"`` or ``"relu"`` (positive evidence only, the CAM convention, useful for IG and input × gradient).

**Input scope**: every method here except ``guided_gradcam`` is registered with ``scope="input"``:
:func:`cnnlens.explain.explain` computes it ONCE per call (one :class:`~cnnlens.Explanation` under the layer
key ``"input"``), whatever the requested layers. ``saliency`` and ``input_x_gradient`` reuse the input
gradients of the main capture (computed only when a requested method needs them), guided backprop and
deconvnet passes are cached by the probe per (rule, target), and Integrated Gradients
(:mod:`cnnlens.methods.integrated`) is computed once per call for every target at once, kept in the call's
:meth:`~cnnlens.capture.Probe.memo` (no module-level cache).

Attributions are accumulated in float64 (float32 on MPS) whatever the model's dtype.

**Several inputs** (``explain(model, (x_rgb, x_depth))``, keyword inputs; see :mod:`cnnlens.inputs`): every
method here gives one map per spatial input (a 4-D floating-point tensor), under the key ``"input:<name>"``
(``"input:0"``, ``"input:1"``, ``"input:depth"``); with one explained input the key stays ``"input"``. The
attribution of an input holds the **other inputs at their values**: it is the attribution of the function
``x_i -> S(x_1, ..., x_i, ..., x_n)``. For gradients this changes nothing (a partial derivative; one backward
gives every input's); Integrated Gradients integrates along the path of that input alone, from its own
baseline (a mapping ``{name: baseline}`` gives one per input), with the others fixed, which is captum's
``IntegratedGradients`` called per input with the others in ``additional_forward_args``; SmoothGrad adds noise
to that input alone. Inputs that are not 4-D floating-point tensors (token ids, vectors) get no map.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Mapping
from typing import Any, Literal

import torch

from cnnlens.capture import Probe, Recording
from cnnlens.errors import MethodError, OptionError
from cnnlens.execution import DEFAULT, Execution
from cnnlens.inputs import ModelInputs, input_key
from cnnlens.maps import precise_dtype, upsample
from cnnlens.methods.cam import gradcam
from cnnlens.methods.registry import LayerView, MethodOutput, register
from cnnlens.targets import ClassTarget, Target

__all__ = [
    "Reduce",
    "deconvnet",
    "explained_inputs",
    "guided_backprop",
    "guided_gradcam",
    "input_view",
    "input_x_gradient",
    "reduce_channels",
    "saliency",
]

Reduce = Literal["sum", "abs_sum", "max_abs"]
"""How an attribution ``(B, C, H, W)`` becomes a raw map ``(B, H, W)``; see the module docstring."""

_REDUCES: tuple[Reduce, ...] = ("sum", "abs_sum", "max_abs")


def reduce_channels(attribution: torch.Tensor, reduce: str = "sum") -> torch.Tensor:
    """Reduce an attribution ``(B, C, H, W)`` to a raw map ``(B, H, W)`` in float64 (float32 on MPS).

    Args:
        attribution: Per-channel attribution.
        reduce: ``"sum"`` (signed channel sum, the default), ``"abs_sum"`` or ``"max_abs"``.

    Example:
        >>> a = torch.tensor([[[[1.0]], [[-3.0]]]])
        >>> [reduce_channels(a, r).item() for r in ("sum", "abs_sum", "max_abs")]
        [-2.0, 4.0, 3.0]
    """
    if attribution.ndim != 4:
        raise MethodError(
            f"gradient attributions need image inputs (B, C, H, W); got shape {tuple(attribution.shape)}."
        )
    a = attribution.to(precise_dtype(attribution))
    if reduce == "sum":
        return a.sum(dim=1)
    if reduce == "abs_sum":
        return a.abs().sum(dim=1)
    if reduce == "max_abs":
        return a.abs().amax(dim=1)
    raise OptionError(f"option reduce must be one of {', '.join(map(repr, _REDUCES))}; got {reduce!r}.")


# -- shared machinery (also used by cnnlens.methods.smooth) -------------------------------------------------


def explained_inputs(rec: Recording) -> list[tuple[str, str | None, torch.Tensor]]:
    """``(result key, input name, tensor)`` of every input that gets an input-scope map.

    A lone tensor: ``[("input", None, x)]``. Several inputs: one entry ``("input:<name>", name, x_name)`` per
    spatial input (4-D floating point); one explained input (with extra arguments): key ``"input"``.

    Raises:
        MethodError: Several inputs, none of them spatial.
    """
    inputs = rec.model_inputs
    if inputs is None:
        return [("input", None, rec.inputs)]
    if len(inputs.names) == 1:
        return [("input", inputs.names[0], inputs.primary)]
    spatial = inputs.spatial_names()
    if not spatial:
        shapes = ", ".join(f"{n!r} {tuple(t.shape)}" for n, t in zip(inputs.names, inputs.tensors, strict=True))
        raise MethodError(
            f"input-scope methods map 4-D floating-point inputs (B, C, H, W), and none of the model inputs is one "
            f"({shapes}); use a layer-scope method (a CAM) instead."
        )
    return [(input_key(name), name, inputs.tensor(name)) for name in spatial]


def input_view(
    rec: Recording,
    key: str,
    name: str | None,
    t: int,
    *,
    probe: Probe | None = None,
    execution: Execution = DEFAULT,
) -> LayerView:
    """The view of target ``t`` for input ``name`` (None: the lone input): that input and its gradient."""
    if name is None or rec.model_inputs is None:
        return LayerView.of(rec, key, t, probe=probe, execution=execution)
    assert rec.scores is not None  # set by Capture.run()
    assert rec.target_classes is not None
    x = rec.model_inputs.tensor(name)
    grads = rec.input_gradients_by_input.get(name)
    return LayerView(
        layer=key,
        activation=x,
        gradient=None,
        inputs=x,
        input_gradient=None if grads is None else grads[t],
        score=rec.scores[:, t],
        target_class=rec.target_classes[:, t],
        target=t,
        probe=probe,
        execution=execution,
    )


def view_input_name(view: LayerView) -> str | None:
    """The input an input-scope view explains: ``"input:<name>"`` -> name; ``"input"`` -> None (the first)."""
    return view.layer.split(":", 1)[1] if view.layer.startswith("input:") else None


def varied_input(probe: Probe, name: str | None) -> tuple[str | None, torch.Tensor]:
    """The input an attribution varies (resolved name, None for a lone tensor) and its recorded value."""
    rec = probe.recording
    if rec.model_inputs is None:
        return None, rec.inputs
    resolved = name if name is not None else rec.model_inputs.names[0]
    return resolved, rec.model_inputs.tensor(resolved)


def chunk_input_gradients(rec: Recording, name: str | None) -> torch.Tensor:
    """``(T, n, ...)`` input gradients of a pass for input ``name`` (None: the lone/first input)."""
    grads = rec.input_gradients if name is None else rec.input_gradients_by_input.get(name)
    if grads is None:
        raise MethodError(f"model input {name!r} got no gradient (it is not a floating-point explained input).")
    return grads


def _options_key(options: Mapping[str, Any]) -> tuple[Hashable, ...]:
    """A hashable key for method options; unhashable values (tensors) count by identity."""
    items: list[Hashable] = []
    for key in sorted(options):
        value = options[key]
        try:
            hash(value)
            items.append((key, value))
        except TypeError:
            items.append((key, "<id>", id(value)))
    return tuple(items)


DEFAULT_ROWS = 32
"""Rows (copies x samples) per extra forward/backward of IG and smoothing when ``Execution.chunk_size`` is None."""


def rows_per_pass(view: LayerView) -> int:
    """Rows per extra forward/backward: ``view.execution.chunk_size``, else :data:`DEFAULT_ROWS`.

    A fixed number, never measured, so results do not depend on the machine's load.
    """
    return view.execution.chunk_size or DEFAULT_ROWS


def _row_probe(probe: Probe, sample_index: torch.Tensor) -> Probe | None:
    """A probe whose fixed class targets are laid out for rows that derive from ``sample_index``.

    Returns None when a target is not a class target (a user callable may not be row-wise): callers then
    run whole copies of the batch in its original layout.
    """
    rows = sample_index.tolist()
    targets: list[Target] = []
    for target in probe.targets:
        select = getattr(target, "select", None)
        if isinstance(target, ClassTarget):
            classes = target.classes
            targets.append(
                target if isinstance(classes, int) else ClassTarget(tuple(classes[i] for i in rows), target.score)
            )
        elif callable(select):
            targets.append(select(sample_index))
        else:
            return None
    return Probe(probe.cap, probe.recording, targets)


def _row_wise(target: Target) -> bool:
    return isinstance(target, ClassTarget) or callable(getattr(target, "select", None))


def _row_passes(
    probe: Probe,
    make_rows: Callable[[torch.Tensor, torch.Tensor], torch.Tensor | ModelInputs],
    copies: int,
    batch_size: int,
    *,
    gradients: bool,
    input_gradients: bool,
    vary: str | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, Recording, Probe]]:
    """Run ``copies`` variants of every sample in chunks of at most ``batch_size`` rows, targets fixed.

    Rows are copy-major: row ``r`` is copy ``r // B`` of sample ``r % B``. ``make_rows(copy_index,
    sample_index)`` builds a chunk's inputs. With several model inputs, a tensor it returns replaces input
    ``vary`` (None: the first) and the other inputs hold their values (their rows ``sample_index``); a
    :class:`~cnnlens.inputs.ModelInputs` it returns is used as is. With targets that cannot be laid out by
    rows (a user callable) a chunk is one whole copy of the batch in its original layout, whatever
    ``batch_size``.

    Yields:
        ``(copy_index, sample_index, recording, probe)`` per chunk; the probe belongs to the chunk's
        recording (for wrapped methods that run extra passes themselves).
    """
    batch = int(probe.recording.inputs.shape[0])
    total = copies * batch
    layout_free = all(_row_wise(t) for t in probe.targets)
    step = max(1, int(batch_size)) if layout_free else batch
    device = probe.recording.inputs.device
    multi = probe.recording.model_inputs
    for start in range(0, total, step):
        rows = torch.arange(start, min(start + step, total))
        copy_index, sample_index = rows // batch, rows % batch
        inputs = make_rows(copy_index.to(device), sample_index.to(device))
        if multi is not None and isinstance(inputs, torch.Tensor):
            inputs = multi.with_rows(vary if vary is not None else multi.names[0], inputs, sample_index.to(device))
        chunk_probe = _row_probe(probe, sample_index) if layout_free else probe
        assert chunk_probe is not None  # layout_free means every target is a class target
        rec = chunk_probe.rerun(inputs, gradients=gradients, input_gradients=input_gradients)
        yield copy_index.to(device), sample_index.to(device), rec, Probe(probe.cap, rec, chunk_probe.targets)


def _accumulate(acc: torch.Tensor, dim: int, index: torch.Tensor, values: torch.Tensor) -> None:
    """``acc.index_add_(dim, index, values)`` for dim 0 or 1, through ``index_put_(accumulate=True)``.

    (CPU ``index_add_`` with several threads is orders of magnitude slower on these small tensors.)
    """
    if dim == 0:
        acc.index_put_((index,), values, accumulate=True)
    else:
        acc.transpose(0, dim).index_put_((index,), values.transpose(0, dim), accumulate=True)


def _input_gradient(view: LayerView, method: str) -> torch.Tensor:
    """The input gradient of the main capture, or the probe's when the view was built without it."""
    if view.input_gradient is not None:
        return view.input_gradient
    if view.probe is None:
        raise MethodError(
            f"{method} needs the gradient of the score with respect to the input, but none was captured; "
            "call it through explain() or pass a LayerView with input_gradient."
        )
    return view.probe.cached_input_gradient(view.target, "normal", view_input_name(view))


# -- the methods ------------------------------------------------------------------------------------------


@register(
    "saliency",
    scope="input",
    title="Saliency (vanilla gradient)",
    needs={"input_gradients"},
    paper="Simonyan, Vedaldi & Zisserman, Deep Inside Convolutional Networks: Visualising Image "
    "Classification Models and Saliency Maps, ICLR Workshop 2014 (arXiv:1312.6034)",
    formula="raw = sum_c dS/dx_c ;  shown = |raw|  (Simonyan: max_c |dS/dx_c|, reduce='max_abs')",
    summary="The gradient of the score with respect to the input pixels (one map per call).",
    display="abs",
    defaults={"reduce": "sum"},
)
def saliency(view: LayerView, reduce: str = "sum") -> torch.Tensor:
    """Vanilla gradient saliency (Simonyan et al., 2014).

    Formula: ``a = dS/dx`` (B, C, H, W), raw map ``sum_c a_c`` (``reduce="sum"``). The paper's display,
    ``max_c |a_c|``, is ``reduce="max_abs"``; the default display is ``|raw|``. Input scope: one map per call; the
    gradient is the main capture's, computed once for all layers.

    Args:
        view: One target's view (only ``input_gradient`` is used).
        reduce: Channel reduction, see :func:`reduce_channels`.

    Returns:
        ``(B, H, W)`` raw map in float64 (float32 on MPS).

    Example:
        >>> import cnnlens
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
        ...                           torch.nn.Linear(144, 2))
        >>> r = cnnlens.explain(net, torch.randn(1, 3, 8, 8), methods=["saliency"], layers=["0"])
        >>> r["saliency", "0"].raw.shape
        torch.Size([1, 1, 8, 8])
    """
    return reduce_channels(_input_gradient(view, "saliency"), reduce)


@register(
    "input_x_gradient",
    scope="input",
    title="Input × Gradient",
    needs={"input_gradients"},
    paper="Shrikumar et al., Not Just a Black Box: Learning Important Features Through Propagating "
    "Activation Differences, arXiv:1605.01713 (2016)",
    formula="raw = sum_c x_c * dS/dx_c ;  shown = |raw|",
    summary="The input times its gradient: a first-order contribution of each pixel (one map per call).",
    display="abs",
    defaults={"reduce": "sum"},
)
def input_x_gradient(view: LayerView, reduce: str = "sum") -> torch.Tensor:
    """Input × gradient (Shrikumar et al., 2016).

    Formula: ``a = x ⊙ dS/dx`` in the model's input space, raw map ``sum_c a_c``. For a bias-free ReLU
    network ``sum(raw) = S(x)`` exactly (Euler). Input scope: one map per call.

    Args:
        view: One target's view (``inputs`` and ``input_gradient`` are used).
        reduce: Channel reduction, see :func:`reduce_channels`.

    Returns:
        ``(B, H, W)`` raw map in float64 (float32 on MPS).

    Example:
        >>> import cnnlens
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 1, bias=False), torch.nn.Flatten(1),
        ...                           torch.nn.Linear(2 * 16, 1, bias=False))
        >>> x = torch.randn(1, 3, 4, 4)
        >>> r = cnnlens.explain(net, x, methods=["input_x_gradient"], layers=["0"], targets=0)
        >>> torch.allclose(r["input_x_gradient", "0"].raw.sum(), net(x).sum(), atol=1e-5)
        True
    """
    grad = _input_gradient(view, "input_x_gradient")
    dtype = precise_dtype(grad)
    return reduce_channels(view.inputs.to(dtype) * grad.to(dtype), reduce)


@register(
    "guided_backprop",
    scope="input",
    title="Guided Backpropagation",
    needs={"probe"},
    paper="Springenberg, Dosovitskiy, Brox & Riedmiller, Striving for Simplicity: The All Convolutional "
    "Net, ICLR Workshop 2015 (arXiv:1412.6806)",
    formula="through each ReLU: R_in = relu(R_out) * [x > 0] ;  raw = sum_c R_c(input) ;  shown = |raw|",
    summary="The gradient with only positive signals passed back through ReLUs (one map per call).",
    display="abs",
    defaults={"reduce": "sum"},
)
def guided_backprop(view: LayerView, reduce: str = "sum") -> torch.Tensor:
    """Guided backpropagation (Springenberg et al., 2015).

    Formula: the backward pass of every ReLU (and ReLU6, where the mask is ``0 < x < 6``), module,
    functional or in-place, becomes ``R_in = relu(R_out) ⊙ [x > 0]``; the attribution is the resulting
    "gradient" at the input, raw map ``sum_c R_c``. One extra forward/backward per target, scoped to the
    call (nothing is registered on the model), cached across layers and shared with ``guided_gradcam``. A
    model without ReLU/ReLU6 raises :class:`cnnlens.errors.LayerError`. Input scope: one map per call.

    Adebayo et al. (NeurIPS 2018) show that guided backprop is nearly insensitive to the weights of the
    higher layers (it fails the model-randomisation sanity check): read it as an edge map conditioned on
    the input, not as evidence for the class.

    Example:
        >>> import cnnlens
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
        ...                           torch.nn.Linear(144, 2))
        >>> r = cnnlens.explain(net, torch.randn(1, 3, 8, 8), methods=["guided_backprop"], layers=["0"])
        >>> r["guided_backprop", "0"].maps.shape
        torch.Size([1, 1, 8, 8])
    """
    probe = view.require_probe("guided_backprop")
    return reduce_channels(probe.cached_input_gradient(view.target, "guided", view_input_name(view)), reduce)


@register(
    "deconvnet",
    scope="input",
    title="Deconvnet",
    needs={"probe"},
    paper="Zeiler & Fergus, Visualizing and Understanding Convolutional Networks, ECCV 2014 (arXiv:1311.2901)",
    formula="through each ReLU: R_in = relu(R_out) ;  raw = sum_c R_c(input) ;  shown = |raw|",
    summary="The score projected back with rectified signals through ReLUs (one map per call).",
    display="abs",
    defaults={"reduce": "sum"},
)
def deconvnet(view: LayerView, reduce: str = "sum") -> torch.Tensor:
    """Deconvnet (Zeiler & Fergus, 2014), in its gradient form (as captum's ``Deconvolution``).

    Formula: the backward pass of every ReLU/ReLU6 becomes ``R_in = relu(R_out)`` (the forward mask is not
    used); max-pooling keeps its switches, convolutions use their transposed filters, as in autograd. Raw
    map ``sum_c R_c`` at the input. Because no forward mask is applied, the result depends on the input
    only through pooling switches (and not at all for a network without max-pooling): a zero image gets
    the same, non-zero, map as any other. Input scope: one map per call.

    Example:
        >>> import cnnlens
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
        ...                           torch.nn.Linear(144, 2))
        >>> r = cnnlens.explain(net, torch.randn(1, 3, 8, 8), methods=["deconvnet"], layers=["0"])
        >>> r["deconvnet", "0"].variant
        {'reduce': 'sum', 'display': 'abs'}
    """
    probe = view.require_probe("deconvnet")
    return reduce_channels(probe.cached_input_gradient(view.target, "deconvnet", view_input_name(view)), reduce)


@register(
    "guided_gradcam",
    title="Guided Grad-CAM",
    needs={"activations", "gradients", "probe"},
    paper="Selvaraju et al., Grad-CAM: Visual Explanations from Deep Networks via Gradient-based "
    "Localization, ICCV 2017 (arXiv:1610.02391)",
    formula="raw = sum_c GB_c ⊙ up(ReLU(sum_k w_k A_k)) ;  shown = |raw|",
    summary="Guided backprop masked by the layer's upsampled Grad-CAM (uses the layer).",
    display="abs",
    defaults={"reduce": "sum"},
)
def guided_gradcam(view: LayerView, reduce: str = "sum") -> torch.Tensor:
    """Guided Grad-CAM (Selvaraju et al., ICCV 2017).

    Formula: ``a = GB ⊙ up(ReLU(L_gradcam))`` where ``GB`` is guided backprop at the input (B, C, H, W)
    and ``up`` is cnnlens' bilinear upsampling (``align_corners=False``) of the raw Grad-CAM of the view's
    layer; raw map ``sum_c a_c``. The Grad-CAM factor is not min-max normalised first (the paper's figure
    code does; per-map normalisation afterwards makes the scale irrelevant). captum's ``GuidedGradCam``
    with ``interpolate_mode="bilinear"`` computes the same. Fails the model-randomisation sanity check
    through its guided-backprop factor (Adebayo et al., 2018).

    Example:
        >>> import cnnlens
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
        ...                           torch.nn.Linear(144, 2))
        >>> r = cnnlens.explain(net, torch.randn(1, 3, 8, 8), methods=["guided_gradcam"], layers=["1"])
        >>> r["guided_gradcam", "1"].raw.shape
        torch.Size([1, 1, 8, 8])
    """
    probe = view.require_probe("guided_gradcam")
    guided = probe.cached_input_gradient(view.target, "guided")
    dtype = precise_dtype(guided)
    cam_out = gradcam(view)
    cam_raw = cam_out.raw if isinstance(cam_out, MethodOutput) else cam_out
    cam = torch.relu(cam_raw.to(dtype))
    size = (int(guided.shape[-2]), int(guided.shape[-1]))
    return reduce_channels(guided.to(dtype) * upsample(cam, size).unsqueeze(1), reduce)
