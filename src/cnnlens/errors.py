"""The cnnlens error hierarchy.

Every error cnnlens raises on purpose is a :class:`CnnlensError`. Each subclass also inherits the matching
builtin, so ``except KeyError`` keeps working for callers who do not know cnnlens. Messages say what was
wrong, what was received and how to fix it.
"""

from __future__ import annotations

__all__ = [
    "CnnlensError",
    "CnnlensWarning",
    "ImageReadError",
    "InputShapeError",
    "LayerError",
    "LayerNotFoundError",
    "LayoutError",
    "MethodError",
    "MethodNotFoundError",
    "ModelConfigError",
    "ModelNotFoundError",
    "ModelTypeError",
    "NonFiniteInputError",
    "NonFiniteOutputError",
    "OptionError",
    "OutputAdapterError",
    "TargetError",
    "UsageError",
    "WeightsMismatchError",
    "WeightsUnavailableError",
]


class CnnlensError(Exception):
    """Base class of every error cnnlens raises deliberately."""

    def __str__(self) -> str:  # KeyError quotes its message; keep ours readable.
        return str(self.args[0]) if self.args else self.__class__.__name__


class CnnlensWarning(UserWarning):
    """A result is computed but may be misleading (e.g. Grad-CAM++ on signed activations)."""


class LayerNotFoundError(CnnlensError, KeyError):
    """A layer name did not resolve to a module of the model."""


class LayerError(CnnlensError, ValueError):
    """A layer exists but cannot be used as asked (not called, called twice, non-tensor output...)."""


class LayoutError(LayerError):
    """A layer's output does not fit its (given or inferred) layout: rank, token count, prefix or grid."""


class TargetError(CnnlensError, ValueError):
    """A target (class index, list or callable) does not fit the model output."""


class OutputAdapterError(CnnlensError, TypeError):
    """The model output could not be turned into a logits tensor."""


class MethodNotFoundError(CnnlensError, KeyError):
    """No method is registered under the requested id."""


class OptionError(CnnlensError, ValueError):
    """An option of a method, a metric or an Execution has an unknown name, a wrong type or an invalid value."""


class MethodError(CnnlensError, ValueError):
    """A method cannot run on what was captured (wrong shape, missing gradients...)."""


class ModelTypeError(CnnlensError, TypeError):
    """Something that is not a model (not a ``torch.nn.Module`` nor a ``LoadedModel``) was given as the model."""


class ModelNotFoundError(CnnlensError, KeyError):
    """No zoo entry has the requested model name."""


class WeightsUnavailableError(CnnlensError, FileNotFoundError):
    """Pretrained weights are not available offline and no checkpoint was given."""


class WeightsMismatchError(CnnlensError, ValueError):
    """A checkpoint or state dict does not fit the architecture (names, count or shapes)."""


class ModelConfigError(CnnlensError, ValueError):
    """Arguments for building a model do not fit together (class names count, conflicting weight options)."""


class ImageReadError(CnnlensError, OSError):
    """An image file is missing, empty, truncated, corrupt, too large or not an image."""


class InputShapeError(CnnlensError, ValueError):
    """An input tensor has the wrong rank, channel count or dtype."""


class NonFiniteInputError(InputShapeError):
    """An input tensor holds NaN or infinity (a map of it would be meaningless)."""


class NonFiniteOutputError(CnnlensError, ValueError):
    """The model produced NaN or infinite scores (usually NaN/inf in its weights or an overflow)."""


class UsageError(CnnlensError, ValueError):
    """A command-line argument is invalid (out of range, wrong type, unusable path or device)."""
