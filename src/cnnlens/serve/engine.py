"""Explanations from cached recordings: one capture per (model, image, class) serves every layer and method.

The first explanation of an image for a class captures the requested layer **and every offered layer after it**
(:meth:`cnnlens.serve.models.ServedModel.strip`) in one forward and one backward. The backward has to reach the
earliest hooked layer anyway, so the later layers cost a clone of their output each and nothing more; the
first request stays as fast as :func:`cnnlens.explain` at that layer. Switching method, or to any later layer,
then computes the map from the cached :class:`~cnnlens.capture.Recording` without a forward. Once the server is
idle, the background warm-up (:mod:`cnnlens.serve.prefetch`, :meth:`Engine.complete`) extends the recording to
every offered layer; an earlier layer asked for before that captures again (from that layer on) and replaces
the entry. Methods that need extra passes (Score-CAM, guided backprop, input gradients...) run them through the
same :class:`~cnnlens.capture.Probe`, whose own caches live with the entry, under the model's lock.

Recordings and computed maps are kept in the bounded caches of :mod:`cnnlens.serve.cache`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cnnlens.capture import Probe, capture
from cnnlens.errors import CnnlensError, MethodNotFoundError, OptionError
from cnnlens.explain import display_images, explain, explain_recording
from cnnlens.explanation import Explanation
from cnnlens.methods.registry import MethodSpec, get_method
from cnnlens.metrics import average_drop, deletion_insertion
from cnnlens.outputs import to_logits
from cnnlens.serve.cache import MapRecord, MapStore, Recorded, RecordingCache
from cnnlens.serve.config import ApiError
from cnnlens.serve.images import ImageStore
from cnnlens.serve.models import ModelHub, ServedModel
from cnnlens.serve.prefetch import Prefetcher

__all__ = ["Engine", "bad_request", "method_spec"]

log = logging.getLogger("cnnlens.serve")


def method_spec(method: str | None) -> MethodSpec:
    """The registered method of ``method`` (default ``gradcam``).

    Raises:
        ApiError: ``unknown_method`` (400).
    """
    try:
        return get_method(method or "gradcam")
    except (MethodNotFoundError, KeyError) as exc:
        raise ApiError("unknown_method", str(exc), "use a method id from GET /api/info.") from exc


def bad_request(exc: CnnlensError) -> ApiError:
    """A CnnlensError raised by a request's arguments, as a 400 JSON error."""
    code = "bad_option" if isinstance(exc, OptionError) else "bad_request"
    return ApiError(code, str(exc), "change the request as the message says.")


def _map_id(*parts: object) -> str:
    text = json.dumps([str(p) if not isinstance(p, (dict, list)) else p for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


class Engine:
    """Captures, caches and explains; every forward/backward under the model's lock.

    Args:
        hub: The served models.
        images: The image store.
        cache: The recording cache.
        maps: The map store.
    """

    def __init__(self, hub: ModelHub, images: ImageStore, cache: RecordingCache, maps: MapStore) -> None:
        self.hub = hub
        self.images = images
        self.cache = cache
        self.maps = maps
        self.prefetch: Prefetcher | None = None

    # -- layers ----------------------------------------------------------------------------------------
    def check_layer(self, served: ServedModel, layer: str) -> None:
        """Refuse a layer name the model does not have (before any forward).

        Raises:
            ApiError: ``unknown_layer`` (400).
        """
        names = {name for name, _ in served.get().module.named_modules() if name}
        if layer not in names:
            offered = ", ".join(c.name for c in served.strip()[-6:])
            raise ApiError(
                "unknown_layer",
                f"model {served.id!r} has no layer {layer!r}.",
                f"pick a layer from GET /api/layers (e.g. {offered}).",
            )

    def capture_set(self, served: ServedModel, layer: str) -> list[str]:
        """``layer`` plus every offered layer that runs after it (one backward reaches them all anyway)."""
        strip = served.strip()
        order = {c.name: c.order for c in served.catalog().layers}
        start = order.get(layer)
        later = [c.name for c in strip if start is not None and c.order > start and c.name != layer]
        return [layer, *later]

    # -- capture -----------------------------------------------------------------------------------------
    def recording(
        self, served: ServedModel, image_id: str, class_index: int | None, layer: str
    ) -> tuple[Recorded, bool, float]:
        """The cached recording for (model, image, class) holding ``layer``, capturing it if needed.

        Must be called with ``served.lock`` held.

        Returns:
            ``(entry, cached, capture milliseconds)``.
        """
        if class_index is None:
            class_index = self.cache.top_class(served.id, image_id)
        if class_index is not None:
            found = self.cache.get((served.id, image_id, class_index), layer)
            if found is not None:
                return found, True, 0.0
        start = time.perf_counter()
        old = self.cache.peek((served.id, image_id, class_index)) if class_index is not None else None
        names = self.capture_set(served, layer)
        if old is not None:  # keep what the old entry had: it costs no deeper backward
            names += [n for n in old.layers if n not in names]
        entry = self._capture(served, image_id, class_index, names)
        if self.prefetch is not None:
            self.prefetch.schedule(served.id, image_id, entry.key[2])
        return entry, False, (time.perf_counter() - start) * 1000

    def _capture(self, served: ServedModel, image_id: str, class_index: int | None, names: list[str]) -> Recorded:
        """Capture ``names`` (activations and gradients) for one image and class, and cache the recording."""
        loaded = served.get()
        x = self.images.model_input(image_id, served.id, loaded)
        cap = capture(loaded.module, names)
        with cap:
            rec = cap.run(x, class_index, gradients=True, input_gradients=False)
        assert rec.target_classes is not None
        resolved = int(rec.target_classes[0, 0])
        if class_index is None:
            self.cache.set_top(served.id, image_id, resolved)
        entry = Recorded(
            key=(served.id, image_id, resolved),
            cap=cap,
            rec=rec,
            probe=Probe(cap, rec, rec.targets),
            layers=frozenset(rec.layers),
            images=display_images(rec.inputs, loaded),
            manifest={"model": loaded.manifest()},
        )
        self.cache.put(entry)
        return entry

    def complete(self, model_id: str, image_id: str, class_index: int) -> bool:
        """Extend a cached recording to every offered layer (the background warm-up; see :mod:`.prefetch`).

        Returns:
            Whether a capture ran (False when the entry was evicted meanwhile or already complete).
        """
        served = self.hub[model_id]
        with served.lock:
            old = self.cache.peek((model_id, image_id, class_index))
            if old is None:
                return False
            missing = [c.name for c in served.strip() if c.name not in old.layers]
            if not missing:
                return False
            try:
                self._capture(served, image_id, class_index, [*old.layers, *missing])
            except (CnnlensError, ApiError) as exc:  # the image was dropped, or a layer cannot be recorded
                log.info("warm-up of %s/%s skipped: %s", model_id, image_id, exc)
                return False
            log.info(
                "warm-up: %s/%s/%d now holds %d layers", model_id, image_id, class_index, len(old.layers) + len(missing)
            )
            return True

    # -- explain ---------------------------------------------------------------------------------------
    def explain(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """``POST /api/explain``: compute (or reuse) a map; returns the response body.

        Raises:
            ApiError: Unknown model/image/method/layer, bad options or class (400/404).
        """
        t0 = time.perf_counter()
        if self.prefetch is not None:
            self.prefetch.touch()
        served = self.hub[request.get("model")]
        loaded = served.get()
        image_id = str(request.get("image_id") or "")
        self.images.get(image_id)
        spec = method_spec(request.get("method"))
        options = request.get("options") or {}
        if not isinstance(options, dict):
            raise ApiError("bad_option", f"options must be an object, got {type(options).__name__}.", "send {}.")
        try:
            variant = spec.variant(options)
        except CnnlensError as exc:
            raise bad_request(exc) from exc
        layer = str(request.get("layer") or served.default_layer())
        self.check_layer(served, layer)
        class_index = request.get("class_index")
        num_classes = len(loaded.class_names) or int(loaded.spec.num_classes)
        if class_index is not None and (
            isinstance(class_index, bool) or not isinstance(class_index, int) or not 0 <= class_index < num_classes
        ):
            raise ApiError(
                "bad_class",
                f"class_index must be null or an integer in 0..{num_classes - 1}, got {class_index!r}.",
                "pick a class from the predictions or GET /api/classes.",
            )
        key_layer = layer if spec.scope == "layer" else spec.scope
        known = class_index if class_index is not None else self.cache.top_class(served.id, image_id)
        done = (
            self.maps.find(_map_id(served.id, image_id, known, key_layer, spec.id, variant))
            if known is not None
            else None
        )
        if done is not None:  # the very same map was computed before: no lock, no work
            total = (time.perf_counter() - t0) * 1000
            return self._body(done, cached=True, timing={"capture": 0.0, "method": 0.0, "total": total})
        with served.lock:
            if "attention" in spec.needs:
                return self._explain_direct(served, image_id, class_index, layer, spec, variant, t0)
            try:
                entry, cached, capture_ms = self.recording(served, image_id, class_index, layer)
                t1 = time.perf_counter()
                result = self._compute(served, entry, spec, variant, key_layer)
            except ApiError:
                raise
            except CnnlensError as exc:
                raise bad_request(exc) from exc
            record = self._record(served, image_id, entry.key[2], layer, spec, variant, result, entry.manifest)
            method_ms = (time.perf_counter() - t1) * 1000
        self.maps.put(record)
        total = (time.perf_counter() - t0) * 1000
        return self._body(record, cached=cached, timing={"capture": capture_ms, "method": method_ms, "total": total})

    def _compute(
        self, served: ServedModel, entry: Recorded, spec: MethodSpec, variant: dict[str, Any], key: str
    ) -> Explanation:
        """One method at one layer (or input/network) from the cached recording (capture re-opened for passes)."""
        loaded = served.get()
        with entry.cap:
            return explain_recording(
                loaded.module,
                entry.rec,
                entry.probe,
                spec,
                variant,
                key,
                images=entry.images,
                class_names=loaded.class_names or None,
                manifest=entry.manifest,
            )

    def _explain_direct(
        self,
        served: ServedModel,
        image_id: str,
        class_index: int | None,
        layer: str,
        spec: MethodSpec,
        variant: dict[str, Any],
        t0: float,
    ) -> dict[str, Any]:
        """Methods that need a recorder around the forward (attention): one plain :func:`cnnlens.explain` call."""
        loaded = served.get()
        x = self.images.model_input(image_id, served.id, loaded)
        try:
            result = explain(
                loaded, x, methods=[spec.id], layers=[layer], targets=class_index, options={spec.id: variant}
            )
        except CnnlensError as exc:
            raise bad_request(exc) from exc
        exp = next(iter(result))
        cls = int(exp.target_classes[0, 0])
        record = self._record(served, image_id, cls, layer, spec, variant, exp, dict(result.manifest))
        self.maps.put(record)
        total = (time.perf_counter() - t0) * 1000
        return self._body(record, cached=False, timing={"capture": total, "method": 0.0, "total": total})

    def _record(
        self,
        served: ServedModel,
        image_id: str,
        class_index: int,
        layer: str,
        spec: MethodSpec,
        variant: dict[str, Any],
        exp: Explanation,
        manifest: dict[str, Any],
    ) -> MapRecord:
        raw = exp.raw[:1, :1].float()
        size = tuple(int(s) for s in exp.maps.shape[-2:])
        signed = raw if tuple(raw.shape[-2:]) == size else F.interpolate(raw, size=size, mode="bilinear")
        names = served.get().class_names
        key_layer = layer if spec.scope == "layer" else spec.scope
        lo, hi = float(raw.amin()), float(raw.amax())
        score = float(exp.scores[0, 0])
        images = exp.images if exp.images is not None else torch.zeros((1, *size, 3), dtype=torch.uint8)
        full_manifest = {
            **manifest,
            "layer": key_layer,
            "method": spec.id,
            "title": spec.title,
            "options": dict(variant),
            "class": {"index": class_index, "name": names[class_index] if class_index < len(names) else ""},
            "score": score,
            "range": [lo, hi],
            "image_id": image_id,
        }
        return MapRecord(
            id=_map_id(served.id, image_id, class_index, key_layer, spec.id, variant),
            model=served.id,
            image_id=image_id,
            layer=key_layer,
            method=spec.id,
            variant=dict(variant),
            class_index=class_index,
            class_name=names[class_index] if class_index < len(names) else str(class_index),
            score=score,
            map01=exp.maps[0, 0].detach().cpu().numpy().astype(np.float32),
            signed=signed[0, 0].detach().cpu().numpy().astype(np.float32),
            image=images[0].cpu().numpy(),
            manifest=json.loads(json.dumps(full_manifest, default=str)),
            range=(lo, hi),
        )

    @staticmethod
    def _body(record: MapRecord, *, cached: bool, timing: dict[str, float]) -> dict[str, Any]:
        return {
            "map_id": record.id,
            "class_index": record.class_index,
            "class_name": record.class_name,
            "score": record.score,
            "layer": record.layer,
            "method": record.method,
            "cached": cached,
            "timing_ms": {k: round(v, 2) for k, v in timing.items()},
            "range": [record.range[0], record.range[1]],
        }

    # -- predict -----------------------------------------------------------------------------------------
    def predict(self, request: Mapping[str, Any], k: int = 5) -> dict[str, Any]:
        """``POST /api/predict``: the top-k classes (one forward, no hooks)."""
        t0 = time.perf_counter()
        served = self.hub[request.get("model")]
        loaded = served.get()
        image_id = str(request.get("image_id") or "")
        x = self.images.model_input(image_id, served.id, loaded)
        with served.lock, torch.no_grad():
            logits = to_logits(loaded.module(x))
        probs = torch.softmax(logits.float(), dim=1)[0]
        top = torch.topk(probs, min(k, probs.numel()))
        names = loaded.class_names
        self.cache.set_top(served.id, image_id, int(top.indices[0]))
        rows = [
            {"index": int(i), "name": names[int(i)] if int(i) < len(names) else str(int(i)), "score": float(s)}
            for s, i in zip(top.values, top.indices, strict=True)
        ]
        total = (time.perf_counter() - t0) * 1000
        return {"top": rows, "num_classes": int(probs.numel()), "model": served.id, "timing_ms": {"total": total}}

    # -- metrics -----------------------------------------------------------------------------------------
    def metrics(self, map_id: str, steps: int = 16) -> dict[str, Any]:
        """``POST /api/metrics``: Average Drop, Increase in Confidence, deletion/insertion AUC and curves.

        The map is the one shown (``[0, 1]`` at input resolution); the class is the one it explains. One forward
        for Average Drop and ``2 * steps`` for the two games, batched, under the model's lock.
        """
        record = self.maps.get(map_id)
        if "metrics" in record.extra:
            return dict(record.extra["metrics"])
        served = self.hub[record.model]
        loaded = served.get()
        x = self.images.model_input(record.image_id, served.id, loaded)
        saliency = torch.from_numpy(record.map01).unsqueeze(0).to(x.device)
        size = int(record.map01.shape[0] * record.map01.shape[1])
        with served.lock:
            drop = average_drop(loaded, x, saliency, [record.class_index])
            deletion, insertion = deletion_insertion(
                loaded, x, saliency, [record.class_index], step=max(1, -(-size // steps))
            )
        body = {
            "average_drop": float(drop.average_drop),
            "increase_in_confidence": float(drop.increase_in_confidence),
            "deletion_auc": deletion.mean_auc,
            "insertion_auc": insertion.mean_auc,
            "curves": {
                "deletion": [float(v) for v in deletion.mean_curve],
                "insertion": [float(v) for v in insertion.mean_curve],
                "fractions": [float(v) for v in deletion.fractions],
            },
        }
        record.extra["metrics"] = body
        return body
