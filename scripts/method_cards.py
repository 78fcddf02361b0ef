"""Draw the example picture of every registered method for the method cards (``docs/images/methods/<id>.png``).

Run from the repository root: ``.venv/bin/python scripts/method_cards.py`` (offline, a few minutes on a CPU;
Score-CAM and Ablation-CAM run one forward per channel of ``bn2``). Every method is explained on
scikit-image's ``chelsea`` with the embedded EfficientNet-Lite0 (ImageNet weights), for the top class, at the
layer of :data:`cnnlens.report.methods_doc.EXAMPLE_LAYER` for layer-scope methods; the attention methods use a
randomly initialised ViT-Tiny (no CNN has attention), as their captions in ``docs/methods.md`` say. Each
picture is the map over the photo drawn exactly as ``cnnlens explain`` draws its ``.overlay.png``
(:func:`cnnlens.notebook.overlay_tiles`). Rerunning rewrites the same files; ``--only gradcam saliency`` redraws
some; ``--check`` only lists the methods whose picture is missing (exit code 1 if any).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import cnnlens
from cnnlens.data.samples import sample_image
from cnnlens.explanation import Explanation
from cnnlens.imaging import save_png
from cnnlens.methods import iter_methods
from cnnlens.methods.registry import MethodSpec
from cnnlens.notebook import overlay_tiles
from cnnlens.report.methods_doc import EXAMPLE_IMAGES, EXAMPLE_LAYER, EXAMPLE_VIT, example_caption

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _attention(spec: MethodSpec) -> bool:
    return bool({"attention", "attention_gradients"} & set(spec.needs))


def explain_examples(specs: list[MethodSpec]) -> dict[str, Explanation]:
    """One explanation of ``chelsea`` per method: CNN methods in one call, attention methods on a ViT."""
    out: dict[str, Explanation] = {}
    cnn = [s.id for s in specs if not _attention(s)]
    vit = [s.id for s in specs if _attention(s)]
    if cnn:
        model = cnnlens.load_model("efficientnet_lite0")
        x = model.spec.preprocessing.to_tensor(sample_image("chelsea"))[None]
        result = cnnlens.explain(model, x, methods=cnn, layers=[EXAMPLE_LAYER], image_names=["chelsea"])
        for method in cnn:
            (out[method],) = result.by_method(method).values()
    if vit:
        model = cnnlens.load_model(EXAMPLE_VIT, random_weights=True)
        x = model.spec.preprocessing.to_tensor(sample_image("chelsea"))[None]
        result = cnnlens.explain(model, x, methods=vit, image_names=["chelsea"])
        for method in vit:
            (out[method],) = result.by_method(method).values()
    return out


def main(argv: list[str] | None = None) -> int:
    """Draw (or check) the pictures; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", metavar="ID", help="draw only these methods")
    parser.add_argument("--check", action="store_true", help="list the methods whose picture is missing")
    args = parser.parse_args(argv)
    folder = DOCS / EXAMPLE_IMAGES
    specs = [s for s in iter_methods() if not args.only or s.id in args.only]
    if args.check:
        missing = [s.id for s in specs if not (folder / f"{s.id}.png").is_file()]
        print("missing:", " ".join(missing) if missing else "none")
        return 1 if missing else 0
    torch.manual_seed(0)
    for method, explanation in explain_examples(specs).items():
        (tile,) = overlay_tiles([explanation], limit=1)
        path = save_png(folder / f"{method}.png", tile.picture)
        spec = next(s for s in specs if s.id == method)
        print(f"{path.relative_to(DOCS.parent)}: {example_caption(spec)} ({tile.label}, score {tile.score:.3g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
