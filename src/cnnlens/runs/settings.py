"""What a run computes for each batch: :class:`RunSettings` (part of the run's fingerprint) and its pairs.

Only what changes the results is here: methods, layers, method options (which hold no execution knobs: those
are in :class:`cnnlens.Execution`), the metrics and the overlays. How a run executes (batch size, workers,
device, memory budget, chunks, layout, threads) is given to :meth:`cnnlens.runs.DatasetRun.execute` instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from cnnlens.explain import default_layer
from cnnlens.methods.registry import resolve_methods
from cnnlens.models import LoadedModel
from cnnlens.runs.errors import RunError

__all__ = ["PAIR_METRICS", "Pair", "RunSettings", "column"]

PAIR_METRICS: tuple[str, ...] = (
    "score",
    "degenerate",
    "avg_drop",
    "increase",
    "energy_in_box",
    "pointing",
)
"""Per (method, layer) metrics, each stored as ``<name>_pred`` and ``<name>_true``."""


def column(method: str, layer: str, name: str) -> str:
    """The results column of ``name`` for one (method, layer) pair, e.g. ``"gradcam/layer4/avg_drop_pred"``.

    Method ids are lowercase words and layer keys dotted module paths, so ``/`` never occurs inside them.
    """
    return f"{method}/{layer}/{name}"


@dataclass(frozen=True)
class Pair:
    """One (method, layer) of a run, with its method variant and a file-name-safe key."""

    method: str
    layer: str
    variant: Mapping[str, Any]
    key: str

    def col(self, name: str) -> str:
        """The column ``method/layer/name``."""
        return column(self.method, self.layer, name)


def _slug(text: str) -> str:
    out = "".join(c if c.isalnum() or c in "._-" else "_" for c in text).strip("._")
    return out or "x"


@dataclass(frozen=True)
class RunSettings:
    """What a run computes for each batch (part of the run's configuration fingerprint).

    Attributes:
        methods: Method ids (``"all"`` expands to every registered method).
        layers: Layer names; empty: the model's default layer.
        options: Per-method options, ``{"gradcampp": {"alpha_normalize": True}}``.
        top_k: How many top classes each row lists (capped at the number of classes).
        average_drop: Compute the Average Drop / Increase-in-Confidence terms (one extra forward per map).
        overlays: Build overlay pictures of misclassified images.
        cmap: Matplotlib colour map of the overlays.
        alpha: Opacity of the map in overlays.
        overlay_format: ``"jpeg"`` (quality 90) or ``"png"`` (lossless, ~20x slower to write, ~8x larger).
        layout: How the explained layers' outputs map to ``(C, h, w)`` maps (``explain(layout=...)``): ``None``
            infers them (ViT tokens, channels-last outputs); one layout text for every layer, or ``{layer: text}``.
            Part of the fingerprint only when given, so runs made before this setting keep theirs.
    """

    methods: tuple[str, ...] = ("gradcam",)
    layers: tuple[str, ...] = ()
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    top_k: int = 5
    average_drop: bool = True
    overlays: bool = True
    cmap: str = "jet"
    alpha: float = 0.5
    overlay_format: str = "jpeg"
    layout: str | Mapping[str, str] | None = None

    def resolve(self, model: LoadedModel) -> RunSettings:
        """Method ids canonical, default layer filled in, options validated, ``top_k`` capped.

        Raises:
            MethodNotFoundError: Unknown method id.
            MethodError: Unknown option.
            RunError: Options for a method that is not run; ``top_k < 1``.
        """
        specs = resolve_methods(list(self.methods))
        ids = tuple(spec.id for spec in specs)
        options = {k.lower(): dict(v) for k, v in self.options.items()}
        extra = sorted(set(options) - set(ids))
        if extra:
            raise RunError(
                f"options were given for method(s) {extra} that this run does not use; add them to --method."
            )
        for spec in specs:
            spec.variant(options.get(spec.id))  # validates
        layers = tuple(dict.fromkeys(self.layers)) or (default_layer(model),)
        if self.top_k < 1:
            raise RunError(f"--top-k must be at least 1, got {self.top_k}.")
        if self.overlay_format not in ("jpeg", "png"):
            raise RunError(f"the overlay format must be 'jpeg' or 'png', got {self.overlay_format!r}.")
        if not 0.0 <= self.alpha <= 1.0:
            raise RunError(f"the overlay alpha must be in [0, 1], got {self.alpha}.")
        return replace(
            self,
            methods=ids,
            layers=layers,
            options={k: options[k] for k in ids if k in options},
            top_k=min(self.top_k, model.spec.num_classes),
        )

    def pairs(self) -> list[Pair]:
        """The (method, layer) pairs in result order (methods outer, layers inner); settings must be resolved."""
        specs = {spec.id: spec for spec in resolve_methods(list(self.methods))}
        out: list[Pair] = []
        keys: set[str] = set()
        for method in self.methods:
            spec = specs[method.lower()]
            for layer in self.layers if spec.scope == "layer" else [spec.scope]:  # one map for input/network scope
                key = f"{_slug(spec.id)}@{_slug(layer)}"
                if key in keys:
                    key = f"{key}-{len(out)}"
                keys.add(key)
                out.append(Pair(spec.id, layer, spec.variant(self.options.get(spec.id)), key))
        return out

    def as_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (for ``run.json`` and the fingerprint)."""
        layout: dict[str, Any] = {}  # only when given, so the fingerprints of runs without it stay as they were
        if isinstance(self.layout, str):
            layout = {"layout": self.layout}
        elif self.layout is not None:
            layout = {"layout": dict(sorted(self.layout.items()))}
        return {
            "methods": list(self.methods),
            "layers": list(self.layers),
            "options": {k: dict(v) for k, v in sorted(self.options.items())},
            "top_k": self.top_k,
            "average_drop": self.average_drop,
            "overlays": self.overlays,
            "cmap": self.cmap,
            "alpha": self.alpha,
            "overlay_format": self.overlay_format,
            **layout,
        }
