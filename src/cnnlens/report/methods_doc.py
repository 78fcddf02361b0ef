"""The method reference (``docs/methods.md``), generated from the registry so it can never drift."""

from __future__ import annotations

import inspect

from cnnlens.methods import iter_methods
from cnnlens.methods.registry import MethodSpec

__all__ = ["method_card", "methods_markdown"]

_COST = {
    "activations": "the layer's activations from the shared forward",
    "gradients": "gradients at the layer from the shared backward (one per target)",
    "input_gradients": "gradients at the input from the shared backward (the graph is then recorded from the input)",
    "probe": "extra forward/backward passes of its own (see below)",
    "attention": "every block's attention probabilities (vision transformers; timm fused attention switched off)",
    "attention_gradients": "the attention's gradients from an extra forward and one gradient pass per target",
}


def _body(spec: MethodSpec) -> str:
    doc = inspect.getdoc(spec.fn) or ""
    lines = doc.splitlines()
    kept: list[str] = []
    for line in lines[1:]:
        if line.strip() in {"Args:", "Returns:", "Example:", "Examples:", "Raises:"}:
            break
        kept.append(line)
    return "\n".join(kept).strip()


def method_card(spec: MethodSpec) -> str:
    """One method's formula card in Markdown: paper, formula, variant choices, what it needs, cost."""
    options = ", ".join(f"`{k}={v!r}`" for k, v in spec.variant().items())
    needs = "; ".join(_COST.get(n, n) for n in sorted(spec.needs))
    parts = [
        f"## {spec.title} (`{spec.id}`)",
        "",
        spec.summary,
        "",
        f"- **Paper**: {spec.paper}",
        f"- **Formula**: `{spec.formula}`",
        f"- **Options (defaults)**: {options}",
        f"- **Needs / cost**: {needs}",
        "",
        _body(spec),
        "",
    ]
    return "\n".join(parts)


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
    return "\n".join(header) + "\n" + "\n".join(method_card(s) for s in specs)
