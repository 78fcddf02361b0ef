"""How results are shown to a person: what a method's map is about, readable provenance, no machine paths.

Shared by the files :meth:`cnnlens.explanation.ExplanationSet.write_files` writes and by the HTML reports, so a
PNG, its caption and its report agree. Pure text and the method registry: no numpy, no matplotlib.

- :func:`method_traits`: whether a method's map belongs to a layer or to the input pixels (saliency, guided
  backprop, Integrated Gradients... are computed at the input: the layer they were listed under plays no
  part), whether it depends on the target class (Eigen-CAM does not), and which colour map suits it.
- :func:`public_path` / :func:`scrub_paths`: absolute paths become the path relative to the working folder,
  the path inside an installed package, ``~/...``, or the file name: reports and PNG metadata never carry the
  machine's folder layout.
- :func:`describe_preprocessing`: ``resize 256 (bicubic), centre crop 224x224, mean 0.5 0.5 0.5, std ...``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "CAM_CMAP",
    "SPARSE_CMAP",
    "MethodTraits",
    "describe_preprocessing",
    "method_traits",
    "public_path",
    "scrub_paths",
    "variant_options",
]

CAM_CMAP = "jet"
"""Default colour map of class-activation maps (smooth, dense maps)."""

SPARSE_CMAP = "inferno"
"""Colour map of gradient attributions: sparse pixel maps, drawn over the photo weighted by their value."""


@dataclass(frozen=True)
class MethodTraits:
    """What a method's map is about, for captions and colour maps.

    Attributes:
        input_level: The map is computed at the input pixels and does not depend on the layer it was listed
            under (saliency, input x gradient, guided backprop, deconvnet, Integrated Gradients, SmoothGrad).
        class_independent: The map does not depend on the explained class (Eigen-CAM: the first principal
            component of the activations), so one map per image and layer says everything.
        sparse: A pixel attribution (displayed ``abs``/``signed``): sparse maps, drawn with
            :data:`SPARSE_CMAP` and weighted by value instead of a full-opacity ``jet`` overlay.
    """

    input_level: bool = False
    class_independent: bool = False
    sparse: bool = False


def method_traits(method: str) -> MethodTraits:
    """The :class:`MethodTraits` of a registered method id (an unknown id: a layer-level CAM).

    Read from the registry: a method that needs no layer activations or layer gradients and has a pixel display
    rule is input-level; a method that needs only the layer's activations cannot see the class.

    Example:
        >>> method_traits("saliency").input_level, method_traits("eigencam").class_independent
        (True, True)
        >>> method_traits("gradcam")
        MethodTraits(input_level=False, class_independent=False, sparse=False)
    """
    from cnnlens.methods.registry import get_method  # the registry imports torch: only when asked

    try:
        spec = get_method(method)
    except KeyError:
        return MethodTraits()
    scope = getattr(spec, "scope", None)
    layered = bool({"activations", "gradients"} & set(spec.needs))
    input_level = scope in ("input", "network") if scope is not None else (spec.display is not None and not layered)
    return MethodTraits(
        input_level=input_level,
        class_independent=set(spec.needs) == {"activations"},
        sparse=spec.display is not None,
    )


def variant_options(method: str, variant: Mapping[str, Any]) -> dict[str, Any]:
    """The options of a result's variant that differ from the method's defaults (what ``--option`` changed).

    Example:
        >>> variant_options("gradcampp", {"alpha_normalize": True, "relu": True})
        {'alpha_normalize': True}
    """
    from cnnlens.methods.registry import get_method

    try:
        defaults = get_method(method).variant()
    except KeyError:
        return dict(variant)
    return {k: v for k, v in variant.items() if k not in defaults or defaults[k] != v}


_SITE = re.compile(r"[/\\](?:site|dist)-packages[/\\]")
_ABSOLUTE = re.compile(r"(?<![\w.~])(?:[A-Za-z]:\\|/)(?:[^\s()\[\]{}'\"<>,;]+)")


def public_path(path: str | os.PathLike[str], base: str | os.PathLike[str] | None = None) -> str:
    """A path fit to show in a report: never the machine's absolute folders.

    Relative to ``base`` (default: the working folder) when inside it; inside an installed package, the path
    from the package folder on; under the home folder, ``~/...``; otherwise ``.../NAME``. Relative paths are
    returned unchanged.

    Example:
        >>> public_path("/opt/venv/lib/python3.11/site-packages/pkg/models/w.pth")
        'pkg/models/w.pth'
        >>> public_path("/data/models/w.pth", base="/data")
        'models/w.pth'
    """
    text = os.fspath(path)
    p = Path(text)
    if not p.is_absolute():
        return text
    site = _SITE.search(text)
    if site:
        return text[site.end() :].replace("\\", "/")
    root = Path(base) if base is not None else Path.cwd()
    for anchor, prefix in ((root, ""), (Path.home(), "~/")):
        try:
            rel = p.relative_to(anchor)
        except ValueError:
            continue
        return prefix + (rel.as_posix() if rel.parts else ".")
    return f".../{p.name}" if p.name else "..."


def scrub_paths(value: Any, base: str | os.PathLike[str] | None = None) -> Any:
    """Replace every absolute path inside a string (or, recursively, a JSON-like value) by :func:`public_path`.

    Example:
        >>> scrub_paths("package x 0.1 (/opt/venv/lib/python3.11/site-packages/x/w.pth)")
        'package x 0.1 (x/w.pth)'
    """
    if isinstance(value, str):
        return _ABSOLUTE.sub(lambda m: public_path(m.group(0), base), value)
    if isinstance(value, Mapping):
        return {k: scrub_paths(v, base) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrub_paths(v, base) for v in value]
    return value


def _numbers(values: Any) -> str:
    if isinstance(values, (list, tuple)):
        return " ".join(f"{float(v):g}" for v in values)
    return str(values)


def describe_preprocessing(prep: Mapping[str, Any] | None) -> str:
    """A model's preprocessing (its manifest form) as one readable line.

    Example:
        >>> describe_preprocessing({"input_size": [224, 224], "resize": 256, "mean": [0.5, 0.5, 0.5],
        ...                         "std": [0.5, 0.5, 0.5], "interpolation": "bicubic", "crop": "center"})
        'resize shorter side to 256 (bicubic), centre crop 224x224, mean 0.5 0.5 0.5, std 0.5 0.5 0.5'
    """
    if not prep:
        return ""
    if not isinstance(prep, Mapping):
        return str(prep)
    parts: list[str] = []
    size = prep.get("input_size")
    resize = prep.get("resize")
    interpolation = prep.get("interpolation")
    if resize is not None:
        parts.append(f"resize shorter side to {resize}" + (f" ({interpolation})" if interpolation else ""))
    if size is not None:
        dims = "x".join(str(int(v)) for v in size) if isinstance(size, (list, tuple)) else str(size)
        crop = prep.get("crop", "center")
        parts.append(f"centre crop {dims}" if crop in ("center", "centre") else f"{crop} crop {dims}")
    if "mean" in prep:
        parts.append(f"mean {_numbers(prep['mean'])}")
    if "std" in prep:
        parts.append(f"std {_numbers(prep['std'])}")
    known = {"input_size", "resize", "interpolation", "crop", "mean", "std"}
    parts.extend(f"{k} {_numbers(v)}" for k, v in prep.items() if k not in known)
    return ", ".join(parts)
