"""Layer discovery: which layers of a network a user (or the target-layer study) could explain, and why.

:func:`candidate_layers` lists modules with their **roles**, output shape and stride:

``conv``
    every ``nn.Conv2d`` that runs in the forward;
``highest_numbered_conv``
    the last convolution in *definition* order (what readers of ``model.summary()`` pick);
``deepest_conv``
    the last convolution in *execution* order (differs from the above in branched networks);
``last_branch_conv``
    the last convolution of each parallel branch of the final merge block;
``merge``
    a module whose forward joins paths: a residual addition, an Inception concatenation ("mixed" output),
    an Inception-ResNet block;
``block_output``
    each block's output: the outermost composite modules below containers (ResNet bottlenecks, Inception
    mixed blocks, EfficientNet blocks), or, for a plain stack of layers like VGG's ``features``, the
    pooling layers that end each stage;
``final_spatial``
    the last output with a spatial extent before global pooling or flattening; in a token model, the norm
    before the last attention block (the default layer of :mod:`cnnlens.models.layers`: the last token
    output whose patch tokens reach a class-token head);
``attention_norm``
    in each transformer block, the norm before its attention (``norm1`` in timm ViT/DeiT/Swin and torchvision
    Swin, ``ln_1`` in torchvision ViT);
``mlp_norm``
    in each transformer block, the norm before its MLP (``norm2``, ``ln_2``).

Transformer blocks (:func:`cnnlens.models.layers.transformer_blocks`) also get ``merge`` (their residual
additions) and ``block_output``, one per block. Token outputs ``(N, C)`` and channels-last outputs
``(h, w, C)`` are listed in the ``(C, h, w)`` view methods see, with their layout
(:mod:`cnnlens.capture.layout`) named in :attr:`CandidateLayer.layout`; prefix tokens are not on the grid.
Layers of a plain CNN are all ``nchw``, as they come.

Shapes come from one shape probe run inside :func:`cnnlens.capture.probe_layers` (hooks only there). Merges
are found with ``torch.fx`` (a tracer that treats parameter-free leaves and data-dependent modules as leaves),
reading which module each ``add``/``cat`` belongs to; when a model cannot be traced, the module's
``forward`` source is read for ``torch.cat``/``+``/``torch.add`` instead (marked ``method="source"``).

A Keras model (wrapped by :class:`cnnlens.models.keras.KerasModule`) is not traced: its convolutions are its
``Conv2D``/``DepthwiseConv2D``/``SeparableConv2D`` layers, and merges, branch convolutions and block outputs
are read from the layer graph Keras records (:mod:`cnnlens.candidates.keras_graph`, ``method="keras"``), so
VGG16 lists ``block5_conv3`` as its highest-numbered conv, ResNet50 ``conv5_block3_out`` as a block output,
InceptionV3 ``mixed10`` and its branch convolutions, InceptionResNetV2 ``conv_7b_ac``. Its channels-last
outputs are listed in the ``(C, h, w)`` view with layout ``"nhwc"``.
"""

from __future__ import annotations

import inspect
import logging
import operator
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from cnnlens.candidates import keras_graph
from cnnlens.candidates.catalog import CONTAINERS, ROLES, CandidateLayer, LayerCatalog, build_catalog
from cnnlens.capture import LayerInfo, probe_layers
from cnnlens.capture.layout import Layout, infer_layout
from cnnlens.errors import CnnlensError
from cnnlens.models.layers import token_model_default, transformer_blocks

__all__ = ["ROLES", "CandidateLayer", "LayerCatalog", "candidate_layers", "find_merges"]

_log = logging.getLogger(__name__)

_CONTAINERS = CONTAINERS
_MERGE_FUNCS = {operator.add, operator.iadd, torch.add, torch.cat, torch.concat, torch.concatenate}
_MERGE_METHODS = {"add", "add_", "__add__", "__iadd__"}
_CAT_FUNCS = {torch.cat, torch.concat, torch.concatenate}
_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


class _LeafTracer(fx.Tracer):
    """Traces through composite modules; parameterised or child-free modules stay opaque leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return len(list(m.children())) == 0 or super().is_leaf_module(m, module_qualified_name)


@dataclass(frozen=True)
class _Merge:
    module: str
    kind: str  # "cat" or "add"
    node: fx.Node | None = None


def _innermost(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    return str(list(stack.keys())[-1])


def _fx_merges(model: nn.Module) -> tuple[list[_Merge], fx.Graph] | None:
    try:
        graph = _LeafTracer().trace(model)
    except Exception as exc:  # tracing arbitrary user code can fail in many ways; we fall back, not hide
        _log.info("torch.fx could not trace %s (%s); reading forward sources instead", type(model).__name__, exc)
        return None
    merges: list[_Merge] = []
    for node in graph.nodes:
        is_func = node.op == "call_function" and node.target in _MERGE_FUNCS
        is_method = node.op == "call_method" and node.target in _MERGE_METHODS
        if not (is_func or is_method):
            continue
        tensor_args = [a for a in node.args if isinstance(a, fx.Node)]
        if node.target in _CAT_FUNCS and node.args and isinstance(node.args[0], (list, tuple)):
            tensor_args = [a for a in node.args[0] if isinstance(a, fx.Node)]
        if len(tensor_args) < 2:
            continue  # x + 1, scaling by constants: not a join of paths
        kind = "cat" if node.target in _CAT_FUNCS else "add"
        merges.append(_Merge(_innermost(node) or "", kind, node))
    return merges, graph


_SOURCE_MERGE = re.compile(r"torch\.(cat|concat|add)\(|\+=|[\w\)\]]\s\+\s[\w\(]")


def _source_merges(model: nn.Module) -> list[_Merge]:
    merges = []
    for name, module in model.named_modules():
        if not name or isinstance(module, _CONTAINERS) or not list(module.children()):
            continue
        try:
            source = inspect.getsource(type(module).forward)
        except (OSError, TypeError):
            continue
        match = _SOURCE_MERGE.search(source)
        if match:
            merges.append(_Merge(name, "cat" if "cat" in match.group(0) else "add"))
    return merges


def find_merges(
    model: nn.Module, traced: tuple[list[_Merge], fx.Graph] | bool | None = True
) -> tuple[list[str], str, list[str]]:
    """Modules whose forward joins paths (residual adds, concatenations), and how they were found.

    Args:
        model: The network.
        traced: A trace from ``_fx_merges`` to reuse (internal), ``None`` when tracing failed, or ``True`` to
            trace now.

    Returns:
        ``(module names in graph order without repeats, "fx" or "source", notes)``.
    """
    trace = _fx_merges(model) if traced is True else (traced or None)
    notes: list[str] = []
    if trace is None:
        merges = _source_merges(model)
        method = "source"
    else:
        merges = trace[0]
        method = "fx"
        top = [m for m in merges if not m.module]
        if top:
            notes.append(
                f"{len(top)} merge(s) happen in the model's own forward, outside any submodule: they cannot be "
                "targeted by name; wrap them in a module to study them."
            )
    names = list(dict.fromkeys(m.module for m in merges if m.module))
    return names, method, notes


def _last_branch_convs(model: nn.Module, block: str, traced: tuple[list[_Merge], fx.Graph] | None) -> list[str]:
    """Last convolution of each parallel branch of ``block`` (fx when possible, else per child)."""
    modules = dict(model.named_modules())
    if traced is not None:
        merges, _ = traced
        inside = [m for m in merges if m.module == block and m.node is not None]
        cats = [m for m in inside if m.kind == "cat"]
        chosen = (cats or inside)[-1:] if inside else []
        found: list[str] = []
        for merge in chosen:
            assert merge.node is not None  # filtered above
            first = merge.node.args[0]
            is_cat = merge.kind == "cat" and isinstance(first, (list, tuple))
            stack: list[Any] = list(first) if is_cat else list(merge.node.args)  # type: ignore[arg-type]
            seen: set[fx.Node] = set()
            while stack:
                node = stack.pop(0)
                if not isinstance(node, fx.Node) or node in seen:
                    continue
                seen.add(node)
                owner = _innermost(node) or ""
                if not (owner == block or owner.startswith(block + ".")):
                    continue  # left the block: an identity path without a conv
                if node.op == "call_module" and isinstance(modules.get(str(node.target)), nn.Conv2d):
                    found.append(str(node.target))
                    continue
                if node.op == "call_function" and node.target in _CAT_FUNCS and node.args:
                    stack.extend(node.args[0] if isinstance(node.args[0], (list, tuple)) else [node.args[0]])
                    continue
                stack.extend(a for a in node.args if isinstance(a, fx.Node))
        if found:
            return list(dict.fromkeys(found))
    out = []
    for child_name, child in modules[block].named_children():
        convs = [n for n, m in child.named_modules() if isinstance(m, nn.Conv2d)]
        if isinstance(child, nn.Conv2d):
            out.append(f"{block}.{child_name}")
        elif convs:
            out.append(f"{block}.{child_name}.{convs[-1]}" if convs[-1] else f"{block}.{child_name}")
    return out


def _block_outputs(model: nn.Module, spatial: set[str]) -> list[str]:
    blocks: list[str] = []

    def visit(prefix: str, module: nn.Module) -> None:
        children = list(module.named_children())
        if isinstance(module, _CONTAINERS):
            if children and all(not list(c.children()) for _, c in children):
                # a plain stack of layers (VGG's features): stages end at pooling layers
                for name, child in children:
                    if isinstance(child, _POOLS):
                        blocks.append(f"{prefix}{name}")
                return
            for name, child in children:
                visit(f"{prefix}{name}.", child)
            return
        name = prefix[:-1]
        if not children or isinstance(module, nn.modules.batchnorm._BatchNorm):
            return
        blocks.append(name)

    for name, child in model.named_children():
        visit(f"{name}.", child)
    return [b for b in blocks if b in spatial]


def _final_spatial(infos: Sequence[LayerInfo], modules: dict[str, nn.Module]) -> str | None:
    """The last output with h*w > 1 before the first pooled or flattened output that follows it.

    Walks in execution order; with equal completion, the outermost module completes last.
    """
    last_spatial: str | None = None
    for info in infos:
        if info.calls == 0 or info.shape is None:
            continue
        if len(info.shape) == 3 and info.shape[1] * info.shape[2] > 1:
            if not isinstance(modules[info.name], (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
                last_spatial = info.name
        elif last_spatial is not None:
            break
    return last_spatial


_NCHW = Layout("nchw")


def _map_views(
    model: nn.Module, ran: dict[str, LayerInfo], size: tuple[int, ...], token_scope: set[str]
) -> dict[str, tuple[Layout, tuple[int, ...], int | None]]:
    """Each mappable output's layout, ``(C, h, w)`` view and stride.

    A plain CNN (``token_scope`` empty: no transformer block) keeps every ``(C, h, w)`` output as it is. In a
    token model every 4-D output's layout is inferred (channels-last Swin stages), and the 3-D outputs of the
    transformer blocks' own layers (``token_scope``) are mapped as tokens; outputs that fit no layout (inside
    windowed attention, the head) are left out.
    """
    views: dict[str, tuple[Layout, tuple[int, ...], int | None]] = {}
    modules = dict(model.named_modules())
    for name, info in ran.items():
        shape = info.shape
        if shape is None or len(shape) not in (2, 3):
            continue
        if not token_scope:
            if len(shape) == 3:
                views[name] = (_NCHW, tuple(shape), info.stride)
            continue
        if len(shape) == 2 and name not in token_scope:
            continue
        try:
            layout = infer_layout(model, modules[name], torch.empty((1, *shape), device="meta"), (1, *size), None)
        except CnnlensError:
            continue
        mapped = tuple(int(v) for v in layout.to_maps(torch.empty((1, *shape), device="meta")).shape[1:])
        stride = info.stride if layout.is_identity else (size[-2] // mapped[-2] if mapped[-2] else None)
        views[name] = (layout, mapped, stride)
    return views


def candidate_layers(
    model: nn.Module,
    input_size: Sequence[int] | None = None,
    *,
    device: str | None = None,
    infos: Sequence[LayerInfo] | None = None,
) -> LayerCatalog:
    """List the layers worth targeting, with their roles, output shapes and strides.

    Args:
        model: Any CNN or token model (ViT, DeiT, Swin: see the module docstring), or a Keras model wrapped by
            :class:`cnnlens.models.keras.KerasModule` (roles read from its layer graph: see
            :mod:`cnnlens.candidates.keras_graph`).
        input_size: ``(C, H, W)`` of one input; default ``(3, 224, 224)``.
        device: Where to run the shape probe; default the model's device.
        infos: A probe already run by :func:`cnnlens.capture.probe_layers` for this input size (skips the probe).

    Returns:
        A :class:`LayerCatalog` (candidates in execution order).

    Example:
        >>> import torchvision
        >>> cat = candidate_layers(torchvision.models.resnet18(), (3, 64, 64))
        >>> cat.first("final_spatial"), cat.with_role("merge")[-1], cat.first("deepest_conv")
        ('layer4.1', 'layer4.1', 'layer4.1.conv2')
    """
    size = tuple(int(v) for v in (input_size or (3, 224, 224)))
    infos = list(infos) if infos is not None else probe_layers(model, size, device=device)
    keras_entries = keras_graph.keras_entries(model)
    if keras_entries is not None:
        return keras_graph.keras_candidates(model, size, infos, keras_entries)
    ran = {i.name: i for i in infos if i.calls > 0}
    order = {i.name: k for k, i in enumerate(infos) if i.calls > 0}
    blocks = transformer_blocks(model)
    token_scope = {n for b in blocks for n in (b.name, b.attention_norm, b.mlp_norm) if n is not None}
    views = _map_views(model, ran, size, token_scope)
    spatial = set(views)
    roles: dict[str, list[str]] = {n: [] for n in spatial}

    convs_def = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n in spatial]
    for n in convs_def:
        roles[n].append("conv")
    if convs_def:
        roles[convs_def[-1]].append("highest_numbered_conv")
        roles[max(convs_def, key=lambda n: order[n])].append("deepest_conv")

    traced = _fx_merges(model)
    merge_names, method, notes = find_merges(model, traced)
    merges = [n for n in merge_names if n in spatial]
    for n in merges:
        roles[n].append("merge")
    if merges:
        final_block = max(merges, key=lambda n: order[n])
        for n in _last_branch_convs(model, final_block, traced):
            if n in roles:
                roles[n].append("last_branch_conv")

    for n in _block_outputs(model, spatial):
        roles[n].append("block_output")
    for block in blocks:
        for n, role in (
            (block.name, "block_output"),
            (block.attention_norm, "attention_norm"),
            (block.mlp_norm, "mlp_norm"),
        ):
            if n in roles and role not in roles[n]:
                roles[n].append(role)

    modules = dict(model.named_modules())
    last_spatial = token_model_default(model) or _final_spatial(infos, modules)
    if last_spatial in roles:
        roles[last_spatial].append("final_spatial")
    return build_catalog(roles, ran, views, order, modules, merge_method=method, notes=notes)
