"""Dataset runs and error analysis: explain every image of a labelled dataset, resumably; report the mistakes.

Pieces, bottom to top:

* :func:`read_dataset`: an image-folder tree or a CSV/Parquet table (``path,label[,x0,y0,x1,y1]``).
* :func:`load_run_model`: zoo/torchvision/timm models with a checkpoint, or ``package.module:factory``.
* :func:`process_batch`: the per-batch work, ``(model, batch, settings) -> BatchResult``, free of global state.
* :class:`DatasetRun` / :func:`run_dataset`: sharded, atomic, resumable runs with worker decoding.
* The HTML error-analysis report is drawn by the report layer: :func:`cnnlens.report.render_run_report`.
* :func:`open_results`: read a run back (rows, maps).

Example:
    >>> from cnnlens.runs import RunSettings, load_run_model, read_dataset, run_dataset
    >>> from cnnlens.report import render_run_report
    >>> model = load_run_model("resnet18", num_classes=10, weights="cifar.pt", input_size=[32],
    ...                        class_names="classes.txt")  # doctest: +SKIP
    >>> data = read_dataset("cifar10/test", model.class_names)  # doctest: +SKIP
    >>> summary = run_dataset("runs/cifar", data, model, RunSettings(methods=("gradcam",)))  # doctest: +SKIP
    >>> render_run_report("runs/cifar")  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load on first use (no torch for --help)
    from cnnlens.runs.batch import BatchResult, Pair, Picture, RunSettings, column, process_batch
    from cnnlens.runs.dataset import Dataset, Sample, read_dataset, resolve_label
    from cnnlens.runs.decode import Batch, collate, decode_sample
    from cnnlens.runs.errors import DatasetError, RunConfigError, RunError
    from cnnlens.runs.model import is_entry_point, load_run_model
    from cnnlens.runs.results import RunResults, open_results
    from cnnlens.runs.runner import DatasetRun, RunSummary, run_dataset
    from cnnlens.runs.store import derive_maps

_LAZY: dict[str, str] = {
    **dict.fromkeys(("BatchResult", "Pair", "Picture", "RunSettings", "column", "process_batch"), "batch"),
    **dict.fromkeys(("Dataset", "Sample", "read_dataset", "resolve_label"), "dataset"),
    **dict.fromkeys(("Batch", "collate", "decode_sample"), "decode"),
    **dict.fromkeys(("DatasetError", "RunConfigError", "RunError"), "errors"),
    **dict.fromkeys(("is_entry_point", "load_run_model"), "model"),
    **dict.fromkeys(("RunResults", "open_results"), "results"),
    **dict.fromkeys(("DatasetRun", "RunSummary", "run_dataset"), "runner"),
    "derive_maps": "store",
}


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use (``python -m cnnlens.runs --help`` imports no torch)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cnnlens.runs' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"cnnlens.runs.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "Batch",
    "BatchResult",
    "Dataset",
    "DatasetError",
    "DatasetRun",
    "Pair",
    "Picture",
    "RunConfigError",
    "RunError",
    "RunResults",
    "RunSettings",
    "RunSummary",
    "Sample",
    "collate",
    "column",
    "decode_sample",
    "derive_maps",
    "is_entry_point",
    "load_run_model",
    "open_results",
    "process_batch",
    "read_dataset",
    "resolve_label",
    "run_dataset",
]
