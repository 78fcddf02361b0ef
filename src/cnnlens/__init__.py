"""cnnlens: see how a convolutional network works and why it decided what it decided.

Quick use::

    import cnnlens
    model = cnnlens.load_model("efficientnet_lite0")          # embedded ImageNet weights, offline
    x = model.spec.preprocessing.to_tensor(image)[None]
    result = cnnlens.explain(model, x, methods=["gradcam", "gradcampp"])
    result.save("out/")

The public names are imported on first use (a module ``__getattr__``), so ``import cnnlens`` and the
``cnnlens --help``/``--version`` commands do not import torch.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from cnnlens._names import __version__
from cnnlens.index_hook import set_index_writer

if TYPE_CHECKING:  # the names below, for type checkers and IDEs; at run time they load lazily
    import os
    from pathlib import Path

    from cnnlens.capture import Capture, Recording, capture, record, resolve_layer
    from cnnlens.errors import CnnlensError
    from cnnlens.execution import Execution
    from cnnlens.explain import default_layer, explain
    from cnnlens.explanation import Explanation, ExplanationSet
    from cnnlens.inputs import ModelInputs
    from cnnlens.methods import CnnlensWarning, get_method, method_ids, register
    from cnnlens.models import LoadedModel, available_models, load_model
    from cnnlens.targets import (
        ClassTarget,
        ContrastiveTarget,
        FunctionTarget,
        LabelTarget,
        MultiLabelTarget,
        RankTarget,
        RegionTarget,
        SegmentationTarget,
        resolve_targets,
    )

_LAZY: dict[str, str] = {
    "Capture": "cnnlens.capture",
    "Recording": "cnnlens.capture",
    "capture": "cnnlens.capture",
    "record": "cnnlens.capture",
    "resolve_layer": "cnnlens.capture",
    "CnnlensError": "cnnlens.errors",
    "Execution": "cnnlens.execution",
    "default_layer": "cnnlens.explain",
    "explain": "cnnlens.explain",
    "Explanation": "cnnlens.explanation",
    "ExplanationSet": "cnnlens.explanation",
    "CnnlensWarning": "cnnlens.methods",
    "get_method": "cnnlens.methods",
    "method_ids": "cnnlens.methods",
    "register": "cnnlens.methods",
    "LoadedModel": "cnnlens.models",
    "available_models": "cnnlens.models",
    "load_model": "cnnlens.models",
    "ModelInputs": "cnnlens.inputs",
    "ClassTarget": "cnnlens.targets",
    "ContrastiveTarget": "cnnlens.targets",
    "FunctionTarget": "cnnlens.targets",
    "LabelTarget": "cnnlens.targets",
    "MultiLabelTarget": "cnnlens.targets",
    "RankTarget": "cnnlens.targets",
    "RegionTarget": "cnnlens.targets",
    "SegmentationTarget": "cnnlens.targets",
    "resolve_targets": "cnnlens.targets",
}

__all__ = [
    "Capture",
    "ClassTarget",
    "CnnlensError",
    "CnnlensWarning",
    "ContrastiveTarget",
    "Execution",
    "Explanation",
    "ExplanationSet",
    "FunctionTarget",
    "LabelTarget",
    "LoadedModel",
    "ModelInputs",
    "MultiLabelTarget",
    "RankTarget",
    "Recording",
    "RegionTarget",
    "SegmentationTarget",
    "__version__",
    "available_models",
    "capture",
    "default_layer",
    "explain",
    "get_method",
    "load_model",
    "method_ids",
    "record",
    "register",
    "resolve_layer",
    "resolve_targets",
]


def __getattr__(name: str) -> Any:
    """Import a public name on first use (PEP 562) and cache it in the package namespace."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cnnlens' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """The package module: ``cnnlens.explain`` and ``cnnlens.capture`` stay the functions.

    Importing the submodule ``cnnlens.explain`` (or ``cnnlens.capture``) binds it as an attribute of the
    package; the eager ``from cnnlens.explain import explain`` this package used to run overwrote that
    binding with the function. Keep that meaning: the submodule is replaced by its function of the same name.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _SAME_NAME and isinstance(value, types.ModuleType):
            value = getattr(value, name)
        super().__setattr__(name, value)


_SAME_NAME = frozenset({"capture", "explain"})
sys.modules[__name__].__class__ = _Package


def _render_explain_index(directory: str | os.PathLike[str], *, title: str, subtitle: str) -> Path:
    """:func:`cnnlens.report.render_explain_report`, imported (with jinja2) when an index is first written."""
    from cnnlens.report import render_explain_report

    return render_explain_report(directory, title=title, subtitle=subtitle)


# ``ExplanationSet.save`` writes its index through this hook: the core never imports the report layer.
set_index_writer(_render_explain_index)
