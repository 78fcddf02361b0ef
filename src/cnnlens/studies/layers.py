"""The target-layer study: one capture for many candidate layers and methods, every map measured.

``compare_layers`` is over ~80 lines only because of its docstring; its code is ~60 lines.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from cnnlens.candidates import ROLES, LayerCatalog, candidate_layers
from cnnlens.capture.layout import LayoutSpec
from cnnlens.errors import LayerError
from cnnlens.execution import Execution
from cnnlens.explain import explain
from cnnlens.explanation import Explanation, ExplanationSet
from cnnlens.metrics import MetricOptions, average_drop, deletion_insertion
from cnnlens.models import LoadedModel
from cnnlens.targets import TargetSpec

__all__ = ["DEFAULT_STUDY_ROLES", "RULE", "LayerRow", "LayerStudy", "compare_layers", "recommend", "select_layers"]

DEFAULT_STUDY_ROLES = tuple(role for role in ROLES if role != "conv")
"""Roles the study compares by default (every plain ``conv`` would be 50+ layers for ResNet50)."""

RULE = (
    "For each method, layers whose maps are degenerate on more than half of the images are excluded; each "
    "remaining layer is ranked on Average Drop (lower is better), deletion AUC (lower is better) and "
    "insertion AUC (higher is better); the layer with the lowest mean rank is recommended, ties going to the "
    "higher insertion AUC, then to the deeper layer."
)
"""The documented recommendation rule."""


@dataclass
class LayerRow:
    """One (layer, method) of a layer study.

    Attributes:
        layer: Layer name.
        roles: Its roles from :func:`cnnlens.candidates.candidate_layers`.
        shape: Output ``(C, h, w)``.
        stride: Input height over output height.
        method: Method id.
        average_drop: Average Drop % (lower is better).
        increase: % Increase in Confidence (higher is better).
        deletion_auc: Mean deletion AUC (lower is better).
        insertion_auc: Mean insertion AUC (higher is better).
        degenerate: Share of the images whose map was degenerate.
        per_image: Per-image ``drop``, ``deletion``, ``insertion`` values.
        rank: Mean rank under :data:`RULE` (NaN-free: ``inf`` when excluded).
    """

    layer: str
    roles: tuple[str, ...]
    shape: tuple[int, ...]
    stride: int | None
    method: str
    average_drop: float
    increase: float
    deletion_auc: float
    insertion_auc: float
    degenerate: float
    per_image: dict[str, list[float]] = field(default_factory=dict)
    rank: float = math.inf

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly row (``rank`` of an excluded layer becomes None)."""
        row = asdict(self)
        row["rank"] = None if math.isinf(self.rank) else self.rank
        return row


@dataclass
class LayerStudy:
    """The result of :func:`compare_layers`.

    Attributes:
        rows: One row per (layer, method), layers in execution order.
        recommended: Method id -> recommended layer.
        rule: How the recommendation was reached (:data:`RULE`).
        explanations: Every map, for figures.
        curves: ``(method, layer)`` -> mean deletion curve, mean insertion curve and the pixel fractions.
        catalog: The candidate catalogue the layers came from.
        notes: Warnings raised while computing (e.g. Grad-CAM++ on signed activations), complete with their
            advice; messages that differ only in the layer are merged into one naming every layer.
        step: Pixels per deletion/insertion step.
    """

    rows: list[LayerRow]
    recommended: dict[str, str]
    rule: str
    explanations: ExplanationSet
    curves: dict[tuple[str, str], dict[str, list[float]]]
    catalog: LayerCatalog
    notes: list[str]
    step: int

    def row(self, method: str, layer: str) -> LayerRow:
        """The row of ``method`` at ``layer``."""
        for r in self.rows:
            if r.method == method and r.layer == layer:
                return r
        mine = [r for r in self.rows if r.method == method]
        if len(mine) == 1 and mine[0].layer in ("input", "network"):
            return mine[0]  # an input- or network-scope method has one row, whatever layer was named
        raise KeyError(f"no row for method {method!r} at layer {layer!r}.")

    def table(self) -> list[dict[str, Any]]:
        """Rows as dictionaries (for JSON, Parquet or printing)."""
        return [r.as_dict() for r in self.rows]


def select_layers(
    catalog: LayerCatalog, roles: Sequence[str] = DEFAULT_STUDY_ROLES, last_n: int | None = 4
) -> list[str]:
    """Pick the layers of the given roles.

    For the many-layer roles (``merge``, ``block_output``, ``conv``, and the per-block ``attention_norm`` and
    ``mlp_norm`` of transformer blocks) only the last ``last_n`` in execution order are kept (``None`` keeps
    all).

    Example:
        >>> import torchvision
        >>> from cnnlens.candidates import candidate_layers
        >>> select_layers(candidate_layers(torchvision.models.resnet18(), (3, 64, 64)), last_n=2)
        ['layer4.0', 'layer4.1.conv2', 'layer4.1']
    """
    many = {"merge", "block_output", "conv", "attention_norm", "mlp_norm"}
    chosen: set[str] = set()
    for role in roles:
        names = catalog.with_role(role)
        if role in many and last_n is not None:
            names = names[-last_n:]
        chosen.update(names)
    return [layer.name for layer in catalog.layers if layer.name in chosen]


def recommend(rows: Sequence[LayerRow]) -> dict[str, str]:
    """Apply :data:`RULE` to the rows of each method; sets each row's ``rank`` and returns method -> layer."""
    out: dict[str, str] = {}
    methods = list(dict.fromkeys(r.method for r in rows))
    for method in methods:
        mine = [r for r in rows if r.method == method]
        valid = [r for r in mine if r.degenerate <= 0.5]
        if not valid:
            continue

        def ranks(key: Any, reverse: bool, valid: list[LayerRow] = valid) -> dict[str, float]:
            ordered = sorted(valid, key=key, reverse=reverse)
            # average ranks for ties
            result: dict[str, float] = {}
            i = 0
            while i < len(ordered):
                j = i
                while j + 1 < len(ordered) and key(ordered[j + 1]) == key(ordered[i]):
                    j += 1
                for k in range(i, j + 1):
                    result[ordered[k].layer] = (i + j) / 2 + 1
                i = j + 1
            return result

        r_drop = ranks(lambda r: r.average_drop, False)
        r_del = ranks(lambda r: r.deletion_auc, False)
        r_ins = ranks(lambda r: r.insertion_auc, True)
        for r in valid:
            r.rank = (r_drop[r.layer] + r_del[r.layer] + r_ins[r.layer]) / 3
        order = {r.layer: k for k, r in enumerate(mine)}
        best = min(valid, key=lambda r: (r.rank, -r.insertion_auc, -order[r.layer]))
        out[method] = best.layer
    return out


def _model_parts(model: nn.Module | LoadedModel) -> tuple[nn.Module, LoadedModel | None]:
    if isinstance(model, LoadedModel):
        return model.module, model
    return model, None


def compare_layers(
    model: nn.Module | LoadedModel,
    inputs: torch.Tensor,
    *,
    methods: Sequence[str] = ("gradcam", "gradcampp"),
    layers: Sequence[str] | None = None,
    roles: Sequence[str] = DEFAULT_STUDY_ROLES,
    last_n: int | None = 4,
    targets: TargetSpec = None,
    steps: int = 16,
    image_names: Sequence[str] | None = None,
    catalog: LayerCatalog | None = None,
    progress: Callable[[int, int], None] | None = None,
    execution: Execution | None = None,
    layout: LayoutSpec | Mapping[str, LayoutSpec] = None,
) -> LayerStudy:
    """Compare target layers: one capture for every layer and method, every map measured.

    Args:
        model: The network (a LoadedModel gives Average Drop in pixel space, the authors' protocol; a plain
            module uses the normalised-tensor space of pytorch-grad-cam/torchcam).
        inputs: ``(B, C, H, W)`` preprocessed images.
        methods: Method ids.
        layers: Explicit layer names; default: :func:`select_layers` over the candidate catalogue.
        roles: Roles to study when ``layers`` is None.
        last_n: How many of the last merges/block outputs to keep.
        targets: What to explain (default: each image's top class).
        steps: Deletion/insertion steps (step = H*W/steps pixels). RISE used H*W/224; AUCs at different
            steps are not comparable.
        image_names: Names for reports.
        catalog: A precomputed :func:`cnnlens.candidates.candidate_layers` result.
        progress: Called as ``progress(done, total)`` with the maps measured so far (``(0, total)`` once the
            maps are computed), for progress bars.
        execution: How to run the capture and the metrics' forwards (:class:`cnnlens.Execution`; None: the
            default). Never changes what is measured.
        layout: How layer outputs map to ``(B, C, h, w)`` (see :func:`cnnlens.explain`): None infers each
            layer's (tokens of a ViT, channels-last Swin stages), one spec applies to every layer, a mapping
            gives single layers theirs. The inferred layouts are in ``explanations.manifest["layouts"]``.

    Returns:
        A :class:`LayerStudy` with the table, the recommendation and the maps.

    Example:
        >>> import torchvision
        >>> net = torchvision.models.resnet18(num_classes=5).eval()
        >>> study = compare_layers(net, torch.randn(2, 3, 64, 64), methods=["gradcam"], last_n=1, steps=4)
        >>> sorted(study.recommended) == ["gradcam"]
        True
    """
    module, loaded = _model_parts(model)
    if inputs.ndim != 4:
        raise LayerError(f"compare_layers needs a batch (B, C, H, W), got shape {tuple(inputs.shape)}.")
    size = (int(inputs.shape[1]), int(inputs.shape[2]), int(inputs.shape[3]))
    catalog = catalog if catalog is not None else candidate_layers(module, size)
    names = list(layers) if layers is not None else select_layers(catalog, roles, last_n)
    if not names:
        raise LayerError("no candidate layer matched; pass layers=[...] explicitly (see `cnnlens layers`).")
    info = {c.name: c for c in catalog.layers}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = explain(
            model,
            inputs,
            methods=list(methods),
            layers=names,
            targets=targets,
            image_names=image_names,
            execution=execution,
            layout=layout,
        )
    notes = _group_notes(str(w.message) for w in caught)
    space = "pixel" if loaded is not None else "normalized"
    pixels = int(inputs.shape[-2] * inputs.shape[-1])
    step = max(1, math.ceil(pixels / steps))
    rows: list[LayerRow] = []
    curves: dict[tuple[str, str], dict[str, list[float]]] = {}
    if progress is not None:
        progress(0, len(result))
    options = MetricOptions(execution=execution)
    for exp in result:
        rows.append(_measure(model, inputs, exp, info, space, step, curves, options))
        if progress is not None:
            progress(len(rows), len(result))
    recommended = recommend(rows)
    return LayerStudy(
        rows=rows,
        recommended=recommended,
        rule=RULE,
        explanations=result,
        curves=curves,
        catalog=catalog,
        notes=notes,
        step=step,
    )


_LAYER_IN_NOTE = re.compile(r"layer '([^']+)'")


def _group_notes(messages: Iterable[str]) -> list[str]:
    """Warnings as complete sentences, advice included; messages that differ only in the layer become one.

    Example:
        >>> _group_notes(["on layer 'a' x: do y.", "on layer 'b' x: do y.", "other"])
        ["on layers 'a', 'b' x: do y.", 'other']
    """
    layers: dict[str, list[str]] = {}
    for message in messages:
        found = _LAYER_IN_NOTE.search(message)
        key = _LAYER_IN_NOTE.sub("layer {}", message, count=1) if found else message
        names = layers.setdefault(key, [])
        if found and found.group(1) not in names:
            names.append(found.group(1))
    out = []
    for key, names in layers.items():
        if not names:
            out.append(key)
            continue
        listed = ", ".join(f"'{n}'" for n in names)
        out.append(key.replace("layer {}", f"layer {listed}" if len(names) == 1 else f"layers {listed}", 1))
    return out


def _measure(
    model: nn.Module | LoadedModel,
    inputs: torch.Tensor,
    exp: Explanation,
    info: dict[str, Any],
    space: str,
    step: int,
    curves: dict[tuple[str, str], dict[str, list[float]]],
    options: MetricOptions,
) -> LayerRow:
    drop = average_drop(model, inputs, exp, space=space, options=options)  # type: ignore[arg-type]
    dele, ins = deletion_insertion(model, inputs, exp, step=step, options=options)
    curves[(exp.method, exp.layer)] = {
        "fractions": dele.fractions.tolist(),
        "deletion": dele.mean_curve.tolist(),
        "insertion": ins.mean_curve.tolist(),
    }
    cand = info.get(exp.layer)
    shape = tuple(int(v) for v in exp.raw.shape[-2:])
    return LayerRow(
        layer=exp.layer,
        roles=cand.roles if cand is not None else (),
        shape=cand.shape if cand is not None else shape,
        stride=cand.stride if cand is not None else None,
        method=exp.method,
        average_drop=drop.average_drop,
        increase=drop.increase_in_confidence,
        deletion_auc=dele.mean_auc,
        insertion_auc=ins.mean_auc,
        degenerate=float(exp.degenerate[:, 0].double().mean()),
        per_image={
            "drop": (100.0 * drop.drop).tolist(),
            "deletion": dele.auc.tolist(),
            "insertion": ins.auc.tolist(),
        },
    )
