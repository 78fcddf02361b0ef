"""``explain()``: every requested method at every requested layer from one capture.

Scopes (see :mod:`cnnlens.methods.registry`): a layer-scope method gives one :class:`Explanation` per
requested layer; an input-scope method (saliency, guided backprop, Integrated Gradients...) gives ONE, under
the layer key ``"input"``; a network-scope method (FullGrad) gives one under ``"network"``, from a second
capture of the modules it names (one extra forward and backward).

Length: :func:`explain` is over 80 lines by its docstring only (56 lines; its body is 55).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from cnnlens.capture import LayerSpec, LayoutSpec, Probe, Recording, capture, probe_layers
from cnnlens.errors import (
    InputShapeError,
    LayerError,
    MethodError,
    ModelTypeError,
    NonFiniteInputError,
    NonFiniteOutputError,
    OptionError,
)
from cnnlens.execution import Execution
from cnnlens.explanation import Explanation, ExplanationSet
from cnnlens.inputs import InputsSpec, as_model_inputs, is_multi
from cnnlens.maps import finite_or_zero, upsample_normalize
from cnnlens.methods.attribution import explained_inputs, input_view
from cnnlens.methods.registry import (
    BoundMethod,
    LayerView,
    MethodSpec,
    NetworkRecord,
    apply_display,
    check_volumes,
    display_mode,
    resolve_bound,
)
from cnnlens.methods.transformer import attention_recorder, attention_views
from cnnlens.models import LoadedModel
from cnnlens.models.layers import default_target_layer
from cnnlens.outputs import OutputSelector
from cnnlens.targets import TargetSpec, name_targets

__all__ = ["default_layer", "display_images", "explain", "explain_recording"]


def default_layer(model: nn.Module | LoadedModel) -> str:
    """The layer explained when none is named: one policy for the API and the command line.

    A zoo model uses its spec's ``default_layer``; a model loaded from a torchvision/timm name or a factory
    uses the same guess as any other module: :func:`cnnlens.models.layers.default_target_layer`, the last
    spatial block output before global pooling (``layer4`` in a ResNet, ``features.29`` in VGG16,
    ``blocks.11`` in a timm ViT), from the module tree alone (no dummy forward).

    Raises:
        LayerNotFoundError: When the model has no spatial layer (no ``nn.Conv2d``, no timm ``feature_info``);
            name one with ``layers=[...]`` (``--layer`` on the command line).

    Example:
        >>> import torchvision
        >>> default_layer(torchvision.models.resnet18(num_classes=10))
        'layer4'
    """
    if isinstance(model, LoadedModel):
        return str(model.spec.default_layer)
    return default_target_layer(model)


def _check_finite_inputs(inputs: object, name: str | None = None) -> None:
    """Refuse NaN or infinite input values: every map of such an input would be meaningless."""
    if not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point():
        return
    # A finite sum proves every value finite (NaN and inf propagate) at a twentieth of isfinite().all()'s cost;
    # a sum that overflows (huge finite values) falls through to the exact check.
    if bool(torch.isfinite(inputs.detach().sum())):
        return
    finite = torch.isfinite(inputs.detach())
    if bool(finite.all()):
        return
    per_image = (~finite).flatten(1).sum(1) if inputs.ndim >= 4 else (~finite).sum().view(1)
    bad = [i for i, n in enumerate(per_image.tolist()) if n]
    which = "the input" if name is None else f"the input {name!r}"
    raise NonFiniteInputError(
        f"{which} holds NaN or infinite values ({int((~finite).sum())} of {inputs.numel()}, in image(s) "
        f"{bad[:10]}{'...' if len(bad) > 10 else ''}); explain finite images (check the preprocessing: a zero std "
        "or a corrupt array)."
    )


def _check_finite_logits(logits: torch.Tensor | None, module: nn.Module) -> None:
    """Refuse NaN or infinite scores: probabilities, targets and maps would all be meaningless."""
    if logits is None or bool(torch.isfinite(logits.detach()).all()):
        return
    rows = (~torch.isfinite(logits.detach())).flatten(1).any(1).nonzero().flatten().tolist()
    broken = [name for name, p in module.named_parameters() if not bool(torch.isfinite(p.detach()).all())]
    cause = (
        f"{len(broken)} parameter tensor(s) hold NaN/inf, e.g. {', '.join(broken[:3])}: the weights are broken; "
        "load an intact checkpoint"
        if broken
        else "the weights are finite, so the forward overflowed; check the input scale and the model's precision"
    )
    raise NonFiniteOutputError(f"the model produced NaN or infinite scores for image(s) {rows[:10]}: {cause}.")


def _check_default_is_spatial(activations: Mapping[str, torch.Tensor], module: nn.Module) -> None:
    """Refuse a default layer whose output is not a feature map (a vector after pooling), naming how to choose one.

    Token and channels-last outputs arrive here already mapped to ``(B, C, h, w)`` by their layout.
    """
    for name, value in activations.items():
        if value.ndim not in (4, 5):  # (B, C, h, w) feature maps, (B, C, d, h, w) volumes
            raise LayerError(
                f"the default layer {name!r} of {type(module).__name__} outputs shape {tuple(value.shape)}, not a "
                "(B, C, H, W) feature map; name a convolutional layer, block or transformer block: "
                "layers=[...] in Python, --layer NAME on the command line (`cnnlens layers --all` lists them)."
            )


def _variants(
    methods: str | MethodSpec | BoundMethod | Sequence[str | MethodSpec | BoundMethod],
    options: Mapping[str, Mapping[str, Any]] | None,
) -> list[tuple[MethodSpec, dict[str, Any]]]:
    """Each requested method with its full variant: bound options, then ``options=``, over the defaults.

    Raises:
        OptionError: An option bound and also given in ``options=``, options for a method not requested, or
            any unknown or ill-typed option.
    """
    bound = resolve_bound(methods if isinstance(methods, (str, MethodSpec, BoundMethod)) else list(methods))
    pending = dict(options or {})
    out: list[tuple[MethodSpec, dict[str, Any]]] = []
    for spec, fixed in bound:
        given = dict(pending.pop(spec.id, {}) or {})
        twice = sorted(set(fixed or {}) & set(given))
        if twice:
            raise OptionError(
                f"option(s) {twice} of {spec.id!r} are both bound (get_method(...).bind) and given in options=; "
                "give each option once."
            )
        out.append((spec, spec.variant({**(fixed or {}), **given})))
    if pending:
        raise OptionError(
            f"options were given for method(s) {sorted(pending)} that are not requested (requested: "
            f"{[spec.id for spec, _ in out]}); add them to methods= or drop their options."
        )
    return out


def _ran(module: nn.Module, names: list[str], inputs: torch.Tensor) -> list[str]:
    """The capture keys of ``names`` as they run in a forward.

    Modules that never run (an auxiliary head in eval mode) are left out, and a module that runs k times (a
    shared module) is recorded at every call (``name@0`` ... ``name@k-1``).

    Found with :func:`cnnlens.capture.probe_layers` (one forward on a zero image of the input's size).
    """
    infos = probe_layers(module, tuple(inputs.shape[1:]), device=str(inputs.device))
    calls = {info.name: info.calls for info in infos}
    keys: list[str] = []
    for name in names:
        n = calls.get(name, 0)
        keys += [name] if n == 1 else [f"{name}@{k}" for k in range(n)]
    return keys


def _network_views(
    spec: MethodSpec, module: nn.Module, rec: Recording, probe: Probe, output_selector: OutputSelector | None
) -> list[LayerView]:
    """One view per target for a network-scope method: a second capture of the modules it names."""
    assert spec.records is not None  # register() enforces it for network scope
    names = _ran(module, spec.records(module), rec.inputs)
    if not names:
        raise LayerError(
            f"{spec.id} found no module it can use in {type(module).__name__} (it needs conv/linear/batch-norm "
            "layers with a bias); pick another method."
        )
    with capture(module, names, output_selector=output_selector, execution=probe.cap.execution) as net:
        nrec = net.run(rec.inputs, list(probe.targets), gradients=True, input_gradients=True)
    modules = dict(module.named_modules())
    picked = {key: modules[key.split("@")[0]] for key in nrec.layers}
    return [
        LayerView.of(
            nrec,
            spec.scope,
            t,
            probe=probe,
            execution=probe.cap.execution,
            network=NetworkRecord(picked, nrec.activations, {k: v[t] for k, v in nrec.gradients.items()}),
        )
        for t in range(nrec.num_targets)
    ]


def _method_views(
    spec: MethodSpec,
    module: nn.Module,
    rec: Recording,
    probe: Probe,
    output_selector: OutputSelector | None,
    att: Any,
) -> dict[str, list[LayerView]]:
    """Result key -> one view per target, for one method.

    Keys: every recorded layer (layer scope), every image input (input scope: ``"input"``, or ``"input:<name>"``
    for several inputs), or ``"network"`` (FullGrad, the attention methods).
    """
    execution = probe.cap.execution
    if spec.scope == "network" and "attention" in spec.needs:
        return {spec.scope: attention_views(spec, module, rec, probe, output_selector, att)}
    if spec.scope == "network":
        if rec.model_inputs is not None:
            raise MethodError(
                f"{spec.id} (network scope) supports models called with one input tensor; this call has "
                f"the inputs {list(rec.model_inputs.names)} and {len(rec.model_inputs.extra_args)} + "
                f"{len(rec.model_inputs.extra_kwargs)} extra argument(s). Use a CAM or an input-scope method."
            )
        return {spec.scope: _network_views(spec, module, rec, probe, output_selector)}
    targets = range(rec.num_targets)
    if spec.scope == "input":
        return {
            key: [input_view(rec, key, name, t, probe=probe, execution=execution) for t in targets]
            for key, name, _ in explained_inputs(rec)
        }
    return {key: [LayerView.of(rec, key, t, probe=probe, execution=execution) for t in targets] for key in rec.layers}


def _compute(
    spec: MethodSpec, variant: dict[str, Any], views: list[LayerView], raw_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Run one method on one view per target: raw maps ``(B, T, h, w)``, nonfinite flags and stacked extras."""
    per_target = []
    extras: dict[str, list[torch.Tensor]] = {}
    for view in views:
        out = spec.compute(view, variant)
        per_target.append(out.raw)
        for key, value in out.extras.items():
            extras.setdefault(key, []).append(value.detach())
    joined = per_target[0].unsqueeze(1) if len(per_target) == 1 else torch.stack(per_target, dim=1)
    raw, bad = finite_or_zero(joined.to(raw_dtype), spatial_dims=joined.ndim - 2)  # (h, w) or (d, h, w)
    stacked = {k: torch.stack(v, dim=1) for k, v in extras.items()}
    if bool(bad.any()):  # NaN/inf gradients (weights, overflow): flagged apart from constant maps
        stacked["nonfinite"] = bad
    return raw, bad, stacked


_Computed = tuple[MethodSpec, str, dict[str, Any], torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]


def _results(
    computed: list[_Computed],
    rec: Recording,
    size: tuple[int, ...],
    images: torch.Tensor,
    image_names: Sequence[str] | None,
    names: list[str] | None,
    manifest: dict[str, Any],
) -> list[Explanation]:
    """Display, upsample and normalise every raw map, then wrap each (method, layer) as an Explanation."""
    assert rec.scores is not None  # set by Capture.run()
    assert rec.target_classes is not None
    # raw maps are finite (finite_or_zero above), so are their bilinear upsamplings: no second check. All
    # (method, layer) maps go through upsampling and normalisation together, grouped by resolution.
    shown = [apply_display(raw, display_mode(variant)) for _, _, variant, raw, _, _ in computed]
    # Several inputs: an input-scope map ("input:<name>") has its own input's size and images.
    own = {key: (tuple(int(s) for s in x.shape[2:]), x) for key, _, x in _input_entries(rec)}
    sizes = [own[layer][0] if layer in own else size for _, layer, _, _, _, _ in computed]
    rendered: list[tuple[torch.Tensor, torch.Tensor]] = [(torch.empty(0), torch.empty(0))] * len(shown)
    for group in dict.fromkeys(sizes):
        picked = [i for i, s in enumerate(sizes) if s == group]
        done = upsample_normalize([shown[i] for i in picked], group, dtype=torch.float32, assume_finite=True)
        for i, out in zip(picked, done, strict=True):
            rendered[i] = out
    pictures = {key: display_images(x) for key, (_, x) in own.items() if x is not rec.inputs}
    scores = rec.scores.float()
    return [
        Explanation(
            method=spec.id,
            title=spec.title,
            layer=layer,
            variant=dict(variant),
            raw=raw,
            maps=maps,
            degenerate=degenerate | bad,
            target_classes=rec.target_classes,
            target_names=list(rec.target_names),
            scores=scores,
            images=pictures.get(layer, images),
            image_names=list(image_names) if image_names is not None else [],
            class_names=names,
            manifest=manifest,
            extras=extras_stacked,
        )
        for (spec, layer, variant, raw, bad, extras_stacked), (maps, degenerate) in zip(computed, rendered, strict=True)
    ]


def _input_entries(rec: Recording) -> list[tuple[str, str | None, torch.Tensor]]:
    """The ``input:<name>`` keys of several inputs (none for a lone tensor)."""
    if rec.model_inputs is None or len(rec.model_inputs.names) == 1 or not rec.model_inputs.spatial_names():
        return []
    return explained_inputs(rec)


def _reference_input(rec: Recording) -> torch.Tensor:
    """The input CAMs are upsampled to and drawn over: the lone input, else the first image (or volume) input.

    Raises:
        InputShapeError: No input is an image batch ``(B, C, H, W)`` or a volume batch ``(B, C, D, H, W)``.
    """
    candidates = [rec.inputs] if rec.model_inputs is None else list(rec.model_inputs.tensors)
    for x in candidates:
        if x.ndim in (4, 5) and x.is_floating_point():
            return x
    shapes = ", ".join(str(tuple(x.shape)) for x in candidates)
    raise InputShapeError(
        f"explain() needs image batches (B, C, H, W) or volume batches (B, C, D, H, W), got {shapes}"
        + (" (no model input is one)." if len(candidates) > 1 else ".")
    )


def display_images(inputs: torch.Tensor, model: nn.Module | LoadedModel | None = None) -> torch.Tensor:
    """The uint8 ``(B, H, W, 3)`` images that maps align with, for overlays.

    A zoo model's preprocessing is inverted exactly (BGR inputs shown as RGB); for any other model each image
    is min-max stretched to [0, 255] (per image, so images do not influence each other). For volumes
    ``(B, C, D, H, W)`` the image is the middle depth slice ``D // 2`` (the slice
    :meth:`cnnlens.ExplanationSet.save` draws).
    """
    x = inputs.detach().float()
    if x.ndim == 5:
        x = x[:, :, x.shape[2] // 2]
    if x.ndim != 4:
        raise InputShapeError(f"display_images needs a batch (B, C, H, W), got shape {tuple(x.shape)}.")
    if isinstance(model, LoadedModel) and x.shape[1] == 3:
        # denormalize, scale to [0, 255] and round, in one affine pass: x * 255 std + (255 mean + 0.5).
        prep = model.spec.preprocessing
        scale = torch.tensor(prep.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1) * 255
        shift = torch.tensor(prep.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1) * 255 + 0.5
        pixels = torch.addcmul(shift, x, scale)
        if prep.channel_order == "BGR":  # Keras "caffe" inputs: back to RGB for display
            pixels = pixels.flip(1)
    else:
        flat = x.flatten(1)
        lo, hi = flat.amin(dim=1), flat.amax(dim=1)  # not aminmax(dim=): a scalar loop on the CPU
        span = torch.where(hi > lo, hi - lo, torch.ones_like(hi)).view(-1, 1, 1, 1)
        pixels = (x - lo.view(-1, 1, 1, 1)).mul_(255 / span).add_(0.5)
    # +0.5 then truncation rounds to nearest; clamping after the shift is the same as clamping x to [0, 1].
    out = pixels[:, :3].clamp_(0, 255).to(torch.uint8)
    if out.shape[1] == 1:
        out = out.expand(-1, 3, -1, -1)
    return out.permute(0, 2, 3, 1).cpu()


def explain_recording(
    module: nn.Module,
    recording: Recording,
    probe: Probe,
    method: MethodSpec,
    variant: dict[str, Any],
    key: str,
    *,
    images: torch.Tensor,
    class_names: Sequence[str] | None = None,
    manifest: dict[str, Any] | None = None,
) -> Explanation:
    """One method at one recorded layer, from an existing recording: what :func:`explain` computes, without a forward.

    For callers that keep a :class:`~cnnlens.capture.Recording` to answer many (layer, method) requests, such as
    ``cnnlens serve``. Call it with the probe's capture open (``with probe.cap:``): methods that need more passes
    (Score-CAM, guided backprop, input gradients) run them through ``probe``, whose caches serve later calls.

    Args:
        module: The network the recording was made on.
        recording: A recording of one lone-tensor input with gradients (``Capture.run(..., gradients=True)``).
        probe: ``Probe(cap, recording, recording.targets)`` of the same capture.
        method: The method's spec (:func:`cnnlens.methods.registry.get_method`).
        variant: Its full variant (``method.variant(options)``).
        key: A recorded layer key for a layer-scope method; ``"input"`` or ``"network"`` for the other scopes.
        images: ``(B, H, W, 3)`` uint8 display images (:func:`display_images`).
        class_names: Class names for labels.
        manifest: The manifest the result carries.

    Returns:
        The :class:`Explanation` :func:`explain` would give for this (method, layer) on the same input and target.

    Raises:
        LayerError: ``key`` is not among the method's results on this recording.
    """
    views = _method_views(method, module, recording, probe, None, None)
    if key not in views:
        raise LayerError(f"{method.id} gives results for {sorted(views)}, not for {key!r}; record that layer.")
    raw_dtype = torch.float64 if recording.inputs.dtype == torch.float64 else torch.float32
    computed = [(method, key, variant, *_compute(method, variant, views[key], raw_dtype))]
    size = tuple(int(s) for s in recording.inputs.shape[2:])
    names = list(class_names) if class_names is not None else None
    return _results(computed, recording, size, images, None, names, dict(manifest or {}))[0]


def explain(
    model: nn.Module | LoadedModel,
    inputs: InputsSpec,
    *,
    methods: str | MethodSpec | BoundMethod | Sequence[str | MethodSpec | BoundMethod] = ("gradcam",),
    layers: LayerSpec | Sequence[LayerSpec] | None = None,
    targets: TargetSpec = None,
    top_k: int | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    output_selector: OutputSelector | None = None,
    image_names: Sequence[str] | None = None,
    class_names: Sequence[str] | None = None,
    execution: Execution | None = None,
    additional_forward_args: Any = None,
    layout: LayoutSpec | Mapping[str, LayoutSpec] = None,
) -> ExplanationSet:
    """Explain a batch with several methods at several layers from a single forward and backward.

    Args:
        model: An ``nn.Module`` or a :class:`cnnlens.models.LoadedModel` (whose class names,
            preprocessing and provenance then go into the results).
        inputs: ``(B, C, H, W)`` or ``(C, H, W)`` preprocessed input, or a batch of volumes ``(B, C, D, H, W)``
            (a ``Conv3d`` network; only the methods registered with ``volumes=True`` run on them, see
            :func:`cnnlens.methods.registry.volume_method_ids`; maps are then ``(B, T, D, H, W)``). Several
            inputs: a tuple/list ``(x_rgb, x_depth)`` or a mapping of keyword inputs ``{"image": x, "mask": m}``
            (see :mod:`cnnlens.inputs`): CAMs are computed as for one input and drawn over the first image
            input; input-scope methods give one map per image input, under ``"input:<name>"``.
        methods: Method ids (``"gradcam"``, ``"gradcampp"``...), ``"all"``, specs, or bound methods with
            typed options, e.g. ``get_method("gradcampp").bind(alpha_normalize=True)``.
        layers: Layer names or modules; default: :func:`default_layer`.
        targets: What to explain: an int or a class name (``"tiger cat"``, case-insensitive; needs class
            names: a zoo model's or ``class_names=``), a list of ints/names (one per sample), None = the top
            class, a callable... (see :func:`cnnlens.targets.resolve_targets`), or a target on raw outputs:
            ``SegmentationTarget``, ``RegionTarget``, ``MultiLabelTarget`` (one map per label above a threshold),
            ``ContrastiveTarget`` (see :mod:`cnnlens.targets`; what they pick is frozen on the clean output).
        top_k: Explain the top-k classes of each image (T = k maps per image), without re-running forward.
        options: Per-method options (the string-keyed form the CLI uses), e.g. ``{"gradcampp":
            {"alpha_normalize": True}, "gradcam": {"relu": False}, "saliency": {"display": "signed"}}``. The
            display rule (``relu``/``display``) is applied to the raw map before upsampling and normalisation.
        output_selector: Picks the logits from unusual model outputs.
        image_names: One name per image, used for file names when saving.
        class_names: Overrides the class names used in labels.
        execution: How to run (:class:`cnnlens.Execution`). Its ``memory_format="contiguous"`` (default, the
            accurate path) feeds the input in its own format; ``"channels_last"`` runs CPU forwards in
            channels-last format (a model that cannot run it raises an OptionError): 1.2-1.6x faster
            convolutions, but PyTorch/oneDNN's channels-last convolution backward on the CPU makes gradients
            less accurate (against float64: ResNet-50 guided backprop 1.1e-4 relative error instead of 2.6e-7,
            saliency 3.7e-2 instead of 2.1e-3; InceptionV3 ``Mixed_6e`` Grad-CAM 2.2e-4 instead of 1.9e-6).
        additional_forward_args: Arguments passed to the model after the inputs, neither explained nor
            perturbed (captum's argument): a tuple (positional), a mapping (keywords) or one value.
        layout: How each layer's output maps to ``(B, C, h, w)`` (:mod:`cnnlens.capture.layout`): None infers it
            (ViT tokens with the model's prefix tokens and patch grid, Swin/ConvNeXt channels-last); a spec
            (``"nhwc"``, ``"tokens:1"``, ``"tokens:1:14x14"``...) for every layer or a mapping layer -> spec
            overrides it. Layers that are not ``nchw`` are described in the manifest under ``"layouts"``.

    Returns:
        An :class:`ExplanationSet` with one :class:`Explanation` per (layer-scope method, layer), and one per
        input- or network-scope method (layer key ``"input"`` / ``"network"``; ``result["saliency", None]``
        and, for compatibility, ``result["saliency", <any requested layer>]`` return it).

    Raises:
        ModelTypeError: ``model`` is not an ``nn.Module`` nor a ``LoadedModel``.
        OptionError: An unknown, ill-typed or out-of-range option, or options for a method not requested.

    Example:
        >>> import torchvision
        >>> net = torchvision.models.resnet18(num_classes=10).eval()
        >>> result = explain(net, torch.randn(2, 3, 64, 64), methods=["gradcam", "gradcampp"],
        ...                  layers=["layer3", "layer4"])
        >>> result["gradcampp", "layer4"].maps.shape
        torch.Size([2, 1, 64, 64])
    """
    loaded = model if isinstance(model, LoadedModel) else None
    module = loaded.module if loaded is not None else model
    if not isinstance(module, nn.Module):
        raise ModelTypeError(f"model must be a torch.nn.Module or a LoadedModel, got {type(model).__name__}.")
    if is_multi(inputs, additional_forward_args):
        inputs = as_model_inputs(inputs, additional_forward_args)  # checked (names, batch sizes) before any forward
        for input_name, tensor in zip(inputs.names, inputs.tensors, strict=True):
            _check_finite_inputs(tensor, input_name if len(inputs.names) > 1 else None)
    else:
        _check_finite_inputs(inputs)
    variants = _variants(methods, options)
    check_volumes([spec for spec, _ in variants], inputs)  # methods that do not run on volumes: before any forward
    if layers is None:
        layer_list: list[LayerSpec] = [default_layer(loaded if loaded is not None else module)]
    elif isinstance(layers, (str, nn.Module)):
        layer_list = [layers]
    else:
        layer_list = list(layers)
    needs = set().union(*(spec.needs for spec, _ in variants))
    names = list(class_names) if class_names is not None else (loaded.class_names if loaded else None)
    targets = name_targets(targets, names)
    attention = attention_recorder(module, [spec for spec, _ in variants])  # refuses a model without attention
    opened = capture(module, layer_list, output_selector=output_selector, execution=execution, layout=layout)
    with opened as cap, attention as att:
        rec = cap.run(
            inputs,  # a tensor, or the ModelInputs built above
            targets,
            top_k=top_k,
            gradients="gradients" in needs,
            input_gradients="input_gradients" in needs,
        )
        _check_finite_logits(rec.logits, module)
        reference = _reference_input(rec)
        if layers is None and "activations" in needs:
            _check_default_is_spatial(rec.activations, module)
        size = tuple(int(s) for s in reference.shape[2:])  # (H, W), or (D, H, W) for volumes
        assert rec.scores is not None  # set by run()
        assert rec.target_classes is not None
        images = display_images(reference, loaded if reference is rec.inputs else None)
        batch = int(reference.shape[0])
        raw_dtype = torch.float64 if reference.dtype == torch.float64 else torch.float32
        if image_names is not None and len(image_names) != batch:
            raise InputShapeError(f"got {len(image_names)} image names for a batch of {batch} images.")
        manifest: dict[str, Any] = {"model": loaded.manifest() if loaded else {"class": type(module).__name__}}
        layouts = {key: lay.describe() for key, lay in rec.layouts.items() if lay.kind != "nchw"}
        if layouts:
            manifest["layouts"] = layouts
        probe = Probe(cap, rec, rec.targets)
        computed: list[_Computed] = []
        for spec, variant in variants:
            views = _method_views(spec, module, rec, probe, output_selector, att)
            for layer, layer_views in views.items():
                computed.append((spec, layer, variant, *_compute(spec, variant, layer_views, raw_dtype)))
        results = _results(computed, rec, size, images, image_names, names, manifest)
    return ExplanationSet(results, logits=rec.logits, manifest=manifest)
