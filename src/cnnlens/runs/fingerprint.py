"""What identifies a run's configuration: the model's fingerprint, and a readable list of what changed.

A run folder keeps the hash of its configuration (dataset samples, model weights and preprocessing, methods,
layers, options, metrics, shard size) in ``run.json``; how the run executes (batch size, workers, device,
:class:`cnnlens.Execution`) is never part of it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import torch

from cnnlens.models import LoadedModel

__all__ = ["describe_changes", "model_fingerprint"]


def model_fingerprint(model: LoadedModel) -> dict[str, Any]:
    """What identifies a model's behaviour: provenance, a sha256 of every parameter and buffer, class names."""
    digest = hashlib.sha256()
    for name, tensor in list(model.module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    names = hashlib.sha256("\n".join(model.class_names).encode("utf-8")).hexdigest()
    return {
        "name": model.spec.name,
        "family": model.spec.family,
        "source": model.spec.source,
        "num_classes": model.spec.num_classes,
        "random_weights": model.random_weights,
        "preprocessing": model.spec.preprocessing.as_dict(),
        "state_sha256": digest.hexdigest(),
        "class_names_sha256": names,
    }


def _flatten(doc: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(doc, Mapping):
        out: dict[str, Any] = {}
        for key, value in doc.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: doc}


def describe_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """The differing keys of two configurations (dotted paths, at most 8 lines), for a refusal message."""
    a, b = _flatten(old), _flatten(new)
    lines = []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            before, after = json.dumps(a.get(key), default=str), json.dumps(b.get(key), default=str)
            lines.append(f"  {key}: {before[:80]} -> {after[:80]}")
    return "\n".join(lines[:8]) + (f"\n  ... and {len(lines) - 8} more" if len(lines) > 8 else "")
