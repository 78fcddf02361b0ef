"""The outcome of a run: counts, speed and per (method, layer) means of the stored metrics."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from cnnlens.runs.settings import Pair

__all__ = ["RunSummary", "pair_metrics"]


@dataclass
class RunSummary:
    """The outcome of a run (also written to ``summary.json``).

    Attributes:
        run_dir: The run folder.
        total: Images in the run.
        ok: Images decoded and explained.
        errors: Images that could not be read (error rows).
        correct: Correct predictions.
        accuracy: ``correct / ok``, or None when no image was explained.
        processed: Images processed by this session (0 when everything was done before).
        skipped: Images of shards committed by earlier sessions.
        elapsed_s: Wall time of this session (decoding, explaining, writing).
        images_per_s: ``processed / elapsed_s`` of this session (None when nothing was processed).
        compute_s: Wall time recorded by every session's shards.
        results: Path of ``results.parquet``.
        metrics: Per ``method/layer``: mean Average Drop % (predicted class), Increase in Confidence %,
            degenerate maps, and with boxes mean energy in box and pointing accuracy, correct vs wrong.
    """

    run_dir: str
    total: int
    ok: int
    errors: int
    correct: int
    accuracy: float | None
    processed: int
    skipped: int
    elapsed_s: float
    images_per_s: float | None
    compute_s: float
    results: str
    metrics: dict[str, dict[str, float | int | None]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return asdict(self)


def _mean(values: Sequence[float | None]) -> float | None:
    present = [float(v) for v in values if v is not None]
    return sum(present) / len(present) if present else None


def pair_metrics(table: Any, pairs: Sequence[Pair]) -> dict[str, dict[str, float | int | None]]:
    """Per ``method/layer``: the means :attr:`RunSummary.metrics` holds, from the results table."""
    correct = table.column("correct").to_pylist()
    out: dict[str, dict[str, float | int | None]] = {}
    for pair in pairs:
        drop = table.column(pair.col("avg_drop_pred")).to_pylist()
        inc = table.column(pair.col("increase_pred")).to_pylist()
        deg = table.column(pair.col("degenerate_pred")).to_pylist()
        energy = table.column(pair.col("energy_in_box_pred")).to_pylist()
        energy_true = table.column(pair.col("energy_in_box_true")).to_pylist()
        hit = table.column(pair.col("pointing_pred")).to_pylist()
        mean_drop = _mean(drop)
        mean_inc = _mean([None if v is None else float(v) for v in inc])
        entry: dict[str, float | int | None] = {
            "average_drop_pct": None if mean_drop is None else 100.0 * mean_drop,
            "increase_in_confidence_pct": None if mean_inc is None else 100.0 * mean_inc,
            "degenerate_pred": sum(1 for v in deg if v),
        }
        if any(v is not None for v in energy):
            ok_c = [e for e, c in zip(energy, correct, strict=True) if c is True]
            ok_w = [e for e, c in zip(energy, correct, strict=True) if c is False]
            hits = [None if h is None else float(h) for h in hit]
            entry.update(
                energy_in_box_correct=_mean(ok_c),
                energy_in_box_wrong=_mean(ok_w),
                energy_in_box_true_class_wrong=_mean(energy_true),
                pointing_accuracy=_mean(hits),
            )
        out[f"{pair.method}/{pair.layer}"] = entry
    return out
