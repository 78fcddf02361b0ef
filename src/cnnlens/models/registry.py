"""The zoo registry: one :class:`ZooEntry` per model, registered like the methods are.

A zoo model is a builder function decorated with :func:`register_model`, which names its
:class:`~cnnlens.models.spec.ModelSpec` (layers, preprocessing, description) and where its published weights
live (:mod:`cnnlens.models.weights`). The entries themselves are in :mod:`cnnlens.models.zoo`;
``cnnlens models``, :func:`available_models`, :func:`get_spec` and :func:`cnnlens.models.load_model` read
this table.

Example:
    >>> @register_model(spec, weights=TorchvisionWeights("VGG11_Weights", (("IMAGENET1K_V1", None),)))
    ... def build_vgg11(num_classes, mode, checkpoint):
    ...     return torchvision.models.vgg11(weights=None, num_classes=num_classes)  # doctest: +SKIP
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from cnnlens.errors import ModelConfigError, ModelNotFoundError
from cnnlens.models.spec import LoadMode, ModelSpec
from cnnlens.models.weights import PublishedWeights

__all__ = ["Builder", "ZooEntry", "available_models", "get_spec", "register_model", "unknown_model", "zoo_entry"]

Builder = Callable[[int, LoadMode, "Mapping[str, torch.Tensor] | None"], nn.Module]
"""``build(num_classes, mode, checkpoint_state_dict_or_None) -> nn.Module`` (weights are loaded after)."""

CheckpointAdapter = Callable[[Mapping[str, torch.Tensor], nn.Module], Mapping[str, torch.Tensor]]
"""Maps a user checkpoint in another naming onto the module's state-dict keys."""


@dataclass(frozen=True)
class ZooEntry:
    """One zoo model: its spec, how to build it, where its published weights are.

    Attributes:
        spec: What cnnlens knows about it (default layer, known layers, preprocessing, description).
        build: The builder; it builds the architecture only (no weights).
        weights: Where the published weights come from.
        adapt_checkpoint: Optional mapping of user checkpoints in another naming.
    """

    spec: ModelSpec
    build: Builder
    weights: PublishedWeights
    adapt_checkpoint: CheckpointAdapter | None = None


_ZOO: dict[str, ZooEntry] = {}


def register_model(
    spec: ModelSpec, *, weights: PublishedWeights, adapt_checkpoint: CheckpointAdapter | None = None
) -> Callable[[Builder], Builder]:
    """Register a builder as the zoo entry ``spec.name`` (a decorator; registration order is listing order).

    Args:
        spec: The model's spec; ``spec.name`` is its zoo name (lowercase).
        weights: Where its published weights live.
        adapt_checkpoint: Optional mapping of checkpoints saved in another naming.

    Returns:
        The decorator, which returns the builder unchanged.

    Raises:
        ModelConfigError: The name is taken or not lowercase.
    """

    def add(build: Builder) -> Builder:
        if spec.name != _normalise(spec.name) or spec.name in _ZOO:
            raise ModelConfigError(
                f"cannot register zoo model {spec.name!r}: names must be lowercase with '_' and unique; "
                f"registered: {', '.join(_ZOO)}."
            )
        _ZOO[spec.name] = ZooEntry(spec=spec, build=build, weights=weights, adapt_checkpoint=adapt_checkpoint)
        return build

    return add


def _normalise(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def zoo_entry(name: str) -> ZooEntry | None:
    """The entry of a zoo name (case-insensitive, ``-`` accepted for ``_``), or None."""
    return _ZOO.get(_normalise(name))


def available_models() -> list[str]:
    """Return the zoo names, the embedded default first."""
    return list(_ZOO)


def unknown_model(name: str, *, others: Sequence[str] = (), extra: str = "") -> ModelNotFoundError:
    """The error for an unknown name, suggesting close zoo names (then close names from ``others``)."""
    zoo = available_models()
    key = _normalise(name)
    suggestions = difflib.get_close_matches(key, zoo, n=3, cutoff=0.5)
    for n in difflib.get_close_matches(key, list(others), n=8, cutoff=0.75) if others else []:
        if n not in suggestions and len(suggestions) < 5:
            suggestions.append(n)
    hint = f" Did you mean {', '.join(repr(s) for s in suggestions)}?" if suggestions else ""
    return ModelNotFoundError(f"Unknown model {name!r}.{hint} Zoo models: {', '.join(zoo)}.{extra}")


def get_spec(name: str) -> ModelSpec:
    """Return the spec of a zoo model.

    Args:
        name: a zoo name (case-insensitive, ``-`` accepted for ``_``).

    Returns:
        a copy of the spec (mutating it does not change the zoo).

    Raises:
        ModelNotFoundError: not a zoo name; the message suggests close names ("did you mean").

    Example:
        >>> get_spec("vgg16").default_layer
        'features.29'
    """
    entry = zoo_entry(name)
    if entry is None:
        raise unknown_model(name)
    return replace(entry.spec, known_layers=dict(entry.spec.known_layers))
