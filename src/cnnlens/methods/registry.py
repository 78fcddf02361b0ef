"""The method registry: every explanation method is a pure function registered under a lowercase id.

The CLI's ``--method`` choices, the docs' method list and the contract tests are all generated from this
registry, so adding a method is one registered function (or one :class:`cnnlens.methods.cam.CamMethod`
subclass) plus its tests.

Scopes: a method declares what it explains. ``"layer"`` methods (the CAM family) give one map per requested
layer; ``"input"`` methods (pixel-space attributions) give ONE map for the call whatever the layers, stored
under the layer key ``"input"``; ``"network"`` methods (FullGrad) declare the modules they need recorded
(``records(model) -> names``) and get them in :attr:`LayerView.network`, stored under the layer key
``"network"``.

Options: ``get_method("gradcampp").bind(alpha_normalize=True)`` checks option names and types when it is
called and returns a frozen :class:`BoundMethod` that ``explain(methods=[...])`` accepts beside ids.

Volumes: a method registered with ``volumes=True`` also runs on volumes, inputs ``(B, C, D, H, W)`` and layer
views ``(B, C, d, h, w)`` (``Conv3d`` networks), and returns raw maps ``(B, d, h, w)``. Every other method is
refused on a volume with a :class:`MethodError` naming the method, the shape and the methods that do work
(:func:`check_volumes`, :func:`volume_method_ids`).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

import torch

from cnnlens.capture import Probe
from cnnlens.errors import MethodError, MethodNotFoundError, OptionError
from cnnlens.execution import DEFAULT, Execution
from cnnlens.methods.options import BoundMethod, check_count, check_type

if TYPE_CHECKING:
    from torch import nn

    from cnnlens.capture import Recording

__all__ = [
    "BoundMethod",
    "Display",
    "LayerView",
    "MethodFn",
    "MethodOutput",
    "MethodSpec",
    "NetworkRecord",
    "Scope",
    "apply_display",
    "check_count",
    "check_volumes",
    "display_mode",
    "get_method",
    "iter_methods",
    "method_ids",
    "register",
    "resolve_bound",
    "resolve_methods",
    "volume_method_ids",
]

Need = Literal["activations", "gradients", "input_gradients", "probe", "attention", "attention_gradients"]
"""``attention``: the attention probabilities of every block (cnnlens.capture.attention), recorded during the main
forward; ``attention_gradients``: recorded with their gradients in an extra forward (methods/transformer.py)."""

Display = Literal["relu", "abs", "signed"]
"""How a raw map is shown before upsampling and normalisation: ``ReLU(raw)``, ``|raw|`` or ``raw`` itself."""

_DISPLAYS: tuple[Display, ...] = ("relu", "abs", "signed")

Scope = Literal["layer", "input", "network"]
"""What a method explains: one layer (a map per requested layer), the input (one pixel-space map per call),
or the whole network (one map per call from modules the method names itself)."""

_SCOPES: tuple[Scope, ...] = ("layer", "input", "network")


@dataclass(frozen=True)
class NetworkRecord:
    """What a network-scope method sees: every module it asked for, recorded for one target.

    Attributes:
        modules: Module name -> module (to read parameters such as biases).
        activations: Module name -> its output ``(B, ...)``.
        gradients: Module name -> d score / d output, same shape.
    """

    modules: Mapping[str, Any]
    activations: Mapping[str, torch.Tensor]
    gradients: Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class LayerView:
    """What a method sees for one layer and one target.

    Attributes:
        layer: The layer key.
        activation: ``(B, C, h, w)`` the layer's output (``(B, C, d, h, w)`` for a volume).
        gradient: ``(B, C, h, w)`` d score / d activation, or None when not captured.
        inputs: ``(B, C, H, W)`` the model input (``(B, C, D, H, W)`` for a volume).
        input_gradient: ``(B, C, H, W)`` d score / d input, or None.
        score: ``(B,)`` the explained score.
        target_class: ``(B,)`` the explained class (``-1`` for custom targets).
        target: Index of the explained target in the recording (for :class:`cnnlens.capture.Probe` calls).
        probe: Extra forwards/backwards with the targets fixed (perturbation methods, guided backprop,
            Integrated Gradients, smoothing); None when a method is called outside :func:`cnnlens.explain`.
        execution: How to run extra forwards (layout, memory budget, chunk size); never changes the result's
            meaning and is not part of the method's variant.
        network: For network-scope methods, the modules they asked for (:class:`NetworkRecord`); else None.
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
    network: NetworkRecord | None = None

    @classmethod
    def of(
        cls,
        rec: Recording,
        layer: str,
        t: int,
        *,
        probe: Probe | None = None,
        execution: Execution = DEFAULT,
        network: NetworkRecord | None = None,
    ) -> LayerView:
        """The view of target ``t`` at ``layer`` of a recording: the one LayerView builder.

        ``layer`` may be unrecorded for input- and network-scope views, which then see the input as their
        activation.
        """
        assert rec.scores is not None  # set by Capture.run()
        assert rec.target_classes is not None
        grad = rec.gradients.get(layer)
        return cls(
            layer=layer,
            activation=rec.activations.get(layer, rec.inputs),
            gradient=None if grad is None else grad[t],
            inputs=rec.inputs,
            input_gradient=None if rec.input_gradients is None else rec.input_gradients[t],
            score=rec.scores[:, t],
            target_class=rec.target_classes[:, t],
            target=t,
            probe=probe,
            execution=execution,
            network=network,
        )

    def require_feature_map(self, method: str) -> torch.Tensor:
        """Return the ``(B, C, h, w)`` or ``(B, C, d, h, w)`` activation, or raise a clear error.

        The error names ``method``, the layer, the shape received and what to do: a 3-D output is read as
        tokens ``(B, N, C)`` (give the layer's layout), a 2-D one as a vector after pooling (pick an earlier
        layer).

        Example:
            >>> v = LayerView("fc", torch.zeros(2, 10), None, torch.zeros(2, 3, 8, 8), None, torch.zeros(2),
            ...               torch.zeros(2, dtype=torch.long))
            >>> v.require_feature_map("gradcam")
            Traceback (most recent call last):
            ...
            cnnlens.errors.MethodError: gradcam needs a feature map (B, C, h, w) or a volume (B, C, d, h, w), ...
        """
        ndim = self.activation.ndim
        if ndim in (4, 5):
            return self.activation
        shape = tuple(self.activation.shape)
        head = (
            f"{method} needs a feature map (B, C, h, w) or a volume (B, C, d, h, w), but layer {self.layer!r} "
            f"gives shape {shape}"
        )
        if ndim == 3:
            hint = (
                "; that looks like tokens (B, N, C) or another sequence: give the layer's layout so capture maps "
                "it to (B, C, h, w) (layout='tokens' for a ViT/DeiT block, 'nhwc' for channels-last outputs; "
                "--layout on the command line), or target a convolutional layer."
            )
        elif ndim == 2:
            hint = "; that is a vector per sample (after global pooling or flattening): target an earlier layer."
        else:
            hint = "; target a convolutional layer or block."
        raise MethodError(head + hint)

    def require_network(self, method: str) -> NetworkRecord:
        """Return the network record or raise a clear error when the method runs outside explain()."""
        if self.network is None:
            raise MethodError(f"{method} needs every module it names recorded: call it through explain().")
        return self.network

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
            A user value must have its default's type (a bool for a bool, an int for an int, a number for a
            float, a str for a str); a None default accepts anything the method itself validates.
        scope: ``"layer"``, ``"input"`` or ``"network"`` (see the module docstring).
        records: For network scope: ``records(model) -> module names`` the method needs recorded.
        volumes: Whether the method also runs on volumes (inputs ``(B, C, D, H, W)``, layer views
            ``(B, C, d, h, w)``, raw maps ``(B, d, h, w)``); other methods are refused on them
            (:func:`check_volumes`).
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
    scope: Scope = "layer"
    records: Callable[[nn.Module], list[str]] | None = None
    volumes: bool = False

    def variant(self, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Merge user options into the defaults, refusing unknown option names and wrongly typed values.

        Raises:
            OptionError: An option the method does not have, or a value of the wrong type.
        """
        merged = dict(self.defaults)
        if self.display is None:
            merged.setdefault("relu", self.relu)
        else:
            merged.setdefault("display", self.display)
        for key, value in (options or {}).items():
            if key not in merged:
                known = ", ".join(sorted(merged)) or "none"
                raise OptionError(f"method {self.id!r} has no option {key!r}; its options are: {known}.")
            check_type(self.id, key, value, merged[key])
            merged[key] = value
        try:
            display_mode(merged)  # validates a user-given display
        except MethodError as err:
            raise OptionError(f"method {self.id!r}: {err}") from None
        return merged

    def bind(self, **options: Any) -> BoundMethod:
        """This method with options fixed, checked now (names, types): usable in ``explain(methods=[...])``.

        Example:
            >>> import cnnlens.methods
            >>> bound = get_method("gradcampp").bind(alpha_normalize=True)
            >>> bound.id, dict(bound.options)
            ('gradcampp', {'alpha_normalize': True})
            >>> get_method("gradcampp").bind(alpha_normalise=True)
            Traceback (most recent call last):
            ...
            cnnlens.errors.OptionError: method 'gradcampp' has no option 'alpha_normalise'; its options are: ...
        """
        self.variant(options)
        return BoundMethod(self, MappingProxyType(dict(options)))

    def compute(self, view: LayerView, options: Mapping[str, Any]) -> MethodOutput:
        """Run the method on one layer view with the given (merged) options.

        Raises:
            MethodError: The view is a volume and the method does not run on volumes (:func:`check_volumes`).
        """
        if not self.volumes:
            if view.inputs.ndim == 5:
                raise MethodError(_volume_refusal(self.id, tuple(view.inputs.shape)))
            if self.scope == "layer" and view.activation.ndim == 5:
                raise MethodError(_volume_refusal(self.id, tuple(view.activation.shape)))
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


def volume_method_ids() -> list[str]:
    """The ids of the methods that run on volumes ``(B, C, D, H, W)``, in registration order.

    Example:
        >>> import cnnlens.methods
        >>> {"gradcam", "gradcampp", "layercam", "eigencam"} <= set(volume_method_ids())
        True
        >>> "saliency" in volume_method_ids()
        False
    """
    return [spec.id for spec in _REGISTRY.values() if spec.volumes]


def _volume_refusal(method: str, shape: tuple[int, ...]) -> str:
    return (
        f"{method} does not run on volumes: it is defined on images (B, C, H, W) and got a volume of shape {shape} "
        f"(a Conv3d network). Methods that run on volumes: {', '.join(volume_method_ids())}; pick one of them."
    )


def check_volumes(methods: Sequence[MethodSpec], inputs: object) -> None:
    """Refuse, before any forward, methods that do not run on a volume input ``(B, C, D, H, W)``.

    Anything that is not a 5-D tensor passes (images, or inputs a model reads otherwise); a layer-scope method
    whose *layer* outputs a volume for an image input is refused later, by :meth:`MethodSpec.compute`.

    Raises:
        MethodError: ``inputs`` is a volume and a method is not registered with ``volumes=True``; the message
            names the method, the shape and the methods that work on volumes.

    Example:
        >>> import cnnlens.methods
        >>> check_volumes([get_method("gradcam")], torch.zeros(1, 1, 4, 8, 8))
        >>> check_volumes([get_method("saliency")], torch.zeros(1, 1, 4, 8, 8))
        Traceback (most recent call last):
        ...
        cnnlens.errors.MethodError: saliency does not run on volumes: it is defined on images (B, C, H, W) and got ...
    """
    if not isinstance(inputs, torch.Tensor) or inputs.ndim != 5:
        return
    for spec in methods:
        if not spec.volumes:
            raise MethodError(_volume_refusal(spec.id, tuple(inputs.shape)))


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
    scope: Scope = "layer",
    records: Callable[[nn.Module], list[str]] | None = None,
    volumes: bool = False,
) -> Callable[[MethodFn], MethodFn]:
    """Register a method function under ``id`` (decorator).

    ``volumes=True`` declares that the method also runs on volumes (``(B, C, d, h, w)`` views, raw maps
    ``(B, d, h, w)``); leave it False unless a test checks the method on a ``Conv3d`` network.

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
    if scope not in _SCOPES:
        raise MethodError(f"scope must be one of {', '.join(map(repr, _SCOPES))}; got {scope!r}.")
    if (scope == "network") != (records is not None):
        raise MethodError(f"method {id!r}: a network-scope method names its modules with records=, others do not.")

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
            scope=scope,
            records=records,
            volumes=volumes,
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
    methods: str | MethodSpec | BoundMethod | list[str | MethodSpec | BoundMethod] | tuple[Any, ...],
) -> list[MethodSpec]:
    """Turn ``"all"``, an id, or a list of ids/specs/bound methods into a de-duplicated list of specs."""
    return [spec for spec, _ in resolve_bound(methods)]


def resolve_bound(
    methods: str | MethodSpec | BoundMethod | list[str | MethodSpec | BoundMethod] | tuple[Any, ...],
) -> list[tuple[MethodSpec, Mapping[str, Any] | None]]:
    """Like :func:`resolve_methods`, keeping each bound method's options (None for ids and specs).

    Raises:
        OptionError: The same method bound twice with different options.
    """
    if isinstance(methods, (str, MethodSpec, BoundMethod)):
        methods = [methods]
    out: dict[str, tuple[MethodSpec, Mapping[str, Any] | None]] = {}
    for m in methods:
        if isinstance(m, BoundMethod):
            known = out.get(m.id)
            if known is not None and known[1] is not None and dict(known[1]) != dict(m.options):
                raise OptionError(
                    f"method {m.id!r} is bound twice with different options ({dict(known[1])} and "
                    f"{dict(m.options)}); request it once."
                )
            out[m.id] = (m.spec, m.options)
            continue
        if isinstance(m, str) and m.lower() == "all":
            specs = list(_REGISTRY.values())
        elif isinstance(m, (str, MethodSpec)):
            specs = [m if isinstance(m, MethodSpec) else get_method(m)]
        else:
            raise MethodError(
                f"methods= takes ids, MethodSpecs or bound methods (get_method(id).bind(...)); got {type(m).__name__}."
            )
        for spec in specs:
            out.setdefault(spec.id, (spec, None))
    if not out:
        raise MethodError("no method given; name at least one (e.g. 'gradcam').")
    return list(out.values())
