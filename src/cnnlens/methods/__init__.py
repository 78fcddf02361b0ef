"""Explanation methods: pure functions of a capture, registered by id.

Importing this package registers every built-in method.
"""

from cnnlens.errors import CnnlensWarning

# Import order is registration order, which is the CLI's and the docs' method order.
# isort: off
from cnnlens.methods import attribution as attribution
from cnnlens.methods import integrated as integrated
from cnnlens.methods import cam as cam
from cnnlens.methods import eigen as eigen
from cnnlens.methods import fullgrad as fullgrad
from cnnlens.methods import perturbation as perturbation
from cnnlens.methods import smooth as smooth
from cnnlens.methods import transformer as transformer

# isort: on
from cnnlens.methods.cam import CamMethod, register_cam
from cnnlens.methods.registry import (
    BoundMethod,
    LayerView,
    MethodSpec,
    get_method,
    iter_methods,
    method_ids,
    register,
    resolve_methods,
)

__all__ = [
    "BoundMethod",
    "CamMethod",
    "CnnlensWarning",
    "LayerView",
    "MethodSpec",
    "get_method",
    "iter_methods",
    "method_ids",
    "register",
    "register_cam",
    "resolve_methods",
]
