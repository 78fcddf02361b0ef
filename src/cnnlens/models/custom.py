"""A user's own model: a torchvision/timm architecture by name, or a Python factory (``file.py:factory``).

* ``--model resnet18 --num-classes 10 --weights ckpt.pt``: any torchvision builder or timm model name
  (``timm:``/``torchvision:`` prefixes choose the library), built without weights, then a checkpoint;
  preprocessing from the library's metadata; layers from :func:`cnnlens.models.layers.guess_layers`.
* ``--model package.module:factory`` or ``--model path/to/file.py:factory``: a callable returning an
  ``nn.Module`` (or a ready :class:`~cnnlens.models.LoadedModel`), called with ``num_classes=N`` when given.

Example:
    >>> is_entry_point("mypkg.nets:build"), is_entry_point("timm:resnet18"), is_entry_point("resnet50")
    (True, False, False)
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import math
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from torch import nn

from cnnlens.errors import ModelNotFoundError
from cnnlens.models.preprocessing import IMAGENET_224, Preprocessing
from cnnlens.models.registry import unknown_model

__all__ = [
    "architecture_preprocessing",
    "build_architecture",
    "import_factory",
    "infer_num_classes",
    "is_entry_point",
    "resolve_architecture",
]

_log = logging.getLogger(__name__)

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_DOTTED_RE = re.compile(rf"^{_IDENT}(\.{_IDENT})*$")
_LIBRARY_PREFIXES = {"timm", "torchvision", "keras"}  # library:architecture names, not factories

# ---------------------------------------------------------------------------------------------------------
# torchvision / timm architectures by name
# ---------------------------------------------------------------------------------------------------------


def _tv_names() -> list[str]:
    import torchvision.models as tvm

    return [str(n) for n in tvm.list_models(module=tvm)]


def _timm_names() -> list[str]:
    import timm

    return [str(n) for n in timm.list_models()]


def resolve_architecture(name: str) -> tuple[str, str]:
    """Map a non-zoo name to ``(library, architecture)``: torchvision first, then timm.

    Raises:
        ModelNotFoundError: Known to neither; the message suggests close zoo, torchvision and timm names.
    """
    raw = name.strip()
    source_hint: str | None = None
    for prefix in ("timm:", "torchvision:"):
        if raw.lower().startswith(prefix):
            source_hint, raw = prefix[:-1], raw[len(prefix) :]
    if source_hint in (None, "torchvision") and raw in _tv_names():
        return "torchvision", raw
    if source_hint in (None, "timm"):
        import timm

        if timm.is_model(raw):
            return "timm", raw
    raise unknown_model(
        name,
        others=_tv_names() + _timm_names(),
        extra=" torchvision builder names and timm model names are accepted too (with a checkpoint).",
    )


def build_architecture(source: str, arch: str, num_classes: int | None) -> nn.Module:
    """Build a torchvision/timm architecture without weights (``num_classes`` passed when given)."""
    kwargs: dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
    if source == "torchvision":
        import torchvision.models as tvm

        return cast(nn.Module, tvm.get_model(arch, weights=None, **kwargs))
    import timm

    return timm.create_model(arch, pretrained=False, **kwargs)


def architecture_preprocessing(source: str, arch: str, module: nn.Module) -> Preprocessing:
    """The preprocessing torchvision's weights metadata or timm's data config gives (else ImageNet 224/256)."""
    try:
        if source == "torchvision":
            import torchvision.models as tvm

            t = tvm.get_model_weights(arch).DEFAULT.transforms()
            crop = int(t.crop_size[0])
            resize = max(int(t.resize_size[0]), crop)
            interp = str(getattr(t.interpolation, "value", "bilinear"))
            mean, std = tuple(float(v) for v in t.mean), tuple(float(v) for v in t.std)
            size = (crop, crop)
        else:
            from timm.data.config import resolve_data_config

            cfg = resolve_data_config({}, model=module)
            _, h, w = cfg["input_size"]
            size = (int(h), int(w))
            resize = max(math.floor(max(size) / float(cfg.get("crop_pct", 0.875))), max(size))
            interp = str(cfg.get("interpolation", "bilinear"))
            mean, std = tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"])
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"{len(mean)}-channel statistics")
        return Preprocessing(
            input_size=size,
            resize=resize,
            mean=(mean[0], mean[1], mean[2]),
            std=(std[0], std[1], std[2]),
            interpolation=interp if interp in ("bilinear", "bicubic") else "bilinear",
        )
    except Exception as exc:  # any missing metadata: fall back to the classic ImageNet pipeline
        _log.info("no preprocessing metadata for %s %s (%s); using ImageNet 224/256", source, arch, exc)
        return IMAGENET_224


def infer_num_classes(module: nn.Module) -> int | None:
    """A module's number of outputs: its ``num_classes``, else its last ``Linear``, else its last ``Conv2d``."""
    value = getattr(module, "num_classes", None)
    if isinstance(value, int) and value > 0:
        return value
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if linears:
        return int(linears[-1].out_features)
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    return int(convs[-1].out_channels) if convs else None


# ---------------------------------------------------------------------------------------------------------
# Factories: package.module:factory and file.py:factory
# ---------------------------------------------------------------------------------------------------------


def is_entry_point(name: str) -> bool:
    """Whether ``name`` is ``package.module:factory`` or ``file.py:factory`` (not ``timm:resnet18``, ``keras:vgg16``).

    Example:
        >>> is_entry_point("mypkg.nets:build"), is_entry_point("timm:resnet18"), is_entry_point("resnet50")
        (True, False, False)
        >>> is_entry_point("keras:vgg16")
        False
    """
    left, sep, right = name.rpartition(":")
    if not sep or not _DOTTED_RE.match(right):
        return False
    if left.endswith(".py"):
        return True
    return bool(_DOTTED_RE.match(left)) and left.lower() not in _LIBRARY_PREFIXES


def import_factory(entry: str) -> Callable[..., Any]:
    """Import the callable ``entry`` names (``package.module:factory`` or ``file.py:factory``).

    Raises:
        ModelNotFoundError: No such file or module, no such attribute, or not a callable.
    """
    left, _, attr = entry.rpartition(":")
    if left.endswith(".py"):
        path = Path(left)
        if not path.is_file():
            raise ModelNotFoundError(f"model entry point {entry!r}: no such Python file {left!r}.")
        mod_name = f"_cnnlens_user_{hashlib.sha1(os.fspath(path.resolve()).encode()).hexdigest()[:12]}"
        spec = importlib.util.spec_from_file_location(mod_name, path)
        if spec is None or spec.loader is None:
            raise ModelNotFoundError(f"model entry point {entry!r}: {left!r} cannot be imported as a module.")
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module  # dataclasses and pickling look the module up by name
        try:
            spec.loader.exec_module(module)
        except Exception:
            sys.modules.pop(mod_name, None)
            raise
    else:
        try:
            module = importlib.import_module(left)
        except ModuleNotFoundError as exc:
            raise ModelNotFoundError(
                f"model entry point {entry!r}: cannot import {left!r} ({exc}). Install the package, add its folder "
                "to PYTHONPATH, or give a file: --model path/to/file.py:factory."
            ) from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            public = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
            raise ModelNotFoundError(
                f"model entry point {entry!r}: {left!r} has no attribute {attr!r}; its callables are "
                f"{', '.join(public[:12]) or 'none'}."
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelNotFoundError(f"model entry point {entry!r}: {attr!r} is a {type(obj).__name__}, not a callable.")
    return obj  # type: ignore[no-any-return]
