"""The models a server offers, each loaded on first use, with one lock for its forwards and backwards.

Hooks make a model stateful while a capture is open, so every forward/backward on a model (captures, extra
passes of a method, metrics, feature maps, activation maximisation) runs under that model's
:attr:`ServedModel.lock`; two browser tabs then take turns on one model and never interleave hooks.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any

from cnnlens.candidates import CandidateLayer, LayerCatalog, candidate_layers
from cnnlens.explain import default_layer
from cnnlens.models import LoadedModel, available_models, load_model
from cnnlens.models.loader import weights_status
from cnnlens.serve.config import ApiError, ServeConfig, not_found

__all__ = ["ModelHub", "ServedModel", "layer_role"]

log = logging.getLogger("cnnlens.serve")

ROLE_WORDS = {
    "highest_numbered_conv": "highest conv",
    "deepest_conv": "deepest conv",
    "last_branch_conv": "last branch conv",
    "merge": "merge",
    "block_output": "block",
    "final_spatial": "final spatial",
    "conv": "conv",
}


def layer_role(layer: CandidateLayer) -> str:
    """A short human-readable role: the most telling of the layer's roles (``"final spatial"``, ``"block"``...)."""
    for role in ("final_spatial", "highest_numbered_conv", "deepest_conv", "last_branch_conv", "merge"):
        if role in layer.roles:
            return ROLE_WORDS[role]
    return ", ".join(ROLE_WORDS.get(r, r.replace("_", " ")) for r in layer.roles) or "layer"


@dataclass
class ServedModel:
    """One model the server offers; loaded on first use (:meth:`get`).

    Attributes:
        id: The id the API uses (a zoo name, ``custom``, or the key given in ``ServeConfig.models``).
        label: What the page shows (``"efficientnet_lite0"``, ``"resnet50 (random weights)"``).
        lock: Held for every forward/backward on the model.
    """

    id: str
    label: str
    loader: dict[str, Any] | None = None
    loaded: LoadedModel | None = None
    lock: threading.RLock = field(default_factory=threading.RLock)
    _catalog: LayerCatalog | None = None
    _loading: threading.Lock = field(default_factory=threading.Lock)

    def get(self) -> LoadedModel:
        """The loaded model, loading it now if needed (never waits for a forward running on it).

        Raises:
            ApiError: The model could not be loaded (``model_unavailable``).
        """
        if self.loaded is not None:
            return self.loaded
        with self._loading:
            if self.loaded is None:
                assert self.loader is not None
                try:
                    loaded = load_model(**self.loader)
                except Exception as exc:  # any loader failure becomes one clear JSON error
                    raise ApiError(
                        "model_unavailable",
                        f"model {self.id!r} could not be loaded: {exc}",
                        "pick another model, or restart the server with working --model/--weights.",
                        status=500,
                    ) from exc
                loaded.module.eval()
                log.info("loaded model %s (%s)", self.id, loaded.weights_source)
                self.loaded = loaded
            return self.loaded

    def input_chw(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one model input."""
        size = self.get().spec.preprocessing.input_size
        return 3, int(size[0]), int(size[-1])

    def catalog(self) -> LayerCatalog:
        """The candidate layers (computed once per model: one probe forward and an fx trace, under the lock)."""
        if self._catalog is not None:
            return self._catalog
        with self.lock:
            if self._catalog is None:
                self._catalog = candidate_layers(self.get().module, self.input_chw())
            return self._catalog

    def default_layer(self) -> str:
        """The layer explained when none is named (the model's own default, as in ``cnnlens explain``)."""
        return default_layer(self.get())

    def strip(self) -> list[CandidateLayer]:
        """The layers the page offers: every candidate with a role other than a plain conv, plus the default."""
        default = self.default_layer()
        return [c for c in self.catalog().layers if set(c.roles) - {"conv"} or c.name == default]


class ModelHub:
    """The models of one server: the zoo names that load offline, ``--model`` and any preloaded ones."""

    def __init__(self, config: ServeConfig) -> None:
        self.models: dict[str, ServedModel] = {}
        for key, loaded in config.models.items():
            self.models[key] = ServedModel(
                key, key + (" (random weights)" if loaded.random_weights else ""), loaded=loaded
            )
        if config.model is not None:
            zoo = config.model in available_models()
            key = config.model if zoo else "custom"
            name = config.model if zoo else os.path.basename(config.model.split(":")[0]) or config.model
            self.models[key] = ServedModel(
                key,
                name + (" (random weights)" if config.random_weights and not config.weights else ""),
                loader={
                    "name": config.model,
                    "weights": config.weights,
                    "random_weights": config.random_weights and not config.weights,
                    "device": config.device,
                },
            )
        if config.zoo:
            for name in available_models():
                if name in self.models:
                    continue
                available, _ = weights_status(name)
                if available or config.random_weights:
                    label = name if available else f"{name} (random weights)"
                    loader = {"name": name, "random_weights": not available, "device": config.device}
                    self.models[name] = ServedModel(name, label, loader=loader)
        if not self.models:
            raise ApiError("bad_config", "no model to serve.", "give --model, or --random-weights for the zoo.")
        if config.model is not None:
            self.default = "custom" if config.model not in available_models() else config.model
        else:
            self.default = next(iter(self.models))

    def __getitem__(self, model_id: str | None) -> ServedModel:
        """The model of ``model_id`` (None: the default).

        Raises:
            ApiError: Unknown id (404).
        """
        key = self.default if model_id is None or model_id == "" else model_id
        found = self.models.get(key)
        if found is None:
            raise not_found("model", key, f"use one of the ids of GET /api/info: {', '.join(self.models)}.")
        return found
