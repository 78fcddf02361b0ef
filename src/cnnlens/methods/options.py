"""Typed method options: option checks and :class:`BoundMethod` (``get_method(id).bind(**options)``).

An option's type is its default's (a bool for a bool, an int for an int, a finite number for a float, a str
for a str; a None default accepts anything the method validates itself). Every bad option is an
:class:`~cnnlens.errors.OptionError`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from cnnlens.errors import OptionError

if TYPE_CHECKING:
    from cnnlens.methods.registry import MethodSpec

__all__ = ["BoundMethod", "check_count", "check_type"]


def check_count(method: str, name: str, value: Any, minimum: int = 1) -> int:
    """Return ``value`` when it is an integer >= ``minimum``, else raise an :class:`OptionError` naming it.

    Example:
        >>> check_count("scorecam", "top_k", 0)
        Traceback (most recent call last):
        ...
        cnnlens.errors.OptionError: scorecam: option top_k must be an integer >= 1; got 0.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise OptionError(f"{method}: option {name} must be an integer >= {minimum}; got {value!r}.")
    return value


def check_type(method: str, name: str, value: Any, default: Any) -> None:
    """Refuse a value whose type does not match the option's default (bool, int, float or str)."""
    if default is None or name == "display" or isinstance(value, torch.Tensor):
        return  # None defaults, display rules and tensors (an IG baseline) are validated by the method itself
    if name == "baseline" and isinstance(value, Mapping):
        return  # IG baselines per model input ({name: baseline}), validated by the method itself
    if isinstance(default, bool):
        ok = isinstance(value, bool)
        want = "True or False"
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
        want = "an integer"
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        want = "a finite number"
    elif isinstance(default, str):
        ok = isinstance(value, str)
        want = "a string"
    else:
        return
    if not ok:
        raise OptionError(
            f"method {method!r}: option {name} must be {want} (its default is {default!r}); got "
            f"{value!r} ({type(value).__name__})."
        )


@dataclass(frozen=True)
class BoundMethod:
    """A registered method with some options fixed: ``get_method(id).bind(**options)``.

    Attributes:
        spec: The method.
        options: The options given to :meth:`MethodSpec.bind` (checked when bound; read-only).
    """

    spec: MethodSpec
    options: Mapping[str, Any]

    @property
    def id(self) -> str:
        """The method's id."""
        return self.spec.id

    def __repr__(self) -> str:
        """``BoundMethod('gradcampp', alpha_normalize=True)``."""
        given = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"BoundMethod({self.id!r}{given})"

    def variant(self) -> dict[str, Any]:
        """The full variant: the method's defaults merged with the bound options."""
        return self.spec.variant(self.options)
