"""The per-batch work of a run: ``process_batch(model, batch, settings) -> BatchResult``, free of global state.

One call explains a decoded :class:`~cnnlens.runs.decode.Batch` with every requested method at every requested
layer from one capture (:func:`cnnlens.explain`), with two targets per image: the predicted class and the
true class (the second map is kept only where the two differ). It then computes the per-row metrics and
returns plain rows (one dict per image, error rows included), the raw maps and the overlay pictures of the
misclassified images. It writes nothing and reads nothing but its arguments, so a distributed engine can call
it on any worker; :mod:`cnnlens.runs.store` turns results into files.

Per-row columns (see :func:`row_columns`); ``M/L/...`` stands for ``method/layer/...`` of each pair:

* ``index``, ``path``, ``label``, ``label_name``, ``status`` (``"ok"``/``"error"``), ``error`` (the reason);
* ``prediction``, ``prediction_name``, ``correct``, ``prob_prediction``, ``prob_label``, ``top_k_classes``,
  ``top_k_names``, ``top_k_probs``;
* ``box`` (original pixels) and ``box_input`` (model-input pixels, clipped), when the dataset gives one;
* ``M/L/score_pred``, ``M/L/score_true`` (the explained logits), ``M/L/degenerate_pred``,
  ``M/L/degenerate_true``, ``M/L/avg_drop_pred``, ``M/L/avg_drop_true``, ``M/L/increase_pred``,
  ``M/L/increase_true``, ``M/L/energy_in_box_pred``, ``M/L/energy_in_box_true``, ``M/L/pointing_pred``,
  ``M/L/pointing_true``;
* added by the store: ``shard``, ``maps_row``, ``M/L/maps_file``, ``M/L/overlay_pred``, ``M/L/overlay_true``,
  ``image_file``.

``..._true`` columns are null where the prediction is right (the true-class map *is* the predicted one),
box columns are null without a box, everything is null on error rows. No value is ever NaN.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from cnnlens.explain import default_layer, explain
from cnnlens.imaging import overlay
from cnnlens.methods.registry import resolve_methods
from cnnlens.models import LoadedModel
from cnnlens.runs._metrics import average_drop_terms, box_metrics, probabilities
from cnnlens.runs.dataset import Box
from cnnlens.runs.decode import Batch
from cnnlens.runs.errors import RunError
from cnnlens.targets import ClassTarget, RankTarget, Target

__all__ = [
    "PAIR_METRICS",
    "BatchResult",
    "Pair",
    "Picture",
    "RunSettings",
    "column",
    "process_batch",
    "row_columns",
]

PAIR_METRICS: tuple[str, ...] = (
    "score",
    "degenerate",
    "avg_drop",
    "increase",
    "energy_in_box",
    "pointing",
)
"""Per (method, layer) metrics, each stored as ``<name>_pred`` and ``<name>_true``."""


def column(method: str, layer: str, name: str) -> str:
    """The results column of ``name`` for one (method, layer) pair, e.g. ``"gradcam/layer4/avg_drop_pred"``.

    Method ids are lowercase words and layer keys dotted module paths, so ``/`` never occurs inside them.
    """
    return f"{method}/{layer}/{name}"


@dataclass(frozen=True)
class Pair:
    """One (method, layer) of a run, with its method variant and a file-name-safe key."""

    method: str
    layer: str
    variant: Mapping[str, Any]
    key: str

    def col(self, name: str) -> str:
        """The column ``method/layer/name``."""
        return column(self.method, self.layer, name)


def _slug(text: str) -> str:
    out = "".join(c if c.isalnum() or c in "._-" else "_" for c in text).strip("._")
    return out or "x"


@dataclass(frozen=True)
class RunSettings:
    """What a run computes for each batch (part of the run's configuration fingerprint).

    Attributes:
        methods: Method ids (``"all"`` expands to every registered method).
        layers: Layer names; empty: the model's default layer.
        options: Per-method options, ``{"gradcampp": {"alpha_normalize": True}}``.
        top_k: How many top classes each row lists (capped at the number of classes).
        average_drop: Compute the Average Drop / Increase-in-Confidence terms (one extra forward per map).
        overlays: Build overlay pictures of misclassified images.
        cmap: Matplotlib colour map of the overlays.
        alpha: Opacity of the map in overlays.
        overlay_format: ``"jpeg"`` (quality 90) or ``"png"`` (lossless, ~20x slower to write, ~8x larger).
    """

    methods: tuple[str, ...] = ("gradcam",)
    layers: tuple[str, ...] = ()
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    top_k: int = 5
    average_drop: bool = True
    overlays: bool = True
    cmap: str = "jet"
    alpha: float = 0.5
    overlay_format: str = "jpeg"

    def resolve(self, model: LoadedModel) -> RunSettings:
        """Method ids canonical, default layer filled in, options validated, ``top_k`` capped.

        Raises:
            MethodNotFoundError: Unknown method id.
            MethodError: Unknown option.
            RunError: Options for a method that is not run; ``top_k < 1``.
        """
        specs = resolve_methods(list(self.methods))
        ids = tuple(spec.id for spec in specs)
        options = {k.lower(): dict(v) for k, v in self.options.items()}
        extra = sorted(set(options) - set(ids))
        if extra:
            raise RunError(
                f"options were given for method(s) {extra} that this run does not use; add them to --method."
            )
        for spec in specs:
            spec.variant(options.get(spec.id))  # validates
        layers = tuple(dict.fromkeys(self.layers)) or (default_layer(model),)
        if self.top_k < 1:
            raise RunError(f"--top-k must be at least 1, got {self.top_k}.")
        if self.overlay_format not in ("jpeg", "png"):
            raise RunError(f"the overlay format must be 'jpeg' or 'png', got {self.overlay_format!r}.")
        if not 0.0 <= self.alpha <= 1.0:
            raise RunError(f"the overlay alpha must be in [0, 1], got {self.alpha}.")
        return replace(
            self,
            methods=ids,
            layers=layers,
            options={k: options[k] for k in ids if k in options},
            top_k=min(self.top_k, model.spec.num_classes),
        )

    def pairs(self) -> list[Pair]:
        """The (method, layer) pairs in result order (methods outer, layers inner); settings must be resolved."""
        specs = {spec.id: spec for spec in resolve_methods(list(self.methods))}
        out: list[Pair] = []
        keys: set[str] = set()
        for method in self.methods:
            spec = specs[method.lower()]
            for layer in self.layers:
                key = f"{_slug(spec.id)}@{_slug(layer)}"
                if key in keys:
                    key = f"{key}-{len(out)}"
                keys.add(key)
                out.append(Pair(spec.id, layer, spec.variant(self.options.get(spec.id)), key))
        return out

    def as_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (for ``run.json`` and the fingerprint)."""
        return {
            "methods": list(self.methods),
            "layers": list(self.layers),
            "options": {k: dict(v) for k, v in sorted(self.options.items())},
            "top_k": self.top_k,
            "average_drop": self.average_drop,
            "overlays": self.overlays,
            "cmap": self.cmap,
            "alpha": self.alpha,
            "overlay_format": self.overlay_format,
        }


@dataclass
class Picture:
    """An overlay picture of a misclassified image, before it is given a file name.

    The blend is computed when :meth:`render` is called (by the store's writer thread, off the model's path).

    Attributes:
        row: Position of the row in its batch.
        pair: Index of the (method, layer) pair, or None for the input image itself.
        which: ``"image"``, ``"pred"`` (predicted-class map) or ``"true"`` (true-class map).
        image: ``(H, W, 3)`` uint8 model-input image.
        map01: ``(H, W)`` map in ``[0, 1]`` drawn over it, or None for the plain image.
        cmap: Matplotlib colour map of the map (see :func:`cnnlens.imaging.colorize`).
        alpha: Opacity of the map.
    """

    row: int
    pair: int | None
    which: str
    image: np.ndarray
    map01: np.ndarray | None = None
    cmap: str = "jet"
    alpha: float = 0.5

    def render(self) -> np.ndarray:
        """The ``(H, W, 3)`` uint8 picture: the image, or the map blended over it."""
        if self.map01 is None:
            return self.image
        return overlay(self.image, self.map01, alpha=self.alpha, cmap=self.cmap)


@dataclass
class BatchResult:
    """What :func:`process_batch` returns.

    Attributes:
        rows: One dict per sample, in batch order (error rows included); file columns not yet filled.
        maps: Per pair: ``(n, 2, h, w)`` float32 raw maps (``[:, 0]`` predicted class, ``[:, 1]`` true class,
            zeros where not computed), or None when no image of the batch could be decoded.
        pictures: Overlays of misclassified images.
        staged: Set by the store once the pictures are named in the rows and written (or being written).
    """

    rows: list[dict[str, Any]]
    maps: list[np.ndarray | None]
    pictures: list[Picture]
    staged: bool = False


def row_columns(pairs: list[Pair]) -> list[str]:
    """Every column :func:`process_batch` fills, in order."""
    base = [
        "index",
        "path",
        "label",
        "label_name",
        "status",
        "error",
        "prediction",
        "prediction_name",
        "correct",
        "prob_prediction",
        "prob_label",
        "top_k_classes",
        "top_k_names",
        "top_k_probs",
        "box",
        "box_input",
    ]
    for pair in pairs:
        for name in PAIR_METRICS:
            base += [pair.col(f"{name}_pred"), pair.col(f"{name}_true")]
    return base


def _finite(value: float) -> float | None:
    """``value``, or None (null) when it is NaN or infinite: no NaN/inf reaches the results."""
    return value if math.isfinite(value) else None


def _box_list(box: Box | None) -> list[float] | None:
    return None if box is None else [float(v) for v in box]


def _name(names: list[str], index: int) -> str:
    return names[index] if 0 <= index < len(names) else str(index)


def process_batch(model: LoadedModel, batch: Batch, settings: RunSettings) -> BatchResult:
    """Explain one batch and compute its rows: the unit of work of a run, with no global state.

    Args:
        model: The loaded model (its module runs on its own device).
        batch: Decoded samples (:class:`~cnnlens.runs.decode.Batch`); failed ones become error rows.
        settings: Methods, layers and metrics (resolved with :meth:`RunSettings.resolve` if not yet).

    Returns:
        The :class:`BatchResult`.

    Example:
        >>> result = process_batch(model, batch, RunSettings(methods=("gradcam",)))  # doctest: +SKIP
        >>> result.rows[0]["prediction_name"], result.rows[0]["gradcam/layer4/avg_drop_pred"]  # doctest: +SKIP
        ('tabby', 0.31)
    """
    settings = settings.resolve(model)
    pairs = settings.pairs()
    names = model.class_names
    n = len(batch.samples)
    rows: list[dict[str, Any]] = []
    for i, sample in enumerate(batch.samples):
        row: dict[str, Any] = dict.fromkeys(row_columns(pairs))
        row.update(
            index=sample.index,
            path=sample.path,
            label=sample.label,
            label_name=_name(names, sample.label),
            status="ok" if batch.errors[i] is None else "error",
            error=batch.errors[i],
            box=list(sample.box) if sample.box is not None else None,
            box_input=_box_list(batch.boxes[i]) if batch.errors[i] is None else None,
        )
        rows.append(row)
    ok = batch.ok
    maps_out: list[np.ndarray | None] = [None] * len(pairs)
    pictures: list[Picture] = []
    if not ok:
        return BatchResult(rows, maps_out, pictures)
    x = batch.inputs
    labels = torch.tensor([batch.samples[i].label for i in ok], dtype=torch.long)
    targets: list[Target] = [RankTarget(0), ClassTarget(tuple(int(v) for v in labels.tolist()))]
    result = explain(
        model,
        x,
        methods=list(settings.methods),
        layers=list(settings.layers),
        targets=targets,
        options=settings.options,
    )
    if result.logits is None:  # pragma: no cover - explain always returns logits
        raise RunError("explain() returned no logits.")
    probs = probabilities(result.logits).cpu()
    pred = probs.argmax(dim=1)
    wrong = pred != labels
    top_p, top_i = torch.topk(probs, settings.top_k, dim=1)
    wrong_pos = wrong.nonzero().flatten()
    for j, i in enumerate(ok):
        p = int(pred[j])
        rows[i].update(
            prediction=p,
            prediction_name=_name(names, p),
            correct=not bool(wrong[j]),
            prob_prediction=float(probs[j, p]),
            prob_label=float(probs[j, int(labels[j])]),
            top_k_classes=[int(v) for v in top_i[j]],
            top_k_names=[_name(names, int(v)) for v in top_i[j]],
            top_k_probs=[float(v) for v in top_p[j]],
        )
    # Average Drop: one forward over every stored map (predicted-class maps, and true-class maps where wrong).
    drops: list[tuple[torch.Tensor, torch.Tensor]] = []
    if settings.average_drop:
        masked_maps, masked_x, classes, original = [], [], [], []
        for exp in result:
            maps = exp.maps.detach().cpu()
            masked_maps += [maps[:, 0], maps[wrong_pos, 1]]
            masked_x += [x, x[wrong_pos]]
            classes += [pred, labels[wrong_pos]]
            original += [probs.gather(1, pred.view(-1, 1)).squeeze(1), probs[wrong_pos, labels[wrong_pos]]]
        drop, increase = average_drop_terms(
            model.module,
            torch.cat(masked_x),
            torch.cat(masked_maps),
            torch.cat(classes),
            torch.cat(original),
            model.spec.preprocessing,
            chunk=max(1, len(ok)),
        )
        start = 0
        for size in (len(ok), int(wrong_pos.numel())) * len(pairs):
            drops.append((drop[start : start + size], increase[start : start + size]))
            start += size
    boxes: dict[int, Box] = {}
    for j, i in enumerate(ok):
        box = batch.boxes[i]
        if box is not None:
            boxes[j] = box
    boxed = list(boxes)
    boxed_wrong = [j for j in boxed if bool(wrong[j])]
    wrong_list = [int(v) for v in wrong_pos]
    wrong_rank = {j: k for k, j in enumerate(wrong_list)}
    images = None
    draw = settings.overlays and bool(wrong_list)
    for p_index, (pair, exp) in enumerate(zip(pairs, result, strict=True)):
        if (exp.method, exp.layer) != (pair.method, pair.layer):  # pragma: no cover - explain's documented order
            raise RunError(
                f"explain() returned ({exp.method}, {exp.layer}) where ({pair.method}, {pair.layer}) was due."
            )
        raw = exp.raw.detach().float().cpu()
        maps = exp.maps.detach().float().cpu()
        degenerate = exp.degenerate.detach().cpu()
        scores = exp.scores.detach().double().cpu()
        stored = np.zeros((n, 2, *raw.shape[2:]), dtype=np.float32)
        for j, i in enumerate(ok):
            stored[i, 0] = raw[j, 0].numpy()
            if bool(wrong[j]):
                stored[i, 1] = raw[j, 1].numpy()
        maps_out[p_index] = stored
        energy_pred, hit_pred = box_metrics(maps[boxed, 0], [boxes[j] for j in boxed])
        energy_true, hit_true = box_metrics(maps[boxed_wrong, 1], [boxes[j] for j in boxed_wrong])
        box_pred = {j: (float(energy_pred[k]), bool(hit_pred[k])) for k, j in enumerate(boxed)}
        box_true = {j: (float(energy_true[k]), bool(hit_true[k])) for k, j in enumerate(boxed_wrong)}
        for j, i in enumerate(ok):
            row = rows[i]
            row[pair.col("score_pred")] = _finite(float(scores[j, 0]))
            row[pair.col("degenerate_pred")] = bool(degenerate[j, 0])
            if settings.average_drop:
                d, inc = drops[2 * p_index]
                row[pair.col("avg_drop_pred")] = float(d[j])
                row[pair.col("increase_pred")] = bool(inc[j])
            if j in box_pred:
                row[pair.col("energy_in_box_pred")], row[pair.col("pointing_pred")] = box_pred[j]
            if bool(wrong[j]):
                row[pair.col("score_true")] = _finite(float(scores[j, 1]))
                row[pair.col("degenerate_true")] = bool(degenerate[j, 1])
                if settings.average_drop:
                    d, inc = drops[2 * p_index + 1]
                    k = wrong_rank[j]
                    row[pair.col("avg_drop_true")] = float(d[k])
                    row[pair.col("increase_true")] = bool(inc[k])
                if j in box_true:
                    row[pair.col("energy_in_box_true")], row[pair.col("pointing_true")] = box_true[j]
        if draw:
            if images is None and exp.images is not None:
                images = exp.images.cpu().numpy()
                pictures += [Picture(ok[j], None, "image", images[j].copy()) for j in wrong_list]
            if images is not None:
                for j in wrong_list:
                    for t, which in ((0, "pred"), (1, "true")):
                        heat = maps[j, t].numpy().copy()  # copies: a picture does not keep the batch's arrays alive
                        picture = Picture(ok[j], p_index, which, images[j].copy(), heat, settings.cmap, settings.alpha)
                        pictures.append(picture)
    return BatchResult(rows, maps_out, pictures)
