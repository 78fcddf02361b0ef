"""The ``keras.applications`` architectures of the seed's study, and :func:`load_keras`.

``keras:vgg16``, ``keras:resnet50``, ``keras:inception_v3`` and ``keras:inception_resnet_v2`` are built by
``keras.applications`` with ``classifier_activation=None`` (their outputs are logits). Weights, in order: a
``.weights.h5`` file (``weights=``), else seeded random weights (``random_weights=True``, flagged everywhere),
else the published Keras ImageNet weights when the file is already in the Keras cache
(``$KERAS_HOME/models`` or ``~/.keras/models``), fetched by Keras only when ``download=True``; offline without
them, :class:`~cnnlens.errors.WeightsUnavailableError` says how to fix it. A saved model (``.keras``, or a
full-model ``.h5``) is loaded with ``keras.models.load_model(path, compile=False)``.

Preprocessing is cnnlens's :class:`~cnnlens.models.preprocessing.Preprocessing` with the Keras mode (never
Keras's ``preprocess_input``, which modifies float numpy input in place): ``"caffe"`` (RGB to BGR, minus
``[103.939, 116.779, 123.68]``, no scaling) for VGG16/ResNet50 at 224, ``"tf"`` (``x / 127.5 - 1``) for
InceptionV3/InceptionResNetV2 at 299.
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from cnnlens.errors import ModelConfigError, ModelNotFoundError, WeightsMismatchError, WeightsUnavailableError
from cnnlens.models.classes import resolve_class_names
from cnnlens.models.keras.backend import import_keras
from cnnlens.models.keras.module import KerasModule, wrap_keras
from cnnlens.models.preprocessing import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    KERAS_CAFFE_224,
    KERAS_TF_299,
    Preprocessing,
)
from cnnlens.models.spec import RANDOM_WEIGHTS_TEMPLATE, LoadedModel, ModelSpec

__all__ = [
    "KERAS_APPS",
    "KerasApp",
    "cached_weights",
    "is_keras_name",
    "is_keras_path",
    "keras_app",
    "keras_cache_dir",
    "keras_preprocessing",
    "load_keras",
]

KERAS_PREFIX = "keras:"

KerasMode = Literal["caffe", "tf", "torch"]
KERAS_MODES: tuple[str, ...] = ("caffe", "tf", "torch")


def keras_preprocessing(mode: KerasMode, size: int) -> Preprocessing:
    """The cnnlens preprocessing of a Keras ``preprocess_input`` mode at a square input size.

    The shorter image side is resized to ``size / 0.875`` (``256`` for 224, ``342`` for 299) and the center
    ``size x size`` window cropped; :class:`~cnnlens.models.preprocessing.Preprocessing` then computes the mode's
    arithmetic (``"caffe"`` reverses the channels to BGR itself).

    Args:
        mode: ``"caffe"`` (BGR, minus the BGR mean, 0..255 scale), ``"tf"`` (``x / 127.5 - 1``) or ``"torch"``
            (``x / 255``, ImageNet mean/std).
        size: the square input size.

    Returns:
        the preprocessing.

    Example:
        >>> p = keras_preprocessing("caffe", 224)
        >>> p.mode, p.input_size, p.resize
        ('caffe', (224, 224), 256)
    """
    presets = {"caffe": KERAS_CAFFE_224, "tf": KERAS_TF_299}
    if mode not in (*presets, "torch"):
        raise ModelConfigError(f"Keras preprocessing mode must be 'caffe', 'tf' or 'torch'; received {mode!r}.")
    resize = {224: 256, 299: 342}.get(size, max(size, round(size / 0.875)))
    if mode == "torch":
        return Preprocessing((size, size), resize, IMAGENET_MEAN, IMAGENET_STD)
    return replace(presets[mode], input_size=(size, size), resize=resize)


@dataclass(frozen=True)
class KerasApp:
    """One ``keras.applications`` architecture as cnnlens knows it.

    Attributes:
        name: the cnnlens name without the ``keras:`` prefix (``"vgg16"``).
        builder: the ``keras.applications`` function (``"VGG16"``).
        family: ``"vgg"``, ``"resnet"``, ``"inception"`` or ``"inception_resnet"``.
        size: the square input size.
        mode: the Keras preprocessing mode.
        weights_file: the published weights' file name in the Keras cache (with the top).
        default_layer: the layer Grad-CAM targets by default (the seed's).
        known_layers: role -> layer name (stable Keras names only).
        min_size: the smallest input side ``keras.applications`` builds it for (its ``min_size``).
    """

    name: str
    builder: str
    family: str
    size: int
    mode: KerasMode
    weights_file: str
    default_layer: str
    known_layers: dict[str, str] = field(default_factory=dict)
    min_size: int = 32


KERAS_APPS: dict[str, KerasApp] = {
    app.name: app
    for app in (
        KerasApp(
            "vgg16",
            "VGG16",
            "vgg",
            224,
            "caffe",
            "vgg16_weights_tf_dim_ordering_tf_kernels.h5",
            "block5_conv3",
            {"last_conv": "block5_conv3", "final_spatial": "block5_pool", "mid_block": "block4_conv3"},
        ),
        KerasApp(
            "resnet50",
            "ResNet50",
            "resnet",
            224,
            "caffe",
            "resnet50_weights_tf_dim_ordering_tf_kernels.h5",
            "conv5_block3_out",
            {"last_block": "conv5_block3_out", "last_conv": "conv5_block3_3_conv", "mid_block": "conv4_block6_out"},
        ),
        KerasApp(
            "inception_v3",
            "InceptionV3",
            "inception",
            299,
            "tf",
            "inception_v3_weights_tf_dim_ordering_tf_kernels.h5",
            "mixed10",
            {"last_merge": "mixed10", "last_block": "mixed10", "mid_block": "mixed7"},
            75,
        ),
        KerasApp(
            "inception_resnet_v2",
            "InceptionResNetV2",
            "inception_resnet",
            299,
            "tf",
            "inception_resnet_v2_weights_tf_dim_ordering_tf_kernels.h5",
            "conv_7b_ac",
            {"final_spatial": "conv_7b_ac", "last_conv": "conv_7b", "mid_block": "mixed_7a"},
            75,
        ),
    )
}
"""The four architectures of the seed's study, by cnnlens name (without ``keras:``)."""


def is_keras_path(name: str) -> bool:
    """Whether ``name`` is a saved Keras model or weights file (``.keras``, ``.h5``)."""
    return name.lower().endswith((".keras", ".h5"))


def is_keras_name(name: str) -> bool:
    """Whether ``name`` asks for a Keras model: ``keras:<arch>`` or a ``.keras``/``.h5`` path.

    Example:
        >>> is_keras_name("keras:vgg16"), is_keras_name("model.keras"), is_keras_name("vgg16")
        (True, True, False)
    """
    return isinstance(name, str) and (name.lower().startswith(KERAS_PREFIX) or is_keras_path(name))


def keras_app(name: str) -> KerasApp:
    """The :class:`KerasApp` of ``keras:<arch>`` (or a bare architecture name).

    Raises:
        ModelNotFoundError: unknown architecture, with the known ones.
    """
    key = name[len(KERAS_PREFIX) :] if name.lower().startswith(KERAS_PREFIX) else name
    app = KERAS_APPS.get(key.lower())
    if app is None:
        known = ", ".join(f"keras:{n}" for n in KERAS_APPS)
        raise ModelNotFoundError(
            f"unknown Keras architecture {name!r}; cnnlens knows {known}. For your own Keras model pass the path "
            "of its .keras/.h5 file, or wrap it with cnnlens.models.keras.wrap_keras(model)."
        )
    return app


def keras_cache_dir() -> Path:
    """Where Keras caches downloaded weights: ``$KERAS_HOME/models``, else ``~/.keras/models``.

    Keras falls back to ``/tmp/.keras`` when that folder is not writable; :func:`cached_weights` looks there too.
    """
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(home) / "models"


def cached_weights(file_name: str) -> Path | None:
    """The cached Keras weights file ``file_name`` (in :func:`keras_cache_dir` or ``/tmp/.keras/models``), or None."""
    for folder in (keras_cache_dir(), Path(tempfile.gettempdir()) / ".keras" / "models"):
        if (folder / file_name).is_file():
            return folder / file_name
    return None


def _seeded_build(keras: Any, seed: int, build: Any) -> Any:
    """Build with Keras's, torch's, numpy's and Python's RNGs seeded, restoring them afterwards."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            keras.utils.set_random_seed(seed)
            return build()
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def _published_refusal(app: KerasApp, where: Path) -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"The published Keras ImageNet weights of keras:{app.name} are not in the Keras cache ({where}), and "
        "cnnlens never downloads without being asked.\nFix it in one of these ways:\n"
        f"  - pass --download (download=True) to let Keras fetch {app.weights_file} into {where.parent};\n"
        f"  - copy {app.weights_file} into {where.parent} (or set KERAS_HOME);\n"
        "  - pass --weights PATH (weights=PATH): a .weights.h5 file saved with model.save_weights(PATH);\n"
        "  - pass --random-weights (random_weights=True) for an untrained model (outputs marked)."
    )


def _load_weights(model: Any, path: Path, label: str) -> None:
    if not path.is_file():
        raise WeightsUnavailableError(f"the Keras weights file {str(path)!r} does not exist; check the path.")
    try:
        model.load_weights(str(path))
    except (ValueError, KeyError, OSError) as exc:
        raise WeightsMismatchError(
            f"the Keras weights file {str(path)!r} does not fit {label}: {exc}. Pass weights saved from the same "
            "architecture (model.save_weights('x.weights.h5')), or load the full model file instead."
        ) from exc


def _build_app(
    keras: Any,
    app: KerasApp,
    *,
    weights: Path | None,
    random_weights: bool,
    download: bool,
    seed: int,
    num_classes: int,
    hw: tuple[int, int],
) -> tuple[Any, str]:
    """Build a known architecture with logits output at input ``hw``: ``(keras model, weights source)``."""
    builder = getattr(keras.applications, app.builder)
    if weights is not None or random_weights:
        shape = (*hw, 3)
        model = _seeded_build(
            keras,
            seed,
            lambda: builder(weights=None, classes=num_classes, classifier_activation=None, input_shape=shape),
        )
        if weights is None:
            return model, RANDOM_WEIGHTS_TEMPLATE.format(seed=seed)
        _load_weights(model, weights, f"keras:{app.name} with {num_classes} classes at {hw[0]}x{hw[1]}")
        return model, f"Keras weights file {weights.resolve()}"
    if hw != (app.size, app.size):
        raise _published_size_refusal(app, hw)
    if num_classes != 1000:
        raise ModelConfigError(
            f"the published weights of keras:{app.name} have 1000 classes but num_classes={num_classes} was asked. "
            f"Pass --weights PATH (a .weights.h5 trained for {num_classes} classes) or --random-weights."
        )
    cached = cached_weights(app.weights_file)
    if cached is None and not download:
        raise _published_refusal(app, keras_cache_dir() / app.weights_file)
    # the cached file itself, not weights="imagenet": Keras would re-download a file whose hash differs
    source = str(cached) if cached is not None else "imagenet"
    try:
        model = builder(weights=source, classifier_activation=None)
    except Exception as exc:  # h5py's and keras.utils.get_file's errors (a bare Exception on network failures)
        where = cached or keras_cache_dir() / app.weights_file
        raise WeightsUnavailableError(
            f"Keras could not load the published weights of keras:{app.name} ({where}): {exc}. If the cached file "
            "is damaged, delete it and pass --download (with network access), or pass --weights PATH or "
            "--random-weights."
        ) from exc
    return model, f"Keras published ImageNet weights ({app.weights_file})"


def _square_or_pair(input_size: int | Sequence[int] | None) -> tuple[int, int] | None:
    """``input_size`` as ``(H, W)`` (one value: square), checked, or None."""
    if input_size is None:
        return None
    values = [input_size] if isinstance(input_size, int) else list(input_size)
    if len(values) not in (1, 2) or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        raise ModelConfigError(f"input_size must be one or two positive ints (H [W]); received {input_size!r}.")
    return (values[0], values[-1])


def _app_hw(app: KerasApp, input_size: int | Sequence[int] | None) -> tuple[int, int]:
    """The input ``(H, W)`` to build ``app`` at: its default, or ``input_size`` when keras.applications takes it."""
    hw = _square_or_pair(input_size) or (app.size, app.size)
    if min(hw) < app.min_size:
        raise ModelConfigError(
            f"input size {hw[0]}x{hw[1]}: keras.applications builds keras:{app.name} for inputs of at least "
            f"{app.min_size}x{app.min_size} (its min_size); pass a larger --input-size (input_size=)."
        )
    return hw


def _input_hw(model: Any) -> tuple[int, int] | None:
    """The ``(H, W)`` a channels-last Keras model was built for, or None (any size, or no input shape)."""
    try:
        shape = getattr(model, "input_shape", None)
    except (AttributeError, ValueError):  # a subclassed model may have no defined input shape
        return None
    if isinstance(shape, tuple) and len(shape) == 4 and isinstance(shape[1], int) and isinstance(shape[2], int):
        return (int(shape[1]), int(shape[2]))
    return None


def _preprocessing_at(mode: KerasMode, hw: tuple[int, int]) -> Preprocessing:
    """:func:`keras_preprocessing` at ``(H, W)``: a non-square input resizes its shorter side to ``min / 0.875``."""
    if hw[0] == hw[1]:
        return keras_preprocessing(mode, hw[0])
    square = keras_preprocessing(mode, min(hw))
    return replace(square, input_size=hw, resize=max(max(hw), round(min(hw) / 0.875)))


def _published_size_refusal(app: KerasApp, hw: tuple[int, int]) -> ModelConfigError:
    return ModelConfigError(
        f"input size {hw[0]}x{hw[1]}: the published ImageNet weights of keras:{app.name} include its classifier "
        f"(include_top), which keras.applications builds only at {app.size}x{app.size}. Drop --input-size "
        "(input_size=), or pass --random-weights or --weights PATH (a .weights.h5 saved from the architecture built "
        f"at {hw[0]}x{hw[1]})."
    )


def load_keras(
    name_or_path: str | os.PathLike[str],
    *,
    random_weights: bool = False,
    weights: str | os.PathLike[str] | None = None,
    download: bool = False,
    num_classes: int | None = None,
    class_names: Sequence[str] | str | os.PathLike[str] | None = None,
    seed: int = 0,
    preprocessing: KerasMode | Preprocessing | None = None,
    device: str | torch.device = "cpu",
    input_size: int | Sequence[int] | None = None,
) -> LoadedModel:
    """Load a Keras model as a cnnlens :class:`LoadedModel` (its module a :class:`KerasModule`).

    Args:
        name_or_path: ``keras:vgg16``, ``keras:resnet50``, ``keras:inception_v3``, ``keras:inception_resnet_v2``,
            or the path of a saved model (``.keras``, or a full-model ``.h5``).
        random_weights: seeded random weights (architectures only); flagged in the result.
        weights: a ``.weights.h5`` file for an architecture (``model.save_weights``).
        download: let Keras download the published ImageNet weights when not cached.
        num_classes: outputs of an architecture (default 1000); checked against a saved model's output.
        class_names: names (sequence or ``.txt``/``.json`` path); default ImageNet names for 1000 classes
            (``keras.applications`` uses torchvision's order).
        seed: the seed of ``random_weights``.
        preprocessing: a Keras mode (``"caffe"``, ``"tf"``, ``"torch"``) or a cnnlens
            :class:`Preprocessing`; default: the architecture's, or ``"tf"`` for a saved model.
        device: where the weights are created (``keras.device``); the wrapper calls the model on that device.
        input_size: ``S`` or ``(H, W)``: build an architecture for this input instead of its default (224 or 299;
            at least 32, 75 for the Inception models). Random weights and a ``.weights.h5`` file saved at that size
            allow it; the published weights include the classifier, which Keras builds only at the default size,
            so they refuse it. A saved model keeps the size it was built for (another one is refused).

    Returns:
        the loaded model.

    Raises:
        ModelNotFoundError: unknown ``keras:`` architecture, or a saved-model path that does not exist.
        WeightsUnavailableError: no weights asked for and the published ones are not cached.
        WeightsMismatchError: the weights file does not fit the architecture.
        ModelConfigError: contradictory options.
        KerasBackendError: Keras runs on another backend in this process.

    Example:
        >>> lm = load_keras("keras:inception_v3", random_weights=True)  # doctest: +SKIP
        >>> lm.spec.preprocessing.input_size, lm.spec.default_layer  # doctest: +SKIP
        ((299, 299), 'mixed10')
    """
    name = os.fspath(name_or_path)
    if weights is not None and random_weights:
        raise ModelConfigError(f"Both weights={os.fspath(weights)!r} and random_weights=True were given; choose one.")
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        raise ModelConfigError(f"num_classes must be a positive int; received {num_classes!r}.")
    if preprocessing is not None and not isinstance(preprocessing, Preprocessing) and preprocessing not in KERAS_MODES:
        raise ModelConfigError(  # checked before the (slow) build or load
            f"Keras preprocessing mode must be 'caffe', 'tf' or 'torch' (or a cnnlens Preprocessing); received "
            f"{preprocessing!r}."
        )
    if name.lower().startswith(KERAS_PREFIX):
        app = keras_app(name)
        wpath = Path(os.fspath(weights)) if weights is not None else None
        if wpath is not None and not wpath.name.lower().endswith(".h5"):
            raise ModelConfigError(
                f"weights for keras:{app.name} are a Keras .weights.h5 file (model.save_weights); received "
                f"{str(wpath)!r}."
            )
        n = 1000 if num_classes is None else num_classes
        names = resolve_class_names(class_names, n)  # fails before the (slow) build
        hw = _app_hw(app, input_size)
        if wpath is None and not random_weights and hw != (app.size, app.size):
            raise _published_size_refusal(app, hw)
        keras = import_keras()
        with keras.device(_keras_device(device)):
            model, source = _build_app(
                keras,
                app,
                weights=wpath,
                random_weights=random_weights,
                download=download,
                seed=seed,
                num_classes=n,
                hw=hw,
            )
        mode: KerasMode | Preprocessing = app.mode if preprocessing is None else preprocessing
        spec_name, family, default_layer, known = f"keras:{app.name}", app.family, app.default_layer, app.known_layers
        description = f"Keras {app.builder} (keras.applications, torch backend) with {n} classes."
        size = hw
    else:
        path = Path(name)
        if not path.is_file():
            raise ModelNotFoundError(f"no Keras model file {name!r}; check the path (a .keras or full-model .h5 file).")
        if random_weights or download or weights is not None:
            raise ModelConfigError(
                f"{name!r} is a saved Keras model with its own weights; --random-weights, --download and --weights "
                "apply to keras:<architecture> names (load weights into an architecture with "
                "load_model('keras:vgg16', weights='x.weights.h5'))."
            )
        keras = import_keras()
        try:
            with keras.device(_keras_device(device)):
                model = keras.models.load_model(str(path), compile=False)
        except (ValueError, OSError, KeyError, TypeError) as exc:
            raise WeightsMismatchError(
                f"Keras could not load {name!r} as a full model: {exc}. A .weights.h5 file holds weights only: "
                "pass it as weights= with an architecture (load_model('keras:vgg16', weights=PATH)); a model with "
                "custom layers needs them registered (keras.saving.register_keras_serializable)."
            ) from exc
        source = f"Keras model file {path.resolve()}"
        mode = "tf" if preprocessing is None else preprocessing
        spec_name, family, default_layer, known = name, "custom", "", {}
        n = 0
        description = ""
        fixed = _input_hw(model)
        asked = _square_or_pair(input_size)
        if asked is not None and fixed is not None and asked != fixed:
            raise ModelConfigError(
                f"input size {asked[0]}x{asked[1]}: the Keras model {name!r} was built for {fixed[0]}x{fixed[1]} "
                "inputs and Keras refuses any other size. Drop --input-size (input_size=), or build and save the "
                f"model with input_shape=({asked[0]}, {asked[1]}, 3)."
            )
        size = asked or fixed or (224, 224)
    module_preprocessing = mode if isinstance(mode, Preprocessing) else _preprocessing_at(mode, size)
    module = wrap_keras(model, preprocessing=module_preprocessing)
    if not spec_name.startswith(KERAS_PREFIX):
        n = _num_outputs(module, name)
        if num_classes is not None and num_classes != n:
            raise ModelConfigError(f"{name!r} has {n} outputs but num_classes={num_classes} was asked.")
        names = resolve_class_names(class_names, n)
        default_layer = _last_spatial_layer(module)
        description = f"User Keras model {model.name!r} from {name} with {n} classes."
    module.class_names = names
    spec = ModelSpec(
        name=spec_name,
        family=family,
        source="keras",
        preprocessing=module_preprocessing,
        num_classes=n,
        default_layer=default_layer,
        known_layers=dict(known),
        description=description,
    )
    return LoadedModel(
        module=module.eval(), spec=spec, class_names=names, weights_source=source, random_weights=bool(random_weights)
    )


def _keras_device(device: str | torch.device) -> str:
    """A torch device as ``keras.device`` takes it (``"cpu"``, ``"cuda:0"``)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        msg = f"device must be a torch device such as 'cpu' or 'cuda:0'; received {device!r}."
        raise ModelConfigError(msg) from exc
    return str(dev)


def _num_outputs(module: KerasModule, name: str) -> int:
    shape = getattr(module.keras_model, "output_shape", None)
    if isinstance(shape, tuple) and shape and isinstance(shape[-1], int):
        return int(shape[-1])
    raise ModelConfigError(f"cannot tell how many classes the Keras model {name!r} has; pass num_classes=N.")


def _last_spatial_layer(module: KerasModule) -> str:
    """The path of the last non-pooling layer with a 4-D output (a user model's Grad-CAM default)."""
    best = ""
    for path, layer in module.keras_layer_paths:
        if hasattr(layer, "layers") or "Pooling" in type(layer).__name__:
            continue
        try:
            shape = tuple(layer.output.shape)
        except (AttributeError, ValueError, RuntimeError):  # a layer called several times has no single output
            continue
        if len(shape) == 4:
            best = path
    return best
