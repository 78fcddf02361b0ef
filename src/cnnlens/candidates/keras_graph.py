"""Candidate-layer roles of a Keras model, read from its layer graph instead of a ``torch.fx`` trace.

A Keras 3 model (torch backend) cannot be traced by ``torch.fx``, but a functional or Sequential model records
its own graph: each layer's ``_inbound_nodes`` name the layers that feed it and ``_outbound_nodes`` those it
feeds. This module turns that graph into the roles of :mod:`cnnlens.candidates` (the same meanings as for
torch models):

``merge``
    a layer joining two or more paths (``Add``, ``Concatenate``, InceptionResNetV2's scaled residual
    ``CustomScaleLayer``; not ``Multiply``/``Dot``, which gate rather than join) that every path from input to
    output goes through (a *cut* layer): the join of a block, as a torch module owning the ``add``/``cat`` is;
    a join inside one branch (InceptionV3's ``mixed9_0``) is part of its block and not listed;
``last_branch_conv``
    the last convolution of each parallel branch of the final merge's block: walking back from the block's
    last concatenation (or from the final merge when the block has none) through single-consumer layers,
    stopping at the first convolution of each path; a path that reaches the block input first (ResNet's
    identity) has none;
``block_output``
    each merge (ResNet's ``convN_blockM_add``, InceptionV3's ``mixedN``), extended over the activation that
    follows it (``conv5_block3_out``); the final spatial layer when it comes after the last merge
    (InceptionResNetV2's ``conv_7b_ac``); in a model with no merge (VGG16), the pooling layers ending each
    stage.

A cut layer is found from any topological order (the execution order of the shape probe): layer ``v`` at
position ``i`` is cut when no edge ``a -> b`` has ``pos(a) < i < pos(b)``. A nested model (a
``keras.applications`` base inside a transfer-learning model) is looked through: its output layer feeds the
outer layers, and its input layer is fed by what feeds the nested model. A subclassed model records no graph:
it gets the convolution roles only, and a note says so.

Example:
    >>> from cnnlens.models.keras import load_keras  # doctest: +SKIP
    >>> from cnnlens.candidates import candidate_layers  # doctest: +SKIP
    >>> cat = candidate_layers(load_keras("keras:resnet50", random_weights=True).module)  # doctest: +SKIP
    >>> cat.merge_method, cat.with_role("block_output")[-1]  # doctest: +SKIP
    ('keras', 'conv5_block3_out')
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from cnnlens.candidates.catalog import LayerCatalog, build_catalog
from cnnlens.capture import LayerInfo
from cnnlens.capture.layout import Layout, infer_layout

__all__ = [
    "CONV_TYPES",
    "KerasGraph",
    "is_conv_layer",
    "is_model",
    "keras_candidates",
    "keras_entries",
    "keras_graph_roles",
]

CONV_TYPES = frozenset({"Conv2D", "DepthwiseConv2D", "SeparableConv2D"})
"""Keras layer classes (or their bases) counted as convolutions, like ``nn.Conv2d`` for torch models."""

_NOT_MERGES = frozenset({"Multiply", "Dot"})
_ELEMENTWISE = frozenset({"Activation", "ReLU", "LeakyReLU", "ELU", "PReLU"})
_POOLS = frozenset({"MaxPooling2D", "AveragePooling2D"})
_INPUT = "<input>"


def _type_names(layer: Any) -> set[str]:
    return {c.__name__ for c in type(layer).__mro__}


def is_conv_layer(layer: Any) -> bool:
    """Whether a Keras layer is a 2-D convolution (``Conv2D``, ``DepthwiseConv2D``, ``SeparableConv2D``)."""
    return bool(_type_names(layer) & CONV_TYPES)


def is_model(op: Any) -> bool:
    """Whether a Keras operation is a whole model (nested inside another, or the root)."""
    return hasattr(op, "layers") and hasattr(op, "outputs") and hasattr(op, "inputs")


def _is_input(op: Any) -> bool:
    return type(op).__name__ == "InputLayer"


def _ops_of(tensors: Any) -> list[Any]:
    items = tensors if isinstance(tensors, (list, tuple)) else [tensors]
    ops = []
    for t in items:
        history = getattr(t, "_keras_history", None)
        if history is not None:
            ops.append(history.operation)
    return ops


@dataclass
class KerasGraph:
    """The layer graph of a Keras model, in cnnlens module names.

    Attributes:
        parents: Layer name -> the layers feeding it (``"<input>"`` for the model input), without repeats.
        consumers: Layer name -> the layers it feeds.
        kinds: Layer name -> its class name.
        has_graph: False for a subclassed model (no layer records an inbound node).
    """

    parents: dict[str, list[str]] = field(default_factory=dict)
    consumers: dict[str, list[str]] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)
    has_graph: bool = False


def _build_graph(entries: Sequence[tuple[str, Any]], root: Any) -> KerasGraph:
    """Edges between the (non-model, non-input) layers of ``entries``, nested models looked through."""
    name_of = {id(layer): name for name, layer in entries}
    owner: dict[int, Any] = {}
    for _, layer in [("", root), *entries]:
        if is_model(layer):
            for op in _ops_of(layer.inputs):
                owner.setdefault(id(op), layer)
    memo: dict[int, list[str]] = {}

    def resolve(op: Any, depth: int = 0) -> list[str]:
        key = id(op)
        if key in memo:
            return memo[key]
        if depth > 64:  # a malformed graph; never loop
            return []
        if is_model(op):
            found = [n for out in _ops_of(op.outputs) for n in resolve(out, depth + 1)]
        elif _is_input(op):
            model = owner.get(key)
            if model is None or model is root:
                found = [_INPUT]
            else:
                found = [n for p in _parent_ops(model) for n in resolve(p, depth + 1)] or [_INPUT]
        elif key in name_of:
            found = [name_of[key]]
        else:  # an operation that is no module (keras.ops on symbolic tensors): edges pass through it
            found = [n for p in _parent_ops(op) for n in resolve(p, depth + 1)]
        memo[key] = list(dict.fromkeys(found))
        return memo[key]

    graph = KerasGraph()
    for name, layer in entries:
        if is_model(layer) or _is_input(layer):
            continue
        graph.kinds[name] = type(layer).__name__
        parents = [n for p in _parent_ops(layer) for n in resolve(p)]
        graph.parents[name] = list(dict.fromkeys(parents))
        graph.has_graph = graph.has_graph or bool(getattr(layer, "_inbound_nodes", None))
    for name, parents in graph.parents.items():
        for p in parents:
            graph.consumers.setdefault(p, []).append(name)
    return graph


def _parent_ops(op: Any) -> list[Any]:
    return [p.operation for node in getattr(op, "_inbound_nodes", []) or [] for p in node.parent_nodes]


def _cut_layers(graph: KerasGraph, order: Mapping[str, int]) -> set[str]:
    """Layers every input-to-output path goes through (no edge jumps over their position in ``order``)."""
    ran = sorted((n for n in graph.kinds if n in order), key=lambda n: order[n])
    pos = {n: i for i, n in enumerate(ran)}
    pos[_INPUT] = -1
    cover = [0] * (len(ran) + 1)
    for b in ran:
        for a in graph.parents.get(b, []):
            if a in pos and pos[a] + 1 < pos[b]:
                cover[pos[a] + 1] += 1
                cover[pos[b]] -= 1
    cut, running = set(), 0
    for i, n in enumerate(ran):
        running += cover[i]
        if running == 0:
            cut.add(n)
    return cut


def _block(graph: KerasGraph, final: str) -> set[str]:
    """The layers of the block ending at ``final``: walking back until a layer feeding several (the block input)."""
    seen, stack = {final}, list(graph.parents.get(final, []))
    while stack:
        n = stack.pop()
        if n in seen or n == _INPUT or len(graph.consumers.get(n, [])) > 1:
            continue
        seen.add(n)
        stack.extend(graph.parents.get(n, []))
    return seen


def _last_branch_convs(graph: KerasGraph, final: str, order: Mapping[str, int], convs: set[str]) -> list[str]:
    block = _block(graph, final)
    cats = [n for n in block if graph.kinds.get(n) == "Concatenate" and n in order]
    source = max(cats, key=lambda n: order[n]) if cats else final
    found: list[str] = []
    seen: set[str] = set()
    queue = list(graph.parents.get(source, []))
    while queue:
        n = queue.pop(0)
        if n in seen or n not in block:
            continue  # left the block: an identity path without a conv
        seen.add(n)
        if n in convs:
            found.append(n)
            continue
        queue.extend(graph.parents.get(n, []))
    return found


def keras_graph_roles(
    entries: Sequence[tuple[str, Any]],
    root: Any,
    order: Mapping[str, int],
    spatial: set[str],
    final_spatial: str | None,
) -> tuple[dict[str, list[str]], list[str]]:
    """The graph roles (``merge``, ``last_branch_conv``, ``block_output``) of a Keras model's layers.

    Args:
        entries: ``(module name, keras layer)`` of every layer, nested models included, in definition order.
        root: The outermost Keras model.
        order: Module name -> position in the probe's execution order (layers that ran).
        spatial: Names whose output maps to ``(C, h, w)``; only they get roles.
        final_spatial: The final spatial layer, if any.

    Returns:
        ``(name -> roles, notes)``.
    """
    graph = _build_graph(entries, root)
    roles: dict[str, list[str]] = {}
    if not graph.has_graph:
        return roles, [
            "this Keras model records no layer graph (a subclassed model): merges, branch convolutions and "
            "block outputs are not listed; pass layer names explicitly to study them."
        ]
    cut = _cut_layers(graph, order)
    merges = [
        n
        for n, parents in graph.parents.items()
        if len(parents) >= 2 and n in cut and n in spatial and graph.kinds[n] not in _NOT_MERGES
    ]  # a join inside a branch (InceptionV3's mixed9_0) is part of its block's merge, as in a torch module
    merges.sort(key=lambda n: order[n])
    for n in merges:
        roles.setdefault(n, []).append("merge")
    convs = {n for n, layer in entries if n in graph.kinds and is_conv_layer(layer)}
    if merges:
        for n in _last_branch_convs(graph, merges[-1], order, convs):
            if n in spatial:
                roles.setdefault(n, []).append("last_branch_conv")
    blocks: list[str] = []
    for m in merges:
        end = m
        while True:
            nxt = graph.consumers.get(end, [])
            if len(nxt) != 1 or nxt[0] not in cut or graph.kinds.get(nxt[0]) not in _ELEMENTWISE:
                break
            if graph.parents.get(nxt[0]) != [end] or nxt[0] not in spatial:
                break
            end = nxt[0]
        blocks.append(end)
    if not merges:
        blocks.extend(n for n in cut if graph.kinds[n] in _POOLS and n in spatial)
    if final_spatial in cut and (not merges or order[final_spatial] > order[merges[-1]]):
        blocks.append(final_spatial)
    for n in sorted(set(blocks), key=lambda n: order[n]):
        roles.setdefault(n, []).append("block_output")
    return roles, []


def keras_entries(model: nn.Module) -> list[tuple[str, Any]] | None:
    """``(path, keras layer)`` of a wrapped Keras model, or None (the adapter is only looked at if imported)."""
    adapter = sys.modules.get("cnnlens.models.keras")
    if adapter is None or not isinstance(model, adapter.KerasModule):
        return None
    return list(adapter.keras_layers(model))


def keras_candidates(
    model: nn.Module, size: tuple[int, ...], infos: Sequence[LayerInfo], entries: list[tuple[str, Any]]
) -> LayerCatalog:
    """:func:`candidate_layers` of a Keras model: convolutions by class, the rest from its layer graph.

    Every 4-D output is mapped by the model's declared layout (``nhwc`` for Keras ``channels_last``).
    """
    ran = {i.name: i for i in infos if i.calls > 0}
    order = {i.name: k for k, i in enumerate(infos) if i.calls > 0}
    modules = dict(model.named_modules())
    layers = [(n, layer) for n, layer in entries if n in ran and not is_model(layer)]
    views: dict[str, tuple[Layout, tuple[int, ...], int | None]] = {}
    for name, _ in layers:
        shape = ran[name].shape
        if shape is None or len(shape) != 3:
            continue
        meta = torch.empty((1, *shape), device="meta")
        layout = infer_layout(model, modules[name], meta, (1, *size), None)
        mapped = tuple(int(v) for v in layout.to_maps(meta).shape[1:])
        stride = size[-2] // mapped[-2] if mapped[-2] else None
        views[name] = (layout, mapped, stride)
    roles: dict[str, list[str]] = {n: [] for n in views}
    convs_def = [n for n, layer in layers if n in views and is_conv_layer(layer)]
    for n in convs_def:
        roles[n].append("conv")
    if convs_def:
        roles[convs_def[-1]].append("highest_numbered_conv")
        roles[max(convs_def, key=lambda n: order[n])].append("deepest_conv")
    final = _keras_final_spatial(sorted((n for n, _ in layers), key=lambda n: order[n]), ran, views)
    root = getattr(model, "keras_model")  # noqa: B009  (an attribute of KerasModule, not of nn.Module)
    graph_roles, notes = keras_graph_roles(layers, root, order, set(views), final)
    for n, extra in graph_roles.items():
        roles[n].extend(extra)
    if final is not None:
        roles[final].append("final_spatial")
    return build_catalog(roles, ran, views, order, modules, merge_method="keras", notes=notes)


def _keras_final_spatial(
    names: Sequence[str], ran: dict[str, LayerInfo], views: dict[str, tuple[Layout, tuple[int, ...], int | None]]
) -> str | None:
    """The last layer with a spatial map (h*w > 1) before the first output without one (pooled, flattened)."""
    last: str | None = None
    for name in names:
        view = views.get(name)
        if view is not None and view[1][1] * view[1][2] > 1:
            last = name
        elif last is not None and ran[name].shape is not None:
            break
    return last
