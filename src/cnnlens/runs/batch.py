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

``process_batch`` runs past ~80 lines only through its docstring (its code: 77 lines).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cnnlens import metrics
from cnnlens.execution import Execution
from cnnlens.explain import explain
from cnnlens.imaging import overlay
from cnnlens.models import LoadedModel
from cnnlens.runs.dataset import Box
from cnnlens.runs.decode import Batch
from cnnlens.runs.errors import RunError
from cnnlens.runs.settings import PAIR_METRICS, Pair, RunSettings, column
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


def _probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Softmax in float64; non-finite logits give zeros instead of NaN."""
    probs = torch.softmax(logits.detach().double(), dim=1)
    return torch.nan_to_num(probs, nan=0.0, posinf=1.0, neginf=0.0)


def _box_metrics(maps: torch.Tensor, boxes: list[Box]) -> tuple[torch.Tensor, torch.Tensor]:
    """Energy in the box and pointing-game hit per map (:mod:`cnnlens.metrics`, no pointing tolerance)."""
    if not boxes:
        return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.bool)
    given = [list(box) for box in boxes]
    energy = metrics.energy_in_box(maps, boxes=given).energy
    return energy, metrics.pointing_game(maps, boxes=given).hit


def process_batch(
    model: LoadedModel, batch: Batch, settings: RunSettings, *, execution: Execution | None = None
) -> BatchResult:
    """Explain one batch and compute its rows: the unit of work of a run, with no global state.

    Args:
        model: The loaded model (its module runs on its own device).
        batch: Decoded samples (:class:`~cnnlens.runs.decode.Batch`); failed ones become error rows.
        settings: Methods, layers and metrics (resolved with :meth:`RunSettings.resolve` if not yet).
        execution: How to run the capture and the Average Drop forwards (:class:`cnnlens.Execution`; None: the
            default). Not part of the settings: it never changes what a row means.

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
    rows = _base_rows(batch, pairs, names)
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
        execution=execution,
        layout=settings.layout,
    )
    if result.logits is None:  # pragma: no cover - explain always returns logits
        raise RunError("explain() returned no logits.")
    probs = _probabilities(result.logits).cpu()
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
    drops = _average_drops(model, x, result, pred, labels, wrong_pos, execution) if settings.average_drop else []
    boxes: dict[int, Box] = {}
    for j, i in enumerate(ok):
        box = batch.boxes[i]
        if box is not None:
            boxes[j] = box
    wrong_list = [int(v) for v in wrong_pos]
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
        pair_drops = (drops[2 * p_index], drops[2 * p_index + 1]) if settings.average_drop else None
        _fill_pair_columns([rows[i] for i in ok], pair, scores, degenerate, maps, wrong, pair_drops, boxes)
        if draw:
            if images is None and exp.images is not None:
                images = exp.images.cpu().numpy()
                pictures += [Picture(ok[j], None, "image", images[j].copy()) for j in wrong_list]
            if images is not None:
                pictures += _pair_pictures(images, maps, ok, wrong_list, p_index, settings)
    return BatchResult(rows, maps_out, pictures)


def _fill_pair_columns(
    rows: list[dict[str, Any]],
    pair: Pair,
    scores: torch.Tensor,
    degenerate: torch.Tensor,
    maps: torch.Tensor,
    wrong: torch.Tensor,
    drops: tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None,
    boxes: dict[int, Box],
) -> None:
    """Write one pair's columns into the rows of the explained images (``rows[j]`` is image ``j``).

    ``..._true`` columns only where the prediction is wrong; box columns only where the image has a box
    (:func:`cnnlens.metrics.energy_in_box`, :func:`cnnlens.metrics.pointing_game`); Average Drop terms when
    ``drops`` (predicted-class terms per image, true-class terms per misclassified image) is given.
    """
    boxed = list(boxes)
    boxed_wrong = [j for j in boxed if bool(wrong[j])]
    wrong_rank = {j: k for k, j in enumerate(int(v) for v in wrong.nonzero().flatten())}
    energy_pred, hit_pred = _box_metrics(maps[boxed, 0], [boxes[j] for j in boxed])
    energy_true, hit_true = _box_metrics(maps[boxed_wrong, 1], [boxes[j] for j in boxed_wrong])
    box_pred = {j: (float(energy_pred[k]), bool(hit_pred[k])) for k, j in enumerate(boxed)}
    box_true = {j: (float(energy_true[k]), bool(hit_true[k])) for k, j in enumerate(boxed_wrong)}
    for j, row in enumerate(rows):
        row[pair.col("score_pred")] = _finite(float(scores[j, 0]))
        row[pair.col("degenerate_pred")] = bool(degenerate[j, 0])
        if drops is not None:
            row[pair.col("avg_drop_pred")] = float(drops[0][0][j])
            row[pair.col("increase_pred")] = bool(drops[0][1][j])
        if j in box_pred:
            row[pair.col("energy_in_box_pred")], row[pair.col("pointing_pred")] = box_pred[j]
        if not bool(wrong[j]):
            continue
        row[pair.col("score_true")] = _finite(float(scores[j, 1]))
        row[pair.col("degenerate_true")] = bool(degenerate[j, 1])
        if drops is not None:
            row[pair.col("avg_drop_true")] = float(drops[1][0][wrong_rank[j]])
            row[pair.col("increase_true")] = bool(drops[1][1][wrong_rank[j]])
        if j in box_true:
            row[pair.col("energy_in_box_true")], row[pair.col("pointing_true")] = box_true[j]


def _base_rows(batch: Batch, pairs: list[Pair], names: list[str]) -> list[dict[str, Any]]:
    """One row per sample with its identity, status and box filled in, every other column None."""
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
    return rows


def _average_drops(
    model: LoadedModel,
    x: torch.Tensor,
    result: Any,
    pred: torch.Tensor,
    labels: torch.Tensor,
    wrong_pos: torch.Tensor,
    execution: Execution | None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Average Drop terms ``(drop, increase)`` of every stored map, two entries per pair (pred, true where wrong).

    :func:`cnnlens.metrics.average_drop` in pixel space with probabilities (the authors' protocol), in one call
    over the predicted-class maps and the true-class maps of misclassified images; ``Y`` comes from the logits
    explain() already computed, so the only forwards are those of the explanation images.
    """
    logits = result.logits.detach()
    masked_maps, masked_x, classes, known = [], [], [], []
    for exp in result:
        maps = exp.maps.detach()
        masked_maps += [maps[:, 0], maps[wrong_pos.to(maps.device), 1]]
        masked_x += [x, x[wrong_pos]]
        classes += [pred, labels[wrong_pos]]
        known += [logits, logits[wrong_pos.to(logits.device)]]
    measured = metrics.average_drop(
        model,
        torch.cat(masked_x),
        torch.cat([m.to(masked_maps[0].device) for m in masked_maps]),
        torch.cat(classes),
        space="pixel",
        options=metrics.MetricOptions(execution=execution),
        logits=torch.cat(known),
    )
    drop, increase = measured.drop.cpu(), measured.increase.cpu()
    drops, start = [], 0
    for size in (int(pred.numel()), int(wrong_pos.numel())) * (len(masked_maps) // 2):
        drops.append((drop[start : start + size], increase[start : start + size]))
        start += size
    return drops


def _pair_pictures(
    images: np.ndarray, maps: torch.Tensor, ok: list[int], wrong: list[int], p_index: int, settings: RunSettings
) -> list[Picture]:
    """Overlays of the predicted- and true-class maps of one pair over each misclassified image."""
    out = []
    for j in wrong:
        for t, which in ((0, "pred"), (1, "true")):
            heat = maps[j, t].numpy().copy()  # copies: a picture does not keep the batch's arrays alive
            out.append(Picture(ok[j], p_index, which, images[j].copy(), heat, settings.cmap, settings.alpha))
    return out
