"""The one default-target-layer policy of cnnlens, for any architecture the zoo does not know.

The zoo's own entries name their layers explicitly (see :mod:`cnnlens.models.zoo`). For a user's own
torchvision or timm architecture (``load_model``, ``cnnlens explain --model resnet18``) and for a bare
``nn.Module`` given to :func:`cnnlens.explain` without ``layers=``, :func:`guess_layers` picks a layer from the
module tree alone (no dummy forward).

**Token models** (ViT, DeiT, Swin...) come first: when the network has transformer blocks (see
:func:`transformer_blocks`: a block whose attention child directly follows a ``LayerNorm``) and no convolution
is defined after the last one, the default is **the norm before the last attention block** (``norm1``/``ln_1``
of the last block); hybrids whose convolutions come after their transformers (MobileViT) keep the CNN policy.
The last block's own output is a poor target under a class-token head: only the class token of that output
reaches the head, so its patch tokens get exactly zero gradient and every gradient CAM is zero there. The
input of the last attention still reaches the class token through the attention, so its patch tokens carry
the evidence.
Its output is ``(B, N, C)`` tokens (ViT, DeiT) or ``(B, h, w, C)`` (Swin), mapped to ``(B, C, h, w)`` by the
layer's layout (:mod:`cnnlens.capture.layout`).

=============================================  =============================================  ======
family (library)                               default layer                                  layout
=============================================  =============================================  ======
ViT, DeiT, distilled DeiT, reg. ViTs (timm)   ``blocks.<last>.norm1`` (``blocks.11.norm1``)  tokens
ViT ``vit_b_16``... (torchvision)              ``encoder.layers.encoder_layer_<last>.ln_1``   tokens
Swin (timm)                                    ``layers.3.blocks.<last>.norm1``               nhwc
Swin ``swin_t``... (torchvision)               ``features.7.<last>.norm1``                    nhwc
ConvNeXt (timm)                                ``stages.3`` (the last stage's output)         nchw
ConvNeXt ``convnext_tiny``... (torchvision)    ``features`` (the output of ``features.7``)    nchw
ResNet, VGG, MobileNet... (both)               the CNN policy below                           nchw
=============================================  =============================================  ======

ConvNeXt keeps the CNN policy: its blocks permute to channels-last inside (norm and MLP run on
``(B, h, w, C)``) but every block and stage returns ``(B, C, h, w)``. The last stage's output is the last
spatial map before global pooling, it needs no layout, and it is the same tensor as the last block's output
(no downsampling follows it), so "last stage or last block" is one choice; the stage is the name timm's
``feature_info`` and the CNN policy already give.

**CNNs**: the last spatial, post-activation output before global pooling (a block output):

1. a ResNet-style ``layer4`` stage if there is one (its output is the post-ReLU residual sum);
2. otherwise the activation that directly follows the highest-numbered ``Conv2d`` (or ``Conv3d``, for volume
   networks) in its parent container
   (possibly through a norm layer), e.g. ``features.29`` in VGG16 or ``features.18`` in MobileNetV2. When
   that activation closes its container (conv-norm-act blocks) the container itself is named;
3. otherwise the last module timm's ``feature_info`` reports;
4. otherwise the top-level child that holds the highest-numbered ``Conv2d`` (e.g. ``inception5b`` in
   GoogLeNet, ``features`` in DenseNet/ConvNeXt).

A module with no transformer block, no ``Conv2d`` and no timm ``feature_info`` has no spatial layer to default
to: :func:`default_target_layer` refuses it (name a layer: ``layers=[...]`` in Python, ``--layer`` on the
command line), and :func:`guess_layers` falls back to the last top-level child with a warning saying the same.

Example:
    >>> import torchvision
    >>> guess_layers(torchvision.models.vgg11())[0]
    'features.19'
    >>> default_target_layer(torchvision.models.resnet18())
    'layer4'
    >>> default_target_layer(torchvision.models.vit_b_16())
    'encoder.layers.encoder_layer_11.ln_1'
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import nn

from cnnlens.errors import LayerNotFoundError

__all__ = [
    "FAMILY_DEFAULTS",
    "TransformerBlock",
    "default_target_layer",
    "guess_layers",
    "token_model_default",
    "transformer_blocks",
]

_log = logging.getLogger(__name__)

FAMILY_DEFAULTS: tuple[tuple[str, str, str], ...] = (
    ("ViT, DeiT, distilled DeiT, ViTs with register tokens (timm)", "`blocks.<last>.norm1`", "tokens"),
    ("ViT: `vit_b_16`... (torchvision)", "`encoder.layers.encoder_layer_<last>.ln_1`", "tokens"),
    ("Swin (timm)", "`layers.3.blocks.<last>.norm1`", "nhwc"),
    ("Swin: `swin_t`... (torchvision)", "`features.7.<last>.norm1`", "nhwc"),
    ("ConvNeXt (timm)", "`stages.3` (the last stage's output)", "nchw"),
    ("ConvNeXt: `convnext_tiny`... (torchvision)", "`features` (its output is the last stage's, `features.7`)", "nchw"),
    ("CNNs (ResNet, VGG, MobileNet...)", "unchanged: the last post-activation block output", "nchw"),
)
"""``(family, default layer, layout)`` per model family (Markdown): the module docstring's table, for the docs."""

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
_NORMS: tuple[type[nn.Module], ...] = (
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.GroupNorm,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LayerNorm,
)


_TOKEN_NORMS: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.RMSNorm)
_ATTENTION_NAMES = frozenset({"attn", "attention", "self_attn", "self_attention"})


@dataclass(frozen=True)
class TransformerBlock:
    """One transformer block found in a module tree.

    Attributes:
        name: The block's dotted name (``blocks.11``, ``layers.3.blocks.1``, ``encoder.layers.encoder_layer_11``).
        attention_norm: The norm applied before its attention (``blocks.11.norm1``, ``...encoder_layer_11.ln_1``).
        attention: Its attention module (``blocks.11.attn``, ``...encoder_layer_11.self_attention``).
        mlp_norm: The next norm after the attention (``norm2``/``ln_2``), or None.
    """

    name: str
    attention_norm: str
    attention: str
    mlp_norm: str | None


def _is_attention(name: str, module: nn.Module) -> bool:
    return (
        isinstance(module, nn.MultiheadAttention)
        or name in _ATTENTION_NAMES
        or type(module).__name__.lower().endswith("attention")
    )


def transformer_blocks(module: nn.Module) -> list[TransformerBlock]:
    """The transformer blocks of ``module``, in definition order, from the module tree alone.

    A block is a module with an attention child (``nn.MultiheadAttention``, a child named ``attn``/
    ``attention``/``self_attn``/``self_attention``, or a class whose name ends in ``Attention``) that directly
    follows a ``LayerNorm``/``RMSNorm`` child (timm ``Block``/``SwinTransformerBlock``, torchvision
    ``EncoderBlock``/``SwinTransformerBlock``). CNN attention (squeeze-excitation after a conv-norm-act,
    bottleneck self-attention after a convolution) never follows a layer norm, so CNNs have none.

    Args:
        module: The network.

    Returns:
        One :class:`TransformerBlock` per block; empty for a CNN.

    Example:
        >>> import torchvision
        >>> last = transformer_blocks(torchvision.models.swin_t())[-1]
        >>> last.name, last.attention_norm, last.mlp_norm
        ('features.7.1', 'features.7.1.norm1', 'features.7.1.norm2')
    """
    found: list[TransformerBlock] = []
    for name, parent in module.named_modules():
        children = list(parent.named_children())
        for i in range(1, len(children)):
            child_name, child = children[i]
            before_name, before = children[i - 1]
            if not (isinstance(before, _TOKEN_NORMS) and _is_attention(child_name, child)):
                continue
            after = next((n for n, m in children[i + 1 :] if isinstance(m, _TOKEN_NORMS)), None)
            prefix = f"{name}." if name else ""
            found.append(
                TransformerBlock(
                    name=name,
                    attention_norm=prefix + before_name,
                    attention=prefix + child_name,
                    mlp_norm=prefix + after if after is not None else None,
                )
            )
            break
    return found


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


def _conv_after(module: nn.Module, block: str) -> bool:
    """Whether a ``Conv2d`` is defined after ``block`` and outside it (a hybrid whose convolutions come last)."""
    order = [n for n, _ in module.named_modules()]
    start = order.index(block)
    return any(
        isinstance(m, nn.Conv2d) and not n.startswith(block + ".") for n, m in list(module.named_modules())[start + 1 :]
    )


def token_model_default(module: nn.Module) -> str | None:
    """The token-model default (the norm before the last attention block), or None where the CNN policy applies.

    Example:
        >>> import torchvision
        >>> token_model_default(torchvision.models.swin_t()), token_model_default(torchvision.models.resnet18())
        ('features.7.1.norm1', None)
    """
    blocks = transformer_blocks(module)
    if blocks and not _conv_after(module, blocks[-1].name):
        return blocks[-1].attention_norm
    return None


def _guess(module: nn.Module) -> tuple[str | None, dict[str, str]]:
    """The policy's choice, or None when the module has no spatial layer (no Conv2d, no feature_info)."""
    names = dict(module.named_modules())
    # Conv3d counts too: a volume network (video, medical) defaults the same way, its layers are (B, C, d, h, w)
    convs = [n for n, m in module.named_modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))]
    known: dict[str, str] = {}
    default: str | None = None
    default = token_model_default(module)
    if default is not None:
        known["last_block"] = default.rpartition(".")[0]
    if convs:
        known["last_conv"] = convs[-1]
    if convs and default is None:
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
        A dotted ``named_modules()`` name: a block output such as ``layer4`` or ``features.29`` for a CNN, the
        norm before the last attention block (``blocks.11.norm1``) for a token model.

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
    """Pick a default Grad-CAM layer and a few named roles for an arbitrary CNN or token model.

    Args:
        module: the network.

    Returns:
        ``(default_layer, known_layers)``; ``known_layers`` has ``"final_spatial"`` (the default), when the
        network has a ``Conv2d`` ``"last_conv"`` (the highest-numbered convolution in registration order), and
        for a token model ``"last_block"`` (its last transformer block). A module without a spatial layer gets
        its last top-level child, with a warning naming ``--layer``/``layers=`` (see :func:`default_target_layer`,
        which refuses it instead).
    """
    default, known = _guess(module)
    if default is None:
        children = [n for n, _ in module.named_children()]
        default = children[-1] if children else ""
        _log.warning("%s Defaulting to %r for now.", _no_spatial_layer(module), default)
    known["final_spatial"] = default
    return default, known
