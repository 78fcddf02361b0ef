"""The model of a run: a zoo/torchvision/timm architecture with a checkpoint, or a user's Python factory.

``--model`` accepts, besides everything :func:`cnnlens.models.load_model` accepts (zoo names,
torchvision/timm architecture names with ``--num-classes`` and ``--weights``):

* ``package.module:factory`` - an importable module and a callable in it;
* ``path/to/file.py:factory`` - a Python file and a callable in it.

The factory is called without arguments, or with ``num_classes=N`` when ``--num-classes`` is given. It
returns an ``nn.Module`` (the usual case) or a ready :class:`~cnnlens.models.LoadedModel`. A checkpoint
(``--weights``) is then loaded into the module with ``torch.load(weights_only=True)``
(:func:`cnnlens.models.load_checkpoint`), so the factory only has to build the architecture.

Preprocessing: zoo models bring their own; ``input_size``, ``resize``, ``mean`` and ``std`` override it for
any model (a CIFAR-style ``--input-size 32`` checkpoint of a torchvision architecture, say). A factory
module without a LoadedModel needs at least ``input_size``; mean/std default to ImageNet's.

Example:
    >>> lm = load_run_model("mypkg.nets:small_cnn", weights="ckpt.pt", input_size=(32, 32),
    ...                     mean=(0.5,) * 3, std=(0.5,) * 3, class_names="classes.txt")  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnlens.errors import ModelConfigError, ModelNotFoundError
from cnnlens.models import LoadedModel, ModelSpec, Preprocessing, load_checkpoint, load_model
from cnnlens.models.classes import resolve_class_names
from cnnlens.models.layers import guess_layers
from cnnlens.models.preprocessing import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["file_sha256", "is_entry_point", "load_run_model", "override_preprocessing"]

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_MODULE_RE = re.compile(rf"^{_IDENT}(\.{_IDENT})*$")
_ATTR_RE = re.compile(rf"^{_IDENT}(\.{_IDENT})*$")
_LIBRARY_PREFIXES = {"timm", "torchvision"}


def is_entry_point(name: str) -> bool:
    """Whether ``name`` is ``package.module:factory`` or ``file.py:factory`` (not ``timm:resnet18``).

    Example:
        >>> is_entry_point("mypkg.nets:build"), is_entry_point("timm:resnet18"), is_entry_point("resnet50")
        (True, False, False)
    """
    left, sep, right = name.rpartition(":")
    if not sep or not _ATTR_RE.match(right):
        return False
    if left.endswith(".py"):
        return True
    return bool(_MODULE_RE.match(left)) and left.lower() not in _LIBRARY_PREFIXES


def _import_factory(entry: str) -> Callable[..., Any]:
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


def _infer_num_classes(module: nn.Module) -> int | None:
    value = getattr(module, "num_classes", None)
    if isinstance(value, int) and value > 0:
        return value
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if linears:
        return int(linears[-1].out_features)
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    return int(convs[-1].out_channels) if convs else None


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The sha256 of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def override_preprocessing(
    base: Preprocessing | None,
    *,
    input_size: Sequence[int] | None = None,
    resize: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Preprocessing:
    """``base`` with the given fields replaced (``resize`` defaults to the larger input side when changed).

    Raises:
        ModelConfigError: No base and no ``input_size``; malformed sizes or statistics.

    Example:
        >>> override_preprocessing(None, input_size=[32], mean=[0.5] * 3, std=[0.5] * 3).resize
        32
    """
    if input_size is not None:
        sizes = [int(s) for s in input_size]
        if len(sizes) not in (1, 2) or min(sizes) < 1:
            raise ModelConfigError(f"--input-size takes one or two positive ints (H [W]); got {list(input_size)}.")
        size = (sizes[0], sizes[-1])
    elif base is not None:
        size = base.input_size
    else:
        raise ModelConfigError(
            "a model from a factory needs its input size: pass --input-size H [W] (and --mean/--std if it was "
            "not trained with ImageNet statistics), or return a cnnlens LoadedModel from the factory."
        )
    if resize is None:
        resize = base.resize if base is not None and input_size is None else max(size)
    triples: list[tuple[float, float, float]] = []
    for label, given, default in (
        ("mean", mean, base.mean if base else IMAGENET_MEAN),
        ("std", std, base.std if base else IMAGENET_STD),
    ):
        values = [float(v) for v in given] if given is not None else list(default)
        if len(values) == 1:
            values = values * 3
        if len(values) != 3:
            raise ModelConfigError(f"--{label} takes one or three numbers (R G B); got {values}.")
        triples.append((values[0], values[1], values[2]))
    return Preprocessing(
        input_size=size,
        resize=int(resize),
        mean=triples[0],
        std=triples[1],
        interpolation=base.interpolation if base is not None else "bilinear",
    )


def load_run_model(
    name: str,
    *,
    weights: str | os.PathLike[str] | None = None,
    random_weights: bool = False,
    download: bool = False,
    num_classes: int | None = None,
    class_names: Sequence[str] | str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    input_size: Sequence[int] | None = None,
    resize: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> LoadedModel:
    """Load the model of a run: a zoo/torchvision/timm name (see :func:`cnnlens.models.load_model`) or a factory.

    Args:
        name: A zoo name, a torchvision/timm architecture, ``package.module:factory`` or ``file.py:factory``.
        weights: A checkpoint (state dict) read with ``weights_only=True``.
        random_weights: Seeded random weights (zoo/architecture names only).
        download: Allow fetching a zoo model's published weights.
        num_classes: Number of outputs (passed to a factory as ``num_classes=`` when given).
        class_names: Names, or a ``.txt``/``.json`` file, in output order.
        device: Where the module goes.
        input_size: ``(H, W)`` or ``(S,)`` model input, overriding the preprocessing.
        resize: Shorter side before the center crop (default: the larger input side when ``input_size`` is set).
        mean: Per-channel normalisation mean (1 or 3 values).
        std: Per-channel normalisation std (1 or 3 values).

    Returns:
        The :class:`LoadedModel`, module in eval mode on ``device``.

    Raises:
        ModelNotFoundError: Unknown name, or an entry point that cannot be imported.
        ModelConfigError: Conflicting options; a factory that returns neither a module nor a LoadedModel.
        WeightsUnavailableError: A missing checkpoint, or no published weights offline.
        WeightsMismatchError: A checkpoint that does not fit.
    """
    overriding = any(v is not None for v in (input_size, resize, mean, std))

    def prep_from(base: Preprocessing | None) -> Preprocessing:
        return override_preprocessing(base, input_size=input_size, resize=resize, mean=mean, std=std)

    if not is_entry_point(name):
        loaded = load_model(
            name,
            weights=weights,
            random_weights=random_weights,
            download=download,
            num_classes=num_classes,
            class_names=class_names,
            device=device,
        )
        if overriding:
            loaded = replace(loaded, spec=replace(loaded.spec, preprocessing=prep_from(loaded.spec.preprocessing)))
        return loaded
    if random_weights or download:
        raise ModelConfigError(
            f"--random-weights and --download apply to zoo and architecture names, not to the factory {name!r}; "
            "build the weights in the factory or pass --weights PATH."
        )
    factory = _import_factory(name)
    kwargs: dict[str, Any] = {}
    if num_classes is not None:
        try:
            accepts = "num_classes" in inspect.signature(factory).parameters
        except (TypeError, ValueError):
            accepts = True
        if not accepts:
            raise ModelConfigError(
                f"--num-classes was given but the factory {name!r} takes no num_classes argument; drop "
                "--num-classes or add the parameter."
            )
        kwargs["num_classes"] = num_classes
    built = factory(**kwargs)
    if isinstance(built, LoadedModel):
        loaded = built
        if weights is not None:
            load_checkpoint(loaded.module, weights)
            loaded = replace(loaded, weights_source=f"checkpoint {Path(os.fspath(weights)).resolve()}")
        if class_names is not None:
            loaded = replace(loaded, class_names=resolve_class_names(class_names, loaded.spec.num_classes))
        if overriding:
            loaded = replace(loaded, spec=replace(loaded.spec, preprocessing=prep_from(loaded.spec.preprocessing)))
        loaded.module.to(device).eval()
        return loaded
    if not isinstance(built, nn.Module):
        raise ModelConfigError(
            f"the factory {name!r} returned {type(built).__name__}; it must return a torch.nn.Module (or a "
            "cnnlens LoadedModel)."
        )
    if weights is not None:
        load_checkpoint(built, weights)
        source = f"checkpoint {Path(os.fspath(weights)).resolve()}"
    else:
        source = f"factory {name} (its own initialisation)"
    n = num_classes if num_classes is not None else _infer_num_classes(built)
    if n is None:
        raise ModelConfigError(f"cannot tell how many classes {name!r} has; pass --num-classes N.")
    names = resolve_class_names(class_names, n)
    default, known = guess_layers(built)
    spec = ModelSpec(
        name=name,
        family="custom",
        source="entry point",
        preprocessing=prep_from(None),
        num_classes=n,
        default_layer=default,
        known_layers=known,
        description=f"User model built by {name} with {n} classes.",
    )
    return LoadedModel(
        module=built.to(device).eval(),
        spec=spec,
        class_names=names,
        weights_source=source,
        random_weights=False,
    )
