"""The method reference (``docs/methods.md``), generated from the registry so it can never drift."""

from __future__ import annotations

import inspect

from cnnlens.methods import iter_methods
from cnnlens.methods.registry import MethodSpec, volume_method_ids

__all__ = [
    "EXAMPLE_IMAGES",
    "EXAMPLE_LAYER",
    "EXAMPLE_VIT",
    "default_layers_markdown",
    "display_rule",
    "example_caption",
    "method_card",
    "methods_markdown",
    "volumes_markdown",
]

_COST = {
    "activations": "the layer's activations from the shared forward",
    "gradients": "gradients at the layer from the shared backward (one per target)",
    "input_gradients": "gradients at the input from the shared backward (the graph is then recorded from the input)",
    "probe": "extra forward/backward passes of its own (see below)",
    "attention": "every block's attention probabilities (vision transformers; timm fused attention switched off)",
    "attention_gradients": "the attention's gradients from an extra forward and one gradient pass per target",
}


_TRANSFORMER_SECTION = """# Transformer methods

Methods that read the attention probabilities of a vision transformer's blocks instead of a layer's feature
map (network scope: one map per call under the layer key `network`, on the patch grid, upsampled to the input
like every other map). Supported: timm ViT-style models (ViT, DeiT and distilled DeiT, ViTs with register
tokens, EVA: attention modules with a `fused_attn` switch, turned off for the call only and restored after)
and torchvision's `VisionTransformer` (its `nn.MultiheadAttention` is asked for per-head weights for the call
only). The class/distillation/register tokens and the grid come from the model and the input size, never from
`sqrt(N)`. CNNs, Swin's windowed attention and attention implementations that cannot expose their
probabilities are refused with an error naming the model. `rollout` is class-agnostic (every target gets the
same map); `attngrad` is class-specific.
"""


def _body(spec: MethodSpec) -> str:
    doc = inspect.getdoc(spec.fn) or ""
    lines = doc.splitlines()
    kept: list[str] = []
    for line in lines[1:]:
        if line.strip() in {"Args:", "Returns:", "Example:", "Examples:", "Raises:"}:
            break
        kept.append(line)
    return "\n".join(kept).strip()


EXAMPLE_IMAGES = "images/methods"
"""Where the example picture of each method lies, relative to ``docs/`` (``scripts/method_cards.py`` draws them)."""

EXAMPLE_LAYER = "bn2"
"""The layer of the layer-scope examples: the embedded EfficientNet-Lite0's default (last spatial) layer."""

EXAMPLE_VIT = "vit_tiny_patch16_224"
"""The model of the attention methods' examples (timm, random weights: the embedded model has no attention)."""


def display_rule(spec: MethodSpec) -> str:
    """How a method's raw map becomes the picture: the display rule, the option that changes it, the colours.

    Example:
        >>> from cnnlens.methods import get_method
        >>> display_rule(get_method("saliency")).split(";")[0]
        '`|raw|` (option `display`: `relu`, `abs` or `signed`)'
    """
    if spec.display is None:
        rule = "`ReLU(raw)`" if spec.relu else "`raw`, signed"
        head = f"{rule} (option `relu`: `true` keeps the positive part, `false` the signed map)"
        colours = "drawn with `jet` at opacity 0.5 over the image"
    else:
        rule = {"relu": "`ReLU(raw)`", "abs": "`|raw|`", "signed": "`raw`, signed"}[spec.display]
        head = f"{rule} (option `display`: `relu`, `abs` or `signed`)"
        colours = (
            "a pixel attribution: scaled to its 99th percentile and drawn in `inferno` with an opacity "
            "proportional to the map, so the photo shows where it is zero"
        )
    return f"{head}; then upsampled bilinearly to the input and min-max normalised per map; {colours}"


def example_caption(spec: MethodSpec) -> str:
    """What the method's example picture shows (model, photo, layer), from the registry alone."""
    if "attention" in spec.needs or "attention_gradients" in spec.needs:
        return (
            f"{spec.title} on a randomly initialised `{EXAMPLE_VIT}` (the embedded CNN has no attention) and "
            "scikit-image's `chelsea`: it shows the map's form on the 14x14 patch grid, not a trained model's "
            "explanation"
        )
    where = f"at layer `{EXAMPLE_LAYER}`" if spec.scope == "layer" else f"({spec.scope} scope)"
    return f"{spec.title} of the embedded EfficientNet-Lite0 {where} on scikit-image's `chelsea`, class 282 tiger cat"


def method_card(spec: MethodSpec) -> str:
    """One method's card in Markdown: paper, formula, options, display rule, what it needs, an example picture."""
    options = ", ".join(f"`{k}={v!r}`" for k, v in spec.variant().items())
    needs = "; ".join(_COST.get(n, n) for n in sorted(spec.needs))
    caption = example_caption(spec)
    parts = [
        f"## {spec.title} (`{spec.id}`)",
        "",
        spec.summary,
        "",
        f"- **Paper**: {spec.paper}",
        f"- **Formula**: `{spec.formula}`",
        f"- **Options (defaults)**: {options}",
        f"- **Display rule**: {display_rule(spec)}",
        f"- **Needs / cost**: {needs}",
        "",
        _body(spec),
        "",
        f"![{caption.replace('`', '')}]({EXAMPLE_IMAGES}/{spec.id}.png)",
        "",
        f"*{caption}; drawn by `scripts/method_cards.py`.*",
        "",
    ]
    return "\n".join(parts)


def volumes_markdown() -> str:
    """The "Volumes" paragraph: which methods run on ``(B, C, d, h, w)`` layers and how to call them."""
    ids = ", ".join(f"`{i}`" for i in volume_method_ids())
    return "\n".join(
        [
            "## Volumes",
            "",
            "Methods that also run on volumes, inputs `(B, C, D, H, W)` of `Conv3d` networks (video, medical",
            "scans) and layers `(B, C, d, h, w)`:",
            f"{ids}.",
            "Their sums and means over `(h, w)` run over every voxel `(d, h, w)` (Grad-CAM's `Z = d*h*w`,",
            "Grad-CAM++'s `sum_ab(A_k)`), Eigen-CAM's matrix is",
            "`(d*h*w, C)`, and Score-CAM's masks are upsampled trilinearly. Call `explain` as for images, with a",
            'volume batch and a `Conv3d` layer: `cnnlens.explain(net, x, methods=["gradcam", "layercam"],',
            'layers=["features.4"])` with `x` of shape `(B, C, D, H, W)` gives raw maps `(B, T, d, h, w)` and maps',
            "`(B, T, D, H, W)` (trilinear upsampling, `align_corners=False`, normalised per volume). Any other method",
            "raises `MethodError` before the forward, naming the method, the shape and the methods above. `save()`",
            "writes each whole raw volume (`.raw.npy`) and map (`.map.npy`), and draws the PNGs of the middle depth",
            "slice `D // 2` (`Explanation.depth_slice`; `images` holds that slice of the input).",
            "",
        ]
    )


def default_layers_markdown() -> str:
    """The "Default layers of token models" section: the layer each family gets when none is named."""
    from cnnlens.models.layers import FAMILY_DEFAULTS

    rows = [f"| {family} | {layer} | `{layout}` |" for family, layer, layout in FAMILY_DEFAULTS]
    return "\n".join(
        [
            "## Default layers of token models",
            "",
            "With no layer named (`layers=` in Python, `--layer` on the command line), a network with transformer",
            "blocks and no convolution after them gets **the norm before its last attention block**: the last",
            "block's own output is useless under a class-token head (only its class token reaches the head, so its",
            "patch tokens get exactly zero gradient and every gradient CAM is zero), while the input of the last",
            "attention still reaches the class token. Its output is read through the layer's layout (tokens with",
            "their prefix tokens left out, or channels last), inferred from the model and the input size and",
            "printed by `cnnlens explain`; `layout=`/`--layout` overrides it. Every CNN keeps its default.",
            "",
            "| family | default layer | layout |",
            "|---|---|---|",
            *rows,
            "",
        ]
    )


def methods_markdown() -> str:
    """The whole method reference, one card per registered method, in registration order."""
    specs = list(iter_methods())
    header = [
        "# Methods",
        "",
        "Generated from the method registry by `cnnlens methods --markdown > docs/methods.md`; a test fails when",
        "this file and the registry disagree. Every method returns a raw, signed map at layer (or input)",
        "resolution; the displayed map applies the method's display rule, bilinear upsampling and per-map",
        "min-max normalisation. Scores are logits unless a target says otherwise.",
        "",
        "| id | method | formula |",
        "|---|---|---|",
        *[f"| `{s.id}` | {s.title} | `{s.formula}` |" for s in specs],
        "",
    ]
    first_attention = next((s.id for s in specs if "attention" in s.needs), None)
    cards = [(_TRANSFORMER_SECTION + "\n" if s.id == first_attention else "") + method_card(s) for s in specs]
    sections = volumes_markdown() + "\n" + default_layers_markdown()
    return "\n".join(header) + "\n" + sections + "\n" + "\n".join(cards)
