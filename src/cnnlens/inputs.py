"""Models with several inputs: :class:`ModelInputs`, the one type the capture core uses for them.

A model called with one tensor needs none of this: a plain tensor goes through the capture exactly as it
always did (no wrapper, no extra copy). A model called with several tensors (RGB and depth, an image and a
mask, two images), with keyword inputs, or with captum-style ``additional_forward_args`` (arguments passed
to the model after the explained inputs, neither explained nor perturbed) is described by a
:class:`ModelInputs`:

* ``tensors``: the explained inputs, each ``(B, ...)`` with the same batch size ``B``;
* ``names``: their names, ``"0"``, ``"1"``... for positional inputs, the keyword for keyword inputs;
* ``extra_args`` / ``extra_kwargs``: the additional arguments. A tensor among them whose first dimension is
  the batch size is **per sample** (it follows the rows of the batch when a replay or a chunked pass takes
  rows, as captum expands it); anything else (numbers, flags, tensors of another first size) is passed
  unchanged to every call.

The model is called as ``model(*positional inputs, *extra_args, **keyword inputs, **extra_kwargs)``.

Example:
    >>> rgb, depth = torch.zeros(2, 3, 8, 8), torch.ones(2, 1, 8, 8)
    >>> inp = as_model_inputs((rgb, depth))
    >>> inp.names, inp.batch, inp.spatial_names()
    (('0', '1'), 2, ('0', '1'))
    >>> inp.rows(torch.tensor([1])).tensors[1].shape
    torch.Size([1, 1, 8, 8])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from cnnlens.errors import InputShapeError

__all__ = ["InputsSpec", "ModelInputs", "as_model_inputs", "input_key", "is_multi"]

InputsSpec = Any
"""What ``explain()``/``Capture.run`` accept as inputs: a tensor, a tuple/list of tensors, a mapping of
keyword -> tensor, or a :class:`ModelInputs`."""


def input_key(name: str | None) -> str:
    """The result key of an input-scope map: ``"input"`` for the only input, ``"input:<name>"`` otherwise.

    Example:
        >>> input_key(None), input_key("depth")
        ('input', 'input:depth')
    """
    return "input" if name is None else f"input:{name}"


@dataclass(frozen=True)
class ModelInputs:
    """Several model inputs (explained tensors plus unexplained extra arguments); see the module docstring.

    Attributes:
        tensors: The explained inputs, each ``(B, ...)``.
        names: One name per tensor: ``"0"``, ``"1"``... (positional) or the keyword.
        keyword: Whether the tensors are passed as keyword arguments (named by ``names``).
        extra_args: Positional arguments passed after the positional inputs (not explained).
        extra_kwargs: Keyword arguments passed with the inputs (not explained).
    """

    tensors: tuple[torch.Tensor, ...]
    names: tuple[str, ...]
    keyword: bool = False
    extra_args: tuple[Any, ...] = ()
    extra_kwargs: Mapping[str, Any] = field(default_factory=dict)

    # -- what the core reads -----------------------------------------------------------------------
    @property
    def batch(self) -> int:
        """The batch size ``B`` (checked equal for every explained tensor by :func:`as_model_inputs`)."""
        return int(self.tensors[0].shape[0])

    @property
    def primary(self) -> torch.Tensor:
        """The first explained tensor (``Recording.inputs`` for compatibility)."""
        return self.tensors[0]

    @property
    def device(self) -> torch.device:
        """The device of the first tensor."""
        return self.tensors[0].device

    def spatial_names(self) -> tuple[str, ...]:
        """Names of the spatial inputs: 4-D floating-point tensors, those that get pixel maps."""
        return tuple(n for n, t in zip(self.names, self.tensors, strict=True) if t.ndim == 4 and t.is_floating_point())

    def tensor(self, name: str) -> torch.Tensor:
        """The explained tensor called ``name``.

        Raises:
            InputShapeError: No input has that name.
        """
        try:
            return self.tensors[self.names.index(name)]
        except ValueError:
            raise InputShapeError(f"no model input named {name!r}; the inputs are {list(self.names)}.") from None

    def call(self, fn: Callable[..., Any]) -> Any:
        """``fn(*positional inputs, *extra_args, **keyword inputs, **extra_kwargs)`` (``fn`` is the model)."""
        if self.keyword:
            return fn(*self.extra_args, **dict(zip(self.names, self.tensors, strict=True)), **self.extra_kwargs)
        return fn(*self.tensors, *self.extra_args, **self.extra_kwargs)

    def key(self) -> tuple[Any, ...]:
        """Identifies these inputs (storage, shape, version of every tensor), for the replay's caches."""
        return tuple(
            (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype, str(t.device), t._version)
            for t in (*self.tensors, *self._batched_extras())
        )

    def row_bytes(self) -> int:
        """Bytes of one sample of every explained and per-sample extra tensor."""
        return sum(t[:1].nelement() * t.element_size() for t in (*self.tensors, *self._batched_extras()))

    # -- building new inputs -----------------------------------------------------------------------
    def map(
        self, fn: Callable[[torch.Tensor], torch.Tensor], *, extras: bool = False, all_extras: bool = False
    ) -> ModelInputs:
        """Apply ``fn`` to every explained tensor, and to extra tensors.

        ``extras``: to every per-sample extra tensor (rows follow the batch); ``all_extras``: to every extra tensor
        (device moves).
        """
        out = replace(self, tensors=tuple(fn(t) for t in self.tensors))
        if not (extras or all_extras):
            return out

        def wanted(value: object) -> bool:
            return isinstance(value, torch.Tensor) and (all_extras or self._batched(value))

        return replace(
            out,
            extra_args=tuple(fn(a) if wanted(a) else a for a in self.extra_args),
            extra_kwargs={k: fn(v) if wanted(v) else v for k, v in self.extra_kwargs.items()},
        )

    def rows(self, index: torch.Tensor) -> ModelInputs:
        """Rows ``index`` of the batch: every explained tensor and every per-sample extra tensor."""
        return self.map(lambda t: t.index_select(0, index.to(t.device)), extras=True)

    def replace(self, name: str, tensor: torch.Tensor) -> ModelInputs:
        """These inputs with the tensor ``name`` replaced (other inputs and extras unchanged)."""
        i = self.names.index(name)
        return replace(self, tensors=(*self.tensors[:i], tensor, *self.tensors[i + 1 :]))

    def with_rows(self, name: str, tensor: torch.Tensor, sample_index: torch.Tensor) -> ModelInputs:
        """Rows ``sample_index`` of every input, with input ``name`` replaced by ``tensor`` (one row each).

        This is how one input is varied (noisy copies, interpolation steps) while the others hold their
        values: row ``r`` is sample ``sample_index[r]``.
        """
        return self.rows(sample_index).replace(name, tensor)

    def _batched(self, value: object) -> bool:
        return isinstance(value, torch.Tensor) and value.ndim >= 1 and int(value.shape[0]) == self.batch

    def _batched_extras(self) -> list[torch.Tensor]:
        values = [*self.extra_args, *self.extra_kwargs.values()]
        return [v for v in values if isinstance(v, torch.Tensor) and self._batched(v)]


def _check_tensor(value: object, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise InputShapeError(
            f"model input {name!r} must be a tensor, got {type(value).__name__}; pass arguments that are not "
            "explained (numbers, flags, lists) with additional_forward_args=."
        )
    return value


def as_model_inputs(inputs: InputsSpec, additional_forward_args: Any = None) -> ModelInputs:
    """Build a :class:`ModelInputs` from what a user passed, checking it before anything runs.

    Args:
        inputs: A tensor, a tuple/list of tensors (positional inputs ``"0"``, ``"1"``...), a mapping of keyword ->
            tensor (keyword inputs), or a :class:`ModelInputs` (returned with the extra arguments added).
        additional_forward_args: Not explained: a tuple or list (positional, after the inputs), a mapping
            (keyword arguments), or any single value (one positional argument), as captum's argument.

    Raises:
        InputShapeError: No input, an input that is not a tensor, or batch sizes that differ; the message
            names the input.

    Example:
        >>> inp = as_model_inputs({"image": torch.zeros(1, 3, 4, 4)}, additional_forward_args=(0.5,))
        >>> inp.names, inp.keyword, inp.extra_args
        (('image',), True, (0.5,))
    """
    if isinstance(inputs, ModelInputs):
        base = inputs
    elif isinstance(inputs, torch.Tensor):
        base = ModelInputs((inputs,), ("0",))
    elif isinstance(inputs, Mapping):
        if not inputs:
            raise InputShapeError("got an empty mapping of inputs; give at least one keyword -> tensor.")
        names = tuple(str(k) for k in inputs)
        base = ModelInputs(tuple(_check_tensor(v, n) for n, v in zip(names, inputs.values(), strict=True)), names, True)
    elif isinstance(inputs, Sequence) and not isinstance(inputs, (str, bytes)):
        if not inputs:
            raise InputShapeError("got an empty sequence of inputs; give at least one tensor.")
        names = tuple(str(i) for i in range(len(inputs)))
        base = ModelInputs(tuple(_check_tensor(v, n) for n, v in zip(names, inputs, strict=True)), names)
    else:
        raise InputShapeError(
            f"inputs must be a tensor, a tuple/list of tensors or a mapping of keyword -> tensor, got "
            f"{type(inputs).__name__}."
        )
    args, kwargs = _extras(additional_forward_args)
    if args or kwargs:
        base = replace(base, extra_args=(*base.extra_args, *args), extra_kwargs={**base.extra_kwargs, **kwargs})
    _check_batch(base)
    return base


def _extras(additional: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if additional is None:
        return (), {}
    if isinstance(additional, Mapping):
        return (), {str(k): v for k, v in additional.items()}
    if isinstance(additional, (tuple, list)):
        return tuple(additional), {}
    return (additional,), {}


def _check_batch(inputs: ModelInputs) -> None:
    sizes = []
    for name, t in zip(inputs.names, inputs.tensors, strict=True):
        if t.ndim == 0:
            raise InputShapeError(f"model input {name!r} is a scalar tensor; every input needs a batch dimension.")
        sizes.append(int(t.shape[0]))
    if len(set(sizes)) > 1:
        shown = ", ".join(f"{n!r} {tuple(t.shape)}" for n, t in zip(inputs.names, inputs.tensors, strict=True))
        raise InputShapeError(
            f"the model inputs have different batch sizes: {shown}; every explained input needs the same "
            "batch size B in dimension 0 (pass inputs shared by every sample with additional_forward_args=)."
        )


def is_multi(inputs: object, additional_forward_args: Any = None) -> bool:
    """Whether ``inputs`` need a :class:`ModelInputs` (anything but a lone tensor without extra arguments)."""
    return additional_forward_args is not None or not isinstance(inputs, torch.Tensor)
