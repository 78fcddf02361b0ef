"""The catalogue of candidate layers: :data:`ROLES`, :class:`CandidateLayer`, :class:`LayerCatalog`.

Shared by the torch path (:mod:`cnnlens.candidates`) and the Keras path (:mod:`cnnlens.candidates.keras_graph`).

Example:
    >>> LayerCatalog([CandidateLayer("layer4", ("block_output",), "Sequential", (512, 7, 7), 32, 0)], "fx").first(
    ...     "block_output")
    'layer4'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import nn

from cnnlens.capture import LayerInfo

if TYPE_CHECKING:
    from cnnlens.capture.layout import Layout

__all__ = ["CONTAINERS", "ROLES", "CandidateLayer", "LayerCatalog", "one_name_per_tensor"]

ROLES = (
    "conv",
    "highest_numbered_conv",
    "deepest_conv",
    "last_branch_conv",
    "merge",
    "block_output",
    "final_spatial",
    "attention_norm",
    "mlp_norm",
)

CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
"""Plain containers: their output is their last child's."""


@dataclass(frozen=True)
class CandidateLayer:
    """A layer worth targeting.

    Attributes:
        name: Dotted module name.
        roles: Its roles (see the module docstring), in :data:`ROLES` order.
        type: Module class name.
        shape: Output ``(C, h, w)``, in the map view (a token or channels-last output mapped by its layout).
        stride: Input height over output height (of the map view).
        order: Position in execution order (completion of the module's forward).
        aliases: Other modules whose output is this very tensor (``layer4`` for ``layer4.2``): listed once,
            under the outermost name that is not a plain container, with the roles of all of them.
        layout: How the output maps to ``(C, h, w)``, as ``layout=`` text: ``"nchw"``, ``"nhwc"`` or
            ``"tokens:P:HxW"`` (P prefix tokens, an H x W grid); for this input size.
    """

    name: str
    roles: tuple[str, ...]
    type: str
    shape: tuple[int, ...]
    stride: int | None
    order: int
    aliases: tuple[str, ...] = ()
    layout: str = "nchw"


@dataclass
class LayerCatalog:
    """Every candidate layer of a model, plus how merges were found.

    Attributes:
        layers: Candidates in execution order.
        merge_method: ``"fx"``, ``"source"`` (fallback when tracing failed) or ``"keras"`` (a Keras model's own
            layer graph).
        notes: Anything the user should know (e.g. functional merges at the top level that no module owns).
    """

    layers: list[CandidateLayer]
    merge_method: str
    notes: list[str] = field(default_factory=list)

    def with_role(self, role: str) -> list[str]:
        """Names of the candidates that have ``role``, in execution order."""
        return [layer.name for layer in self.layers if role in layer.roles]

    def first(self, role: str) -> str | None:
        """The single layer of a one-of role (``deepest_conv``...), or None."""
        names = self.with_role(role)
        return names[-1] if names else None


def one_name_per_tensor(
    roles: dict[str, list[str]], ran: dict[str, LayerInfo], order: dict[str, int], modules: dict[str, nn.Module]
) -> dict[str, tuple[str, ...]]:
    """Merge the roles of modules returning the same unchanged tensor; return kept name -> its aliases.

    ``layer4`` and its last block ``layer4.2`` are listed once with every member's roles, under the outermost
    name that is not a plain container (whose output is by definition its last child's): the block, as the
    zoo's known layers name it. ``roles`` is updated in place.
    """
    groups: dict[str, list[str]] = {}
    for n in sorted(roles, key=lambda n: order[n]):
        groups.setdefault(ran[n].same_as or n, []).append(n)
    aliases: dict[str, tuple[str, ...]] = {}
    for members in groups.values():
        if len(members) < 2:
            continue
        plain = [n for n in members if not isinstance(modules[n], CONTAINERS)]
        keep = plain[-1] if plain else members[-1]
        for other in members:
            if other != keep:
                roles[keep].extend(roles.pop(other))
        aliases[keep] = tuple(n for n in members if n != keep)
    return aliases


def build_catalog(
    roles: dict[str, list[str]],
    ran: dict[str, LayerInfo],
    views: dict[str, tuple[Layout, tuple[int, ...], int | None]],
    order: dict[str, int],
    modules: dict[str, nn.Module],
    *,
    merge_method: str,
    notes: list[str],
) -> LayerCatalog:
    """The catalogue of every layer that has a role, in execution order, one name per tensor (torch and Keras).

    Args:
        roles: Layer name -> its roles (any order; the catalogue orders them as :data:`ROLES`).
        ran: Layer name -> what the shape probe saw.
        views: Layer name -> (layout, map-view shape ``(C, h, w)``, stride).
        order: Layer name -> position in execution order.
        modules: ``dict(model.named_modules())``.
        merge_method: How merges were found (``"fx"``, ``"source"``, ``"keras"``...).
        notes: Notes for the user.
    """
    aliases = one_name_per_tensor(roles, ran, order, modules)
    layers = [
        CandidateLayer(
            name=n,
            roles=tuple(r for r in ROLES if r in roles[n]),
            type=ran[n].type,
            shape=views[n][1],
            stride=views[n][2],
            order=order[n],
            aliases=aliases.get(n, ()),
            layout=views[n][0].spec(),
        )
        for n in sorted(roles, key=lambda n: order[n])
        if roles[n]
    ]
    return LayerCatalog(layers=layers, merge_method=merge_method, notes=notes)
