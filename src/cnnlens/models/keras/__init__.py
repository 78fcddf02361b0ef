"""Keras 3 models (torch backend) in cnnlens: :class:`KerasModule`, :func:`wrap_keras`, :func:`load_keras`.

Imported only when a Keras model is asked for (``load_model("keras:vgg16")``, a ``.keras``/``.h5`` path, or
:func:`wrap_keras`); the rest of cnnlens never imports Keras. Keras is imported on the torch backend
(:func:`~cnnlens.models.keras.backend.import_keras`).

Example:
    >>> from cnnlens.models.keras import load_keras
    >>> lm = load_keras("keras:vgg16", random_weights=True)  # doctest: +SKIP
    >>> lm.spec.default_layer  # doctest: +SKIP
    'block5_conv3'
"""

from __future__ import annotations

from cnnlens.models.keras.apps import KERAS_APPS, KerasApp, is_keras_name, keras_app, load_keras
from cnnlens.models.keras.backend import KerasBackendError, import_keras
from cnnlens.models.keras.module import KerasModule, is_keras_model, keras_layers, kernel_oihw, wrap_keras

__all__ = [
    "KERAS_APPS",
    "KerasApp",
    "KerasBackendError",
    "KerasModule",
    "import_keras",
    "is_keras_model",
    "is_keras_name",
    "keras_app",
    "keras_layers",
    "kernel_oihw",
    "load_keras",
    "wrap_keras",
]
