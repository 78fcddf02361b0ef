"""Reading a finished run back: rows from ``results.parquet``, maps from the array store.

Example:
    >>> res = open_results("runs/cifar")  # doctest: +SKIP
    >>> res.table.num_rows, res.pairs[0].method  # doctest: +SKIP
    (10000, 'gradcam')
    >>> pred_map, true_map = res.maps(17)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnnlens.runs.batch import Pair
from cnnlens.runs.errors import RunConfigError
from cnnlens.runs.store import derive_maps

__all__ = ["RunResults", "open_results"]


@dataclass
class RunResults:
    """A finished run: its rows (a pyarrow Table), its (method, layer) pairs, class names and map store.

    Attributes:
        root: The run folder.
        table: ``results.parquet`` as a ``pyarrow.Table`` (``table.to_pandas()`` where pandas is installed).
        pairs: The (method, layer) pairs.
        class_names: The model's class names.
        input_size: ``(H, W)`` of the model input (the size of derived maps).
        config: ``run.json``.
    """

    root: Path
    table: Any
    pairs: list[Pair]
    class_names: list[str]
    input_size: tuple[int, int]
    config: dict[str, Any]

    def _pair(self, method: str | None, layer: str | None) -> Pair:
        for pair in self.pairs:
            if (method is None or pair.method == method) and (layer is None or pair.layer == layer):
                return pair
        have = ", ".join(f"{p.method}/{p.layer}" for p in self.pairs)
        raise KeyError(f"this run has no maps for method={method!r}, layer={layer!r}; it has {have}.")

    def row(self, index: int) -> dict[str, Any]:
        """The row of dataset index ``index`` (rows are sorted by index)."""
        if not 0 <= index < self.table.num_rows:
            raise IndexError(f"index {index} out of range: the run has {self.table.num_rows} rows.")
        row: dict[str, Any] = self.table.slice(index, 1).to_pylist()[0]
        return row

    def raw_maps(self, index: int, method: str | None = None, layer: str | None = None) -> np.ndarray | None:
        """The stored raw maps ``(2, h, w)`` of a row ([0] predicted class, [1] true class or zeros); None on errors."""
        pair = self._pair(method, layer)
        row = self.row(index)
        rel = row.get(pair.col("maps_file"))
        if not rel:
            return None
        raw: np.ndarray = np.load(self.root / rel, mmap_mode="r", allow_pickle=False)[int(row["maps_row"])]
        return np.array(raw)

    def maps(
        self, index: int, method: str | None = None, layer: str | None = None
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The ``[0, 1]`` maps at input resolution of a row: ``(predicted-class map, true-class map or None)``.

        Derived from the raw maps exactly as :func:`cnnlens.explain` derives ``Explanation.maps``. Both are None
        on an error row; the true-class map is None where the prediction is right.
        """
        pair = self._pair(method, layer)
        raw = self.raw_maps(index, pair.method, pair.layer)
        if raw is None:
            return None, None
        maps, _ = derive_maps(torch.from_numpy(raw), pair.variant, self.input_size)
        correct = bool(self.row(index)["correct"])
        return maps[0].numpy(), None if correct else maps[1].numpy()


def open_results(run_dir: str | os.PathLike[str]) -> RunResults:
    """Open a finished run folder.

    Raises:
        RunConfigError: Not a run folder, or the run has not finished (no ``results.parquet``).
    """
    import pyarrow.parquet as pq

    root = Path(run_dir)
    if not (root / "run.json").is_file():
        raise RunConfigError(f"{str(root)!r} is not a cnnlens run folder (no run.json).")
    if not (root / "results.parquet").is_file():
        raise RunConfigError(f"{str(root)!r} has no results.parquet yet; run the same `cnnlens run` again to finish.")
    config = json.loads((root / "run.json").read_text("utf-8"))
    pairs = [Pair(p["method"], p["layer"], p.get("variant", {}), p["key"]) for p in config.get("pairs", [])]
    size = [int(v) for v in config.get("input_size", [224, 224])]
    return RunResults(
        root=root,
        table=pq.read_table(root / "results.parquet"),
        pairs=pairs,
        class_names=list(config.get("class_names", [])),
        input_size=(size[0], size[-1]),
        config=config,
    )
