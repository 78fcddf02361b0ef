"""The one model loader: :func:`load_model`, used by the API, the CLI, the studies and the dataset runs.

It accepts a zoo name (:mod:`cnnlens.models.zoo`), a torchvision/timm architecture name, or a factory
(``package.module:factory``, ``file.py:factory``; see :mod:`cnnlens.models.custom`). Weights, in order: a
checkpoint path (``weights=``) always wins; else ``random_weights=True`` builds a seeded random model that is
flagged everywhere; else the zoo's published weights, from the bundled package or the local cache (no network
call is ever made to check it), fetched only when ``download=True``. Offline without weights, loading fails
with :class:`~cnnlens.errors.WeightsUnavailableError` saying how to fix it; cnnlens never silently falls back
to random weights. ``input_size``/``resize``/``mean``/``std`` override any model's preprocessing.

Length: :func:`load_model` spans about 105 lines, of which about 60 are its signature and the docstring of
its 13 parameters; its body is about 40 lines (the zoo, architecture and factory paths are helpers).

Example:
    >>> from cnnlens.models import load_model
    >>> lm = load_model("efficientnet_lite0")  # doctest: +SKIP
    >>> x = lm.spec.preprocessing.to_tensor(image)[None]  # doctest: +SKIP
    >>> lm.class_names[int(lm.module(x).argmax())]  # doctest: +SKIP
    'Egyptian cat'
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cnnlens._names import is_keras_name
from cnnlens.errors import ModelConfigError, WeightsUnavailableError
from cnnlens.models.checkpoints import load_checkpoint, load_state_dict_checked, read_state_dict
from cnnlens.models.classes import resolve_class_names
from cnnlens.models.custom import (
    architecture_preprocessing,
    build_architecture,
    import_factory,
    infer_num_classes,
    is_entry_point,
    resolve_architecture,
)
from cnnlens.models.layers import guess_layers
from cnnlens.models.preprocessing import Preprocessing, override_preprocessing
from cnnlens.models.registry import ZooEntry, available_models, zoo_entry
from cnnlens.models.spec import RANDOM_WEIGHTS_TEMPLATE, LoadedModel, LoadMode, ModelSpec

__all__ = ["load_model", "weights_status"]

_log = logging.getLogger(__name__)


def weights_status(name: str) -> tuple[bool, str]:
    """Tell whether a model's published weights are available offline here, without any network access.

    Args:
        name: a zoo name, or a torchvision/timm architecture name.

    Returns:
        ``(available, explanation)``. Custom architectures have no published weights in cnnlens:
        ``(False, ...)`` saying to pass a checkpoint.

    Raises:
        ModelNotFoundError: the name is unknown everywhere.

    Example:
        >>> weights_status("efficientnet_lite0")[0]  # doctest: +SKIP
        True
    """
    entry = zoo_entry(name)
    if entry is not None:
        return entry.weights.status()
    source, arch = resolve_architecture(name)
    return False, (
        f"{source} architecture {arch!r}: cnnlens uses no published weights for it; pass --weights PATH "
        "(a state dict saved with torch.save) or --random-weights"
    )


def _seeded(seed: int, fn: Callable[[], nn.Module]) -> nn.Module:
    """Run ``fn`` with the CPU RNG seeded, leaving the caller's global RNG state untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn()


def _check_options(
    weights: str | os.PathLike[str] | None, random_weights: bool, download: bool, num_classes: int | None
) -> None:
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        raise ModelConfigError(f"num_classes must be a positive int; received {num_classes!r}.")
    if weights is not None and random_weights:
        raise ModelConfigError(
            f"Both a checkpoint (weights={os.fspath(weights)!r}) and random_weights=True were given; "
            "choose one: --weights PATH to load trained weights, or --random-weights for an untrained model."
        )
    if download and random_weights:
        raise ModelConfigError(
            "download=True and random_weights=True contradict each other; choose --download for the "
            "published weights or --random-weights for an untrained model."
        )


def _checkpoint_source(weights: str | os.PathLike[str]) -> str:
    return f"checkpoint {Path(os.fspath(weights)).resolve()}"


@dataclass(frozen=True)
class _Request:
    """What :func:`load_model` was asked, for the zoo and architecture paths."""

    mode: LoadMode
    state_dict: Mapping[str, torch.Tensor] | None
    source: str  # the checkpoint's or the random init's label
    num_classes: int | None
    class_names: Sequence[str] | str | os.PathLike[str] | None
    seed: int
    download: bool


def _load_zoo(entry: ZooEntry, req: _Request) -> tuple[nn.Module, ModelSpec, list[str], str]:
    """A zoo entry: (module, spec, class names, weights source)."""
    mode, state_dict, source = req.mode, req.state_dict, req.source
    n = entry.spec.num_classes if req.num_classes is None else req.num_classes
    if mode == "published":
        if n != entry.spec.num_classes:
            raise ModelConfigError(
                f"The published weights of {entry.spec.name!r} have {entry.spec.num_classes} classes "
                f"but num_classes={n} was asked. Pass --weights PATH with a checkpoint trained for {n} "
                "classes, or --random-weights."
            )
        ok, _ = entry.weights.status()
        if not ok and not req.download:
            raise entry.weights.unavailable(entry.spec.name)
    names = resolve_class_names(req.class_names, n)
    build = entry.build
    module = _seeded(req.seed, lambda: build(n, "random", None)) if mode == "random" else build(n, mode, state_dict)
    preprocessing = entry.spec.preprocessing
    if state_dict is not None:
        sd = entry.adapt_checkpoint(state_dict, module) if entry.adapt_checkpoint else state_dict
        load_state_dict_checked(module, sd, origin=source)
    elif mode == "published":
        source, override = entry.weights.load(module, name=entry.spec.name, download=req.download)
        preprocessing = override or preprocessing
    spec = replace(entry.spec, num_classes=n, preprocessing=preprocessing, known_layers=dict(entry.spec.known_layers))
    return module, spec, names, source


def _load_architecture(
    name: str, architecture: tuple[str, str], req: _Request
) -> tuple[nn.Module, ModelSpec, list[str], str]:
    """A torchvision/timm ``(library, architecture)``: (module, spec, class names, weights source)."""
    src, arch = architecture
    num_classes, class_names = req.num_classes, req.class_names
    if req.mode == "published":
        raise WeightsUnavailableError(
            f"{name!r} is not a zoo model, so cnnlens has no published weights for it ({src} "
            f"architecture {arch!r}).\nFix it in one of these ways:\n"
            f"  - pass --weights PATH (load_model({name!r}, weights=PATH, num_classes=N)): a state dict "
            "saved with torch.save(model.state_dict(), PATH);\n"
            "  - pass --random-weights (random_weights=True) for an untrained model (outputs marked).\n"
            f"(--download only fetches the zoo's published weights: {', '.join(available_models())}.)"
        )
    # with num_classes known, a class-names mismatch fails before the (slow) build
    early_names = resolve_class_names(class_names, num_classes) if num_classes is not None else None
    if req.mode == "random":
        module = _seeded(req.seed, lambda: build_architecture(src, arch, num_classes))
    else:
        module = build_architecture(src, arch, num_classes)
    n = num_classes if num_classes is not None else infer_num_classes(module) or 1000
    names = early_names if early_names is not None else resolve_class_names(class_names, n)
    if req.state_dict is not None:
        load_state_dict_checked(module, req.state_dict, origin=req.source)
    default_layer, known = guess_layers(module)
    spec = ModelSpec(
        name=name,
        family="custom",
        source=src,
        preprocessing=architecture_preprocessing(src, arch, module),
        num_classes=n,
        default_layer=default_layer,
        known_layers=known,
        description=f"User architecture {arch!r} built by {src} with {n} classes.",
    )
    return module, spec, names, req.source


def _call_factory(name: str, num_classes: int | None) -> object:
    factory = import_factory(name)
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
    return factory(**kwargs)


def _load_factory(
    name: str,
    *,
    weights: str | os.PathLike[str] | None,
    num_classes: int | None,
    class_names: Sequence[str] | str | os.PathLike[str] | None,
    device: str | torch.device,
    preprocess: Callable[[Preprocessing | None], Preprocessing] | None,
) -> LoadedModel:
    """``package.module:factory`` or ``file.py:factory``: the factory's module (or LoadedModel) + checkpoint."""
    built = _call_factory(name, num_classes)
    if isinstance(built, LoadedModel):
        loaded = built
        if weights is not None:
            load_checkpoint(loaded.module, weights)
            loaded = replace(loaded, weights_source=_checkpoint_source(weights))
        if class_names is not None:
            loaded = replace(loaded, class_names=resolve_class_names(class_names, loaded.spec.num_classes))
        if preprocess is not None:
            loaded = replace(loaded, spec=replace(loaded.spec, preprocessing=preprocess(loaded.spec.preprocessing)))
        loaded.module.to(device).eval()
        return loaded
    if not isinstance(built, nn.Module):
        raise ModelConfigError(
            f"the factory {name!r} returned {type(built).__name__}; it must return a torch.nn.Module (or a "
            "cnnlens LoadedModel)."
        )
    if weights is not None:
        load_checkpoint(built, weights)
    source = _checkpoint_source(weights) if weights is not None else f"factory {name} (its own initialisation)"
    n = num_classes if num_classes is not None else infer_num_classes(built)
    if n is None:
        raise ModelConfigError(f"cannot tell how many classes {name!r} has; pass --num-classes N.")
    names = resolve_class_names(class_names, n)
    default, known = guess_layers(built)
    spec = ModelSpec(
        name=name,
        family="custom",
        source="entry point",
        preprocessing=preprocess(None) if preprocess is not None else override_preprocessing(None),
        num_classes=n,
        default_layer=default,
        known_layers=known,
        description=f"User model built by {name} with {n} classes.",
    )
    return LoadedModel(built.to(device).eval(), spec, names, source, random_weights=False)


def _load_keras(
    name: str,
    *,
    weights: str | os.PathLike[str] | None,
    random_weights: bool,
    download: bool,
    num_classes: int | None,
    class_names: Sequence[str] | str | os.PathLike[str] | None,
    seed: int,
    device: str | torch.device,
    overrides: tuple[Sequence[int] | None, int | None, Sequence[float] | None, Sequence[float] | None],
    preprocessing_mode: str | None = None,
) -> LoadedModel:
    """A Keras model (:func:`cnnlens.models.keras.load_keras`, imported only now), with preprocessing overrides.

    A ``keras:`` architecture is built at ``input_size``; a saved model refuses another size than its own.
    """
    from cnnlens.models.keras import KerasModule, load_keras

    loaded = load_keras(
        name,
        random_weights=random_weights,
        weights=weights,
        download=download,
        num_classes=num_classes,
        class_names=class_names,
        seed=seed,
        device=device,
        input_size=overrides[0],
        preprocessing=preprocessing_mode,  # type: ignore[arg-type]  # checked by load_keras
    )
    input_size, resize, mean, std = overrides
    if any(v is not None for v in overrides):
        base = loaded.spec.preprocessing
        pre = override_preprocessing(base, input_size=input_size, resize=resize, mean=mean, std=std)
        loaded = replace(loaded, spec=replace(loaded.spec, preprocessing=pre))
        if isinstance(loaded.module, KerasModule):
            loaded.module.preprocessing = pre
    if loaded.random_weights:
        _log.info("%s uses %s", loaded.spec.name, loaded.weights_source)
    else:
        _log.info("loaded %s from %s", loaded.spec.name, loaded.weights_source)
    return loaded


def load_model(
    name: str,
    *,
    weights: str | os.PathLike[str] | None = None,
    random_weights: bool = False,
    download: bool = False,
    num_classes: int | None = None,
    class_names: Sequence[str] | str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    input_size: Sequence[int] | None = None,
    resize: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    preprocessing_mode: str | None = None,
) -> LoadedModel:
    """Build a model and load its weights, never silently random.

    Weights, in order: ``weights`` (a checkpoint path, read with ``torch.load(weights_only=True)``)
    always wins; else ``random_weights=True`` gives a seeded random init, flagged in ``random_weights`` and
    ``weights_source``; else the published weights of a zoo model, from the bundled package or the local
    cache, fetched only when ``download=True``. A factory builds its own weights (a checkpoint still wins).

    Args:
        name: a zoo name (see :func:`available_models`), a torchvision builder name or a timm model name
            (prefix ``timm:``/``torchvision:`` to choose; the zoo, then torchvision, then timm otherwise),
            or a factory ``package.module:factory`` / ``file.py:factory`` (called with ``num_classes=N``
            when given; it returns an ``nn.Module`` or a :class:`LoadedModel`), or a Keras model:
            ``keras:vgg16``, ``keras:resnet50``, ``keras:inception_v3``, ``keras:inception_resnet_v2``, or a
            saved ``.keras``/``.h5`` file (see :func:`cnnlens.models.keras.load_keras`; Keras runs on the
            torch backend, imported only then).
        weights: a checkpoint file (for a ``keras:`` architecture, a Keras ``.weights.h5`` file): a state
            dict, or a dict holding it under ``"state_dict"``, ``"model"``, ``"model_state_dict"`` or
            ``"ema"``; a ``"module."`` prefix is stripped.
        random_weights: build with ``torch.manual_seed(seed)`` and no trained weights (not for factories).
        download: allow fetching the published weights of a zoo model over the network (not for factories).
        num_classes: number of outputs; default: the zoo's 1000, or the builder's default for custom names.
        class_names: names (a sequence or a ``.txt``/``.json`` path); default: ImageNet names for 1000
            classes, else ``class_0..class_{N-1}``.
        device: where to put the module.
        seed: the seed of ``random_weights``.
        input_size: ``(H, W)`` or ``(S,)`` model input, overriding the preprocessing (a factory's bare
            module needs it).
        resize: shorter side before the center crop (default: the larger input side when ``input_size`` is
            set).
        mean: per-channel normalisation mean (1 or 3 values).
        std: per-channel normalisation std (1 or 3 values).
        preprocessing_mode: Keras models only: the Keras ``preprocess_input`` mode, ``"caffe"``, ``"tf"`` or
            ``"torch"`` (default: the architecture's; ``"tf"`` for a saved model).

    Returns:
        the :class:`LoadedModel`, its module in eval mode on ``device``.

    Raises:
        ModelNotFoundError: unknown name (with "did you mean" suggestions), or a factory that cannot be
            imported.
        WeightsUnavailableError: no checkpoint, no ``random_weights``, and no published weights offline
            (the message lists --weights, --download and --random-weights), or the checkpoint file is
            missing.
        WeightsMismatchError: the checkpoint does not fit the architecture.
        ModelConfigError: conflicting options, class names that do not match ``num_classes``, a factory
            returning neither a module nor a LoadedModel, or malformed preprocessing overrides.

    Example:
        >>> lm = load_model("resnet18", num_classes=10, weights="cifar10.pt",
        ...                 class_names="classes.txt")  # doctest: +SKIP
        >>> lm.spec.default_layer  # doctest: +SKIP
        'layer4'
    """
    _check_options(weights, random_weights, download, num_classes)
    if is_keras_name(name):
        return _load_keras(
            name,
            weights=weights,
            random_weights=random_weights,
            download=download,
            num_classes=num_classes,
            class_names=class_names,
            seed=seed,
            device=device,
            overrides=(input_size, resize, mean, std),
            preprocessing_mode=preprocessing_mode,
        )
    if preprocessing_mode is not None:
        raise ModelConfigError(
            f"preprocessing_mode={preprocessing_mode!r} (--preprocess) applies to Keras models (keras:ARCH, .keras/.h5 "
            f"files); {name!r} is not one. Set its normalisation with mean=/std= (--mean/--std)."
        )
    preprocess: Callable[[Preprocessing | None], Preprocessing] | None = None
    if any(v is not None for v in (input_size, resize, mean, std)):

        def preprocess(base: Preprocessing | None) -> Preprocessing:
            return override_preprocessing(base, input_size=input_size, resize=resize, mean=mean, std=std)

    if is_entry_point(name):
        if random_weights or download:
            raise ModelConfigError(
                f"--random-weights and --download apply to zoo and architecture names, not to the factory "
                f"{name!r}; build the weights in the factory or pass --weights PATH."
            )
        return _load_factory(
            name,
            weights=weights,
            num_classes=num_classes,
            class_names=class_names,
            device=device,
            preprocess=preprocess,
        )
    entry = zoo_entry(name)
    architecture = resolve_architecture(name) if entry is None else None  # fails before the checkpoint is read
    state_dict = read_state_dict(weights) if weights is not None else None
    mode: LoadMode = "checkpoint" if state_dict is not None else "random" if random_weights else "published"
    random_source = RANDOM_WEIGHTS_TEMPLATE.format(seed=seed)
    source = _checkpoint_source(weights) if weights is not None else random_source
    req = _Request(mode, state_dict, source, num_classes, class_names, seed, download)
    if entry is not None:
        module, spec, names, source = _load_zoo(entry, req)
    else:
        assert architecture is not None  # resolved above
        module, spec, names, source = _load_architecture(name, architecture, req)
    if preprocess is not None:
        spec = replace(spec, preprocessing=preprocess(spec.preprocessing))
    module = module.to(device).eval()
    if mode == "random":
        _log.info("%s uses %s", spec.name, random_source)
    else:
        _log.info("loaded %s from %s", spec.name, source)
    return LoadedModel(
        module=module, spec=spec, class_names=names, weights_source=source, random_weights=mode == "random"
    )
