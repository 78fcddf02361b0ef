"""The method registry: every explanation method is a pure function registered under a lowercase id.

The CLI's ``--method`` choices, the docs' method list and the contract tests are all generated from this
registry, so adding a method is one registered function plus its tests.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from cnnlens.capture import Probe
from cnnlens.errors import MethodError, MethodNotFoundError
from cnnlens.execution import DEFAULT, Execution

__all__ = [
    "Display",
    "LayerView",
    "MethodFn",
    "MethodOutput",
    "MethodSpec",
    "apply_display",
    "display_mode",
    "get_method",
    "iter_methods",
    "method_ids",
    "register",
    "resolve_methods",
]

Need = Literal["activations", "gradients", "input_gradients", "probe"]

Display = Literal["relu", "abs", "signed"]
"""How a raw map is shown before upsampling and normalisation: ``ReLU(raw)``, ``|raw|`` or ``raw`` itself."""

_DISPLAYS: tuple[Display, ...] = ("relu", "abs", "signed")


@dataclass(frozen=True)
class LayerView:
    """What a method sees for one layer and one target.

    Attributes:
        layer: The layer key.
        activation: ``(B, C, h, w)`` the layer's output.
        gradient: ``(B, C, h, w)`` d score / d activation, or None when not captured.
        inputs: ``(B, C, H, W)`` the model input.
        input_gradient: ``(B, C, H, W)`` d score / d input, or None.
        score: ``(B,)`` the explained score.
        target_class: ``(B,)`` the explained class (``-1`` for custom targets).
        target: Index of the explained target in the recording (for :class:`cnnlens.capture.Probe` calls).
        probe: Extra forwards/backwards with the targets fixed (perturbation methods, guided backprop,
            Integrated Gradients, smoothing); None when a method is called outside :func:`cnnlens.explain`.
        execution: How to run extra forwards (layout, memory budget, chunk size); never changes the result's
            meaning and is not part of the method's variant.
    """

    layer: str
    activation: torch.Tensor
    gradient: torch.Tensor | None
    inputs: torch.Tensor
    input_gradient: torch.Tensor | None
    score: torch.Tensor
    target_class: torch.Tensor
    target: int = 0
    probe: Probe | None = None
    execution: Execution = DEFAULT

    def require_probe(self, method: str) -> Probe:
        """Return the probe or raise a clear error when the method runs outside a capture."""
        if self.probe is None:
            raise MethodError(f"{method} runs extra forward passes and needs a probe: call it through explain().")
        return self.probe

    def require_gradient(self, method: str) -> torch.Tensor:
        """Return the gradient or raise a clear error when it was not captured."""
        if self.gradient is None:
            raise MethodError(f"{method} needs gradients at layer {self.layer!r}, but none were captured.")
        return self.gradient


MethodFn = Callable[..., "torch.Tensor | MethodOutput"]


@dataclass(frozen=True)
class MethodOutput:
    """What a method may return instead of a bare map: the raw map plus per-sample diagnostics.

    Attributes:
        raw: ``(B, h, w)`` raw signed map.
        extras: Name -> ``(B,)`` per-sample values (e.g. Integrated Gradients' convergence delta, or a flag
            that a denominator was near zero); they end up in ``Explanation.extras`` as ``(B, T)``.
    """

    raw: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class MethodSpec:
    """A registered method.

    Attributes:
        id: Lowercase identifier (``gradcam``).
        title: Display name (``Grad-CAM``).
        fn: ``fn(view: LayerView, **options)`` -> ``(B, h, w)`` raw signed map, before any ReLU, or a
            :class:`MethodOutput` carrying per-sample diagnostics too.
        needs: What the method needs from the capture.
        relu: Whether the displayed map is ``ReLU(raw)`` (CAM convention) or the raw map itself; exposed as
            the boolean option ``relu`` when ``display`` is None.
        display: None for the CAM convention above; otherwise the default display rule (``"relu"``,
            ``"abs"`` or ``"signed"``), exposed as the option ``display`` instead of ``relu`` (gradient
            attributions default to ``"abs"``). See :func:`display_mode`.
        defaults: Option names and default values; the variant of a result is these merged with the user's.
        paper: The reference.
        formula: The formula in one line.
        summary: One sentence for CLI help and docs.
    """

    id: str
    title: str
    fn: MethodFn
    needs: frozenset[Need]
    relu: bool = True
    display: Display | None = None
    defaults: Mapping[str, Any] = field(default_factory=dict)
    paper: str = ""
    formula: str = ""
    summary: str = ""

    def variant(self, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Merge user options into the defaults, refusing unknown option names."""
        merged = dict(self.defaults)
        if self.display is None:
            merged.setdefault("relu", self.relu)
        else:
            merged.setdefault("display", self.display)
        for key, value in (options or {}).items():
            if key not in merged:
                known = ", ".join(sorted(merged)) or "none"
                raise MethodError(f"method {self.id!r} has no option {key!r}; its options are: {known}.")
            merged[key] = value
        display_mode(merged)  # validates a user-given display
        return merged

    def compute(self, view: LayerView, options: Mapping[str, Any]) -> MethodOutput:
        """Run the method on one layer view with the given (merged) options."""
        kwargs = {k: v for k, v in options.items() if k not in ("relu", "display")}
        out = self.fn(view, **kwargs)
        return out if isinstance(out, MethodOutput) else MethodOutput(out)


def display_mode(variant: Mapping[str, Any]) -> Display:
    """The display rule of a variant: its ``display`` option, else ``"relu"``/``"signed"`` from ``relu``.

    Example:
        >>> display_mode({"relu": False}), display_mode({"display": "abs"}), display_mode({})
        ('signed', 'abs', 'relu')
    """
    if "display" in variant:
        mode = variant["display"]
        if mode not in _DISPLAYS:
            raise MethodError(f"display must be one of {', '.join(map(repr, _DISPLAYS))}; got {mode!r}.")
        return mode  # type: ignore[no-any-return]
    return "relu" if variant.get("relu", True) else "signed"


def apply_display(raw: torch.Tensor, mode: Display) -> torch.Tensor:
    """Apply a display rule to raw maps: ``ReLU(raw)``, ``|raw|`` or ``raw`` unchanged.

    Example:
        >>> apply_display(torch.tensor([-2.0, 1.0]), "abs").tolist()
        [2.0, 1.0]
    """
    if mode == "relu":
        return torch.relu(raw)
    if mode == "abs":
        return raw.abs()
    return raw


_REGISTRY: dict[str, MethodSpec] = {}


def register(
    id: str,
    *,
    title: str,
    needs: set[Need] | frozenset[Need],
    relu: bool = True,
    display: Display | None = None,
    defaults: Mapping[str, Any] | None = None,
    paper: str = "",
    formula: str = "",
    summary: str = "",
) -> Callable[[MethodFn], MethodFn]:
    """Register a method function under ``id`` (decorator).

    Example:
        >>> @register("toy", title="Toy", needs={"activations"})
        ... def toy(view):
        ...     return view.activation.sum(1)
        >>> get_method("toy").title
        'Toy'
        >>> _ = _REGISTRY.pop("toy")
    """
    if id != id.lower() or not id.isidentifier():
        raise MethodError(f"method ids are lowercase identifiers, got {id!r}.")
    if display is not None and display not in _DISPLAYS:
        raise MethodError(f"display must be None or one of {', '.join(map(repr, _DISPLAYS))}; got {display!r}.")

    def decorator(fn: MethodFn) -> MethodFn:
        if id in _REGISTRY:
            raise MethodError(f"a method is already registered as {id!r}.")
        _REGISTRY[id] = MethodSpec(
            id=id,
            title=title,
            fn=fn,
            needs=frozenset(needs),
            relu=relu,
            display=display,
            defaults=dict(defaults or {}),
            paper=paper,
            formula=formula,
            summary=summary,
        )
        return fn

    return decorator


def get_method(id: str) -> MethodSpec:
    """Return the method registered under ``id`` (case-insensitive), with suggestions when unknown."""
    key = id.lower().replace("-", "").replace("_", "") if isinstance(id, str) else id
    for candidate in (id, id.lower() if isinstance(id, str) else id, key):
        if candidate in _REGISTRY:
            return _REGISTRY[candidate]
    close = difflib.get_close_matches(str(id).lower(), list(_REGISTRY), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise MethodNotFoundError(f"no method {id!r}.{hint} Registered methods: {', '.join(sorted(_REGISTRY))}.")


def method_ids() -> list[str]:
    """Every registered id, in registration order."""
    return list(_REGISTRY)


def iter_methods() -> Iterator[MethodSpec]:
    """Every registered method, in registration order."""
    return iter(list(_REGISTRY.values()))


def resolve_methods(
    methods: str | MethodSpec | list[str | MethodSpec] | tuple[str | MethodSpec, ...],
) -> list[MethodSpec]:
    """Turn ``"all"``, an id, or a list of ids/specs into a de-duplicated list of specs."""
    if isinstance(methods, (str, MethodSpec)):
        methods = [methods]
    out: list[MethodSpec] = []
    for m in methods:
        if isinstance(m, str) and m.lower() == "all":
            specs = list(_REGISTRY.values())
        else:
            specs = [m if isinstance(m, MethodSpec) else get_method(m)]
        out.extend(s for s in specs if s not in out)
    if not out:
        raise MethodError("no method given; name at least one (e.g. 'gradcam').")
    return out
