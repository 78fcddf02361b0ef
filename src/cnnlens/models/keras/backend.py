"""Importing Keras 3 on the torch backend, and refusing a process where Keras already runs on another one.

Keras fixes its backend once per process, when ``keras`` is first imported, from ``KERAS_BACKEND`` (or
``~/.keras/keras.json``). cnnlens drives Keras models through PyTorch (every Keras layer is then a
``torch.nn.Module``), so it sets ``KERAS_BACKEND=torch`` right before its first import and refuses, with
:class:`KerasBackendError`, a process in which Keras was imported earlier with another backend. TensorFlow is
never imported.

Example:
    >>> keras = import_keras()  # doctest: +SKIP
    >>> keras.backend.backend()  # doctest: +SKIP
    'torch'
"""

from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType

from cnnlens.errors import ModelConfigError

__all__ = ["KerasBackendError", "import_keras"]


class KerasBackendError(ModelConfigError):
    """Keras is missing, or was imported in this process with a backend other than torch."""


def import_keras() -> ModuleType:
    """Import ``keras`` on the torch backend (setting ``KERAS_BACKEND=torch`` first if unset) and return it.

    Returns:
        the ``keras`` module, its backend ``"torch"``.

    Raises:
        KerasBackendError: Keras is not installed, ``KERAS_BACKEND`` names another backend, or Keras was already
            imported with another one; the message says to run a new process with ``KERAS_BACKEND=torch``.
    """
    already = "keras" in sys.modules
    if not already:
        asked = os.environ.setdefault("KERAS_BACKEND", "torch")
        if asked != "torch":  # refused before importing: another backend would import its framework (TensorFlow)
            raise KerasBackendError(
                f"KERAS_BACKEND={asked!r} is set, but cnnlens runs Keras models on the torch backend. Set "
                "KERAS_BACKEND=torch (or unset it) for this process, e.g. `KERAS_BACKEND=torch cnnlens ...`."
            )
    if importlib.util.find_spec("keras") is None:
        raise KerasBackendError("Keras models need Keras 3: pip install 'cnnlens[keras]' (keras>=3, no TensorFlow).")
    try:
        import keras  # type: ignore[import-untyped]
    except ImportError as exc:
        raise KerasBackendError(
            f"importing keras on the torch backend failed: {exc}. cnnlens needs Keras 3 (pip install "
            "'cnnlens[keras]'), run with KERAS_BACKEND=torch."
        ) from exc
    backend = str(keras.backend.backend())
    if backend != "torch":
        how = "was already imported in this process" if already else "is configured"
        raise KerasBackendError(
            f"Keras {how} with the {backend!r} backend, but cnnlens runs Keras models on the torch backend "
            f"(KERAS_BACKEND={os.environ.get('KERAS_BACKEND')!r}). Keras fixes its backend once per process: start "
            "a new Python process (or CLI run) with KERAS_BACKEND=torch set before keras is first imported "
            "(export KERAS_BACKEND=torch, or os.environ['KERAS_BACKEND'] = 'torch' before `import keras`)."
        )
    module: ModuleType = keras
    return module
