"""The one default-target-layer policy of cnnlens, for any architecture the zoo does not know.

The zoo's own entries name their layers explicitly (see :mod:`cnnlens.models.zoo`). For a user's own
torchvision or timm architecture (``load_model``, ``cnnlens explain --model resnet18``) and for a bare
``nn.Module`` given to :func:`cnnlens.explain` without ``layers=``, :func:`guess_layers` picks the last
spatial, post-activation output before global pooling (a block output), from the module tree alone (no
dummy forward):

1. a ResNet-style ``layer4`` stage if there is one (its output is the post-ReLU residual sum);
2. otherwise the activation that directly follows the highest-numbered ``Conv2d`` in its parent container
   (possibly through a norm layer), e.g. ``features.29`` in VGG16 or ``features.18`` in MobileNetV2. When
   that activation closes its container (conv-norm-act blocks) the container itself is named;
3. otherwise the last module timm's ``feature_info`` reports;
4. otherwise the top-level child that holds the highest-numbered ``Conv2d`` (e.g. ``inception5b`` in
   GoogLeNet, ``features`` in DenseNet/ConvNeXt).

A module with no ``Conv2d`` and no timm ``feature_info`` has no spatial layer to default to:
:func:`default_target_layer` refuses it (name a layer: ``layers=[...]`` in Python, ``--layer`` on the command
line), and :func:`guess_layers` falls back to the last top-level child with a warning saying the same.

Example:
    >>> import torchvision
    >>> guess_layers(torchvision.models.vgg11())[0]
    'features.19'
    >>> default_target_layer(torchvision.models.resnet18())
    'layer4'
"""

from __future__ import annotations

import logging

from torch import nn

from cnnlens.errors import LayerNotFoundError

__all__ = ["default_target_layer", "guess_layers"]

_log = logging.getLogger(__name__)

_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.SiLU,
    nn.GELU,
    nn.Hardswish,
    nn.LeakyReLU,
    nn.ELU,
    nn.Mish,
    nn.PReLU,
)
_NORMS: tuple[type[nn.Module], ...] = (nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d, nn.LayerNorm)


def _post_activation_after(root: nn.Module, conv_name: str) -> str | None:
    parent_name, _, leaf = conv_name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    children = list(parent.named_children())
    idx = next(i for i, (n, _) in enumerate(children) if n == leaf)
    chosen: int | None = None
    for j in range(idx + 1, len(children)):
        child = children[j][1]
        if isinstance(child, _ACTIVATIONS):
            chosen = j
            break
        if isinstance(child, _NORMS):
            act = getattr(child, "act", None)  # timm BatchNormAct2d carries its activation
            if isinstance(act, nn.Module) and not isinstance(act, nn.Identity):
                chosen = j
                break
            continue
        return None
    if chosen is None:
        return None
    if chosen == len(children) - 1 and parent_name:
        return parent_name
    return f"{parent_name}.{children[chosen][0]}" if parent_name else children[chosen][0]


def _guess(module: nn.Module) -> tuple[str | None, dict[str, str]]:
    """The policy's choice, or None when the module has no spatial layer (no Conv2d, no feature_info)."""
    names = dict(module.named_modules())
    convs = [n for n, m in module.named_modules() if isinstance(m, nn.Conv2d)]
    known: dict[str, str] = {}
    default: str | None = None
    if convs:
        known["last_conv"] = convs[-1]
        if "layer4" in names:
            default = "layer4"
        if default is None:
            default = _post_activation_after(module, convs[-1])
    if default is None:
        info = getattr(module, "feature_info", None)
        try:
            last = info[-1]["module"] if info is not None else None
        except (TypeError, KeyError, IndexError):
            last = None
        if isinstance(last, str) and last in names:
            default = last
    if default is None and convs:
        default = convs[-1].split(".", 1)[0]
    return default, known


def _no_spatial_layer(module: nn.Module) -> str:
    return (
        f"{type(module).__name__} has no spatial layer to explain by default (no nn.Conv2d and no timm "
        "feature_info). Name a layer: layers=[...] in Python, --layer NAME on the command line (`cnnlens layers "
        "--all` lists them)."
    )


def default_target_layer(module: nn.Module) -> str:
    """The layer explained when none is named: the policy of :func:`guess_layers`, for any ``nn.Module``.

    Args:
        module: the network.

    Returns:
        A dotted ``named_modules()`` name (a block output such as ``layer4``, ``features.29`` or ``blocks.11``).

    Raises:
        LayerNotFoundError: The module has no spatial layer (no ``Conv2d``, no timm ``feature_info``); the
            message says to name one with ``layers=[...]`` or ``--layer``.

    Example:
        >>> default_target_layer(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten()))
        '1'
    """
    default, _ = _guess(module)
    if default is None:
        raise LayerNotFoundError(_no_spatial_layer(module))
    return default


def guess_layers(module: nn.Module) -> tuple[str, dict[str, str]]:
    """Pick a default Grad-CAM layer and a few named roles for an arbitrary CNN.

    Args:
        module: the network.

    Returns:
        ``(default_layer, known_layers)``; ``known_layers`` has ``"final_spatial"`` (the default) and, when
        the network has a ``Conv2d``, ``"last_conv"`` (the highest-numbered convolution in registration
        order). A module without a spatial layer gets its last top-level child, with a warning naming
        ``--layer``/``layers=`` (see :func:`default_target_layer`, which refuses it instead).
    """
    default, known = _guess(module)
    if default is None:
        children = [n for n, _ in module.named_children()]
        default = children[-1] if children else ""
        _log.warning("%s Defaulting to %r for now.", _no_spatial_layer(module), default)
    known["final_spatial"] = default
    return default, known
