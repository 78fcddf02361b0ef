"""cnnlens: see how a convolutional network works and why it decided what it decided.

Quick use::

    import cnnlens
    model = cnnlens.load_model("efficientnet_lite0")          # embedded ImageNet weights, offline
    x = model.spec.preprocessing.to_tensor(image)[None]
    result = cnnlens.explain(model, x, methods=["gradcam", "gradcampp"])
    result.save("out/")
"""

from cnnlens.capture import Capture, Recording, capture, record, resolve_layer
from cnnlens.errors import CnnlensError
from cnnlens.explain import default_layer, explain
from cnnlens.explanation import Explanation, ExplanationSet
from cnnlens.methods import CnnlensWarning, get_method, method_ids, register
from cnnlens.models import LoadedModel, available_models, load_model
from cnnlens.targets import ClassTarget, FunctionTarget, RankTarget, resolve_targets

__version__ = "0.1.0"

__all__ = [
    "Capture",
    "ClassTarget",
    "CnnlensError",
    "CnnlensWarning",
    "Explanation",
    "ExplanationSet",
    "FunctionTarget",
    "LoadedModel",
    "RankTarget",
    "Recording",
    "__version__",
    "available_models",
    "capture",
    "default_layer",
    "explain",
    "get_method",
    "load_model",
    "method_ids",
    "record",
    "register",
    "resolve_layer",
    "resolve_targets",
]
